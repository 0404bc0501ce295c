"""fastadam.torch.Adam/AdamW as drop-ins for torch.optim.Adam/AdamW.

Parity is checked step by step on a small conv net trained in lockstep with
torch's own optimizer from the same weights and data; then the torch
machinery around an optimizer (state_dict both ways, LR schedulers,
GradScaler, closures, ZeroRedundancyOptimizer), the errors (and that an
error changes nothing), and that fastadam imports without torch.
"""

from __future__ import annotations

import copy
import importlib.util
import io
import os
import pickle
import re
import subprocess
import sys
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest

torch = pytest.importorskip("torch")
nn = torch.nn

from torch_net import Net  # noqa: E402

import fastadam  # noqa: E402
import fastadam.torch as ft  # noqa: E402

#: float32 / float64 tolerances after many lockstep steps: the kernels agree
#: with torch to a few ULP per step (torch's lerp uses an FMA, ours may not).
TOL = {torch.float32: dict(rtol=1e-5, atol=1e-6), torch.float64: dict(rtol=1e-12, atol=1e-12)}
DTYPES = (torch.float32, torch.float64)
N_STEPS = 100
BATCH = 16


@pytest.fixture(autouse=True)
def _one_torch_thread():
    # The nets here are tiny: torch's intra-op thread pool only adds wake-up
    # latency, which on a busy machine (2 shared cores) makes a step take 100x
    # longer. fastadam's own threads are not affected.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def make_data(dtype: torch.dtype, n_steps: int = N_STEPS, seed: int = 0):
    """Fixed batches: images (n_steps, BATCH, 1, 8, 8) and labels (n_steps, BATCH)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n_steps, BATCH, 1, 8, 8, generator=g, dtype=dtype)
    y = torch.randint(0, 5, (n_steps, BATCH), generator=g)
    return x, y


def make_twins(dtype: torch.dtype, seed: int = 0) -> tuple[Net, Net]:
    torch.manual_seed(seed)
    net = Net().to(dtype)
    return net, copy.deepcopy(net)


def backward(net: nn.Module, x: torch.Tensor, y: torch.Tensor, sign: float = 1.0) -> torch.Tensor:
    loss = sign * nn.functional.cross_entropy(net(x), y)
    loss.backward()
    return loss


def max_err(a: nn.Module, b: nn.Module) -> tuple[float, float]:
    """Largest absolute and relative (to max(|b|, 1e-3)) parameter differences."""
    abs_e = rel_e = 0.0
    for p, q in zip(a.parameters(), b.parameters()):
        d = (p - q).abs()
        abs_e = max(abs_e, d.max().item())
        rel_e = max(rel_e, (d / q.abs().clamp_min(1e-3)).max().item())
    return abs_e, rel_e


def assert_params_close(a: nn.Module, b: nn.Module, dtype: torch.dtype, where: str) -> None:
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(p, q, **TOL[dtype], msg=lambda m, n=name: f"{where}, {n}: {m}")


def assert_state_close(ours, theirs, dtype: torch.dtype) -> None:
    for p_ours, p_theirs in zip(
        (p for g in ours.param_groups for p in g["params"]),
        (p for g in theirs.param_groups for p in g["params"]),
    ):
        s, t = ours.state[p_ours], theirs.state[p_theirs]
        assert s.keys() == t.keys()
        assert s["step"].dtype == t["step"].dtype and s["step"].shape == t["step"].shape
        assert s["step"].item() == t["step"].item()
        for key in s.keys() - {"step"}:
            torch.testing.assert_close(s[key], t[key], **TOL[dtype])


# -- parity on a real network ----------------------------------------------------

#: (name, fastadam class, torch class, kwargs, loss sign)
CONFIGS = [
    ("adam", ft.Adam, torch.optim.Adam, dict(lr=1e-2), 1.0),
    ("adam-l2-amsgrad", ft.Adam, torch.optim.Adam,
     dict(lr=1e-2, weight_decay=0.1, amsgrad=True), 1.0),
    ("adam-decoupled", ft.Adam, torch.optim.Adam,
     dict(lr=1e-2, weight_decay=0.1, decoupled_weight_decay=True), 1.0),
    ("adamw", ft.AdamW, torch.optim.AdamW, dict(lr=1e-2, betas=(0.8, 0.99)), 1.0),
    ("adamw-amsgrad-maximize", ft.AdamW, torch.optim.AdamW,
     dict(lr=5e-3, weight_decay=0.05, amsgrad=True, maximize=True, eps=1e-6), -1.0),
]  # fmt: skip


@pytest.mark.parametrize("grads", ["own", "shared"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(
    "name, ours_cls, torch_cls, kwargs, sign", CONFIGS, ids=[c[0] for c in CONFIGS]
)
def test_parity_on_network(backend, dtype, name, ours_cls, torch_cls, kwargs, sign, grads):
    """100 steps in lockstep with torch, compared after every step.

    ``own``: each model computes its own gradients (the drop-in training loop).
    ``shared``: ours gets a copy of torch's gradients, so the parameters differ
    only by what the two optimizers did with identical inputs.
    """
    net, twin = make_twins(dtype)
    x, y = make_data(dtype)
    ours = ours_cls(net.parameters(), backend=backend, **kwargs)
    ref = torch_cls(twin.parameters(), **kwargs)
    start = copy.deepcopy(twin.state_dict())
    for i in range(N_STEPS):
        ref.zero_grad()
        backward(twin, x[i], y[i], sign)
        ours.zero_grad()
        if grads == "own":
            backward(net, x[i], y[i], sign)
        else:
            for p, q in zip(net.parameters(), twin.parameters()):
                p.grad = q.grad.clone()
        ref.step()
        ours.step()
        assert_params_close(net, twin, dtype, f"{name} step {i + 1}")
    assert_state_close(ours, ref, dtype)
    # The run went somewhere: the parameters moved far beyond the tolerance.
    moved = max((p - start[k]).abs().max().item() for k, p in twin.state_dict().items())
    assert moved > 0.1


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_parity_param_groups_and_scheduler(backend, dtype):
    """Groups with their own lr/weight decay, and OneCycleLR changing lr *and* betas."""
    net, twin = make_twins(dtype)
    x, y = make_data(dtype)

    def groups(m):
        return [
            {"params": [m.conv1.weight, m.conv2.weight], "lr": 2e-2},
            {"params": [m.conv1.bias, m.conv2.bias, *m.norm.parameters()], "weight_decay": 0.0},
            {"params": [*m.fc1.parameters(), *m.fc2.parameters()], "lr": 5e-3, "amsgrad": True},
        ]

    ours = ft.AdamW(groups(net), lr=1e-2, weight_decay=0.1, backend=backend)
    ref = torch.optim.AdamW(groups(twin), lr=1e-2, weight_decay=0.1)
    scheds = [
        torch.optim.lr_scheduler.OneCycleLR(o, max_lr=[3e-2, 1e-2, 1e-2], total_steps=N_STEPS)
        for o in (ours, ref)
    ]
    betas_seen = set()
    for i in range(N_STEPS):
        for model, opt, sched in zip((net, twin), (ours, ref), scheds):
            opt.zero_grad()
            backward(model, x[i], y[i])
            opt.step()
            sched.step()
        betas_seen.add(ours.param_groups[0]["betas"][0])
        assert [g["lr"] for g in ours.param_groups] == [g["lr"] for g in ref.param_groups]
        assert_params_close(net, twin, dtype, f"step {i + 1}")
    assert_state_close(ours, ref, dtype)
    assert len(betas_seen) > 10  # the scheduler really cycled the momentum


def test_tensor_lr_and_closure(backend):
    dtype = torch.float32
    net, twin = make_twins(dtype)
    x, y = make_data(dtype, n_steps=20)
    ours = ft.Adam(net.parameters(), lr=torch.tensor(1e-2), backend=backend)
    ref = torch.optim.Adam(twin.parameters(), lr=torch.tensor(1e-2))
    for i in range(20):
        losses = []
        for model, opt in ((net, ours), (twin, ref)):

            def closure(model=model, opt=opt, i=i):
                opt.zero_grad()
                return backward(model, x[i], y[i])

            losses.append(opt.step(closure))
        assert losses[0].item() == pytest.approx(losses[1].item(), rel=1e-5)
        assert_params_close(net, twin, dtype, f"step {i + 1}")


def test_eps_hat_matches_numpy_optimizer(backend):
    """eps_hat has no torch counterpart: compare with fastadam.Adam on the same gradients."""
    torch.manual_seed(0)
    params = [nn.Parameter(torch.randn(7, 5)), nn.Parameter(torch.randn(3))]
    arrays = [p.detach().numpy().copy() for p in params]
    ours = ft.Adam(params, lr=1e-2, eps_hat=True, backend=backend)
    ref = fastadam.Adam(arrays, lr=1e-2, eps_hat=True, backend=backend)
    for _ in range(5):
        grads = [torch.randn_like(p) for p in params]
        for p, g in zip(params, grads):
            p.grad = g
        ours.step()
        ref.step([g.numpy().copy() for g in grads])
    for p, a in zip(params, arrays):
        np.testing.assert_array_equal(p.detach().numpy(), a)


def test_params_without_grad_are_skipped():
    net, _ = make_twins(torch.float32)
    opt = ft.Adam(net.parameters(), lr=1e-2)
    frozen = net.fc2.weight.detach().clone()
    net.fc2.weight.requires_grad_(False)
    x, y = make_data(torch.float32, n_steps=1)
    backward(net, x[0], y[0])
    opt.step()
    assert torch.equal(net.fc2.weight, frozen)
    assert net.fc2.weight not in opt.state
    assert opt.state[net.fc1.weight]["step"].item() == 1.0


def test_step_invalidates_saved_tensors():
    """Updates go through NumPy, so step() must bump autograd's version counters."""
    p = nn.Parameter(torch.randn(4))
    p.grad = torch.ones(4)
    opt = ft.Adam([p], lr=0.1)
    y = (p**2).sum()  # saves p for backward
    opt.step()
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.backward()


