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

from typing import Any

import numpy as np
import torch

import fastadam

from . import _q8


class _Steps:
    """``steps_np += 1`` of fastadam.torch's step loop, over the group's step tensors."""

    def __init__(self, tensors: list[torch.Tensor]) -> None:
        self.tensors = tensors

    def __iadd__(self, k: int) -> _Steps:
        for t in self.tensors:
            t += k
        return self


class _Plan:
    def __init__(self, params: list[torch.Tensor], steps: list[torch.Tensor]) -> None:
        self.params = params
        self.steps_np = _Steps(steps)


class _Prepared:
    def __init__(self, plan: _Plan, run: Any, grads: list, pending: list) -> None:
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
    positions = [i for i, p in enumerate(group["params"]) if p.grad is not None]
    if not positions:
        return None
    params = [group["params"][i] for i in positions]
    pending: list = []
    lists: dict[bool, list] = {False: [[], [], [], [], [], []], True: [[], [], [], [], [], []]}
    steps: dict[bool, list] = {False: [], True: []}
    for pi, p in zip(positions, params):
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
        arrays += [_np(st[k], f"state[{k!r}] of {where}") for k in keys]
        for r, a in enumerate(arrays):
            lists[big][r].append(a)
        value = float(st["step"])
        if not (value >= 0 and value.is_integer()):
            raise ValueError(f"state['step'] of {where} must be a non-negative integer")
        steps[big].append((int(value) + 1, st))
    calls = []
    for big in (False, True):
        if not steps[big]:
            continue
        ls = lists[big]
        counts = [s for s, _ in steps[big]]
        step = counts[0] if counts.count(counts[0]) == len(counts) else counts
        extra = {"exp_avg_absmaxes": ls[4], "exp_avg_sq_absmaxes": ls[5]} if big else {}
        # check now (builds the plan); the run only calls the kernels
        if big:
            plan: Any = _q8.Q8Plan(*ls, backend=opt.backend)
            calls.append(plan.prepare(step=step, **kwargs))
        else:
            fplan = fastadam.MultiTensorPlan(*ls[:4], backend=opt.backend)
            calls.append(fplan.prepare(step=step, **kwargs, **extra))

    def run() -> None:
        for c in calls:
            c()

    step_tensors = [st["step"] for big in (False, True) for _, st in steps[big]]
    # new state's step tensors are in pending; they are the ones counted
    return _Prepared(_Plan(params, step_tensors), run, [p.grad for p in params], pending)


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
