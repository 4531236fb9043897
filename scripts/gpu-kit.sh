#!/usr/bin/env bash
# The GPU kit: every check ballast runs on a GPU, built here and run on a machine without Rust or
# network.
#
#   scripts/gpu-kit.sh build   (here) builds the `gpu-check` binary with the tests' features
#                              (`cuda` among them; scripts/features.sh), strips
#                              and compresses it into gpu-kit/ (ignored by git, ≤ 60 MiB); the last
#                              line printed is the kit's path and size.
#   scripts/gpu-kit.sh run     (there) unpacks the binary, puts the folders of the CUDA libraries
#                              (system paths, NVIDIA's wheels in Python's site-packages) on
#                              LD_LIBRARY_PATH and CUDA_PATH on the CUDA headers, and runs each
#                              check in its own process, one JSON line each, then a summary line.
#                              The binary itself loads libnccl.so.2 and libnvrtc.so.13 by those
#                              names (ballast::libs): the kit makes no links.
#
# `run` exits 0 when no check failed (a check without a GPU reports "no GPU" and does not fail),
# 1 when one or more failed, 2 when the kit is missing. Each check has its own time limit
# (GPU_KIT_CHECK_SECS, default 120) within the whole run's (GPU_KIT_TOTAL_SECS, default 450: a
# check that would start past it is reported as a failure without running), so a run stays under
# 8 minutes.
set -euo pipefail
cd "$(dirname "$0")/.."
kit="${GPU_KIT_DIR:-gpu-kit}"
checks=(doctor canary nccl probes equivalence hetero sharded resnet managed oom precision)

build() {
  ./scripts/setup-cuda-build.sh >/dev/null
  # The test build's own feature set and profile (scripts/features.sh): after
  # scripts/test-all.sh every unit is already built, so this only links, and a fresh machine does
  # not build burn, cubecl and the CUDA crates a second time (twice the disk and time).
  cargo build --release --workspace --bin gpu-check --features "$(./scripts/features.sh)"
  mkdir -p "$kit"
  rm -f "$kit/gpu-check.xz"
  strip -o "$kit/gpu-check" "${CARGO_TARGET_DIR:-target}/release/gpu-check"
  # The newest glibc symbol version the binary needs: the GPU machine's glibc must be as new.
  local glibc
  glibc="$(objdump -T "$kit/gpu-check" | grep -o 'GLIBC_[0-9.]*' | sort -V | tail -n 1)"
  echo "$glibc" > "$kit/glibc"
  xz -T0 -9 -f "$kit/gpu-check"
  git rev-parse --short HEAD > "$kit/commit" 2>/dev/null || echo unknown > "$kit/commit"
  echo "$kit $(du -sh "$kit" | cut -f1) ($(du -b "$kit/gpu-check.xz" | cut -f1) bytes compressed), needs glibc ${glibc#GLIBC_} or newer"
}

# Directories that hold the CUDA libraries, NVIDIA's pip wheels included.
library_dirs() {
  local py
  for py in python3 python; do
    command -v "$py" >/dev/null 2>&1 || continue
    "$py" - <<'EOF' 2>/dev/null || true
import glob, os, site, sys
roots = set(site.getsitepackages() if hasattr(site, "getsitepackages") else [])
roots.add(site.getusersitepackages() if hasattr(site, "getusersitepackages") else "")
roots.update(p for p in sys.path if p.endswith("site-packages"))
for root in sorted(r for r in roots if r):
    for lib in sorted(glob.glob(os.path.join(root, "nvidia", "*", "lib"))):
        print(lib)
EOF
    break
  done
  local d
  for d in /usr/local/cuda/lib64 /usr/local/cuda/targets/x86_64-linux/lib /usr/lib/x86_64-linux-gnu; do
    [ -d "$d" ] && echo "$d"
  done
  return 0
}

# A folder whose include/ holds the CUDA headers NVRTC compiles cubecl's kernels against: a
# toolkit, or NVIDIA's runtime wheel (cubecl reads CUDA_PATH, else /usr/local/cuda).
cuda_headers() {
  local dir
  for dir in "${CUDA_PATH:-}" /usr/local/cuda /opt/cuda; do
    [ -n "$dir" ] && [ -e "$dir/include/cuda_fp16.h" ] && { echo "$dir"; return 0; }
  done
  while read -r dir; do
    # A wheel's lib folder sits beside its include folder.
    [ -e "$dir/../include/cuda_fp16.h" ] && { (cd "$dir/.." && pwd); return 0; }
  done
  return 0
}

