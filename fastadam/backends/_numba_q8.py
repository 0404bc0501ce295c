"""The Numba backend's 8-bit block-wise state step (issue 18).

The format and the order of operations are :mod:`fastadam._q8`'s (the NumPy
reference); the code map is integer arithmetic on float32 bit patterns, so
the results are bit-identical to it. One launch per step: the blocks of every
tensor of a table, concatenated, are split into one share per thread on block
boundaries (a block is never shared, so the split changes no bit). Each block
is done in passes while its 256 elements are in L1: the update, keeping the
new moments in a small buffer (one per share), their absmax, and the
requantization, which runs with the next block's update (see _pass and
_blocks). On x86 targets with AVX2 (AVX-512 or not) the update is one vector
intrinsic per 32 elements, and the previous block's codes are written between
its calls (_numba_q8_simd); elsewhere LLVM vectorizes the per-element code.
"""

from __future__ import annotations

import functools
from typing import Any

import numpy as np
from numba import njit, prange

from .._numba_cache import njit as cached_njit
from .._q8 import BLOCK, nblocks
from .._scalars import AdamScalars
from . import numba_
from ._numba_intrinsics import (
    _bits_f32,
    _borrow,
    _f32_bits,
    _prefer_512_bit_vectors,
    _prefetch_line,
    _view,
)
from ._numba_q8_simd import (
    _BASE_M,
    _BASE_V,
    _HALF,
    ACC,
    FUSED,
    LANES,
    PACKS,
    _acc_max,
    _codes_vectors,
    _update_vectors,
)

NAME = "numba"
# adam_step_q8 reads these beside step_fast_q8 (the one-call path, below)
DECLINED = numba_.DECLINED
# step_fast_q8's answer for arrays it checked and leaves to the parallel loop
# (_numba_cfunc.step_q8 runs arrays below config.PARALLEL_MIN_ELEMENTS only)
CHECKED_LARGE = 2
_raise_code = numba_._raise_code

_MAG = np.uint32(0x7FFFFFFF)
_BASE_M32 = np.uint32(_BASE_M)
_BASE_V32 = np.uint32(_BASE_V)

# the loops are cached on disk, their saves locked (_numba_cache)
_JIT = {"nogil": True, "error_model": "numpy"}

#: Floats in the blocks' scratch buffer (_blocks' ``buf``): two blocks' new
#: moments, then _update_vectors' running maxima at ACC. Every caller of _blocks
#: allocates this many (_make, and the one-call path of _numba_cfunc).
BUFFER = ACC + 32

# Each block asks for the lines of the block this many blocks on (see _pass).
# Two rather than one: 0.96x the step time at 2^24 and 2^26 on two threads,
# level at 2^20; three and four no better (Intel Xeon, session 15). The C
# blocks' FA_Q8_AHEAD is 3, measured on a Zen 5.
_AHEAD = 2
_AHEAD_ELEMENTS = _AHEAD * BLOCK


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
    # bits(x * r) & MAG where the reference has bits(|x| * r) & MAG: the products
    # differ only in the sign bit, which the mask clears (fastadam_kernel_q8.h)
    u = np.int32(np.uint32(_f32_bits(x * r) & _MAG))
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
    u = np.int32(np.uint32(_f32_bits(x * r) & _MAG))
    lo = np.int32(min(_f32_bits(x), np.uint32(1)))  # a positive v is never coded as 0
    t = np.int32(np.int32(u + np.int32(_HALF - _BASE_V)) >> np.int32(20))
    t = min(max(t, lo), np.int32(255))
    return np.uint8(t)


