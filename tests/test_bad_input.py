"""Bad input: a clear TypeError/ValueError naming the argument, and nothing modified.

Each case builds a valid call, breaks one thing, and checks that the call
raises the right exception whose message names the culprit, and that every
array involved is bit-for-bit what it was before.
"""

from __future__ import annotations

import numpy as np
import pytest
from helpers import assert_bit_identical, copy_state, make_state

import fastadam

N = 257


def _readonly(a):
    a.flags.writeable = False
    return a


def _overlap_view(kwargs):
    # exp_avg becomes a view of param's buffer shifted by one element.
    buf = np.zeros(N + 1, np.float32)
    buf[:N] = kwargs["param"]
    kwargs["param"] = buf[:N]
    kwargs["exp_avg"] = buf[1:]


# (id, how to break the call, exception, word the message must contain)
CASES = [
    ("param-list", lambda k: k.update(param=list(k["param"])), TypeError, "param"),
    ("param-none", lambda k: k.update(param=None), TypeError, "param"),
    ("grad-none", lambda k: k.update(grad=None), TypeError, "grad"),
    ("exp_avg-list", lambda k: k.update(exp_avg=[0.0] * N), TypeError, "exp_avg"),
    ("param-int", lambda k: k.update(param=np.zeros(N, np.int32)), TypeError, "param"),
    ("param-complex", lambda k: k.update(param=np.zeros(N, np.complex64)), TypeError, "param"),
    ("param-float16", lambda k: k.update(param=np.zeros(N, np.float16)), TypeError, "param"),
    ("grad-dtype", lambda k: k.update(grad=k["grad"].astype(np.float64)), TypeError, "grad"),
    (
        "exp_avg_sq-int",
        lambda k: k.update(exp_avg_sq=np.zeros(N, np.int32)),
        TypeError,
        "exp_avg_sq",
    ),
    ("grad-byteswapped", lambda k: k.update(grad=k["grad"].astype(">f4")), TypeError, "grad"),
    ("param-byteswapped", lambda k: k.update(param=k["param"].astype(">f4")), TypeError, "param"),
    (
        "exp_avg-shape",
        lambda k: k.update(exp_avg=np.zeros(N - 1, np.float32)),
        ValueError,
        "exp_avg",
    ),
    ("grad-2d", lambda k: k.update(grad=np.zeros((1, N), np.float32)), ValueError, "grad"),
    (
        "param-strided",
        lambda k: k.update(param=np.zeros(2 * N, np.float32)[::2]),
        ValueError,
        "param",
    ),
    ("grad-fortran", None, ValueError, "grad"),  # built in the test: needs 2-D shapes
    ("param-readonly", lambda k: k.update(param=_readonly(k["param"])), ValueError, "param"),
    ("grad-readonly", lambda k: k.update(grad=_readonly(k["grad"])), ValueError, "grad"),
    (
        "exp_avg-readonly",
        lambda k: k.update(exp_avg=_readonly(k["exp_avg"])),
        ValueError,
        "exp_avg",
    ),
    (
        "exp_avg_sq-readonly",
        lambda k: k.update(exp_avg_sq=_readonly(k["exp_avg_sq"])),
        ValueError,
        "exp_avg_sq",
    ),
    (
        "max-readonly",
        lambda k: k.update(amsgrad=True, max_exp_avg_sq=_readonly(k["max_exp_avg_sq"])),
        ValueError,
        "max_exp_avg_sq",
    ),
    ("lr-negative", lambda k: k.update(lr=-1e-3), ValueError, "lr"),
    ("lr-nan", lambda k: k.update(lr=float("nan")), ValueError, "lr"),
    ("lr-inf", lambda k: k.update(lr=float("inf")), ValueError, "lr"),
    ("lr-str", lambda k: k.update(lr="0.1"), TypeError, "lr"),
    ("lr-none", lambda k: k.update(lr=None), TypeError, "lr"),
    ("lr-complex", lambda k: k.update(lr=1e-3 + 0j), TypeError, "lr"),
    ("eps-negative", lambda k: k.update(eps=-1e-8), ValueError, "eps"),
    ("eps-nan", lambda k: k.update(eps=float("nan")), ValueError, "eps"),
    ("weight_decay-negative", lambda k: k.update(weight_decay=-0.1), ValueError, "weight_decay"),
    ("weight_decay-inf", lambda k: k.update(weight_decay=float("inf")), ValueError, "weight_decay"),
    ("beta1-one", lambda k: k.update(beta1=1.0), ValueError, "beta1"),
    ("beta1-negative", lambda k: k.update(beta1=-0.1), ValueError, "beta1"),
    ("beta1-nan", lambda k: k.update(beta1=float("nan")), ValueError, "beta1"),
    ("beta1-str", lambda k: k.update(beta1="0.9"), TypeError, "beta1"),
    ("beta2-above-one", lambda k: k.update(beta2=1.5), ValueError, "beta2"),
    ("beta2-none", lambda k: k.update(beta2=None), TypeError, "beta2"),
    ("step-zero", lambda k: k.update(step=0), ValueError, "step"),
    ("step-negative", lambda k: k.update(step=-3), ValueError, "step"),
    ("step-float", lambda k: k.update(step=1.5), TypeError, "step"),
    ("step-bool", lambda k: k.update(step=True), TypeError, "step"),
    ("step-str", lambda k: k.update(step="3"), TypeError, "step"),
    (
        "amsgrad-without-max",
        lambda k: k.update(amsgrad=True, max_exp_avg_sq=None),
        ValueError,
        "max_exp_avg_sq",
    ),
    (
        "amsgrad-max-shape",
        lambda k: k.update(amsgrad=True, max_exp_avg_sq=np.zeros(3, np.float32)),
        ValueError,
        "max_exp_avg_sq",
    ),
    (
        "amsgrad-max-dtype",
        lambda k: k.update(amsgrad=True, max_exp_avg_sq=np.zeros(N, np.float64)),
        TypeError,
        "max_exp_avg_sq",
    ),
    ("grad_scale-zero", lambda k: k.update(grad_scale=0.0), ValueError, "grad_scale"),
    ("grad_scale-negative", lambda k: k.update(grad_scale=-2.0), ValueError, "grad_scale"),
    ("grad_scale-nan", lambda k: k.update(grad_scale=float("nan")), ValueError, "grad_scale"),
    ("grad_scale-inf", lambda k: k.update(grad_scale=float("inf")), ValueError, "grad_scale"),
    ("grad_scale-str", lambda k: k.update(grad_scale="2"), TypeError, "grad_scale"),
    ("param-is-grad", lambda k: k.update(grad=k["param"]), ValueError, "param and grad"),
    (
        "exp_avg-is-exp_avg_sq",
        lambda k: k.update(exp_avg_sq=k["exp_avg"]),
        ValueError,
        "exp_avg and exp_avg_sq",
    ),
    (
        "max-is-exp_avg_sq",
        lambda k: k.update(amsgrad=True, max_exp_avg_sq=k["exp_avg_sq"]),
        ValueError,
        "exp_avg_sq and max_exp_avg_sq",
    ),
    ("overlapping-views", _overlap_view, ValueError, "param and exp_avg"),
    ("backend-unknown", lambda k: k.update(backend="cuda"), ValueError, "backend"),
    ("backend-not-str", lambda k: k.update(backend=3), TypeError, "backend"),
]


