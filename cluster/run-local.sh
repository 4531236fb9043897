#!/bin/sh
# One machine, three MPI ranks of unequal speed: rank 0 alone on core 0, ranks 1 and 2 sharing
# core 1, each with its own memory budget. Builds ballast and the examples with MPI first.
#
#   cluster/run-local.sh                  # balanced vs naive vs ideal (bench hetero)
#   cluster/run-local.sh resnet --device-memory 30MiB,20MiB,10MiB    # an example job
#   cluster/run-local.sh transformer --data book.txt                 # (resnet | transformer)
#   cluster/run-local.sh doctor           # any other ballast subcommand and arguments
set -eu
cd "$(dirname "$0")/.."
cargo build --release -p ballast -p ballast-examples --features ballast/mpi,ballast-examples/mpi,ballast/cli,ballast/testkit
if [ "$#" -eq 0 ]; then
  set -- bench hetero --json --budgets 24MiB,16MiB,8MiB
fi
case "$1" in
  resnet|transformer) bin="target/release/$1"; shift ;;
  *) bin=target/release/ballast ;;
esac
exec mpirun --allow-run-as-root --oversubscribe -np 3 \
  cluster/pin-by-rank.sh 0 1 1 -- "$bin" "$@"
