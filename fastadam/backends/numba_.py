"""Numba backend: one ``prange`` loop over the flattened buffers.

Design choices, each deliberate:

* **float32 stays float32.** Numba types Python floats as float64, so every
  constant is cast once with ``param.dtype.type(...)`` before the loop; a
  float64 constant would silently promote the whole update.
* **No fastmath, numpy error model.** fastmath would let LLVM contract
  ``a*b+c`` into FMAs and reorder, and this kernel must match the NumPy
  reference bit for bit. ``error_model="numpy"`` drops the per-division
  ZeroDivisionError check, which otherwise stops LLVM from vectorizing.
* **Threading layer: TBB, else ``workqueue``; launches serialised.** The
  layers differ in what they survive (measured on this project's 2-core VM):
  ``workqueue`` survives ``fork()`` but aborts the process when two Python
  threads launch at once, and wakes its workers slowly (~150 µs a launch);
  ``omp`` (GNU libgomp) launches in ~20 µs but Numba terminates any forked
  child of a process that used it; TBB launches in ~20 µs, is thread-safe and
  fork-safe. The ``tbb`` wheel installs its library where the dynamic loader
  does not look, so it is preloaded from the wheel's own file list. Parallel
  launches are serialised by ``_LAUNCH_LOCK`` whatever the layer (the step is
  memory-bound, so two at once would only share the bus); the lock is
  re-created in a forked child in case another thread held it at the fork.
  ``NUMBA_THREADING_LAYER`` set by the user is respected.
* **Small buffers run serially** (no lock, no thread wake-up): below
  ``config.PARALLEL_MIN_ELEMENTS`` the launch costs more than the work.
* **A multi-tensor step is one launch** (:func:`step_multi`): one share per
  thread of the concatenated element range of a TensorTable, each share's
  split points moved forward to a _BLOCK boundary of the tensor they fall in;
  a share walks the tensors it meets. Its arrays are views made from the
  table's addresses without a meminfo (_view), so nothing is reference-counted
  or allocated per tensor. The loop bodies (_piece; _bf16_blocks and
  _bf16_tail) are the single-array step's, written once.
"""

from __future__ import annotations

import ctypes
import functools
import importlib
import importlib.metadata
import os
import threading

import numba
import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.extending import intrinsic
from numba.np.arrayobj import populate_array

from .. import config
from .._scalars import STATE_BF16_STOCHASTIC, STATE_SAME_DTYPE, AdamScalars
from .._table import KIND_BF16, KIND_F32, KIND_F64, TensorTable

NAME = "numba"

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


def _load_tbb() -> bool:
    """Make Numba's TBB layer loadable; True if it is."""
    try:
        files = importlib.metadata.files("tbb") or []
    except importlib.metadata.PackageNotFoundError:
        files = []
    for f in files:
        if f.name.startswith("libtbb.so"):
            try:
                ctypes.CDLL(str(f.locate()), mode=ctypes.RTLD_GLOBAL)
                break
            except OSError:
                pass
    try:
        importlib.import_module("numba.np.ufunc.tbbpool")
    except ImportError:
        return False
    return True


if "NUMBA_THREADING_LAYER" not in os.environ:
    numba.config.THREADING_LAYER = "tbb" if _load_tbb() else "workqueue"

_LAUNCH_LOCK = threading.Lock()


def _reset_lock_in_child() -> None:
    global _LAUNCH_LOCK
    _LAUNCH_LOCK = threading.Lock()


os.register_at_fork(after_in_child=_reset_lock_in_child)

_num_threads = 1

# Software prefetch: each loop walks blocks of _BLOCK elements and asks, once per
# block, for the cache lines _PREFETCH_BYTES of param ahead in every array (the
# same element distance in each). The hardware streamer stops at each 4 KiB page;
# the C kernels do the same for the same reason, and at the same distance, which
# csrc/fastadam_internal.h explains (4 KiB won on one machine and lost 13-20% on
# another; 1 KiB is the compromise).
_BLOCK = 32
_PREFETCH_BYTES = 1024


