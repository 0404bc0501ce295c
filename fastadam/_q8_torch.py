"""``state_dtype="8bit"`` for :class:`fastadam.torch.Adam`/``AdamW`` (issue 18).

Parameters of at least ``min_8bit_size`` elements keep 8-bit block-wise
states (:mod:`fastadam._q8`) as torch tensors: ``state["exp_avg"]`` and
``state["exp_avg_sq"]`` uint8 codes of the parameter's shape,
``state["exp_avg_absmax"]`` and ``state["exp_avg_sq_absmax"]`` float32 scales
(``ceil(numel / 256)``). Smaller ones keep float32 states. Each group's step
goes through the public API, :func:`fastadam.adam_step_multi`, over zero-copy
NumPy views: one call for the float32 tensors, one for the 8-bit ones.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

import fastadam

from . import _q8


@dataclass(eq=False)
class _GroupPlan:
    """One group's 8-bit step, built over its tensors and kept while they stay
    the same, as fastadam.torch's float32 ``_GroupPlan``: a later step checks
    the identities and the new gradients, and rebinds the gradients' addresses.

    The group's step counts are one tensor, seen through ``steps_np``; each
    parameter's ``state["step"]`` is a 0-d view into it (torch's layout: one
    0-d float32 tensor each), so a step reads and advances them together.
    """

    params: list[torch.Tensor]
    identity: list[tuple[Any, ...]]  # per parameter: see fastadam.torch.tensors_unchanged
    parts: list[tuple[Any, np.ndarray]]  # (plan, positions in params): float32, 8-bit
    steps_np: np.ndarray  # view of the counts' tensor (which it keeps alive)
    numels: list[int]
    min_8bit_size: int
    backend: str

    def still_valid(self, opt: Any, params: list[torch.Tensor]) -> bool:
        from .torch import tensors_unchanged  # fastadam.torch imports this module

        return (
            opt.min_8bit_size == self.min_8bit_size
            and opt.backend == self.backend
            and tensors_unchanged(params, self.identity, opt.state)
        )


_KEYS = ("exp_avg", "exp_avg_sq", "exp_avg_absmax", "exp_avg_sq_absmax")


class _Prepared:
    def __init__(self, plan: _GroupPlan, run: Any, grads: list, pending: list) -> None:
        self.plan, self.run, self.grads, self.pending = plan, run, grads, pending


def _np(t: torch.Tensor, what: str) -> np.ndarray:
    if t.device.type != "cpu" or t.layout is not torch.strided or not t.is_contiguous():
        raise ValueError(f"{what} must be a dense, contiguous CPU tensor")
    return t.detach().numpy()


def prepare_group(opt: Any, gi: int, group: dict, grad_scale: float | None) -> Any:
    """fastadam.torch's ``_prepare_group`` with 8-bit states (same contract)."""
    kwargs = opt._group_kwargs(group, gi, grad_scale)
    if kwargs.pop("amsgrad"):
        raise ValueError(f"param_groups[{gi}]: amsgrad=True is not supported with 8-bit states")
    params = [p for p in group["params"] if p.grad is not None]
    if not params:
        return None
    plans = opt._q8_plans
    gp = plans.get(gi)
    pending: list[tuple[Any, Any, Any]] = []  # new state, attached once every group is checked
    grads = [p.grad for p in params]
    if gp is None or not gp.still_valid(opt, params) or not _grads_fit(grads, gp.numels):
        gp = _build_plan(opt, gi, group, pending)  # checks every tensor; raises what is wrong
    addresses = np.fromiter((g.data_ptr() for g in grads), np.uintp, len(grads))
    from .torch import next_steps

    step = next_steps(gp.steps_np)
    calls = []
    for plan, pos in gp.parts:
        plan._rebind_grads([grads[i] for i in pos], addresses[pos])
        # unequal counts: each one's int, checked by the plan
        steps = step if isinstance(step, int) else [int(s) for s in step[pos].tolist()]
        calls.append(plan.prepare(step=steps, **kwargs))
    plans[gi] = gp

    def run() -> None:
        for c in calls:
            c()

    return _Prepared(gp, run, grads, pending)


def _grads_fit(grads: list[torch.Tensor], numels: list[int]) -> bool:
    """The per-step check of new gradient tensors (torch keeps a grad's dtype,
    device and shape equal to its parameter's; layout and memory order can differ)."""
    for g, n in zip(grads, numels):
        if g.dtype is not torch.float32 or g.layout is not torch.strided:
            return False
        if not g.is_contiguous() or g.numel() != n:
            return False
    return True


