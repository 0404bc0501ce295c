"""The Numba backend's LLVM intrinsics: what Numba's own operations cannot say.

Prefetching, views of raw addresses and of arrays without a meminfo (so that
nothing is reference-counted in a loop), the distance to a cache line, bit
casts, 32-bit integer arithmetic, and function attributes for LLVM. The loops
that use them are in :mod:`fastadam.backends._numba_loops`.

Numba's on-disk cache (``cache=True``) checks only the source file of each
cached loop, which is ``_numba_loops.py``: after editing this file in a source
checkout, clear the loops' cache (``__pycache__/_numba_loops*.nb[ic]``) or
touch ``_numba_loops.py``. An install rewrites every file, renewing the cache.
"""

from __future__ import annotations

import functools
import platform

from llvmlite import ir
from numba import types
from numba.extending import intrinsic
from numba.np.arrayobj import populate_array

# Software prefetch: each loop walks blocks of _BLOCK elements and asks, once per
# block, for the cache lines _PREFETCH_BYTES of param ahead in every array (the
# same element distance in each). The hardware streamer stops at each 4 KiB page;
# the C kernels do the same for the same reason, and at the same distance, which
# csrc/fastadam_internal.h explains (4 KiB won on one machine and lost 13-20% on
# another; 1 KiB is the compromise). The bfloat16-state loops (float32 param,
# 16-bit moments) ask 4 KiB ahead on Intel CPUs, as the C ones do: on an Intel
# Xeon their step took 0.69-0.70 of the float32 step's time against 0.74-0.77
# with 1 KiB (2^24, two threads, session 18); on an AMD Zen 4 4 KiB was slower.
_BLOCK = 32
_PREFETCH_BYTES = 1024
_BF16_PREFETCH_BYTES_INTEL = 4096


@functools.cache
def cpu_is_intel() -> bool:
    """Whether this machine's CPU is an Intel one (``GenuineIntel``): where
    ``/proc/cpuinfo`` is missing, from :func:`platform.processor`."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("vendor_id"):
                    return "GenuineIntel" in line
    except OSError:
        pass
    return "intel" in platform.processor().lower()


def _prefetch_bytes(p_dtype, m_dtype) -> int:
    """How far ahead of param a loop on these dtypes prefetches, in bytes."""
    bf16_states = p_dtype == types.float32 and m_dtype == types.uint16
    return _BF16_PREFETCH_BYTES_INTEL if bf16_states and cpu_is_intel() else _PREFETCH_BYTES


@functools.cache
def target_features() -> frozenset[str]:
    """The features of the CPU Numba compiles for (``"avx2"``, ``"avx512f"``, ...):
    ``NUMBA_CPU_FEATURES`` when set, else the host's."""
    import llvmlite.binding as llvm
    import numba

    features = numba.config.CPU_FEATURES
    if features is None:
        features = llvm.get_host_cpu_features().flatten()
    return frozenset(f[1:] for f in features.split(",") if f.startswith("+"))


@functools.cache
def target_cpu() -> str:
    """The CPU Numba compiles for (``"znver5"``, ``"haswell"``, ...):
    ``NUMBA_CPU_NAME`` when set, else the host's."""
    import llvmlite.binding as llvm
    import numba

    return numba.config.CPU_NAME or llvm.get_host_cpu_name()


@intrinsic
def _prefetch_ahead(typingctx, first, end, amsgrad, p, g, m, v, vmax):
    """Prefetch, in each array of a step (``vmax`` only if ``amsgrad``), the cache
    lines of the _BLOCK elements that lie _prefetch_bytes() of ``p`` past element
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
        ahead = _prefetch_bytes(p.dtype, m.dtype) // context.get_abi_sizeof(
            context.get_data_type(p.dtype)
        )
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
def _prefetch_line(typingctx, a, i):
    """Prefetch the cache line that holds element ``i`` of the 1-D array ``a``
    (the address is formed, never dereferenced: one past the end is harmless).
    The 8-bit step's blocks (:mod:`._numba_q8`) ask with it for the next block."""
    if not (isinstance(a, types.Array) and isinstance(i, types.Integer)):
        return None

    def codegen(context, builder, sig, args):
        i8p, i32, i64 = ir.IntType(8).as_pointer(), ir.IntType(32), ir.IntType(64)
        itemsize = context.get_abi_sizeof(context.get_data_type(a.dtype))
        data = context.make_array(a)(context, builder, args[0]).data
        offset = builder.mul(
            context.cast(builder, args[1], sig.args[1], types.int64), ir.Constant(i64, itemsize)
        )
        address = builder.inttoptr(builder.add(builder.ptrtoint(data, i64), offset), i8p)
        fn = builder.module.declare_intrinsic(
            "llvm.prefetch", [i8p], ir.FunctionType(ir.VoidType(), [i8p, i32, i32, i32])
        )
        read, keep_everywhere, data_cache = (ir.Constant(i32, k) for k in (0, 3, 1))
        builder.call(fn, [address, read, keep_everywhere, data_cache])
        return context.get_dummy_value()

    return types.none(a, i), codegen


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


@functools.cache
def has_fma() -> bool:
    """Whether the CPU Numba compiles for has x86 FMA (``llvm.fma`` is then one
    instruction; elsewhere it is a call to libm's ``fma``, exact but slow)."""
    return platform.machine().lower() in ("x86_64", "amd64") and "fma" in target_features()


@intrinsic
def _fma(typingctx, a, b, c):
    """a * b + c rounded once (``llvm.fma``), for float32 or float64 operands
    (the float loops' exact division, the low-precision loops' FMA forms)."""
    if not (isinstance(a, types.Float) and a == b == c):
        return None

    def codegen(context, builder, sig, args):
        t = args[0].type
        fn = builder.module.declare_intrinsic("llvm.fma", [t], ir.FunctionType(t, [t, t, t]))
        return builder.call(fn, args)

    return a(a, b, c), codegen


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
