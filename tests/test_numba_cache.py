"""fastadam's Numba cache: saves from several processes at once keep each
overload's own machine code (fastadam._numba_cache)."""

from __future__ import annotations

import threading

import pytest

pytest.importorskip("numba")

from numba.core import caching  # noqa: E402

from fastadam import _numba_cache  # noqa: E402


def _race(cls, tmp_path, monkeypatch):
    """Two savers of one function's cache, each adding its own overload, both
    having read the index before either writes it (as two processes that
    finish compiling at the same moment). Returns what a third process loads."""
    snapshots = threading.Barrier(2, timeout=1.0)
    load_index = caching.IndexDataCacheFile._load_index

    def load_then_wait(self):
        overloads = load_index(self)
        try:
            snapshots.wait()  # with the lock the other saver cannot get here: times out
        except threading.BrokenBarrierError:
            pass
        return overloads

    def saver(key, data):
        f = cls(str(tmp_path), "f-1.py311", source_stamp=("stamp", 1))
        monkeypatch.setattr(f, "_load_index", load_then_wait.__get__(f))
        f.save(key, data)

    threads = [threading.Thread(target=saver, args=(("sig", k), f"code of {k}")) for k in "ab"]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    reader = caching.IndexDataCacheFile(str(tmp_path), "f-1.py311", source_stamp=("stamp", 1))
    return {k: reader.load(("sig", k)) for k in "ab"}


@pytest.mark.skipif(_numba_cache.fcntl is None, reason="no fcntl (Windows): saves are unlocked")
def test_concurrent_saves_keep_each_overload_with_its_own_code(tmp_path, monkeypatch):
    """Unlocked (Numba's own save), both overloads take data file 1 and one of
    them is lost or, worse, mapped to the other's code; locked, both are kept."""
    got = _race(_numba_cache.LockedIndexDataCacheFile, tmp_path, monkeypatch)
    assert got == {"a": "code of a", "b": "code of b"}


def test_every_cached_loop_saves_under_the_lock():
    """The Numba backend's compiled loops (and the bench's roofline kernels) use
    the locked cache file; a dispatcher this Numba builds otherwise is left alone."""
    from fastadam.backends import _numba_loops, _numba_lowp, _numba_q8
    from fastadam.bench import roofline

    dispatchers = [
        _numba_loops._serial,
        _numba_loops._parallel,
        _numba_loops._multi_loop(False, True, False, True),
        _numba_loops._unscale_parallel,
        *_numba_q8._loops(False, False, False, False),
        _numba_q8._single,
        _numba_lowp._loop,
        *roofline._get_roofline_kernel(),
    ]
    files = [getattr(getattr(d, "_cache", None), "_cache_file", None) for d in dispatchers]
    if not all(isinstance(f, caching.IndexDataCacheFile) for f in files):
        pytest.skip("this Numba keeps its cache files otherwise")
    assert all(type(f) is _numba_cache.LockedIndexDataCacheFile for f in files)