@njit(inline="always", **_JIT)
def _element(p, g, cm, cv, a_m, a_v, j, c, unscale, maximize, l2, div, buf, o):
    """Element ``j``: the update on the dequantized moments, the new ones kept in
    ``buf[o]`` (m) and ``buf[o + 256]`` (v); returns their magnitude bits (for
    the block's absmax)."""
    ss, bc2, eps, omb1, b2, omb2, wd, decay, gs = c
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
    k = np.uint64(o)
    m0 = _y_m(cm[i]) * a_m
    v0 = _y_v(cv[i]) * a_v
    m = m0 + (gi - m0) * omb1
    v = v0 * b2 + omb2 * gi * gi
    sq = np.sqrt(v)
    if div:
        sq = sq / bc2
    p[i] = pi - ss * m / (sq + eps)
    buf[k] = m
    buf[k + np.uint64(256)] = v
    return np.uint32(_f32_bits(m) & _MAG), np.uint32(_f32_bits(v) & _MAG)


@njit(inline="always", **_JIT)
def _codes(cm, cv, buf, o, j, r_m, r_v):
    """The codes of element ``j`` from ``buf[o]`` (m) and ``buf[o + 256]`` (v)."""
    i = np.uint64(j)
    k = np.uint64(o)
    cm[i] = _enc_m(buf[k], r_m)
    cv[i] = _enc_v(buf[k + np.uint64(256)], r_v)


@njit(inline="always", **_JIT)
def _reciprocal(bits):
    return np.float32(1.0) / _bits_f32(bits) if bits != np.uint32(0) else np.float32(0.0)


if PACKS:

    @njit(inline="always", **_JIT)
    def _codes_block(cm, cv, buf, o, j0, r_m, r_v):
        """The codes of the 256 elements from ``j0``, their moments in ``buf`` at
        ``o``: LANES at a time, packed as the C kernels pack them (see
        _numba_q8_simd)."""
        for j in range(0, 256, LANES):
            _codes_vectors(cm, cv, buf, o + j, j0 + j, r_m, r_v)

else:

    @njit(inline="always", **_JIT)
    def _codes_block(cm, cv, buf, o, j0, r_m, r_v):
        """The codes of the 256 elements from ``j0``, their moments in ``buf`` at ``o``."""
        for j in range(0, 256):
            _codes(cm, cv, buf, o + j, j0 + j, r_m, r_v)


@njit(inline="always", **_JIT)
def _pass(p, g, cm, cv, am, av, b, c, unscale, maximize, l2, div, buf, new, ahead):
    """The update of full block ``b``, its new moments into ``buf`` at ``new``, then
    their absmax in a loop of its own over ``buf``. The block's new scales are
    stored here; its reciprocals are returned, for its codes after the next
    block's update (see _blocks).

    The absmax as a loop of its own, rather than four reductions a block (one
    per quarter) in the update loop, and with the codes' lag of _blocks: on a
    Zen 5 in cache 0.39 against 0.43 ns/element, AVX2 code 0.74 against 0.79
    (BENCHMARKS.md, session 13). The C blocks' other schedule, each block's
    codes inside the next block's update loop, lost to this one in Numba on
    every target (session 15) until the update became one intrinsic:
    _pass_fused, used on AVX-512 BW targets since session 18 and on every x86
    target with AVX2 since session 20; this pass is for the others (aarch64).

    ``ahead``: the block _AHEAD blocks on is a full one of this share. The loop
    runs as four of 64 elements, each first asking for its quarter of that
    block's lines: the streamer alone left them unrequested. Loops of a constant 64: a
    min() bound, or the 40 prefetches issued at once, left the update scalar or
    cost 25% (session 11).
    """
    j0 = b * 256
    a_m = am[b]
    a_v = av[b]
    mm = np.uint32(0)
    mv = np.uint32(0)
    for quarter in range(4):
        c0 = j0 + 64 * quarter
        if ahead:
            for line in range(0, 64, 16):  # 16 float32 a cache line
                _prefetch_line(p, c0 + _AHEAD_ELEMENTS + line)
                _prefetch_line(g, c0 + _AHEAD_ELEMENTS + line)
            _prefetch_line(cm, c0 + _AHEAD_ELEMENTS)
            _prefetch_line(cv, c0 + _AHEAD_ELEMENTS)
        for j in range(c0, c0 + 64):
            _element(p, g, cm, cv, a_m, a_v, j, c, unscale, maximize, l2, div, buf, new + j - j0)
    for k in range(new, new + 256):
        bm = np.uint32(_f32_bits(buf[np.uint64(k)]) & _MAG)
        bv = np.uint32(_f32_bits(buf[np.uint64(k + 256)]) & _MAG)
        mm = bm if bm > mm else mm
        mv = bv if bv > mv else mv
    am[b] = _bits_f32(mm)
    av[b] = _bits_f32(mv)
    return _reciprocal(mm), _reciprocal(mv)


