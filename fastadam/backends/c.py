"""C backend: the fused kernel in ``libfastadam_c`` (csrc/), called through cffi.

ABI mode (``ffi.dlopen``): nothing is compiled at import, and cffi releases
the GIL for the duration of each call. The library picks its SIMD variant
(AVX-512, AVX2 or baseline) at run time; :func:`isa` says which one runs, and
``FASTADAM_ISA=baseline|avx2|avx512`` (read at the library's first step) can
force a lower one.

The library is looked up in the package directory, then in the directory the
fastadam distribution was installed to (the two differ when Python imports
fastadam from a source checkout, e.g. ``python -m fastadam`` run in the
repository root); the environment variable
``FASTADAM_C_LIBRARY=/path/to/libfastadam_c.so`` overrides both (for a
sanitizer or debug build, say). Importing this module raises ``ImportError``
with the reason when the library cannot be found or loaded -- among them a
package built with ``FASTADAM_SKIP_C=1``, which has no library by design.
"""

from __future__ import annotations

import importlib.metadata
import importlib.resources
import os
import sys
from collections.abc import Callable
from typing import Any, NoReturn

import ml_dtypes
import numpy as np
from cffi import FFI

from .. import config
from .._scalars import AdamScalars
from .._table import KIND_BF16, KIND_F32, KIND_F64, TensorTable
from .._validation import check_threads

NAME = "c"

# Mirrors csrc/fastadam.h (cffi cannot run the preprocessor, hence the copy),
# with one deliberate difference: the array parameters are declared `void *`
# (the same ABI as float * / double * on every platform) so the per-call path
# can pass untyped ffi.from_buffer(arr), which is cheaper than the typed form;
# step() checks the dtype itself and picks the matching function. Likewise the
# multi-tensor tables are `void *const *` (rows of a uintp array) and
# scalar_index / rounding_keys `const void *` (step_multi checks their dtypes).
_CDEF = """
typedef struct fa_adam_scalars {
    double step_size;
    double bias_correction2_sqrt;
    double eps;
    double one_minus_beta1;
    double beta2;
    double one_minus_beta2;
    double weight_decay;
    double decay;
    double grad_scale;
    int unscale;
    int maximize;
    int amsgrad;
    int state_rounding;
    uint32_t rounding_key;
} fa_adam_scalars;

int fa_adam_f32(void *param, void *grad, void *exp_avg, void *exp_avg_sq,
                void *max_exp_avg_sq, int64_t n, const fa_adam_scalars *sc);
int fa_adam_f64(void *param, void *grad, void *exp_avg, void *exp_avg_sq,
                void *max_exp_avg_sq, int64_t n, const fa_adam_scalars *sc);
int fa_adam_f32_bf16(void *param, void *grad, void *exp_avg, void *exp_avg_sq,
                     void *max_exp_avg_sq, int64_t n, const fa_adam_scalars *sc);
int fa_adam_f32_bf16_at(void *param, void *grad, void *exp_avg, void *exp_avg_sq,
                        void *max_exp_avg_sq, int64_t n, int64_t first_index,
                        const fa_adam_scalars *sc);
int fa_adam_multi_f32(int64_t count, void *const *param, void *const *grad,
                      void *const *exp_avg, void *const *exp_avg_sq,
                      void *const *max_exp_avg_sq, const int64_t *n,
                      const fa_adam_scalars *scalars, int64_t n_scalars,
                      const void *scalar_index);
int fa_adam_multi_f64(int64_t count, void *const *param, void *const *grad,
                      void *const *exp_avg, void *const *exp_avg_sq,
                      void *const *max_exp_avg_sq, const int64_t *n,
                      const fa_adam_scalars *scalars, int64_t n_scalars,
                      const void *scalar_index);
int fa_adam_multi_f32_bf16(int64_t count, void *const *param, void *const *grad,
                           void *const *exp_avg, void *const *exp_avg_sq,
                           void *const *max_exp_avg_sq, const int64_t *n,
                           const fa_adam_scalars *scalars, int64_t n_scalars,
                           const void *scalar_index, const void *rounding_keys);
int fa_unscale_check_f32(void *grad, int64_t n, double grad_scale, int *found_inf);
int fa_unscale_check_f64(void *grad, int64_t n, double grad_scale, int *found_inf);
int fa_set_num_threads(int n);
int fa_get_num_threads(void);
const char *fa_isa(void);
const char *fa_strerror(int code);
"""

ffi = FFI()
ffi.cdef(_CDEF)

