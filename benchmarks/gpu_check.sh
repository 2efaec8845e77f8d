#!/usr/bin/env bash
# GPU check: one run on a lent Hopper machine (H100/H200), from the repository root, that always
# ends with a report, whatever fails on the way. Steps, each under its own limit inside one
# global deadline (R1X_CHECK_BUDGET_S, default 530 s: under a 10-minute device command):
#   1. preflight   GPU, nvcc, torch (a CUDA build?), Python headers, CUTLASS headers (installed,
#                  or the nvidia-cutlass wheel carried in .whl/, installed to /tmp/site)
#   2. build       R1X_CUDA=ON with ninja -k 0 (every failing translation unit is reported, not
#                  only the first) and -Xptxas -v: spills and wgmma serialisation per kernel
#   3. smoke       benchmarks/gpu_smoke.py, one process per op family, CUDA_LAUNCH_BLOCKING=1:
#                  PASS / FAIL / CRASH and the worst error of every case (about a minute)
#   4. tests       pytest, one process per test file (the CUDA op families first),
#                  R1X_TEST_TIMEOUT per test, SIGINT at the file's limit (pytest still writes
#                  its junit XML), counts per file from the XML
#   5. memcheck    compute-sanitizer --tool memcheck over gpu_smoke.py --small, one per family
#   6. benchmarks  FP8 GEMM, grouped GEMMs, MoE, EP overhead (bench_dist --overhead), MLA,
#                  model: each only while the deadline leaves room for it
#   7. pack        at most 8 files in $OUT: summary.md, logs.tar.gz (build log, every step's
#                  log, junit XML), results.tar.gz (benchmark JSON/MD/PNG) and the benchmark
#                  tables (*.md)
#
#   OUT=/some/dir bash benchmarks/gpu_check.sh      # on the GPU machine (default OUT: ./gpu-check-out)
#   bash benchmarks/gpu_check.sh --dry-run          # on a CPU machine (CI): no CUDA steps; the
#                                                   # smoke run, two test files and one small
#                                                   # benchmark on the CPU, packed the same way
set -uo pipefail
DRY=0
case "${1:-}" in
  --dry-run) DRY=1 ;;
  "") ;;
  *) echo "usage: bash benchmarks/gpu_check.sh [--dry-run]" >&2; exit 2 ;;
esac
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu-check-out}
mkdir -p "$OUT"
WORK=$(mktemp -d)
LOGS=$WORK/logs RES=$WORK/results
mkdir -p "$LOGS" "$RES"
SUMMARY=$WORK/summary.md
START=$(date +%s)
DEADLINE=$((START + ${R1X_CHECK_BUDGET_S:-530}))
PACK_RESERVE=15  # seconds kept for packing
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}

say() { echo "$*" | tee -a "$SUMMARY"; }
left() { echo $((DEADLINE - $(date +%s) - PACK_RESERVE)); }

# run_step NAME LIMIT_S LOG CMD...: runs CMD with its output in LOG, stopped with SIGINT (then
# SIGKILL 10 s later) at min(LIMIT_S, what the deadline leaves); sets STEP_STATUS to ok, FAIL
# (exit code), TIMEOUT, CRASH (killed by a signal) or SKIPPED (no time left) and returns the exit code.
run_step() {
  local name=$1 limit=$2 log=$3 rc t0
  shift 3
  local budget
  budget=$(left)
  ((budget < limit)) && limit=$budget
  if ((limit < 5)); then
    STEP_STATUS=SKIPPED
    echo "skipped: deadline" >"$log"
    say "- $name: SKIPPED (deadline)"
    return 125
  fi
  t0=$(date +%s)
  timeout -s INT -k 10 "$limit" "$@" >"$log" 2>&1
  rc=$?
  case $rc in
    0) STEP_STATUS=ok ;;
    124 | 137) STEP_STATUS="TIMEOUT (${limit} s)" ;;
    13[0-9] | 14[0-9] | 15[0-9]) STEP_STATUS="CRASH (signal $((rc - 128)))" ;;
    *) STEP_STATUS="FAIL (exit $rc)" ;;
  esac
  STEP_SECONDS=$(($(date +%s) - t0))
  return $rc
}

