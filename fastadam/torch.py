"""Drop-in replacements for ``torch.optim.Adam`` and ``torch.optim.AdamW`` on the CPU.

::

    import fastadam.torch

    opt = fastadam.torch.AdamW(model.parameters(), lr=1e-3, weight_decay=1e-2)
    for x, y in batches:
        opt.zero_grad()
        loss_fn(model(x), y).backward()
        opt.step()

Each step is one multi-tensor step per param group (a
:class:`fastadam.MultiTensorPlan` over NumPy views of the parameters and their
state tensors, and the addresses of the gradients): one kernel call per group
and dtype, no copies, so the update lands in the tensors themselves. The
state (``step``, ``exp_avg``, ``exp_avg_sq``, ``max_exp_avg_sq``) has exactly
``torch.optim.Adam``'s layout, so a ``state_dict`` moves freely between these
optimizers and torch's.

Supported: float32/float64 dense CPU tensors that are contiguous (their
gradients and states too), and bfloat16/float16 ones (torch's fused update,
with moments of their dtype or of ``state_dtype``, or ``master_weights``; see
fastadam._torch_lowp). Anything else (CUDA or
meta tensors, complex, sparse gradients, non-contiguous tensors) raises an error
that names the parameter and the problem, before any parameter is updated.

A group's plan is built (every tensor checked) at its first step and kept
while the group stays the same. Each later step checks, per parameter, that
the parameter, its state tensors and its storage are the ones the plan was
built over, and that the new gradient is dense and contiguous: a few attribute
reads. Anything else changed from outside (``p.data``, a parameter gaining or
losing its gradient, ``load_state_dict``, ``add_param_group``,
``ZeroRedundancyOptimizer``) rebuilds that group's plan, so ``param_groups``
and ``state`` may still be changed at any time; learning-rate schedules and
other hyperparameters are read at every step.

``state["step"]`` of a group's parameters are 0-d views into one tensor per
group, so a step advances them all with one operation; a reference to an old
``state["step"]`` held across a plan rebuild no longer advances.

PyTorch is optional for :mod:`fastadam`; this module alone needs it
(``pip install 'fastadam[torch]'``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, cast

try:
    import torch
except ImportError as exc:  # torch is an optional dependency of fastadam
    raise ImportError(
        "fastadam.torch needs PyTorch, which is not installed: pip install 'fastadam[torch]'"
    ) from exc

import numpy as np

import fastadam
from fastadam import _lowp, _q8_optim, _q8_torch, _torch_lowp
from fastadam._validation import (
    BFLOAT16,
    as_real,
    check_optimizer_hyper,
    check_positive,
    check_seed,
    check_state_dtype,
    check_state_rounding,
)
from fastadam.multi import MultiTensorPlan

__all__ = ["Adam", "AdamW", "ParamsT"]

#: What an optimizer's ``params`` may be, as for torch's optimizers (torch's
#: ``ParamsT``): tensors, ``(name, tensor)`` pairs, or parameter groups (dicts).
ParamsT = Iterable[torch.Tensor] | Iterable[dict[str, Any]] | Iterable[tuple[str, torch.Tensor]]

_DTYPES = (torch.float32, torch.float64)
_STATE_KEYS = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")
#: state_dtype by name (check_state_dtype), as torch holds it.
_STATE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
_STRIDED = torch.strided
_KEEP = torch.preserve_format
#: Per-optimizer settings (not group keys, so checkpoints stay torch's), with
#: the defaults an unpickled or torch-made state falls back to.
_OPTIMIZER_SETTINGS = {
    "backend": "auto",
    "state_dtype": None,
    "state_rounding": "stochastic",
    "seed": 0,
    "min_8bit_size": None,
    "master_weights": False,
    "param_rounding": "nearest",
}


# -- hyperparameter checks ---------------------------------------------------


def _scalar(name: str, value: Any) -> float:
    """``value`` as a float; a 1-element tensor is accepted (torch allows tensor lr/betas)."""
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(f"Tensor {name} must be 1-element, got shape {tuple(value.shape)}")
        return float(value)
    return as_real(name, value)


def _check_hyper(lr: Any, betas: Any, eps: Any, weight_decay: Any) -> tuple[float, ...]:
    """torch.optim.Adam's checks (fastadam._validation), 1-element tensors accepted."""
    return check_optimizer_hyper(lr, betas, eps, weight_decay, _scalar)


def _scalar_dtype() -> torch.dtype:
    # torch.optim.Adam (capturable=False, fused=False) keeps state["step"] in
    # float32, or float64 when that is the default dtype; do the same so the
    # two optimizers' state dicts are interchangeable.
    return torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32


# -- tensor checks -------------------------------------------------------------


def _where(gi: int, pi: int) -> str:
    return f"param_groups[{gi}]['params'][{pi}]"


