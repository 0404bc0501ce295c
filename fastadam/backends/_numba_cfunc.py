"""The Numba backend's serial loops as C functions, for adam_step's one-call path.

A 1,024-element ``adam_step(backend="numba")`` spent most of its time before
the loop: the array checks in Python, then Numba's dispatcher typing twenty
arguments. fastadam._pycall (csrc/fastadam_pycall.c) already does the checks
in one C call for the C backend; given the address of a function with
``fa_adam_f32``'s signature it calls that instead. Here the serial loop is
compiled to that ABI with :func:`numba.cfunc`: the same ``_piece`` the
single-array and multi-tensor loops run, so the results are bit-identical.

Only arrays below ``config.PARALLEL_MIN_ELEMENTS`` take this path (the size
limit given to ``bind``; ``bind_q8`` takes no limit, so the 8-bit function
answers :data:`CHECKED_LARGE` for larger ones, which the caller then runs
without checking them again): larger ones run on the backend's threads,
launched from Python under its lock, where the call's cost is small beside
the work.

The 8-bit one (``step_q8``, ``fa_adam_f32_q8``'s signature) runs the blocks
of :mod:`._numba_q8` in two compiled copies rather than one per combination of
flags: one with ``unscale`` and the division by ``bias_correction2_sqrt``
fixed off (every step of fastadam's own optimizers without loss scaling), one
with every flag a run-time value. With those two as run-time values the
blocks cost 1.5x as much (65,280 elements, one thread, Intel Xeon, session
16): LLVM kept a division per element for them.

Compiled (or loaded from Numba's cache) on the first adam_step that asks for
the Numba backend's one-call path, never at import.
"""

from __future__ import annotations

import numpy as np
from numba import carray, cfunc, types

from .. import config
from ._numba_intrinsics import _borrow
from ._numba_loops import BC2_RANGE, _constants, _piece
from ._numba_q8 import BLOCK, BUFFER, CHECKED_LARGE, _blocks
from .numba_ import DECLINED

# fa_adam_scalars (csrc/fastadam.h): 9 doubles, then the ints unscale,
# maximize, amsgrad, state_rounding and the uint32 rounding_key, read as int32
# words 18-22 of the struct.
_N_DOUBLES = 9
_UNSCALE, _MAXIMIZE, _AMSGRAD = 18, 19, 20
_N_WORDS = 23


def _make(float_type: types.Float, np_type: type):
    ptr = types.CPointer(float_type)
    signature = types.int32(ptr, ptr, ptr, ptr, ptr, types.int64, types.voidptr)

    @cfunc(signature, cache=True, nopython=True, error_model="numpy")
    def step(param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq, n, scalars):
        d = carray(scalars, _N_DOUBLES, dtype=np.float64)
        if not BC2_RANGE[0] <= d[1] <= BC2_RANGE[1]:
            return DECLINED  # adam_step's checked path then refuses it (numba_.step)
        w = carray(scalars, _N_WORDS, dtype=np.int32)
        unscale, maximize, amsgrad = w[_UNSCALE] != 0, w[_MAXIMIZE] != 0, w[_AMSGRAD] != 0
        l2 = d[6] != 0  # decided on the float64 value, as the reference (and torch) do
        consts = _constants(np_type, d[0], d[1], d[2], d[3], d[4], d[5], d[6], d[7], d[8])
        p = carray(param, n)
        v = carray(exp_avg_sq, n)
        # without amsgrad max_exp_avg_sq may be NULL; it is then never read
        vmax = carray(max_exp_avg_sq, n) if amsgrad else v
        _piece(_borrow(p), _borrow(carray(grad, n)), _borrow(carray(exp_avg, n)), _borrow(v),
               _borrow(vmax), 0, n, consts, unscale, maximize, amsgrad, l2)  # fmt: skip
        return 0

    return step


step_f32 = _make(types.float32, np.float32)
step_f64 = _make(types.float64, np.float64)


def _make_q8(limit: int):
    f32, u8 = types.CPointer(types.float32), types.CPointer(types.uint8)
    signature = types.int32(f32, f32, u8, u8, f32, f32, types.int64, types.voidptr)

    @cfunc(signature, cache=True, nopython=True, error_model="numpy")
    def step_q8(param, grad, exp_avg, exp_avg_sq, exp_avg_absmax, exp_avg_sq_absmax, n,
                scalars):  # fmt: skip
        if n >= limit:
            # fastadam._pycall called this function on arrays that passed every
            # rule: the caller skips its own checks and launches the parallel loop
            return CHECKED_LARGE
        d = carray(scalars, _N_DOUBLES, dtype=np.float64)
        w = carray(scalars, _N_WORDS, dtype=np.int32)
        f = np.float32
        c = (f(d[0]), f(d[1]), f(d[2]), f(d[3]), f(d[4]), f(d[5]), f(d[6]), f(d[7]), f(d[8]))
        nb = (n + (BLOCK - 1)) // BLOCK
        buf = _borrow(np.empty(BUFFER, np.float32))  # the blocks' scratch (_numba_q8)
        p, g = _borrow(carray(param, n)), _borrow(carray(grad, n))
        cm, cv = _borrow(carray(exp_avg, n)), _borrow(carray(exp_avg_sq, n))
        am, av = _borrow(carray(exp_avg_absmax, nb)), _borrow(carray(exp_avg_sq_absmax, nb))
        unscale, maximize, l2, div = w[_UNSCALE] != 0, w[_MAXIMIZE] != 0, d[6] != 0, d[1] != 1.0
        if unscale or div:
            _blocks(p, g, cm, cv, am, av, 0, nb, n, c, unscale, maximize, l2, div, buf)
        else:
            _blocks(p, g, cm, cv, am, av, 0, nb, n, c, False, maximize, l2, False, buf)
        return 0

    return step_q8


step_q8 = _make_q8(config.PARALLEL_MIN_ELEMENTS)
