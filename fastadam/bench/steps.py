"""What the benchmark times: the arrays of a step and a no-argument callable per
backend (fastadam's, torch's, the np.add yardstick, a multi-tensor plan)."""

from __future__ import annotations

import itertools
from collections.abc import Callable
from typing import Any

import numpy as np

import fastadam
from fastadam.functional import BFLOAT16

#: Backend names this command knows, in table order.
FASTADAM_BACKENDS: tuple[str, ...] = fastadam.BACKEND_NAMES
TORCH_BACKENDS: tuple[str, ...] = ("torch-fused", "torch-foreach")
#: bitsandbytes' 8-bit Adam (``bitsandbytes.optim.Adam8bit``) on the CPU: the
#: peer of the q8 rows (issue 18), timed where bitsandbytes is installed.
BNB = "bitsandbytes"
ALL_BACKENDS: tuple[str, ...] = FASTADAM_BACKENDS + TORCH_BACKENDS + (BNB,)

#: Elements of the per-call-cost step (small enough that the call overhead,
#: validation included, dominates).
PER_CALL_N = 1024
PER_TENSOR_K = 256
#: The per-call yardstick's name in tables and records.
NP_ADD = "np.add"

#: The pseudo-dtype of a step with float32 params/grads and bfloat16 states.
BF16_STATES = "bf16"
#: The pseudo-dtype of a step with float32 params/grads and 8-bit block-wise
#: states (issue 18): uint8 codes and a float32 absmax per block of 256.
Q8_STATES = "q8"
#: The pseudo-dtypes of the master-weights comparison (issue 17): float32 master
#: weights whose bfloat16 copy the step writes in the same pass, and the float32
#: step followed by a separate cast-copy into the bfloat16 params.
MASTER_BF16 = "bf16-master"
F32_CAST = "f32+cast"
#: The step kinds --dtype can name, in table order.
DTYPES: tuple[str, ...] = ("float32", "float64", BF16_STATES, Q8_STATES, MASTER_BF16, F32_CAST)


def bytes_per_element(dtype: np.dtype | str) -> float:
    """Bytes one Adam step moves per element: 4 arrays read + 3 written.

    With bfloat16 states: θ and g (4 B) read, θ written; m, v (2 B) read and
    written: 3*4 + 4*2 = 20 B. With 8-bit states: 3*4 + 4*1 = 16 B, plus the
    two absmax arrays (4 B per 256 elements each, read and written): 16.0625 B.
    """
    if dtype == BF16_STATES:
        return 20
    if dtype == Q8_STATES:  # 16 B, and two float32 scales per block of 256
        return 16 + 4 * 4 / 256
    if dtype == MASTER_BF16:  # the float32 step's 28 B, and the copy written: 2 B
        return 30
    if dtype == F32_CAST:  # 28 B, then the cast reads θ (4 B) and writes the copy (2 B)
        return 34
    return 7 * np.dtype(dtype).itemsize


