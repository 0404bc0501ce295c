"""Shared fixtures: the backends under test (array generators are in helpers.py)."""

from __future__ import annotations

import os
import platform

import pytest
from helpers import FAST_BACKENDS

import fastadam


def _require_fast_backends() -> bool:
    # On the platforms we build for, a missing fast backend is a build bug, not
    # a reason to skip: fail loudly unless explicitly allowed.
    return platform.machine() in ("x86_64", "AMD64") and not os.environ.get(
        "FASTADAM_ALLOW_MISSING_BACKENDS"
    )


def _backend_params(names):
    out = []
    available = fastadam.available_backends()
    for name in names:
        marks = []
        if name not in available and not _require_fast_backends():
            marks.append(pytest.mark.skip(reason=fastadam.unavailable_reasons().get(name, "")))
        out.append(pytest.param(name, marks=marks, id=name))
    return out


@pytest.fixture(params=_backend_params(FAST_BACKENDS))
def fast_backend(request) -> str:
    """Each fast backend; fails (not skips) if it cannot load on x86-64."""
    return request.param


@pytest.fixture(params=_backend_params(("numpy",) + FAST_BACKENDS))
def backend(request) -> str:
    """Every backend, the reference included."""
    return request.param


try:  # hypothesis is a test extra; without it the property tests skip themselves
    from hypothesis import settings

    # CI runs the property tests derandomized (the same examples on every run), so a
    # red CI always means the code changed; locally they keep exploring new examples.
    settings.register_profile("ci", derandomize=True)
    if os.environ.get("CI"):
        settings.load_profile("ci")
except ImportError:  # pragma: no cover
    pass
