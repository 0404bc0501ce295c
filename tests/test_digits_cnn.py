"""examples/train_digits_cnn.py: the hand-written backward pass, the training run, backend parity.

The model code is checked where it can silently be wrong: the backward pass
against central finite differences in float64 (and the check shown to catch
broken backward passes), the forward against naive loops, and the whole
example end to end through ``main``.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import numpy as np
import pytest

import fastadam

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
import train_digits_cnn as cnn  # noqa: E402

#: Largest accepted relative error between analytic and numeric gradients.
GRAD_RTOL = 1e-6
#: Central-difference step. In float64 the truncation error is O(h^2) ~ 1e-10
#: and the rounding error ~ 1e-16 * |loss| / h ~ 1e-11, both far below the
#: gradients (1e-3..1); measured, a correct backward lands at 1e-11..1e-10.
FD_STEP = 1e-5
ENTRIES_PER_ARRAY = 12  # finite differences checked per parameter array


# --- gradient check -------------------------------------------------------------


def _gradcheck_model(channels, batch=3, seed=0):
    """A float64 model with non-zero biases, a random batch, and the analytic gradients."""
    rng = np.random.default_rng(seed)
    params = cnn.init_params(rng, channels, dtype=np.float64)
    for name, p in params.items():
        if name.endswith(".bias"):  # init leaves them zero; a zero bias hides a wrong bias path
            p[...] = rng.normal(0.0, 0.1, p.shape)
    flat = fastadam.FlatParams(params, dtype=np.float64)
    x = rng.standard_normal((batch, cnn.IMAGE_SIZE, cnn.IMAGE_SIZE))
    y = rng.integers(0, cnn.NUM_CLASSES, batch)
    for g in flat.grads.values():
        g.fill(np.nan)  # backward must overwrite every entry (it does not accumulate)
    cnn.loss_and_grad(flat, x, y)
    return flat, x, y, rng


def _loss(flat, x, y):
    logits, _ = cnn.forward(flat.params, x)
    return cnn.softmax_cross_entropy(logits, y)[0]


def _sampled_entries(flat, rng):
    """name -> flat indices of up to ENTRIES_PER_ARRAY entries of that array."""
    return {
        name: rng.choice(p.size, size=min(p.size, ENTRIES_PER_ARRAY), replace=False)
        for name, p in flat.params.items()
    }


def _numeric(flat, x, y, name, idx):
    p = flat.params[name].reshape(-1)  # a view: perturbs the live parameter
    out = np.empty(len(idx))
    for k, i in enumerate(idx):
        orig = p[i]
        p[i] = orig + FD_STEP
        up = _loss(flat, x, y)
        p[i] = orig - FD_STEP
        down = _loss(flat, x, y)
        p[i] = orig
        out[k] = (up - down) / (2 * FD_STEP)
    return out


def _rel_error(analytic, numeric):
    # Norm-wise over the sampled entries: one bad entry shows, while entries
    # that are exactly zero (dead ReLUs) do not divide by zero.
    return np.linalg.norm(analytic - numeric) / (np.linalg.norm(analytic) + np.linalg.norm(numeric))


def _rel_errors(flat, x, y, entries):
    errs = {}
    for name, idx in entries.items():
        analytic = flat.grads[name].reshape(-1)[idx]
        numeric = _numeric(flat, x, y, name, idx)
        # Guard against a vacuous pass: the sampled gradient must not be all zero.
        assert np.linalg.norm(numeric) > 1e-6, f"{name}: sampled gradient is ~0; pick other entries"
        errs[name] = _rel_error(analytic, numeric)
    return errs


# Two and three conv blocks: the deeper layers' input gradients (col2im) are
# then part of the check, not only the first layer's weight gradient.
@pytest.mark.parametrize("channels", [(3,), (3, 4), (2, 3, 4)], ids=str)
def test_backward_matches_finite_differences(channels):
    flat, x, y, rng = _gradcheck_model(channels)
    for name, g in flat.grads.items():
        assert not np.isnan(g).any(), f"backward left entries of {name} unwritten"
    assert np.isfinite(flat.grad).all(), "backward wrote NaN into the padding"
    errs = _rel_errors(flat, x, y, _sampled_entries(flat, rng))
    assert set(errs) == set(cnn.param_shapes(channels))
    bad = {k: v for k, v in errs.items() if not v < GRAD_RTOL}
    assert not bad, f"relative error >= {GRAD_RTOL}: {bad}"


def test_gradient_check_catches_one_wrong_entry():
    """Nudging a single analytic gradient entry by 1e-4 of its array's norm fails the check."""
    flat, x, y, rng = _gradcheck_model((3, 4))
    entries = _sampled_entries(flat, rng)
    for name, idx in entries.items():
        g = flat.grads[name].reshape(-1)
        saved = g[idx[0]]
        g[idx[0]] += 1e-4 * np.linalg.norm(g[idx])
        err = _rel_errors(flat, x, y, {name: idx})[name]
        g[idx[0]] = saved
        assert err > GRAD_RTOL, f"{name}: a wrong gradient entry passed (rel error {err:.2e})"


