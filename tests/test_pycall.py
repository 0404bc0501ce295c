"""fastadam._pycall: adam_step's one-call path to the C kernel.

It must run the kernel exactly when the checked path would accept the arrays
(same bits), and otherwise touch nothing and decline, so that the checked path
raises its own error or runs the unusual-but-valid case. Skipped where the
optional extension was not built (the checked path then serves every call).
"""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest
from helpers import assert_bit_identical

import fastadam
from fastadam import functional
from fastadam._scalars import STATE_SAME_DTYPE, compute_scalars
from fastadam.backends import reference

c = pytest.importorskip("fastadam.backends.c", reason="the C backend is not available")
if c.step_fast is None:
    pytest.skip("fastadam._pycall was not built here", allow_module_level=True)

N = 37


def _scalars(amsgrad=False, maximize=False, wd=0.0, unscale=None):
    return compute_scalars(
        3, 1e-3, 0.9, 0.999, 1e-8, wd, False, amsgrad, maximize, False, unscale, STATE_SAME_DTYPE
    )


def _arrays(dtype=np.float32, n=N, seed=0):
    rng = np.random.default_rng(seed)
    p, g = (rng.standard_normal(n).astype(dtype) for _ in range(2))
    m = (rng.standard_normal(n) * 0.1).astype(dtype)
    v = np.abs(rng.standard_normal(n)).astype(dtype)
    vmax = v + np.abs(rng.standard_normal(n)).astype(dtype)
    return [p, g, m, v, vmax]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("amsgrad", [False, True])
@pytest.mark.parametrize("shape", [(N,), (5, 7), (), (0,), (2, 0, 3)])
def test_accepted_arrays_get_the_reference_bits(dtype, amsgrad, shape):
    n = int(np.prod(shape))
    arrays = [a.reshape(shape) for a in _arrays(dtype, n)]
    want = [a.copy() for a in arrays]
    sc = _scalars(amsgrad=amsgrad, maximize=True, wd=0.01, unscale=2.0)
    assert c.step_fast(*arrays[:4], arrays[4] if amsgrad else None, sc) == 0
    reference.step(*want[:4], want[4] if amsgrad else None, sc)
    assert_bit_identical(arrays, want)


def _declines(arrays, vmax=None, sc=None):
    sc = sc or _scalars()
    before = [a.tobytes() if isinstance(a, np.ndarray) else None for a in (*arrays, vmax)]
    assert c.step_fast(*arrays, vmax, sc) == c.DECLINED
    for b, a in zip(before, (*arrays, vmax)):
        if b is not None:
            assert a.tobytes() == b, "a declined call modified an array"


def test_declines_everything_the_checked_path_must_see():
    p, g, m, v, vmax = _arrays()
    ro = v.copy()
    ro.flags.writeable = False
    big = _arrays(n=2 * N)[0]
    raw = np.zeros(N * 4 + 1, np.uint8)
    misaligned = raw[1:].view(np.float32)
    cases = {
        "read-only": [p, g, m, ro],
        "strided": [p, g, m, big[::2]],
        "float64 state": [p, g, m, v.astype(np.float64)],
        "float16": [a.astype(np.float16) for a in (p, g, m, v)],
        "byte-swapped": [p, g, m, v.astype(">f4")],
        "bfloat16 states": [p, g, m.astype(ml_dtypes.bfloat16), v.astype(ml_dtypes.bfloat16)],
        "other shape": [p, g, m, big[:N].reshape(1, N)],
        "other size": [p, g, m, big],
        "same array twice": [p, p, m, v],
        "overlap": [big[:N], g, big[N - 1 : 2 * N - 1], v],
        "subclass": [p, g, m, v.view(np.ma.MaskedArray)],
        "misaligned": [p, g, m, misaligned],
        "not an array": [p, g, m, list(v)],
        "memoryview": [p, g, m, memoryview(v)],
    }
    for name, arrays in cases.items():
        try:
            _declines(arrays)
        except AssertionError as exc:
            raise AssertionError(f"{name}: {exc}") from None
    _declines([p, g, m, v], vmax=None, sc=_scalars(amsgrad=True))  # amsgrad without vmax
    _declines([p, g, m, v], vmax=ro)  # a vmax given is checked even without amsgrad
    _declines([p, g, m, v], sc=(1.0,) * 3)  # not an AdamScalars


def test_adam_step_uses_it_and_the_checked_path_still_names_the_culprit():
    p, g, m, v, _ = _arrays()
    fastadam.adam_step(p, g, m, v, step=1, lr=1e-3, backend="c")
    assert functional._FAST["c"] is not None
    ro = v.copy()
    ro.flags.writeable = False
    with pytest.raises(ValueError, match="exp_avg_sq must be writeable"):
        fastadam.adam_step(p, g, m, ro, step=1, lr=1e-3, backend="c")
    # a bad array is reported before a bad hyperparameter, fast path or not
    with pytest.raises(ValueError, match="exp_avg_sq must be writeable"):
        fastadam.adam_step(p, g, m, ro, step=1, lr=float("nan"), backend="c")
    with pytest.raises(ValueError, match="lr"):
        fastadam.adam_step(p, g, m, v, step=1, lr=float("nan"), backend="c")
