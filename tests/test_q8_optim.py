"""state_dtype="8bit" in fastadam.Adam/AdamW and FlatParams (issue 18): states,
checkpoints (bit-exact resume, float32 <-> 8-bit conversion), refusals."""

from __future__ import annotations

import copy

import numpy as np
import pytest

import fastadam
from fastadam import _q8


def _model(seed=0):
    rng = np.random.default_rng(seed)
    return [rng.standard_normal((96, 80)).astype(np.float32),  # 7680: 8-bit
            rng.standard_normal(80).astype(np.float32),  # small: float32
            rng.standard_normal((70, 70)).astype(np.float32)]  # 4900: 8-bit  # fmt: skip


def _grads(params, t):
    rng = np.random.default_rng(100 + t)
    return [(rng.standard_normal(p.shape) * 0.1 + 0.01 * p).astype(np.float32) for p in params]


def _train(opt, params, t0, t1):
    for t in range(t0, t1):
        opt.step(_grads(params, t))


def test_states(backend):
    params = _model()
    opt = fastadam.AdamW(params, lr=1e-2, state_dtype="8bit", backend=backend)
    _train(opt, params, 0, 3)
    st = opt.state
    assert st[0]["exp_avg"].dtype == np.uint8 and st[0]["exp_avg_sq"].dtype == np.uint8
    assert st[0]["exp_avg_absmax"].shape == (_q8.nblocks(7680),)
    assert st[0]["exp_avg_sq_absmax"].dtype == np.float32
    assert st[1]["exp_avg"].dtype == np.float32 and "exp_avg_absmax" not in st[1]
    assert st[2]["exp_avg"].dtype == np.uint8
    assert all(s["step"] == 3 for s in st.values())


def test_same_bits_on_every_backend(fast_backend):
    a, b = _model(), _model()
    oa = fastadam.AdamW(a, lr=1e-2, state_dtype="8bit", backend="numpy")
    ob = fastadam.AdamW(b, lr=1e-2, state_dtype="8bit", backend=fast_backend)
    _train(oa, a, 0, 4)
    _train(ob, b, 0, 4)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)


def test_checkpoint_resumes_bit_exactly(backend):
    params = _model()
    opt = fastadam.Adam(params, lr=1e-2, weight_decay=0.01, state_dtype="8bit", backend=backend)
    _train(opt, params, 0, 3)
    ckpt = copy.deepcopy(opt.state_dict())
    saved = [p.copy() for p in params]
    _train(opt, params, 3, 6)
    params2 = saved
    opt2 = fastadam.Adam(params2, lr=1e-2, weight_decay=0.01, state_dtype="8bit", backend=backend)
    opt2.load_state_dict(ckpt)
    _train(opt2, params2, 3, 6)
    for x, y in zip(params, params2):
        np.testing.assert_array_equal(x, y)
    for i in opt.state:
        for k, a in opt.state[i].items():
            np.testing.assert_array_equal(np.asarray(a), np.asarray(opt2.state[i][k]))


def test_float32_checkpoint_converts_both_ways():
    params = _model()
    opt32 = fastadam.Adam(params, lr=1e-2)
    _train(opt32, params, 0, 3)
    ckpt32 = copy.deepcopy(opt32.state_dict())
    opt8 = fastadam.Adam([p.copy() for p in params], lr=1e-2, state_dtype="8bit")
    opt8.load_state_dict(ckpt32)
    st = opt8.state[0]
    assert st["exp_avg"].dtype == np.uint8
    m = _q8.dequantize(st["exp_avg"], st["exp_avg_absmax"], signed=True)
    v = _q8.dequantize(st["exp_avg_sq"], st["exp_avg_sq_absmax"], signed=False)
    m32, v32 = ckpt32["state"][0]["exp_avg"], ckpt32["state"][0]["exp_avg_sq"]
    a = np.repeat(st["exp_avg_absmax"], _q8.BLOCK)[: m.size].reshape(m.shape)
    # the documented bound: relative 1/16 + 2 ulp, or absolute 1.25 * 2^-16 * absmax
    assert np.all(np.abs(m - m32) <= np.maximum(np.abs(m32) * (1 / 16 + 1e-6), a * 2.0**-15.6))
    assert np.all(v > 0) and np.all(np.abs(v - v32) <= v32 * (1 / 16 + 1e-6) + 1e-30)
    # and back: an 8-bit checkpoint into a float32 optimizer dequantizes
    ckpt8 = copy.deepcopy(opt8.state_dict())
    back = fastadam.Adam([p.copy() for p in params], lr=1e-2)
    back.load_state_dict(ckpt8)
    np.testing.assert_array_equal(back.state[0]["exp_avg"], m)
    np.testing.assert_array_equal(back.state[0]["exp_avg_sq"], v)
    _train(back, back.param_groups[0]["params"], 3, 4)


def test_flat_params():
    flat = fastadam.FlatParams({"w": np.ones((100, 100)), "b": np.zeros(10)}, dtype=np.float32)
    opt = fastadam.AdamW(flat, lr=1e-2, state_dtype="8bit")
    for _ in range(3):
        flat.grads["w"][...] = 0.1
        flat.grads["b"][...] = -0.1
        opt.step()
    assert opt.state[0]["exp_avg"].dtype == np.uint8
    np.testing.assert_allclose(flat.params["w"], 1 - 3 * 1e-2 * (1 + 0.01), rtol=1e-3)


def test_refusals():
    params = _model()
    with pytest.raises(ValueError, match="amsgrad"):
        fastadam.Adam(params, state_dtype="8bit", amsgrad=True)
    with pytest.raises(TypeError, match="float32"):
        fastadam.Adam([np.ones(5000)], state_dtype="8bit")
    with pytest.raises(ValueError, match="min_8bit_size"):
        fastadam.Adam(params, state_dtype="8bit", min_8bit_size=-1)
    opt = fastadam.Adam(params, state_dtype="8bit")
    _train(opt, params, 0, 1)
    ckpt = copy.deepcopy(opt.state_dict())
    ckpt["state"][0]["exp_avg_absmax"] = ckpt["state"][0]["exp_avg_absmax"][:-1]
    before = copy.deepcopy(opt.state)
    with pytest.raises(ValueError, match="exp_avg_absmax"):
        opt.load_state_dict(ckpt)
    del ckpt["state"][0]["exp_avg_absmax"]
    with pytest.raises(ValueError, match="exp_avg_absmax"):
        opt.load_state_dict(ckpt)
    for i in before:
        for k in before[i]:
            np.testing.assert_array_equal(np.asarray(before[i][k]), np.asarray(opt.state[i][k]))