# -- state_dict interchange with torch ---------------------------------------------


def _train(net, opt, x, y, steps):
    for i in steps:
        opt.zero_grad()
        backward(net, x[i], y[i])
        opt.step()


def _roundtrip(sd):
    """A real checkpoint: torch.save, then torch.load (weights_only, the default)."""
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


@pytest.mark.parametrize("amsgrad", [False, True], ids=["plain", "amsgrad"])
@pytest.mark.parametrize("direction", ["ours-to-torch", "torch-to-ours"])
def test_state_dict_interchange(backend, direction, amsgrad):
    dtype = torch.float32
    net, twin = make_twins(dtype)
    x, y = make_data(dtype, n_steps=30)
    kw = dict(lr=1e-2, weight_decay=0.01, amsgrad=amsgrad)
    first_cls, second_cls = (
        (lambda ps: ft.Adam(ps, backend=backend, **kw), lambda ps: torch.optim.Adam(ps, **kw))
        if direction == "ours-to-torch"
        else (lambda ps: torch.optim.Adam(ps, **kw), lambda ps: ft.Adam(ps, backend=backend, **kw))
    )
    # Both models follow the same trajectory for 15 steps under the first optimizer ...
    first, first_twin = first_cls(net.parameters()), first_cls(twin.parameters())
    _train(net, first, x, y, range(15))
    _train(twin, first_twin, x, y, range(15))
    sd = first.state_dict()
    assert all(
        s["step"].dtype == torch.float32 and s["step"].item() == 15 for s in sd["state"].values()
    )
    # ... then one goes on with the other optimizer, loaded from the first's checkpoint.
    second = second_cls(net.parameters())
    second.load_state_dict(_roundtrip(sd))
    assert second.state_dict()["state"][0]["step"].item() == 15
    _train(net, second, x, y, range(15, 30))
    _train(twin, first_twin, x, y, range(15, 30))
    assert_params_close(net, twin, dtype, "after the switch")
    assert_state_close(second, first_twin, dtype)


