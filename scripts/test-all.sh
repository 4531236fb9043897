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
# Tests that cannot run here print a line starting with "skipped:" and return; cargo shows a
# passing test's output only when asked (--show-output), so every skip line reaches the log.
cargo_args=() test_args=()
seen_separator=0
for arg in "$@"; do
  if [ "$seen_separator" -eq 0 ] && [ "$arg" = "--" ]; then seen_separator=1; continue; fi
  if [ "$seen_separator" -eq 0 ]; then cargo_args+=("$arg"); else test_args+=("$arg"); fi
done
# Every test binary runs even when one fails, so one run shows every failure.
status=0
cargo test --release --workspace --no-fail-fast \
  --features "$(./scripts/features.sh)" ${cargo_args[@]+"${cargo_args[@]}"} \
  -- --show-output ${test_args[@]+"${test_args[@]}"} \
  2>&1 | tee "$log" || status=$?
# One closing line with the totals of every test binary. A test that printed "skipped:" counts as
# skipped, not passed; so does one cargo reports as ignored.
skips="$(grep -c '^skipped:' "$log" || true)"
awk -v skips="$skips" '/^test result:/ { for (i = 1; i <= NF; i++) { if ($i ~ /^passed/) p += $(i-1); if ($i ~ /^failed/) f += $(i-1); if ($i ~ /^ignored/) g += $(i-1) } }
     END { printf "all tests: %d passed, %d failed, %d skipped\n", p - skips, f, g + skips }' "$log"
if [ "$skips" -gt 0 ]; then
  echo "skipped tests:"
  grep '^skipped:' "$log" | sort | uniq -c
  # CI runs every test: a skip there is a missing dependency, not a pass.
  if [ -n "${CI:-}" ] && [ "$skips" -gt "${BALLAST_EXPECTED_SKIPS:-0}" ]; then
    echo "test-all: $skips test(s) skipped under CI, ${BALLAST_EXPECTED_SKIPS:-0} expected (BALLAST_EXPECTED_SKIPS); install what they name" >&2
    status=1
  fi
fi
rm -f "$log"
exit "$status"
