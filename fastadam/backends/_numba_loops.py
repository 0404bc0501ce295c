"""The Numba backend's loops: the update's helpers and the compiled loops'
factories (single-array and multi-tensor; float states and bfloat16 states;
serial and parallel), and the gradient-unscaling loop.

Every compiled loop is cached on disk by :func:`fastadam._numba_cache.njit`
(which keeps the cache sound when processes fill it at once), by this file: see
:mod:`fastadam.backends._numba_intrinsics` on editing the intrinsics it uses.
:mod:`fastadam.backends.numba_` chooses and launches them.
"""

from __future__ import annotations

import functools

import numpy as np
from numba import njit, prange

from .._numba_cache import njit as cached_njit
from .._scalars import STATE_BF16_STOCHASTIC, AdamScalars
from ._numba_intrinsics import (
    _BLOCK,
    _bits_f32,
    _borrow,
    _f32_bits,
    _fma,
    _inline_in_llvm,
    _prefer_512_bit_vectors,
    _prefetch_ahead,
    _random_bits,
    _to_line,
    _view,
    has_fma,
)

# The loops take the scalars by position (``*sc`` for one tensor, the first nine
# fields as a row of ``consts`` for a table), so their parameter order must be
# AdamScalars' field order: checked here, as c.py checks the C struct's.
_LOOP_SCALARS = (
    "step_size", "bias_correction2_sqrt", "eps", "one_minus_beta1", "beta2", "one_minus_beta2",
    "weight_decay", "decay", "grad_scale", "unscale", "maximize", "amsgrad", "state_rounding",
    "rounding_key",
)  # fmt: skip
if AdamScalars._fields != _LOOP_SCALARS:
    raise ImportError(
        f"fastadam Numba backend: its loops take {_LOOP_SCALARS}, AdamScalars has "
        f"{AdamScalars._fields}"
    )


# The helpers below take and return scalars only. A helper handed an array, even
# inlined, makes Numba count a reference to it for every element it is called on
# (an atomic increment and decrement each): that made the serial loops ~100x
# slower. So every load and store is in the loop itself.


@njit(inline="always")
def _gradient(gi, theta, wd, decay, maximize, l2, decoupled):
    """The gradient as the update uses it (negated if ``maximize``, plus L2 weight
    decay) and the parameter (times ``decay`` if ``decoupled``)."""
    if maximize:
        gi = -gi
    if l2:
        gi = gi + wd * theta  # uses theta before the decoupled decay
    if decoupled:
        theta = theta * decay
    return gi, theta


@njit(inline="always")
def _moments(gi, mi, vi, omb1, b2, omb2):
    """The new first and second moments, before any rounding to a storage dtype."""
    return mi + (gi - mi) * omb1, vi * b2 + omb2 * gi * gi


# Whether the loops divide by bias_correction2_sqrt through its reciprocal: a
# compile-time constant of each loop (the on-disk cache is kept per target CPU).
_FMA_DIVIDE = has_fma()
#: The bias_correction2_sqrt for which that is exact (FA_BC2_RCP in
#: csrc/fastadam_internal.h says why): compute_scalars' lie in [2^-27, 1], and
#: the entry points refuse any other (check_bias_correction2).
BC2_RANGE = (2.0**-40, 2.0)


def check_bias_correction2(b: float) -> None:
    """Refuse a bias_correction2_sqrt the loops cannot divide by exactly (see
    _divide_bc2): a ValueError naming it."""
    if not BC2_RANGE[0] <= b <= BC2_RANGE[1]:
        raise ValueError(
            f"bias_correction2_sqrt must lie in [2^-40, 2] for the Numba loops, got {b!r} "
            "(compute_scalars gives sqrt(1 - beta2**step) in (0, 1])"
        )


@njit(inline="always")
def _bc2_reciprocal(t, b):
    """RN(1 / b) in the float type ``t`` for _divide_bc2 (0 where it divides)."""
    if _FMA_DIVIDE:
        return t(1.0) / b
    return t(0.0)


