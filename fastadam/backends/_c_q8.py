"""The C backend's 8-bit block-wise state step (issue 18): ``fa_adam_f32_q8`` and
``fa_adam_multi_f32_q8`` of the library :mod:`fastadam.backends.c` loads.

Kept beside ``c.py`` rather than in it: the declarations are added to its FFI
(cffi resolves a function of an opened library at first use, so a later
``cdef`` is fine), and the format itself is :mod:`fastadam._q8`'s.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .._scalars import AdamScalars
from .c import DECLINED as DECLINED  # the fast path's answer, read by fastadam._q8
from .c import _from_buffer, _new, _raise_code, _struct_for, ffi, lib

NAME = "c"

ffi.cdef("""
int fa_adam_f32_q8(void *param, void *grad, void *exp_avg, void *exp_avg_sq,
                   void *exp_avg_absmax, void *exp_avg_sq_absmax, int64_t n,
                   const fa_adam_scalars *sc);
int fa_adam_multi_f32_q8(int64_t count, void *const *param, void *const *grad,
                         void *const *exp_avg, void *const *exp_avg_sq,
                         void *const *exp_avg_absmax, void *const *exp_avg_sq_absmax,
                         const int64_t *n, const fa_adam_scalars *scalars, int64_t n_scalars,
                         const void *scalar_index);
""")

_ROWS = 6


def step_q8(
    param: np.ndarray,
    grad: np.ndarray,
    exp_avg: np.ndarray,
    exp_avg_sq: np.ndarray,
    exp_avg_absmax: np.ndarray,
    exp_avg_sq_absmax: np.ndarray,
    sc: AdamScalars,
) -> None:
    """One 8-bit step in place (arrays validated by the caller, see fastadam._q8)."""
    n = param.size
    if n == 0:
        return
    rc = lib.fa_adam_f32_q8(
        _from_buffer(param, require_writable=True),
        _from_buffer(grad, require_writable=True),
        _from_buffer(exp_avg, require_writable=True),
        _from_buffer(exp_avg_sq, require_writable=True),
        _from_buffer(exp_avg_absmax, require_writable=True),
        _from_buffer(exp_avg_sq_absmax, require_writable=True),
        n,
        _struct_for(sc),
    )
    if rc:
        _raise_code(rc)


def step_multi_q8(table: Any, scalars: tuple[AdamScalars, ...], index: np.ndarray | None) -> None:
    """Every tensor of a q8 table (pointers uintp (6, count)) in one library call."""
    count = table.count
    if count == 0:
        return
    cache = table.cache.get("c")
    if cache is None or cache[0] is not table.pointers:
        pointers = table.pointers
        if pointers.dtype != np.uintp or pointers.shape != (_ROWS, count):
            raise ValueError(f"C backend: q8 table.pointers must be uintp (6, {count})")
        base = _from_buffer("void *[]", pointers)
        rows = tuple(base + r * count for r in range(_ROWS))
        cache = table.cache["c"] = (pointers, rows, _from_buffer("int64_t[]", table.sizes))
    _, rows, n = cache
    buf = _new("fa_adam_scalars[]", len(scalars))
    for i, sc in enumerate(scalars):
        buf[i] = sc
    if index is None:
        index_ptr = ffi.NULL
    else:
        if index.dtype != np.int32 or index.shape != (count,):
            raise ValueError(f"index must be int32 ({count},), got {index.dtype} {index.shape}")
        index_ptr = _from_buffer(index)
    rc = lib.fa_adam_multi_f32_q8(
        count, rows[0], rows[1], rows[2], rows[3], rows[4], rows[5], n, buf, len(scalars),
        index_ptr,
    )  # fmt: skip
    if rc:
        _raise_code(rc)


def _pycall_step_q8() -> Any:
    """fastadam._pycall's ``step_q8``, pointed at ``fa_adam_f32_q8``, or None where
    the optional extension was not built.

    ``step_q8(param, grad, exp_avg, exp_avg_sq, exp_avg_absmax, exp_avg_sq_absmax,
    scalars)`` runs the kernel on arrays that pass every rule of
    :func:`fastadam._q8.validate_q8`, with folded scalars (:func:`fastadam._q8.fold`)
    and no amsgrad, and returns 0; or touches nothing and returns
    :data:`DECLINED` (the caller takes its checked path); or returns the library's
    negative error code. See csrc/fastadam_pycall.c.
    """
    try:
        from .. import _pycall  # type: ignore[attr-defined]
    except ImportError:
        return None
    bind_q8 = getattr(_pycall, "bind_q8", None)  # an extension built before it: none
    if bind_q8 is None:
        return None
    return bind_q8(np.ndarray, int(ffi.cast("uintptr_t", lib.fa_adam_f32_q8)))


#: adam_step's one-call path to the 8-bit kernel (None without the extension).
step_fast_q8 = _pycall_step_q8()
