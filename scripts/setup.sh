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
# The device tests run burn's wgpu backend on Mesa's software Vulkan device (lavapipe). On Debian
# 12 it comes from bookworm-backports: Mesa 25 runs burn's kernels, bookworm's own 22.3 is untried.
if ! dpkg-query -W -f='${Version}' mesa-vulkan-drivers 2>/dev/null | grep -q '^2[5-9]'; then
  sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  echo "setup: installing mesa-vulkan-drivers (software Vulkan device for the wgpu tests)"
  if grep -q '^12' /etc/debian_version 2>/dev/null; then
    echo "deb http://deb.debian.org/debian bookworm-backports main" | $sudo tee /etc/apt/sources.list.d/ballast-backports.list >/dev/null
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq -t bookworm-backports mesa-vulkan-drivers >/dev/null
  else
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq mesa-vulkan-drivers >/dev/null
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
