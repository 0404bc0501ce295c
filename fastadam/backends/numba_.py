"""Numba backend: one ``prange`` loop over the flattened buffers.

Design choices, each deliberate:

* **float32 stays float32.** Numba types Python floats as float64, so every
  constant is cast once with ``param.dtype.type(...)`` before the loop; a
  float64 constant would silently promote the whole update.
* **No fastmath, numpy error model.** fastmath would let LLVM contract
  ``a*b+c`` into FMAs and reorder, and this kernel must match the NumPy
  reference bit for bit. ``error_model="numpy"`` drops the per-division
  ZeroDivisionError check, which otherwise stops LLVM from vectorizing.
* **Threading layer: TBB, else ``workqueue``; launches serialised.** The
  layers differ in what they survive (measured on this project's 2-core VM):
  ``workqueue`` survives ``fork()`` but aborts the process when two Python
  threads launch at once, and wakes its workers slowly (~150 µs a launch);
  ``omp`` (GNU libgomp) launches in ~20 µs but Numba terminates any forked
  child of a process that used it; TBB launches in ~20 µs, is thread-safe and
  fork-safe. The ``tbb`` wheel installs its library where the dynamic loader
  does not look, so it is preloaded from the wheel's own file list. Parallel
  launches are serialised by ``LAUNCH_LOCK`` whatever the layer (the step is
  memory-bound, so two at once would only share the bus); the lock is
  re-created in a forked child in case another thread held it at the fork.
  ``NUMBA_THREADING_LAYER`` set by the user is respected.
* **Small buffers run serially** (no lock, no thread wake-up): below
  ``config.PARALLEL_MIN_ELEMENTS`` the launch costs more than the work.
* **A multi-tensor step is one launch** (:func:`step_multi`): one share per
  thread of the concatenated element range of a TensorTable, each share's
  split points moved forward to a _BLOCK boundary of the tensor they fall in;
  a share walks the tensors it meets. Its arrays are views made from the
  table's addresses without a meminfo (_view), so nothing is reference-counted
  or allocated per tensor. The loop bodies (_piece; _bf16_blocks and
  _bf16_tail) are the single-array step's, written once.

Where each job lives: the threading layer and fork in ``_numba_threading``, the
LLVM intrinsics in ``_numba_intrinsics``, the loops and their factories in
``_numba_loops``; this module is the backend's API (step, step_multi,
unscale_and_check, the thread count) and launches the loops.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NoReturn

import numba
import numpy as np

from .. import config
from .._scalars import STATE_SAME_DTYPE, AdamScalars
from .._table import KIND_BF16, KIND_F32, KIND_F64, TensorTable
from . import _numba_threading
from ._numba_loops import (
    _bf16_flags,
    _bf16_loop,
    _bf16_multi,
    _multi_loop,
    _parallel,
    _serial,
    _unscale_parallel,
    _unscale_serial,
    check_bias_correction2,
)

NAME = "numba"

_num_threads = 1


_EMPTY_U16 = np.empty(0, np.uint16)


def step(
    param: np.ndarray,
    grad: np.ndarray,
    exp_avg: np.ndarray,
    exp_avg_sq: np.ndarray,
    max_exp_avg_sq: np.ndarray | None,
    sc: AdamScalars,
) -> None:
    """Apply one Adam/AdamW update in place (arrays validated by the caller)."""
    if param.ndim != 1:  # one compiled signature: every shape runs as a flat view
        param, grad = param.reshape(-1), grad.reshape(-1)
        exp_avg, exp_avg_sq = exp_avg.reshape(-1), exp_avg_sq.reshape(-1)
        if max_exp_avg_sq is not None:
            max_exp_avg_sq = max_exp_avg_sq.reshape(-1)
    n = param.size
    if sc.state_rounding == STATE_SAME_DTYPE:
        check_bias_correction2(sc.bias_correction2_sqrt)
        if max_exp_avg_sq is None:
            max_exp_avg_sq = exp_avg_sq  # never read or written unless amsgrad
        _launch(_serial, _parallel, (param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq, *sc), n)
        return
    # bfloat16 states: pass their bits; the loop derives each 2**32-element
    # block's key from rounding_key (the bits depend on the global index only).
    vmax = _EMPTY_U16 if max_exp_avg_sq is None else max_exp_avg_sq.view(np.uint16)
    arrays = (param, grad, exp_avg.view(np.uint16), exp_avg_sq.view(np.uint16), vmax)
    flags = _bf16_flags(sc)
    _launch(_bf16_loop(False, *flags), _bf16_loop(True, *flags), (*arrays, *sc), n)


# -- multi-tensor step -------------------------------------------------------------

_LIKE = {KIND_F32: np.empty(0, np.float32), KIND_F64: np.empty(0, np.float64)}
_NO_KEYS = np.empty(0, np.uint32)


class _TableCache:
    """What step_multi keeps on ``table.cache["numba"]``: what never changes (the
    table's arrays and total, the all-zeros index), and ``step``, what changes
    only with the scalars, at a new step count: their float64 constants and
    rounding keys, and the compiled loops for their flags. ``step`` is one
    tuple, replaced whole, so a concurrent step reads a consistent one.
    """

    __slots__ = ("bf16", "head", "like", "step", "total", "zeros")

    def __init__(self, table: TensorTable) -> None:
        self.total = table.total
        self.zeros = np.zeros(table.count, np.int32)
        self.head = (table.pointers, table.sizes, table.offsets)
        self.bf16 = table.kind == KIND_BF16
        self.like = None if self.bf16 else _LIKE[table.kind]
        self.step: tuple = ((),)

    def for_scalars(self, scalars: tuple[AdamScalars, ...]) -> tuple:
        """``(scalars, constants (n, 9), rounding keys (n,), serial loop, parallel
        loop, flag arguments)`` for these scalars (n: one per distinct step)."""
        entry = self.step
        if entry[0] != scalars:
            sc = scalars[0]  # the flags are common to all
            consts = np.array([s[:9] for s in scalars], np.float64).reshape(-1, 9)
            keys = np.array([s.rounding_key for s in scalars], np.uint32)
            if self.bf16:
                flags = _bf16_flags(sc)
                loops = (_bf16_multi(False, *flags), _bf16_multi(True, *flags))
                flag_args: tuple = ()
            else:
                for s in scalars:
                    check_bias_correction2(s.bias_correction2_sqrt)
                # l2 decided on the float64 value, as the single-array loop does
                flags = (sc.maximize, sc.weight_decay != 0, sc.amsgrad)
                loops = (_multi_loop(False, *flags), _multi_loop(True, *flags))
                flag_args = (sc.unscale, self.like)
            entry = self.step = (scalars, consts, keys, *loops, flag_args)
        return entry


def step_multi(
    table: TensorTable,
    scalars: tuple[AdamScalars, ...],
    index: np.ndarray | None,
    keys: np.ndarray | None,
) -> None:
    """Every tensor of ``table`` updated as :func:`step` would, in one launch
    (see :mod:`fastadam._table` for the arguments).

    One share per thread of the concatenated element range (_split_point), so
    the work splits evenly however the sizes vary; the flags are those of
    ``scalars[0]`` (common to all). The Python side costs the same whatever
    the number of tensors.
    """
    cache = table.cache.get(NAME)
    if cache is None:
        cache = table.cache[NAME] = _TableCache(table)
    if cache.total == 0:
        return
    _, consts, scalar_keys, serial, parallel, flag_args = cache.for_scalars(scalars)
    if index is None:
        index = cache.zeros
    if cache.bf16:
        use_keys = keys is not None
        args = (*cache.head, consts, index, keys if use_keys else _NO_KEYS, scalar_keys,
                use_keys, *flag_args)  # fmt: skip
    else:
        args = (*cache.head, consts, index, *flag_args)
    _launch(serial, parallel, args, cache.total)


def _launch(serial, parallel, args, n: int) -> None:
    """Run a loop over ``n`` elements serially or on our threads; the thread count
    is its last argument (it splits its work into that many shares, see _share)."""
    if n < config.PARALLEL_MIN_ELEMENTS or _num_threads == 1:
        serial(*args, 1)
        return
    with _numba_threading.LAUNCH_LOCK:
        # Numba's thread count is thread-local: apply ours in the launching thread.
        threads = min(_num_threads, numba.config.NUMBA_NUM_THREADS)
        numba.set_num_threads(threads)
        parallel(*args, threads)


# -- adam_step's one-call path (fastadam._pycall) --------------------------------

DECLINED = 1  # what a step_fast that ran nothing returns (csrc/fastadam_pycall.c)


def _bind_step_fast() -> Callable[..., int] | None:
    """fastadam._pycall's ``step`` bound to the serial loops compiled as C
    functions (_numba_cfunc), for arrays below PARALLEL_MIN_ELEMENTS; None
    where the extension was not built."""
    try:
        from .. import _pycall  # type: ignore[attr-defined]
    except ImportError:
        return None
    from . import _numba_cfunc

    return _pycall.bind(
        np.ndarray, _numba_cfunc.step_f32.address, _numba_cfunc.step_f64.address,
        config.PARALLEL_MIN_ELEMENTS - 1,
    )  # fmt: skip


def __getattr__(name: str) -> Any:
    # step_fast compiles two cfuncs: only when adam_step first asks for it (PEP 562).
    if name == "step_fast":
        fn = globals()["step_fast"] = _bind_step_fast()
        return fn
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _raise_code(rc: int) -> NoReturn:
    """The loops compiled for step_fast return 0 or decline: any other code is a bug."""
    raise RuntimeError(f"fastadam Numba kernel returned the unexpected code {rc}")


def unscale_and_check(grad: np.ndarray, scale: float) -> bool:
    """Divide ``grad`` by ``scale`` in place in one pass; True if any result is non-finite."""
    g = grad.reshape(-1)
    if g.size < config.PARALLEL_MIN_ELEMENTS or _num_threads == 1:
        return _unscale_serial(g, scale) != 0
    with _numba_threading.LAUNCH_LOCK:
        numba.set_num_threads(min(_num_threads, numba.config.NUMBA_NUM_THREADS))
        return _unscale_parallel(g, scale) != 0


def set_num_threads(n: int) -> None:
    global _num_threads
    _num_threads = n


def get_num_threads() -> int:
    return min(_num_threads, numba.config.NUMBA_NUM_THREADS)
