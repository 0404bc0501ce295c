"""The fast kernels update in place: no memory proportional to the array size.

A step that allocated a temporary per array would double the memory traffic
of a memory-bound update (and the peak memory of a large model). Three views:

* ``tracemalloc`` sees every allocation made through Python's and NumPy's
  allocators: the fast backends' peak during a 2^20-element step stays tiny,
  while the NumPy reference (the control, so the check can fail) allocates
  whole-array temporaries;
* the process's peak resident memory (``ru_maxrss``) also sees what C's
  ``malloc`` or Numba's runtime would allocate, which tracemalloc cannot: it
  must not grow during a large step on a fast backend (again with NumPy as
  the control);
* the Numba kernels load from the on-disk cache in a fresh process instead of
  being compiled again (a cache miss costs seconds at every start);
* the compiled Numba loops count no references: an array handed to a helper
  function inside the loop makes Numba increment and decrement its reference
  count for every element (two atomic operations each), which once made the
  serial loops ~100x slower without changing a single result.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import textwrap
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
from helpers import FAST_BACKENDS, make_state

import fastadam

N = 1 << 20  # past the parallel threshold, so the threaded path is the one checked
PEAK_LIMIT = 64 * 1024  # bytes: a few Python objects per call, nothing per element


def _traced_peak_of_one_step(backend: str) -> int:
    p, g, m, v, _ = make_state(N, np.float32)
    # Warm-up outside the trace: JIT cache loading, thread pools, lazy imports.
    fastadam.adam_step(p, g, m, v, step=1, lr=1e-3, backend=backend)
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        fastadam.adam_step(p, g, m, v, step=2, lr=1e-3, backend=backend)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return peak


def test_fast_backend_step_allocates_nothing_per_element(fast_backend):
    peak = _traced_peak_of_one_step(fast_backend)
    assert peak < PEAK_LIMIT, f"{fast_backend}: {peak} bytes traced during a {N}-element step"


def test_numpy_reference_allocates_temporaries():
    # The control: the measurement does see whole-array temporaries.
    peak = _traced_peak_of_one_step("numpy")
    assert peak >= N * 4, f"numpy reference: only {peak} bytes traced"


def _child_env() -> dict[str, str]:
    env = dict(os.environ)
    pkg_parent = str(Path(fastadam.__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (pkg_parent, env.get("PYTHONPATH")) if p)
    return env


def _run_child(code: str, *args: str) -> str:
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code), *args],
        capture_output=True,
        text=True,
        env=_child_env(),
        timeout=300,
        cwd=tempfile.gettempdir(),  # not the repo root, where the source tree would shadow it
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


_RSS_CHILD = """
    import json, sys
    import numpy as np
    import fastadam

    def maxrss_bytes():
        # VmHWM, this address space's peak RSS. Not ru_maxrss: Linux carries that
        # across execve, so it would start at the (large) pytest parent's peak.
        with open("/proc/self/status") as f:
            line = next(x for x in f if x.startswith("VmHWM:"))
        return int(line.split()[1]) * 1024  # kB

    backends = sys.argv[1:]
    small = [np.ones(1 << 20, np.float32) for _ in range(4)]
    for b in backends:  # warm-up: cache loading and thread pools, at a parallel size
        fastadam.adam_step(*small, step=1, lr=1e-3, backend=b)
    n = 1 << 24
    rng = np.random.default_rng(0)
    big = [np.empty(n, np.float32) for _ in range(4)]
    for a in big:  # filled in place, every page touched: no temporary raises the high-water mark
        rng.random(out=a, dtype=np.float32)
        a += np.float32(0.5)
    growth = {}
    for b in backends:  # numpy last: its temporaries raise the high-water mark for good
        before = maxrss_bytes()
        fastadam.adam_step(*big, step=2, lr=1e-3, backend=b)
        growth[b] = maxrss_bytes() - before
    print(json.dumps(growth))
