"""8-bit block-wise quantized optimizer states (issue 18): the format and its reference.

The moments of a float32 parameter of ``n`` elements are stored as ``n`` uint8
codes each plus one float32 scale per block of :data:`BLOCK` elements (the
last block may be partial): ``nblocks(n) == ceil(n / BLOCK)``. The scale of a
block is its **absmax**, the largest magnitude of the float32 values it was
quantized from, so ``value = absmax * y(code)`` with ``y`` in ``[0, 1]``
(Dettmers et al., "8-bit Optimizers via Block-wise Quantization", ICLR 2022).

The code map is an 8-bit floating-point-like code (3 mantissa bits) relative
to the absmax, decoded by integer arithmetic on float32 bit patterns (no
table: it vectorises, and integer steps are bit-identical in every backend)::

    y(k) = float32 bits  0x3F800000 - ((K - k) << 20)     for 1 <= k <= K
    y(0) = 0

``k = K`` is exactly 1.0; going down, each step is one unit of a 3-bit
mantissa, so 8 codes per binade (relative spacing 1/8 .. 1/16).

* ``exp_avg`` (signed): bit 7 is the sign, bits 0..6 the magnitude ``k``
  (``K = 127``): 16 binades, the smallest nonzero ``|y|`` is ``1.25 * 2^-16``
  (about 1.9e-5 of the block's absmax); smaller magnitudes are stored as
  (signed) zero.
* ``exp_avg_sq`` (unsigned, never negative): all 8 bits are the magnitude
  (``K = 255``): 32 binades, the smallest nonzero ``y`` is ``1.25 * 2^-32``
  (2.9e-10). A positive ``v`` is never coded as 0: it is coded at least 1
  (a zero would make ``m / (sqrt(0) + eps)`` explode).

Encoding ``x`` of a block with absmax ``A``: ``r = 1/A`` (float32; 0 when
``A == 0``), ``y = |x| * r`` (float32), then round-half-up on the bit pattern
``u`` of ``y``: ``k = clamp((u - (0x3F800000 - (K << 20)) + 2^19) >> 20, lo, K)``
(signed 32-bit arithmetic), ``lo = 1`` for a positive ``v``, else 0. Because
float32 bit patterns are monotone in the value and the codes are evenly spaced
in bit-pattern space, this is round-to-nearest in value (ties up) over the
grid. The absmax is the float32 maximum of ``|x|`` computed as an unsigned
maximum of ``bits & 0x7FFFFFFF`` (so a NaN anywhere makes the absmax NaN, the
same in every backend).

Error bound of one quantization (used by checkpoint conversion, see
docs/guides/state-dtypes.md): a value with ``|x| >= A * y(1)`` is stored with a
relative error at most 1/16 (half a mantissa step) plus 2 float32 ulps;
smaller ``m`` are stored as 0 or ``A * y(1)`` (absolute error <= ``A * 1.25 * 2^-16``), smaller
positive ``v`` as ``A * y(1)``.

The step (one fused pass, per block, the math of :class:`~fastadam._scalars.AdamScalars`
with ``state_rounding == 0``, its scalars folded by :func:`fold`)::

    m = y_m(code_m) * A_m ;  v = y_v(code_v) * A_v          # dequantize (float32)
    g, p (unscale, maximize, weight decay), m, v, denom      # the float32 update
    p = p - step_size * m / denom                           # from the unquantized m, v
    A_m' = absmax(m) ; A_v' = absmax(v) ; code = encode(...) # requantize

The parameter update uses the freshly computed float32 ``m`` and ``v`` (as
bitsandbytes does); only the stored moments are quantized. ``amsgrad`` is not
supported with 8-bit states (refused with a ValueError).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import numpy as np

from ._scalars import AdamScalars

#: Elements per block (one float32 absmax per block of each moment). 256: the
#: scales cost 2 * 4 / 256 = 0.03 B/elem (2.03 B/elem of state in all), a
#: block of every array of one step (4+4+1+1 bytes/elem: 2.5 KiB) sits in L1
#: between the two passes of the fused loop, and smaller blocks track the
#: local magnitude more closely (bitsandbytes uses 256 for its 8-bit Adam too).
BLOCK = 256
#: Largest magnitude code of exp_avg (signed) and exp_avg_sq (unsigned).
K_M = 127
K_V = 255
#: Tensors with fewer elements keep float32 states in the optimizers (the
#: default of their ``min_8bit_size``).
MIN_8BIT_SIZE = 4096

_ONE = 0x3F800000
_SHIFT = 20
_HALF = 1 << 19
_U32 = np.uint32
_I32 = np.int32
_F32 = np.dtype(np.float32)
_U8 = np.dtype(np.uint8)


def nblocks(n: int) -> int:
    """Blocks (and scales per moment) of a tensor of ``n`` elements."""
    return -(-int(n) // BLOCK)


def _y_bits(k: np.ndarray, K: int) -> np.ndarray:
    """float32 bit patterns (uint32) of the code magnitudes ``k`` (0..K)."""
    k = k.astype(_U32)
    bits = _U32(_ONE) - ((_U32(K) - k) << _U32(_SHIFT))
    return np.where(k == 0, _U32(0), bits).astype(_U32)


def _encode_mag(u: np.ndarray, K: int, lo: np.ndarray | int) -> np.ndarray:
    """Magnitude codes of the float32 bit patterns ``u`` (non-negative values y)."""
    t = (u.astype(np.int64) - (_ONE - (K << _SHIFT)) + _HALF) >> _SHIFT
    return np.clip(t, lo, K).astype(np.uint8)


def _expand(absmax: np.ndarray, n: int) -> np.ndarray:
    return np.repeat(absmax, BLOCK)[:n]


def dequantize(codes: np.ndarray, absmax: np.ndarray, signed: bool) -> np.ndarray:
    """float32 values of ``codes`` (uint8, any shape) with their blocks' ``absmax``."""
    c = np.ascontiguousarray(codes).reshape(-1).astype(_U32)
    if signed:
        bits = ((c & _U32(0x80)) << _U32(24)) | _y_bits(c & _U32(0x7F), K_M)
    else:
        bits = _y_bits(c, K_V)
    y = bits.view(np.float32)
    with np.errstate(all="ignore"):
        out = y * _expand(np.asarray(absmax, np.float32).reshape(-1), c.size)
    return out.reshape(np.shape(codes))


