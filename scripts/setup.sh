#!/usr/bin/env bash
# Installs what ballast's MPI build and tests need on Debian/Ubuntu. Safe to run twice.
set -euo pipefail
need=()
command -v mpirun >/dev/null 2>&1 || need+=(openmpi-bin)
[ -e /usr/include/x86_64-linux-gnu/mpi/mpi.h ] || [ -e /usr/lib/x86_64-linux-gnu/openmpi/include/mpi.h ] || need+=(libopenmpi-dev)
command -v clang >/dev/null 2>&1 || need+=(clang libclang-dev)
command -v pkg-config >/dev/null 2>&1 || need+=(pkg-config)
if [ ${#need[@]} -gt 0 ]; then
  sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  echo "setup: installing ${need[*]} libopenmpi-dev openmpi-bin libclang-dev clang pkg-config"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq libopenmpi-dev openmpi-bin libclang-dev clang pkg-config >/dev/null
fi
# The URI of the Debian archive this machine's apt already uses for bookworm (deb822 `.sources`
# files first, then one-line `.list` files), so backports come from the same mirror.
debian_mirror() {
  local f
  for f in /etc/apt/sources.list.d/*.sources; do
    [ -e "$f" ] || continue
    awk 'BEGIN { RS = ""; FS = "\n" }
         { uris = ""; suites = ""
           for (i = 1; i <= NF; i++) {
             if ($i ~ /^URIs:/) { uris = $i; sub(/^URIs:[ \t]*/, "", uris) }
             if ($i ~ /^Suites:/) { suites = $i }
           }
           if (suites ~ /[ \t]bookworm([ \t]|$)/ && uris != "") { split(uris, u, /[ \t]+/); print u[1]; exit } }' "$f"
  done | head -n 1 | grep . && return 0
  cat /etc/apt/sources.list /etc/apt/sources.list.d/*.list 2>/dev/null \
    | awk '$1 == "deb" { for (i = 2; i <= NF; i++) if ($i !~ /^\[/) { if ($(i + 1) == "bookworm") print $i; break } }' \
    | head -n 1 || true
}

# The device tests run burn's wgpu backend on Mesa's software Vulkan device (lavapipe). On Debian
# 12 it comes from bookworm-backports: Mesa 25 runs burn's kernels, bookworm's own 22.3 is untried.
if ! dpkg-query -W -f='${Version}' mesa-vulkan-drivers 2>/dev/null | grep -q '^2[5-9]'; then
  sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  echo "setup: installing mesa-vulkan-drivers (software Vulkan device for the wgpu tests)"
  if grep -q '^12' /etc/debian_version 2>/dev/null; then
    mirror="$(debian_mirror)"
    if [ -z "$mirror" ]; then
      echo "setup: no Debian bookworm mirror found in apt's sources; add bookworm-backports to them and run this again" >&2
      exit 1
    fi
    echo "deb $mirror bookworm-backports main" | $sudo tee /etc/apt/sources.list.d/ballast-backports.list >/dev/null
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq -t bookworm-backports mesa-vulkan-drivers >/dev/null
  else
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq mesa-vulkan-drivers >/dev/null
  fi
fi
# The launcher tests start a one-node Slurm (scripts/slurm-local.sh), whose daemons run as root,
# and two hosts in network namespaces (scripts/two-hosts.sh, with iproute2's `ip`).
if [ "$(id -u)" -eq 0 ]; then
  launchers=()
  { command -v slurmctld >/dev/null 2>&1 && command -v munged >/dev/null 2>&1; } || launchers+=(slurm-wlm munge)
  command -v ip >/dev/null 2>&1 || launchers+=(iproute2)
  if [ ${#launchers[@]} -gt 0 ]; then
    echo "setup: installing ${launchers[*]} (for the launcher tests)"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${launchers[@]}" >/dev/null
  fi
fi
# Python's safetensors reads a ballast checkpoint in the test suite.
if command -v python3 >/dev/null 2>&1 && ! python3 -c "import safetensors, numpy" >/dev/null 2>&1; then
  echo "setup: installing Python packages safetensors numpy"
  python3 -m pip install -q safetensors numpy 2>/dev/null || python3 -m pip install -q --user safetensors numpy \
    || echo "setup: could not install safetensors for python3; its test will say it was skipped" >&2
fi
if ! command -v cargo >/dev/null 2>&1; then
  echo "setup: cargo not found; install Rust from https://rustup.rs first" >&2
  exit 1
fi
