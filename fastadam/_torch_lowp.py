"""fastadam.torch's groups with bfloat16/float16 parameters or master weights (issue 17).

A group takes this path when it holds a bfloat16/float16 parameter. Each step
checks every tensor (views are made afresh: a few microseconds per tensor), then runs one
:func:`fastadam._lowp.step_rows` call per kind of step; float32/float64
parameters of such a group take :func:`fastadam.adam_step`.

* bfloat16/float16 parameters, ``master_weights=False``: states of the
  parameter's dtype, updated as ``torch.optim.AdamW(fused=True)`` does, bit for
  bit (moments rounded to nearest); or, with ``state_dtype``, float32 or
  bfloat16 moments (the same arithmetic; bfloat16 ones rounded as
  ``state_rounding`` says).
* ``master_weights=True``: ``state["master_param"]`` is a float32 copy of the
  parameter (made at its first step), updated with float32 moments; the
  parameter receives the rounded master in the same pass.

Everything is checked before anything is written, as on the float path.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

import fastadam

from . import _lowp
from ._validation import BFLOAT16, check_hyper
from .multi import rounding_keys

LOWP_TORCH = (torch.bfloat16, torch.float16)
_MASTER_KEYS = ("master_param", "exp_avg", "exp_avg_sq", "max_exp_avg_sq")


def takes_lowp_path(opt: Any, params: list[torch.Tensor]) -> bool:
    """Whether a group of ``opt`` with these parameters (those with a grad) takes this path."""
    return any(p.dtype in LOWP_TORCH for p in params)


def _where(gi: int, pi: int) -> str:
    return f"param_groups[{gi}]['params'][{pi}]"


def _numpy(t: torch.Tensor, what: str) -> np.ndarray:
    """Zero-copy NumPy view of a dense contiguous CPU tensor (bfloat16 through its bits)."""
    from .torch import _check_layout  # fastadam.torch imports this module

    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{what} must be a tensor, got {type(t).__name__}")
    _check_layout(what, t, is_grad=what.startswith("the grad"))
    d = t.detach()
    if d.dtype == torch.bfloat16:
        return d.view(torch.int16).numpy().view(BFLOAT16)
    if d.dtype not in (torch.float16, torch.float32, torch.float64):
        raise TypeError(f"{what} has dtype {d.dtype}: fastadam.torch supports float16, "
                        "bfloat16, float32 and float64 tensors")  # fmt: skip
    return d.numpy()


class _Steps:
    """The group's ``state["step"]`` tensors, advanced together by ``+= 1``."""

    def __init__(self, tensors: list[torch.Tensor]) -> None:
        self.tensors = tensors

    def __iadd__(self, k: int) -> _Steps:
        for t in self.tensors:
            t.add_(k)
        return self


@dataclass(eq=False)
class _Plan:
    """What fastadam.torch.Adam.step reads of a prepared group's plan."""

    params: list[torch.Tensor]
    steps_np: _Steps


@dataclass(eq=False)
class Prepared:
    """One group's checked step (as fastadam.torch's _PreparedGroup)."""

    plan: _Plan
    run: Callable[[], None]
    grads: list[torch.Tensor]
    pending: list[tuple[Any, Any, Any]] = field(default_factory=list)


