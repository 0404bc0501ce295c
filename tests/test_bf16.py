"""bfloat16 optimizer states with stochastic rounding.

float32 params and grads, bf16 exp_avg/exp_avg_sq(/max_exp_avg_sq): 20 bytes
per element instead of 28, and half the optimizer memory. With round-to-nearest
``v * 0.999`` rounds back to ``v`` and the second moment never decays; the
states are therefore rounded stochastically, with random bits that are a hash
of (seed, step, element index).
"""

from __future__ import annotations

import pickle

import ml_dtypes
import numpy as np
import pytest
from helpers import (
    OPTION_COMBOS,
    assert_bit_identical,
    bits,
    combo_id,
    import_example,
    torch_digits_accuracy,
)

import fastadam
from fastadam.backends import reference

BF16 = np.dtype(ml_dtypes.bfloat16)


def bf16_state(n, seed=0, shape=None):
    rng = np.random.default_rng(seed)
    shape = (n,) if shape is None else shape
    p = rng.standard_normal(shape).astype(np.float32)
    g = rng.standard_normal(shape).astype(np.float32)
    m = (rng.standard_normal(shape) * 0.1).astype(BF16)
    v = (rng.random(shape) * 0.01).astype(BF16)
    vmax = (rng.random(shape) * 0.02).astype(BF16)
    return [np.asarray(a) for a in (p, g, m, v, vmax)]


def step_all(state, backend, step, **kw):
    p, g, m, v, vmax = state
    kw.setdefault("lr", 1e-2)
    fastadam.adam_step(p, g, m, v, step=step, max_exp_avg_sq=vmax, backend=backend, **kw)


def count_differences(a, b):
    return int(np.count_nonzero(bits(a) != bits(b)))


# --- the fast backends against the reference -----------------------------------


@pytest.mark.parametrize("rounding", ["stochastic", "nearest"])
@pytest.mark.parametrize("combo", OPTION_COMBOS, ids=combo_id)
def test_fast_backend_matches_reference(fast_backend, rounding, combo):
    """The float32 math is bit-identical across backends, so the rounded states are too.

    The issue's weaker bound, "within one bf16 ulp where the float32 values
    differ", is implied; we count differing elements and require zero.
    """
    ref = bf16_state(5003, seed=2)
    fast = [a.copy() for a in ref]
    for step in range(1, 9):
        extra = {"grad_scale": 8.0} if step % 3 == 0 else {}
        for state, backend in ((ref, "numpy"), (fast, fast_backend)):
            state[1][...] = np.random.default_rng(step).standard_normal(state[1].shape)
            step_all(state, backend, step, state_rounding=rounding, seed=11, **combo, **extra)
    diffs = {n: count_differences(a, b) for n, a, b in zip("pgmvx", fast, ref)}
    assert diffs == dict.fromkeys("pgmvx", 0), diffs


def _special_bf16_state(n=4096):
    """A state whose new moments are NaNs of many payloads (some with low bits that
    a rounding add would carry into the bfloat16), infinities and overflows."""
    p, g, m, v, vmax = bf16_state(n, seed=5)
    gbits = g.view(np.uint32)
    # NaN gradients: quiet and signaling, payloads in the low 16 bits and above
    payloads = [0x7FC0FFFF, 0xFFC0FFFF, 0x7F800001, 0x7FBFFFFF, 0x7FC08000, 0xFFFFFFFF,
                0x7FC00000, 0x7F80FFFF]  # fmt: skip
    gbits[3 : 3 + len(payloads)] = payloads
    g[20:24] = [np.inf, -np.inf, 3.4e38, -3.4e38]  # inf, and g*g overflowing
    mbits, vbits = m.view(np.uint16), v.view(np.uint16)
    mbits[40:46] = [0x7F80, 0xFF80, 0x7FC1, 0xFFFF, 0x7F81, 0x7F7F]  # m inf, NaN, largest
    vbits[50:54] = [0x7F80, 0x7FC1, 0x7F81, 0x7F7F]
    p[60:62] = [np.nan, np.inf]  # into the gradient with L2 weight decay
    return [p, g, m, v, vmax]


