"""state_dtype="8bit" in fastadam.torch (issue 18): torch tensors in the state,
the same bits as the NumPy optimizer, checkpoints, and a small GPT-2-shaped LM
that trains as well as with float32 states."""

from __future__ import annotations

import copy
import io
import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")
nn = torch.nn

import fastadam  # noqa: E402
import fastadam.torch as fat  # noqa: E402
from fastadam import _q8  # noqa: E402


def _net(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, 96), nn.Tanh(), nn.Linear(96, 50), nn.Tanh(),
                         nn.Linear(50, 10))  # fmt: skip


def _train(model, opt, t0, t1):
    for t in range(t0, t1):
        g = torch.Generator().manual_seed(t)
        x = torch.randn(32, 64, generator=g)
        y = torch.randint(0, 10, (32,), generator=g)
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()


def test_states_are_tensors_and_match_numpy_optimizer(backend):
    model = _net()
    ref = [p.detach().numpy().copy() for p in model.parameters()]
    opt = fat.AdamW(model.parameters(), lr=1e-2, state_dtype="8bit", backend=backend)
    _train(model, opt, 0, 1)
    ps = list(model.parameters())
    st = opt.state[ps[0]]  # 96 x 64 = 6144 >= 4096: 8-bit
    assert st["exp_avg"].dtype == torch.uint8 and st["exp_avg_sq"].dtype == torch.uint8
    assert st["exp_avg_absmax"].dtype == torch.float32
    assert st["exp_avg_absmax"].shape == (_q8.nblocks(6144),)
    assert opt.state[ps[1]]["exp_avg"].dtype == torch.float32  # small: float32
    assert float(st["step"]) == 1
    # the NumPy optimizer, fed the same gradients, gives the same bits
    grads = [p.grad.numpy().copy() for p in ps]
    nopt = fastadam.AdamW(ref, lr=1e-2, state_dtype="8bit", backend="numpy")
    nopt.step(grads)
    for a, p in zip(ref, ps):
        np.testing.assert_array_equal(a, p.detach().numpy())
    np.testing.assert_array_equal(nopt.state[0]["exp_avg"], st["exp_avg"].numpy())


def test_checkpoint_resumes_bit_exactly():
    model = _net()
    opt = fat.Adam(model.parameters(), lr=1e-2, state_dtype="8bit")
    _train(model, opt, 0, 3)
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buf)
    _train(model, opt, 3, 6)
    buf.seek(0)
    ck = torch.load(buf, weights_only=True)
    model2 = _net(1)
    model2.load_state_dict(ck["model"])
    opt2 = fat.Adam(model2.parameters(), lr=1e-2, state_dtype="8bit")
    opt2.load_state_dict(ck["opt"])
    p0 = next(iter(model2.parameters()))
    assert opt2.state[p0]["exp_avg"].dtype == torch.uint8
    _train(model2, opt2, 3, 6)
    for a, b in zip(model.parameters(), model2.parameters()):
        assert torch.equal(a, b)


def test_torch_float32_checkpoint_converts_both_ways():
    model = _net()
    ref = torch.optim.Adam(model.parameters(), lr=1e-2)
    _train(model, ref, 0, 3)
    ck = copy.deepcopy(ref.state_dict())
    opt = fat.Adam(model.parameters(), lr=1e-2, state_dtype="8bit")
    opt.load_state_dict(ck)
    p0 = next(iter(model.parameters()))
    st = opt.state[p0]
    assert st["exp_avg"].dtype == torch.uint8
    m = _q8.dequantize(st["exp_avg"].numpy(), st["exp_avg_absmax"].numpy(), signed=True)
    m32 = ck["state"][0]["exp_avg"].numpy()
    a = np.repeat(st["exp_avg_absmax"].numpy(), _q8.BLOCK)[: m.size].reshape(m.shape)
    assert np.all(np.abs(m - m32) <= np.maximum(np.abs(m32) * (1 / 16 + 1e-6), a * 2.0**-15.6))
    _train(model, opt, 3, 4)
    back = torch.optim.Adam(model.parameters(), lr=1e-2)
    back.load_state_dict(copy.deepcopy(opt.state_dict()))  # codes as float: plain torch can't
    f32 = fat.Adam(model.parameters(), lr=1e-2)
    f32.load_state_dict(copy.deepcopy(opt.state_dict()))
    assert f32.state[p0]["exp_avg"].dtype == torch.float32
    _train(model, f32, 4, 5)