def _check_tensor(
    what: str, t: torch.Tensor, dtype: torch.dtype | None, shape: Any, *, is_grad: bool = False
) -> None:
    """Raise an error naming the problem unless ``t`` can be updated in place through NumPy.

    ``dtype``/``shape`` are the parameter's (None when ``t`` is the parameter).
    """
    _check_layout(what, t, is_grad=is_grad)
    if dtype is None:
        if t.dtype not in _DTYPES:
            if t.is_complex():
                raise TypeError(
                    f"{what} is complex ({t.dtype}): fastadam.torch supports real float32 and "
                    "float64 parameters only (torch.optim.Adam handles complex ones)"
                )
            raise TypeError(
                f"{what} has dtype {t.dtype}: fastadam.torch supports float32, float64, "
                "bfloat16 and float16 parameters (bfloat16/float16 ones with moments of "
                "their dtype, float32 or bfloat16 moments (state_dtype), or float32 master "
                "weights (master_weights=True))"
            )
    elif t.dtype != dtype:
        raise TypeError(f"{what} has dtype {t.dtype} but its parameter has dtype {dtype}")
    if shape is not None and t.shape != shape:
        raise ValueError(
            f"{what} has shape {tuple(t.shape)} but its parameter has shape {tuple(shape)}"
        )


def _check_layout(what: str, t: torch.Tensor, *, is_grad: bool = False) -> None:
    """Raise an error naming the problem unless ``t`` is a dense, contiguous CPU tensor
    (what a zero-copy NumPy view, updated in place, needs). ``is_grad``: ``t`` is a
    gradient (a sparse one gets torch.optim.Adam's RuntimeError)."""
    if t.layout is not torch.strided:
        if is_grad:  # torch.optim.Adam raises RuntimeError here too
            raise RuntimeError(
                f"{what} is a sparse tensor ({t.layout}): fastadam.torch.Adam does not support "
                "sparse gradients, like torch.optim.Adam; consider torch.optim.SparseAdam"
            )
        raise ValueError(
            f"{what} has layout {t.layout}; only dense (strided) tensors are supported"
        )
    if not t.is_cpu:
        raise ValueError(
            f"{what} is on device {t.device}: fastadam.torch updates CPU tensors only "
            "(use torch.optim.Adam(fused=True) on accelerators)"
        )
    if not t.is_contiguous():
        # A contiguous copy would be updated and then thrown away: the update
        # would be lost without a word. Refuse instead.
        raise ValueError(
            f"{what} is not contiguous (strides {t.stride()} for shape {tuple(t.shape)}; "
            "channels_last counts as non-contiguous): fastadam.torch updates tensors in place "
            "and cannot do so through a copy; make it contiguous before stepping "
            "(for a parameter: p.data = p.data.contiguous())"
        )


def _view(t: torch.Tensor) -> np.ndarray | None:
    """Zero-copy NumPy view of ``t`` (writes land in the tensor), or None if torch refuses one.

    Parameters require grad (as do gradients made with ``create_graph=True``):
    detach first, which shares the memory. A tensor NumPy cannot view (another
    device or layout, bfloat16, ...) is left to the diagnostics.
    """
    try:
        return (t.detach() if t.requires_grad else t).numpy()
    except (RuntimeError, TypeError):
        return None


def _diagnose_pair(
    p: torch.Tensor, g: torch.Tensor, gi: int, pi: int
) -> tuple[np.ndarray, np.ndarray]:
    """Slow path of step(): raise the error that says what is wrong with ``p`` or its grad."""
    where = _where(gi, pi)
    _check_tensor(where, p, None, None)
    _check_tensor(f"the grad of {where}", g, p.dtype, p.shape, is_grad=True)
    pv, gv = _view(p), _view(g)
    if pv is None or gv is None:  # e.g. a tensor with torch's conjugate or negative bit set
        raise ValueError(f"{where} or its grad cannot be viewed as a NumPy array")
    return pv, gv


def _numpy_of(t: torch.Tensor) -> np.ndarray | None:
    """Zero-copy NumPy view of a state tensor; bfloat16 through its bits (NumPy has none)."""
    if t.dtype == torch.bfloat16:
        try:
            return t.view(torch.int16).numpy().view(BFLOAT16)
        except (RuntimeError, TypeError):
            return None
    return _view(t)


def _state_view(
    st: dict[str, Any],
    key: str,
    pv: np.ndarray,
    sdt: torch.dtype,
    p: torch.Tensor,
    gi: int,
    pi: int,
) -> np.ndarray:
    """NumPy view of ``state[key]`` (dtype ``sdt``), checked against the parameter's view ``pv``.

    torch's load_state_dict casts state to the parameter's dtype and device but
    checks no shapes, hence the checks on every step.
    """
    t = st.get(key)
    a = _numpy_of(t) if isinstance(t, torch.Tensor) else None
    want = BFLOAT16 if sdt == torch.bfloat16 else pv.dtype
    if (
        a is not None and a.dtype == want and a.shape == pv.shape and a.flags.c_contiguous
        and t is not None and t.dtype == sdt
    ):  # fmt: skip
        return a
    what = f"state[{key!r}] of {_where(gi, pi)}"
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{what} must be a tensor, got {type(t).__name__}")
    if t.dtype != sdt:
        raise TypeError(f"{what} has dtype {t.dtype}; this optimizer keeps {sdt} states")
    _check_tensor(what, t, sdt, p.shape)
    raise ValueError(f"{what} cannot be viewed as a NumPy array")


