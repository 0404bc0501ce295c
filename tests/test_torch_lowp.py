"""fastadam.torch with bfloat16/float16 parameters and master weights (issue 17).

Protected: parity with ``torch.optim.Adam/AdamW(fused=True)`` on the same
low-precision parameters (every element of the parameters and moments, counted);
master weights equal to a float32 step of the master and a rounded copy;
state_dict round trips that keep the float32 master; stochastic rounding by
seed; bad input refused by name with nothing modified.
"""

from __future__ import annotations

import copy

import ml_dtypes
import pytest

torch = pytest.importorskip("torch")

import fastadam  # noqa: E402
import fastadam.torch as fat  # noqa: E402

LOWP = (torch.bfloat16, torch.float16)
N = 65_536


def _bits(t):
    return t.detach().contiguous().view(torch.int16).numpy().copy()


def _run_pair(dtype, backend, steps=10, adamw=True, **kw):
    torch.manual_seed(0)
    p0 = torch.randn(N).to(dtype)
    pt, pf = p0.clone(), p0.clone()
    cls_t = torch.optim.AdamW if adamw else torch.optim.Adam
    cls_f = fat.AdamW if adamw else fat.Adam
    ot = cls_t([pt], lr=1e-2, fused=True, **kw)
    of = cls_f([pf], lr=1e-2, backend=backend, **kw)
    for _ in range(steps):
        g = (torch.randn(N) * 0.1).to(dtype)
        pt.grad, pf.grad = g.clone(), g.clone()
        ot.step()
        of.step()
    return (pt, ot.state[pt]), (pf, of.state[pf])


CONFIGS = [
    pytest.param({"weight_decay": 0.01}, id="adamw"),
    pytest.param({"weight_decay": 0.01, "adamw": False}, id="adam-l2"),
    pytest.param({"weight_decay": 0.01, "amsgrad": True}, id="amsgrad"),
    pytest.param({"weight_decay": 0.0, "maximize": True}, id="maximize"),
    pytest.param({"weight_decay": 0.1, "betas": (0.3, 0.9)}, id="beta1-small"),
]


@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize("dtype", LOWP, ids=str)
def test_parity_with_torch_fused_every_element(backend, dtype, config):
    """10 steps: the parameters and every state identical, element for element."""
    config = dict(config)
    adamw = config.pop("adamw", True)
    (pt, st), (pf, sf) = _run_pair(dtype, backend, adamw=adamw, **config)
    same = int((_bits(pt) == _bits(pf)).sum())
    assert same == N, f"param: {same:,}/{N:,} identical"
    for key in ("exp_avg", "exp_avg_sq") + (("max_exp_avg_sq",) if config.get("amsgrad") else ()):
        assert sf[key].dtype == dtype
        same = int((_bits(st[key]) == _bits(sf[key])).sum())
        assert same == N, f"{key}: {same:,}/{N:,} identical"
    assert float(sf["step"]) == float(st["step"]) == 10.0


def test_grad_scaler_unscale_parity(backend):
    """GradScaler's grad_scale/found_inf with bf16 params: the unscaled grad
    written back rounded, and the update, as torch's fused step."""
    torch.manual_seed(1)
    p0 = torch.randn(N).to(torch.bfloat16)
    pt, pf = p0.clone(), p0.clone()
    ot = torch.optim.AdamW([pt], lr=1e-2, fused=True)
    of = fat.AdamW([pf], lr=1e-2, backend=backend)
    for _ in range(3):
        g = (torch.randn(N) * 4).to(torch.bfloat16)
        pt.grad, pf.grad = g.clone(), g.clone()
        for o in (ot, of):
            o.grad_scale = torch.tensor(4.0)
            o.found_inf = torch.tensor(0.0)
            o.step()
            del o.grad_scale, o.found_inf
    assert (_bits(pt) == _bits(pf)).all()
    assert (_bits(pt.grad) == _bits(pf.grad)).all()


