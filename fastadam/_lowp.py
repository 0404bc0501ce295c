"""Low-precision parameters and float32 master weights (issue 17).

Two new kinds of step, beside fastadam._table's float32/float64/bfloat16-state ones:

* **bfloat16 or float16 parameters**, with gradients of the same dtype and
  moments of the parameter's dtype (as ``torch.optim.AdamW(fused=True)`` keeps
  them), or float32 moments, or (float16 parameters) bfloat16 moments. The
  math runs in float32 in the order of torch's fused CPU loop as it runs,
  three of its multiply-adds fused (its compiler contracts them; measured, see
  :func:`_reference_step`): ``g = fma(p, wd, g)`` (Adam's L2),
  ``m = fma(1-β1, g-m, m)`` (torch's lerp; ``fma(-β1, g-m, g)`` for
  ``1-β1 >= 0.5``), ``v = fma((1-β2)·g, g, v·β2)``; float32 moments are stored
  exactly, bfloat16/float16 ones rounded to nearest-even (bfloat16 moments
  optionally stochastically), but the parameter update uses their float32
  values, as torch's fused CPU kernel (``FusedAdamKernel.cpp``, reduced
  floating types) does; the parameter is rounded to nearest-even or
  stochastically.
* **float32 master weights** with a low-precision copy: a float32 ``param``
  (gradient float32 or of the copy's dtype, float32 moments) is updated as by a
  float32 step, and its new value, rounded to the copy's dtype (nearest-even
  or stochastically), is written to ``param_copy`` in the same pass: one read
  of the master, one write of each.

Stochastic rounding uses the counter hash of the bfloat16 states
(:class:`fastadam._scalars.AdamScalars`): the 32 bits ``r`` of element ``i``
under the key ``rounding_key(seed, step)``. The rounded parameter takes
``r``: bfloat16 ``r & 0xFFFF`` (:func:`fastadam.backends.reference.round_to_bf16`),
float16 :func:`round_f16_stochastic_bits`. Stochastically rounded bfloat16 moments
take ``r2 = mix32(r)``: ``exp_avg`` ``r2 & 0xFFFF``, ``exp_avg_sq`` and
``max_exp_avg_sq`` ``r2 >> 16`` (the max stores ``max(old, v)`` with v's bits:
when v wins it stores what ``exp_avg_sq`` stores, as the float32-parameter
bfloat16 kernel's max does; the old value, a bfloat16 value, is stored exactly).
The rounding code passed to the backends is a bit set: :data:`PARAM_STOCHASTIC`
(1) for the parameter, :data:`STATE_STOCHASTIC` (2) for bfloat16 moments, as
fastadam_lowp.h's ``FA_LOWP_STOCHASTIC``/``FA_LOWP_STOCHASTIC_STATE``.

The scalars are the float32 step's (torch's form of the bias corrections):
``compute_scalars(..., state_rounding=STATE_SAME_DTYPE)``.

This module holds the validation, the NumPy reference (the definition the
fast backends reproduce bit for bit), and the dispatch to the backends'
low-precision loops (``backends._c_lowp``, ``backends._numba_lowp``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import ml_dtypes
import numpy as np

from . import backends
from ._scalars import STATE_SAME_DTYPE, AdamScalars, compute_scalars, rounding_key
from ._table import address
from ._validation import (
    check_array,
    check_arrays_disjoint,
    check_disjoint,
    check_hyper,
    check_seed,
    check_step,
)

BFLOAT16 = np.dtype(ml_dtypes.bfloat16)
FLOAT16 = np.dtype(np.float16)
FLOAT32 = np.dtype(np.float32)
LOWP_DTYPES = (BFLOAT16, FLOAT16)

#: Kinds of low-precision step (the C library's FA_LOWP_* codes are their positions).
KIND_BF16_PARAMS = "bfloat16_params"
KIND_F16_PARAMS = "float16_params"
KIND_MASTER_BF16 = "master_bfloat16"
KIND_MASTER_BF16_G = "master_bfloat16_lowp_grad"
KIND_MASTER_F16 = "master_float16"
KIND_MASTER_F16_G = "master_float16_lowp_grad"
KIND_BF16_PARAMS_S32 = "bfloat16_params_float32_states"
KIND_F16_PARAMS_S32 = "float16_params_float32_states"
KIND_F16_PARAMS_SBF16 = "float16_params_bfloat16_states"


class KindInfo(NamedTuple):
    code: int  # fastadam_lowp.h's FA_LOWP_*
    param: np.dtype
    grad: np.dtype
    state: np.dtype
    copy: np.dtype | None


KINDS: dict[str, KindInfo] = {
    KIND_BF16_PARAMS: KindInfo(0, BFLOAT16, BFLOAT16, BFLOAT16, None),
    KIND_F16_PARAMS: KindInfo(1, FLOAT16, FLOAT16, FLOAT16, None),
    KIND_MASTER_BF16: KindInfo(2, FLOAT32, FLOAT32, FLOAT32, BFLOAT16),
    KIND_MASTER_BF16_G: KindInfo(3, FLOAT32, BFLOAT16, FLOAT32, BFLOAT16),
    KIND_MASTER_F16: KindInfo(4, FLOAT32, FLOAT32, FLOAT32, FLOAT16),
    KIND_MASTER_F16_G: KindInfo(5, FLOAT32, FLOAT16, FLOAT32, FLOAT16),
    KIND_BF16_PARAMS_S32: KindInfo(6, BFLOAT16, BFLOAT16, FLOAT32, None),
    KIND_F16_PARAMS_S32: KindInfo(7, FLOAT16, FLOAT16, FLOAT32, None),
    KIND_F16_PARAMS_SBF16: KindInfo(8, FLOAT16, FLOAT16, BFLOAT16, None),
}
_KIND_OF = {(i.param, i.grad, i.copy, i.state): k for k, i in KINDS.items()}

#: The moments' dtypes a low-precision parameter (no copy) may have, its own first.
STATE_DTYPES_OF = {
    BFLOAT16: (BFLOAT16, FLOAT32),
    FLOAT16: (FLOAT16, FLOAT32, BFLOAT16),
}

#: param_rounding by name; the rounding codes are bit sets (fastadam_lowp.h).
PARAM_NEAREST = 0
PARAM_STOCHASTIC = 1
STATE_STOCHASTIC = 2  # bfloat16 moments of bfloat16/float16 params
_ROUNDINGS = {"nearest": PARAM_NEAREST, "stochastic": PARAM_STOCHASTIC}

_U32 = np.uint32


def is_lowp(param: Any) -> bool:
    """Whether ``param`` is a bfloat16 or float16 ndarray (a low-precision step)."""
    dt = getattr(param, "dtype", None)
    return isinstance(param, np.ndarray) and (dt == BFLOAT16 or dt == FLOAT16)


def check_param_rounding(value: object) -> int:
    """The code of ``param_rounding`` ("nearest" or "stochastic"; both exist for
    bfloat16 and float16 results); else ValueError."""
    code = _ROUNDINGS.get(value) if isinstance(value, str) else None
    if code is None:
        raise ValueError(f"param_rounding must be 'nearest' or 'stochastic', got {value!r}")
    return code


def rounding_of(kind: str, param_rounding: int, state_rounding: object) -> int:
    """The rounding bits of a step of ``kind``: ``param_rounding``'s code, plus
    :data:`STATE_STOCHASTIC` where the moments are bfloat16 moments of a
    low-precision parameter and ``state_rounding`` (checked: "stochastic",
    "nearest" or None) is "stochastic". None, the functional API's default,
    is each kind's default: nearest here (torch's), as for moments of the
    parameter's dtype."""
    info = KINDS[kind]
    state = info.copy is None and info.state == BFLOAT16 and state_rounding == "stochastic"
    return param_rounding | (STATE_STOCHASTIC if state else 0)