@njit(inline="always", **_JIT)
def _pass_fused(p, g, cm, cv, am, av, b, c, flags, buf, new, ahead, r_m, r_v, prev):
    """The update of full block ``b``, its new moments into ``buf`` at
    ``new``, 32 elements a call of _update_vectors, with the previous
    block's codes (``prev``: there is one, its moments at ``512 - new``, its
    reciprocal scales ``r_m``, ``r_v``) written 32 at a time between the
    calls. The block's new scales are stored here; its reciprocals are
    returned, for its codes during the next block's update.

    The C kernel's schedule. The update waits on the divider and the codes
    need none; in one loop the out-of-order core runs the codes in the
    divider's shadow, where the update loop LLVM vectorizes, the absmax
    loop and the codes loop one after another left them outside it (Intel
    Xeon, session 18: 0.94-0.96x the step time in L2, 0.95-0.98x at 2^24-2^26).
    Compiled for AVX2 without AVX-512 it replaced _pass with a decode of 16
    codes at a time into ``buf`` ahead of LLVM's update loop: 0.93x and 0.96x
    the step time at 2^24, level at 2^16-2^18 and on gpt2-mini (session 20);
    writing the codes after the whole update, as the C AVX2 kernel does, was
    no better (0.96x).
    ``ahead``: see _pass; the floats' lines are asked for 32
    elements at a time, just before their update, rather than a quarter's
    at once (0.94-0.99x the step time at 2^20-2^26 on two threads, 0.97x at
    2^24 on one).
    """
    j0 = b * 256
    a_m = am[b]
    a_v = av[b]
    for k in range(ACC, ACC + 32):
        buf[k] = np.float32(0.0)
    old = 512 - new
    for quarter in range(4):
        o = 64 * quarter
        if ahead:  # the codes' line of this quarter, _AHEAD blocks on
            _prefetch_line(cm, j0 + o + _AHEAD_ELEMENTS)
            _prefetch_line(cv, j0 + o + _AHEAD_ELEMENTS)
        for h in range(o, o + 64, 32):
            if ahead:  # and the floats' lines of these 32 elements
                for line in range(0, 32, 16):
                    _prefetch_line(p, j0 + h + line + _AHEAD_ELEMENTS)
                    _prefetch_line(g, j0 + h + line + _AHEAD_ELEMENTS)
            _update_vectors(p, g, cm, cv, buf, new + h, j0 + h, c, a_m, a_v, flags)
            if prev:  # LANES elements a call: 32 with AVX-512, 16 with AVX2
                for q in range(h, h + 32, LANES):
                    _codes_vectors(cm, cv, buf, old + q, j0 - 256 + q, r_m, r_v)
    mm, mv = _acc_max(buf)
    am[b] = _bits_f32(mm)
    av[b] = _bits_f32(mv)
    return _reciprocal(mm), _reciprocal(mv)


@cached_njit(**_JIT)
def _single(p, g, cm, cv, am, av, b, end, c, unscale, maximize, l2, div, buf):
    """Elements [256 b, end) of the partial block ``b`` a tensor may end with: the
    update, then the codes (its new moments in ``buf`` at 0).

    A function of its own, not inlined: that keeps a second copy of the update
    out of each loop, and inlined beside _pass in the parallel loop, the
    partial block got a wrong scale from Numba 0.68's parfor lowering (the
    two-thread parity test of tests/test_q8.py caught it).
    """
    _prefer_512_bit_vectors()
    j0 = b * 256
    a_m = am[b]
    a_v = av[b]
    tm = np.uint32(0)
    tv = np.uint32(0)
    for j in range(j0, end):
        bm_, bv_ = _element(p, g, cm, cv, a_m, a_v, j, c, unscale, maximize, l2, div, buf, j - j0)
        tm = bm_ if bm_ > tm else tm
        tv = bv_ if bv_ > tv else tv
    am[b] = _bits_f32(tm)
    av[b] = _bits_f32(tv)
    r_m = _reciprocal(tm)
    r_v = _reciprocal(tv)
    for j in range(j0, end):
        _codes(cm, cv, buf, j - j0, j, r_m, r_v)


