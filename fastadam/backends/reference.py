"""NumPy reference backend: the executable specification.

Written for reading, not for speed: each line is one step of the update in
torch.optim.Adam's order, with every constant cast to the arrays' dtype once so
float32 math stays float32. The fast backends must reproduce these results bit
for bit; ``tests/`` checks that.

bfloat16 states (float32 params) follow the same lines: the states are widened
to float32, updated, rounded back to bfloat16 for storage (stochastically or to
nearest), and the parameter update uses the stored values; see
:class:`fastadam._scalars.AdamScalars`.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np

from .._scalars import STATE_BF16_STOCHASTIC, STATE_SAME_DTYPE, AdamScalars
from .._table import KIND_BF16, KIND_F32, KIND_F64, TensorTable, view_at

NAME = "numpy"

_U32 = np.uint32


def step(
    param: np.ndarray,
    grad: np.ndarray,
    exp_avg: np.ndarray,
    exp_avg_sq: np.ndarray,
    max_exp_avg_sq: np.ndarray | None,
    sc: AdamScalars,
) -> None:
    """Apply one Adam/AdamW update in place (see :class:`AdamScalars` for the math)."""
    # Non-finite inputs propagate silently, as in the compiled kernels.
    with np.errstate(all="ignore"):
        _step(param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq, sc)


def _step(param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq, sc: AdamScalars) -> None:
    dt = param.dtype.type
    bf16 = sc.state_rounding != STATE_SAME_DTYPE

    g = grad
    if sc.unscale:
        np.divide(grad, dt(sc.grad_scale), out=grad)  # the unscaled gradient is written back
    if sc.maximize:
        g = -g
    if sc.weight_decay != 0.0:
        g = g + dt(sc.weight_decay) * param  # Adam: L2 penalty folded into the gradient
    param *= dt(sc.decay)  # AdamW: decoupled decay (exactly 1.0 for Adam)

    m = widen(exp_avg) if bf16 else exp_avg
    v = widen(exp_avg_sq) if bf16 else exp_avg_sq
    m = m + (g - m) * dt(sc.one_minus_beta1)
    v = v * dt(sc.beta2) + dt(sc.one_minus_beta2) * g * g

    if bf16:
        if sc.state_rounding == STATE_BF16_STOCHASTIC:
            r = random_bits(param.size, sc.rounding_key).reshape(param.shape)
            r_m, r_v = r & _U32(0xFFFF), r >> _U32(16)
        else:
            r_m = r_v = None
        exp_avg.view(np.uint16)[...] = round_to_bf16(m, r_m)
        exp_avg_sq.view(np.uint16)[...] = round_to_bf16(v, r_v)
        m, v = widen(exp_avg), widen(exp_avg_sq)  # the update uses what is stored
    else:
        exp_avg[...] = m
        exp_avg_sq[...] = v

    second = v
    if sc.amsgrad:
        vmax = widen(max_exp_avg_sq) if bf16 else max_exp_avg_sq
        second = np.maximum(vmax, v)  # NaN propagates; exact in bf16 (both are bf16 values)
        if bf16:
            max_exp_avg_sq.view(np.uint16)[...] = second.view(np.uint32) >> _U32(16)
        else:
            max_exp_avg_sq[...] = second
    denom = np.sqrt(second) / dt(sc.bias_correction2_sqrt) + dt(sc.eps)
    param -= dt(sc.step_size) * m / denom


# -- bfloat16 helpers ------------------------------------------------------------


def widen(a: np.ndarray) -> np.ndarray:
    """bfloat16 array -> float32 array, exactly (the bits shifted up by 16)."""
    return (a.view(np.uint16).astype(np.uint32) << _U32(16)).view(np.float32)


def round_to_bf16(x: np.ndarray, r16: np.ndarray | None) -> np.ndarray:
    """float32 -> bfloat16 bit patterns (uint16): stochastic with ``r16``, else nearest-even.

    Stochastic rounding adds 16 random bits below the kept ones and truncates,
    so ``x`` rounds up with probability equal to its distance from the lower
    neighbour: the rounding is unbiased, and tiny updates are not lost.
    """
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    if r16 is None:
        out = (u + _U32(0x7FFF) + ((u >> _U32(16)) & _U32(1))) >> _U32(16)
    else:
        out = (u + r16) >> _U32(16)
    nan = np.isnan(x)
    out[nan] = (u[nan] >> _U32(16)) | _U32(0x0040)  # stays a (quiet) NaN, keeps its sign
    return out.astype(np.uint16)


def mix32(x: np.ndarray) -> np.ndarray:
    """:func:`fastadam._scalars.mix32` on a uint32 array (wrapping arithmetic)."""
    x = x ^ (x >> _U32(16))
    x = x * _U32(0x7FEB352D)
    x = x ^ (x >> _U32(15))
    x = x * _U32(0x846CA68B)
    return x ^ (x >> _U32(16))


def random_bits(n: int, key: int, first: int = 0) -> np.ndarray:
    """The 32 random bits of elements ``first .. first+n-1``:
    ``mix32(lo32(i) ^ mix32(key ^ hi32(i)))`` of each global index ``i``."""
    i = np.arange(n, dtype=np.uint64) + np.uint64(first)
    lo = (i & np.uint64(0xFFFFFFFF)).astype(np.uint32)
    hi = (i >> np.uint64(32)).astype(np.uint32)
    return mix32(lo ^ mix32(_U32(key) ^ hi))


def unscale_and_check(grad: np.ndarray, scale: float) -> bool:
    """Divide ``grad`` by ``scale`` in place; True if any result is NaN or infinite."""
    with np.errstate(all="ignore"):
        np.divide(grad, grad.dtype.type(scale), out=grad)
    return not np.isfinite(grad).all()


def set_num_threads(n: int) -> None:
    """The reference is single-threaded; the setting does not apply."""


def get_num_threads() -> int:
    return 1


# -- multi-tensor step -------------------------------------------------------------

_KIND_DTYPES: dict[str, tuple[np.dtype, np.dtype]] = {
    KIND_F32: (np.dtype(np.float32), np.dtype(np.float32)),
    KIND_F64: (np.dtype(np.float64), np.dtype(np.float64)),
    KIND_BF16: (np.dtype(np.float32), np.dtype(ml_dtypes.bfloat16)),
}


def step_multi(
    table: TensorTable,
    scalars: tuple[AdamScalars, ...],
    index: np.ndarray | None,
    keys: np.ndarray | None,
) -> None:
    """Every tensor of ``table`` updated by :func:`step` with its own scalars
    (see :mod:`fastadam._table`): the definition the fast backends match."""
    param_dtype, state_dtype = _KIND_DTYPES[table.kind]
    for i in range(table.count):
        sc = scalars[0 if index is None else int(index[i])]
        if keys is not None:
            sc = sc._replace(rounding_key=int(keys[i]))
        n = int(table.sizes[i])
        ptr = table.pointers[:, i]
        views = [
            view_at(int(ptr[r]), n, param_dtype if r < 2 else state_dtype)
            for r in range(4 if not sc.amsgrad else 5)
        ]
        step(views[0], views[1], views[2], views[3], views[4] if sc.amsgrad else None, sc)
