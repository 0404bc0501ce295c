"""``fastadam bench``: how close each backend's Adam step comes to the memory roofline.

An Adam step is memory-bound. In float32 it reads θ, g, m, v and writes θ, m, v
back: 7 × 4 = 28 bytes per element (56 in float64), for a handful of flops. So
the yardstick is not a FLOP count but the bandwidth the machine can sustain on
that exact access pattern. This command measures, in order:

1. **the roofline**: a trivial Numba kernel that moves the same bytes as a step
   (``p += g; m += g; v += g*g``: reads four arrays, writes three in place),
   vectorized and parallel over the same thread count, best of several runs at
   the largest size measured (or at every size, ``--roofline-per-size``), per dtype;
2. **each backend at each size**: median seconds per step (after warm-up),
   effective GB/s, fraction of the roofline, speed-up over the NumPy reference
   and over ``torch.optim.Adam(fused=True)`` (when torch is installed; torch's
   ``fused=True`` and ``foreach=True`` optimizers are measured too, over one
   tensor of ``n`` elements that shares the NumPy buffers); with several
   ``--dtype``, each backend's steps of one size alternate in rounds, so the
   ratio of their times (bf16 against float32 states, a project target) is
   measured side by side;
3. **the per-call cost** of a 1,024-element float32 step, validation included,
   as a multiple of ``np.add(p, g, out=p)`` on an array of the same size (timed
   in the same alternating rounds: a ratio travels between machines whose Python
   differs 3x in speed, a µs figure does not); and the cost per tensor of a
   multi-tensor step (:class:`fastadam.MultiTensorPlan` over 256 tensors of
   1,024 elements) beyond one ``adam_step`` over all their elements at once.

``--model gpt2-small,gpt2-mini`` is another mode: a whole model's optimizer
step, fastadam's optimizers against torch's (see :mod:`fastadam.bench_model`).

It then prints a table (``--markdown`` for Markdown), checks the project's speed
targets, and optionally writes ``--json`` records and a ``--plot``.

Only the public API is used (:func:`fastadam.adam_step`,
:func:`fastadam.set_num_threads`, ...), so what is measured is what a user gets.

Run ``python -m fastadam bench --help`` or ``fastadam-bench --help``.
"""

from __future__ import annotations

import argparse
import importlib.util
import itertools
import json
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

import fastadam
from fastadam.functional import BFLOAT16

#: Backend names this command knows, in table order.
FASTADAM_BACKENDS: tuple[str, ...] = fastadam.BACKEND_NAMES
TORCH_BACKENDS: tuple[str, ...] = ("torch-fused", "torch-foreach")
ALL_BACKENDS: tuple[str, ...] = FASTADAM_BACKENDS + TORCH_BACKENDS

#: Default sweep (elements). With the default --min-time the whole run takes
#: about a minute on 2 cores.
DEFAULT_SIZES: tuple[int, ...] = (1 << 12, 1 << 16, 1 << 20, 1 << 22, 1 << 24)
#: Elements of the per-call-cost step (small enough that the call overhead,
#: validation included, dominates).
PER_CALL_N = 1024
#: Refuse sizes past this: four float64 arrays of 2^30 elements are 32 GiB.
MAX_SIZE = 1 << 30

#: Default seconds spent timing each (backend, size) pair.
DEFAULT_MIN_TIME = 1.0
#: Timed calls per measurement: at least this many (even past --min-time, so
#: the largest sizes still get a meaningful median) and at most that many.
MIN_REPEATS = 5
MAX_REPEATS = 200_000
#: With more than one dtype, each backend's dtypes at one size are timed in this
#: many alternating rounds (see time_interleaved).
INTERLEAVE_ROUNDS = 5

#: Project speed targets (see BENCHMARKS.md).
TARGET_LARGE_N = 1 << 24  # "large": at least this many float32 elements
TARGET_ROOFLINE_FRACTION = 0.90
TARGET_SPEEDUP_VS_NUMPY = 6.0
TARGET_SPEEDUP_VS_TORCH_LARGE = 1.0
TARGET_IN_CACHE = (1 << 16, 1 << 20)  # inclusive range of "in cache" sizes
TARGET_SPEEDUP_VS_TORCH_IN_CACHE = 2.0
#: Per-call cost: one 1,024-element float32 adam_step at most this many times an
#: np.add(p, g, out=p) on the same size, timed side by side (c and numba).
TARGET_PER_CALL_RATIO = 6.0
#: Multi-tensor step over PER_TENSOR_K tensors of PER_CALL_N elements: its time
#: beyond one adam_step over all PER_TENSOR_K * PER_CALL_N elements, per tensor,
#: at most this many times that np.add (c and numba).
TARGET_PER_TENSOR_RATIO = 0.5
PER_TENSOR_K = 256
#: The backends the per-call targets are set for.
PER_CALL_TARGET_BACKENDS = ("c", "numba")
#: The per-call yardstick's name in tables and records.
NP_ADD = "np.add"
#: bfloat16 states move 20 instead of 28 B/element: at large sizes a bf16-state step
#: should take at most this fraction of the float32-state step's time.
TARGET_BF16_TIME_RATIO = 0.75

_PLOT_HINT = "--plot needs matplotlib, which is optional: pip install 'fastadam[plot]'"


class BenchError(Exception):
    """A usage error the command reports in one line before exiting with status 2."""


# -- argument parsing ------------------------------------------------------------


def parse_size(token: str) -> int:
    """One size: ``2^k`` (or ``2**k``) or a plain positive integer, in elements."""
    t = token.strip()
    try:
        if "^" in t or "**" in t:
            base, exp = t.replace("**", "^").split("^")
            if base.strip() != "2":
                raise ValueError
            n = 1 << int(exp)
        else:
            n = int(t)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"bad size {token!r}: expected 2^k (e.g. 2^20) or a positive integer"
        ) from None
    if not 1 <= n <= MAX_SIZE:
        raise argparse.ArgumentTypeError(
            f"bad size {token!r}: must be between 1 and 2^{MAX_SIZE.bit_length() - 1} elements"
        )
    return n


