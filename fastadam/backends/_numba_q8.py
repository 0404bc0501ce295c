"""The Numba backend's 8-bit block-wise state step (issue 18).

The format and the order of operations are :mod:`fastadam._q8`'s (the NumPy
reference); the code map is integer arithmetic on float32 bit patterns, so
the results are bit-identical to it. One launch per step: the blocks of every
tensor of a table, concatenated, are split into one share per thread on block
boundaries (a block is never shared, so the split changes no bit). Each block
is done in two passes while its 256 elements are in L1: the update, keeping
the new moments in two small buffers (one pair per share) and taking their
absmax, then the requantization.
"""

from __future__ import annotations

import functools
from typing import Any

import numpy as np
from numba import njit, prange

from .._q8 import BLOCK, nblocks
from .._scalars import AdamScalars
from ._numba_intrinsics import _bits_f32, _borrow, _f32_bits, _prefer_512_bit_vectors, _view

NAME = "numba"

_U32 = np.uint32
_ONE = np.uint32(0x3F800000)
_MAG = np.uint32(0x7FFFFFFF)
_BASE_M = 0x3F800000 - (127 << 20)
_BASE_V = 0x3F800000 - (255 << 20)
_HALF = 1 << 19
_BASE_M32 = np.uint32(_BASE_M)
_BASE_V32 = np.uint32(_BASE_V)

_JIT = {"cache": True, "nogil": True, "error_model": "numpy"}


@njit(inline="always", **_JIT)
def _y_m(code):
    # every intermediate cast back to 32 bits: Numba widens integer arithmetic to
    # 64 bits, and LLVM narrows it again only through such truncations
    c = np.uint32(code)
    k = np.uint32(c & np.uint32(0x7F))
    mag = np.uint32(np.uint32(k << np.uint32(20)) + _BASE_M32)
    mag = mag if k != np.uint32(0) else np.uint32(0)
    return _bits_f32(np.uint32(mag | np.uint32(np.uint32(c & np.uint32(0x80)) << np.uint32(24))))


@njit(inline="always", **_JIT)
def _y_v(code):
    k = np.uint32(code)
    mag = np.uint32(np.uint32(k << np.uint32(20)) + _BASE_V32)
    return _bits_f32(mag if k != np.uint32(0) else np.uint32(0))


@njit(inline="always", **_JIT)
def _enc_m(x, r):
    u = np.int32(np.uint32(_f32_bits(abs(x) * r) & _MAG))
    # (u - base + half) >> 20 with one add: neither form overflows int32
    t = np.int32(np.int32(u + np.int32(_HALF - _BASE_M)) >> np.int32(20))
    t = min(max(t, np.int32(0)), np.int32(127))
    return np.uint8(
        np.uint32(
            np.uint32(t) | np.uint32(np.uint32(_f32_bits(x) >> np.uint32(24)) & np.uint32(0x80))
        )
    )


@njit(inline="always", **_JIT)
def _enc_v(x, r):
    u = np.int32(np.uint32(_f32_bits(abs(x) * r) & _MAG))
    lo = np.int32(min(_f32_bits(x), np.uint32(1)))  # a positive v is never coded as 0
    t = np.int32(np.int32(u + np.int32(_HALF - _BASE_V)) >> np.int32(20))
    t = min(max(t, lo), np.int32(255))
    return np.uint8(t)


@njit(inline="always", **_JIT)
def _block(p, g, cm, cv, am, av, b, n, c, unscale, maximize, l2, div, mb, vb):
    ss, bc2, eps, omb1, b2, omb2, wd, decay, gs = c
    j0 = b * 256
    j1 = min(j0 + 256, n)
    a_m = am[b]
    a_v = av[b]
    mm = np.uint32(0)
    mv = np.uint32(0)
    for j in range(j0, j1):
        i = np.uint64(j)  # unsigned: no wrap-around guards, so LLVM vectorizes (_numba_loops)
        gi = g[i]
        if unscale:
            gi = gi / gs
            g[i] = gi
        if maximize:
            gi = -gi
        pi = p[i]
        if l2:
            gi = gi + wd * pi
        pi = pi * decay
        m0 = _y_m(cm[i]) * a_m
        v0 = _y_v(cv[i]) * a_v
        m = m0 + (gi - m0) * omb1
        v = v0 * b2 + omb2 * gi * gi
        sq = np.sqrt(v)
        if div:
            sq = sq / bc2
        p[i] = pi - ss * m / (sq + eps)
        mb[i - np.uint64(j0)] = m
        vb[i - np.uint64(j0)] = v
        bm = np.uint32(_f32_bits(m) & _MAG)
        bv = np.uint32(_f32_bits(v) & _MAG)
        mm = bm if bm > mm else mm
        mv = bv if bv > mv else mv
    one = np.float32(1.0)
    r_m = one / _bits_f32(mm) if mm != np.uint32(0) else np.float32(0.0)
    r_v = one / _bits_f32(mv) if mv != np.uint32(0) else np.float32(0.0)
    for j in range(j1 - j0):
        i = np.uint64(j)
        cm[i + np.uint64(j0)] = _enc_m(mb[i], r_m)
        cv[i + np.uint64(j0)] = _enc_v(vb[i], r_v)
    am[b] = _bits_f32(mm)
    av[b] = _bits_f32(mv)


