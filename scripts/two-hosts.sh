#!/usr/bin/env bash
# Two "hosts" on one machine, for the launcher tests: network namespaces ballast-a and ballast-b
# joined by a veth pair (10.77.0.1 and 10.77.0.2), each process started in them also in a UTS
# namespace of its own so that it has its own host name (host-a, host-b). Open MPI starts its
# daemon on host-b through a remote launch agent that enters host-b's namespaces (in place of
# ssh), and its ranks talk over TCP across the veth pair: local ranks, per-host heartbeats and the
# control plane cross a real network boundary. Needs root (namespaces, veth).
#
#   scripts/two-hosts.sh up              creates both namespaces, the link, the host names'
#                                        addresses (/etc/netns/ballast-*/hosts), the agent and a
#                                        hostfile (host-a slots=2, host-b slots=1)
#   scripts/two-hosts.sh mpirun ARGS...  runs mpirun in host-a with that hostfile, agent and TCP
#                                        between the hosts, then ARGS (-np 3 BINARY ...)
#   scripts/two-hosts.sh pids HOST       the processes running in HOST's network namespace (a, b)
#   scripts/two-hosts.sh down            kills what runs in the namespaces and removes everything
#                                        `up` made; safe to run twice
set -euo pipefail
dir="${BALLAST_TWO_HOSTS_DIR:-/tmp/ballast-two-hosts}"
net=10.77.0

up() {
  if [ "$(id -u)" -ne 0 ]; then
    echo "two-hosts: network namespaces need root" >&2
    exit 2
  fi
  down >/dev/null
  mkdir -p "$dir"
  ip netns add ballast-a
  ip netns add ballast-b
  ip link add ballast-va type veth peer name ballast-vb
  ip link set ballast-va netns ballast-a
  ip link set ballast-vb netns ballast-b
  ip -n ballast-a addr add "$net.1/24" dev ballast-va
  ip -n ballast-b addr add "$net.2/24" dev ballast-vb
  local h
  for h in a b; do
    ip -n "ballast-$h" link set lo up
    ip -n "ballast-$h" link set "ballast-v$h" up
    # `ip netns exec` mounts this file over /etc/hosts inside the namespace.
    mkdir -p "/etc/netns/ballast-$h"
    printf '127.0.0.1 localhost\n%s.1 host-a\n%s.2 host-b\n' "$net" "$net" > "/etc/netns/ballast-$h/hosts"
  done
  # The agent is called as `agent HOST command...`, as ssh would be.
  cat > "$dir/agent" <<'EOF'
#!/bin/sh
host="$1"
shift
exec ip netns exec "ballast-${host#host-}" unshare --uts /bin/sh -c "hostname $host && $*"
EOF
  chmod 755 "$dir/agent"
  printf 'host-a slots=2\nhost-b slots=1\n' > "$dir/hostfile"
  echo "two-hosts: up (host-a $net.1, host-b $net.2)"
}

run_mpirun() {
  [ -e "$dir/hostfile" ] || { echo "two-hosts: not up; run scripts/two-hosts.sh up" >&2; exit 2; }
  exec ip netns exec ballast-a unshare --uts /bin/sh -c 'hostname host-a && exec "$0" "$@"' \
    mpirun --hostfile "$dir/hostfile" --mca plm_rsh_agent "$dir/agent" \
    --mca btl tcp,self,vader --mca btl_tcp_if_include "$net.0/24" --mca oob_tcp_if_include "$net.0/24" "$@"
}

pids() {
  ip netns pids "ballast-$1" 2>/dev/null || true
}

down() {
  local h pid
  for h in a b; do
    for pid in $(pids "$h"); do
      kill -9 "$pid" 2>/dev/null || true
    done
    ip netns del "ballast-$h" 2>/dev/null || true
    rm -rf "/etc/netns/ballast-$h"
  done
  # Deleting a namespace deletes the veth end in it, and with it the pair.
  ip link del ballast-va 2>/dev/null || true
  rm -rf "$dir"
  echo "two-hosts: down"
}

case "${1:-}" in
  up) up ;;
  down) down ;;
  mpirun)
    shift
    run_mpirun "$@"
    ;;
  pids) pids "${2:?which host: a or b}" ;;
  *)
    echo "usage: scripts/two-hosts.sh up|down|mpirun ARGS...|pids a|b" >&2
    exit 2
    ;;
esac
