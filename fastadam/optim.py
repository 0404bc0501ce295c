"""``Adam`` and ``AdamW`` over NumPy arrays, with torch.optim's groups and state layout.

Each step is one multi-tensor step per parameter group (a
:class:`fastadam.MultiTensorPlan`, built once and reused while the group's
arrays stay the same): one kernel call per group and dtype. The per-parameter state follows torch's
``state_dict`` layout, so checkpoints read the same way in both worlds::

    {"state": {0: {"step": 3, "exp_avg": ..., "exp_avg_sq": ...}, ...},
     "param_groups": [{"lr": 1e-3, "betas": (0.9, 0.999), ..., "params": [0, 1]}]}
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Union, cast

import numpy as np

from . import _lowp, _q8_optim, backends
from ._validation import (
    BFLOAT16,
    check_array,
    check_optimizer_hyper,
    check_seed,
    check_state_dtype,
    check_state_rounding,
)
from .multi import _LIST_NAMES, MultiTensorPlan

if TYPE_CHECKING:
    from .flat import FlatParams

#: What an optimizer's ``params`` may be (like torch's ``ParamsT``): the arrays,
#: parameter groups (dicts with a ``"params"`` list and per-group options), or a
#: :class:`~fastadam.FlatParams`.
ParamsT = Union[Iterable[np.ndarray], Iterable[dict[str, Any]], "FlatParams"]

_STATE_KEYS = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")


#: state_dtype by name (check_state_dtype), as the arrays hold it.
_STATE_DTYPES = {"float32": np.dtype(np.float32), "bfloat16": BFLOAT16}


class Adam:
    """Adam (``decoupled_weight_decay=False``) or AdamW over NumPy arrays.

    The parameter groups, the per-array state and :meth:`state_dict` have
    ``torch.optim.Adam``'s layout. Each :meth:`step` is one kernel call per
    group (and dtype) over all the group's arrays.

    Parameters
    ----------
    params : list of numpy.ndarray, list of dict, or FlatParams
        float32/float64 C-contiguous writeable arrays, param-group dicts
        (``{"params": [...], "lr": ...}``), or a :class:`FlatParams` (then
        :meth:`step` takes no gradients).
    lr : float, default 1e-3
        Learning rate, finite and >= 0.
    betas : tuple of (float, float), default (0.9, 0.999)
        Decay rates ``(beta1, beta2)`` of the first and second moments, each in [0, 1).
    eps : float, default 1e-8
        Term added to the denominator, finite and >= 0.
    weight_decay : float, default 0.0
        Finite and >= 0: Adam adds ``weight_decay * θ`` to the gradient; with
        ``decoupled_weight_decay``, θ is multiplied by ``1 - lr * weight_decay`` first.
    amsgrad : bool, default False
        Use the running maximum of the second moment (keeps ``max_exp_avg_sq``).
    maximize : bool, default False
        Ascend the objective instead of descending it.
    decoupled_weight_decay : bool, default False
        AdamW's decoupled weight decay (what :class:`AdamW` sets).
    eps_hat : bool, default False
        The Keras/TensorFlow/scikit-learn placement of ``eps``; see :func:`adam_step`.
    state_dtype : {None, "float32", "bfloat16", "8bit"} or numpy.dtype, default None
        dtype of ``exp_avg``/``exp_avg_sq``/``max_exp_avg_sq``: None keeps each
        parameter's own; ``"bfloat16"`` (``ml_dtypes.bfloat16``, for float32
        parameters) halves the optimizer's memory and moves 20 instead of
        28 bytes per element and step. bfloat16/float16 parameters (without
        ``master_weights``) may keep ``"float32"`` or ``"bfloat16"`` moments
        too (the update is the same float32 arithmetic; only the moments'
        storage changes); ``"8bit"`` needs float32 parameters.
    state_rounding : {"stochastic", "nearest"}, default "stochastic"
        How bfloat16 states are rounded; see :func:`adam_step`. With
        ``state_dtype=None`` a bfloat16 parameter's moments (its own dtype) are
        rounded to nearest, as ``torch.optim.AdamW(fused=True)`` does; with
        ``state_dtype="bfloat16"`` this applies to them. float16 moments are
        always rounded to nearest.
    seed : int, default 0
        Base seed of stochastic rounding, in [0, 2**64); parameter ``i`` (its
        position across groups) uses ``seed + i``, so no two arrays share
        random bits.
    backend : {"auto", "numpy", "numba", "c"}, default "auto"
        The kernels to run; ``"auto"`` is :func:`auto_backend`'s choice.
    min_8bit_size : int, default 4096
        With ``state_dtype="8bit"`` (float32 parameters; 8-bit block-wise
        states, issue 18: uint8 codes ``exp_avg``/``exp_avg_sq`` and float32
        scales ``exp_avg_absmax``/``exp_avg_sq_absmax`` in each state, about
        2 bytes per element instead of 8), parameters with fewer elements keep
        float32 states. ``amsgrad`` is refused with 8-bit states.
    master_weights : bool, default False
        For bfloat16/float16 parameters: keep a float32 copy of each in
        ``state[i]["master_param"]`` (with float32 moments), update it, and
        write the rounded result into the parameter in the same pass
        (``state_dtype`` does not apply to these float32 moments). Without
        it, such parameters keep moments of their own dtype (torch's fused
        update) or of ``state_dtype``. A group with a low-precision parameter
        must hold only low-precision parameters.
    param_rounding : {"nearest", "stochastic"}, default "nearest"
        How bfloat16/float16 parameters are rounded: nearest-even, or
        stochastically (unbiased; the random bits follow ``seed``, the
        parameter's position and the step, as those of bfloat16 states).

    Attributes
    ----------
    param_groups : list of dict
        One dict per group: ``"params"`` (the arrays) and the
        hyperparameters, which may be changed between steps (learning-rate
        schedules).
    state : dict of int to dict
        Per-array state (``"step"``, ``"exp_avg"``, ``"exp_avg_sq"``, and
        ``"max_exp_avg_sq"`` with amsgrad), keyed by the array's position
        across groups; made at the array's first step.

    Raises
    ------
    TypeError
        ``params`` of the wrong kind (one array, a mapping, torch tensors, an
        array that is not float32/float64), a non-number hyperparameter, or
        ``state_dtype="bfloat16"`` with float64 parameters.
    ValueError
        An empty parameter list, an array listed twice, a hyperparameter out
        of range, an unknown ``state_dtype``, ``state_rounding`` or backend,
        a non-contiguous or read-only array.
    BackendUnavailableError
        The backend named cannot load on this machine.

    See Also
    --------
    AdamW : the same with decoupled weight decay and ``weight_decay=1e-2``.
    fastadam.torch.Adam : the same over PyTorch tensors.

    Examples
    --------
    >>> import numpy as np, fastadam
    >>> params = [np.ones((2, 2), np.float32), np.zeros(2, np.float32)]
    >>> opt = fastadam.Adam(params, lr=0.1)
    >>> opt.step([np.ones_like(a) for a in params])
    >>> params[1].round(6)
    array([-0.1, -0.1], dtype=float32)
    >>> opt.state[1]["step"]
    1
    """

    def __init__(
        self,
        params: ParamsT,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        amsgrad: bool = False,
        maximize: bool = False,
        decoupled_weight_decay: bool = False,
        eps_hat: bool = False,
        state_dtype: str | np.dtype | type | None = None,
        state_rounding: str = "stochastic",
        seed: int = 0,
        backend: str = "auto",
        min_8bit_size: int = 4096,
        master_weights: bool = False,
        param_rounding: str = "nearest",
    ) -> None:
        check_optimizer_hyper(lr, betas, eps, weight_decay)
        _lowp.check_param_rounding(param_rounding)
        self.master_weights = bool(master_weights)
        self.param_rounding = param_rounding
        # state_dtype="8bit" (issue 18, fastadam._q8_optim): min_8bit_size is not None
        self.min_8bit_size: int | None = None
        if _q8_optim.is_8bit(state_dtype):
            self.min_8bit_size = _q8_optim.check_min_size(min_8bit_size)
            if amsgrad:
                raise ValueError("amsgrad=True is not supported with state_dtype='8bit'")
            if self.master_weights:
                raise ValueError(
                    "master_weights=True keeps float32 moments; it cannot be combined with "
                    "state_dtype='8bit'"
                )
            state_dtype = "float32"
        backends.get(backend)  # unknown or unloadable backend: fail now, not at step 1
        self.backend = backend
        name = check_state_dtype(state_dtype)
        self.state_dtype = None if name is None else _STATE_DTYPES[name]
        check_state_rounding(state_rounding)
        self.state_rounding = state_rounding
        self.seed = check_seed(seed)
        self.defaults: dict[str, Any] = {
            "lr": lr,
            "betas": tuple(betas),
            "eps": eps,
            "weight_decay": weight_decay,
            "amsgrad": bool(amsgrad),
            "maximize": bool(maximize),
            "decoupled_weight_decay": bool(decoupled_weight_decay),
            "eps_hat": bool(eps_hat),
        }
        self.flat = None
        from .flat import FlatParams  # local: flat imports nothing from here, but keep it lazy

        if isinstance(params, FlatParams):
            self.flat = params
            params = [params.data]
        if isinstance(params, np.ndarray) or isinstance(params, Mapping):
            raise TypeError(
                "params argument given to the optimizer should be an iterable of arrays or "
                f"dicts, but got {type(params).__name__}"
            )
        if not isinstance(params, Iterable):
            raise TypeError(
                f"params must be an iterable of arrays or dicts, got {type(params).__name__}"
            )
        groups = list(params)
        if not groups:
            raise ValueError("optimizer got an empty parameter list")
        if not isinstance(groups[0], Mapping):
            groups = [{"params": groups}]
        self.param_groups: list[dict[str, Any]] = []
        self.state: dict[int, dict[str, Any]] = {}
        # group index -> (what the plan was built over, the plan, its seeds); see _plan_for.
        self._plans: dict[int, tuple[tuple, MultiTensorPlan, np.ndarray]] = {}
        for g in groups:
            self.add_param_group(g)

    # -- groups -------------------------------------------------------------

    def add_param_group(self, param_group: Mapping[str, Any]) -> None:
        """Add a group of arrays with its own hyperparameters (torch semantics).

        Parameters
        ----------
        param_group : dict
            ``"params"`` (a list of arrays, or one array) and any
            hyperparameters of the constructor's (``lr``, ``betas``, ...);
            those missing take the optimizer's defaults.

        Raises
        ------
        TypeError
            ``param_group`` not a dict, ``"params"`` a set or holding
            something other than float32/float64 arrays, or a non-number
            hyperparameter.
        ValueError
            No ``"params"`` entry, an array twice or already in another group,
            a hyperparameter out of range, a non-contiguous or read-only array.
        """
        if not isinstance(param_group, Mapping):
            raise TypeError(f"param group must be a dict, got {type(param_group).__name__}")
        group = dict(param_group)
        if "params" not in group:
            raise ValueError("param group must have a 'params' entry")
        ps = group["params"]
        if isinstance(ps, np.ndarray):
            ps = [ps]
        elif isinstance(ps, (set, frozenset)):
            raise TypeError("param group 'params' must be an ordered collection, not a set")
        ps = list(ps)
        for i, p in enumerate(ps):
            if type(p).__module__.startswith("torch"):
                raise TypeError(
                    f"params[{i}] is a torch.Tensor: fastadam.Adam/AdamW optimize NumPy arrays; "
                    "for torch tensors use fastadam.torch.Adam/AdamW"
                )
            if not isinstance(p, np.ndarray):
                raise TypeError(
                    f"optimizer can only optimize numpy arrays, but params[{i}] is "
                    f"{type(p).__name__}"
                )
            if _lowp.is_lowp(p):  # bfloat16/float16 (issue 17)
                check_array(f"params[{i}]", p, p.dtype, p.shape, f"params[{i}]")
            else:
                check_array(f"params[{i}]", p, None, None)
            if self.min_8bit_size is not None and p.dtype != np.float32:
                raise TypeError(
                    f"state_dtype='8bit' needs float32 parameters; params[{i}] has dtype "
                    f"{p.dtype}"
                    + (" (its moments may be its own dtype, 'float32' or 'bfloat16')"
                       if _lowp.is_lowp(p) else "")
                )  # fmt: skip
            if self.state_dtype is not None and p.dtype != np.float32 and not _lowp.is_lowp(p):
                raise TypeError(
                    f"state_dtype={self.state_dtype.name} needs float32, bfloat16 or float16 "
                    f"parameters; params[{i}] has dtype {p.dtype}"
                )
        if len({id(p) for p in ps}) != len(ps):
            raise ValueError("a parameter group contains the same array twice")
        seen = {id(p) for g in self.param_groups for p in g["params"]}
        if any(id(p) in seen for p in ps):
            raise ValueError("some parameters appear in more than one parameter group")
        for k, v in self.defaults.items():
            group.setdefault(k, v)
        check_optimizer_hyper(group["lr"], group["betas"], group["eps"], group["weight_decay"])
        group["params"] = ps
        self.param_groups.append(group)

    def _params(self) -> list[np.ndarray]:
        return [p for g in self.param_groups for p in g["params"]]

    # -- stepping -----------------------------------------------------------

    def step(
        self,
        grads: Sequence[np.ndarray | None] | None = None,
        *,
        grad_scale: float | None = None,
        found_inf: bool = False,
    ) -> None:
        """Update every parameter from its gradient: one kernel call per group (and dtype).

        Every group's step is checked before any runs: on an error nothing
        has changed.

        Parameters
        ----------
        grads : sequence of (numpy.ndarray or None), optional
            One gradient per parameter, each of its dtype and shape, in the
            order of the parameters across groups (``None`` skips that
            parameter). Omit it when the optimizer was built over a
            :class:`FlatParams`: ``flat.grad`` is used.
        grad_scale : float or None, default None
            Divide the gradients by this (finite, > 0) in the same pass, and
            write the unscaled gradients back, as after a loss scaled for
            mixed precision.
        found_inf : bool, default False
            A gradient overflowed: skip the step entirely; no state changes
            and ``step`` does not advance.

        Raises
        ------
        TypeError
            ``grads`` omitted without a FlatParams, one array instead of a
            list, or a gradient of the wrong dtype (named: ``grads[5] ...``).
        ValueError
            The wrong number of gradients, a gradient of the wrong shape or
            layout, or a hyperparameter of a group out of range
            (``param_groups[1]: ...``).
        """
        params = self._params()
        if grads is None:
            if self.flat is None:
                raise TypeError("step() needs grads, one per parameter (or use FlatParams)")
            grads = [self.flat.grad]
        elif isinstance(grads, np.ndarray):
            raise TypeError(
                "grads must be a sequence of arrays aligned with the params, not one array"
            )
        else:
            grads = list(grads)
        if len(grads) != len(params):
            raise ValueError(f"got {len(grads)} grads for {len(params)} params")
        # Every group's step is prepared (checked) before any runs: a bad value
        # in any group or gradient changes nothing, and attaches no new state.
        runs: list[tuple[Any, list[dict[str, Any]]]] = []
        # _prepare_group reads the grads of ``active`` positions only: none is None
        present = cast("list[np.ndarray]", grads)
        pending: list[tuple[Any, Any, Any]] = []
        start = 0
        for gi, group in enumerate(self.param_groups):
            count = len(group["params"])
            active = [start + k for k in range(count) if grads[start + k] is not None]
            if active:
                runs.append(
                    self._prepare_group(gi, group, active, params, present, grad_scale, found_inf,
                                        pending)
                )  # fmt: skip
            start += count
        if found_inf:
            return
        for mapping, key, value in pending:
            mapping[key] = value
        for run, states in runs:
            run()
            for st in states:  # counted only once the update has happened
                st["step"] += 1

    def _prepare_group(
        self,
        gi: int,
        group: dict[str, Any],
        active: list[int],
        params: list[np.ndarray],
        grads: list[np.ndarray],
        grad_scale: float | None,
        found_inf: bool,
        pending: list[tuple[Any, Any, Any]],
        _plain: bool = False,
    ) -> tuple[Any, list[dict[str, Any]]]:
        """Check group ``gi``'s step over the parameters at positions ``active``
        and return (the function that runs it, the states whose step it counts).

        The group's plan checks the gradients (named by position: ``grads[i]``);
        state the step needs and does not have yet goes to ``pending``.
        """
        try:
            check_optimizer_hyper(group["lr"], group["betas"], group["eps"], group["weight_decay"])
        except (TypeError, ValueError) as exc:
            raise type(exc)(f"param_groups[{gi}]: {exc}") from None
        if self.min_8bit_size is not None and not _plain:
            return _q8_optim.prepare_group(
                self, gi, group, active, params, grads, grad_scale, found_inf, pending
            )
        amsgrad = bool(group["amsgrad"])
        if any(_lowp.is_lowp(params[i]) for i in active):  # bfloat16/float16 (issue 17)
            return self._prepare_lowp(group, active, params, grads, grad_scale, found_inf,
                                      pending)  # fmt: skip
        states, arrays = zip(*(self._state_for(i, params[i], amsgrad, pending) for i in active))
        plan, seeds = self._plan_for(gi, active, params, grads, arrays, amsgrad)
        steps = [st["step"] + 1 for st in states]
        beta1, beta2 = group["betas"]
        run = plan.prepare(
            # one int when the counts agree (the usual case: the plan's cheap path)
            step=steps[0] if steps.count(steps[0]) == len(steps) else np.array(steps),
            lr=group["lr"], beta1=beta1, beta2=beta2, eps=group["eps"],
            weight_decay=group["weight_decay"],
            decoupled_weight_decay=group["decoupled_weight_decay"], amsgrad=amsgrad,
            maximize=group["maximize"], eps_hat=group["eps_hat"], grad_scale=grad_scale,
            found_inf=found_inf, state_rounding=self.state_rounding, seeds=seeds,
            grads=[grads[i] for i in active],
        )  # fmt: skip
        return run, list(states)

    def _prepare_lowp(
        self,
        group: dict[str, Any],
        active: list[int],
        params: list[np.ndarray],
        grads: list[np.ndarray],
        grad_scale: float | None,
        found_inf: bool,
        pending: list[tuple[Any, Any, Any]],
    ) -> tuple[Any, list[dict[str, Any]]]:
        """_prepare_group for a group with bfloat16/float16 parameters: with
        ``master_weights``, state["master_param"] (float32) is updated and the
        parameter written rounded; without, the moments have the parameter's dtype
        (rounded to nearest, torch's) or ``state_dtype``'s (bfloat16 ones rounded
        as ``state_rounding`` says)."""
        amsgrad = bool(group["amsgrad"])
        states, arrays = zip(*(self._state_for(i, params[i], amsgrad, pending) for i in active))
        masters = []
        for i, st, arr in zip(active, states, arrays):
            p = params[i]
            if self.master_weights and _lowp.is_lowp(p):
                mp = arr.get("master_param")
                if mp is None:  # a new state, or one loaded without a master
                    mp = p.astype(np.float32)
                    pending.append((st, "master_param", mp))
                masters.append(mp)
            else:
                masters.append(None)
        beta1, beta2 = group["betas"]
        run = _lowp.prepare_multi_lowp(
            [p if m is None else m for p, m in zip((params[i] for i in active), masters)],
            [grads[i] for i in active], [a["exp_avg"] for a in arrays],
            [a["exp_avg_sq"] for a in arrays], step=[st["step"] + 1 for st in states],
            lr=group["lr"], beta1=beta1, beta2=beta2, eps=group["eps"],
            weight_decay=group["weight_decay"],
            decoupled_weight_decay=group["decoupled_weight_decay"], amsgrad=amsgrad,
            max_exp_avg_sqs=[a["max_exp_avg_sq"] for a in arrays] if amsgrad else None,
            maximize=group["maximize"], eps_hat=group["eps_hat"], grad_scale=grad_scale,
            found_inf=found_inf,
            state_rounding=_lowp.optimizer_state_rounding(self.state_dtype, self.state_rounding),
            seeds=[(self.seed + i) % 2**64 for i in active], backend=self.backend,
            param_copies=None if not self.master_weights else
            [None if m is None else params[i] for i, m in zip(active, masters)],
            param_rounding=self.param_rounding, labels=active,
        )  # fmt: skip
        return run, list(states)

    def _plan_for(
        self,
        gi: int,
        active: list[int],
        params: list[np.ndarray],
        grads: list[np.ndarray],
        states: Sequence[dict[str, Any]],
        amsgrad: bool,
    ) -> tuple[MultiTensorPlan, np.ndarray]:
        """The group's plan and its tensors' seeds, rebuilt only when its arrays
        changed (parameters gaining or losing a gradient, new state, a loaded
        checkpoint)."""
        key = tuple(
            (id(params[i]), id(st["exp_avg"]), id(st["exp_avg_sq"]), id(st.get("max_exp_avg_sq")))
            for i, st in zip(active, states)
        ) + (amsgrad,)
        cached = self._plans.get(gi)
        if cached is not None and cached[0] == key:
            return cached[1], cached[2]
        plan = _PositionedPlan(
            active,
            [params[i] for i in active],
            [grads[i] for i in active],
            [st["exp_avg"] for st in states],
            [st["exp_avg_sq"] for st in states],
            [st["max_exp_avg_sq"] for st in states] if amsgrad else None,
            backend=self.backend,
        )
        # parameter i's seed is seed + i, wrapping modulo 2**64
        seeds = np.array(active, np.uint64) + np.uint64(self.seed)
        self._plans[gi] = (key, plan, seeds)
        return plan, seeds

    def _state_for(
        self, i: int, p: np.ndarray, amsgrad: bool, pending: list[tuple[Any, Any, Any]]
    ) -> tuple[dict[str, Any], dict[str, Any]]:
        """Parameter ``i``'s state, and its arrays as this step uses them: what is
        missing is made and left in ``pending``, to be attached once every group
        has been checked."""
        st = self.state.get(i)
        dtype = self._state_dtype(p)
        if st is None:
            st = {
                "step": 0,
                "exp_avg": np.zeros(p.shape, dtype),
                "exp_avg_sq": np.zeros(p.shape, dtype),
            }
            pending.append((self.state, i, st))
        if amsgrad and "max_exp_avg_sq" not in st:  # amsgrad switched on, or a new state
            vmax = np.zeros(p.shape, dtype)
            pending.append((st, "max_exp_avg_sq", vmax))
            return st, {**st, "max_exp_avg_sq": vmax}
        return st, st

    def _state_dtype(self, p: np.ndarray) -> np.dtype:
        if self.master_weights and _lowp.is_lowp(p):
            return np.dtype(np.float32)  # master weights keep float32 moments
        return p.dtype if self.state_dtype is None else self.state_dtype

    def zero_grad(self) -> None:
        """Zero ``flat.grad``, the gradient buffer of the optimizer's :class:`FlatParams`.

        Raises
        ------
        TypeError
            The optimizer was built over a list of arrays: the caller owns
            those gradients.
        """
        if self.flat is None:
            raise TypeError("zero_grad() needs a FlatParams; the caller owns list gradients")
        self.flat.grad.fill(0)

    # -- checkpoints --------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """The optimizer state in torch's layout.

        Like torch, the arrays are the live state, not copies: save or copy the
        dict before the next step if it must stay as it is now.

        Returns
        -------
        dict
            ``{"state": {i: {"step": int, "exp_avg": array, "exp_avg_sq": array,
            ...}}, "param_groups": [{"lr": ..., "params": [i, ...]}, ...]}``,
            parameters numbered by position across groups.
        """
        groups, start = [], 0
        for g in self.param_groups:
            packed = {k: v for k, v in g.items() if k != "params"}
            packed["params"] = list(range(start, start + len(g["params"])))
            start += len(g["params"])
            groups.append(packed)
        state = {i: dict(st) for i, st in self.state.items()}
        return {"state": state, "param_groups": groups}

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restore a :meth:`state_dict`; every check runs before anything changes.

        The arrays are copied in, so the loaded state never aliases the dict.
        A loaded state resumes training bit for bit.

        Parameters
        ----------
        state_dict : dict
            What :meth:`state_dict` returned (from an optimizer over
            parameters of the same groups, shapes and dtypes).

        Raises
        ------
        ValueError
            The groups, the parameter count, a state's ``step``, or any state
            array's shape or dtype does not match these parameters.
        """
        if (
            not isinstance(state_dict, Mapping)
            or not {"state", "param_groups"} <= state_dict.keys()
        ):
            raise ValueError("state_dict must be a mapping with 'state' and 'param_groups'")
        saved_groups = list(state_dict["param_groups"])
        if len(saved_groups) != len(self.param_groups):
            raise ValueError(
                f"loaded state dict has {len(saved_groups)} parameter groups, "
                f"this optimizer has {len(self.param_groups)}"
            )
        for k, (sg, g) in enumerate(zip(saved_groups, self.param_groups)):
            if len(sg["params"]) != len(g["params"]):
                raise ValueError(
                    f"parameter group {k} has {len(sg['params'])} params in the loaded state dict "
                    f"but {len(g['params'])} here"
                )
        # Saved ids -> our positions, in group order (torch's rule).
        id_map = {
            sid: pos
            for sg, pos_range in zip(saved_groups, self._group_positions())
            for sid, pos in zip(sg["params"], pos_range)
        }
        params = self._params()
        new_state: dict[int, dict[str, Any]] = {}
        for sid, st in dict(state_dict["state"]).items():
            if sid not in id_map:
                raise ValueError(f"state for parameter {sid!r} matches no parameter")
            pos = id_map[sid]
            p = params[pos]
            new: dict[str, Any] = {"step": _check_saved_step(sid, st.get("step"))}
            want_8bit = self.min_8bit_size is not None and p.size >= self.min_8bit_size
            if want_8bit or "exp_avg_absmax" in st:  # 8-bit states (issue 18), or to/from them
                new.update(_q8_optim.convert_state(sid, st, p, want_8bit, self._state_dtype(p)))
                new_state[pos] = new
                continue
            for key in _STATE_KEYS:
                if key not in st:
                    if key != "max_exp_avg_sq":
                        raise ValueError(f"state for parameter {sid!r} lacks {key!r}")
                    continue
                a = np.asarray(st[key])
                want = self._state_dtype(p)
                if a.shape != p.shape or a.dtype != want:
                    raise ValueError(
                        f"state[{sid!r}][{key!r}] has shape {a.shape} and dtype {a.dtype}, but "
                        f"this optimizer keeps shape {p.shape} and dtype {want} for that parameter"
                    )
                new[key] = np.array(a, dtype=want, order="C", copy=True)
            if "master_param" in st:  # master weights (issue 17)
                a = np.asarray(st["master_param"])
                if a.shape != p.shape or a.dtype != np.float32:
                    raise ValueError(
                        f"state[{sid!r}]['master_param'] has shape {a.shape} and dtype "
                        f"{a.dtype}, but the master of that parameter is float32 of shape {p.shape}"
                    )
                new["master_param"] = np.array(a, dtype=np.float32, order="C", copy=True)
            new_state[pos] = new
        for sg, g in zip(saved_groups, self.param_groups):
            for k, v in sg.items():
                if k != "params":
                    g[k] = tuple(v) if k == "betas" else copy.deepcopy(v)
        self.state = new_state

    def _group_positions(self) -> list[range]:
        out, start = [], 0
        for g in self.param_groups:
            out.append(range(start, start + len(g["params"])))
            start += len(g["params"])
        return out

    def __repr__(self) -> str:
        lines = [f"{type(self).__name__} (backend={self.backend!r})"]
        for i, g in enumerate(self.param_groups):
            lines.append(f"Parameter Group {i}")
            lines += [f"    {k}: {v}" for k, v in sorted(g.items()) if k != "params"]
        return "\n".join(lines)


class _PositionedPlan(MultiTensorPlan):
    """A group's plan that names each array by its parameter's position across
    groups (``grads[5]``), as the optimizer's own arguments are numbered."""

    def __init__(self, positions: list[int], *lists: Any, backend: str) -> None:
        self._positions = positions
        super().__init__(*lists, backend=backend)

    def _label(self, role: int, i: int) -> str:
        return f"{_LIST_NAMES[role]}[{self._positions[i]}]"


def _check_saved_step(sid: object, step: object) -> int:
    try:
        value = float(np.asarray(step))
    except (TypeError, ValueError):
        raise ValueError(f"state[{sid!r}]['step'] must be a number, got {step!r}") from None
    if not (value >= 0 and value.is_integer()):
        raise ValueError(f"state[{sid!r}]['step'] must be a non-negative integer, got {step!r}")
    return int(value)


class AdamW(Adam):
    """Adam with decoupled weight decay (Loshchilov & Hutter), ``torch.optim.AdamW``'s defaults.

    :class:`Adam` with ``decoupled_weight_decay=True`` and ``weight_decay=1e-2``.

    Parameters
    ----------
    params : list of numpy.ndarray, list of dict, or FlatParams
        As for :class:`Adam`.
    lr : float, default 1e-3
        Learning rate, finite and >= 0.
    betas : tuple of (float, float), default (0.9, 0.999)
        Decay rates ``(beta1, beta2)`` of the first and second moments, each in [0, 1).
    eps : float, default 1e-8
        Term added to the denominator, finite and >= 0.
    weight_decay : float, default 1e-2
        Finite and >= 0: each step first multiplies θ by ``1 - lr * weight_decay``.
    amsgrad : bool, default False
        Use the running maximum of the second moment (keeps ``max_exp_avg_sq``).
    maximize : bool, default False
        Ascend the objective instead of descending it.
    eps_hat : bool, default False
        The Keras/TensorFlow/scikit-learn placement of ``eps``; see :func:`adam_step`.
    state_dtype : {None, "float32", "bfloat16", "8bit"} or numpy.dtype, default None
        dtype of ``exp_avg``/``exp_avg_sq``/``max_exp_avg_sq``: None keeps each
        parameter's own; ``"bfloat16"`` (``ml_dtypes.bfloat16``, for float32
        parameters) halves the optimizer's memory and moves 20 instead of
        28 bytes per element and step. bfloat16/float16 parameters (without
        ``master_weights``) may keep ``"float32"`` or ``"bfloat16"`` moments
        too (the update is the same float32 arithmetic; only the moments'
        storage changes); ``"8bit"`` needs float32 parameters.
    state_rounding : {"stochastic", "nearest"}, default "stochastic"
        How bfloat16 states are rounded; see :func:`adam_step`. With
        ``state_dtype=None`` a bfloat16 parameter's moments (its own dtype) are
        rounded to nearest, as ``torch.optim.AdamW(fused=True)`` does; with
        ``state_dtype="bfloat16"`` this applies to them. float16 moments are
        always rounded to nearest.
    seed : int, default 0
        Base seed of stochastic rounding, in [0, 2**64); parameter ``i`` (its
        position across groups) uses ``seed + i``, so no two arrays share
        random bits.
    backend : {"auto", "numpy", "numba", "c"}, default "auto"
        The kernels to run; ``"auto"`` is :func:`auto_backend`'s choice.
    min_8bit_size : int, default 4096
        With ``state_dtype="8bit"`` (float32 parameters; 8-bit block-wise
        states, issue 18: uint8 codes ``exp_avg``/``exp_avg_sq`` and float32
        scales ``exp_avg_absmax``/``exp_avg_sq_absmax`` in each state, about
        2 bytes per element instead of 8), parameters with fewer elements keep
        float32 states. ``amsgrad`` is refused with 8-bit states.
    master_weights : bool, default False
        For bfloat16/float16 parameters: keep a float32 copy of each in
        ``state[i]["master_param"]`` (with float32 moments), update it, and
        write the rounded result into the parameter in the same pass
        (``state_dtype`` does not apply to these float32 moments). Without
        it, such parameters keep moments of their own dtype (torch's fused
        update) or of ``state_dtype``. A group with a low-precision parameter
        must hold only low-precision parameters.
    param_rounding : {"nearest", "stochastic"}, default "nearest"
        How bfloat16/float16 parameters are rounded: nearest-even, or
        stochastically (unbiased; the random bits follow ``seed``, the
        parameter's position and the step, as those of bfloat16 states).

    Attributes
    ----------
    param_groups : list of dict
        One dict per group: ``"params"`` (the arrays) and the
        hyperparameters, which may be changed between steps (learning-rate
        schedules).
    state : dict of int to dict
        Per-array state (``"step"``, ``"exp_avg"``, ``"exp_avg_sq"``, and
        ``"max_exp_avg_sq"`` with amsgrad), keyed by the array's position
        across groups; made at the array's first step.

    Raises
    ------
    TypeError
        ``params`` of the wrong kind (one array, a mapping, torch tensors, an
        array that is not float32/float64), a non-number hyperparameter, or
        ``state_dtype="bfloat16"`` with float64 parameters.
    ValueError
        An empty parameter list, an array listed twice, a hyperparameter out
        of range, an unknown ``state_dtype``, ``state_rounding`` or backend,
        a non-contiguous or read-only array.
    BackendUnavailableError
        The backend named cannot load on this machine.

    Examples
    --------
    >>> import numpy as np, fastadam
    >>> flat = fastadam.FlatParams({"w": np.ones((3, 2)), "b": np.zeros(2)}, dtype=np.float32)
    >>> opt = fastadam.AdamW(flat, lr=1e-3)
    >>> flat.grads["w"][...] = 0.1  # the training loop writes gradients into views
    >>> opt.step()
    >>> opt.zero_grad()
    """

    def __init__(
        self,
        params: ParamsT,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        amsgrad: bool = False,
        maximize: bool = False,
        eps_hat: bool = False,
        state_dtype: str | np.dtype | type | None = None,
        state_rounding: str = "stochastic",
        seed: int = 0,
        backend: str = "auto",
        min_8bit_size: int = 4096,
        master_weights: bool = False,
        param_rounding: str = "nearest",
    ) -> None:
        super().__init__(
            params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad,
            maximize=maximize, decoupled_weight_decay=True, eps_hat=eps_hat,
            state_dtype=state_dtype, state_rounding=state_rounding, seed=seed, backend=backend,
            min_8bit_size=min_8bit_size, master_weights=master_weights,
            param_rounding=param_rounding,
        )  # fmt: skip