pack() {
  local n=0 f
  say ""
  say "total: $(($(date +%s) - START)) s of ${R1X_CHECK_BUDGET_S:-530} s"
  cp "$SUMMARY" "$OUT/summary.md"
  tar -czf "$OUT/logs.tar.gz" -C "$WORK" logs
  tar -czf "$OUT/results.tar.gz" -C "$WORK" results
  # the benchmark tables next to the tarballs (8 files at most come back from the machine)
  for f in "$RES"/*.md; do
    [ -e "$f" ] || continue
    ((n >= 5)) && break
    cp "$f" "$OUT/" && n=$((n + 1))
  done
  echo "== $OUT:"
  ls -la "$OUT"
  rm -rf "$WORK"
}
trap pack EXIT

say "# r1x GPU check$([ $DRY = 1 ] && echo ' (dry run)')"
say ""
say "$(date -u +'%Y-%m-%d %H:%M UTC'), commit $(git rev-parse --short HEAD 2>/dev/null || echo '?')$(git diff --quiet 2>/dev/null || echo '+changes')"

# ---- 1. preflight -------------------------------------------------------------------------
say ""
say "## preflight"
CAN_BUILD=1
if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    >"$LOGS/wheels.log" 2>&1 && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
  say "- carried wheels: $(cd .whl && ls *.whl | tr '\n' ' ')"
fi
GPU=$(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null | head -1)
say "- GPU: ${GPU:-none}"
NVCC=$(nvcc --version 2>/dev/null | grep -o 'release [0-9.]*' | head -1)
say "- nvcc: ${NVCC:-missing}"
[ -n "$NVCC" ] || CAN_BUILD=0
"$PY" - >"$LOGS/preflight.log" 2>&1 <<'EOF'
import importlib.util, os, sysconfig
import torch
print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())
inc = sysconfig.get_paths()["include"]
print("python_headers", os.path.exists(os.path.join(inc, "Python.h")), inc)
spec = importlib.util.find_spec("cutlass_library")
root = os.path.join(spec.submodule_search_locations[0], "source") if spec else os.environ.get("R1X_CUTLASS_DIR", "")
ver = os.path.join(root, "include", "cutlass", "version.h")
if root and os.path.exists(ver):
    v = {l.split()[1]: l.split()[2] for l in open(ver) if l.startswith("#define CUTLASS_") and len(l.split()) == 3}
    print("cutlass", f"{v.get('CUTLASS_MAJOR')}.{v.get('CUTLASS_MINOR')}.{v.get('CUTLASS_PATCH')}", root)
else:
    print("cutlass missing")
EOF
while read -r line; do say "- $line"; done <"$LOGS/preflight.log"
grep -q "^torch .* cuda [0-9]" "$LOGS/preflight.log" || CAN_BUILD=0
grep -q "^python_headers True" "$LOGS/preflight.log" || CAN_BUILD=0
grep -q "^cutlass [0-9]" "$LOGS/preflight.log" || CAN_BUILD=0
DEV=cuda
if [ $DRY = 1 ]; then
  DEV=cpu
  say "- dry run: no build, the CPU build already installed is used, every step runs on the CPU"
elif [ $CAN_BUILD = 0 ]; then
  say "- **cannot build the CUDA kernels here** (see above): build, tests and benchmarks skipped"
fi

# ---- 2. build -----------------------------------------------------------------------------
say ""
say "## build"
BUILT=0
if [ $DRY = 1 ]; then
  say "- skipped (dry run)"
  "$PY" -c "import r1x" >/dev/null 2>&1 && BUILT=1
elif [ $CAN_BUILD = 1 ]; then
  run_step build 330 "$LOGS/build.log" env CMAKE_BUILD_PARALLEL_LEVEL="$(nproc)" R1X_CUDA=ON \
    R1X_PTXAS_VERBOSE=ON "$PY" -m pip install -v --no-build-isolation --no-deps -e . -Cbuild.tool-args=-k0 \
    -Cbuild-dir=build/gpu-check-{wheel_tag}
  say "- build: $STEP_STATUS, ${STEP_SECONDS:-0} s"
  if [ "$STEP_STATUS" = ok ]; then
    BUILT=1
  else
    say '```'
    grep -E "error|FAILED" "$LOGS/build.log" | grep -v "^ptxas info" | head -40 | tee -a "$SUMMARY"
    say '```'
  fi
  # ptxas evidence: kernels that spill, and wgmma serialisation warnings (C7510/C7515/C7520...)
  spills=$(grep -cE "[1-9][0-9]* bytes spill (stores|loads)" "$LOGS/build.log")
  say "- ptxas: $spills kernel(s) with spills"
  grep -B3 -E "[1-9][0-9]* bytes spill (stores|loads)" "$LOGS/build.log" | grep -oE "_Z[A-Za-z0-9_]+" |
    sort -u | head -20 | (command -v c++filt >/dev/null && c++filt || cat) | cut -c1-160 | sed 's/^/  - /' | tee -a "$SUMMARY"
  serial=$(grep -E "C75[0-9][0-9]|wgmma.*serializ" "$LOGS/build.log" | sort -u)
  if [ -n "$serial" ]; then
    say "- ptxas: **wgmma serialisation**:"
    echo "$serial" | head -20 | cut -c1-200 | sed 's/^/  - /' | tee -a "$SUMMARY"
  else
    say "- ptxas: no wgmma serialisation warning"
  fi
fi
if [ $BUILT = 1 ]; then
  "$PY" -c "import json, r1x; print(json.dumps(r1x.info()))" >"$LOGS/info.log" 2>&1
  say "- r1x.info(): $(tail -1 "$LOGS/info.log" | cut -c1-400)"
fi

# ---- 3. smoke -----------------------------------------------------------------------------
say ""
say "## smoke (one small case per op, against r1x.reference in float64)"
if [ $BUILT = 1 ]; then
  # "errors" first: error paths (torch's and r1x's, host and device); if raising an error
  # crashes the process, every test file that checks bad input will crash too
  for fam in errors fp8 moe mla; do
    run_step "smoke $fam" 40 "$LOGS/smoke_$fam.log" env CUDA_LAUNCH_BLOCKING=1 \
      "$PY" benchmarks/gpu_smoke.py --family "$fam" --device "$DEV"
    npass=$(grep -c "^PASS" "$LOGS/smoke_$fam.log")
    say "- $fam: $STEP_STATUS, $npass passed"
    grep -E "^(FAIL|ERROR|# C\+\+ runtimes)" "$LOGS/smoke_$fam.log" | head -20 | cut -c1-240 | sed 's/^/  - /' | tee -a "$SUMMARY"
    case $STEP_STATUS in CRASH* | TIMEOUT*) tail -5 "$LOGS/smoke_$fam.log" | cut -c1-200 | sed 's/^/    /' | tee -a "$SUMMARY" ;; esac
    if [ "$fam" = errors ] && [[ $STEP_STATUS == CRASH* ]]; then
      # a native backtrace, and which libraries the C++ runtime symbols were bound to
      if command -v cuda-gdb >/dev/null; then
        run_step "errors under cuda-gdb" 60 "$LOGS/errors_gdb.log" cuda-gdb -batch -ex run -ex bt \
          -ex "info sharedlibrary" --args "$PY" benchmarks/gpu_smoke.py --family errors --device "$DEV"
        say "  - native backtrace ($STEP_STATUS):"
        grep -E "^#[0-9]+ " "$LOGS/errors_gdb.log" | head -16 | cut -c1-200 | sed 's/^/    /' | tee -a "$SUMMARY"
      fi
      mkdir -p "$LOGS/ld"
      run_step "errors with LD_DEBUG" 40 "$LOGS/errors_ld.log" env LD_DEBUG=bindings \
        LD_DEBUG_OUTPUT="$LOGS/ld/b" "$PY" benchmarks/gpu_smoke.py --family errors --device "$DEV"
      say "  - bindings of std::ostream::_M_insert (the stream's number output):"
      cat "$LOGS"/ld/b.* 2>/dev/null | grep -E "_ZNSo9_M_insertI" | grep -E "_C\.|libc10\.so" |
        sed -E 's/^ *[0-9]+: *//' | sort -u | head -8 | cut -c1-240 | sed 's/^/    /' | tee -a "$SUMMARY"
      cat "$LOGS"/ld/b.* 2>/dev/null | grep -E "_ZNSo9_M_insertI" | gzip >"$LOGS/ld_insert.txt.gz"
      rm -rf "$LOGS/ld"
    fi
  done
else
  say "- skipped (no build)"
fi

# ---- 4. tests -----------------------------------------------------------------------------
say ""
say "## tests (one pytest process per file; R1X_TEST_TIMEOUT per test)"
junit_counts() {  # junit XML -> "tests failures errors skipped" (or "no report")
  "$PY" - "$1" <<'EOF' 2>/dev/null || echo "no report"
import sys, xml.etree.ElementTree as ET
r = ET.parse(sys.argv[1]).getroot()
s = r if r.tag == "testsuite" else r.find("testsuite")
print(f"{s.get('tests')} tests, {s.get('failures')} failed, {s.get('errors')} errors, {s.get('skipped')} skipped")
for case in s.iter("testcase"):
    for bad in list(case.findall("failure")) + list(case.findall("error")):
        msg = (bad.get("message") or "").splitlines()[0][:150] if bad.get("message") else ""
        print(f"  - {case.get('name')}: {msg}")
EOF
}
if [ $BUILT = 1 ]; then
  if [ $DRY = 1 ]; then
    files="tests/test_rewards.py tests/test_fp8.py"
    extra=(-k "not test_fp8 or dequant_nan_pattern")
  else
    # the CUDA op families first, then the layers, the model, the trainers; files without
    # CUDA cases last
    first="test_fp8 test_moe test_mla test_fp8_linear test_moe_layer test_mla_layer test_model test_generation"
    files=""
    for f in $first; do files="$files tests/$f.py"; done
    for f in tests/test_*.py; do case " $files " in *" $f "*) ;; *) files="$files $f" ;; esac; done
    # the CUDA cases and the device-independent ones (CI runs the CPU cases on every push)
    extra=(-k "cuda or not cpu")
  fi
  for f in $files; do
    name=$(basename "$f" .py)
    if (($(left) < ${R1X_TESTS_RESERVE_S:-150})); then
      say "- $name and the files after it: SKIPPED (deadline; the rest is kept for memcheck and benchmarks)"
      break
    fi
    run_step "$name" 150 "$LOGS/$name.log" env R1X_TEST_TIMEOUT="${R1X_TEST_TIMEOUT:-90}" \
      "$PY" -m pytest "$f" -q -p no:cacheprovider -o junit_family=xunit1 \
      --junitxml="$LOGS/junit_$name.xml" "${extra[@]}"
    [ "$STEP_STATUS" = SKIPPED ] && continue
    counts=$(junit_counts "$LOGS/junit_$name.xml")
    say "- $name: $STEP_STATUS, ${STEP_SECONDS} s, $(echo "$counts" | head -1)"
    echo "$counts" | tail -n +2 | head -15 | sed 's/^/  /' | tee -a "$SUMMARY"
  done
