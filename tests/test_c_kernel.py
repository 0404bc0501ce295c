"""Tests specific to the C backend (libfastadam_c through fastadam.backends.c).

What the generic backend tests cannot see: every compiled ISA variant (forced
with FASTADAM_ISA in subprocesses) agrees bit for bit with the others and with
NumPy, for float32, float64 and bfloat16 states (both roundings) and for the
fused unscale-and-check; the raw C ABI rejects bad arguments with error codes;
1 vs 2 threads, concurrent Python threads and fork() after a parallel step all
work; the stochastic-rounding bits depend on the global element index only
(also across the 2^32 boundary where the kernel splits its loop).

Run against the *installed* package (``--import-mode=importlib``), or set
FASTADAM_C_LIBRARY to a library built elsewhere (e.g. a sanitizer build).
"""

from __future__ import annotations

import hashlib
import importlib.resources
import itertools
import os
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
from helpers import (
    FA_ERR_AMSGRAD,
    FA_ERR_NULL,
    FA_ERR_OVERLAP,
    FA_ERR_ROUNDING,
    FA_ERR_SIZE,
    FA_ERR_THREADS,
    FA_OK,
    assert_bit_identical,
    bits,
    c_backend_or_skip,
    c_digests_per_isa,
    combo_id,
    cpu_flags,
    load_test_module,
    make_state_kind,
    supported_isas,
)
from helpers import make_state as helpers_make_state

from fastadam._scalars import (
    STATE_BF16_NEAREST,
    STATE_BF16_STOCHASTIC,
    STATE_SAME_DTYPE,
    AdamScalars,
    compute_scalars,
)
from fastadam.backends import reference

c = c_backend_or_skip()

ffi, lib = c.ffi, c.lib

FA_CODES = (
    FA_OK, FA_ERR_NULL, FA_ERR_SIZE, FA_ERR_AMSGRAD, FA_ERR_OVERLAP, FA_ERR_THREADS,
    FA_ERR_ROUNDING,
)  # fmt: skip
DTYPES = (np.float32, np.float64)
BF16 = np.dtype(ml_dtypes.bfloat16)
# What a case steps: float32/float64 states, or float32 params with bfloat16
# states and one of the two roundings (the value is AdamScalars.state_rounding).
KINDS = {
    "float32": STATE_SAME_DTYPE,
    "float64": STATE_SAME_DTYPE,
    "bf16-nearest": STATE_BF16_NEAREST,
    "bf16-stochastic": STATE_BF16_STOCHASTIC,
}
U32 = np.uint32
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


def numpy_step_bf16(p, g, m, v, vmax, sc: AdamScalars, first_index: int = 0) -> None:
    """The AdamScalars docstring for float32 params and bfloat16 states.

    ``first_index`` is the global index of element 0 (the random bits depend on it).
    """
    f32 = np.float32
    p, g, m, v = (a.reshape(-1) for a in (p, g, m, v))
    with np.errstate(all="ignore"):
        if sc.unscale:
            np.divide(g, f32(sc.grad_scale), out=g)
        gg = -g if sc.maximize else g
        if sc.weight_decay != 0.0:
            gg = gg + f32(sc.weight_decay) * p
        p *= f32(sc.decay)
        m_old, v_old = reference.widen(m), reference.widen(v)
        m_new = m_old + (gg - m_old) * f32(sc.one_minus_beta1)
        v_new = v_old * f32(sc.beta2) + f32(sc.one_minus_beta2) * gg * gg
        if sc.state_rounding == STATE_BF16_STOCHASTIC:
            r = reference.random_bits(p.size, sc.rounding_key, first_index)
            r_m, r_v = r & U32(0xFFFF), r >> U32(16)
        else:
            assert sc.state_rounding == STATE_BF16_NEAREST
            r_m = r_v = None
        m.view(np.uint16)[...] = reference.round_to_bf16(m_new, r_m)
        v.view(np.uint16)[...] = reference.round_to_bf16(v_new, r_v)
        second = reference.widen(v)
        if sc.amsgrad:
            vmax = vmax.reshape(-1)
            second = np.maximum(reference.widen(vmax), second)
            vmax.view(np.uint16)[...] = (second.view(U32) >> U32(16)).astype(np.uint16)
        denom = np.sqrt(second) / f32(sc.bias_correction2_sqrt) + f32(sc.eps)
        p -= f32(sc.step_size) * reference.widen(m) / denom


