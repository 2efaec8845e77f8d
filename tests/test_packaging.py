"""Packaging: the build record, the torch check at import, the wheel's torch pin, the CUTLASS
lookup's errors and CMake's one-sentence errors."""

import os
import shutil
import subprocess
import sys
import textwrap
import types
from pathlib import Path

import pytest
import torch

import r1x
from r1x import _torch_check
from r1x.testing import load_module

ROOT = Path(__file__).resolve().parents[1]


def test_build_record_matches_the_running_torch():
    b = r1x.info()["built_with"]
    assert b is not None, "r1x/_build_info.py missing: rebuild r1x"
    assert _torch_check.release(b["torch"]) == _torch_check.release(torch.__version__)
    assert "generic" in b["cpu_paths"]
    assert r1x.info()["cpu_isa_detected"] in b["cpu_paths"]
    assert b["cuda_kernels"] == r1x.info()["cuda_kernels_built"]


@pytest.mark.parametrize(
    "built, running, expected",
    [("2.13.0+cpu", "2.13.0+cpu", None), ("2.13.0+cpu", "2.13.1", None),
     ("2.13.0+cpu", "2.12.0+cpu", "2.12.0"), ("2.13.0", "2.14.1+cu130", "2.14.1")],
)
def test_torch_mismatch_is_one_sentence_naming_both(built, running, expected):
    why = _torch_check.mismatch(built, "", False, running, None)
    if expected is None:
        assert why is None
    else:
        assert built in why and running in why and "--no-build-isolation" in why
        assert "\n" not in why


def test_cuda_build_on_a_cpu_torch_is_refused():
    why = _torch_check.mismatch("2.13.0+cu130", "13.0", True, "2.13.0+cpu", None)
    assert why and "no CUDA" in why and "13.0" in why
    assert _torch_check.mismatch("2.13.0+cu130", "13.0", True, "2.13.0+cu130", "13.0") is None
    # a CPU-only build runs under a CUDA torch of the same release
    assert _torch_check.mismatch("2.13.0+cpu", "", False, "2.13.0+cu130", "13.0") is None


def test_check_torch_raises_before_loading_the_extension(monkeypatch):
    fake = types.ModuleType("r1x._build_info")
    fake.TORCH_VERSION, fake.TORCH_CUDA_VERSION, fake.CUDA_KERNELS = "1.9.0", "", False
    monkeypatch.setitem(sys.modules, "r1x._build_info", fake)
    with pytest.raises(ImportError, match=r"built against torch 1\.9\.0 and this is torch"):
        _torch_check.check_torch()


def test_undefined_symbol_becomes_the_rebuild_sentence():
    e = _torch_check.explain_load_error(ImportError("/x/_C.so: undefined symbol: _ZN3c104cuda9SetDeviceEa"))
    assert "does not match the installed torch" in str(e) and "--no-build-isolation" in str(e)
    e = _torch_check.explain_load_error(ImportError("cannot import name '_C' from 'r1x'"))
    assert "not built" in str(e)
    other = ImportError("something else")
    assert _torch_check.explain_load_error(other) is other


def test_wheel_metadata_pins_the_build_torch(monkeypatch):
    meta = load_module(ROOT / "build_tools" / "r1x_metadata.py")
    major, minor = _torch_check.release(torch.__version__)
    deps = meta.dynamic_metadata("dependencies", {"requires": ["numpy", "tqdm"]})
    assert deps == [f"torch=={major}.{minor}.*", "numpy", "tqdm"]
    # no torch at build time (an isolated sdist build): the loose minimum
    monkeypatch.setattr(meta.metadata, "version", lambda name: (_ for _ in ()).throw(meta.metadata.PackageNotFoundError(name)))
    assert meta.torch_requirement() == f"torch>={meta.MIN_TORCH}"
    with pytest.raises(ValueError, match="dependencies"):
        meta.dynamic_metadata("version", {})


def test_installed_metadata_pins_torch():
    from importlib import metadata

    reqs = metadata.requires("r1x") or []
    torch_reqs = [r for r in reqs if r.startswith("torch")]
    major, minor = _torch_check.release(torch.__version__)
    assert torch_reqs == [f"torch=={major}.{minor}.*"], reqs


# ---------------------------------------------------------------------------------------------
# CMake: CUTLASS lookup and configure-time errors (one sentence, what to do)
# ---------------------------------------------------------------------------------------------
cmake = shutil.which("cmake")
needs_cmake = pytest.mark.skipif(cmake is None, reason="cmake not installed")


def _cutlass_root(tmp_path: Path, major: int, minor: int) -> Path:
    inc = tmp_path / f"cutlass{major}{minor}" / "include" / "cutlass"
    inc.mkdir(parents=True)
    (inc / "cutlass.h").write_text("// fake\n")
    (inc / "version.h").write_text(
        f"#define CUTLASS_MAJOR {major}\n#define CUTLASS_MINOR {minor}\n#define CUTLASS_PATCH 1\n"
    )
    return inc.parent.parent


def _run_cutlass_lookup(tmp_path: Path, root: str) -> subprocess.CompletedProcess:
    script = tmp_path / "lookup.cmake"
    script.write_text(textwrap.dedent(f"""
        set(Python_EXECUTABLE "{sys.executable}")
        set(R1X_CUTLASS_DIR "{root}")
        include("{ROOT / 'third_party' / 'cutlass.cmake'}")
        r1x_find_cutlass(found)
        message(STATUS "found=${{found}} version=${{R1X_CUTLASS_VERSION}}")
    """))
    return subprocess.run([cmake, "-P", str(script)], capture_output=True, text=True, timeout=60)


@needs_cmake
def test_cutlass_lookup_accepts_a_recent_checkout(tmp_path):
    root = _cutlass_root(tmp_path, 4, 3)
    r = _run_cutlass_lookup(tmp_path, str(root))
    assert r.returncode == 0, r.stderr
    assert f"found={root} version=4.3.1" in r.stdout


@needs_cmake
def test_cutlass_lookup_rejects_an_old_or_wrong_folder(tmp_path):
    r = _run_cutlass_lookup(tmp_path, str(_cutlass_root(tmp_path, 3, 5)))
    assert r.returncode != 0 and "CUTLASS 3.5.1" in r.stderr and "too old" in r.stderr
    r = _run_cutlass_lookup(tmp_path, str(tmp_path))
    assert r.returncode != 0 and "not a CUTLASS source root" in r.stderr


@needs_cmake
@pytest.mark.skipif(shutil.which("ninja") is None and shutil.which("make") is None, reason="no build tool")
def test_configure_without_torch_says_install_torch_first(tmp_path):
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    py = venv / "bin" / "python"
    r = subprocess.run(
        [cmake, "-S", str(ROOT), "-B", str(tmp_path / "b"), f"-DPython_EXECUTABLE={py}", "-DR1X_CUDA=OFF"],
        capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONPATH": ""},
    )
    assert r.returncode != 0
    assert "install torch first" in r.stderr and "--no-build-isolation" in r.stderr
