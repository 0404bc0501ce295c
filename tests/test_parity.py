"""Parity: every backend against the NumPy reference (bit for bit) and against torch.

The fast backends do the reference's float operations in the same order with
no FMA contraction, and IEEE add/mul/div/sqrt are correctly rounded, so they
must agree with it *exactly*: any difference is a bug, not noise. Against
torch (whose ``lerp`` uses a fused multiply-add) we allow a few ULPs.
"""

from __future__ import annotations

import numpy as np
import pytest
from helpers import (
    DTYPES,
    ODD_SIZES,
    OPTION_COMBOS,
    assert_bit_identical,
    combo_id,
    copy_state,
    make_state,
    run_step,
)

import fastadam


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("combo", OPTION_COMBOS, ids=combo_id)
def test_fast_backend_matches_reference_bit_for_bit(fast_backend, dtype, combo):
    ref = make_state(4099, dtype, seed=1)
    fast = copy_state(ref)
    for step in range(1, 31):
        # Mix in a grad_scale on some steps and eps_hat on others.
        extra = {"grad_scale": 4.0} if step % 3 == 0 else {}
        extra["eps_hat"] = step % 4 == 0
        for state, backend in ((ref, "numpy"), (fast, fast_backend)):
            state[1][...] = np.random.default_rng(step).standard_normal(state[1].shape)
            run_step(state, backend, step=step, **combo, **extra)
    assert_bit_identical(fast, ref)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("n", ODD_SIZES)
def test_odd_sizes_bit_for_bit(fast_backend, dtype, n):
    ref = make_state(n, dtype, seed=n)
    fast = copy_state(ref)
    run_step(ref, "numpy", weight_decay=0.01, amsgrad=True, grad_scale=2.0)
    run_step(fast, fast_backend, weight_decay=0.01, amsgrad=True, grad_scale=2.0)
    assert_bit_identical(fast, ref)


@pytest.mark.parametrize("shape", [(), (1,), (3, 5), (2, 3, 4, 5), (0, 7), (17, 1, 9)])
def test_any_shape(backend, shape):
    ref = make_state(0, np.float32, seed=3, shape=shape)
    got = copy_state(ref)
    run_step(ref, "numpy")
    run_step(got, backend)
    assert got[0].shape == shape
    assert_bit_identical(got, ref)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
def test_nan_and_inf_stay_in_their_element(backend, dtype):
    ref = make_state(2000, dtype, seed=7)
    p, g, m, v, vmax = ref
    g[[5, 700, 1500]] = [np.nan, np.inf, -np.inf]
    before = copy_state(ref)
    run_step(ref, backend, amsgrad=True, weight_decay=0.1)
    bad = np.zeros(p.size, bool)
    bad[[5, 700, 1500]] = True
    # The poisoned elements are non-finite; every other element took a normal step.
    assert not np.isfinite(ref[0][bad]).any()
    assert np.isfinite(ref[0][~bad]).all()
    clean = tuple(np.delete(a, np.flatnonzero(bad)) for a in before)
    run_step(clean, "numpy", amsgrad=True, weight_decay=0.1)
    assert_bit_identical(tuple(np.delete(a, np.flatnonzero(bad)) for a in ref), clean)


def test_found_inf_touches_nothing(backend):
    state = make_state(1000, np.float32)
    before = copy_state(state)
    run_step(state, backend, amsgrad=True, grad_scale=8.0, found_inf=True)
    assert_bit_identical(state, before)


def test_grad_scale_writes_unscaled_grad_back(backend):
    state = make_state(1000, np.float32)
    expected = copy_state(state)
    expected[1][...] = expected[1] / np.float32(1024.0)
    run_step(state, backend, grad_scale=1024.0)
    run_step(expected, "numpy")
    assert_bit_identical(state, expected)


# --- against torch.optim ------------------------------------------------------

torch = pytest.importorskip("torch")

#: Worst |ours - torch| allowed after TORCH_STEPS steps, relative to max(1, |θ|):
#: per-step rounding differences of ~1 ULP (torch's lerp is an FMA) that
#: accumulate over hundreds of steps, with a 10x margin over what we measure.
TORCH_STEPS = 300
TORCH_RTOL = {np.float32: 1e-5, np.float64: 1e-13}


