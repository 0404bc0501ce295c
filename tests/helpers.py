"""Array generators and assertions shared by the tests (importable as ``helpers``)."""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
import tempfile

import numpy as np

import fastadam

#: The compiled backends, from the registry's one list of names.
FAST_BACKENDS = tuple(name for name in fastadam.BACKEND_NAMES if name != "numpy")
DTYPES = (np.float32, np.float64)
#: 0-size, scalars, SIMD-width tails (4/8/16 lanes), a prime past the
#: parallel threshold (so the threaded path runs too).
ODD_SIZES = (0, 1, 3, 7, 8, 15, 16, 17, 31, 33, 63, 65, 1000, 1023, 131071)

#: Every on/off combination of the update's options.
OPTION_NAMES = ("weight_decay", "decoupled_weight_decay", "amsgrad", "maximize")
OPTION_COMBOS = [
    dict(zip(OPTION_NAMES, (wd, dec, ams, mx)))
    for wd, dec, ams, mx in itertools.product(
        (0.0, 0.1), (False, True), (False, True), (False, True)
    )
]


def combo_id(c: dict) -> str:
    on = [k for k, v in c.items() if v]
    return "+".join(on) or "plain"


def make_state(n, dtype, seed=0, shape=None, scale=1.0):
    """A fresh (param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq) tuple.

    The moments start non-zero (as mid-training) so every term of the update
    matters from the first step.
    """
    rng = np.random.default_rng(seed)
    shape = (n,) if shape is None else shape
    p = rng.standard_normal(shape)
    g = rng.standard_normal(shape) * scale
    m = rng.standard_normal(shape) * 0.1
    v = rng.random(shape) * 0.01
    vmax = v + rng.random(shape) * 0.01 * (rng.random(shape) < 0.5)
    # np.array, not astype: a 0-d result must stay an array, not become a scalar.
    return tuple(np.array(a, dtype=dtype) for a in (p, g, m, v, vmax))


def copy_state(state):
    return tuple(a.copy() for a in state)


def run_step(state, backend, step=3, **kw):
    """One adam_step over ``state`` (updated in place) with sensible defaults."""
    p, g, m, v, vmax = state
    kw.setdefault("lr", 1e-2)
    fastadam.adam_step(p, g, m, v, step=step, max_exp_avg_sq=vmax, backend=backend, **kw)


def bits(a: np.ndarray) -> np.ndarray:
    """The array's bit patterns as unsigned ints, every NaN mapped to one pattern.

    Comparing bits (not values) tells +0.0 from -0.0; NaN payloads are not
    specified by IEEE arithmetic, so only a NaN's position counts.
    """
    u = np.ascontiguousarray(a).view(f"u{a.dtype.itemsize}").copy()
    u[np.isnan(a)] = np.array(np.nan, dtype=a.dtype).view(u.dtype)
    return u


def assert_bit_identical(
    actual, expected, names=("param", "grad", "exp_avg", "exp_avg_sq", "max_exp_avg_sq")
):
    for name, a, e in zip(names, actual, expected):
        assert a.dtype == e.dtype and a.shape == e.shape, name
        differ = bits(a) != bits(e)
        assert not differ.any(), (
            f"{name} differs in {np.count_nonzero(differ)} of {a.size} elements"
        )


def run_python(code: str, timeout: float = 120, **env: str) -> subprocess.CompletedProcess:
    """Run ``python -c code`` in a scratch directory with extra environment.

    Not from the repository root: there ``import fastadam`` would find the
    source tree (which has no compiled library) instead of the installed package.
    """
    with tempfile.TemporaryDirectory() as cwd:
        return subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout,
            cwd=cwd, env={**os.environ, **env},
        )  # fmt: skip