# The struct is filled from an AdamScalars by position (the fastest cffi
# initialiser), so the two must list the same fields in the same order.
_struct_fields = tuple(name for name, _ in ffi.typeof("fa_adam_scalars").fields)
if _struct_fields != AdamScalars._fields:
    raise ImportError(
        "fastadam C backend: fa_adam_scalars fields "
        f"{_struct_fields} do not match AdamScalars {AdamScalars._fields}"
    )


def _library_dirs() -> list:
    """Where the compiled library may be, most specific first."""
    dirs: list[Any] = [importlib.resources.files("fastadam")]
    # A source checkout first on sys.path (the repository root as the working
    # directory of `python -m fastadam ...`) shadows the installed package, and
    # the checkout holds no compiled library: the one installed with the
    # distribution is then the one to load.
    try:
        dirs.append(importlib.metadata.distribution("fastadam").locate_file("fastadam"))
    except importlib.metadata.PackageNotFoundError:
        pass
    return dirs


def _library_candidates() -> list[str]:
    override = os.environ.get("FASTADAM_C_LIBRARY")
    if override:
        return [override]
    if sys.platform == "win32":
        names = ["fastadam_c.dll"]
    elif sys.platform == "darwin":
        names = ["libfastadam_c.dylib", "libfastadam_c.so"]
    else:
        names = ["libfastadam_c.so"]
    return [str(d / name) for d in _library_dirs() for name in names if (d / name).is_file()]


def _installed_without_c() -> bool:
    """Whether the installed distribution is a pure-Python wheel.

    That is what ``FASTADAM_SKIP_C=1`` at build time makes (pyproject.toml's
    override runs no CMake): the library is missing on purpose, and saying so
    beats a list of searched directories.
    """
    try:
        wheel = importlib.metadata.distribution("fastadam").read_text("WHEEL") or ""
    except importlib.metadata.PackageNotFoundError:
        return False
    return "Root-Is-Purelib: true" in wheel


def _load():
    candidates = _library_candidates()
    if not candidates:
        if _installed_without_c():
            raise ImportError(
                "fastadam C backend: this fastadam was installed without its C library "
                "(built with FASTADAM_SKIP_C=1, a pure-Python wheel); the numpy and numba "
                "backends work. Reinstall without FASTADAM_SKIP_C (a C compiler needed) "
                "for the C backend"
            )
        searched = ", ".join(str(d) for d in _library_dirs())
        raise ImportError(
            f"fastadam C backend: libfastadam_c was not found (searched {searched}); "
            "build and install the package (pip install .) or set FASTADAM_C_LIBRARY "
            "to the library's path"
        )
    path = candidates[0]
    try:
        return ffi.dlopen(path)
    except OSError as exc:
        raise ImportError(f"fastadam C backend: cannot load {path}: {exc}") from exc


lib = _load()

# Per-call fast path: bound methods and constants looked up once.
_from_buffer = ffi.from_buffer
_new = ffi.new
_NULL = ffi.NULL
_FLOAT32 = np.dtype(np.float32)
_FLOAT64 = np.dtype(np.float64)


_BFLOAT16 = np.dtype(ml_dtypes.bfloat16)
# (param dtype, state dtype) -> kernel. The states' dtype picks the kernel; the
# scalars' state_rounding must agree with it (the library checks that).
_KERNELS = {
    (_FLOAT32, _FLOAT32): lib.fa_adam_f32,
    (_FLOAT64, _FLOAT64): lib.fa_adam_f64,
    (_FLOAT32, _BFLOAT16): lib.fa_adam_f32_bf16,
}
_UNSCALE = {_FLOAT32: lib.fa_unscale_check_f32, _FLOAT64: lib.fa_unscale_check_f64}


def _pycall_step() -> Callable[..., int] | None:
    """fastadam._pycall's ``step``, pointed at this library's kernels, or None
    where the optional extension was not built (another Python, no headers).

    ``step(param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq, scalars)`` runs the
    kernel on float32/float64 ndarrays that pass every rule of
    :func:`fastadam._validation.validate_arrays` and returns 0, or touches
    nothing and returns 1 (:data:`DECLINED`) so the caller takes its checked
    path, or returns the library's negative error code. See
    csrc/fastadam_pycall.c.
    """
    try:
        from .. import _pycall  # type: ignore[attr-defined]
    except ImportError:
        return None
    address = (
        int(ffi.cast("uintptr_t", lib.fa_adam_f32)),
        int(ffi.cast("uintptr_t", lib.fa_adam_f64)),
    )
    return _pycall.bind(np.ndarray, *address, 2**63 - 1)


