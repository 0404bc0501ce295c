"""``adam_step``: the one entry point every caller goes through.

It validates its arguments once, computes the step's scalars once (float64,
:mod:`fastadam._scalars`), and hands plain arrays to the chosen backend. Every
check runs before anything is written, so a rejected call leaves every array
exactly as it was.
"""

from __future__ import annotations

import math
import numbers
import operator
from collections.abc import Sequence

import ml_dtypes
import numpy as np

from . import backends
from ._scalars import (
    STATE_BF16_NEAREST,
    STATE_BF16_STOCHASTIC,
    STATE_SAME_DTYPE,
    compute_scalars,
)

_FLOAT_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))
#: NumPy has no bfloat16 of its own; ml_dtypes' is the one NumPy arrays can hold.
BFLOAT16: np.dtype = np.dtype(ml_dtypes.bfloat16)
_STATE_NAMES = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")
_ROUNDINGS = {"nearest": STATE_BF16_NEAREST, "stochastic": STATE_BF16_STOCHASTIC}
_FLOAT_MAX = float(np.finfo(np.float64).max)
_ndarray = np.ndarray
# ndarray.flags.num bits (numpy/ndarraytypes.h): one attribute read tests them all.
_C_CONTIGUOUS, _OWNDATA, _ALIGNED, _WRITEABLE = 0x1, 0x4, 0x100, 0x400
_CARRAY = _C_CONTIGUOUS | _ALIGNED | _WRITEABLE
_ARRAY_NAMES = ("param", "grad", "exp_avg", "exp_avg_sq", "max_exp_avg_sq")


def _check_array(
    name: str, a: object, dtype: np.dtype | None, shape: tuple | None, what: str = "param"
) -> None:
    """Raise unless ``a`` is an array the kernels may update in place.

    ``dtype``/``shape`` are what ``a`` must have, taken from the array named
    ``what`` (None when checking param itself).
    """
    if not isinstance(a, np.ndarray):
        raise TypeError(f"{name} must be a numpy.ndarray, got {type(a).__name__}")
    dt = a.dtype
    if dtype is None:
        if dt not in _FLOAT_DTYPES:
            raise TypeError(f"{name} must have dtype float32 or float64, got {dt}")
    elif dt != dtype:
        raise TypeError(f"{name} has dtype {dt} but {what} has dtype {dtype}; they must match")
    if not dt.isnative:
        raise TypeError(f"{name} must be in native byte order, got dtype {dt.str!r}")
    if shape is not None and a.shape != shape:
        raise ValueError(f"{name} has shape {a.shape} but param has shape {shape}")
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


def _check_real(name: str, x: object) -> float:
    if isinstance(x, bool) or not isinstance(x, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(x).__name__}")
    x = float(x)
    if not math.isfinite(x):
        raise ValueError(f"{name} must be finite, got {x}")
    return x


def _check_nonneg(name: str, x: object) -> float:
    if type(x) is float and 0.0 <= x <= _FLOAT_MAX:  # the common case, cheaply (NaN fails)
        return x
    x = _check_real(name, x)
    if x < 0.0:
        raise ValueError(f"{name} must be >= 0, got {x}")
    return x


def _check_beta(name: str, x: object) -> float:
    if type(x) is float and 0.0 <= x < 1.0:
        return x
    x = _check_real(name, x)
    if not 0.0 <= x < 1.0:
        raise ValueError(f"{name} must be in [0, 1), got {x}")
    return x


def _check_step(step: object) -> int:
    if isinstance(step, bool):
        raise TypeError("step must be an int, got bool")
    try:
        step = operator.index(step)
    except TypeError:
        raise TypeError(f"step must be an int, got {type(step).__name__}") from None
    if step < 1:
        raise ValueError(f"step must be >= 1 (the 1-based count of this update), got {step}")
    return step


def check_state_rounding(state_rounding: object) -> int:
    """The ``AdamScalars.state_rounding`` code of "stochastic" or "nearest"; else ValueError."""
    rounding = _ROUNDINGS.get(state_rounding) if isinstance(state_rounding, str) else None
    if rounding is None:
        raise ValueError(
            f"state_rounding must be 'stochastic' or 'nearest', got {state_rounding!r}"
        )
    return rounding


def _check_seed(seed: object) -> int:
    if isinstance(seed, bool):
        raise TypeError("seed must be an int, got bool")
    try:
        seed = operator.index(seed)
    except TypeError:
        raise TypeError(f"seed must be an int, got {type(seed).__name__}") from None
    if not 0 <= seed < 2**64:
        raise ValueError(f"seed must be in [0, 2**64), got {seed}")
    return seed


