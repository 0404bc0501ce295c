"""8-bit block-wise states (issue 18): the format, parity of every backend with
the NumPy reference (bit for bit, any thread count, multi-tensor), bad input."""

from __future__ import annotations

import inspect

import numpy as np
import pytest

import fastadam
from fastadam import _q8
from fastadam.bench.machine import numba_target_environment

SIZES = [1, 255, 256, 257, 3000, 70001]
CONFIGS = [
    {},
    {"weight_decay": 0.1},
    {"weight_decay": 0.05, "decoupled_weight_decay": True},
    {"maximize": True},
    {"grad_scale": 1024.0},
    {"eps_hat": True, "weight_decay": 0.01},
]


def _grads(n, t, scale=1.0):
    rng = np.random.default_rng(1000 + t)
    g = rng.standard_normal(n).astype(np.float32) * np.float32(scale)
    g[rng.random(n) < 0.01] *= np.float32(1e-4)  # a wide dynamic range in each block
    return g


def _run(n, backend, steps=4, **kw):
    p = np.random.default_rng(n).standard_normal(n).astype(np.float32)
    m, v, am, av = _q8.zeros_state(n)
    gs = kw.get("grad_scale") or 1.0
    for t in range(1, steps + 1):
        g = _grads(n, t, gs)
        fastadam.adam_step(p, g, m, v, step=t, lr=1e-2, exp_avg_absmax=am,
                           exp_avg_sq_absmax=av, backend=backend, **kw)  # fmt: skip
    return p, m, v, am, av


def _same(a, b):
    for x, y in zip(a, b):
        assert x.dtype == y.dtype and x.shape == y.shape
        np.testing.assert_array_equal(x.view(np.uint8), y.view(np.uint8))


# -- format ------------------------------------------------------------------------------


def test_code_maps():
    k = np.arange(256, dtype=np.uint8)
    yv = _q8.dequantize(k, np.ones(1, np.float32), signed=False)
    assert yv[0] == 0 and yv[255] == 1.0 and np.all(np.diff(yv) > 0)
    assert yv[1] == np.float32(1.25 * 2.0**-32)
    ym = _q8.dequantize(k, np.ones(1, np.float32), signed=True)
    assert ym[1] == np.float32(1.25 * 2.0**-16) and ym[127] == 1.0 and ym[255] == -1.0
    assert np.all(np.diff(ym[:128]) > 0)
    np.testing.assert_array_equal(ym[128:], -ym[:128])
    # every code survives a round trip
    for signed, y in ((False, yv), (True, ym)):
        c, a = _q8.quantize(np.concatenate([y, [1.0]]).astype(np.float32), signed)
        np.testing.assert_array_equal(c[:256] & (0xFF if not signed else 0x7F),
                                      k & (0xFF if not signed else 0x7F))  # fmt: skip


def test_quantize_error_bound():
    rng = np.random.default_rng(0)
    x = (rng.standard_normal(10_000) * np.exp(rng.uniform(-8, 8, 10_000))).astype(np.float32)
    for signed, kmin in ((True, 1), (False, 1)):
        xx = x if signed else x * x
        c, a = _q8.quantize(xx, signed)
        assert a.shape == (_q8.nblocks(xx.size),)
        y = _q8.dequantize(c, a, signed)
        ymin = _q8.dequantize(np.array([kmin], np.uint8), np.ones(1, np.float32), signed)[0]
        big = np.abs(xx) >= np.repeat(a, _q8.BLOCK)[: xx.size] * ymin
        rel = np.abs(y[big] - xx[big]) / np.abs(xx[big])
        assert rel.max() <= 1 / 16 + 1e-6


def test_positive_v_never_zero():
    v = np.array([1.0, 1e-30, 1e-20, 0.0] + [0.5] * 300, np.float32)
    c, a = _q8.quantize(v, signed=False)
    assert c[0] == 255 and c[1] >= 1 and c[2] >= 1 and c[3] == 0


def test_absmax_nan_propagates():
    v = np.ones(300, np.float32)
    v[5] = np.nan
    _, a = _q8.quantize(v, signed=False)
    assert np.isnan(a[0]) and a[1] == 1.0


