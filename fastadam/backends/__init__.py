"""Backend registry: name -> kernel module, loaded lazily, failures remembered.

A backend is a module that provides everything :class:`Backend` names.
Adding one (a GPU backend, say) is one module and one row in ``_BACKENDS``.
A backend that fails to import is recorded with the loader's own message, so
``import fastadam`` never fails and asking for that backend says why.
"""

from __future__ import annotations

import importlib
import os
import threading
from types import ModuleType
from typing import TYPE_CHECKING, Protocol

from .._table import KIND_BF16, KIND_F32, KIND_F64, KINDS

if TYPE_CHECKING:
    import numpy as np

    from .._scalars import AdamScalars
    from .._table import TensorTable


class Backend(Protocol):
    """What a backend module provides (checked when it loads)."""

    NAME: str

    def step(
        self,
        param: np.ndarray,
        grad: np.ndarray,
        exp_avg: np.ndarray,
        exp_avg_sq: np.ndarray,
        max_exp_avg_sq: np.ndarray | None,
        sc: AdamScalars,
    ) -> None:
        """One tensor's update in place (arrays validated by the caller)."""

    def step_multi(
        self,
        table: TensorTable,
        scalars: tuple[AdamScalars, ...],
        index: np.ndarray | None,
        keys: np.ndarray | None,
    ) -> None:
        """Every tensor of a table (see :mod:`fastadam._table`)."""

    def unscale_and_check(self, grad: np.ndarray, scale: float) -> bool:
        """``grad /= scale`` in place; True if any result is NaN or infinite."""

    def set_num_threads(self, n: int) -> None: ...

    def get_num_threads(self) -> int: ...


#: The members of Backend, which every backend module must define.
_CONTRACT = ("NAME", "step", "step_multi", "unscale_and_check", "set_num_threads",
             "get_num_threads")  # fmt: skip

#: (public name, module in this package), in "auto"'s order of preference:
#: fastest first (C has the cheapest call, Numba the next). Every other list of
#: backend names derives from this one.
_BACKENDS: tuple[tuple[str, str], ...] = (("c", "c"), ("numba", "numba_"), ("numpy", "reference"))
_MODULES: dict[str, str] = dict(_BACKENDS)

#: Public names, the reference first.
BACKEND_NAMES: tuple[str, ...] = tuple(name for name, _ in reversed(_BACKENDS))

_loaded: dict[str, ModuleType] = {}
_errors: dict[str, str] = {}
_auto: dict[str, ModuleType] = {}  # kind -> what "auto" resolved to
_load_lock = threading.RLock()
_num_threads: int | None = None  # None: each backend's default from config


class BackendUnavailableError(ImportError):
    """A backend was asked for by name but cannot be loaded on this machine.

    A subclass of :class:`ImportError`; the message gives the loader's reason
    (as :func:`unavailable_reasons` does).
    """


def loaded(name: str) -> ModuleType | None:
    """The module of backend ``name`` if it is loaded, else None (loads nothing)."""
    return _loaded.get(name)


def _try_load(name: str) -> ModuleType | None:
    if name in _loaded:
        return _loaded[name]
    if name in _errors:
        return None
    with _load_lock:
        if name in _loaded or name in _errors:
            return _loaded.get(name)
        try:
            mod = importlib.import_module(f"{__name__}.{_MODULES[name]}")
        except Exception as exc:  # any loader failure makes the backend unavailable
            _errors[name] = f"{type(exc).__name__}: {exc}"
            return None
        missing = [attr for attr in _CONTRACT if not hasattr(mod, attr)]
        if missing:  # a programming error, not a machine without the backend
            raise TypeError(f"fastadam backend {name!r} does not provide {', '.join(missing)}")
        mod.set_num_threads(get_num_threads())
        _loaded[name] = mod
        return mod


#: Which backend ``"auto"`` prefers, by the C library's kernel variant (the ISA
#: class of the CPU, or the one FASTADAM_ISA forces) and the kind of a step
#: (fastadam._table's KIND_*: float32, float64, float32 with bfloat16 states).
#: A fixed rule, from steps of the two backends timed side by side in one
#: process at 2^16-2^26 elements (BENCHMARKS.md, "Which backend auto picks";
#: ``python bench/vs_torch_fused.py --dtype float32,float64,bf16``); no timing
#: happens at import. A preferred backend that cannot load here falls back to
#: the _BACKENDS order.
_AUTO_RULE: dict[str, dict[str, str]] = {
    "avx512": {KIND_F32: "c", KIND_F64: "c", KIND_BF16: "c"},
    "avx2": {KIND_F32: "c", KIND_F64: "c", KIND_BF16: "c"},
    "baseline": {KIND_F32: "c", KIND_F64: "c", KIND_BF16: "c"},
}


def get(name: str, kind: str = KIND_F32) -> ModuleType:
    """The kernel module for ``name``; for ``"auto"``, the one ``auto`` picks for steps of
    ``kind`` (``"float32"``, ``"float64"`` or ``"bfloat16"`` states). Raises if it cannot
    run here."""
    if type(name) is str:  # the per-step fast path: an already loaded backend
        mod = _loaded.get(name)
        if mod is not None:
            return mod
        if name == "auto":
            mod = _auto.get(kind)
            if mod is not None:
                return mod
    elif not isinstance(name, str):
        raise TypeError(f"backend must be a str, got {type(name).__name__}")
    if name == "auto":
        return _resolve_auto(kind)
    if name not in _MODULES:
        raise ValueError(
            f"backend must be one of 'auto', {', '.join(map(repr, BACKEND_NAMES))}; got {name!r}"
        )
    mod = _try_load(name)
    if mod is None:
        raise BackendUnavailableError(f"fastadam backend {name!r} is unavailable: {_errors[name]}")
    return mod