def optimizer_state_rounding(state_dtype: object, state_rounding: str) -> str:
    """The moments' rounding an optimizer asks of its low-precision parameters'
    steps: with ``state_dtype`` None (the moments keep the parameter's dtype)
    "nearest", torch's; with ``state_dtype`` set, its ``state_rounding``."""
    return "nearest" if state_dtype is None else state_rounding


def validate_lowp(
    param: Any,
    grad: Any,
    exp_avg: Any,
    exp_avg_sq: Any,
    max_exp_avg_sq: Any,
    amsgrad: bool,
    param_copy: Any,
    names: Sequence[str] = (
        "param",
        "grad",
        "exp_avg",
        "exp_avg_sq",
        "max_exp_avg_sq",
        "param_copy",
    ),
) -> str:
    """Check one tensor's arrays of a low-precision step; return its kind.

    Raises TypeError/ValueError naming the array (``names``); modifies nothing.
    """
    if not isinstance(param, np.ndarray):
        raise TypeError(f"{names[0]} must be a numpy.ndarray, got {type(param).__name__}")
    pdt = param.dtype
    if param_copy is None:
        if pdt not in LOWP_DTYPES:
            raise TypeError(
                f"{names[0]} must have dtype bfloat16 or float16 for a low-precision step, "
                f"got {pdt}"
            )
        copy_dt = None
    else:
        if pdt != FLOAT32:
            raise TypeError(
                f"{names[5]} needs a float32 master {names[0]}; {names[0]} has dtype {pdt}"
            )
        if not isinstance(param_copy, np.ndarray):
            raise TypeError(f"{names[5]} must be a numpy.ndarray, got {type(param_copy).__name__}")
        copy_dt = param_copy.dtype
        if copy_dt not in LOWP_DTYPES:
            raise TypeError(f"{names[5]} must have dtype bfloat16 or float16, got {copy_dt}")
    check_array(names[0], param, pdt, param.shape, what=names[0])
    if not isinstance(grad, np.ndarray):
        raise TypeError(f"{names[1]} must be a numpy.ndarray, got {type(grad).__name__}")
    gdt = grad.dtype
    allowed = (pdt,) if copy_dt is None else (FLOAT32, copy_dt)
    if gdt not in allowed:
        want = " or ".join(str(d) for d in allowed)
        raise TypeError(
            f"{names[1]} has dtype {gdt}; with {names[0]} of dtype {pdt}"
            + ("" if copy_dt is None else f" and {names[5]} of dtype {copy_dt}")
            + f" it must be {want}"
        )
    check_array(names[1], grad, gdt, param.shape, what=names[0])
    if copy_dt is None:
        allowed_states = STATE_DTYPES_OF[pdt]
        if not isinstance(exp_avg, np.ndarray):
            raise TypeError(f"{names[2]} must be a numpy.ndarray, got {type(exp_avg).__name__}")
        sdt = exp_avg.dtype if exp_avg.dtype in allowed_states else pdt
    else:
        allowed_states = (FLOAT32,)
        sdt = FLOAT32
    kind = _KIND_OF[(pdt, gdt, copy_dt, sdt)]
    arrays = [param, grad, exp_avg, exp_avg_sq]
    labels = list(names[:4])
    for name, a in ((names[2], exp_avg), (names[3], exp_avg_sq)):
        _check_state(name, a, sdt, allowed_states, param, names, copy_dt is not None)
    if max_exp_avg_sq is None:
        if amsgrad:
            raise ValueError(f"amsgrad=True needs {names[4]}, an array shaped like {names[0]}")
    else:
        _check_state(names[4], max_exp_avg_sq, sdt, allowed_states, param, names,
                     copy_dt is not None)  # fmt: skip
        arrays.append(max_exp_avg_sq)
        labels.append(names[4])
    if param_copy is not None:
        check_array(names[5], param_copy, copy_dt, param.shape, what=names[0])
        arrays.append(param_copy)
        labels.append(names[5])
    check_arrays_disjoint(arrays, labels)
    return kind


