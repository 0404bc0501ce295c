"""llvm-mca's estimate, in cycles per element, of a C kernel function's hot loop.

    python bench/c_loop_mca.py OBJECT FUNCTION [FUNCTION ...] [--mcpu haswell,znver1,...]

OBJECT is one ISA variant of ``csrc/fastadam_kernel.c`` compiled with the library's
flags, e.g. the avx2 one::

    gcc -std=c11 -O3 -fno-fast-math -ffp-contract=off -fno-math-errno -fopenmp -Icsrc \\
        -DFA_VARIANT=avx2 -mavx2 -mfma -c csrc/fastadam_kernel.c -o kernel_avx2.o
    python bench/c_loop_mca.py kernel_avx2.o adam_0_f32 adam_2_f32 fa_lp_master_bf16

The hot loop is taken from ``objdump -d``: of the function's loops (backward branches)
with no inner loop doing arithmetic, the one whose body has the most square roots (one
per element: ``vsqrtps`` counts 8, 16 or 4 elements, ``vsqrtss`` one), the one with
fewer divides (div_bc2's reciprocal) among equals. Its compare and branches are dropped
and the rest is fed to ``llvm-mca -mcpu=CPU -iterations=200``; the figure is total
cycles / 200 / elements.
The body may include the block loop's bookkeeping (prefetches, a guard's other path),
so read the figures as comparisons between builds, not as exact costs.

``--loops`` lists every innermost loop of each function instead, with llvm-mca's
cycles per iteration: for functions whose hot part is more than one loop, such as an
8-bit block (``fa_adam_q8_0``: the update pass holding ``vsqrtps``, the requantization
holding the packs; the loop the rule above picks there is the scalar-tail block's,
auto-vectorized 64 elements wide).
"""

from __future__ import annotations

import argparse
import re
import subprocess

_INSN = re.compile(r"\s+([0-9a-f]+):\s+(.*)")
_BRANCH = re.compile(r"(j\w+)\s+([0-9a-f]+)")


def _function(obj: str, name: str) -> list[tuple[int, str]]:
    dis = subprocess.run(
        ["objdump", "-d", "--no-show-raw-insn", obj], capture_output=True, text=True, check=True
    ).stdout
    out: list[tuple[int, str]] = []
    inside = False
    for line in dis.splitlines():
        if line.endswith(f"<{name}>:"):
            inside = True
        elif inside and not line.strip():
            break
        elif inside and (m := _INSN.match(line)):
            out.append((int(m[1], 16), m[2].split("#")[0].strip()))
    if not out:
        raise SystemExit(f"{name}: not in {obj}")
    return out


def _elements(body: list[str]) -> int:
    n = 0
    for ins in body:
        if ins.startswith("vsqrtps"):
            n += 8 if "ymm" in ins else 16 if "zmm" in ins else 4
        elif ins.startswith(("vsqrtss", "sqrtss")):
            n += 1
    return n


def _loops(code: list[tuple[int, str]]) -> list[tuple[int, int]]:
    """(first, last) indices into ``code`` of each loop: a backward branch's target and
    the branch itself."""
    where = {a: k for k, (a, _) in enumerate(code)}
    return [
        (where[int(m[2], 16)], k)
        for k, (a, ins) in enumerate(code)
        if (m := _BRANCH.match(ins)) and int(m[2], 16) < a and int(m[2], 16) in where
    ]


def hot_loop(obj: str, name: str) -> tuple[list[str], int]:
    """(the instructions of the hot loop, elements per iteration)."""
    code = _function(obj, name)
    back = _loops(code)

    def body(start: int, end: int) -> list[str]:
        return [i for _, i in code[start:end]]

    best: tuple[list[str], int, int] = ([], 0, 0)
    for start, end in back:
        if any(
            start <= s and e < end and _elements(body(s, e))
            for s, e in back
            if (s, e) != (start, end)
        ):
            continue  # an outer loop: the inner one with the arithmetic is the hot one
        b = body(start, end)
        # of equal loops, the one through div_bc2's reciprocal (fewer divides):
        # what runs for fastadam's own scalars
        divides = sum(1 for i in b if i.startswith(("vdivp", "vdivs", "divs")))
        if (_elements(b), -divides) > (best[1], best[2]):
            best = (b, _elements(b), -divides)
    return best[0], best[1]


def cycles_per_element(body: list[str], elements: int, cpu: str) -> float:
    src = "\n".join(i for i in body if not i.startswith(("cmp", "j")))
    out = subprocess.run(
        ["llvm-mca", f"-mcpu={cpu}", "-iterations=200"], input=src, capture_output=True,
        text=True, check=True,
    ).stdout  # fmt: skip
    total = re.search(r"Total Cycles:\s+(\d+)", out)
    assert total, out[-2000:]
    return int(total[1]) / 200 / elements


def innermost_loops(obj: str, name: str) -> list[list[str]]:
    """The bodies of the function's loops that hold no other loop, in address order."""
    code = _function(obj, name)
    back = _loops(code)

    def holds_another(s: int, e: int) -> bool:
        return any(s <= s2 and e2 < e for s2, e2 in back if (s2, e2) != (s, e))

    inner = [(s, e) for s, e in back if not holds_another(s, e)]
    return [[i for _, i in code[s:e]] for s, e in sorted(inner)]


def _cycles_per_iteration(body: list[str], cpu: str) -> float:
    return cycles_per_element(body, 1, cpu)


#: The instructions --loops names, to tell one loop from another.
_NAMED_OPS = ("vsqrt", "vdiv", "vpack", "vpmov", "vperm")


def list_loops(obj: str, names: list[str], cpus: list[str]) -> None:
    print("| function | loop | instructions | vector ops | " + " | ".join(cpus) + " |")
    print("| --- | ---: | ---: | --- | " + " | ".join("---:" for _ in cpus) + " |")
    for name in names:
        for k, body in enumerate(innermost_loops(obj, name)):
            if len(body) < 8:
                continue
            ops = sorted({i.split()[0] for i in body if i.startswith(_NAMED_OPS)})
            cells = " | ".join(f"{_cycles_per_iteration(body, cpu):.1f}" for cpu in cpus)
            print(f"| {name} | {k} | {len(body)} | {' '.join(ops)} | {cells} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("object")
    ap.add_argument("functions", nargs="+")
    ap.add_argument("--mcpu", default="haswell,skylake,znver1,znver2,znver3")
    ap.add_argument("--loops", action="store_true",
                    help="list every innermost loop, in cycles per iteration")  # fmt: skip
    args = ap.parse_args()
    cpus = args.mcpu.split(",")
    if args.loops:
        list_loops(args.object, args.functions, cpus)
        return
    print("| function | elements/iteration | " + " | ".join(cpus) + " |")
    print("| --- | ---: | " + " | ".join("---:" for _ in cpus) + " |")
    for name in args.functions:
        body, n = hot_loop(args.object, name)
        cells = " | ".join(f"{cycles_per_element(body, n, cpu):.2f}" for cpu in cpus)
        print(f"| {name} | {n} | {cells} |")


if __name__ == "__main__":
    main()
