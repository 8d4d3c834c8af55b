#!/usr/bin/env bash
# Runs every GPU check of kvstore-device on a machine that has the NVIDIA driver but no Rust
# toolchain, from the binaries build-gpu-binaries.sh made, and writes what they print into
# OUT_DIR (at most four files: the machine, the tests, the bandwidth figures, a summary).
#
# Usage: kvstore-device/scripts/run-gpu-checks.sh [BIN_DIR] [OUT_DIR]
#        (defaults: gpu-bin, then $OUT if set, else gpu-results)
#
# The stores load the driver, NVRTC and NCCL at run time under the names cudarc knows
# (libnvrtc.so, libnvrtc.so.12, libnccl.so, ...). A CUDA 13 machine ships libnvrtc.so.13 and
# libnccl.so.2 (the toolkit, or the Python packages nvidia-cuda-nvrtc and nvidia-nccl-cu13),
# so this script finds them and links them under the plain names in a folder of its own,
# put first on LD_LIBRARY_PATH. Every binary runs under a time limit (KVSTORE_GPU_STEP_SECS,
# 90 s by default), and the whole run under KVSTORE_GPU_TOTAL_SECS (480 s by default): a step
# gets what is left of it, and steps with less than 5 s left are reported as skipped.
#
# A dry run without a GPU, on the emulated driver of the crate's tests:
#   KVSTORE_EMULATED_DRIVER_DIR=/tmp/emu cargo test -p kvstore-device --test gpu_emulated
#   LD_LIBRARY_PATH=/tmp/emu KVSTORE_EMULATED_GPUS=1 KVSTORE_GPU_BANDWIDTH_UNIT=65536 \
#     kvstore-device/scripts/run-gpu-checks.sh gpu-bin /tmp/dry-run
set -uo pipefail

bin="$(cd "${1:-gpu-bin}" && pwd)" || { echo "no binaries folder ${1:-gpu-bin}" >&2; exit 2; }
out="${2:-${OUT:-gpu-results}}"
mkdir -p "$out"
out="$(cd "$out" && pwd)"
step_secs="${KVSTORE_GPU_STEP_SECS:-90}"
total_secs="${KVSTORE_GPU_TOTAL_SECS:-480}"
export NCCL_DEBUG="${NCCL_DEBUG:-WARN}"

# Folders that may hold the CUDA libraries: the Python packages (system, user, the `nvidia`
# namespace package wherever it is), then the toolkit and the system. The kernels are loaded
# as machine code for the GPU, which a driver takes from a newer NVRTC too; PTX, the fallback,
# needs an NVRTC no newer than the driver (machine.txt records both versions).
candidates=()
if command -v python3 >/dev/null 2>&1; then
  while IFS= read -r dir; do
    [ -n "$dir" ] && candidates+=("$dir")
  done < <(python3 - 2>/dev/null <<'PY'
import site
for d in site.getsitepackages() + [site.getusersitepackages()]:
    print(d + "/nvidia")
try:
    import nvidia
    print("\n".join(nvidia.__path__))
except Exception:
    pass
PY
)
fi
candidates+=("${CUDA_HOME:-/usr/local/cuda}/lib64" /usr/local/cuda/lib64 /usr/lib/x86_64-linux-gnu)

# The first file named like $1 (a glob) under the candidate folders.
find_lib() {
  local dir found
  for dir in "${candidates[@]}"; do
    [ -d "$dir" ] || continue
    found="$(find -L "$dir" -maxdepth 4 -name "$1" -type f 2>/dev/null | sort | head -n 1)"
    if [ -n "$found" ]; then
      echo "$found"
      return 0
    fi
  done
  return 1
}

links="$(mktemp -d)"
paths="$links"
for lib in nvrtc nccl; do
  if found="$(find_lib "lib${lib}.so*")"; then
    ln -sf "$found" "$links/lib${lib}.so"
    # NVRTC loads its builtins library from its own folder.
    paths="$paths:$(dirname "$found")"
    echo "lib${lib}: $found"
  else
    echo "lib${lib}: not found (the checks that need it report themselves ignored)"
  fi
done > "$out/machine.txt"
export LD_LIBRARY_PATH="$paths${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
{
  echo "LD_LIBRARY_PATH=$LD_LIBRARY_PATH"
  ls "$(dirname "$(readlink -f "$links/libnvrtc.so" 2>/dev/null || echo /none)")" 2>/dev/null \
    | grep -E '^libnvrtc-builtins\.so\.[0-9.]+$' | sed 's/^/NVRTC version (builtins): /'
  ldd --version 2>&1 | head -n 1 | sed 's/^/C library: /'
  nvidia-smi 2>&1 | grep -oE 'CUDA Version: [0-9.]+' | sed 's/^/driver supports /'
  nvidia-smi -L 2>&1 || echo "nvidia-smi: not available"
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,clocks.max.mem \
    --format=csv 2>&1 || true
} >> "$out/machine.txt"

# Runs one binary under the time limit ($step_secs, or $3 when given), its output appended
# to $2.
run() {
  local name="$1" log="$2" limit="${3:-$step_secs}"
  shift "$(($# < 3 ? $# : 3))"
  echo "===== $name" >> "$log"
  if [ ! -x "$bin/$name" ]; then
    echo "missing: $bin/$name" >> "$log"
    return
  fi
  local left=$((total_secs - SECONDS))
  if [ "$left" -lt 5 ]; then
    echo "===== $name: skipped, the run's $total_secs s are spent" >> "$log"
    return
  fi
  [ "$left" -lt "$limit" ] && limit="$left"
  local started=$SECONDS
  timeout --kill-after=5 "$limit" "$bin/$name" "$@" >> "$log" 2>&1
  local status=$?
  echo "===== $name: exit status $status after $((SECONDS - started)) s" >> "$log"
}

tests="$out/tests.log"
: > "$tests"
: > "$out/bandwidth.log"
# Most telling first: the kernels compile, the GPU results, the figures (with more time: they
# include two dist jobs), the GPU conformance suites; then the checks CI also runs.
run test-kernel_source "$tests"
run test-gpu "$tests"
run gpu_bandwidth "$out/bandwidth.log" "${KVSTORE_GPU_BENCH_SECS:-150}"
for name in test-conformance_gpu_arrays test-conformance_nccl test-compression test-golden \
            test-conformance test-cpu test-kvstore_device; do
  run "$name" "$tests"
done

# The `test result` line of binary $1 in the tests' log.
result_of() {
  awk -v header="===== $1" 'index($0, header) == 1 { inside = 1; next }
    /^===== / { inside = 0 } inside && /^test result/ { print; exit }' "$tests"
}
{
  grep -E '^===== .*(exit status|skipped)|^test result|FAILED|panicked' "$tests" "$out/bandwidth.log"
  # With a GPU, its checks must have run: all of them ignored means the driver, NVRTC or the
  # binaries' libraries were not found.
  if nvidia-smi -L 2>/dev/null | grep -q '^GPU '; then
    gpu_result="$(result_of test-gpu)"
    case "$gpu_result" in
      *" 0 passed"*|"") echo "FAILED: a GPU is present but test-gpu ran no check: ${gpu_result:-no result}" ;;
    esac
  fi
} > "$out/summary.txt" 2>&1
cat "$out/summary.txt"
# Fails when a check failed.
! grep -qE 'exit status [1-9]|FAILED|skipped' "$out/summary.txt"