def make_scalars(
    weight_decay,
    decoupled,
    amsgrad,
    maximize,
    grad_scale,
    eps_hat=False,
    step=3,
    rounding=STATE_SAME_DTYPE,
    seed=20240607,
):
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
        state_rounding=rounding,
        seed=seed,
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


def make_state(n, dtype, seed=0, shape=None):
    """The suite's generator with special values (helpers.make_state), as a list."""
    return list(helpers_make_state(n, dtype, seed, shape, specials=True))


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
    if state[2].dtype == BF16:
        numpy_step_bf16(*state, sc)
    else:
        numpy_step(*state, sc)


def all_cases():
    for kind in KINDS:
        for n in ODD_SIZES:
            combos = COMBOS if n != LARGE else COMBOS[::3]  # keep the big size affordable
            for combo in combos:
                yield f"{kind}-{n}-{combo_id(combo)}", kind, n, combo


# NaNs for the NaN-payload cases: quiet and signalling, both signs, low bits
# that the rounding's add would carry out of (float32), the largest payloads.
F32_NANS = np.array(
    [0x7FC00000, 0xFFC00001, 0x7F800001, 0x7F80FFFF, 0xFF80FFFF, 0x7FFFFFFF, 0xFFFFFFFF,
     0x7FC0FFFF, 0x7FBFFFFF, 0x7F808000],
    dtype=U32,
)  # fmt: skip
BF16_NANS = np.array([0x7FC0, 0xFFC1, 0x7F81, 0xFF81, 0x7FFF, 0xFFFF, 0x7FBF], dtype=np.uint16)
NAN_PAYLOAD_SIZES = (97, 1000)


def make_nan_payload_state(n, seed):
    """bfloat16-state arrays where each NaN has one source: an eighth of the elements
    get a NaN gradient, others a NaN exp_avg, exp_avg_sq or max_exp_avg_sq, never two
    in one element. Every operation then sees one NaN (or two of the same bits), and
    x86 and NumPy return it quieted, so the stored states' NaN bits are defined:
    the rounding's ``(u >> 16) | 0x0040``, or the max's operand as it was."""
    rng = np.random.default_rng(seed)
    p = rng.standard_normal(n).astype(np.float32)
    g = rng.standard_normal(n).astype(np.float32)
    m = (rng.standard_normal(n) * 0.1).astype(BF16)
    v = (rng.random(n) * 0.01).astype(BF16)
    vmax = (rng.random(n) * 0.02).astype(BF16)
    at = rng.permutation(n)
    k = n // 8
    g.view(U32)[at[:k]] = rng.choice(F32_NANS, k)
    for j, a in enumerate((m, v, vmax), start=1):
        a.view(np.uint16)[at[j * k : (j + 1) * k]] = rng.choice(BF16_NANS, k)
    return [p, g, m, v, vmax]


def nan_payload_cases():
    """(case, kind, n, combo) for the NaN-payload digests. Not with maximize and L2
    together: GCC compiles the portable loop's ``-g + wd * p`` as ``wd * p - g``,
    which keeps a NaN's sign where NumPy's negation flips it (the compiler may: C
    does not specify NaN signs), so the baseline variant differs there."""
    for kind in ("bf16-nearest", "bf16-stochastic"):
        for n in NAN_PAYLOAD_SIZES:
            for combo in COMBOS:
                if not (combo["maximize"] and combo["weight_decay"] and not combo["decoupled"]):
                    yield f"nan-payload-{kind}-{n}-{combo_id(combo)}", kind, n, combo


