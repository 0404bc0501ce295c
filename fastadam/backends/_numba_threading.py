"""The Numba backend's threading layer, and what it takes to survive ``fork()``.

The layer is chosen here, when the backend loads and before any parallel loop
compiles (see :mod:`fastadam.backends.numba_`, "Threading layer"): TBB if its
library loads, else ``workqueue``; ``NUMBA_THREADING_LAYER`` set by the user is
respected. :data:`LAUNCH_LOCK` serialises parallel launches; a forked child gets
a fresh one, so read it as ``_numba_threading.LAUNCH_LOCK`` at each launch.
"""

from __future__ import annotations

import ctypes
import importlib
import importlib.metadata
import os
import threading

import numba


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

LAUNCH_LOCK = threading.Lock()


def _reset_lock_in_child() -> None:
    global LAUNCH_LOCK
    LAUNCH_LOCK = threading.Lock()


os.register_at_fork(after_in_child=_reset_lock_in_child)