@pytest.mark.parametrize("rounding", ["stochastic", "nearest"])
@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_fast_backend_matches_reference_on_special_values(fast_backend, rounding,
                                                          weight_decay):  # fmt: skip
    """NaNs of every payload, infinities and overflowing squares round to the
    reference's bits: a NaN's rounding add must not carry into its bfloat16."""
    ref = _special_bf16_state()
    fast = [a.copy() for a in ref]
    for step in (1, 2):
        for state, backend in ((ref, "numpy"), (fast, fast_backend)):
            step_all(state, backend, step, state_rounding=rounding, seed=3,
                     weight_decay=weight_decay)  # fmt: skip
    assert np.isnan(ref[2].astype(np.float32)).sum() > 8  # the case is exercised
    diffs = {n: count_differences(a, b) for n, a, b in zip("pgmvx", fast, ref)}
    assert diffs == dict.fromkeys("pgmvx", 0), diffs


def test_bf16_scalars_fold_the_second_bias_correction():
    """bf16 steps use the epsilon-hat form: no divide by sqrt(1 - beta2^t) in the loop.

    It is the same update in exact arithmetic; float32 states keep torch's form.
    """
    kw = dict(lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0,
              decoupled_weight_decay=False, amsgrad=False, maximize=False, eps_hat=False,
              grad_scale=None)  # fmt: skip
    for step in (1, 7, 1000):
        f32 = fastadam._scalars.compute_scalars(step, **kw)
        bf16 = fastadam._scalars.compute_scalars(step, **kw, state_rounding=2, seed=1)
        assert f32.bias_correction2_sqrt != 1.0 and bf16.bias_correction2_sqrt == 1.0
        sqrt_v = np.array([0.0, 1e-12, 1e-6, 1e-3, 1.0, 1e3])
        torch_form = f32.step_size / (sqrt_v / f32.bias_correction2_sqrt + f32.eps)
        folded = bf16.step_size / (sqrt_v + bf16.eps)
        np.testing.assert_allclose(folded, torch_form, rtol=1e-14)


@pytest.mark.parametrize("rounding", [1, 2])
@pytest.mark.parametrize("amsgrad", [False, True])
def test_fast_backend_matches_reference_with_any_scalars(fast_backend, rounding, amsgrad):
    """The kernels skip the divide and the decay multiply only where they are exact.

    compute_scalars always gives bf16 steps bias_correction2_sqrt == 1.0, so the
    general loop (which divides) is reached only with scalars made otherwise,
    as a C caller may: it must follow the reference too.
    """
    sc = fastadam._scalars.compute_scalars(
        3, 1e-2, 0.9, 0.999, 1e-8, 0.01, True, amsgrad, False, False, None, rounding, 4
    )
    for bc2, decay in ((0.3, sc.decay), (1.0, 1.0), (1.0, sc.decay), (0.3, 1.0)):
        scalars = sc._replace(bias_correction2_sqrt=bc2, decay=decay)
        ref = bf16_state(70_001, seed=3)
        fast = [a.copy() for a in ref]
        for state, name in ((ref, "numpy"), (fast, fast_backend)):
            p, g, m, v, vmax = state
            fastadam.backends.get(name).step(p, g, m, v, vmax if amsgrad else None, scalars)
        assert_bit_identical(fast, ref)


@pytest.mark.parametrize("n", [0, 1, 7, 8, 9, 15, 16, 17, 31, 33, 63, 65, 131_075])
def test_odd_sizes(fast_backend, n):
    ref = bf16_state(n, seed=n)
    fast = [a.copy() for a in ref]
    step_all(ref, "numpy", 3, amsgrad=True, seed=5)
    step_all(fast, fast_backend, 3, amsgrad=True, seed=5)
    assert_bit_identical(fast, ref)


