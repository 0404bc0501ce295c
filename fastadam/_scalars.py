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
    """

    step_size: float  # lr / (1 - beta1^t); eps_hat: lr * sqrt(1 - beta2^t) / (1 - beta1^t)
    bias_correction2_sqrt: float  # sqrt(1 - beta2^t); eps_hat: 1.0 (dividing by it is exact)
    eps: float
    one_minus_beta1: float
    beta2: float
    one_minus_beta2: float
    weight_decay: float  # L2 coefficient added to the gradient; 0.0 for AdamW
    decay: float  # AdamW's 1 - lr*wd; 1.0 for Adam
    grad_scale: float  # divisor of the gradient; 1.0 when not unscaling
    unscale: bool  # divide grad by grad_scale and write the result back to grad
    maximize: bool
    amsgrad: bool


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
    if eps_hat:
        step_size = lr * math.sqrt(bias_correction2) / bias_correction1
        bc2_sqrt = 1.0
    else:
        step_size = lr / bias_correction1
        bc2_sqrt = math.sqrt(bias_correction2)
    if decoupled_weight_decay:
        l2, decay = 0.0, 1.0 - lr * weight_decay
    else:
        l2, decay = weight_decay, 1.0
    return AdamScalars(
        step_size,
        bc2_sqrt,
        eps,
        1.0 - beta1,
        beta2,
        1.0 - beta2,
        l2,
        decay,
        1.0 if grad_scale is None else grad_scale,
        grad_scale is not None,
        maximize,
        amsgrad,
    )
