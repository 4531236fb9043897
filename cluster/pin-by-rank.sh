#!/bin/sh
# Pins each rank to its own set of cores, then runs the command:
#
#   mpirun -np 3 cluster/pin-by-rank.sh 0 1 1 -- target/release/ballast ...
#
# gives rank 0 core 0 alone and makes ranks 1 and 2 share core 1: real, repeatable
# heterogeneity (rank 0 about twice as fast) on one CPU machine. The rank comes from the
# launcher (Open MPI, MPICH/Hydra or Slurm). Needs taskset (util-linux).
set -eu
cpus_list=""
while [ "$#" -gt 0 ] && [ "$1" != "--" ]; do
  cpus_list="$cpus_list $1"
  shift
done
if [ "$#" -eq 0 ]; then
  echo "usage: pin-by-rank.sh CPUS_RANK0 [CPUS_RANK1 ...] -- COMMAND [ARGS...]" >&2
  exit 2
fi
shift
rank="${OMPI_COMM_WORLD_RANK:-${PMI_RANK:-${SLURM_PROCID:-}}}"
if [ -z "$rank" ]; then
  echo "pin-by-rank.sh: no launcher rank variable (OMPI_COMM_WORLD_RANK, PMI_RANK, SLURM_PROCID); run it under mpirun or srun" >&2
  exit 2
fi
i=0
cpus=""
for c in $cpus_list; do
  if [ "$i" -eq "$rank" ]; then cpus="$c"; fi
  i=$((i + 1))
done
if [ -z "$cpus" ]; then
  echo "pin-by-rank.sh: no core list for rank $rank (got $i lists)" >&2
  exit 2
fi
exec taskset -c "$cpus" "$@"
