"""The Numba backend's multi-tensor step against the reference, bit for bit.

``numba_.step_multi`` updates every tensor of a :class:`~fastadam._table.TensorTable`
in one launch, splitting the concatenated element range between threads; the
result must be that of ``reference.step_multi`` (each tensor stepped on its own)
whatever the option flags, dtype kind, sizes, per-tensor steps and keys, and
whatever the split. The single-array path, which shares the loop bodies, is
checked against ``reference.step`` too.
"""

from __future__ import annotations

import itertools

import ml_dtypes
import numpy as np
import pytest
from helpers import OPTION_COMBOS, bits, combo_id

import fastadam
from fastadam import config
from fastadam._scalars import (
    STATE_BF16_NEAREST,
    STATE_BF16_STOCHASTIC,
    STATE_SAME_DTYPE,
    compute_scalars,
    rounding_key,
)
from fastadam._table import (
    KIND_BF16,
    KIND_F32,
    KIND_F64,
    KINDS,
    ROLES,
    table_from_arrays,
    view_at,
)
from fastadam.backends import reference

if "numba" not in fastadam.available_backends():
    pytest.skip(
        fastadam.unavailable_reasons().get("numba", "numba unavailable"), allow_module_level=True
    )

from fastadam.backends import _numba_loops, numba_  # noqa: E402 - only where Numba loads

BF16 = np.dtype(ml_dtypes.bfloat16)
ROUNDINGS = {"nearest": STATE_BF16_NEAREST, "stochastic": STATE_BF16_STOCHASTIC}
#: Uneven sizes: empty, single elements, around the 32-element block, larger.
SIZES = (0, 1, 31, 32, 33, 0, 100, 1, 257, 1000)


def _dtypes(kind):
    if kind == KIND_F64:
        return np.float64, np.float64
    return np.float32, (BF16 if kind == KIND_BF16 else np.float32)


def make_rows(kind, sizes, amsgrad, seed=0):
    """Per tensor (param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq or None), mid-training."""
    rng = np.random.default_rng(seed)
    param_dtype, state_dtype = _dtypes(kind)
    rows = []
    for n in sizes:
        p = rng.standard_normal(n).astype(param_dtype)
        g = rng.standard_normal(n).astype(param_dtype)
        m = (rng.standard_normal(n) * 0.1).astype(state_dtype)
        v = (rng.random(n) * 0.01).astype(state_dtype)
        vmax = (rng.random(n) * 0.02).astype(state_dtype) if amsgrad else None
        rows.append((p, g, m, v, vmax))
    return rows


def copy_rows(rows):
    return [tuple(None if a is None else a.copy() for a in row) for row in rows]


def scalars_for(steps, kind, combo, grad_scale=None, eps_hat=False, rounding="stochastic", seed=3):
    """One AdamScalars per step count in ``steps``, all with the same flags."""
    state_rounding = ROUNDINGS[rounding] if kind == KIND_BF16 else STATE_SAME_DTYPE
    hyper = dict(lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, eps_hat=eps_hat,
                 grad_scale=grad_scale, state_rounding=state_rounding, seed=seed)  # fmt: skip
    return tuple(compute_scalars(step, **combo, **hyper) for step in steps)


def assert_rows_identical(actual, expected):
    for t, (row_a, row_e) in enumerate(zip(actual, expected)):
        for name, a, e in zip(ROLES, row_a, row_e):
            if e is None:
                assert a is None
                continue
            differ = np.flatnonzero(bits(a) != bits(e))
            assert differ.size == 0, f"tensor {t} ({a.size} elements), {name}: at {differ[:8]}"


def check_multi(kind, rows, scalars, index=None, keys=None, steps=2):
    """Step copies of ``rows`` with numba_ and the reference ``steps`` times; compare."""
    fast, ref = copy_rows(rows), copy_rows(rows)
    fast_table, ref_table = table_from_arrays(kind, fast), table_from_arrays(kind, ref)
    for _ in range(steps):  # the same table again: what it caches must stay right
        numba_.step_multi(fast_table, scalars, index, keys)
        reference.step_multi(ref_table, scalars, index, keys)
    assert_rows_identical(fast, ref)


def per_tensor(count, n_scalars, seed=0):
    """(index, keys): tensor i uses scalars[index[i]] and rounding key keys[i]."""
    index = (np.arange(count) * 7 % n_scalars).astype(np.int32)
    keys = np.array([rounding_key(seed + i, 5 + i % 3) for i in range(count)], np.uint32)
    return index, keys


