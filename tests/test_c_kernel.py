"""Tests specific to the C backend (libfastadam_c through fastadam.backends.c).

What the generic backend tests cannot see: every compiled ISA variant (forced
with FASTADAM_ISA in subprocesses) agrees bit for bit with the others and with
NumPy; the raw C ABI rejects bad arguments with error codes; 1 vs 2 threads,
concurrent Python threads and fork() after a parallel step all work.

Run against the *installed* package (``--import-mode=importlib``), or set
FASTADAM_C_LIBRARY to a library built elsewhere (e.g. a sanitizer build).
"""

from __future__ import annotations

import hashlib
import importlib.resources
import itertools
import json
import os
import platform
import subprocess
import sys
import textwrap
import threading

import numpy as np
import pytest

from fastadam._scalars import AdamScalars, compute_scalars

try:
    from fastadam.backends import c
except (ImportError, OSError) as exc:  # pragma: no cover - depends on the build
    if platform.machine() in ("x86_64", "AMD64") and not os.environ.get(
        "FASTADAM_ALLOW_MISSING_BACKENDS"
    ):
        raise  # on the platforms we build for, a missing library is a build bug
    pytest.skip(f"C backend unavailable: {exc}", allow_module_level=True)

ffi, lib = c.ffi, c.lib

# csrc/fastadam.h's return codes
FA_OK, FA_ERR_NULL, FA_ERR_SIZE, FA_ERR_AMSGRAD, FA_ERR_OVERLAP, FA_ERR_THREADS = range(0, -6, -1)
FA_CODES = (FA_OK, FA_ERR_NULL, FA_ERR_SIZE, FA_ERR_AMSGRAD, FA_ERR_OVERLAP, FA_ERR_THREADS)
ARRAY_NAMES = ("param", "grad", "exp_avg", "exp_avg_sq", "max_exp_avg_sq")
DTYPES = (np.float32, np.float64)
# 0-size, scalars, every tail length around the 4/8/16-lane SIMD widths, a
# size past the parallel threshold that no SIMD width divides.
ODD_SIZES = (0, 1, 7, 15, 16, 17, 31, 33, 63, 65, 1000, 1000003)
LARGE = 1000003


# --------------------------------------------------------------- reference --


def numpy_step(p, g, m, v, vmax, sc: AdamScalars) -> None:
    """The AdamScalars docstring, one NumPy operation per line, in the arrays' dtype."""
    T = p.dtype.type
    with np.errstate(all="ignore"):
        if sc.unscale:
            np.divide(g, T(sc.grad_scale), out=g)  # written back to grad
        gg = -g if sc.maximize else g
        if sc.weight_decay != 0.0:
            gg = gg + T(sc.weight_decay) * p
        p *= T(sc.decay)
        m += (gg - m) * T(sc.one_minus_beta1)
        v[...] = v * T(sc.beta2) + T(sc.one_minus_beta2) * gg * gg
        second = v
        if sc.amsgrad:
            np.maximum(vmax, v, out=vmax)
            second = vmax
        denom = np.sqrt(second) / T(sc.bias_correction2_sqrt) + T(sc.eps)
        p -= T(sc.step_size) * m / denom


def make_scalars(weight_decay, decoupled, amsgrad, maximize, grad_scale, eps_hat=False, step=3):
    return compute_scalars(
        step=step,
        lr=1e-2,
        beta1=0.9,
        beta2=0.999,
        eps=1e-8,
        weight_decay=weight_decay,
        decoupled_weight_decay=decoupled,
        amsgrad=amsgrad,
        maximize=maximize,
        eps_hat=eps_hat,
        grad_scale=grad_scale,
    )


# Every flag of the kernel (L2, amsgrad, unscale, maximize) on and off, plus
# AdamW's decay and eps_hat. grad_scale=3.0: not a power of two, so a kernel
# multiplying by 1/3 instead of dividing would round differently.
COMBOS = [
    dict(weight_decay=wd, decoupled=dec, amsgrad=ams, maximize=mx, grad_scale=gs)
    for wd, dec, ams, mx, gs in itertools.product(
        (0.0, 0.1), (False, True), (False, True), (False, True), (None, 3.0)
    )
    if not (wd == 0.0 and dec)  # identical to wd == 0, not decoupled
] + [
    dict(
        weight_decay=0.0,
        decoupled=False,
        amsgrad=False,
        maximize=False,
        grad_scale=None,
        eps_hat=True,
    )
]