def raw_bf16_digest(arrays) -> str:
    """digest(), but the bfloat16 arrays' bits as they are (NaN payloads included)."""
    h = hashlib.sha256()
    for a in arrays:
        if a is not None:
            h.update((a.view(np.uint16) if a.dtype == BF16 else bits(a)).tobytes())
    return h.hexdigest()


def case_digests(step_fn, unscale_fn) -> dict[str, str]:
    """Digest of the state after one step, for every case (also run in subprocesses),
    and of the unscaled gradient and flag for every size and float dtype."""
    out = {}
    for case, kind, n, combo in all_cases():
        state = make_state_kind(n, kind, seed=n)
        step_fn(state, make_scalars(**combo, rounding=KINDS[kind]))
        out[case] = digest(state)
    for case, kind, n, combo in nan_payload_cases():
        state = make_nan_payload_state(n, seed=n)
        step_fn(state, make_scalars(**combo, rounding=KINDS[kind]))
        out[case] = raw_bf16_digest(state)
    for dtype in DTYPES:
        for n in ODD_SIZES:
            grad = make_state(n, dtype, seed=n)[1]
            found = unscale_fn(grad, 3.0)
            out[f"unscale-{np.dtype(dtype).name}-{n}"] = f"{digest([grad])}-{found}"
    return out


def numpy_unscale(grad, scale) -> bool:
    with np.errstate(all="ignore"):
        np.divide(grad, grad.dtype.type(scale), out=grad)
    return not np.isfinite(grad).all()


def _c_digests_for_subprocess() -> dict:
    return {"isa": c.isa(), "digests": case_digests(run_c, c.unscale_and_check)}


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