def block_absmax(x: np.ndarray) -> np.ndarray:
    """float32 absmax of each block of ``x`` (float32): an unsigned max of the magnitude bits."""
    u = np.ascontiguousarray(x, np.float32).reshape(-1).view(_U32) & _U32(0x7FFFFFFF)
    n = u.size
    pad = np.zeros(nblocks(n) * BLOCK, _U32)
    pad[:n] = u
    return pad.reshape(-1, BLOCK).max(axis=1).view(np.float32) if n else np.zeros(0, np.float32)


def quantize(x: np.ndarray, signed: bool) -> tuple[np.ndarray, np.ndarray]:
    """``(codes, absmax)`` of the float32 values ``x`` (codes shaped like ``x``).

    For ``signed=False`` the values must be >= 0 (a second moment).
    """
    x = np.ascontiguousarray(x, np.float32)
    flat = x.reshape(-1)
    absmax = block_absmax(flat)
    return _encode(flat, absmax, signed).reshape(x.shape), absmax


def _encode(flat: np.ndarray, absmax: np.ndarray, signed: bool) -> np.ndarray:
    n = flat.size
    with np.errstate(all="ignore"):
        r = np.where(absmax != 0, np.float32(1) / absmax, np.float32(0)).astype(np.float32)
        y = np.abs(flat) * _expand(r, n)
    u = y.view(_U32) & _U32(0x7FFFFFFF)
    xb = flat.view(_U32)
    if signed:
        return _encode_mag(u, K_M, 0) | ((xb >> _U32(24)) & _U32(0x80)).astype(np.uint8)
    lo = (xb != 0).astype(np.int64)  # a positive v is never coded as 0
    return _encode_mag(u, K_V, lo)