def _torch_run(dtype, combo, backend, n=1001, steps=TORCH_STEPS, lr=1e-2):
    rng = np.random.default_rng(42)
    p0 = rng.standard_normal(n).astype(dtype)
    tp = torch.tensor(p0.copy(), requires_grad=True)
    cls = torch.optim.AdamW if combo["decoupled_weight_decay"] else torch.optim.Adam
    opt = cls(
        [tp], lr=lr, weight_decay=combo["weight_decay"], amsgrad=combo["amsgrad"],
        maximize=combo["maximize"], foreach=False,
    )  # fmt: skip
    p, m, v, vmax = p0.copy(), np.zeros_like(p0), np.zeros_like(p0), np.zeros_like(p0)
    for step in range(1, steps + 1):
        g = rng.standard_normal(n).astype(dtype)
        tp.grad = torch.from_numpy(g.copy())
        opt.step()
        fastadam.adam_step(
            p, g, m, v, step=step, lr=lr, max_exp_avg_sq=vmax, backend=backend, **combo
        )
    st = opt.state[tp]
    return (p, m, v), (tp.detach().numpy(), st["exp_avg"].numpy(), st["exp_avg_sq"].numpy())


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("combo", OPTION_COMBOS, ids=combo_id)
def test_matches_torch_over_hundreds_of_steps(backend, dtype, combo):
    ours, theirs = _torch_run(dtype, combo, backend)
    for name, a, b in zip(("param", "exp_avg", "exp_avg_sq"), ours, theirs):
        err = np.max(np.abs(a.astype(np.float64) - b) / np.maximum(1.0, np.abs(b)))
        assert err <= TORCH_RTOL[dtype], f"{name}: worst relative error {err:.3g}"


def test_eps_hat_matches_scikit_learn():
    """ε̂ convention against an independent implementation (scikit-learn's Adam)."""
    sk = pytest.importorskip("sklearn.neural_network._stochastic_optimizers")
    rng = np.random.default_rng(0)
    p0 = rng.standard_normal(513)
    sk_params = [p0.copy()]
    opt = sk.AdamOptimizer(
        sk_params, learning_rate_init=1e-2, beta_1=0.9, beta_2=0.999, epsilon=1e-7
    )
    ours = {b: (p0.copy(), np.zeros(513), np.zeros(513)) for b in fastadam.available_backends()}
    for step in range(1, 201):
        g = rng.standard_normal(513)
        opt.update_params(sk_params, [g])
        for b, (p, m, v) in ours.items():
            fastadam.adam_step(
                p, g.copy(), m, v, step=step, lr=1e-2, eps=1e-7, eps_hat=True, backend=b
            )
    for b, (p, _, _) in ours.items():
        np.testing.assert_allclose(p, sk_params[0], rtol=1e-12, atol=1e-13, err_msg=b)


def test_weight_decay_that_rounds_to_zero_in_float32_still_counts(backend):
    """Found by hypothesis: wd=3e-242 is 0 in float32 but not in float64.

    Whether the L2 term is applied is decided on the float64 value (as torch
    does), so with an infinite parameter the gradient becomes 0*inf = NaN on
    every backend alike.
    """
    state = tuple(np.array([x], np.float32) for x in (np.inf, 1e-40, -0.0, 0.0, 0.0))
    ref = copy_state(state)
    run_step(ref, "numpy", step=1, lr=0.0, beta1=0.0, beta2=0.0, eps=0.0, weight_decay=3.13e-242)
    run_step(state, backend, step=1, lr=0.0, beta1=0.0, beta2=0.0, eps=0.0, weight_decay=3.13e-242)
    assert np.isnan(ref[2][0])  # exp_avg took the NaN gradient
    assert_bit_identical(state, ref)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("combo", OPTION_COMBOS, ids=combo_id)
def test_every_option_bit_for_bit_on_the_threaded_path(fast_backend, dtype, combo):
    """Every option combination above both parallel thresholds (C
    config.C_PARALLEL_MIN_ELEMENTS, Numba config.PARALLEL_MIN_ELEMENTS), on 2
    threads: a bug in only the threaded loop of one option (say, AdamW's decay
    dropped there) must fail here."""
    from fastadam import config

    n = max(config.PARALLEL_MIN_ELEMENTS, config.C_PARALLEL_MIN_ELEMENTS) + 4099
    ref = make_state(n, dtype, seed=11)
    fast = copy_state(ref)
    before = fastadam.get_num_threads()
    fastadam.set_num_threads(2)
    try:
        for step in (1, 2):
            extra = {"grad_scale": 8.0, "eps_hat": True} if step == 2 else {}
            run_step(ref, "numpy", step=step, **combo, **extra)
            run_step(fast, fast_backend, step=step, **combo, **extra)
    finally:
        fastadam.set_num_threads(before)
    assert_bit_identical(fast, ref)
