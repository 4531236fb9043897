#!/usr/bin/env bash
# The handshake benchmark at 2, 4, 8 and 16 ranks (oversubscribed on small machines): one JSON
# line per size, the last one for 16 ranks. Builds the release binary first.
set -euo pipefail
cd "$(dirname "$0")/.."
# The feature set of the test command, so its build is reused.
cargo build --release -q --workspace \
  --features ballast/mpi,ballast-examples/mpi,ballast-collectives/nccl,ballast/wgpu,ballast-examples/wgpu,ballast/cli,ballast/testkit
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
for n in ${BALLAST_HANDSHAKE_RANKS:-2 4 8 16}; do
  mpirun --oversubscribe -np "$n" target/release/ballast bench handshake --json "$@" | tail -n 1
done
