"""The package ships its annotations (``py.typed``) and ``mypy`` finds nothing in it.

mypy reads the source tree beside the tests, with ``[tool.mypy]`` of pyproject.toml
(Numba, llvmlite, cffi, ml_dtypes, tqdm and matplotlib are treated as untyped);
the first run takes ~30 s, later ones reuse mypy's cache in a temporary folder.
"""

from __future__ import annotations

import importlib.resources
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_the_installed_package_is_marked_typed():
    assert importlib.resources.files("fastadam").joinpath("py.typed").is_file()


def test_mypy_is_clean(tmp_path_factory):
    if not (ROOT / "pyproject.toml").is_file() or not (ROOT / "fastadam").is_dir():
        pytest.skip(f"no source tree beside the tests ({ROOT})")
    try:
        import mypy  # noqa: F401
    except ImportError:
        if shutil.which("mypy") is None:
            pytest.skip("mypy is not installed (pip install '.[test]' brings it)")
        cmd = ["mypy"]
    else:
        cmd = [sys.executable, "-m", "mypy"]
    cache = tmp_path_factory.getbasetemp().parent / "fastadam-mypy-cache"
    result = subprocess.run(
        [*cmd, "--cache-dir", str(cache)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout + result.stderr
