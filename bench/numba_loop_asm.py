"""The Numba multi-tensor update loops' hot loop, as assembly llvm-mca can read.

    python bench/numba_loop_asm.py OUT_DIR            # for this CPU (Numba's target)
    env $(python bench/compare_revisions.py --print-numba-avx2-env) \\
        python bench/numba_loop_asm.py OUT_DIR        # compiled for an AVX2 CPU
    llvm-mca -mcpu=znver1 -iterations=100 OUT_DIR/float32.s

Compiles the serial multi-tensor loop (float32 states, and bfloat16 states with
stochastic rounding; AdamW, no amsgrad, no unscale) and writes, per kind, the
smallest loop of the function that holds a vector square root: the block loop
(bfloat16: one iteration is one 32-element block, unrolled) or the vector loop
(float32: one iteration is one vector). For 8-bit states (``q8.s``: Adam, the
8-bit blocks' serial loop) it is the smallest loop that also writes codes
(``vpackuswb``): on x86 with AVX2 one update of 32 or 64 elements with the
previous block's codes for them, the path every block but a share's first
takes. Labels and branches are dropped, so llvm-mca sees one straight pass;
the elements one pass covers are printed.
"""

from __future__ import annotations

import os
import re
import sys
import tempfile
from pathlib import Path

# Numba shows no assembly for loops it loads from its on-disk cache: compile afresh.
os.environ["NUMBA_CACHE_DIR"] = tempfile.mkdtemp(prefix="numba-asm-")

import ml_dtypes  # noqa: E402
import numpy as np  # noqa: E402

from fastadam import _q8  # noqa: E402
from fastadam._scalars import STATE_BF16_STOCHASTIC, STATE_SAME_DTYPE, compute_scalars  # noqa: E402
from fastadam._table import KIND_BF16, KIND_F32, table_from_arrays  # noqa: E402
from fastadam.backends import _numba_q8, numba_  # noqa: E402

LABEL = re.compile(r"^(\.LBB\d+_\d+):")
BRANCH = re.compile(r"^\s+j[a-z]+\s+(\.LBB\d+_\d+)")
SQRT = re.compile(r"\bvsqrtps\s+%([xyz])mm")


def _lanes(lines: list[str]) -> int:
    """Elements the vector square roots of ``lines`` cover (xmm 4, ymm 8, zmm 16)."""
    width = {"x": 4, "y": 8, "z": 16}
    return sum(width[m.group(1)] for x in lines if (m := SQRT.search(x)))


def hot_loop(asm: str, needs: str = "") -> list[str]:
    """The innermost loop (a span from a label to a branch back to it, holding no
    other such span with a square root) whose square roots cover the most elements:
    the vector loop, not its epilogue; the unrolled block loop, not the tail's.
    ``needs``: only spans holding that mnemonic and closed by an unconditional
    ``jmp`` count: the 8-bit update's loop with its codes, whose spans closed by
    a conditional branch are the paths that skip them."""
    lines = asm.splitlines()
    where = {m.group(1): i for i, line in enumerate(lines) if (m := LABEL.match(line))}
    spans = []
    for end, line in enumerate(lines):
        m = BRANCH.match(line)
        start = where.get(m.group(1)) if m else None
        if start is not None and start < end and _lanes(lines[start:end]):
            if not needs or (
                line.split()[0] == "jmp" and any(needs in x for x in lines[start:end])
            ):
                spans.append((start, end))
    innermost = [
        (a, b) for a, b in spans
        if not any(a <= c and d <= b and (c, d) != (a, b) for c, d in spans)
    ]  # fmt: skip
    if not innermost:
        raise SystemExit("no loop with a vector square root found")
    start, end = max(innermost, key=lambda ab: (_lanes(lines[ab[0] : ab[1]]), ab[0] - ab[1]))
    return _straight(lines[start : end + 1])


def _straight(span: list[str]) -> list[str]:
    """``span`` without labels, branches and directives: one straight pass."""
    return [
        x for x in span
        if not (LABEL.match(x) or BRANCH.match(x) or x.strip().startswith((".", "#")))
    ]  # fmt: skip


def main() -> int:
    out = Path(sys.argv[1])
    out.mkdir(parents=True, exist_ok=True)
    for name, kind, dtype, rounding in (
        ("float32", KIND_F32, np.float32, STATE_SAME_DTYPE),
        ("bf16", KIND_BF16, ml_dtypes.bfloat16, STATE_BF16_STOCHASTIC),
    ):
        rows = [
            (np.ones(100, np.float32), np.ones(100, np.float32), np.ones(100, dtype),
             np.ones(100, dtype), None)
            for _ in range(3)
        ]  # fmt: skip
        table = table_from_arrays(kind, rows)
        sc = compute_scalars(3, 1e-3, 0.9, 0.999, 1e-8, 0.01, True, False, False, False, None,
                             rounding, 7)  # fmt: skip
        numba_.step_multi(table, (sc,), None, None)
        serial = table.cache[numba_.NAME].step[3]  # (scalars, consts, keys, serial, ...)
        asm = next(iter(serial.inspect_asm().values()))
        body = hot_loop(asm)
        _write(out, name, body)
    _write(out, "q8", hot_loop(_q8_asm(), needs="vpackuswb"))
    return 0


def _q8_asm() -> str:
    """The assembly of the 8-bit blocks' serial loop (Adam, 2^12 elements: serial)."""
    n = 4096
    p, g = np.ones(n, np.float32), np.ones(n, np.float32)
    sc = _q8.fold(compute_scalars(3, 1e-3, 0.9, 0.999, 1e-8, 0.0, False, False, False, False,
                                  None))  # fmt: skip
    _numba_q8.step_q8(p, g, *_q8.zeros_state(n), sc)
    serial = _numba_q8._loops(*_numba_q8._plan((sc,))[1])[0]
    return next(iter(serial.inspect_asm().values()))


def _write(out: Path, name: str, body: list[str]) -> None:
    (out / f"{name}.s").write_text("\n".join(body) + "\n")
    print(f"{name}: {len(body)} instructions, {_lanes(body)} elements per pass "
          f"-> {out / (name + '.s')}")  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