def _build_plan(opt: Any, gi: int, group: dict, pending: list) -> _GroupPlan:
    """Check every tensor of group ``gi`` from scratch and build its plan; new
    state (and re-homed step counts) goes to ``pending``."""
    positions = [i for i, p in enumerate(group["params"]) if p.grad is not None]
    params = [group["params"][i] for i in positions]
    lists: dict[bool, list] = {False: [[], [], [], [], [], []], True: [[], [], [], [], [], []]}
    where_of: dict[bool, list[int]] = {False: [], True: []}
    identity, values, states = [], [], []
    for k, (pi, p) in enumerate(zip(positions, params)):
        where = f"param_groups[{gi}]['params'][{pi}]"
        if p.dtype != torch.float32:
            raise TypeError(f"{where} has dtype {p.dtype}: state_dtype='8bit' needs float32")
        big = p.numel() >= opt.min_8bit_size
        st = opt.state.get(p)
        if not st:
            st = {"step": torch.tensor(0.0, dtype=torch.float32)}
            if big:
                nb = _q8.nblocks(p.numel())
                st["exp_avg"] = torch.zeros(p.shape, dtype=torch.uint8)
                st["exp_avg_sq"] = torch.zeros(p.shape, dtype=torch.uint8)
                st["exp_avg_absmax"] = torch.zeros(nb, dtype=torch.float32)
                st["exp_avg_sq_absmax"] = torch.zeros(nb, dtype=torch.float32)
            else:
                st["exp_avg"] = torch.zeros_like(p, memory_format=torch.contiguous_format)
                st["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.contiguous_format)
            pending.append((opt.state, p, st))
        big = "exp_avg_absmax" in st
        keys = ("exp_avg", "exp_avg_sq") + (("exp_avg_absmax", "exp_avg_sq_absmax") if big else ())
        arrays = [_np(p, where), _np(p.grad, f"the grad of {where}")]
        arrays += [_np(st[key], f"state[{key!r}] of {where}") for key in keys]
        for r, a in enumerate(arrays):
            lists[big][r].append(a)
        where_of[big].append(k)
        value = float(st["step"])
        if not (value >= 0 and value.is_integer()):
            raise ValueError(f"state['step'] of {where} must be a non-negative integer")
        values.append(value)
        states.append(st)
        # the scales' keys too: None for a float32-state tensor, and must stay absent
        identity.append([p, p.data_ptr(), st, [(key, st.get(key)) for key in _KEYS]])
    parts = []
    for big in (False, True):
        if not where_of[big]:
            continue
        ls = lists[big]
        if big:  # checks every array now
            plan: Any = _q8.Q8Plan(*ls, backend=opt.backend, _private_views=True)
        else:
            plan = fastadam.MultiTensorPlan(*ls[:4], backend=opt.backend, _private_views=True)
        parts.append((plan, np.array(where_of[big], np.intp)))
    # The group's step counts in one tensor; state["step"] become views of it.
    steps = torch.tensor(values, dtype=torch.float32)
    for st, ident, view in zip(states, identity, steps.unbind()):
        pending.append((st, "step", view))
        ident[3].append(("step", view))  # the very view that will be attached
    return _GroupPlan(
        params, [(p, ptr, st, tuple(w)) for p, ptr, st, w in identity], parts, steps.numpy(),
        [p.numel() for p in params], opt.min_8bit_size, opt.backend,
    )  # fmt: skip


def after_load(opt: Any) -> None:
    """Bring loaded state to this optimizer's format: torch casts every loaded state
    tensor to its parameter's dtype, so 8-bit codes come back as float32 values."""
    want_8bit = getattr(opt, "min_8bit_size", None)
    for p, st in opt.state.items():
        if not isinstance(st, dict) or "exp_avg" not in st:
            continue
        is_8bit = "exp_avg_absmax" in st
        big = want_8bit is not None and p.numel() >= want_8bit
        if is_8bit:
            for k in ("exp_avg", "exp_avg_sq"):
                st[k] = st[k].to(torch.uint8)
            for k in ("exp_avg_absmax", "exp_avg_sq_absmax"):
                st[k] = st[k].to(torch.float32).contiguous()
            nb = _q8.nblocks(p.numel())
            for k in ("exp_avg_absmax", "exp_avg_sq_absmax"):
                if tuple(st[k].shape) != (nb,):
                    raise ValueError(f"state[{k!r}] has shape {tuple(st[k].shape)}, want ({nb},)")
            if not big:  # to float states
                m = _q8.dequantize(st["exp_avg"].numpy(), st["exp_avg_absmax"].numpy(), True)
                v = _q8.dequantize(st["exp_avg_sq"].numpy(), st["exp_avg_sq_absmax"].numpy(), False)
                st["exp_avg"] = torch.from_numpy(m).to(p.dtype)
                st["exp_avg_sq"] = torch.from_numpy(v).to(p.dtype)
                del st["exp_avg_absmax"], st["exp_avg_sq_absmax"]
        elif big:  # float states to 8-bit
            if "max_exp_avg_sq" in st:
                raise ValueError("a state with 'max_exp_avg_sq' (amsgrad) cannot be 8-bit")
            m = st["exp_avg"].detach().to(torch.float32).contiguous().numpy()
            v = st["exp_avg_sq"].detach().to(torch.float32).clamp_min(0).contiguous().numpy()
            mc, ma = _q8.quantize(m, signed=True)
            vc, va = _q8.quantize(v, signed=False)
            st["exp_avg"], st["exp_avg_sq"] = torch.from_numpy(mc), torch.from_numpy(vc)
            st["exp_avg_absmax"], st["exp_avg_sq_absmax"] = (
                torch.from_numpy(ma),
                torch.from_numpy(va),
            )