def parse_sizes(text: str) -> list[int]:
    """``"2^16,2^20,4096"`` -> ``[4096, 65536, 1048576]`` (sorted, duplicates dropped)."""
    tokens = [t for t in text.split(",") if t.strip()]
    if not tokens:
        raise argparse.ArgumentTypeError("--sizes is empty: give e.g. 2^16,2^20")
    return sorted({parse_size(t) for t in tokens})


def parse_backends(text: str) -> list[str]:
    """``"numba,c,torch-fused"`` -> the names, checked against :data:`ALL_BACKENDS`."""
    names = [t.strip() for t in text.split(",") if t.strip()]
    if not names:
        raise argparse.ArgumentTypeError("--backends is empty")
    for name in names:
        if name not in ALL_BACKENDS:
            raise argparse.ArgumentTypeError(
                f"unknown backend {name!r}; choose from {', '.join(ALL_BACKENDS)}"
            )
    return [b for b in ALL_BACKENDS if b in names]  # table order, no duplicates


#: The pseudo-dtype of a step with float32 params/grads and bfloat16 states.
BF16_STATES = "bf16"
#: The step kinds --dtype can name, in table order, and its shorthands for several.
DTYPES: tuple[str, ...] = ("float32", "float64", BF16_STATES)
_DTYPE_SETS = {"both": ["float32", "float64"], "all": list(DTYPES)}


def parse_dtypes(text: str) -> list[str]:
    """``"float32,bf16"`` (or ``both``, ``all``) -> the step kinds, in table order."""
    names = [t.strip() for t in text.split(",") if t.strip()]
    if not names:
        raise argparse.ArgumentTypeError("--dtype is empty")
    chosen = set()
    for name in names:
        if name not in DTYPES and name not in _DTYPE_SETS:
            raise argparse.ArgumentTypeError(
                f"unknown dtype {name!r}; choose from {', '.join(DTYPES)}, both, all"
            )
        chosen.update(_DTYPE_SETS.get(name, [name]))
    return [d for d in DTYPES if d in chosen]