#: adam_step's one-call path to the kernel (None without the extension).
step_fast = _pycall_step()
DECLINED = 1


_last_struct: tuple = (None, None)  # (AdamScalars, its C struct), replaced as one object


def _struct_for(sc: AdamScalars):
    """The C struct for ``sc``, rebuilt only when the scalars change.

    ``compute_scalars`` is memoized, so every parameter of one optimizer step
    passes the very same object and this is an identity test. The pair is read
    and replaced as one tuple, and a struct is never written after creation,
    so concurrent Python threads can share it safely.
    """
    global _last_struct
    last = _last_struct
    if last[0] is sc:
        return last[1]
    struct = _new("fa_adam_scalars *", sc)
    _last_struct = (sc, struct)
    return struct


def _raise_code(rc: int) -> NoReturn:
    """A library error code (fastadam.h's FA_ERR_*) as the RuntimeError every entry point raises."""
    raise RuntimeError(
        f"fastadam C kernel failed with code {rc}: {ffi.string(lib.fa_strerror(rc)).decode()}"
    )


def step(
    param: np.ndarray,
    grad: np.ndarray,
    exp_avg: np.ndarray,
    exp_avg_sq: np.ndarray,
    max_exp_avg_sq: np.ndarray | None,
    sc: AdamScalars,
) -> None:
    """One Adam/AdamW update in place (arrays already validated by the caller).

    param and grad are float32 or float64 with the moments of the same dtype,
    or float32 with bfloat16 moments (``sc.state_rounding`` 1 or 2).
    """
    n = param.size
    if n == 0:
        return
    kernel = _KERNELS.get((param.dtype, exp_avg.dtype))
    if kernel is None:
        raise TypeError(
            f"C backend: unsupported dtypes param={param.dtype}, exp_avg={exp_avg.dtype}"
        )
    scalars = _struct_for(sc)
    # from_buffer hands C the arrays' own memory (no copy) and keeps each
    # buffer exported, hence alive, until the call returns. The library checks
    # n, NULLs and overlap itself; it accesses exactly n elements of each.
    # require_writable: a read-only array raises instead of being written to
    # (from_buffer also refuses non-contiguous arrays).
    rc = kernel(
        _from_buffer(param, require_writable=True),
        _from_buffer(grad, require_writable=True),
        _from_buffer(exp_avg, require_writable=True),
        _from_buffer(exp_avg_sq, require_writable=True),
        _NULL if max_exp_avg_sq is None else _from_buffer(max_exp_avg_sq, require_writable=True),
        n,
        scalars,
    )
    if rc:
        _raise_code(rc)


# -- multi-tensor step -------------------------------------------------------------

_MULTI = {
    KIND_F32: lib.fa_adam_multi_f32,
    KIND_F64: lib.fa_adam_multi_f64,
    KIND_BF16: lib.fa_adam_multi_f32_bf16,
}
_INT32 = np.dtype(np.int32)
_UINT32 = np.dtype(np.uint32)
_INT64 = np.dtype(np.int64)
_UINTP = np.dtype(np.uintp)


class _TableCache:
    """What step_multi builds once per table (kept in ``table.cache["c"]``).

    The row pointers point into ``table.pointers`` itself, so a caller that
    rewrites a row in place (new gradients) is seen by the next step; a table
    whose ``pointers`` or ``sizes`` attribute was replaced by another array
    gets a new cache. One table is stepped by one thread at a time (its
    arrays are updated in place), so the scalars buffer needs no lock.
    """

    __slots__ = ("pointers", "sizes", "count", "fn", "bf16", "rows", "n", "buf", "filled")

    def __init__(self, table: TensorTable):
        pointers, sizes = table.pointers, table.sizes
        count = int(sizes.shape[0]) if sizes.ndim == 1 else -1
        if (
            pointers.dtype != _UINTP
            or pointers.shape != (5, count)
            or not pointers.flags.c_contiguous
            or sizes.dtype != _INT64
            or not sizes.flags.c_contiguous
        ):
            raise ValueError(
                "C backend: table.pointers must be C-contiguous uintp (5, count) and "
                f"table.sizes int64 (count,); got {pointers.dtype} {pointers.shape} and "
                f"{sizes.dtype} {sizes.shape}"
            )
        fn = _MULTI.get(table.kind)
        if fn is None:
            raise TypeError(f"C backend: unsupported table kind {table.kind!r}")
        self.pointers, self.sizes, self.count, self.fn = pointers, sizes, count, fn
        self.bf16 = table.kind == KIND_BF16
        if count:
            # from_buffer keeps the arrays exported (alive) as long as this cache.
            base = _from_buffer("void *[]", pointers)
            self.rows = tuple(base + r * count for r in range(5))
            self.n = _from_buffer("int64_t[]", sizes)
        self.buf = _new("fa_adam_scalars[]", 1)
        self.filled: list = [None]  # the AdamScalars each slot of buf holds

    def scalars(self, scalars: tuple[AdamScalars, ...]):
        """``buf`` holding ``scalars``, rewritten only where they changed (by identity:
        compute_scalars is memoized)."""
        k = len(scalars)
        if k > len(self.filled):
            self.buf = _new("fa_adam_scalars[]", k)
            self.filled = [None] * k
        buf, filled = self.buf, self.filled
        for i in range(k):
            sc = scalars[i]
            if filled[i] is not sc:
                buf[i] = sc
                filled[i] = sc
        return buf


