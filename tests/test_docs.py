"""The documentation cannot drift from the code.

- The Sphinx site in ``docs/`` builds with warnings as errors and nitpicky
  references (a broken reference, a docstring numpydoc's checks reject, a
  Markdown problem: each fails the build, and the test lists the warnings).
- Every public name (``fastadam.__all__``, ``fastadam.torch.__all__``, the
  backend registry's functions, and their public methods) is in the API
  reference, and its docstring is NumPy style with a "Raises" section when it
  takes arguments.
- Every Python code block of README.md and of the docs runs: the blocks of one
  file run in order, as one program, in a fresh interpreter. A block may be
  skipped only by a ``<!-- docs-test: skip: REASON -->`` line right above it.
- The docstrings' own examples run as doctests.

The build documents the *installed* package (it runs outside the source tree),
like the rest of the suite: reinstall after changing a docstring.
"""

from __future__ import annotations

import doctest
import importlib
import inspect
import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"

# The documented surface beyond the two __all__ lists.
EXTRA_PUBLIC = ("fastadam.backends.auto_choices",)
DOCTEST_MODULES = (
    "fastadam.functional",
    "fastadam.multi",
    "fastadam.optim",
    "fastadam.flat",
    "fastadam.backends",
    "fastadam.torch",
)


def _need_docs_tools() -> None:
    for mod in ("sphinx", "numpydoc", "myst_parser", "furo"):
        pytest.importorskip(mod, reason=f"the docs build needs {mod}: pip install '.[test]'")


def _public_objects() -> dict[str, object]:
    """Qualified name -> object of every public name and public method documented."""
    import fastadam
    import fastadam.torch

    names = [f"fastadam.{n}" for n in fastadam.__all__]
    names += [f"fastadam.torch.{n}" for n in fastadam.torch.__all__]
    names += list(EXTRA_PUBLIC)
    out: dict[str, object] = {}
    for qual in names:
        mod_name, _, attr = qual.rpartition(".")
        obj = getattr(importlib.import_module(mod_name), attr)
        out[qual] = obj
        if inspect.isclass(obj) and not issubclass(obj, BaseException):
            # the class's own public methods and properties, not those it inherits
            # from torch.optim.Optimizer or from its fastadam base class
            for name, member in vars(obj).items():
                if name.startswith("_") or not (
                    inspect.isfunction(member) or isinstance(member, property)
                ):
                    continue
                # torch's Optimizer copies an inherited step onto the class of the
                # first instance made (its profiling hook): not a method of its own
                if getattr(member, "hooked", False) and not member.__qualname__.startswith(
                    f"{obj.__name__}."
                ):
                    continue
                out[f"{qual}.{name}"] = member
    return out


# -- the build -----------------------------------------------------------------


