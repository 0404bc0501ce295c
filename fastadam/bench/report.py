"""The size sweep's report: the header, the tables, and the targets under ``--targets``."""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from typing import Any

from .measure import Sweep
from .roofline import Roofline
from .steps import (
    BF16_STATES,
    F32_CAST,
    MASTER_BF16,
    NP_ADD,
    PER_CALL_N,
    PER_TENSOR_K,
    Q8_STATES,
    bytes_per_element,
    state_bytes_per_element,
)
from .tables import _fmt_ratio, format_n, format_seconds, render_table
from .targets import (
    TARGET_BF16_TIME_RATIO,
    TARGET_BF16_TIME_RATIO_AVX2,
    TARGET_PER_CALL_RATIO,
    TARGET_PER_TENSOR_RATIO,
    _ratio_verdict,
    evaluate_targets,
    targets_table,
    vector_isas,
)
from .timing import INTERLEAVE_ROUNDS


def header_lines(info: dict[str, Any], roofline: Roofline, with_targets: bool = True) -> list[str]:
    """The header printed above the tables (``with_targets``: the roofline's bf16/float32
    time ratio names the target it bounds)."""
    layer = info["numba_threading_layer"] or "not started"
    lines = [
        f"machine: {info['cpu']}, {info['cores']} cores ({info['usable_cores']} usable), "
        f"{info['platform']}",
        f"threads: {info['threads']} (fastadam, "
        + ("roofline kernel " if roofline else "")
        + "and torch alike)",
        f"versions: fastadam {info['fastadam']}, python {info['python']}, numpy {info['numpy']}, "
        f"numba {info['numba']} (threading layer {layer}), "
        f"torch {info['torch'] or 'not installed'}",
        f"kernel variants: C {info['c_isa'] or 'n/a'}"
        + (" (FASTADAM_ISA)" if os.environ.get("FASTADAM_ISA") else "")
        + f", Numba target {info['numba_target']}; auto: {info['auto']}",
    ]
    busy = info.get("others_busy_cores")
    if busy is not None:
        lines.append(f"other processes: {busy:.2f} cores busy on average during the run")
    for name, why in info["backends_unavailable"].items():
        lines.append(f"unavailable: {name}: {why}")
    for dt, per_size in roofline.items():
        at = ", ".join(f"{gbps:.1f} GB/s at n={format_n(n)}" for n, gbps in per_size.items())
        lines.append(
            f"roofline {dt}: {at} ({bytes_per_element(dt):g} B/element moved by "
            + (
                "p+=g; m^=1; v^=1 on bf16 bits" if dt == BF16_STATES
                else "p+=g; m^=1; v^=1 on uint8 codes" if dt == Q8_STATES
                else "p+=g; m+=g; v+=g*g, and the bfloat16 copy of p written" if dt == MASTER_BF16
                else "p+=g; m+=g; v+=g*g, then a pass copying p to bfloat16" if dt == F32_CAST
                else "p+=g; m+=g; v+=g*g"
            )
            + " in Numba, best of runs; optimizer state "
            + f"{state_bytes_per_element(dt):.3g} B/element)"
        )  # fmt: skip
    # What the memory gives the bf16-state target on this machine: the two roofline
    # kernels' own time ratio, 20 vs 28 B/element at their bandwidths.
    both = sorted(roofline.get("float32", {}).keys() & roofline.get(BF16_STATES, {}).keys())
    for n in both:
        ratio = (bytes_per_element(BF16_STATES) / roofline[BF16_STATES][n]) / (
            bytes_per_element("float32") / roofline["float32"][n]
        )
        target = (
            f"; compare the bf16-state target, <= {TARGET_BF16_TIME_RATIO:g} "
            f"(<= {TARGET_BF16_TIME_RATIO_AVX2:g} with AVX2)"
        )
        lines.append(
            f"roofline time ratio bf16/float32: {ratio:.2f} at n={format_n(n)} "
            f"(the roofline kernels' own{target if with_targets else ''})"
        )
    q8_both = sorted(roofline.get("float32", {}).keys() & roofline.get(Q8_STATES, {}).keys())
    for n in q8_both:
        ratio = (bytes_per_element(Q8_STATES) / roofline[Q8_STATES][n]) / (
            bytes_per_element("float32") / roofline["float32"][n]
        )
        lines.append(
            f"roofline time ratio q8/float32: {ratio:.2f} at n={format_n(n)} "
            "(the roofline kernels' own; the 8-bit target is <= 0.65)"
        )
    return lines


def sweep_table(records: list[dict[str, Any]], markdown: bool) -> str:
    """The main table: one row per (dtype, size, backend)."""
    with_torch = any("speedup_vs_torch_fused" in r for r in records)
    with_bnb = any("speedup_vs_bitsandbytes" in r for r in records)
    headers = ["backend", "dtype", "n", "median/step", "GB/s", "roofline", "vs numpy"]
    if with_torch:
        headers.append("vs torch-fused")
    if with_bnb:
        headers.append("vs bitsandbytes")
    rows = []
    for r in records:
        frac = r["roofline_fraction"]
        row = [
            r["backend"],
            r["dtype"],
            format_n(r["n"]),
            format_seconds(r["median_s"]),
            f"{r['gbps']:.1f}",
            "-" if frac is None else f"{frac * 100:.0f}%",
            _fmt_ratio(r["speedup_vs_numpy"]),
        ]
        if with_torch:
            row.append(_fmt_ratio(r.get("speedup_vs_torch_fused")))
        if with_bnb:
            row.append(_fmt_ratio(r.get("speedup_vs_bitsandbytes")))
        rows.append(row)
    right = [False, False] + [True] * (len(headers) - 2)
    return render_table(headers, rows, markdown, right)


