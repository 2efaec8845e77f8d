"""Host-run checks of what the CUDA kernels assume, on any machine with nvcc (no GPU needed):
nvcc-compiled host programs that run on the CPU."""

import importlib.util
import os
import shutil
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def cutlass_include():
    root = os.environ.get("R1X_CUTLASS_DIR")
    if not root:
        spec = importlib.util.find_spec("cutlass_library")
        if spec is None:
            return None
        root = os.path.join(spec.submodule_search_locations[0], "source")
    inc = os.path.join(root, "include")
    return inc if os.path.exists(os.path.join(inc, "cute", "tensor.hpp")) else None


NVCC = shutil.which("nvcc") or (shutil.which("nvcc", path="/usr/local/cuda/bin"))
needs_nvcc = pytest.mark.skipif(NVCC is None or cutlass_include() is None,
                                reason="needs nvcc and the CUTLASS headers (nvidia-cutlass)")


@needs_nvcc
def test_gmma_descriptors_match_the_mla_tiles(tmp_path):
    """The CuTe layouts of the sm_90a MLA kernels' shared-memory tiles put every element where
    the loaders write it, and the wgmma descriptors CuTe builds from them (every operand slice
    the kernels use) have the swizzle, strides and start offsets of those tiles."""
    exe = tmp_path / "gmma_desc_check"
    build = subprocess.run(
        [NVCC, "-std=c++17", "--expt-relaxed-constexpr", "-O1", f"-I{ROOT}/csrc", f"-I{cutlass_include()}",
         "-o", str(exe), os.path.join(ROOT, "csrc", "cuda", "tests", "gmma_desc_check.cu")],
        capture_output=True, text=True, timeout=600)
    assert build.returncode == 0, build.stderr[-4000:]
    run = subprocess.run([str(exe)], capture_output=True, text=True, timeout=120)
    # (CuTe prints one "cast_smem_ptr_to_uint not supported" line per descriptor on the host: the
    # start address is checked as an offset instead)
    report = [line for line in run.stdout.splitlines() if "cast_smem_ptr_to_uint" not in line]
    assert run.returncode == 0, "\n".join(report[-40:])
    assert report and report[-1].startswith("gmma_desc_check: ok"), "\n".join(report[-40:])
