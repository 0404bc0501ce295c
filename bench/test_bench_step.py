"""One Adam step per backend and size, grouped by size.

    pytest bench/test_bench_step.py --benchmark-only

float32 from 2^12 to 2^26 elements (every other power of two) and float64 at
2^16, 2^20 and 2^24, for the NumPy reference, Numba, C, and torch's
``Adam(fused=True)`` and ``Adam(foreach=True)`` stepping the same buffer (the
torch tensors share the NumPy arrays' memory). A float32 step moves 28 bytes
per element (56 in float64): the GB/s summary at the end says how close each
one gets to the memory bandwidth; ``python -m fastadam bench`` also measures
the roofline itself.
"""

from __future__ import annotations

import numpy as np
import pytest

from fastadam.bench import ALL_BACKENDS, bytes_per_element, format_n, make_step

SIZES_F32 = [1 << k for k in range(12, 27, 2)]
SIZES_F64 = [1 << 16, 1 << 20, 1 << 24]

# Ordered size by size so the one-slot state cache serves every backend of a size.
CASES = [
    pytest.param(dt, n, b, id=f"{dt}-2pow{n.bit_length() - 1}-{b}")
    for dt, sizes in (("float32", SIZES_F32), ("float64", SIZES_F64))
    for n in sizes
    for b in ALL_BACKENDS
]


@pytest.mark.parametrize("dtype, n, backend", CASES)
def test_adam_step(
    benchmark,
    report_gbps,
    require_backend,
    shared_state,
    schedule,
    dtype: str,
    n: int,
    backend: str,
) -> None:
    require_backend(backend)
    state = shared_state(n, dtype)
    step = make_step(backend, state)
    benchmark.group = f"{dtype} n={format_n(n)}"
    benchmark.extra_info.update(backend=backend, n=n, dtype=dtype)
    rounds, iterations = schedule(n)
    benchmark.pedantic(step, rounds=rounds, iterations=iterations, warmup_rounds=1)
    assert np.isfinite(state[0][:8]).all()  # the update stayed numerically sane
    report_gbps(benchmark, bytes_per_element(dtype) * n)
