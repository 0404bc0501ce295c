"""Reliability: concurrent callers, fork(), libraries that cannot load.

An optimizer that corrupts a week-long run once is worse than a slow one; each
test here guards one way a long run can go wrong.
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading

import numpy as np
import pytest
from helpers import assert_bit_identical, copy_state, make_state, run_python, run_step

import fastadam

#: Past every backend's parallel threshold, so the thread pools are really used.
BIG = 300_001


@pytest.mark.parametrize("size", [1000, BIG])
def test_concurrent_threads_match_sequential_calls(backend, size):
    """Python threads stepping different buffers at once: no abort, no deadlock, same bits."""
    n_threads, steps = 4, 5
    states = [make_state(size, np.float32, seed=s) for s in range(n_threads)]
    expected = [copy_state(s) for s in states]
    for st in expected:
        for step in range(1, steps + 1):
            run_step(st, backend, step=step, amsgrad=True, weight_decay=0.1)

    barrier = threading.Barrier(n_threads)
    errors: list[BaseException] = []

    def work(st):
        try:
            barrier.wait()
            for step in range(1, steps + 1):
                run_step(st, backend, step=step, amsgrad=True, weight_decay=0.1)
        except BaseException as exc:  # reported below, in the main thread
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(st,)) for st in states]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads), "a thread is stuck (deadlock?)"
    assert not errors, errors
    for got, want in zip(states, expected):
        assert_bit_identical(got, want)


FORK_CHILD = """
import os, sys, numpy as np, fastadam
backend = sys.argv[1] if len(sys.argv) > 1 else {backend!r}
fastadam.set_num_threads(2)
def state():
    rng = np.random.default_rng(0)
    p, g, m, v = (rng.standard_normal({n}).astype(np.float32) for _ in range(4))
    return p, g, m, np.abs(v)  # a second moment is never negative
p, g, m, v = state()
for step in (1, 2):  # the parent runs the threaded kernel first
    fastadam.adam_step(p, g, m, v, step=step, lr=1e-3, backend=backend)
pid = os.fork()
if pid == 0:
    q, h, a, b = state()
    fastadam.adam_step(q, h, a, b, step=1, lr=1e-3, backend=backend)
    ok = np.isfinite(q).all() and not np.array_equal(q, state()[0])
    os._exit(0 if ok else 3)
_, status = os.waitpid(pid, 0)
fastadam.adam_step(p, g, m, v, step=3, lr=1e-3, backend=backend)  # the parent still works too
print("child", status)
sys.exit(0 if status == 0 else 1)
"""


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_fork_after_parallel_kernels(backend):
    """A child forked after the thread pools ran can step and exit normally."""
    try:
        r = run_python(FORK_CHILD.format(backend=backend, n=BIG), timeout=120)
    except subprocess.TimeoutExpired:
        pytest.fail(f"fork test hung with backend {backend!r}")
    assert r.returncode == 0, (r.returncode, r.stdout, r.stderr)
    assert "child 0" in r.stdout


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_multiprocessing_fork_pool_steps(backend):
    """The multiprocessing/data-loader pattern: a fork-started pool runs steps."""
    code = (
        "import multiprocessing as mp, numpy as np, fastadam\n"
        f"B = {backend!r}\n"
        "def job(seed):\n"
        "    rng = np.random.default_rng(seed)\n"
        f"    p, g, m = (rng.standard_normal({BIG}).astype(np.float32) for _ in range(3))\n"
        "    v = np.ones_like(p)  # a second moment is never negative\n"
        "    fastadam.adam_step(p, g, m, v, step=1, lr=1e-3, backend=B)\n"
        "    assert np.isfinite(p).all()\n"
        "    return float(p[:10].sum())\n"
        "if __name__ == '__main__':\n"
        f"    p, g, m, v = (np.ones({BIG}, np.float32) for _ in range(4))\n"
        "    fastadam.adam_step(p, g, m, v, step=1, lr=1e-3, backend=B)\n"
        "    with mp.get_context('fork').Pool(2) as pool:\n"
        "        print(len(pool.map(job, range(4))))\n"
    )
    r = run_python(code, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "4"


def test_import_works_without_numba():
    """Numba missing: fastadam imports, lists what is there, and says why numba is not."""
    code = (
        "import sys\n"
        "sys.modules['numba'] = None  # makes 'import numba' raise ImportError\n"
        "import numpy as np, fastadam\n"
        "names = fastadam.available_backends()\n"
        "assert 'numba' not in names and 'numpy' in names, names\n"
        "ones = [np.ones(3, 'f4') for _ in range(4)]\n"
        "try:\n"
        "    fastadam.adam_step(*ones, step=1, lr=1e-3, backend='numba')\n"
        "except fastadam.BackendUnavailableError as e:\n"
        "    print('ERR', e)\n"
        "p, g, m, v = (np.ones(3, 'f4') for _ in range(4))\n"
        "fastadam.adam_step(p, g, m, v, step=1, lr=1e-3)  # auto still works\n"
        "print(fastadam.auto_backend())\n"
    )
    r = run_python(code)
    assert r.returncode == 0, r.stderr
    assert "ERR fastadam backend 'numba' is unavailable" in r.stdout and "numba" in r.stdout
    assert r.stdout.strip().splitlines()[-1] in ("c", "numpy")


def test_import_works_with_a_broken_c_library(tmp_path):
    """A file that is not a shared library: import works, the error is the loader's."""
    junk = tmp_path / "libfastadam_c.so"
    junk.write_bytes(b"not an ELF file")
    r = run_python(
        "import fastadam as fa\n"
        "print(fa.available_backends())\n"
        "print(fa.unavailable_reasons().get('c', ''))",
        FASTADAM_C_LIBRARY=str(junk),
    )
    assert r.returncode == 0, r.stderr
    names, reason = r.stdout.splitlines()[:2]
    assert "'c'" not in names and "'numpy'" in names
    assert str(junk) in reason or "ELF" in reason or "invalid" in reason