@functools.lru_cache(maxsize=256)
def fold(sc: AdamScalars) -> AdamScalars:
    """The scalars every 8-bit step runs with: the second bias correction folded
    into ``step_size`` and ``eps`` (the epsilon-hat form, as for bfloat16 states,
    see :class:`~fastadam._scalars.AdamScalars`), so ``bias_correction2_sqrt`` is
    1.0 and the kernels skip that division (dividing by 1 is exact: the
    reference's formula is unchanged). ``eps_hat`` scalars are already folded."""
    b = sc.bias_correction2_sqrt
    if b == 1.0:
        return sc
    return sc._replace(step_size=sc.step_size * b, eps=sc.eps * b, bias_correction2_sqrt=1.0)


# -- the reference step ---------------------------------------------------------------


def step(
    param: np.ndarray,
    grad: np.ndarray,
    exp_avg: np.ndarray,
    exp_avg_sq: np.ndarray,
    exp_avg_absmax: np.ndarray,
    exp_avg_sq_absmax: np.ndarray,
    sc: AdamScalars,
) -> None:
    """One Adam/AdamW update with 8-bit states, in place: the executable specification."""
    with np.errstate(all="ignore"):
        _step(param.reshape(-1), grad.reshape(-1), exp_avg.reshape(-1), exp_avg_sq.reshape(-1),
              exp_avg_absmax, exp_avg_sq_absmax, sc)  # fmt: skip


def _step(param, grad, codes_m, codes_v, am, av, sc: AdamScalars) -> None:
    dt = np.float32
    g = grad
    if sc.unscale:
        np.divide(grad, dt(sc.grad_scale), out=grad)
    if sc.maximize:
        g = -g
    if sc.weight_decay != 0.0:
        g = g + dt(sc.weight_decay) * param
    param *= dt(sc.decay)

    m = dequantize(codes_m, am, signed=True)
    v = dequantize(codes_v, av, signed=False)
    m = m + (g - m) * dt(sc.one_minus_beta1)
    v = v * dt(sc.beta2) + dt(sc.one_minus_beta2) * g * g

    denom = np.sqrt(v) / dt(sc.bias_correction2_sqrt) + dt(sc.eps)
    param -= dt(sc.step_size) * m / denom

    am[...] = block_absmax(m)
    av[...] = block_absmax(v)
    codes_m[...] = _encode(m, am, signed=True)
    codes_v[...] = _encode(v, av, signed=False)


def step_multi(table: Any, scalars: tuple[AdamScalars, ...], index: np.ndarray | None) -> None:
    """Every tensor of a q8 table (see :func:`make_q8_table`) by :func:`step`."""
    from ._table import view_at

    for i in range(table.count):
        sc = scalars[0 if index is None else int(index[i])]
        n = int(table.sizes[i])
        nb = nblocks(n)
        ptr = table.pointers[:, i]
        step(
            view_at(int(ptr[0]), n, _F32), view_at(int(ptr[1]), n, _F32),
            view_at(int(ptr[2]), n, _U8), view_at(int(ptr[3]), n, _U8),
            view_at(int(ptr[4]), nb, _F32), view_at(int(ptr[5]), nb, _F32), sc,
        )  # fmt: skip


# -- checks ------------------------------------------------------------------------------

Q8_NAMES = ("param", "grad", "exp_avg", "exp_avg_sq", "exp_avg_absmax", "exp_avg_sq_absmax")