def _step_value(st: dict[str, Any], where: str) -> float:
    """The value of ``state["step"]`` (a tensor or, in old checkpoints, a number), checked."""
    t = st.get("step")
    if t is None:
        raise ValueError(f"state of {where} has no 'step'")
    try:
        value = float(t)
    except (TypeError, ValueError, RuntimeError):
        raise ValueError(f"state['step'] of {where} must be a number, got {t!r}") from None
    if not (value >= 0.0 and value.is_integer()):
        raise ValueError(f"state['step'] of {where} must be a non-negative integer, got {value}")
    return value


def next_steps(steps: np.ndarray) -> int | np.ndarray:
    """The counts of the coming step, from a group's current counts ``steps``: one
    int when they are all equal (the usual case, and the cheaper one for the
    kernels), else ``steps + 1``, one per parameter, which the caller checks."""
    first = float(steps[0])
    if first.is_integer() and first >= 0.0 and (steps == first).all():
        return int(first) + 1
    return steps + 1


def tensors_unchanged(
    params: list[torch.Tensor], identity: list[tuple[Any, ...]], state: Any
) -> bool:
    """Whether a group's parameters (those with a grad) and their state are the very
    objects a plan was built over: the check that keeps a plan (fastadam.torch's
    float32 path, fastadam._torch_lowp's and fastadam._q8_torch's).

    ``identity[i]`` is ``(p, p.data_ptr(), state[p], watched)`` as the plan saw
    them, ``watched`` the ``(key, value)`` pairs of ``state[p]`` the plan reads
    (a value of None: a key that must stay absent). A parameter gaining or
    losing its gradient changes ``params``; ``p.data = ...`` its address (the
    plan keeps the old storage alive, so the address cannot be reused);
    ``load_state_dict`` or an assignment to ``state`` the state objects. Each is
    a few attribute reads.
    """
    if len(params) != len(identity):
        return False
    for p, (q, ptr, st, watched) in zip(params, identity):
        if p is not q or state.get(p) is not st or p.data_ptr() != ptr:
            return False
        for key, value in watched:
            if st.get(key) is not value:
                return False
    return True


class _TorchPlan(MultiTensorPlan):
    """A multi-tensor plan over NumPy views of one group's tensors, naming them as torch does."""

    def __init__(self, gi: int, positions: list[int], *lists: Any, backend: str) -> None:
        self._gi, self._positions = gi, positions
        super().__init__(*lists, backend=backend, _private_views=True)

    def _label(self, role: int, i: int) -> str:
        where = _where(self._gi, self._positions[i])
        if role == 0:
            return where
        if role == 1:
            return f"the grad of {where}"
        return f"state[{_STATE_KEYS[role - 2]!r}] of {where}"


@dataclass(eq=False)
class _GroupPlan:
    """What one group's steps are built over, kept while it stays the same.

    The group's step counts are one tensor, seen through ``steps_np``; each
    parameter's ``state["step"]`` is a 0-d view into it, so a step reads and
    advances every count with one NumPy operation (torch's layout is unchanged:
    one 0-d float tensor each).
    """

    params: list[torch.Tensor]
    identity: list[tuple[Any, ...]]  # per parameter: what must not have changed
    plan: _TorchPlan
    steps_np: np.ndarray  # NumPy view of the counts' tensor (it keeps the tensor alive)
    seeds: np.ndarray
    amsgrad: bool
    numels: list[int]  # of each parameter: what its gradient must have

    def next_steps(self) -> int | np.ndarray:
        """The counts of this step: one int when the group's counts are equal (the
        usual case, and the cheaper one for the plan), else one per parameter."""
        return next_steps(self.steps_np)

    def still_valid(self, params: list[torch.Tensor], state: Any, amsgrad: bool) -> bool:
        """Whether the plan still describes the group's step (see :func:`tensors_unchanged`)."""
        return amsgrad == self.amsgrad and tensors_unchanged(params, self.identity, state)


@dataclass(eq=False)
class _PreparedGroup:
    """One group's checked step: run() applies it; nothing is written before."""

    plan: _GroupPlan
    run: Callable[[], None]
    grads: list[torch.Tensor]
    pending: list[tuple[Any, Any, Any]]  # new state, attached before running


# -- the optimizers ------------------------------------------------------------