def test_nothing_hangs_on_sigint_free_exit():
    """Interpreter exit after parallel work returns promptly (no stuck pool threads)."""
    code = (
        "import numpy as np, fastadam\n"
        "for b in fastadam.available_backends():\n"
        f"    p, g, m, v = (np.ones({BIG}, np.float32) for _ in range(4))\n"
        "    fastadam.adam_step(p, g, m, v, step=1, lr=1e-3, backend=b)\n"
    )
    try:
        r = run_python(code, timeout=60)
    except subprocess.TimeoutExpired:
        pytest.fail("interpreter did not exit")
    assert r.returncode == 0 and r.returncode != -signal.SIGABRT, r.stderr


# --- loss scaling: unscale, check, step or skip ----------------------------------


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("n", [0, 1, 17, 1000, BIG])
def test_unscale_and_check_matches_numpy(backend, dtype, n):
    rng = np.random.default_rng(n)
    grads = [(rng.standard_normal(n) * 1024).astype(dtype) for _ in range(3)]
    expected = [g / dtype(1024.0) for g in grads]
    assert fastadam.unscale_and_check(grads, 1024.0, backend=backend) is False
    for g, e in zip(grads, expected):
        assert_bit_identical((g,), (e,), names=("grad",))


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf, 3e38])
def test_unscale_and_check_finds_overflow_and_still_unscales_everything(backend, bad):
    grads = [np.full(BIG, 2.0, np.float32) for _ in range(3)]
    grads[1][BIG // 2] = bad
    scale = 0.5 if bad == 3e38 else 4.0  # 3e38 / 0.5 overflows float32 to inf
    assert fastadam.unscale_and_check(grads, scale, backend=backend) is True
    for g in (grads[0], grads[2]):  # the others were unscaled too (as GradScaler does)
        assert np.all(g == np.float32(2.0) / np.float32(scale))


def test_scaled_training_skips_overflowing_steps_without_advancing():
    params = [np.ones(100, np.float32)]
    opt = fastadam.Adam(params, lr=0.1)
    for poison in (False, True, False):
        grads = [np.full(100, 64.0, np.float32)]
        if poison:
            grads[0][3] = np.inf
        before = params[0].copy()
        found_inf = fastadam.unscale_and_check(grads, 64.0)
        opt.step(grads, found_inf=found_inf)
        assert found_inf is poison
        assert np.array_equal(params[0], before) == poison
    assert opt.state[0]["step"] == 2  # the skipped step was not counted


@pytest.mark.parametrize(
    "grads, scale, exc, word",
    [
        ([np.ones(4, np.int32)], 2.0, TypeError, "grads[0]"),
        ([np.ones(4, np.float32), [1.0]], 2.0, TypeError, "grads[1]"),
        ([np.ones(8, np.float32)[::2]], 2.0, ValueError, "grads[0]"),
        ([np.ones(4, np.float32)], 0.0, ValueError, "scale"),
        ([np.ones(4, np.float32)], float("nan"), ValueError, "scale"),
        ([np.ones(4, np.float32)], "2", TypeError, "scale"),
    ],
)
def test_unscale_and_check_bad_input_changes_nothing(grads, scale, exc, word):
    before = [np.array(g, copy=True) for g in grads]
    with pytest.raises(exc) as info:
        fastadam.unscale_and_check(grads, scale)
    assert word in str(info.value)
    for g, b in zip(grads, before):
        assert np.array_equal(np.asarray(g), b)


def test_unscale_and_check_refuses_overlapping_grads():
    buf = np.ones(10, np.float32)
    with pytest.raises(ValueError, match="share memory"):
        fastadam.unscale_and_check([buf[:6], buf[4:]], 2.0)
    assert np.all(buf == 1.0)