def _check_state(name: str, a: Any, sdt: np.dtype, allowed: tuple[np.dtype, ...],
                 param: np.ndarray, names: Sequence[str], master: bool) -> None:  # fmt: skip
    if not isinstance(a, np.ndarray):
        raise TypeError(f"{name} must be a numpy.ndarray, got {type(a).__name__}")
    if a.dtype != sdt:
        if master:
            why = "master weights keep float32 moments"
        elif a.dtype in allowed:
            why = f"the moments share one dtype, {names[2]}'s"
        else:
            want = ", ".join(str(d) for d in allowed)
            why = f"with {names[0]} of dtype {param.dtype} the moments may be {want}"
        raise TypeError(f"{name} has dtype {a.dtype} but must be {sdt}: {why}")
    check_array(name, a, sdt, param.shape, what=names[0])


# -- the NumPy reference ---------------------------------------------------------


def widen(a: np.ndarray) -> np.ndarray:
    """bfloat16/float16/float32 array -> float32, exactly (float16 NaNs: payload << 13)."""
    if a.dtype == FLOAT32:
        return a
    h = a.view(np.uint16).astype(np.uint32)
    if a.dtype == BFLOAT16:
        return (h << _U32(16)).view(np.float32)
    sign = (h & _U32(0x8000)) << _U32(16)
    e = (h >> _U32(10)) & _U32(0x1F)
    mant = h & _U32(0x3FF)
    nrm = ((h & _U32(0x7FFF)) << _U32(13)) + _U32(0x38000000)
    inf = _U32(0x7F800000) | (mant << _U32(13))
    sub = (mant.astype(np.float32) * np.float32(2.0**-24)).view(np.uint32)
    bits = np.where(e == 0x1F, inf, np.where(e == 0, sub, nrm))
    return (sign | bits).view(np.float32)


