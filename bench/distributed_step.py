"""What sharding the optimizer state with ZeRO changes: memory per rank and step time.

    python bench/distributed_step.py [--configs 1x2,2x1,2x1b,2x1r] [--d-model 512] [--layers 4]
        [--vocab 8192] [--repeats 30] [--warmup 3] [--rounds 1] [--backend auto]
        [--json PATH]

A model-shaped set of float32 parameters (by default a 4-layer transformer with
d_model 512 and an 8192-token embedding: 16.8M elements in 51 tensors, every
one with a random gradient) is stepped by ``fastadam.torch.AdamW`` in each
configuration ``RANKSxTHREADS``:

* one rank (``1xT``): a plain ``fastadam.torch.AdamW`` over every parameter,
  ``T`` fastadam (and torch) threads;
* several ranks (``RxT``, R > 1): R processes on this machine, gloo over
  127.0.0.1, each with ``ZeroRedundancyOptimizer(optimizer_class=
  fastadam.torch.AdamW)`` over the same parameters and T threads; ``RxTb``
  with ``parameters_as_bucket_view=True`` (each rank's shard lives in one flat
  buffer, broadcast in one call instead of one call per tensor); ``RxTr``
  replicated instead of sharded, as plain DDP would have it: every rank a
  ``fastadam.torch.AdamW`` over every parameter, stepping them all.

Each configuration runs in fresh processes. Measured, per configuration:

* **state per rank**: bytes of the optimizer state tensors each rank holds
  (``exp_avg``, ``exp_avg_sq``, ``step``), and each rank's peak RSS (the
  parameters, gradients, state and the torch runtime);
* **step**: the optimizer's update alone: ``optimizer.step()`` (one rank,
  replicated), the local ``zero.optim.step()`` over the rank's shard (ZeRO);
* **step + broadcast** (ZeRO only): ``zero.step()``, the local step followed by
  ZeRO's broadcast of every shard from its owner; **broadcast** is the
  difference of the two medians.

No backward pass and no gradient all-reduce is timed. With several ranks
every timed call starts after a barrier, and a call's time is the slowest
rank's (the job waits for it). Times are medians over ``--repeats`` calls,
after ``--warmup`` calls (the first allocates the state); with ``--rounds N``
each configuration runs N times, interleaved with the others, and each time
reported is the lowest of its N medians.

Run it on a quiet machine: the script prints the load average before and after.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

import fastadam
import fastadam.torch

#: AdamW hyperparameters of every configuration (the values do not change the
#: cost of a step; weight decay on makes every term of the update count).
HYPER = dict(lr=1e-3, weight_decay=1e-2)


def model_shapes(d_model: int, layers: int, vocab: int) -> list[tuple[int, ...]]:
    """Parameter shapes of a pre-norm transformer: embedding, ``layers`` blocks, final norm.

    A block: LayerNorm (2 x d), attention in/out projections (3d x d, 3d; d x d, d),
    LayerNorm, MLP (4d x d, 4d; d x 4d, d): 12 tensors, 12 d^2 + 13 d elements.
    """
    d = d_model
    block = [(d,), (d,), (3 * d, d), (3 * d,), (d, d), (d,),
             (d,), (d,), (4 * d, d), (4 * d,), (d, 4 * d), (d,)]  # fmt: skip
    return [(vocab, d)] + block * layers + [(d,), (d,)]


def make_params(shapes: Sequence[tuple[int, ...]], seed: int = 0) -> list[torch.nn.Parameter]:
    """float32 parameters with random values and random gradients (the same on every rank)."""
    g = torch.Generator().manual_seed(seed)
    params = []
    for shape in shapes:
        p = torch.nn.Parameter(torch.randn(shape, generator=g) * 0.02)
        p.grad = torch.randn(shape, generator=g) * 1e-3
        params.append(p)
    return params


def state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of every tensor in ``optimizer.state`` (moments and step counters)."""
    return sum(
        t.numel() * t.element_size()
        for st in optimizer.state.values()
        for t in st.values()
        if isinstance(t, torch.Tensor)
    )


def time_calls(fn: Callable[[], Any], repeats: int, sync: bool) -> list[float]:
    """Seconds of each of ``repeats`` calls of ``fn``; after a barrier each when ``sync``."""
    out = []
    for _ in range(repeats):
        if sync:
            dist.barrier()
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


#: Seconds a configuration's ranks may take, start-up included.
RANK_TIMEOUT = 600

#: Configuration suffix -> mode with several ranks (see the module docstring);
#: a single rank's mode is "plain".
MODES = {"": "zero", "b": "zero-bucket", "r": "replicated"}
#: Mode -> the optimizer column of the table.
MODE_LABELS = {
    "plain": "fastadam AdamW",
    "zero": "ZeRO(fastadam AdamW)",
    "zero-bucket": "ZeRO(fastadam AdamW), bucket view",
    "replicated": "fastadam AdamW, replicated",
}