def test_thread_count_does_not_change_the_random_bits(fast_backend):
    restore = fastadam.get_num_threads()
    try:
        results = []
        for threads in (1, 2, 3):
            fastadam.set_num_threads(threads)
            st = bf16_state(400_009, seed=4)
            for step in (1, 2):
                step_all(st, fast_backend, step, seed=9)
            results.append(st)
    finally:
        fastadam.set_num_threads(restore)
    for r in results[1:]:
        assert_bit_identical(r, results[0])


# --- the rounding itself --------------------------------------------------------


def test_nearest_rounding_matches_ml_dtypes():
    x = np.random.default_rng(0).standard_normal(100_000).astype(np.float32)
    x[:6] = [np.inf, -np.inf, 3.4e38, -0.0, 1e-40, 2.0**-130]
    ours = reference.round_to_bf16(x, None)
    theirs = x.astype(BF16).view(np.uint16)
    assert np.array_equal(ours, theirs)


def test_nan_stays_nan_and_inf_stays_inf():
    x = np.array([np.nan, -np.nan, np.inf, -np.inf], np.float32)
    for r in (None, np.full(4, 0xFFFF, np.uint32)):
        out = reference.round_to_bf16(x, r).view(BF16).astype(np.float32)
        assert np.isnan(out[:2]).all() and list(out[2:]) == [np.inf, -np.inf]


def test_stochastic_rounding_is_unbiased():
    # A value a quarter of the way between two bf16 neighbours rounds up a
    # quarter of the time: the mean over many independent draws is the value.
    lo = np.float32(1.0)
    step = np.float32(2.0**-7)  # bf16 spacing at 1.0
    x = np.full(400_000, lo + step / 4, np.float32)
    r = reference.random_bits(x.size, fastadam._scalars.rounding_key(3, 1)) & np.uint32(0xFFFF)
    out = reference.round_to_bf16(x, r).view(BF16).astype(np.float64)
    assert set(np.unique(out)) == {1.0, 1.0 + 2.0**-7}
    assert abs(out.mean() - float(x[0])) < 2e-5  # 4 sigma of the binomial noise is ~1.1e-5
    assert abs((out > 1.0).mean() - 0.25) < 0.005


def test_random_bits_look_independent():
    """Within one step: the 16-bit halves uniform, unrelated to each other and to
    their neighbours'; across steps: unrelated for the same element.

    A cheaper one-multiply hash we tried failed this (neighbour correlation
    -0.38: rounding decisions of adjacent elements tied together).
    """
    n = 1 << 20
    r = reference.random_bits(n, fastadam._scalars.rounding_key(5, 3))
    r_next = reference.random_bits(n, fastadam._scalars.rounding_key(5, 4))
    halves = {"m": r & np.uint32(0xFFFF), "v": r >> np.uint32(16)}
    u = {k: h.astype(np.float64) / 65536 for k, h in halves.items()}

    def corr(a, b):
        return abs(np.corrcoef(a, b)[0, 1])

    bound = 6 / np.sqrt(n)  # 6 sigma of a sample correlation of independent draws
    assert corr(u["m"], u["v"]) < bound
    for k in "mv":
        top = np.bincount((halves[k] >> np.uint32(8)).astype(np.int64), minlength=256)
        chi2 = ((top - n / 256) ** 2 / (n / 256)).sum()
        assert chi2 < 255 + 8 * np.sqrt(2 * 255), (k, chi2)  # df = 255
        for lag in (1, 2, 3, 1024):
            assert corr(u[k][:-lag], u[k][lag:]) < bound, (k, lag)
    assert corr(u["m"], (r_next & np.uint32(0xFFFF)).astype(np.float64)) < bound