def step_multi(
    table: TensorTable,
    scalars: tuple[AdamScalars, ...],
    index: np.ndarray | None,
    keys: np.ndarray | None,
) -> None:
    """Every tensor of ``table`` updated in one library call (see :mod:`fastadam._table`).

    Bit-identical to :func:`step` on each tensor with its scalars; the library
    splits the work by elements over all the tensors, on as many threads as
    one array of the same total would get. The plan has validated the arrays
    (including that no two tensors overlap, which the library does not check).
    """
    cache = table.cache.get("c")
    if cache is None or cache.pointers is not table.pointers or cache.sizes is not table.sizes:
        cache = table.cache["c"] = _TableCache(table)
    count = cache.count
    if count == 0:
        return
    if index is None:
        index_ptr = _NULL
    else:
        if index.dtype != _INT32 or index.shape != (count,):
            raise ValueError(f"index must be int32 ({count},), got {index.dtype} {index.shape}")
        index_ptr = _from_buffer(index)  # from_buffer also refuses non-contiguous arrays
    rows = cache.rows
    if cache.bf16:
        if keys is None:
            keys_ptr = _NULL
        else:
            if keys.dtype != _UINT32 or keys.shape != (count,):
                raise ValueError(f"keys must be uint32 ({count},), got {keys.dtype} {keys.shape}")
            keys_ptr = _from_buffer(keys)
        rc = cache.fn(
            count, rows[0], rows[1], rows[2], rows[3], rows[4], cache.n,
            cache.scalars(scalars), len(scalars), index_ptr, keys_ptr,
        )  # fmt: skip
    else:
        rc = cache.fn(
            count, rows[0], rows[1], rows[2], rows[3], rows[4], cache.n,
            cache.scalars(scalars), len(scalars), index_ptr,
        )  # fmt: skip
    if rc:
        _raise_code(rc)


def unscale_and_check(grad: np.ndarray, scale: float) -> bool:
    """Divide ``grad`` in place by ``scale`` and say whether any result is NaN or +-Inf.

    One pass over a validated C-contiguous writeable float32/float64 array of
    any shape: the same bits as ``np.divide(grad, grad.dtype.type(scale),
    out=grad)`` and the same answer as ``not np.isfinite(grad).all()`` after it.
    """
    n = grad.size
    if n == 0:
        return False
    kernel = _UNSCALE.get(grad.dtype)
    if kernel is None:
        raise TypeError(f"C backend: unsupported dtype {grad.dtype}")
    # A fresh out-parameter per call: concurrent Python threads (cffi drops the
    # GIL) must not share one.
    found = _new("int *")
    rc = kernel(_from_buffer(grad, require_writable=True), n, scale, found)
    if rc:
        _raise_code(rc)
    return bool(found[0])


def set_num_threads(n: int) -> None:
    """Threads for steps large enough to split (process-wide)."""
    n = check_threads(n)
    rc = lib.fa_set_num_threads(min(n, config.C_MAX_THREADS))  # the library's own cap
    if rc:
        raise RuntimeError(f"fa_set_num_threads failed with code {rc}")


def get_num_threads() -> int:
    return lib.fa_get_num_threads()


def isa() -> str:
    """The SIMD variant the library runs: ``"avx512"``, ``"avx2"`` or ``"baseline"``."""
    return ffi.string(lib.fa_isa()).decode()