def test_adamw_loading_adam_checkpoint_keeps_decoupled_decay():
    p = nn.Parameter(torch.randn(3))
    sd = torch.optim.Adam([p], weight_decay=0.1).state_dict()
    opt = ft.AdamW([p])
    opt.load_state_dict(sd)
    assert opt.param_groups[0]["decoupled_weight_decay"] is True
    assert opt.param_groups[0]["eps_hat"] is False  # our key, absent from torch's groups


def _assert_same_checkpoint(a, b):
    assert a["param_groups"] == b["param_groups"]
    assert a["state"].keys() == b["state"].keys()
    for k in a["state"]:
        assert a["state"][k].keys() == b["state"][k].keys()
        for key, t in a["state"][k].items():
            assert t.dtype == b["state"][k][key].dtype and torch.equal(t, b["state"][k][key])


@pytest.mark.parametrize("which", ["Adam", "AdamW"])
@pytest.mark.parametrize("source", ["ours", "torch"])
def test_checkpoints_round_trip_stably_with_torchs_group_keys(which, source):
    """save -> load -> save gives the same checkpoint, from ours or from torch's, and
    the groups carry exactly torch's keys (plus fastadam's eps_hat) with torch's values."""
    ours, theirs = getattr(ft, which), getattr(torch.optim, which)
    p = nn.Parameter(torch.randn(5))
    kw = dict(lr=1e-2, weight_decay=0.1, amsgrad=True)
    first = (ours if source == "ours" else theirs)([p], **kw)
    p.grad = torch.randn(5)
    first.step()
    saved = _roundtrip(first.state_dict())
    reference = theirs([nn.Parameter(torch.randn(5))], **kw).state_dict()["param_groups"][0]
    ours_fresh = ours([nn.Parameter(torch.randn(5))], **kw).state_dict()["param_groups"][0]
    assert set(ours_fresh) - set(reference) == {"eps_hat"}
    assert {k: ours_fresh[k] for k in reference} == reference
    for i in range(3):  # load into ours, save, load again: nothing drifts
        opt = ours([p], **kw)
        opt.load_state_dict(saved)
        again = _roundtrip(opt.state_dict())
        if source == "ours" or i > 0:  # torch's own checkpoint gains eps_hat once
            _assert_same_checkpoint(again, saved)
        saved = again
    back = theirs([p], **kw)  # and torch takes ours back, unchanged
    back.load_state_dict(saved)
    _assert_same_checkpoint(_roundtrip(back.state_dict()), saved)


