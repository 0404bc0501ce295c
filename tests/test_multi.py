"""The multi-tensor step: ``adam_step_multi`` and ``MultiTensorPlan``.

What it protects: a list of tensors stepped in one backend call gives exactly
the bits of ``adam_step`` called on each tensor (every backend, option, dtype
kind, size pattern and per-tensor step); bad input anywhere in the list is
refused naming its index, with nothing modified; the plan re-checks what can
change between steps; the optimizers make one kernel call per group and kind.
"""

from __future__ import annotations

import itertools
import os

import ml_dtypes
import numpy as np
import pytest
from helpers import OPTION_COMBOS, assert_bit_identical, combo_id, run_python

import fastadam
from fastadam import config

BF16 = np.dtype(ml_dtypes.bfloat16)
#: dtype kind -> (param dtype, state dtype)
KINDS = {
    "float32": (np.float32, np.float32),
    "float64": (np.float64, np.float64),
    "bfloat16": (np.float32, BF16),
}
ROLES = ("params", "grads", "exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs")

#: Size patterns of a tensor list (elements per tensor).
SIZES = {
    "one": [37],
    "uneven-with-empty": [0, 1, 31, 32, 33, 0, 1000, 7, 4099],
    "hundreds-tiny": [int(x) for x in np.random.default_rng(5).integers(0, 40, 300)],
    # over both parallel thresholds in total (config's C_ and Numba's PARALLEL_MIN_ELEMENTS),
    # with tensors split between threads
    "past-parallel": [3, config.PARALLEL_MIN_ELEMENTS + 77, 5000, 1, 40_000],
}


def make_tensors(sizes, kind="float32", seed=0, shapes=None):
    """Per tensor (param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq), mid-training values."""
    pdt, sdt = KINDS[kind]
    rng = np.random.default_rng(seed)
    out = []
    for i, n in enumerate(sizes):
        shape = (n,) if shapes is None else shapes[i]
        p = rng.standard_normal(shape)
        g = rng.standard_normal(shape)
        m = rng.standard_normal(shape) * 0.1
        v = rng.random(shape) * 0.01
        vmax = v + rng.random(shape) * 0.01 * (rng.random(shape) < 0.5)
        out.append(
            (
                np.array(p, pdt),
                np.array(g, pdt),
                np.array(m, sdt),
                np.array(v, sdt),
                np.array(vmax, sdt),
            )
        )
    return out


def copy_tensors(tensors):
    return [tuple(a.copy() for a in t) for t in tensors]


def columns(tensors, amsgrad=True):
    cols = [list(c) for c in zip(*tensors)] if tensors else [[] for _ in range(5)]
    return cols[:4] + [cols[4] if amsgrad else None]


def per_tensor(tensors, *, step, seeds, backend, **kw):
    """The definition: adam_step on each tensor."""
    for i, (p, g, m, v, vmax) in enumerate(tensors):
        s = step[i] if isinstance(step, list) else step
        fastadam.adam_step(
            p, g, m, v, step=s, max_exp_avg_sq=vmax if kw.get("amsgrad") else None,
            seed=seeds[i], backend=backend, **kw,
        )  # fmt: skip


def multi(tensors, *, step, seeds, backend, **kw):
    p, g, m, v, vmax = columns(tensors, kw.get("amsgrad", False))
    fastadam.adam_step_multi(
        p, g, m, v, step=step, max_exp_avg_sqs=vmax, seeds=seeds, backend=backend, **kw
    )


def assert_tensors_identical(got, want):
    assert len(got) == len(want)
    for i, (a, b) in enumerate(zip(got, want)):
        try:
            assert_bit_identical(a, b)
        except AssertionError as exc:
            raise AssertionError(f"tensor {i}: {exc}") from None