def combo_id(combo: dict) -> str:
    return "+".join(f"{k}={v}" for k, v in combo.items() if v) or "plain"


def make_state(n, dtype, seed=0, shape=None):
    """Random mid-training state sprinkled with NaN, inf, signed zeros and subnormals."""
    rng = np.random.default_rng(seed)
    arrays = [
        rng.standard_normal(n),
        rng.standard_normal(n),
        rng.standard_normal(n) * 0.1,
        rng.random(n) * 0.01,
        rng.random(n) * 0.01,
    ]
    arrays[4] += arrays[3] * (rng.random(n) < 0.5)  # vmax sometimes >= v
    arrays = [np.array(a, dtype=dtype) for a in arrays]
    info = np.finfo(dtype)
    specials = np.array(
        [
            np.nan,
            np.inf,
            -np.inf,
            0.0,
            -0.0,
            info.smallest_subnormal,
            -info.smallest_subnormal,
            info.tiny,
            info.max,
            -info.max,
            1e-30,
        ],
        dtype=dtype,
    )
    if n >= 8:
        k = max(1, n // 64)
        for a in arrays:
            a[rng.integers(0, n, k)] = rng.choice(specials, k)
        # np.maximum ties on signed zeros (v becomes +0 when v = g = 0).
        p, g, m, v, vmax = arrays
        g[:2] = 0.0
        v[:2] = (0.0, -0.0)
        vmax[:2] = (-0.0, 0.0)
    if shape is not None:
        arrays = [a.reshape(shape) for a in arrays]
    return arrays


def bits(a: np.ndarray) -> np.ndarray:
    """The array's bit patterns, every NaN made the same (payloads are not specified)."""
    a = np.array(a, copy=True).reshape(-1)
    a[np.isnan(a)] = np.nan
    return a.view(np.uint32 if a.dtype == np.float32 else np.uint64)


def assert_bits_equal(actual, expected, names=ARRAY_NAMES):
    for name, a, e in zip(names, actual, expected, strict=True):
        if a is None and e is None:
            continue
        assert a.dtype == e.dtype and a.shape == e.shape, name
        diff = np.count_nonzero(bits(a) != bits(e))
        assert diff == 0, f"{name}: {diff} of {a.size} elements differ in their bits"


def digest(arrays) -> str:
    h = hashlib.sha256()
    for a in arrays:
        if a is not None:
            h.update(bits(a).tobytes())
    return h.hexdigest()


def run_c(state, sc):
    p, g, m, v, vmax = state
    c.step(p, g, m, v, vmax if sc.amsgrad else None, sc)


def run_numpy(state, sc):
    numpy_step(*state, sc)


def all_cases():
    for dtype in DTYPES:
        for n in ODD_SIZES:
            combos = COMBOS if n != LARGE else COMBOS[::3]  # keep the big size affordable
            for combo in combos:
                yield f"{np.dtype(dtype).name}-{n}-{combo_id(combo)}", dtype, n, combo


def case_digests(step_fn) -> dict[str, str]:
    """Digest of the state after one step, for every case (also run in subprocesses)."""
    out = {}
    for case, dtype, n, combo in all_cases():
        state = make_state(n, dtype, seed=n)
        step_fn(state, make_scalars(**combo))
        out[case] = digest(state)
    return out


def _c_digests_for_subprocess() -> dict:
    return {"isa": c.isa(), "digests": case_digests(run_c)}


# ------------------------------------------------------------------- tests --


def test_library_is_the_installed_one():
    path = os.environ.get("FASTADAM_C_LIBRARY")
    if path is None:
        pkg = importlib.resources.files("fastadam")
        names = ("libfastadam_c.so", "libfastadam_c.dylib", "fastadam_c.dll")
        assert any((pkg / name).is_file() for name in names), "library not installed"
        assert (pkg / "include" / "fastadam.h").is_file(), "header not installed"
    assert c.NAME == "c"
    assert c.isa() in ("avx512", "avx2", "baseline")


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def supported_isas() -> list[str]:
    """The variants this CPU can run (x86-64 Linux: from /proc/cpuinfo)."""
    isas = ["baseline"]
    if platform.machine() in ("x86_64", "AMD64"):
        flags = _cpu_flags()
        if "avx2" in flags:
            isas.append("avx2")
        if {"avx512f", "avx512vl"} <= flags:
            isas.append("avx512")
    return isas


@pytest.mark.skipif("FASTADAM_ISA" in os.environ, reason="FASTADAM_ISA forces a variant")
def test_best_isa_is_selected():
    if not _cpu_flags():
        pytest.skip("no /proc/cpuinfo to compare against")
    assert c.isa() == supported_isas()[-1]


@pytest.mark.parametrize(
    ("dtype", "n", "combo"),
    [pytest.param(dtype, n, combo, id=case) for case, dtype, n, combo in all_cases()],
)
def test_bit_identical_to_numpy(dtype, n, combo):
    sc = make_scalars(**combo)
    ours, ref = make_state(n, dtype, seed=n), make_state(n, dtype, seed=n)
    run_c(ours, sc)
    run_numpy(ref, sc)
    assert_bits_equal(ours, ref)


def test_matches_lead_reference_backend():
    ref_mod = pytest.importorskip("fastadam.backends.reference")
    for dtype, combo in itertools.product(DTYPES, COMBOS):
        sc = make_scalars(**combo)
        ours, ref = make_state(1000, dtype, seed=5), make_state(1000, dtype, seed=5)
        run_c(ours, sc)
        p, g, m, v, vmax = ref
        ref_mod.step(p, g, m, v, vmax if sc.amsgrad else None, sc)
        assert_bits_equal(ours, ref)


@pytest.mark.parametrize("shape", [(), (3, 4), (2, 0, 5), (5, 1, 7)])
def test_any_shape(shape):
    n = int(np.prod(shape))
    for dtype in DTYPES:
        sc = make_scalars(0.1, False, True, False, 2.0)
        ours = make_state(n, dtype, seed=1, shape=shape)
        ref = [a.copy() for a in ours]
        run_c(ours, sc)
        run_numpy(ref, sc)
        assert_bits_equal(ours, ref)


@pytest.mark.parametrize("offset", [1, 3])
@pytest.mark.parametrize("n", [17, 65, 70001])
def test_misaligned_views_and_no_out_of_bounds(offset, n):
    """Arrays that start off a vector boundary; guard elements around them stay untouched."""
    guard = 37
    for dtype in DTYPES:
        sc = make_scalars(0.1, False, True, True, 3.0)
        src = make_state(n, dtype, seed=2)
        bufs = []
        for a in src:
            buf = np.full(n + offset + guard, 12345.0, dtype=dtype)
            buf[offset : offset + n] = a
            bufs.append(buf)
        views = [b[offset : offset + n] for b in bufs]
        assert all(v.flags.c_contiguous for v in views)
        run_c(views, sc)
        run_numpy(src, sc)
        assert_bits_equal(views, src)
        for b in bufs:
            assert np.all(b[:offset] == 12345.0) and np.all(b[offset + n :] == 12345.0)


def test_isa_variants_bit_identical(tmp_path):
    """Each variant the CPU supports, forced in a subprocess, gives NumPy's bits."""
    expected = case_digests(run_numpy)
    script = textwrap.dedent(
        f"""
        import importlib.util, json
        spec = importlib.util.spec_from_file_location("tck", {__file__!r})
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        print(json.dumps(mod._c_digests_for_subprocess()))
        """
    )
    for isa in supported_isas():
        env = dict(os.environ, FASTADAM_ISA=isa)
        proc = subprocess.run(
            [sys.executable, "-c", script],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert proc.returncode == 0, proc.stderr
        result = json.loads(proc.stdout.strip().splitlines()[-1])
        assert result["isa"] == isa, f"FASTADAM_ISA={isa} ran {result['isa']}"
        bad = [case for case, d in expected.items() if result["digests"][case] != d]
        assert not bad, f"{isa}: {len(bad)} cases differ from NumPy, e.g. {bad[:5]}"


def test_isa_env_cannot_raise_or_garble(tmp_path):
    """An unknown name or a variant above the CPU's falls back to the best one."""
    best = supported_isas()[-1]
    for value in ("bogus", "avx512" if best != "avx512" else "AVX512"):
        env = dict(os.environ, FASTADAM_ISA=value)
        proc = subprocess.run(
            [sys.executable, "-c", "from fastadam.backends import c; print(c.isa())"],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.strip() == best


@pytest.fixture
def restore_threads():
    before = c.get_num_threads()
    yield
    c.set_num_threads(before)


def test_thread_count_api(restore_threads):
    c.set_num_threads(3)
    assert c.get_num_threads() == 3
    with pytest.raises(ValueError):
        c.set_num_threads(0)
    with pytest.raises(TypeError):
        c.set_num_threads(2.0)
    assert lib.fa_set_num_threads(-1) == FA_ERR_THREADS
    assert lib.fa_set_num_threads(0) == FA_OK  # back to the default: the CPUs we may use
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    assert lib.fa_get_num_threads() == cpus


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("n", [LARGE, (1 << 20) + 5])
def test_threads_bit_identical(restore_threads, dtype, n):
    sc = make_scalars(0.1, False, True, True, 3.0)
    results = []
    for threads in (1, 2, 3):
        c.set_num_threads(threads)
        state = make_state(n, dtype, seed=7)
        # Start one element in: the 64-byte split points move.
        state = [np.concatenate([a[:1], a])[1:] for a in state]
        run_c(state, sc)
        results.append(state)
    ref = make_state(n, dtype, seed=7)
    run_numpy(ref, sc)
    for r in results:
        assert_bits_equal(r, ref)


def test_concurrent_python_threads(restore_threads):
    """Several Python threads step their own buffers at once (cffi drops the GIL)."""
    c.set_num_threads(2)
    sc = make_scalars(0.1, True, True, False, None)
    n = 100003
    states = [make_state(n, np.float32, seed=s) for s in range(4)]
    refs = [make_state(n, np.float32, seed=s) for s in range(4)]
    errors = []

    def work(state):
        try:
            for _ in range(10):
                run_c(state, sc)
        except BaseException as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(s,)) for s in states]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    for ref in refs:
        for _ in range(10):
            run_numpy(ref, sc)
    for s, ref in zip(states, refs, strict=True):
        assert_bits_equal(s, ref)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork()")
def test_fork_after_parallel_step(tmp_path):
    """A child forked after a parallel step runs its own step (serially) and exits."""
    script = textwrap.dedent(
        f"""
        import os, signal, sys
        import numpy as np
        import importlib.util
        spec = importlib.util.spec_from_file_location("tck", {__file__!r})
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        c = mod.c
        sc = mod.make_scalars(0.1, True, True, False, 3.0)
        n = 1 << 21
        c.set_num_threads(2)
        first = mod.make_state(n, np.float32, seed=1)
        linux = sys.platform.startswith("linux")
        tasks = len(os.listdir("/proc/self/task")) if linux else 0
        mod.run_c(first, sc)  # the parent enters a parallel region
        if linux and "libgomp" in open("/proc/self/maps").read():
            # the OpenMP team's worker exists now (and lives on in the parent)
            assert len(os.listdir("/proc/self/task")) > tasks, "no worker thread was started"
        expected = mod.make_state(n, np.float32, seed=2)
        child_state = [a.copy() for a in expected]
        mod.run_c(expected, sc)
        pid = os.fork()
        if pid == 0:
            signal.alarm(30)  # a hung child dies (SIGALRM) instead of lingering
            try:
                mod.run_c(child_state, sc)
                mod.assert_bits_equal(child_state, expected)
                code = 0
            except BaseException:
                code = 3
            os._exit(code)
        _, status = os.waitpid(pid, 0)
        # the parent's pool still works after the fork
        again = mod.make_state(n, np.float32, seed=2)
        mod.run_c(again, sc)
        mod.assert_bits_equal(again, expected)
        sys.exit(os.waitstatus_to_exitcode(status))
        """
    )
    proc = subprocess.run(
        [sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=180
    )
    assert proc.returncode == 0, f"child exit {proc.returncode}: {proc.stderr}"


# ------------------------------------------------------------------ raw ABI --


def _raw_args(n=8, dtype=np.float32, amsgrad=True):
    arrays = make_state(n, dtype, seed=3)
    ptrs = [ffi.from_buffer(a) for a in arrays]
    sc = ffi.new("fa_adam_scalars *", make_scalars(0.1, False, amsgrad, False, None))
    return arrays, ptrs, sc


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
def test_abi_rejects_bad_arguments(dtype):
    fn = lib.fa_adam_f32 if dtype == np.float32 else lib.fa_adam_f64
    arrays, ptrs, sc = _raw_args(dtype=dtype)
    before = [a.copy() for a in arrays]
    for i in range(4):  # each required array NULL
        args = list(ptrs)
        args[i] = ffi.NULL
        assert fn(*args, 8, sc) == FA_ERR_NULL
        assert fn(*args, 0, sc) == FA_ERR_NULL
    assert fn(*ptrs, 8, ffi.NULL) == FA_ERR_NULL
    assert fn(*ptrs, -1, sc) == FA_ERR_SIZE
    assert fn(*ptrs, -(1 << 62), sc) == FA_ERR_SIZE
    assert fn(*ptrs, 1 << 62, sc) == FA_ERR_SIZE  # larger than any address space
    assert fn(*ptrs[:4], ffi.NULL, 8, sc) == FA_ERR_AMSGRAD
    # overlap: the same buffer twice, or two views one element apart
    assert fn(ptrs[0], ptrs[0], *ptrs[2:], 8, sc) == FA_ERR_OVERLAP
    assert fn(*ptrs[:4], ptrs[0] + 7, 8, sc) == FA_ERR_OVERLAP  # 7 bytes into param
    for a, b in zip(arrays, before, strict=True):
        np.testing.assert_array_equal(bits(a), bits(b))  # errors wrote nothing
    # n == 0 is a successful no-op; without amsgrad max_exp_avg_sq may be NULL
    assert fn(*ptrs, 0, sc) == FA_OK
    for a, b in zip(arrays, before, strict=True):
        np.testing.assert_array_equal(bits(a), bits(b))
    sc.amsgrad = 0
    assert fn(*ptrs[:4], ffi.NULL, 8, sc) == FA_OK


def test_abi_overlap_detection_is_exact():
    _, _, sc = _raw_args(amsgrad=False)
    big = np.zeros(32, np.float32)
    base = ffi.from_buffer(big)
    base_f = ffi.cast("float *", base)
    # [0, 8) and [8, 16) are disjoint; [0, 8) and [7, 15) are not.
    assert lib.fa_adam_f32(base_f, base_f + 8, base_f + 16, base_f + 24, ffi.NULL, 8, sc) == 0
    rc = lib.fa_adam_f32(base_f, base_f + 7, base_f + 16, base_f + 24, ffi.NULL, 8, sc)
    assert rc == FA_ERR_OVERLAP


def test_step_raises_on_library_error():
    p, g, m, v, vmax = make_state(16, np.float32)
    with pytest.raises(RuntimeError, match="-4"):
        c.step(p, p, m, v, None, make_scalars(0.0, False, False, False, None))
    with pytest.raises(ValueError):  # from_buffer refuses read-only arrays
        g.flags.writeable = False
        c.step(p, g, m, v, None, make_scalars(0.0, False, False, False, None))


def test_strerror():
    for code in (*FA_CODES, 99):
        assert ffi.string(lib.fa_strerror(code))