#: Families of steps whose kernels a backend keeps in a module of their own, loaded
#: on first use (so that a backend loads without them): family -> backend -> module
#: in this package. The NumPy reference has none: each family's definition (its
#: module beside the validation) is its reference kernel.
_FAMILIES: dict[str, dict[str, str]] = {
    "q8": {"c": "_c_q8", "numba": "_numba_q8"},  # 8-bit states (fastadam._q8)
    "lowp": {"c": "_c_lowp", "numba": "_numba_lowp"},  # bf16/fp16 params (fastadam._lowp)
}


def family(name: str, which: str) -> ModuleType | None:
    """The module of backend ``name``'s kernels for the ``which`` family of steps
    (``"q8"``, ``"lowp"``; see ``_FAMILIES``), or None for the NumPy reference;
    ``"auto"`` follows the float32 steps' choice. Raises as :func:`get` does."""
    module = _FAMILIES[which].get(get(name, KIND_F32).NAME)
    return None if module is None else importlib.import_module(f".{module}", __name__)


def _isa_class() -> str:
    """The key of _AUTO_RULE for this process: the C library's variant, or the
    baseline rule when C does not load (then only the order of _BACKENDS matters)."""
    c = _try_load("c")
    return c.isa() if c is not None else "baseline"


def _resolve_auto(kind: str) -> ModuleType:
    # FASTADAM_BACKEND is read once, at the first "auto" step of the process.
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {', '.join(map(repr, KINDS))}; got {kind!r}")
    with _load_lock:
        if kind in _auto:
            return _auto[kind]
        forced = os.environ.get("FASTADAM_BACKEND", "").strip()
        if forced and forced != "auto":
            if forced not in _MODULES:
                raise ValueError(
                    f"FASTADAM_BACKEND must be one of {', '.join(map(repr, BACKEND_NAMES))}; "
                    f"got {forced!r}"
                )
            mod = get(forced)
        else:
            preferred = _AUTO_RULE.get(_isa_class(), _AUTO_RULE["baseline"])[kind]
            order = [preferred] + [n for n in _MODULES if n != preferred]
            mod = next(m for n in order if (m := _try_load(n)) is not None)
        _auto[kind] = mod
        return mod


def available_backends() -> tuple[str, ...]:
    """Names of the backends that load on this machine.

    Loads each backend the first time it is asked for; a backend that fails
    is remembered, with its reason (:func:`unavailable_reasons`).

    Returns
    -------
    tuple of str
        A subset of ``BACKEND_NAMES``, in its order, such as
        ``('numpy', 'numba', 'c')``.
    """
    return tuple(n for n in BACKEND_NAMES if _try_load(n) is not None)


def unavailable_reasons() -> dict[str, str]:
    """Why each backend that failed to load did so.

    Returns
    -------
    dict of str to str
        Backend name to the loader's message (``"ImportError: ..."``); empty
        when every backend loads.
    """
    available_backends()
    return dict(_errors)


def auto_backend(kind: str = KIND_F32) -> str:
    """The backend ``backend="auto"`` uses in this process for steps of ``kind``.

    ``FASTADAM_BACKEND``, if set, decides (read once, at the first such call
    of the process); otherwise a fixed rule by the C library's kernel variant
    and the kind of step, falling back to the first backend that loads.

    Parameters
    ----------
    kind : {"float32", "float64", "bfloat16"}, default "float32"
        The kind of step: float32 or float64 arrays, or float32 parameters
        with bfloat16 states.

    Returns
    -------
    str
        ``"numpy"``, ``"numba"`` or ``"c"``.

    Raises
    ------
    ValueError
        An unknown ``kind``, or ``FASTADAM_BACKEND`` naming no backend.
    BackendUnavailableError
        ``FASTADAM_BACKEND`` names a backend that cannot load here.
    """
    return _resolve_auto(kind).NAME


def auto_choices() -> dict[str, str]:
    """:func:`fastadam.auto_backend` for every kind of step.

    Returns
    -------
    dict of str to str
        Kind (``"float32"``, ``"float64"``, ``"bfloat16"``) to backend name.

    Raises
    ------
    ValueError, BackendUnavailableError
        As for :func:`fastadam.auto_backend`, for a bad ``FASTADAM_BACKEND``.
    """
    return {kind: auto_backend(kind) for kind in KINDS}


def set_num_threads(n: int) -> None:
    """Set the threads the Numba and C kernels use from now on (process-wide).

    Numba cannot exceed the pool it started with (``NUMBA_NUM_THREADS``, by
    default the CPU count) and uses at most that many. Results do not depend
    on the thread count.

    Parameters
    ----------
    n : int
        Thread count, >= 1 (a Python or NumPy integer).

    Raises
    ------
    TypeError
        ``n`` is not an integer (a bool is refused too).
    ValueError
        ``n`` < 1.
    """
    from .._validation import check_threads

    n = check_threads(n)
    global _num_threads
    with _load_lock:
        _num_threads = n
        for mod in _loaded.values():
            mod.set_num_threads(n)


def get_num_threads() -> int:
    """Threads the Numba and C kernels use (see :func:`set_num_threads`).

    Until :func:`set_num_threads` is called: ``FASTADAM_NUM_THREADS`` if set,
    otherwise the CPUs this process may run on divided by torchrun's
    ``LOCAL_WORLD_SIZE`` (so several ranks on one machine share its cores).

    Returns
    -------
    int
        The thread count, >= 1.

    Raises
    ------
    ValueError
        ``FASTADAM_NUM_THREADS`` is set but not a positive integer.
    """
    global _num_threads
    if _num_threads is None:
        from ..config import default_num_threads

        _num_threads = default_num_threads()
    return _num_threads