@njit(inline="always")
def _divide_bc2(a, b, y, inf):
    """a / b correctly rounded, for a = sqrt(v) (+0, a normal number, +Inf or
    NaN; not -0, which sqrt gives only for a stored -0 no update leaves) and b
    in BC2_RANGE. On FMA targets from y = RN(1 / b) (Markstein: q0 = RN(a y),
    the remainder a - b q0 exact in one FMA, then RN(q0 + r y) is the quotient;
    +Inf and NaN keep q0, which is theirs), else by dividing. The C kernels'
    div_bc2 (csrc/fastadam_kernel_impl.h) is the same sequence and explains its
    conditions; tests/test_numba_fma_division.py checks the bits.

    Why: a 512-bit divide issues no faster per element than a 256-bit one, and
    the float32 step divided twice per element. With no run-time test in the
    loop (the range is checked at the entry points): 1.26x the float32 step's
    speed at 2^16 (one thread) and 2^18 (two), Intel Xeon, session 19. A test
    of y != 0 in the loop, for a fallback to dividing, made the parallel loop
    1.2x slower than before instead: LLVM left it in the vector loop.
    """
    if _FMA_DIVIDE:
        q0 = a * y
        q = _fma(_fma(-q0, b, a), y, q0)
        return q if q0 < inf else q0
    return a / b


@njit(inline="always")
def _running_max(vm, vi):
    """np.maximum(vm, vi): a NaN in either operand wins."""
    return vm if (vm > vi or vm != vm) else vi


@njit(inline="always")
def _parts(threads, blocks):
    """How many shares a loop splits its blocks into: one per thread."""
    return max(1, min(threads, blocks))


@njit(inline="always")
def _share(part, parts, blocks):
    """Blocks ``[first, end)`` of share ``part`` of ``parts``: the even split."""
    return blocks * part // parts, blocks * (part + 1) // parts


@njit
def _tensor_at(offsets, i):
    """The tensor of a table holding element ``i`` of the concatenated range: the
    last ``k`` with ``offsets[k] <= i`` (so never an empty tensor when ``i`` is
    in range; ``count`` when ``i`` is the total)."""
    return np.searchsorted(offsets, i, side="right") - 1


@njit
def _split_point(offsets, sizes, i):
    """Where a share of a table's concatenated range starting near element ``i``
    starts: ``i`` moved forward to a _BLOCK boundary of the local index of the
    tensor it falls in, or past that tensor's end to the next tensor's start.

    Monotone in ``i``, so the shares it cuts tile the range exactly; and every
    piece of a tensor starts at a multiple of _BLOCK of its local index, which
    the bfloat16 loop's random bits need (see _random_bits). Called twice per
    share, so the references it counts (it is handed arrays) cost nothing per
    tensor or element.
    """
    total = offsets[offsets.size - 1]
    if i >= total:
        return total
    k = _tensor_at(offsets, i)
    local = (i - offsets[k] + _BLOCK - 1) // _BLOCK * _BLOCK
    return offsets[k] + local if local < sizes[k] else offsets[k + 1]


@njit(inline="always")
def _constants(t, step_size, bc2_sqrt, eps, omb1, b2, omb2, wd, decay, scale):
    """The loop constants, each cast once to the arrays' float type ``t``: a
    float64 constant would silently promote float32 math."""
    return t(step_size), t(bc2_sqrt), t(eps), t(omb1), t(b2), t(omb2), t(wd), t(decay), t(scale)