# -- the cached group plan (a steady step rebinds the gradients only) -------------------------


def _uncached_twin(model, backend="auto", **kw):
    """An optimizer over a copy of ``model`` that rebuilds its plan at every step."""
    twin = copy.deepcopy(model)
    opt = fat.AdamW(twin.parameters(), lr=1e-2, state_dtype="8bit", backend=backend, **kw)
    step = opt.step

    def fresh_step(closure=None):
        opt._q8_plans.clear()
        return step(closure)

    opt.step = fresh_step
    return twin, opt


def _same_params(a, b):
    for x, y in zip(a.parameters(), b.parameters()):
        assert torch.equal(x, y)


def test_plan_is_reused_and_steps_as_a_fresh_one(backend):
    model = _net()
    opt = fat.AdamW(model.parameters(), lr=1e-2, state_dtype="8bit", backend=backend)
    twin, topt = _uncached_twin(model, backend)
    _train(model, opt, 0, 1)
    plan = opt._q8_plans[0]
    _train(model, opt, 1, 5)  # zero_grad(set_to_none=True): new gradient tensors each step
    assert opt._q8_plans[0] is plan
    _train(twin, topt, 0, 5)
    _same_params(model, twin)
    for p, q in zip(model.parameters(), twin.parameters()):
        for k, t in opt.state[p].items():
            assert torch.equal(t, topt.state[q][k]), k
    assert all(float(st["step"]) == 5 for st in opt.state.values())


def test_plan_rebuilt_when_a_tensor_or_the_state_changes():
    model = _net()
    opt = fat.AdamW(model.parameters(), lr=1e-2, state_dtype="8bit")
    twin, topt = _uncached_twin(model)
    _train(model, opt, 0, 2)
    _train(twin, topt, 0, 2)
    plan = opt._q8_plans[0]
    ps, qs = list(model.parameters()), list(twin.parameters())
    for x in (ps[0], qs[0]):  # the parameter's storage replaced
        x.data = x.data.clone()
    _train(model, opt, 2, 3)
    _train(twin, topt, 2, 3)
    assert opt._q8_plans[0] is not plan
    _same_params(model, twin)
    plan = opt._q8_plans[0]
    opt.load_state_dict(copy.deepcopy(opt.state_dict()))  # new state tensors
    _train(model, opt, 3, 4)
    _train(twin, topt, 3, 4)
    assert opt._q8_plans[0] is not plan
    _same_params(model, twin)
    # one scale tensor replaced: the step must write the new one, not the old
    plan = opt._q8_plans[0]
    st = opt.state[ps[0]]
    old = st["exp_avg_absmax"]
    st["exp_avg_absmax"] = old.clone()
    topt.state[qs[0]]["exp_avg_absmax"] = topt.state[qs[0]]["exp_avg_absmax"].clone()
    before = old.clone()
    _train(model, opt, 4, 5)
    _train(twin, topt, 4, 5)
    assert opt._q8_plans[0] is not plan
    assert torch.equal(old, before) and not torch.equal(st["exp_avg_absmax"], before)
    _same_params(model, twin)
    # a parameter without a gradient drops out of the step, and its state stays
    plan = opt._q8_plans[0]
    before = {k: t.clone() for k, t in opt.state[ps[2]].items()}
    for t in range(5, 7):
        for m, o in ((model, opt), (twin, topt)):
            g = torch.Generator().manual_seed(t)
            x, y = torch.randn(32, 64, generator=g), torch.randint(0, 10, (32,), generator=g)
            o.zero_grad()
            nn.functional.cross_entropy(m(x), y).backward()
            list(m.parameters())[2].grad = None
            o.step()
    assert opt._q8_plans[0] is not plan
    _same_params(model, twin)
    for k, t in opt.state[ps[2]].items():
        assert torch.equal(t, before[k]), k


