"""Shared fixtures: the backends under test (array generators are in helpers.py)."""

from __future__ import annotations

import os

if os.environ.get("PYTEST_XDIST_WORKER"):
    # Two worker processes share the cores, each with its own OpenMP pool
    # (fastadam's C library, torch): a thread spinning while it waits for a
    # descheduled one wastes the other worker's core. Waiting threads sleep
    # (set before fastadam's library, and libgomp with it, is loaded).
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest  # noqa: E402
from helpers import FAST_BACKENDS, fast_backends_required  # noqa: E402

import fastadam  # noqa: E402

#: The modules that take longest (a wheel, a library sanitized, cross-compiled
#: or without OpenMP, the docs, Numba's compiles), longest first. pytest-xdist
#: hands out whole modules (pyproject.toml: ``--dist loadfile``, so each builds
#: its module-scoped fixtures once) in collection order: these go first, so
#: that the short ones fill the other workers' time meanwhile instead of one
#: long module running alone at the end.
_FIRST = ("test_wheel", "test_c_sanitizers", "test_lowp", "test_c_vectorized", "test_c_aarch64",
          "test_docs", "test_bf16", "test_multi", "test_backends", "test_c_no_openmp")  # fmt: skip


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    rank = {name: k for k, name in enumerate(_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.stem, len(_FIRST)))  # stable


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