run() {
  if [ ! -e "$kit/gpu-check.xz" ]; then
    echo "{\"kit\": \"$kit\", \"status\": \"missing\", \"fix\": \"run scripts/gpu-kit.sh build first\"}"
    exit 2
  fi
  local work bin limit dirs out code line failed=0 passed=0 no_gpu=0
  work="$(mktemp -d)"
  # Expanded now: \$work is local to this function and gone when the EXIT trap runs.
  trap "rm -rf '$work'" EXIT
  if command -v xz >/dev/null 2>&1; then
    xz -dc "$kit/gpu-check.xz" > "$work/gpu-check"
  else
    python3 -c 'import lzma, sys; sys.stdout.buffer.write(lzma.open(sys.argv[1]).read())' "$kit/gpu-check.xz" > "$work/gpu-check"
  fi
  chmod +x "$work/gpu-check"
  bin="$work/gpu-check"
  dirs="$(library_dirs)"
  export LD_LIBRARY_PATH="$(paste -sd: <<< "$dirs")${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
  export XDG_RUNTIME_DIR="${XDG_RUNTIME_DIR:-$work}"
  local headers
  headers="$(cuda_headers <<< "$dirs")"
  [ -n "$headers" ] && export CUDA_PATH="$headers"
  limit="${GPU_KIT_CHECK_SECS:-120}"
  local total="${GPU_KIT_TOTAL_SECS:-450}" started left this_limit
  started=$(date +%s)
  echo "{\"kit\": \"$kit\", \"commit\": \"$(cat "$kit/commit" 2>/dev/null || echo unknown)\", \"needs\": \"$(cat "$kit/glibc" 2>/dev/null || echo unknown)\", \"glibc\": \"$(getconf GNU_LIBC_VERSION 2>/dev/null || echo unknown)\", \"cuda_path\": \"${CUDA_PATH:-}\", \"library_dirs\": $(printf '%s\n' "$dirs" | python3 -c 'import json, sys; print(json.dumps([l.strip() for l in sys.stdin if l.strip()]))' 2>/dev/null || echo '[]')}"
  for check in "${checks[@]}"; do
    code=0
    left=$(( total - ($(date +%s) - started) ))
    if [ "$left" -lt 15 ]; then
      echo "{\"check\": \"$check\", \"status\": \"fail\", \"error\": \"not run: the kit's ${total}s were spent\"}"
      failed=$((failed + 1))
      continue
    fi
    this_limit=$(( left < limit ? left : limit ))
    out="$(timeout --kill-after=10 "$this_limit" "$bin" "$check" 2> "$work/$check.err")" || code=$?
    line="$(grep '^{' <<< "$out" | tail -n 1 || true)"
    if [ -z "$line" ]; then
      # The process died or hung before printing its line: say how, with its last words.
      local why="exit code $code"
      [ "$code" -eq 124 ] && why="no result within ${this_limit}s"
      line="{\"check\": \"$check\", \"status\": \"fail\", \"error\": \"$why\", \"stderr\": $(tail -n 5 "$work/$check.err" | python3 -c 'import json, sys; print(json.dumps(sys.stdin.read()))' 2>/dev/null || echo '""')}"
    fi
    echo "$line"
    case "$line" in
      *'"status":"pass"'* | *'"status": "pass"'*) passed=$((passed + 1)) ;;
      *'"status":"no GPU"'* | *'"status": "no GPU"'*) no_gpu=$((no_gpu + 1)) ;;
      *) failed=$((failed + 1)) ;;
    esac
  done
  echo "{\"kit\": \"summary\", \"checks\": ${#checks[@]}, \"passed\": $passed, \"failed\": $failed, \"no_gpu\": $no_gpu}"
  [ "$failed" -eq 0 ]
}

case "${1:-}" in
  build) build ;;
  run) run ;;
  *)
    echo "usage: scripts/gpu-kit.sh build|run" >&2
    exit 2
    ;;
esac