def _table(
    headers: list[str],
    rows: list[list[str]],
    markdown: bool,
    right: Sequence[bool],
    with_targets: bool,
) -> str:
    """render_table, less the last two columns (a target and its verdict) unless
    ``with_targets``."""
    keep = len(headers) if with_targets else len(headers) - 2
    return render_table(headers[:keep], [r[:keep] for r in rows], markdown, right[:keep])


def per_call_table(records: list[dict[str, Any]], markdown: bool, with_targets: bool = True) -> str:
    """Per-call cost of a small step in µs and as a multiple of np.add, with the target."""
    add_us = records[0]["np_add_median_s"] * 1e6
    rows = [[NP_ADD, f"{add_us:.2f}", "1.00×", "-", "-"]]
    for r in records:
        rows.append(
            [r["backend"], f"{r['median_s'] * 1e6:.2f}", _fmt_ratio(r["ratio_vs_np_add"])]
            + _ratio_verdict(r, TARGET_PER_CALL_RATIO)
        )
    headers = ["backend", "median µs/call", "× np.add", "target", ""]
    return _table(headers, rows, markdown, [False, True, True, True, False], with_targets)


def per_tensor_table(
    records: list[dict[str, Any]], markdown: bool, with_targets: bool = True
) -> str:
    """A multi-tensor step's cost per tensor beyond the kernel, in µs and × np.add."""
    rows = [
        [
            r["backend"],
            str(r["tensors"]),
            f"{r['median_s'] * 1e6:.1f}",
            f"{r['single_median_s'] * 1e6:.1f}",
            f"{r['per_tensor_s'] * 1e6:.3f}",
            _fmt_ratio(r["ratio_vs_np_add"]),
        ]
        + _ratio_verdict(r, TARGET_PER_TENSOR_RATIO)
        for r in records
    ]
    headers = ["backend", "tensors", "multi µs/step", "single µs/step", "µs/tensor beyond"]
    headers += ["× np.add", "target", ""]
    return _table(headers, rows, markdown, [False] + [True] * 6 + [False], with_targets)


def sweep_report(sweep: Sweep, info: dict[str, Any], markdown: bool, with_targets: bool) -> str:
    """The header and tables of a size sweep; with ``with_targets``, each table's target
    columns and the table of speed targets."""
    md = markdown
    out = []
    for line in header_lines(info, sweep.roofline, with_targets):
        out.append(f"- {line}" if md else line)
    how = "median of timed steps"
    if len(sweep.dtypes) > 1:
        how += f", each backend's dtypes timed in {INTERLEAVE_ROUNDS} alternating rounds"
    moved = ", ".join(f"{bytes_per_element(dt)} B/element {dt}" for dt in sweep.dtypes)
    out += ["", f"Adam step ({how}; GB/s counts the bytes a step moves: {moved}):", ""]
    out.append(sweep_table(sweep.records, md))
    if sweep.per_call:
        out += [
            "",
            f"Per-call cost, {PER_CALL_N}-element float32 step (validation included), "
            f"timed in alternating rounds beside {NP_ADD}(p, g, out=p) on {PER_CALL_N} "
            "float32 elements:",
            "",
            per_call_table(sweep.per_call, md, with_targets),
        ]
    if sweep.per_tensor:
        out += [
            "",
            f"Per-tensor cost of a multi-tensor step: MultiTensorPlan over {PER_TENSOR_K} "
            f"tensors of {PER_CALL_N} elements (multi) against one adam_step over "
            f"{format_n(PER_TENSOR_K * PER_CALL_N)} elements (single); µs/tensor beyond = "
            f"(multi - single) / {PER_TENSOR_K}:",
            "",
            per_tensor_table(sweep.per_tensor, md, with_targets),
        ]
    targets = []
    if with_targets:
        targets = evaluate_targets(
            sweep.records, sweep.per_call, sweep.per_tensor, vector_isas(info)
        )
    if targets:
        out += ["", "Speed targets:", "", targets_table(targets, md)]
    return "\n".join(out)


def warn_if_roofline_beaten(sweep: Sweep) -> None:
    """Warn on stderr of each record faster than the roofline measured at its size."""
    # The roofline must bound every backend at the size it was measured at; if
    # one beats it, the machine was busy during the roofline run (or the kernel
    # is not at the memory limit) and every fraction above is suspect.
    for r in sweep.records:
        gbps = sweep.roofline[r["dtype"]].get(r["n"])
        if gbps is not None and r["gbps"] > 1.05 * gbps:
            print(
                f"warning: {r['backend']} ({r['gbps']:.1f} GB/s) beat the {r['dtype']} roofline "
                f"({gbps:.1f} GB/s) at n={format_n(r['n'])}: was the machine busy? "
                "rerun to confirm",
                file=sys.stderr,
            )
