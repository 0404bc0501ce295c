"""Array generators and assertions shared by the tests (importable as ``helpers``)."""

from __future__ import annotations

import contextlib
import functools
import importlib
import io
import itertools
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import textwrap
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest

import fastadam
from fastadam import config

#: The compiled backends, from the registry's one list of names.
FAST_BACKENDS = tuple(name for name in fastadam.BACKEND_NAMES if name != "numpy")

#: csrc/fastadam.h's return codes.
(FA_OK, FA_ERR_NULL, FA_ERR_SIZE, FA_ERR_AMSGRAD, FA_ERR_OVERLAP, FA_ERR_THREADS,
 FA_ERR_ROUNDING, FA_ERR_INDEX) = range(0, -8, -1)  # fmt: skip


def fast_backends_required() -> bool:
    """On the platforms we build for, a fast backend that does not load is a build
    bug, not a reason to skip: tests fail unless FASTADAM_ALLOW_MISSING_BACKENDS is set."""
    return platform.machine() in ("x86_64", "AMD64") and not os.environ.get(
        "FASTADAM_ALLOW_MISSING_BACKENDS"
    )


def c_backend_or_skip():
    """fastadam.backends.c, for a test module that needs it: skips the module where
    the library may be missing (see fast_backends_required), raises where not."""
    try:
        from fastadam.backends import c
    except (ImportError, OSError) as exc:  # pragma: no cover - depends on the build
        if fast_backends_required():
            raise
        pytest.skip(f"C backend unavailable: {exc}", allow_module_level=True)
    return c


DTYPES = (np.float32, np.float64)
#: 0-size, scalars, SIMD-width tails (4/8/16 lanes), a prime past the
#: parallel threshold (so the threaded path runs too).
ODD_SIZES = (0, 1, 3, 7, 8, 15, 16, 17, 31, 33, 63, 65, 1000, 1023, 131071)

#: Every on/off combination of the update's options.
OPTION_NAMES = ("weight_decay", "decoupled_weight_decay", "amsgrad", "maximize")
OPTION_COMBOS = [
    dict(zip(OPTION_NAMES, (wd, dec, ams, mx)))
    for wd, dec, ams, mx in itertools.product(
        (0.0, 0.1), (False, True), (False, True), (False, True)
    )
]


def combo_id(c: dict) -> str:
    on = [k for k, v in c.items() if v]
    return "+".join(on) or "plain"


def special_values(dtype) -> np.ndarray:
    """The values every backend must treat exactly as NumPy does: NaN, both
    infinities, both zeros, the smallest subnormals and normal, the largest
    finite values, and a tiny normal number."""
    info = np.finfo(dtype)
    return np.array(
        [np.nan, np.inf, -np.inf, 0.0, -0.0, info.smallest_subnormal,
         -info.smallest_subnormal, info.tiny, info.max, -info.max, 1e-30],
        dtype=dtype,
    )  # fmt: skip


# bfloat16 bit patterns for the states: NaNs (quiet, signalling, negative),
# infinities, signed zeros, the smallest subnormal, the smallest normal, the largest.
BF16_SPECIALS = np.array(
    [0x7FC0, 0xFFC1, 0x7F81, 0x7F80, 0xFF80, 0x0000, 0x8000, 0x0001, 0x8001, 0x0080, 0x7F7F],
    dtype=np.uint16,
)


