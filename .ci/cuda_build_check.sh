#!/usr/bin/env bash
# CI without a GPU: builds r1x with its sm_90a kernels against a CUDA build of torch, links it,
# imports it, checks that every op with a CPU kernel also has a CUDA kernel registered, and runs
# the CPU test suite on that build (the CUDA tests skip: no GPU). The CUDA torch lives in its own
# virtual environment (build/cuda-venv) so the README's CPU set-up stays untouched.
#
# Also: the build log must show no ptxas C7510/C7515/C7520 (wgmma serialised) warning.
# Cost on the 2-core CI machine: ~1-2 min to install torch 2.14.1 and its CUDA libraries
# (~4 GB), ~8-10 min to compile (CUTLASS translation units of ~4 GB each, two at a time), the
# test suite once more.
set -euo pipefail
cd "$(dirname "$0")/.."
export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_ROOT_USER_ACTION=ignore
VENV=build/cuda-venv
CUDA_TORCH=${R1X_CI_CUDA_TORCH:-torch==2.14.1}
t0=$(date +%s)

if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
fi
PY=$VENV/bin/python
"$PY" -m pip install -q --no-compile "$CUDA_TORCH" -r <(grep -v '^torch==' requirements-dev.txt)
"$PY" -c "import torch; assert torch.version.cuda, f'{torch.__version__} is not a CUDA build'; print('torch', torch.__version__, 'CUDA', torch.version.cuda)"
t1=$(date +%s)
echo "CUDA torch installed: $((t1 - t0)) s"

mkdir -p build
# Each CUTLASS translation unit needs ~4 GB of memory: at most two at once on a 24 GB machine.
CMAKE_BUILD_PARALLEL_LEVEL=${R1X_CUDA_JOBS:-2} R1X_CUDA=ON "$PY" -m pip install -v --no-build-isolation \
  --no-deps -e . -Cbuild-dir=build/cuda-{wheel_tag} >build/cuda-build.log 2>&1 || {
  grep -E "error|FAILED" build/cuda-build.log | head -40 >&2
  echo "FAIL: the CUDA build failed (log: build/cuda-build.log)" >&2
  exit 1
}
t2=$(date +%s)
echo "CUDA build (kernels, glue, link): $((t2 - t1)) s"
if grep -qE "C7510|C7515|C7520" build/cuda-build.log; then
  echo "FAIL: ptxas reports wgmma serialisation:" >&2
  grep -B2 -A2 -E "C7510|C7515|C7520" build/cuda-build.log >&2
  exit 1
fi

"$PY" - <<'EOF'
import json
import torch
import r1x

info = r1x.info()
print(json.dumps(info))
assert info["cuda_kernels_built"], "r1x was built without its CUDA kernels"
ops = sorted(n for n in torch._C._dispatch_get_all_op_names() if n.startswith("r1x::"))
has = torch._C._dispatch_has_kernel_for_dispatch_key
cpu = [op for op in ops if has(op, "CPU")]
missing = [op for op in cpu if not has(op, "CUDA")]
assert cpu, "no r1x op has a CPU kernel: the extension did not register"
assert not missing, f"ops with a CPU kernel but no CUDA kernel: {missing}"
print(f"{len(cpu)} ops registered for CPU and CUDA: {', '.join(op[5:] for op in cpu)}")
EOF

"$PY" -m pytest tests -q -p no:cacheprovider
echo "CPU tests on the CUDA build: $(($(date +%s) - t2)) s"