def round_f16_bits(x: np.ndarray) -> np.ndarray:
    """float32 -> float16 bits (uint16), nearest-even; overflow to Inf; NaN quiet,
    sign and high payload kept. Equal to ``x.astype(np.float16)`` but for NaN payloads."""
    return _round_f16(x, None)


def round_f16_stochastic_bits(x: np.ndarray, r: np.ndarray) -> np.ndarray:
    """float32 -> float16 bits (uint16), rounded stochastically with the 32 random
    bits ``r`` (uint32, shaped like ``x``): the definition (see :func:`_round_f16`).

    Up with probability equal to the discarded fraction of the gap between the
    two float16 neighbours, so ``E[result] = x`` for every ``|x| < 65504`` (the
    largest finite float16) and ``|x| >= 2**-32``; values below ``2**-32`` in
    magnitude give a signed zero (a bias of less than ``2**-32``: 32 random bits
    cannot resolve a smaller fraction of the float16 step ``2**-24``). NaN as
    nearest; values in (65504, 65536) round to 65504 or Inf.
    """
    return _round_f16(x, np.asarray(r, np.uint32))


def _round_f16(x: np.ndarray, r: np.ndarray | None) -> np.ndarray:
    """float32 -> float16 bits: nearest-even (``r`` None) or stochastic with the
    32 random bits ``r``. Both add an increment below the bits kept and
    truncate. With ``a`` the bits of ``|x|``:

    * NaN (``a > 0x7F800000``): quiet, sign and high payload kept;
    * ``a >= 0x47800000`` (``|x| >= 65536``, Inf included): Inf;
    * normal results (``a >= 0x38800000``, ``|x| >= 2**-14``):
      ``h = (a - 0x38000000 + inc) >> 13`` with ``inc = 0x0FFF + lsb`` (nearest,
      ties to even; ``lsb = (a >> 13) & 1``) or ``r & 0x1FFF`` (a carry past 65504
      gives Inf, 0x7C00);
    * subnormal results: ``e = a >> 23``, ``s = 126 - e`` (14..31; clamped to 31
      below and 14 above), ``m = (a & 0x7FFFFF) | 0x800000``, ``q = m >> s``,
      ``h = q + (((m & (2**s-1)) + inc) >> s)`` with ``inc = 2**(s-1) - 1 + (q & 1)``
      (nearest) or ``r & (2**s-1)``, and 0 for ``e < 95`` (``|x| < 2**-32``:
      a signed zero both ways).

    The sign is ``x``'s.
    """
    u = np.ascontiguousarray(x, np.float32).view(np.uint32)
    sign = (u >> _U32(16)) & _U32(0x8000)
    a = u & _U32(0x7FFFFFFF)
    e = a >> _U32(23)
    s = np.where(e < 95, _U32(31), np.where(e > 112, _U32(14), _U32(126) - e))
    m = (a & _U32(0x7FFFFF)) | _U32(0x800000)
    mask = (_U32(1) << s) - _U32(1)
    q = m >> s
    if r is None:
        inc_n = _U32(0x0FFF) + ((a >> _U32(13)) & _U32(1))
        inc_s = (mask >> _U32(1)) + (q & _U32(1))
    else:
        inc_n = r & _U32(0x1FFF)
        inc_s = np.where(e < 95, _U32(0), r & mask)
    nrm = (a - _U32(0x38000000) + inc_n) >> _U32(13)
    sub = q + (((m & mask) + inc_s) >> s)
    nan = _U32(0x7E00) | ((a >> _U32(13)) & _U32(0x3FF))
    h = np.where(
        a > 0x7F800000, nan,
        np.where(a >= 0x47800000, _U32(0x7C00), np.where(a >= 0x38800000, nrm, sub)),
    )  # fmt: skip
    return (sign | h).astype(np.uint16)