def validate_arrays(
    param: np.ndarray,
    grad: np.ndarray,
    exp_avg: np.ndarray,
    exp_avg_sq: np.ndarray,
    max_exp_avg_sq: np.ndarray | None,
    amsgrad: bool,
) -> None:
    """Check the arrays of one step; raise ``TypeError``/``ValueError`` naming the culprit."""
    if amsgrad:
        if max_exp_avg_sq is None:
            raise ValueError("amsgrad=True needs max_exp_avg_sq, an array shaped like param")
        arrays = (param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq)
    else:
        arrays = (param, grad, exp_avg, exp_avg_sq)
    # Fast path, a few attribute reads per array: plain ndarrays of param's
    # (native float) dtype and shape that are C-contiguous, aligned and
    # writeable, each owning its memory. Anything else takes the thorough path
    # below, which names the problem or accepts the unusual.
    if type(param) is _ndarray and param.dtype in _FLOAT_DTYPES:
        dtype, shape = param.dtype, param.shape
        owned = True
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
                _check_overlap(arrays)
            return
    _check_array("param", param, None, None)
    _check_array("grad", grad, param.dtype, param.shape)
    state_dtype = param.dtype
    if getattr(exp_avg, "dtype", None) == BFLOAT16:
        if param.dtype != np.float32:
            raise TypeError(
                f"bfloat16 optimizer states need float32 params and grads; param has dtype "
                f"{param.dtype}"
            )
        state_dtype = BFLOAT16
    for name, a in zip(_STATE_NAMES, arrays[2:]):
        _check_array(
            name,
            a,
            state_dtype,
            param.shape,
            what="param" if state_dtype is param.dtype else "exp_avg",
        )
    _check_overlap(arrays)


def _distinct(arrays: tuple[np.ndarray, ...]) -> bool:
    """No array passed twice (spelled out: 6-10 identity tests beat any set)."""
    p, g, m, v = arrays[:4]
    if p is g or p is m or p is v or g is m or g is v or m is v:
        return False
    return len(arrays) == 4 or all(a is not arrays[4] for a in arrays[:4])


def _check_overlap(arrays: tuple[np.ndarray, ...]) -> None:
    # Contiguous arrays overlap exactly when their byte ranges do, which is
    # what may_share_memory's cheap bounds test checks.
    for i in range(len(arrays)):
        for j in range(i + 1, len(arrays)):
            if np.may_share_memory(arrays[i], arrays[j]):
                raise ValueError(
                    f"{_ARRAY_NAMES[i]} and {_ARRAY_NAMES[j]} share memory; "
                    "each array must be a separate buffer"
                )