def prepare_group(
    opt: Any, gi: int, group: dict[str, Any], first: int, kwargs: dict[str, Any]
) -> Prepared | None:
    """Check group ``gi``'s step (this path) and return it ready to run; None when no
    parameter has a gradient. ``first``: the position of its first parameter across
    groups (the seeds follow it); ``kwargs``: adam_step's checked hyperparameters."""
    positions = [i for i, p in enumerate(group["params"]) if p.grad is not None]
    if not positions:
        return None
    master = bool(opt.master_weights)
    amsgrad = bool(kwargs["amsgrad"])
    hp = check_hyper(kwargs["lr"], kwargs["beta1"], kwargs["beta2"], kwargs["eps"],
                     kwargs["weight_decay"], kwargs["grad_scale"], opt.state_rounding)  # fmt: skip
    flags = (kwargs["decoupled_weight_decay"], amsgrad, kwargs["maximize"], kwargs["eps_hat"])
    pending: list[tuple[Any, Any, Any]] = []
    rows: dict[str, list[tuple[Any, ...]]] = {}
    row_steps: dict[str, list[int]] = {}
    row_seeds: dict[str, list[int]] = {}
    others: list[Callable[[], None]] = []
    params, grads, step_tensors = [], [], []
    for pi in positions:
        p = group["params"][pi]
        where = _where(gi, pi)
        g = p.grad
        pv = _numpy(p, where)
        gv = _numpy(g, f"the grad of {where}")
        lowp = p.dtype in LOWP_TORCH
        if lowp:
            # master weights keep float32 moments; else state_dtype's (float32 or
            # bfloat16), or the parameter's own
            sdt = torch.float32 if master else opt.state_dtype or p.dtype
        else:
            sdt = opt.state_dtype or p.dtype
        st = opt.state.get(p)
        if not st:
            st = {
                "step": torch.tensor(0.0, dtype=torch.float32),
                "exp_avg": torch.zeros_like(p, dtype=sdt, memory_format=torch.preserve_format),
                "exp_avg_sq": torch.zeros_like(p, dtype=sdt, memory_format=torch.preserve_format),
            }
            if lowp and master:
                st["master_param"] = p.detach().to(torch.float32, copy=True)
            pending.append((opt.state, p, st))
        elif lowp and master and "master_param" not in st:
            mp = p.detach().to(torch.float32, copy=True)  # master_weights turned on later
            st = dict(st)
            st["master_param"] = mp
            pending.append((opt.state, p, st))
        if amsgrad and st.get("max_exp_avg_sq") is None:
            vmax = torch.zeros_like(p, dtype=sdt, memory_format=torch.preserve_format)
            if st is opt.state.get(p):
                st = dict(st)
                pending.append((opt.state, p, st))
            st["max_exp_avg_sq"] = vmax
        names = [f"state[{k!r}] of {where}" for k in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")]
        m = _numpy(st.get("exp_avg"), names[0])
        v = _numpy(st.get("exp_avg_sq"), names[1])
        vm = _numpy(st["max_exp_avg_sq"], names[2]) if amsgrad else None
        t = st.get("step")
        try:
            step = int(float(t)) + 1
        except (TypeError, ValueError, RuntimeError):
            raise ValueError(f"state['step'] of {where} must be a number, got {t!r}") from None
        seed = (opt.seed + first + pi) % 2**64
        if lowp:
            copy = None
            param = pv
            if master:
                param = _numpy(st["master_param"], f"state['master_param'] of {where}")
                copy = pv
            kind = _lowp.validate_lowp(
                param, gv, m, v, vm, amsgrad, copy,
                names=(f"state['master_param'] of {where}" if master else where,
                       f"the grad of {where}", names[0], names[1], names[2], where),
            )  # fmt: skip
            if master and param.shape != pv.shape:
                raise ValueError(f"state['master_param'] of {where} has the wrong shape")
            rows.setdefault(kind, []).append((param, gv, m, v, vm, copy))
            row_steps.setdefault(kind, []).append(step)
            row_seeds.setdefault(kind, []).append(seed)
        else:
            others.append(_float_step(pv, gv, m, v, vm, step, seed, kwargs, opt))
        if isinstance(t, torch.Tensor) and t.numel() == 1:
            step_tensors.append(t)
        else:
            t = torch.tensor(float(step - 1), dtype=torch.float32)
            st = st if st is not opt.state.get(p) else dict(st)
            st["step"] = t
            pending.append((opt.state, p, st))
            step_tensors.append(t)
        params.append(p)
        grads.append(g)
    state_rounding = _lowp.optimizer_state_rounding(opt.state_dtype, opt.state_rounding)
    calls = []
    for kind, krows in rows.items():
        steps = np.array(row_steps[kind], np.uint64)
        unique, inverse = np.unique(steps, return_inverse=True)
        scalars = tuple(_lowp.scalars_of(int(s), hp, flags) for s in unique)
        index = None if len(scalars) == 1 else inverse.astype(np.int32)
        rounding = _lowp.rounding_of(kind, _lowp.check_param_rounding(opt.param_rounding),
                                     state_rounding)  # fmt: skip
        keys = None
        if rounding:  # the parameter's or the moments' stochastic rounding
            keys = rounding_keys(np.array(row_seeds[kind], np.uint64), steps)
        calls.append((kind, krows, scalars, index, keys, rounding))
    fastadam.backends.get(opt.backend)
    backend = opt.backend

    def run() -> None:
        for kind, krows, scalars, index, keys, rounding in calls:
            _lowp.step_rows(backend, kind, krows, scalars, index, keys, rounding)
        for f in others:
            f()

    return Prepared(_Plan(params, _Steps(step_tensors)), run, grads, pending)


def _float_step(p, g, m, v, vm, step, seed, kwargs, opt) -> Callable[[], None]:
    """A float32/float64 parameter of a group on this path: one adam_step, checked now."""
    from ._validation import validate_arrays

    validate_arrays(p, g, m, v, vm, kwargs["amsgrad"])

    def run() -> None:
        fastadam.adam_step(p, g, m, v, step=step, max_exp_avg_sq=vm, seed=seed,
                           state_rounding=opt.state_rounding, backend=opt.backend,
                           **kwargs)  # fmt: skip

    return run


def keep_float32_states(opt: Any, state_dict: dict[str, Any]) -> list[tuple[Any, str, Any]]:
    """The float32 and bfloat16 tensors of low-precision parameters' states in
    ``state_dict`` whose dtype is not the parameter's (master weights, their
    moments, ``state_dtype`` moments), which torch's load_state_dict would cast
    to the parameter's dtype (a bfloat16 moment cast to float16 can lose its
    value): (parameter, key, tensor) to put back after it."""
    kept = []
    try:
        groups = state_dict["param_groups"]
        state = state_dict["state"]
        for gi, group in enumerate(groups):
            for pos, pid in enumerate(group["params"]):
                p = opt.param_groups[gi]["params"][pos]
                if p.dtype not in LOWP_TORCH or pid not in state:
                    continue
                for key in _MASTER_KEYS:
                    t = state[pid].get(key)
                    if (
                        isinstance(t, torch.Tensor)
                        and t.dtype in (torch.float32, torch.bfloat16)
                        and t.dtype != p.dtype
                    ):
                        kept.append((p, key, t))
    except (KeyError, IndexError, TypeError, AttributeError):
        return []  # torch's own checks then say what is wrong with the state dict
    return kept


def restore_float32_states(opt: Any, kept: list[tuple[Any, str, Any]]) -> None:
    for p, key, t in kept:
        st = opt.state.get(p)
        if st is not None:
            st[key] = t.detach().clone()