def round_bits(x: np.ndarray, dtype: np.dtype, r: np.ndarray | None = None) -> np.ndarray:
    """float32 -> ``dtype`` (bfloat16/float16) bits: nearest-even, or stochastic
    with the 32 random bits ``r`` (bfloat16 takes ``r & 0xFFFF``)."""
    from .backends.reference import round_to_bf16

    if dtype == BFLOAT16:
        return round_to_bf16(x, None if r is None else r & _U32(0xFFFF))
    if r is None:
        return round_f16_bits(x)
    return round_f16_stochastic_bits(x, r)


def fma32(a: Any, b: Any, c: Any) -> np.ndarray:
    """float32 ``a*b + c`` rounded once (a fused multiply-add), exactly.

    In float64 the product is exact; the sum is rounded to odd (TwoSum gives its
    error; an inexact sum with an even last bit moves one ulp toward the true
    value), and rounding that to float32 is then the correctly rounded result
    (Boldo & Melquiond, "Emulation of FMA and correctly rounded sums: proved
    algorithms using rounding to odd", 2008: 53 >= 2*24 + 2 bits).
    """
    a64 = np.asarray(a, np.float32).astype(np.float64)
    b64 = np.asarray(b, np.float32).astype(np.float64)
    c64 = np.asarray(c, np.float32).astype(np.float64)
    ab = a64 * b64
    s = ab + c64
    bb = s - ab
    err = (ab - (s - bb)) + (c64 - bb)
    even = (s.view(np.uint64) & np.uint64(1)) == 0
    toward = np.nextafter(s, np.where(err > 0, np.inf, -np.inf))
    s = np.where((err != 0) & even & np.isfinite(s), toward, s)
    return s.astype(np.float32)


def _store(a: np.ndarray, x: np.ndarray, r: np.ndarray | None = None) -> None:
    """Store float32 ``x`` into ``a``: exactly, or rounded (stochastically with ``r``)."""
    if a.dtype == FLOAT32:
        a[...] = x
    else:
        a.view(np.uint16)[...] = round_bits(x, a.dtype, r).reshape(a.shape)