def _positive_int(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return n


def _positive_float(text: str) -> float:
    try:
        x = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, got {text!r}") from None
    if not (math.isfinite(x) and x > 0):
        raise argparse.ArgumentTypeError(f"expected a positive number of seconds, got {text!r}")
    return x


def _parse_models(text: str) -> list:
    from fastadam.bench_model import parse_models

    return parse_models(text)


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    """The command-line parser (``prog`` is the name shown in usage lines)."""
    p = argparse.ArgumentParser(
        prog=prog,
        description=(
            "Measure fastadam's Adam step against the machine's memory roofline "
            "(28 bytes/element float32, 56 float64), the NumPy reference and torch."
        ),
        epilog=(
            "Sizes are elements per array: 2^k or plain integers. The default run "
            "(2^12..2^24 float32, every installed backend) takes about a minute on 2 cores."
        ),
    )
    p.add_argument(
        "--sizes",
        type=parse_sizes,
        default=None,
        metavar="LIST",
        help="comma-separated sizes in elements, e.g. 2^16,2^20,1000000 "
        "(default: 2^12,2^16,2^20,2^22,2^24)",
    )
    p.add_argument(
        "--model",
        type=_parse_models,
        default=None,
        metavar="LIST",
        help="instead of the size sweep, time whole-model optimizer steps "
        "(fastadam.torch.AdamW with float32 and bf16 states, fastadam.AdamW, torch "
        "AdamW fused and foreach) over GPT-2-shaped parameters: comma-separated, from "
        "gpt2-small, gpt2-mini, or a spec such as "
        "gpt2:n_layer=2,n_embd=64,vocab=1000,n_positions=128",
    )
    p.add_argument(
        "--backends",
        type=parse_backends,
        default=None,
        metavar="LIST",
        help=f"comma-separated, from {','.join(ALL_BACKENDS)} "
        "(default: every one that is installed). With --model: the fastadam rows run on "
        "each fastadam backend named (default: auto's), the torch rows are those named "
        "(default: both)",
    )
    p.add_argument(
        "--dtype",
        type=parse_dtypes,
        default=None,
        metavar="LIST",
        help="comma-separated, from float32, float64 and bf16 (float32 params with "
        "bfloat16 optimizer states, 20 B/element); both = float32,float64; all = all three. "
        "Several dtypes are timed in alternating rounds, so their ratios compare like with "
        "like (default: float32)",
    )
    p.add_argument(
        "--threads",
        type=_positive_int,
        default=None,
        metavar="N",
        help="threads for fastadam (set_num_threads), the roofline kernel and torch "
        "(default: fastadam.get_num_threads())",
    )
    p.add_argument(
        "--min-time",
        type=_positive_float,
        default=DEFAULT_MIN_TIME,
        metavar="SECONDS",
        help=f"time spent timing each backend at each size (default: {DEFAULT_MIN_TIME}); "
        f"at least {MIN_REPEATS} timed steps are taken whatever it says",
    )
    p.add_argument(
        "--repeat",
        type=_positive_int,
        default=None,
        metavar="N",
        help="exactly N timed steps per measurement after one warm-up step, "
        "instead of --min-time (for smoke tests; medians of few steps are noisy)",
    )
    p.add_argument(
        "--roofline-per-size",
        action="store_true",
        help="measure the roofline at every size (in-cache sizes get their own ceiling) "
        "instead of only at the largest",
    )
    p.add_argument(
        "--no-per-call",
        action="store_true",
        help=f"skip the per-call cost measurement ({PER_CALL_N}-element float32 step)",
    )
    p.add_argument("--json", metavar="FILE", default=None, help="write the records as JSON")
    p.add_argument(
        "--plot",
        metavar="FILE.png",
        default=None,
        help="plot GB/s against size (needs matplotlib: pip install 'fastadam[plot]')",
    )
    p.add_argument(
        "--markdown", action="store_true", help="print the header and tables as Markdown"
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    return p


# -- formatting ----------------------------------------------------------------


def format_n(n: int) -> str:
    """``2^20`` for powers of two, the plain number otherwise."""
    return f"2^{n.bit_length() - 1}" if n > 0 and n & (n - 1) == 0 else str(n)


def format_seconds(s: float) -> str:
    """A duration with a unit that keeps 3-4 significant digits."""
    if s < 1e-3:
        return f"{s * 1e6:.1f} µs"
    if s < 1.0:
        return f"{s * 1e3:.2f} ms"
    return f"{s:.3f} s"


def _fmt_ratio(x: float | None, suffix: str = "×") -> str:
    return "-" if x is None else f"{x:.2f}{suffix}"


def render_table(
    headers: Sequence[str], rows: Sequence[Sequence[str]], markdown: bool, right: Sequence[bool]
) -> str:
    """Aligned plain-text columns, or a Markdown table (``right``: right-align column i)."""
    if markdown:
        sep = ["---:" if r else "---" for r in right]
        lines = [headers, sep, *rows]
        return "\n".join("| " + " | ".join(cells) + " |" for cells in lines)
    widths = [max([len(h)] + [len(r[i]) for r in rows]) for i, h in enumerate(headers)]

    def line(cells: Sequence[str]) -> str:
        cols = zip(cells, widths, right, strict=True)
        padded = (c.rjust(w) if r else c.ljust(w) for c, w, r in cols)
        return "  ".join(padded).rstrip()

    return "\n".join([line(headers), line(["-" * w for w in widths]), *(line(r) for r in rows)])


# -- what is measured ----------------------------------------------------------


def bytes_per_element(dtype: np.dtype | str) -> int:
    """Bytes one Adam step moves per element: 4 arrays read + 3 written.

    With bfloat16 states: θ and g (4 B) read, θ written; m, v (2 B) read and
    written: 3*4 + 4*2 = 20 B.
    """
    if dtype == BF16_STATES:
        return 20
    return 7 * np.dtype(dtype).itemsize


def make_state(n: int, dtype: np.dtype | str, seed: int = 0) -> tuple[np.ndarray, ...]:
    """(θ, g, m, v): ``n`` elements each, mid-training-like values.

    No gradient is exactly zero and v > 0, so neither moment decays towards the
    subnormal range over many steps (subnormal arithmetic is slow on x86 and
    would measure the FPU instead of memory).
    """
    if dtype == BF16_STATES:
        p, g, m, v = make_state(n, "float32", seed)
        return p, g, m.astype(BFLOAT16), v.astype(BFLOAT16)
    dt = np.dtype(dtype)
    rng = np.random.default_rng(seed)
    p = rng.standard_normal(n, dtype=dt)
    g = rng.standard_normal(n, dtype=dt)
    g[g == 0] = 1  # vanishingly rare, but a zero gradient would let m decay to subnormal
    m = rng.standard_normal(n, dtype=dt)
    m *= 0.1
    v = rng.random(n, dtype=dt)
    v *= 0.01
    v += 1e-4
    return p, g, m, v


def _fastadam_step(backend: str, state: tuple[np.ndarray, ...]) -> Callable[[], None]:
    p, g, m, v = state
    steps = itertools.count(1)  # a real training loop's step counter
    adam_step = fastadam.adam_step

    def run() -> None:
        adam_step(p, g, m, v, step=next(steps), lr=1e-3, backend=backend)

    return run


def _torch_step(backend: str, state: tuple[np.ndarray, ...]) -> Callable[[], Any]:
    import torch

    p, g = state[0], state[1]
    # The same memory as the NumPy arrays: torch steps the very buffer fastadam does.
    tp = torch.from_numpy(p).requires_grad_(True)
    tp.grad = torch.from_numpy(g)
    kind = {"torch-fused": {"fused": True}, "torch-foreach": {"foreach": True}}[backend]
    opt = torch.optim.Adam([tp], lr=1e-3, **kind)
    return opt.step


def make_step(backend: str, state: tuple[np.ndarray, ...]) -> Callable[[], Any]:
    """A no-argument callable doing one Adam step of ``backend`` over ``state``."""
    if backend in TORCH_BACKENDS:
        return _torch_step(backend, state)
    return _fastadam_step(backend, state)


def _np_add_step(n: int) -> Callable[[], Any]:
    """``np.add(p, g, out=p)`` on ``n`` float32 elements: the per-call yardstick (the
    cheapest call that takes arrays, so a ratio to it cancels the machine's Python speed)."""
    p, g = make_state(n, "float32", seed=1)[:2]
    add = np.add

    def run() -> None:
        add(p, g, out=p)

    return run


def _multi_step(backend: str, k: int, n: int) -> Callable[[], Any]:
    """One :class:`fastadam.MultiTensorPlan` step over ``k`` separate float32 arrays of
    ``n`` elements (the plan validated once, as a training loop uses it)."""
    states = [make_state(n, "float32", seed=i) for i in range(k)]
    params, grads, exp_avgs, exp_avg_sqs = (list(x) for x in zip(*states))
    plan = fastadam.MultiTensorPlan(params, grads, exp_avgs, exp_avg_sqs, backend=backend)
    steps = itertools.count(1)

    def run() -> None:
        plan.step(step=next(steps), lr=1e-3)

    return run


def measure_per_call(
    backends: Sequence[str],
    threads: int,
    roofline_gbps: float | None,
    *,
    min_time: float,
    repeat: int | None,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]], list[str]]:
    """(per-call records, per-tensor records), all timed in one set of alternating
    rounds beside ``np.add(p, g, out=p)``.

    Per call: each backend's PER_CALL_N-element float32 step. Per tensor (c and
    numba): a MultiTensorPlan step over PER_TENSOR_K tensors of PER_CALL_N
    elements against one adam_step over PER_TENSOR_K * PER_CALL_N elements, the
    difference divided by PER_TENSOR_K: what each tensor costs beyond the kernel's
    time.
    """
    state = make_state(PER_CALL_N, "float32")
    fns = {NP_ADD: _np_add_step(PER_CALL_N)}
    for b in backends:
        fns[b] = make_step(b, state)
    multi = [b for b in backends if b in PER_CALL_TARGET_BACKENDS]
    n_multi = PER_TENSOR_K * PER_CALL_N
    for b in multi:
        fns[f"{b} multi"] = _multi_step(b, PER_TENSOR_K, PER_CALL_N)
        fns[f"{b} single"] = make_step(b, make_state(n_multi, "float32"))
    timed = time_interleaved(fns, min_time=min_time, repeat=repeat)
    add_s = timed[NP_ADD][0]
    per_call = []
    for b in backends:
        median, reps = timed[b]
        r = _record("per_call", b, PER_CALL_N, "float32", median, reps, threads, roofline_gbps)
        r.update(np_add_median_s=add_s, ratio_vs_np_add=median / add_s)
        per_call.append(r)
    per_tensor = []
    for b in multi:
        t_multi, reps = timed[f"{b} multi"]
        t_single = timed[f"{b} single"][0]
        beyond = (t_multi - t_single) / PER_TENSOR_K
        r = _record("per_tensor", b, n_multi, "float32", t_multi, reps, threads, roofline_gbps)
        r.update(
            tensors=PER_TENSOR_K,
            single_median_s=t_single,
            per_tensor_s=beyond,
            np_add_median_s=add_s,
            ratio_vs_np_add=beyond / add_s,
        )
        per_tensor.append(r)
    return per_call, per_tensor


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


