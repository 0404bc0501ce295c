"""fastadam._pycall: adam_step's one-call path to the C kernel, and to the
Numba backend's serial loops compiled as C functions.

It must run the kernel exactly when the checked path would accept the arrays
(same bits), and otherwise touch nothing and decline, so that the checked path
raises its own error or runs the unusual-but-valid case. Skipped where the
optional extension was not built (the checked path then serves every call).
"""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest
from helpers import assert_bit_identical

import fastadam
from fastadam import functional
from fastadam._scalars import STATE_SAME_DTYPE, compute_scalars
from fastadam.backends import reference

pycall = pytest.importorskip("fastadam._pycall", reason="fastadam._pycall was not built here")

N = 37


@pytest.fixture(params=["c", "numba"])
def backend(request):
    """A backend module with its one-call path."""
    try:
        module = fastadam.backends.get(request.param)
    except fastadam.BackendUnavailableError as exc:
        pytest.skip(str(exc))
    assert module.step_fast is not None  # the extension exists: every backend binds it
    return module


def _scalars(amsgrad=False, maximize=False, wd=0.0, unscale=None):
    return compute_scalars(
        3, 1e-3, 0.9, 0.999, 1e-8, wd, False, amsgrad, maximize, False, unscale, STATE_SAME_DTYPE
    )


def _arrays(dtype=np.float32, n=N, seed=0):
    rng = np.random.default_rng(seed)
    p, g = (rng.standard_normal(n).astype(dtype) for _ in range(2))
    m = (rng.standard_normal(n) * 0.1).astype(dtype)
    v = np.abs(rng.standard_normal(n)).astype(dtype)
    vmax = v + np.abs(rng.standard_normal(n)).astype(dtype)
    return [p, g, m, v, vmax]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("amsgrad", [False, True])
@pytest.mark.parametrize("shape", [(N,), (5, 7), (), (0,), (2, 0, 3)])
@pytest.mark.parametrize(
    "flags", [{}, {"amsgrad": True, "maximize": True, "wd": 0.01, "unscale": 2.0}]
)
def test_accepted_arrays_get_the_reference_bits(backend, dtype, amsgrad, shape, flags):
    n = int(np.prod(shape))
    arrays = [a.reshape(shape) for a in _arrays(dtype, n)]
    want = [a.copy() for a in arrays]
    sc = _scalars(**{**flags, "amsgrad": amsgrad})
    assert backend.step_fast(*arrays[:4], arrays[4] if amsgrad else None, sc) == 0
    reference.step(*want[:4], want[4] if amsgrad else None, sc)
    assert_bit_identical(arrays, want)


def test_numba_takes_only_what_it_runs_serially():
    """Numba's path runs its serial loop: arrays of PARALLEL_MIN_ELEMENTS and more
    are declined, for adam_step to launch the parallel loop on the threads."""
    numba_ = pytest.importorskip("fastadam.backends.numba_")
    limit = fastadam.config.PARALLEL_MIN_ELEMENTS
    below = _arrays(n=limit - 1)
    want = [a.copy() for a in below]
    assert numba_.step_fast(*below[:4], None, _scalars()) == 0
    reference.step(*want[:4], None, _scalars())
    assert_bit_identical(below, want)
    _declines(numba_, _arrays(n=limit)[:4])


def _declines(backend, arrays, vmax=None, sc=None):
    sc = sc or _scalars()
    before = [a.tobytes() if isinstance(a, np.ndarray) else None for a in (*arrays, vmax)]
    assert backend.step_fast(*arrays, vmax, sc) == backend.DECLINED
    for b, a in zip(before, (*arrays, vmax)):
        if b is not None:
            assert a.tobytes() == b, "a declined call modified an array"


