"""Vector LLVM IR for the Numba 8-bit blocks (:mod:`._numba_q8`): 16 elements at a time.

Numba's loops are vectorized by LLVM one element at a time, and for the codes
loop that came out costly on AVX2: each 8 codes of each moment were narrowed on
their own, with the constants reloaded every iteration (36 instructions per 8
elements compiled for Haswell). _codes16 states the same integer arithmetic on
16-element vectors, so LLVM's instruction selection narrows 16 codes at once (63
instructions per 16; llvm-mca, znver3: 13.3 against 16.7 cycles per 16
elements; BENCHMARKS.md, session 14). The arithmetic, and so every bit, is
:mod:`fastadam._q8`'s: the codes are ``(bits(x * r) & 0x7FFFFFFF) - base + 2^19
>> 20``, clamped, m's sign in bit 7.

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

LANES = 16
_BASE_M = 0x3F800000 - (127 << 20)
_BASE_V = 0x3F800000 - (255 << 20)
_HALF = 1 << 19

_I8, _I32, _I64 = ir.IntType(8), ir.IntType(32), ir.IntType(64)
_V32 = ir.VectorType(_I32, LANES)
_VF = ir.VectorType(ir.FloatType(), LANES)
_V8 = ir.VectorType(_I8, LANES)


def _splat(value: int, ty: ir.VectorType = _V32) -> ir.Constant:
    return ir.Constant(ty, [ir.Constant(ty.element, value)] * LANES)


def _element_pointer(context, builder, array_type, array, index, index_type, vector_type):
    """A pointer to the vector of elements of ``array`` from ``index`` on."""
    data = context.make_array(array_type)(context, builder, array).data
    i = context.cast(builder, index, index_type, types.int64)
    return builder.bitcast(builder.gep(data, [i]), vector_type.as_pointer())


def _clamp(builder, x, lo, hi):
    x = builder.select(builder.icmp_signed("<", x, lo), lo, x)
    return builder.select(builder.icmp_signed(">", x, hi), hi, x)


def _is_codes(a) -> bool:
    return isinstance(a, types.Array) and a.ndim == 1 and a.dtype == types.uint8


def _is_floats(a) -> bool:
    return isinstance(a, types.Array) and a.ndim == 1 and a.dtype == types.float32


@intrinsic
def _codes16(typingctx, cm, cv, buf, o, j, r_m, r_v):
    """The codes of elements ``j`` .. ``j + 15`` (into ``cm``, ``cv``) from their new
    moments in ``buf`` (m at ``o``, v at ``o + 256``) and the block's reciprocal
    scales ``r_m``, ``r_v``: _numba_q8._codes, 16 at a time. The caller keeps
    every index in bounds (nothing is checked here)."""
    if not (
        _is_codes(cm) and _is_codes(cv) and _is_floats(buf)
        and isinstance(o, types.Integer) and isinstance(j, types.Integer)
        and r_m == types.float32 and r_v == types.float32
    ):  # fmt: skip
        return None

    def codegen(context, builder, sig, args):
        cm_, cv_, buf_, o_, j_, rm_, rv_ = args
        vm = builder.load(
            _element_pointer(context, builder, sig.args[2], buf_, o_, sig.args[3], _VF), align=4
        )
        o256 = builder.add(o_, ir.Constant(o_.type, 256))
        vv = builder.load(
            _element_pointer(context, builder, sig.args[2], buf_, o256, sig.args[3], _VF), align=4
        )

        def scaled_bits(x, r):
            splat = builder.shuffle_vector(
                builder.insert_element(ir.Constant(_VF, ir.Undefined), r, ir.Constant(_I32, 0)),
                ir.Constant(_VF, ir.Undefined),
                ir.Constant(ir.VectorType(_I32, LANES), [0] * LANES),
            )
            product = builder.bitcast(builder.fmul(x, splat), _V32)
            return builder.and_(product, _splat(0x7FFFFFFF))

        # m: clamp to [0, 127], sign bit of m into bit 7
        t = builder.ashr(builder.add(scaled_bits(vm, rm_), _splat(_HALF - _BASE_M)), _splat(20))
        t = _clamp(builder, t, _splat(0), _splat(127))
        sign = builder.and_(builder.lshr(builder.bitcast(vm, _V32), _splat(24)), _splat(0x80))
        codes_m = builder.trunc(builder.or_(t, sign), _V8)
        # v: clamp to [lo, 255], lo = 1 for a nonzero v (never coded as 0), else 0
        t = builder.ashr(builder.add(scaled_bits(vv, rv_), _splat(_HALF - _BASE_V)), _splat(20))
        vbits = builder.bitcast(vv, _V32)
        lo = builder.zext(builder.icmp_unsigned("!=", vbits, _splat(0)), _V32)
        t = _clamp(builder, t, lo, _splat(255))
        codes_v = builder.trunc(t, _V8)
        for array, codes in ((cm_, codes_m), (cv_, codes_v)):
            pointer = _element_pointer(context, builder, sig.args[0], array, j_, sig.args[4], _V8)
            builder.store(codes, pointer, align=1)
        return context.get_dummy_value()

    return types.none(cm, cv, buf, o, j, r_m, r_v), codegen