@njit(inline="always", **_JIT)
def _blocks(p, g, cm, cv, am, av, b0, b1, n, c, unscale, maximize, l2, div, buf):
    """Blocks [b0, b1) of one tensor: the full ones, then the partial one the tensor
    may end with. buf holds two blocks' moments, at 0 and 512: each block's codes
    are written with (or after) the next block's update, so that its scale's
    reduction and reciprocals were done a whole update before and the
    out-of-order core need not wait for them (see _pass).
    """
    # here, not in the loop over shares: prange outlines its body into a function
    # of its own, which a call outside it left at 256-bit vectors (session 15)
    _prefer_512_bit_vectors()
    full = min(b1, n // 256)
    f0 = np.float32(0.0)
    new = 0
    r_m, r_v = f0, f0
    if FUSED:
        flags = (unscale, maximize, l2, div)
        for b in range(b0, full):
            r_m, r_v = _pass_fused(p, g, cm, cv, am, av, b, c, flags, buf, new,
                                   b + _AHEAD < full, r_m, r_v, b > b0)  # fmt: skip
            new = 512 - new
    else:
        for b in range(b0, full):
            rm_b, rv_b = _pass(p, g, cm, cv, am, av, b, c, unscale, maximize, l2, div, buf, new,
                               b + _AHEAD < full)  # fmt: skip
            if b > b0:
                _codes_block(cm, cv, buf, 512 - new, (b - 1) * 256, r_m, r_v)
            r_m, r_v = rm_b, rv_b
            new = 512 - new
    if full > b0:  # the codes of the last full block
        _codes_block(cm, cv, buf, 512 - new, (full - 1) * 256, r_m, r_v)
    if b1 > full and b1 > b0:
        _single(p, g, cm, cv, am, av, b1 - 1, n, c, unscale, maximize, l2, div, buf)


def _make(parallel: bool, unscale: bool, maximize: bool, l2: bool, div: bool):
    """The loop over a table's blocks with the flags as compile-time constants
    (LLVM then keeps no branch on them in the vector loops)."""
    rng = prange if parallel else range

    def q8(pointers, sizes, boffsets, consts, index, parts):
        count = sizes.size
        total = boffsets[count]
        f = np.float32
        for part in rng(parts):
            lo = total * part // parts
            hi = total * (part + 1) // parts
            k = np.searchsorted(boffsets, lo, side="right") - 1
            buf = np.empty(BUFFER, np.float32)  # in L1
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
                _blocks(p, g, cm, cv, am, av, b0, b1, n, c, unscale, maximize, l2, div,
                        _borrow(buf))  # fmt: skip
                k += 1

    return q8


@functools.cache
def _loops(unscale: bool, maximize: bool, l2: bool, div: bool) -> tuple:
    """(serial, parallel) loops for these flags; compiled on first use, cached on disk."""
    flags = (unscale, maximize, l2, div)
    return (cached_njit(_make(False, *flags), **_JIT),
            cached_njit(_make(True, *flags), parallel=True, **_JIT))  # fmt: skip


@functools.lru_cache(maxsize=256)
def _plan(scalars: tuple[AdamScalars, ...]) -> tuple[np.ndarray, tuple[bool, bool, bool, bool]]:
    """The loops' float64 constants (one row per scalars) and compile-time flags.

    Memoized: the scalars of a step are the same (memoized) objects for every
    tensor and call of that step, so each step builds these once."""
    consts = np.array([sc[:9] for sc in scalars], np.float64)
    sc = scalars[0]
    div = any(s.bias_correction2_sqrt != 1.0 for s in scalars)
    return consts, (bool(sc.unscale), bool(sc.maximize), sc.weight_decay != 0.0, div)


def _block_offsets(sizes: np.ndarray) -> np.ndarray:
    """Each tensor's first block in the concatenation of all their blocks, and the total."""
    boffsets = np.zeros(sizes.shape[0] + 1, np.int64)
    np.cumsum((sizes + (BLOCK - 1)) // BLOCK, out=boffsets[1:])
    return boffsets


_ONE_INDEX = np.zeros(1, np.int32)


def _run(pointers: np.ndarray, sizes: np.ndarray, boffsets: np.ndarray,
         scalars: tuple[AdamScalars, ...], index: np.ndarray) -> None:  # fmt: skip
    consts, flags = _plan(scalars)
    serial, parallel = _loops(*flags)
    args = (pointers, sizes, boffsets, consts, index)
    numba_._launch(serial, parallel, args, int(boffsets[-1]) * BLOCK)


@cached_njit(**_JIT)
def _one_table(p, g, cm, cv, am, av):
    """The table of one tensor (_make's pointers, sizes and block offsets). In
    nopython code an array's address costs no Python attribute lookup: 0.6
    against 7 us for the six (Intel Xeon, session 20)."""
    pointers = np.empty((6, 1), np.uintp)
    pointers[0, 0] = p.ctypes.data
    pointers[1, 0] = g.ctypes.data
    pointers[2, 0] = cm.ctypes.data
    pointers[3, 0] = cv.ctypes.data
    pointers[4, 0] = am.ctypes.data
    pointers[5, 0] = av.ctypes.data
    sizes = np.empty(1, np.int64)
    sizes[0] = p.size
    boffsets = np.empty(2, np.int64)
    boffsets[0] = 0
    boffsets[1] = am.size
    return pointers, sizes, boffsets


def step_q8(param, grad, exp_avg, exp_avg_sq, exp_avg_absmax, exp_avg_sq_absmax, sc) -> None:
    """One 8-bit step in place (arrays validated by the caller, see fastadam._q8:
    flat, contiguous, one scale per block)."""
    if param.size == 0:
        return
    assert exp_avg_absmax.size == nblocks(param.size)
    pointers, sizes, boffsets = _one_table(param, grad, exp_avg, exp_avg_sq, exp_avg_absmax,
                                           exp_avg_sq_absmax)  # fmt: skip
    _run(pointers, sizes, boffsets, (sc,), _ONE_INDEX)


def _bind_step_fast_q8() -> Any:
    """fastadam._pycall's ``step_q8`` bound to the blocks compiled as a C function
    (_numba_cfunc.step_q8, which declines arrays of PARALLEL_MIN_ELEMENTS and
    more); None where the extension was not built (or predates bind_q8)."""
    try:
        from .. import _pycall  # type: ignore[attr-defined]
    except ImportError:
        return None
    bind_q8 = getattr(_pycall, "bind_q8", None)
    if bind_q8 is None:
        return None
    from . import _numba_cfunc

    return bind_q8(np.ndarray, _numba_cfunc.step_q8.address)


def __getattr__(name: str) -> Any:
    # step_fast_q8 compiles a cfunc: only when adam_step first asks for it (PEP 562).
    if name == "step_fast_q8":
        fn = globals()["step_fast_q8"] = _bind_step_fast_q8()
        return fn
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def step_multi_q8(table: Any, scalars: tuple[AdamScalars, ...], index: np.ndarray | None) -> None:
    """Every tensor of a q8 table (pointers uintp (6, count)) in one launch."""
    if not table.count:
        return
    # what never changes for a table: its block offsets and an all-zeros index
    cached = table.cache.get("numba-q8")
    if cached is None:
        cached = table.cache["numba-q8"] = (_block_offsets(table.sizes),
                                            np.zeros(table.count, np.int32))  # fmt: skip
    boffsets, zeros = cached
    _run(table.pointers, table.sizes, boffsets, scalars, zeros if index is None else index)
