#!/usr/bin/env bash
# A real one-node Slurm on this machine, for the launcher tests: Debian's slurm-wlm (slurmctld,
# slurmd) authenticated by its own munged, every file under one scratch folder.
#
#   scripts/slurm-local.sh start   installs slurm-wlm and munge when missing (as root), writes the
#                                  configuration, starts munged, slurmctld and slurmd, waits for
#                                  the node to be idle and prints `export SLURM_CONF=...`
#   scripts/slurm-local.sh stop    stops the three daemons this script started and removes the
#                                  scratch folder: nothing is left running or configured
#
# Both are idempotent. The node has this machine's host name and cores; its partition oversubscribes
# cores (FORCE:8), so a test runs 3 tasks on 2 cores with `srun --overcommit`. Daemons run as root
# with process tracking by /proc (proctrack/linuxproc) and no task plugin: the sandbox this runs in
# has no cgroup hierarchy of its own to hand to slurmd. Open MPI meets srun through PMIx
# (`srun --mpi=pmix`): Debian's Open MPI is built with an external PMIx and no PMI2.
set -euo pipefail
dir="${BALLAST_SLURM_DIR:-/tmp/ballast-slurm}"
conf="$dir/slurm.conf"

install_packages() {
  command -v slurmctld >/dev/null 2>&1 && command -v munged >/dev/null 2>&1 && return 0
  if [ "$(id -u)" -ne 0 ]; then
    echo "slurm-local: slurm-wlm and munge are missing; install them as root: apt-get install -y slurm-wlm munge" >&2
    exit 2
  fi
  echo "slurm-local: installing slurm-wlm munge" >&2
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurm-wlm munge >/dev/null
}

running() {
  [ -e "$dir/$1.pid" ] && kill -0 "$(cat "$dir/$1.pid")" 2>/dev/null
}

start() {
  if [ "$(id -u)" -ne 0 ]; then
    echo "slurm-local: the daemons run as root here; run this as root" >&2
    exit 2
  fi
  install_packages
  if running slurmctld && running slurmd && running munged; then
    echo "export SLURM_CONF=$conf"
    return 0
  fi
  stop >/dev/null
  mkdir -p "$dir"/{spool,state,log}
  # munged wants its socket's folders open to every user (for clients) and its key private.
  chmod 755 "$dir"
  install -d -o munge -m 700 "$dir/munge"
  install -d -o munge -m 755 "$dir/munge-socket"
  dd if=/dev/urandom of="$dir/munge/munge.key" bs=1024 count=1 status=none
  chown munge: "$dir/munge/munge.key"
  chmod 400 "$dir/munge/munge.key"
  local node cpus
  node="$(hostname -s)"
  cpus="$(nproc)"
  cat > "$conf" <<EOF
ClusterName=ballast-local
SlurmctldHost=$node(127.0.0.1)
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$dir/munge-socket/munge.socket
SlurmUser=root
SlurmdUser=root
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd.pid
SlurmctldLogFile=$dir/log/slurmctld.log
SlurmdLogFile=$dir/log/slurmd.log
SlurmctldPort=16817
SlurmdPort=16818
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MpiDefault=none
ReturnToService=2
SchedulerType=sched/builtin
NodeName=$node NodeAddr=127.0.0.1 CPUs=$cpus State=UNKNOWN
PartitionName=local Nodes=$node Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE:8
EOF
  chmod 644 "$conf"
  # munged refuses a key or folder that others can read; it runs as the munge user.
  su -s /bin/sh munge -c "munged --key-file=$dir/munge/munge.key --socket=$dir/munge-socket/munge.socket \
    --pid-file=$dir/munge/munged.pid --log-file=$dir/munge/munged.log --seed-file=$dir/munge/munged.seed"
  cp "$dir/munge/munged.pid" "$dir/munged.pid"
  SLURM_CONF="$conf" slurmctld
  SLURM_CONF="$conf" slurmd
  local waited=0
  until SLURM_CONF="$conf" sinfo -h -o '%T' 2>/dev/null | grep -qx idle; do
    waited=$((waited + 1))
    if [ "$waited" -gt 60 ]; then
      echo "slurm-local: the node did not become idle within 30 s; logs in $dir/log" >&2
      SLURM_CONF="$conf" sinfo >&2 || true
      tail -n 20 "$dir/log/slurmctld.log" "$dir/log/slurmd.log" >&2 || true
      stop >/dev/null
      exit 1
    fi
    sleep 0.5
  done
  echo "export SLURM_CONF=$conf"
}

stop() {
  if [ -e "$conf" ]; then
    SLURM_CONF="$conf" scontrol shutdown >/dev/null 2>&1 || true
  fi
  local daemon pid tries
  for daemon in slurmd slurmctld munged; do
    [ -e "$dir/$daemon.pid" ] || continue
    pid="$(cat "$dir/$daemon.pid")"
    tries=0
    while kill -0 "$pid" 2>/dev/null && [ "$tries" -lt 50 ]; do
      kill "$pid" 2>/dev/null || true
      sleep 0.1
      tries=$((tries + 1))
    done
    kill -9 "$pid" 2>/dev/null || true
  done
  rm -rf "$dir"
  echo "slurm-local: stopped"
}

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  *)
    echo "usage: scripts/slurm-local.sh start|stop" >&2
    exit 2
    ;;
esac