def test_declines_everything_the_checked_path_must_see(backend):
    p, g, m, v, vmax = _arrays()
    ro = v.copy()
    ro.flags.writeable = False
    big = _arrays(n=2 * N)[0]
    raw = np.zeros(N * 4 + 1, np.uint8)
    misaligned = raw[1:].view(np.float32)
    cases = {
        "read-only": [p, g, m, ro],
        "strided": [p, g, m, big[::2]],
        "float64 state": [p, g, m, v.astype(np.float64)],
        "float16": [a.astype(np.float16) for a in (p, g, m, v)],
        "byte-swapped": [p, g, m, v.astype(">f4")],
        "bfloat16 states": [p, g, m.astype(ml_dtypes.bfloat16), v.astype(ml_dtypes.bfloat16)],
        "other shape": [p, g, m, big[:N].reshape(1, N)],
        "other size": [p, g, m, big],
        "same array twice": [p, p, m, v],
        "overlap": [big[:N], g, big[N - 1 : 2 * N - 1], v],
        "subclass": [p, g, m, v.view(np.ma.MaskedArray)],
        "misaligned": [p, g, m, misaligned],
        "not an array": [p, g, m, list(v)],
        "memoryview": [p, g, m, memoryview(v)],
    }
    for name, arrays in cases.items():
        try:
            _declines(backend, arrays)
        except AssertionError as exc:
            raise AssertionError(f"{name}: {exc}") from None
    _declines(backend, [p, g, m, v], vmax=None, sc=_scalars(amsgrad=True))  # no vmax
    _declines(backend, [p, g, m, v], vmax=ro)  # a vmax given is checked even without amsgrad
    _declines(backend, [p, g, m, v], sc=(1.0,) * 3)  # not an AdamScalars


def test_adam_step_uses_it_and_the_checked_path_still_names_the_culprit(backend):
    name = backend.NAME
    p, g, m, v, _ = _arrays()
    fastadam.adam_step(p, g, m, v, step=1, lr=1e-3, backend=name)
    assert functional._FAST[name] is not None and functional._FAST[name].module is backend
    ro = v.copy()
    ro.flags.writeable = False
    with pytest.raises(ValueError, match="exp_avg_sq must be writeable"):
        fastadam.adam_step(p, g, m, ro, step=1, lr=1e-3, backend=name)
    # a bad array is reported before a bad hyperparameter, fast path or not
    with pytest.raises(ValueError, match="exp_avg_sq must be writeable"):
        fastadam.adam_step(p, g, m, ro, step=1, lr=float("nan"), backend=name)
    with pytest.raises(ValueError, match="lr"):
        fastadam.adam_step(p, g, m, v, step=1, lr=float("nan"), backend=name)


def test_first_readonly_finds_the_first_array_it_may_not_write():
    arrays = [np.zeros(3, np.float32) for _ in range(5)]
    assert pycall.first_readonly(arrays) == -1
    assert pycall.first_readonly([]) == -1
    arrays[3].flags.writeable = False
    arrays[4].flags.writeable = False
    assert pycall.first_readonly(arrays) == 3
    assert pycall.first_readonly([arrays[0], b"bytes"]) == 1  # a read-only buffer
    assert pycall.first_readonly([arrays[0], object()]) == 1  # no buffer at all
    with pytest.raises(TypeError):
        pycall.first_readonly(tuple(arrays))


def test_a_plan_still_names_an_array_made_read_only_after_it_was_built():
    params = [np.ones(4, np.float32) for _ in range(3)]
    lists = [params, *([np.zeros(4, np.float32) for _ in range(3)] for _ in range(3))]
    plan = fastadam.MultiTensorPlan(*lists, backend="numpy")
    before = [a.copy() for lst in lists for a in lst]
    lists[2][1].flags.writeable = False
    with pytest.raises(ValueError, match=r"exp_avgs\[1\] must be writeable"):
        plan.step(step=1, lr=0.1)
    assert_bit_identical([a for lst in lists for a in lst], before)


# -- the 8-bit step's one-call path -------------------------------------------------------


@pytest.fixture(params=["c", "numba"])
def q8(request):
    """A backend's 8-bit module with its one-call path."""
    try:
        module = fastadam.backends.family(request.param, "q8")
    except fastadam.BackendUnavailableError as exc:
        pytest.skip(str(exc))
    assert module.step_fast_q8 is not None  # the extension exists: every backend binds it
    return module


def _q8_arrays(shape=(N,), seed=0):
    from fastadam import _q8

    rng = np.random.default_rng(seed)
    n = int(np.prod(shape))
    p, g = (rng.standard_normal(shape).astype(np.float32) for _ in range(2))
    mc, ma = _q8.quantize((rng.standard_normal(n) * 0.1).astype(np.float32), signed=True)
    vc, va = _q8.quantize(np.abs(rng.standard_normal(n)).astype(np.float32), signed=False)
    return [p, g, mc.reshape(shape), vc.reshape(shape), ma, va]


