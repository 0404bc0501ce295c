"""The size sweep's measurements: the roofline per dtype, each backend at each
size, the per-call and per-tensor costs, as records (one dict a measurement)."""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from .machine import _cpu_seconds
from .roofline import Roofline, measure_roofline, roofline_for
from .steps import (
    BF16_STATES,
    BNB,
    F32_CAST,
    MASTER_BF16,
    NP_ADD,
    PER_CALL_N,
    PER_TENSOR_K,
    Q8_STATES,
    TORCH_BACKENDS,
    _multi_step,
    _np_add_step,
    bytes_per_element,
    make_state,
    make_step,
)
from .tables import format_n
from .targets import PER_CALL_TARGET_BACKENDS
from .timing import time_interleaved


def _record(
    kind: str,
    backend: str,
    n: int,
    dtype: str,
    median: float,
    repeats: int,
    threads: int,
    roofline_gbps: float | None,
) -> dict[str, Any]:
    gbps = bytes_per_element(dtype) * n / median / 1e9
    return {
        "kind": kind,
        "backend": backend,
        "n": n,
        "dtype": dtype,
        "median_s": median,
        "repeats": repeats,
        "gbps": gbps,
        "roofline_gbps": roofline_gbps,
        "roofline_fraction": None if roofline_gbps is None else gbps / roofline_gbps,
        "speedup_vs_numpy": None,
        "threads": threads,
    }


def add_speedups(records: list[dict[str, Any]]) -> None:
    """Fill ``speedup_vs_numpy`` and ``speedup_vs_torch_fused`` from records of the same size."""
    by_key = {(r["kind"], r["backend"], r["n"], r["dtype"]): r for r in records}
    for r in records:
        key = (r["kind"], r["n"], r["dtype"])
        ref = by_key.get((key[0], "numpy", *key[1:]))
        if ref is not None:
            r["speedup_vs_numpy"] = ref["median_s"] / r["median_s"]
        tf = by_key.get((key[0], "torch-fused", *key[1:]))
        if tf is not None:
            r["speedup_vs_torch_fused"] = tf["median_s"] / r["median_s"]
        bnb = by_key.get((key[0], BNB, *key[1:]))
        if bnb is not None:
            r["speedup_vs_bitsandbytes"] = bnb["median_s"] / r["median_s"]


