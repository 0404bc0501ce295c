"""fastadam.Adam / AdamW: torch's constructor checks, groups, stepping, checkpoints."""

from __future__ import annotations

import pickle

import numpy as np
import pytest

import fastadam

torch = pytest.importorskip("torch")


def _params(seed=0, dtype=np.float32):
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(s).astype(dtype) for s in ((4, 3), (3,), (), (2, 2, 5))]


def _grads(params, step):
    rng = np.random.default_rng(1000 + step)
    return [rng.standard_normal(p.shape).astype(p.dtype) for p in params]


# --- constructor checks --------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, exc, word",
    [
        ({"lr": -1.0}, ValueError, "lr"),
        ({"lr": float("nan")}, ValueError, "lr"),
        ({"eps": -1e-8}, ValueError, "eps"),
        ({"weight_decay": -0.1}, ValueError, "weight_decay"),
        ({"betas": (1.0, 0.999)}, ValueError, "betas[0]"),
        ({"betas": (0.9, -0.1)}, ValueError, "betas[1]"),
        ({"betas": (0.9,)}, TypeError, "betas"),
        ({"betas": ("a", 0.9)}, TypeError, "betas[0]"),
        ({"lr": "fast"}, TypeError, "lr"),
        ({"backend": "gpu"}, ValueError, "backend"),
    ],
)
def test_constructor_rejects(kwargs, exc, word):
    with pytest.raises(exc, match=None) as info:
        fastadam.Adam(_params(), **kwargs)
    assert word in str(info.value)


def test_constructor_rejects_bad_params():
    p = _params()
    with pytest.raises(TypeError, match="iterable of arrays"):
        fastadam.Adam(p[0])
    with pytest.raises(ValueError, match="empty parameter list"):
        fastadam.Adam([])
    with pytest.raises(ValueError, match="more than one parameter group"):
        fastadam.Adam([{"params": [p[0]]}, {"params": [p[0], p[1]]}])
    with pytest.raises(ValueError, match="same array twice"):
        fastadam.Adam([p[0], p[0]])
    with pytest.raises(TypeError, match="numpy arrays"):
        fastadam.Adam([p[0], [1.0, 2.0]])
    with pytest.raises(TypeError, match="float32 or float64"):
        fastadam.Adam([np.zeros(3, np.int64)])
    with pytest.raises(ValueError, match="C-contiguous"):
        fastadam.Adam([np.zeros((4, 4), np.float32).T])


def test_adamw_defaults():
    opt = fastadam.AdamW(_params())
    g = opt.param_groups[0]
    assert g["weight_decay"] == 1e-2 and g["decoupled_weight_decay"] is True
    assert g["lr"] == 1e-3 and g["betas"] == (0.9, 0.999) and g["eps"] == 1e-8


# --- stepping against torch ----------------------------------------------------


def _torch_twin(params, cls, groups_kw, **kw):
    tparams = [torch.tensor(p.copy(), requires_grad=True) for p in params]
    groups = [{"params": tparams[:2], **groups_kw}, {"params": tparams[2:]}]
    return tparams, cls(groups, foreach=False, **kw)


@pytest.mark.parametrize("which", ["Adam", "AdamW"])
def test_groups_and_lr_schedule_follow_torch(backend, which):
    params = _params()
    kw = {"weight_decay": 0.05, "amsgrad": True}
    ours = getattr(fastadam, which)(
        [{"params": params[:2], "lr": 3e-2}, {"params": params[2:]}], lr=1e-2, backend=backend, **kw
    )
    tparams, theirs = _torch_twin(params, getattr(torch.optim, which), {"lr": 3e-2}, lr=1e-2, **kw)
    sched = torch.optim.lr_scheduler.StepLR(theirs, step_size=20, gamma=0.5)
    for step in range(1, 101):
        grads = _grads(params, step)
        for tp, g in zip(tparams, grads):
            tp.grad = torch.from_numpy(g.copy())
        theirs.step()
        sched.step()
        ours.step(grads)
        for g_ours, g_theirs in zip(ours.param_groups, theirs.param_groups):
            g_ours["lr"] = g_theirs["lr"]  # the same schedule, applied to ours by hand
    for p, tp in zip(params, tparams):
        np.testing.assert_allclose(p, tp.detach().numpy(), rtol=1e-5, atol=1e-6)
    assert ours.state[0]["step"] == 100


def test_none_grad_skips_that_param():
    params = _params()
    before = [p.copy() for p in params]
    opt = fastadam.Adam(params, lr=0.1)
    grads = _grads(params, 1)
    grads[1] = None
    opt.step(grads)
    assert np.array_equal(params[1], before[1]) and 1 not in opt.state
    assert not np.array_equal(params[0], before[0])


def test_step_rejects_misaligned_grads_and_changes_nothing():
    params = _params()
    opt = fastadam.Adam(params, lr=0.1)
    opt.step(_grads(params, 1))
    snap = [p.copy() for p in params]
    with pytest.raises(ValueError, match="3 grads for 4 params"):
        opt.step(_grads(params, 2)[:3])
    bad = _grads(params, 2)
    bad[3] = bad[3].astype(np.float64)
    with pytest.raises(TypeError, match=r"grads\[3\]"):
        opt.step(bad)
    assert all(np.array_equal(a, b) for a, b in zip(params, snap))
    assert opt.state[0]["step"] == 1


