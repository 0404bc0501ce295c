"""The C library under AddressSanitizer and UBSan, with no Python in the process.

Builds ``csrc/tests/test_fastadam.c`` together with the library's own sources
(every ISA variant) with ``-fsanitize=address,undefined -fno-sanitize-recover=all``
and runs it: every entry point, every flag combination, sizes 0..70 and a few
larger ones, 1 and 2 threads, each array its own exact-size allocation, results
compared bit for bit with a scalar C reference. Any out-of-bounds access, any
undefined behaviour or any wrong bit fails the run.

Needs gcc with libasan and libubsan and the C sources (a source checkout);
skipped with the reason otherwise. Runs in the normal test run (marker
``sanitizers``, so ``-m "not sanitizers"`` can leave it out).
"""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

pytestmark = [
    pytest.mark.sanitizers,
    pytest.mark.skipif(not sys.platform.startswith("linux"), reason="needs Linux (fork, exec)"),
]

ROOT = Path(__file__).resolve().parents[1]
CSRC = ROOT / "csrc"
DRIVER = CSRC / "tests" / "test_fastadam.c"

# The library's own code-generation flags (CMakeLists.txt) plus the sanitizers;
# -O3 so the vectorized loops are what gets checked (ASan instruments vector
# loads and stores at their full width).
CFLAGS = [
    "-std=c11", "-O3", "-fno-fast-math", "-ffp-contract=off", "-fno-math-errno",
    "-g1", "-Wall", "-Wextra",
    "-fsanitize=address,undefined", "-fno-omit-frame-pointer", "-fno-sanitize-recover=all",
    f"-I{CSRC}",
]  # fmt: skip
X86 = platform.machine().lower() in ("x86_64", "amd64")
VARIANTS = {"baseline": []}  # name -> target flags, as in CMakeLists.txt
if X86:
    VARIANTS["avx2"] = ["-mavx2", "-mfma"]
    VARIANTS["avx512"] = ["-mavx512f", "-mavx512vl", "-mavx512bw", "-mfma",
                          "-mprefer-vector-width=512"]  # fmt: skip
SANITIZER_ENV = {
    # Leak checking needs ptrace, which containers often forbid; the library
    # allocates nothing anyway.
    "ASAN_OPTIONS": "detect_leaks=0:halt_on_error=1:abort_on_error=0",
    "UBSAN_OPTIONS": "print_stacktrace=1:halt_on_error=1",
}


def _gcc() -> str:
    gcc = shutil.which(os.environ.get("CC_FOR_SANITIZERS", "gcc"))
    if gcc is None:
        pytest.skip("gcc is not installed")
    for lib in ("libasan.so", "libubsan.so"):
        found = subprocess.run(
            [gcc, f"-print-file-name={lib}"], capture_output=True, text=True
        ).stdout.strip()
        if not os.path.isabs(found) or not os.path.exists(found):
            pytest.skip(f"{lib} is not installed (gcc -print-file-name={lib}: {found!r})")
    return gcc


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", "FASTADAM_ISA")}
    env.update(SANITIZER_ENV)
    return env


def _compile(gcc: str, args: list[str], cwd: Path) -> None:
    proc = subprocess.run([gcc, *args], cwd=cwd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"gcc {' '.join(args)}\n{proc.stderr}"


def _sanitizers_work(gcc: str, tmp: Path) -> None:
    """Skip (not fail) where the toolchain cannot run sanitized programs at all,
    e.g. a kernel whose address-space layout the ASan runtime does not support."""
    src = tmp / "smoke.c"
    src.write_text("int main(void) { return 0; }\n")
    flags = ["-fsanitize=address,undefined", "-fopenmp"]
    proc = subprocess.run(
        [gcc, *flags, str(src), "-o", str(tmp / "smoke")], capture_output=True, text=True
    )
    if proc.returncode != 0:
        pytest.skip(f"gcc cannot link a sanitized OpenMP program: {proc.stderr.strip()[-300:]}")
    run = subprocess.run([str(tmp / "smoke")], capture_output=True, text=True, env=_env())
    if run.returncode != 0:
        pytest.skip(f"sanitized programs do not run here: {run.stderr.strip()[-300:]}")


#: The sanitized library's objects, compiled by the first build_driver of the session
#: and linked into every driver.
_LIBRARY_OBJECTS: list[Path] = []


def build_driver(tmp: Path, driver: Path = DRIVER) -> Path:
    """The driver linked with the library sources, all sanitized; returns the binary."""
    if not driver.is_file():
        pytest.skip(f"the C sources are not here ({DRIVER}): not a source checkout")
    gcc = _gcc()
    _sanitizers_work(gcc, tmp)
    flags = [*CFLAGS, "-fopenmp"]
    have = ["-DFA_HAVE_AVX2", "-DFA_HAVE_AVX512"] if X86 else []
    # The driver itself needs no -O3 (and compiles faster without it).
    jobs = [[*flags, "-O1", *have, "-c", str(driver), "-o", "driver.o"]]
    library = not _LIBRARY_OBJECTS
    if library:
        jobs += [
            [*flags, *target, f"-DFA_VARIANT={name}", "-c", str(CSRC / "fastadam_kernel.c"),
             "-o", f"kernel_{name}.o"]
            for name, target in VARIANTS.items()
        ]  # fmt: skip
        jobs.append([*flags, *have, "-c", str(CSRC / "fastadam.c"), "-o", "fastadam.o"])
        # the low-precision entry point (issue 17), part of the library
        jobs.append([*flags, *have, "-c", str(CSRC / "fastadam_lowp.c"), "-o", "fastadam_lowp.o"])
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
        list(pool.map(lambda args: _compile(gcc, args, tmp), jobs))
    if library:
        names = ["fastadam.o", "fastadam_lowp.o", *(f"kernel_{name}.o" for name in VARIANTS)]
        _LIBRARY_OBJECTS.extend(tmp / name for name in names)
    objects = ["driver.o", *(str(o) for o in _LIBRARY_OBJECTS)]
    _compile(gcc, [*flags, *objects, "-lm", "-o", "test_fastadam"], tmp)
    return tmp / "test_fastadam"


def test_c_library_under_asan_and_ubsan(tmp_path):
    binary = build_driver(tmp_path)
    proc = subprocess.run(
        [str(binary)], cwd=tmp_path, capture_output=True, text=True, env=_env(), timeout=300
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"exit {proc.returncode}\n{output[-6000:]}"
    assert "all passed" in proc.stdout, output[-6000:]
    # At least the baseline variant ran its checks (the others where the CPU has them).
    assert "passed:" in proc.stdout and "on the baseline variant" in proc.stdout, output


def test_c_lowp_under_asan_and_ubsan(tmp_path):
    """csrc/tests/test_fastadam_lowp.c: the bfloat16/float16 and master-weights loops
    (issue 17) against its scalar reference, every variant, under the sanitizers."""
    binary = build_driver(tmp_path, CSRC / "tests" / "test_fastadam_lowp.c")
    proc = subprocess.run(
        [str(binary)], cwd=tmp_path, capture_output=True, text=True, env=_env(), timeout=600
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"exit {proc.returncode}\n{output[-6000:]}"
    assert "all passed" in proc.stdout, output[-6000:]
    assert "on the baseline variant" in proc.stdout, output
