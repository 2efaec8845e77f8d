#!/usr/bin/env bash
# aarch64 (Grace Hopper, Graviton): cross-compile every CPU source of r1x._C with Debian's
# g++-aarch64-linux-gnu and link it against the aarch64 torch wheel's libraries (unpacked, not
# installed). Proves the x86-only sources and flags stay out of a non-x86 build. Running the op
# tests would need an arm64 Python and torch under qemu-user (binfmt); see the README.
set -euo pipefail
cd "$(dirname "$0")/.."
TORCH_VERSION=$(python3 -c "import torch; print(torch.__version__.split('+')[0])")
PYVER=$(python3 -c "import sys; print('%d%d' % sys.version_info[:2])")
work=build/aarch64-check
mkdir -p "$work"

if ! command -v aarch64-linux-gnu-g++ >/dev/null; then
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq g++-aarch64-linux-gnu) >"$work/apt.log" 2>&1 ||
    { tail -20 "$work/apt.log"; echo "aarch64 check: could not install g++-aarch64-linux-gnu" >&2; exit 1; }
fi
if [ ! -f "$work/torch/version.py" ]; then
  python3 -m pip download -q --no-deps --only-binary=:all: --platform manylinux_2_28_aarch64 \
    --python-version "$PYVER" --implementation cp "torch==$TORCH_VERSION" -d "$work/wheel"
  unzip -q -o "$work"/wheel/torch-*.whl 'torch/include/*' 'torch/version.py' 'torch/lib/libc10.so' \
    'torch/lib/libtorch.so' 'torch/lib/libtorch_cpu.so' 'torch/lib/libgomp.so.1' -d "$work"
  rm -rf "$work/wheel"
fi

cmake -S . -B "$work/build" -G Ninja -DCMAKE_BUILD_TYPE=Release \
  -DCMAKE_CXX_COMPILER=aarch64-linux-gnu-g++ -DR1X_CUDA=OFF \
  -DR1X_TORCH_DIR="$PWD/$work/torch" -DPython_EXECUTABLE="$(command -v python3)" \
  -DCMAKE_SHARED_LINKER_FLAGS="-Wl,-rpath-link,$PWD/$work/torch/lib" >"$work/configure.log" 2>&1 ||
  { tail -30 "$work/configure.log"; exit 1; }
grep -E "r1x: (CPU paths|torch)" "$work/configure.log"
cmake --build "$work/build" -j "$(nproc)" >"$work/build.log" 2>&1 || { grep -E "error|Error" "$work/build.log" | head -30; exit 1; }
so=$(ls "$work"/build/_C*.so)
file "$so" | grep -q "ARM aarch64" || { file "$so"; echo "aarch64 check: $so is not an aarch64 object" >&2; exit 1; }
# none of the x86 ISA translation units was compiled
if find "$work/build" -name "*_avx2.cpp.o" -o -name "*_avx512.cpp.o" -o -name "*_amx.cpp.o" | grep -q .; then
  echo "aarch64 check: x86 ISA sources were compiled for aarch64" >&2; exit 1
fi
python3 - "$work/build/_build_info.py" <<'PY'
import runpy, sys
b = runpy.run_path(sys.argv[1])
assert b["PROCESSOR"] == "aarch64" and b["CPU_PATHS"] == ("generic",), (b["PROCESSOR"], b["CPU_PATHS"])
print("aarch64 check: _C built for", b["PROCESSOR"], "with CPU paths", b["CPU_PATHS"], "against torch", b["TORCH_VERSION"])
PY
