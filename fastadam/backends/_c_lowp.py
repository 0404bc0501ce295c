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


class Table:
    """``fa_adam_lowp_multi``'s tables over a fixed list of tensors of one kind, made once.

    ``pointers`` (uintp, shape ``(6, count)``): the data addresses of each
    tensor's param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq and copy (0 where
    absent); ``sizes`` (int64): their element counts. The cffi pointers handed
    to the library point into ``pointers`` itself, so a caller that rewrites a
    row in place (``pointers[1]``: the new gradients of a step, as
    fastadam._torch_lowp's plans do) is seen by the next :meth:`run` without
    building anything. The caller keeps the arrays alive (the table holds
    addresses only) and has checked them (fastadam._lowp.validate_lowp).
    """

    __slots__ = ("code", "count", "pointers", "sizes", "rows", "n")

    def __init__(self, kind: str, rows: Sequence[Sequence[Any]]) -> None:
        count = len(rows)
        self.code = KINDS[kind].code
        self.count = count
        self.pointers = np.zeros((6, count), np.uintp)
        self.sizes = np.empty(count, np.int64)
        for i, row in enumerate(rows):
            for r, a in enumerate(row):
                if a is not None:
                    self.pointers[r, i] = address(a)
            self.sizes[i] = row[0].size
        if count:
            # from_buffer keeps the NumPy buffers exported (alive) as long as this table
            base = ffi.from_buffer("void *[]", self.pointers)
            self.rows = tuple(base + r * count for r in range(6))
            self.n = ffi.from_buffer("int64_t[]", self.sizes)

    def run(
        self,
        scalars: Sequence[AdamScalars],
        index: np.ndarray | None,
        keys: np.ndarray | None,
        rounding: int,
    ) -> None:
        """One library call over every tensor of the table (see :func:`step_rows`)."""
        if not self.count:
            return
        structs = ffi.new("fa_adam_scalars[]", [tuple(sc) for sc in scalars])
        idx = ffi.NULL if index is None else ffi.from_buffer(np.ascontiguousarray(index, np.int32))
        k = ffi.NULL if keys is None else ffi.from_buffer(np.ascontiguousarray(keys, np.uint32))
        has_max = any(sc.amsgrad for sc in scalars)
        rows = self.rows
        rc = _fn(
            self.code, rounding, self.count, rows[0], rows[1], rows[2], rows[3],
            rows[4] if has_max else ffi.NULL, rows[5], self.n, structs, len(scalars), idx, k,
        )  # fmt: skip
        if rc:
            _raise_code(rc)


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
    Table(kind, rows).run(scalars, index, keys, rounding)