@intrinsic
def _prefetch_ahead(typingctx, first, end, amsgrad, p, g, m, v, vmax):
    """Prefetch, in each array of a step (``vmax`` only if ``amsgrad``), the cache
    lines of the _BLOCK elements that lie _PREFETCH_BYTES of ``p`` past element
    ``first``, unless they start at or past element ``end`` (where the next
    thread's share begins, see _make_loop).

    An intrinsic, not a helper function: handing arrays to a helper makes Numba
    count references to them (see _gradient). The addresses are formed as
    integers and never dereferenced.
    """
    arrays = (p, g, m, v, vmax)
    if not all(isinstance(a, types.Array) for a in arrays):
        return None
    if not (isinstance(first, types.Integer) and isinstance(end, types.Integer)):
        return None

    def codegen(context, builder, sig, args):
        i8p, i32, i64 = ir.IntType(8).as_pointer(), ir.IntType(32), ir.IntType(64)
        ahead = _PREFETCH_BYTES // context.get_abi_sizeof(context.get_data_type(p.dtype))
        target = builder.add(
            context.cast(builder, args[0], sig.args[0], types.int64), ir.Constant(i64, ahead)
        )
        end_ = context.cast(builder, args[1], sig.args[1], types.int64)
        fn = builder.module.declare_intrinsic(
            "llvm.prefetch", [i8p], ir.FunctionType(ir.VoidType(), [i8p, i32, i32, i32])
        )
        read, keep_everywhere, data_cache = (ir.Constant(i32, k) for k in (0, 3, 1))

        def prefetch(k):
            itemsize = context.get_abi_sizeof(context.get_data_type(arrays[k].dtype))
            data = context.make_array(arrays[k])(context, builder, args[3 + k]).data
            start = builder.add(
                builder.ptrtoint(data, i64), builder.mul(target, ir.Constant(i64, itemsize))
            )
            for line in range(0, _BLOCK * itemsize, 64):
                address = builder.inttoptr(builder.add(start, ir.Constant(i64, line)), i8p)
                builder.call(fn, [address, read, keep_everywhere, data_cache])

        with builder.if_then(builder.icmp_signed("<", target, end_), likely=True):
            for k in range(4):
                prefetch(k)
            amsgrad_ = context.cast(builder, args[2], sig.args[2], types.boolean)
            with builder.if_then(amsgrad_):
                prefetch(4)
        return context.get_dummy_value()

    return types.none(*(first, end, amsgrad), *arrays), codegen


@intrinsic
def _view(typingctx, address, n, dtype):
    """A 1-D C-contiguous array of ``n`` elements of ``dtype`` (a DType or a
    number class such as ``np.float32``) at the integer ``address``.

    Like ``numba.carray`` over a pointer made by ``inttoptr``: the view has no
    meminfo, so handing it on counts no references, and making it allocates
    nothing. It does not keep the memory alive: the caller (a TensorTable's
    owners) does.
    """
    if isinstance(dtype, types.DType):
        dt = dtype.dtype
    elif isinstance(dtype, types.NumberClass):
        dt = dtype.instance_type
    else:
        return None
    if not (isinstance(address, types.Integer) and isinstance(n, types.Integer)):
        return None
    array_type = types.Array(dt, 1, "C")

    def codegen(context, builder, sig, args):
        item = context.get_data_type(dt)
        itemsize = context.get_constant(types.intp, context.get_abi_sizeof(item))
        data = builder.inttoptr(
            context.cast(builder, args[0], sig.args[0], types.uintp), item.as_pointer()
        )
        array = context.make_array(array_type)(context, builder)
        populate_array(
            array,
            data=data,
            shape=[context.cast(builder, args[1], sig.args[1], types.intp)],
            strides=[itemsize],
            itemsize=itemsize,
            meminfo=None,
        )
        return array._getvalue()

    return array_type(address, n, dtype), codegen