# -- parity --------------------------------------------------------------------------------


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: "-".join(c) or "plain")
def test_parity(fast_backend, n, cfg):
    _same(_run(n, "numpy", **cfg), _run(n, fast_backend, **cfg))


def _special_grads(t: int) -> np.ndarray:
    """Gradients that reach the edges of the encoding, one kind per 256-element block:
    a NaN, +inf and -inf, magnitudes whose block absmax is subnormal (its reciprocal
    overflows to inf, so each zero of the block meets 0 * inf) with zeros and -0.0
    among them, all zeros, values whose square overflows, m's code of -0 (a negative m
    too small for any code, then a -0.0 m: 0.1 times the smallest negative subnormal
    rounds to -0.0, and -0.0 + -0.0 keeps the sign that y(code) must give m0), then a
    partial block."""
    rng = np.random.default_rng(7 + t)
    g = rng.standard_normal(7 * 256 + 77).astype(np.float32)
    g[5] = np.nan
    g[256 + 9], g[256 + 10] = np.inf, -np.inf
    tiny = g[512:768]
    tiny *= np.float32(1e-41)  # subnormal gradients, m = 0.1 g is subnormal too
    tiny[::7] = 0.0
    tiny[3::7] = -0.0
    g[768:1024] = 0.0
    g[1024:1280] = -0.0
    g[1280:1536] *= np.float32(1e30)  # g * g overflows to inf
    g[1536 + 1 : 1792 : 2] = -1e-30 if t == 1 else -np.float32(1.4e-45)
    return g


def _run_special(backend):
    """Three steps on _special_grads: (param, codes, scales)."""
    n = 7 * 256 + 77
    p = np.random.default_rng(3).standard_normal(n).astype(np.float32)
    m, v, am, av = _q8.zeros_state(n)
    with np.errstate(all="ignore"):
        for t in (1, 2, 3):
            fastadam.adam_step(p, _special_grads(t), m, v, step=t, lr=1e-2, exp_avg_absmax=am,
                               exp_avg_sq_absmax=av, backend=backend)  # fmt: skip
    return p, m, v, am, av


def test_parity_special_values(fast_backend):
    """NaN, infinities, zeros of both signs and subnormal block maxima give the
    reference's bits: the kernels' encoders use bits(x * r) where the reference has
    bits(|x| * r) (fastadam_kernel_q8.h), and the two must agree here too."""
    out = [_run_special("numpy"), _run_special(fast_backend)]
    assert np.isnan(out[0][3][0]) and out[0][3][2] != 0 and out[0][3][2] < np.finfo(np.float32).tiny
    _same(*out)


@pytest.mark.parametrize("threads", [1, 2])
def test_numba_blocks(threads, restore_threads):
    """The Numba blocks give the reference's bits on every kind of block (a share's
    first, the pipelined ones whose codes follow the next block's update, a
    partial last one) and value (special ones)."""
    pytest.importorskip("numba")
    fastadam.set_num_threads(threads)
    # the flags test_parity compiles anyway: the schedule does not depend on them
    _same(_run(70001, "numpy"), _run(70001, "numba"))
    _same(_run_special("numpy"), _run_special("numba"))


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_threads(fast_backend, threads, restore_threads):
    ref = _run(300_001, "numpy", steps=2)
    fastadam.set_num_threads(threads)
    _same(ref, _run(300_001, fast_backend, steps=2))


