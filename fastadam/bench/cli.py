"""``fastadam bench``'s command line: the options, and each run as measure + report."""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import sys
from collections.abc import Sequence
from typing import Any

import fastadam

from .machine import apply_threads, machine_info, note_others_busy
from .measure import measure_sweep
from .plot import _PLOT_HINT, write_plot
from .report import sweep_report, warn_if_roofline_beaten
from .steps import (
    ALL_BACKENDS,
    BNB,
    DTYPES,
    FASTADAM_BACKENDS,
    PER_CALL_N,
    Q8_STATES,
    TORCH_BACKENDS,
)
from .timing import DEFAULT_MIN_TIME, MIN_REPEATS

#: Default sweep (elements). With the default --min-time the whole run takes
#: about a minute on 2 cores.
DEFAULT_SIZES: tuple[int, ...] = (1 << 12, 1 << 16, 1 << 20, 1 << 22, 1 << 24)
#: Refuse sizes past this: four float64 arrays of 2^30 elements are 32 GiB.
MAX_SIZE = 1 << 30


class BenchError(Exception):
    """A usage error the command reports in one line before exiting with status 2."""


# -- argument parsing ------------------------------------------------------------


def parse_size(token: str) -> int:
    """One size: ``2^k`` (or ``2**k``) or a plain positive integer, in elements."""
    t = token.strip()
    try:
        if "^" in t or "**" in t:
            base, exp = t.replace("**", "^").split("^")
            if base.strip() != "2":
                raise ValueError
            n = 1 << int(exp)
        else:
            n = int(t)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"bad size {token!r}: expected 2^k (e.g. 2^20) or a positive integer"
        ) from None
    if not 1 <= n <= MAX_SIZE:
        raise argparse.ArgumentTypeError(
            f"bad size {token!r}: must be between 1 and 2^{MAX_SIZE.bit_length() - 1} elements"
        )
    return n


def parse_sizes(text: str) -> list[int]:
    """``"2^16,2^20,4096"`` -> ``[4096, 65536, 1048576]`` (sorted, duplicates dropped)."""
    tokens = [t for t in text.split(",") if t.strip()]
    if not tokens:
        raise argparse.ArgumentTypeError("--sizes is empty: give e.g. 2^16,2^20")
    return sorted({parse_size(t) for t in tokens})


def parse_backends(text: str) -> list[str]:
    """``"numba,c,torch-fused"`` -> the names, checked against :data:`ALL_BACKENDS`."""
    names = [t.strip() for t in text.split(",") if t.strip()]
    if not names:
        raise argparse.ArgumentTypeError("--backends is empty")
    for name in names:
        if name not in ALL_BACKENDS:
            raise argparse.ArgumentTypeError(
                f"unknown backend {name!r}; choose from {', '.join(ALL_BACKENDS)}"
            )
    return [b for b in ALL_BACKENDS if b in names]  # table order, no duplicates


_DTYPE_SETS = {"both": ["float32", "float64"], "all": list(DTYPES[:3]), "master": list(DTYPES[4:])}


def parse_dtypes(text: str) -> list[str]:
    """``"float32,bf16"`` (or ``both``, ``all``) -> the step kinds, in table order."""
    names = [t.strip() for t in text.split(",") if t.strip()]
    if not names:
        raise argparse.ArgumentTypeError("--dtype is empty")
    chosen = set()
    for name in names:
        if name not in DTYPES and name not in _DTYPE_SETS:
            raise argparse.ArgumentTypeError(
                f"unknown dtype {name!r}; choose from {', '.join(DTYPES)}, both, all, master"
            )
        chosen.update(_DTYPE_SETS.get(name, [name]))
    return [d for d in DTYPES if d in chosen]


