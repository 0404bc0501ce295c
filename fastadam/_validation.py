"""Every argument rule of the NumPy front ends, written once.

``adam_step``, ``adam_step_multi``/``MultiTensorPlan`` and the optimizers
check their arguments here, so a rule and its message exist in one place.
Each check raises ``TypeError`` (wrong kind of thing) or ``ValueError`` (right
kind, bad value) naming the argument, and none of them writes anything.
"""

from __future__ import annotations

import math
import numbers
import operator
from collections.abc import Callable, Sequence
from typing import NamedTuple

import ml_dtypes
import numpy as np

from ._scalars import STATE_BF16_NEAREST, STATE_BF16_STOCHASTIC

FLOAT_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))
#: NumPy has no bfloat16 of its own; ml_dtypes' is the one NumPy arrays can hold.
BFLOAT16: np.dtype = np.dtype(ml_dtypes.bfloat16)
#: The arrays of one step, in kernel order.
ARRAY_NAMES = ("param", "grad", "exp_avg", "exp_avg_sq", "max_exp_avg_sq")
_ROUNDINGS = {"nearest": STATE_BF16_NEAREST, "stochastic": STATE_BF16_STOCHASTIC}
_FLOAT_MAX = float(np.finfo(np.float64).max)
_ndarray = np.ndarray
# ndarray.flags.num bits (numpy/ndarraytypes.h): one attribute read tests them all.
_C_CONTIGUOUS, _OWNDATA, _ALIGNED, _WRITEABLE = 0x1, 0x4, 0x100, 0x400
_CARRAY = _C_CONTIGUOUS | _ALIGNED | _WRITEABLE


# -- numbers -------------------------------------------------------------------------


def check_real(name: str, x: object) -> float:
    """``x`` as a finite float; bools and non-numbers are a TypeError."""
    x = as_real(name, x)
    if not math.isfinite(x):
        raise ValueError(f"{name} must be finite, got {x}")
    return x


def check_nonneg(name: str, x: object) -> float:
    if type(x) is float and 0.0 <= x <= _FLOAT_MAX:  # the common case, cheaply (NaN fails)
        return x
    x = check_real(name, x)
    if x < 0.0:
        raise ValueError(f"{name} must be >= 0, got {x}")
    return x


def check_beta(name: str, x: object) -> float:
    if type(x) is float and 0.0 <= x < 1.0:
        return x
    x = check_real(name, x)
    if not 0.0 <= x < 1.0:
        raise ValueError(f"{name} must be in [0, 1), got {x}")
    return x


def as_real(name: str, x: object) -> float:
    """``x`` as a float, finite or not; bools and non-numbers are a TypeError."""
    if isinstance(x, bool) or not isinstance(x, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(x).__name__}")
    return float(x)


def check_optimizer_hyper(
    lr: object,
    betas: object,
    eps: object,
    weight_decay: object,
    as_float: Callable[[str, object], float] = as_real,
) -> tuple[float, float, float, float, float]:
    """The constructor and param-group checks of ``torch.optim.Adam``/``AdamW``, shared
    by :class:`fastadam.Adam` and :class:`fastadam.torch.Adam`.

    In torch's order (lr, eps, betas[0], betas[1], weight_decay) and with torch's
    exact message first, then the rule in words: code that matches torch's
    messages keeps working. Unlike torch, non-finite values are refused too
    (``adam_step`` would refuse them at the first step anyway). ``as_float``
    turns one value into a float or raises TypeError (the torch front end's
    also takes 1-element tensors). Returns ``(lr, beta1, beta2, eps,
    weight_decay)`` as floats.
    """
    lr_f = as_float("lr", lr)
    if not (math.isfinite(lr_f) and lr_f >= 0.0):
        raise ValueError(f"Invalid learning rate: {lr} (lr must be finite and >= 0)")
    eps_f = as_float("eps", eps)
    if not (math.isfinite(eps_f) and eps_f >= 0.0):
        raise ValueError(f"Invalid epsilon value: {eps} (eps must be finite and >= 0)")
    if isinstance(betas, (str, bytes)) or not isinstance(betas, Sequence) or len(betas) != 2:
        raise TypeError(f"betas must be a pair (beta1, beta2), got {betas!r}")
    beta = [0.0, 0.0]
    for i in (0, 1):
        beta[i] = as_float(f"betas[{i}]", betas[i])
        if not 0.0 <= beta[i] < 1.0:
            raise ValueError(
                f"Invalid beta parameter at index {i}: {betas[i]} (betas[{i}] must be in [0, 1))"
            )
    wd_f = as_float("weight_decay", weight_decay)
    if not (math.isfinite(wd_f) and wd_f >= 0.0):
        raise ValueError(
            f"Invalid weight_decay value: {weight_decay} (weight_decay must be finite and >= 0)"
        )
    return lr_f, beta[0], beta[1], eps_f, wd_f