"""


@pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="/proc/self/status VmHWM is Linux's"
)
def test_peak_resident_memory_does_not_grow_during_a_large_step():
    backends = [b for b in FAST_BACKENDS if b in fastadam.available_backends()]
    if not backends:
        pytest.skip("no fast backend loads here")
    # One process per backend: a cold-cache Numba compile in the same process
    # would raise the high-water mark above the NumPy control's temporaries.
    growth = {}
    for b in [*backends, "numpy"]:
        growth.update(json.loads(_run_child(_RSS_CHILD, b)))
    array_bytes = (1 << 24) * 4
    for b in backends:
        assert growth[b] < array_bytes // 4, f"{b}: peak RSS grew by {growth[b]} bytes"
    # The control: one whole-array temporary would show up.
    assert growth["numpy"] >= array_bytes, growth


_CACHE_CHILD = """
    import json
    import numpy as np
    import fastadam
    from fastadam._scalars import STATE_SAME_DTYPE, compute_scalars
    from fastadam.backends import numba_

    sc = compute_scalars(
        1, 1e-3, 0.9, 0.999, 1e-8, 0.0, False, False, False, False, None, STATE_SAME_DTYPE
    )
    for dtype in (np.float32, np.float64):
        for n in (1000, 1 << 17):  # the serial loops, then the parallel one
            a = [np.ones(n, dtype) for _ in range(4)]
            fastadam.adam_step(*a, step=1, lr=1e-3, backend="numba")
            if n == 1000:  # the serial njit loop, where the one-call path is missing
                numba_.step(*a, None, sc)
    stats = {}
    for name in ("_serial", "_parallel"):
        s = getattr(numba_, name).stats
        stats[name] = [sum(s.cache_hits.values()), sum(s.cache_misses.values())]
    if numba_.step_fast is not None:  # adam_step's small arrays: the loops as cfuncs
        from fastadam import _q8
        from fastadam.backends import _numba_cfunc

        p = np.ones(1000, np.float32)
        m, v, am, av = _q8.zeros_state(1000)  # an 8-bit step of that size: step_q8
        fastadam.adam_step(p, p.copy(), m, v, step=1, lr=1e-3, exp_avg_absmax=am,
                           exp_avg_sq_absmax=av, backend="numba")  # fmt: skip
        for name in ("step_f32", "step_f64", "step_q8"):
            hits = getattr(_numba_cfunc, name).cache_hits
            stats[name] = [hits, 1 - hits]  # one signature, loaded or compiled
    print(json.dumps(stats))
"""


def test_numba_kernels_load_from_the_disk_cache_in_a_fresh_process():
    if "numba" not in fastadam.available_backends():
        pytest.skip(fastadam.unavailable_reasons().get("numba", "numba unavailable"))
    _run_child(_CACHE_CHILD)  # fills the cache if it was cold (or stale)
    stats = json.loads(_run_child(_CACHE_CHILD))
    # the njit loops have a float32 and a float64 signature; each cfunc one
    signatures = {"_serial": 2, "_parallel": 2, "step_f32": 1, "step_f64": 1, "step_q8": 1}
    for name, (hits, misses) in stats.items():
        assert misses == 0, f"{name}: {misses} signature(s) compiled again instead of loaded"
        assert hits >= signatures[name], f"{name}: {hits} cache hits"


def _serial_loop_llvm(kind: str) -> str:
    """LLVM IR of a freshly compiled (not cached) serial Numba loop after one call."""
    from numba import njit

    from fastadam.backends import _numba_loops

    n = 100  # three full blocks and a partial one
    p, g, m, v, _ = make_state(n, np.float32)
    scalars = (1e-3, 1.0, 1e-8, 0.1, 0.999, 1e-3, 0.01, 1.0, 2.0, True, True, False, 0, 7, 1)
    if kind == "float":
        py_loop = _numba_loops._make_loop(False)
        arrays = (p, g, m, v, v)
    else:
        py_loop = _numba_loops._make_bf16_loop(False, True, True, True, True, True, True, True)
        m16, v16 = (np.zeros(n, np.uint16) for _ in range(2))
        arrays = (p, g, m16, v16, np.zeros(n, np.uint16))
    loop = njit(**{**_numba_loops._JIT, "cache": False})(py_loop)
    loop(*arrays, *scalars)
    return loop.inspect_llvm(loop.signatures[0])


@pytest.mark.parametrize("kind", ["float", "bf16"])
def test_numba_loops_count_no_references(kind):
    if "numba" not in fastadam.available_backends():
        pytest.skip(fastadam.unavailable_reasons().get("numba", "numba unavailable"))
    llvm = _serial_loop_llvm(kind)
    assert "define" in llvm and "fdiv float" in llvm, "not the compiled loop's IR"
    calls = llvm.count("call void @NRT_incref")
    assert calls == 0, f"{kind} loop: {calls} reference-count increments in the compiled loop"
