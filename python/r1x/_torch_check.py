"""The check `import r1x` runs before it loads its compiled extension.

``r1x._C`` is compiled against one torch's C++ ABI; loaded next to another torch it fails with
an undefined symbol (or worse). CMake writes what the extension was built against to
``r1x/_build_info.py``; this module compares that with the running torch and turns a mismatch
into one sentence that says what to do.
"""

from __future__ import annotations

import importlib
import re

import torch

REBUILD = (
    "rebuild r1x against it: `pip install --no-build-isolation --no-deps --force-reinstall r1x` "
    "(or `pip install --no-build-isolation -e .` in a checkout)"
)


def release(version: str) -> tuple[int, int]:
    """``"2.13.0+cpu"`` -> ``(2, 13)``: the part of a torch version its C++ ABI follows."""
    m = re.match(r"(\d+)\.(\d+)", version)
    if not m:
        raise ValueError(f"not a torch version: {version!r}")
    return int(m.group(1)), int(m.group(2))


def mismatch(built_torch: str, built_cuda: str, cuda_kernels: bool, running_torch: str,
             running_cuda: str | None) -> str | None:
    """Why an extension built against ``built_torch`` cannot load in ``running_torch``, or None."""
    if release(built_torch) != release(running_torch):
        return (f"r1x was built against torch {built_torch} and this is torch {running_torch}; "
                f"{REBUILD}")
    if cuda_kernels and not running_cuda:
        return (f"r1x was built with CUDA kernels against torch {built_torch} (CUDA {built_cuda}) "
                f"and this torch {running_torch} has no CUDA; install a CUDA torch or {REBUILD}")
    return None


def check_torch() -> None:
    """Raises ImportError when the running torch cannot load ``r1x._C``."""
    try:
        b = importlib.import_module("r1x._build_info")
    except ImportError:  # a source tree that was never built: importing _C will say so
        return
    why = mismatch(b.TORCH_VERSION, b.TORCH_CUDA_VERSION, b.CUDA_KERNELS, torch.__version__,
                   torch.version.cuda)
    if why:
        raise ImportError(why)


def explain_load_error(e: ImportError) -> ImportError:
    """An ImportError of ``r1x._C`` as one sentence with the way out."""
    text = str(e)
    if "undefined symbol" in text:
        return ImportError(f"r1x._C does not match the installed torch {torch.__version__} "
                           f"({text.splitlines()[0][:200]}); {REBUILD}")
    if "No module named" in text or "cannot import name" in text:
        return ImportError("r1x._C is not built: install r1x with `pip install --no-build-isolation .` "
                           "(or `make setup` in a checkout)")
    return e
