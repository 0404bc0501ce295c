"""The 8-bit codes of 16 elements at a time, packed as the C avx2 variant packs them.

For AVX2 targets without AVX-512 (:data:`PACKS`). Numba's codes loop
(:func:`._numba_q8._codes`, vectorized by LLVM one element at a time) narrowed
each 8 codes of each moment with an extract and two packs: 6 shuffles per 8
elements, on the one port (Intel) that runs them. Here the codes of 16 elements
of both moments take 5: two ``packusdw`` (m, v), one ``packuswb`` and one
``vpermd`` to put the bytes in order, and the extract of the high half for the
store. The arithmetic, and so every bit, is :mod:`fastadam._q8`'s: a code is
``(bits(x * r) & 0x7FFFFFFF) + 2^19 - base >> 20``, clamped (m: to [0, 127],
then its sign in bit 7; v: to at least 1 for a nonzero v), packed with unsigned
saturation (which caps v at 255, as the reference's clamp does).

Numba's on-disk cache checks only the source file of each cached function
(``_numba_q8.py``, and ``_numba_cfunc.py`` for the one-call path): after editing
this file in a source checkout, clear ``__pycache__/_numba_q8*.nb[ic]`` and
``__pycache__/_numba_cfunc*.nb[ic]``. An install rewrites every file, renewing
the cache.
"""

from __future__ import annotations

from llvmlite import ir
from numba import types
from numba.extending import intrinsic

from ._numba_intrinsics import target_features

#: Whether the 8-bit blocks write their codes with _codes16 (an AVX2 target
#: without AVX-512; AVX-512 narrows 16 lanes in one instruction anyway).
PACKS = "avx2" in target_features() and "avx512f" not in target_features()

LANES = 16
_BASE_M = 0x3F800000 - (127 << 20)
_BASE_V = 0x3F800000 - (255 << 20)
_HALF = 1 << 19

_I8, _I16, _I32 = ir.IntType(8), ir.IntType(16), ir.IntType(32)
_V8I32 = ir.VectorType(_I32, 8)
_V8F = ir.VectorType(ir.FloatType(), 8)


def _splat(value: int, ty: ir.VectorType = _V8I32) -> ir.Constant:
    return ir.Constant(ty, [ir.Constant(ty.element, value)] * ty.count)


def _element_pointer(context, builder, array_type, array, index, index_type, vector_type):
    """A pointer to the vector of elements of ``array`` from ``index`` on."""
    data = context.make_array(array_type)(context, builder, array).data
    i = context.cast(builder, index, index_type, types.int64)
    return builder.bitcast(builder.gep(data, [i]), vector_type.as_pointer())


def _is_array(a, dtype) -> bool:
    return isinstance(a, types.Array) and a.ndim == 1 and a.dtype == dtype


@intrinsic
def _codes16(typingctx, cm, cv, buf, o, j, r_m, r_v):
    """The codes of elements ``j`` .. ``j + 15`` (into ``cm``, ``cv``) from their new
    moments in ``buf`` (m at ``o``, v at ``o + 256``) and the block's reciprocal
    scales ``r_m``, ``r_v``. The caller keeps every index in bounds (nothing is
    checked here) and compiles for AVX2 (:data:`PACKS`)."""
    if not (
        _is_array(cm, types.uint8) and _is_array(cv, types.uint8)
        and _is_array(buf, types.float32)
        and isinstance(o, types.Integer) and isinstance(j, types.Integer)
        and r_m == types.float32 and r_v == types.float32
    ):  # fmt: skip
        return None

    def codegen(context, builder, sig, args):
        cm_, cv_, buf_, o_, j_, rm_, rv_ = args

        def load8(offset):
            k = builder.add(o_, ir.Constant(o_.type, offset))
            pointer = _element_pointer(context, builder, sig.args[2], buf_, k, sig.args[3], _V8F)
            return builder.load(pointer, align=4)

        def splat_f(x):
            vec = builder.insert_element(ir.Constant(_V8F, ir.Undefined), x, ir.Constant(_I32, 0))
            return builder.shuffle_vector(vec, ir.Constant(_V8F, ir.Undefined),
                                          ir.Constant(_V8I32, [0] * 8))  # fmt: skip

        def smax(a, b):
            return builder.select(builder.icmp_signed(">", a, b), a, b)

        def smin(a, b):
            return builder.select(builder.icmp_signed("<", a, b), a, b)

        def magnitude_code(x, r, base):
            product = builder.bitcast(builder.fmul(x, r), _V8I32)
            u = builder.and_(product, _splat(0x7FFFFFFF))
            return builder.ashr(builder.add(u, _splat(_HALF - base)), _splat(20))

        srm, srv = splat_f(rm_), splat_f(rv_)
        m_codes, v_codes = [], []
        for half in (0, 8):
            x = load8(half)
            t = smin(smax(magnitude_code(x, srm, _BASE_M), _splat(0)), _splat(127))
            sign = builder.and_(builder.lshr(builder.bitcast(x, _V8I32), _splat(24)), _splat(0x80))
            m_codes.append(builder.or_(t, sign))
            y = load8(256 + half)
            lo = builder.zext(builder.icmp_unsigned("!=", builder.bitcast(y, _V8I32), _splat(0)),
                              _V8I32)  # fmt: skip
            # no clamp at 255: packuswb saturates there
            v_codes.append(smax(magnitude_code(y, srv, _BASE_V), lo))

        v16i16, v32i8 = ir.VectorType(_I16, 16), ir.VectorType(_I8, 32)
        packusdw = builder.module.declare_intrinsic(
            "llvm.x86.avx2.packusdw", fnty=ir.FunctionType(v16i16, [_V8I32, _V8I32])
        )
        packuswb = builder.module.declare_intrinsic(
            "llvm.x86.avx2.packuswb", fnty=ir.FunctionType(v32i8, [v16i16, v16i16])
        )
        words_m = builder.call(packusdw, m_codes)  # m0-3 m8-11 | m4-7 m12-15
        words_v = builder.call(packusdw, v_codes)
        # bytes, as dwords: m0-3 m8-11 v0-3 v8-11 | m4-7 m12-15 v4-7 v12-15
        dwords = builder.bitcast(builder.call(packuswb, [words_m, words_v]), _V8I32)
        ordered = builder.shuffle_vector(dwords, ir.Constant(_V8I32, ir.Undefined),
                                         ir.Constant(_V8I32, [0, 4, 1, 5, 2, 6, 3, 7]))  # fmt: skip
        v4i32 = ir.VectorType(_I32, 4)
        undef = ir.Constant(_V8I32, ir.Undefined)
        for array, lanes in ((cm_, [0, 1, 2, 3]), (cv_, [4, 5, 6, 7])):
            codes = builder.shuffle_vector(ordered, undef, ir.Constant(v4i32, lanes))
            pointer = _element_pointer(context, builder, sig.args[0], array, j_, sig.args[4], v4i32)
            builder.store(codes, pointer, align=1)
        return context.get_dummy_value()

    return types.none(cm, cv, buf, o, j, r_m, r_v), codegen
