"""The C backend's multi-tensor step (``fastadam.backends.c.step_multi``,
``fa_adam_multi_*`` in libfastadam_c).

What the generic multi-tensor tests cannot see: every compiled ISA variant
(forced with FASTADAM_ISA in subprocesses) gives the bits of
``reference.step_multi``; the split of the concatenated tensors between
threads changes nothing (1, 2 and 3 threads, tensors at every alignment, split
points inside, at the end of and between tensors); concurrent Python threads
and fork() after a parallel multi step work; the raw ABI rejects every bad
argument with its error code and writes nothing.

Run against the *installed* package (``--import-mode=importlib``), or set
FASTADAM_C_LIBRARY to a library built elsewhere.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import textwrap
import threading

import ml_dtypes
import numpy as np
import pytest
from helpers import (
    FA_ERR_AMSGRAD,
    FA_ERR_INDEX,
    FA_ERR_NULL,
    FA_ERR_OVERLAP,
    FA_ERR_ROUNDING,
    FA_ERR_SIZE,
    FA_OK,
    bits,
    c_backend_or_skip,
    c_digests_per_isa,
    load_test_module,
    make_state_kind,
)

from fastadam._scalars import (
    STATE_BF16_NEAREST,
    STATE_BF16_STOCHASTIC,
    STATE_SAME_DTYPE,
    compute_scalars,
    rounding_key,
)
from fastadam._table import GRAD, KIND_BF16, KIND_F32, KIND_F64, address, table_from_arrays
from fastadam.backends import reference

c = c_backend_or_skip()

ffi, lib = c.ffi, c.lib

# The library's parallel threshold (fastadam.c): totals past it use 2+ threads.
PARALLEL_MIN = 32768
BF16 = np.dtype(ml_dtypes.bfloat16)

#: Case kind -> (table kind, param dtype, state dtype, state_rounding).
KINDS = {
    "float32": (KIND_F32, np.float32, np.float32, STATE_SAME_DTYPE),
    "float64": (KIND_F64, np.float64, np.float64, STATE_SAME_DTYPE),
    "bf16-nearest": (KIND_BF16, np.float32, BF16, STATE_BF16_NEAREST),
    "bf16-stochastic": (KIND_BF16, np.float32, BF16, STATE_BF16_STOCHASTIC),
}

#: Tensor sizes of one table: empty tensors among uneven ones; one tensor;
#: many tiny ones; past the parallel threshold only in total; one even split
#: point 3 elements before a tensor's end (its cache line lies past the end,
#: so the split becomes the next tensor's start); large.
LAYOUTS = {
    "uneven": (0, 1, 17, 0, 1000, 33, 0, 5000, 3, 64, 0),
    "one": (4099,),
    "one-large": (70001,),
    "tiny": tuple(int(x) for x in np.random.default_rng(1).integers(0, 8, 300)),
    "total-large": (20000, 7, 15000, 0, 12345, 1, 9),
    "split-at-end": (PARALLEL_MIN + 3, PARALLEL_MIN - 3),
    "empty": (0, 0),
}

#: Hyperparameter combinations (every kernel flag on somewhere): wd,
#: decoupled, amsgrad, maximize, grad_scale (3.0: not a power of two).
COMBOS = {
    "plain": (0.0, False, False, False, None),
    "adamw-amsgrad": (0.1, True, True, False, None),
    "l2-maximize-unscale": (0.1, False, False, True, 3.0),
    "all": (0.1, False, True, True, 3.0),
}


def scalars_for(combo: str, rounding: int, steps=(3,)):
    wd, dec, ams, mx, gs = COMBOS[combo]
    return tuple(
        compute_scalars(s, 1e-2, 0.9, 0.999, 1e-8, wd, dec, ams, mx, False, gs, rounding, 11)
        for s in steps
    )


def make_tensors(kind: str, sizes, seed=0, amsgrad=True, offset=0):
    """Rows (param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq or None): the suite's
    generator (helpers.make_state_kind, special values included), tensor ``t``
    drawn with seed ``seed * 1000 + t``.

    ``offset`` > 0 places every array ``offset`` elements into its own buffer
    (so its start moves against the 64-byte lines) with guard values after it;
    the buffers are returned too, to check the guards.
    """
    rows, buffers = [], []
    for t, n in enumerate(sizes):
        row = []
        for r, v in enumerate(make_state_kind(n, kind, seed=seed * 1000 + t)):
            if r == 4 and not amsgrad:
                row.append(None)
                continue
            buf = np.full(offset + n + 5, 12288.0, dtype=v.dtype)  # exact in bfloat16 too
            a = buf[offset : offset + n]
            a[...] = v
            row.append(a)
            buffers.append((buf, offset, n))
        rows.append(row)
    return rows, buffers


def copy_rows(rows):
    return [[None if a is None else a.copy() for a in row] for row in rows]


def assert_rows_equal(actual, expected):
    for i, (ra, re) in enumerate(zip(actual, expected, strict=True)):
        for r, (a, e) in enumerate(zip(ra, re, strict=True)):
            if a is None:
                continue
            diff = np.count_nonzero(bits(a) != bits(e))
            assert diff == 0, f"tensor {i} array {r}: {diff} of {a.size} elements differ"


def step_args(kind: str, combo: str, count: int, steps=(3,), seed=0):
    """(scalars, index, keys) as a plan would pass them: one scalars per distinct
    step, tensor i taking steps[i % len(steps)]; keys for stochastic rounding."""
    _, _, _, rounding = KINDS[kind]
    scalars = scalars_for(combo, rounding, steps)
    tensor_steps = [steps[i % len(steps)] for i in range(count)]
    index = None if len(steps) == 1 else np.array([i % len(steps) for i in range(count)], np.int32)
    keys = None
    if rounding == STATE_BF16_STOCHASTIC:
        keys = np.array([rounding_key(seed + i, s) for i, s in enumerate(tensor_steps)], np.uint32)
    return scalars, index, keys


def run_both(kind, sizes, combo, steps=(3,), seed=0, offset=0):
    """One C multi step and one reference multi step on equal tensors; returns
    both row lists and the C side's buffers."""
    table_kind = KINDS[kind][0]
    amsgrad = COMBOS[combo][2]
    ours, buffers = make_tensors(kind, sizes, seed, amsgrad, offset)
    ref = copy_rows(ours)
    scalars, index, keys = step_args(kind, combo, len(sizes), steps, seed)
    c.step_multi(table_from_arrays(table_kind, ours), scalars, index, keys)
    reference.step_multi(table_from_arrays(table_kind, ref), scalars, index, keys)
    return ours, ref, buffers


