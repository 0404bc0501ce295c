"""The C kernels' division by ``bias_correction2_sqrt`` through its reciprocal
and one FMA correction (``div_bc2`` in ``csrc/fastadam_kernel_impl.h``) gives
the division's bits.

Builds ``csrc/tests/check_div_bc2.c`` (which includes the kernel header itself,
so the code checked is the kernels' code, vectorized the same way) with the
target flags of each x86 variant that takes this path, avx2 and avx512 (256- and
512-bit vectors), and runs it: every float significand of three binades and the specials,
a million doubles, for the divisors that ``compute_scalars`` produces over the
first steps of twelve beta2 values, pseudo-random divisors over the range the
dispatcher allows, and that range's ends. A wrong bit anywhere fails.

Needs gcc, the C sources (a source checkout) and an x86-64 CPU with the
variant's features (AVX2 and FMA; AVX-512 F/VL/BW too); skipped with the
reason otherwise. The environment variables ``CHECK_DIV_BC2_STEPS`` and
``CHECK_DIV_BC2_RANDOM`` raise the counts (BENCHMARKS.md quotes a larger run).
"""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CSRC = ROOT / "csrc"
SOURCE = CSRC / "tests" / "check_div_bc2.c"
MACHINE = platform.machine().lower()
# The library's code-generation flags (CMakeLists.txt) and the AVX2 variant's target.
CFLAGS = ["-std=c11", "-O3", "-fno-fast-math", "-ffp-contract=off", "-fno-math-errno",
          "-Wall", "-Wextra", "-Wno-unused-function", f"-I{CSRC}"]  # fmt: skip
# The variants' target flags (CMakeLists.txt) and the CPU features each needs.
TARGETS = {
    "avx2": (["-mavx2", "-mfma"], ("avx2", "fma")),
    "avx512": (["-mavx512f", "-mavx512vl", "-mavx512bw", "-mfma", "-mprefer-vector-width=512"],
               ("avx512f", "avx512vl", "avx512bw", "fma")),
}  # fmt: skip


def _cpu_has(features: tuple[str, ...]) -> bool:
    try:
        flags = f" {Path('/proc/cpuinfo').read_text().replace(chr(10), ' ')} "
    except OSError:
        return False
    return all(f" {f} " in flags for f in features)


@pytest.fixture(scope="module", params=sorted(TARGETS))
def checker(request, tmp_path_factory) -> Path:
    target, features = TARGETS[request.param]
    if not SOURCE.is_file():
        pytest.skip(f"the C sources are not here ({SOURCE}): not a source checkout")
    if MACHINE not in ("x86_64", "amd64"):
        pytest.skip(f"the FMA path is in the x86-64 variants only, not on {MACHINE}")
    if not _cpu_has(features):
        pytest.skip(f"this CPU lacks {'/'.join(features)}, so the {request.param} checker "
                    "cannot run")  # fmt: skip
    gcc = shutil.which(os.environ.get("CC", "gcc"))
    if gcc is None:
        pytest.skip("gcc is not installed")
    out = tmp_path_factory.mktemp("div_bc2") / f"check_div_bc2_{request.param}"
    proc = subprocess.run(
        [gcc, *CFLAGS, *target, str(SOURCE), "-o", str(out), "-lm"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    return out


def test_division_through_the_reciprocal_has_the_division_bits(checker):
    steps = os.environ.get("CHECK_DIV_BC2_STEPS", "3")
    random_bs = os.environ.get("CHECK_DIV_BC2_RANDOM", "6")
    proc = subprocess.run(
        [str(checker), steps, random_bs], capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    # 12 beta2 x steps + 6 range ends + random divisors, each over 3 * 2^23 + 6 floats
    n_b = 12 * int(steps) + 6 + int(random_bs)
    assert f"divisors {n_b}, float quotients {n_b * (3 * 2**23 + 6)} (mismatches 0)" in (
        proc.stdout
    ), proc.stdout
