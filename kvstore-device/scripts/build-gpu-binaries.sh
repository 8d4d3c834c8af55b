#!/usr/bin/env bash
# Builds the GPU test and benchmark binaries of kvstore-device on a machine without CUDA
# (nothing links against CUDA: the driver, NVRTC and NCCL are loaded at run time) and copies
# them into gpu-bin/ at the workspace root (git-ignored), for a machine that has the NVIDIA
# driver (and NVRTC, and NCCL for the nccl tests) but no Rust toolchain.
#
# Usage: kvstore-device/scripts/build-gpu-binaries.sh [OUT_DIR]
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
out="${1:-$root/gpu-bin}"
cd "$root"
mkdir -p "$out"

# Test binaries (release: the GPU tests move hundreds of MiB); the executables are named
# in cargo's JSON messages.
cargo test --release -p kvstore-device --no-run --message-format=json \
  | python3 -c '
import json, sys
for line in sys.stdin:
    try:
        m = json.loads(line)
    except ValueError:
        continue
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m.get("profile", {}).get("test"):
        print(m["target"]["name"], m["executable"])
' | while read -r name exe; do
  # The emulated driver's checks need no GPU (CI runs them): not worth the carry.
  [ "$name" = gpu_emulated ] && continue
  cp "$exe" "$out/test-$name"
  echo "copied test-$name"
done

cargo build --release -p kvstore-device --examples
cp "$root/target/release/examples/gpu_bandwidth" "$out/gpu_bandwidth"
echo "copied gpu_bandwidth"

# Without debug information (function names stay, for backtraces) the binaries weigh about
# 40 MB together instead of about 290 MB: small enough to travel with the working tree.
if command -v strip >/dev/null 2>&1; then
  strip --strip-debug "$out"/test-* "$out/gpu_bandwidth"
fi
du -sh "$out"
# The newest C library the binaries need: the GPU machine's (`ldd --version`) must be as new.
if command -v objdump >/dev/null 2>&1; then
  echo "needs glibc $(objdump -T "$out"/test-* "$out/gpu_bandwidth" 2>/dev/null \
    | grep -o 'GLIBC_[0-9.]*' | sort -Vu | tail -n 1 | sed 's/GLIBC_//') or newer"
fi

cat <<EOT

Binaries are in $out. On the GPU machine, from the workspace root, run them all with

  kvstore-device/scripts/run-gpu-checks.sh $out OUT_DIR

which finds libnvrtc and libnccl and writes the logs into OUT_DIR; or one by one (driver
installed; libnvrtc.so and libnccl.so on the loader path), from that folder:

  ./test-gpu                  # GPU results vs the local store and the CPU compression codec;
                              # ignored tests print the reason
  ./test-kernel_source        # NVRTC compiles every kernel (needs libnvrtc only); the
                              # compression kernels emulated on the CPU (needs a C++ compiler)
  ./test-conformance          # the conformance suite on device (CPU values)
  ./test-conformance_gpu_arrays  # the conformance suite on device with GPU arrays
  ./test-conformance_nccl     # the conformance suite on nccl (needs a GPU and NCCL)
  ./test-cpu                  # probe and CPU-path checks
  ./test-compression          # gradient compression of CPU values
  ./test-golden               # compression of CPU values vs MXNet 1.9.1's device store
  ./test-kvstore_device       # unit tests
  ./gpu_bandwidth             # reduction, sgd/adam and compression bandwidth vs a
                              # device-to-device copy
EOT
