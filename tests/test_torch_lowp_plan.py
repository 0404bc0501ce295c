"""fastadam.torch's plan for groups with bfloat16/float16 parameters (fastadam._torch_lowp).

Protected: a group's plan is built at its first step and kept while nothing it
depends on changes (new gradient tensors every step included), with results
bit-identical to an optimizer that rebuilds it at every step and to
``torch.optim.AdamW(fused=True)``, learning-rate changes taking effect; it is
rebuilt when a parameter's data is replaced, its state replaced
(``load_state_dict``, assignment), a gradient goes to None or comes back, a
gradient changes dtype, or an optimizer setting changes; bad gradients on a
later step are refused with the first step's error and nothing modified.
"""

from __future__ import annotations

import copy

import pytest

torch = pytest.importorskip("torch")

import fastadam.torch as fat  # noqa: E402
from fastadam._torch_lowp import LowpPlan  # noqa: E402

BF16 = torch.bfloat16
SHAPES = [(64, 33), (33,), (5, 7, 3), (1000,)]


def _bits(t):
    t = t.detach().contiguous()
    return t.view(torch.int16).numpy().copy() if t.element_size() == 2 else t.numpy().copy()


def _params(dtypes=None, seed=0):
    torch.manual_seed(seed)
    dtypes = dtypes or [BF16] * len(SHAPES)
    return [torch.randn(s).to(d) for s, d in zip(SHAPES, dtypes)]


def _grads(params, k):
    """New gradient tensors for step ``k`` (as zero_grad(set_to_none=True) + backward give)."""
    gen = torch.Generator().manual_seed(100 + k)
    return [(torch.randn(p.shape, generator=gen) * 0.1).to(p.dtype) for p in params]


def _set_grads(params, grads):
    for p, g in zip(params, grads):
        p.grad = None if g is None else g.clone()


def _assert_same_state(oa, pa, ob, pb):
    for a, b in zip(pa, pb):
        assert (_bits(a) == _bits(b)).all()
        sa, sb = oa.state[a], ob.state[b]
        assert sa.keys() == sb.keys()
        for key in sa:
            assert sa[key].dtype == sb[key].dtype, key
            assert (_bits(sa[key]) == _bits(sb[key])).all(), key


def test_plan_is_kept_across_steps_and_matches_torch_fused(backend):
    """New grad tensors and a new lr at every step: one plan for all steps, and every
    element of the parameters and moments as torch's fused AdamW has them."""
    pf, pt = _params(), _params()
    of = fat.AdamW(pf, lr=1e-2, weight_decay=0.1, backend=backend)
    ot = torch.optim.AdamW(pt, lr=1e-2, weight_decay=0.1, fused=True)
    plan = None
    for k in range(5):
        grads = _grads(pf, k)
        _set_grads(pf, grads)
        _set_grads(pt, grads)
        of.step()
        ot.step()
        if plan is None:
            plan = of._plans[0]
            assert isinstance(plan, LowpPlan)
        assert of._plans[0] is plan
        for o in (of, ot):  # a schedule: the new lr must take effect at the next step
            o.param_groups[0]["lr"] *= 0.7
    for a, b in zip(pf, pt):
        assert (_bits(a) == _bits(b)).all()
        for key in ("exp_avg", "exp_avg_sq"):
            assert (_bits(of.state[a][key]) == _bits(ot.state[b][key])).all()
        assert float(of.state[a]["step"]) == float(ot.state[b]["step"]) == 5.0