def test_random_bits_depend_on_seed_step_and_index_only():
    def run(seed, step, backend="numpy"):
        st = bf16_state(10_000, seed=1)
        step_all(st, backend, step, seed=seed)
        return st[2].view(np.uint16).copy()

    a = run(1, 5)
    assert np.array_equal(a, run(1, 5))  # reproducible
    assert not np.array_equal(a, run(2, 5))  # the seed matters
    assert not np.array_equal(a, run(1, 6))  # so does the step
    for backend in fastadam.available_backends():
        assert np.array_equal(a, run(1, 5, backend))


# --- what stochastic rounding is for --------------------------------------------


@pytest.mark.parametrize("backend", ["numpy", "numba", "c"])
def test_second_moment_decays_under_zero_gradients(backend):
    """v_t = 0.999^t v_0 with zero gradients: stochastic bf16 tracks it; nearest is stuck."""
    if backend not in fastadam.available_backends():
        pytest.skip(fastadam.unavailable_reasons().get(backend, ""))
    n, steps = 20_000, 2_000
    p = np.zeros(n, np.float32)
    g = np.zeros(n, np.float32)
    results = {}
    for rounding in ("stochastic", "nearest"):
        m = np.zeros(n, BF16)
        v = np.ones(n, BF16)
        checkpoints = {}
        for t in range(1, steps + 1):
            fastadam.adam_step(p, g, m, v, step=t, lr=0.0, state_rounding=rounding, backend=backend)
            if t in (500, 1000, 2000):
                checkpoints[t] = float(v.astype(np.float64).mean())
        results[rounding] = checkpoints
    for t, mean in results["stochastic"].items():
        assert abs(mean / 0.999**t - 1) < 0.02, (t, mean, 0.999**t)
    # Round-to-nearest: 1.0 * 0.999 rounds back to 1.0, so nothing ever decays.
    assert results["nearest"][2000] == 1.0


# --- optimizers -----------------------------------------------------------------


def _params(seed=0):
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(s).astype(np.float32) for s in ((64, 3), (17,), (5, 5))]


def _grads(params, step):
    rng = np.random.default_rng(100 + step)
    return [rng.standard_normal(p.shape).astype(np.float32) for p in params]


def test_optimizer_keeps_bf16_state_and_resumes_bit_for_bit(backend):
    kw = dict(lr=1e-2, amsgrad=True, state_dtype="bfloat16", seed=7, backend=backend)
    straight = _params()
    opt = fastadam.AdamW(straight, **kw)
    for s in range(1, 21):
        opt.step(_grads(straight, s))
    assert all(
        st[k].dtype == BF16
        for st in opt.state.values()
        for k in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")
    )

    first = _params()
    a = fastadam.AdamW(first, **kw)
    for s in range(1, 11):
        a.step(_grads(first, s))
    sd = pickle.loads(pickle.dumps(a.state_dict()))
    assert sd["state"][0]["exp_avg"].dtype == BF16  # the checkpoint keeps the dtype
    b = fastadam.AdamW(first, **kw)
    b.load_state_dict(sd)
    for s in range(11, 21):
        b.step(_grads(first, s))
    for x, y in zip(first, straight):
        assert np.array_equal(x, y)


def test_each_parameter_gets_its_own_random_bits():
    # Two identical arrays in one optimizer must not be rounded identically.
    p = [np.ones(5000, np.float32), np.ones(5000, np.float32)]
    opt = fastadam.Adam(p, lr=1e-3, state_dtype="bfloat16")
    g = np.full(5000, 0.3, np.float32)
    for _ in range(3):
        opt.step([g.copy(), g.copy()])
    assert not np.array_equal(
        opt.state[0]["exp_avg_sq"].view(np.uint16), opt.state[1]["exp_avg_sq"].view(np.uint16)
    )


def test_bf16_checkpoint_is_refused_by_a_float32_state_optimizer():
    p = _params()
    a = fastadam.Adam(p, state_dtype="bfloat16")
    a.step(_grads(p, 1))
    b = fastadam.Adam(_params())
    b.step(_grads(p, 1))
    with pytest.raises(ValueError, match="dtype"):
        b.load_state_dict(a.state_dict())