_roofline_kernel: tuple[Callable[..., None], Callable[..., None]] | None = None


def _get_roofline_kernel() -> tuple[Callable[..., None], Callable[..., None]]:
    """The roofline kernels (float states, bfloat16 states), compiled on first use."""
    global _roofline_kernel
    if _roofline_kernel is None:
        # fastadam's Numba backend picks Numba's threading layer when it loads;
        # load it first so the roofline runs on the same layer as the backend.
        fastadam.available_backends()
        import numba

        # error_model="numpy": no ZeroDivisionError bookkeeping, nothing that
        # blocks vectorization. No allocation: every element is updated in place.
        @numba.njit(parallel=True, error_model="numpy", nogil=True, cache=True)
        def move_step_bytes(p, g, m, v):  # pragma: no cover - compiled
            for i in numba.prange(p.size):
                gi = g[i]
                p[i] += gi
                m[i] += gi
                v[i] += gi * gi  # stays >= 0, like a second moment

        @numba.njit(parallel=True, error_model="numpy", nogil=True, cache=True)
        def move_bf16_step_bytes(p, g, m, v):  # pragma: no cover - compiled
            # m, v: the bfloat16 states' bits (uint16), read and written.
            for i in numba.prange(p.size):
                p[i] += g[i]
                m[i] ^= 1
                v[i] ^= 1

        _roofline_kernel = (move_step_bytes, move_bf16_step_bytes)
    return _roofline_kernel


def measure_roofline(
    n: int, dtype: np.dtype | str, threads: int, *, min_time: float, repeat: int | None
) -> float:
    """Best-case GB/s of the step's access pattern (4 reads + 3 writes) over ``n`` elements.

    Best of several runs, not the median: this is the upper bound a step can
    reach on this machine, with ``threads`` Numba threads.
    """
    import numba

    float_kernel, bf16_kernel = _get_roofline_kernel()
    if dtype == BF16_STATES:
        kernel = bf16_kernel
        arrays = [np.full(n, x, dtype=np.float32) for x in (1.0, 0.5)]
        arrays += [np.full(n, x, dtype=np.uint16) for x in (0x3DCC, 0x3C23)]
    else:
        kernel = float_kernel
        # np.full touches every page
        arrays = [np.full(n, x, dtype=np.dtype(dtype)) for x in (1.0, 0.5, 0.1, 0.01)]
    numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
    best, _ = time_calls(lambda: kernel(*arrays), min_time=min_time, repeat=repeat, best=True)
    return bytes_per_element(dtype) * n / best / 1e9


def _cpu_seconds() -> tuple[float, float] | None:
    """(busy CPU-seconds of the whole machine, CPU-seconds of this process) so far.

    Linux only (``/proc/stat``); None elsewhere. The difference over the run is
    what *other* processes took from the cores being measured.
    """
    import resource

    try:
        with open("/proc/stat") as f:
            fields = f.readline().split()
    except OSError:
        return None
    if not fields or fields[0] != "cpu":
        return None
    ticks = [int(x) for x in fields[1:]]
    idle = ticks[3] + (ticks[4] if len(ticks) > 4 else 0)  # idle + iowait
    guest = sum(ticks[8:10])  # already counted in user/nice
    busy = sum(ticks) - idle - guest
    hz = os.sysconf("SC_CLK_TCK")
    me = resource.getrusage(resource.RUSAGE_SELF)
    return busy / hz, me.ru_utime + me.ru_stime