@pytest.mark.parametrize(
    "options",
    [
        pytest.param({}, id="bf16"),
        pytest.param({"amsgrad": True, "weight_decay": 0.01}, id="amsgrad"),
        pytest.param({"master_weights": True, "param_rounding": "stochastic"}, id="master-sr"),
        pytest.param(
            {"state_dtype": torch.bfloat16, "state_rounding": "stochastic"}, id="bf16-states-sr"
        ),  # fmt: skip
    ],
)
def test_kept_plan_equals_a_plan_rebuilt_every_step(backend, options):
    """A mixed group (bfloat16, float16 and float32 parameters), one parameter
    joining at step 2 (unequal step counts), stochastic rounding keyed by step:
    the kept plan's steps are bit-identical to those of plans rebuilt each step."""
    dtypes = [BF16, torch.float16, torch.float32, BF16]
    pa, pb = _params(dtypes), _params(dtypes)
    oa = fat.AdamW(pa, lr=1e-2, backend=backend, seed=7, **options)
    ob = fat.AdamW(pb, lr=1e-2, backend=backend, seed=7, **options)
    plans = set()
    for k in range(5):
        grads = _grads(pa, k)
        if k == 0:
            grads[1] = None  # the float16 parameter joins at the second step
        _set_grads(pa, grads)
        _set_grads(pb, grads)
        oa.step()
        ob._plans.clear()
        ob.step()
        plans.add(id(oa._plans[0]))
    assert len(plans) == 2  # built at step 1, rebuilt once at step 2 (a new grad)
    _assert_same_state(oa, pa, ob, pb)
    assert float(oa.state[pa[1]]["step"]) == 4.0 and float(oa.state[pa[0]]["step"]) == 5.0


def _step_all(o, params, k):
    _set_grads(params, _grads(params, k))
    o.step()


def test_rebuilt_when_param_data_is_replaced():
    """``p.data = new tensor``: the next step updates the new tensor, as torch's does."""
    pf, pt = _params(), _params()
    of = fat.AdamW(pf, lr=1e-2)
    ot = torch.optim.AdamW(pt, lr=1e-2, fused=True)
    for k in range(2):
        _step_all(of, pf, k)
        _step_all(ot, pt, k)
    plan = of._plans[0]
    for ps in (pf, pt):
        ps[0].data = ps[0].data.clone()  # same values, new storage
    _step_all(of, pf, 2)
    _step_all(ot, pt, 2)
    assert of._plans[0] is not plan
    for a, b in zip(pf, pt):
        assert (_bits(a) == _bits(b)).all()


def test_rebuilt_after_load_state_dict_and_state_assignment():
    """State replaced from outside (load_state_dict; ``state[p] = ...``): the next
    step updates the new state tensors, bit for bit as an optimizer that loaded it."""
    pa = _params()
    oa = fat.AdamW(pa, lr=1e-2, master_weights=True)
    for k in range(2):
        _step_all(oa, pa, k)
    sd = copy.deepcopy(oa.state_dict())
    pb = [p.clone() for p in pa]
    ob = fat.AdamW(pb, lr=1e-2, master_weights=True)
    ob.load_state_dict(sd)
    oa.load_state_dict(copy.deepcopy(sd))
    assert not oa._plans
    _step_all(oa, pa, 2)
    _step_all(ob, pb, 2)
    _assert_same_state(oa, pa, ob, pb)
    plan = oa._plans[0]
    new_state = copy.deepcopy(oa.state[pa[1]])
    oa.state[pa[1]] = new_state
    ob.state[pb[1]] = copy.deepcopy(ob.state[pb[1]])
    _step_all(oa, pa, 3)
    _step_all(ob, pb, 3)
    assert oa._plans[0] is not plan
    assert oa.state[pa[1]] is new_state and float(new_state["step"]) == 4.0
    _assert_same_state(oa, pa, ob, pb)


def test_rebuilt_when_a_grad_goes_to_none_and_back():
    pa = _params()
    oa = fat.AdamW(pa, lr=1e-2)
    ot_params = _params()
    ot = torch.optim.AdamW(ot_params, lr=1e-2, fused=True)
    for k in range(4):
        grads = _grads(pa, k)
        if k in (1, 2):
            grads[2] = None  # no gradient for two steps: not updated, not counted
        before = pa[2].clone()
        _set_grads(pa, grads)
        _set_grads(ot_params, grads)
        oa.step()
        ot.step()
        if k in (1, 2):
            assert torch.equal(pa[2], before)
    assert float(oa.state[pa[2]]["step"]) == 2.0 and float(oa.state[pa[0]]["step"]) == 4.0
    for a, b in zip(pa, ot_params):
        assert (_bits(a) == _bits(b)).all()