def make_state(n, dtype, seed=0, shape=None, scale=1.0, specials=False):
    """A fresh (param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq) tuple: the one
    case generator of the suite (every backend's tests draw from it).

    The moments start non-zero (as mid-training) so every term of the update
    matters from the first step. With ``specials``, about one element in 64 of
    each array is one of :func:`special_values`, and the first two elements
    hold zero gradients and signed-zero ties of ``v`` and ``max_exp_avg_sq``
    (where ``np.maximum`` picks its second operand).
    """
    rng = np.random.default_rng(seed)
    shape = (n,) if shape is None else shape
    p = rng.standard_normal(shape)
    g = rng.standard_normal(shape) * scale
    m = rng.standard_normal(shape) * 0.1
    v = rng.random(shape) * 0.01
    vmax = v + rng.random(shape) * 0.01 * (rng.random(shape) < 0.5)
    # np.array, not astype: a 0-d result must stay an array, not become a scalar.
    arrays = [np.array(a, dtype=dtype) for a in (p, g, m, v, vmax)]
    size = int(np.prod(shape))
    if specials and size >= 8:
        flat = [a.reshape(-1) for a in arrays]
        k = max(1, size // 64)
        for a in flat:
            a[rng.integers(0, size, k)] = rng.choice(special_values(dtype), k)
        flat[1][:2] = 0.0
        flat[3][:2] = (0.0, -0.0)
        flat[4][:2] = (-0.0, 0.0)
    return tuple(arrays)


def make_state_kind(n, kind, seed=0, shape=None, specials=True):
    """make_state for a kind of step: ``"float32"``, ``"float64"``, or float32
    params with bfloat16 states (any other kind name), which are rounded from
    float32 ones and, with ``specials``, sprinkled with BF16_SPECIALS."""
    if kind in ("float32", "float64"):
        return list(make_state(n, np.dtype(kind), seed, shape, specials=specials))
    arrays = list(make_state(n, np.float32, seed, shape, specials=specials))
    arrays[2:] = [a.astype(ml_dtypes.bfloat16) for a in arrays[2:]]
    size = arrays[0].size
    if specials and size >= 8:
        rng = np.random.default_rng(seed + 1)
        k = max(1, size // 64)
        for a in arrays[2:]:
            a.reshape(-1).view(np.uint16)[rng.integers(0, size, k)] = rng.choice(BF16_SPECIALS, k)
    return arrays


def copy_state(state):
    return tuple(a.copy() for a in state)


@dataclass(frozen=True)
class Case:
    """One entry of CASES: a kind of step, a size and adam_step's options."""

    kind: str  # "float32", "float64", "bf16-nearest", "bf16-stochastic"
    n: int
    options: tuple[tuple[str, object], ...]

    @property
    def id(self) -> str:
        on = "+".join(k if v is True else f"{k}={v}" for k, v in self.options if v) or "plain"
        return f"{self.kind}-{self.n}-{on}"

    def state(self, seed: int = 0) -> list:
        """The arrays of this case, special values included (make_state_kind)."""
        return make_state_kind(self.n, self.kind.split("-")[0], seed=seed)

    def kwargs(self) -> dict:
        kw = dict(self.options)
        if self.kind.startswith("bf16"):
            kw["state_rounding"] = self.kind.split("-")[1]
            kw["seed"] = 7
        return kw


#: The table every backend is run over (tests/test_backends.py), as torch's
#: optim_db lists configurations: each kind of step, sizes from empty to past
#: both parallel thresholds (C 32,768 and Numba's config.PARALLEL_MIN_ELEMENTS
#: elements), and option sets that between them turn every kernel flag on.
CASES = tuple(
    Case(kind, n, options)
    for kind in ("float32", "float64", "bf16-nearest", "bf16-stochastic")
    for n in (0, 1, 33, 4099, max(config.PARALLEL_MIN_ELEMENTS, 1 << 15) + 4099)
    for options in (
        (),
        (("weight_decay", 0.1), ("decoupled_weight_decay", True), ("amsgrad", True)),
        (("weight_decay", 0.1), ("maximize", True), ("grad_scale", 3.0)),
        (("amsgrad", True), ("maximize", True), ("eps_hat", True), ("grad_scale", 0.5)),
    )
)


def run_step(state, backend, step=3, **kw):
    """One adam_step over ``state`` (updated in place) with sensible defaults."""
    p, g, m, v, vmax = state
    kw.setdefault("lr", 1e-2)
    fastadam.adam_step(p, g, m, v, step=step, max_exp_avg_sq=vmax, backend=backend, **kw)


def bits(a: np.ndarray) -> np.ndarray:
    """The array's bit patterns as unsigned ints (flattened), every NaN mapped to one
    pattern.

    Comparing bits (not values) tells +0.0 from -0.0; NaN payloads are not
    specified by IEEE arithmetic, so only a NaN's position counts. bfloat16
    arrays are compared on their 16-bit patterns.
    """
    u = np.ascontiguousarray(a).reshape(-1).view(f"u{a.dtype.itemsize}").copy()
    if a.dtype.itemsize == 2:  # bfloat16: a NaN is any exponent-all-ones non-infinity
        u[(u & 0x7FFF) > 0x7F80] = 0x7FC0
        return u
    u[np.isnan(a).reshape(-1)] = np.array(np.nan, dtype=a.dtype).view(u.dtype)
    return u


def assert_bit_identical(
    actual, expected, names=("param", "grad", "exp_avg", "exp_avg_sq", "max_exp_avg_sq")
):
    """Every array of ``actual`` has the bits of ``expected``'s (pairs of None skipped)."""
    for name, a, e in zip(names, actual, expected):
        if a is None and e is None:
            continue
        assert a.dtype == e.dtype and a.shape == e.shape, name
        differ = bits(a) != bits(e)
        assert not differ.any(), (
            f"{name} differs in {np.count_nonzero(differ)} of {a.size} elements"
        )


def run_python(code: str, timeout: float = 120, **env: str) -> subprocess.CompletedProcess:
    """Run ``python -c code`` in a scratch directory with extra environment.

    Not from the repository root: there ``import fastadam`` would find the
    source tree (which has no compiled library) instead of the installed package.
    """
    with tempfile.TemporaryDirectory() as cwd:
        return subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout,
            cwd=cwd, env={**os.environ, **env},
        )  # fmt: skip


def cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def supported_isas() -> list[str]:
    """The C library's variants this CPU can run, lowest first."""
    isas = ["baseline"]
    if platform.machine() in ("x86_64", "AMD64"):
        flags = cpu_flags()
        if "avx2" in flags:
            isas.append("avx2")
        if {"avx512f", "avx512vl", "avx512bw"} <= flags:
            isas.append("avx512")
    return isas


def load_test_module(test_file: str) -> str:
    """Python lines that import the test module ``test_file`` as ``mod`` in a
    subprocess (with this directory on the path: test modules import helpers)."""
    return textwrap.dedent(
        f"""
        import importlib.util, sys
        sys.path.insert(0, {os.path.dirname(test_file)!r})
        spec = importlib.util.spec_from_file_location("test_module", {test_file!r})
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        """
    )


def c_digests_per_isa(test_file: str, cwd) -> dict[str, dict]:
    """For each supported ISA: what ``_c_digests_for_subprocess()`` of the test module
    ``test_file`` returns in a subprocess run with ``FASTADAM_ISA`` set to it (the
    library picks its variant once per process)."""
    script = load_test_module(test_file) + "import json\n"
    script += "print(json.dumps(mod._c_digests_for_subprocess()))\n"
    results = {}
    for isa in supported_isas():
        proc = subprocess.run(
            [sys.executable, "-c", script], cwd=cwd, env=dict(os.environ, FASTADAM_ISA=isa),
            capture_output=True, text=True, timeout=600,
        )  # fmt: skip
        assert proc.returncode == 0, proc.stderr
        results[isa] = json.loads(proc.stdout.strip().splitlines()[-1])
    return results


#: The runnable examples (they import one another by module name).
EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def import_example(name: str):
    """The module of ``examples/<name>.py``."""
    sys.path.insert(0, str(EXAMPLES))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(str(EXAMPLES))


@functools.cache
def torch_digits_accuracy(*args: str) -> float:
    """The fastadam model's test accuracy ``examples/torch_digits.py ARGS`` prints
    (with low-precision weights, a line about the float32 twin follows it); each
    argument list runs once per test session (the float32 baseline serves every
    state dtype)."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert import_example("torch_digits").main(list(args)) == 0
    lines = [x for x in out.getvalue().splitlines() if x.startswith("test accuracy: ")]
    assert len(lines) == 1, out.getvalue()[-2000:]
    return float(lines[0].split(": ")[1])


# -- GCC vectorization reports (-fdump-tree-vect-optimized=FILE) ----------------

_VECTORIZED = re.compile(
    r"([\w.+-]+):(\d+):\d+: optimized: loop vectorized using (\d+) byte vectors"
)


def vectorized_loops(report: Path) -> dict[str, set[tuple[str, int, int]]]:
    """function -> {(file name, line, vector bytes)} of the loops the report says
    it vectorized. Clones (name.constprop.0, ...) count as their function."""
    out: dict[str, set[tuple[str, int, int]]] = defaultdict(set)
    function = None
    with open(report, errors="replace") as f:
        for line in f:
            if line.startswith(";; Function "):
                function = line.split()[2].split(".")[0]
            elif "optimized: loop vectorized" in line:
                m = _VECTORIZED.search(line)
                assert m and function, line
                out[function].add((Path(m[1]).name, int(m[2]), int(m[3])))
    return out


def loop_lines(path: Path, after: str, count: int) -> list[int]:
    """Line numbers (1-based) of the first ``count`` ``for`` loops after the first
    line that contains ``after``."""
    lines = path.read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if after in line)
    found = [i + 1 for i in range(start, len(lines)) if lines[i].lstrip().startswith("for (")]
    assert len(found) >= count, f"{path.name}: fewer than {count} loops after {after!r}"
    return found[:count]