def machine_info(threads: int) -> dict[str, Any]:
    """What the numbers depend on: CPU, cores, threads, library versions, ISA, threading layer."""
    cpu = None
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    cpu = cpu or platform.processor() or platform.machine()
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count()
    import numba

    try:
        layer = numba.threading_layer()
    except ValueError:  # no parallel kernel has run in this process yet
        layer = None
    torch_version = None
    if "torch" in sys.modules:
        torch_version = sys.modules["torch"].__version__
    elif importlib.util.find_spec("torch") is not None:
        torch_version = "installed, not loaded"
    isa = None
    try:
        # Optional extra: the C library says which SIMD variant it dispatched to.
        isa = fastadam.backends.get("c").isa()
    except Exception:
        pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "usable_cores": usable,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "threads": threads,
        "fastadam": fastadam.__version__,
        "numpy": np.__version__,
        "numba": numba.__version__,
        "numba_threading_layer": layer,
        "torch": torch_version,
        "c_isa": isa,
        "numba_target": numba_target(),
        "auto": ", ".join(f"{k} {v}" for k, v in fastadam.backends.auto_choices().items()),
        "backends_unavailable": fastadam.unavailable_reasons(),
    }


Roofline = dict[str, dict[int, float]]  # dtype -> {n: GB/s}


def roofline_for(roofline: Roofline, dtype: str, n: int) -> float | None:
    """The roofline a record of ``n`` elements is compared with.

    The one measured at ``n`` with ``--roofline-per-size``, otherwise the one
    measured at the largest size.
    """
    per_size = roofline.get(dtype)
    if not per_size:
        return None
    return per_size.get(n, per_size[max(per_size)])


def numba_target() -> str:
    """The CPU Numba compiles for and the widest vector ISA in its features, e.g.
    ``"znver4 (AVX-512)"``: ``NUMBA_CPU_NAME``/``NUMBA_CPU_FEATURES`` when set,
    else the host's (what the Numba backend's loops are built for)."""
    import llvmlite.binding as llvm
    import numba

    name = numba.config.CPU_NAME or llvm.get_host_cpu_name()
    features = numba.config.CPU_FEATURES
    if features is None:
        features = llvm.get_host_cpu_features().flatten()
    enabled = {f[1:] for f in features.split(",") if f.startswith("+")}
    for feature, label in (("avx512f", "AVX-512"), ("avx2", "AVX2"), ("neon", "NEON")):
        if feature in enabled:
            return f"{name} ({label})"
    return f"{name} (no AVX2)" if platform.machine().lower() in ("x86_64", "amd64") else name


def header_lines(info: dict[str, Any], roofline: Roofline) -> list[str]:
    """The header printed above the tables."""
    layer = info["numba_threading_layer"] or "not started"
    lines = [
        f"machine: {info['cpu']}, {info['cores']} cores ({info['usable_cores']} usable), "
        f"{info['platform']}",
        f"threads: {info['threads']} (fastadam, "
        + ("roofline kernel " if roofline else "")
        + "and torch alike)",
        f"versions: fastadam {info['fastadam']}, python {info['python']}, numpy {info['numpy']}, "
        f"numba {info['numba']} (threading layer {layer}), "
        f"torch {info['torch'] or 'not installed'}",
        f"kernel variants: C {info['c_isa'] or 'n/a'}"
        + (" (FASTADAM_ISA)" if os.environ.get("FASTADAM_ISA") else "")
        + f", Numba target {info['numba_target']}; auto: {info['auto']}",
    ]
    busy = info.get("others_busy_cores")
    if busy is not None:
        lines.append(f"other processes: {busy:.2f} cores busy on average during the run")
    for name, why in info["backends_unavailable"].items():
        lines.append(f"unavailable: {name}: {why}")
    for dt, per_size in roofline.items():
        at = ", ".join(f"{gbps:.1f} GB/s at n={format_n(n)}" for n, gbps in per_size.items())
        lines.append(
            f"roofline {dt}: {at} ({bytes_per_element(dt)} B/element moved by "
            + ("p+=g; m^=1; v^=1 on bf16 bits" if dt == BF16_STATES else "p+=g; m+=g; v+=g*g")
            + " in Numba, best of runs)"
        )
    # What the memory gives the bf16-state target on this machine: the two roofline
    # kernels' own time ratio, 20 vs 28 B/element at their bandwidths.
    both = sorted(roofline.get("float32", {}).keys() & roofline.get(BF16_STATES, {}).keys())
    for n in both:
        ratio = (bytes_per_element(BF16_STATES) / roofline[BF16_STATES][n]) / (
            bytes_per_element("float32") / roofline["float32"][n]
        )
        lines.append(
            f"roofline time ratio bf16/float32: {ratio:.2f} at n={format_n(n)} "
            f"(the roofline kernels' own; compare the bf16-state target, "
            f"<= {TARGET_BF16_TIME_RATIO:g})"
        )
    return lines


# -- records, tables, targets -------------------------------------------------------


def _record(
    kind: str,
    backend: str,
    n: int,
    dtype: str,
    median: float,
    repeats: int,
    threads: int,
    roofline_gbps: float | None,
) -> dict[str, Any]:
    gbps = bytes_per_element(dtype) * n / median / 1e9
    return {
        "kind": kind,
        "backend": backend,
        "n": n,
        "dtype": dtype,
        "median_s": median,
        "repeats": repeats,
        "gbps": gbps,
        "roofline_gbps": roofline_gbps,
        "roofline_fraction": None if roofline_gbps is None else gbps / roofline_gbps,
        "speedup_vs_numpy": None,
        "threads": threads,
    }


