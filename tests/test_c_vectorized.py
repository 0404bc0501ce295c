"""The C library's loops are vectorized for AVX2, as GCC's own report says.

Correctness tests cannot see a loop that GCC left scalar: the results are the
same bits, only 4-8x slower. That happened to the low-precision loops twice (a
division through the reciprocal chosen inside a large loop body; a float
operation under a condition, which GCC will not if-convert because it could
trap), so this compiles the avx2 variant of fastadam_kernel.c with the
library's flags (CMakeLists.txt) and reads the vectorizer's report:

* every float32/float64 kernel (``adam_<flags>_<type>``, all 16 flag sets):
  its element loop, with 32-byte vectors;
* every bfloat16-parameter and bfloat16-master-weights loop of
  fastadam_lowp_kernel.h: its element loop in the flag-free and the
  weight-decay instances, each through the reciprocal and dividing (four),
  with 32-byte vectors.

The float16 kinds are not asserted: GCC leaves them scalar in the avx2 and
the avx512 variant alike (its report: "no optab" in the float16 rounding).
x86-64 with GCC only; about 20 s, one compile.
"""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
from collections import Counter
from pathlib import Path

import pytest
from helpers import loop_lines, vectorized_loops

pytestmark = pytest.mark.skipif(
    platform.machine().lower() not in ("x86_64", "amd64"), reason="the avx2 variant is x86-64's"
)

ROOT = Path(__file__).resolve().parents[1]
CSRC = ROOT / "csrc"
IMPL = CSRC / "fastadam_kernel_impl.h"
LOWP = CSRC / "fastadam_lowp_kernel.h"
# CMakeLists.txt's code-generation flags and its avx2 variant's target flags.
CFLAGS = [
    "-std=c11", "-O3", "-fno-fast-math", "-ffp-contract=off", "-fno-math-errno", "-fopenmp",
    f"-I{CSRC}", "-DFA_VARIANT=avx2", "-mavx2", "-mfma",
]  # fmt: skip
VECTOR_BYTES = 32  # a ymm register

#: The low-precision loops that must vectorize: bfloat16 parameters (any moment
#: dtype, either rounding) and float32 master weights with a bfloat16 copy.
LOWP_VECTORIZED = [
    "fa_lp_bf16", "fa_lp_bf16_sr", "fa_lp_bf16_ss", "fa_lp_bf16_sr_ss",
    "fa_lp_bf16_s32", "fa_lp_bf16_s32_sr",
    "fa_lp_master_bf16", "fa_lp_master_bf16_sr", "fa_lp_master_bf16_g", "fa_lp_master_bf16_g_sr",
]  # fmt: skip


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> Path:
    gcc = shutil.which(os.environ.get("CC_FOR_VECTORIZATION", "gcc"))
    if gcc is None:
        pytest.skip("gcc is not installed: the report is GCC's")
    if not (CSRC / "fastadam_kernel.c").is_file():
        pytest.skip(f"the C sources are not here ({CSRC}): not a source checkout")
    tmp = tmp_path_factory.mktemp("vect")
    out = tmp / "vect.txt"
    args = [gcc, *CFLAGS, f"-fdump-tree-vect-optimized={out}", "-c",
            str(CSRC / "fastadam_kernel.c"), "-o", str(tmp / "kernel_avx2.o")]  # fmt: skip
    proc = subprocess.run(args, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def _missing(vectorized: dict, expected: dict) -> dict:
    return {
        name: sorted(want - vectorized.get(name, set()))
        for name, want in expected.items()
        if not want <= vectorized.get(name, set())
    }


def test_float32_and_float64_kernels_vectorized(report):
    (loop,) = loop_lines(IMPL, "#pragma GCC ivdep", 1)
    expected = {
        f"adam_{bits}_{t}": {(IMPL.name, loop, VECTOR_BYTES)}
        for bits in range(16)
        for t in ("f32", "f64")
    }
    vectorized = vectorized_loops(report)
    missing = _missing(vectorized, expected)
    assert not missing, f"not vectorized with {VECTOR_BYTES}-byte vectors: {missing}"


def test_bf16_lowp_loops_vectorized(report):
    # fa_lp_loop's element loop, in both of fa_lp_body's instances (through the
    # reciprocal, and dividing: each vectorized, or the line would be missing
    # from a function whose flags make it one loop)
    (loop,) = loop_lines(LOWP, "the element loop (tests/test_c_vectorized.py", 1)
    # each function's flag-free and weight-decay instances, each both ways
    wanted = 4
    counts = Counter()
    function = None
    for line in report.read_text(errors="replace").splitlines():
        if line.startswith(";; Function "):
            function = line.split()[2].split(".")[0]
        elif f"{LOWP.name}:{loop}:" in line and f"using {VECTOR_BYTES} byte vectors" in line:
            counts[function] += 1
    short = {name: counts[name] for name in LOWP_VECTORIZED if counts[name] < wanted}
    assert not short, (
        f"instances of the low-precision element loop (line {loop}) vectorized with "
        f"{VECTOR_BYTES}-byte vectors, fewer than {wanted}: {short}"
    )