def _q8_scalars(**kw):
    from fastadam import _q8

    return _q8.fold(_scalars(**kw))


@pytest.mark.parametrize("shape", [(N,), (5, 7), (), (0,), (3, 300)])
@pytest.mark.parametrize(
    "flags",
    [{}, {"maximize": True, "wd": 0.01}, {"unscale": 2.0},
     {"maximize": True, "wd": 0.01, "unscale": 2.0}, {"fold": False}],
)  # fmt: skip
def test_q8_accepted_arrays_get_the_reference_bits(q8, shape, flags):
    """Each of the Numba function's compiled copies (unscale and the division by
    bias_correction2_sqrt fixed off, or run-time values; unfolded scalars have
    the division) against the reference."""
    from fastadam import _q8

    got, ref = _q8_arrays(shape), _q8_arrays(shape)
    if flags.get("fold", True):
        sc = _q8_scalars(**flags)
    else:
        sc = _scalars()
        assert sc.bias_correction2_sqrt != 1.0  # so the kernels divide by it
    assert q8.step_fast_q8(*got, sc) == 0
    _q8.step(*ref, sc)
    for a, b in zip(got, ref):
        assert a.tobytes() == b.tobytes()


def test_q8_declines_everything_the_checked_path_must_see(q8):
    p, g, mc, vc, ma, va = _q8_arrays()
    ro = vc.copy()
    ro.flags.writeable = False
    big = _q8_arrays((2 * N,))
    raw = np.zeros(N * 4 + 1, np.uint8)
    cases = {
        "read-only codes": [p, g, mc, ro, ma, va],
        "strided param": [big[0][::2], g, mc, vc, ma, va],
        "float32 codes": [p, g, mc.astype(np.float32), vc, ma, va],
        "int8 codes": [p, g, mc.view(np.int8), vc, ma, va],
        "float64 param": [p.astype(np.float64), g, mc, vc, ma, va],
        "float64 scales": [p, g, mc, vc, ma.astype(np.float64), va],
        "byte-swapped grad": [p, g.astype(">f4"), mc, vc, ma, va],
        "codes of another shape": [p, g, mc.reshape(1, N), vc, ma, va],
        "scales of another length": [p, g, mc, vc, np.zeros(2, np.float32), va],
        "scales 2-D": [p, g, mc, vc, ma.reshape(1, -1), va],
        "same scales twice": [p, g, mc, vc, ma, ma],
        "codes overlap": [p, g, raw[:N], raw[N - 1 : 2 * N - 1], ma, va],
        "subclass": [p.view(np.ma.MaskedArray), g, mc, vc, ma, va],
        "misaligned param": [raw[1:].view(np.float32)[:N], g, mc, vc, ma, va],
        "not an array": [p, g, mc, vc, list(ma), va],
    }
    for name, arrays in cases.items():
        before = [a.tobytes() if isinstance(a, np.ndarray) else None for a in arrays]
        assert q8.step_fast_q8(*arrays, _q8_scalars()) == q8.DECLINED, name
        for a, b in zip(arrays, before):
            if b is not None:
                assert a.tobytes() == b, f"{name}: an array was modified"
    good = [p, g, mc, vc, ma, va]
    assert q8.step_fast_q8(*good, _q8_scalars(amsgrad=True)) == q8.DECLINED
    assert q8.step_fast_q8(*good, (1.0,) * 3) == q8.DECLINED  # not an AdamScalars


def test_q8_numba_leaves_to_its_threads_what_they_run():
    """The Numba 8-bit function runs serially: from PARALLEL_MIN_ELEMENTS on it
    answers CHECKED_LARGE with every array untouched, and adam_step launches the
    parallel loop from Python; arrays it would decline it still declines."""
    from fastadam import config

    q8 = fastadam.backends.family("numba", "q8")
    big = _q8_arrays((config.PARALLEL_MIN_ELEMENTS,))
    before = [a.tobytes() for a in big]
    assert q8.step_fast_q8(*big, _q8_scalars()) == q8.CHECKED_LARGE != q8.DECLINED
    assert [a.tobytes() for a in big] == before
    ro = big[3].copy()
    ro.flags.writeable = False
    assert q8.step_fast_q8(*big[:3], ro, *big[4:], _q8_scalars()) == q8.DECLINED
    below = _q8_arrays((config.PARALLEL_MIN_ELEMENTS - 1,))
    assert q8.step_fast_q8(*below, _q8_scalars()) == 0


