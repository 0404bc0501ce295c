"""NumPy reference backend: the executable specification.

Written for reading, not for speed: each line is one step of the update in
torch.optim.Adam's order, with every constant cast to the arrays' dtype once so
float32 math stays float32. The fast backends must reproduce these results bit
for bit; ``tests/`` checks that.
"""

from __future__ import annotations

import numpy as np

from .._scalars import AdamScalars

NAME = "numpy"


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

    g = grad
    if sc.unscale:
        np.divide(grad, dt(sc.grad_scale), out=grad)  # the unscaled gradient is written back
    if sc.maximize:
        g = -g
    if sc.weight_decay != 0.0:
        g = g + dt(sc.weight_decay) * param  # Adam: L2 penalty folded into the gradient
    param *= dt(sc.decay)  # AdamW: decoupled decay (exactly 1.0 for Adam)

    exp_avg += (g - exp_avg) * dt(sc.one_minus_beta1)
    exp_avg_sq *= dt(sc.beta2)
    exp_avg_sq += dt(sc.one_minus_beta2) * g * g

    second = exp_avg_sq
    if sc.amsgrad:
        np.maximum(max_exp_avg_sq, exp_avg_sq, out=max_exp_avg_sq)
        second = max_exp_avg_sq
    denom = np.sqrt(second) / dt(sc.bias_correction2_sqrt) + dt(sc.eps)
    param -= dt(sc.step_size) * exp_avg / denom


def set_num_threads(n: int) -> None:
    """The reference is single-threaded; the setting does not apply."""


def get_num_threads() -> int:
    return 1
