"""The project's speed targets for the size sweep (``--targets``; see BENCHMARKS.md):
each one the measured records decide, and its table. The ``--model`` mode's are in
:mod:`fastadam.bench_model`."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from .steps import BF16_STATES, NP_ADD, Q8_STATES
from .tables import format_n, render_table

#: Project speed targets (see BENCHMARKS.md).
TARGET_LARGE_N = 1 << 24  # "large": at least this many float32 elements
TARGET_ROOFLINE_FRACTION = 0.90
TARGET_SPEEDUP_VS_NUMPY = 6.0
TARGET_SPEEDUP_VS_TORCH_LARGE = 1.0
TARGET_IN_CACHE = (1 << 16, 1 << 20)  # inclusive range of "in cache" sizes
TARGET_SPEEDUP_VS_TORCH_IN_CACHE = 2.0
#: Per-call cost: one 1,024-element float32 adam_step at most this many times an
#: np.add(p, g, out=p) on the same size, timed side by side (c and numba).
TARGET_PER_CALL_RATIO = 6.0
#: Multi-tensor step over PER_TENSOR_K tensors of PER_CALL_N elements: its time
#: beyond one adam_step over all PER_TENSOR_K * PER_CALL_N elements, per tensor,
#: at most this many times that np.add (c and numba).
TARGET_PER_TENSOR_RATIO = 0.5
#: The backends the per-call targets are set for.
PER_CALL_TARGET_BACKENDS = ("c", "numba")
#: bfloat16 states move 20 instead of 28 B/element: at large sizes a bf16-state step
#: should take at most this fraction of the float32-state step's time.
TARGET_BF16_TIME_RATIO = 0.75
#: The same for a backend whose widest vectors are AVX2 (issue 16: the bfloat16
#: conversions cost more there, against the same bytes).
TARGET_BF16_TIME_RATIO_AVX2 = 0.78
#: 8-bit-state step time / float32-state step time at the memory-bound sizes (issue 18).
TARGET_Q8_TIME_RATIO = 0.65
#: 8-bit-state step against bitsandbytes' 8-bit Adam on the CPU, where installed (issue 18).
TARGET_Q8_SPEEDUP_VS_BNB = 10.0


def _ratio_verdict(r: dict[str, Any], goal: float) -> list[str]:
    """The target and verdict cells of a row measured as a ratio to np.add."""
    if r["backend"] not in PER_CALL_TARGET_BACKENDS:
        return ["-", "-"]
    return [f"<= {goal:g}×", "met" if r["ratio_vs_np_add"] <= goal else "NOT MET"]


def vector_isas(info: dict[str, Any]) -> dict[str, str]:
    """Each fast backend's widest vector ISA, ``"avx512"``, ``"avx2"`` or another name,
    from :func:`fastadam.bench.machine.machine_info`'s ``c_isa`` and ``numba_target``."""
    target = info.get("numba_target") or ""
    numba = "avx512" if "(AVX-512)" in target else "avx2" if "(AVX2)" in target else target
    return {"c": str(info.get("c_isa")), "numba": numba}


def bf16_goal(isa: str | None) -> float:
    """The bf16-state time-ratio target for a backend running ``isa`` (see vector_isas)."""
    return TARGET_BF16_TIME_RATIO_AVX2 if isa == "avx2" else TARGET_BF16_TIME_RATIO


def evaluate_targets(
    records: list[dict[str, Any]],
    per_call: list[dict[str, Any]],
    per_tensor: Sequence[dict[str, Any]] = (),
    isas: dict[str, str] | None = None,
) -> list[dict[str, Any]]:
    """Each speed target that the measured data can decide: what, measured, goal, met.

    ``isas``: each backend's widest vector ISA (:func:`vector_isas`); the bf16-state
    target is looser for AVX2 (:func:`bf16_goal`). Without it, the AVX-512 one.
    """
    isas = isas or {}
    out: list[dict[str, Any]] = []

    def check(r: dict[str, Any], what: str, value: float | None, goal: float, lower: bool) -> None:
        if value is None:
            return
        out.append(
            {
                "backend": r["backend"],
                "n": r["n"],
                "target": what,
                "value": value,
                "goal": goal,
                "lower_is_better": lower,
                "met": value <= goal if lower else value >= goal,
            }
        )

    for r in records:
        if r["backend"] not in ("c", "numba") or r["dtype"] != "float32":
            continue
        if r["n"] >= TARGET_LARGE_N:
            check(
                r, "fraction of roofline", r["roofline_fraction"], TARGET_ROOFLINE_FRACTION, False
            )
            check(r, "speed-up vs numpy", r["speedup_vs_numpy"], TARGET_SPEEDUP_VS_NUMPY, False)
            check(
                r,
                "speed-up vs torch fused",
                r.get("speedup_vs_torch_fused"),
                TARGET_SPEEDUP_VS_TORCH_LARGE,
                False,
            )
        elif TARGET_IN_CACHE[0] <= r["n"] <= TARGET_IN_CACHE[1]:
            check(
                r,
                "speed-up vs torch fused (in cache)",
                r.get("speedup_vs_torch_fused"),
                TARGET_SPEEDUP_VS_TORCH_IN_CACHE,
                False,
            )
    # bf16-state against float32-state steps, at the memory-bound sizes
    by_key = {(r["backend"], r["n"], r["dtype"]): r for r in records}
    for r in records:
        f32 = by_key.get((r["backend"], r["n"], "float32"))
        if r["dtype"] == BF16_STATES and r["backend"] in ("c", "numba") and f32:
            if r["n"] >= TARGET_LARGE_N:
                ratio = r["median_s"] / f32["median_s"]
                goal = bf16_goal(isas.get(r["backend"]))
                check(r, "bf16-state time / float32-state time", ratio, goal, True)
        if r["dtype"] == Q8_STATES and r["backend"] in ("c", "numba") and f32:
            if r["n"] >= TARGET_LARGE_N:
                ratio = r["median_s"] / f32["median_s"]
                check(r, "8-bit-state time / float32-state time", ratio, TARGET_Q8_TIME_RATIO, True)
                check(r, "8-bit-state speed-up vs bitsandbytes", r.get("speedup_vs_bitsandbytes"),
                      TARGET_Q8_SPEEDUP_VS_BNB, False)  # fmt: skip
    for r in per_call:
        if r["backend"] in PER_CALL_TARGET_BACKENDS:
            what = f"{format_n(r['n'])}-element call / {NP_ADD}"
            check(r, what, r["ratio_vs_np_add"], TARGET_PER_CALL_RATIO, True)
    for r in per_tensor:
        if r["backend"] in PER_CALL_TARGET_BACKENDS:
            what = f"per-tensor cost beyond the kernel ({r['tensors']} tensors) / {NP_ADD}"
            check(r, what, r["ratio_vs_np_add"], TARGET_PER_TENSOR_RATIO, True)
    return out


def targets_table(targets: list[dict[str, Any]], markdown: bool) -> str:
    rows = [
        [
            t["backend"],
            format_n(t["n"]),
            t["target"],
            f"{t['value']:.2f}",
            ("<= " if t["lower_is_better"] else ">= ") + f"{t['goal']:g}",
            "met" if t["met"] else "NOT MET",
        ]
        for t in targets
    ]
    return render_table(
        ["backend", "n", "target", "measured", "goal", ""],
        rows,
        markdown,
        [False, True, False, True, True, False],
    )