@pytest.fixture
def threads():
    """Restores the thread count a test changes."""
    before = fastadam.get_num_threads()
    yield fastadam.set_num_threads
    fastadam.set_num_threads(before)


# --- every option, every kind ----------------------------------------------------------


@pytest.mark.parametrize("combo", OPTION_COMBOS, ids=combo_id)
@pytest.mark.parametrize("kind", KINDS)
def test_every_option_combination_matches_the_reference(kind, combo):
    rows = make_rows(kind, SIZES, combo["amsgrad"], seed=1)
    index, keys = per_tensor(len(SIZES), 3)
    roundings = ROUNDINGS if kind == KIND_BF16 else ["stochastic"]
    for grad_scale, eps_hat, rounding in itertools.product((None, 8.0), (False, True), roundings):
        scalars = scalars_for((1, 4, 1000), kind, combo, grad_scale, eps_hat, rounding)
        # keys only mean something for stochastic rounding; None: each scalars' key
        check_multi(kind, rows, scalars, index, keys if kind == KIND_BF16 else None)
        check_multi(kind, rows, scalars[1:2])


# --- shapes of tables --------------------------------------------------------------------


def _combo(weight_decay, decoupled_weight_decay, amsgrad, maximize):
    return dict(zip(OPTION_COMBOS[0], (weight_decay, decoupled_weight_decay, amsgrad, maximize)))


PLAIN = _combo(0.0, False, False, False)
L2_ALL_ON = _combo(0.1, False, True, True)
ADAMW_AMSGRAD = _combo(0.1, True, True, False)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("sizes", [(1000,), (1,), (33,), (0,), (0, 0, 0), (5, 0)], ids=str)
def test_one_tensor_and_empty_tables(kind, sizes):
    rows = make_rows(kind, sizes, True, seed=2)
    check_multi(kind, rows, scalars_for((3,), kind, ADAMW_AMSGRAD))


@pytest.mark.parametrize("kind", KINDS)
def test_hundreds_of_tiny_tensors(kind):
    sizes = np.random.default_rng(4).integers(1, 51, 300)
    rows = make_rows(kind, sizes, True, seed=3)
    index, keys = per_tensor(len(sizes), 4)
    scalars = scalars_for((1, 2, 9, 77), kind, ADAMW_AMSGRAD, grad_scale=4.0)
    check_multi(kind, rows, scalars, index, keys if kind == KIND_BF16 else None)
    check_multi(kind, rows, scalars[:1], None, None)


@pytest.mark.parametrize("parts", [2, 3, 7, 64])
@pytest.mark.parametrize("kind", KINDS)
def test_any_split_into_shares_tiles_the_range(kind, parts, monkeypatch):
    """The serial loop run with ``parts`` shares (as that many threads would):
    split points inside tensors, at their ends, past them, and empty shares."""
    monkeypatch.setattr(numba_, "_launch", lambda serial, parallel, args, n: serial(*args, parts))
    sizes = (70, 0, 1, 31, 500, 2, 33, 64, 0, 129, 7)
    rows = make_rows(kind, sizes, False, seed=5)
    index, keys = per_tensor(len(sizes), 2)
    scalars = scalars_for((2, 30), kind, PLAIN)
    check_multi(kind, rows, scalars, index, keys if kind == KIND_BF16 else None)