@pytest.mark.parametrize("dtype", LOWP, ids=str)
def test_master_weights_are_a_float32_step(backend, dtype):
    """The master follows fastadam.torch's float32 step of a float32 copy of the
    parameter, bit for bit; the parameter is the master rounded to nearest."""
    torch.manual_seed(2)
    p32 = torch.randn(1000)
    p = p32.to(dtype)
    ref = p.to(torch.float32)  # the master starts as the parameter's value
    om = fat.AdamW([p], lr=1e-2, master_weights=True, backend=backend)
    o32 = fat.AdamW([ref], lr=1e-2, backend="numpy")
    for _ in range(5):
        g = torch.randn(1000) * 0.1
        p.grad = g.to(dtype)
        ref.grad = g.to(dtype).to(torch.float32)  # what the master step reads
        om.step()
        o32.step()
    st = om.state[p]
    assert st["master_param"].dtype == torch.float32 and st["exp_avg"].dtype == torch.float32
    assert torch.equal(st["master_param"], ref)
    assert torch.equal(st["exp_avg"], o32.state[ref]["exp_avg"])
    assert (_bits(p) == _bits(ref.to(dtype))).all()


def test_master_weights_state_dict_round_trip(backend):
    """save -> load into a new optimizer -> both continue identically; the float32
    master and moments survive torch's cast to the parameter's dtype."""
    torch.manual_seed(3)
    model = torch.nn.Linear(64, 32).to(torch.bfloat16)
    opt = fat.AdamW(model.parameters(), lr=1e-2, master_weights=True, backend=backend)
    x = torch.randn(16, 64).to(torch.bfloat16)
    for _ in range(3):
        opt.zero_grad()
        model(x).float().square().mean().backward()
        opt.step()
    sd = copy.deepcopy(opt.state_dict())  # as saved to disk: state_dict() shares the tensors
    masters = [sd["state"][i]["master_param"].clone() for i in (0, 1)]
    assert all(m.dtype == torch.float32 for m in masters)
    twin = torch.nn.Linear(64, 32).to(torch.bfloat16)
    twin.load_state_dict(model.state_dict())
    opt2 = fat.AdamW(twin.parameters(), lr=1e-2, master_weights=True, backend=backend)
    opt2.load_state_dict(sd)
    for i, p in enumerate(twin.parameters()):
        st = opt2.state[p]
        assert st["master_param"].dtype == torch.float32
        assert torch.equal(st["master_param"], masters[i])
        assert st["exp_avg"].dtype == torch.float32
    for m, o in ((model, opt), (twin, opt2)):
        o.zero_grad()
        m(x).float().square().mean().backward()
        o.step()
    for a, b in zip(model.parameters(), twin.parameters()):
        assert (_bits(a) == _bits(b)).all()
    assert torch.equal(opt.state[model.weight]["master_param"],
                       opt2.state[twin.weight]["master_param"])  # fmt: skip
    assert opt2.state_dict()["state"][0]["master_param"].dtype == torch.float32


def test_state_dict_moves_to_torch_fused_and_back(backend):
    """Without master weights the state is torch's own: a checkpoint of one resumes
    in the other with identical results."""
    torch.manual_seed(4)
    p0 = torch.randn(N).to(torch.bfloat16)
    pa, pb = p0.clone(), p0.clone()
    oa = fat.AdamW([pa], lr=1e-2, backend=backend)
    ob = torch.optim.AdamW([pb], lr=1e-2, fused=True)
    g = (torch.randn(N) * 0.1).to(torch.bfloat16)
    pa.grad, pb.grad = g.clone(), g.clone()
    oa.step()
    ob.step()
    oa2 = fat.AdamW([pb], lr=1e-2, backend=backend)
    oa2.load_state_dict(ob.state_dict())
    ob2 = torch.optim.AdamW([pa], lr=1e-2, fused=True)
    ob2.load_state_dict(oa.state_dict())
    ob2.param_groups[0]["fused"] = True  # our groups carry fused=None, as given to us
    g = (torch.randn(N) * 0.1).to(torch.bfloat16)
    pa.grad, pb.grad = g.clone(), g.clone()
    oa2.step()
    ob2.step()
    assert (_bits(pa) == _bits(pb)).all()