@pytest.mark.skipif("FASTADAM_C_LIBRARY" in os.environ, reason="a library chosen by hand")
def test_library_found_when_the_checkout_shadows_the_installed_package():
    """`python -m fastadam bench` in the repository root imports the checkout, which has
    no compiled library: the C backend must still load (the installed one)."""
    root = Path(__file__).resolve().parents[1]
    script = "import fastadam; print(fastadam.__file__); print(fastadam.available_backends())"
    proc = subprocess.run(
        [sys.executable, "-c", script], cwd=root, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr
    imported_from, backends = proc.stdout.splitlines()[-2:]
    assert Path(imported_from).resolve().parent == root / "fastadam"  # the checkout
    assert "'c'" in backends, proc.stderr


@pytest.mark.skipif("FASTADAM_ISA" in os.environ, reason="FASTADAM_ISA forces a variant")
def test_best_isa_is_selected():
    if not cpu_flags():
        pytest.skip("no /proc/cpuinfo to compare against")
    assert c.isa() == supported_isas()[-1]


@pytest.mark.parametrize(
    ("kind", "n", "combo"),
    [pytest.param(kind, n, combo, id=case) for case, kind, n, combo in all_cases()],
)
def test_bit_identical_to_numpy(kind, n, combo):
    sc = make_scalars(**combo, rounding=KINDS[kind])
    ours, ref = make_state_kind(n, kind, seed=n), make_state_kind(n, kind, seed=n)
    run_c(ours, sc)
    run_numpy(ref, sc)
    assert_bit_identical(ours, ref)


def test_matches_lead_reference_backend():
    ref_mod = pytest.importorskip("fastadam.backends.reference")
    for kind, combo in itertools.product(KINDS, COMBOS):
        sc = make_scalars(**combo, rounding=KINDS[kind])
        ours, ref = make_state_kind(1000, kind, seed=5), make_state_kind(1000, kind, seed=5)
        run_c(ours, sc)
        p, g, m, v, vmax = ref
        ref_mod.step(p, g, m, v, vmax if sc.amsgrad else None, sc)
        assert_bit_identical(ours, ref)


@pytest.mark.parametrize("shape", [(), (3, 4), (2, 0, 5), (5, 1, 7)])
def test_any_shape(shape):
    n = int(np.prod(shape))
    for kind, rounding in KINDS.items():
        sc = make_scalars(0.1, False, True, False, 2.0, rounding=rounding)
        ours = make_state_kind(n, kind, seed=1, shape=shape)
        ref = [a.copy() for a in ours]
        run_c(ours, sc)
        run_numpy(ref, sc)
        assert_bit_identical(ours, ref)


@pytest.mark.parametrize("offset", [1, 3])
@pytest.mark.parametrize("n", [17, 65, 70001])
def test_misaligned_views_and_no_out_of_bounds(offset, n):
    """Arrays that start off a vector boundary; guard elements around them stay untouched."""
    guard = 37
    for kind, rounding in KINDS.items():
        sc = make_scalars(0.1, False, True, True, 3.0, rounding=rounding)
        src = make_state_kind(n, kind, seed=2)
        bufs = []
        for a in src:
            # 12288 = 3 * 2^12: exact in bfloat16 too
            buf = np.full(n + offset + guard, 12288.0, dtype=a.dtype)
            buf[offset : offset + n] = a
            bufs.append(buf)
        views = [b[offset : offset + n] for b in bufs]
        assert all(v.flags.c_contiguous for v in views)
        run_c(views, sc)
        run_numpy(src, sc)
        assert_bit_identical(views, src)
        for b in bufs:
            assert np.all(b[:offset] == 12288.0) and np.all(b[offset + n :] == 12288.0)


def test_isa_variants_bit_identical(tmp_path):
    """Each variant the CPU supports, forced in a subprocess, gives NumPy's bits."""
    expected = case_digests(run_numpy, numpy_unscale)
    for isa, result in c_digests_per_isa(__file__, tmp_path).items():
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


def test_thread_count_api(restore_threads):
    c.set_num_threads(3)
    by_hand = sys.platform == "darwin" or "FASTADAM_C_LIBRARY" in os.environ
    if c.get_num_threads() == 1 and by_hand:
        # Apple clang has no OpenMP, and a library given by hand may be built
        # without it (tests/test_c_no_openmp.py checks that build); the builds
        # of Linux installs and CI always have it, so there 1 is a failure.
        pytest.skip("the C library was built without OpenMP: every step runs on one thread")
    assert c.get_num_threads() == 3
    with pytest.raises(ValueError):
        c.set_num_threads(0)
    with pytest.raises(TypeError):
        c.set_num_threads(2.0)
    assert lib.fa_set_num_threads(-1) == FA_ERR_THREADS
    assert lib.fa_set_num_threads(0) == FA_OK  # back to the default: the CPUs we may use
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    assert lib.fa_get_num_threads() == cpus


def shifted(arrays):
    """Copies that start one element into their buffers: the 64-byte split points move."""
    return [np.concatenate([a[:1], a])[1:] for a in arrays]


@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("n", [LARGE, (1 << 20) + 5])
def test_threads_bit_identical(restore_threads, kind, n):
    sc = make_scalars(0.1, False, True, True, 3.0, rounding=KINDS[kind])
    results = []
    for threads in (1, 2, 3):
        c.set_num_threads(threads)
        state = shifted(make_state_kind(n, kind, seed=7))
        run_c(state, sc)
        results.append(state)
    ref = make_state_kind(n, kind, seed=7)
    run_numpy(ref, sc)
    for r in results:
        assert_bit_identical(r, ref)


# ------------------------------------------------------------ bfloat16 --


def _bf16_at(state, first_index: int, sc: AdamScalars) -> int:
    """fa_adam_f32_bf16_at over the whole of ``state`` (raw ABI)."""
    p, g, m, v, vmax = state
    ptrs = [ffi.from_buffer(a) for a in (p, g, m, v, vmax)]
    return lib.fa_adam_f32_bf16_at(*ptrs, p.size, first_index, ffi.new("fa_adam_scalars *", sc))


@pytest.mark.parametrize(
    "first_index",
    [
        (1 << 32) - 30_000,  # the 2^32 boundary inside the first thread's share
        (1 << 32) - 70_000,  # ... inside the second's (2 threads)
        (1 << 32) + 5,
        (7 << 40) + 3,
    ],
)
def test_bf16_random_bits_follow_the_global_index(restore_threads, first_index):
    """The bits are those of the global index, across the kernel's 2^32 loop split,
    for any thread count and when the array is stepped in pieces."""
    n = 100_003
    sc = make_scalars(0.1, False, True, True, 3.0, rounding=STATE_BF16_STOCHASTIC)
    ref = make_state_kind(n, "bf16-stochastic", seed=9)
    numpy_step_bf16(*ref, sc, first_index=first_index)
    zero_based = make_state_kind(n, "bf16-stochastic", seed=9)
    numpy_step_bf16(*zero_based, sc)
    # The control: the high index bits change the result.
    assert np.any(bits(zero_based[2]) != bits(ref[2]))
    for threads in (1, 2, 3):
        c.set_num_threads(threads)
        state = shifted(make_state_kind(n, "bf16-stochastic", seed=9))
        assert _bf16_at(state, first_index, sc) == FA_OK
        assert_bit_identical(state, ref)
    c.set_num_threads(2)
    state = make_state_kind(n, "bf16-stochastic", seed=9)
    for lo, hi in ((0, 12_345), (12_345, 40_000), (40_000, n)):
        assert _bf16_at([a[lo:hi] for a in state], first_index + lo, sc) == FA_OK
    assert_bit_identical(state, ref)


@pytest.mark.parametrize("rounding", [STATE_BF16_NEAREST, STATE_BF16_STOCHASTIC])
def test_bf16_rounding_edge_values(rounding):
    """Ties, overflow to Inf, NaN payloads and subnormals through the rounding.

    beta1 = 0 and exp_avg = 0 make the new m exactly the gradient, so the
    rounding sees chosen float32 bit patterns; NaN bits are compared exactly.
    """
    patterns = np.array(
        [
            0x3F808000, 0x3F818000, 0xBF808000,  # ties: to even (down, up, negative)
            0x3F808001, 0x3F807FFF,  # just above / below a tie
            0x7F7FFFFF, 0xFF7FFFFF, 0x7F7F7FFF,  # the largest floats: to +-Inf, or not
            0x7F800000, 0xFF800000,  # infinities
            0x7FC00000, 0x7F800001, 0x7F80FFFF, 0xFF80FFFF, 0xFFFFFFFF,  # NaNs
            0x00000001, 0x00008000, 0x00018000, 0x80000001, 0x007FFFFF,  # subnormals
            0x3F800000, 0x12345678, 0xC2F6E979,  # ordinary values
        ],
        dtype=U32,
    )  # fmt: skip
    nearest = {  # float32 bits -> bfloat16 bits, worked out by hand
        0x3F808000: 0x3F80, 0x3F818000: 0x3F82, 0xBF808000: 0xBF80, 0x3F808001: 0x3F81,
        0x3F807FFF: 0x3F80, 0x7F7FFFFF: 0x7F80, 0xFF7FFFFF: 0xFF80, 0x7F7F7FFF: 0x7F7F,
        0x7F800000: 0x7F80, 0xFF800000: 0xFF80, 0x7FC00000: 0x7FC0, 0x7F800001: 0x7FC0,
        0x7F80FFFF: 0x7FC0, 0xFF80FFFF: 0xFFC0, 0xFFFFFFFF: 0xFFFF, 0x00000001: 0x0000,
        0x00008000: 0x0000, 0x00018000: 0x0002, 0x80000001: 0x8000, 0x007FFFFF: 0x0080,
        0x3F800000: 0x3F80,
    }  # fmt: skip
    n = 3 * len(patterns) + 5  # through the vector loop and its tail
    grad = np.resize(patterns, n).view(np.float32)
    sc = compute_scalars(1, 1e-2, 0.0, 0.999, 1e-8, 0.0, False, False, False, False, None,
                         rounding, 99)  # fmt: skip
    state = [np.ones(n, np.float32), grad.copy(), np.zeros(n, BF16), np.zeros(n, BF16), None]
    ref = [a if a is None else a.copy() for a in state]
    run_c(state, sc)
    numpy_step_bf16(*ref, sc)
    np.testing.assert_array_equal(state[2].view(np.uint16), ref[2].view(np.uint16))
    got = state[2].view(np.uint16)
    u = grad.view(U32)
    if rounding == STATE_BF16_NEAREST:
        for i in range(n):
            if int(u[i]) in nearest:
                assert got[i] == nearest[int(u[i])], f"{u[i]:#010x} -> {got[i]:#06x}"
    else:  # one of the two neighbours; NaN stays NaN with its sign; Inf stays Inf
        is_nan = (u & U32(0x7FFFFFFF)) > U32(0x7F800000)
        np.testing.assert_array_equal(got[is_nan], (u[is_nan] >> U32(16)) | U32(0x40))
        down = u[~is_nan] >> U32(16)
        assert np.all((got[~is_nan] == down) | (got[~is_nan] == down + U32(1)))
        exact = (u & U32(0xFFFF)) == 0
        np.testing.assert_array_equal(got[exact], u[exact] >> U32(16))


def test_bf16_stochastic_rounding_is_unbiased():
    """Values between two bfloat16 neighbours round up in proportion to their position."""
    n = 200_000
    frac = (np.arange(n) % 97) / 97.0 * 0.4  # all in the lower part: nearest rounds down
    lo = np.float32(1.0)
    ulp = np.float32(2.0**-7)  # bfloat16 spacing in [1, 2)
    g = (lo + ulp * frac).astype(np.float32)
    sc = compute_scalars(1, 1e-2, 0.0, 0.999, 1e-8, 0.0, False, False, False, False, None,
                         STATE_BF16_STOCHASTIC, 5)  # fmt: skip
    state = [np.ones(n, np.float32), g.copy(), np.zeros(n, BF16), np.zeros(n, BF16), None]
    run_c(state, sc)
    stored = reference.widen(state[2]).astype(np.float64)
    # Element k's error has mean 0 and variance f(1-f) ulp^2 (f = frac[k] < 0.4):
    # the mean over n elements has a standard deviation under 1.1e-3 ulp.
    bias = (stored - g.astype(np.float64)).mean() / float(ulp)
    assert abs(bias) < 0.01, bias
    nearest = reference.widen(reference.round_to_bf16(g, None)).astype(np.float64)
    nearest_bias = (nearest - g.astype(np.float64)).mean() / float(ulp)
    assert nearest_bias < -0.15  # the control: round-to-nearest loses ~0.2 ulp here


# -------------------------------------------------------- unscale + check --


def clean_grad(n, dtype, seed=0):
    return np.random.default_rng(seed).standard_normal(n).astype(dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("n", [*ODD_SIZES, 300_007])
def test_unscale_and_check_matches_numpy(dtype, n):
    # Powers of two take the library's multiply-by-the-exact-reciprocal path
    # (also at the edges of the normal range, where it must fall back to dividing).
    scales = (3.0, 0.1, 1e-45, 1e300, 65536.0, 1.0, 0.125, -4.0, 2.0**-20)
    edges = (2.0**126, 2.0**127, 2.0**-126, 2.0**-127, 2.0**-149, 2.0**1022, 2.0**-1074)
    for scale in scales + (edges if n in (33, 1000) else ()):
        for grad in (make_state(n, dtype, seed=n)[1], clean_grad(n, dtype, seed=n)):
            expected = grad.copy()
            found_expected = numpy_unscale(expected, scale)
            found = c.unscale_and_check(grad, scale)
            assert isinstance(found, bool)
            assert found == found_expected, (scale, n)
            assert_bit_identical([grad], [expected], names=["grad"])


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
def test_unscale_and_check_finds_every_position(dtype):
    """One non-finite value anywhere (vector body, tail, either thread) sets the flag."""
    n = 200_003
    for bad in (np.nan, np.inf, -np.inf):
        for pos in (0, 1, 15, 16, n // 2, n - 17, n - 1):
            grad = clean_grad(n, dtype, seed=pos)
            assert not c.unscale_and_check(grad.copy(), 3.0)
            grad[pos] = bad
            assert c.unscale_and_check(grad, 3.0), (bad, pos)
    # finite input, overflow in the quotient
    grad = clean_grad(1000, dtype)
    grad[700] = np.finfo(dtype).max
    assert c.unscale_and_check(grad, 0.5)
    assert np.isinf(grad[700])


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
def test_unscale_and_check_threads(restore_threads, dtype):
    n = 1_000_003
    ref = make_state(n, dtype, seed=4)[1]
    found_ref = numpy_unscale(ref, 3.0)
    for threads in (1, 2, 3):
        c.set_num_threads(threads)
        grad = shifted([make_state(n, dtype, seed=4)[1]])[0]
        assert c.unscale_and_check(grad, 3.0) == found_ref
        assert_bit_identical([grad], [ref], names=["grad"])
        clean = clean_grad(n, dtype)
        assert not c.unscale_and_check(clean, 3.0)


def test_unscale_and_check_rejects():
    assert c.unscale_and_check(np.zeros(0, np.float32), 2.0) is False
    with pytest.raises(TypeError):
        c.unscale_and_check(np.zeros(4, np.float16), 2.0)
    g = np.ones(4, np.float32)
    g.flags.writeable = False
    with pytest.raises(ValueError):
        c.unscale_and_check(g, 2.0)
    with pytest.raises((ValueError, BufferError)):  # not contiguous
        c.unscale_and_check(np.ones(8, np.float32)[::2], 2.0)


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
        assert_bit_identical(s, ref)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork()")
def test_fork_after_parallel_step(tmp_path):
    """A child forked after a parallel step runs its own step (serially) and exits."""
    script = load_test_module(__file__) + textwrap.dedent(
        """
        import os, signal, sys
        import numpy as np
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
                mod.assert_bit_identical(child_state, expected)
                code = 0
            except BaseException:
                code = 3
            os._exit(code)
        _, status = os.waitpid(pid, 0)
        # the parent's pool still works after the fork
        again = mod.make_state(n, np.float32, seed=2)
        mod.run_c(again, sc)
        mod.assert_bit_identical(again, expected)
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


def test_abi_bf16_rejects_bad_arguments():
    arrays = make_state_kind(8, "bf16-nearest", seed=3)
    ptrs = [ffi.from_buffer(a) for a in arrays]
    sc = ffi.new("fa_adam_scalars *", make_scalars(0.1, False, True, False, None, rounding=1))
    fn, at = lib.fa_adam_f32_bf16, lib.fa_adam_f32_bf16_at
    before = [a.copy() for a in arrays]
    for i in range(4):
        args = list(ptrs)
        args[i] = ffi.NULL
        assert fn(*args, 8, sc) == FA_ERR_NULL
        assert fn(*args, 0, sc) == FA_ERR_NULL
    assert fn(*ptrs, 8, ffi.NULL) == FA_ERR_NULL
    assert fn(*ptrs, -1, sc) == FA_ERR_SIZE
    assert fn(*ptrs, 1 << 62, sc) == FA_ERR_SIZE  # param's bytes would pass the address space
    assert fn(*ptrs[:4], ffi.NULL, 8, sc) == FA_ERR_AMSGRAD
    assert at(*ptrs, 8, -1, sc) == FA_ERR_SIZE
    assert at(*ptrs, 8, (1 << 63) - 8, sc) == FA_ERR_SIZE  # last index would overflow
    for bad in (0, 3, -1):
        sc.state_rounding = bad
        assert fn(*ptrs, 8, sc) == FA_ERR_ROUNDING
        assert fn(*ptrs, 0, sc) == FA_ERR_ROUNDING
    sc.state_rounding = 2
    # mixed element sizes: param is 32 bytes, the moments 16
    assert fn(*ptrs[:2], ptrs[0] + 30, *ptrs[3:], 8, sc) == FA_ERR_OVERLAP
    assert fn(*ptrs[:3], ptrs[2] + 14, ptrs[4], 8, sc) == FA_ERR_OVERLAP
    for a, b in zip(arrays, before, strict=True):
        np.testing.assert_array_equal(bits(a), bits(b))  # errors wrote nothing
    assert at(*ptrs, 8, (1 << 63) - 9, sc) == FA_OK  # the very last indices exist
    assert fn(*ptrs, 0, sc) == FA_OK


def test_abi_bf16_overlap_detection_is_exact():
    sc = ffi.new("fa_adam_scalars *", make_scalars(0.0, False, False, False, None, rounding=1))
    buf = np.zeros(64, np.float32)
    f = ffi.cast("float *", ffi.from_buffer(buf))
    h = ffi.cast("uint16_t *", f + 16)  # the moments after param [0, 8) and grad [8, 16)
    assert lib.fa_adam_f32_bf16(f, f + 8, h, h + 8, ffi.NULL, 8, sc) == FA_OK
    assert lib.fa_adam_f32_bf16(f, f + 8, h, h + 7, ffi.NULL, 8, sc) == FA_ERR_OVERLAP
    h_in_grad = ffi.cast("uint16_t *", f + 15)  # its first 2 bytes are grad's last element
    assert lib.fa_adam_f32_bf16(f, f + 8, h_in_grad, h + 8, ffi.NULL, 8, sc) == FA_ERR_OVERLAP


def test_abi_rounding_mode_must_match_the_function():
    for dtype, fn in ((np.float32, lib.fa_adam_f32), (np.float64, lib.fa_adam_f64)):
        arrays, ptrs, sc = _raw_args(dtype=dtype)
        before = [a.copy() for a in arrays]
        for bad in (1, 2, -1):
            sc.state_rounding = bad
            assert fn(*ptrs, 8, sc) == FA_ERR_ROUNDING
        for a, b in zip(arrays, before, strict=True):
            np.testing.assert_array_equal(bits(a), bits(b))


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
def test_abi_unscale_check_rejects_bad_arguments(dtype):
    fn = lib.fa_unscale_check_f32 if dtype == np.float32 else lib.fa_unscale_check_f64
    grad = make_state(8, dtype, seed=1)[1]
    before = grad.copy()
    ptr = ffi.from_buffer(grad)
    found = ffi.new("int *", 7)
    assert fn(ffi.NULL, 8, 2.0, found) == FA_ERR_NULL
    assert fn(ffi.NULL, 0, 2.0, found) == FA_ERR_NULL
    assert fn(ptr, 8, 2.0, ffi.NULL) == FA_ERR_NULL
    assert fn(ptr, -1, 2.0, found) == FA_ERR_SIZE
    assert fn(ptr, 1 << 62, 2.0, found) == FA_ERR_SIZE
    assert found[0] == 7  # not written on error
    np.testing.assert_array_equal(bits(grad), bits(before))
    assert fn(ptr, 0, 2.0, found) == FA_OK and found[0] == 0
    np.testing.assert_array_equal(bits(grad), bits(before))


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