# -- bit-identity with per-tensor calls ----------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("combo", OPTION_COMBOS, ids=combo_id)
def test_every_option_matches_per_tensor_calls(backend, kind, combo):
    """Every option combination, every kind, past both parallel thresholds."""
    sizes = SIZES["past-parallel"]
    want = make_tensors(sizes, kind, seed=1)
    got = copy_tensors(want)
    seeds = [11 * i + 3 for i in range(len(sizes))]
    for step in range(1, 4):
        extra = {"grad_scale": 4.0} if step == 2 else {}
        extra["eps_hat"] = step == 3
        if kind == "bfloat16":
            extra["state_rounding"] = "nearest" if step == 3 else "stochastic"
        per_tensor(want, step=step, seeds=seeds, backend="numpy", lr=1e-2, **combo, **extra)
        multi(got, step=step, seeds=seeds, backend=backend, lr=1e-2, **combo, **extra)
    assert_tensors_identical(got, want)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("pattern", SIZES)
def test_size_patterns_and_differing_steps(backend, kind, pattern):
    sizes = SIZES[pattern]
    want = make_tensors(sizes, kind, seed=2)
    got = copy_tensors(want)
    rng = np.random.default_rng(3)
    steps = [int(s) for s in rng.integers(1, 5, len(sizes))]
    seeds = [int(s) for s in rng.integers(0, 2**63, len(sizes))]
    kw = dict(lr=3e-3, weight_decay=0.01, decoupled_weight_decay=True, amsgrad=True)
    per_tensor(want, step=steps, seeds=seeds, backend="numpy", **kw)
    multi(got, step=steps, seeds=seeds, backend=backend, **kw)
    assert_tensors_identical(got, want)


def test_threads_do_not_change_bits(fast_backend):
    sizes = SIZES["past-parallel"] + SIZES["hundreds-tiny"]
    results = []
    before = fastadam.get_num_threads()
    try:
        for threads in (1, 2):
            fastadam.set_num_threads(threads)
            tensors = make_tensors(sizes, "bfloat16", seed=4)
            multi(tensors, step=5, seeds=list(range(len(sizes))), backend=fast_backend, lr=1e-2)
            results.append(tensors)
    finally:
        fastadam.set_num_threads(before)
    assert_tensors_identical(results[0], results[1])


def test_mixed_kinds_and_shapes_in_one_call(backend):
    shapes = [(3, 4), (), (2, 0, 5), (7,), (2, 3, 4)]
    tensors = []
    for i, kind in enumerate(["float32", "float64", "bfloat16", "float64", "float32"]):
        tensors += make_tensors([0], kind, seed=10 + i, shapes=[shapes[i]])
    want = copy_tensors(tensors)
    per_tensor(want, step=7, seeds=[5, 6, 7, 8, 9], backend="numpy", lr=1e-2, maximize=True)
    multi(tensors, step=7, seeds=5, backend=backend, lr=1e-2, maximize=True)  # 5 + i
    assert_tensors_identical(tensors, want)


def test_default_seeds_are_the_positions(backend):
    want = make_tensors([100, 50], "bfloat16", seed=6)
    got = copy_tensors(want)
    per_tensor(want, step=2, seeds=[0, 1], backend="numpy", lr=1e-2)
    multi(got, step=2, seeds=None, backend=backend, lr=1e-2)
    assert_tensors_identical(got, want)


def test_empty_list_is_a_no_op(backend):
    fastadam.adam_step_multi([], [], [], [], step=1, lr=1e-3, backend=backend)


def test_plan_steps_repeatedly_like_per_tensor_calls(backend):
    sizes = SIZES["uneven-with-empty"]
    want = make_tensors(sizes, "float32", seed=7)
    got = copy_tensors(want)
    plan = fastadam.MultiTensorPlan(*columns(got, amsgrad=True), backend=backend)
    for t in range(1, 6):
        for tensors in (want, got):
            for i, row in enumerate(tensors):
                row[1][...] = np.random.default_rng(100 * t + i).standard_normal(row[1].shape)
        per_tensor(want, step=t, seeds=list(range(len(sizes))), backend="numpy", lr=1e-2,
                   amsgrad=t % 2 == 0)  # fmt: skip
        plan.step(step=t, lr=1e-2, amsgrad=t % 2 == 0)
    assert_tensors_identical(got, want)


# -- bad input -----------------------------------------------------------------------