def test_stochastic_param_rounding_by_seed(backend):
    outs = []
    for seed in (5, 5, 6):
        torch.manual_seed(0)
        p = torch.randn(4096).to(torch.bfloat16)
        o = fat.AdamW([p], lr=1e-3, master_weights=True, param_rounding="stochastic",
                      seed=seed, backend=backend)  # fmt: skip
        p.grad = (torch.randn(4096) * 0.1).to(torch.bfloat16)
        o.step()
        outs.append(_bits(p))
    assert (outs[0] == outs[1]).all()
    assert (outs[0] != outs[2]).any()


def test_mixed_group_float32_and_bf16(backend):
    """A group with float32 and bfloat16 parameters: each as its own kind."""
    torch.manual_seed(6)
    a32, b16 = torch.randn(100), torch.randn(100).to(torch.bfloat16)
    ref32 = a32.clone()
    o = fat.AdamW([a32, b16], lr=1e-2, backend=backend)
    r = fat.AdamW([ref32], lr=1e-2, backend="numpy")
    for _ in range(2):
        g = torch.randn(100)
        a32.grad, ref32.grad, b16.grad = g.clone(), g.clone(), g.to(torch.bfloat16)
        o.step()
        r.step()
    assert torch.equal(a32, ref32)
    assert o.state[b16]["exp_avg"].dtype == torch.bfloat16


def _snapshot(o, params):
    return [p.detach().clone() for p in params], {
        k: (v.clone() if torch.is_tensor(v) else v)
        for p in params
        for k, v in o.state.get(p, {}).items()
    }


def _bad_state(o, p):
    o.state[p] = {"step": torch.tensor(1.0), "exp_avg": torch.zeros(8, dtype=torch.bfloat16),
                  "exp_avg_sq": torch.zeros(8), "master_param": torch.zeros(8)}  # fmt: skip


def _bad_master(o, p):
    o.state[p] = {"step": torch.tensor(1.0), "exp_avg": torch.zeros(8),
                  "exp_avg_sq": torch.zeros(8), "master_param": torch.zeros(9)}  # fmt: skip


@pytest.mark.parametrize(
    ("make", "exc", "match"),
    [
        pytest.param(
            lambda o, p: setattr(p, "grad", torch.zeros(16, dtype=torch.bfloat16)[::2]),
            ValueError, "not contiguous", id="strided-grad",
        ),
        pytest.param(
            _bad_state, TypeError,
            r"state\['exp_avg'\] of param_groups\[0\]\['params'\]\[1\] has dtype bfloat16",
            id="master-bf16-moment",
        ),
        pytest.param(
            _bad_master, ValueError,
            r"state\['master_param'\] of param_groups\[0\]\['params'\]\[1\] has shape",
            id="master-shape",
        ),
    ],
)  # fmt: skip
def test_bad_input_changes_nothing(make, exc, match):
    p = torch.randn(8).to(torch.bfloat16)
    q = torch.randn(8).to(torch.bfloat16)
    o = fat.AdamW([q, p], lr=1e-2, master_weights=True)
    q.grad = torch.ones(8, dtype=torch.bfloat16)
    p.grad = torch.ones(8, dtype=torch.bfloat16)
    make(o, p)
    before, state = _snapshot(o, [q, p])
    with pytest.raises(exc, match=match):
        o.step()
    assert all(torch.equal(a, b) for a, b in zip(before, [q, p]))
    assert q not in o.state  # its new state was pending: not attached
    after = _snapshot(o, [q, p])[1]
    assert after.keys() == state.keys()
    assert all(torch.equal(after[k], state[k]) for k in state)


