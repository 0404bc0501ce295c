"""``FlatParams``: a whole model's parameters in one aligned buffer.

A model has many small arrays; stepping each costs one call of overhead per
array. Packed into one buffer, a whole model is one kernel call over
``.data``/``.grad``, while the training loop keeps using per-layer arrays that
are views into those buffers (no copies in either direction).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np

ALIGNMENT = 64  # bytes: a cache line, and a full AVX-512 register


def aligned_zeros(n: int, dtype: np.dtype, alignment: int = ALIGNMENT) -> np.ndarray:
    """A 1-D zeroed array of ``n`` elements whose data starts on an ``alignment``-byte boundary."""
    dtype = np.dtype(dtype)
    raw = np.zeros(n * dtype.itemsize + alignment, dtype=np.uint8)
    offset = (-raw.ctypes.data) % alignment
    return raw[offset : offset + n * dtype.itemsize].view(dtype)


class FlatParams:
    """Parameters and gradients of many arrays, packed into two flat buffers.

    A whole model becomes one kernel call over ``data`` and ``grad``,
    while the training loop keeps using per-array views (no copies in either
    direction).

    Parameters
    ----------
    arrays : mapping of name to numpy.ndarray, or sequence of numpy.ndarray
        The arrays to pack (any shapes, real numbers); with a sequence the
        names are 0, 1, .... The values are copied in.
    dtype : {numpy.float32, numpy.float64} or None, default None
        dtype of the buffers; by default the arrays' common type, which must
        be float32 or float64.

    Attributes
    ----------
    data : numpy.ndarray
        1-D parameter buffer, 64-byte aligned; each array starts on a 64-byte
        boundary, and the padding between them stays zero.
    grad : numpy.ndarray
        1-D gradient buffer of the same layout, zero to start.
    params : dict
        Name to a view into ``data`` with the array's original shape.
    grads : dict
        Name to a view into ``grad`` with the array's original shape.
    dtype : numpy.dtype
        float32 or float64.

    Raises
    ------
    TypeError
        ``arrays`` is one array, not a mapping or sequence, or holds a
        non-array or complex/non-numeric array; ``dtype`` is not float32 or
        float64.
    ValueError
        ``arrays`` is empty.

    Examples
    --------
    >>> import numpy as np, fastadam
    >>> flat = fastadam.FlatParams({"w": np.ones((3, 5)), "b": np.zeros(5)}, dtype=np.float32)
    >>> flat
    FlatParams(2 arrays, 32 elements, dtype=float32)
    >>> flat.params["w"].shape, flat.grads["b"].shape
    ((3, 5), (5,))
    >>> np.shares_memory(flat.params["b"], flat.data)
    True
    """

    def __init__(
        self,
        arrays: Mapping[Any, Any] | Sequence[Any],
        dtype: np.dtype | type | str | None = None,
    ) -> None:
        if isinstance(arrays, np.ndarray):
            raise TypeError(
                "arrays must be a mapping name -> array or a sequence of arrays, not one array"
            )
        if isinstance(arrays, Mapping):
            items = list(arrays.items())
        elif isinstance(arrays, Sequence) and not isinstance(arrays, (str, bytes)):
            items = list(enumerate(arrays))
        else:
            raise TypeError(f"arrays must be a mapping or a sequence, got {type(arrays).__name__}")
        if not items:
            raise ValueError("arrays is empty: nothing to pack")
        values = []
        for name, a in items:
            if not isinstance(a, np.ndarray):
                raise TypeError(f"arrays[{name!r}] must be a numpy.ndarray, got {type(a).__name__}")
            if a.dtype.kind not in "fiu" or a.dtype.kind == "c":
                raise TypeError(f"arrays[{name!r}] has dtype {a.dtype}; expected real numbers")
            values.append(a)
        dt = np.dtype(dtype) if dtype is not None else np.result_type(*values)
        if dt not in (np.dtype(np.float32), np.dtype(np.float64)):
            raise TypeError(f"dtype must be float32 or float64, got {dt}")
        dt = dt.newbyteorder("=")
        per_line = ALIGNMENT // dt.itemsize
        offsets, total = [], 0
        for a in values:
            offsets.append(total)
            total += -(-a.size // per_line) * per_line  # round each array up to a cache line
        self.dtype = dt
        self.data = aligned_zeros(total, dt)
        self.grad = aligned_zeros(total, dt)
        self.params: dict[Any, np.ndarray] = {}
        self.grads: dict[Any, np.ndarray] = {}
        for (name, a), off in zip(items, offsets):
            view = self.data[off : off + a.size].reshape(a.shape)
            view[...] = a
            self.params[name] = view
            self.grads[name] = self.grad[off : off + a.size].reshape(a.shape)

    def __len__(self) -> int:
        return len(self.params)

    def __iter__(self) -> Iterator[Any]:
        return iter(self.params)

    @property
    def size(self) -> int:
        """int: Elements in each flat buffer, padding included."""
        return self.data.size

    def zero_grad(self) -> None:
        """Set every gradient to zero (one pass over ``grad``)."""
        self.grad.fill(0)

    def __repr__(self) -> str:
        return f"FlatParams({len(self)} arrays, {self.size} elements, dtype={self.dtype})"