class Adam(torch.optim.Adam):
    """``torch.optim.Adam`` (and, with ``decoupled_weight_decay=True``, AdamW) on fastadam kernels.

    Same constructor, checks, parameter groups, state layout and ``state_dict``
    as ``torch.optim.Adam``, and it is stepped, scheduled and checkpointed the
    same way. Parameters: float32/float64, dense, contiguous, on the CPU;
    anything else is refused at :meth:`step`, naming the parameter.

    A subclass of ``torch.optim.Adam`` (and :class:`AdamW` of
    ``torch.optim.AdamW``), so code that checks ``isinstance`` (schedulers,
    trainer integrations, ZeRO wrappers) accepts it; none of torch's update
    path is used: ``__init__`` and ``step`` are this class's own, and only
    torch's checkpoint upgrades (``__setstate__``) run.

    GradScaler: ``torch.amp.GradScaler.step(opt)`` hands this optimizer the
    loss scale and the overflow flag (``_step_supports_amp_scaling``); a step
    with an overflow is skipped entirely, otherwise the gradients are unscaled
    in the same pass as the update (and left unscaled in ``p.grad``).

    Parameters
    ----------
    params : iterable
        Tensors, ``(name, tensor)`` pairs, or param-group dicts, as for any
        ``torch.optim.Optimizer``.
    lr : float or torch.Tensor, default 1e-3
        Learning rate, finite and >= 0 (a float or a 1-element tensor).
    betas : tuple of (float, float), default (0.9, 0.999)
        Decay rates ``(beta1, beta2)`` of the first and second moments, in [0, 1).
    eps : float, default 1e-8
        Added to the denominator, finite and >= 0.
    weight_decay : float, default 0
        Finite and >= 0; an L2 term added to the gradient (Adam) or, with
        ``decoupled_weight_decay``, a decay of the weights by ``1 - lr * weight_decay``.
    amsgrad : bool, default False
        Use the running maximum of the second moment (keeps ``max_exp_avg_sq``).
    foreach, fused : bool or None, default None
        Accepted for drop-in compatibility, stored in the param groups as torch
        stores them, and ignored (the update is always one fused pass per
        parameter group).
    maximize : bool, default False
        Ascend the objective instead of descending it.
    capturable, differentiable : bool, default False
        torch's CUDA-graph and autograd-through-the-step modes; only ``False``
        is supported.
    decoupled_weight_decay : bool, default False
        AdamW's weight decay (see :class:`AdamW`).
    eps_hat : bool, default False
        The Keras/TensorFlow/scikit-learn placement of ``eps``
        (``lr * sqrt(1 - beta2^t) / (1 - beta1^t) * m / (sqrt(v) + eps)``).
    state_dtype : {None, torch.float32, torch.bfloat16, "float32", "bfloat16", "8bit"}, default None
        dtype of the moment estimates: None (the parameter's),
        ``torch.float32``, or ``torch.bfloat16`` for float32 parameters (half
        the optimizer memory; stochastically rounded, see ``state_rounding``);
        bfloat16/float16 parameters (without ``master_weights``) may keep
        float32 or bfloat16 moments too (the same float32 arithmetic as with
        moments of their own dtype; only the storage changes);
        ``"8bit"``: 8-bit block-wise states for float32 parameters of at least
        ``min_8bit_size`` elements (uint8 codes ``exp_avg``/``exp_avg_sq`` and
        float32 scales ``exp_avg_absmax``/``exp_avg_sq_absmax``; about 2 bytes
        per element; no amsgrad), float32 for smaller ones.
    state_rounding : {"stochastic", "nearest"}, default "stochastic"
        How bfloat16 states are rounded. With ``state_dtype=None``, a bfloat16
        parameter's moments (its own dtype) are rounded to nearest, as
        ``torch.optim.AdamW(fused=True)`` does; float16 moments always are.
    seed : int, default 0
        Base seed of stochastic rounding, in [0, 2**64); the parameter at
        position ``i`` (across groups, as numbered in ``state_dict``) uses
        ``seed + i``.
    backend : {"auto", "numpy", "numba", "c"}, default "auto"
        The kernels to run, one per optimizer (kept out of the param groups,
        so checkpoints carry none).
    min_8bit_size : int, default 4096
        With ``state_dtype="8bit"``: parameters with fewer elements keep
        float32 states.
    master_weights : bool, default False
        For bfloat16/float16 parameters: keep a float32 copy of each in
        ``state["master_param"]`` (with float32 moments), update it, and write
        the rounded result into the parameter in the same pass
        (``state_dtype`` does not apply to these float32 moments). Without
        it, such parameters keep moments of their own dtype and are updated as
        ``torch.optim.AdamW(fused=True)`` updates them, bit for bit, or moments
        of ``state_dtype``.
    param_rounding : {"nearest", "stochastic"}, default "nearest"
        How bfloat16/float16 parameters are rounded: nearest-even, or
        stochastically (unbiased), with the random bits of ``seed``, the
        parameter's position and the step.

    Raises
    ------
    TypeError
        A non-number hyperparameter, ``betas`` not a pair, or a non-str
        backend.
    ValueError
        A hyperparameter out of range, ``capturable=True`` or
        ``differentiable=True``, an unknown ``state_dtype``,
        ``state_rounding`` or backend, or an empty parameter list.
    BackendUnavailableError
        The backend named cannot load on this machine.

    See Also
    --------
    fastadam.Adam : the same over NumPy arrays.

    Examples
    --------
    >>> import torch, fastadam.torch
    >>> model = torch.nn.Linear(4, 2)
    >>> opt = fastadam.torch.Adam(model.parameters(), lr=1e-3)
    >>> model(torch.ones(3, 4)).sum().backward()
    >>> opt.step()
    >>> sorted(opt.state[model.weight])
    ['exp_avg', 'exp_avg_sq', 'step']
    """

    # torch.amp.GradScaler: set ``self.grad_scale``/``self.found_inf`` and let
    # step() unscale and skip, instead of unscaling the gradients itself.
    _step_supports_amp_scaling = True

    def __init__(
        self,
        params: ParamsT,
        lr: float | torch.Tensor = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0,
        amsgrad: bool = False,
        *,
        foreach: bool | None = None,
        maximize: bool = False,
        capturable: bool = False,
        differentiable: bool = False,
        fused: bool | None = None,
        decoupled_weight_decay: bool = False,
        eps_hat: bool = False,
        state_dtype: torch.dtype | None = None,
        state_rounding: str = "stochastic",
        seed: int = 0,
        backend: str = "auto",
        min_8bit_size: int = 4096,
        master_weights: bool = False,
        param_rounding: str = "nearest",
    ) -> None:
        # state_dtype="8bit" (issue 18, fastadam._q8_torch): min_8bit_size is not None
        self.min_8bit_size: int | None = None
        if _q8_optim.is_8bit(state_dtype):
            self.min_8bit_size = _q8_optim.check_min_size(min_8bit_size)
            if amsgrad:
                raise ValueError("amsgrad=True is not supported with state_dtype='8bit'")
            if master_weights:
                raise ValueError(
                    "master_weights=True keeps float32 moments; it cannot be combined with "
                    "state_dtype='8bit'"
                )
            state_dtype = None
        # foreach and fused are stored (torch's checkpoints carry them) and
        # ignored: the update is always one fused pass over each group.
        if capturable:
            raise ValueError("capturable=True (CUDA graphs) is not supported by fastadam.torch")
        if differentiable:
            raise ValueError("differentiable=True is not supported by fastadam.torch")
        _check_hyper(lr, betas, eps, weight_decay)
        fastadam.backends.get(backend)  # unknown or unloadable backend: fail now
        self.backend = backend
        name = check_state_dtype(state_dtype)
        check_state_rounding(state_rounding)
        seed = check_seed(seed)
        self.state_dtype = None if name is None else _STATE_DTYPES[name]
        self.state_rounding = state_rounding
        self.seed = seed
        _lowp.check_param_rounding(param_rounding)
        self.master_weights = bool(master_weights)
        self.param_rounding = param_rounding
        # torch.optim.Adam's group keys, in its order and with the values it
        # stores, so that checkpoints move both ways and save -> load -> save is
        # stable (torch's Optimizer.__setstate__ adds "differentiable" to the
        # defaults of an optimizer that lacks it); then fastadam's own.
        defaults = {
            "lr": lr,
            "betas": tuple(betas),
            "eps": eps,
            "weight_decay": weight_decay,
            "amsgrad": bool(amsgrad),
            "maximize": bool(maximize),
            "foreach": foreach,
            "capturable": False,
            "differentiable": False,
            "fused": fused,
            "decoupled_weight_decay": bool(decoupled_weight_decay),
            "eps_hat": bool(eps_hat),
        }
        # group index -> the group's _GroupPlan, or _torch_lowp.LowpPlan for a group
        # with bfloat16/float16 parameters (see _prepare_group)
        self._plans: dict[int, _GroupPlan | _torch_lowp.LowpPlan] = {}
        self._q8_plans: dict[int, Any] = {}  # the same with 8-bit states (_q8_torch)
        # torch.optim.Adam.__init__ is skipped on purpose: its checks are
        # check_optimizer_hyper's, and the rest configures torch's update.
        torch.optim.Optimizer.__init__(self, params, defaults)

    # -- groups and checkpoints ------------------------------------------------

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group of tensors with its own hyperparameters (torch semantics).

        The group's hyperparameters are checked before it is added.

        Parameters
        ----------
        param_group : dict
            ``"params"`` (tensors) and any of the constructor's
            hyperparameters; those missing take the optimizer's defaults.

        Raises
        ------
        TypeError
            A non-number hyperparameter or ``betas`` not a pair.
        ValueError
            A hyperparameter out of range, or torch's own refusals (a
            parameter already in another group, ...).
        """
        if isinstance(param_group, dict):
            merged = {**self.defaults, **param_group}
            _check_hyper(merged["lr"], merged["betas"], merged["eps"], merged["weight_decay"])
        super().add_param_group(param_group)

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        # torch's __getstate__ keeps only its own three keys
        for key in _OPTIMIZER_SETTINGS:
            state[key] = getattr(self, key)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        # Called by load_state_dict (with state and param_groups only) and by
        # unpickling. A torch.optim.Adam checkpoint lacks our group keys and
        # carries torch's (foreach, fused, ...), which are harmless here.
        super().__setstate__(state)
        for key, default in _OPTIMIZER_SETTINGS.items():
            self.__dict__.setdefault(key, default)
        self._plans = {}  # rebuilt at the next step
        self._q8_plans = {}
        # torch.optim.Adam's __setstate__ (above, by super()) has filled in its
        # group keys and made old-style numeric steps tensors; fill in ours.
        for group in self.param_groups:
            for key, default in self.defaults.items():
                group.setdefault(key, default)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """torch's ``load_state_dict``, keeping bfloat16 states bfloat16.

        torch casts loaded state tensors to their parameter's dtype; with
        ``state_dtype=torch.bfloat16`` they are cast back, which is exact
        (a bfloat16 value widened to float32 and narrowed again is unchanged).
        A ``torch.optim.Adam`` state dict loads too, and the other way round.

        Parameters
        ----------
        state_dict : dict
            What ``state_dict()`` of this class or of ``torch.optim.Adam``/``AdamW``
            returned for parameters of the same groups.

        Raises
        ------
        ValueError
            torch's checks: the number of groups or of their parameters differs.
        """
        # low-precision parameters' float32/bfloat16 states (issue 17)
        kept = _torch_lowp.keep_float32_states(self, state_dict)
        super().load_state_dict(state_dict)
        _torch_lowp.restore_float32_states(self, kept)
        _q8_torch.after_load(self)  # 8-bit states (issue 18): codes back to uint8, conversions
        if self.state_dtype is None:
            return
        for st in self.state.values():
            if "master_param" in st:  # master weights keep float32 moments
                continue
            for key in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"):
                t = st.get(key)
                if torch.is_tensor(t) and t.dtype != self.state_dtype:
                    st[key] = t.to(self.state_dtype)

    # -- stepping ----------------------------------------------------------------

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Update every parameter that has a gradient; return ``closure()``'s loss, if given.

        Everything is checked before anything is written: on an error no
        parameter, gradient or state has changed and no step count has advanced.

        Parameters
        ----------
        closure : callable or None, default None
            Re-evaluates the model and returns the loss; called with gradients
            enabled before the update.

        Returns
        -------
        object
            What ``closure`` returned, or None without one.

        Raises
        ------
        TypeError
            A parameter, gradient or state of an unsupported dtype (complex;
            a gradient of another dtype than its parameter), or a hyperparameter of the wrong
            kind, naming it (``param_groups[0]['params'][3] ...``).
        ValueError
            A non-CPU, non-dense or non-contiguous tensor, a state of the
            wrong shape, or a hyperparameter out of range, naming it.
        RuntimeError
            A sparse gradient (as ``torch.optim.Adam`` raises).
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()

        # Set by torch.amp.GradScaler.step() just before calling us (and deleted after).
        found_inf = getattr(self, "found_inf", None)
        if found_inf is not None and float(found_inf) != 0.0:
            return loss  # overflow: skip the step; nothing changes, no step is counted
        grad_scale = getattr(self, "grad_scale", None)
        if grad_scale is not None:
            grad_scale = check_positive("grad_scale", float(grad_scale))

        # Prepare (check) every group's step before applying any: on an error
        # nothing has changed, and no new state has been attached.
        prepared = []
        index = 0  # the position across groups of each group's first parameter
        for gi, group in enumerate(self.param_groups):
            prep = self._prepare_group(gi, group, index, grad_scale)
            if prep is not None:
                prepared.append(prep)
            index += len(group["params"])

        touched: list[torch.Tensor] = []
        try:
            for prep in prepared:
                for mapping, key, value in prep.pending:
                    mapping[key] = value
                prep.run()
                prep.plan.steps_np += 1  # counted only once the update has happened
                touched += prep.plan.params
                if grad_scale is not None:
                    touched += prep.grads  # the unscaled gradients were written back
        finally:
            # The writes went through NumPy, behind autograd's back: bump the
            # version counters so a graph that saved these tensors raises
            # (as after torch's own in-place update) instead of using new values.
            if touched:
                torch.autograd.graph.increment_version(touched)
        return loss

    def _prepare_group(
        self, gi: int, group: dict[str, Any], first: int, grad_scale: float | None
    ) -> _PreparedGroup | None:
        """Check group ``gi``'s step and return it ready to run (None: no parameter
        of the group has a gradient). ``first`` is the position of its first
        parameter across groups (seeds follow it)."""
        if self.min_8bit_size is not None:
            return _q8_torch.prepare_group(self, gi, group, grad_scale)
        kwargs = self._group_kwargs(group, gi, grad_scale)
        params = [p for p in group["params"] if p.grad is not None]
        if not params:
            return None
        pending: list[tuple[Any, Any, Any]] = []
        gp = self._plans.get(gi)
        if isinstance(gp, _torch_lowp.LowpPlan):  # bfloat16/float16 parameters (issue 17)
            settings = _torch_lowp.settings_of(self, first)
            if gp.still_valid(params, self.state, kwargs["amsgrad"], settings):
                lowp_prep = gp.prepare(self, kwargs, pending)
                if lowp_prep is not None:  # else a gradient is not what the plan was built for
                    return cast(_PreparedGroup, lowp_prep)
            gp = None  # rebuilt below, on whichever path the group now takes
        if gp is None or not gp.still_valid(params, self.state, kwargs["amsgrad"]):
            if _torch_lowp.takes_lowp_path(self, params):  # bfloat16/float16 (issue 17)
                lp = _torch_lowp.build_plan(self, gi, group, first, params, kwargs, pending)
                # a plan just built over these very gradients accepts them
                prep = cast(_torch_lowp.Prepared, lp.prepare(self, kwargs, pending))
                self._plans[gi] = lp
                return cast(_PreparedGroup, prep)
            gp = self._build_plan(gi, group, first, params, kwargs["amsgrad"], pending)
        grads = [p.grad for p in params]
        # The per-step checks of new gradient tensors. torch itself keeps a
        # grad's dtype, device and shape equal to its parameter's; layout and
        # memory order are what can differ.
        for g, n, p in zip(grads, gp.numels, params):
            if g.layout is not _STRIDED or not g.is_contiguous() or g.numel() != n:
                _diagnose_pair(p, g, gi, group["params"].index(p))
        addresses = np.fromiter((g.data_ptr() for g in grads), np.uintp, len(grads))
        gp.plan._rebind_grads(grads, addresses)
        run = gp.plan.prepare(
            step=gp.next_steps(), seeds=gp.seeds, state_rounding=self.state_rounding, **kwargs
        )
        self._plans[gi] = gp
        return _PreparedGroup(gp, run, grads, pending)

    def _build_plan(
        self,
        gi: int,
        group: dict[str, Any],
        first: int,
        params: list[torch.Tensor],
        amsgrad: bool,
        pending: list[tuple[Any, Any, Any]],
    ) -> _GroupPlan:
        """Check every tensor of the group's step from scratch and build its plan.

        New state (and re-homed step counts) goes to ``pending``: attached only
        once every group's step has been checked.
        """
        positions = [i for i, p in enumerate(group["params"]) if p.grad is not None]
        views: list[list[np.ndarray]] = [[], [], [], [], []]
        states, values = [], []
        identity: list[list[Any]] = []  # see tensors_unchanged
        for p, pi in zip(params, positions):
            g = cast(torch.Tensor, p.grad)  # positions: the params with a grad
            pv, gv = _view(p), _view(g)
            if (
                pv is None or gv is None or pv.dtype.char not in "fd"
                or gv.dtype != pv.dtype or gv.shape != pv.shape
                or not (pv.flags.c_contiguous and gv.flags.c_contiguous)
            ):  # fmt: skip
                pv, gv = _diagnose_pair(p, g, gi, pi)
            if np.may_share_memory(pv, gv):  # e.g. p.grad = p.data
                raise ValueError(f"the grad of {_where(gi, pi)} shares memory with the parameter")
            sdt = self.state_dtype or p.dtype
            if sdt == torch.bfloat16 and p.dtype != torch.float32:
                raise TypeError(
                    f"{_where(gi, pi)} has dtype {p.dtype}: state_dtype=torch.bfloat16 "
                    "needs float32 parameters"
                )
            st = self.state.get(p)
            if not st:
                st = {
                    "step": torch.tensor(0.0, dtype=_scalar_dtype()),
                    "exp_avg": torch.zeros_like(p, dtype=sdt, memory_format=_KEEP),
                    "exp_avg_sq": torch.zeros_like(p, dtype=sdt, memory_format=_KEEP),
                }
                pending.append((self.state, p, st))
            m = st.get("exp_avg")
            v = st.get("exp_avg_sq")
            views[2].append(_state_view(st, "exp_avg", pv, sdt, p, gi, pi))
            views[3].append(_state_view(st, "exp_avg_sq", pv, sdt, p, gi, pi))
            vmax = st.get("max_exp_avg_sq")
            if amsgrad:
                if vmax is None:  # amsgrad switched on after the state was made
                    vmax = torch.zeros_like(p, dtype=sdt, memory_format=_KEEP)
                    pending.append((st, "max_exp_avg_sq", vmax))
                    views[4].append(cast(np.ndarray, _numpy_of(vmax)))  # new, dense: a view
                else:
                    views[4].append(_state_view(st, "max_exp_avg_sq", pv, sdt, p, gi, pi))
            values.append(_step_value(st, _where(gi, pi)))
            views[0].append(pv)
            views[1].append(gv)
            states.append(st)
            watched = [("exp_avg", m), ("exp_avg_sq", v)]
            if amsgrad:
                watched.append(("max_exp_avg_sq", vmax))
            identity.append([p, p.data_ptr(), st, watched])
        plan = _TorchPlan(
            gi, positions, *views[:4], views[4] if amsgrad else None, backend=self.backend
        )
        # The group's step counts in one buffer; state["step"] become views of it.
        steps = torch.tensor(values, dtype=_scalar_dtype())
        for st, ident, view in zip(states, identity, steps.unbind()):
            pending.append((st, "step", view))
            ident[3].append(("step", view))  # the very view that will be attached
        seeds = np.array(positions, np.uint64) + np.uint64(first)
        seeds += np.uint64(self.seed)  # wraps modulo 2**64, as in the NumPy optimizer
        return _GroupPlan(
            params, [(p, ptr, st, tuple(w)) for p, ptr, st, w in identity], plan, steps.numpy(),
            seeds, amsgrad,
            [p.numel() for p in params],
        )  # fmt: skip

    def _group_kwargs(self, group: dict[str, Any], gi: int, grad_scale: float | None) -> dict:
        """adam_step's keyword arguments for one group, checked.

        Checked on every step: a scheduler or the user may have changed them.
        """
        try:
            lr, beta1, beta2, eps, wd = _check_hyper(
                group["lr"], group["betas"], group["eps"], group["weight_decay"]
            )
        except (TypeError, ValueError) as exc:
            raise type(exc)(f"param_groups[{gi}]: {exc}") from None
        return {
            "lr": lr,
            "beta1": beta1,
            "beta2": beta2,
            "eps": eps,
            "weight_decay": wd,
            "decoupled_weight_decay": bool(group["decoupled_weight_decay"]),
            "amsgrad": bool(group["amsgrad"]),
            "maximize": bool(group["maximize"]),
            "eps_hat": bool(group["eps_hat"]),
            "grad_scale": grad_scale,
        }


class AdamW(Adam, torch.optim.AdamW):
    """``torch.optim.AdamW`` on fastadam kernels: Adam with decoupled weight decay.

    :class:`Adam` with ``decoupled_weight_decay=True`` (always on) and torch's
    default ``weight_decay=1e-2``.

    Parameters
    ----------
    params : iterable
        Tensors, ``(name, tensor)`` pairs, or param-group dicts.
    lr : float or torch.Tensor, default 1e-3
        Learning rate, finite and >= 0.
    betas : tuple of (float, float), default (0.9, 0.999)
        Decay rates of the first and second moments, in [0, 1).
    eps : float, default 1e-8
        Added to the denominator, finite and >= 0.
    weight_decay : float, default 1e-2
        Finite and >= 0: each step first multiplies the weights by
        ``1 - lr * weight_decay``.
    amsgrad : bool, default False
        Use the running maximum of the second moment.
    maximize : bool, default False
        Ascend the objective instead of descending it.
    foreach, fused : bool or None, default None
        Accepted and ignored.
    capturable, differentiable : bool, default False
        Only ``False`` is supported.
    eps_hat : bool, default False
        The Keras/TensorFlow/scikit-learn placement of ``eps``
        (``lr * sqrt(1 - beta2^t) / (1 - beta1^t) * m / (sqrt(v) + eps)``).
    state_dtype : {None, torch.float32, torch.bfloat16, "float32", "bfloat16", "8bit"}, default None
        dtype of the moment estimates: None (the parameter's),
        ``torch.float32``, or ``torch.bfloat16`` for float32 parameters (half
        the optimizer memory; stochastically rounded, see ``state_rounding``);
        bfloat16/float16 parameters (without ``master_weights``) may keep
        float32 or bfloat16 moments too (the same float32 arithmetic as with
        moments of their own dtype; only the storage changes);
        ``"8bit"``: 8-bit block-wise states for float32 parameters of at least
        ``min_8bit_size`` elements (uint8 codes ``exp_avg``/``exp_avg_sq`` and
        float32 scales ``exp_avg_absmax``/``exp_avg_sq_absmax``; about 2 bytes
        per element; no amsgrad), float32 for smaller ones.
    state_rounding : {"stochastic", "nearest"}, default "stochastic"
        How bfloat16 states are rounded. With ``state_dtype=None``, a bfloat16
        parameter's moments (its own dtype) are rounded to nearest, as
        ``torch.optim.AdamW(fused=True)`` does; float16 moments always are.
    seed : int, default 0
        Base seed of stochastic rounding, in [0, 2**64); the parameter at
        position ``i`` (across groups, as numbered in ``state_dict``) uses
        ``seed + i``.
    backend : {"auto", "numpy", "numba", "c"}, default "auto"
        The kernels to run, one per optimizer (kept out of the param groups,
        so checkpoints carry none).
    min_8bit_size : int, default 4096
        With ``state_dtype="8bit"``: parameters with fewer elements keep
        float32 states.
    master_weights : bool, default False
        For bfloat16/float16 parameters: keep a float32 copy of each in
        ``state["master_param"]`` (with float32 moments), update it, and write
        the rounded result into the parameter in the same pass
        (``state_dtype`` does not apply to these float32 moments). Without
        it, such parameters keep moments of their own dtype and are updated as
        ``torch.optim.AdamW(fused=True)`` updates them, bit for bit, or moments
        of ``state_dtype``.
    param_rounding : {"nearest", "stochastic"}, default "nearest"
        How bfloat16/float16 parameters are rounded: nearest-even, or
        stochastically (unbiased), with the random bits of ``seed``, the
        parameter's position and the step.

    Raises
    ------
    TypeError
        A non-number hyperparameter, ``betas`` not a pair, or a non-str
        backend.
    ValueError
        A hyperparameter out of range, ``capturable=True`` or
        ``differentiable=True``, an unknown ``state_dtype``,
        ``state_rounding`` or backend, or an empty parameter list.
    BackendUnavailableError
        The backend named cannot load on this machine.

    Examples
    --------
    >>> import torch, fastadam.torch
    >>> model = torch.nn.Linear(4, 2)
    >>> opt = fastadam.torch.AdamW(model.parameters(), lr=1e-3)
    >>> sched = torch.optim.lr_scheduler.StepLR(opt, step_size=10, gamma=0.5)
    >>> model(torch.ones(3, 4)).sum().backward()
    >>> opt.step()
    >>> sched.step()
    """

    def __init__(
        self,
        params: ParamsT,
        lr: float | torch.Tensor = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        amsgrad: bool = False,
        *,
        maximize: bool = False,
        foreach: bool | None = None,
        capturable: bool = False,
        differentiable: bool = False,
        fused: bool | None = None,
        eps_hat: bool = False,
        state_dtype: torch.dtype | None = None,
        state_rounding: str = "stochastic",
        seed: int = 0,
        backend: str = "auto",
        min_8bit_size: int = 4096,
        master_weights: bool = False,
        param_rounding: str = "nearest",
    ) -> None:
        super().__init__(
            params, lr, betas, eps, weight_decay, amsgrad, foreach=foreach, maximize=maximize,
            capturable=capturable, differentiable=differentiable, fused=fused,
            decoupled_weight_decay=True, eps_hat=eps_hat, state_dtype=state_dtype,
            state_rounding=state_rounding, seed=seed, backend=backend,
            min_8bit_size=min_8bit_size, master_weights=master_weights,
            param_rounding=param_rounding,
        )  # fmt: skip

    # __setstate__: torch.optim.AdamW's (next in the MRO after Adam's) keeps
    # decoupled_weight_decay on for a loaded Adam checkpoint.