def _rank_main(spec: dict[str, Any]) -> None:
    """One rank of one configuration: this script run by run_config with ``--rank-of SPEC``.

    ``spec``: threads, mode, out (the JSON file rank 0 writes) and the model
    options; RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT come from the
    environment, as under torchrun.
    """
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    threads, mode, opts = spec["threads"], spec["mode"], spec["opts"]
    fastadam.set_num_threads(threads)
    torch.set_num_threads(threads)
    params = make_params(model_shapes(opts["d_model"], opts["layers"], opts["vocab"]))
    multi = world > 1
    if multi:
        dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=300))
    zero = None
    if multi and mode.startswith("zero"):
        from torch.distributed.optim import ZeroRedundancyOptimizer

        zero = ZeroRedundancyOptimizer(
            params, optimizer_class=fastadam.torch.AdamW,
            parameters_as_bucket_view=mode == "zero-bucket", backend=opts["backend"], **HYPER,
        )  # fmt: skip
        local = zero.optim
    else:
        local = fastadam.torch.AdamW(params, backend=opts["backend"], **HYPER)
    try:
        for _ in range(opts["warmup"]):
            (zero or local).step()
        step = time_calls(local.step, opts["repeats"], sync=multi)
        full = time_calls(zero.step, opts["repeats"], sync=True) if zero else None
        mine = [p for g in local.param_groups for p in g["params"]]
        record = {
            "rank": rank,
            "tensors": len(mine),
            "elements": sum(p.numel() for p in mine),
            "state_bytes": state_bytes(local),
            "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            "fastadam_threads": fastadam.get_num_threads(),
            "torch_threads": torch.get_num_threads(),
            "step_s": step,
            "step_broadcast_s": full,
        }
        if multi:
            records: list[Any] = [None] * world
            dist.all_gather_object(records, record)
        else:
            records = [record]
        if rank == 0:
            Path(spec["out"]).write_text(json.dumps(records))
    finally:
        if multi:
            dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_config(ranks: int, threads: int, mode: str, opts: dict) -> dict[str, Any]:
    """Run one ``ranks x threads`` configuration in fresh processes; its summary.

    The ranks are started as torchrun would start them (environment variables,
    ``env://`` rendezvous on 127.0.0.1), from a scratch directory.
    """
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "records.json"
        spec = json.dumps({"threads": threads, "mode": mode, "opts": opts, "out": str(out)})
        env = {
            **os.environ,
            "WORLD_SIZE": str(ranks),
            "LOCAL_WORLD_SIZE": str(ranks),
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(_free_port()),
        }
        procs = [
            subprocess.Popen(
                [sys.executable, str(Path(__file__).resolve()), "--rank-of", spec],
                cwd=tmp,
                env={**env, "RANK": str(r), "LOCAL_RANK": str(r)},
            )
            for r in range(ranks)
        ]
        try:
            codes = [p.wait(timeout=RANK_TIMEOUT) for p in procs]
        finally:
            for p in procs:  # only after a timeout or an interrupt is any still running
                if p.poll() is None:
                    p.kill()
                    p.wait()
        if any(codes):
            raise RuntimeError(f"{ranks}x{threads} {mode}: ranks exited with {codes}")
        records = json.loads(out.read_text())

    def median_of_slowest(key: str) -> float | None:
        if records[0][key] is None:
            return None
        per_call = [max(r[key][i] for r in records) for i in range(len(records[0][key]))]
        return statistics.median(per_call)

    step, full = median_of_slowest("step_s"), median_of_slowest("step_broadcast_s")
    return {
        "config": f"{ranks}x{threads}" + {"zero-bucket": "b", "replicated": "r"}.get(mode, ""),
        "ranks": ranks,
        "mode": mode,
        "threads_per_rank": threads,
        # each rank's shard, memory and threads (its raw timings left out)
        "per_rank": [{k: v for k, v in r.items() if not k.endswith("_s")} for r in records],
        "step_median_s": step,
        "step_broadcast_median_s": full,
        "broadcast_median_s": None if full is None else full - step,
    }


