"""The per-step scalars of an Adam update, computed once per call in float64.

Every backend receives one :class:`AdamScalars` and casts each field to the
arrays' dtype exactly once before its loop. Keeping this arithmetic here (and
nowhere else) is what makes the backends agree bit for bit: they all start
from the same rounded constants.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple


class AdamScalars(NamedTuple):
    """Constants of one Adam/AdamW step, in float64.

    The element-wise update every backend implements, in this order
    (torch.optim.Adam's order), with all arithmetic in the arrays' dtype::

        g = grad / grad_scale            # only if unscale; g is written back to grad
        g = -g                           # only if maximize
        g = g + weight_decay * p         # only if weight_decay != 0 (Adam, L2)
        p = p * decay                    # decay == 1 - lr*wd for AdamW, else 1.0
        m = m + (g - m) * one_minus_beta1
        v = v * beta2 + one_minus_beta2 * g * g
        vmax = max(vmax, v)              # only if amsgrad (NaN propagates)
        denom = sqrt(vmax or v) / bias_correction2_sqrt + eps
        p = p - step_size * m / denom

    ``p * decay`` with ``decay == 1.0`` is exact, so backends may always apply
    it; the other optional terms must be skipped when their flag is off.

    **bfloat16 states** (``state_rounding`` 1 or 2; param and grad float32,
    exp_avg/exp_avg_sq/max_exp_avg_sq bfloat16). The math above runs in float32
    on the widened states (bf16 bits << 16, exact); then::

        m_b, v_b = round(m, r & 0xFFFF), round(v, r >> 16)   # bf16 bit patterns
        m, v = widen(m_b), widen(v_b)                       # the update uses what is stored
        vmax = max(widen(vmax_b), v)                        # amsgrad: exact, NaN wins
        denom, p as above, from these m and v/vmax

    where ``round(x, r16)`` on the float32 bits ``u`` of ``x`` is
    ``(u + r16) >> 16`` (stochastic) or ``(u + 0x7FFF + ((u >> 16) & 1)) >> 16``
    (nearest-even), and a NaN becomes ``(u >> 16) | 0x0040`` (quiet NaN, its
    sign kept). The 32 random bits of element ``i`` (64-bit index) are
    ``r = mix32(lo32(i) ^ mix32(rounding_key ^ hi32(i)))``, with
    :func:`mix32` and ``rounding_key`` from :func:`rounding_key`: a counter-based
    hash, so the bits depend on (seed, step, i) alone, not on threads or splits.

    For bfloat16 states :func:`compute_scalars` also folds the second bias
    correction into the other constants, the "epsilon-hat" form of the same
    update (Kingma & Ba, section 2)::

        step_size = lr * sqrt(1 - beta2^t) / (1 - beta1^t)
        eps = eps * sqrt(1 - beta2^t)
        bias_correction2_sqrt = 1.0

    Equal to the form above in exact arithmetic, it saves one float32 divide per
    element (kernels skip dividing by a ``bias_correction2_sqrt`` of 1.0, which
    is exact), one of the savings that bring a bf16-state step near memory speed. The
    float32/float64 paths keep torch's form, for bit-parity with torch.
    """

    step_size: float  # lr / (1 - beta1^t); eps_hat, bf16: lr * sqrt(1 - beta2^t) / (1 - beta1^t)
    bias_correction2_sqrt: float  # sqrt(1 - beta2^t); eps_hat, bf16: 1.0 (dividing is exact)
    eps: float  # bf16 states (without eps_hat): eps * sqrt(1 - beta2^t)
    one_minus_beta1: float
    beta2: float
    one_minus_beta2: float
    weight_decay: float  # L2 coefficient added to the gradient; 0.0 for AdamW
    decay: float  # AdamW's 1 - lr*wd; 1.0 for Adam
    grad_scale: float  # divisor of the gradient; 1.0 when not unscaling
    unscale: bool  # divide grad by grad_scale and write the result back to grad
    maximize: bool
    amsgrad: bool
    state_rounding: int  # STATE_SAME_DTYPE, STATE_BF16_NEAREST or STATE_BF16_STOCHASTIC
    rounding_key: int  # uint32; seeds the per-element random bits (stochastic rounding)


#: ``AdamScalars.state_rounding``: states have the parameters' dtype (no rounding).
STATE_SAME_DTYPE = 0
#: bfloat16 states, rounded to nearest-even.
STATE_BF16_NEAREST = 1
#: bfloat16 states, rounded stochastically with counter-based random bits.
STATE_BF16_STOCHASTIC = 2

_M32 = 0xFFFFFFFF


def mix32(x: int) -> int:
    """A 32-bit integer hash (bijective, strong avalanche): the random-bit generator.

    ``x ^= x >> 16; x *= 0x7FEB352D; x ^= x >> 15; x *= 0x846CA68B; x ^= x >> 16``,
    all in uint32 arithmetic. Backends implement the same function on uint32.
    """
    x &= _M32
    x ^= x >> 16
    x = (x * 0x7FEB352D) & _M32
    x ^= x >> 15
    x = (x * 0x846CA68B) & _M32
    x ^= x >> 16
    return x


def rounding_key(seed: int, step: int) -> int:
    """The uint32 key of one step's random bits: a hash of (seed, step), both < 2**64."""
    k = mix32(seed & _M32)
    k = mix32(k ^ (seed >> 32))
    k = mix32(k ^ (step & _M32))
    return mix32(k ^ (step >> 32))


@functools.lru_cache(maxsize=256)
def compute_scalars(
    step: int,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    decoupled_weight_decay: bool,
    amsgrad: bool,
    maximize: bool,
    eps_hat: bool,
    grad_scale: float | None,
    state_rounding: int = STATE_SAME_DTYPE,
    seed: int = 0,
) -> AdamScalars:
    """Derive the step's constants from validated hyperparameters (float64).

    ``beta**step`` is evaluated from the integer step in float64, as torch does
    for its ``capturable=False`` path, and never accumulated across steps.

    Memoized: an optimizer steps every parameter of a group with the same
    hyperparameters and step, so all but the first call of a step are a cache
    hit (and return the same immutable object, which backends may key on).
    """
    bias_correction1 = 1.0 - beta1**step
    bias_correction2 = 1.0 - beta2**step
    eps_value = eps
    if eps_hat or state_rounding != STATE_SAME_DTYPE:
        # bf16 states: the epsilon-hat form of the same update (see AdamScalars).
        step_size = lr * math.sqrt(bias_correction2) / bias_correction1
        bc2_sqrt = 1.0
        if not eps_hat:
            eps_value = eps * math.sqrt(bias_correction2)
    else:
        step_size = lr / bias_correction1
        bc2_sqrt = math.sqrt(bias_correction2)
    if decoupled_weight_decay:
        l2, decay = 0.0, 1.0 - lr * weight_decay
    else:
        l2, decay = weight_decay, 1.0
    # tuple.__new__ skips the generated __new__'s Python-level call: this runs
    # once per step of every adam_step loop (a few hundred ns of a ~2 us call).
    return _new_scalars(
        AdamScalars,
        (
            step_size,
            bc2_sqrt,
            eps_value,
            1.0 - beta1,
            beta2,
            1.0 - beta2,
            l2,
            decay,
            1.0 if grad_scale is None else grad_scale,
            grad_scale is not None,
            maximize,
            amsgrad,
            state_rounding,
            rounding_key(seed, step) if state_rounding == STATE_BF16_STOCHASTIC else 0,
        ),
    )


_new_scalars = tuple.__new__