@njit(inline="always")
def _piece(p, g, m, v, vmax, lo, hi, consts, unscale, maximize, amsgrad, l2):
    """The update of elements ``[lo, hi)`` of one tensor whose states have its
    params' dtype: the loop body every float32/float64 step runs, written once.

    First the elements before ``p``'s next 64-byte boundary (_to_line), then
    blocks of _BLOCK elements from there, prefetching ahead once per block, the
    last one partial. On 64-byte aligned blocks a one-thread float32 step at
    2^24 ran 1.2x as fast as on NumPy's arrays, whose vectors straddled lines.
    Prefetching stops at ``hi``, where the next thread's share begins:
    prefetching into a share that another core is writing cost 2-thread steps
    at 2^15-2^17 elements 15-30% (float32 2^15: 0.48 -> 0.33 ns per element).
    The element index is unsigned: with a signed one Numba guards every access
    against negative (wrap-around) indices and LLVM leaves the block loop
    scalar (2.4x slower).

    Inlined into the loops that call it, once per piece, and handed views
    without a meminfo (_borrow, _view): no reference is counted.
    """
    step_size, bc2_sqrt, eps, omb1, b2, omb2, wd, decay, scale = consts
    t = p.dtype.type
    y = _bc2_reciprocal(t, bc2_sqrt)
    inf = t(np.inf)
    head = min(hi, lo + _to_line(p, lo))
    first = lo
    while first < hi:
        if first < head:
            last = head
        else:
            _prefetch_ahead(first, hi, amsgrad, p, g, m, v, vmax)
            last = min(first + _BLOCK, hi)
        for j in range(first, last):
            i = np.uint64(j)
            gi = g[i]
            if unscale:
                gi = gi / scale
                g[i] = gi
            # decay always applied: exact when it is 1.0
            gi, theta = _gradient(gi, p[i], wd, decay, maximize, l2, True)
            mi, vi = _moments(gi, m[i], v[i], omb1, b2, omb2)
            m[i] = mi
            v[i] = vi
            if amsgrad:
                vi = _running_max(vmax[i], vi)
                vmax[i] = vi
            p[i] = theta - step_size * mi / (_divide_bc2(np.sqrt(vi), bc2_sqrt, y, inf) + eps)
        first = last


def _make_loop(parallel: bool):
    """The single-array update, compiled serial and parallel: the blocks split
    into one share per thread (``threads``, the last argument), each share one
    _piece."""
    rng = prange if parallel else range

    def loop(p, g, m, v, vmax, step_size, bc2_sqrt, eps, omb1, b2, omb2, wd, decay, scale,
             unscale, maximize, amsgrad, state_rounding, rounding_key, threads):  # fmt: skip
        # state_rounding and rounding_key: unused, this loop's states have the params' dtype
        l2 = wd != 0  # decided on the float64 value, as the reference (and torch) do
        consts = _constants(p.dtype.type, step_size, bc2_sqrt, eps, omb1, b2, omb2, wd, decay,
                            scale)  # fmt: skip
        n = p.size
        blocks = (n + _BLOCK - 1) // _BLOCK
        parts = _parts(threads, blocks)
        for part in rng(parts):
            first_block, end_block = _share(part, parts, blocks)
            _piece(_borrow(p), _borrow(g), _borrow(m), _borrow(v), _borrow(vmax),
                   first_block * _BLOCK, min(end_block * _BLOCK, n), consts, unscale, maximize,
                   amsgrad, l2)  # fmt: skip

    return loop