def check_state_dtype(state_dtype: object) -> str | None:
    """An optimizer's ``state_dtype`` as ``None`` (the parameters' dtype),
    ``"float32"`` or ``"bfloat16"``; each front end maps the name to its own dtype
    object. Accepted: those names, NumPy's float32 and ml_dtypes' bfloat16 (as
    dtypes or types), and torch.float32/torch.bfloat16 (matched by name, so this
    module needs no torch)."""
    if state_dtype is None:
        return None
    if isinstance(state_dtype, str):
        name: str | None = state_dtype if state_dtype in ("float32", "bfloat16") else None
    elif type(state_dtype).__module__ == "torch":  # a torch.dtype
        name = {"torch.float32": "float32", "torch.bfloat16": "bfloat16"}.get(str(state_dtype))
    else:
        try:
            dt = np.dtype(state_dtype)  # type: ignore[call-overload]
        except TypeError:
            dt = None
        name = "float32" if dt == np.float32 else "bfloat16" if dt == BFLOAT16 else None
    if name is None:
        raise ValueError(
            "state_dtype must be None, 'float32' or 'bfloat16' (or that dtype itself), "
            f"got {state_dtype!r}"
        )
    return name


def check_positive(name: str, x: object) -> float:
    x = check_real(name, x)
    if x <= 0.0:
        raise ValueError(f"{name} must be > 0, got {x}")
    return x


def check_int(name: str, x: object) -> int:
    """An integer (Python or NumPy, not bool) as an int."""
    if isinstance(x, bool):
        raise TypeError(f"{name} must be an int, got bool")
    try:
        return operator.index(x)  # type: ignore[arg-type]  # its TypeError is the check
    except TypeError:
        raise TypeError(f"{name} must be an int, got {type(x).__name__}") from None


def check_step(step: object, name: str = "step") -> int:
    step = check_int(name, step)
    if step < 1:
        raise ValueError(f"{name} must be >= 1 (the 1-based count of this update), got {step}")
    return step


def check_seed(seed: object, name: str = "seed") -> int:
    seed = check_int(name, seed)
    if not 0 <= seed < 2**64:
        raise ValueError(f"{name} must be in [0, 2**64), got {seed}")
    return seed


def check_threads(n: object, name: str = "n") -> int:
    """A thread count: an int (Python or NumPy) >= 1."""
    n = check_int(name, n)
    if n < 1:
        raise ValueError(f"{name} must be >= 1, got {n}")
    return n


def check_state_rounding(state_rounding: object, allow_none: bool = False) -> int:
    """The ``AdamScalars.state_rounding`` code of "stochastic" or "nearest"; else ValueError.

    ``allow_none``: None is accepted too (the functional API's default, "each
    kind's default"): the code of "stochastic", the default of float32
    parameters' bfloat16 states (bfloat16/float16 parameters' moments default
    to nearest rounding: fastadam._lowp.rounding_of)."""
    if state_rounding is None and allow_none:
        return STATE_BF16_STOCHASTIC
    rounding = _ROUNDINGS.get(state_rounding) if isinstance(state_rounding, str) else None
    if rounding is None:
        raise ValueError(
            f"state_rounding must be 'stochastic' or 'nearest', got {state_rounding!r}"
        )
    return rounding