def test_isinstance_of_torchs_classes_without_torchs_update():
    p = nn.Parameter(torch.ones(3))
    adam, adamw = ft.Adam([p]), ft.AdamW([p])
    assert isinstance(adam, torch.optim.Adam) and not isinstance(adam, torch.optim.AdamW)
    assert isinstance(adamw, torch.optim.AdamW) and isinstance(adamw, ft.Adam)
    # torch's update path is never taken: step and __init__ are fastadam's own
    for cls in (ft.Adam, ft.AdamW):
        assert cls.step.__qualname__.startswith("Adam.step")
        assert cls.step.__module__ == "fastadam.torch"
    assert ft.AdamW.__init__.__module__ == "fastadam.torch"


def test_pickle_keeps_backend_and_state():
    p = nn.Parameter(torch.randn(3))
    p.grad = torch.ones(3)
    opt = ft.Adam([p], lr=0.1, backend="numpy")
    opt.step()
    clone = pickle.loads(pickle.dumps(opt))
    assert clone.backend == "numpy"
    assert clone.state_dict()["state"][0]["step"].item() == 1.0
    torch.testing.assert_close(
        clone.state_dict()["state"][0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"]
    )


# -- GradScaler -------------------------------------------------------------------


def _scaled_step(net, opt, scaler, x, y, poison=False):
    opt.zero_grad()
    scaler.scale(nn.functional.cross_entropy(net(x), y)).backward()
    if poison:  # an overflow in one gradient: the step must be skipped
        net.fc1.weight.grad[0, 0] = float("inf")
    scaler.step(opt)
    scaler.update()


@pytest.mark.parametrize("reference", ["fused", "unscale"])
def test_grad_scaler(backend, reference):
    """Against torch's fused Adam (same scaler protocol) and its plain Adam (scaler unscales)."""
    dtype = torch.float32
    net, twin = make_twins(dtype)
    x, y = make_data(dtype, n_steps=20)
    ours = ft.Adam(net.parameters(), lr=1e-2, backend=backend)
    ref = torch.optim.Adam(twin.parameters(), lr=1e-2, fused=(reference == "fused"))
    s_ours = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    s_ref = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    for i in range(20):
        poison = i in (5, 6)
        if poison:
            before = copy.deepcopy(ours.state_dict())
            params_before = [p.detach().clone() for p in net.parameters()]
            scale_before = s_ours.get_scale()
        _scaled_step(net, ours, s_ours, x[i], y[i], poison)
        _scaled_step(twin, ref, s_ref, x[i], y[i], poison)
        if poison:  # skipped: nothing moved, no step counted, the scale backed off
            for p, q in zip(net.parameters(), params_before):
                assert torch.equal(p, q)
            after = ours.state_dict()["state"]
            for k, st in before["state"].items():
                for key, t in st.items():
                    assert torch.equal(after[k][key], t), key
            assert s_ours.get_scale() == scale_before / 2
        else:
            # The unscaled gradient is left in p.grad, as after torch's unscale.
            for p, q in zip(net.parameters(), twin.parameters()):
                torch.testing.assert_close(p.grad, q.grad, **TOL[dtype])
        assert s_ours.get_scale() == s_ref.get_scale()
        assert_params_close(net, twin, dtype, f"step {i + 1}")
    assert ours.state[net.fc1.weight]["step"].item() == 18
    assert_state_close(ours, ref, dtype)


def test_grad_scaler_after_explicit_unscale():
    """scaler.unscale_(opt) (e.g. to clip) then scaler.step(opt): no second unscaling."""
    dtype = torch.float32
    net, twin = make_twins(dtype)
    x, y = make_data(dtype, n_steps=5)
    ours = ft.Adam(net.parameters(), lr=1e-2)
    ref = torch.optim.Adam(twin.parameters(), lr=1e-2)
    scalers = [torch.amp.GradScaler("cpu", init_scale=2.0**10) for _ in range(2)]
    for i in range(5):
        for model, opt, scaler in zip((net, twin), (ours, ref), scalers):
            opt.zero_grad()
            scaler.scale(nn.functional.cross_entropy(model(x[i]), y[i])).backward()
            scaler.unscale_(opt)
            nn.utils.clip_grad_norm_(model.parameters(), 0.5)
            scaler.step(opt)
            scaler.update()
        assert_params_close(net, twin, dtype, f"step {i + 1}")


def test_grad_scale_attributes_directly():
    """The protocol itself: grad_scale divides (and is written back), found_inf skips."""
    p = nn.Parameter(torch.ones(4, dtype=torch.float64))
    opt = ft.Adam([p], lr=0.1)
    p.grad = torch.full((4,), 8.0, dtype=torch.float64)
    opt.grad_scale, opt.found_inf = torch.tensor(4.0), torch.tensor(1.0)
    opt.step()
    assert torch.equal(p, torch.ones(4, dtype=torch.float64)) and not opt.state
    opt.found_inf = torch.tensor(0.0)
    opt.step()
    assert torch.equal(p.grad, torch.full((4,), 2.0, dtype=torch.float64))
    assert opt.state[p]["step"].item() == 1.0
    # m = 0 + (g/scale - 0) * (1 - beta1), with g/scale = 2
    expected = torch.full((4,), (8.0 / 4.0) * (1 - 0.9), dtype=torch.float64)
    assert torch.equal(opt.state[p]["exp_avg"], expected)


# -- errors: clear, and nothing modified --------------------------------------------


def _good_model_and_opt():
    torch.manual_seed(1)
    good = [nn.Parameter(torch.randn(4, 3)), nn.Parameter(torch.randn(5))]
    return good


def _snapshot(opt, params):
    return (
        [p.detach().clone() for p in params],
        [p.grad.clone() for p in params],
        copy.deepcopy(opt.state_dict()),
    )


def _assert_unchanged(opt, params, snap):
    ps, gs, sd = snap
    for p, p0, g0 in zip(params, ps, gs):
        assert torch.equal(p, p0) and torch.equal(p.grad, g0)
    now = opt.state_dict()
    assert now["state"].keys() == sd["state"].keys()
    for k, st in sd["state"].items():
        assert now["state"][k].keys() == st.keys()
        for key, t in st.items():
            assert torch.equal(now["state"][k][key], t)


def _bad_cases():
    """(id, make(bad param) -> None, expected exception, message regex)."""

    def noncontig_param():
        p = nn.Parameter(torch.randn(5, 3).t())  # a transposed view: shape (3, 5), strides (1, 3)
        assert not p.is_contiguous()
        p.grad = torch.randn(3, 5)
        return p

    def noncontig_grad():
        p = nn.Parameter(torch.randn(3, 5))
        p.grad = torch.randn(5, 3).t()
        return p

    def channels_last():
        p = nn.Parameter(torch.randn(2, 3, 4, 4).to(memory_format=torch.channels_last))
        p.grad = torch.randn_like(p)
        return p

    def complex_():
        p = nn.Parameter(torch.randn(3, dtype=torch.complex64))
        p.grad = torch.randn(3, dtype=torch.complex64)
        return p

    def meta():
        p = nn.Parameter(torch.empty(3, device="meta"))
        p.grad = torch.empty(3, device="meta")
        return p

    def sparse():
        emb = nn.Embedding(10, 3, sparse=True)
        emb(torch.tensor([1, 2])).sum().backward()
        return emb.weight

    def grad_is_param():
        p = nn.Parameter(torch.randn(3, 5))
        p.grad = p.data  # the gradient buffer is the parameter itself
        return p

    return [
        ("grad-shares-param-memory", grad_is_param, ValueError, r"grad of .*\[2\] shares memory"),
        ("noncontiguous-param", noncontig_param, ValueError, r"\[2\] is not contiguous"),
        ("noncontiguous-grad", noncontig_grad, ValueError, r"grad of .* is not contiguous"),
        ("channels-last", channels_last, ValueError, "not contiguous.*channels_last"),
        # float16/bfloat16 parameters are supported since issue 17: tests/test_torch_lowp.py
        ("complex", complex_, TypeError, "complex"),
        ("meta-device", meta, ValueError, "device meta.*CPU"),
        ("sparse-grad", sparse, RuntimeError, "sparse"),
    ]


@pytest.mark.parametrize("make_bad, exc, match", [c[1:] for c in _bad_cases()],
                         ids=[c[0] for c in _bad_cases()])  # fmt: skip
def test_bad_param_changes_nothing(make_bad, exc, match):
    good = _good_model_and_opt()
    bad = make_bad()
    opt = ft.Adam([*good, bad], lr=0.1)
    bad_grad = bad.grad
    bad.grad = None  # a first step without the bad one: state exists, steps are at 1
    for p in good:
        p.grad = torch.randn_like(p)
    opt.step()
    bad.grad = bad_grad
    for p in good:
        p.grad = torch.randn_like(p)
    snap = _snapshot(opt, good)
    with pytest.raises(exc, match=match):
        opt.step()
    _assert_unchanged(opt, good, snap)
    assert bad not in opt.state
    # and on a fresh optimizer, the failed first step leaves no state at all
    fresh = ft.Adam([*good, bad], lr=0.1)
    with pytest.raises(exc, match=match):
        fresh.step()
    assert len(fresh.state) == 0


def test_bad_state_changes_nothing():
    good = _good_model_and_opt()
    for p in good:
        p.grad = torch.randn_like(p)
    opt = ft.Adam(good, lr=0.1)
    opt.step()
    opt.state[good[1]]["exp_avg_sq"] = torch.zeros(6)  # e.g. a checkpoint of another model
    snap = _snapshot(opt, good)
    with pytest.raises(ValueError, match=r"state\['exp_avg_sq'\] of .*\[1\] has shape \(6,\)"):
        opt.step()
    _assert_unchanged(opt, good, snap)


def test_bad_group_hyperparameter_changes_nothing():
    good = _good_model_and_opt()
    opt = ft.Adam([{"params": good[:1]}, {"params": good[1:]}], lr=0.1)
    for p in good:
        p.grad = torch.randn_like(p)
    opt.param_groups[1]["lr"] = -1.0
    snap = _snapshot(opt, good)
    with pytest.raises(ValueError, match=r"param_groups\[1\].*Invalid learning rate: -1"):
        opt.step()
    _assert_unchanged(opt, good, snap)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(lr=-1.0), r"learning rate: -1.0 \(lr must be finite and >= 0\)"),
        (dict(lr=float("nan")), "learning rate: nan"),
        (dict(eps=-1e-8), "epsilon value: -1e-08"),
        (dict(betas=(1.0, 0.999)), r"index 0: 1.0 \(betas\[0\] must be in \[0, 1\)\)"),
        (dict(betas=(0.9, -0.1)), r"index 1: -0.1 \(betas\[1\]"),
        (dict(weight_decay=-0.1), "weight_decay value: -0.1"),
        (dict(lr=torch.tensor([1e-3, 1e-3])), "Tensor lr must be 1-element"),
        (dict(backend="nope"), "backend must be"),
        (dict(capturable=True), "capturable"),
        (dict(differentiable=True), "differentiable"),
    ],
)
@pytest.mark.parametrize("cls", [ft.Adam, ft.AdamW], ids=["Adam", "AdamW"])
def test_constructor_checks(cls, kwargs, match):
    with pytest.raises(ValueError, match=match):
        cls([nn.Parameter(torch.zeros(2))], **kwargs)


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(lr=-1),
        dict(lr=-0.5),
        dict(lr=float("nan")),
        dict(eps=-1e-8),
        dict(betas=(1.0, 0.999)),
        dict(betas=(0.9, -0.1)),
        dict(betas=(-0.5, 0.999)),
        dict(weight_decay=-1),
        dict(weight_decay=-0.01),
        dict(lr=-1, eps=-1, weight_decay=-1),  # several bad: the first in torch's order
    ],
    ids=str,
)
@pytest.mark.parametrize(
    "ours, theirs",
    [(ft.Adam, torch.optim.Adam), (ft.AdamW, torch.optim.AdamW), (fastadam.Adam, torch.optim.Adam)],
    ids=["torch.Adam", "torch.AdamW", "numpy.Adam"],
)
def test_bad_hyperparameters_start_with_torchs_own_message(ours, theirs, kwargs):
    """Code matching torch's messages (its own test suite does) keeps working: each
    message starts with torch's exact text, detail after it."""
    with pytest.raises(ValueError) as torch_error:
        theirs([nn.Parameter(torch.zeros(2))], **kwargs)
    params = [np.zeros(2, np.float32)] if ours is fastadam.Adam else [nn.Parameter(torch.zeros(2))]
    with pytest.raises(ValueError) as our_error:
        ours(params, **kwargs)
    assert str(our_error.value).startswith(str(torch_error.value)), (
        str(our_error.value),
        str(torch_error.value),
    )