@intrinsic
def _borrow(typingctx, a):
    """The 1-D C-contiguous array ``a`` as a view without meminfo (as _view makes).

    A loop hands its arrays to _piece through these: inlined or not, a helper
    handed an array with a meminfo counts references to it, and the counting
    changed how LLVM compiled the loop (it unswitched fewer of the run-time
    flags: the float32 loop ran ~15% slower with the data in cache). The
    caller holds ``a`` for as long as the view lives.
    """
    if not (isinstance(a, types.Array) and a.ndim == 1 and a.layout == "C"):
        return None
    array_type = types.Array(a.dtype, 1, "C")

    def codegen(context, builder, sig, args):
        source = context.make_array(sig.args[0])(context, builder, args[0])
        array = context.make_array(array_type)(context, builder)
        populate_array(
            array,
            data=source.data,
            shape=source.shape,
            strides=source.strides,
            itemsize=source.itemsize,
            meminfo=None,
        )
        return array._getvalue()

    return array_type(a), codegen


@intrinsic
def _to_line(typingctx, a, i):
    """How many elements of ``a`` lie from element ``i`` up to the next 64-byte
    boundary of its memory (0 when element ``i`` starts one).

    _piece runs those apart, so that its blocks' vectors do not straddle cache
    lines: NumPy's large arrays start 16 bytes past a page boundary (see the C
    library's fa_run_piece). An intrinsic for the reason _prefetch_ahead is one.
    """
    if not (isinstance(a, types.Array) and isinstance(i, types.Integer)):
        return None

    def codegen(context, builder, sig, args):
        i64 = ir.IntType(64)
        itemsize = context.get_abi_sizeof(context.get_data_type(a.dtype))
        data = context.make_array(a)(context, builder, args[0]).data
        index = context.cast(builder, args[1], sig.args[1], types.int64)
        address = builder.add(
            builder.ptrtoint(data, i64), builder.mul(index, ir.Constant(i64, itemsize))
        )
        pad = builder.and_(builder.neg(address), ir.Constant(i64, 63))
        return builder.udiv(pad, ir.Constant(i64, itemsize))

    return types.int64(a, i), codegen


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
            p[i] = theta - step_size * mi / (np.sqrt(vi) / bc2_sqrt + eps)
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
_JIT = {"cache": True, "nogil": True, "error_model": "numpy"}
_serial = njit(**_JIT)(_make_loop(False))
_parallel = njit(parallel=True, **_JIT)(_make_loop(True))


@functools.cache
def _multi_loop(parallel: bool, maximize: bool, l2: bool, amsgrad: bool):
    """The compiled multi-tensor loop for these flags; compiled on first use,
    cached on disk."""
    return njit(parallel=parallel, **_JIT)(_make_multi(parallel, maximize, l2, amsgrad))


# -- bfloat16 states -------------------------------------------------------------
# Numba has no scalar bit casts, and it widens integer arithmetic to 64 bits;
# these intrinsics are the LLVM operations themselves.


@intrinsic
def _f32_bits(typingctx, x):
    def codegen(context, builder, sig, args):
        return builder.bitcast(args[0], ir.IntType(32))

    return types.uint32(types.float32), codegen


@intrinsic
def _bits_f32(typingctx, u):
    def codegen(context, builder, sig, args):
        return builder.bitcast(args[0], ir.FloatType())

    return types.float32(types.uint32), codegen


@intrinsic
def _random_bits(typingctx, first, k, block_key):
    """``mix32(lo32(first + k) ^ block_key)`` (fastadam._scalars.mix32), all in
    32-bit LLVM operations; ``first`` a multiple of _BLOCK and ``0 <= k < _BLOCK``.

    In Numba's own integer arithmetic the index is 64 bits wide: the loop
    vectorized to 64-bit multiplies (vpmullq), several times slower, and even
    truncated at once it kept vectors of 64-bit indices.

    mix32 starts with ``x ^= x >> 16`` on ``x = lo ^ key``. That distributes over
    the XOR, and with ``first`` a multiple of _BLOCK, ``lo = lo32(first) ^ k``
    and ``lo >> 16 = lo32(first) >> 16`` for every ``k`` of the block. So
    ``x ^ (x >> 16)`` is ``k ^ c`` with ``c`` one constant per block (LLVM
    hoists it), and as LLVM unrolls a block's vectors, ``k`` is a constant
    vector: one XOR per 16 elements replaces the index arithmetic.
    """
    if not (isinstance(first, types.Integer) and isinstance(k, types.Integer)):
        return None

    def codegen(context, builder, sig, args):
        i32 = ir.IntType(32)

        def lo32(x):
            return x if x.type.width == 32 else builder.trunc(x, i32)

        def xorshift(x, s):
            return builder.xor(x, builder.lshr(x, ir.Constant(i32, s)))

        per_block = builder.xor(xorshift(lo32(args[0]), 16), xorshift(args[2], 16))
        x = builder.xor(lo32(args[1]), per_block)
        x = builder.mul(x, ir.Constant(i32, 0x7FEB352D))
        x = builder.mul(xorshift(x, 15), ir.Constant(i32, 0x846CA68B))
        return xorshift(x, 16)

    return types.uint32(first, k, types.uint32), codegen