def test_bad_group_value_changes_no_group():
    """A scheduler bug in group 1 (a NaN lr) must not let group 0 step first."""
    params = _params()
    opt = fastadam.Adam([{"params": params[:2]}, {"params": params[2:]}], lr=0.1)
    opt.step(_grads(params, 1))
    snap = [p.copy() for p in params]
    opt.param_groups[1]["lr"] = float("nan")
    with pytest.raises(ValueError, match=r"param_groups\[1\].*learning rate"):
        opt.step(_grads(params, 2))
    assert all(np.array_equal(a, b) for a, b in zip(params, snap))
    assert [opt.state[i]["step"] for i in range(4)] == [1, 1, 1, 1]


def test_torch_tensors_point_to_fastadam_torch():
    params = [torch.zeros(3, requires_grad=True)]
    with pytest.raises(TypeError, match="fastadam.torch"):
        fastadam.Adam(params)


def test_found_inf_skips_without_advancing_step():
    params = _params()
    opt = fastadam.Adam(params, lr=0.1)
    opt.step(_grads(params, 1))
    snap = [p.copy() for p in params]
    opt.step(_grads(params, 2), found_inf=True)
    assert all(np.array_equal(a, b) for a, b in zip(params, snap))
    assert opt.state[0]["step"] == 1


# --- checkpoints --------------------------------------------------------------


def _train(opt, params, steps, start=1):
    for step in range(start, start + steps):
        opt.step(_grads(params, step))


@pytest.mark.parametrize("via", ["pickle", "savez", "live"])
def test_resume_is_bit_identical(backend, via, tmp_path):
    kw = {"lr": 1e-2, "amsgrad": True, "weight_decay": 0.01, "backend": backend}
    straight = _params()
    _train(fastadam.AdamW(straight, **kw), straight, 40)

    first = _params()
    opt = fastadam.AdamW(first, **kw)
    _train(opt, first, 15)
    sd = opt.state_dict()
    if via == "pickle":
        sd = pickle.loads(pickle.dumps(sd))
    elif via == "savez":
        flat = {f"{i}.{k}": np.asarray(v) for i, st in sd["state"].items() for k, v in st.items()}
        np.savez(tmp_path / "ckpt.npz", **flat)
        with np.load(tmp_path / "ckpt.npz") as z:
            state = {}
            for key in z.files:
                i, k = key.split(".", 1)
                state.setdefault(int(i), {})[k] = z[key]
        sd = {"state": state, "param_groups": sd["param_groups"]}
    resumed_params = [p.copy() for p in first]
    resumed = fastadam.AdamW(resumed_params, **kw)
    resumed.load_state_dict(sd)
    if via == "live":
        _train(opt, first, 1, start=16)  # the loaded state must not alias the original
        first_again = resumed_params
    else:
        first_again = resumed_params
    _train(resumed, first_again, 25, start=16)
    for a, b in zip(first_again, straight):
        assert np.array_equal(a, b)


def test_state_dict_layout_is_torchs():
    params = _params()
    opt = fastadam.Adam([{"params": params[:1]}, {"params": params[1:], "lr": 0.5}], amsgrad=True)
    opt.step(_grads(params, 1))
    sd = opt.state_dict()
    assert sorted(sd) == ["param_groups", "state"]
    assert [g["params"] for g in sd["param_groups"]] == [[0], [1, 2, 3]]
    assert sd["param_groups"][1]["lr"] == 0.5
    assert set(sd["state"][2]) == {"step", "exp_avg", "exp_avg_sq", "max_exp_avg_sq"}
    assert sd["state"][2]["step"] == 1


@pytest.mark.parametrize(
    "breaker, word",
    [
        (lambda sd: sd["param_groups"].append({"params": []}), "parameter groups"),
        (lambda sd: sd["param_groups"][0]["params"].pop(), "params"),
        (lambda sd: sd["state"][1].update(exp_avg=np.zeros(7, np.float32)), "shape"),
        (
            lambda sd: sd["state"][0].update(
                exp_avg_sq=sd["state"][0]["exp_avg_sq"].astype(np.float64)
            ),
            "dtype",
        ),
        (lambda sd: sd["state"][0].pop("exp_avg"), "exp_avg"),
        (lambda sd: sd["state"][0].update(step=-1), "step"),
    ],
)
def test_mismatched_checkpoint_is_refused_before_anything_changes(breaker, word):
    params = _params()
    opt = fastadam.Adam(params, lr=0.1)
    opt.step(_grads(params, 1))
    sd = pickle.loads(pickle.dumps(opt.state_dict()))
    breaker(sd)
    target = _params(seed=5)
    victim = fastadam.Adam(target, lr=0.7)
    victim.step(_grads(target, 1))
    before = pickle.dumps(victim.state_dict()), [g["lr"] for g in victim.param_groups]
    with pytest.raises(ValueError) as info:
        victim.load_state_dict(sd)
    assert word in str(info.value)
    assert (pickle.dumps(victim.state_dict()), [g["lr"] for g in victim.param_groups]) == before


def test_gradient_errors_name_the_position_across_groups():
    """A group's plan names arrays as the optimizer's arguments are numbered: the
    gradient of the 4th parameter is grads[3], also when it is the 2nd of its group,
    both when the plan is built and when a later step brings new gradients."""
    params = _params()
    opt = fastadam.Adam([{"params": params[:2]}, {"params": params[2:]}], lr=0.1)
    bad = _grads(params, 1)
    bad[3] = bad[3].astype(np.float64)
    with pytest.raises(TypeError, match=r"grads\[3\] has dtype float64 but params\[3\]"):
        opt.step(bad)
    assert opt.state == {}  # a failed first step attaches no state
    opt.step(_grads(params, 1))
    bad = _grads(params, 2)
    bad[3] = params[3]  # the parameter itself as its gradient
    with pytest.raises(ValueError, match=r"params\[3\] and grads\[3\] share memory"):
        opt.step(bad)