# ------------------------------------------------------------- the results --


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("combo", list(COMBOS))
@pytest.mark.parametrize("kind", list(KINDS))
def test_matches_reference(restore_threads, kind, combo, layout):
    c.set_num_threads(2)
    for steps in ((3,), (1, 5, 1000)):
        ours, ref, _ = run_both(kind, LAYOUTS[layout], combo, steps, seed=len(layout))
        assert_rows_equal(ours, ref)


@pytest.mark.parametrize("kind", list(KINDS))
def test_threads_and_alignment_change_nothing(restore_threads, kind):
    """Tensors starting 0..15 elements into their buffers (every position
    against the 64-byte lines the split points move to), with split points
    inside tensors, at their ends and between them: 1, 2 and 3 threads give
    the reference's bits and leave the guard elements after every array alone."""
    table_kind = KINDS[kind][0]
    sizes = (30001, 5, 20011, 0, 17, 24999)
    scalars, index, keys = step_args(kind, "all", len(sizes), (2, 9))
    positions = 64 // np.dtype(KINDS[kind][1]).itemsize
    for offset in range(positions):
        ref, _ = make_tensors(kind, sizes, seed=offset)
        reference.step_multi(table_from_arrays(table_kind, ref), scalars, index, keys)
        for threads in (1, 2, 3):
            c.set_num_threads(threads)
            ours, buffers = make_tensors(kind, sizes, seed=offset, offset=offset)
            c.step_multi(table_from_arrays(table_kind, ours), scalars, index, keys)
            assert_rows_equal(ours, ref)
            for buf, off, n in buffers:
                guard = bits(buf[off + n :])
                assert np.all(guard == bits(np.full(5, 12288.0, buf.dtype))), (offset, threads)