else
  say "- skipped (no build)"
fi

# ---- 5. memcheck --------------------------------------------------------------------------
say ""
say "## compute-sanitizer memcheck (gpu_smoke.py --small)"
if [ $DRY = 1 ]; then
  say "- skipped (dry run)"
elif [ $BUILT = 1 ] && command -v compute-sanitizer >/dev/null; then
  for fam in fp8 moe mla; do
    run_step "memcheck $fam" 60 "$LOGS/memcheck_$fam.log" compute-sanitizer --tool memcheck \
      --error-exitcode 97 --print-limit 20 "$PY" benchmarks/gpu_smoke.py --family "$fam" --small
    errs=$(grep -oE "ERROR SUMMARY: [0-9]+ error" "$LOGS/memcheck_$fam.log" | tail -1)
    say "- $fam: $STEP_STATUS, ${errs:-no summary}"
    grep -E "^========= (Invalid|Program hit|  at )" "$LOGS/memcheck_$fam.log" | head -8 | cut -c1-200 | sed 's/^/  /' | tee -a "$SUMMARY"
  done
else
  say "- skipped ($([ $BUILT = 1 ] && echo 'no compute-sanitizer' || echo 'no build'))"
fi

# ---- 6. benchmarks ------------------------------------------------------------------------
say ""
say "## benchmarks (each only if the deadline leaves room)"
bench() {  # bench NAME LIMIT_S CMD...
  local name=$1 limit=$2
  shift 2
  if (($(left) < limit / 2)); then
    say "- $name: SKIPPED (deadline)"
    return
  fi
  run_step "$name" "$limit" "$LOGS/bench_$name.log" "$@"
  say "- $name: $STEP_STATUS, ${STEP_SECONDS:-0} s"
  grep -E "NOT met" "$LOGS/bench_$name.log" | head -8 | cut -c1-200 | sed 's/^/  /' | tee -a "$SUMMARY"
}
if [ $BUILT = 1 ] && [ $DRY = 1 ]; then
  bench fp8_gemm 60 "$PY" benchmarks/bench_fp8_gemm.py --device cpu --shapes 1x256x256,16x256x512 --budget 0.05 --out "$RES"
  bench dist 40 "$PY" benchmarks/bench_dist.py --overhead --device cpu --preset tiny --tokens 64 --steps 2 --out "$RES"
elif [ $BUILT = 1 ]; then
  bench fp8_gemm 100 "$PY" benchmarks/bench_fp8_gemm.py --device cuda --out "$RES" --budget 0.3
  bench grouped_gemm 60 "$PY" benchmarks/bench_grouped_gemm_cuda.py --out "$RES/grouped_gemm_cuda.json"
  bench moe 90 "$PY" benchmarks/bench_moe.py --device cuda --out "$RES" --budget 0.3
  bench dist 45 "$PY" benchmarks/bench_dist.py --overhead --device cuda --steps 10 --out "$RES"
  bench mla 100 "$PY" benchmarks/bench_mla.py --device cuda --out "$RES" --budget 0.3
  bench model 90 "$PY" benchmarks/bench_model.py --device cuda --out "$RES" --budget 0.3
else
  say "- skipped (no build)"
fi
exit 0
