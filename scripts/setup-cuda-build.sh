#!/usr/bin/env bash
# Prepares an offline build of ballast's `cuda` feature on Debian 12 (bookworm). Safe to run twice.
#
# burn-cuda 0.22.1 links LLVM through cubecl-llvm, whose build dependency tracel-llvm-bundler
# downloads an LLVM 23 bundle into `$XDG_DATA_HOME/tracel/tracel-llvm-23.1.0-4` (default
# `~/.local/share`) unless that folder already holds the marker `.tracel-llvm-installed`; it then
# links whatever that folder's `bin/llvm-config --link-static` names. This script fills the folder
# with the marker and an `llvm-config` that answers for Debian's LLVM 22 (every target, NVPTX
# included, as static libraries). With internet a plain `cargo build --features cuda` downloads
# the real bundle instead; do not run this script there, or remove the folder to go back.
#
# ballast builds cubecl-cuda with its `cpp` feature, so kernels are compiled at run time by
# NVIDIA's NVRTC (libnvrtc, next to the driver), not by the linked LLVM: see README, "CUDA build".
#
# Prints the environment to use on its last lines (nothing to set when XDG_DATA_HOME is unset).
set -euo pipefail

llvm_major=22
bundle=tracel-llvm-23.1.0-4
data_home="${XDG_DATA_HOME:-$HOME/.local/share}"
standin="$data_home/tracel/$bundle"
llvm_config="/usr/lib/llvm-$llvm_major/bin/llvm-config"

sudo=""
[ "$(id -u)" -eq 0 ] || sudo="sudo"
need=()
[ -x "$llvm_config" ] || need+=("llvm-$llvm_major-dev")
[ -e "/usr/lib/llvm-$llvm_major/lib/libPolly.a" ] || need+=("libpolly-$llvm_major-dev")
[ -e /usr/include/zstd.h ] || need+=(libzstd-dev)
[ -e /usr/include/zlib.h ] || need+=(zlib1g-dev)
command -v c++ >/dev/null 2>&1 || need+=(g++)
# The GPU kit is compressed with xz and stripped with binutils' strip.
command -v xz >/dev/null 2>&1 || need+=(xz-utils)
command -v strip >/dev/null 2>&1 || need+=(binutils)
if [ ${#need[@]} -gt 0 ]; then
  echo "setup-cuda-build: installing ${need[*]}"
  $sudo apt-get update -qq
  if ! DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${need[@]}" >/dev/null; then
    echo "setup-cuda-build: could not install ${need[*]}; LLVM $llvm_major comes from Debian 12's" \
      "bookworm-security archive: add it to apt's sources and run this script again" >&2
    exit 1
  fi
fi

mkdir -p "$standin/bin"
# llvm-config of LLVM 22 with one rewrite: the bundler keeps only the file stem of a library given
# as a path (`/usr/lib/x86_64-linux-gnu/libz3.so` would become `-llibz3`), so name such a library
# by `-l` instead.
cat > "$standin/bin/llvm-config.new" <<EOF
#!/bin/sh
# Written by ballast's scripts/setup-cuda-build.sh: Debian's LLVM $llvm_major in place of $bundle.
out=\$("$llvm_config" "\$@") || exit \$?
printf '%s\n' "\$out" | sed -E 's#(^| )/[^ ]*/lib([A-Za-z0-9_+.-]+)\\.(so|a)(\\.[0-9.]+)?#\\1-l\\2#g'
EOF
chmod +x "$standin/bin/llvm-config.new"
# Files are replaced only when they change: cubecl-llvm's build script reruns (and burn-cuda
# with it, minutes) when they are touched.
replace_if_changed() {
  if cmp -s "$1" "$2"; then rm -f "$1"; else mv "$1" "$2"; fi
}
replace_if_changed "$standin/bin/llvm-config.new" "$standin/bin/llvm-config"
"$standin/bin/llvm-config" --link-static --system-libs >/dev/null
echo "stand-in for $bundle: Debian LLVM $("$llvm_config" --version)" > "$standin/.tracel-llvm-installed.new"
replace_if_changed "$standin/.tracel-llvm-installed.new" "$standin/.tracel-llvm-installed"

echo "setup-cuda-build: LLVM stand-in ready in $standin"
echo "setup-cuda-build: build with: cargo build --release -p ballast -p ballast-examples --features ballast/cuda,ballast-examples/cuda"
if [ -n "${XDG_DATA_HOME:-}" ]; then
  echo "export XDG_DATA_HOME=$XDG_DATA_HOME"
else
  echo "# no environment to set (XDG_DATA_HOME unset: the stand-in is in ~/.local/share)"
fi