def _valid_kwargs():
    p, g, m, v, vmax = make_state(N, np.float32, seed=11)
    return dict(param=p, grad=g, exp_avg=m, exp_avg_sq=v, max_exp_avg_sq=vmax, step=4, lr=1e-3)


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input_raises_and_modifies_nothing(backend, case):
    name, breaker, exc, word = case
    kwargs = _valid_kwargs()
    kwargs["backend"] = backend
    if breaker is None:  # grad-fortran
        shape = (15, 17)
        for k in ("param", "grad", "exp_avg", "exp_avg_sq", "max_exp_avg_sq"):
            kwargs[k] = np.ascontiguousarray(kwargs[k][: 15 * 17].reshape(shape))
        kwargs["grad"] = np.asfortranarray(kwargs["grad"])
    else:
        breaker(kwargs)
    arrays = {k: v for k, v in kwargs.items() if isinstance(v, np.ndarray)}
    before = {k: v.copy() for k, v in arrays.items()}
    with pytest.raises(exc) as info:
        fastadam.adam_step(**kwargs)
    assert word in str(info.value), f"message {str(info.value)!r} does not name {word!r}"
    for k, a in arrays.items():
        assert np.array_equal(a, before[k], equal_nan=True), f"{k} was modified by a rejected call"


def test_every_case_passes_when_unbroken(backend):
    """The base call of the table above is valid: the failures come from the breakage."""
    kwargs = _valid_kwargs()
    state = tuple(kwargs[k] for k in ("param", "grad", "exp_avg", "exp_avg_sq", "max_exp_avg_sq"))
    before = copy_state(state)
    fastadam.adam_step(**kwargs, backend=backend)
    assert not np.array_equal(state[0], before[0])


def test_unavailable_backend_error_says_why(monkeypatch):
    from fastadam import backends

    monkeypatch.setitem(
        backends._errors, "c", "OSError: libfastadam_c.so: cannot open shared object file"
    )
    monkeypatch.delitem(backends._loaded, "c", raising=False)
    p, g, m, v, _ = make_state(8, np.float32)
    before = copy_state((p, g, m, v))
    with pytest.raises(fastadam.BackendUnavailableError, match="cannot open shared object file"):
        fastadam.adam_step(p, g, m, v, step=1, lr=1e-3, backend="c")
    assert_bit_identical((p, g, m, v), before)
    assert "c" not in fastadam.available_backends()


@pytest.mark.parametrize(
    "kwargs, exc, word",
    [
        ({"state_rounding": "bogus"}, ValueError, "state_rounding"),
        ({"seed": -1}, ValueError, "seed"),
        ({"seed": 1.5}, TypeError, "seed"),
        ({"max_exp_avg_sq": np.zeros(3, np.float32)}, ValueError, "max_exp_avg_sq"),
    ],
)
def test_unused_arguments_are_checked_too(kwargs, exc, word):
    """float32 states use neither rounding nor seed, and amsgrad is off: a bad
    value is still refused (it used to be ignored)."""
    p, g, m, v = (np.ones(8, np.float32) for _ in range(4))
    with pytest.raises(exc, match=word):
        fastadam.adam_step(p, g, m, v, step=1, lr=1e-3, **kwargs)
    assert (p == 1).all()


def test_read_only_grad_with_grad_scale_is_refused_first(backend):
    """grad_scale writes the unscaled gradient back: a read-only grad is a clear
    ValueError on every backend (Numba used to fail inside with a TypingError)."""
    p, g, m, v = (np.ones(100, np.float32) for _ in range(4))
    g.flags.writeable = False
    with pytest.raises(ValueError, match="grad must be writeable"):
        fastadam.adam_step(p, g, m, v, step=1, lr=1e-3, grad_scale=2.0, backend=backend)
    assert (p == 1).all() and (m == 1).all()