def test_rows_rewritten_between_steps():
    """New gradient addresses written into table.pointers in place are used by the
    next step (the cached row pointers are the live rows), and a table whose
    pointers array was replaced gets a fresh cache."""
    kind, combo = "float32", "adamw-amsgrad"
    ours, _ = make_tensors(kind, (100, 40000, 3), seed=5)
    ref = copy_rows(ours)
    table = table_from_arrays(KIND_F32, ours)
    scalars, _, _ = step_args(kind, combo, 3)
    c.step_multi(table, scalars, None, None)
    cache = table.cache["c"]
    new_grads = [np.random.default_rng(i).standard_normal(r[0].size).astype(np.float32)
                 for i, r in enumerate(ours)]  # fmt: skip
    table.owners.extend(new_grads)
    table.pointers[GRAD] = [address(g) for g in new_grads]
    c.step_multi(table, scalars, None, None)
    assert table.cache["c"] is cache
    for row, g in zip(ref, new_grads, strict=True):
        reference.step(*row, scalars[0])
        row[1] = g.copy()  # what the second step read (unscale is off: not written)
        reference.step(*row, scalars[0])
    assert_rows_equal([[r[0], r[2], r[3], r[4]] for r in ours],
                      [[r[0], r[2], r[3], r[4]] for r in ref])  # fmt: skip
    table.pointers = table.pointers.copy()
    c.step_multi(table, scalars, None, None)
    assert table.cache["c"] is not cache


def test_empty_table_is_a_no_op():
    table = table_from_arrays(KIND_F32, [])
    c.step_multi(table, scalars_for("plain", STATE_SAME_DTYPE), None, None)
    rows, _ = make_tensors("bf16-stochastic", (0, 0), amsgrad=False)
    scalars, _, keys = step_args("bf16-stochastic", "plain", 2)
    c.step_multi(table_from_arrays(KIND_BF16, rows), scalars, None, keys)


def test_step_multi_raises_on_bad_input():
    rows, _ = make_tensors("float32", (8, 8), amsgrad=False)
    scalars = scalars_for("plain", STATE_SAME_DTYPE, (3, 4))
    table = table_from_arrays(KIND_F32, rows)
    before = copy_rows(rows)
    with pytest.raises(RuntimeError, match="-7"):  # index past the scalars
        c.step_multi(table, scalars, np.array([0, 2], np.int32), None)
    with pytest.raises(ValueError, match="int32"):
        c.step_multi(table, scalars, np.array([0, 1], np.int64), None)
    with pytest.raises(ValueError, match="int32"):
        c.step_multi(table, scalars, np.array([0], np.int32), None)
    with pytest.raises(RuntimeError, match="-6"):  # bfloat16 scalars for float32 states
        c.step_multi(table, scalars_for("plain", STATE_BF16_NEAREST), None, None)
    bad = table_from_arrays(KIND_F32, [rows[0], [rows[1][0], rows[1][0], *rows[1][2:]]])
    with pytest.raises(RuntimeError, match="-4"):  # param and grad of one tensor overlap
        c.step_multi(bad, scalars, None, None)
    bf = table_from_arrays(KIND_BF16, make_tensors("bf16-stochastic", (8,), amsgrad=False)[0])
    with pytest.raises(ValueError, match="uint32"):
        c.step_multi(bf, scalars_for("plain", STATE_BF16_STOCHASTIC), None,
                     np.array([1], np.int32))  # fmt: skip
    assert_rows_equal(rows, before)


# ---------------------------------------------------------- ISA variants --

ISA_CASES = [
    (kind, layout, combo, steps)
    for kind in KINDS
    for layout in ("uneven", "tiny", "total-large", "split-at-end")
    for combo in ("adamw-amsgrad", "l2-maximize-unscale")
    for steps in ((3,), (2, 7))
]


def _case_digest(backend_step_multi, kind, layout, combo, steps) -> str:
    rows, _ = make_tensors(kind, LAYOUTS[layout], seed=3, amsgrad=COMBOS[combo][2])
    scalars, index, keys = step_args(kind, combo, len(rows), steps, seed=3)
    backend_step_multi(table_from_arrays(KINDS[kind][0], rows), scalars, index, keys)
    h = hashlib.sha256()
    for row in rows:
        for a in row:
            if a is not None:
                h.update(bits(a).tobytes())
    return h.hexdigest()


def _case_name(case) -> str:
    kind, layout, combo, steps = case
    return f"{kind}/{layout}/{combo}/{'-'.join(map(str, steps))}"


def _c_digests_for_subprocess() -> dict:
    """Run in a subprocess with FASTADAM_ISA set: the C digests, on 2 threads."""
    c.set_num_threads(2)
    return {
        "isa": c.isa(),
        "digests": {_case_name(k): _case_digest(c.step_multi, *k) for k in ISA_CASES},
    }


