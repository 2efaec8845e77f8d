#!/usr/bin/env bash
# ASan + UBSan: builds r1x._C (CPU) with -fsanitize=address,undefined (R1X_SANITIZE), swaps it in
# for the installed extension, and runs the op tests (fp8, moe, mla) under it; the tests'
# cpu_isa fixture runs every CPU path this machine has. Any report fails the run (UBSan aborts,
# ASan stops at the first error). The installed extension is put back afterwards.
set -euo pipefail
cd "$(dirname "$0")/.."
work=build/sanitize
cmake -S . -B "$work" -G Ninja -DCMAKE_BUILD_TYPE=Release -DR1X_CUDA=OFF \
  -DR1X_SANITIZE=address,undefined -DPython_EXECUTABLE="$(command -v python3)" >"$work.configure.log" 2>&1 ||
  { tail -30 "$work.configure.log"; exit 1; }
cmake --build "$work" -j "$(nproc)" >"$work.build.log" 2>&1 || { grep -E "error" "$work.build.log" | head -30; exit 1; }

target=$(python3 -c "import os, r1x._C as c; print(os.path.dirname(c.__file__))")
backup=$(mktemp -d)
cp "$target"/_C*.so "$target"/_build_info.py "$backup"/
restore() { cp "$backup"/* "$target"/; rm -rf "$backup"; }
trap restore EXIT
cp "$work"/_C*.so "$work"/_build_info.py "$target"/

# Python itself is not instrumented: the ASan runtime is preloaded, with libstdc++ right after
# it (ASan binds its __cxa_throw interceptor when it starts: without libstdc++ loaded by then,
# the first C++ exception aborts); leaks are not checked (the interpreter keeps its allocations
# until exit), and mismatched new/delete checks stay on.
export LD_PRELOAD="$(${CXX:-g++} -print-file-name=libasan.so):$(${CXX:-g++} -print-file-name=libstdc++.so)"
export ASAN_OPTIONS=detect_leaks=0:abort_on_error=1:symbolize=1:detect_stack_use_after_return=0
export UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1
python3 -c "import r1x; b = r1x.info()['built_with']; assert b['sanitize'] == 'address,undefined', b; print('sanitized build:', b['sanitize'], 'CPU paths:', r1x.info()['cpu_isa_detected'])"
python3 -m pytest tests/test_fp8.py tests/test_moe.py tests/test_mla.py -q -p no:cacheprovider -k "not cuda" -x
