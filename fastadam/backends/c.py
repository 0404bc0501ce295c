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
with the reason when the library cannot be found or loaded.
"""

from __future__ import annotations

import importlib.metadata
import importlib.resources
import os
import sys

import ml_dtypes
import numpy as np
from cffi import FFI

from .._scalars import AdamScalars

NAME = "c"

# Mirrors csrc/fastadam.h (cffi cannot run the preprocessor, hence the copy),
# with one deliberate difference: the array parameters are declared `void *`
# (the same ABI as float * / double * on every platform) so the per-call path
# can pass untyped ffi.from_buffer(arr), which is cheaper than the typed form;
# step() checks the dtype itself and picks the matching function.
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
    dirs = [importlib.resources.files("fastadam")]
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


def _load():
    candidates = _library_candidates()
    if not candidates:
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
        raise RuntimeError(
            f"fastadam C kernel failed with code {rc}: {ffi.string(lib.fa_strerror(rc)).decode()}"
        )


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
        raise RuntimeError(
            f"fastadam C kernel failed with code {rc}: {ffi.string(lib.fa_strerror(rc)).decode()}"
        )
    return bool(found[0])


def set_num_threads(n: int) -> None:
    """Threads for steps large enough to split (process-wide)."""
    if isinstance(n, bool) or not isinstance(n, int):
        raise TypeError(f"n must be an int, got {type(n).__name__}")
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    rc = lib.fa_set_num_threads(min(n, 4096))  # the library's own cap
    if rc:
        raise RuntimeError(f"fa_set_num_threads failed with code {rc}")


def get_num_threads() -> int:
    return lib.fa_get_num_threads()


def isa() -> str:
    """The SIMD variant the library runs: ``"avx512"``, ``"avx2"`` or ``"baseline"``."""
    return ffi.string(lib.fa_isa()).decode()
