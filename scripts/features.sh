#!/bin/sh
# The one feature set that tests, clippy and docs build with (one build of burn for all of them).
echo ballast-tests/mpi,ballast-tests/wgpu,ballast/mpi,ballast-examples/mpi,ballast-collectives/nccl,ballast/wgpu,ballast-examples/wgpu,ballast/cli,ballast/testkit,ballast/cuda,ballast-examples/cuda,ballast-examples/testkit
