"""The C library built without OpenMP: one thread, the same bits.

Apple clang has no OpenMP, and CMake's ``-DFASTADAM_OPENMP=OFF`` asks for the
same build anywhere: every step then runs on the calling thread, and
``fa_get_num_threads()`` says 1 whatever ``fa_set_num_threads`` was given
(fastadam.h). This module builds that library -- with CMake and that option
where ``cmake`` and a build tool are on the PATH, else with gcc and the
library's own flags minus ``-fopenmp`` (what CMake does then) -- and checks:

* the C test driver, built without OpenMP too and linked to it, passes: every
  entry point, every flag combination, bit for bit against its scalar
  reference, and the thread count it reads back is 1;
* a fresh Python that loads it through ``FASTADAM_C_LIBRARY`` gets steps past
  the parallel threshold, with 2 threads asked for, bit-identical to the NumPy
  reference, and ``get_num_threads() == 1``.

Only the baseline kernel variant is built (the variants do not depend on
OpenMP; the dispatcher, fastadam.c, is what changes). Needs gcc (or cmake) and
the C sources; skipped with the reason otherwise. About 15 s on 2 cores.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from helpers import run_python

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="builds a Linux shared library (.so)"
)

ROOT = Path(__file__).resolve().parents[1]
CSRC = ROOT / "csrc"
DRIVER = CSRC / "tests" / "test_fastadam.c"
# CMakeLists.txt's flags, without -fopenmp.
CFLAGS = [
    "-std=c11", "-O3", "-fno-fast-math", "-ffp-contract=off", "-fno-math-errno",
    "-Wall", "-Wextra", "-fPIC", "-fvisibility=hidden", f"-I{CSRC}",
]  # fmt: skip


def _run(args: list, cwd: Path, **kw) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [str(a) for a in args], cwd=cwd, capture_output=True, text=True, timeout=300, **kw
    )
    assert proc.returncode == 0, f"{' '.join(map(str, args))}\n{proc.stdout}\n{proc.stderr}"
    return proc


def _build_with_cmake(cmake: str, tmp: Path) -> Path:
    build = tmp / "build"
    generator = ["-G", "Ninja"] if shutil.which("ninja") else []
    configured = _run(
        [cmake, "-S", ROOT, "-B", build, *generator, "-DCMAKE_BUILD_TYPE=Release",
         "-DFASTADAM_OPENMP=OFF", "-DFASTADAM_X86_VARIANTS=OFF"],
        tmp,
    )  # fmt: skip
    assert "OpenMP" not in configured.stdout + configured.stderr, configured.stdout
    _run([cmake, "--build", build, "--parallel", "2"], tmp)
    return build / "libfastadam_c.so"


def _build_with_gcc(gcc: str, tmp: Path) -> Path:
    jobs = [
        [*CFLAGS, "-DFA_VARIANT=baseline", "-c", CSRC / "fastadam_kernel.c", "-o", "kernel.o"],
        [*CFLAGS, "-DFASTADAM_BUILDING", "-c", CSRC / "fastadam.c", "-o", "fastadam.o"],
    ]
    with ThreadPoolExecutor(max_workers=len(jobs)) as pool:
        list(pool.map(lambda args: _run([gcc, *args], tmp), jobs))
    lib = tmp / "libfastadam_c.so"
    _run([gcc, "-shared", "fastadam.o", "kernel.o", "-pthread", "-lm", "-o", lib], tmp)
    return lib


@pytest.fixture(scope="module")
def single_thread_library(tmp_path_factory) -> Path:
    if not DRIVER.is_file():
        pytest.skip(f"the C sources are not here ({DRIVER}): not a source checkout")
    gcc = shutil.which(os.environ.get("CC", "gcc"))
    if gcc is None:
        pytest.skip("gcc is not installed")
    tmp = tmp_path_factory.mktemp("no_openmp")
    cmake = shutil.which("cmake")
    if cmake and (shutil.which("ninja") or shutil.which("make")):
        lib = _build_with_cmake(cmake, tmp)
    else:
        lib = _build_with_gcc(gcc, tmp)
    nm = shutil.which("nm")
    if nm:  # nothing of OpenMP's runtime in it
        symbols = _run([nm, "-D", lib], tmp).stdout
        assert "GOMP_" not in symbols and "omp_" not in symbols, symbols
    return lib


def test_c_driver_passes_on_one_thread(single_thread_library, tmp_path):
    lib = single_thread_library
    gcc = shutil.which(os.environ.get("CC", "gcc"))
    binary = tmp_path / "test_fastadam"
    _run(
        [gcc, "-std=c11", "-O1", f"-I{CSRC}", DRIVER, f"-L{lib.parent}", "-lfastadam_c",
         f"-Wl,-rpath,{lib.parent}", "-lm", "-o", binary],
        tmp_path,
    )  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k not in ("FASTADAM_ISA", "FA_TEST_CHILD")}
    proc = _run([binary], tmp_path, env=env)
    assert "checks on the baseline variant" in proc.stdout, proc.stdout
    assert "all passed: 1 variants" in proc.stdout, proc.stdout


CHECK_FROM_PYTHON = """
import ml_dtypes, numpy as np, fastadam
from fastadam.backends import c

fastadam.set_num_threads(2)  # asked for; a library without OpenMP still runs one
print("threads", c.get_num_threads())
rng = np.random.default_rng(0)
n = 100_003  # past the parallel threshold (32768), odd
for dtype, state in ((np.float32, np.float32), (np.float64, np.float64),
                     (np.float32, ml_dtypes.bfloat16)):
    for kw in ({}, {"weight_decay": 0.1, "decoupled_weight_decay": True, "amsgrad": True}):
        arrays = [rng.standard_normal(n).astype(dtype) for _ in range(2)]
        arrays += [(rng.random(n) * 0.01).astype(state) for _ in range(3)]
        results = []
        for backend in ("c", "numpy"):
            p, g, m, v, vmax = (a.copy() for a in arrays)
            fastadam.adam_step(p, g, m, v, step=3, lr=1e-2, max_exp_avg_sq=vmax, seed=5,
                               backend=backend, **kw)
            results.append([a.view(f"u{a.itemsize}").copy() for a in (p, m, v, vmax)])
        same = all(np.array_equal(a, b) for a, b in zip(*results))
        print(np.dtype(dtype).name, np.dtype(state).name, sorted(kw), "same" if same else "DIFFER")
"""


def test_python_gets_reference_bits_and_one_thread(single_thread_library):
    proc = run_python(CHECK_FROM_PYTHON, FASTADAM_C_LIBRARY=str(single_thread_library))
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0] == "threads 1", proc.stdout
    assert len(lines) == 7 and all(line.endswith(" same") for line in lines[1:]), proc.stdout