_STATE_DTYPE_SPELLINGS = [
    None, "float32", "bfloat16", np.float32, np.dtype(np.float32), ml_dtypes.bfloat16,
    torch.float32, torch.bfloat16,
]  # fmt: skip


@pytest.mark.parametrize("state_dtype", _STATE_DTYPE_SPELLINGS, ids=repr)
def test_both_front_ends_take_the_same_state_dtypes(state_dtype):
    name = None if state_dtype is None else str(state_dtype).replace("torch.", "")
    name = {"<class 'numpy.float32'>": "float32", "<class 'ml_dtypes.bfloat16'>": "bfloat16"}.get(
        name, name
    )
    ours = fastadam.Adam([np.zeros(3, np.float32)], state_dtype=state_dtype)
    theirs = ft.Adam([nn.Parameter(torch.zeros(3))], state_dtype=state_dtype)
    assert (ours.state_dtype is None) == (theirs.state_dtype is None) == (name is None)
    if name is not None:
        assert ours.state_dtype.name == name
        assert theirs.state_dtype == getattr(torch, name)


@pytest.mark.parametrize(
    "state_dtype", ["float16", "bf16", np.float64, torch.float16, torch.float64, 3], ids=repr
)
def test_both_front_ends_refuse_the_same_state_dtypes_alike(state_dtype):
    with pytest.raises(ValueError) as ours:
        fastadam.Adam([np.zeros(3, np.float32)], state_dtype=state_dtype)
    with pytest.raises(ValueError) as theirs:
        ft.Adam([nn.Parameter(torch.zeros(3))], state_dtype=state_dtype)
    assert str(ours.value) == str(theirs.value)
    assert str(ours.value).startswith("state_dtype must be None, 'float32' or 'bfloat16'")