def validate_q8(
    param: Any,
    grad: Any,
    exp_avg: Any,
    exp_avg_sq: Any,
    exp_avg_absmax: Any,
    exp_avg_sq_absmax: Any,
    names: Sequence[str] = Q8_NAMES,
) -> None:
    """Check the arrays of one 8-bit step; raise TypeError/ValueError naming the culprit."""
    from ._validation import check_array

    if exp_avg_absmax is None or exp_avg_sq_absmax is None:
        missing = names[4] if exp_avg_absmax is None else names[5]
        raise TypeError(
            f"{missing} is missing: 8-bit states need both exp_avg_absmax and "
            "exp_avg_sq_absmax (float32, one scale per block of "
            f"{BLOCK} elements)"
        )
    check_array(names[0], param, None, None)
    if param.dtype != np.float32:
        raise TypeError(f"{names[0]} must be float32 with 8-bit states, got {param.dtype}")
    check_array(names[1], grad, param.dtype, param.shape, names[0])
    for k in (2, 3):
        a = (exp_avg, exp_avg_sq)[k - 2]
        if not isinstance(a, np.ndarray):
            raise TypeError(f"{names[k]} must be a numpy.ndarray, got {type(a).__name__}")
        if a.dtype != np.uint8:
            raise TypeError(
                f"{names[k]} must be uint8 codes when scales are given, got dtype {a.dtype}"
            )
        check_array(names[k], a, np.dtype(np.uint8), param.shape, names[0])
    nb = nblocks(param.size)
    for k in (4, 5):
        a = (exp_avg_absmax, exp_avg_sq_absmax)[k - 4]
        if not isinstance(a, np.ndarray):
            raise TypeError(f"{names[k]} must be a numpy.ndarray, got {type(a).__name__}")
        if a.dtype != np.float32:
            raise TypeError(f"{names[k]} must be float32, got dtype {a.dtype}")
        if a.shape != (nb,):
            raise ValueError(
                f"{names[k]} must have shape ({nb},) (one scale per block of {BLOCK} "
                f"elements of {names[0]}, {param.size} elements), got {a.shape}"
            )
        check_array(names[k], a, np.dtype(np.float32), (nb,), names[0])
    from ._validation import check_arrays_disjoint

    arrays = (param, grad, exp_avg, exp_avg_sq, exp_avg_absmax, exp_avg_sq_absmax)
    check_arrays_disjoint(arrays, names)


# -- dispatch ---------------------------------------------------------------------------


def kernel(backend: str) -> Any:
    """The module that runs 8-bit steps for ``backend`` (``step_q8``, ``step_multi_q8``).

    "auto" follows the float32 choice (:func:`fastadam.auto_backend`).
    """
    from . import backends

    module = backends.family(backend, "q8")
    return _Reference if module is None else module


class _Reference:
    """The reference as a q8 kernel module."""

    NAME = "numpy"
    step_q8 = staticmethod(step)
    step_multi_q8 = staticmethod(step_multi)


def adam_step_q8(
    param: np.ndarray,
    grad: np.ndarray,
    exp_avg: np.ndarray,
    exp_avg_sq: np.ndarray,
    exp_avg_absmax: np.ndarray | None,
    exp_avg_sq_absmax: np.ndarray | None,
    hyper: tuple,
    amsgrad: bool,
    found_inf: bool,
    backend: str,
) -> None:
    """:func:`fastadam.adam_step` with 8-bit states (``hyper``: its memo key, step first)."""
    from .functional import _scalars_of

    try:
        mod = kernel(backend)
    except Exception:  # raised again below, after the array checks
        mod = None
    if not found_inf and not amsgrad:
        # The backend's one-call path (fastadam._pycall; C and Numba): it runs the kernel
        # on arrays that pass every rule of validate_q8, or touches nothing and
        # declines, and the checked path below runs as always. A bad backend name
        # or hyperparameter is left to that path too, which reports a bad array first.
        fast = getattr(mod, "step_fast_q8", None)
        if fast is not None:
            try:
                scalars = fold(_scalars_of((*hyper, True)))
            except (TypeError, ValueError):
                fast = None
        if fast is not None:
            rc = fast(param, grad, exp_avg, exp_avg_sq, exp_avg_absmax, exp_avg_sq_absmax,
                      scalars)  # fmt: skip
            if rc == 0:
                return
            if rc == getattr(mod, "CHECKED_LARGE", None):
                # checked by the one-call path, too large for its serial loop (Numba)
                mod.step_q8(param, grad, exp_avg, exp_avg_sq, exp_avg_absmax,
                            exp_avg_sq_absmax, scalars)  # fmt: skip
                return
            if rc != mod.DECLINED:
                mod._raise_code(rc)
    validate_q8(param, grad, exp_avg, exp_avg_sq, exp_avg_absmax, exp_avg_sq_absmax)
    if amsgrad:
        raise ValueError(
            "amsgrad=True is not supported with 8-bit states (exp_avg_absmax given); "
            "use float32 or bfloat16 states for amsgrad"
        )
    scalars = fold(_scalars_of((*hyper, True)))  # memoized, as adam_step's
    if mod is None:
        mod = kernel(backend)  # raises what the lookup above raised
    if found_inf:
        return
    mod.step_q8(param, grad, exp_avg, exp_avg_sq, exp_avg_absmax, exp_avg_sq_absmax, scalars)


