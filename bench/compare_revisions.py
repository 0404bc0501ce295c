"""Another revision of fastadam against the installed one, side by side in one process.

    python bench/compare_revisions.py --base 9ec49d2 [--model gpt2-mini] [--min-time 2]
    FASTADAM_ISA=avx2 python bench/compare_revisions.py --base 9ec49d2
    python bench/compare_revisions.py --base 9ec49d2 --numba-avx2
    env $(python bench/compare_revisions.py --print-numba-avx2-env) python -m fastadam bench ...

Two runs of one benchmark in two processes differ by more than most changes on
a shared machine, so this builds ``--base`` (``git archive`` of it, ``pip
install --no-deps --target``), renames its package to ``fastadam_base`` so that
it imports beside the installed ``fastadam``, and times both in alternating
rounds: a one-array step of 2^24 elements (float32, bfloat16 and 8-bit states)
and a ``fastadam.torch.AdamW`` step over a GPT-2-shaped parameter list (float32
parameters with float32, bfloat16 or 8-bit states; bfloat16 parameters, with
and without float32 master weights), on the C and Numba backends, with
``torch.optim.AdamW(fused=True)`` beside the model rows. Medians, in a Markdown
table. The base must have every one of these (issues 17 and 18).

``--numba-avx2`` compiles Numba's loops for an AVX2 CPU (Haswell, every
AVX-512 feature off). ``NUMBA_CPU_NAME=haswell`` alone does not: Numba then
keeps the host's CPU features, AVX-512 included. ``FASTADAM_ISA`` applies to
both revisions' C libraries.
"""

from __future__ import annotations

import argparse
import itertools
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path
from typing import Any

from fastadam.bench.machine import numba_target_environment

ROOT = Path(__file__).resolve().parents[1]


def install_base(rev: str, where: Path) -> Path:
    """``rev`` of this repository, built and installed under ``where`` as fastadam_base."""
    src, target = where / "src", where / "pkg"
    src.mkdir()
    archive = subprocess.run(
        ["git", "-C", str(ROOT), "archive", "--format=tar", rev],
        check=True, capture_output=True,
    ).stdout  # fmt: skip
    archive_path = where / "src.tar"
    archive_path.write_bytes(archive)
    with tarfile.open(archive_path) as tar:
        tar.extractall(src, filter="data")
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target),
         str(src)],
        check=True,
    )  # fmt: skip
    pkg = target / "fastadam_base"
    shutil.move(str(target / "fastadam"), pkg)
    for dist in target.glob("fastadam-*.dist-info"):
        shutil.rmtree(dist)  # the installed fastadam's metadata must stay the only one
    for py in pkg.rglob("*.py"):
        text = py.read_text()
        text = re.sub(r"\bfrom fastadam\.", "from fastadam_base.", text)
        # (``from fastadam import _q8_torch`` too: else the base runs the new modules)
        text = re.sub(r"\bfrom fastadam import\b", "from fastadam_base import", text)
        text = re.sub(r"\bimport fastadam\.torch\b", "import fastadam_base.torch", text)
        text = re.sub(r"^import fastadam$", "import fastadam_base as fastadam", text, flags=re.M)
        text = text.replace('files("fastadam")', 'files("fastadam_base")')
        py.write_text(text)
    return target


def gpt2_shapes(n_layer: int, d: int, vocab: int, n_positions: int) -> list[tuple[int, ...]]:
    shapes = [(vocab, d), (n_positions, d)]
    for _ in range(n_layer):
        shapes += [(d,), (d,), (d, 3 * d), (3 * d,), (d, d), (d,), (d,), (d,), (d, 4 * d),
                   (4 * d,), (4 * d, d), (d,)]  # fmt: skip
    return shapes + [(d,), (d,)]


