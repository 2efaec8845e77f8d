"""The wheel's dependencies, pinned to the torch r1x is compiled against.

A scikit-build-core metadata provider (pyproject.toml: [tool.scikit-build.metadata.dependencies]).
``r1x._C`` uses torch's C++ API, whose ABI changes with every torch release, so a wheel built
against torch 2.13 must say ``torch==2.13.*`` (as vLLM and sgl-kernel publish theirs); the
loose ``torch>=2.6`` is left only where no torch is installed at build time: an sdist built in
an isolated environment, whose wheel is then built (with --no-build-isolation) against the
torch of the machine that installs it.
"""

from __future__ import annotations

import re
from importlib import metadata

MIN_TORCH = "2.6"


def torch_requirement() -> str:
    try:
        version = metadata.version("torch")
    except metadata.PackageNotFoundError:
        return f"torch>={MIN_TORCH}"
    m = re.match(r"(\d+)\.(\d+)", version)
    if not m:
        return f"torch>={MIN_TORCH}"
    return f"torch=={m.group(1)}.{m.group(2)}.*"


def dynamic_metadata(field: str, settings: dict | None = None) -> list[str]:
    if field != "dependencies":
        raise ValueError(f"r1x_metadata provides `dependencies`, not {field!r}")
    others = list((settings or {}).get("requires", []))
    return [torch_requirement(), *others]
