"""fastadam.torch's groups with bfloat16/float16 parameters or master weights (issue 17).

A group takes this path when it holds a bfloat16/float16 parameter. As on the
float32 path (fastadam.torch's ``_GroupPlan``), the group's first step checks
every tensor and builds a :class:`LowpPlan`: NumPy views of the parameters and
their states, the C library's pointer tables, the seeds, and the step counts
re-homed into one tensor. Later steps keep the plan while the group stays the
same (:func:`fastadam.torch.tensors_unchanged`, plus the optimizer settings
the plan was built for): they check the new gradients (a few attribute reads
each), rebind their addresses, compute the scalars of the step (once per
group and kind, in float64, from the hyperparameters of the moment) and run
one :func:`fastadam._lowp.step_rows`-equivalent call per kind of step;
float32/float64 parameters of such a group take one multi-tensor step
(fastadam.torch's ``_TorchPlan``). Anything else changed from outside (a
parameter replaced or resized, a gradient gone or new, or of another dtype,
layout or device, state replaced by ``load_state_dict``, ``master_weights``,
``state_dtype``, ``state_rounding``, ``param_rounding``, ``backend``, ``seed``
or ``amsgrad`` changed) rebuilds the plan, which checks everything again: an
error names the tensor exactly as on the first step.

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
from typing import Any, cast

import numpy as np
import torch

import fastadam

from . import _lowp, backends
from ._validation import BFLOAT16, check_disjoint, check_hyper, rebind_row
from .multi import rounding_keys

LOWP_TORCH = (torch.bfloat16, torch.float16)
_MASTER_KEYS = ("master_param", "exp_avg", "exp_avg_sq", "max_exp_avg_sq")
_STRIDED = torch.strided
_KEEP = torch.preserve_format


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


def _view(t: torch.Tensor) -> np.ndarray:
    """:func:`_numpy` of a tensor already checked (a later step's gradient)."""
    d = t.detach()
    if d.dtype == torch.bfloat16:
        return d.view(torch.int16).numpy().view(BFLOAT16)
    return d.numpy()


def settings_of(opt: Any, first: int) -> tuple[Any, ...]:
    """What a group's plan depends on besides its tensors: the optimizer's settings
    (read at every step; a change rebuilds the plan, which checks them) and the
    position of the group's first parameter (its seeds follow it)."""
    return (bool(opt.master_weights), opt.state_dtype, opt.state_rounding, opt.param_rounding,
            opt.backend, opt.seed, first)  # fmt: skip


@dataclass(eq=False)
class _KindStep:
    """The tensors of one kind of low-precision step in a plan: one backend call a step."""

    kind: str
    pos: np.ndarray  # int64: their indices in the plan's parameter list
    #: Per tensor: [param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq, copy] arrays
    #: (None where absent); they keep the memory the table points to alive, and
    #: are what the Numba and NumPy backends read (grad rebound at each step).
    rows: list[list[Any]]
    seeds: np.ndarray  # uint64, one per tensor
    rounding: int  # fastadam._lowp's rounding bits
    table: Any  # backends._c_lowp.Table for the C backend (grads rewritten in place), else None


@dataclass(eq=False)
class LowpPlan:
    """What one group's steps on this path are built over, kept while it stays the same.

    As fastadam.torch's ``_GroupPlan``: ``identity`` names the objects the plan
    was built over, and ``steps_np`` views the one tensor that holds the
    group's step counts (each ``state["step"]`` is a 0-d view into it).
    """

    gi: int
    positions: list[int]  # of each parameter in the group (for error messages)
    params: list[torch.Tensor]
    identity: list[tuple[Any, ...]]
    settings: tuple[Any, ...]
    amsgrad: bool
    shapes: list[torch.Size]  # of each parameter, which its gradient must have
    grad_dtypes: list[torch.dtype]  # each gradient's dtype at the build (it chose the kind)
    steps_np: np.ndarray
    kinds: list[_KindStep]
    floats: Any  # fastadam.torch._TorchPlan over the float32/float64 parameters, or None
    float_pos: np.ndarray  # int64: their indices in ``params``
    float_seeds: np.ndarray  # uint64
    backend: str
    #: Byte ranges of every array (rows: param, grad, exp_avg, exp_avg_sq,
    #: max_exp_avg_sq, copy), for the overlap check of new gradients.
    starts: np.ndarray
    nbytes: np.ndarray

    def still_valid(
        self, params: list[torch.Tensor], state: Any, amsgrad: bool, settings: tuple[Any, ...]
    ) -> bool:
        """Whether the plan still describes the group's step (the float path's test,
        fastadam.torch.tensors_unchanged, and the same optimizer settings)."""
        from .torch import tensors_unchanged

        return (
            amsgrad == self.amsgrad
            and settings == self.settings
            and tensors_unchanged(params, self.identity, state)
        )

    def prepare(
        self, opt: Any, kwargs: dict[str, Any], pending: list[tuple[Any, Any, Any]]
    ) -> Prepared | None:
        """Check this step's gradients and hyperparameters and return the step ready to
        run; None when a gradient is not what the plan was built for (then the caller
        rebuilds the plan, which checks it and names what is wrong, or builds the
        plan of the new kind: a master weight's gradient may change dtype)."""
        params = self.params
        # every parameter of the plan has a grad (still_valid compared the lists)
        grads = cast(list[torch.Tensor], [p.grad for p in params])
        # The per-step checks of new gradient tensors (torch itself keeps a grad's
        # dtype, device and shape equal to its parameter's on assignment, but
        # p.grad.data = ... and p.data = ... get around it).
        for p, g, shape, gdt in zip(params, grads, self.shapes, self.grad_dtypes):
            if (
                g.dtype is not gdt or g.layout is not _STRIDED or not g.is_contiguous()
                or g.shape != shape or p.shape != shape or not g.is_cpu
            ):  # fmt: skip
                return None
        addresses = np.fromiter((g.data_ptr() for g in grads), np.uintp, len(grads))
        try:
            self.starts = rebind_row(self.starts, self.nbytes, 1, addresses, lambda k: "")
        except ValueError:
            return None  # the rebuild names the overlapping arrays
        steps = _lowp_steps(self, opt)
        hp = _hyper(kwargs, opt)
        flags = (kwargs["decoupled_weight_decay"], kwargs["amsgrad"], kwargs["maximize"],
                 kwargs["eps_hat"])  # fmt: skip
        run_floats = None
        if self.floats is not None:
            fpos = self.float_pos
            self.floats._rebind_grads([grads[i] for i in fpos], addresses[fpos])
            run_floats = self.floats.prepare(
                step=steps if isinstance(steps, int) else steps[fpos], seeds=self.float_seeds,
                state_rounding=opt.state_rounding, **kwargs,
            )  # fmt: skip
        calls = []
        for ks in self.kinds:
            if isinstance(steps, int):
                scalars: tuple[Any, ...] = (_lowp.scalars_of(steps, hp, flags),)
                index = None
                ksteps: Any = np.uint64(steps)
            else:
                ksteps = steps[ks.pos]
                unique, inverse = np.unique(ksteps, return_inverse=True)
                scalars = tuple(_lowp.scalars_of(int(s), hp, flags) for s in unique)
                index = None if len(scalars) == 1 else inverse.astype(np.int32)
            keys = None
            if ks.rounding:  # the parameter's or the moments' stochastic rounding
                keys = rounding_keys(ks.seeds, ksteps)
            if ks.table is not None:
                ks.table.pointers[1] = addresses[ks.pos]
            else:
                for row, i in zip(ks.rows, ks.pos):
                    row[1] = _view(grads[i])
            calls.append((ks, scalars, index, keys))
        backend = self.backend

        def run() -> None:
            for ks, scalars, index, keys in calls:
                if ks.table is not None:
                    ks.table.run(scalars, index, keys, ks.rounding)
                else:
                    rows = cast(list[Any], ks.rows)
                    _lowp.step_rows(backend, ks.kind, rows, scalars, index, keys, ks.rounding)
            if run_floats is not None:
                run_floats()

        return Prepared(self, run, grads, pending)


def _hyper(kwargs: dict[str, Any], opt: Any) -> Any:
    """The group's hyperparameters, checked (every step: a scheduler may change them)."""
    k = kwargs
    return check_hyper(
        k["lr"], k["beta1"], k["beta2"], k["eps"], k["weight_decay"], k["grad_scale"],
        opt.state_rounding,
    )  # fmt: skip


def _lowp_steps(plan: LowpPlan, opt: Any) -> int | np.ndarray:
    """This step's counts: one int when the group's are equal, else a uint64 array,
    each checked (``state["step"]`` may have been written through its view)."""
    from .torch import next_steps

    steps = next_steps(plan.steps_np)
    if isinstance(steps, int):
        return steps
    ok = np.isfinite(steps) & (steps >= 1) & (steps == np.floor(steps)) & (steps < 2.0**63)
    if not ok.all():
        i = int(np.flatnonzero(~ok)[0])
        where = _where(plan.gi, plan.positions[i])
        raise ValueError(
            f"state['step'] of {where} must be a non-negative integer, got {steps[i] - 1}"
        )
    return steps.astype(np.uint64)


@dataclass(eq=False)
class Prepared:
    """One group's checked step (as fastadam.torch's _PreparedGroup)."""

    plan: LowpPlan
    run: Callable[[], None]
    grads: list[torch.Tensor]
    pending: list[tuple[Any, Any, Any]] = field(default_factory=list)


def build_plan(
    opt: Any,
    gi: int,
    group: dict[str, Any],
    first: int,
    params: list[torch.Tensor],
    kwargs: dict[str, Any],
    pending: list[tuple[Any, Any, Any]],
) -> LowpPlan:
    """Check every tensor of group ``gi``'s step (this path) from scratch and build its
    plan. ``params``: the group's parameters with a gradient; ``first``: the position
    of the group's first parameter across groups (the seeds follow it); ``kwargs``:
    adam_step's checked hyperparameters. New state (and re-homed step counts) goes to
    ``pending``: attached only once every group's step has been checked."""
    from .torch import _step_value, _TorchPlan

    positions = [i for i, p in enumerate(group["params"]) if p.grad is not None]
    settings = settings_of(opt, first)
    master = bool(opt.master_weights)
    amsgrad = bool(kwargs["amsgrad"])
    _hyper(kwargs, opt)
    by_kind: dict[str, list[int]] = {}
    kind_rows: dict[str, list[list[Any]]] = {}
    floats: list[int] = []
    float_lists: list[list[Any]] = [[], [], [], [], []]
    states, identity, values, seeds, row_arrays, labels = [], [], [], [], [], []
    grad_dtypes = []
    for i, (p, pi) in enumerate(zip(params, positions)):
        where = _where(gi, pi)
        g = cast(torch.Tensor, p.grad)  # params: those with a grad
        pv = _numpy(p, where)
        gv = _numpy(g, f"the grad of {where}")
        grad_dtypes.append(g.dtype)
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
                "exp_avg": torch.zeros_like(p, dtype=sdt, memory_format=_KEEP),
                "exp_avg_sq": torch.zeros_like(p, dtype=sdt, memory_format=_KEEP),
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
            vmax = torch.zeros_like(p, dtype=sdt, memory_format=_KEEP)
            if st is opt.state.get(p):
                st = dict(st)
                pending.append((opt.state, p, st))
            st["max_exp_avg_sq"] = vmax
        names = [f"state[{k!r}] of {where}" for k in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")]
        m = _numpy(st.get("exp_avg"), names[0])
        v = _numpy(st.get("exp_avg_sq"), names[1])
        vm = _numpy(st["max_exp_avg_sq"], names[2]) if amsgrad else None
        values.append(_step_value(st, where))
        seeds.append((opt.seed + first + pi) % 2**64)
        master_t = None
        if lowp:
            copy = None
            param = pv
            if master:
                master_t = st["master_param"]
                param = _numpy(master_t, f"state['master_param'] of {where}")
                copy = pv
            kind = _lowp.validate_lowp(
                param, gv, m, v, vm, amsgrad, copy,
                names=(f"state['master_param'] of {where}" if master else where,
                       f"the grad of {where}", names[0], names[1], names[2], where),
            )  # fmt: skip
            if master and param.shape != pv.shape:
                raise ValueError(f"state['master_param'] of {where} has the wrong shape")
            row = [param, gv, m, v, vm, copy]
            by_kind.setdefault(kind, []).append(i)
            kind_rows.setdefault(kind, []).append(row)
            first_label = f"state['master_param'] of {where}" if master else where
        else:
            row = [pv, gv, m, v, vm, None]
            floats.append(i)
            for lst, a in zip(float_lists, row):
                lst.append(a)
            first_label = where
        row_arrays.append(row)
        labels.append([first_label, f"the grad of {where}", *names, where])
        states.append(st)
        watched = [("exp_avg", st.get("exp_avg")), ("exp_avg_sq", st.get("exp_avg_sq"))]
        if amsgrad:
            watched.append(("max_exp_avg_sq", st.get("max_exp_avg_sq")))
        if master_t is not None:
            watched.append(("master_param", master_t))
        identity.append([p, p.data_ptr(), st, watched])
    float_plan = None
    if floats:
        # checks them (dtypes, shapes, layout) as fastadam.torch's float path does
        float_plan = _TorchPlan(
            gi, [positions[i] for i in floats], *float_lists[:4],
            float_lists[4] if amsgrad else None, backend=opt.backend,
        )  # fmt: skip
    # No two arrays of the group may share memory (validate_lowp has checked
    # each parameter's own; this is the whole group's, as on the float path).
    count = len(params)
    starts = np.zeros((6, count), np.uintp)
    nbytes = np.zeros((6, count), np.uint64)
    for i, row in enumerate(row_arrays):
        for r, a in enumerate(row):
            if a is not None:
                starts[r, i] = a.__array_interface__["data"][0]
                nbytes[r, i] = a.nbytes
    check_disjoint(starts.reshape(-1), nbytes.reshape(-1),
                   lambda k: labels[k % count][k // count])  # fmt: skip
    param_code = _lowp.check_param_rounding(opt.param_rounding)
    state_rounding = _lowp.optimizer_state_rounding(opt.state_dtype, opt.state_rounding)
    fastadam.backends.get(opt.backend)
    module = backends.family(opt.backend, "lowp")
    # The C backend takes pointer tables, made once here; the Numba and NumPy
    # ones take the arrays.
    table = getattr(module, "Table", None)
    seed_array = np.array(seeds, np.uint64)
    kinds = []
    for kind, pos in by_kind.items():
        krows = kind_rows[kind]
        kinds.append(_KindStep(
            kind, np.array(pos, np.int64), krows, seed_array[pos],
            _lowp.rounding_of(kind, param_code, state_rounding),
            None if table is None else table(kind, krows),
        ))  # fmt: skip
    # The group's step counts in one buffer (torch's fused AdamW keeps them
    # float32); state["step"] become 0-d views of it, so that a step advances
    # them all with one operation.
    steps = torch.tensor(values, dtype=torch.float32)
    for st, ident, view in zip(states, identity, steps.unbind()):
        pending.append((st, "step", view))
        ident[3].append(("step", view))  # the very view that will be attached
    float_pos = np.array(floats, np.int64)
    return LowpPlan(
        gi, positions, list(params), [(p, ptr, st, tuple(w)) for p, ptr, st, w in identity],
        settings, amsgrad,
        [p.shape for p in params], grad_dtypes, steps.numpy(), kinds,
        float_plan, float_pos, seed_array[float_pos], opt.backend, starts, nbytes,
    )  # fmt: skip


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