def _avgpool_style_backward(dout, winner):
    # A classic bug: spread each output's gradient evenly over its window.
    del winner
    spread = np.repeat(np.repeat(dout, cnn.POOL, axis=1), cnn.POOL, axis=2)
    return spread / (cnn.POOL * cnn.POOL)


_REAL_COL2IM = cnn.col2im


def _flipped_col2im(cols, shape):
    # Another classic: each patch added back with the kernel flipped.
    b, h, w, c = shape
    k = cnn.KERNEL
    patches = cols.reshape(b, h, w, c, k, k)[..., ::-1, ::-1]
    return _REAL_COL2IM(np.ascontiguousarray(patches).reshape(cols.shape), shape)


_CONV = {"conv0.weight", "conv0.bias", "conv1.weight", "conv1.bias"}


@pytest.mark.parametrize(
    "attr, wrong, broken",
    [
        # Pooling sits under every conv layer: all their gradients go wrong.
        ("maxpool_backward", _avgpool_style_backward, _CONV),
        # col2im only carries the gradient from conv1 down to conv0.
        ("col2im", _flipped_col2im, {"conv0.weight", "conv0.bias"}),
    ],
    ids=["pool-to-all-inputs", "flipped-col2im"],
)
def test_gradient_check_catches_broken_backward(monkeypatch, attr, wrong, broken):
    """A backward with a wrong pooling or convolution adjoint fails the same comparison.

    Exactly the gradients that flow through the broken function fail (measured:
    relative errors 0.1-0.8 there, ~1e-11 elsewhere), so the check also points
    at the right place.
    """
    flat, x, y, rng = _gradcheck_model((3, 4))
    entries = _sampled_entries(flat, rng)
    monkeypatch.setattr(cnn, attr, wrong)
    cnn.loss_and_grad(flat, x, y)
    errs = _rel_errors(flat, x, y, entries)
    failing = {k for k, v in errs.items() if not v < GRAD_RTOL}
    assert failing == broken, errs


# --- forward pieces against naive loops --------------------------------------------


def test_conv_forward_matches_naive_loops():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((2, 4, 4, 3))
    w = rng.standard_normal((5, 3, cnn.KERNEL, cnn.KERNEL))
    got = (cnn.im2col(x) @ w.reshape(5, -1).T).reshape(2, 4, 4, 5)
    xp = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    want = np.zeros((2, 4, 4, 5))
    for n in range(2):
        for i in range(4):
            for j in range(4):
                for f in range(5):
                    # Cross-correlation, as in torch's Conv2d.
                    want[n, i, j, f] = np.sum(
                        xp[n, i : i + 3, j : j + 3, :] * w[f].transpose(1, 2, 0)
                    )
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)


def test_col2im_is_the_adjoint_of_im2col():
    # <im2col(x), c> == <x, col2im(c)> for every x, c: the defining property.
    rng = np.random.default_rng(2)
    shape = (2, 4, 4, 3)
    x = rng.standard_normal(shape)
    c = rng.standard_normal((2 * 4 * 4, 3 * cnn.KERNEL * cnn.KERNEL))
    lhs = np.sum(cnn.im2col(x) * c)
    rhs = np.sum(x * cnn.col2im(c, shape))
    assert lhs == pytest.approx(rhs, rel=1e-12)


