"""Tunables shared by the backends, in one place.

None of these change results: every backend is bit-identical to the NumPy
reference whatever they say. They only trade per-call overhead against
parallel speed-up.

Two kinds live here. The Numba backend's threshold and the thread count are
read at run time: changing them here changes what runs. The C library's
thresholds and thread cap are compiled into it (``#define`` in
``csrc/fastadam.c``, overridable at build time with ``-D``); the ``C_*``
constants state the values of a default build, so that this file lists every
tunable, and ``tests/test_config.py`` checks them against the C source. To
change one, change both. The Numba loops' block and prefetch distance
(``_BLOCK``, ``_PREFETCH_BYTES``) stay in
``fastadam/backends/_numba_intrinsics.py``: Numba's disk cache is keyed by the
loops' source files, so a value read from here would not recompile them.
"""

from __future__ import annotations

import os

#: Below this many elements a Numba step runs on one thread: waking a thread pool
#: costs more than the step itself (a 64K-element float32 step moves ~1.8 MB,
#: a few tens of microseconds).
PARALLEL_MIN_ELEMENTS: int = 1 << 16

# -- compiled into the C library (csrc/fastadam.c; see the module docstring) --------

#: Below this many elements a C step (one tensor, or a multi-tensor step's total)
#: runs on the calling thread: an OpenMP fork/join costs ~2-3 µs, less than a
#: Numba launch, hence a lower threshold than PARALLEL_MIN_ELEMENTS.
C_PARALLEL_MIN_ELEMENTS: int = 32768
#: No thread of a parallel C step gets fewer elements than this.
C_MIN_ELEMENTS_PER_THREAD: int = 16384
#: The same two for the C library's unscale-and-check, which does far less work
#: per element than a step and so needs more elements to pay for the threads.
C_UNSCALE_PARALLEL_MIN_ELEMENTS: int = 262144
C_UNSCALE_MIN_ELEMENTS_PER_THREAD: int = 131072
#: The C library clamps a thread count to this (more would only exhaust the OS);
#: ``fastadam.backends.c.set_num_threads`` clamps to it before the call.
C_MAX_THREADS: int = 4096


def default_num_threads() -> int:
    """Threads a kernel uses unless :func:`fastadam.set_num_threads` says otherwise.

    ``FASTADAM_NUM_THREADS`` wins. Otherwise: the CPUs this process may run on,
    divided among the ranks of a ``torchrun`` job on this machine
    (``LOCAL_WORLD_SIZE``), so several ranks per machine do not oversubscribe it.
    """
    env = os.environ.get("FASTADAM_NUM_THREADS")
    if env:
        try:
            n = int(env)
        except ValueError:
            raise ValueError(
                f"FASTADAM_NUM_THREADS must be a positive integer, got {env!r}"
            ) from None
        if n < 1:
            raise ValueError(f"FASTADAM_NUM_THREADS must be a positive integer, got {env!r}")
        return n
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cpus = os.cpu_count() or 1
    try:
        ranks = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    except ValueError:
        ranks = 1
    return max(1, cpus // ranks)