def test_flatparams_with_bf16_state():
    flat = fastadam.FlatParams({"w": np.ones((8, 8)), "b": np.zeros(8)}, dtype=np.float32)
    opt = fastadam.Adam(flat, lr=0.1, state_dtype="bfloat16")
    flat.grad[...] = 1.0
    opt.step()
    assert opt.state[0]["exp_avg"].dtype == BF16
    # The first Adam step moves by lr * m / sqrt(v) with m, v as stored: each is
    # within a relative 2**-8 of its float32 value (one bf16 ulp), so the step
    # is lr within (1 + 2**-8) / sqrt(1 - 2**-8) - 1 < 2**-7.
    assert np.allclose(flat.params["w"], 0.9, rtol=0, atol=0.1 * 2**-7)
    assert not np.allclose(flat.params["w"], 1.0, atol=0.05)


@pytest.mark.parametrize(
    "kwargs, exc, word",
    [
        ({"state_dtype": "float16"}, ValueError, "state_dtype"),
        ({"state_dtype": "bfloat16", "state_rounding": "up"}, ValueError, "state_rounding"),
        ({"state_dtype": "bfloat16", "seed": -1}, ValueError, "seed"),
        ({"state_dtype": "bfloat16", "seed": 1.5}, TypeError, "seed"),
    ],
)
def test_optimizer_rejects(kwargs, exc, word):
    with pytest.raises(exc) as info:
        fastadam.Adam(_params(), **kwargs)
    assert word in str(info.value)


def test_bf16_state_needs_float32_params():
    with pytest.raises(TypeError, match="float32"):
        fastadam.Adam([np.zeros(3)], state_dtype="bfloat16")


# --- adam_step bad input ----------------------------------------------------------


@pytest.mark.parametrize(
    "breaker, exc, word",
    [
        (lambda s: s.__setitem__(0, s[0].astype(np.float64)), TypeError, "param"),
        (lambda s: s.__setitem__(3, s[3].astype(np.float32)), TypeError, "exp_avg_sq"),
        (lambda s: s.__setitem__(4, s[4].astype(np.float32)), TypeError, "max_exp_avg_sq"),
        (lambda s: s.__setitem__(1, s[1].astype(BF16)), TypeError, "grad"),
    ],
)
def test_mixed_dtypes_are_refused_and_nothing_changes(backend, breaker, exc, word):
    st = bf16_state(100)
    breaker(st)
    before = [a.copy() for a in st]
    with pytest.raises(exc) as info:
        step_all(st, backend, 1, amsgrad=True)
    assert word in str(info.value)
    for a, b in zip(st, before):
        assert np.array_equal(bits(a), bits(b))


@pytest.mark.parametrize(
    "kwargs, exc, word",
    [
        ({"state_rounding": "floor"}, ValueError, "state_rounding"),
        ({"state_rounding": 0}, ValueError, "state_rounding"),
        ({"seed": -1}, ValueError, "seed"),
        ({"seed": 2**64}, ValueError, "seed"),
        ({"seed": "1"}, TypeError, "seed"),
    ],
)
def test_bad_rounding_arguments(backend, kwargs, exc, word):
    st = bf16_state(50)
    before = [a.copy() for a in st]
    with pytest.raises(exc) as info:
        step_all(st, backend, 1, **kwargs)
    assert word in str(info.value)
    for a, b in zip(st, before):
        assert np.array_equal(bits(a), bits(b))


# --- accuracy: the digits CNN trains as well with bf16 states ----------------------


def test_digits_cnn_trains_to_the_same_accuracy_with_bf16_states():
    pytest.importorskip("sklearn")
    cnn = import_example("train_digits_cnn")
    data = cnn.load_data(0, cnn.DEFAULT_TEST_FRACTION)
    acc = {}
    for dtype in (None, "bfloat16"):
        result = cnn.train(data, seed=0, state_dtype=dtype)
        acc[dtype] = result.history[-1]["test_acc"]
    # float32 states reach 0.980 with these defaults (seeds 0-7: 0.978-0.993).
    assert acc[None] >= 0.97
    assert acc["bfloat16"] >= 0.97
    assert abs(acc["bfloat16"] - acc[None]) <= 0.01