def best_of_rounds(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """One configuration's rounds merged: each time is the lowest of the rounds' medians.

    Other processes only ever add time, so the quietest round is the closest
    to the machine's own figure. The broadcast is recomputed from the two
    merged times; the memory figures are the first round's (they do not vary).
    """
    best = dict(runs[0])
    for key in ("step_median_s", "step_broadcast_median_s"):
        if best[key] is not None:
            best[key] = min(r[key] for r in runs)
    if best["step_broadcast_median_s"] is not None:
        best["broadcast_median_s"] = best["step_broadcast_median_s"] - best["step_median_s"]
    best["rounds"] = len(runs)
    return best


def _ms(s: float | None) -> str:
    return "–" if s is None else f"{s * 1e3:.1f}"


def render(results: list[dict[str, Any]], n_elements: int, n_tensors: int) -> str:
    """The results as a Markdown table (MiB = 2^20 bytes, times in ms)."""
    lines = [
        f"parameters: {n_tensors} float32 tensors, {n_elements:,} elements "
        f"({n_elements * 4 / 2**20:.1f} MiB)",
        "",
        "| ranks × threads | optimizer | params per rank (tensors / elements) "
        "| state per rank (MiB) | peak RSS per rank (MiB) | step (ms) "
        "| step + broadcast (ms) | broadcast (ms) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for res in results:
        pr = res["per_rank"]  # one value per rank, joined with " + "
        shard = " + ".join(f"{r['tensors']} / {r['elements'] / 1e6:.2f}M" for r in pr)
        state = " + ".join(f"{r['state_bytes'] / 2**20:.1f}" for r in pr)
        rss = " + ".join(f"{r['peak_rss_bytes'] / 2**20:.0f}" for r in pr)
        optimizer = MODE_LABELS[res["mode"]]
        lines.append(
            f"| {res['ranks']} × {res['threads_per_rank']} | {optimizer} | {shard} | {state} "
            f"| {rss} | {_ms(res['step_median_s'])} | {_ms(res['step_broadcast_median_s'])} "
            f"| {_ms(res['broadcast_median_s'])} |"
        )
    return "\n".join(lines)


def parse_configs(text: str) -> list[tuple[int, int, str]]:
    """``"1x2,2x1,2x1b"`` -> ``[(1, 2, "plain"), (2, 1, "zero"), (2, 1, "zero-bucket")]``.

    (ranks, threads per rank, mode).
    """
    out = []
    for token in text.split(","):
        spec = token.strip().lower()
        suffix = spec[-1] if spec[-1:] in ("b", "r") else ""
        try:
            r, t = (int(x) for x in spec.removesuffix(suffix).split("x"))
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"bad configuration {token!r}: want RANKSxTHREADS, with an optional b or r"
            ) from None
        if r < 1 or t < 1:
            raise argparse.ArgumentTypeError(f"bad configuration {token!r}: both must be >= 1")
        if suffix and r == 1:
            raise argparse.ArgumentTypeError(f"bad configuration {token!r}: {suffix} needs >1 rank")
        out.append((r, t, MODES[suffix] if r > 1 else "plain"))
    return out


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main(argv: Sequence[str] | None = None) -> int:
    """Run every configuration, print the table; return the exit status."""
    if argv is None and len(sys.argv) == 3 and sys.argv[1] == "--rank-of":
        _rank_main(json.loads(sys.argv[2]))  # a rank started by run_config
        # Skip the interpreter's shutdown: with torch 2.13, gloo's worker
        # threads outlive destroy_process_group and may still be releasing
        # a finished collective (which takes the GIL) when the interpreter
        # finalizes, and a thread that wants the GIL then aborts the process
        # (SIGABRT, "terminate called without an active exception"; about one
        # exit in four here). Everything this rank had to do is done and written.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--configs", type=parse_configs, default=parse_configs("1x2,2x1"),
        help="comma-separated RANKSxTHREADS; a trailing b: ZeRO with bucket view, "
        "r: replicated, no ZeRO (default 1x2,2x1)",
    )  # fmt: skip
    ap.add_argument("--d-model", type=int, default=512)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--repeats", type=int, default=30, help="timed calls per measurement")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument(
        "--rounds", type=int, default=1,
        help="run the configurations this many times, interleaved, and report each "
        "time as the lowest of its medians (default 1)",
    )  # fmt: skip
    ap.add_argument("--backend", default="auto", choices=("auto",) + fastadam.BACKEND_NAMES)
    ap.add_argument("--json", type=Path, help="also write the results here")
    args = ap.parse_args(argv)

    shapes = model_shapes(args.d_model, args.layers, args.vocab)
    n_elements = sum(torch.Size(s).numel() for s in shapes)
    # What the ranks need, as plain picklable values.
    opts = {k: getattr(args, k) for k in ("d_model", "layers", "vocab", "repeats", "warmup")}
    opts["backend"] = args.backend
    backend = fastadam.auto_backend() if args.backend == "auto" else args.backend
    print(
        f"machine: {_cpu_model()}, {os.cpu_count()} cores; torch {torch.__version__}, "
        f"fastadam {fastadam.__version__} (backend {backend!r}); "
        f"load average before: {os.getloadavg()[0]:.2f}",
        flush=True,
    )
    # Rounds interleave the configurations, so that a burst of load from other
    # processes hits one round rather than one configuration; each time is
    # then the lowest of its per-round medians (see best_of_rounds).
    rounds: list[list[dict[str, Any]]] = [[] for _ in args.configs]
    for i in range(args.rounds):
        for runs, (ranks, threads, mode) in zip(rounds, args.configs):
            res = run_config(ranks, threads, mode, opts)
            runs.append(res)
            print(
                f"  round {i + 1}: {res['config']} step {_ms(res['step_median_s'])} ms, "
                f"step + broadcast {_ms(res['step_broadcast_median_s'])} ms",
                file=sys.stderr,
                flush=True,
            )
    results = [best_of_rounds(runs) for runs in rounds]
    print(render(results, n_elements, len(shapes)))
    print(f"load average after: {os.getloadavg()[0]:.2f}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