def test_multi_tensor(backend):
    sizes = [5, 256, 70001, 1000, 300_000]
    params = [np.random.default_rng(i).standard_normal(n).astype(np.float32)
              for i, n in enumerate(sizes)]  # fmt: skip
    states = [_q8.zeros_state(n) for n in sizes]
    ref_p = [p.copy() for p in params]
    ref_s = [tuple(a.copy() for a in s) for s in states]
    for t in (1, 2, 3):
        grads = [_grads(n, t + i) for i, n in enumerate(sizes)]
        steps = [t, t + 1, t, t + 5, t]
        fastadam.adam_step_multi(
            params, [g.copy() for g in grads], [s[0] for s in states], [s[1] for s in states],
            step=steps, lr=1e-2, weight_decay=0.01, exp_avg_absmaxes=[s[2] for s in states],
            exp_avg_sq_absmaxes=[s[3] for s in states], backend=backend,
        )  # fmt: skip
        for i in range(len(sizes)):
            m, v, am, av = ref_s[i]
            fastadam.adam_step(ref_p[i], grads[i].copy(), m, v, step=steps[i], lr=1e-2,
                               weight_decay=0.01, exp_avg_absmax=am, exp_avg_sq_absmax=av,
                               backend="numpy")  # fmt: skip
    for i in range(len(sizes)):
        _same((ref_p[i], *ref_s[i]), (params[i], *states[i]))


def test_tracks_float32_adam(backend):
    n = 20_000
    p8 = np.random.default_rng(0).standard_normal(n).astype(np.float32)
    p32 = p8.copy()
    m, v, am, av = _q8.zeros_state(n)
    m32, v32 = np.zeros_like(p32), np.zeros_like(p32)
    for t in range(1, 51):
        g = _grads(n, t) + p8 * np.float32(0.1)
        g32 = _grads(n, t) + p32 * np.float32(0.1)
        fastadam.adam_step(p8, g, m, v, step=t, lr=1e-3, exp_avg_absmax=am,
                           exp_avg_sq_absmax=av, backend=backend)  # fmt: skip
        fastadam.adam_step(p32, g32, m32, v32, step=t, lr=1e-3, backend="numpy")
    # each step moves by <= lr; the paths stay within a fraction of the total travel
    assert np.abs(p8 - p32).mean() < 0.1 * 50 * 1e-3


def test_second_moment_decays_under_zero_grads(backend):
    n = 5000
    p = np.ones(n, np.float32)
    m, v, am, av = _q8.zeros_state(n)
    g = np.random.default_rng(0).standard_normal(n).astype(np.float32)
    fastadam.adam_step(p, g, m, v, step=1, lr=1e-3, exp_avg_absmax=am, exp_avg_sq_absmax=av,
                       backend=backend)  # fmt: skip
    v1 = _q8.dequantize(v, av, signed=False).copy()
    for t in range(2, 102):
        fastadam.adam_step(p, np.zeros(n, np.float32), m, v, step=t, lr=1e-3,
                           exp_avg_absmax=am, exp_avg_sq_absmax=av, backend=backend)  # fmt: skip
    v101 = _q8.dequantize(v, av, signed=False)
    expect = v1 * np.float32(0.999) ** 100
    assert np.all(v101 > 0)
    np.testing.assert_allclose(v101, expect, rtol=0.07)
    m101 = _q8.dequantize(m, am, signed=True)
    assert np.abs(m101).max() <= np.abs(g).max() * 0.1 * 0.9**100 * 1.1


# -- bad input ---------------------------------------------------------------------------


def _args(n=1000):
    p = np.ones(n, np.float32)
    g = np.ones(n, np.float32)
    m, v, am, av = _q8.zeros_state(n)
    return p, g, m, v, am, av


def _overlapping_codes(a):
    """exp_avg and exp_avg_sq: two views of one buffer that overlap by half."""
    buf = np.zeros(1500, np.uint8)
    a[2], a[3] = buf[:1000], buf[500:]