@intrinsic
def _prefer_512_bit_vectors(typingctx):
    """Let LLVM vectorize the enclosing function with 512-bit registers.

    LLVM's default for AVX-512 CPUs is 256-bit vectors (older cores slowed
    their clock for 512-bit ones). The bf16 loop is bound by vector ports, not
    clock, and runs ~8% faster with 16 lanes; the function attributes below are
    the ones Clang sets for -mprefer-vector-width=512, and affect only the
    function they are on (for a prange loop, Numba's outlined loop body). On a
    CPU without AVX-512 they change nothing. If llvmlite ever refuses them, the
    loop simply keeps the default width.
    """

    def codegen(context, builder, sig, args):
        attrs = builder.function.attributes
        try:
            # llvmlite only validates known enum attributes in .add(); these are
            # LLVM string attributes, emitted as written.
            set.add(attrs, '"prefer-vector-width"="512"')
            set.add(attrs, '"min-legal-vector-width"="512"')
        except Exception:  # pragma: no cover - depends on llvmlite internals
            pass
        return context.get_dummy_value()

    return types.none(), codegen


@intrinsic
def _inline_in_llvm(typingctx):
    """Mark the enclosing function ``alwaysinline`` for LLVM.

    For a helper that Numba compiles once as a function of its own (instead of
    copying its IR into every call site, as ``inline="always"`` does) but that
    must still end up inside its callers' loops, where their compile-time flags
    fold its branches away and LLVM vectorizes it with the loop.
    """

    def codegen(context, builder, sig, args):
        builder.function.attributes.add("alwaysinline")
        return context.get_dummy_value()

    return types.none(), codegen


@njit(inline="always")
def _widen(b):
    return _bits_f32(np.uint32(np.uint32(b) << np.uint32(16)))


@njit(inline="always")
def _round_bf16(x, add):
    """float32 ``x`` rounded to bfloat16, adding ``add`` below the cut (a NaN made
    quiet instead), as a 32-bit word whose high half is the bfloat16 and whose low
    half is garbage; branch-free (a select). Kept in the high half, the rounded
    float is one AND away and the stored bits one shift: 2-3% faster than
    shifting down, then up again, with the data in L2 and at 2^26."""
    u = _f32_bits(x)
    return (u | np.uint32(0x00400000)) if x != x else np.uint32(u + add)


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


def _make_bf16_loop(
    parallel: bool, stochastic: bool, divide: bool, amsgrad: bool, decoupled: bool, unscale: bool
):
    """The single-array float32-param / bfloat16-state update (see AdamScalars).

    The flags are compile-time constants, so each compiled loop holds only its
    own operations: ``divide`` (by bias_correction2_sqrt) and ``decoupled``
    (multiply by decay) are skipped where those are 1.0, which is exact and is
    every bf16 step compute_scalars makes for Adam. This loop is at the edge of
    keeping up with memory, and each of those two operations cost ~10%; with
    ``amsgrad`` a run-time flag, LLVM left the loop scalar (2.4x slower), and
    with ``unscale`` one, LLVM divided every gradient by the scale whether or
    not the flag was set (the divider is this loop's busiest unit).
    Shares of the full blocks as in _make_loop, each one _bf16_blocks; the
    partial last block after them.
    """
    rng = prange if parallel else range

    def loop(p, g, m, v, vmax, step_size, bc2_sqrt, eps, omb1, b2, omb2, wd, decay, scale,
             unscale_flag, maximize, amsgrad_flag, state_rounding, key, threads):  # fmt: skip
        # unscale_flag, amsgrad_flag and state_rounding are AdamScalars fields, unused
        # here: this loop's closure fixes them at compile time.
        l2 = wd != 0  # decided on the float64 value, as the reference (and torch) do
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