def test_q8_numba_large_arrays_are_checked_once(monkeypatch):
    """adam_step runs the arrays the one-call path checked and left to the
    threads without checking them again, to the reference's bits; a bad large
    array still gets the checked path's error, with nothing modified."""
    from fastadam import _q8, config

    q8 = fastadam.backends.family("numba", "q8")
    n = config.PARALLEL_MIN_ELEMENTS + 300  # a partial last block
    got, ref = _q8_arrays((n,), seed=1), _q8_arrays((n,), seed=1)

    def checked(*args, **kw):
        raise AssertionError("the checked path ran for arrays the one-call path checked")

    kw = {"step": 2, "lr": 1e-3, "weight_decay": 0.1}
    with monkeypatch.context() as mp:
        mp.setattr(_q8, "validate_q8", checked)
        fastadam.adam_step(*got[:4], exp_avg_absmax=got[4], exp_avg_sq_absmax=got[5],
                           backend=q8.NAME, **kw)  # fmt: skip
    fastadam.adam_step(*ref[:4], exp_avg_absmax=ref[4], exp_avg_sq_absmax=ref[5],
                       backend="numpy", **kw)  # fmt: skip
    for a, b in zip(got, ref):
        assert a.tobytes() == b.tobytes()
    before = [a.tobytes() for a in got]
    with pytest.raises(ValueError, match="exp_avg_absmax"):
        fastadam.adam_step(*got[:4], exp_avg_absmax=got[4][:-1], exp_avg_sq_absmax=got[5],
                           backend=q8.NAME, **kw)  # fmt: skip
    assert [a.tobytes() for a in got] == before


def test_q8_adam_step_uses_it_and_the_checked_path_still_names_the_culprit(q8, monkeypatch):
    from fastadam import _q8

    p, g, mc, vc, ma, va = _q8_arrays()
    ref = [a.copy() for a in (p, g, mc, vc, ma, va)]

    def checked(*args, **kw):
        raise AssertionError("the checked path ran for arrays the fast path takes")

    with monkeypatch.context() as mp:
        mp.setattr(_q8, "validate_q8", checked)
        fastadam.adam_step(p, g, mc, vc, step=2, lr=1e-3, exp_avg_absmax=ma,
                           exp_avg_sq_absmax=va, backend=q8.NAME)  # fmt: skip
    fastadam.adam_step(*ref[:4], step=2, lr=1e-3, exp_avg_absmax=ref[4],
                       exp_avg_sq_absmax=ref[5], backend="numpy")  # fmt: skip
    for a, b in zip((p, g, mc, vc, ma, va), ref):
        assert a.tobytes() == b.tobytes()
    ro = vc.copy()
    ro.flags.writeable = False
    kw = {"exp_avg_absmax": ma, "exp_avg_sq_absmax": va, "backend": q8.NAME}
    with pytest.raises(ValueError, match="exp_avg_sq must be writeable"):
        fastadam.adam_step(p, g, mc, ro, step=3, lr=1e-3, **kw)
    # a bad array is reported before a bad hyperparameter, fast path or not
    with pytest.raises(ValueError, match="exp_avg_sq must be writeable"):
        fastadam.adam_step(p, g, mc, ro, step=3, lr=float("nan"), **kw)
    with pytest.raises(ValueError, match="lr"):
        fastadam.adam_step(p, g, mc, vc, step=3, lr=float("nan"), **kw)
    with pytest.raises(ValueError, match="amsgrad"):
        fastadam.adam_step(p, g, mc, vc, step=3, lr=1e-3, amsgrad=True, **kw)
    before = [a.copy() for a in (p, g, mc, vc, ma, va)]
    fastadam.adam_step(p, g, mc, vc, step=3, lr=1e-3, found_inf=True, **kw)  # skips
    for a, b in zip((p, g, mc, vc, ma, va), before):
        assert a.tobytes() == b.tobytes()