def _np(t):
    """A NumPy view of a bfloat16/float16/float32 tensor (bfloat16 through its bits)."""
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return t.numpy()


@pytest.mark.parametrize(
    ("pdt", "sdt"),
    [(torch.bfloat16, torch.float32), (torch.bfloat16, torch.bfloat16),
     (torch.float16, torch.bfloat16)],
    ids=str,
)  # fmt: skip
def test_state_dtype_for_lowp_params(backend, pdt, sdt):
    """bf16/fp16 params with state_dtype float32 or bfloat16 (stochastic, the optimizer's
    default state_rounding): adam_step's update on the NumPy views, moments of that
    dtype, and a state_dict round trip that keeps them and resumes bit for bit."""
    torch.manual_seed(2)
    n = 4097
    p = torch.randn(n).to(pdt)
    ref = p.clone()
    m, v = torch.zeros(n, dtype=sdt), torch.zeros(n, dtype=sdt)
    o = fat.AdamW([p], lr=1e-2, state_dtype=sdt, backend=backend)
    for t in (1, 2):
        g = (torch.randn(n) * 0.1).to(pdt)
        p.grad = g.clone()
        o.step()
        fastadam.adam_step(_np(ref), _np(g), _np(m), _np(v), step=t, lr=1e-2, weight_decay=1e-2,
                           decoupled_weight_decay=True, seed=0, state_rounding="stochastic",
                           backend="numpy")  # fmt: skip
    st = o.state[p]
    assert st["exp_avg"].dtype == st["exp_avg_sq"].dtype == sdt
    assert torch.equal(p, ref)
    assert torch.equal(st["exp_avg"], m) and torch.equal(st["exp_avg_sq"], v)
    q = p.clone()
    twin = fat.AdamW([q], lr=1e-2, state_dtype=sdt, backend=backend)
    twin.load_state_dict(copy.deepcopy(o.state_dict()))
    for key in ("exp_avg", "exp_avg_sq"):
        assert twin.state[q][key].dtype == sdt and torch.equal(twin.state[q][key], st[key])
    g = (torch.randn(n) * 0.1).to(pdt)
    p.grad, q.grad = g.clone(), g.clone()
    o.step()
    twin.step()
    assert (_bits(p) == _bits(q)).all()
    for key in ("exp_avg", "exp_avg_sq"):
        assert torch.equal(twin.state[q][key], o.state[p][key])


def test_bad_param_rounding_named():
    with pytest.raises(ValueError, match="param_rounding"):
        fat.AdamW([torch.randn(2)], param_rounding="up")
    # float16 is rounded stochastically too (the master rounded into p)
    p = torch.randn(8).to(torch.float16)
    o = fat.AdamW([p], master_weights=True, param_rounding="stochastic")
    p.grad = torch.ones(8, dtype=torch.float16)
    before = p.clone()
    o.step()
    assert not torch.equal(p, before) and o.state[p]["master_param"].dtype == torch.float32


def test_subclass_and_numpy_api_untouched():
    assert issubclass(fat.AdamW, torch.optim.AdamW)
    assert fastadam.adam_step.__kwdefaults__["param_copy"] is None


def test_torch_digits_bf16_master_weights_reach_float32_accuracy():
    """Issue 17's accuracy figure: the torch digits example with bfloat16 weights and
    float32 master weights trains as the float32 model does (>= 0.97, within 0.01);
    pure bfloat16 weights, nearest and stochastic, side by side, reach 0.97 too."""
    pytest.importorskip("sklearn")
    from helpers import torch_digits_accuracy

    f32 = torch_digits_accuracy("--state-dtype", "float32")
    master = torch_digits_accuracy("--param-dtype", "bfloat16", "--master-weights")
    assert master >= 0.97 and abs(master - f32) <= 0.01, (master, f32)
    for rounding in ("nearest", "stochastic"):
        acc = torch_digits_accuracy("--param-dtype", "bfloat16", "--param-rounding", rounding)
        assert acc >= 0.97, (rounding, acc)
