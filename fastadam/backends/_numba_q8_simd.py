"""8-bit codes and their values, 16 or 32 elements at a time, as the C kernels compute them.

For x86 targets with AVX2 (:data:`PACKS`: 16 elements a call) or AVX-512 BW
(32). Numba's codes loop (:func:`._numba_q8._codes`, vectorized by LLVM one
element at a time) narrowed each vector of codes of each moment on its own:
with AVX2 an extract and two packs, 6 shuffles per 8 elements on the one port
(Intel) that runs them; with AVX-512 a ``vpmovdb`` of two operations per 16.
Here (:func:`_codes_vectors`) the codes of both moments take two 32-to-16-bit
packs (m, v), one 16-to-8-bit pack and one permutation of dwords to put the
bytes in order, and the clamps are applied to the packed bytes, all codes at
once. The arithmetic, and so every bit, is :mod:`fastadam._q8`'s: a code is
``(bits(x * r) & 0x7FFFFFFF) + 2^19 - base >> 20``, clamped (m: to [0, 127],
then its sign in bit 7; v: to [1, 255] for a nonzero v, [0, 255] for a zero).

On the same targets (:data:`FUSED`) the whole update of 32 elements is one
intrinsic (:func:`_update_vectors`): the codes decoded in registers in 16-bit
lanes (32 at a time with AVX-512 BW, 16 with AVX2; LLVM's decode in 32-bit
lanes took 17 vector operations per 8 elements, besides its loads), the
update, and the running absmax, so that the blocks can write the previous
block's codes between two such calls, as the C kernel does (see
:func:`._numba_q8._pass_fused`).

Numba's on-disk cache checks only the source file of each cached function
(``_numba_q8.py``, and ``_numba_cfunc.py`` for the one-call path): after editing
this file in a source checkout, clear ``__pycache__/_numba_q8*.nb[ic]`` and
``__pycache__/_numba_cfunc*.nb[ic]``. An install rewrites every file, renewing
the cache.
"""

from __future__ import annotations

from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

from .. import _q8
from ._numba_intrinsics import target_features

_FEATURES = target_features()
#: Whether the 8-bit blocks write their codes with _codes_vectors (x86, AVX2 at least).
PACKS = "avx2" in _FEATURES
#: Elements per 32-bit vector of the target, and the pack intrinsics for it.
_WIDTH, _PACK = (
    (16, "llvm.x86.avx512.pack{}.512") if "avx512bw" in _FEATURES
    else (8, "llvm.x86.avx2.pack{}")
)  # fmt: skip
#: Elements one _codes_vectors call codes (two vectors of each moment).
LANES = 2 * _WIDTH
#: Whether the 8-bit blocks update 32 elements at a time with _update_vectors
#: (x86 with AVX2), the previous block's codes written between the calls.
FUSED = PACKS
# The code map's constants (fastadam._q8), as integer offsets on float32 bits: a
# code k of m stands for the float bits k << 20 + _BASE_M (v: + _BASE_V), and
# encoding rounds with _HALF. Used by _numba_q8 too.
_BASE_M = _q8._ONE - (_q8.K_M << _q8._SHIFT)
_BASE_V = _q8._ONE - (_q8.K_V << _q8._SHIFT)
_HALF = _q8._HALF

_I8, _I16, _I32 = ir.IntType(8), ir.IntType(16), ir.IntType(32)
_VI32 = ir.VectorType(_I32, _WIDTH)
_VF = ir.VectorType(ir.FloatType(), _WIDTH)


def _splat(value: int, ty: ir.VectorType = _VI32) -> ir.Constant:
    return ir.Constant(ty, [ir.Constant(ty.element, value)] * ty.count)


def _broadcast(builder, x, vector_type: ir.VectorType):
    """The scalar ``x`` in every lane of a ``vector_type``."""
    vec = builder.insert_element(ir.Constant(vector_type, ir.Undefined), x, ir.Constant(_I32, 0))
    return builder.shuffle_vector(vec, ir.Constant(vector_type, ir.Undefined),
                                  ir.Constant(ir.VectorType(_I32, vector_type.count),
                                              [0] * vector_type.count))  # fmt: skip


