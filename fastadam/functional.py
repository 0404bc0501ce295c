"""``adam_step``: the one entry point every caller goes through.

It validates its arguments once, computes the step's scalars once (float64,
:mod:`fastadam._scalars`), and hands plain arrays to the chosen backend. Every
check runs before anything is written, so a rejected call leaves every array
exactly as it was.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple, NoReturn

import numpy as np

from . import _lowp, backends
from ._scalars import STATE_BF16_STOCHASTIC, STATE_SAME_DTYPE, AdamScalars, compute_scalars
from ._table import KIND_BF16, KIND_F32, KIND_F64, address
from ._validation import (
    BFLOAT16,
    check_array,
    check_disjoint,
    check_hyper,
    check_positive,
    check_seed,
    check_step,
    validate_arrays,
)

__all__ = ["BFLOAT16", "adam_step", "unscale_and_check"]


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
    state_rounding: str | None = None,
    seed: int = 0,
    backend: str = "auto",
    exp_avg_absmax: np.ndarray | None = None,
    exp_avg_sq_absmax: np.ndarray | None = None,
    param_copy: np.ndarray | None = None,
    param_rounding: str = "nearest",
) -> None:
    """Apply one fused Adam/AdamW update to ``param``, ``exp_avg``, ``exp_avg_sq`` in place.

    The math and its order are those of ``torch.optim.Adam`` (``torch.optim.AdamW``
    with ``decoupled_weight_decay=True``); float32 arrays are updated in float32
    arithmetic, float64 in float64. Every backend gives bit-identical results.

    Parameters
    ----------
    param : numpy.ndarray
        Parameters θ, float32 or float64, any shape; C-contiguous, aligned,
        native byte order, writeable. Updated in place.
    grad : numpy.ndarray
        Gradient of the loss with respect to ``param``: same dtype and shape.
        Written to only when ``grad_scale`` is given (the unscaled gradient).
    exp_avg : numpy.ndarray
        First moment m, shaped like ``param``, of its dtype (or
        ``ml_dtypes.bfloat16`` for a float32 ``param``). Updated in place.
    exp_avg_sq : numpy.ndarray
        Second moment v, shaped like ``param``, of ``exp_avg``'s dtype. Updated
        in place.
    step : int
        1-based count of this update (torch's ``state["step"]`` after its
        increment), >= 1; the bias corrections are ``1 - beta**step``.
    lr : float
        Learning rate, finite and >= 0.
    beta1 : float, default 0.9
        Decay rate of the first moment, in [0, 1).
    beta2 : float, default 0.999
        Decay rate of the second moment, in [0, 1).
    eps : float, default 1e-8
        Term added to the denominator, finite and >= 0.
    weight_decay : float, default 0.0
        Finite and >= 0. Adam (``decoupled_weight_decay=False``) adds
        ``weight_decay * θ`` to the gradient; AdamW multiplies θ by
        ``1 - lr * weight_decay`` first.
    decoupled_weight_decay : bool, default False
        AdamW's weight decay instead of Adam's L2 term.
    amsgrad : bool, default False
        Use ``max(max_exp_avg_sq, v)`` in the denominator; ``max_exp_avg_sq``
        is then required and updated.
    max_exp_avg_sq : numpy.ndarray or None, default None
        Running maximum of v for ``amsgrad``, like ``exp_avg_sq``; ignored
        without ``amsgrad``.
    maximize : bool, default False
        Ascend the objective instead of descending it.
    eps_hat : bool, default False
        The Keras/TensorFlow/scikit-learn placement of ``eps``:
        ``θ -= lr·sqrt(1-β2^t)/(1-β1^t) · m/(sqrt(v)+ε)`` instead of torch's.
    grad_scale : float or None, default None
        If given (finite, > 0), the gradient is divided by it in the same pass
        and the unscaled gradient is written back into ``grad``.
    found_inf : bool, default False
        If true, validate and return without touching anything (the step a
        loss scaler skips after an overflow).
    state_rounding : {None, "stochastic", "nearest"}, default None
        With bfloat16 states (``exp_avg``, ``exp_avg_sq`` and ``max_exp_avg_sq``
        of dtype ``ml_dtypes.bfloat16``), how the float32 results are stored:
        stochastic rounding is unbiased, so small decays are not lost. None
        means each kind's default: "stochastic" for the bfloat16 states of
        float32 ``param``, "nearest" (torch's) for the moments of bfloat16 or
        float16 ``param``. Checked always; used only with bfloat16 states
        (float16 moments are always rounded to nearest-even).
    seed : int, default 0
        Stochastic rounding's random bits are a hash of (seed, step, element
        index): reproducible whatever the thread count. In [0, 2**64); give
        each parameter array its own.
    backend : {"auto", "numpy", "numba", "c"}, default "auto"
        The kernel to run; ``"auto"`` is :func:`auto_backend`'s choice.
    exp_avg_absmax, exp_avg_sq_absmax : numpy.ndarray or None, default None
        8-bit block-wise states (issue 18): with these given, ``exp_avg`` and
        ``exp_avg_sq`` are uint8 codes shaped like ``param`` (float32) and
        these are their float32 scales, shape ``(ceil(param.size / 256),)``;
        all four are updated in place. The format is ``fastadam._q8``'s;
        ``amsgrad`` is refused.
    param_copy : numpy.ndarray or None, default None
        Master weights: with a float32 ``param`` (the master; ``grad`` float32
        or of ``param_copy``'s dtype; float32 moments), a bfloat16 or float16
        array shaped like it that receives the updated ``param`` rounded to its
        dtype, in the same pass (see ``fastadam._lowp``).
        ``param`` itself may also be bfloat16 or float16 (without
        ``param_copy``): ``grad`` then has its dtype and the moments its dtype
        (torch's), float32, or for float16 ``param`` bfloat16 (the moments'
        dtype is ``exp_avg``'s); the math runs in float32 in torch's fused
        order, and with the defaults every stored value is rounded to
        nearest-even, as ``torch.optim.AdamW(fused=True)`` does on such tensors.
    param_rounding : {"nearest", "stochastic"}, default "nearest"
        How the updated parameter is rounded to bfloat16/float16 (``param``'s
        own dtype, or ``param_copy``'s): nearest-even, or stochastically with 32
        random bits of (seed, step, element index) (unbiased: the expected
        result is the float32 value; see ``fastadam._lowp``).

    Raises
    ------
    TypeError
        An argument of the wrong kind: an array of the wrong dtype, a
        non-array, a bool or non-number hyperparameter, a non-str backend.
        The message names the argument; nothing has been modified.
    ValueError
        An argument of the right kind with a bad value: mismatched shapes,
        non-contiguous, read-only or overlapping arrays, NaN or out-of-range
        hyperparameters, ``amsgrad`` without ``max_exp_avg_sq``, an unknown
        backend name. Nothing has been modified.
    BackendUnavailableError
        The backend named cannot load on this machine (the message says why).

    See Also
    --------
    adam_step_multi : the same update over a list of tensors, in one call.
    Adam, AdamW : optimizers that keep the moments and the step count.

    Examples
    --------
    >>> import numpy as np, fastadam
    >>> p = np.ones(4, np.float32)
    >>> g = np.full(4, 0.5, np.float32)
    >>> m, v = np.zeros_like(p), np.zeros_like(p)
    >>> fastadam.adam_step(p, g, m, v, step=1, lr=0.1)
    >>> p.round(6)  # the first Adam step moves each element by about lr
    array([0.9, 0.9, 0.9, 0.9], dtype=float32)
    >>> m
    array([0.05, 0.05, 0.05, 0.05], dtype=float32)
    """
    if param_copy is not None:  # master weights (issue 17)
        if exp_avg_absmax is not None or exp_avg_sq_absmax is not None:
            raise ValueError(
                "param_copy (master weights) takes float32 moments; it cannot be combined "
                "with 8-bit states (exp_avg_absmax, exp_avg_sq_absmax)"
            )
        _lowp.adam_step_lowp(**_lowp_args(locals()))
        return
    if amsgrad is not False:
        amsgrad = bool(amsgrad)
    if exp_avg_absmax is not None or exp_avg_sq_absmax is not None:
        from ._q8 import adam_step_q8

        adam_step_q8(
            param, grad, exp_avg, exp_avg_sq, exp_avg_absmax, exp_avg_sq_absmax,
            (step, lr, beta1, beta2, eps, weight_decay, decoupled_weight_decay, amsgrad,
             maximize, eps_hat, grad_scale, state_rounding, seed),
            amsgrad, found_inf, backend,
        )  # fmt: skip
        return
    # The scalars come from memos of checked hyperparameters (see _scalars_of).
    hyper = (
        step, lr, beta1, beta2, eps, weight_decay, decoupled_weight_decay, amsgrad,
        maximize, eps_hat, grad_scale, state_rounding, seed,
    )  # fmt: skip
    fast = _FAST.get(backend) if type(backend) is str else None
    if fast is None and type(backend) is str and backend not in _FAST:
        fast = _FAST[backend] = _fast_path(backend)
    # (the registry stays the authority: a backend it no longer holds loses its path)
    if fast is not None and not found_inf and backends.loaded(fast.name) is fast.module:
        # The backend's one-call path (fastadam._pycall): it runs the kernel on
        # arrays that pass every rule of validate_arrays, or touches nothing and
        # declines, and the checked path below runs as always. It takes states of
        # param's dtype only (same_dtype, the key's last entry, True).
        try:
            scalars = _scalars_of((*hyper, True))
        except (TypeError, ValueError):
            # A bad array is reported before a bad hyperparameter, as on the checked path.
            if _lowp.is_lowp(param):
                _lowp.adam_step_lowp(**_lowp_args(locals()))
                return
            validate_arrays(param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq, amsgrad)
            raise
        rc = fast.step(param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq, scalars)
        if rc == 0:
            return
        if rc != fast.DECLINED:
            fast.raise_code(rc)
    if getattr(exp_avg, "dtype", None) == np.uint8:
        raise TypeError(
            "exp_avg has dtype uint8 (8-bit codes) but exp_avg_absmax and "
            "exp_avg_sq_absmax, its scales, are missing"
        )
    if _lowp.is_lowp(param):  # bfloat16/float16 params (issue 17)
        _lowp.adam_step_lowp(**_lowp_args(locals()))
        return
    validate_arrays(param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq, amsgrad)
    same_dtype = exp_avg.dtype is param.dtype or exp_avg.dtype == param.dtype
    scalars = _scalars_of((*hyper, same_dtype))
    kernel = backends.get(backend, _KIND_OF[param.dtype] if same_dtype else KIND_BF16)
    if found_inf:
        return
    kernel.step(param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq if amsgrad else None, scalars)


def _lowp_args(args: dict[str, Any]) -> dict[str, Any]:
    """adam_step's arguments (its locals at entry) for fastadam._lowp.adam_step_lowp."""
    return {k: args[k] for k in _LOWP_ARGS}


_LOWP_ARGS = (
    "param", "grad", "exp_avg", "exp_avg_sq", "step", "lr", "beta1", "beta2", "eps",
    "weight_decay", "decoupled_weight_decay", "amsgrad", "max_exp_avg_sq", "maximize",
    "eps_hat", "grad_scale", "found_inf", "state_rounding", "seed", "backend", "param_copy",
    "param_rounding",
)  # fmt: skip


#: The kind of step (the backends' auto rule is per kind) of float32 and float64
#: params whose states have their dtype.
_KIND_OF = {np.dtype(np.float32): KIND_F32, np.dtype(np.float64): KIND_F64}


class _FastPath(NamedTuple):
    """A backend's one-call path for adam_step (see fastadam.backends.c.step_fast)."""

    name: str
    module: Any
    step: Callable[..., int]
    DECLINED: int
    raise_code: Callable[[int], NoReturn]


def _fast_path(backend: str) -> _FastPath | None:
    """The one-call path for ``backend``: that of the C or Numba backend, where
    the extension was built and ``backend`` names it ("c", "numba", or "auto"
    choosing one backend for both float32 and float64); else None. Any failure
    to resolve means None: the checked path then raises it with its own message."""
    try:
        if backend == "auto":
            module = backends.get("auto", KIND_F32)
            if backends.get("auto", KIND_F64) is not module:
                return None
        elif backend in ("c", "numba"):
            module = backends.get(backend, KIND_F32)
        else:
            return None
    except Exception:
        return None
    fn = getattr(module, "step_fast", None)
    if fn is None:
        return None
    return _FastPath(module.NAME, module, fn, module.DECLINED, module._raise_code)


#: Backend name -> its one-call path or None, decided at its first adam_step.
_FAST: dict[str, _FastPath | None] = {}

#: compute_scalars without its own lru_cache, whose hashing this memo makes redundant.
_compute_scalars = compute_scalars.__wrapped__

#: adam_step's checked hyperparameters but the step -> (compute_scalars' other
#: arguments, the last step seen, its scalars); see _scalars_of. Cleared when full.
_MEMO: dict[tuple, tuple[tuple, int, AdamScalars]] = {}
_MEMO_SIZE = 512


def _scalars_of(key: tuple) -> AdamScalars:
    """The scalars of adam_step's ``key`` (its hyperparameters, step first), checked.

    The hyperparameters of a training loop repeat from call to call: a key whose
    exact values (and types: a bool lr must still be refused) have been checked
    before reuses them, and its scalars while the step stays the same (the
    tensors of one step); the next step costs only compute_scalars' float64
    arithmetic. The memo's keys hold only hashable values that compare equal
    exactly when they are the same; NaN never compares equal, so it is always
    checked. Each entry is replaced as one tuple: threads may share the memo.
    """
    if not _plain(key[0], key[1], key[2], key[3], key[4], key[5], key[10], key[12], key[11]):
        return _checked_scalars(*key)
    step, rest = key[0], key[1:]
    entry = _MEMO.get(rest)
    if entry is not None and entry[1] == step:
        return entry[2]
    step = check_step(step)  # before the others, as in _checked_scalars
    args = _checked_args(*rest) if entry is None else entry[0]
    scalars = _compute_scalars(step, *args)
    if entry is None and len(_MEMO) >= _MEMO_SIZE:
        _MEMO.clear()
    _MEMO[rest] = (args, step, scalars)
    return scalars


def _plain(step, lr, beta1, beta2, eps, weight_decay, grad_scale, seed, state_rounding) -> bool:
    """Whether the memo may hold these: only plain ints, floats and strs, since
    ``True == 1`` and ``1.0 == 1`` would otherwise let a bool or int through on a
    float's earlier check, and an unhashable argument must get its own error,
    not the memo's."""
    return (
        type(step) is int and type(seed) is int and type(lr) is float
        and type(beta1) is float and type(beta2) is float and type(eps) is float
        and type(weight_decay) is float and (grad_scale is None or type(grad_scale) is float)
        and (state_rounding is None or type(state_rounding) is str)
    )  # fmt: skip


def _checked_scalars(
    step, lr, beta1, beta2, eps, weight_decay, decoupled_weight_decay, amsgrad, maximize,
    eps_hat, grad_scale, state_rounding, seed, same_dtype,
) -> AdamScalars:  # fmt: skip
    """Check the hyperparameters of one adam_step and derive its scalars."""
    step = check_step(step)
    return compute_scalars(
        step, *_checked_args(lr, beta1, beta2, eps, weight_decay, decoupled_weight_decay,
                             amsgrad, maximize, eps_hat, grad_scale, state_rounding, seed,
                             same_dtype)
    )  # fmt: skip


def _checked_args(
    lr, beta1, beta2, eps, weight_decay, decoupled_weight_decay, amsgrad, maximize,
    eps_hat, grad_scale, state_rounding, seed, same_dtype,
) -> tuple:  # fmt: skip
    """Check adam_step's hyperparameters but the step; return compute_scalars'
    arguments after the step, positional, in its order (it is memoized on them)."""
    hp = check_hyper(lr, beta1, beta2, eps, weight_decay, grad_scale, state_rounding)
    seed = check_seed(seed)
    rounding = STATE_SAME_DTYPE if same_dtype else hp.rounding
    return (
        hp.lr, hp.beta1, hp.beta2, hp.eps, hp.weight_decay, bool(decoupled_weight_decay),
        amsgrad, bool(maximize), bool(eps_hat), hp.grad_scale, rounding,
        seed if rounding == STATE_BF16_STOCHASTIC else 0,
    )  # fmt: skip


def unscale_and_check(grads: Sequence[np.ndarray], scale: float, *, backend: str = "auto") -> bool:
    """Divide every gradient by ``scale`` in place, in one pass each; report overflow.

    The "unscale, check for Inf/NaN, then step or skip" pattern of loss
    scaling, fused::

        found_inf = fastadam.unscale_and_check(grads, scale)
        opt.step(grads, found_inf=found_inf)   # skipped (step not advanced) on overflow

    Every gradient is unscaled even after an overflow is found (as torch's
    ``GradScaler`` does). The division is the same IEEE division
    :func:`adam_step` applies with ``grad_scale``.

    Parameters
    ----------
    grads : sequence of numpy.ndarray, or numpy.ndarray
        float32 or float64 arrays of any shapes; C-contiguous, writeable, no
        two sharing memory. One array counts as a list of one.
    scale : float
        The loss scale the gradients were multiplied by; finite and > 0.
    backend : {"auto", "numpy", "numba", "c"}, default "auto"
        As for :func:`adam_step`.

    Returns
    -------
    bool
        True if any unscaled gradient element is NaN or infinite.

    Raises
    ------
    TypeError
        A gradient that is not a float32/float64 array, or a non-number
        ``scale``; nothing has been modified.
    ValueError
        A non-contiguous, read-only or overlapping gradient, or a ``scale``
        that is not finite and > 0; nothing has been modified.
    BackendUnavailableError
        The backend named cannot load on this machine.

    Examples
    --------
    >>> import numpy as np, fastadam
    >>> grads = [np.array([2.0, 4.0]), np.array([np.inf])]
    >>> fastadam.unscale_and_check(grads, 2.0)
    True
    >>> grads[0]
    array([1., 2.])
    """
    if isinstance(grads, np.ndarray):
        grads = [grads]
    grads = list(grads)
    for i, g in enumerate(grads):
        check_array(f"grads[{i}]", g, None, None)
    check_disjoint(  # one sort, not a test per pair: a model has hundreds of gradients
        np.array([address(g) for g in grads], np.uintp),
        np.array([g.nbytes for g in grads], np.uintp),
        lambda k: f"grads[{k}]",
    )
    scale = check_positive("scale", scale)
    kernels = [backends.get(backend, _KIND_OF[g.dtype]) for g in grads]
    found = False
    for kernel, g in zip(kernels, grads):
        found |= kernel.unscale_and_check(g, scale)
    return found