def _make_bf16_multi(
    parallel: bool, stochastic: bool, divide: bool, amsgrad: bool, decoupled: bool, unscale: bool
):
    """The multi-tensor update of a bfloat16-state table: shares and walk as in
    _make_multi, each piece of a tensor _bf16_blocks, and _bf16_tail for the
    share holding its end (flags as in _make_bf16_loop).

    Tensor ``k`` takes its rounding key from ``keys[k]`` if ``use_keys``, else
    from its scalars' row of ``scalar_keys``.
    """
    rng = prange if parallel else range

    def multi(pointers, sizes, offsets, consts, index, keys, scalar_keys, use_keys, maximize,
              threads):  # fmt: skip
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
                    l2 = consts[s, 6] != 0  # decided on the float64 value, as in loop
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
    return njit(parallel=parallel, **_JIT)(_make_bf16_loop(parallel, *flags))


@functools.cache
def _bf16_multi(parallel: bool, *flags: bool):
    """The compiled multi-tensor loop for these flags (as _bf16_loop)."""
    return njit(parallel=parallel, **_JIT)(_make_bf16_multi(parallel, *flags))


def _bf16_flags(sc: AdamScalars) -> tuple[bool, ...]:
    """The compile-time flags of the bf16 loops for these scalars."""
    return (
        sc.state_rounding == STATE_BF16_STOCHASTIC,
        sc.bias_correction2_sqrt != 1.0,
        sc.amsgrad,
        sc.decay != 1.0,
        sc.unscale,
    )


_EMPTY_U16 = np.empty(0, np.uint16)


def step(
    param: np.ndarray,
    grad: np.ndarray,
    exp_avg: np.ndarray,
    exp_avg_sq: np.ndarray,
    max_exp_avg_sq: np.ndarray | None,
    sc: AdamScalars,
) -> None:
    """Apply one Adam/AdamW update in place (arrays validated by the caller)."""
    if param.ndim != 1:  # one compiled signature: every shape runs as a flat view
        param, grad = param.reshape(-1), grad.reshape(-1)
        exp_avg, exp_avg_sq = exp_avg.reshape(-1), exp_avg_sq.reshape(-1)
        if max_exp_avg_sq is not None:
            max_exp_avg_sq = max_exp_avg_sq.reshape(-1)
    n = param.size
    if sc.state_rounding == STATE_SAME_DTYPE:
        if max_exp_avg_sq is None:
            max_exp_avg_sq = exp_avg_sq  # never read or written unless amsgrad
        _launch(_serial, _parallel, (param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq, *sc), n)
        return
    # bfloat16 states: pass their bits; the loop derives each 2**32-element
    # block's key from rounding_key (the bits depend on the global index only).
    vmax = _EMPTY_U16 if max_exp_avg_sq is None else max_exp_avg_sq.view(np.uint16)
    arrays = (param, grad, exp_avg.view(np.uint16), exp_avg_sq.view(np.uint16), vmax)
    flags = _bf16_flags(sc)
    _launch(_bf16_loop(False, *flags), _bf16_loop(True, *flags), (*arrays, *sc), n)


# -- multi-tensor step -------------------------------------------------------------

_LIKE = {KIND_F32: np.empty(0, np.float32), KIND_F64: np.empty(0, np.float64)}
_NO_KEYS = np.empty(0, np.uint32)