def test_bad_grad_on_a_later_step_changes_nothing():
    model = _net()
    opt = fat.AdamW(model.parameters(), lr=1e-2, state_dtype="8bit")
    _train(model, opt, 0, 2)
    plan = opt._q8_plans[0]
    ps = list(model.parameters())
    for p in ps:
        p.grad = torch.randn_like(p)
    params = [p.detach().clone() for p in ps]
    states = [{k: t.clone() for k, t in opt.state[p].items()} for p in ps]
    ps[0].grad = torch.randn(ps[0].shape[1], ps[0].shape[0]).t()  # right shape, not contiguous
    with pytest.raises(ValueError, match=r"grad of param_groups\[0\]\['params'\]\[0\]"):
        opt.step()
    for p, before, st in zip(ps, params, states):
        assert torch.equal(p, before)
        for k, t in opt.state[p].items():
            assert torch.equal(t, st[k]), k
    ps[0].grad = ps[0].grad.contiguous()  # mended: the step goes on from where it was
    opt.step()
    assert all(float(opt.state[p]["step"]) == 3 for p in ps)
    assert opt._q8_plans[0] is plan  # the refused step left the plan as it was


def test_amsgrad_refused():
    with pytest.raises(ValueError, match="amsgrad"):
        fat.Adam(_net().parameters(), amsgrad=True, state_dtype="8bit")


# -- a small GPT-2-shaped language model ----------------------------------------------------

GPT_CONFIG = {"vocab": 48, "ctx": 32, "d_model": 64, "heads": 4, "layers": 2}


class _Block(nn.Module):
    def __init__(self, d, heads):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.attn = nn.MultiheadAttention(d, heads, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))

    def forward(self, x, mask):
        h = self.ln1(x)
        x = x + self.attn(h, h, h, attn_mask=mask, need_weights=False)[0]
        return x + self.mlp(self.ln2(x))


class _GPT(nn.Module):
    def __init__(self, vocab, ctx, d_model, heads, layers):
        super().__init__()
        self.tok, self.pos = nn.Embedding(vocab, d_model), nn.Embedding(ctx, d_model)
        self.blocks = nn.ModuleList(_Block(d_model, heads) for _ in range(layers))
        self.ln = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, vocab, bias=False)
        mask = torch.triu(torch.full((ctx, ctx), float("-inf")), diagonal=1)
        self.register_buffer("mask", mask)

    def forward(self, idx):
        t = idx.shape[1]
        x = self.tok(idx) + self.pos(torch.arange(t))
        for b in self.blocks:
            x = b(x, self.mask[:t, :t])
        return self.head(self.ln(x))


def _batch(step, vocab, ctx, batch=16):
    """Synthetic sequences: a random key of 4 tokens, repeated (an induction
    task: every token after the first period is the one 4 places back)."""
    g = torch.Generator().manual_seed(10_000 + step)
    key = torch.randint(0, vocab, (batch, 4), generator=g)
    seq = key.repeat(1, ctx // 4 + 1)[:, : ctx + 1]
    return seq[:, :-1], seq[:, 1:]


def _train_gpt(state_dtype, steps=300):
    torch.manual_seed(0)
    cfg = GPT_CONFIG
    model = _GPT(**cfg)
    opt = fat.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01, state_dtype=state_dtype)
    losses = []
    for t in range(steps):
        x, y = _batch(t, cfg["vocab"], cfg["ctx"])
        loss = nn.functional.cross_entropy(model(x).reshape(-1, cfg["vocab"]), y.reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return model, opt, float(np.mean(losses[-20:])), losses


def test_gpt_lm_trains_as_well_as_float32_states():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        _, opt8, loss8, curve8 = _train_gpt("8bit")
        _, _, loss32, curve32 = _train_gpt(None)
    finally:
        torch.set_num_threads(threads)
    n8 = sum(1 for st in opt8.state.values() if st["exp_avg"].dtype == torch.uint8)
    assert n8 >= 6  # the attention and MLP matrices (and the embeddings) are 8-bit
    assert curve8[0] > math.log(GPT_CONFIG["vocab"]) * 0.9  # it starts at chance
    assert loss32 < curve32[0] * 0.5  # the task is learnt
    assert abs(loss8 - loss32) <= 0.03 * loss32, (loss8, loss32)