def _positive_int(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return n


def _positive_float(text: str) -> float:
    try:
        x = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, got {text!r}") from None
    if not (math.isfinite(x) and x > 0):
        raise argparse.ArgumentTypeError(f"expected a positive number of seconds, got {text!r}")
    return x


def _parse_models(text: str) -> list:
    from fastadam.bench_model import parse_models

    return parse_models(text)


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    """The command-line parser (``prog`` is the name shown in usage lines)."""
    p = argparse.ArgumentParser(
        prog=prog,
        description=(
            "Measure fastadam's Adam step against the machine's memory roofline "
            "(28 bytes/element float32, 56 float64), the NumPy reference and torch."
        ),
        epilog=(
            "Sizes are elements per array: 2^k or plain integers. The default run "
            "(2^12..2^24 float32, every installed backend) takes about a minute on 2 cores."
        ),
    )
    p.add_argument(
        "--sizes",
        type=parse_sizes,
        default=None,
        metavar="LIST",
        help="comma-separated sizes in elements, e.g. 2^16,2^20,1000000 "
        "(default: 2^12,2^16,2^20,2^22,2^24)",
    )
    p.add_argument(
        "--model",
        type=_parse_models,
        default=None,
        metavar="LIST",
        help="instead of the size sweep, time whole-model optimizer steps "
        "(fastadam.torch.AdamW with float32 and bf16 states, fastadam.AdamW, torch "
        "AdamW fused and foreach) over GPT-2-shaped parameters: comma-separated, from "
        "gpt2-small, gpt2-mini, or a spec such as "
        "gpt2:n_layer=2,n_embd=64,vocab=1000,n_positions=128",
    )
    p.add_argument(
        "--backends",
        type=parse_backends,
        default=None,
        metavar="LIST",
        help=f"comma-separated, from {','.join(ALL_BACKENDS)} "
        "(default: every one that is installed). With --model: the fastadam rows run on "
        "each fastadam backend named (default: auto's), the torch rows are those named "
        "(default: both)",
    )
    p.add_argument(
        "--dtype",
        type=parse_dtypes,
        default=None,
        metavar="LIST",
        help="comma-separated, from float32, float64, bf16 (float32 params with "
        "bfloat16 optimizer states, 20 B/element) and q8 (8-bit block-wise states, "
        "16.06 B/element); both = float32,float64; all = float32,float64,bf16. "
        "bf16-master: float32 master weights whose bfloat16 copy the step writes in the "
        "same pass (30 B/element); f32+cast: the float32 step, then a separate cast-copy "
        "into bfloat16 params (34 B/element; torch's copy_ where torch is installed); "
        "master = those two. "
        "Several dtypes are timed in alternating rounds, so their ratios compare like with "
        "like (default: float32)",
    )
    p.add_argument(
        "--threads",
        type=_positive_int,
        default=None,
        metavar="N",
        help="threads for fastadam (set_num_threads), the roofline kernel and torch "
        "(default: fastadam.get_num_threads())",
    )
    p.add_argument(
        "--min-time",
        type=_positive_float,
        default=DEFAULT_MIN_TIME,
        metavar="SECONDS",
        help=f"time spent timing each backend at each size (default: {DEFAULT_MIN_TIME}); "
        f"at least {MIN_REPEATS} timed steps are taken whatever it says",
    )
    p.add_argument(
        "--repeat",
        type=_positive_int,
        default=None,
        metavar="N",
        help="exactly N timed steps per measurement after one warm-up step, "
        "instead of --min-time (for smoke tests; medians of few steps are noisy)",
    )
    p.add_argument(
        "--roofline-per-size",
        action="store_true",
        help="measure the roofline at every size (in-cache sizes get their own ceiling) "
        "instead of only at the largest",
    )
    p.add_argument(
        "--no-per-call",
        action="store_true",
        help=f"skip the per-call cost measurement ({PER_CALL_N}-element float32 step)",
    )
    p.add_argument("--json", metavar="FILE", default=None, help="write the records as JSON")
    p.add_argument(
        "--plot",
        metavar="FILE.png",
        default=None,
        help="plot GB/s against size (needs matplotlib: pip install 'fastadam[plot]')",
    )
    p.add_argument(
        "--markdown", action="store_true", help="print the header and tables as Markdown"
    )
    p.add_argument(
        "--targets",
        action="store_true",
        help="also check the project's own speed targets (BENCHMARKS.md): a target column "
        "in the per-call tables and a table of speed targets, each met or NOT MET",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    return p


# -- the command -----------------------------------------------------------------


def _resolve_backends(
    requested: list[str] | None, dtypes: list[str]
) -> tuple[list[str], list[str]]:
    """(backends to run, notes about default ones skipped); raise if a named one cannot run.

    bitsandbytes is a default peer only of the 8-bit rows (``--dtype q8``)."""
    has_torch = importlib.util.find_spec("torch") is not None
    has_bnb = has_torch and importlib.util.find_spec("bitsandbytes") is not None
    available = set(fastadam.available_backends())
    reasons = fastadam.unavailable_reasons()
    if requested is None:
        run, notes = [], []
        for b in ALL_BACKENDS:
            if b == BNB:
                if Q8_STATES not in dtypes:
                    continue
                if not has_bnb:
                    notes.append(f"skipping {b}: it is not installed (pip install bitsandbytes)")
                else:
                    run.append(b)
            elif b in TORCH_BACKENDS and not has_torch:
                notes.append(
                    f"skipping {b}: torch is not installed (pip install 'fastadam[torch]')"
                )
            elif b in FASTADAM_BACKENDS and b not in available:
                notes.append(f"skipping {b}: {reasons.get(b, 'unavailable')}")
            else:
                run.append(b)
        return run, notes
    for b in requested:
        if b in TORCH_BACKENDS and not has_torch:
            raise BenchError(f"backend {b!r} needs torch, which is not installed")
        if b == BNB and not has_bnb:
            raise BenchError(f"backend {b!r} needs bitsandbytes and torch, not installed here")
        if b == BNB and Q8_STATES not in dtypes:
            raise BenchError(f"backend {b!r} has only an 8-bit Adam: add --dtype q8")
        if b in FASTADAM_BACKENDS and b not in available:
            why = reasons.get(b, "unknown reason")
            raise BenchError(f"backend {b!r} is unavailable here: {why}")
    return list(requested), []


def finish_run(info: dict[str, Any], json_path: str | None, records: list[dict[str, Any]]) -> None:
    """The end of every mode: warn if the machine was busy, write the JSON records."""
    busy = info.get("others_busy_cores")
    if busy is not None and busy > 0.1:
        print(
            f"warning: other processes kept {busy:.2f} of {info['usable_cores']} cores busy "
            "during the run: the numbers above are not those of a quiet machine",
            file=sys.stderr,
        )
    if json_path is not None:
        with open(json_path, "w") as f:
            json.dump(records, f, indent=1)
            f.write("\n")


def main(argv: Sequence[str] | None = None, *, prog: str | None = None) -> int:
    """Run the benchmark; return the exit status (0 ok, 2 usage error).

    ``argv`` defaults to ``sys.argv[1:]``; ``prog`` is the name in usage lines.
    """
    parser = build_parser(prog)
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help (0) or a bad argument (2, message already printed)
        return int(exc.code or 0)
    try:
        return _run(args)
    except BenchError as exc:
        print(f"{parser.prog}: error: {exc}", file=sys.stderr)
        return 2


def _run(args: argparse.Namespace) -> int:
    """One run: the --model mode, or the size sweep measured, then reported."""
    if args.model is not None:
        from fastadam import bench_model

        return bench_model.run(args)
    if args.plot is not None:
        # Check before measuring anything: a minute of work then a crash is rude.
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise BenchError(_PLOT_HINT) from None
    dtypes: list[str] = args.dtype or ["float32"]
    backends, notes = _resolve_backends(args.backends, dtypes)
    for note in notes:
        print(note, file=sys.stderr)
    if not backends:
        raise BenchError("no backend to measure")
    sizes: list[int] = args.sizes or list(DEFAULT_SIZES)
    threads = apply_threads(args.threads, any(b in (*TORCH_BACKENDS, BNB) for b in backends))

    sweep = measure_sweep(
        backends,
        dtypes,
        sizes,
        threads,
        per_call=not args.no_per_call,
        roofline_per_size=args.roofline_per_size,
        no_progress=args.no_progress,
        min_time=args.min_time,
        repeat=args.repeat,
    )
    info = machine_info(threads)
    note_others_busy(info, sweep.cpu_before, sweep.wall)
    print(sweep_report(sweep, info, args.markdown, args.targets))
    warn_if_roofline_beaten(sweep)

    finish_run(info, args.json, sweep.records + sweep.per_call + sweep.per_tensor)
    if args.plot is not None:
        title = f"fastadam Adam step, {info['cpu']}, {threads} threads"
        write_plot(sweep.records, sweep.roofline, args.plot, title)
    return 0
