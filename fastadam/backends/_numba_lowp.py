"""Numba backend's low-precision loops (issue 17): fastadam._lowp's reference,
element for element, in one ``prange`` loop per tensor.

bfloat16/float16 arrays are handed over as their uint16 bits; the conversions
are the integer code of csrc/fastadam_lowp_kernel.h, on uint64 lanes (Numba
widens integer arithmetic; every constant is a uint64 so nothing becomes a
float). The fused multiply-adds are LLVM's ``llvm.fma.f32``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from numba import njit, prange

from .._lowp import FLOAT32, KINDS, PARAM_STOCHASTIC, STATE_STOCHASTIC
from .._numba_cache import njit as cached_njit
from .._scalars import AdamScalars
from ._numba_intrinsics import _bits_f32, _f32_bits, _fma

_U = np.uint64
_M16 = _U(0xFFFF)
_M32 = _U(0xFFFFFFFF)
_F32, _BF16, _F16 = 0, 1, 2  # storage types, as fastadam_lowp_kernel.h's FA_LP_*


@njit(inline="always")
def _mix32(x):
    x = x ^ (x >> _U(16))
    x = (x * _U(0x7FEB352D)) & _M32
    x = x ^ (x >> _U(15))
    x = (x * _U(0x846CA68B)) & _M32
    return x ^ (x >> _U(16))


@njit(inline="always")
def _widen16(h, t):
    h = _U(h)
    if t == _BF16:
        return _bits_f32(np.uint32(h << _U(16)))
    sign = (h & _U(0x8000)) << _U(16)
    e = (h >> _U(10)) & _U(0x1F)
    mant = h & _U(0x3FF)
    if e == _U(0x1F):
        bits = _U(0x7F800000) | (mant << _U(13))
    elif e == _U(0):
        bits = _U(_f32_bits(np.float32(np.float32(mant) * np.float32(2.0**-24))))
    else:
        bits = ((h & _U(0x7FFF)) << _U(13)) + _U(0x38000000)
    return _bits_f32(np.uint32(sign | bits))


@njit(inline="always")
def _round_bf16(u, add):
    if (u & _U(0x7FFFFFFF)) > _U(0x7F800000):
        return (u >> _U(16)) | _U(0x0040)
    return ((u + add) >> _U(16)) & _M16


@njit(inline="always")
def _nearest16(x, t):
    u = _U(_f32_bits(x))
    if t == _BF16:
        return _round_bf16(u, _U(0x7FFF) + ((u >> _U(16)) & _U(1)))
    sign = (u >> _U(16)) & _U(0x8000)
    a = u & _U(0x7FFFFFFF)
    if a > _U(0x7F800000):
        h = _U(0x7E00) | ((a >> _U(13)) & _U(0x3FF))
    elif a >= _U(0x477FF000):
        h = _U(0x7C00)
    elif a >= _U(0x38800000):
        h = (a - _U(0x38000000) + _U(0x0FFF) + ((a >> _U(13)) & _U(1))) >> _U(13)
    else:
        e = a >> _U(23)
        s = _U(31) if e < _U(95) else _U(126) - e
        m = (a & _U(0x7FFFFF)) | _U(0x800000)
        q = m >> s
        rem = m & ((_U(1) << s) - _U(1))
        half = _U(1) << (s - _U(1))
        if rem > half or (rem == half and (q & _U(1)) == _U(1)):
            q = q + _U(1)
        h = q
    return sign | h


@njit(inline="always")
def _stochastic_f16(x, r):
    """fastadam._lowp.round_f16_stochastic_bits of one value (r: 32 random bits)."""
    u = _U(_f32_bits(x))
    sign = (u >> _U(16)) & _U(0x8000)
    a = u & _U(0x7FFFFFFF)
    if a > _U(0x7F800000):
        h = _U(0x7E00) | ((a >> _U(13)) & _U(0x3FF))
    elif a >= _U(0x47800000):
        h = _U(0x7C00)
    elif a >= _U(0x38800000):
        h = (a - _U(0x38000000) + (r & _U(0x1FFF))) >> _U(13)
    else:
        e = a >> _U(23)
        if e < _U(95):
            h = _U(0)
        else:
            s = _U(126) - e
            m = (a & _U(0x7FFFFF)) | _U(0x800000)
            mask = (_U(1) << s) - _U(1)
            h = (m >> s) + (((m & mask) + (r & mask)) >> s)
    return sign | h


@njit(inline="always")
def _bits16(x, t, sr, r):
    """x rounded to t (bfloat16/float16): nearest-even, or stochastically with r."""
    if not sr:
        return _nearest16(x, t)
    if t == _BF16:
        return _round_bf16(_U(_f32_bits(x)), r & _M16)
    return _stochastic_f16(x, r)


# Each array comes as two, a32 (float32) and a16 (uint16 bits), one of them a
# stand-in; its storage type t says which is read and written.


@njit(inline="always")
def _load(a32, a16, i, t):
    if t == _F32:
        return a32[i]
    return _widen16(a16[i], t)


@njit(inline="always")
def _store(a32, a16, i, t, x):
    if t == _F32:
        a32[i] = x
    else:
        a16[i] = _nearest16(x, t)


@njit(inline="always")
def _store_sr(a32, a16, i, t, x, sr, r):
    if t == _F32:
        a32[i] = x
    else:
        a16[i] = _bits16(x, t, sr, r)


@cached_njit(parallel=True)
def _loop(p32, p16, g32, g16, m32, m16, v32, v16, x32, x16, c16, n, pt, gt, st, ct, psr, ssr, key,
          step_size, bc2, eps, omb1, beta2, omb2, wd, decay, grad_scale,
          unscale, maximize, amsgrad):  # fmt: skip
    l2 = wd != 0.0  # on the float64 value, as the C dispatcher's flag
    step_size = np.float32(step_size)
    bc2 = np.float32(bc2)
    eps = np.float32(eps)
    omb1 = np.float32(omb1)
    beta2 = np.float32(beta2)
    omb2 = np.float32(omb2)
    wd = np.float32(wd)
    decay = np.float32(decay)
    grad_scale = np.float32(grad_scale)
    key = _U(key)
    small = omb1 < np.float32(0.5)
    coeff = omb1 if small else omb1 - np.float32(1.0)
    for i in prange(n):
        gi = _load(g32, g16, i, gt)
        if unscale:
            gi = gi / grad_scale
            _store(g32, g16, i, gt, gi)
        if maximize:
            gi = -gi
        pi = _load(p32, p16, i, pt)
        m_old = _load(m32, m16, i, st)
        v_old = _load(v32, v16, i, st)
        if ct < 0:
            if l2:
                gi = _fma(pi, wd, gi)
            pi = pi * decay
            mi = _fma(coeff, gi - m_old, m_old if small else gi)
            vi = _fma(omb2 * gi, gi, v_old * beta2)
        else:
            if l2:
                gi = gi + wd * pi
            pi = pi * decay
            mi = m_old + (gi - m_old) * omb1
            vi = v_old * beta2 + omb2 * gi * gi
        r = _U(0)
        r2 = _U(0)
        if psr or ssr:
            idx = _U(i)
            r = _mix32((idx & _M32) ^ _mix32(key ^ (idx >> _U(32))))
            r2 = _mix32(r)
        _store_sr(m32, m16, i, st, mi, ssr, r2)
        _store_sr(v32, v16, i, st, vi, ssr, r2 >> _U(16))
        second = vi
        if amsgrad:
            old = _load(x32, x16, i, st)
            if old > vi or old != old:
                second = old
            _store_sr(x32, x16, i, st, second, ssr, r2 >> _U(16))
        denom = np.sqrt(second) / bc2 + eps
        pi = pi - step_size * mi / denom
        if ct >= 0:
            p32[i] = pi
            c16[i] = _bits16(pi, ct, psr, r)
        else:
            _store_sr(p32, p16, i, pt, pi, psr, r)


_EMPTY32 = np.zeros(1, np.float32)
_EMPTY16 = np.zeros(1, np.uint16)


def _args(a: Any) -> tuple[np.ndarray, np.ndarray]:
    """``a`` (contiguous, checked) as the pair (float32 view, uint16 view) with
    a one-element stand-in for the view it does not have: every kind of step
    then calls one compiled ``_loop``, the storage types being values, not
    types (one compile, not one per kind's combination of dtypes)."""
    if a is None:
        return _EMPTY32, _EMPTY16
    a = a.reshape(-1)
    return (a, _EMPTY16) if a.dtype == FLOAT32 else (_EMPTY32, a.view(np.uint16))


def _code(dt: Any) -> int:
    if dt is None:
        return -1
    return {"float32": _F32, "bfloat16": _BF16, "float16": _F16}[np.dtype(dt).name]


def step_rows(
    kind: str,
    rows: Sequence[tuple[Any, ...]],
    scalars: Sequence[AdamScalars],
    index: np.ndarray | None,
    keys: np.ndarray | None,
    rounding: int,
) -> None:
    """Every tensor of ``rows`` stepped in turn (see fastadam._lowp.step_rows)."""
    info = KINDS[kind]
    pt, gt, st, ct = _code(info.param), _code(info.grad), _code(info.state), _code(info.copy)
    psr = (rounding & PARAM_STOCHASTIC) != 0
    ssr = (rounding & STATE_STOCHASTIC) != 0
    for i, row in enumerate(rows):
        n = row[0].size
        if n == 0:
            continue
        sc = scalars[0 if index is None else int(index[i])]
        key = 0 if keys is None else int(keys[i])
        _loop(
            *_args(row[0]), *_args(row[1]), *_args(row[2]), *_args(row[3]),
            *_args(row[4] if sc.amsgrad else None), _args(row[5])[1],
            n, pt, gt, st, ct, psr, ssr, key,
            sc.step_size, sc.bias_correction2_sqrt, sc.eps, sc.one_minus_beta1, sc.beta2,
            sc.one_minus_beta2, sc.weight_decay, sc.decay, sc.grad_scale, sc.unscale,
            sc.maximize, sc.amsgrad,
        )  # fmt: skip