@pytest.mark.parametrize("n_threads", [1, 2])
@pytest.mark.parametrize("kind", KINDS)
def test_past_the_parallel_threshold(kind, n_threads, threads):
    threads(n_threads)
    big = config.PARALLEL_MIN_ELEMENTS
    sizes = (big // 2 + 3, 0, 17, big // 3, 1, big // 4 + 31, 32, 5)
    assert sum(sizes) >= config.PARALLEL_MIN_ELEMENTS
    rows = make_rows(kind, sizes, True, seed=6)
    index, keys = per_tensor(len(sizes), 3)
    scalars = scalars_for((1, 6, 50), kind, ADAMW_AMSGRAD)
    check_multi(kind, rows, scalars, index, keys if kind == KIND_BF16 else None, steps=1)


def test_the_table_cache_follows_the_scalars():
    """What step_multi caches on the table: the zeros index once, the scalars
    table again when the scalars change (a new step), never stale."""
    rows = make_rows(KIND_F32, (10, 40), False)
    ref = copy_rows(rows)
    table, ref_table = table_from_arrays(KIND_F32, rows), table_from_arrays(KIND_F32, ref)
    for step in (1, 1, 2, 3):
        scalars = scalars_for((step,), KIND_F32, PLAIN)
        numba_.step_multi(table, scalars, None, None)
        reference.step_multi(ref_table, scalars, None, None)
        if step == 1:
            zeros = table.cache["numba"].zeros
        assert table.cache["numba"].zeros is zeros
    assert_rows_identical(rows, ref)


# --- the single-array path (the same loop bodies) ---------------------------------------


@pytest.mark.parametrize(
    ("combo", "grad_scale"),
    [(PLAIN, None), (L2_ALL_ON, 2.0), (ADAMW_AMSGRAD, 2.0)],
    ids=["plain", "l2+amsgrad+maximize+unscale", "adamw+amsgrad+unscale"],
)
@pytest.mark.parametrize("kind", KINDS)
def test_single_array_step_matches_the_reference(kind, combo, grad_scale):
    # Past the parallel threshold once: each compiled variant costs seconds, and
    # test_parity and test_bf16 cover this path in depth.
    big = (config.PARALLEL_MIN_ELEMENTS + 37,) if combo is PLAIN else ()
    scalars = scalars_for((7,), kind, combo, grad_scale)[0]
    rows = make_rows(kind, (0, 1, 31, 33, 1000, *big), combo["amsgrad"], seed=7)
    ref = copy_rows(rows)
    for row, ref_row in zip(rows, ref):
        numba_.step(*row, scalars)
        reference.step(*ref_row, scalars)
    assert_rows_identical(rows, ref)


# --- tensors over 2**32 elements ---------------------------------------------------------

_BASE = 1 << 32


def _far_views(arrays, offset):
    """Views whose element ``offset`` is element 0 of each array: the loops can
    index around 2**32 while touching only ``arrays``' memory."""
    views = []
    for a in arrays:
        raw = a.view(f"u{a.itemsize}")
        start = raw.__array_interface__["data"][0] - offset * a.itemsize
        views.append(view_at(start, offset + a.size, raw.dtype).view(a.dtype))
    return views


@pytest.mark.parametrize("amsgrad", [False, True])
def test_bf16_random_bits_change_key_at_each_2_to_the_32_elements(amsgrad, monkeypatch):
    """Elements 2**32 - 64 .. 2**32 + 40 of a tensor: the loops' block keys are
    mix32(key ^ hi32(i)), as the reference's, across the boundary and in a
    partial last block past it (the loop bodies themselves, called directly:
    a real tensor that long would need 80 GiB)."""
    n_here, first = 104, _BASE - 64
    p, g, m, v, vmax = make_rows(KIND_BF16, (n_here,), True, seed=8)[0]
    ref = [a.copy() for a in (p, g, m, v, vmax)]
    sc = scalars_for((5,), KIND_BF16, ADAMW_AMSGRAD | {"amsgrad": amsgrad}, grad_scale=2.0)[0]

    # the reference, its element j being element first + j
    original = reference.random_bits
    monkeypatch.setattr(
        reference, "random_bits", lambda n, key, start=0: original(n, key, start + first)
    )
    reference.step(*ref[:4], ref[4] if amsgrad else None, sc)

    t = np.float32
    consts = tuple(t(x) for x in sc[:9])
    flags = (sc.unscale, sc.maximize, sc.weight_decay != 0, True, False, amsgrad, sc.decay != 1.0)
    fp, fg, fm, fv, fvmax = _far_views((p, g, m.view(np.uint16), v.view(np.uint16),
                                        vmax.view(np.uint16)), first)  # fmt: skip
    n = first + n_here  # the tensor's length: its last block is partial (40 elements)
    _numba_loops._bf16_blocks(fp, fg, fm, fv, fvmax, first // 32, n // 32, sc.rounding_key,
                              consts, flags)  # fmt: skip
    _numba_loops._bf16_tail(fp, fg, fm, fv, fvmax, n, sc.rounding_key, consts, flags)
    for name, a, e in zip(ROLES, (p, g, m, v, vmax), ref):
        if name == "max_exp_avg_sq" and not amsgrad:
            continue
        differ = np.flatnonzero(bits(a) != bits(e))
        assert differ.size == 0, f"{name}: at {differ[:8] + first}"