def add_speedups(records: list[dict[str, Any]]) -> None:
    """Fill ``speedup_vs_numpy`` and ``speedup_vs_torch_fused`` from records of the same size."""
    by_key = {(r["kind"], r["backend"], r["n"], r["dtype"]): r for r in records}
    for r in records:
        key = (r["kind"], r["n"], r["dtype"])
        ref = by_key.get((key[0], "numpy", *key[1:]))
        if ref is not None:
            r["speedup_vs_numpy"] = ref["median_s"] / r["median_s"]
        tf = by_key.get((key[0], "torch-fused", *key[1:]))
        if tf is not None:
            r["speedup_vs_torch_fused"] = tf["median_s"] / r["median_s"]


def sweep_table(records: list[dict[str, Any]], markdown: bool) -> str:
    """The main table: one row per (dtype, size, backend)."""
    with_torch = any("speedup_vs_torch_fused" in r for r in records)
    headers = ["backend", "dtype", "n", "median/step", "GB/s", "roofline", "vs numpy"]
    if with_torch:
        headers.append("vs torch-fused")
    rows = []
    for r in records:
        frac = r["roofline_fraction"]
        row = [
            r["backend"],
            r["dtype"],
            format_n(r["n"]),
            format_seconds(r["median_s"]),
            f"{r['gbps']:.1f}",
            "-" if frac is None else f"{frac * 100:.0f}%",
            _fmt_ratio(r["speedup_vs_numpy"]),
        ]
        if with_torch:
            row.append(_fmt_ratio(r.get("speedup_vs_torch_fused")))
        rows.append(row)
    right = [False, False, True, True, True, True, True, True][: len(headers)]
    return render_table(headers, rows, markdown, right)


def _ratio_verdict(r: dict[str, Any], goal: float) -> list[str]:
    """The target and verdict cells of a row measured as a ratio to np.add."""
    if r["backend"] not in PER_CALL_TARGET_BACKENDS:
        return ["-", "-"]
    return [f"<= {goal:g}×", "met" if r["ratio_vs_np_add"] <= goal else "NOT MET"]


def per_call_table(records: list[dict[str, Any]], markdown: bool) -> str:
    """Per-call cost of a small step in µs and as a multiple of np.add, with the target."""
    add_us = records[0]["np_add_median_s"] * 1e6
    rows = [[NP_ADD, f"{add_us:.2f}", "1.00×", "-", "-"]]
    for r in records:
        rows.append(
            [r["backend"], f"{r['median_s'] * 1e6:.2f}", _fmt_ratio(r["ratio_vs_np_add"])]
            + _ratio_verdict(r, TARGET_PER_CALL_RATIO)
        )
    return render_table(
        ["backend", "median µs/call", "× np.add", "target", ""],
        rows,
        markdown,
        [False, True, True, True, False],
    )


def per_tensor_table(records: list[dict[str, Any]], markdown: bool) -> str:
    """A multi-tensor step's cost per tensor beyond the kernel, in µs and × np.add."""
    rows = [
        [
            r["backend"],
            str(r["tensors"]),
            f"{r['median_s'] * 1e6:.1f}",
            f"{r['single_median_s'] * 1e6:.1f}",
            f"{r['per_tensor_s'] * 1e6:.3f}",
            _fmt_ratio(r["ratio_vs_np_add"]),
        ]
        + _ratio_verdict(r, TARGET_PER_TENSOR_RATIO)
        for r in records
    ]
    headers = ["backend", "tensors", "multi µs/step", "single µs/step", "µs/tensor beyond"]
    headers += ["× np.add", "target", ""]
    return render_table(headers, rows, markdown, [False] + [True] * 6 + [False])


def evaluate_targets(
    records: list[dict[str, Any]],
    per_call: list[dict[str, Any]],
    per_tensor: Sequence[dict[str, Any]] = (),
) -> list[dict[str, Any]]:
    """Each speed target that the measured data can decide: what, measured, goal, met."""
    out: list[dict[str, Any]] = []

    def check(r: dict[str, Any], what: str, value: float | None, goal: float, lower: bool) -> None:
        if value is None:
            return
        out.append(
            {
                "backend": r["backend"],
                "n": r["n"],
                "target": what,
                "value": value,
                "goal": goal,
                "lower_is_better": lower,
                "met": value <= goal if lower else value >= goal,
            }
        )

    for r in records:
        if r["backend"] not in ("c", "numba") or r["dtype"] != "float32":
            continue
        if r["n"] >= TARGET_LARGE_N:
            check(
                r, "fraction of roofline", r["roofline_fraction"], TARGET_ROOFLINE_FRACTION, False
            )
            check(r, "speed-up vs numpy", r["speedup_vs_numpy"], TARGET_SPEEDUP_VS_NUMPY, False)
            check(
                r,
                "speed-up vs torch fused",
                r.get("speedup_vs_torch_fused"),
                TARGET_SPEEDUP_VS_TORCH_LARGE,
                False,
            )
        elif TARGET_IN_CACHE[0] <= r["n"] <= TARGET_IN_CACHE[1]:
            check(
                r,
                "speed-up vs torch fused (in cache)",
                r.get("speedup_vs_torch_fused"),
                TARGET_SPEEDUP_VS_TORCH_IN_CACHE,
                False,
            )
    # bf16-state against float32-state steps, at the memory-bound sizes
    by_key = {(r["backend"], r["n"], r["dtype"]): r for r in records}
    for r in records:
        f32 = by_key.get((r["backend"], r["n"], "float32"))
        if r["dtype"] == BF16_STATES and r["backend"] in ("c", "numba") and f32:
            if r["n"] >= TARGET_LARGE_N:
                ratio = r["median_s"] / f32["median_s"]
                check(
                    r, "bf16-state time / float32-state time", ratio, TARGET_BF16_TIME_RATIO, True
                )
    for r in per_call:
        if r["backend"] in PER_CALL_TARGET_BACKENDS:
            what = f"{format_n(r['n'])}-element call / {NP_ADD}"
            check(r, what, r["ratio_vs_np_add"], TARGET_PER_CALL_RATIO, True)
    for r in per_tensor:
        if r["backend"] in PER_CALL_TARGET_BACKENDS:
            what = f"per-tensor cost beyond the kernel ({r['tensors']} tensors) / {NP_ADD}"
            check(r, what, r["ratio_vs_np_add"], TARGET_PER_TENSOR_RATIO, True)
    return out


