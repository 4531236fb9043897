#!/usr/bin/env bash
# The lost-host trials of tests/launchers.rs, as many as asked (default 10; CI runs 2): two hosts
# in network namespaces, every process of host-b killed while the ResNet job trains, one line per
# trial with how fast the survivors stopped and which checkpoint was the newest. Needs root.
set -euo pipefail
cd "$(dirname "$0")/.."
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
export XDG_RUNTIME_DIR="${XDG_RUNTIME_DIR:-$(mktemp -d)}"
export BALLAST_LOST_HOST_TRIALS="${1:-10}"
cargo test --release --workspace --features "$(./scripts/features.sh)" --test launchers -- \
  --show-output launchers_lost_host 2>&1 | grep -E '^(lost host trial|test result|test launchers)'
