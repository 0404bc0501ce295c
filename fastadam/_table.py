"""The tensor table: what a multi-tensor step hands a backend.

A multi-tensor step updates many tensors in one backend call. The backend
receives one :class:`TensorTable` per dtype kind (built once by a plan, see
:mod:`fastadam.multi`) and, per step, the scalars of every distinct step count::

    backend.step_multi(table, scalars, index, keys)

* ``table.pointers`` (``uintp``, shape ``(5, count)``): the data addresses of
  tensor ``i``'s param, grad, exp_avg, exp_avg_sq and max_exp_avg_sq in column
  ``i`` (row order :data:`ROLES`). Row 4 holds zeros when the step has no
  amsgrad. Each array is C-contiguous with ``table.sizes[i]`` elements, and no
  array overlaps any other array of the table: the plan has checked all of it.
* ``scalars``: a tuple of :class:`~fastadam._scalars.AdamScalars`, one per
  distinct step count, all with the same flags and hyperparameters (only the
  step-dependent fields differ).
* ``index`` (``int32``, shape ``(count,)``) or None: tensor ``i`` uses
  ``scalars[index[i]]``; None means every tensor uses ``scalars[0]``.
* ``keys`` (``uint32``, shape ``(count,)``) or None: bfloat16 states with
  stochastic rounding only, tensor ``i``'s rounding key (it replaces
  ``rounding_key`` of its scalars; :func:`fastadam._scalars.rounding_key` of
  its own seed and step).

The result must be bit-identical to calling ``backend.step`` on each tensor
with its scalars (and ``rounding_key=keys[i]``): the random bits of element
``j`` of tensor ``i`` are those of index ``j`` under key ``keys[i]``, whatever
the split of the work between threads.

The table holds the addresses only; ``owners`` keeps the objects that own
the memory alive for as long as the table exists.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

#: Rows of TensorTable.pointers.
ROLES = ("param", "grad", "exp_avg", "exp_avg_sq", "max_exp_avg_sq")
PARAM, GRAD, EXP_AVG, EXP_AVG_SQ, MAX_EXP_AVG_SQ = range(5)

#: Dtype kinds: (param and grad dtype, state dtype).
KIND_F32 = "float32"  # float32 params, float32 states
KIND_F64 = "float64"  # float64 params, float64 states
KIND_BF16 = "bfloat16"  # float32 params, bfloat16 states
KINDS = (KIND_F32, KIND_F64, KIND_BF16)
#: float32 params, 8-bit block-wise states (fastadam._q8): not a registry kind
#: (q8 steps follow the float32 backend choice); its tables have 6 rows of
#: pointers: param, grad, exp_avg codes, exp_avg_sq codes, exp_avg_absmax,
#: exp_avg_sq_absmax (the scales: ceil(size / 256) float32 each).
KIND_Q8 = "q8"


@dataclass(eq=False)
class TensorTable:
    """Addresses and sizes of the tensors of one multi-tensor step of one dtype kind."""

    kind: str
    pointers: np.ndarray  # uintp (5, count)
    sizes: np.ndarray  # int64 (count,)
    offsets: np.ndarray  # int64 (count + 1,): offsets[i] = sizes[:i].sum()
    owners: list[Any] = field(default_factory=list)
    #: Per-backend cache (e.g. cffi pointers into ``pointers``), keyed by backend name.
    cache: dict[str, Any] = field(default_factory=dict)

    @property
    def count(self) -> int:
        return int(self.sizes.shape[0])

    @property
    def total(self) -> int:
        """Elements over all tensors."""
        return int(self.offsets[-1])


def make_table(
    kind: str, pointers: np.ndarray, sizes: Sequence[int] | np.ndarray, owners: list
) -> TensorTable:
    """A table over ``pointers`` (uintp (5, count), C-contiguous) and ``sizes``."""
    counts = np.ascontiguousarray(sizes, dtype=np.int64)
    offsets = np.zeros(counts.shape[0] + 1, np.int64)
    np.cumsum(counts, out=offsets[1:])
    return TensorTable(
        kind, np.ascontiguousarray(pointers, dtype=np.uintp), counts, offsets, owners
    )


def address(a: np.ndarray) -> int:
    """The data address of an array (0 for an empty one is never dereferenced)."""
    return a.__array_interface__["data"][0]


def table_from_arrays(kind: str, arrays: Sequence[Sequence[Any]]) -> TensorTable:
    """A table over NumPy arrays: ``arrays[i]`` is tensor ``i``'s
    ``(param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq or None)`` (NumPy arrays).

    No checks: the caller has validated the arrays (see :mod:`fastadam.multi`).
    The arrays are kept alive by the table.
    """
    count = len(arrays)
    pointers = np.zeros((5, count), np.uintp)
    sizes = []
    owners: list[Any] = []
    for i, row in enumerate(arrays):
        for r, a in enumerate(row):
            if a is not None:
                pointers[r, i] = address(a)
                owners.append(a)
        sizes.append(row[0].size)
    return make_table(kind, pointers, sizes, owners)


def view_at(addr: int, n: int, dtype: np.dtype) -> np.ndarray:
    """A writeable 1-D NumPy view of ``n`` elements of ``dtype`` at ``addr``.

    For backends that work on arrays (the reference): the table holds
    addresses only. The view does not own or keep alive the memory.
    """
    dtype = np.dtype(dtype)
    if n == 0:
        return np.empty(0, dtype)
    # Through an unsigned integer of the same width: the array interface names
    # builtin types only (bfloat16 is ml_dtypes').
    raw = np.dtype(f"u{dtype.itemsize}")

    class _Interface:
        __array_interface__ = {  # noqa: RUF012 - a one-off holder for np.asarray
            "shape": (n,),
            "typestr": raw.str,
            "data": (int(addr), False),
            "version": 3,
        }

    return np.asarray(_Interface()).view(dtype)