class Hyper(NamedTuple):
    """The checked hyperparameters of one step (floats; the rounding as its code)."""

    lr: float
    beta1: float
    beta2: float
    eps: float
    weight_decay: float
    grad_scale: float | None
    rounding: int  # STATE_BF16_*: used only with bfloat16 states


def check_hyper(
    lr: object,
    beta1: object,
    beta2: object,
    eps: object,
    weight_decay: object,
    grad_scale: object,
    state_rounding: object,
) -> Hyper:
    """Every hyperparameter of a step, checked whether or not the step uses it
    (``state_rounding`` may be None, the functional API's default)."""
    return Hyper(
        check_nonneg("lr", lr),
        check_beta("beta1", beta1),
        check_beta("beta2", beta2),
        check_nonneg("eps", eps),
        check_nonneg("weight_decay", weight_decay),
        None if grad_scale is None else check_positive("grad_scale", grad_scale),
        check_state_rounding(state_rounding, allow_none=True),
    )


# -- arrays --------------------------------------------------------------------------


def check_array(
    name: str, a: object, dtype: np.dtype | None, shape: tuple | None, what: str = "param"
) -> None:
    """Raise unless ``a`` is an array the kernels may update in place.

    ``dtype``/``shape`` are what ``a`` must have, taken from the array named
    ``what`` (None when checking a parameter itself: then float32 or float64).
    """
    if not isinstance(a, np.ndarray):
        raise TypeError(f"{name} must be a numpy.ndarray, got {type(a).__name__}")
    dt = a.dtype
    if dtype is None:
        if dt not in FLOAT_DTYPES:
            raise TypeError(f"{name} must have dtype float32 or float64, got {dt}")
    elif dt != dtype:
        raise TypeError(f"{name} has dtype {dt} but {what} has dtype {dtype}; they must match")
    if not dt.isnative:
        raise TypeError(f"{name} must be in native byte order, got dtype {dt.str!r}")
    if shape is not None and a.shape != shape:
        raise ValueError(f"{name} has shape {a.shape} but {what} has shape {shape}")
    flags = a.flags
    if not flags.c_contiguous:
        raise ValueError(
            f"{name} must be C-contiguous (the kernels update it in place; a copy would "
            f"silently drop the update); got strides {a.strides} for shape {a.shape}"
        )
    if not flags.writeable:
        raise ValueError(f"{name} must be writeable: it is updated in place")
    if not flags.aligned:
        raise ValueError(f"{name} must be aligned to its itemsize ({dt.itemsize} bytes)")


def validate_arrays(
    param: np.ndarray,
    grad: np.ndarray,
    exp_avg: np.ndarray,
    exp_avg_sq: np.ndarray,
    max_exp_avg_sq: np.ndarray | None,
    amsgrad: bool,
    names: tuple[str, ...] = ARRAY_NAMES,
) -> None:
    """Check the arrays of one tensor's step; raise naming the culprit (``names``).

    ``max_exp_avg_sq`` is checked whenever it is given, and required with amsgrad.
    """
    arrays: tuple[np.ndarray, ...]
    if max_exp_avg_sq is None:
        if amsgrad:
            raise ValueError(f"amsgrad=True needs {names[4]}, an array shaped like {names[0]}")
        arrays = (param, grad, exp_avg, exp_avg_sq)
    else:
        arrays = (param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq)
    # Fast path, a few attribute reads per array: plain ndarrays of param's
    # (native float) dtype and shape that are C-contiguous, aligned and
    # writeable, each owning its memory. Anything else takes the thorough path
    # below, which names the problem or accepts the unusual.
    if type(param) is _ndarray and param.dtype in FLOAT_DTYPES:
        dtype, shape = param.dtype, param.shape
        owned: int = True  # truthy while every array so far owns its memory
        for a in arrays:
            if type(a) is not _ndarray or a.dtype is not dtype or a.shape != shape:
                break
            bits = a.flags.num
            if bits & _CARRAY != _CARRAY:
                break
            owned = owned and bits & _OWNDATA
        else:
            # Arrays that own their memory cannot overlap unless they are the same array.
            if not (owned and _distinct(arrays)):
                _check_overlap(arrays, names)
            return
    check_array(names[0], param, None, None)
    check_array(names[1], grad, param.dtype, param.shape, what=names[0])
    state_dtype = param.dtype
    if getattr(exp_avg, "dtype", None) == BFLOAT16:
        if param.dtype != np.float32:
            raise TypeError(
                f"bfloat16 optimizer states need float32 params and grads; {names[0]} has "
                f"dtype {param.dtype}"
            )
        state_dtype = BFLOAT16
    for name, a in zip(names[2:], arrays[2:]):
        check_array(
            name,
            a,
            state_dtype,
            param.shape,
            what=names[0] if state_dtype is param.dtype else names[2],
        )
    _check_overlap(arrays, names)