def _break(tensors, role, i, how):
    """Replace array ``role`` of tensor ``i`` by a bad one; return the expected error."""
    a = tensors[i][role]
    row = list(tensors[i])
    if how == "dtype":
        row[role] = a.astype(np.float64)
        err = TypeError
    elif how == "shape":
        row[role] = np.zeros(a.size + 1, a.dtype)
        err = ValueError
    elif how == "read-only":
        a.flags.writeable = False
        err = ValueError
    elif how == "non-contiguous":
        row[role] = np.zeros(a.size * 2, a.dtype)[::2]
        err = ValueError
    elif how == "overlap":  # the same memory as another tensor's array
        other = tensors[(i + 1) % len(tensors)][role]
        row[role] = other
        err = ValueError
    tensors[i] = tuple(row)
    return err


@pytest.mark.parametrize("how", ["dtype", "shape", "read-only", "non-contiguous", "overlap"])
@pytest.mark.parametrize("role", range(5), ids=ROLES)
def test_bad_array_at_any_index_changes_nothing(how, role):
    sizes = [8, 8, 8, 8]
    for i in range(len(sizes)):
        tensors = make_tensors(sizes, "float32", seed=i)
        if how == "dtype" and role == 0:
            role_ = 1  # a float64 param is valid on its own; its grad then mismatches
        else:
            role_ = role
        err = _break(tensors, role_, i, how)
        snapshot = copy_tensors(tensors)
        with pytest.raises(err, match=rf"{ROLES[role_]}\[{i}\]|\[{(i + 1) % 4}\]"):
            multi(tensors, step=1, seeds=None, backend="auto", lr=1e-2, amsgrad=True)
        assert_tensors_identical(tensors, snapshot)


def test_list_lengths_and_kinds_are_checked():
    t = make_tensors([4, 4])
    p, g, m, v, vmax = columns(t)
    with pytest.raises(ValueError, match="grads has 1 entries but params has 2"):
        fastadam.adam_step_multi(p, g[:1], m, v, step=1, lr=1e-3)
    with pytest.raises(TypeError, match="params must be a sequence"):
        fastadam.adam_step_multi(p[0], g, m, v, step=1, lr=1e-3)
    with pytest.raises(ValueError, match="step has 3 entries"):
        fastadam.adam_step_multi(p, g, m, v, step=[1, 2, 3], lr=1e-3)
    with pytest.raises(ValueError, match=r"step\[1\] must be >= 1"):
        fastadam.adam_step_multi(p, g, m, v, step=[1, 0], lr=1e-3)
    with pytest.raises(ValueError, match=r"seeds\[0\] must be in \[0, 2\*\*64\)"):
        fastadam.adam_step_multi(p, g, m, v, step=1, lr=1e-3, seeds=[-1, 0])
    with pytest.raises(ValueError, match="amsgrad=True needs max_exp_avg_sqs"):
        fastadam.adam_step_multi(p, g, m, v, step=1, lr=1e-3, amsgrad=True)
    with pytest.raises(ValueError, match="lr must be >= 0"):
        fastadam.adam_step_multi(p, g, m, v, step=1, lr=-1.0)
    with pytest.raises(ValueError, match="state_rounding"):
        fastadam.adam_step_multi(p, g, m, v, step=1, lr=1e-3, state_rounding="bogus")
    with pytest.raises(ValueError, match="backend"):
        fastadam.adam_step_multi(p, g, m, v, step=1, lr=1e-3, backend="gpu")


