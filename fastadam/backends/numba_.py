"""Numba backend: one ``prange`` loop over the flattened buffers.

Design choices, each deliberate:

* **float32 stays float32.** Numba types Python floats as float64, so every
  constant is cast once with ``param.dtype.type(...)`` before the loop; a
  float64 constant would silently promote the whole update.
* **No fastmath, numpy error model.** fastmath would let LLVM contract
  ``a*b+c`` into FMAs and reorder, and this kernel must match the NumPy
  reference bit for bit. ``error_model="numpy"`` drops the per-division
  ZeroDivisionError check, which otherwise stops LLVM from vectorizing.
* **Threading layer: TBB, else ``workqueue``; launches serialised.** The
  layers differ in what they survive (measured on this project's 2-core VM):
  ``workqueue`` survives ``fork()`` but aborts the process when two Python
  threads launch at once, and wakes its workers slowly (~150 µs a launch);
  ``omp`` (GNU libgomp) launches in ~20 µs but Numba terminates any forked
  child of a process that used it; TBB launches in ~20 µs, is thread-safe and
  fork-safe. The ``tbb`` wheel installs its library where the dynamic loader
  does not look, so it is preloaded from the wheel's own file list. Parallel
  launches are serialised by ``_LAUNCH_LOCK`` whatever the layer (the step is
  memory-bound, so two at once would only share the bus); the lock is
  re-created in a forked child in case another thread held it at the fork.
  ``NUMBA_THREADING_LAYER`` set by the user is respected.
* **Small buffers run serially** (no lock, no thread wake-up): below
  ``config.PARALLEL_MIN_ELEMENTS`` the launch costs more than the work.
"""

from __future__ import annotations

import ctypes
import importlib
import importlib.metadata
import os
import threading

import numba
import numpy as np
from numba import njit, prange

from .. import config
from .._scalars import AdamScalars

NAME = "numba"


def _load_tbb() -> bool:
    """Make Numba's TBB layer loadable; True if it is."""
    try:
        files = importlib.metadata.files("tbb") or []
    except importlib.metadata.PackageNotFoundError:
        files = []
    for f in files:
        if f.name.startswith("libtbb.so"):
            try:
                ctypes.CDLL(str(f.locate()), mode=ctypes.RTLD_GLOBAL)
                break
            except OSError:
                pass
    try:
        importlib.import_module("numba.np.ufunc.tbbpool")
    except ImportError:
        return False
    return True


if "NUMBA_THREADING_LAYER" not in os.environ:
    numba.config.THREADING_LAYER = "tbb" if _load_tbb() else "workqueue"

_LAUNCH_LOCK = threading.Lock()


def _reset_lock_in_child() -> None:
    global _LAUNCH_LOCK
    _LAUNCH_LOCK = threading.Lock()


os.register_at_fork(after_in_child=_reset_lock_in_child)

_num_threads = 1


def _make_loop(parallel: bool):
    """The update loop, written once; compiled serial and parallel.

    The body is inline in the loop on purpose: passing the arrays to a helper
    function made Numba emit reference-count calls for every element.
    """
    rng = prange if parallel else range

    def loop(
        p,
        g,
        m,
        v,
        vmax,
        step_size,
        bc2_sqrt,
        eps,
        omb1,
        b2,
        omb2,
        wd,
        decay,
        scale,
        unscale,
        maximize,
        amsgrad,
    ):
        t = p.dtype.type  # cast every constant once: float32 math stays float32
        step_size, bc2_sqrt, eps = t(step_size), t(bc2_sqrt), t(eps)
        omb1, b2, omb2, wd, decay, scale = t(omb1), t(b2), t(omb2), t(wd), t(decay), t(scale)
        l2 = wd != 0
        for i in rng(p.size):
            gi = g[i]
            if unscale:
                gi = gi / scale
                g[i] = gi
            if maximize:
                gi = -gi
            theta = p[i]
            if l2:
                gi = gi + wd * theta
            theta = theta * decay
            mi = m[i]
            mi = mi + (gi - mi) * omb1
            vi = v[i] * b2
            vi = vi + omb2 * gi * gi
            m[i] = mi
            v[i] = vi
            if amsgrad:
                vm = vmax[i]
                if not (vm > vi or vm != vm):  # np.maximum: a NaN in either operand wins
                    vm = vi
                vmax[i] = vm
                vi = vm
            denom = np.sqrt(vi) / bc2_sqrt + eps
            p[i] = theta - step_size * mi / denom

    return loop


# error_model="numpy": IEEE results for x/0 instead of a ZeroDivisionError check
# on every division, which also kept LLVM from vectorizing the loop (3x slower).
_JIT = {"cache": True, "nogil": True, "error_model": "numpy"}
_serial = njit(**_JIT)(_make_loop(False))
_parallel = njit(parallel=True, **_JIT)(_make_loop(True))


def step(
    param: np.ndarray,
    grad: np.ndarray,
    exp_avg: np.ndarray,
    exp_avg_sq: np.ndarray,
    max_exp_avg_sq: np.ndarray | None,
    sc: AdamScalars,
) -> None:
    """Apply one Adam/AdamW update in place (arrays validated by the caller)."""
    if param.ndim != 1:  # one compiled signature: every shape runs as a flat view
        param, grad = param.reshape(-1), grad.reshape(-1)
        exp_avg, exp_avg_sq = exp_avg.reshape(-1), exp_avg_sq.reshape(-1)
        if max_exp_avg_sq is not None:
            max_exp_avg_sq = max_exp_avg_sq.reshape(-1)
    if max_exp_avg_sq is None:
        max_exp_avg_sq = exp_avg_sq  # never read or written unless amsgrad
    args = (param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq, *sc)
    if param.size < config.PARALLEL_MIN_ELEMENTS or _num_threads == 1:
        _serial(*args)
        return
    with _LAUNCH_LOCK:
        # Numba's thread count is thread-local: apply ours in the launching thread.
        numba.set_num_threads(min(_num_threads, numba.config.NUMBA_NUM_THREADS))
        _parallel(*args)


def set_num_threads(n: int) -> None:
    global _num_threads
    _num_threads = n


def get_num_threads() -> int:
    return min(_num_threads, numba.config.NUMBA_NUM_THREADS)