# --- fastadam.torch with bfloat16 states -------------------------------------------


def test_torch_dropin_bf16_states_follow_the_numpy_optimizer(backend):
    torch = pytest.importorskip("torch")
    import fastadam.torch as ft

    arrays = _params()
    tparams = [torch.nn.Parameter(torch.from_numpy(a.copy())) for a in arrays]
    topt = ft.AdamW(
        tparams, lr=1e-2, amsgrad=True, state_dtype=torch.bfloat16, seed=3, backend=backend
    )
    nopt = fastadam.AdamW(
        arrays, lr=1e-2, amsgrad=True, state_dtype="bfloat16", seed=3, backend=backend
    )
    for s in range(1, 16):
        grads = _grads(arrays, s)
        for tp, g in zip(tparams, grads):
            tp.grad = torch.from_numpy(g.copy())
        topt.step()
        nopt.step(grads)
    for tp, a in zip(tparams, arrays):
        assert np.array_equal(tp.detach().numpy(), a)  # same kernel, same seeds: same bits
    st = topt.state[tparams[0]]
    assert st["exp_avg"].dtype == torch.bfloat16 and st["max_exp_avg_sq"].dtype == torch.bfloat16

    # A checkpoint keeps the dtype, and loading it (torch casts states to the
    # parameter's dtype on load) gives bfloat16 states back, exactly.
    sd = topt.state_dict()
    fresh = ft.AdamW(
        tparams, lr=1e-2, amsgrad=True, state_dtype=torch.bfloat16, seed=3, backend=backend
    )
    fresh.load_state_dict(sd)
    for key in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"):
        assert fresh.state[tparams[0]][key].dtype == torch.bfloat16
        assert torch.equal(fresh.state[tparams[0]][key], st[key])


def test_torch_dropin_bf16_needs_float32_params():
    torch = pytest.importorskip("torch")
    import fastadam.torch as ft

    p = torch.nn.Parameter(torch.zeros(3, dtype=torch.float64))
    p.grad = torch.ones(3, dtype=torch.float64)
    opt = ft.Adam([p], state_dtype=torch.bfloat16)
    with pytest.raises(TypeError, match="float32"):
        opt.step()
    with pytest.raises(ValueError, match="state_dtype"):
        ft.Adam([p], state_dtype=torch.float16)


def test_torch_digits_example_trains_to_the_same_accuracy_with_bf16_states():
    pytest.importorskip("torch")
    pytest.importorskip("sklearn")
    acc = {
        dtype: torch_digits_accuracy("--state-dtype", dtype) for dtype in ("float32", "bfloat16")
    }
    # float32 states: 0.975-0.981 over seeds 0-2 with these defaults.
    assert acc["float32"] >= 0.97 and acc["bfloat16"] >= 0.97
    assert abs(acc["bfloat16"] - acc["float32"]) <= 0.01


def test_random_bits_known_answers():
    """The stochastic-rounding bits are part of the state format: pinned here, so a
    change to the hash (its constants, its order) in every backend at once still fails.
    The fast backends are tested bit-identical to the reference, so pinning the
    reference pins them all."""
    from fastadam._scalars import rounding_key
    from fastadam.backends import reference

    assert rounding_key(7, 3) == 0x5AD47766
    assert [int(x) for x in reference.random_bits(4, 0x12345678)] == [
        0xD9DC1D15, 0x725FA97F, 0x730C6640, 0x600CE491,
    ]  # fmt: skip
    # across the 2**32 boundary, where hi32 of the index enters the key
    assert [int(x) for x in reference.random_bits(2, 0x9ABCDEF0, first=2**32 - 1)] == [
        0x0835A9E6, 0xEAF38E8D,
    ]  # fmt: skip
