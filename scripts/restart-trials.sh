#!/usr/bin/env bash
# Runs N trials (default 20) of each fault that `ballast launch` restarts from: rank 2 killed at
# a random step, rank 0 killed in the middle of a checkpoint write, rank 1 stopped past the
# deadline and continued, plus the bad-input case (never restarted), on the ResNet job under
# `mpirun -np 3`. Prints one line per trial and, for the killed rank, the time from the death to
# the first step after the restart (min/median/max).
#
#   scripts/restart-trials.sh [N]
set -euo pipefail
cd "$(dirname "$0")/.."
export BALLAST_RESTART_TRIALS="${1:-20}"
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 OMPI_MCA_rmaps_base_oversubscribe=1
export XDG_RUNTIME_DIR="${XDG_RUNTIME_DIR:-$(mktemp -d)}"
echo "restart trials: $BALLAST_RESTART_TRIALS per fault"
# The binaries the test starts come from the same build.
cargo build --release --workspace --features "$(./scripts/features.sh)" --bins
log="$(mktemp)"
status=0
cargo test --release --workspace --features "$(./scripts/features.sh)" --test restart -- \
  --test-threads 1 --nocapture >"$log" 2>&1 || status=$?
grep -E "^(trial|restart after|test |test result)" "$log" || true
[ "$status" -eq 0 ] || echo "restart-trials: the test failed (exit $status); its whole output: $log" >&2
exit "$status"
