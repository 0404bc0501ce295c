"""Low-precision parameters and float32 master weights (issue 17), NumPy API.

What is protected: every backend bit-identical to the reference (fastadam._lowp)
for bfloat16/float16 params and for master weights with a bfloat16/float16 copy,
with every option, odd sizes and special values, for any thread count; the
master's update equal to a float32 adam_step's and the copy to its rounding; the
float16 conversions equal to NumPy's; stochastic rounding reproducible by seed
and unbiased; and bad input refused by name with nothing modified.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest
from helpers import FAST_BACKENDS, OPTION_COMBOS, combo_id

import fastadam
from fastadam import _lowp

BF16 = np.dtype(ml_dtypes.bfloat16)
F16 = np.dtype(np.float16)
LOWP = (BF16, F16)
SIZES = (1, 7, 33, 1000, 4099)  # large sizes and thread splits: test_threads_do_not_change_bits


def lowp_bits(a: np.ndarray) -> np.ndarray:
    """Bit patterns, every NaN one pattern (float32, bfloat16 and float16)."""
    u = np.ascontiguousarray(a).reshape(-1).view(f"u{a.dtype.itemsize}").copy()
    if a.dtype == BF16:
        u[(u & 0x7FFF) > 0x7F80] = 0x7FC0
    elif a.dtype == F16:
        u[(u & 0x7FFF) > 0x7C00] = 0x7E00
    else:
        u[np.isnan(a).reshape(-1)] = 0x7FC00000
    return u


def assert_same(actual, expected):
    for k, (a, e) in enumerate(zip(actual, expected)):
        if a is None and e is None:
            continue
        assert a.dtype == e.dtype and a.shape == e.shape, k
        differ = lowp_bits(a) != lowp_bits(e)
        assert not differ.any(), f"array {k} differs in {np.count_nonzero(differ)} of {a.size}"


def make(n, dtype, master, grad_dtype=None, seed=0, specials=False, state_dtype=None):
    """(param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq, param_copy): a low-precision
    param with states of its dtype (or ``state_dtype``), or a float32 master with
    float32 states and a copy."""
    rng = np.random.default_rng(seed)
    p = rng.standard_normal(n).astype(np.float32)
    g = (rng.standard_normal(n) * 0.1).astype(np.float32)
    m = (rng.standard_normal(n) * 0.01).astype(np.float32)
    v = (rng.random(n) * 1e-3).astype(np.float32)
    vmax = v + (rng.random(n) * 1e-3 * (rng.random(n) < 0.5)).astype(np.float32)
    if specials and n >= 8:
        sp = np.array([np.nan, np.inf, -np.inf, 0.0, -0.0, 1e-30, 6e-8, 70000.0], np.float32)
        for a in (p, g, m, v, vmax):
            a[rng.integers(0, n, max(1, n // 64))] = rng.choice(sp, max(1, n // 64))
        g[:2] = 0.0
    with np.errstate(over="ignore"):  # 70000 is past float16's range: Inf
        if master:
            gd = np.float32 if grad_dtype is None else grad_dtype
            return p, g.astype(gd), m, v, vmax, p.astype(dtype)
        sdt = dtype if state_dtype is None else state_dtype
        return (p.astype(dtype), g.astype(dtype)) + tuple(
            a.astype(sdt) for a in (m, v, vmax)
        ) + (None,)  # fmt: skip


def copy_of(state):
    return tuple(None if a is None else a.copy() for a in state)


def step(state, backend, t=3, rounding="nearest", seed=7, **kw):
    p, g, m, v, vmax, c = state
    kw.setdefault("lr", 1e-2)
    fastadam.adam_step(p, g, m, v, step=t, max_exp_avg_sq=vmax, param_copy=c,
                       param_rounding=rounding, seed=seed, backend=backend, **kw)  # fmt: skip


def _kinds():
    out = []
    for dt in LOWP:
        out.append(pytest.param(dt, False, None, "nearest", id=f"{dt}-params"))
        out.append(pytest.param(dt, True, None, "nearest", id=f"{dt}-master"))
        out.append(pytest.param(dt, True, dt, "nearest", id=f"{dt}-master-lowpgrad"))
    out.append(pytest.param(BF16, False, None, "stochastic", id="bf16-params-sr"))
    out.append(pytest.param(BF16, True, None, "stochastic", id="bf16-master-sr"))
    out.append(pytest.param(BF16, True, BF16, "stochastic", id="bf16-master-lowpgrad-sr"))
    return out


@pytest.mark.parametrize("options", OPTION_COMBOS, ids=combo_id)
@pytest.mark.parametrize(("dtype", "master", "gdt", "rounding"), _kinds())
def test_backends_bit_identical(fast_backend, dtype, master, gdt, rounding, options):
    for n in SIZES:
        ref = make(n, dtype, master, gdt, seed=n, specials=True)
        got = copy_of(ref)
        for t in (1, 2):
            step(ref, "numpy", t=t, rounding=rounding, grad_scale=2.0, **options)
            step(got, fast_backend, t=t, rounding=rounding, grad_scale=2.0, **options)
        assert_same(got, ref)


@pytest.mark.parametrize(("dtype", "master", "gdt", "rounding"), _kinds())
def test_threads_do_not_change_bits(fast_backend, restore_threads, dtype, master, gdt,
                                    rounding):  # fmt: skip
    n = 300_007
    results = []
    for threads in (1, 2, 3):
        fastadam.set_num_threads(threads)
        s = make(n, dtype, master, gdt, seed=1)
        step(s, fast_backend, rounding=rounding, weight_decay=0.01, decoupled_weight_decay=True)
        results.append(s)
    assert_same(results[1], results[0])
    assert_same(results[2], results[0])


@pytest.mark.parametrize("dtype", LOWP)
@pytest.mark.parametrize("backend_name", ("numpy", *FAST_BACKENDS))
def test_master_is_the_float32_step_and_its_rounding(backend_name, dtype):
    """The master's update is adam_step's float32 update, bit for bit; the copy is
    that result rounded to nearest-even (NumPy's cast)."""
    n = 10_001
    p, g, m, v, vmax, c = make(n, dtype, True, seed=3)
    p32, g32, m32, v32 = p.copy(), g.copy(), m.copy(), v.copy()
    for t in (1, 2, 3):
        fastadam.adam_step(p, g, m, v, step=t, lr=1e-2, weight_decay=0.1, param_copy=c,
                           backend=backend_name)  # fmt: skip
        fastadam.adam_step(p32, g32, m32, v32, step=t, lr=1e-2, weight_decay=0.1,
                           backend="numpy")  # fmt: skip
    assert_same((p, m, v, c), (p32, m32, v32, p32.astype(dtype)))


def test_float16_conversions_are_numpys():
    h = np.arange(1 << 16, dtype=np.uint16).view(np.float16)
    finite = ~np.isnan(h)
    assert np.array_equal(_lowp.widen(h)[finite].view(np.uint32),
                          h[finite].astype(np.float32).view(np.uint32))  # fmt: skip
    rng = np.random.default_rng(0)
    x = rng.standard_normal(1 << 18).astype(np.float32)
    x *= np.float32(2.0) ** rng.integers(-30, 18, x.size).astype(np.float32)
    # every float16 midpoint and its neighbours (the ties of nearest-even)
    w = _lowp.widen(h[finite & np.isfinite(h)]).astype(np.float64)
    w.sort()
    mids = ((w[1:] + w[:-1]) / 2).astype(np.float32)
    x = np.concatenate([x, mids, np.nextafter(mids, np.inf), np.nextafter(mids, -np.inf),
                        np.array([65504, 65519.996, 65520, 1e10, -1e10, np.inf, -np.inf,
                                  0.0, -0.0, 1e-45, 2.0**-25, 2.0**-24, 3 * 2.0**-26],
                                 np.float32)])  # fmt: skip
    with np.errstate(over="ignore"):
        want = x.astype(np.float16).view(np.uint16)
    assert np.array_equal(_lowp.round_f16_bits(x), want)


def test_fma32_is_a_fused_multiply_add():
    from fractions import Fraction

    rng = np.random.default_rng(1)
    a, b = (rng.standard_normal(3000).astype(np.float32) for _ in range(2))
    c = (rng.standard_normal(3000) * 1e-3).astype(np.float32)
    got = _lowp.fma32(a, b, c)
    want = [np.float32(float(Fraction(float(x)) * Fraction(float(y)) + Fraction(float(z))))
            for x, y, z in zip(a, b, c)]  # fmt: skip
    assert np.array_equal(got, np.array(want, np.float32))
    # and not the twice-rounded a*b + c
    assert not np.array_equal(got, a * b + c)


def test_stochastic_rounding_reproducible_and_unbiased():
    n = 1 << 16
    p = np.full(n, 1.0, np.float32)
    g = np.full(n, 1e-3, np.float32)
    outs = []
    for seed in (1, 1, 2):
        c = np.zeros(n, BF16)
        fastadam.adam_step(p.copy(), g.copy(), np.zeros(n, np.float32), np.zeros(n, np.float32),
                           step=1, lr=1e-3, param_copy=c, param_rounding="stochastic",
                           seed=seed, backend="numpy")  # fmt: skip
        outs.append(c)
    assert np.array_equal(outs[0].view(np.uint16), outs[1].view(np.uint16))
    assert not np.array_equal(outs[0].view(np.uint16), outs[2].view(np.uint16))
    master = np.float64(np.float32(1.0) - np.float32(1e-3) * np.float32(1.0)
                        / (np.float32(1.0) + np.float32(1e-8)))  # fmt: skip
    mean = outs[0].astype(np.float64).mean()
    ulp = 2.0**-8  # bfloat16 spacing below 1.0
    assert abs(mean - master) < 0.05 * ulp
    nearest = np.float64(np.float32(master).astype(BF16))
    assert abs(nearest - master) > 0.05 * ulp  # nearest would be biased here


# -- bad input -------------------------------------------------------------------


def _bad_cases():
    n = 8

    def base(dtype=BF16, master=False):
        return list(make(n, dtype, master, seed=0))

    cases = []
    s = base()
    s[1] = s[1].astype(np.float16)
    cases.append(("bf16-param-f16-grad", s, {}, TypeError, "grad has dtype float16"))
    s = base(F16)
    s[1] = s[1].astype(BF16)
    cases.append(("f16-param-bf16-grad", s, {}, TypeError, "grad has dtype bfloat16"))
    s = base()
    s[2] = s[2].astype(np.float16)
    s[3] = s[3].astype(np.float16)
    cases.append(("bf16-param-f16-states", s, {}, TypeError,
                  "exp_avg has dtype float16 but must be bfloat16: .*float32"))  # fmt: skip
    s = base()
    s[2] = s[2].astype(np.float32)
    cases.append(("mixed-moment-dtypes", s, {}, TypeError,
                  "exp_avg_sq has dtype bfloat16 but must be float32: .*exp_avg's"))  # fmt: skip
    s = base(F16)
    s[2], s[3] = s[2].astype(BF16), s[3].astype(BF16)
    cases.append(("f16-bf16-states-f16-max", s, {"amsgrad": True}, TypeError,
                  "max_exp_avg_sq has dtype float16 but must be bfloat16"))  # fmt: skip
    s = base()
    cases.append(("state-rounding-name", s, {"state_rounding": "up"}, ValueError,
                  "state_rounding"))  # fmt: skip
    s = base(BF16, True)
    s[5] = np.zeros(n + 1, BF16)
    cases.append(("copy-shape", s, {}, ValueError, "param_copy has shape"))
    s = base(BF16, True)
    s[5] = np.zeros(n, np.float32)
    cases.append(("copy-f32", s, {}, TypeError, "param_copy must have dtype bfloat16"))
    s = base(BF16, True)
    s[5] = [0.0] * n
    cases.append(("copy-list", s, {}, TypeError, "param_copy must be a numpy.ndarray"))
    s = base(BF16, True)
    s[0] = s[0].astype(np.float64)
    s[1] = s[1].astype(np.float64)
    cases.append(("copy-f64-master", s, {}, TypeError, "param_copy needs a float32 master"))
    s = base(BF16, True)
    s[1] = s[1].astype(np.float16)
    cases.append(("master-grad-f16-copy-bf16", s, {}, TypeError, "grad has dtype float16"))
    s = base(BF16, True)
    s[2] = s[2].astype(BF16)
    cases.append(("master-bf16-states", s, {}, TypeError, "master weights keep float32"))
    s = base(BF16, True)
    cases.append(("rounding-name", s, {"param_rounding": "up"}, ValueError, "param_rounding"))
    s = base(BF16, True)
    s[5] = s[0].view(BF16)[:n]
    cases.append(("copy-overlaps-master", s, {}, ValueError, "share memory"))
    s = base(BF16, True)
    s[5] = np.zeros(n, BF16)
    s[5].flags.writeable = False
    cases.append(("copy-readonly", s, {}, ValueError, "param_copy must be writeable"))
    s = base(BF16, True)
    s[5] = np.zeros(2 * n, BF16)[::2]
    cases.append(("copy-strided", s, {}, ValueError, "param_copy must be C-contiguous"))
    s = base()
    cases.append(("amsgrad-no-max", s[:4] + [None, None], {"amsgrad": True}, ValueError,
                  "max_exp_avg_sq"))  # fmt: skip
    s = base()
    cases.append(("bad-lr", s, {"lr": float("nan")}, ValueError, "lr"))
    s = base()
    cases.append(("bad-backend", s, {"backend": "fortran"}, ValueError, "backend"))
    return cases


@pytest.mark.parametrize(("state", "kw", "exc", "match"),
                         [pytest.param(*c[1:], id=c[0]) for c in _bad_cases()])  # fmt: skip
def test_bad_input_names_the_argument_and_modifies_nothing(state, kw, exc, match):
    before = [None if not isinstance(a, np.ndarray) else a.copy() for a in state]
    p, g, m, v, vmax, c = state
    kw.setdefault("lr", 1e-2)
    with pytest.raises(exc, match=match):
        fastadam.adam_step(p, g, m, v, step=1, max_exp_avg_sq=vmax, param_copy=c, **kw)
    for a, b in zip(state, before):
        if isinstance(a, np.ndarray):
            assert np.array_equal(np.ascontiguousarray(a).view(np.uint8), b.view(np.uint8))


# -- multi-tensor ------------------------------------------------------------------


def _multi_states(seed=0):
    """Tensors of every low-precision kind and odd sizes, in one list."""
    out = []
    kinds = [(BF16, False, None), (F16, False, None), (BF16, True, None), (BF16, True, BF16),
             (F16, True, None), (F16, True, F16)]  # fmt: skip
    for k, n in enumerate((1, 33, 1000, 70_001, 7, 131_071, 64, 3)):
        dt, master, gdt = kinds[k % len(kinds)]
        out.append(make(n, dt, master, gdt, seed=seed + k, specials=True))
    return out


def _multi(states, backend, step, seeds, rounding="nearest", **kw):
    cols = list(zip(*states))
    copies = list(cols[5])
    fastadam.adam_step_multi(
        list(cols[0]), list(cols[1]), list(cols[2]), list(cols[3]), step=step, lr=1e-2,
        max_exp_avg_sqs=list(cols[4]), param_copies=copies, param_rounding=rounding,
        seeds=seeds, backend=backend, **kw,
    )  # fmt: skip


@pytest.mark.parametrize("options", OPTION_COMBOS, ids=combo_id)
@pytest.mark.parametrize("backend_name", ("numpy", *FAST_BACKENDS))
def test_multi_is_per_tensor_adam_step(backend_name, options):
    """One multi-tensor call over mixed kinds, per-tensor steps and seeds, equals
    adam_step on each tensor (the numpy reference), bit for bit."""
    states = _multi_states()
    # param_copies holds None for the low-precision params: not a list of arrays then
    ref = [copy_of(s) for s in states]
    steps = [1 + i % 3 for i in range(len(states))]
    seeds = [11 * i for i in range(len(states))]
    cols = list(zip(*states))
    fastadam.adam_step_multi(
        list(cols[0]), list(cols[1]), list(cols[2]), list(cols[3]), step=steps, lr=1e-2,
        max_exp_avg_sqs=list(cols[4]), param_copies=list(cols[5]), seeds=seeds,
        grad_scale=2.0, backend=backend_name, **options,
    )  # fmt: skip
    for s, t, seed in zip(ref, steps, seeds):
        step(s, "numpy", t=t, seed=seed, grad_scale=2.0, **options)
    for got, want in zip(states, ref):
        assert_same(got, want)


@pytest.mark.parametrize("backend_name", ("numpy", *FAST_BACKENDS))
def test_multi_stochastic_is_per_tensor(backend_name, restore_threads):
    fastadam.set_num_threads(2)
    states = [make(n, BF16, master, None, seed=n) for n in (5, 70_001, 100_000)
              for master in (False, True)]  # fmt: skip
    ref = [copy_of(s) for s in states]
    cols = list(zip(*states))
    fastadam.adam_step_multi(
        list(cols[0]), list(cols[1]), list(cols[2]), list(cols[3]), step=4, lr=1e-2,
        param_copies=list(cols[5]), param_rounding="stochastic", seeds=100,
        backend=backend_name,
    )  # fmt: skip
    for i, s in enumerate(ref):
        step(s, "numpy", t=4, rounding="stochastic", seed=100 + i)
    for got, want in zip(states, ref):
        assert_same(got, want)


def test_multi_bad_input_names_the_index_and_modifies_nothing():
    states = _multi_states()
    states[4] = states[4][:5] + (np.zeros(states[4][0].size + 1, BF16),)
    before = [copy_of(s) for s in states]
    cols = list(zip(*states))
    with pytest.raises(ValueError, match=r"param_copies\[4\] has shape"):
        fastadam.adam_step_multi(
            list(cols[0]), list(cols[1]), list(cols[2]), list(cols[3]), step=1, lr=1e-2,
            param_copies=list(cols[5]),
        )  # fmt: skip
    for got, want in zip(states, before):
        assert_same(got, want)
    # one array shared by two tensors
    states = [make(100, BF16, True, seed=k) for k in range(3)]
    cols = [list(c) for c in zip(*states)]
    cols[5][2] = cols[5][1]
    before = [copy_of(s) for s in states]
    with pytest.raises(ValueError, match=r"param_copies\[1\] and param_copies\[2\] share memory"):
        fastadam.adam_step_multi(*cols[:4], step=1, lr=1e-2, param_copies=cols[5])
    for got, want in zip(states, before):
        assert_same(got, want)


# -- the NumPy optimizers ------------------------------------------------------------


@pytest.mark.parametrize("backend_name", ("numpy", *FAST_BACKENDS))
@pytest.mark.parametrize("master", (False, True))
def test_optimizer_is_adam_step(backend_name, master):
    """fastadam.AdamW over bfloat16 params: adam_step on each (its master and moments),
    and a state_dict round trip resumes bit for bit."""
    params = [make(n, BF16, False, seed=n)[0] for n in (10, 1000)]
    ref = [p.copy() for p in params]
    refm = [p.astype(np.float32) for p in params]
    sdt = np.float32 if master else BF16
    mom = [(np.zeros(p.shape, sdt), np.zeros(p.shape, sdt)) for p in params]
    opt = fastadam.AdamW(params, lr=1e-2, master_weights=master, backend=backend_name)
    rng = np.random.default_rng(0)
    for t in (1, 2):
        grads = [(rng.standard_normal(p.shape) * 0.1).astype(BF16) for p in params]
        opt.step([g.copy() for g in grads])
        for i, g in enumerate(grads):
            if master:
                fastadam.adam_step(refm[i], g.copy(), *mom[i], step=t, lr=1e-2, weight_decay=1e-2,
                                   decoupled_weight_decay=True, param_copy=ref[i],
                                   seed=i)  # fmt: skip
            else:
                fastadam.adam_step(ref[i], g.copy(), *mom[i], step=t, lr=1e-2, weight_decay=1e-2,
                                   decoupled_weight_decay=True, seed=i)  # fmt: skip
    assert_same(params, ref)
    if master:
        assert_same([opt.state[i]["master_param"] for i in range(2)], refm)
    sd = opt.state_dict()
    twin_params = [p.copy() for p in params]
    twin = fastadam.AdamW(twin_params, lr=1e-2, master_weights=master, backend=backend_name)
    twin.load_state_dict(sd)
    grads = [(rng.standard_normal(p.shape) * 0.1).astype(BF16) for p in params]
    opt.step([g.copy() for g in grads])
    twin.step([g.copy() for g in grads])
    assert_same(twin_params, params)
    for i in range(2):
        assert_same([twin.state[i][k] for k in opt.state[i] if k != "step"],
                    [opt.state[i][k] for k in opt.state[i] if k != "step"])  # fmt: skip


def test_optimizer_bad_grad_changes_nothing():
    params = [np.ones(4, BF16), np.ones(3, BF16)]
    opt = fastadam.AdamW(params, lr=1e-2, master_weights=True)
    before = [p.copy() for p in params]
    with pytest.raises(TypeError, match=r"grads\[1\] has dtype float16"):
        opt.step([np.ones(4, BF16), np.ones(3, np.float16)])
    assert_same(params, before)
    assert opt.state == {}


# -- float16 stochastic rounding, and moments of another dtype (issue 17's gaps) ----------

F32 = np.dtype(np.float32)

#: (param dtype, master, grad dtype, moments' dtype or None, param_rounding, state_rounding)
NEW_KINDS = [
    pytest.param(F16, False, None, None, "stochastic", None, id="f16-params-sr"),
    pytest.param(F16, True, None, None, "stochastic", None, id="f16-master-sr"),
    pytest.param(F16, True, F16, None, "stochastic", None, id="f16-master-lowpgrad-sr"),
    pytest.param(BF16, False, None, F32, "nearest", None, id="bf16-params-f32-states"),
    pytest.param(BF16, False, None, F32, "stochastic", None, id="bf16-params-f32-states-sr"),
    pytest.param(F16, False, None, F32, "stochastic", None, id="f16-params-f32-states-sr"),
    pytest.param(F16, False, None, BF16, "nearest", None, id="f16-params-bf16-states"),
    pytest.param(F16, False, None, BF16, "stochastic", "stochastic", id="f16-bf16-states-ss"),
    pytest.param(BF16, False, None, None, "nearest", "stochastic", id="bf16-params-ss"),
]
#: plain; Adam's L2 with amsgrad and maximize; AdamW's decay (every flag once)
NEW_OPTIONS = [OPTION_COMBOS[0], OPTION_COMBOS[11], OPTION_COMBOS[12]]


@pytest.mark.parametrize(("dtype", "master", "gdt", "sdt", "rounding", "srnd"), NEW_KINDS)
def test_new_kinds_bit_identical(fast_backend, dtype, master, gdt, sdt, rounding, srnd):
    """float16 stochastic rounding and moments of another dtype: every backend equals
    the reference on odd sizes with special values, the flags and grad_scale covered."""
    for options in NEW_OPTIONS:
        for n in SIZES:
            ref = make(n, dtype, master, gdt, seed=n, specials=True, state_dtype=sdt)
            got = copy_of(ref)
            for t in (1, 2):
                for s, b in ((ref, "numpy"), (got, fast_backend)):
                    step(s, b, t=t, rounding=rounding, grad_scale=2.0, state_rounding=srnd,
                         **options)  # fmt: skip
            assert_same(got, ref)


@pytest.mark.parametrize(
    ("dtype", "sdt", "rounding", "srnd"),
    [pytest.param(F16, BF16, "stochastic", "stochastic", id="f16-bf16-states-sr-ss"),
     pytest.param(BF16, F32, "stochastic", None, id="bf16-f32-states-sr")],
)  # fmt: skip
def test_new_kinds_threads_do_not_change_bits(fast_backend, restore_threads, dtype, sdt,
                                              rounding, srnd):  # fmt: skip
    n = 70_001  # >= 65,536: the C library splits it over two threads
    results = []
    for threads in (1, 2):
        fastadam.set_num_threads(threads)
        s = make(n, dtype, False, seed=1, state_dtype=sdt)
        step(s, fast_backend, rounding=rounding, state_rounding=srnd, amsgrad=True)
        results.append(s)
    ref = make(n, dtype, False, seed=1, state_dtype=sdt)
    step(ref, "numpy", rounding=rounding, state_rounding=srnd, amsgrad=True)
    assert_same(results[0], ref)
    assert_same(results[1], ref)


@pytest.mark.parametrize("backend_name", ("numpy", *FAST_BACKENDS))
def test_multi_new_kinds_is_per_tensor(backend_name, restore_threads):
    """One adam_step_multi over tensors of the new kinds (one of 70,001 elements, split
    over two threads by C), stochastic parameters and moments: adam_step on each."""
    fastadam.set_num_threads(2)
    spec = [(F16, None, 7), (BF16, F32, 70_001), (F16, BF16, 33), (BF16, None, 1000),
            (F16, F32, 5), (F16, BF16, 4097)]  # fmt: skip
    states = [make(n, dt, False, seed=n, specials=True, state_dtype=sdt) for dt, sdt, n in spec]
    ref = [copy_of(s) for s in states]
    cols = list(zip(*states))
    fastadam.adam_step_multi(
        list(cols[0]), list(cols[1]), list(cols[2]), list(cols[3]), step=[2, 3, 2, 2, 1, 2],
        lr=1e-2, amsgrad=True, max_exp_avg_sqs=list(cols[4]), param_rounding="stochastic",
        state_rounding="stochastic", seeds=50, weight_decay=0.1, backend=backend_name,
    )  # fmt: skip
    for i, (s, t) in enumerate(zip(ref, [2, 3, 2, 2, 1, 2])):
        step(s, "numpy", t=t, rounding="stochastic", state_rounding="stochastic", seed=50 + i,
             amsgrad=True, weight_decay=0.1)  # fmt: skip
    for got, want in zip(states, ref):
        assert_same(got, want)


def _f16_neighbours(x):
    """The float16 values just below and above |x| (float64), for float32 x."""
    lo = np.float64(np.float32(x).astype(np.float16))
    if abs(lo) > abs(x):
        lo = np.float64(np.nextafter(np.float16(lo), np.float16(0)))
    hi = np.float64(np.nextafter(np.float16(lo), np.float16(np.copysign(np.inf, x))))
    return lo, hi


@pytest.mark.parametrize(
    "x",
    [1.0 + 0.3 * 2.0**-10, -1000.37, 0.0123,  # normal results
     3.1e-5 + 0.77 * 2.0**-24, 5.3 * 2.0**-24, -0.7 * 2.0**-24,  # subnormal ones
     2.0**-14 - 0.4 * 2.0**-24, 1.01 * 2.0**-31],
)  # fmt: skip
def test_float16_stochastic_rounding_is_unbiased(x):
    """2**16 copies of a value between two float16 numbers, each with its own random
    bits (those of the parameters' stochastic rounding): every result is one of
    the two neighbours, and their mean is within 4 standard errors of x."""
    from fastadam.backends.reference import random_bits

    n = 1 << 16
    x = np.float32(x)
    lo, hi = _f16_neighbours(float(x))
    assert lo != float(x) != hi  # between the two, not on one
    got = _lowp.round_f16_stochastic_bits(np.full(n, x), random_bits(n, 12345))
    vals = got.view(np.float16).astype(np.float64)
    assert set(np.unique(vals)) <= {lo, hi}
    f = (float(x) - lo) / (hi - lo)
    se = abs(hi - lo) * np.sqrt(f * (1 - f) / n)
    assert abs(vals.mean() - float(x)) < 4 * se
    nearest = np.float64(x.astype(np.float16))
    assert abs(nearest - float(x)) > 4 * se  # nearest would be biased here


def test_float16_stochastic_rounding_edges():
    """NaN as nearest; |x| >= 65536 and Inf: Inf; (65504, 65536): 65504 or Inf;
    |x| < 2**-32: signed zero (the documented bias); representable values exact."""
    from fastadam.backends.reference import random_bits

    r = random_bits(4096, 3)
    with np.errstate(over="ignore"):
        h = np.arange(1 << 16, dtype=np.uint16).view(np.float16)
        finite = h[np.isfinite(h)].astype(np.float32)
        rr = random_bits(finite.size, 9)
        assert np.array_equal(_lowp.round_f16_stochastic_bits(finite, rr),
                              finite.astype(np.float16).view(np.uint16))  # fmt: skip
    for x, want in ((np.inf, {0x7C00}), (-np.inf, {0xFC00}), (65536.0, {0x7C00}),
                    (1e30, {0x7C00}), (65520.0, {0x7BFF, 0x7C00}), (-65510.0, {0xFBFF, 0xFC00}),
                    (2.0**-33, {0}), (-(2.0**-40), {0x8000}), (1e-45, {0})):  # fmt: skip
        got = set(_lowp.round_f16_stochastic_bits(np.full(4096, x, np.float32), r).tolist())
        assert got == want, (x, got)
    nan = np.array([np.nan, -np.nan], np.float32)
    assert np.array_equal(_lowp.round_f16_stochastic_bits(nan, r[:2]), _lowp.round_f16_bits(nan))


def test_state_rounding_default_is_each_kinds():
    """The functional default (None): bf16 params' bf16 moments round to nearest (torch's),
    float32 params' bf16 states stochastically (unchanged); explicit values are honoured."""
    out = {}
    for srnd in (None, "nearest", "stochastic"):
        s = make(1000, BF16, False, seed=4)
        step(s, "numpy", state_rounding=srnd)
        out[srnd] = s
    assert_same(out[None], out["nearest"])
    assert not np.array_equal(lowp_bits(out[None][2]), lowp_bits(out["stochastic"][2]))
    f32 = {}
    for srnd in (None, "stochastic"):
        rng = np.random.default_rng(0)
        p, g = rng.standard_normal((2, 1000)).astype(np.float32)
        m, v = np.zeros(1000, BF16), np.zeros(1000, BF16)
        fastadam.adam_step(p, g, m, v, step=1, lr=1e-2, seed=3, state_rounding=srnd)
        f32[srnd] = (p, m, v)
    assert_same(f32[None], f32["stochastic"])
    assert fastadam.adam_step.__kwdefaults__["state_rounding"] is None
    assert fastadam.adam_step_multi.__kwdefaults__["state_rounding"] is None


@pytest.mark.parametrize("state_dtype", ("float32", "bfloat16"))
def test_optimizer_state_dtype_for_lowp_params(backend, state_dtype):
    """fastadam.AdamW over bf16 params with float32/bfloat16 moments: adam_step on each
    (bfloat16 moments rounded stochastically, the optimizer's default), moments of
    that dtype, and a state_dict round trip that resumes bit for bit."""
    sdt = np.dtype(np.float32) if state_dtype == "float32" else BF16
    params = [make(n, BF16, False, seed=n)[0] for n in (10, 1000)]
    ref = [p.copy() for p in params]
    mom = [(np.zeros(p.shape, sdt), np.zeros(p.shape, sdt)) for p in params]
    opt = fastadam.AdamW(params, lr=1e-2, state_dtype=state_dtype, backend=backend)
    rng = np.random.default_rng(0)
    for t in (1, 2):
        grads = [(rng.standard_normal(p.shape) * 0.1).astype(BF16) for p in params]
        opt.step([g.copy() for g in grads])
        for i, g in enumerate(grads):
            fastadam.adam_step(ref[i], g.copy(), *mom[i], step=t, lr=1e-2, weight_decay=1e-2,
                               decoupled_weight_decay=True, seed=i, state_rounding="stochastic",
                               backend="numpy")  # fmt: skip
    assert_same(params, ref)
    for i in range(2):
        assert opt.state[i]["exp_avg"].dtype == sdt
        assert_same((opt.state[i]["exp_avg"], opt.state[i]["exp_avg_sq"]), mom[i])
    twin_params = [p.copy() for p in params]
    twin = fastadam.AdamW(twin_params, lr=1e-2, state_dtype=state_dtype, backend=backend)
    twin.load_state_dict(opt.state_dict())
    grads = [(rng.standard_normal(p.shape) * 0.1).astype(BF16) for p in params]
    opt.step([g.copy() for g in grads])
    twin.step([g.copy() for g in grads])
    assert_same(twin_params, params)
    for i in range(2):
        assert_same((twin.state[i]["exp_avg"], twin.state[i]["exp_avg_sq"]),
                    (opt.state[i]["exp_avg"], opt.state[i]["exp_avg_sq"]))  # fmt: skip
