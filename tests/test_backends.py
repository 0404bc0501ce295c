"""The backend registry, the environment override, and thread settings."""

from __future__ import annotations

import os
import platform

import numpy as np
import pytest
from helpers import (
    CASES,
    FAST_BACKENDS,
    assert_bit_identical,
    copy_state,
    make_state,
    run_python,
    run_step,
)

import fastadam


def test_available_backends_lists_the_reference_first():
    names = fastadam.available_backends()
    assert names[0] == "numpy"
    assert set(names) <= {"numpy", "numba", "c"}


@pytest.mark.skipif(
    platform.machine() != "x86_64", reason="fast backends are required on x86-64 only"
)
def test_fast_backends_are_built_and_auto_picks_c():
    if os.environ.get("FASTADAM_ALLOW_MISSING_BACKENDS"):
        pytest.skip("FASTADAM_ALLOW_MISSING_BACKENDS set")
    assert set(FAST_BACKENDS) <= set(fastadam.available_backends()), fastadam.unavailable_reasons()
    assert fastadam.auto_backend() == "c"


@pytest.mark.parametrize("name", ["numpy", "numba"])
def test_env_var_overrides_auto(name):
    code = (
        "import numpy as np, fastadam as fa\n"
        "p, g, m, v = (np.ones(4, np.float32) for _ in range(4))\n"
        "fa.adam_step(p, g, m, v, step=1, lr=0.1)\n"
        "print(fa.auto_backend())"
    )
    r = run_python(code, FASTADAM_BACKEND=name)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == name


