"""Options that cannot go together are refused, naming both, before anything changes.

Master weights (issue 17) keep float32 moments; 8-bit states (issue 18) are
uint8 codes with scales: a step asked for both has no meaning.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest

import fastadam
from fastadam import _q8

N = 4096


def _unchanged(arrays, before):
    for i, (a, b) in enumerate(zip(arrays, before)):
        assert a.tobytes() == b.tobytes(), f"array {i} was modified"


def _q8_arrays(n=N, seed=0):
    rng = np.random.default_rng(seed)
    p = rng.standard_normal(n).astype(np.float32)
    g = rng.standard_normal(n).astype(np.float32)
    m, v, am, av = _q8.zeros_state((n,))
    return [p, g, m, v, am, av]


def test_adam_step_refuses_param_copy_with_8bit_states():
    p, g, m, v, am, av = arrays = _q8_arrays()
    copy = p.astype(ml_dtypes.bfloat16)
    before = [a.copy() for a in (*arrays, copy)]
    with pytest.raises(ValueError, match="param_copy.*8-bit"):
        fastadam.adam_step(
            p, g, m, v, step=1, lr=1e-3, exp_avg_absmax=am, exp_avg_sq_absmax=av, param_copy=copy
        )
    _unchanged([*arrays, copy], before)


def test_adam_step_multi_refuses_param_copies_with_8bit_states():
    p, g, m, v, am, av = arrays = _q8_arrays()
    copy = p.astype(ml_dtypes.bfloat16)
    before = [a.copy() for a in (*arrays, copy)]
    with pytest.raises(ValueError, match="param_copies.*8-bit"):
        fastadam.adam_step_multi(
            [p], [g], [m], [v], step=1, lr=1e-3, exp_avg_absmaxes=[am],
            exp_avg_sq_absmaxes=[av], param_copies=[copy],
        )  # fmt: skip
    _unchanged([*arrays, copy], before)


@pytest.mark.parametrize("cls", [fastadam.Adam, fastadam.AdamW])
def test_numpy_optimizers_refuse_master_weights_with_8bit_states(cls):
    params = [np.zeros(N, ml_dtypes.bfloat16)]
    with pytest.raises(ValueError, match="master_weights.*8bit"):
        cls(params, lr=1e-3, state_dtype="8bit", master_weights=True)


def test_torch_optimizers_refuse_master_weights_with_8bit_states():
    torch = pytest.importorskip("torch")
    import fastadam.torch as ft

    for cls in (ft.Adam, ft.AdamW):
        p = torch.zeros(N, dtype=torch.bfloat16, requires_grad=True)
        with pytest.raises(ValueError, match="master_weights.*8bit"):
            cls([p], lr=1e-3, state_dtype="8bit", master_weights=True)


def test_numpy_optimizers_refuse_8bit_states_for_lowp_params():
    """8-bit states are for float32 parameters; bf16/fp16 ones may keep their own,
    float32 or bfloat16 moments instead."""
    for dt in (ml_dtypes.bfloat16, np.float16):
        with pytest.raises(TypeError, match=r"state_dtype='8bit' needs float32.*params\[0\]"):
            fastadam.AdamW([np.zeros(N, dt)], lr=1e-3, state_dtype="8bit")


def test_torch_optimizers_refuse_8bit_states_for_lowp_params():
    torch = pytest.importorskip("torch")
    import fastadam.torch as ft

    p = torch.randn(N).to(torch.bfloat16)
    p.grad = torch.ones(N, dtype=torch.bfloat16)
    before = p.clone()
    o = ft.AdamW([p], lr=1e-3, state_dtype="8bit")
    with pytest.raises(TypeError, match=r"params'\]\[0\] has dtype torch.bfloat16.*'8bit'"):
        o.step()
    assert torch.equal(p, before) and not o.state
