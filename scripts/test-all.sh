#!/usr/bin/env bash
# Every test of the workspace, on a fresh machine: installs MPI, Mesa's software Vulkan device and
# the LLVM that the CUDA build links, then runs unit, property, thread, mpirun, wgpu (software
# Vulkan) and GPU-kit tests in release mode against a build with every feature, `cuda` included
# (models train in these tests; debug burn is slow). Without a GPU the CUDA paths report so.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
./scripts/setup-cuda-build.sh >/dev/null
# mpirun refuses to run as root unless told it may; the tests oversubscribe cores themselves.
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
export OMPI_MCA_rmaps_base_oversubscribe=1
# The Vulkan loader wants a private runtime directory.
export XDG_RUNTIME_DIR="${XDG_RUNTIME_DIR:-$(mktemp -d)}"
log="$(mktemp)"
# Every test binary runs even when one fails, so one run shows every failure.
status=0
cargo test --release --workspace --no-fail-fast \
  --features "$(./scripts/features.sh)" "$@" \
  2>&1 | tee "$log" || status=$?
# One closing line with the totals of every test binary.
awk '/^test result:/ { for (i = 1; i <= NF; i++) { if ($i ~ /^passed/) p += $(i-1); if ($i ~ /^failed/) f += $(i-1); if ($i ~ /^ignored/) g += $(i-1) } }
     END { printf "all tests: %d passed, %d failed, %d skipped\n", p, f, g }' "$log"
rm -f "$log"
exit "$status"