def test_plan_rechecks_writeable_and_new_grads():
    tensors = make_tensors([10, 20, 30])
    p, g, m, v, _ = columns(tensors)
    plan = fastadam.MultiTensorPlan(p, g, m, v)
    snapshot = copy_tensors(tensors)
    m[2].flags.writeable = False
    with pytest.raises(ValueError, match=r"exp_avgs\[2\] must be writeable"):
        plan.step(step=1, lr=1e-2)
    assert_tensors_identical(tensors, snapshot)
    m[2].flags.writeable = True
    # new gradients: checked (dtype, overlap with any array of the plan)
    with pytest.raises(TypeError, match=r"grads\[1\] has dtype float64"):
        plan.step(step=1, lr=1e-2, grads=[g[0], g[1].astype(np.float64), g[2]])
    with pytest.raises(ValueError, match=r"params\[2\] and grads\[1\] share memory"):
        plan.step(step=1, lr=1e-2, grads=[g[0], p[2][5:25], g[2]])
    assert_tensors_identical(tensors, snapshot)
    # a good new gradient list is used from then on
    new = [a * 2 for a in g]
    want = copy_tensors(tensors)
    for row, gn in zip(want, new):
        row[1][...] = gn
    per_tensor(want, step=1, seeds=[0, 1, 2], backend="numpy", lr=1e-2)
    plan.step(step=1, lr=1e-2, grads=new)
    for row, gn in zip(tensors, new):
        row[1][...] = gn  # the test's copy of the grads, to compare everything else
    assert_tensors_identical(tensors, want)


def test_found_inf_checks_then_changes_nothing():
    tensors = make_tensors([10, 20])
    snapshot = copy_tensors(tensors)
    multi(tensors, step=1, seeds=None, backend="auto", lr=1e-2, found_inf=True)
    assert_tensors_identical(tensors, snapshot)
    with pytest.raises(ValueError, match="lr"):
        multi(tensors, step=1, seeds=None, backend="auto", lr=float("nan"), found_inf=True)


# -- one kernel call per group ---------------------------------------------------------


def _count_calls(monkeypatch, backend):
    from fastadam import backends

    mod = backends.get(backend)
    calls = []
    real = mod.step_multi

    def counting(table, *args):
        calls.append(table.count)
        return real(table, *args)

    monkeypatch.setattr(mod, "step_multi", counting)
    return calls


def test_numpy_optimizer_makes_one_call_per_group_and_kind(monkeypatch, fast_backend):
    calls = _count_calls(monkeypatch, fast_backend)
    rng = np.random.default_rng(0)
    g0 = [rng.standard_normal(s).astype(np.float32) for s in ((30, 20), (20,), (5,))]
    g1 = [rng.standard_normal(s) for s in ((7, 7), (7,))]  # float64
    opt = fastadam.AdamW([{"params": g0}, {"params": g1, "lr": 1e-2}], backend=fast_backend)
    for _ in range(3):
        opt.step([np.ones_like(a) for a in g0 + g1])
    assert calls == [3, 2] * 3
    # a parameter without a gradient is left out of its group's call
    calls.clear()
    opt.step([np.ones_like(a) for a in g0[:2]] + [None] + [np.ones_like(a) for a in g1])
    assert calls == [2, 2]
    assert opt.state[2]["step"] == 3 and opt.state[0]["step"] == 4


@pytest.mark.parametrize("state_dtype", [None, "bfloat16"])
def test_torch_optimizer_makes_one_call_per_group(monkeypatch, fast_backend, state_dtype):
    torch = pytest.importorskip("torch")
    import fastadam.torch as ft

    calls = _count_calls(monkeypatch, fast_backend)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 2))
    sdt = torch.bfloat16 if state_dtype else None
    opt = ft.AdamW(model.parameters(), backend=fast_backend, state_dtype=sdt)
    for _ in range(3):
        opt.zero_grad()
        model(torch.randn(4, 8)).sum().backward()
        opt.step()
    assert calls == [4, 4, 4]
    assert all(float(opt.state[p]["step"]) == 3 for p in model.parameters())


# -- the vectorized rounding keys ------------------------------------------------------


def test_rounding_keys_match_the_scalar_definition():
    from fastadam._scalars import rounding_key
    from fastadam.multi import rounding_keys

    seeds = [0, 1, 2**32, 2**63 + 5, 2**64 - 1]
    steps = [1, 7, 2**32 + 3, 99, 2**62]
    got = rounding_keys(np.array(seeds, np.uint64), np.array(steps, np.uint64))
    want = [rounding_key(s, t) for s, t in itertools.product(seeds, steps)]
    pairs = [
        rounding_keys(np.array([s], np.uint64), np.array([t], np.uint64))[0]
        for s, t in itertools.product(seeds, steps)
    ]
    assert [int(k) for k in pairs] == want
    assert [int(k) for k in got] == [rounding_key(s, t) for s, t in zip(seeds, steps)]