def test_add_param_group_checks_and_works():
    a, b = nn.Parameter(torch.ones(2)), nn.Parameter(torch.ones(3))
    opt = ft.Adam([a], lr=0.1)
    with pytest.raises(ValueError, match="Invalid learning rate: -0.5"):
        opt.add_param_group({"params": [b], "lr": -0.5})
    assert len(opt.param_groups) == 1
    opt.add_param_group({"params": [b], "lr": 0.01})
    a.grad, b.grad = torch.ones(2), torch.ones(3)
    opt.step()
    # step 1 moves every element by lr (m̂ / sqrt(v̂) = 1 for a constant gradient)
    torch.testing.assert_close(a, torch.full((2,), 0.9), rtol=1e-6, atol=0)
    torch.testing.assert_close(b, torch.full((3,), 0.99), rtol=1e-6, atol=0)
    assert opt.param_groups[1]["eps_hat"] is False and opt.param_groups[1]["amsgrad"] is False


@pytest.mark.parametrize("scale", [0.0, -1.0, float("inf"), float("nan")])
def test_bad_grad_scale_from_a_scaler_changes_nothing(scale):
    p = nn.Parameter(torch.ones(3))
    p.grad = torch.full((3,), 2.0)
    opt = ft.Adam([p], lr=0.1)
    opt.grad_scale = torch.tensor(scale)  # as torch.amp.GradScaler.step hands it over
    with pytest.raises(ValueError, match="grad_scale must be"):
        opt.step()
    assert torch.equal(p, torch.ones(3)) and torch.equal(p.grad, torch.full((3,), 2.0))
    assert len(opt.state) == 0