def adam_step(
    param: np.ndarray,
    grad: np.ndarray,
    exp_avg: np.ndarray,
    exp_avg_sq: np.ndarray,
    *,
    step: int,
    lr: float,
    beta1: float = 0.9,
    beta2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    decoupled_weight_decay: bool = False,
    amsgrad: bool = False,
    max_exp_avg_sq: np.ndarray | None = None,
    maximize: bool = False,
    eps_hat: bool = False,
    grad_scale: float | None = None,
    found_inf: bool = False,
    state_rounding: str = "stochastic",
    seed: int = 0,
    backend: str = "auto",
) -> None:
    """Apply one fused Adam/AdamW update to ``param``, ``exp_avg``, ``exp_avg_sq`` in place.

    The math and its order are those of ``torch.optim.Adam`` (``AdamW`` with
    ``decoupled_weight_decay=True``); float32 arrays are updated in float32
    arithmetic, float64 in float64.

    Args:
        param: parameters θ, float32 or float64, any shape, C-contiguous, writeable.
        grad: gradient of the loss w.r.t. ``param``; same dtype and shape.
            Written to only when ``grad_scale`` is given (the unscaled gradient).
        exp_avg: first moment m, same dtype and shape; updated in place.
        exp_avg_sq: second moment v, same dtype and shape; updated in place.
        step: 1-based count of this update (torch's ``state["step"]`` after its
            increment); the bias corrections are ``1 - beta**step``.
        lr: learning rate, >= 0.
        beta1, beta2: moment decay rates in [0, 1).
        eps: term added to the denominator, >= 0.
        weight_decay: >= 0. Adam (``decoupled_weight_decay=False``) adds
            ``weight_decay * θ`` to the gradient; AdamW multiplies θ by
            ``1 - lr * weight_decay`` first.
        amsgrad: use ``max(max_exp_avg_sq, v)`` in the denominator;
            ``max_exp_avg_sq`` (same dtype and shape) is then required and updated.
        maximize: ascend instead of descend.
        eps_hat: the Keras/TensorFlow/scikit-learn convention
            ``θ -= lr·sqrt(1-β2^t)/(1-β1^t) · m/(sqrt(v)+ε)`` instead of torch's.
        grad_scale: if given (finite, > 0), the gradient is divided by it in the
            same pass and the unscaled gradient is written back into ``grad``.
        found_inf: if true, validate and return without touching anything
            (the step a ``GradScaler`` skips).
        state_rounding: with bfloat16 states (``exp_avg``, ``exp_avg_sq`` and
            ``max_exp_avg_sq`` of dtype ``ml_dtypes.bfloat16``, param and grad
            float32), how the float32 results are stored: ``"stochastic"``
            (default; unbiased, so small decays are not lost) or ``"nearest"``.
            Ignored for float32/float64 states.
        seed: stochastic rounding's random bits are a hash of (seed, step,
            element index): reproducible, whatever the thread count. An integer
            in [0, 2**64); give each parameter array its own.
        backend: ``"auto"``, ``"numpy"``, ``"numba"`` or ``"c"``.

    Raises:
        TypeError, ValueError: a bad argument, named in the message; nothing
            has been modified.
        BackendUnavailableError: the named backend cannot load here (says why).
    """
    if amsgrad is not False:
        amsgrad = bool(amsgrad)
    validate_arrays(param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq, amsgrad)
    step = _check_step(step)
    lr = _check_nonneg("lr", lr)
    beta1 = _check_beta("beta1", beta1)
    beta2 = _check_beta("beta2", beta2)
    eps = _check_nonneg("eps", eps)
    weight_decay = _check_nonneg("weight_decay", weight_decay)
    if grad_scale is not None:
        grad_scale = _check_real("grad_scale", grad_scale)
        if grad_scale <= 0.0:
            raise ValueError(f"grad_scale must be > 0, got {grad_scale}")
    rounding = STATE_SAME_DTYPE
    if exp_avg.dtype is not param.dtype and exp_avg.dtype != param.dtype:
        # validated above: bfloat16 states of float32 params
        rounding = check_state_rounding(state_rounding)
        seed = _check_seed(seed)
    kernel = backends.get(backend)
    if found_inf:
        return
    # Positional, in compute_scalars' order: it is memoized on these values.
    scalars = compute_scalars(
        step, lr, beta1, beta2, eps, weight_decay, decoupled_weight_decay is True or
        bool(decoupled_weight_decay), amsgrad, maximize is True or bool(maximize),
        eps_hat is True or bool(eps_hat), grad_scale, rounding,
        seed if rounding == STATE_BF16_STOCHASTIC else 0,
    )  # fmt: skip
    kernel.step(param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq if amsgrad else None, scalars)


def unscale_and_check(grads: Sequence[np.ndarray], scale: float, *, backend: str = "auto") -> bool:
    """Divide every gradient by ``scale`` in place, in one pass each; report overflow.

    The "unscale, check for Inf/NaN, then step or skip" pattern of loss
    scaling, fused::

        found_inf = fastadam.unscale_and_check(grads, scale)
        opt.step(grads, found_inf=found_inf)   # skipped (step not advanced) on overflow

    Every gradient is unscaled even after an overflow is found (as torch's
    GradScaler does). The division is the same IEEE division ``adam_step``
    applies with ``grad_scale``.

    Args:
        grads: float32/float64 arrays, C-contiguous, writeable, not overlapping.
        scale: the loss scale the gradients were multiplied by; finite, > 0.
        backend: as for :func:`adam_step`.

    Returns:
        True if any unscaled gradient element is NaN or infinite.
    """
    if isinstance(grads, np.ndarray):
        grads = [grads]
    grads = list(grads)
    for i, g in enumerate(grads):
        _check_array(f"grads[{i}]", g, None, None)
    for i in range(len(grads)):
        for j in range(i + 1, len(grads)):
            if np.may_share_memory(grads[i], grads[j]):
                raise ValueError(f"grads[{i}] and grads[{j}] share memory")
    scale = _check_real("scale", scale)
    if scale <= 0.0:
        raise ValueError(f"scale must be > 0, got {scale}")
    kernel = backends.get(backend)
    found = False
    for g in grads:
        found |= kernel.unscale_and_check(g, scale)
    return found