class _TableCache:
    """What step_multi keeps on ``table.cache["numba"]``: what never changes (the
    table's arrays and total, the all-zeros index), and ``step``, what changes
    only with the scalars, at a new step count: their float64 constants and
    rounding keys, and the compiled loops for their flags. ``step`` is one
    tuple, replaced whole, so a concurrent step reads a consistent one.
    """

    __slots__ = ("bf16", "head", "like", "step", "total", "zeros")

    def __init__(self, table: TensorTable) -> None:
        self.total = table.total
        self.zeros = np.zeros(table.count, np.int32)
        self.head = (table.pointers, table.sizes, table.offsets)
        self.bf16 = table.kind == KIND_BF16
        self.like = None if self.bf16 else _LIKE[table.kind]
        self.step: tuple = ((),)

    def for_scalars(self, scalars: tuple[AdamScalars, ...]) -> tuple:
        """``(scalars, constants (n, 9), rounding keys (n,), serial loop, parallel
        loop, flag arguments)`` for these scalars (n: one per distinct step)."""
        entry = self.step
        if entry[0] != scalars:
            sc = scalars[0]  # the flags are common to all
            consts = np.array([s[:9] for s in scalars], np.float64).reshape(-1, 9)
            keys = np.array([s.rounding_key for s in scalars], np.uint32)
            if self.bf16:
                flags = _bf16_flags(sc)
                loops = (_bf16_multi(False, *flags), _bf16_multi(True, *flags))
                flag_args: tuple = (sc.maximize,)
            else:
                # l2 decided on the float64 value, as the single-array loop does
                flags = (sc.maximize, sc.weight_decay != 0, sc.amsgrad)
                loops = (_multi_loop(False, *flags), _multi_loop(True, *flags))
                flag_args = (sc.unscale, self.like)
            entry = self.step = (scalars, consts, keys, *loops, flag_args)
        return entry


def step_multi(
    table: TensorTable,
    scalars: tuple[AdamScalars, ...],
    index: np.ndarray | None,
    keys: np.ndarray | None,
) -> None:
    """Every tensor of ``table`` updated as :func:`step` would, in one launch
    (see :mod:`fastadam._table` for the arguments).

    One share per thread of the concatenated element range (_split_point), so
    the work splits evenly however the sizes vary; the flags are those of
    ``scalars[0]`` (common to all). The Python side costs the same whatever
    the number of tensors.
    """
    cache = table.cache.get(NAME)
    if cache is None:
        cache = table.cache[NAME] = _TableCache(table)
    if cache.total == 0:
        return
    _, consts, scalar_keys, serial, parallel, flag_args = cache.for_scalars(scalars)
    if index is None:
        index = cache.zeros
    if cache.bf16:
        use_keys = keys is not None
        args = (*cache.head, consts, index, keys if use_keys else _NO_KEYS, scalar_keys,
                use_keys, *flag_args)  # fmt: skip
    else:
        args = (*cache.head, consts, index, *flag_args)
    _launch(serial, parallel, args, cache.total)


def _launch(serial, parallel, args, n: int) -> None:
    """Run a loop over ``n`` elements serially or on our threads; the thread count
    is its last argument (it splits its work into that many shares, see _share)."""
    if n < config.PARALLEL_MIN_ELEMENTS or _num_threads == 1:
        serial(*args, 1)
        return
    with _LAUNCH_LOCK:
        # Numba's thread count is thread-local: apply ours in the launching thread.
        threads = min(_num_threads, numba.config.NUMBA_NUM_THREADS)
        numba.set_num_threads(threads)
        parallel(*args, threads)


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


_unscale_serial = njit(**_JIT)(_make_unscale(False))
_unscale_parallel = njit(parallel=True, **_JIT)(_make_unscale(True))


def unscale_and_check(grad: np.ndarray, scale: float) -> bool:
    """Divide ``grad`` by ``scale`` in place in one pass; True if any result is non-finite."""
    g = grad.reshape(-1)
    if g.size < config.PARALLEL_MIN_ELEMENTS or _num_threads == 1:
        return _unscale_serial(g, scale) != 0
    with _LAUNCH_LOCK:
        numba.set_num_threads(min(_num_threads, numba.config.NUMBA_NUM_THREADS))
        return _unscale_parallel(g, scale) != 0


def set_num_threads(n: int) -> None:
    global _num_threads
    _num_threads = n


def get_num_threads() -> int:
    return min(_num_threads, numba.config.NUMBA_NUM_THREADS)
