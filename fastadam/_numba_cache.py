"""Numba's on-disk cache (``cache=True``), safe when several processes fill it at once.

Numba keeps one index file per cached function, mapping each compiled overload
(its signature, target CPU, and for a closure the values it closes over) to a
numbered data file. Saving an overload loads the index, takes the first free
number, writes the index, then the data (``numba.core.caching.
IndexDataCacheFile.save``). Two processes that save two different overloads of
one function at the same moment can take the same number: the index then maps
one overload to the other one's machine code, and every later process loads
that code for it. fastadam compiles one closure per combination of flags
(``backends._numba_loops._multi_loop``, ``backends._numba_q8._loops``) under one name, so this
is not far-fetched: the test suite's two workers, filling a fresh cache, left
the float32 multi-tensor loop with ``amsgrad`` and ``maximize`` running another
variant's code, and its results differed from the reference's (session 17).
The same can happen to training processes started together on one machine.

:func:`njit` is ``numba.njit(cache=True, ...)`` whose saves hold an exclusive
lock (``fcntl.flock``) on one file in the cache directory: the load of the
index, the choice of number and both writes happen as one step. Loading needs
no lock: a number, once in an index, is only ever rewritten with the same
overload's data. Where ``fcntl`` is missing (Windows), or the lock file cannot
be opened or locked, saving is as Numba does it.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from typing import Any

import numba
from numba.core import caching

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

#: The lock file, one per cache directory.
LOCK_NAME = "fastadam-numba-cache.lock"


@contextlib.contextmanager
def _exclusive(directory: str) -> Iterator[None]:
    if fcntl is None:  # pragma: no cover - Windows
        yield
        return
    try:
        f = open(os.path.join(directory, LOCK_NAME), "a")  # noqa: SIM115 (held below)
    except OSError:
        yield  # the save itself then reports whether the directory is writeable
        return
    with f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX)
        except OSError:  # a file system without locks (some network ones)
            yield
            return
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


class LockedIndexDataCacheFile(caching.IndexDataCacheFile):
    """Numba's index and data files, saved under an exclusive lock (module docstring)."""

    def save(self, key: Any, data: Any) -> None:
        with _exclusive(self._cache_path):
            super().save(key, data)


def lock_saves(dispatcher: Any) -> Any:
    """``dispatcher`` (``numba.njit(cache=True)``'s, not yet compiled) with its
    cache's saves locked; returned as it is where this Numba keeps its cache
    files otherwise (an internal that may change)."""
    cache_file = getattr(getattr(dispatcher, "_cache", None), "_cache_file", None)
    if type(cache_file) is caching.IndexDataCacheFile:
        cache_file.__class__ = LockedIndexDataCacheFile
    return dispatcher


def njit(fn: Callable | None = None, /, **options: Any) -> Any:
    """``numba.njit(cache=True, **options)`` with its cache's saves locked; as a
    decorator (``@njit(parallel=True)``) or a call (``njit(f, parallel=True)``)."""

    def wrap(f: Callable) -> Any:
        return lock_saves(numba.njit(cache=True, **options)(f))

    return wrap if fn is None else wrap(fn)