@pytest.mark.parametrize(
    "change, exc, word",
    [
        (lambda a: a.__setitem__(4, None), TypeError, "exp_avg_absmax"),
        (lambda a: a.__setitem__(5, None), TypeError, "exp_avg_sq_absmax"),
        (lambda a: a.__setitem__(4, np.zeros(3, np.float32)), ValueError, "exp_avg_absmax"),
        (lambda a: a.__setitem__(5, np.zeros(4, np.float64)), TypeError, "exp_avg_sq_absmax"),
        (lambda a: a.__setitem__(2, np.zeros(1000, np.float32)), TypeError, "exp_avg"),
        (lambda a: a.__setitem__(3, np.zeros(999, np.uint8)), ValueError, "exp_avg_sq"),
        (lambda a: a.__setitem__(0, np.ones(1000, np.float64)), TypeError, "param"),
        (
            lambda a: a.__setitem__(5, a[4]),
            ValueError,
            "exp_avg_absmax and exp_avg_sq_absmax share",
        ),
        (lambda a: a.__setitem__(1, a[0]), ValueError, "param and grad share memory"),
        (_overlapping_codes, ValueError, "exp_avg and exp_avg_sq share memory"),
    ],
)
def test_bad_input(change, exc, word):
    args = list(_args())
    change(args)
    before = [None if a is None else a.copy() for a in args]
    p, g, m, v, am, av = args
    with pytest.raises(exc, match=word):
        fastadam.adam_step(p, g, m, v, step=1, lr=0.1, exp_avg_absmax=am, exp_avg_sq_absmax=av)
    for a, b in zip(args, before):
        if a is not None:
            np.testing.assert_array_equal(a, b)


def test_codes_without_scales():
    p, g, m, v, _, _ = _args()
    with pytest.raises(TypeError, match="exp_avg_absmax"):
        fastadam.adam_step(p, g, m, v, step=1, lr=0.1)


def test_amsgrad_refused():
    p, g, m, v, am, av = _args()
    with pytest.raises(ValueError, match="amsgrad"):
        fastadam.adam_step(p, g, m, v, step=1, lr=0.1, amsgrad=True, max_exp_avg_sq=v.copy(),
                           exp_avg_absmax=am, exp_avg_sq_absmax=av)  # fmt: skip
    assert not m.any() and (p == 1).all()


def test_found_inf_skips_and_grad_scale_unscales(backend):
    p, g, m, v, am, av = _args(3000)
    g[:] = 4.0
    before = [a.copy() for a in (p, g, m, v, am, av)]
    fastadam.adam_step(p, g, m, v, step=1, lr=0.1, found_inf=True, exp_avg_absmax=am,
                       exp_avg_sq_absmax=av, backend=backend)  # fmt: skip
    for a, b in zip((p, g, m, v, am, av), before):
        np.testing.assert_array_equal(a, b)
    fastadam.adam_step(p, g, m, v, step=1, lr=0.1, grad_scale=4.0, exp_avg_absmax=am,
                       exp_avg_sq_absmax=av, backend=backend)  # fmt: skip
    assert (g == 1.0).all()  # the unscaled gradient is written back
    np.testing.assert_allclose(p, 0.9, rtol=1e-6)


_ISA_CODE = """
import hashlib, numpy as np, fastadam
from fastadam import _q8
h = hashlib.sha256()
cases = [(70001, {}), (5000, {"weight_decay": 0.1, "maximize": True}),
         (3000, {"grad_scale": 8.0, "decoupled_weight_decay": True, "weight_decay": 0.1})]
for n, kw in cases:
    p = np.random.default_rng(n).standard_normal(n).astype(np.float32)
    m, v, am, av = _q8.zeros_state(n)
    for t in range(1, 4):
        g = np.random.default_rng(t).standard_normal(n).astype(np.float32)
        fastadam.adam_step(p, g, m, v, step=t, lr=1e-2, exp_avg_absmax=am,
                           exp_avg_sq_absmax=av, backend=BACKEND, **kw)
    for a in (p, g, m, v, am, av):
        h.update(a.tobytes())
# the edges of the encoding (test_parity_special_values)
from test_q8 import _special_grads, _run_special
for a in _run_special(BACKEND):
    h.update(a.tobytes())
print(h.hexdigest())
""".replace(
    "from test_q8 import _special_grads, _run_special",
    inspect.getsource(_special_grads) + "\n" + inspect.getsource(_run_special),
)