def state_bytes_per_element(dtype: np.dtype | str, n: int = 1 << 24) -> float:
    """Optimizer state memory per element (m and v) of an ``n``-element tensor."""
    if dtype == Q8_STATES:
        return 2 + 2 * 4 * (-(-n // 256)) / n
    if dtype == BF16_STATES:
        return 4
    if dtype == MASTER_BF16:  # the float32 master and its two float32 moments
        return 12
    if dtype == F32_CAST:  # the float32 moments (θ itself is the model's float32 copy)
        return 8
    return 2 * np.dtype(dtype).itemsize


def make_state(n: int, dtype: np.dtype | str, seed: int = 0) -> tuple[np.ndarray, ...]:
    """(θ, g, m, v): ``n`` elements each, mid-training-like values.

    No gradient is exactly zero and v > 0, so neither moment decays towards the
    subnormal range over many steps (subnormal arithmetic is slow on x86 and
    would measure the FPU instead of memory).
    """
    if dtype == BF16_STATES:
        p, g, m, v = make_state(n, "float32", seed)
        return p, g, m.astype(BFLOAT16), v.astype(BFLOAT16)
    if dtype == Q8_STATES:
        from .._q8 import quantize

        p, g, m, v = make_state(n, "float32", seed)
        mc, ma = quantize(m, signed=True)
        vc, va = quantize(v, signed=False)
        return p, g, mc, vc, ma, va
    if dtype in (MASTER_BF16, F32_CAST):  # (θ, g, m, v, the bfloat16 copy of θ)
        p, g, m, v = make_state(n, "float32", seed)
        return _CopyState((p, g, m, v, p.astype(BFLOAT16)), separate=dtype == F32_CAST)
    dt = np.dtype(dtype)
    rng = np.random.default_rng(seed)
    p = rng.standard_normal(n, dtype=dt)
    g = rng.standard_normal(n, dtype=dt)
    g[g == 0] = 1  # vanishingly rare, but a zero gradient would let m decay to subnormal
    m = rng.standard_normal(n, dtype=dt)
    m *= 0.1
    v = rng.random(n, dtype=dt)
    v *= 0.01
    v += 1e-4
    return p, g, m, v


def cast_copy() -> Callable[[np.ndarray, np.ndarray], None]:
    """The fastest cast-copy of float32 into bfloat16 at hand: torch's ``copy_``
    (vectorized, on torch's threads) where torch is installed, else NumPy's."""
    try:
        import torch
    except ImportError:

        def numpy_cast(src: np.ndarray, dst: np.ndarray) -> None:
            np.copyto(dst, src, casting="unsafe")

        return numpy_cast

    def torch_cast(src: np.ndarray, dst: np.ndarray) -> None:
        torch.from_numpy(dst.view(np.int16)).view(torch.bfloat16).copy_(torch.from_numpy(src))

    return torch_cast


def _fastadam_step(backend: str, state: tuple[np.ndarray, ...]) -> Callable[[], None]:
    steps = itertools.count(1)  # a real training loop's step counter
    adam_step = fastadam.adam_step
    if len(state) == 6:  # 8-bit states: codes and scales
        p, g, m, v, am, av = state

        def run_q8() -> None:
            adam_step(p, g, m, v, step=next(steps), lr=1e-3, backend=backend,
                      exp_avg_absmax=am, exp_avg_sq_absmax=av)  # fmt: skip

        return run_q8
    if len(state) == 5:
        return _master_step(backend, state, steps)
    p, g, m, v = state

    def run() -> None:
        adam_step(p, g, m, v, step=next(steps), lr=1e-3, backend=backend)

    return run


class _CopyState(tuple):
    """(θ, g, m, v, bfloat16 copy) of a MASTER_BF16 step, or of an F32_CAST one
    (``separate``: the float32 step, then the cast-copy)."""

    separate: bool

    def __new__(cls, arrays: tuple[np.ndarray, ...], separate: bool) -> _CopyState:
        self = super().__new__(cls, arrays)
        self.separate = separate
        return self


def _master_step(backend: str, state: tuple[np.ndarray, ...], steps: Any) -> Callable[[], None]:
    """MASTER_BF16: the step writes the copy; F32_CAST: a float32 step, then cast_copy."""
    p, g, m, v, c = state
    adam_step = fastadam.adam_step
    if getattr(state, "separate", False):
        cast = cast_copy()

        def separate() -> None:
            adam_step(p, g, m, v, step=next(steps), lr=1e-3, backend=backend)
            cast(p, c)

        return separate

    def fused() -> None:
        adam_step(p, g, m, v, step=next(steps), lr=1e-3, param_copy=c, backend=backend)

    return fused


def _torch_step(backend: str, state: tuple[np.ndarray, ...]) -> Callable[[], Any]:
    import torch

    p, g = state[0], state[1]
    # The same memory as the NumPy arrays: torch steps the very buffer fastadam does.
    tp = torch.from_numpy(p).requires_grad_(True)
    tp.grad = torch.from_numpy(g)
    kinds: dict[str, dict[str, Any]] = {
        "torch-fused": {"fused": True},
        "torch-foreach": {"foreach": True},
    }
    kind = kinds[backend]
    opt = torch.optim.Adam([tp], lr=1e-3, **kind)
    return opt.step


def _bnb_step(state: tuple[np.ndarray, ...]) -> Callable[[], Any]:
    """bitsandbytes' Adam8bit over the q8 state's θ and g (the same memory fastadam
    steps; bitsandbytes keeps its own 8-bit moments, block-wise, as fastadam's)."""
    import logging

    import torch

    # its CPU backend logs a warning about an optional kernel package at import
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    import bitsandbytes

    tp = torch.from_numpy(state[0]).requires_grad_(True)
    tp.grad = torch.from_numpy(state[1])
    opt = bitsandbytes.optim.Adam8bit([tp], lr=1e-3)
    return opt.step


def make_step(backend: str, state: tuple[np.ndarray, ...]) -> Callable[[], Any]:
    """A no-argument callable doing one Adam step of ``backend`` over ``state``."""
    if backend in TORCH_BACKENDS:
        return _torch_step(backend, state)
    if backend == BNB:
        return _bnb_step(state)
    return _fastadam_step(backend, state)


def _np_add_step(n: int) -> Callable[[], Any]:
    """``np.add(p, g, out=p)`` on ``n`` float32 elements: the per-call yardstick (the
    cheapest call that takes arrays, so a ratio to it cancels the machine's Python speed)."""
    p, g = make_state(n, "float32", seed=1)[:2]
    add = np.add

    def run() -> None:
        add(p, g, out=p)

    return run


def _multi_step(backend: str, k: int, n: int) -> Callable[[], Any]:
    """One :class:`fastadam.MultiTensorPlan` step over ``k`` separate float32 arrays of
    ``n`` elements (the plan validated once, as a training loop uses it)."""
    states = [make_state(n, "float32", seed=i) for i in range(k)]
    params, grads, exp_avgs, exp_avg_sqs = (list(x) for x in zip(*states))
    plan = fastadam.MultiTensorPlan(params, grads, exp_avgs, exp_avg_sqs, backend=backend)
    steps = itertools.count(1)

    def run() -> None:
        plan.step(step=next(steps), lr=1e-3)

    return run
