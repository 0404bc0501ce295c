"""Shared fixtures: the backends under test (array generators are in helpers.py)."""

from __future__ import annotations

import os

import pytest
from helpers import FAST_BACKENDS, fast_backends_required

import fastadam


def _backend_params(names):
    out = []
    available = fastadam.available_backends()
    for name in names:
        marks = []
        if name not in available and not fast_backends_required():
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


@pytest.fixture
def restore_threads():
    """Puts back the process-wide thread counts (fastadam's, and torch's if it is
    installed) that a test changes, e.g. through the bench's main()."""
    import importlib.util

    before = fastadam.get_num_threads()
    torch = None
    if importlib.util.find_spec("torch") is not None:
        import torch
    torch_before = torch.get_num_threads() if torch is not None else None
    yield
    fastadam.set_num_threads(before)
    if torch is not None:
        torch.set_num_threads(torch_before)
