"""The C library on aarch64: its loops vectorized for NEON, its C test driver under emulation.

On aarch64 the library has one kernel variant, ``baseline``: the compiler's
default target, whose SIMD is Advanced SIMD (NEON, part of every ARMv8-A
CPU). This module cross-compiles the library's sources for it with Debian's
``aarch64-linux-gnu-gcc`` and the library's own flags (CMakeLists.txt, OpenMP
included), and checks two things:

* GCC's vectorization report (``-fdump-tree-vect-optimized``: the messages of
  ``-fopt-info-vec-optimized``, grouped by function, which tells the float32
  and float64 copies of one source loop apart) says that the element loop of
  every float32, float64 and bfloat16-state kernel, and both unscale loops,
  were vectorized with 16-byte (NEON) vectors. The loops are found by their
  source lines, so the test fails if any copy stops vectorizing.
* ``csrc/tests/test_fastadam.c``, linked statically with the library and run
  under ``qemu-aarch64`` (qemu-user), passes: every entry point, every flag
  combination, every size 0..70 and a few larger (past the parallel
  threshold), on 1 and 2 OpenMP threads, bit for bit against its scalar
  reference. qemu-user runs guest threads as host threads, so the 2-thread
  pass costs no more under emulation than natively.

Needs ``aarch64-linux-gnu-gcc`` (with the aarch64 C library) and
``qemu-aarch64``: ``apt-get install gcc-aarch64-linux-gnu libc6-dev-arm64-cross
qemu-user``, which ``.ci/run`` does where apt is usable; skipped with the
reason otherwise. About 30 s on our 2-core machine: ~13 s to compile (the
kernel's compile writes the report too), 12-17 s for the driver under
emulation. Marker ``cross``, so ``-m "not cross"`` leaves it out.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from helpers import loop_lines, vectorized_loops

pytestmark = [
    pytest.mark.cross,
    pytest.mark.skipif(not sys.platform.startswith("linux"), reason="needs Linux (qemu-user)"),
]

ROOT = Path(__file__).resolve().parents[1]
CSRC = ROOT / "csrc"
DRIVER = CSRC / "tests" / "test_fastadam.c"
IMPL = CSRC / "fastadam_kernel_impl.h"
BF16 = CSRC / "fastadam_kernel_bf16.h"

CC = os.environ.get("CC_AARCH64", "aarch64-linux-gnu-gcc")
QEMU = os.environ.get("QEMU_AARCH64", "qemu-aarch64")
# The library's code-generation flags (CMakeLists.txt) and OpenMP, as its build has.
CFLAGS = [
    "-std=c11", "-O3", "-fno-fast-math", "-ffp-contract=off", "-fno-math-errno",
    "-Wall", "-Wextra", "-fopenmp", f"-I{CSRC}",
]  # fmt: skip
# Static: the binary runs under qemu without a path to the aarch64 C library.
LDFLAGS = ["-static", "-fopenmp"]
VECTOR_BYTES = 16  # a NEON q register


def _run(args: list[str], cwd: Path, timeout: float = 300, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=timeout, **kw)


def _toolchain(tmp: Path) -> tuple[str, str]:
    """The cross compiler and qemu, once they have built and run an OpenMP program;
    skips (with what failed) where they are missing or cannot."""
    cc, qemu = shutil.which(CC), shutil.which(QEMU)
    if cc is None:
        pytest.skip(f"{CC} is not installed (Debian: apt-get install gcc-aarch64-linux-gnu)")
    if qemu is None:
        pytest.skip(f"{QEMU} is not installed (Debian: apt-get install qemu-user)")
    src = tmp / "smoke.c"
    src.write_text(
        "#include <omp.h>\n#include <stdio.h>\n"
        'int main(void) { printf("%d\\n", omp_get_max_threads() > 0); return 0; }\n'
    )
    built = _run([cc, "-fopenmp", str(src), *LDFLAGS, "-o", "smoke"], tmp)
    if built.returncode != 0:
        pytest.skip(
            f"{CC} cannot link a static OpenMP program (Debian: apt-get install "
            f"libc6-dev-arm64-cross): {built.stderr.strip()[-300:]}"
        )
    ran = _run([qemu, "./smoke"], tmp, timeout=60)
    if ran.returncode != 0 or ran.stdout.strip() != "1":
        pytest.skip(f"{QEMU} cannot run an aarch64 program here: {ran.stderr.strip()[-300:]}")
    return cc, qemu


def _compile(cc: str, args: list[str], cwd: Path) -> None:
    proc = _run([cc, *args], cwd)
    assert proc.returncode == 0, f"{cc} {' '.join(args)}\n{proc.stderr}"


@pytest.fixture(scope="module")
def aarch64_build(tmp_path_factory) -> dict:
    """The driver linked with the library for aarch64, the qemu to run it, and
    the kernel's vectorization report (written by the same compile)."""
    if not DRIVER.is_file():
        pytest.skip(f"the C sources are not here ({DRIVER}): not a source checkout")
    tmp = tmp_path_factory.mktemp("aarch64")
    cc, qemu = _toolchain(tmp)
    report = tmp / "vect.txt"
    jobs = [
        [*CFLAGS, "-DFA_VARIANT=baseline", f"-fdump-tree-vect-optimized={report}",
         "-c", str(CSRC / "fastadam_kernel.c"), "-o", "kernel_baseline.o"],
        [*CFLAGS, "-c", str(CSRC / "fastadam.c"), "-o", "fastadam.o"],
        # The driver itself needs no -O3 (and compiles faster without it).
        [*CFLAGS, "-O1", "-c", str(DRIVER), "-o", "driver.o"],
    ]  # fmt: skip
    with ThreadPoolExecutor(max_workers=len(jobs)) as pool:
        list(pool.map(lambda args: _compile(cc, args, tmp), jobs))
    objects = ["driver.o", "fastadam.o", "kernel_baseline.o"]
    _compile(cc, [*objects, *LDFLAGS, "-lm", "-o", "test_fastadam"], tmp)
    return {"dir": tmp, "binary": tmp / "test_fastadam", "qemu": qemu, "report": report}