def test_maxpool_forward_and_backward_match_naive_loops():
    rng = np.random.default_rng(3)
    a = rng.standard_normal((2, 4, 6, 3))
    a[0, 0, 0, 0] = a[0, 0, 1, 0] = 5.0  # a tie: the gradient must go to one input only
    pooled, winner = cnn.maxpool_forward(a)
    dout = rng.standard_normal(pooled.shape)
    da = cnn.maxpool_backward(dout, winner)
    want_pooled = np.zeros((2, 2, 3, 3))
    want_da = np.zeros_like(a)
    for n in range(2):
        for i in range(2):
            for j in range(3):
                for c in range(3):
                    win = a[n, 2 * i : 2 * i + 2, 2 * j : 2 * j + 2, c]
                    want_pooled[n, i, j, c] = win.max()
                    di, dj = np.unravel_index(np.argmax(win), (2, 2))  # first maximum, row-major
                    want_da[n, 2 * i + di, 2 * j + dj, c] = dout[n, i, j, c]
    np.testing.assert_array_equal(pooled, want_pooled)
    np.testing.assert_array_equal(da, want_da)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_softmax_cross_entropy_is_stable_for_huge_logits(dtype):
    # Logits far past exp's range (float32 overflows at ~88): the shifted
    # log-softmax must stay finite and equal the small-logit answer, since
    # softmax does not change when every logit of a row moves by the same amount.
    rng = np.random.default_rng(4)
    small = rng.standard_normal((4, 10)).astype(dtype)
    labels = np.array([0, 3, 9, 5])
    loss_small, grad_small = cnn.softmax_cross_entropy(small, labels)
    loss_huge, grad_huge = cnn.softmax_cross_entropy(small + dtype(1e4), labels)
    assert np.isfinite(loss_huge) and np.isfinite(grad_huge).all()
    assert grad_huge.dtype == dtype
    tol = 1e-2 if dtype == np.float32 else 1e-9  # float32 spacing near 1e4 is ~1e-3
    assert loss_huge == pytest.approx(loss_small, abs=tol)
    np.testing.assert_allclose(grad_huge, grad_small, atol=tol)
    # And the value itself, against the textbook formula in float64.
    p = np.exp(small.astype(np.float64))
    p /= p.sum(axis=1, keepdims=True)
    want = -np.mean(np.log(p[np.arange(4), labels]))
    assert loss_small == pytest.approx(want, rel=1e-5 if dtype == np.float32 else 1e-12)


# --- training ------------------------------------------------------------------------


def test_default_run_reaches_stated_accuracy(capsys):
    """The example's defaults (15 epochs, seed 0) must reach 0.97 test accuracy.

    Measured (float32, numba and numpy backends alike, one BLAS thread): seed 0
    gives 0.980; seeds 0-7 gave 0.978-0.993 with these defaults. 0.97 leaves a
    margin of ~4 test images (of 450) for BLAS/CPU differences in summation
    order, and is the accuracy the example promises. About 1-3 s on 2 cores.
    """
    pytest.importorskip("sklearn")
    rc = cnn.main(["--backend", "numpy", "--no-progress", "--bench-steps", "3"])
    out = capsys.readouterr().out
    assert rc == 0
    assert len(
        re.findall(r"^epoch +\d+ +loss [\d.]+ +train acc [\d.]+ +test acc [\d.]+$", out, re.M)
    ) == (cnn.DEFAULT_EPOCHS)
    assert re.search(r"^optimizer \(numpy\): [\d.]+ ms in \d+ steps", out, re.M)
    for name in fastadam.available_backends():  # one row per backend in the timing table
        assert re.search(rf"^  {name} +[\d.]+ +[\d.]+ +[\d.]+x$", out, re.M), name
    lines = out.rstrip("\n").splitlines()
    match = re.fullmatch(r"test accuracy: (\d\.\d{3})", lines[-1])
    assert match, lines[-1]
    assert float(match.group(1)) >= 0.97


def test_training_is_deterministic_given_the_seed():
    pytest.importorskip("sklearn")
    data = cnn.load_data(seed=3)
    a = cnn.train(data, seed=3, backend="numpy", max_steps=8, evaluate=False)
    b = cnn.train(data, seed=3, backend="numpy", max_steps=8, evaluate=False)
    c = cnn.train(data, seed=4, backend="numpy", max_steps=8, evaluate=False)
    assert a.steps == 8
    np.testing.assert_array_equal(a.flat.data, b.flat.data)
    assert not np.array_equal(a.flat.data, c.flat.data)  # the seed does matter


def test_fast_backend_trains_bit_identical_to_numpy(fast_backend):
    """Same seed, numpy vs numba (or C): identical parameters and state after 20 steps.

    The forward/backward is the same NumPy code for both, so any difference
    would come from the optimizer kernels, which are bit-identical by design.
    """
    pytest.importorskip("sklearn")
    data = cnn.load_data(seed=0)
    ref = cnn.train(data, backend="numpy", max_steps=20, evaluate=False)
    fast = cnn.train(data, backend=fast_backend, max_steps=20, evaluate=False)
    start = fastadam.FlatParams(cnn.init_params(np.random.default_rng(0)), dtype=np.float32)
    assert not np.array_equal(ref.flat.data, start.data)  # training moved the parameters
    assert ref.flat.data.dtype == np.float32
    np.testing.assert_array_equal(fast.flat.data, ref.flat.data)
    ref_state, fast_state = ref.opt.state_dict()["state"], fast.opt.state_dict()["state"]
    assert ref_state[0]["step"] == fast_state[0]["step"] == 20
    for key in ("exp_avg", "exp_avg_sq"):
        np.testing.assert_array_equal(fast_state[0][key], ref_state[0][key], err_msg=key)