MODELS = {"gpt2-mini": (6, 128, 4096, 256), "gpt2-small": (12, 768, 50257, 1024)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", help="the revision to compare against (required)")
    parser.add_argument("--model", default="gpt2-mini", choices=sorted(MODELS))
    parser.add_argument("--sizes", default="2^24", help="one-array sizes, e.g. 2^16,2^24")
    parser.add_argument("--min-time", type=float, default=2.0, help="seconds per case")
    parser.add_argument("--numba-avx2", action="store_true")
    parser.add_argument(
        "--print-numba-avx2-env", action="store_true",
        help="print the variables of --numba-avx2 (for env $(...) before another command)",
    )  # fmt: skip
    args = parser.parse_args()
    if args.print_numba_avx2_env:
        print(" ".join(f"{k}={v}" for k, v in numba_target_environment().items()))
        return 0
    if args.base is None:
        parser.error("--base is required")
    if args.numba_avx2:
        os.environ.update(numba_target_environment())  # before Numba is imported
    with tempfile.TemporaryDirectory() as tmp:
        sys.path.insert(0, str(install_base(args.base, Path(tmp))))
        return compare(args)


def compare(args: argparse.Namespace) -> int:
    import fastadam_base
    import fastadam_base.torch as ft_base
    import ml_dtypes
    import numba
    import numpy as np
    import torch
    from fastadam_base.backends import c as c_base

    import fastadam
    import fastadam.torch as ft
    from fastadam.backends import c as c_new
    from fastadam.bench import format_n, format_seconds, parse_sizes, time_interleaved

    rng = np.random.default_rng(0)
    fns = {}
    cases = itertools.product(
        parse_sizes(args.sizes),
        (("float32", np.float32), ("bf16", ml_dtypes.bfloat16), ("8-bit", np.uint8)),
    )
    for n, (dname, dt) in cases:
        for b in ("c", "numba"):
            for tag, mod in (("base", fastadam_base), ("new", fastadam)):
                st = (
                    rng.standard_normal(n).astype(np.float32),
                    rng.standard_normal(n).astype(np.float32) * 1e-3,
                    np.zeros(n, dt),
                    np.zeros(n, dt),
                )
                # 8-bit states: uint8 codes, and a float32 absmax per block of 256
                scales = {}
                if dt == np.uint8:
                    nb = -(-n // 256)
                    scales = {"exp_avg_absmax": np.zeros(nb, np.float32),
                              "exp_avg_sq_absmax": np.zeros(nb, np.float32)}  # fmt: skip
                case = f"adam_step {format_n(n)}, {dname} states, {b}"
                fns[(case, tag)] = lambda mod=mod, st=st, b=b, sc=scales: mod.adam_step(
                    *st, step=5, lr=1e-3, backend=b, **sc
                )
    init = [
        (rng.standard_normal(s).astype(np.float32) * 0.02,
         rng.standard_normal(s).astype(np.float32) * 1e-3)
        for s in gpt2_shapes(*MODELS[args.model])
    ]  # fmt: skip

    def params(dtype=torch.float32):
        ps = [torch.from_numpy(p.copy()).to(dtype).requires_grad_() for p, _ in init]
        for p, (_, g) in zip(ps, init):
            p.grad = torch.from_numpy(g.copy()).to(dtype)
        return ps

    rows: tuple[tuple[str, Any, dict[str, Any]], ...] = (
        ("float32 states", torch.float32, {}),
        ("bf16 states", torch.float32, {"state_dtype": torch.bfloat16}),
        ("8-bit states", torch.float32, {"state_dtype": "8bit"}),
        ("bf16 params", torch.bfloat16, {}),
        ("bf16 params, master weights", torch.bfloat16, {"master_weights": True}),
    )
    for b in ("c", "numba"):
        for name, pdt, options in rows:
            for tag, mod in (("base", ft_base), ("new", ft)):
                opt = mod.AdamW(params(pdt), backend=b, **options)
                fns[(f"torch.AdamW {args.model}, {name}, {b}", tag)] = opt.step
    for pdt, pname in ((torch.float32, "float32"), (torch.bfloat16, "bf16")):
        fns[(f"torch.optim.AdamW(fused=True) {args.model}, {pname} params", "new")] = (
            torch.optim.AdamW(params(pdt), fused=True).step
        )
    # The bench's alternating rounds, each block after an untimed call: a step
    # that follows another threading runtime's (OpenMP's workers still spinning
    # while Numba's start, say) is otherwise slower for reasons of its neighbour.
    timed = time_interleaved(fns, min_time=args.min_time, repeat=None)
    med = {key: median for key, (median, _) in timed.items()}

    print(
        f"- CPU: {_cpu_name()}; C ISA: {c_new.isa()} (base {c_base.isa()}); "
        f"Numba target: {numba.config.CPU_NAME or 'host'}"
        f"{' (AVX-512 off)' if 'NUMBA_CPU_FEATURES' in os.environ else ''}; "
        f"threads: {fastadam.get_num_threads()}"
    )
    print(f"- base: {args.base}; new: the installed fastadam; medians of alternating rounds\n")
    print("| case | base | new | new/base |\n| --- | ---: | ---: | ---: |")
    for case, tag in fns:
        if tag == "new" and (case, "base") in med:
            base, new = med[(case, "base")], med[(case, "new")]
            print(f"| {case} | {format_seconds(base)} | {format_seconds(new)} | {new / base:.2f} |")
    for pname in ("float32", "bf16"):
        case = f"torch.optim.AdamW(fused=True) {args.model}, {pname} params"
        print(f"| {case} | | {format_seconds(med[(case, 'new')])} | |")
    return 0


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine()


if __name__ == "__main__":
    sys.exit(main())
