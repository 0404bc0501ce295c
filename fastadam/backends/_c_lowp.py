"""C backend's low-precision loops (csrc/fastadam_lowp.h, issue 17), through cffi.

The library :mod:`fastadam.backends.c` loads, with the declaration of
fastadam_lowp.h's entry point added to its FFI (cffi resolves a function of
an opened library at first use, so a later ``cdef`` is fine; fastadam._q8's
C calls do the same). The callers (fastadam._lowp) have checked every array.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from .._lowp import KINDS
from .._scalars import AdamScalars
from .._table import address
from .c import _raise_code, ffi, lib

ffi.cdef("""
int fa_adam_lowp_multi(int kind, int param_rounding, int64_t count,
                       void *const *param, void *const *grad, void *const *exp_avg,
                       void *const *exp_avg_sq, void *const *max_exp_avg_sq,
                       void *const *copy, const int64_t *n,
                       const fa_adam_scalars *scalars, int64_t n_scalars,
                       const void *scalar_index, const void *rounding_keys);
""")
_fn = lib.fa_adam_lowp_multi


def step_rows(
    kind: str,
    rows: Sequence[tuple[Any, ...]],
    scalars: Sequence[AdamScalars],
    index: np.ndarray | None,
    keys: np.ndarray | None,
    rounding: int,
) -> None:
    """One library call over every tensor of ``rows`` (see fastadam._lowp.step_rows);
    ``rounding``'s bits are fastadam_lowp.h's ``FA_LOWP_STOCHASTIC`` (1) and
    ``FA_LOWP_STOCHASTIC_STATE`` (2)."""
    count = len(rows)
    pointers = np.zeros((6, count), np.uintp)
    sizes = np.empty(count, np.int64)
    for i, row in enumerate(rows):
        for r, a in enumerate(row):
            if a is not None:
                pointers[r, i] = address(a)
        sizes[i] = row[0].size
    structs = ffi.new("fa_adam_scalars[]", [tuple(sc) for sc in scalars])
    tables = [ffi.from_buffer("void *[]", pointers[r]) for r in range(6)]
    idx = ffi.NULL if index is None else ffi.from_buffer(np.ascontiguousarray(index, np.int32))
    k = ffi.NULL if keys is None else ffi.from_buffer(np.ascontiguousarray(keys, np.uint32))
    has_max = any(sc.amsgrad for sc in scalars)
    rc = _fn(
        KINDS[kind].code, rounding, count, tables[0], tables[1], tables[2], tables[3],
        tables[4] if has_max else ffi.NULL, tables[5], ffi.from_buffer("int64_t[]", sizes),
        structs, len(scalars), idx, k,
    )  # fmt: skip
    if rc:
        _raise_code(rc)