def test_unavailable_backend_fails_at_construction(monkeypatch):
    # The registry as on a machine where the C library failed to load.
    from fastadam import backends

    monkeypatch.delitem(backends._loaded, "c", raising=False)
    monkeypatch.setitem(backends._errors, "c", "no library here")
    for cls in (ft.Adam, fastadam.Adam):
        params = [nn.Parameter(torch.zeros(2))] if cls is ft.Adam else [np.zeros(2, np.float32)]
        with pytest.raises(fastadam.BackendUnavailableError, match="no library here"):
            cls(params, backend="c")


# -- torch stays optional; other torch machinery -------------------------------------


def test_import_without_torch():
    pkg_parent = str(Path(fastadam.__file__).resolve().parent.parent)
    code = (
        "import sys\n"
        "sys.modules['torch'] = None\n"  # makes `import torch` raise ImportError
        "import fastadam\n"
        "assert sys.modules['torch'] is None\n"
        "try:\n"
        "    import fastadam.torch\n"
        "except ImportError as e:\n"
        "    print('IMPORT-ERROR:', e)\n"
        "else:\n"
        "    print('IMPORTED')\n"
    )
    env = dict(
        os.environ, PYTHONPATH=os.pathsep.join([pkg_parent, os.environ.get("PYTHONPATH", "")])
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120
    )
    assert out.returncode == 0, out.stderr
    assert "IMPORT-ERROR:" in out.stdout
    assert "pip install 'fastadam[torch]'" in out.stdout