def targets_table(targets: list[dict[str, Any]], markdown: bool) -> str:
    rows = [
        [
            t["backend"],
            format_n(t["n"]),
            t["target"],
            f"{t['value']:.2f}",
            ("<= " if t["lower_is_better"] else ">= ") + f"{t['goal']:g}",
            "met" if t["met"] else "NOT MET",
        ]
        for t in targets
    ]
    return render_table(
        ["backend", "n", "target", "measured", "goal", ""],
        rows,
        markdown,
        [False, True, False, True, True, False],
    )


def write_plot(records: list[dict[str, Any]], roofline: Roofline, path: str, title: str) -> None:
    """GB/s against size (log2 x axis), one line per backend and dtype, rooflines dashed."""
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.5), dpi=100)
    keys = sorted(
        {(r["dtype"], r["backend"]) for r in records},
        key=lambda k: (k[0], ALL_BACKENDS.index(k[1])),
    )
    styles = {"float32": "-", "float64": ":"}
    palette = ("tab:gray", "tab:blue", "tab:red", "tab:green", "tab:olive")
    colors = dict(zip(ALL_BACKENDS, palette, strict=True))
    multi = len({k[0] for k in keys}) > 1
    for dt, backend in keys:
        rs = sorted(
            (r for r in records if r["dtype"] == dt and r["backend"] == backend),
            key=lambda r: r["n"],
        )
        label = f"{backend} {dt}" if multi else backend
        ax.plot(
            [r["n"] for r in rs],
            [r["gbps"] for r in rs],
            styles[dt],
            marker="o",
            color=colors[backend],
            label=label,
        )
    for dt, per_size in roofline.items():
        if len(per_size) == 1:  # measured at the largest size: a ceiling for all sizes
            ((n, gbps),) = per_size.items()
            ax.axhline(gbps, color="black", linestyle="--", linewidth=1)
            ax.annotate(
                f"roofline {dt}: {gbps:.0f} GB/s (at {format_n(n)})",
                (0.01, gbps),
                xycoords=("axes fraction", "data"),
                xytext=(0, 3),
                textcoords="offset points",
                va="bottom",
                fontsize=8,
            )
        else:
            ns = sorted(per_size)
            ax.plot(
                ns,
                [per_size[n] for n in ns],
                "--",
                color="black",
                linewidth=1,
                label=f"roofline {dt}",
            )
    ax.set_xscale("log", base=2)
    ax.set_xlabel("elements per array")
    ax.set_ylabel("effective GB/s (7 × itemsize bytes/element)")
    ax.set_title(title, fontsize=9)
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


# -- the command -----------------------------------------------------------------


def _resolve_backends(requested: list[str] | None) -> tuple[list[str], list[str]]:
    """(backends to run, notes about default ones skipped); raise if a named one cannot run."""
    has_torch = importlib.util.find_spec("torch") is not None
    available = set(fastadam.available_backends())
    reasons = fastadam.unavailable_reasons()
    if requested is None:
        run, notes = [], []
        for b in ALL_BACKENDS:
            if b in TORCH_BACKENDS and not has_torch:
                notes.append(
                    f"skipping {b}: torch is not installed (pip install 'fastadam[torch]')"
                )
            elif b in FASTADAM_BACKENDS and b not in available:
                notes.append(f"skipping {b}: {reasons.get(b, 'unavailable')}")
            else:
                run.append(b)
        return run, notes
    for b in requested:
        if b in TORCH_BACKENDS and not has_torch:
            raise BenchError(f"backend {b!r} needs torch, which is not installed")
        if b in FASTADAM_BACKENDS and b not in available:
            why = reasons.get(b, "unknown reason")
            raise BenchError(f"backend {b!r} is unavailable here: {why}")
    return list(requested), []


def finish_run(info: dict[str, Any], json_path: str | None, records: list[dict[str, Any]]) -> None:
    """The end of every mode: warn if the machine was busy, write the JSON records."""
    busy = info.get("others_busy_cores")
    if busy is not None and busy > 0.1:
        print(
            f"warning: other processes kept {busy:.2f} of {info['usable_cores']} cores busy "
            "during the run: the numbers above are not those of a quiet machine",
            file=sys.stderr,
        )
    if json_path is not None:
        with open(json_path, "w") as f:
            json.dump(records, f, indent=1)
            f.write("\n")


def main(argv: Sequence[str] | None = None, *, prog: str | None = None) -> int:
    """Run the benchmark; return the exit status (0 ok, 2 usage error).

    ``argv`` defaults to ``sys.argv[1:]``; ``prog`` is the name in usage lines.
    """
    parser = build_parser(prog)
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help (0) or a bad argument (2, message already printed)
        return int(exc.code or 0)
    try:
        return _run(args)
    except BenchError as exc:
        print(f"{parser.prog}: error: {exc}", file=sys.stderr)
        return 2


