"""The roofline: a trivial Numba kernel that moves the bytes of a step, best of runs."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

import fastadam

from .steps import BF16_STATES, F32_CAST, MASTER_BF16, Q8_STATES, bytes_per_element
from .timing import time_calls

Roofline = dict[str, dict[int, float]]  # dtype -> {n: GB/s}


def roofline_for(roofline: Roofline, dtype: str, n: int) -> float | None:
    """The roofline a record of ``n`` elements is compared with.

    The one measured at ``n`` with ``--roofline-per-size``, otherwise the one
    measured at the largest size.
    """
    per_size = roofline.get(dtype)
    if not per_size:
        return None
    return per_size.get(n, per_size[max(per_size)])


_roofline_kernel: tuple[Callable[..., None], Callable[..., None]] | None = None


def _get_roofline_kernel() -> tuple[Callable[..., None], Callable[..., None]]:
    """The roofline kernels (float states, bfloat16 states), compiled on first use."""
    global _roofline_kernel
    if _roofline_kernel is None:
        # fastadam's Numba backend picks Numba's threading layer when it loads;
        # load it first so the roofline runs on the same layer as the backend.
        fastadam.available_backends()
        import numba

        from .._numba_cache import njit as cached_njit

        # error_model="numpy": no ZeroDivisionError bookkeeping, nothing that
        # blocks vectorization. No allocation: every element is updated in place.
        @cached_njit(parallel=True, error_model="numpy", nogil=True)
        def move_step_bytes(p, g, m, v):  # pragma: no cover - compiled
            for i in numba.prange(p.size):
                gi = g[i]
                p[i] += gi
                m[i] += gi
                v[i] += gi * gi  # stays >= 0, like a second moment

        @cached_njit(parallel=True, error_model="numpy", nogil=True)
        def move_bf16_step_bytes(p, g, m, v):  # pragma: no cover - compiled
            # m, v: the bfloat16 states' bits (uint16), read and written.
            for i in numba.prange(p.size):
                p[i] += g[i]
                m[i] ^= 1
                v[i] ^= 1

        _roofline_kernel = (move_step_bytes, move_bf16_step_bytes)
    return _roofline_kernel


_copy_kernels: tuple[Callable[..., None], Callable[..., None]] | None = None


def _get_copy_kernels() -> tuple[Callable[..., None], Callable[..., None]]:
    """The roofline kernels of the master-weights pair (issue 17): the float32 step's
    bytes plus a 16-bit copy written in the same pass; and the copy written in a
    second pass that reads θ again."""
    global _copy_kernels
    if _copy_kernels is None:
        float_kernel, _ = _get_roofline_kernel()
        import numba

        from .._numba_cache import njit as cached_njit

        @cached_njit(parallel=True, error_model="numpy", nogil=True)
        def move_master_bytes(p, g, m, v, c):  # pragma: no cover - compiled
            for i in numba.prange(p.size):
                gi = g[i]
                p[i] += gi
                m[i] += gi
                v[i] += gi * gi
                c[i] = numba.uint16(0x3F80)  # a store, as the copy's

        @cached_njit(parallel=True, error_model="numpy", nogil=True)
        def move_cast_bytes(bits, c):  # pragma: no cover - compiled
            # bits: θ's float32 bits (uint32); its top half is a bfloat16 (truncated)
            for i in numba.prange(bits.size):
                c[i] = numba.uint16(bits[i] >> 16)

        def move_step_then_cast_bytes(p, g, m, v, c):
            float_kernel(p, g, m, v)
            move_cast_bytes(p.view(np.uint32), c)

        _copy_kernels = (move_master_bytes, move_step_then_cast_bytes)
    return _copy_kernels


def measure_roofline(
    n: int, dtype: np.dtype | str, threads: int, *, min_time: float, repeat: int | None
) -> float:
    """Best-case GB/s of the step's access pattern (4 reads + 3 writes) over ``n`` elements.

    Best of several runs, not the median: this is the upper bound a step can
    reach on this machine, with ``threads`` Numba threads.
    """
    import numba

    float_kernel, bf16_kernel = _get_roofline_kernel()
    if dtype in (MASTER_BF16, F32_CAST):
        master_kernel, cast_kernel = _get_copy_kernels()
        kernel = master_kernel if dtype == MASTER_BF16 else cast_kernel
        arrays = [np.full(n, x, dtype=np.float32) for x in (1.0, 0.5, 0.1, 0.01)]
        arrays.append(np.full(n, 0x3F80, dtype=np.uint16))
    elif dtype == BF16_STATES:
        kernel = bf16_kernel
        arrays = [np.full(n, x, dtype=np.float32) for x in (1.0, 0.5)]
        arrays += [np.full(n, x, dtype=np.uint16) for x in (0x3DCC, 0x3C23)]
    elif dtype == Q8_STATES:
        kernel = bf16_kernel  # the same access pattern on 1-byte codes (scales: 0.4%)
        arrays = [np.full(n, x, dtype=np.float32) for x in (1.0, 0.5)]
        arrays += [np.full(n, x, dtype=np.uint8) for x in (0x3D, 0x3C)]
    else:
        kernel = float_kernel
        # np.full touches every page
        arrays = [np.full(n, x, dtype=np.dtype(dtype)) for x in (1.0, 0.5, 0.1, 0.01)]
    numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
    best, _ = time_calls(lambda: kernel(*arrays), min_time=min_time, repeat=repeat, best=True)
    return bytes_per_element(dtype) * n / best / 1e9