def _zero_interleave(words: int) -> tuple[list[int], list[int]]:
    """shufflevector masks over (zeros, h) of ``words`` 16-bit lanes that put each
    word of h in the high half of a 32-bit lane, the low half zero, as the
    in-lane interleaves (punpcklwd, punpckhwd) do: the low and high four words
    of each 128-bit lane."""
    low = [i for k in range(words // 8) for q in range(8 * k, 8 * k + 4) for i in (q, words + q)]
    return low, [i + 4 for i in low]


def _element_pointer(context, builder, array_type, array, index, index_type, vector_type):
    """A pointer to the vector of elements of ``array`` from ``index`` on."""
    data = context.make_array(array_type)(context, builder, array).data
    i = context.cast(builder, index, index_type, types.int64)
    return builder.bitcast(builder.gep(data, [i]), vector_type.as_pointer())


def _is_array(a, dtype) -> bool:
    return isinstance(a, types.Array) and a.ndim == 1 and a.dtype == dtype


@intrinsic
def _codes_vectors(typingctx, cm, cv, buf, o, j, r_m, r_v):
    """The codes of elements ``j`` .. ``j + LANES - 1`` (into ``cm``, ``cv``) from
    their new moments in ``buf`` (m at ``o``, v at ``o + 256``) and the block's
    reciprocal scales ``r_m``, ``r_v``. The caller keeps every index in bounds
    (nothing is checked here) and compiles for x86 with AVX2 (:data:`PACKS`)."""
    if not (
        _is_array(cm, types.uint8) and _is_array(cv, types.uint8)
        and _is_array(buf, types.float32)
        and isinstance(o, types.Integer) and isinstance(j, types.Integer)
        and r_m == types.float32 and r_v == types.float32
    ):  # fmt: skip
        return None

    def codegen(context, builder, sig, args):
        cm_, cv_, buf_, o_, j_, rm_, rv_ = args

        def load_vector(offset):
            k = builder.add(o_, ir.Constant(o_.type, offset))
            pointer = _element_pointer(context, builder, sig.args[2], buf_, k, sig.args[3], _VF)
            return builder.load(pointer, align=4)

        def magnitude_code(x, r, base):
            product = builder.bitcast(builder.fmul(x, r), _VI32)
            u = builder.and_(product, _splat(0x7FFFFFFF))
            return builder.ashr(builder.add(u, _splat(_HALF - base)), _splat(_q8._SHIFT))

        srm, srv = _broadcast(builder, rm_, _VF), _broadcast(builder, rv_, _VF)
        m_bits, v_bits, m_codes, v_codes = [], [], [], []
        for half in (0, _WIDTH):
            x, y = load_vector(half), load_vector(256 + half)
            m_bits.append(builder.bitcast(x, _VI32))
            v_bits.append(builder.bitcast(y, _VI32))
            m_codes.append(magnitude_code(x, srm, _BASE_M))
            v_codes.append(magnitude_code(y, srv, _BASE_V))

        words, octets = ir.VectorType(_I16, 2 * _WIDTH), ir.VectorType(_I8, 4 * _WIDTH)

        def pack(kind, a, b):
            """packssdw (32 to 16 bits) or packsswb, packuswb (16 to 8)."""
            result, arg = (words, _VI32) if kind.endswith("dw") else (octets, words)
            fn = builder.module.declare_intrinsic(
                _PACK.format(kind), fnty=ir.FunctionType(result, [arg, arg])
            )
            return builder.call(fn, [a, b])

        def per_lane(m_byte, v_byte):
            return ir.Constant(octets, ([m_byte] * 8 + [v_byte] * 8) * (_WIDTH // 4))

        def umin(a, b):
            return builder.select(builder.icmp_unsigned("<", a, b), a, b)

        # The packs work within each 128-bit lane k: their bytes, as dwords, are
        # m0_k m1_k v0_k v1_k (m0_k: 4 codes of m's first vector, from its lane k).
        # The clamps are applied to these bytes, all codes at once: packssdw
        # keeps a code out of range out of range and packuswb takes it to
        # [0, 255] (v's clamp at 255), so one unsigned byte min takes m's to
        # [0, 127]. The moments' float bits packed the same way, with signed
        # saturation, keep m's sign in the top bit of m's bytes and v's
        # "nonzero" in v's: its code is at least min(that byte, 1).
        codes = pack("uswb", pack("ssdw", *m_codes), pack("ssdw", *v_codes))
        bits = pack("sswb", pack("ssdw", *m_bits), pack("ssdw", *v_bits))
        signed = builder.or_(umin(codes, per_lane(_q8.K_M, 255)),
                             builder.and_(bits, per_lane(0x80, 0)))  # fmt: skip
        floor = umin(bits, per_lane(0, 1))
        packed = builder.select(builder.icmp_unsigned(">", signed, floor), signed, floor)
        dwords = builder.bitcast(packed, _VI32)
        lanes = _WIDTH // 4
        order = [4 * k + q for q in range(4) for k in range(lanes)]
        ordered = builder.shuffle_vector(dwords, ir.Constant(_VI32, ir.Undefined),
                                         ir.Constant(_VI32, order))  # fmt: skip
        half_type = ir.VectorType(_I32, _WIDTH // 2)
        undef = ir.Constant(_VI32, ir.Undefined)
        for array, first in ((cm_, 0), (cv_, _WIDTH // 2)):
            picked = list(range(first, first + _WIDTH // 2))
            codes = builder.shuffle_vector(ordered, undef, ir.Constant(half_type, picked))
            pointer = _element_pointer(context, builder, sig.args[0], array, j_, sig.args[4],
                                       half_type)  # fmt: skip
            builder.store(codes, pointer, align=1)
        return context.get_dummy_value()

    return types.none(cm, cv, buf, o, j, r_m, r_v), codegen


# pshufb controls of _decode_words_16 (a byte of 0x80 writes a zero): the codes,
# loaded into both 128-bit lanes, to the high (m) or low (v) byte of 16-bit
# lanes, ordered so that each lane's low words hold codes 0-3 / 4-7 and its high
# words 8-11 / 12-15; the in-lane interleaves with zeros then give elements
# 0-7 and 8-15 in order.
_CODE_ORDER = (0, 1, 2, 3, 8, 9, 10, 11, 4, 5, 6, 7, 12, 13, 14, 15)
_TO_LOW_BYTE = [b for c in _CODE_ORDER for b in (c, 0x80)]
_TO_HIGH_BYTE = [b for c in _CODE_ORDER for b in (0x80, c)]


def _decode_words_16(context, builder, arrays, j_, j_type):
    """The high halves of y(code) of 16 codes of each moment (``arrays``: the
    (type, value) of cm and cv), <16 x i16> in the order of _CODE_ORDER: AVX2's
    byte shuffle and psignw (the C kernel's AVX2 fa_q8_decode)."""
    v16i8, v32i8 = ir.VectorType(_I8, 16), ir.VectorType(_I8, 32)
    v16i16 = ir.VectorType(_I16, 16)
    pshufb = builder.module.declare_intrinsic(
        "llvm.x86.avx2.pshuf.b", fnty=ir.FunctionType(v32i8, [v32i8, v32i8])
    )
    psign = builder.module.declare_intrinsic(
        "llvm.x86.avx2.psign.w", fnty=ir.FunctionType(v16i16, [v16i16, v16i16])
    )

    def words(array, control):
        pointer = _element_pointer(context, builder, array[0], array[1], j_, j_type, v16i8)
        codes = builder.load(pointer, align=1)
        both = builder.shuffle_vector(
            codes,
            ir.Constant(v16i8, ir.Undefined),
            ir.Constant(ir.VectorType(_I32, 32), list(range(16)) * 2),
        )
        control = ir.Constant(v32i8, [ir.Constant(_I8, b - 256 if b > 127 else b)
                                      for b in control])  # fmt: skip
        return builder.bitcast(builder.call(pshufb, [both, control]), v16i16)

    def w16(value):
        return _splat(value, v16i16)

    # m: code << 8 = sign in bit 15, k in bits 8-14; high half = base + k << 4,
    # or 0 where k is 0 (psignw by k >= 0), | sign
    xm = words(arrays[0], _TO_HIGH_BYTE)
    km4 = builder.and_(builder.lshr(xm, w16(4)), w16(_q8.K_M << 4))
    hm = builder.call(psign, [builder.add(km4, w16(_BASE_M >> 16)), km4])
    hm = builder.or_(hm, builder.and_(xm, w16(0x8000)))
    # v: k = the code
    kv = words(arrays[1], _TO_LOW_BYTE)
    hv = builder.call(psign, [builder.add(builder.shl(kv, w16(4)), w16(_BASE_V >> 16)), kv])
    return hm, hv


# The codes' dwords, for _update_vectors: 0-3 16-19 | 4-7 20-23 | 8-11 24-27 |
# 12-15 28-31, one 128-bit lane each once widened to 16 bits, so that the
# in-lane interleaves give elements 0-15 and 16-31 in order (as the C kernel's
# AVX-512 fa_q8_decode).
_CODE_ORDER_32 = [4 * d + b for d in (0, 4, 1, 5, 2, 6, 3, 7) for b in range(4)]
#: Where the blocks' buffer keeps _update_vectors' running magnitude maxima (int32
#: bits, a vector of the target's width of m at ACC, of v at ACC + 16), past the
#: two blocks' moments.
ACC = 1024


def _decode_words_32(context, builder, arrays, j_, j_type):
    """The high halves of y(code) of 32 codes of each moment (``arrays``: the
    (type, value) of cm and cv), <32 x i16> in the order of _CODE_ORDER_32.

    m is sign-extended, so that (x << 4) & 0x87F0 is k << 4 with the code's
    sign in bit 15; where k != 0 the base is added (base + (k << 4) < 0x8000
    keeps the sign), where k == 0 the sign alone stays: y = +-0, as the
    reference's. v: base + k << 4, or 0 for k == 0.
    """
    v32i8, v32i16 = ir.VectorType(_I8, 32), ir.VectorType(_I16, 32)
    order = ir.Constant(ir.VectorType(_I32, 32), _CODE_ORDER_32)

    def words(array, widen):
        pointer = _element_pointer(context, builder, array[0], array[1], j_, j_type, v32i8)
        codes = builder.load(pointer, align=1)
        ordered = builder.shuffle_vector(codes, ir.Constant(v32i8, ir.Undefined), order)
        return widen(ordered, v32i16)

    def w16(value):
        return _splat(value, v32i16)

    xm = words(arrays[0], builder.sext)
    sm = builder.and_(builder.shl(xm, w16(4)), w16(0x8000 | (_q8.K_M << 4)))
    km = builder.icmp_unsigned("!=", builder.and_(xm, w16(_q8.K_M)), w16(0))
    hm = builder.select(km, builder.add(sm, w16(_BASE_M >> 16)), sm)
    xv = words(arrays[1], builder.zext)
    hv = builder.select(builder.icmp_unsigned("!=", xv, w16(0)),
                        builder.add(builder.shl(xv, w16(4)), w16(_BASE_V >> 16)),
                        w16(0))  # fmt: skip
    return hm, hv


@intrinsic
def _update_vectors(typingctx, p, g, cm, cv, buf, o, j, c, a_m, a_v, flags):
    """The update of elements ``j`` .. ``j + 31`` for x86 targets with AVX2
    (:data:`FUSED`): :func:`._numba_q8._element`'s operations in its order, on
    vectors of 16 (AVX-512 BW) or 8.

    The codes are decoded in registers (_decode_words_32 or, without AVX-512,
    two calls of _decode_words_16); param (and grad,
    when unscaling) written; the new m and v stored into ``buf`` at ``o`` and
    ``o + 256``; their magnitude bits folded into the running maxima at
    ``buf[ACC:ACC + 32]``. ``c``: the 9 float32 scalars of _element; ``flags``:
    (unscale, maximize, l2, div), constants in the caller, so LLVM keeps no
    branch on them. The caller keeps every index in bounds.
    """
    if not (
        _is_array(p, types.float32) and _is_array(g, types.float32)
        and _is_array(cm, types.uint8) and _is_array(cv, types.uint8)
        and _is_array(buf, types.float32)
        and isinstance(o, types.Integer) and isinstance(j, types.Integer)
        and isinstance(c, types.UniTuple) and c.dtype == types.float32 and c.count == 9
        and a_m == types.float32 and a_v == types.float32
        and isinstance(flags, types.BaseTuple) and len(flags) == 4
        and all(isinstance(f, types.Boolean) for f in flags)
    ):  # fmt: skip
        return None

    def codegen(context, builder, sig, args):
        p_, g_, cm_, cv_, buf_, o_, j_, c_, am_, av_, flags_ = args
        arrays = ((sig.args[2], cm_), (sig.args[3], cv_))
        if _WIDTH == 16:  # 32 codes in one decode, their y in 2 vectors of 16 each
            decoded = [_decode_words_32(context, builder, arrays, j_, sig.args[6])]
        else:  # two decodes of 16, their y in 2 vectors of 8 each
            decoded = [
                _decode_words_16(context, builder, arrays,
                                 builder.add(j_, ir.Constant(j_.type, first)), sig.args[6])
                for first in (0, 16)
            ]  # fmt: skip
        words = 2 * _WIDTH
        zero = ir.Constant(ir.VectorType(_I16, words), None)
        interleave = _zero_interleave(words)

        def y(h, picked):
            shuffled = builder.shuffle_vector(zero, h, ir.Constant(ir.VectorType(_I32, words),
                                                                   picked))  # fmt: skip
            return builder.bitcast(shuffled, _VF)

        ss, bc2, eps, omb1, b2, omb2, wd, decay, gs = (
            _broadcast(builder, builder.extract_value(c_, k), _VF) for k in range(9)
        )
        s_am, s_av = _broadcast(builder, am_, _VF), _broadcast(builder, av_, _VF)
        unscale, maximize, l2, div = (
            context.cast(builder, builder.extract_value(flags_, k), sig.args[10][k],
                         types.boolean)
            for k in range(4)
        )  # fmt: skip
        sqrt = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(_VF, [_VF]), f"llvm.sqrt.v{_WIDTH}f32"
        )
        umax = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(_VI32, [_VI32, _VI32]), f"llvm.umax.v{_WIDTH}i32"
        )
        mag = _splat(0x7FFFFFFF)

        def pointer(k, base, base_type, offset, vector_type=_VF):
            index = builder.add(base, ir.Constant(base.type, offset))
            return _element_pointer(context, builder, sig.args[k], args[k], index, base_type,
                                    vector_type)  # fmt: skip

        acc_o = ir.Constant(o_.type, 0)
        acc_pointers = [pointer(4, acc_o, sig.args[5], ACC + 16 * k, _VI32) for k in (0, 1)]
        acc = [builder.load(q, align=4) for q in acc_pointers]
        vectors = [(hm, hv, picked) for hm, hv in decoded for picked in interleave]
        for k, (hm, hv, picked) in enumerate(vectors):
            e = _WIDTH * k  # this vector's first element
            g_pointer = pointer(1, j_, sig.args[6], e)
            gv = builder.load(g_pointer, align=4)
            unscaled = builder.fdiv(gv, gs)
            with builder.if_then(unscale):
                builder.store(unscaled, g_pointer, align=4)
            gv = builder.select(unscale, unscaled, gv)
            gv = builder.select(maximize, builder.fneg(gv), gv)
            p_pointer = pointer(0, j_, sig.args[6], e)
            pv = builder.load(p_pointer, align=4)
            gv = builder.select(l2, builder.fadd(gv, builder.fmul(wd, pv)), gv)
            pv = builder.fmul(pv, decay)
            m0 = builder.fmul(y(hm, picked), s_am)
            v0 = builder.fmul(y(hv, picked), s_av)
            m = builder.fadd(m0, builder.fmul(builder.fsub(gv, m0), omb1))
            v = builder.fadd(builder.fmul(v0, b2), builder.fmul(builder.fmul(omb2, gv), gv))
            sq = builder.call(sqrt, [v])
            sq = builder.select(div, builder.fdiv(sq, bc2), sq)
            step = builder.fdiv(builder.fmul(ss, m), builder.fadd(sq, eps))
            builder.store(builder.fsub(pv, step), p_pointer, align=4)
            builder.store(m, pointer(4, o_, sig.args[5], e), align=4)
            builder.store(v, pointer(4, o_, sig.args[5], 256 + e), align=4)
            for a, x in enumerate((m, v)):
                acc[a] = builder.call(umax, [acc[a], builder.and_(builder.bitcast(x, _VI32), mag)])
        for q, value in zip(acc_pointers, acc):
            builder.store(value, q, align=4)
        return context.get_dummy_value()

    return types.none(p, g, cm, cv, buf, o, j, c, a_m, a_v, flags), codegen


@intrinsic
def _acc_max(typingctx, buf):
    """The largest lane of each of _update_vectors' running maxima in ``buf``
    (m's at ACC, v's at ACC + 16, a vector of the target's width each), as two
    uint32: a tree of shuffles and maxima per vector. Numba's loop over the 32
    lanes became 32 loads, compares and conditional moves a block, on the
    ports the update needs."""
    if not _is_array(buf, types.float32):
        return None
    pair = types.UniTuple(types.uint32, 2)

    def codegen(context, builder, sig, args):
        reduce = cgutils.get_or_insert_function(
            builder.module,
            ir.FunctionType(_I32, [_VI32]),
            f"llvm.vector.reduce.umax.v{_WIDTH}i32",
        )
        index_type = types.intp
        maxima = []
        for offset in (ACC, ACC + 16):
            k = ir.Constant(context.get_value_type(index_type), offset)
            pointer = _element_pointer(context, builder, sig.args[0], args[0], k, index_type, _VI32)
            maxima.append(builder.call(reduce, [builder.load(pointer, align=4)]))
        return context.make_tuple(builder, pair, maxima)

    return pair(buf), codegen