def measure_per_call(
    backends: Sequence[str],
    threads: int,
    roofline_gbps: float | None,
    *,
    min_time: float,
    repeat: int | None,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(per-call records, per-tensor records), all timed in one set of alternating
    rounds beside ``np.add(p, g, out=p)``.

    Per call: each backend's PER_CALL_N-element float32 step. Per tensor (c and
    numba): a MultiTensorPlan step over PER_TENSOR_K tensors of PER_CALL_N
    elements against one adam_step over PER_TENSOR_K * PER_CALL_N elements, the
    difference divided by PER_TENSOR_K: what each tensor costs beyond the kernel's
    time.
    """
    state = make_state(PER_CALL_N, "float32")
    fns = {NP_ADD: _np_add_step(PER_CALL_N)}
    for b in backends:
        fns[b] = make_step(b, state)
    multi = [b for b in backends if b in PER_CALL_TARGET_BACKENDS]
    n_multi = PER_TENSOR_K * PER_CALL_N
    for b in multi:
        fns[f"{b} multi"] = _multi_step(b, PER_TENSOR_K, PER_CALL_N)
        fns[f"{b} single"] = make_step(b, make_state(n_multi, "float32"))
    timed = time_interleaved(fns, min_time=min_time, repeat=repeat)
    add_s = timed[NP_ADD][0]
    per_call = []
    for b in backends:
        median, reps = timed[b]
        r = _record("per_call", b, PER_CALL_N, "float32", median, reps, threads, roofline_gbps)
        r.update(np_add_median_s=add_s, ratio_vs_np_add=median / add_s)
        per_call.append(r)
    per_tensor = []
    for b in multi:
        t_multi, reps = timed[f"{b} multi"]
        t_single = timed[f"{b} single"][0]
        beyond = (t_multi - t_single) / PER_TENSOR_K
        r = _record("per_tensor", b, n_multi, "float32", t_multi, reps, threads, roofline_gbps)
        r.update(
            tensors=PER_TENSOR_K,
            single_median_s=t_single,
            per_tensor_s=beyond,
            np_add_median_s=add_s,
            ratio_vs_np_add=beyond / add_s,
        )
        per_tensor.append(r)
    return per_call, per_tensor


@dataclass
class Sweep:
    """What a size sweep measured, in the order the tables show it."""

    dtypes: list[str]
    threads: int
    roofline: Roofline
    records: list[dict[str, Any]]
    per_call: list[dict[str, Any]]
    per_tensor: list[dict[str, Any]]
    #: _cpu_seconds() before the run, and the run's wall-clock seconds.
    cpu_before: tuple[float, float] | None
    wall: float


#: Kinds of step torch has no Adam for (float32 params with bfloat16 or 8-bit
#: states; the master-weights pair of issue 17).
_NOT_TORCH = (BF16_STATES, Q8_STATES, MASTER_BF16, F32_CAST)


def measure_sweep(
    backends: list[str],
    dtypes: list[str],
    sizes: list[int],
    threads: int,
    *,
    per_call: bool,
    roofline_per_size: bool,
    no_progress: bool,
    min_time: float,
    repeat: int | None,
) -> Sweep:
    """The roofline of each dtype, then every backend at every size (a backend's
    dtypes of one size timed in alternating rounds), then the per-call costs;
    a progress bar on stderr unless ``no_progress``."""
    # torch has no float32-param/bfloat16-state Adam to compare with
    # (nor for float64; bitsandbytes has only the 8-bit one)
    backends_for = {
        dt: [
            b for b in backends
            if not (dt in _NOT_TORCH and b in TORCH_BACKENDS) and (b != BNB or dt == Q8_STATES)
        ]
        for dt in dtypes
    }  # fmt: skip

    from tqdm import tqdm

    cpu_before = _cpu_seconds()
    wall_before = time.perf_counter()
    roof_sizes = sizes if roofline_per_size else [max(sizes)]
    total = sum(len(roof_sizes) + len(sizes) * len(backends_for[dt]) for dt in dtypes)
    total += 1 if per_call else 0
    bar = tqdm(
        total=total,
        file=sys.stderr,
        unit="run",
        disable=True if no_progress else None,
        leave=False,
        dynamic_ncols=True,
    )
    roofline: Roofline = {}
    records: list[dict[str, Any]] = []
    per_call_records: list[dict[str, Any]] = []
    per_tensor_records: list[dict[str, Any]] = []
    try:
        for dt in dtypes:
            roofline[dt] = {}
            for n in reversed(roof_sizes):  # largest first: the one that always counts
                bar.set_description(f"roofline {dt} {format_n(n)}")
                roofline[dt][n] = measure_roofline(n, dt, threads, min_time=min_time, repeat=repeat)
                bar.update()
            roofline[dt] = dict(sorted(roofline[dt].items()))
        for n in sizes:
            states = {dt: make_state(n, dt) for dt in dtypes}
            for b in backends:
                dts = [dt for dt in dtypes if b in backends_for[dt]]
                bar.set_description(f"{b} {'/'.join(dts)} {format_n(n)}")
                steps = {dt: make_step(b, states[dt]) for dt in dts}
                for dt, (median, reps) in time_interleaved(
                    steps, min_time=min_time, repeat=repeat
                ).items():
                    records.append(
                        _record(
                            "sweep", b, n, dt, median, reps, threads, roofline_for(roofline, dt, n)
                        )
                    )
                bar.update(len(dts))
            del states, steps
        # grouped by dtype, then size, then backend, as the tables show them
        records.sort(key=lambda r: (dtypes.index(r["dtype"]), r["n"], backends.index(r["backend"])))
        if per_call:
            bar.set_description("per call")
            per_call_records, per_tensor_records = measure_per_call(
                backends,
                threads,
                roofline_for(roofline, "float32", max(sizes)),
                min_time=min_time,
                repeat=repeat,
            )
            bar.update()
    finally:
        bar.close()
    wall = time.perf_counter() - wall_before
    add_speedups(records)
    add_speedups(per_call_records)
    add_speedups(per_tensor_records)
    return Sweep(
        dtypes, threads, roofline, records, per_call_records, per_tensor_records, cpu_before, wall
    )