def reference_step(
    param: np.ndarray,
    grad: np.ndarray,
    exp_avg: np.ndarray,
    exp_avg_sq: np.ndarray,
    max_exp_avg_sq: np.ndarray | None,
    param_copy: np.ndarray | None,
    sc: AdamScalars,
    rounding: int = PARAM_NEAREST,
    key: int = 0,
    first: int = 0,
) -> None:
    """The low-precision step (see the module docstring), in place: the definition.

    ``rounding``: bits, :data:`PARAM_STOCHASTIC` and :data:`STATE_STOCHASTIC`
    (bfloat16 moments only); ``key``: the tensor's rounding key; ``first``: the
    index of element 0 in the tensor (the random bits follow it)."""
    with np.errstate(all="ignore"):
        _reference_step(param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq, param_copy, sc,
                        rounding, key, first)  # fmt: skip


def _reference_step(param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq, param_copy, sc,
                    rounding, key, first) -> None:  # fmt: skip
    f = np.float32
    g = widen(grad).copy()
    if sc.unscale:
        g = g / f(sc.grad_scale)
        _store(grad, g)  # written back rounded; used unrounded
    if sc.maximize:
        g = -g
    p = widen(param).copy()
    m_old, v_old = widen(exp_avg), widen(exp_avg_sq)
    if param_copy is None:
        # low-precision params: torch's fused loop as it runs (three FMAs)
        if sc.weight_decay != 0.0:
            g = fma32(p, f(sc.weight_decay), g)
        p = p * f(sc.decay)
        w = f(sc.one_minus_beta1)
        if w < f(0.5):
            m = fma32(w, g - m_old, m_old)
        else:
            m = fma32(w - f(1.0), g - m_old, g)
        v = fma32(f(sc.one_minus_beta2) * g, g, v_old * f(sc.beta2))
    else:
        # master weights: the float32 step (fastadam.backends.reference), exactly
        if sc.weight_decay != 0.0:
            g = g + f(sc.weight_decay) * p
        p = p * f(sc.decay)
        m = m_old + (g - m_old) * f(sc.one_minus_beta1)
        v = v_old * f(sc.beta2) + f(sc.one_minus_beta2) * g * g
    r = r_m = r_v = None
    if rounding:
        from .backends.reference import mix32, random_bits

        r = random_bits(p.size, key, first).reshape(p.shape)
        if rounding & STATE_STOCHASTIC:  # bfloat16 moments: the bits of r2 = mix32(r)
            r2 = mix32(r)
            r_m, r_v = r2, r2 >> _U32(16)  # (round_bits takes the low 16 of each)
        if not rounding & PARAM_STOCHASTIC:
            r = None
    _store(exp_avg, m, r_m)
    _store(exp_avg_sq, v, r_v)
    second = v
    if sc.amsgrad:
        old = widen(max_exp_avg_sq)
        second = np.where((old > v) | (old != old), old, v)
        _store(max_exp_avg_sq, second, r_v)
    denom = np.sqrt(second) / f(sc.bias_correction2_sqrt) + f(sc.eps)
    p = p - f(sc.step_size) * m / denom
    if param_copy is not None:
        param[...] = p
        param_copy.view(np.uint16)[...] = round_bits(p, param_copy.dtype, r).reshape(p.shape)
    else:
        _store(param, p, r)


# -- dispatch --------------------------------------------------------------------

#: One tensor's arrays: (param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq or None,
#: param_copy or None).
Row = tuple[Any, ...]


def _reference_multi(
    kind: str, rows: Sequence[Row], scalars: Sequence[AdamScalars], index: Any, keys: Any,
    rounding: int,
) -> None:  # fmt: skip
    for i, row in enumerate(rows):
        sc = scalars[0 if index is None else int(index[i])]
        key = 0 if keys is None else int(keys[i])
        reference_step(row[0], row[1], row[2], row[3], row[4] if sc.amsgrad else None, row[5],
                       sc, rounding, key)  # fmt: skip


def step_rows(
    backend: str,
    kind: str,
    rows: Sequence[Row],
    scalars: Sequence[AdamScalars],
    index: np.ndarray | None,
    keys: np.ndarray | None,
    rounding: int,
) -> None:
    """Every tensor of ``rows`` (all of ``kind``, checked) stepped by ``backend``'s
    low-precision loop: one call over all of them. ``index``/``keys`` as in
    fastadam._table (None: ``scalars[0]``; no stochastic rounding); ``rounding``:
    the bits :data:`PARAM_STOCHASTIC` | :data:`STATE_STOCHASTIC` (:func:`rounding_of`;
    the second only for kinds with bfloat16 moments)."""
    module = backends.family(backend, "lowp")
    run = _reference_multi if module is None else module.step_rows
    run(kind, rows, scalars, index, keys, rounding)