@pytest.fixture(scope="module")
def built_docs(tmp_path_factory) -> Path:
    _need_docs_tools()
    out = tmp_path_factory.mktemp("docs")
    html = out / "html"
    cmd = [
        sys.executable, "-m", "sphinx", "-W", "--keep-going", "-n", "-q", "-b", "html",
        "-d", str(out / "doctrees"), str(DOCS), str(html),
    ]  # fmt: skip
    # Run outside the checkout, so that autodoc imports the installed fastadam.
    proc = subprocess.run(cmd, cwd=out, capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        warnings = [ln for ln in proc.stderr.splitlines() if ln.strip()]
        pytest.fail(
            f"the docs build failed ({len(warnings)} lines of warnings/errors):\n"
            + "\n".join(warnings),
            pytrace=False,
        )
    return html


def test_docs_build_without_warnings(built_docs: Path) -> None:
    for page in ("index", "quickstart", "api", "benchmarks", "guides/numpy", "guides/torch"):
        assert (built_docs / f"{page}.html").is_file(), page
    # the benchmark plots made it in
    images = {p.name for p in (built_docs / "_images").iterdir()}
    assert {"default.png", "per-size.png"} <= images, images


def test_every_public_name_is_in_the_api_reference(built_docs: Path) -> None:
    from sphinx.util.inventory import InventoryFile

    with open(built_docs / "objects.inv", "rb") as f:
        inv = InventoryFile.load(f, "", lambda base, uri: uri)
    documented = {name for domain, entries in inv.items() if domain.startswith("py:")
                  for name in entries}  # fmt: skip
    missing = sorted(set(_public_objects()) - documented)
    assert not missing, f"public names missing from docs/api.rst: {missing}"


# -- the docstrings ------------------------------------------------------------


def test_public_docstrings_are_numpy_style() -> None:
    pytest.importorskip("numpydoc", reason="needs numpydoc: pip install '.[test]'")
    from numpydoc.docscrape import FunctionDoc

    problems = []
    for qual, obj in _public_objects().items():
        doc = inspect.getdoc(obj) or ""
        if not doc:
            problems.append(f"{qual}: no docstring")
            continue
        if re.search(r"^\s*(Args|Arguments|Returns|Raises|Attributes):\s*$", doc, re.M):
            problems.append(f"{qual}: Google-style section; use NumPy style")
        if isinstance(obj, property) or not callable(obj):
            continue
        if inspect.isclass(obj) and issubclass(obj, BaseException):
            continue
        try:
            params = [p for p in inspect.signature(obj).parameters if p != "self"]
        except (TypeError, ValueError):
            params = []
        if params and not FunctionDoc(None, doc=doc)["Raises"]:
            problems.append(f"{qual}: takes arguments but has no 'Raises' section")
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("module", DOCTEST_MODULES)
def test_docstring_examples(module: str) -> None:
    if module == "fastadam.torch":
        pytest.importorskip("torch", reason="fastadam.torch needs torch")
    mod = importlib.import_module(module)
    finder = doctest.DocTestFinder(exclude_empty=True)
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    tests = [t for t in finder.find(mod, module) if t.examples]
    for t in tests:
        runner.run(t)
    result = runner.summarize(verbose=False)
    assert result.failed == 0, f"{result.failed} doctest examples of {module} failed (above)"


# -- the code blocks -----------------------------------------------------------

_FENCE = re.compile(r"^(?P<indent> *)(?P<fence>```+|~~~+)\s*(?P<info>[^\n`]*)$")
_SKIP = re.compile(r"^\s*<!--\s*docs-test:\s*skip:\s*(?P<reason>\S.*?)\s*-->\s*$")
_PY = {"python", "py", "python3"}


def python_blocks(path: Path) -> list[tuple[int, str | None, str]]:
    """(first line number, skip reason or None, code) of each Python block of a file.

    Markdown: fenced blocks whose info string is ``python`` (or ``py``).
    reStructuredText: ``.. code-block:: python`` / ``.. code:: python``.
    """
    lines = path.read_text(encoding="utf-8").splitlines()
    blocks: list[tuple[int, str | None, str]] = []
    i = 0
    while i < len(lines):
        line = lines[i]
        m = _FENCE.match(line)
        if path.suffix == ".md" and m:
            fence, info = m["fence"], m["info"].strip().split()
            body, j = [], i + 1
            while j < len(lines) and not lines[j].strip().startswith(fence):
                body.append(lines[j])
                j += 1
            if info and info[0] in _PY:
                skip = _SKIP.match(lines[i - 1]) if i else None
                code = textwrap.dedent("\n".join(body))
                blocks.append((i + 2, skip["reason"] if skip else None, code))
            i = j + 1
            continue
        rst = re.match(r"^(\s*)\.\. (code-block|code|sourcecode)::\s*(python|py)\s*$", line)
        if path.suffix == ".rst" and rst:
            body, j = [], i + 1
            while j < len(lines) and lines[j].strip().startswith(":"):  # options
                j += 1
            start = j
            while j < len(lines) and (not lines[j].strip() or lines[j].startswith(" ")):
                body.append(lines[j])
                j += 1
            skip = _SKIP.match(lines[i - 1]) if i else None
            blocks.append((start + 1, skip["reason"] if skip else None, textwrap.dedent(
                "\n".join(body))))  # fmt: skip
            i = j
            continue
        i += 1
    return blocks


def _documents() -> list[Path]:
    docs = sorted(p for p in DOCS.rglob("*") if p.suffix in (".md", ".rst") and
                  "_build" not in p.parts)  # fmt: skip
    return [ROOT / "README.md"] + docs


# One fresh interpreter runs every file's blocks (importing torch and Numba once,
# not once per file): the blocks of one file share one namespace, in order, and
# each file starts with a new one.
_RUNNER = r"""
import json, linecache, sys, traceback
files = json.load(open(sys.argv[1], encoding="utf-8"))
results = {}
for name, blocks in files.items():
    namespace = {"__name__": "__main__"}
    for line, code in blocks:
        label = f"{name}, block at line {line}"
        linecache.cache[label] = (len(code), None, code.splitlines(True), label)  # tracebacks
        try:
            exec(compile(code, label, "exec"), namespace)
        except BaseException:
            results[name] = f"the block at line {line} failed:\n" + traceback.format_exc()
            break
    else:
        results[name] = None
json.dump(results, open(sys.argv[2], "w", encoding="utf-8"))
"""


def _name(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


def _with_blocks() -> list[Path]:
    return [p for p in _documents() if python_blocks(p)]


@pytest.fixture(scope="module")
def block_results(tmp_path_factory) -> dict[str, str | None]:
    tmp = tmp_path_factory.mktemp("blocks")
    files = {
        _name(p): [(line, code) for line, reason, code in python_blocks(p) if reason is None]
        for p in _with_blocks()
    }
    (tmp / "blocks.json").write_text(json.dumps(files), encoding="utf-8")
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}
    # Outside the checkout (tmp), so that the installed fastadam is imported.
    proc = subprocess.run(
        [sys.executable, "-c", _RUNNER, str(tmp / "blocks.json"), str(tmp / "results.json")],
        cwd=tmp, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    if proc.returncode != 0:
        pytest.fail(f"the block runner crashed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return json.loads((tmp / "results.json").read_text(encoding="utf-8"))


@pytest.mark.parametrize("path", _with_blocks(), ids=_name)
def test_code_blocks_run(path: Path, block_results: dict[str, str | None]) -> None:
    error = block_results[_name(path)]
    assert error is None, f"{_name(path)}: {error}"


def test_block_extraction() -> None:
    """The extractor finds what it should (a guard against silently running nothing)."""
    readme = python_blocks(ROOT / "README.md")
    assert len(readme) >= 5
    assert all(reason is None for _, reason, _ in readme), "a README block is skipped"
    assert sum(len(python_blocks(p)) for p in _documents()[1:]) >= 15