def test_env_var_overrides_auto_for_every_kind():
    r = run_python(
        "import fastadam as fa\nprint(sorted(set(fa.backends.auto_choices().values())))",
        FASTADAM_BACKEND="numba",
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "['numba']"


def test_auto_follows_the_rule_for_this_isa():
    from fastadam import backends

    rule = backends._AUTO_RULE[backends._isa_class()]
    available = fastadam.available_backends()
    for kind, name in backends.auto_choices().items():
        if rule[kind] in available:
            assert name == rule[kind], kind
        else:  # the preferred backend cannot load: the next in the registry's order
            assert name in available


def test_auto_dispatches_each_kind_to_its_own_backend():
    """A rule naming different backends per kind: adam_step, the multi-tensor step
    and unscale_and_check each run the backend of their kind (counted by wrapping
    the backends' functions)."""
    code = """
import numpy as np, ml_dtypes, fastadam as fa
from fastadam import backends
isa = backends._isa_class()
backends._AUTO_RULE[isa] = {"float32": "numba", "float64": "numpy", "bfloat16": "numba"}
calls, depth = [], [0]
for name in ("numpy", "numba"):
    mod = backends.get(name)
    for fn in ("step", "step_multi", "unscale_and_check"):
        def wrapped(*a, _f=getattr(mod, fn), _n=f"{name}.{fn}"):
            if not depth[0]:  # not a backend calling its own functions
                calls.append(_n)
            depth[0] += 1
            try:
                return _f(*a)
            finally:
                depth[0] -= 1
        setattr(mod, fn, wrapped)
def state(dt, sdt):
    return [np.ones(5, dt), np.full(5, 0.5, dt), np.zeros(5, sdt), np.zeros(5, sdt)]
fa.adam_step(*state(np.float32, np.float32), step=1, lr=0.1)
fa.adam_step(*state(np.float64, np.float64), step=1, lr=0.1)
fa.adam_step(*state(np.float32, ml_dtypes.bfloat16), step=1, lr=0.1)
a32, a64 = state(np.float32, np.float32), state(np.float64, np.float64)
fa.adam_step_multi(*[[x, y] for x, y in zip(a32, a64)], step=1, lr=0.1)
fa.unscale_and_check([a32[1], a64[1]], 2.0)
print(calls)
print(fa.backends.auto_choices())
"""
    r = run_python(code)
    assert r.returncode == 0, r.stderr
    calls, choices = r.stdout.strip().splitlines()
    assert eval(calls) == [
        "numba.step", "numpy.step", "numba.step", "numba.step_multi", "numpy.step_multi",
        "numba.unscale_and_check", "numpy.unscale_and_check",
    ]  # fmt: skip
    assert eval(choices) == {"float32": "numba", "float64": "numpy", "bfloat16": "numba"}


def test_auto_kind_must_be_known():
    with pytest.raises(ValueError, match="kind"):
        fastadam.backends.get("auto", "float16")


def test_env_var_unknown_name_is_a_clear_error():
    r = run_python(
        "import numpy as np, fastadam as fa\n"
        "p, g, m, v = (np.ones(4, np.float32) for _ in range(4))\n"
        "fa.adam_step(p, g, m, v, step=1, lr=0.1)",
        FASTADAM_BACKEND="tpu",
    )
    assert r.returncode != 0 and "FASTADAM_BACKEND" in r.stderr and "tpu" in r.stderr


def test_broken_c_library_does_not_break_import():
    r = run_python(
        "import fastadam as fa\n"
        "print(fa.available_backends())\n"
        "try:\n"
        "    fa.Adam([__import__('numpy').ones(3, 'f4')], backend='c')\n"
        "except fa.BackendUnavailableError as e:\n"
        "    print('ERR', e)",
        FASTADAM_C_LIBRARY="/nonexistent/libfastadam_c.so",
    )
    assert r.returncode == 0, r.stderr
    assert "'c'" not in r.stdout.splitlines()[0]
    assert "ERR" in r.stdout and "/nonexistent/libfastadam_c.so" in r.stdout


def test_set_num_threads_validates():
    before = fastadam.get_num_threads()
    try:
        fastadam.set_num_threads(np.int64(1))  # NumPy ints are ints (a TypeError before)
        assert fastadam.get_num_threads() == 1
    finally:
        fastadam.set_num_threads(before)
    with pytest.raises(TypeError, match="n must be an int"):
        fastadam.set_num_threads(2.0)
    with pytest.raises(ValueError, match="n must be >= 1"):
        fastadam.set_num_threads(0)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_thread_count_does_not_change_results(fast_backend, dtype, restore_threads):
    """1, 2 and 3 threads give bit-identical results (sizes past the parallel threshold)."""
    results = []
    for threads in (1, 2, 3):
        fastadam.set_num_threads(threads)
        assert fastadam.get_num_threads() == threads
        state = make_state(1_000_003, dtype, seed=9)
        for step in range(1, 4):
            run_step(state, fast_backend, step=step, amsgrad=True, weight_decay=0.1, grad_scale=2.0)
        results.append(state)
    for r in results[1:]:
        assert_bit_identical(r, results[0])
    ref = make_state(1_000_003, dtype, seed=9)
    for step in range(1, 4):
        run_step(ref, "numpy", step=step, amsgrad=True, weight_decay=0.1, grad_scale=2.0)
    assert_bit_identical(results[0], ref)


def test_default_threads_share_the_machine_between_local_ranks():
    r = run_python("import fastadam as fa; print(fa.get_num_threads())", LOCAL_WORLD_SIZE="2")
    one = run_python("import fastadam as fa; print(fa.get_num_threads())")
    assert r.returncode == 0 and one.returncode == 0
    assert int(r.stdout) == max(1, int(one.stdout) // 2)
    r = run_python("import fastadam as fa; print(fa.get_num_threads())", FASTADAM_NUM_THREADS="3")
    assert int(r.stdout) == 3


def test_state_copy_helper_is_deep():
    # Guards the helpers the other tests rely on: copies never alias.
    s = make_state(10, np.float32)
    c = copy_state(s)
    assert all(not np.shares_memory(a, b) for a, b in zip(s, c))


def test_every_backend_provides_the_contract():
    from fastadam import backends

    for name in fastadam.available_backends():
        mod = backends.get(name)
        for attr in backends._CONTRACT:
            assert callable(getattr(mod, attr)) or attr == "NAME", (name, attr)
        assert mod.NAME == name
    # the Protocol and the load-time check name the same members
    members = {m for m in dir(backends.Backend) if not m.startswith("_")}
    assert members | {"NAME"} == set(backends._CONTRACT)


def test_a_backend_missing_a_function_is_refused(monkeypatch):
    import sys
    import types

    from fastadam import backends

    fake = types.ModuleType("fastadam.backends._fake")
    fake.NAME = "fake"
    for attr in ("step", "unscale_and_check", "set_num_threads", "get_num_threads"):
        setattr(fake, attr, lambda *a: None)  # no step_multi
    monkeypatch.setitem(sys.modules, "fastadam.backends._fake", fake)
    monkeypatch.setitem(backends._MODULES, "fake", "_fake")
    with pytest.raises(TypeError, match="does not provide step_multi"):
        backends.get("fake")


def test_numba_refuses_scalars_in_another_order():
    """The Numba loops take the scalars by position: a reordered AdamScalars must make
    the backend unavailable with the reason, not feed eps where beta2 belongs."""
    code = (
        "import collections, fastadam._scalars as s\n"
        "f = list(s.AdamScalars._fields); f[2], f[4] = f[4], f[2]\n"
        "s.AdamScalars = collections.namedtuple('AdamScalars', f)\n"
        "import fastadam\n"
        "print(fastadam.unavailable_reasons().get('numba', 'LOADED'))\n"
    )
    r = run_python(code)
    assert r.returncode == 0, r.stderr
    assert "its loops take" in r.stdout and "AdamScalars has" in r.stdout


@pytest.mark.parametrize("backend", FAST_BACKENDS)
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_case_table_bit_identical_to_the_reference(case, backend, restore_threads):
    """Every entry of the suite's case table (helpers.CASES: NaN, infinities,
    subnormals, signed zeros, huge and tiny values; empty to past the parallel
    thresholds; every kernel flag) on every fast backend, on 2 threads, bit for
    bit against the NumPy reference."""
    fastadam.set_num_threads(2)
    state = case.state(seed=case.n)
    expected = [a.copy() for a in state]
    p, g, m, v, vmax = expected
    fastadam.adam_step(p, g, m, v, step=5, lr=1e-2, max_exp_avg_sq=vmax, backend="numpy",
                       **case.kwargs())  # fmt: skip
    p, g, m, v, vmax = state
    fastadam.adam_step(p, g, m, v, step=5, lr=1e-2, max_exp_avg_sq=vmax, backend=backend,
                       **case.kwargs())  # fmt: skip
    assert_bit_identical(state, expected)