def _run(args: argparse.Namespace) -> int:
    if args.model is not None:
        from fastadam import bench_model

        return bench_model.run(args)
    if args.plot is not None:
        # Check before measuring anything: a minute of work then a crash is rude.
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise BenchError(_PLOT_HINT) from None
    backends, notes = _resolve_backends(args.backends)
    for note in notes:
        print(note, file=sys.stderr)
    if not backends:
        raise BenchError("no backend to measure")
    dtypes: list[str] = args.dtype or ["float32"]
    # torch has no float32-param/bfloat16-state Adam to compare with
    backends_for = {
        dt: [b for b in backends if not (dt == BF16_STATES and b in TORCH_BACKENDS)]
        for dt in dtypes
    }
    sizes: list[int] = args.sizes or list(DEFAULT_SIZES)

    uses_torch = any(b in TORCH_BACKENDS for b in backends)
    if uses_torch:
        import torch
    if args.threads is not None:
        fastadam.set_num_threads(args.threads)
    threads = fastadam.get_num_threads()
    if uses_torch:
        # Same thread count for torch, or the comparison says nothing.
        torch.set_num_threads(threads)

    from tqdm import tqdm

    cpu_before = _cpu_seconds()
    wall_before = time.perf_counter()
    per_call = not args.no_per_call
    roof_sizes = sizes if args.roofline_per_size else [max(sizes)]
    total = sum(len(roof_sizes) + len(sizes) * len(backends_for[dt]) for dt in dtypes)
    total += 1 if per_call else 0
    bar = tqdm(
        total=total,
        file=sys.stderr,
        unit="run",
        disable=True if args.no_progress else None,
        leave=False,
        dynamic_ncols=True,
    )
    timing = {"min_time": args.min_time, "repeat": args.repeat}
    roofline: Roofline = {}
    records: list[dict[str, Any]] = []
    per_call_records: list[dict[str, Any]] = []
    per_tensor_records: list[dict[str, Any]] = []
    try:
        for dt in dtypes:
            roofline[dt] = {}
            for n in reversed(roof_sizes):  # largest first: the one that always counts
                bar.set_description(f"roofline {dt} {format_n(n)}")
                roofline[dt][n] = measure_roofline(n, dt, threads, **timing)
                bar.update()
            roofline[dt] = dict(sorted(roofline[dt].items()))
        for n in sizes:
            states = {dt: make_state(n, dt) for dt in dtypes}
            for b in backends:
                dts = [dt for dt in dtypes if b in backends_for[dt]]
                bar.set_description(f"{b} {'/'.join(dts)} {format_n(n)}")
                steps = {dt: make_step(b, states[dt]) for dt in dts}
                for dt, (median, reps) in time_interleaved(steps, **timing).items():
                    records.append(
                        _record(
                            "sweep", b, n, dt, median, reps, threads, roofline_for(roofline, dt, n)
                        )
                    )
                bar.update(len(dts))
            del states, steps
        # grouped by dtype, then size, then backend, as the tables show them
        records.sort(key=lambda r: (dtypes.index(r["dtype"]), r["n"], backends.index(r["backend"])))
        if per_call:
            bar.set_description("per call")
            per_call_records, per_tensor_records = measure_per_call(
                backends, threads, roofline_for(roofline, "float32", max(sizes)), **timing
            )
            bar.update()
    finally:
        bar.close()
    wall = time.perf_counter() - wall_before
    add_speedups(records)
    add_speedups(per_call_records)
    add_speedups(per_tensor_records)

    info = machine_info(threads)
    cpu_after = _cpu_seconds()
    if cpu_before is not None and cpu_after is not None:
        others = max(0.0, (cpu_after[0] - cpu_before[0]) - (cpu_after[1] - cpu_before[1]))
        info["others_busy_cores"] = others / wall
    md = args.markdown
    out = []
    for line in header_lines(info, roofline):
        out.append(f"- {line}" if md else line)
    how = "median of timed steps"
    if len(dtypes) > 1:
        how += f", each backend's dtypes timed in {INTERLEAVE_ROUNDS} alternating rounds"
    moved = ", ".join(f"{bytes_per_element(dt)} B/element {dt}" for dt in dtypes)
    out += ["", f"Adam step ({how}; GB/s counts the bytes a step moves: {moved}):", ""]
    out.append(sweep_table(records, md))
    if per_call_records:
        out += [
            "",
            f"Per-call cost, {PER_CALL_N}-element float32 step (validation included), "
            f"timed in alternating rounds beside {NP_ADD}(p, g, out=p) on {PER_CALL_N} "
            "float32 elements:",
            "",
            per_call_table(per_call_records, md),
        ]
    if per_tensor_records:
        out += [
            "",
            f"Per-tensor cost of a multi-tensor step: MultiTensorPlan over {PER_TENSOR_K} "
            f"tensors of {PER_CALL_N} elements (multi) against one adam_step over "
            f"{format_n(PER_TENSOR_K * PER_CALL_N)} elements (single); µs/tensor beyond = "
            f"(multi - single) / {PER_TENSOR_K}:",
            "",
            per_tensor_table(per_tensor_records, md),
        ]
    targets = evaluate_targets(records, per_call_records, per_tensor_records)
    if targets:
        out += ["", "Speed targets:", "", targets_table(targets, md)]
    print("\n".join(out))

    # The roofline must bound every backend at the size it was measured at; if
    # one beats it, the machine was busy during the roofline run (or the kernel
    # is not at the memory limit) and every fraction above is suspect.
    for r in records:
        gbps = roofline[r["dtype"]].get(r["n"])
        if gbps is not None and r["gbps"] > 1.05 * gbps:
            print(
                f"warning: {r['backend']} ({r['gbps']:.1f} GB/s) beat the {r['dtype']} roofline "
                f"({gbps:.1f} GB/s) at n={format_n(r['n'])}: was the machine busy? "
                "rerun to confirm",
                file=sys.stderr,
            )

    finish_run(info, args.json, records + per_call_records + per_tensor_records)
    if args.plot is not None:
        title = f"fastadam Adam step, {info['cpu']}, {threads} threads"
        write_plot(records, roofline, args.plot, title)
    return 0


if __name__ == "__main__":
    sys.exit(main())