def _make_multi(parallel: bool, maximize: bool, l2: bool, amsgrad: bool):
    """The multi-tensor update of a float32 or float64 table (see step_multi).

    One share per thread of the concatenated element range, cut by _split_point;
    each share walks the tensors it meets, one _piece per tensor, on views of the
    addresses in ``pointers`` (``like``: an array of the table's dtype).
    ``consts`` holds the float64 scalars of each distinct step (a row per
    AdamScalars, its first 9 fields), ``index`` each tensor's row.

    ``maximize``, ``l2`` and ``amsgrad`` are compile-time constants here, unlike
    in the single-array loop, where LLVM unswitches the block loop on its
    run-time flags: inside this loop's walk over tensors it left them in the
    vector loop, ~7% slower with the data in cache (float32, 2^14 elements:
    0.607 against 0.566 ns per element; with these three constant, 0.585, and
    faster than the single-array loop with unscale or amsgrad on).
    """
    rng = prange if parallel else range

    def multi(pointers, sizes, offsets, consts, index, unscale, like, threads):
        t = like.dtype.type  # cast every constant once: float32 math stays float32
        dt = like.dtype
        count = sizes.size
        total = offsets[count]
        parts = _parts(threads, (total + _BLOCK - 1) // _BLOCK)
        # Without amsgrad row 4 of the table holds zeros: vmax stands in as
        # exp_avg_sq, as in step, and is never read or written.
        vmax_row = 4 if amsgrad else 3
        for part in rng(parts):
            start = _split_point(offsets, sizes, total * part // parts)
            stop = _split_point(offsets, sizes, total * (part + 1) // parts)
            k = _tensor_at(offsets, start)
            while k < count and offsets[k] < stop:
                n, base = sizes[k], offsets[k]
                lo, hi = max(start - base, 0), min(stop - base, n)
                if lo < hi:
                    s = index[k]
                    c = _constants(t, consts[s, 0], consts[s, 1], consts[s, 2], consts[s, 3],
                                   consts[s, 4], consts[s, 5], consts[s, 6], consts[s, 7],
                                   consts[s, 8])  # fmt: skip
                    _piece(_view(pointers[0, k], n, dt), _view(pointers[1, k], n, dt),
                           _view(pointers[2, k], n, dt), _view(pointers[3, k], n, dt),
                           _view(pointers[vmax_row, k], n, dt), lo, hi, c, unscale, maximize,
                           amsgrad, l2)  # fmt: skip
                k += 1

    return multi


# error_model="numpy": IEEE results for x/0 instead of a ZeroDivisionError check
# on every division, which also kept LLVM from vectorizing the loop (3x slower).
# every compiled loop is cached on disk, its saves locked (_numba_cache)
_JIT = {"nogil": True, "error_model": "numpy"}
_serial = cached_njit(_make_loop(False), **_JIT)
_parallel = cached_njit(_make_loop(True), parallel=True, **_JIT)


@functools.cache
def _multi_loop(parallel: bool, maximize: bool, l2: bool, amsgrad: bool):
    """The compiled multi-tensor loop for these flags; compiled on first use,
    cached on disk."""
    return cached_njit(_make_multi(parallel, maximize, l2, amsgrad), parallel=parallel, **_JIT)


# -- bfloat16 states -------------------------------------------------------------


@njit(inline="always")
def _widen(b):
    return _bits_f32(np.uint32(np.uint32(b) << np.uint32(16)))


@njit(inline="always")
def _round_bf16(x, add):
    """float32 ``x`` rounded to bfloat16, adding ``add`` below the cut (a NaN kept
    as it is), as a 32-bit word whose high half is the bfloat16 and whose low
    half is garbage; branch-free. Kept in the high half, the rounded float is
    one AND away and the stored bits one shift: 2-3% faster than shifting down,
    then up again, with the data in L2 and at 2^26.

    ``x`` is always the result of arithmetic (a new moment, _moments), so a NaN
    here is a quiet one (IEEE 754: operations never return a signaling NaN),
    and the reference's ``u | 0x00400000`` for a NaN is ``u`` itself: only the
    ``add`` must not carry into the NaN's high half. Adding ``add`` or zero
    (an AND-NOT with the NaN mask) rather than selecting between two words (a
    blend): 0.92x the step time in L2 and 0.95x at 2^24 on two threads with
    AVX2 code (Intel Xeon, session 15)."""
    u = _f32_bits(x)
    return np.uint32(u + (np.uint32(0) if x != x else add))


@njit(inline="always")
def _nearest_even(x):
    """The ``add`` of round-to-nearest-even for float32 ``x``."""
    return np.uint32(0x7FFF) + ((_f32_bits(x) >> np.uint32(16)) & np.uint32(1))


@njit(inline="always")
def _round_states(mi, vi, first, k, block_key, stochastic):
    """The new moments rounded to bfloat16 (words as _round_bf16 returns them):
    stochastic rounding with the random bits of element ``first + k`` (low half
    for ``mi``, high half for ``vi``), else nearest-even."""
    if stochastic:
        r = _random_bits(first, k, block_key)
        return _round_bf16(mi, r & np.uint32(0xFFFF)), _round_bf16(vi, r >> np.uint32(16))
    return _round_bf16(mi, _nearest_even(mi)), _round_bf16(vi, _nearest_even(vi))


_NO_BITS = np.uint16(0)  # stands in for max_exp_avg_sq's bits without amsgrad


@njit
def _bf16_element(gi, theta, mb, vb, vmb, first, k, block_key, consts, flags):
    """The float32-param / bfloat16-state update of element ``first + k``, on values.

    Takes the element's gradient, parameter and moment bits (``vmb`` only read
    with amsgrad) and returns their new values; the gradient comes back divided
    by the scale with ``unscale``, for the loop to store.

    Compiled once, for all the loops (it takes scalars only, so calling it
    counts no references), and inlined by LLVM into each, where the loop's
    flags are constants: the same machine code as Numba's ``inline="always"``,
    which copied and recompiled its IR, helpers included, at each of the two
    call sites of every compiled loop: a serial bf16 loop compiled in 1.9 s
    then, 0.6 s now (this project's 2-core VM), and each of up to 32 flag sets
    has its serial and parallel, single-array and multi-tensor loops.
    """
    _inline_in_llvm()
    step_size, bc2_sqrt, eps, omb1, b2, omb2, wd, decay, scale = consts
    unscale, maximize, l2, stochastic, divide, amsgrad, decoupled = flags
    if unscale:
        gi = gi / scale
    g_out = gi
    gi, theta = _gradient(gi, theta, wd, decay, maximize, l2, decoupled)
    mi, vi = _moments(gi, _widen(mb), _widen(vb), omb1, b2, omb2)
    mw, vw = _round_states(mi, vi, first, k, block_key, stochastic)
    mb, vb = np.uint16(mw >> np.uint32(16)), np.uint16(vw >> np.uint32(16))
    mi = _bits_f32(mw & np.uint32(0xFFFF0000))  # the update uses the stored values
    vi = _bits_f32(vw & np.uint32(0xFFFF0000))
    if amsgrad:
        vi = _running_max(_widen(vmb), vi)
        vmb = np.uint16(_f32_bits(vi) >> np.uint32(16))
    root = np.sqrt(vi)
    theta = theta - step_size * mi / ((root / bc2_sqrt if divide else root) + eps)
    return g_out, theta, mb, vb, vmb


@njit(inline="always")
def _mix32(x):
    """fastadam._scalars.mix32 of a uint32 (Numba's products are 64 bits wide:
    each is truncated back)."""
    x = np.uint32(x)
    x = np.uint32(x ^ (x >> np.uint32(16)))
    x = np.uint32(x * np.uint32(0x7FEB352D))
    x = np.uint32(x ^ (x >> np.uint32(15)))
    x = np.uint32(x * np.uint32(0x846CA68B))
    return np.uint32(x ^ (x >> np.uint32(16)))


_KEY_BLOCK = 1 << 32  # elements sharing hi32(index), hence one block_key
_KEY_BLOCKS = _KEY_BLOCK // _BLOCK  # the same in blocks


@njit(inline="always")
def _bf16_blocks(p, g, m, v, vmax, first_block, end_block, rounding_key, consts, flags):
    """The float32-param / bfloat16-state update of the full blocks ``[first_block,
    end_block)`` of one tensor: the loop body every bf16 step runs, written once
    (flags as in _make_bf16_loop; prefetch and the views it is handed as in
    _piece). The tensor's last, partial block is _bf16_tail's.

    The random bits of element ``i`` take ``block_key = mix32(rounding_key ^
    hi32(i))``, constant over each 2**32-element block: the blocks run one such
    block at a time, with its key hoisted, so within it ``lo32(i)`` is all
    _random_bits needs.
    """
    unscale, maximize, l2, stochastic, divide, amsgrad, decoupled = flags
    _prefer_512_bit_vectors()
    end = end_block * _BLOCK  # where the next share starts
    block = first_block
    while block < end_block:
        stop = min(end_block, (block // _KEY_BLOCKS + 1) * _KEY_BLOCKS)
        kb = _mix32(np.uint32(rounding_key) ^ np.uint32(block // _KEY_BLOCKS))
        for b in range(block, stop):
            first = b * _BLOCK
            _prefetch_ahead(first, end, amsgrad, p, g, m, v, vmax)
            for k in range(np.int32(_BLOCK)):
                i = np.uint64(first + k)
                vm = vmax[i] if amsgrad else _NO_BITS
                gi, p[i], m[i], v[i], vm = _bf16_element(
                    g[i], p[i], m[i], v[i], vm, first, k, kb, consts, flags
                )
                if unscale:
                    g[i] = gi
                if amsgrad:
                    vmax[i] = vm
        block = stop


@njit(inline="always")
def _bf16_tail(p, g, m, v, vmax, n, rounding_key, consts, flags):
    """The last, partial block of a tensor of ``n`` elements (as _bf16_blocks).

    The same loads and stores as _bf16_blocks, written out again because they
    cannot move into a helper called per element (a helper handed the arrays
    counts references per call, see _gradient) and the block loop there needs
    its constant trip count (LLVM unrolls and interleaves it). Its own function
    so that the single-array loop runs it after its loop over shares, as it
    did before there were two: run inside that loop, it made LLVM reload
    vector constants in the block loop (5% more instructions per block).
    """
    unscale, maximize, l2, stochastic, divide, amsgrad, decoupled = flags
    first = n // _BLOCK * _BLOCK
    kb = _mix32(np.uint32(rounding_key) ^ np.uint32(first >> 32))
    for k in range(np.int32(n - first)):
        i = np.uint64(first + k)
        vm = vmax[i] if amsgrad else _NO_BITS
        gi, p[i], m[i], v[i], vm = _bf16_element(
            g[i], p[i], m[i], v[i], vm, first, k, kb, consts, flags
        )
        if unscale:
            g[i] = gi
        if amsgrad:
            vmax[i] = vm


def _make_bf16_loop(parallel: bool, stochastic: bool, divide: bool, amsgrad: bool,
                    decoupled: bool, unscale: bool, maximize: bool, l2: bool):  # fmt: skip
    """The single-array float32-param / bfloat16-state update (see AdamScalars).

    The flags are compile-time constants, so each compiled loop holds only its
    own operations: ``divide`` (by bias_correction2_sqrt) and ``decoupled``
    (multiply by decay) are skipped where those are 1.0, which is exact and is
    every bf16 step compute_scalars makes for Adam. This loop is at the edge of
    keeping up with memory, and each of those two operations cost ~10%; with
    ``amsgrad`` a run-time flag, LLVM left the loop scalar (2.4x slower), and
    with ``unscale`` one, LLVM divided every gradient by the scale whether or
    not the flag was set (the divider is this loop's busiest unit). ``maximize``
    and ``l2`` (weight decay added to the gradient) too: as run-time values,
    each left a branch in every vector of the block and the L2 term computed
    whether or not it was used; as constants, 0.89x the step time in L2 and
    0.95x at 2^24 on two threads with AVX2 code, level with AVX-512 (Intel
    Xeon, session 15).
    Shares of the full blocks as in _make_loop, each one _bf16_blocks; the
    partial last block after them.
    """
    rng = prange if parallel else range

    def loop(p, g, m, v, vmax, step_size, bc2_sqrt, eps, omb1, b2, omb2, wd, decay, scale,
             unscale_flag, maximize_flag, amsgrad_flag, state_rounding, key, threads):  # fmt: skip
        # unscale_flag, maximize_flag, amsgrad_flag and state_rounding are AdamScalars
        # fields, unused here: this loop's closure fixes them at compile time.
        consts = _constants(np.float32, step_size, bc2_sqrt, eps, omb1, b2, omb2, wd, decay,
                            scale)  # fmt: skip
        flags = (unscale, maximize, l2, stochastic, divide, amsgrad, decoupled)
        p, g, m, v, vmax = _borrow(p), _borrow(g), _borrow(m), _borrow(v), _borrow(vmax)
        n = p.size
        full = n // _BLOCK
        parts = _parts(threads, full)
        for part in rng(parts):
            first_block, end_block = _share(part, parts, full)
            _bf16_blocks(p, g, m, v, vmax, first_block, end_block, key, consts, flags)
        _bf16_tail(p, g, m, v, vmax, n, key, consts, flags)

    return loop


def _make_bf16_multi(parallel: bool, stochastic: bool, divide: bool, amsgrad: bool,
                     decoupled: bool, unscale: bool, maximize: bool, l2: bool):  # fmt: skip
    """The multi-tensor update of a bfloat16-state table: shares and walk as in
    _make_multi, each piece of a tensor _bf16_blocks, and _bf16_tail for the
    share holding its end (flags as in _make_bf16_loop).

    Tensor ``k`` takes its rounding key from ``keys[k]`` if ``use_keys``, else
    from its scalars' row of ``scalar_keys``.
    """
    rng = prange if parallel else range

    def multi(pointers, sizes, offsets, consts, index, keys, scalar_keys, use_keys, threads):
        count = sizes.size
        total = offsets[count]
        parts = _parts(threads, (total + _BLOCK - 1) // _BLOCK)
        # Without amsgrad row 4 of the table holds zeros, and vmax is never touched.
        vmax_row = 4 if amsgrad else 3
        for part in rng(parts):
            start = _split_point(offsets, sizes, total * part // parts)
            stop = _split_point(offsets, sizes, total * (part + 1) // parts)
            k = _tensor_at(offsets, start)
            while k < count and offsets[k] < stop:
                n, base = sizes[k], offsets[k]
                lo, hi = max(start - base, 0), min(stop - base, n)
                if lo < hi:
                    s = index[k]
                    c = _constants(np.float32, consts[s, 0], consts[s, 1], consts[s, 2],
                                   consts[s, 3], consts[s, 4], consts[s, 5], consts[s, 6],
                                   consts[s, 7], consts[s, 8])  # fmt: skip
                    flags = (unscale, maximize, l2, stochastic, divide, amsgrad, decoupled)
                    key = keys[k] if use_keys else scalar_keys[s]
                    p, g = (
                        _view(pointers[0, k], n, np.float32),
                        _view(pointers[1, k], n, np.float32),
                    )
                    m, v = _view(pointers[2, k], n, np.uint16), _view(pointers[3, k], n, np.uint16)
                    vmax = _view(pointers[vmax_row, k], n, np.uint16)
                    _bf16_blocks(p, g, m, v, vmax, lo // _BLOCK, hi // _BLOCK, key, c, flags)
                    if hi == n:
                        _bf16_tail(p, g, m, v, vmax, n, key, c, flags)
                k += 1

    return multi


@functools.cache
def _bf16_loop(parallel: bool, *flags: bool):
    """The compiled loop for these flags; compiled on first use, cached on disk."""
    return cached_njit(_make_bf16_loop(parallel, *flags), parallel=parallel, **_JIT)


@functools.cache
def _bf16_multi(parallel: bool, *flags: bool):
    """The compiled multi-tensor loop for these flags (as _bf16_loop)."""
    return cached_njit(_make_bf16_multi(parallel, *flags), parallel=parallel, **_JIT)


def _bf16_flags(sc: AdamScalars) -> tuple[bool, ...]:
    """The compile-time flags of the bf16 loops for these scalars (the hyper-
    parameters of a multi-tensor step are common to its tensors: only the
    step may differ between them)."""
    return (
        sc.state_rounding == STATE_BF16_STOCHASTIC,
        sc.bias_correction2_sqrt != 1.0,
        sc.amsgrad,
        sc.decay != 1.0,
        sc.unscale,
        sc.maximize,
        sc.weight_decay != 0,  # decided on the float64 value, as the reference (and torch) do
    )


# -- unscale and check ------------------------------------------------------------


def _make_unscale(parallel: bool):
    rng = prange if parallel else range

    def unscale(g, scale):
        s = g.dtype.type(scale)
        bad = 0
        for i in rng(g.size):
            x = g[i] / s
            g[i] = x
            bad += not (x - x == 0)  # x - x is NaN exactly when x is NaN or +-Inf
        return bad

    return unscale


_unscale_serial = cached_njit(_make_unscale(False), **_JIT)
_unscale_parallel = cached_njit(_make_unscale(True), parallel=True, **_JIT)
