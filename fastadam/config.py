"""Tunables shared by the backends, in one place.

None of these change results: every backend is bit-identical to the NumPy
reference whatever they say. They only trade per-call overhead against
parallel speed-up.
"""

from __future__ import annotations

import os

#: Below this many elements a step runs on one thread: waking a thread pool
#: costs more than the step itself (a 64K-element float32 step moves ~1.8 MB,
#: a few tens of microseconds).
PARALLEL_MIN_ELEMENTS: int = 1 << 16


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