def test_rebuilt_when_settings_change():
    """master_weights turned on (over float32 moments, which master weights keep),
    amsgrad turned on: the next step uses them; a bad setting is refused."""
    pa = _params()
    oa = fat.AdamW(pa, lr=1e-2, state_dtype=torch.float32)
    _step_all(oa, pa, 0)
    oa.master_weights = True
    _step_all(oa, pa, 1)
    assert all(oa.state[p]["master_param"].dtype == torch.float32 for p in pa)
    oa.param_groups[0]["amsgrad"] = True
    _step_all(oa, pa, 2)
    assert all("max_exp_avg_sq" in oa.state[p] for p in pa)
    oa.param_rounding = "up"
    with pytest.raises(ValueError, match="param_rounding"):
        _step_all(oa, pa, 3)


def test_master_grad_changing_dtype_changes_kind():
    """With master weights a float32 gradient is allowed too: the plan follows it."""
    pa = [torch.randn(100).to(BF16)]
    ref = [pa[0].float()]
    oa = fat.AdamW(pa, lr=1e-2, master_weights=True)
    o32 = fat.AdamW(ref, lr=1e-2, backend="numpy")
    for k in range(3):
        g = torch.randn(100) * 0.1
        pa[0].grad = g.to(BF16)
        if k == 2:
            pa[0].grad.data = g  # a float32 gradient (p.grad.data gets around torch's check)
        ref[0].grad = g if k == 2 else g.to(BF16).float()
        oa.step()
        o32.step()
    assert torch.equal(oa.state[pa[0]]["master_param"], ref[0])


def _strided(o, p):
    p.grad = torch.ones(16, dtype=p.dtype)[::2]


def _float32_grad(o, p):
    p.grad = torch.ones(8, dtype=p.dtype)
    p.grad.data = torch.ones(8)


def _wrong_shape(o, p):
    p.grad = torch.ones(8, dtype=p.dtype)
    p.grad.data = torch.ones(9, dtype=p.dtype)


def _sparse(o, p):
    p.grad = torch.ones(8, dtype=p.dtype).to_sparse()


def _alias(o, p):
    p.grad = p.detach()


def _steps_nan(o, p):
    o.state[p]["step"].fill_(float("nan"))  # through the view the plan reads


@pytest.mark.parametrize(
    ("make", "exc"),
    [
        pytest.param(_strided, ValueError, id="strided"),
        pytest.param(_float32_grad, TypeError, id="float32-grad"),
        pytest.param(_wrong_shape, ValueError, id="shape"),
        pytest.param(_sparse, RuntimeError, id="sparse"),
        pytest.param(_alias, ValueError, id="grad-is-param"),
        pytest.param(_steps_nan, ValueError, id="step-nan"),
    ],
)
def test_bad_input_on_a_later_step_changes_nothing(make, exc):
    """Step 3 with a bad gradient (or count) of the second parameter: the error of a
    fresh optimizer's first step with the same input, naming it, nothing written."""
    q = torch.randn(8).to(BF16)
    p = torch.randn(8).to(BF16)
    o = fat.AdamW([q, p], lr=1e-2)
    for _ in range(2):
        q.grad = torch.ones(8, dtype=BF16)
        p.grad = torch.ones(8, dtype=BF16)
        o.step()
    q.grad = torch.ones(8, dtype=BF16)
    make(o, p)
    params_before = [q.clone(), p.clone()]
    state_before = copy.deepcopy(o.state_dict()["state"])
    with pytest.raises(exc) as later:
        o.step()
    assert "param_groups[0]['params'][1]" in str(later.value)
    assert torch.equal(q, params_before[0]) and torch.equal(p, params_before[1])
    state_after = o.state_dict()["state"]
    for i in (0, 1):
        for key, t in state_before[i].items():
            assert torch.equal(state_after[i][key], t) or (t.isnan() & state_after[i][key].isnan())
    if make is _steps_nan:
        return
    # the first step of a fresh optimizer says the same
    q2, p2 = q.clone(), p.clone()
    o2 = fat.AdamW([q2, p2], lr=1e-2)
    q2.grad = torch.ones(8, dtype=BF16)
    make(o2, p2)
    with pytest.raises(exc) as first:
        o2.step()
    assert str(first.value) == str(later.value)
