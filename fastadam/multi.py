"""Multi-tensor steps: a whole list of tensors in one backend call per dtype kind.

A model is a list of tensors, most of them small. Stepping them one
:func:`fastadam.adam_step` at a time pays the Python path (validation,
scalars, the call into the kernel) once per tensor and runs each small tensor
on one thread. Here the list is validated once, when a
:class:`MultiTensorPlan` is built, and each step is one call into the backend
per dtype kind, which splits the work over its threads by elements across the
whole list::

    plan = fastadam.MultiTensorPlan(params, grads, exp_avgs, exp_avg_sqs)
    for t in range(1, steps + 1):
        ...  # write the new gradients into grads
        plan.step(step=t, lr=1e-3, weight_decay=0.01, decoupled_weight_decay=True)

:func:`adam_step_multi` is the same step without the plan (it builds one per
call). The results are bit-identical to calling :func:`fastadam.adam_step` on
each tensor with the same arguments (and ``seed=seeds[i]``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from . import _lowp, backends
from ._scalars import STATE_BF16_STOCHASTIC, STATE_SAME_DTYPE, AdamScalars, compute_scalars
from ._table import (
    GRAD,
    KIND_BF16,
    KIND_F32,
    KIND_F64,
    TensorTable,
    address,
    make_table,
)
from ._validation import (
    BFLOAT16,
    check_array,
    check_disjoint,
    check_hyper,
    check_int,
    check_seed,
    check_step,
    rebind_row,
    validate_arrays,
)
from .backends.reference import mix32

# One C call checks that every array of a plan is still writeable (the
# optional fastadam._pycall); without it, a Python loop does.
_first_readonly: Callable[[list], int] | None
try:
    from . import _pycall  # type: ignore[attr-defined]

    _first_readonly = _pycall.first_readonly
except ImportError:
    _first_readonly = None

__all__ = ["MultiTensorPlan", "adam_step_multi", "rounding_keys"]

_LIST_NAMES = ("params", "grads", "exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs")
_U32 = np.uint32
_M32 = np.uint64(0xFFFFFFFF)


def rounding_keys(seeds: np.ndarray, steps: np.ndarray) -> np.ndarray:
    """:func:`fastadam._scalars.rounding_key` of each (seed, step) pair, vectorized.

    ``seeds`` and ``steps`` are uint64 arrays of one shape; returns uint32.
    """
    seeds = np.asarray(seeds, np.uint64)
    steps = np.asarray(steps, np.uint64)
    k = mix32((seeds & _M32).astype(_U32))
    k = mix32(k ^ (seeds >> np.uint64(32)).astype(_U32))
    k = mix32(k ^ (steps & _M32).astype(_U32))
    return mix32(k ^ (steps >> np.uint64(32)).astype(_U32))


def _as_list(name: str, value: Any, count: int | None) -> list:
    if (
        isinstance(value, np.ndarray)
        or not isinstance(value, Sequence)
        or isinstance(value, (str, bytes))
    ):
        raise TypeError(
            f"{name} must be a sequence of arrays (a list or tuple), got {type(value).__name__}"
        )
    out = list(value)
    if count is not None and len(out) != count:
        raise ValueError(f"{name} has {len(out)} entries but params has {count}; they must match")
    return out


def _kind(param: np.ndarray, exp_avg: np.ndarray) -> str:
    if exp_avg.dtype == BFLOAT16:
        return KIND_BF16
    return KIND_F32 if param.dtype == np.float32 else KIND_F64


# PR01: the keyword _private_views is for fastadam.torch only, and stays undocumented.
class MultiTensorPlan:  # numpydoc ignore=PR01
    """A list of tensors checked once, then stepped as many times as needed.

    Every array of every tensor must be a separate buffer: no two arrays of the
    whole list may share memory. Tensors of different dtype kinds (float32,
    float64, float32 with bfloat16 states) may be mixed; each kind is one
    backend call per step.

    The plan keeps references to the arrays, so their memory stays where it
    is. Each :meth:`step` re-checks only what can change: that every array is
    still writeable, and the hyperparameters.

    Parameters
    ----------
    params : sequence of numpy.ndarray
        The parameter arrays: float32 or float64, any shapes, C-contiguous,
        writeable, aligned, native byte order. A list or tuple.
    grads : sequence of numpy.ndarray
        One gradient per parameter, of its dtype and shape (written to only
        when a step has ``grad_scale``).
    exp_avgs : sequence of numpy.ndarray
        First moments, each shaped like its parameter, of its dtype, or
        ``ml_dtypes.bfloat16`` for a float32 parameter.
    exp_avg_sqs : sequence of numpy.ndarray
        Second moments, each of its ``exp_avgs`` entry's dtype and shape.
    max_exp_avg_sqs : sequence of numpy.ndarray or None, default None
        One array per parameter like its moments, needed for steps with
        ``amsgrad=True``.
    backend : {"auto", "numpy", "numba", "c"}, default "auto"
        The kernels to run, as for :func:`adam_step`.

    Attributes
    ----------
    count : int
        Number of tensors.
    backend : str
        The ``backend`` argument.

    Raises
    ------
    TypeError
        A list that is not a sequence, or an array of the wrong dtype, named
        by list and index (``grads[3] has dtype float64 ...``).
    ValueError
        Lists of different lengths, or an array with a bad shape, layout or
        overlap, named by list and index; an unknown backend.
    BackendUnavailableError
        The backend named cannot load on this machine.

    See Also
    --------
    adam_step_multi : the same step without keeping a plan.

    Examples
    --------
    >>> import numpy as np, fastadam
    >>> params = [np.ones((2, 3), np.float32), np.ones(5, np.float32)]
    >>> grads = [np.full_like(a, 0.5) for a in params]
    >>> exp_avgs = [np.zeros_like(a) for a in params]
    >>> exp_avg_sqs = [np.zeros_like(a) for a in params]
    >>> plan = fastadam.MultiTensorPlan(params, grads, exp_avgs, exp_avg_sqs)
    >>> for t in range(1, 4):
    ...     plan.step(step=t, lr=0.1)
    >>> params[1].round(6)  # each step moved it by about lr
    array([0.7, 0.7, 0.7, 0.7, 0.7], dtype=float32)
    """

    def __init__(
        self,
        params: Sequence[np.ndarray],
        grads: Sequence[np.ndarray],
        exp_avgs: Sequence[np.ndarray],
        exp_avg_sqs: Sequence[np.ndarray],
        max_exp_avg_sqs: Sequence[np.ndarray] | None = None,
        *,
        backend: str = "auto",
        _private_views: bool = False,
    ) -> None:
        params = _as_list("params", params, None)
        count = len(params)
        # the five lists of arrays (ROLES), the last None without max_exp_avg_sqs
        lists: list[Any] = [params] + [
            _as_list(name, value, count)
            for name, value in zip(_LIST_NAMES[1:4], (grads, exp_avgs, exp_avg_sqs))
        ]
        lists.append(
            None if max_exp_avg_sqs is None else _as_list("max_exp_avg_sqs", max_exp_avg_sqs, count)
        )
        for i in range(count):
            p, g, m, v = (lst[i] for lst in lists[:4])
            vmax = None if lists[4] is None else lists[4][i]
            validate_arrays(
                p, g, m, v, vmax, amsgrad=False, names=tuple(self._label(r, i) for r in range(5))
            )
        backends.get(backend)  # an unknown or unloadable backend fails now
        self.backend = backend
        self.count = count
        self.has_max = lists[4] is not None
        self._lists = lists
        # Every array of the plan, for the per-step writeable check; none when
        # the arrays are views that only the caller (fastadam.torch) can see.
        self._arrays: list[np.ndarray] = (
            [] if _private_views else [a for lst in lists if lst is not None for a in lst]
        )
        # Byte ranges of every array (rows: ROLES), for the overlap checks.
        self._starts = np.zeros((5, count), np.uintp)
        self._nbytes = np.zeros((5, count), np.uint64)
        for r, lst in enumerate(lists):
            for i, a in enumerate(lst or ()):
                self._starts[r, i] = address(a)
                self._nbytes[r, i] = a.nbytes
        kinds = [_kind(params[i], lists[2][i]) for i in range(count)]
        sizes = np.array([a.size for a in params], np.int64)
        self._tables: list[tuple[str, TensorTable, np.ndarray]] = []
        for kind in (KIND_F32, KIND_F64, KIND_BF16):
            pos = np.array([i for i in range(count) if kinds[i] == kind], np.int64)
            if pos.size:
                # A kind's table is its columns of the byte ranges' starts; the
                # plan's lists own the arrays (new gradients included).
                table = make_table(kind, self._starts[:, pos], sizes[pos], [self._lists])
                self._tables.append((kind, table, pos))
        # tensor i's default seed (see step)
        self._default_seeds = np.arange(count, dtype=np.uint64)
        self._check_disjoint()

    # -- the arrays ------------------------------------------------------------

    @property
    def params(self) -> list[np.ndarray]:
        """list of numpy.ndarray: The parameter arrays (a new list; the arrays themselves)."""
        return list(self._lists[0])

    @property
    def grads(self) -> list[np.ndarray]:
        """list of numpy.ndarray: The gradient arrays the next step reads."""
        return list(self._lists[1])

    def _label(self, role: int, i: int) -> str:
        """How errors name array ``role`` (a row of ROLES) of tensor ``i``."""
        return f"{_LIST_NAMES[role]}[{i}]"

    def _range_label(self, k: int) -> str:
        """The name of byte range ``k`` of ``_starts`` (row-major: role, then tensor)."""
        return self._label(k // self.count, k % self.count)

    def _check_disjoint(self) -> None:
        """No two arrays of the plan share memory (one sort of all byte ranges)."""
        check_disjoint(self._starts.reshape(-1), self._nbytes.reshape(-1), self._range_label)

    def set_grads(self, grads: Sequence[np.ndarray]) -> None:
        """Step other gradient arrays from now on; the new ones are checked first.

        Arrays that are the very ones the plan holds cost one identity test.

        Parameters
        ----------
        grads : sequence of numpy.ndarray
            One gradient per tensor, each of its parameter's dtype and shape,
            C-contiguous, sharing memory with no other array of the plan.

        Raises
        ------
        TypeError
            A gradient of the wrong dtype, or ``grads`` not a sequence.
        ValueError
            The wrong number of gradients, or one of the wrong shape, layout
            or overlapping another array. On an error nothing changes (the
            plan keeps its old gradients).
        """
        grads = _as_list("grads", grads, self.count)
        old = self._lists[1]
        changed = [i for i in range(self.count) if grads[i] is not old[i]]
        if not changed:
            return
        params = self._lists[0]
        for i in changed:
            check_array(
                self._label(1, i), grads[i], params[i].dtype, params[i].shape, self._label(0, i)
            )
        addresses = self._starts[1].copy()
        addresses[changed] = [address(grads[i]) for i in changed]
        self._rebind_grads(grads, addresses)

    def _rebind_grads(self, grads: list, addresses: np.ndarray) -> None:
        """Use the gradients ``grads`` (kept alive by the plan) at ``addresses``.

        The caller has checked that each is contiguous with its parameter's
        dtype and shape; this checks that no array of the plan overlaps another.
        """
        self._starts = rebind_row(self._starts, self._nbytes, GRAD, addresses, self._range_label)
        self._lists[1] = grads
        if self._arrays:
            self._arrays = [a for lst in self._lists if lst is not None for a in lst]
        for _, table, pos in self._tables:
            table.pointers[GRAD] = addresses[pos]

    # -- stepping --------------------------------------------------------------

    def step(
        self,
        *,
        step: int | Sequence[int] | np.ndarray,
        lr: float,
        beta1: float = 0.9,
        beta2: float = 0.999,
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        decoupled_weight_decay: bool = False,
        amsgrad: bool = False,
        maximize: bool = False,
        eps_hat: bool = False,
        grad_scale: float | None = None,
        found_inf: bool = False,
        state_rounding: str | None = "stochastic",
        seeds: int | Sequence[int] | np.ndarray | None = None,
        grads: Sequence[np.ndarray] | None = None,
    ) -> None:
        """One Adam/AdamW update of every tensor, in place.

        Parameters
        ----------
        step : int or sequence of int or numpy.ndarray
            The 1-based update count (>= 1): one int for every tensor, or one
            per tensor (tensors that joined training later).
        lr, beta1, beta2, eps, weight_decay, decoupled_weight_decay, amsgrad : optional
            As for :func:`adam_step` (the same defaults); ``amsgrad=True``
            needs a plan built with ``max_exp_avg_sqs``.
        maximize, eps_hat, grad_scale, found_inf, state_rounding : optional
            As for :func:`adam_step` (the same defaults).
        seeds : int or sequence of int or numpy.ndarray or None, default None
            Stochastic rounding's seeds (bfloat16 states), each in [0, 2**64):
            None (tensor ``i`` uses seed ``i``), an int ``s`` (tensor ``i``
            uses ``(s + i) % 2**64``, the optimizers' rule), or one per tensor.
        grads : sequence of numpy.ndarray or None, default None
            New gradient arrays for this and later steps (see
            :meth:`set_grads`); None keeps the plan's.

        Raises
        ------
        TypeError
            An argument of the wrong kind, named; nothing is modified.
        ValueError
            A bad value (a step < 1, a NaN hyperparameter, the wrong number
            of steps or seeds, an array made read-only since the plan was
            built), named; nothing is modified.
        """
        self.prepare(
            step=step, lr=lr, beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay,
            decoupled_weight_decay=decoupled_weight_decay, amsgrad=amsgrad, maximize=maximize,
            eps_hat=eps_hat, grad_scale=grad_scale, found_inf=found_inf,
            state_rounding=state_rounding, seeds=seeds, grads=grads,
        )()  # fmt: skip

    def prepare(
        self,
        *,
        step: int | Sequence[int] | np.ndarray,
        lr: float,
        beta1: float = 0.9,
        beta2: float = 0.999,
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        decoupled_weight_decay: bool = False,
        amsgrad: bool = False,
        maximize: bool = False,
        eps_hat: bool = False,
        grad_scale: float | None = None,
        found_inf: bool = False,
        state_rounding: str | None = "stochastic",
        seeds: int | Sequence[int] | np.ndarray | None = None,
        grads: Sequence[np.ndarray] | None = None,
    ) -> Callable[[], None]:
        """Check a :meth:`step` (same arguments) and return the function that runs it.

        Everything that can fail is checked here; the returned function only
        calls the kernels. An optimizer with several groups prepares every
        group's step before running any, so that a bad value anywhere
        changes nothing.

        Parameters
        ----------
        step, lr, beta1, beta2, eps, weight_decay, decoupled_weight_decay : optional
            As for :meth:`step`.
        amsgrad, maximize, eps_hat, grad_scale, found_inf, state_rounding : optional
            As for :meth:`step`.
        seeds, grads : optional
            As for :meth:`step`.

        Returns
        -------
        callable
            A function of no arguments that applies the step and returns None.

        Raises
        ------
        TypeError
            As for :meth:`step`.
        ValueError
            As for :meth:`step`.
        """
        if grads is not None:
            self.set_grads(grads)
        if _first_readonly is None or _first_readonly(self._arrays) >= 0:
            # Without fastadam._pycall, or where its buffer check saw an array
            # it would not write to: the exact check, which names the array.
            for a in self._arrays:
                if not a.flags.writeable:
                    self._raise_not_writeable()
        hp = check_hyper(lr, beta1, beta2, eps, weight_decay, grad_scale, state_rounding)
        amsgrad = bool(amsgrad)
        if amsgrad and not self.has_max:
            raise ValueError("amsgrad=True needs max_exp_avg_sqs, one array per parameter")
        steps = self._steps(step)
        seed_array = self._seeds(seeds)
        kernels = {kind: backends.get(self.backend, kind) for kind, _, _ in self._tables}
        if found_inf:
            return _nothing
        flags = (bool(decoupled_weight_decay), amsgrad, bool(maximize), bool(eps_hat))
        calls = []
        for kind, table, pos in self._tables:
            rounding = hp.rounding if kind == KIND_BF16 else STATE_SAME_DTYPE
            if isinstance(steps, int):
                scalars: tuple[AdamScalars, ...] = (_scalars(steps, hp, flags, rounding),)
                index = None
                tensor_steps: Any = np.uint64(steps)
            else:
                tensor_steps = steps[pos]
                unique, inverse = np.unique(tensor_steps, return_inverse=True)
                scalars = tuple(_scalars(int(s), hp, flags, rounding) for s in unique)
                index = None if len(scalars) == 1 else inverse.astype(np.int32)
            keys = None
            if rounding == STATE_BF16_STOCHASTIC:
                keys = rounding_keys(seed_array[pos], tensor_steps)
            calls.append((kernels[kind].step_multi, table, scalars, index, keys))

        def run() -> None:
            for step_multi, table, scalars, index, keys in calls:
                step_multi(table, scalars, index, keys)

        return run

    def _raise_not_writeable(self) -> None:
        for r, lst in enumerate(self._lists):
            for i, a in enumerate(lst or ()):
                if not a.flags.writeable:
                    raise ValueError(
                        f"{self._label(r, i)} must be writeable: it is updated in place"
                    )

    def _steps(self, step: Any) -> int | np.ndarray:
        """One int for all tensors, or a uint64 array of one step per tensor."""
        if isinstance(step, np.ndarray) and step.dtype.kind in "uif" and step.ndim == 1:
            # Vectorized: the optimizers pass their step counts as an array.
            self._check_count("step", step.shape[0])
            ok = (step >= 1) & (step < 2.0**63) & (step == np.floor(step))
            if not ok.all():
                i = int(np.flatnonzero(~ok)[0])
                raise ValueError(
                    f"step[{i}] must be an integer >= 1 (the 1-based count of this update), "
                    f"got {step[i]}"
                )
            return step.astype(np.uint64)
        if _is_sequence(step):
            values = self._per_tensor("step", step, check_step)
            if any(s >= 2**63 for s in values):
                raise ValueError("step must be < 2**63")
            return np.array(values, np.uint64)
        return check_step(step)

    def _seeds(self, seeds: Any) -> np.ndarray:
        """One uint64 seed per tensor."""
        if seeds is None:
            return self._default_seeds
        if isinstance(seeds, np.ndarray) and seeds.dtype == np.uint64 and seeds.ndim == 1:
            self._check_count("seeds", seeds.shape[0])
            return seeds  # every uint64 is a valid seed
        if _is_sequence(seeds):
            return np.array(self._per_tensor("seeds", seeds, check_seed), np.uint64)
        base = check_seed(check_int("seeds", seeds), "seeds")
        return self._default_seeds + np.uint64(base)  # wraps mod 2**64

    def _per_tensor(self, name: str, values: Any, check: Callable[[Any, str], int]) -> list[int]:
        """``check`` of each of one value per tensor, named ``name[i]``."""
        out = [check(v, f"{name}[{i}]") for i, v in enumerate(values)]
        self._check_count(name, len(out))
        return out

    def _check_count(self, name: str, n: int) -> None:
        if n != self.count:
            raise ValueError(f"{name} has {n} entries but there are {self.count} tensors")

    def __repr__(self) -> str:
        kinds = ", ".join(f"{kind}: {table.count}" for kind, table, _ in self._tables)
        return f"MultiTensorPlan({self.count} tensors; {kinds}; backend={self.backend!r})"


def _is_sequence(value: Any) -> bool:
    return isinstance(value, (Sequence, np.ndarray)) and not isinstance(value, (str, bytes))


def _nothing() -> None:
    """The step a GradScaler skips (``found_inf``): checked, then nothing."""


def _scalars(
    step: int, hp: Any, flags: tuple[bool, bool, bool, bool], rounding: int
) -> AdamScalars:
    decoupled, amsgrad, maximize, eps_hat = flags
    # seed 0: the per-tensor keys are passed to the backend separately.
    return compute_scalars(
        step, hp.lr, hp.beta1, hp.beta2, hp.eps, hp.weight_decay, decoupled, amsgrad,
        maximize, eps_hat, hp.grad_scale, rounding, 0,
    )  # fmt: skip


def adam_step_multi(
    params: Sequence[np.ndarray],
    grads: Sequence[np.ndarray],
    exp_avgs: Sequence[np.ndarray],
    exp_avg_sqs: Sequence[np.ndarray],
    *,
    step: int | Sequence[int] | np.ndarray,
    lr: float,
    beta1: float = 0.9,
    beta2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    decoupled_weight_decay: bool = False,
    amsgrad: bool = False,
    max_exp_avg_sqs: Sequence[np.ndarray] | None = None,
    maximize: bool = False,
    eps_hat: bool = False,
    grad_scale: float | None = None,
    found_inf: bool = False,
    state_rounding: str | None = None,
    seeds: int | Sequence[int] | np.ndarray | None = None,
    backend: str = "auto",
    exp_avg_absmaxes: Sequence[np.ndarray] | None = None,
    exp_avg_sq_absmaxes: Sequence[np.ndarray] | None = None,
    param_copies: Sequence[np.ndarray] | None = None,
    param_rounding: str = "nearest",
) -> None:
    """One fused Adam/AdamW update of a list of tensors, in place.

    ``params[i]``, ``grads[i]``, ``exp_avgs[i]``, ``exp_avg_sqs[i]`` (and
    ``max_exp_avg_sqs[i]``) obey :func:`adam_step`'s rules, and no two
    arrays of the whole call may share memory. The result is bit-identical to
    ``adam_step`` on each tensor with ``step=step[i]`` (or ``step``) and
    ``seed=seeds[i]``, but it costs one call into the backend per dtype kind,
    split over its threads by elements across all the tensors.

    For a loop that steps the same arrays every time, build a
    :class:`MultiTensorPlan` once instead: this function checks every array
    on every call.

    Parameters
    ----------
    params, grads, exp_avgs, exp_avg_sqs : sequence of numpy.ndarray
        One parameter, gradient and pair of moments per tensor, as for
        :class:`MultiTensorPlan`.
    step : int or sequence of int or numpy.ndarray
        The 1-based update count: one for every tensor, or one per tensor.
    lr, beta1, beta2, eps, weight_decay, decoupled_weight_decay, amsgrad : optional
        As for :func:`adam_step` (the same defaults).
    max_exp_avg_sqs : sequence of numpy.ndarray or None, default None
        One array per tensor, needed with ``amsgrad=True``.
    maximize, eps_hat, grad_scale, found_inf, state_rounding : optional
        As for :func:`adam_step` (the same defaults).
    seeds : int or sequence of int or numpy.ndarray or None, default None
        As for :meth:`MultiTensorPlan.step`.
    backend : {"auto", "numpy", "numba", "c"}, default "auto"
        As for :func:`adam_step`.
    exp_avg_absmaxes, exp_avg_sq_absmaxes : sequence of numpy.ndarray or None
        8-bit states (issue 18): one pair of scale arrays per tensor, as
        :func:`adam_step`'s ``exp_avg_absmax``/``exp_avg_sq_absmax``; every
        tensor then has uint8 moments (``fastadam._q8.Q8Plan`` is the plan).
    param_copies : sequence of numpy.ndarray or None, default None
        Master weights: one bfloat16/float16 copy per float32 parameter, as
        ``param_copy`` of :func:`adam_step`. With ``param_copies``, or with
        bfloat16/float16 ``params``, every tensor of the call must be of those
        (low-precision) kinds; each tensor's moments may have their own dtype
        (as :func:`adam_step` allows), one call per kind.
    param_rounding : {"nearest", "stochastic"}, default "nearest"
        As for :func:`adam_step`.

    Raises
    ------
    TypeError
        An argument of the wrong kind, named with its index
        (``exp_avgs[7] ...``); nothing is modified.
    ValueError
        A bad value, named with its index; nothing is modified.
    BackendUnavailableError
        The backend named cannot load on this machine.
    """
    q8 = exp_avg_absmaxes is not None or exp_avg_sq_absmaxes is not None
    if q8 and param_copies is not None:
        raise ValueError(
            "param_copies (master weights) take float32 moments; they cannot be combined "
            "with 8-bit states (exp_avg_absmaxes, exp_avg_sq_absmaxes)"
        )
    if q8:
        from ._q8 import adam_step_multi_q8

        adam_step_multi_q8(
            params, grads, exp_avgs, exp_avg_sqs, exp_avg_absmaxes, exp_avg_sq_absmaxes,
            backend, step=step, lr=lr, beta1=beta1, beta2=beta2, eps=eps,
            weight_decay=weight_decay, decoupled_weight_decay=decoupled_weight_decay,
            amsgrad=amsgrad, max_exp_avg_sqs=max_exp_avg_sqs, maximize=maximize,
            eps_hat=eps_hat, grad_scale=grad_scale, found_inf=found_inf,
        )  # fmt: skip
        return
    if param_copies is not None or any(_lowp.is_lowp(p) for p in params):  # issue 17
        _lowp.adam_step_multi_lowp(
            params, grads, exp_avgs, exp_avg_sqs, step=step, lr=lr, beta1=beta1, beta2=beta2,
            eps=eps, weight_decay=weight_decay, decoupled_weight_decay=decoupled_weight_decay,
            amsgrad=amsgrad, max_exp_avg_sqs=max_exp_avg_sqs, maximize=maximize,
            eps_hat=eps_hat, grad_scale=grad_scale, found_inf=found_inf,
            state_rounding=state_rounding, seeds=seeds, backend=backend,
            param_copies=param_copies, param_rounding=param_rounding,
        )  # fmt: skip
        return
    plan = MultiTensorPlan(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, backend=backend)
    plan.step(
        step=step, lr=lr, beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay,
        decoupled_weight_decay=decoupled_weight_decay, amsgrad=amsgrad, maximize=maximize,
        eps_hat=eps_hat, grad_scale=grad_scale, found_inf=found_inf,
        state_rounding=state_rounding, seeds=seeds,
    )  # fmt: skip
