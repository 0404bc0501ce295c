"""``state_dtype="8bit"`` for :class:`fastadam.Adam`/:class:`fastadam.AdamW` (issue 18).

Parameters of at least ``min_8bit_size`` elements keep their moments as 8-bit
block-wise states (:mod:`fastadam._q8`): ``state[i]`` holds ``exp_avg`` and
``exp_avg_sq`` (uint8 codes, the parameter's shape) and ``exp_avg_absmax`` and
``exp_avg_sq_absmax`` (float32, one scale per block of 256). Smaller ones keep
float32 states. Each group's step is one call for its float32 tensors and one
(a :class:`fastadam._q8.Q8Plan`) for its 8-bit ones.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from . import _q8

Q8_KEYS = ("exp_avg", "exp_avg_sq", "exp_avg_absmax", "exp_avg_sq_absmax")


def is_8bit(state_dtype: object) -> bool:
    """Whether an optimizer's ``state_dtype`` asks for 8-bit states."""
    return isinstance(state_dtype, str) and state_dtype.lower() in ("8bit", "int8", "q8")


def check_min_size(min_8bit_size: object) -> int:
    if isinstance(min_8bit_size, bool) or not isinstance(min_8bit_size, (int, np.integer)):
        raise TypeError(f"min_8bit_size must be an int, got {type(min_8bit_size).__name__}")
    if min_8bit_size < 0:
        raise ValueError(f"min_8bit_size must be >= 0, got {min_8bit_size}")
    return int(min_8bit_size)


def prepare_group(opt: Any, gi: int, group: dict, active: list[int], params: list,
                  grads: list, grad_scale: float | None, found_inf: bool,
                  pending: list) -> tuple[Any, list]:  # fmt: skip
    """The optimizer's ``_prepare_group`` with 8-bit states (same contract)."""
    if group["amsgrad"]:
        raise ValueError(f"param_groups[{gi}]: amsgrad=True is not supported with 8-bit states")
    big = [i for i in active if params[i].size >= opt.min_8bit_size]
    small = [i for i in active if params[i].size < opt.min_8bit_size]
    runs, states = [], []
    if small:
        small_run, st = opt._prepare_group(gi, group, small, params, grads, grad_scale,
                                           found_inf, pending, _plain=True)  # fmt: skip
        runs.append(small_run)
        states += st
    if big:
        q8_states = []
        for i in big:
            st = opt.state.get(i)
            if st is None:
                m, v, am, av = _q8.zeros_state(params[i].shape)
                st = {"step": 0, "exp_avg": m, "exp_avg_sq": v, "exp_avg_absmax": am,
                      "exp_avg_sq_absmax": av}  # fmt: skip
                pending.append((opt.state, i, st))
            q8_states.append(st)
        key = tuple((id(params[i]),) + tuple(id(st[k]) for k in Q8_KEYS)
                    for i, st in zip(big, q8_states))  # fmt: skip
        plans = opt.__dict__.setdefault("_q8_plans", {})
        cached = plans.get(gi)
        if cached is not None and cached[0] == key:
            plan = cached[1]
        else:
            plan = _q8.Q8Plan(
                [params[i] for i in big], [grads[i] for i in big],
                *([st[k] for st in q8_states] for k in Q8_KEYS), backend=opt.backend,
            )  # fmt: skip
            plans[gi] = (key, plan)
        steps = [st["step"] + 1 for st in q8_states]
        beta1, beta2 = group["betas"]
        runs.append(plan.prepare(
            step=steps[0] if steps.count(steps[0]) == len(steps) else np.array(steps),
            lr=group["lr"], beta1=beta1, beta2=beta2, eps=group["eps"],
            weight_decay=group["weight_decay"],
            decoupled_weight_decay=group["decoupled_weight_decay"],
            maximize=group["maximize"], eps_hat=group["eps_hat"], grad_scale=grad_scale,
            found_inf=found_inf, grads=[grads[i] for i in big],
        ))  # fmt: skip
        states += q8_states

    def run() -> None:
        for r in runs:
            r()

    return run, states


def convert_state(sid: object, st: Any, p: np.ndarray, want_8bit: bool, float_dtype: Any) -> dict:
    """A loaded state for parameter ``p``: copied, and converted between 8-bit
    and float states where the checkpoint and this optimizer differ (quantized
    with :func:`fastadam._q8.quantize`; see its error bound). Raises ValueError
    (naming the key) on a bad shape or dtype, before anything changes."""
    if "max_exp_avg_sq" in st and want_8bit:
        raise ValueError(f"state[{sid!r}] has 'max_exp_avg_sq' (amsgrad): not with 8-bit states")
    saved_8bit = "exp_avg_absmax" in st or "exp_avg_sq_absmax" in st
    out: dict = {}
    if saved_8bit:
        nb = _q8.nblocks(p.size)
        for key in Q8_KEYS:
            if key not in st:
                raise ValueError(f"state for parameter {sid!r} lacks {key!r} (8-bit state)")
            a = np.asarray(st[key])
            shape, dtype = (p.shape, np.uint8) if "absmax" not in key else ((nb,), np.float32)
            if a.shape != shape or a.dtype != dtype:
                raise ValueError(
                    f"state[{sid!r}][{key!r}] has shape {a.shape} and dtype {a.dtype}, but an "
                    f"8-bit state of this parameter has shape {shape} and dtype {np.dtype(dtype)}"
                )
            out[key] = np.array(a, order="C", copy=True)
        if want_8bit:
            return out
        m = _q8.dequantize(out["exp_avg"], out["exp_avg_absmax"], signed=True)
        v = _q8.dequantize(out["exp_avg_sq"], out["exp_avg_sq_absmax"], signed=False)
        return {"exp_avg": m.astype(float_dtype), "exp_avg_sq": v.astype(float_dtype)}
    for key in ("exp_avg", "exp_avg_sq"):
        if key not in st:
            raise ValueError(f"state for parameter {sid!r} lacks {key!r}")
        a = np.asarray(st[key])
        if a.shape != p.shape or a.dtype.kind != "f":
            raise ValueError(
                f"state[{sid!r}][{key!r}] has shape {a.shape} and dtype {a.dtype}, but this "
                f"optimizer keeps shape {p.shape} and a float dtype for that parameter"
            )
        out[key] = a
    if not want_8bit:
        return {k: np.array(a, dtype=float_dtype, order="C", copy=True) for k, a in out.items()}
    m_codes, m_absmax = _q8.quantize(np.asarray(out["exp_avg"], np.float32), signed=True)
    v_codes, v_absmax = _q8.quantize(
        np.maximum(np.asarray(out["exp_avg_sq"], np.float32), np.float32(0)), signed=False
    )
    return {"exp_avg": m_codes, "exp_avg_sq": v_codes, "exp_avg_absmax": m_absmax,
            "exp_avg_sq_absmax": v_absmax}  # fmt: skip
