"""Runtime information and CPU dispatch controls."""

from __future__ import annotations

import contextlib
import os
import platform

import torch

from r1x import _C


def cpu_isa() -> str:
    """The instruction-set level the CPU kernels use now: generic, avx2, avx512 or amx."""
    return _C.cpu_isa()


@contextlib.contextmanager
def use_cpu_isa(level: str):
    """Cap the CPU kernels' ISA level inside a ``with`` block (generic, avx2, avx512, amx).

    The level actually used is the lower of the cap and what the CPU supports; the
    ``R1X_CPU_ISA`` environment variable sets the initial cap.
    """
    previous = _C.set_cpu_isa(level)
    try:
        yield
    finally:
        _C.set_cpu_isa(previous)


def info() -> dict:
    """What r1x was built with and what this machine offers."""
    d = {
        "r1x": __import__("r1x").__version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cpu": platform.processor() or platform.machine(),
        "cpu_isa_detected": _C.detected_cpu_isa(),
        "cpu_isa_active": _C.cpu_isa(),
        "cpu_threads": torch.get_num_threads(),
        "cuda_available": torch.cuda.is_available(),
        "cuda_kernels_built": torch._C._dispatch_has_kernel_for_dispatch_key(
            "r1x::fp8_gemm", "CUDA"
        ),
        "R1X_CPU_ISA": os.environ.get("R1X_CPU_ISA", ""),
    }
    try:
        from r1x import _build_info as b

        d["built_with"] = {
            "torch": b.TORCH_VERSION,
            "cuda": b.TORCH_CUDA_VERSION or None,
            "cuda_kernels": b.CUDA_KERNELS,
            "cuda_archs": b.CUDA_ARCHS or None,
            "cutlass": b.CUTLASS_VERSION or None,
            "cpu_paths": list(b.CPU_PATHS),
            "processor": b.PROCESSOR,
            "compiler": b.COMPILER,
            "sanitize": b.SANITIZE or None,
        }
    except ImportError:
        d["built_with"] = None  # built before the build record existed
    if torch.cuda.is_available():
        d["cuda_device"] = torch.cuda.get_device_name()
        d["cuda_capability"] = "%d.%d" % torch.cuda.get_device_capability()
    return d