def scalars_of(step: int, hp: Any, flags: tuple[bool, bool, bool, bool]) -> AdamScalars:
    """The float32 step's scalars (torch's form) for checked hyperparameters ``hp``."""
    decoupled, amsgrad, maximize, eps_hat = flags
    return compute_scalars(
        step, hp.lr, hp.beta1, hp.beta2, hp.eps, hp.weight_decay, decoupled, amsgrad,
        maximize, eps_hat, hp.grad_scale, STATE_SAME_DTYPE, 0,
    )  # fmt: skip


def adam_step_lowp(
    param: Any,
    grad: Any,
    exp_avg: Any,
    exp_avg_sq: Any,
    *,
    step: Any,
    lr: Any,
    beta1: Any,
    beta2: Any,
    eps: Any,
    weight_decay: Any,
    decoupled_weight_decay: Any,
    amsgrad: Any,
    max_exp_avg_sq: Any,
    maximize: Any,
    eps_hat: Any,
    grad_scale: Any,
    found_inf: Any,
    state_rounding: Any,
    seed: Any,
    backend: Any,
    param_copy: Any,
    param_rounding: Any,
) -> None:
    """:func:`fastadam.adam_step` for bfloat16/float16 params or with ``param_copy``."""
    amsgrad = bool(amsgrad)
    kind = validate_lowp(param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq, amsgrad, param_copy)
    step = check_step(step)
    hp = check_hyper(lr, beta1, beta2, eps, weight_decay, grad_scale, state_rounding)
    seed = check_seed(seed)
    rounding = rounding_of(kind, check_param_rounding(param_rounding), state_rounding)
    sc = scalars_of(step, hp, (bool(decoupled_weight_decay), amsgrad, bool(maximize),
                               bool(eps_hat)))  # fmt: skip
    backends.get(backend)  # an unknown or unloadable backend fails before any write
    if found_inf or param.size == 0:
        return
    keys = None
    if rounding:  # the parameter's or the moments' stochastic rounding
        keys = np.array([rounding_key(seed, step)], np.uint32)
    row = (param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq if amsgrad else None, param_copy)
    step_rows(backend, kind, [row], (sc,), None, keys, rounding)


def adam_step_multi_lowp(*args: Any, **kwargs: Any) -> None:
    """:func:`fastadam.adam_step_multi` for bfloat16/float16 params or with
    ``param_copies``: every tensor checked (named ``params[i]``, ...), then one
    backend call per kind of step; bit-identical to :func:`fastadam.adam_step` on
    each tensor with ``step=step[i]``, ``seed=seeds[i]`` and ``param_copy=param_copies[i]``."""
    prepare_multi_lowp(*args, **kwargs)()


