"""The Numba loops' division by ``bias_correction2_sqrt`` through its reciprocal
and FMA (``_divide_bc2`` in ``fastadam/backends/_numba_loops.py``) gives the
division's bits, for the dividends it is called with: square roots (+0, a
normal number of at least 2^-75 in float32, 2^-537 in float64, +Inf, NaN).

The Numba twin of tests/test_c_fma_division.py: every float32 significand of
three binades (around 1, the largest and the smallest roots) and the
specials, and half a million float64, divided by the divisors
``compute_scalars`` produces over the first steps of six beta2 values, by the
ends of the range the entry points allow and pseudo-random ones in it (any
other is refused, tested below). The division under test runs inside a compiled
loop, vectorized as the kernels' is. A wrong bit anywhere fails.

The bits are checked where Numba compiles for a CPU with x86 FMA (elsewhere
the loops divide, and the test is skipped with that reason).
"""

from __future__ import annotations

import numpy as np
import pytest
from numba import njit

from fastadam._scalars import compute_scalars
from fastadam.backends import _numba_intrinsics, _numba_loops

needs_fma = pytest.mark.skipif(
    not _numba_intrinsics.has_fma(),
    reason="Numba compiles for a CPU without x86 FMA here: its loops divide",
)


@njit
def _quotients(a, b, out):
    t = a.dtype.type
    y = _numba_loops._bc2_reciprocal(t, b)
    inf = t(np.inf)
    for i in range(a.size):
        out[i] = _numba_loops._divide_bc2(a[i], b, y, inf)
    return y


def _divisors(dtype) -> list:
    bs = set()
    for beta2 in (0.9, 0.99, 0.995, 0.999, 0.9999, 0.99999):
        for step in (1, 2, 3, 10, 1000):
            sc = compute_scalars(step, 1e-3, 0.9, beta2, 1e-8, 0.0, False, False, False, False,
                                 None)  # fmt: skip
            bs.add(dtype.type(sc.bias_correction2_sqrt))
    bs.update(dtype.type(x) for x in (2.0**-40, 2.0, 1.0, 0.5))
    rng = np.random.default_rng(19)
    bs.update(dtype.type(x) for x in 2.0 ** rng.uniform(-40, 1, 8))
    return sorted(bs)


def _float32_dividends() -> np.ndarray:
    significands = np.arange(2**23, dtype=np.uint32)
    # the dividends are square roots of float32: +0, [2^-74.5, 2^64), +Inf, NaN
    binades = [(e + 127) << 23 for e in (0, 63, -75)]
    bits = np.concatenate([significands | np.uint32(e) for e in binades])
    specials = np.array([0.0, np.inf, np.nan, np.sqrt(np.float32(2.0**-149))], np.float32)
    return np.concatenate([bits.view(np.float32), specials])


@needs_fma
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_division_through_the_reciprocal_has_the_division_bits(dtype):
    dtype = np.dtype(dtype)
    if dtype == np.float32:
        a = _float32_dividends()
    else:
        rng = np.random.default_rng(5)
        a = np.concatenate([
            rng.uniform(1.0, 2.0, 250_000) * 2.0 ** rng.integers(-537, 512, 250_000),
            rng.uniform(1.0, 2.0, 250_000), [0.0, np.inf, np.nan, np.sqrt(5e-324)],
        ])  # fmt: skip
    out = np.empty_like(a)
    for b in _divisors(dtype):
        assert _quotients(a, b, out) != 0  # the reciprocal's path ran
        with np.errstate(all="ignore"):
            want = a / b
        bits = f"u{dtype.itemsize}"
        bad = np.flatnonzero(out.view(bits) != want.view(bits))
        assert bad.size == 0, (
            f"b={b!r}: {bad.size} quotients differ, first a={a[bad[0]]!r}: "
            f"{out[bad[0]]!r} against {want[bad[0]]!r}"
        )


@pytest.mark.parametrize("b", [2.0**-41, 2.5, float("inf"), float("nan")])
def test_a_divisor_outside_the_range_is_refused_untouched(b):
    from fastadam.backends import numba_

    rng = np.random.default_rng(0)
    arrays = [rng.standard_normal(1000).astype(np.float32) for _ in range(4)]
    before = [x.copy() for x in arrays]
    sc = compute_scalars(3, 1e-3, 0.9, 0.999, 1e-8, 0.0, False, False, False, False, None)
    with pytest.raises(ValueError, match="bias_correction2_sqrt"):
        numba_.step(*arrays, None, sc._replace(bias_correction2_sqrt=b))
    for x, y in zip(arrays, before):
        np.testing.assert_array_equal(x, y)