def _distinct(arrays: tuple[np.ndarray, ...]) -> bool:
    """No array passed twice (spelled out: 6-10 identity tests beat any set)."""
    p, g, m, v = arrays[:4]
    if p is g or p is m or p is v or g is m or g is v or m is v:
        return False
    return len(arrays) == 4 or all(a is not arrays[4] for a in arrays[:4])


def _overlap_error(first: str, second: str) -> ValueError:
    """The error every overlap check raises for the arrays named ``first`` and ``second``."""
    return ValueError(f"{first} and {second} share memory; each array must be a separate buffer")


def _check_overlap(arrays: tuple[np.ndarray, ...], names: tuple[str, ...]) -> None:
    # Contiguous arrays overlap exactly when their byte ranges do, which is
    # what may_share_memory's cheap bounds test checks.
    for i in range(len(arrays)):
        for j in range(i + 1, len(arrays)):
            if np.may_share_memory(arrays[i], arrays[j]):
                raise _overlap_error(names[i], names[j])


def check_disjoint(starts: np.ndarray, nbytes: np.ndarray, labels) -> None:
    """Raise ValueError if any two of the byte ranges ``[starts[k], starts[k] + nbytes[k])``
    overlap; ``labels(k)`` names range ``k`` in the message. Empty ranges never overlap.

    Sorted by start, ranges are disjoint exactly when each one ends at or before
    the next one starts: O(n log n), in NumPy.
    """
    keep = np.flatnonzero(nbytes > 0)
    if keep.size < 2:
        return
    s = starts[keep].astype(np.uint64)
    order = np.argsort(s, kind="stable")
    s = s[order]
    e = s + nbytes[keep][order].astype(np.uint64)
    bad = np.flatnonzero(e[:-1] > s[1:])
    if bad.size:
        k = int(bad[0])
        a, b = sorted((int(keep[order[k]]), int(keep[order[k + 1]])))
        raise _overlap_error(labels(a), labels(b))


def check_arrays_disjoint(arrays: Sequence[np.ndarray], labels: Sequence[str]) -> None:
    """:func:`check_disjoint` for the few C-contiguous arrays of one step, named by
    ``labels``: the same rule and message, in plain Python (for a handful of
    ranges, sorting tuples costs a fraction of building NumPy arrays for them)."""
    from ._table import address

    ranges = sorted((address(a), a.nbytes, k) for k, a in enumerate(arrays) if a.nbytes)
    for (s0, n0, k0), (s1, _, k1) in zip(ranges, ranges[1:]):
        if s0 + n0 > s1:
            a, b = sorted((k0, k1))
            raise _overlap_error(labels[a], labels[b])


def rebind_row(
    starts: np.ndarray, nbytes: np.ndarray, row: int, addresses: np.ndarray, labels
) -> np.ndarray:
    """A plan's byte-range starts ``starts`` (one row per role) with row ``row`` moved
    to ``addresses`` (a step's new gradients), checked by :func:`check_disjoint`
    with ``nbytes`` and ``labels``; ``starts`` itself when the addresses are those
    already there (gradients kept from step to step, as with torch's
    ``zero_grad(set_to_none=False)``, need no new check). On an overlap it raises
    ValueError and ``starts`` is unchanged."""
    if np.array_equal(addresses, starts[row]):
        return starts
    moved = starts.copy()
    moved[row] = addresses
    check_disjoint(moved.reshape(-1), nbytes.reshape(-1), labels)
    return moved