@pytest.mark.parametrize(
    "cpu, simd", [("haswell", "True True 16"), ("x86-64", "False False 16")]
)
def test_numba_target_bit_identical(cpu, simd, tmp_path):
    """The Numba blocks compiled for an AVX2 CPU without AVX-512 (_update_vectors
    on vectors of 8, the codes packed 16 at a time by _numba_q8_simd) and for a
    CPU without AVX (the per-element decode and codes loops, what aarch64 runs)
    give the reference's bits, whatever this host's vector width. (An AVX-512
    BW host runs _update_vectors on vectors of 16 in every other test here: see
    test_numba_fused_blocks_on_avx512_hosts.)"""
    pytest.importorskip("numba")
    from helpers import cpu_flags, run_python

    if "avx2" not in cpu_flags():
        pytest.skip("needs an x86-64 CPU with AVX2")
    ref = run_python(_ISA_CODE.replace("BACKEND", '"numpy"'))
    assert ref.returncode == 0, ref.stderr
    code = _ISA_CODE.replace("BACKEND", '"numba"') + (
        "from fastadam.backends import _numba_q8_simd as s\nprint(s.PACKS, s.FUSED, s.LANES)\n"
    )
    env = numba_target_environment(cpu)
    out = run_python(code, timeout=300, NUMBA_CACHE_DIR=str(tmp_path), **env)
    assert out.returncode == 0, out.stderr
    digest, got = out.stdout.split(maxsplit=1)
    assert got.strip() == simd and digest == ref.stdout.strip()


def test_numba_fused_blocks_on_avx512_hosts():
    """On a host with AVX-512 BW the Numba blocks update 32 elements a call of the
    _update_vectors intrinsic on vectors of 16, the previous block's codes
    (32 a call) between the calls, so that the parity tests above check that
    schedule against the reference."""
    pytest.importorskip("numba")
    from helpers import cpu_flags

    from fastadam.backends import _numba_intrinsics, _numba_q8_simd

    if "avx512bw" not in cpu_flags() or "avx512bw" not in _numba_intrinsics.target_features():
        pytest.skip("needs a CPU (and a Numba target) with AVX-512 BW")
    assert _numba_q8_simd.FUSED and _numba_q8_simd.LANES == 32


def test_numba_blocks_stay_in_their_buffer():
    """The Numba blocks write nothing past BUFFER floats of their scratch buffer, the
    count every caller allocates (_numba_q8._make and the one-call path of
    _numba_cfunc): a write past it corrupts the heap, silently until a crash."""
    numba = pytest.importorskip("numba")
    from fastadam.backends import _numba_q8 as nq

    @numba.njit
    def run(p, g, cm, cv, am, av, n, c, big):
        nq._blocks(p, g, cm, cv, am, av, 0, am.size, n, c, False, False, False, False,
                   big[: nq.BUFFER])  # fmt: skip

    n = 5 * 256 + 77
    p = np.random.default_rng(0).standard_normal(n).astype(np.float32)
    m, v, am, av = _q8.zeros_state(n)
    big = np.full(nq.BUFFER + 64, 7.0, np.float32)
    c = tuple(np.float32(x) for x in (1e-3, 1.0, 1e-8, 0.1, 0.999, 0.001, 0.0, 1.0, 1.0))
    for t in range(1, 4):
        run(p, _grads(n, t), m, v, am, av, n, c, big)
    assert np.all(big[nq.BUFFER :] == np.float32(7.0))
    assert np.all(np.isfinite(p)) and am.max() > 0


def test_every_c_isa_variant_bit_identical():
    """The C library's baseline, AVX2 and AVX-512 variants (the latter two with
    hand-written full-block loops) give the reference's bits."""
    from helpers import c_backend_or_skip, run_python, supported_isas

    c_backend_or_skip()
    ref = run_python(_ISA_CODE.replace("BACKEND", '"numpy"'))
    assert ref.returncode == 0, ref.stderr
    for isa in supported_isas():
        code = _ISA_CODE.replace("BACKEND", '"c"') + (
            "from fastadam.backends import c\nprint(c.isa())\n"
        )
        out = run_python(code, FASTADAM_ISA=isa)
        assert out.returncode == 0, out.stderr
        digest, got_isa = out.stdout.split()
        assert got_isa == isa and digest == ref.stdout.strip(), isa
