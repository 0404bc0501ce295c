"""Timing a no-argument callable: warm-up, then the median of single calls, or
several callables in alternating rounds so that their ratio compares like with like."""

from __future__ import annotations

import itertools
import math
import statistics
import time
from collections.abc import Callable
from typing import Any

#: Default seconds spent timing each (backend, size) pair.
DEFAULT_MIN_TIME = 1.0
#: Timed calls per measurement: at least this many (even past --min-time, so
#: the largest sizes still get a meaningful median) and at most that many.
MIN_REPEATS = 5
MAX_REPEATS = 200_000
#: With more than one dtype, each backend's dtypes at one size are timed in this
#: many alternating rounds (see time_interleaved).
INTERLEAVE_ROUNDS = 5


def _warm_up(fn: Callable[[], Any], min_time: float, repeat: int | None) -> None:
    """JIT loading, torch's lazy state, page faults, caches: one call with ``repeat``,
    otherwise at least two calls and about a tenth of ``min_time``."""
    if repeat is not None:
        fn()
        return
    t_end = time.perf_counter() + min_time / 10
    for i in itertools.count():
        fn()
        if i >= 1 and time.perf_counter() >= t_end:
            return


def _timed_calls(fn: Callable[[], Any], min_time: float, min_calls: int, max_calls: int) -> list:
    """Seconds of each of at least ``min_calls`` calls, for about ``min_time`` in all.

    Each call is timed on its own: the median of single calls is robust to the
    odd descheduling on a shared machine.
    """
    clock = time.perf_counter
    times = []
    t_end = clock() + min_time
    while True:
        t0 = clock()
        fn()
        t1 = clock()
        times.append(t1 - t0)
        if len(times) >= max_calls or (len(times) >= min_calls and t1 >= t_end):
            return times


def time_calls(
    fn: Callable[[], Any], *, min_time: float, repeat: int | None, best: bool = False
) -> tuple[float, int]:
    """(median seconds per call, or the minimum if ``best``; number of timed calls).

    Warm-up first, then ``repeat`` timed calls, or as many as fit in ``min_time``
    (at least MIN_REPEATS).
    """
    _warm_up(fn, min_time, repeat)
    if repeat is not None:
        times = _timed_calls(fn, 0.0, repeat, repeat)
    else:
        times = _timed_calls(fn, min_time, MIN_REPEATS, MAX_REPEATS)
    return (min(times) if best else statistics.median(times)), len(times)


def time_interleaved(
    fns: dict[str, Callable[[], Any]],
    *,
    min_time: float,
    repeat: int | None,
    rounds: int = INTERLEAVE_ROUNDS,
) -> dict[str, tuple[float, int]]:
    """{key: (median seconds per call, number of timed calls)}, the calls timed in
    alternating rounds.

    A shared machine's bandwidth drifts over seconds, so two steps timed one
    after the other can differ by what the machine did in between. Alternating
    short blocks of each (``rounds`` of them, ``min_time / rounds`` seconds per
    block, or one call per block and ``repeat`` rounds) lets every step see the
    same machine, which is what a ratio of their times needs.
    """
    if len(fns) == 1:
        return {k: time_calls(fn, min_time=min_time, repeat=repeat) for k, fn in fns.items()}
    for fn in fns.values():
        _warm_up(fn, min_time, repeat)
    if repeat is not None:
        rounds, block_time, min_calls = repeat, 0.0, 1
    else:
        block_time, min_calls = min_time / rounds, math.ceil(MIN_REPEATS / rounds)
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(rounds):
        for k, fn in fns.items():
            fn()  # untimed: the previous block's data has just displaced this one's
            times[k] += _timed_calls(fn, block_time, min_calls, MAX_REPEATS // rounds)
    return {k: (statistics.median(t), len(t)) for k, t in times.items()}
