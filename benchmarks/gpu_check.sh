#!/usr/bin/env bash
# GPU check, run on a lent Hopper machine (H100/H200) from the repository root:
#   builds r1x with its sm_90a kernels, runs the test suite (CUDA tests included) and the
#   benchmarks, and writes everything under $OUT (default: ./gpu-check-out).
#
# The machine needs torch with CUDA, nvcc >= 12.3, cmake, ninja and scikit-build-core. The
# CUTLASS headers come from the nvidia-cutlass wheel: if it is not installed, put its wheel
# in .whl/ (see README, "GPU check") and this script installs it to /tmp/site.
# Budget: about 3-4 minutes of build on 16 cores, 1 minute of tests, 3-4 minutes of benchmarks
# (under the 10 minutes one device command may run; first runs report up to 25 failures).
set -uo pipefail
OUT=${OUT:-$PWD/gpu-check-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
exec > >(tee "$OUT/gpu_check.log") 2>&1
date -u +"%Y-%m-%d %H:%M UTC"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true

if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
python3 -c "import importlib.util as u; assert u.find_spec('cutlass_library'), 'nvidia-cutlass missing'" || exit 1

t0=$(date +%s)
CMAKE_BUILD_PARALLEL_LEVEL=$(nproc) R1X_CUDA=ON python3 -m pip install -v --no-build-isolation \
  --no-deps -e . >"$OUT/build.log" 2>&1
rc=$?
echo "build: rc=$rc, $(( $(date +%s) - t0 )) s"
if grep -q C7510 "$OUT/build.log"; then echo "WARNING: ptxas C7510 (wgmma serialised) in the build"; fi
[ $rc -eq 0 ] || { tail -50 "$OUT/build.log"; exit 1; }
python3 -c "import json, r1x; print(json.dumps(r1x.info()))"

t1=$(date +%s)
timeout 300 python3 -m pytest tests -q --maxfail=25 -p no:cacheprovider --junitxml="$OUT/tests.xml" 2>&1 | tail -30
echo "tests: $(( $(date +%s) - t1 )) s"

t2=$(date +%s)
timeout 300 python3 benchmarks/bench_fp8_gemm.py --device cuda --out "$OUT" --budget 0.3
# MoE: the op-family benchmark (when present) and the grouped GEMMs' H200 throughput check
# (fp8_grouped_gemm, 4 x 8192 rows, N = 4096, K = 7168; target >= 1100 TFLOP/s).
if [ -f benchmarks/bench_moe.py ]; then
  timeout 150 python3 benchmarks/bench_moe.py --device cuda --out "$OUT"
fi
timeout 120 python3 benchmarks/bench_grouped_gemm_cuda.py --out "$OUT/grouped_gemm_cuda.json"
# MLA: training attention against every SDPA backend, memory against length, decode against the
# absorbed einsum, the non-absorbed path and FlashMLA (when installed), and the H200 targets.
timeout 180 python3 benchmarks/bench_mla.py --device cuda --out "$OUT" --budget 0.3
# The model: training step vs reference ops, cached vs uncached decode, MTP speculation.
timeout 150 python3 benchmarks/bench_model.py --device cuda --out "$OUT" --budget 0.3
echo "benchmarks: $(( $(date +%s) - t2 )) s"
ls -la "$OUT"