def zeros_state(shape: tuple | int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Fresh 8-bit moments of a float32 parameter of ``shape``:
    ``(exp_avg, exp_avg_sq, exp_avg_absmax, exp_avg_sq_absmax)``, all zero."""
    n = int(np.prod(shape))
    nb = nblocks(n)
    return (np.zeros(shape, np.uint8), np.zeros(shape, np.uint8),
            np.zeros(nb, np.float32), np.zeros(nb, np.float32))  # fmt: skip


# -- multi-tensor ----------------------------------------------------------------------------

_LISTS = ("params", "grads", "exp_avgs", "exp_avg_sqs", "exp_avg_absmaxes", "exp_avg_sq_absmaxes")


class Q8Plan:
    """:class:`fastadam.MultiTensorPlan` for 8-bit states: the lists checked once,
    then one backend call per step (a table of 6 pointer rows, see
    :data:`fastadam._table.KIND_Q8`). Tensor ``i`` is
    ``(params[i], grads[i], exp_avgs[i], exp_avg_sqs[i], exp_avg_absmaxes[i],
    exp_avg_sq_absmaxes[i])`` with :func:`validate_q8`'s rules; no two arrays
    of the plan may share memory.
    """

    def __init__(self, params, grads, exp_avgs, exp_avg_sqs, exp_avg_absmaxes,
                 exp_avg_sq_absmaxes, *, backend: str = "auto",
                 _private_views: bool = False) -> None:  # fmt: skip
        from ._table import KIND_Q8, address, make_table
        from .multi import _as_list

        lists = [_as_list("params", params, None)]
        count = len(lists[0])
        for name, value in zip(_LISTS[1:], (grads, exp_avgs, exp_avg_sqs, exp_avg_absmaxes,
                                            exp_avg_sq_absmaxes)):  # fmt: skip
            lists.append(_as_list(name, value, count))
        for i in range(count):
            p, g, m, v, am, av = (lst[i] for lst in lists)
            validate_q8(p, g, m, v, am, av, names=[f"{nm}[{i}]" for nm in _LISTS])
        self._kernel = kernel(backend)
        self.backend = backend
        self.count = count
        self._lists = lists
        # every array, for the per-step writeable check; none where the arrays
        # are views only the caller sees (fastadam.torch), as in MultiTensorPlan
        self._arrays = [] if _private_views else [a for lst in lists for a in lst]
        # byte ranges (rows: _LISTS), for the overlap checks
        self._starts = np.array([[address(a) for a in lst] for lst in lists], np.uintp)
        self._starts = self._starts.reshape(6, count)
        self._nbytes = np.array([[a.nbytes for a in lst] for lst in lists], np.uint64)
        self._nbytes = self._nbytes.reshape(6, count)
        self._check_disjoint()
        sizes = np.array([a.size for a in lists[0]], np.int64)
        self._table = make_table(KIND_Q8, self._starts, sizes, [self._lists])

    def _range_label(self, k: int) -> str:
        """The name of byte range ``k`` of ``_starts`` (row-major: role, then tensor)."""
        return f"{_LISTS[k // self.count]}[{k % self.count}]"

    def _check_disjoint(self) -> None:
        from ._validation import check_disjoint

        check_disjoint(self._starts.reshape(-1), self._nbytes.reshape(-1), self._range_label)

    def set_grads(self, grads) -> None:
        """Step these gradients from now on (checked first; nothing changes on an error)."""
        from ._table import address
        from ._validation import check_array
        from .multi import _as_list

        grads = _as_list("grads", grads, self.count)
        params = self._lists[0]
        for i, g in enumerate(grads):
            if g is not self._lists[1][i]:
                check_array(f"grads[{i}]", g, params[i].dtype, params[i].shape, f"params[{i}]")
        self._rebind_grads(grads, np.array([address(g) for g in grads], np.uintp))

    def _rebind_grads(self, grads: list, addresses: np.ndarray) -> None:
        """Use ``grads`` (kept alive by the plan) at ``addresses``; the caller has
        checked each one's dtype, shape and layout. This checks that none overlaps
        another array of the plan (only when an address changed); on an error
        nothing changes."""
        from ._table import GRAD
        from ._validation import rebind_row

        self._starts = rebind_row(self._starts, self._nbytes, GRAD, addresses, self._range_label)
        self._lists[GRAD] = grads
        if self._arrays:
            self._arrays = [a for lst in self._lists for a in lst]
        self._table.pointers[GRAD] = addresses

    def prepare(self, *, step, lr, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0,
                decoupled_weight_decay=False, amsgrad=False, maximize=False, eps_hat=False,
                grad_scale=None, found_inf=False, grads=None):  # fmt: skip
        """Check a step and return the function that runs it (see MultiTensorPlan.prepare)."""
        from ._scalars import STATE_SAME_DTYPE
        from ._validation import check_hyper, check_step
        from .multi import _first_readonly, _nothing, _scalars

        if grads is not None:
            self.set_grads(grads)
        if _first_readonly is None or _first_readonly(self._arrays) >= 0:
            for r, lst in enumerate(self._lists if self._arrays else ()):
                for i, a in enumerate(lst):
                    if not a.flags.writeable:
                        raise ValueError(
                            f"{_LISTS[r]}[{i}] must be writeable: it is updated in place"
                        )
        hp = check_hyper(lr, beta1, beta2, eps, weight_decay, grad_scale, "nearest")
        if amsgrad:
            raise ValueError("amsgrad=True is not supported with 8-bit states")
        if isinstance(step, (int, np.integer)) and not isinstance(step, bool):
            steps: Any = check_step(step)
        else:
            arr = np.asarray(step)
            if arr.shape != (self.count,):
                raise ValueError(f"step has {arr.size} entries but there are {self.count} tensors")
            steps = np.array([check_step(s, f"step[{i}]") for i, s in enumerate(arr.tolist())],
                             np.int64)  # fmt: skip
        if found_inf:
            return _nothing
        flags = (bool(decoupled_weight_decay), False, bool(maximize), bool(eps_hat))
        if isinstance(steps, int):
            scalars = (fold(_scalars(steps, hp, flags, STATE_SAME_DTYPE)),)
            index = None
        else:
            unique, inverse = np.unique(steps, return_inverse=True)
            scalars = tuple(fold(_scalars(int(s), hp, flags, STATE_SAME_DTYPE)) for s in unique)
            index = None if len(scalars) == 1 else inverse.astype(np.int32)
        fn, table = self._kernel.step_multi_q8, self._table

        def run() -> None:
            fn(table, scalars, index)

        return run

    def step(self, **kw: Any) -> None:
        """One update of every tensor (the arguments of :meth:`prepare`)."""
        self.prepare(**kw)()


def adam_step_multi_q8(params, grads, exp_avgs, exp_avg_sqs, exp_avg_absmaxes,
                       exp_avg_sq_absmaxes, backend, **kw: Any) -> None:  # fmt: skip
    """:func:`fastadam.adam_step_multi` with 8-bit states."""
    if kw.pop("max_exp_avg_sqs", None) is not None and kw.get("amsgrad"):
        raise ValueError("amsgrad=True is not supported with 8-bit states")
    kw.pop("state_rounding", None)
    kw.pop("seeds", None)
    Q8Plan(params, grads, exp_avgs, exp_avg_sqs, exp_avg_absmaxes, exp_avg_sq_absmaxes,
           backend=backend).step(**kw)  # fmt: skip