def _make(parallel: bool, unscale: bool, maximize: bool, l2: bool, div: bool):
    """The loop over a table's blocks with the flags as compile-time constants
    (LLVM then keeps no branch on them in the vector loops)."""
    rng = prange if parallel else range

    def q8(pointers, sizes, boffsets, consts, index, parts):
        _prefer_512_bit_vectors()
        count = sizes.size
        total = boffsets[count]
        f = np.float32
        for part in rng(parts):
            lo = total * part // parts
            hi = total * (part + 1) // parts
            k = np.searchsorted(boffsets, lo, side="right") - 1
            mb = np.empty(256, np.float32)  # the block's new moments, in L1
            vb = np.empty(256, np.float32)
            while k < count and boffsets[k] < hi:
                n = sizes[k]
                nb = boffsets[k + 1] - boffsets[k]
                b0 = max(lo - boffsets[k], 0)
                b1 = min(hi - boffsets[k], nb)
                s = index[k]
                c = (f(consts[s, 0]), f(consts[s, 1]), f(consts[s, 2]), f(consts[s, 3]),
                     f(consts[s, 4]), f(consts[s, 5]), f(consts[s, 6]), f(consts[s, 7]),
                     f(consts[s, 8]))  # fmt: skip
                p = _view(pointers[0, k], n, np.float32)
                g = _view(pointers[1, k], n, np.float32)
                cm = _view(pointers[2, k], n, np.uint8)
                cv = _view(pointers[3, k], n, np.uint8)
                am = _view(pointers[4, k], nb, np.float32)
                av = _view(pointers[5, k], nb, np.float32)
                for b in range(b0, b1):
                    _block(p, g, cm, cv, am, av, b, n, c, unscale, maximize, l2, div,
                           _borrow(mb), _borrow(vb))  # fmt: skip
                k += 1

    return q8


@functools.cache
def _loops(unscale: bool, maximize: bool, l2: bool, div: bool) -> tuple:
    """(serial, parallel) loops for these flags; compiled on first use, cached on disk."""
    return (njit(**_JIT)(_make(False, unscale, maximize, l2, div)),
            njit(parallel=True, **_JIT)(_make(True, unscale, maximize, l2, div)))  # fmt: skip


def _run(pointers: np.ndarray, sizes: np.ndarray, scalars: tuple[AdamScalars, ...],
         index: np.ndarray | None) -> None:  # fmt: skip
    from . import numba_

    count = sizes.shape[0]
    boffsets = np.zeros(count + 1, np.int64)
    np.cumsum((sizes + (BLOCK - 1)) // BLOCK, out=boffsets[1:])
    consts = np.array([sc[:9] for sc in scalars], np.float64)
    if index is None:
        index = np.zeros(count, np.int32)
    sc = scalars[0]
    div = any(s.bias_correction2_sqrt != 1.0 for s in scalars)
    serial, parallel = _loops(bool(sc.unscale), bool(sc.maximize), sc.weight_decay != 0.0, div)
    args = (pointers, sizes, boffsets, consts, index)
    numba_._launch(serial, parallel, args, int(boffsets[count]) * BLOCK)


def step_q8(param, grad, exp_avg, exp_avg_sq, exp_avg_absmax, exp_avg_sq_absmax, sc) -> None:
    """One 8-bit step in place (arrays validated by the caller, see fastadam._q8)."""
    from .._table import address

    if param.size == 0:
        return
    arrays = (param, grad, exp_avg, exp_avg_sq, exp_avg_absmax, exp_avg_sq_absmax)
    pointers = np.array([[address(a)] for a in arrays], np.uintp)
    sizes = np.array([param.size], np.int64)
    assert exp_avg_absmax.size == nblocks(param.size)
    _run(pointers, sizes, (sc,), None)


def step_multi_q8(table: Any, scalars: tuple[AdamScalars, ...], index: np.ndarray | None) -> None:
    """Every tensor of a q8 table (pointers uintp (6, count)) in one launch."""
    if table.count:
        _run(table.pointers, table.sizes, scalars, index)
