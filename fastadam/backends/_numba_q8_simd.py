"""The 8-bit codes of a vector pair of elements at a time, packed as the C kernels pack them.

For x86 targets with AVX2 (:data:`PACKS`: 16 elements a call) or AVX-512 BW
(32). Numba's codes loop (:func:`._numba_q8._codes`, vectorized by LLVM one
element at a time) narrowed each vector of codes of each moment on its own:
with AVX2 an extract and two packs, 6 shuffles per 8 elements on the one port
(Intel) that runs them; with AVX-512 a ``vpmovdb`` of two operations per 16.
Here the codes of both moments take two ``packusdw`` (m, v), one ``packuswb``
and one permutation of dwords to put the bytes in order. The arithmetic, and so
every bit, is :mod:`fastadam._q8`'s: a code is
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

        def splat_f(x):
            vec = builder.insert_element(ir.Constant(_VF, ir.Undefined), x, ir.Constant(_I32, 0))
            return builder.shuffle_vector(vec, ir.Constant(_VF, ir.Undefined),
                                          ir.Constant(_VI32, [0] * _WIDTH))  # fmt: skip

        def smax(a, b):
            return builder.select(builder.icmp_signed(">", a, b), a, b)

        def smin(a, b):
            return builder.select(builder.icmp_signed("<", a, b), a, b)

        def magnitude_code(x, r, base):
            product = builder.bitcast(builder.fmul(x, r), _VI32)
            u = builder.and_(product, _splat(0x7FFFFFFF))
            return builder.ashr(builder.add(u, _splat(_HALF - base)), _splat(_q8._SHIFT))

        srm, srv = splat_f(rm_), splat_f(rv_)
        m_codes, v_codes = [], []
        for half in (0, _WIDTH):
            x = load_vector(half)
            t = smin(smax(magnitude_code(x, srm, _BASE_M), _splat(0)), _splat(_q8.K_M))
            sign = builder.and_(builder.lshr(builder.bitcast(x, _VI32), _splat(24)), _splat(0x80))
            m_codes.append(builder.or_(t, sign))
            y = load_vector(256 + half)
            bits = builder.bitcast(y, _VI32)
            # 1 for a nonzero v, else 0 (LLVM emits a test, a mask move and a
            # shift for this unsigned min, not one vpminud; session 16)
            lo = builder.select(builder.icmp_unsigned("<", bits, _splat(1)), bits, _splat(1))
            # no clamp at 255: packuswb saturates there
            v_codes.append(smax(magnitude_code(y, srv, _BASE_V), lo))

        words, octets = ir.VectorType(_I16, 2 * _WIDTH), ir.VectorType(_I8, 4 * _WIDTH)
        packusdw = builder.module.declare_intrinsic(
            _PACK.format("usdw"), fnty=ir.FunctionType(words, [_VI32, _VI32])
        )
        packuswb = builder.module.declare_intrinsic(
            _PACK.format("uswb"), fnty=ir.FunctionType(octets, [words, words])
        )
        # The packs work within each 128-bit lane k: their bytes, as dwords, are
        # m0_k m1_k v0_k v1_k (m0_k: 4 codes of m's first vector, from its lane k).
        dwords = builder.bitcast(
            builder.call(packuswb, [builder.call(packusdw, m_codes),
                                    builder.call(packusdw, v_codes)]),
            _VI32,
        )  # fmt: skip
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