# torch.distributed.optim scripts its functional optimizers at import time.
@pytest.mark.filterwarnings("ignore:`torch.jit:DeprecationWarning")
def test_zero_redundancy_optimizer(tmp_path):
    """world_size 1 ZeRO builds our optimizer with keyword hyperparameters and steps it."""
    dist = pytest.importorskip("torch.distributed")
    if not dist.is_available():
        pytest.skip("torch.distributed is not available")
    from torch.distributed.optim import ZeroRedundancyOptimizer

    dist.init_process_group(
        "gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1
    )
    try:
        net, twin = make_twins(torch.float32)
        x, y = make_data(torch.float32, n_steps=5)
        zero = ZeroRedundancyOptimizer(
            net.parameters(), optimizer_class=ft.AdamW, lr=1e-2, weight_decay=0.1
        )
        ref = torch.optim.AdamW(twin.parameters(), lr=1e-2, weight_decay=0.1)
        assert isinstance(zero.optim, ft.AdamW)
        for i in range(5):
            _train(net, zero, x, y, [i])
            _train(twin, ref, x, y, [i])
        assert_params_close(net, twin, torch.float32, "ZeRO")
        zero.consolidate_state_dict()
        assert zero.state_dict()["state"][0]["step"].item() == 5
    finally:
        dist.destroy_process_group()


# -- the example -------------------------------------------------------------------


def _load_example():
    path = Path(__file__).resolve().parent.parent / "examples" / "torch_digits.py"
    spec = importlib.util.spec_from_file_location("torch_digits_example", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_digits_example_tracks_torch(capsys, backend):
    pytest.importorskip("sklearn")
    example = _load_example()
    assert example.main(["--epochs", "2", "--backend", backend, "--seed", "1"]) == 0
    out = capsys.readouterr().out
    rows = [
        [float(v) for v in line.split()]
        for line in out.splitlines()
        if re.fullmatch(r"\s*\d+(\s+[-+.\deE]+){5}\s*", line)
    ]
    assert len(rows) == 2
    for _, loss_ours, loss_torch, acc_ours, acc_torch, dparam in rows:
        assert loss_ours == pytest.approx(loss_torch, rel=1e-4)
        assert abs(acc_ours - acc_torch) <= 1 / 360  # at most one test image apart
        assert dparam < 1e-4
    assert rows[1][1] < rows[0][1]  # it learns
    m = re.search(r"^test accuracy: (0\.\d{3})$", out, re.M)
    assert m and float(m.group(1)) > 0.5


def test_seed_and_state_dtype_follow_the_numpy_optimizer():
    """One rule for both front ends: NumPy-int seeds and dtype names are accepted,
    a non-int seed is a TypeError in both."""
    p = [nn.Parameter(torch.randn(3))]
    opt = ft.Adam(p, seed=np.int64(3), state_dtype="bfloat16")
    assert opt.seed == 3 and opt.state_dtype == torch.bfloat16
    for make in (lambda: ft.Adam(p, seed=1.5), lambda: fastadam.Adam([np.ones(3)], seed=1.5)):
        with pytest.raises(TypeError, match="seed"):
            make()


def test_new_gradient_errors_name_the_parameter():
    """A gradient swapped in after the group's plan exists (a later step) is checked,
    and the error names the parameter by its group and position."""
    ps = [nn.Parameter(torch.randn(4)) for _ in range(3)]
    for p in ps:
        p.grad = torch.randn(4)
    opt = ft.Adam([{"params": ps[:1]}, {"params": ps[1:]}], lr=0.1)
    opt.step()
    before = [p.detach().clone() for p in ps]
    ps[2].grad = ps[1].grad  # two parameters sharing one gradient buffer
    with pytest.raises(ValueError, match=r"param_groups\[1\]\['params'\]\[\d\].*share memory"):
        opt.step()
    assert all(torch.equal(p, b) for p, b in zip(ps, before))