def test_torch_per_parameter_steps_match_torch(fast_backend):
    """Parameters that joined training later (their own step counts), and a count
    changed in place from outside, step exactly as torch.optim.AdamW steps them."""
    torch = pytest.importorskip("torch")
    import fastadam.torch as ft

    torch.manual_seed(0)
    ours = [torch.nn.Parameter(torch.randn(s)) for s in ((5, 3), (7,), (4, 4))]
    theirs = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    opt = ft.AdamW(ours, lr=1e-2, backend=fast_backend)
    ref = torch.optim.AdamW(theirs, lr=1e-2, foreach=False)
    for t in range(6):
        for k, (p, q) in enumerate(zip(ours, theirs)):
            g = torch.randn_like(p) if k <= t else None  # parameter k joins at step k
            p.grad, q.grad = g, None if g is None else g.clone()
        if t == 4:  # a count changed in place, as a checkpoint surgery might do
            opt.state[ours[0]]["step"].fill_(10.0)
            ref.state[theirs[0]]["step"].fill_(10.0)
        opt.step()
        ref.step()
        for p, q in zip(ours, theirs):
            torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)
    assert [float(opt.state[p]["step"]) for p in ours] == [12.0, 5.0, 4.0]
    assert [float(ref.state[p]["step"]) for p in theirs] == [12.0, 5.0, 4.0]


# -- threads and fork --------------------------------------------------------------


def test_concurrent_python_threads_step_their_own_plans(fast_backend):
    """Python threads stepping their own lists at once, past the parallel
    thresholds: no abort, no deadlock, the bits of stepping them one by one."""
    import threading

    sizes = SIZES["past-parallel"]
    lists = [make_tensors(sizes, "float32", seed=s) for s in range(4)]
    expected = copy_tensors(t for tensors in lists for t in tensors)
    per_tensor(expected, step=1, seeds=[0] * len(expected), backend="numpy", lr=1e-2,
               amsgrad=True)  # fmt: skip
    barrier = threading.Barrier(len(lists))
    errors: list[BaseException] = []

    def work(tensors):
        try:
            plan = fastadam.MultiTensorPlan(*columns(tensors), backend=fast_backend)
            barrier.wait()
            plan.step(step=1, lr=1e-2, amsgrad=True)
        except BaseException as exc:  # reported below, in the main thread
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(tensors,)) for tensors in lists]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads), "a thread is stuck (deadlock?)"
    assert not errors, errors
    assert_tensors_identical([t for tensors in lists for t in tensors], expected)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_fork_after_a_parallel_multi_step(fast_backend):
    """A child forked after a threaded multi-tensor step runs its own, and the
    parent's threads still work afterwards."""
    code = f"""
import os, sys, numpy as np, fastadam
fastadam.set_num_threads(2)
def lists(seed):
    rng = np.random.default_rng(seed)
    ps = [rng.standard_normal(n).astype(np.float32) for n in (70_000, 3, 50_000)]
    return ps, [p * 0.1 for p in ps], [np.zeros_like(p) for p in ps], [np.ones_like(p) for p in ps]
parent = fastadam.MultiTensorPlan(*lists(0), backend={fast_backend!r})
parent.step(step=1, lr=1e-3)  # the parent runs the threaded kernel first
pid = os.fork()
if pid == 0:
    arrays = lists(1)
    before = [p.copy() for p in arrays[0]]
    fastadam.adam_step_multi(*arrays, step=1, lr=1e-3, backend={fast_backend!r})
    ok = all(np.isfinite(p).all() and not np.array_equal(p, b) for p, b in zip(arrays[0], before))
    os._exit(0 if ok else 3)
_, status = os.waitpid(pid, 0)
parent.step(step=2, lr=1e-3)
sys.exit(0 if status == 0 else 1)
"""
    r = run_python(code, timeout=180)
    assert r.returncode == 0, r.stderr