def test_kernel_loops_vectorized_for_neon(aarch64_build):
    # The element loop of a float32/float64 kernel: the one under `#pragma GCC ivdep`.
    (adam_loop,) = loop_lines(IMPL, "#pragma GCC ivdep", 1)
    (bf16_loop,) = loop_lines(BF16, "#pragma GCC ivdep", 1)
    unscale_loops = loop_lines(IMPL, "FA_FN(unscale)(", 2)
    vectorized = vectorized_loops(aarch64_build["report"])

    expected: dict[str, set[tuple[str, int, int]]] = {}
    for bits in range(16):  # every flag combination (FA_F_*)
        for t in ("f32", "f64"):
            expected[f"adam_{bits}_{t}"] = {(IMPL.name, adam_loop, VECTOR_BYTES)}
        for mode in (0, 1):  # nearest, stochastic
            for form in ("11", "01", "00"):  # divide+decoupled, decoupled, neither
                expected[f"fa_bf16_seg_{mode}_{bits}_{form}"] = {
                    (BF16.name, bf16_loop, VECTOR_BYTES)
                }
    for t in ("f32", "f64"):
        expected[f"unscale_{t}"] = {(IMPL.name, line, VECTOR_BYTES) for line in unscale_loops}

    missing = {
        name: sorted(want - vectorized.get(name, set()))
        for name, want in expected.items()
        if not want <= vectorized.get(name, set())
    }
    assert not missing, (
        f"loops not vectorized with {VECTOR_BYTES}-byte vectors for aarch64: {missing}\n"
        f"what the report says for them: "
        f"{ {name: sorted(vectorized.get(name, ())) for name in missing} }"
    )


def test_c_driver_passes_under_qemu(aarch64_build):
    env = {k: v for k, v in os.environ.items() if k not in ("FASTADAM_ISA", "FA_TEST_CHILD")}
    proc = _run(
        [aarch64_build["qemu"], str(aarch64_build["binary"])], aarch64_build["dir"], env=env
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"exit {proc.returncode}\n{output[-6000:]}"
    # Only the baseline variant exists on aarch64; the driver runs it in-process.
    assert "checks on the baseline variant" in proc.stdout, output[-6000:]
    assert "all passed: 1 variants" in proc.stdout, output[-6000:]