def test_isa_variants_bit_identical(tmp_path):
    """Each variant the CPU supports, forced in a subprocess, gives the reference's bits."""
    expected = {_case_name(k): _case_digest(reference.step_multi, *k) for k in ISA_CASES}
    for isa, result in c_digests_per_isa(__file__, tmp_path).items():
        assert result["isa"] == isa, f"FASTADAM_ISA={isa} ran {result['isa']}"
        bad = [case for case, d in expected.items() if result["digests"][case] != d]
        assert not bad, f"{isa}: {len(bad)} cases differ from the reference, e.g. {bad[:5]}"


# ------------------------------------------------------- threads and fork --


def test_concurrent_python_threads(restore_threads):
    """Python threads step their own tables at once (cffi drops the GIL)."""
    c.set_num_threads(2)
    kind, combo = "bf16-stochastic", "adamw-amsgrad"
    sizes = (30000, 7, 20001)
    states = [make_tensors(kind, sizes, seed=s)[0] for s in range(4)]
    refs = [copy_rows(s) for s in states]
    errors = []

    def work(rows, seed):
        try:
            table = table_from_arrays(KIND_BF16, rows)
            for step in range(1, 11):
                c.step_multi(table, *step_args(kind, combo, len(sizes), (step,), seed))
        except BaseException as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(s, i)) for i, s in enumerate(states)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    for i, ref in enumerate(refs):
        table = table_from_arrays(KIND_BF16, ref)
        for step in range(1, 11):
            reference.step_multi(table, *step_args(kind, combo, len(sizes), (step,), i))
    for s, ref in zip(states, refs, strict=True):
        assert_rows_equal(s, ref)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork()")
