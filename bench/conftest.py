"""Shared pieces of the pytest-benchmark suite in ``bench/``.

Not part of the test run: ``pyproject.toml`` sets ``testpaths = ["tests"]``, so a
plain ``pytest`` never collects this folder. Run it explicitly::

    pytest bench/ --benchmark-only

Each benchmark is grouped by size (``benchmark.group``), so pytest-benchmark
prints one comparison table per size. pytest-benchmark has no bandwidth column,
so a GB/s summary (28 bytes/element float32, 56 float64, against the median)
is printed at the end of the run as well.
"""

from __future__ import annotations

import functools
import importlib.util

import numpy as np
import pytest

import fastadam
from fastadam.bench import FASTADAM_BACKENDS, TORCH_BACKENDS, make_state

HAS_TORCH = importlib.util.find_spec("torch") is not None

_gbps_key = pytest.StashKey[list]()


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config: pytest.Config) -> None:
    config.stash[_gbps_key] = []
    # pyproject.toml's addopts spread the tests over worker processes
    # (pytest-xdist, ``-n auto``); benchmarks run in this one process, alone,
    # or pytest-benchmark switches itself off.
    if hasattr(config.option, "numprocesses"):
        config.option.numprocesses = 0
        config.option.dist = "no"


def _require_backend(name: str) -> None:
    if name in TORCH_BACKENDS or name.startswith("torch"):
        if not HAS_TORCH:
            pytest.skip("torch is not installed")
    elif name in FASTADAM_BACKENDS and name not in fastadam.available_backends():
        pytest.skip(fastadam.unavailable_reasons().get(name, f"{name} unavailable"))


@pytest.fixture(scope="session")
def require_backend():
    """``require_backend(name)`` skips the benchmark when ``name`` cannot run here, saying why."""
    return _require_backend


@functools.lru_cache(maxsize=1)
def _shared_state(n: int, dtype: str) -> tuple[np.ndarray, ...]:
    # One slot only: the benchmarks run size by size, and keeping every size
    # alive would hold gigabytes at 2^26.
    return make_state(n, dtype)


@pytest.fixture(scope="session")
def shared_state():
    """``shared_state(n, dtype)``: (θ, g, m, v), reused by consecutive benchmarks of one size."""
    return _shared_state


def _schedule(n: int) -> tuple[int, int]:
    # Small steps are batched (several calls a round) so the timer's resolution
    # does not matter; the largest sizes get the minimum of 5 rounds (the NumPy
    # reference at 2^26 float32 takes most of a second per step).
    iterations = max(1, (1 << 16) // n)
    rounds = max(5, min(200, (1 << 26) // n))
    return rounds, iterations


@pytest.fixture(scope="session")
def schedule():
    """``schedule(n)`` -> (rounds, iterations per round): a bounded total time per size."""
    return _schedule


@pytest.fixture
def report_gbps(request: pytest.FixtureRequest):
    """Call ``report_gbps(benchmark, bytes_per_step)`` after a benchmark to list its GB/s."""

    def record(benchmark, bytes_per_step: int) -> None:
        stats = getattr(benchmark, "stats", None)
        if stats is None:  # --benchmark-disable: ran once, nothing measured
            return
        median = stats.stats.median
        request.config.stash[_gbps_key].append(
            (benchmark.group or "", request.node.name, bytes_per_step / median / 1e9)
        )

    return record


def pytest_terminal_summary(terminalreporter, exitstatus, config: pytest.Config) -> None:
    rows = config.stash.get(_gbps_key, [])
    if not rows:
        return
    tr = terminalreporter
    tr.section("effective bandwidth (GB/s, from the median)")
    width = max(len(name) for _, name, _ in rows)
    group = None
    for g, name, gbps in rows:
        if g != group:
            group = g
            tr.write_line(f"-- {g}")
        tr.write_line(f"   {name:<{width}}  {gbps:8.1f}")