def prepare_multi_lowp(
    params: Any,
    grads: Any,
    exp_avgs: Any,
    exp_avg_sqs: Any,
    *,
    step: Any,
    lr: Any,
    beta1: Any,
    beta2: Any,
    eps: Any,
    weight_decay: Any,
    decoupled_weight_decay: Any,
    amsgrad: Any,
    max_exp_avg_sqs: Any,
    maximize: Any,
    eps_hat: Any,
    grad_scale: Any,
    found_inf: Any,
    state_rounding: Any,
    seeds: Any,
    backend: Any,
    param_copies: Any,
    param_rounding: Any,
    labels: Sequence[int] | None = None,
) -> Callable[[], None]:
    """Check an :func:`adam_step_multi_lowp` and return the function that runs it
    (nothing is written before). ``labels``: the numbers errors give the tensors
    (default 0, 1, ...)."""
    from .multi import _as_list, rounding_keys

    params = _as_list("params", params, None)
    count = len(params)
    grads = _as_list("grads", grads, count)
    exp_avgs = _as_list("exp_avgs", exp_avgs, count)
    exp_avg_sqs = _as_list("exp_avg_sqs", exp_avg_sqs, count)
    amsgrad = bool(amsgrad)
    vmaxs = [None] * count
    if max_exp_avg_sqs is not None:
        vmaxs = _as_list("max_exp_avg_sqs", max_exp_avg_sqs, count)
    copies = [None] * count
    if param_copies is not None:
        copies = _as_list("param_copies", param_copies, count)
    kinds = []
    num = list(range(count)) if labels is None else list(labels)
    for i in range(count):
        names = tuple(
            f"{n}[{num[i]}]"
            for n in ("params", "grads", "exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs",
                      "param_copies")
        )  # fmt: skip
        kinds.append(validate_lowp(params[i], grads[i], exp_avgs[i], exp_avg_sqs[i], vmaxs[i],
                                   amsgrad, copies[i], names))  # fmt: skip
    where: list[str] = []
    arrays: list[np.ndarray] = []
    for name, lst in (("params", params), ("grads", grads), ("exp_avgs", exp_avgs),
                      ("exp_avg_sqs", exp_avg_sqs), ("max_exp_avg_sqs", vmaxs),
                      ("param_copies", copies)):  # fmt: skip
        for i, a in enumerate(lst):
            if a is not None:
                where.append(f"{name}[{num[i]}]")
                arrays.append(a)
    check_disjoint(
        np.array([address(a) for a in arrays], np.uintp),
        np.array([a.nbytes for a in arrays], np.uint64),
        lambda k: where[k],
    )
    if isinstance(step, (Sequence, np.ndarray)) and not isinstance(step, (str, bytes)):
        steps = [check_step(s, f"step[{i}]") for i, s in enumerate(step)]
        if len(steps) != count:
            raise ValueError(f"step has {len(steps)} entries but there are {count} tensors")
    else:
        steps = [check_step(step)] * count
    if seeds is None:
        seed_list = list(range(count))
    elif isinstance(seeds, (Sequence, np.ndarray)) and not isinstance(seeds, (str, bytes)):
        seed_list = [check_seed(s, f"seeds[{i}]") for i, s in enumerate(seeds)]
        if len(seed_list) != count:
            raise ValueError(f"seeds has {len(seed_list)} entries but there are {count} tensors")
    else:
        base = check_seed(seeds, "seeds")
        seed_list = [(base + i) % 2**64 for i in range(count)]
    hp = check_hyper(lr, beta1, beta2, eps, weight_decay, grad_scale, state_rounding)
    param_code = check_param_rounding(param_rounding)
    flags = (bool(decoupled_weight_decay), amsgrad, bool(maximize), bool(eps_hat))
    calls = []
    for kind in KINDS:
        pos = [i for i in range(count) if kinds[i] == kind]
        if not pos:
            continue
        rounding = rounding_of(kind, param_code, state_rounding)
        kstep = np.array([steps[i] for i in pos], np.uint64)
        unique, inverse = np.unique(kstep, return_inverse=True)
        scalars = tuple(scalars_of(int(s), hp, flags) for s in unique)
        index = None if len(scalars) == 1 else inverse.astype(np.int32)
        keys = None
        if rounding:  # the parameter's or the moments' stochastic rounding
            keys = rounding_keys(np.array([seed_list[i] for i in pos], np.uint64), kstep)
        rows = [(params[i], grads[i], exp_avgs[i], exp_avg_sqs[i],
                 vmaxs[i] if amsgrad else None, copies[i]) for i in pos]  # fmt: skip
        calls.append((kind, rows, scalars, index, keys, rounding))
    backends.get(backend)
    if found_inf:
        return _nothing

    def run() -> None:
        for kind, rows, scalars, index, keys, rounding in calls:
            step_rows(backend, kind, rows, scalars, index, keys, rounding)

    return run


def _nothing() -> None:
    """A skipped step (found_inf): checked, then nothing."""