def test_fork_after_parallel_multi_step(tmp_path):
    """A child forked after a parallel multi step runs its own (serially) and exits;
    the parent's threads still work afterwards."""
    script = load_test_module(__file__) + textwrap.dedent(
        """
        import os, signal, sys
        c, ref_mod = mod.c, mod.reference
        kind, combo, sizes = "float32", "all", (1 << 19, 3, 1 << 19)
        args = mod.step_args(kind, combo, len(sizes), (2, 5))

        def multi(rows):
            c.step_multi(mod.table_from_arrays(mod.KIND_F32, rows), *args)

        c.set_num_threads(2)
        multi(mod.make_tensors(kind, sizes, seed=1)[0])  # the parent enters a parallel region
        expected = mod.make_tensors(kind, sizes, seed=2)[0]
        child_rows = mod.copy_rows(expected)
        ref_mod.step_multi(mod.table_from_arrays(mod.KIND_F32, expected), *args)
        pid = os.fork()
        if pid == 0:
            signal.alarm(30)  # a hung child dies (SIGALRM) instead of lingering
            try:
                multi(child_rows)
                mod.assert_rows_equal(child_rows, expected)
                code = 0
            except BaseException:
                code = 3
            os._exit(code)
        _, status = os.waitpid(pid, 0)
        again = mod.make_tensors(kind, sizes, seed=2)[0]
        multi(again)
        mod.assert_rows_equal(again, expected)
        sys.exit(os.waitstatus_to_exitcode(status))
        """
    )
    proc = subprocess.run(
        [sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=180
    )
    assert proc.returncode == 0, f"exit {proc.returncode}: {proc.stderr}"


# ------------------------------------------------------------------ raw ABI --


class _Raw:
    """Raw-ABI arguments over three tensors of one kind: pointer tables, sizes,
    two scalars structs (0: amsgrad, 1: not), a scalar_index and keys."""

    def __init__(self, kind: str):
        self.kind = kind
        table_kind, _, _, rounding = KINDS[kind]
        self.fn = {KIND_F32: lib.fa_adam_multi_f32, KIND_F64: lib.fa_adam_multi_f64,
                   KIND_BF16: lib.fa_adam_multi_f32_bf16}[table_kind]  # fmt: skip
        self.rows, _ = make_tensors(kind, (8, 5, 8), seed=4)
        self.before = copy_rows(self.rows)
        self.tables = [ffi.new("void *[]", [ffi.from_buffer(row[r]) for row in self.rows])
                       for r in range(5)]  # fmt: skip
        self.n = ffi.new("int64_t[]", [8, 5, 8])
        wd, dec, _, mx, gs = COMBOS["all"]
        self.sc = ffi.new("fa_adam_scalars[]", [
            compute_scalars(3, 1e-2, 0.9, 0.999, 1e-8, wd, dec, ams, mx, False, gs, rounding, 1)
            for ams in (True, False)
        ])  # fmt: skip
        self.index = ffi.new("int32_t[]", [1, 0, 1])
        self.keys = ffi.new("uint32_t[]", [7, 8, 9])

    def call(self, count=3, tables=None, n=None, sc=None, n_scalars=2, index=None):
        t = self.tables if tables is None else tables
        args = [count, *t, self.n if n is None else n, self.sc if sc is None else sc, n_scalars,
                self.index if index is None else index]  # fmt: skip
        if self.fn is lib.fa_adam_multi_f32_bf16:
            args.append(self.keys)
        return self.fn(*args)

    def assert_untouched(self):
        assert_rows_equal(self.rows, self.before)


@pytest.mark.parametrize("kind", ["float32", "float64", "bf16-stochastic"])
def test_abi_rejects_bad_arguments(kind):
    raw = _Raw(kind)
    NULL = ffi.NULL
    assert raw.call(count=-1) == FA_ERR_SIZE
    for r in range(4):  # each required table NULL, also for count == 0
        tables = list(raw.tables)
        tables[r] = NULL
        assert raw.call(tables=tables) == FA_ERR_NULL
        assert raw.call(count=0, tables=tables) == FA_ERR_NULL
    assert raw.call(n=NULL) == FA_ERR_NULL
    assert raw.call(sc=NULL) == FA_ERR_NULL
    for bad in (-1, 2, -(2**31)):
        raw.index[2] = bad
        assert raw.call() == FA_ERR_INDEX
    raw.index[2] = 1
    assert raw.call(n_scalars=1) == FA_ERR_INDEX  # tensor 1 asks for scalars[1]
    assert raw.call(n_scalars=0, index=NULL) == FA_ERR_INDEX
    for r in range(4):  # one array of the last tensor NULL
        saved = raw.tables[r][2]
        raw.tables[r][2] = NULL
        assert raw.call() == FA_ERR_NULL
        raw.tables[r][2] = saved
    for bad in (-1, 1 << 62, (1 << 63) - 1):
        raw.n[2] = bad
        assert raw.call() == FA_ERR_SIZE
    raw.n[2] = 8
    # tensor 1 has amsgrad (scalars 0): no vmax table, or a NULL entry
    assert raw.call(tables=[*raw.tables[:4], NULL]) == FA_ERR_AMSGRAD
    saved = raw.tables[4][1]
    raw.tables[4][1] = NULL
    assert raw.call() == FA_ERR_AMSGRAD
    raw.tables[4][1] = saved
    # param and grad of the last tensor overlap (grad one byte into param)
    saved = raw.tables[1][2]
    raw.tables[1][2] = ffi.cast("char *", raw.tables[0][2]) + 1
    assert raw.call() == FA_ERR_OVERLAP
    raw.tables[1][2] = saved
    # the state_rounding of one struct does not suit the function
    good = raw.sc[1].state_rounding
    raw.sc[1].state_rounding = STATE_SAME_DTYPE if good else STATE_BF16_NEAREST
    assert raw.call() == FA_ERR_ROUNDING
    raw.sc[1].state_rounding = good
    raw.assert_untouched()  # no error wrote anything
    # count == 0: nothing to do, no scalars needed
    assert raw.call(count=0, sc=NULL, n_scalars=0) == FA_OK
    raw.assert_untouched()
    # no tensor with amsgrad: the vmax table may be NULL
    raw.index[1] = 1
    assert raw.call(tables=[*raw.tables[:4], NULL]) == FA_OK


def test_abi_sum_of_sizes_overflows():
    """16 tensors of 2^59 elements: each fits the address space, their sum does not.
    The addresses (2^62 apart per array, all tensors alike) are never accessed."""
    count = 16
    good = scalars_for("plain", STATE_SAME_DTYPE)[0]
    sc = ffi.new("fa_adam_scalars[]", [good, good._replace(state_rounding=STATE_BF16_NEAREST)])
    tables = [ffi.new("void *[]", [ffi.cast("void *", (r << 62) + 4096)] * count)
              for r in range(5)]  # fmt: skip
    n = ffi.new("int64_t[]", [1 << 59] * count)
    index = ffi.new("int32_t[]", count)
    assert lib.fa_adam_multi_f32(count, *tables, n, sc, 2, index) == FA_ERR_SIZE
    # The control: the last tensor alone passes its own size checks (its
    # scalars' rounding is what fails), so the error above was the sum's.
    index[count - 1] = 1
    assert lib.fa_adam_multi_f32(count, *tables, n, sc, 2, index) == FA_ERR_ROUNDING


def test_strerror_index():
    assert b"scalar_index" in ffi.string(lib.fa_strerror(FA_ERR_INDEX))
