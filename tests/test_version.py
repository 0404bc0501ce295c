"""One version, in pyproject.toml: the metadata, ``fastadam.__version__`` and
CHANGELOG.md agree with it."""

from __future__ import annotations

import importlib.metadata
import re
from pathlib import Path

import pytest

import fastadam

ROOT = Path(__file__).resolve().parents[1]


def _pyproject_version() -> str:
    """``[project] version`` (a regex: tomllib is Python 3.11+)."""
    path = ROOT / "pyproject.toml"
    if not path.is_file():
        pytest.skip("not a source checkout: no pyproject.toml")
    text = path.read_text()
    project = text.split("[project]", 1)[1].split("\n[", 1)[0]
    match = re.search(r'^version\s*=\s*"([^"]+)"', project, re.M)
    assert match, "pyproject.toml has no static [project] version"
    return match.group(1)


def test_version_is_the_installed_metadata():
    assert fastadam.__version__ == importlib.metadata.version("fastadam")


def test_installed_version_is_the_checkout_s():
    """A mismatch means the installed package is stale: pip install . again."""
    assert fastadam.__version__ == _pyproject_version()


def test_changelog_has_the_version():
    changelog = ROOT / "CHANGELOG.md"
    if not changelog.is_file():
        pytest.skip("not a source checkout: no CHANGELOG.md")
    version = _pyproject_version()
    assert re.search(rf"^## \[?{re.escape(version)}\]?\b", changelog.read_text(), re.M), (
        f"CHANGELOG.md has no '## {version}' section"
    )
