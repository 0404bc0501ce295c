"""Per-element cost with the data in cache, and per-call cost, of each backend's step.

    python bench/incache_slope.py [--dtype float32,bf16,q8] [--sizes 2^14,49152]
        [--threads 1] [--rounds 15]

For each state dtype and backend (C and Numba), ``fastadam.adam_step`` runs on arrays
of the two sizes in alternating rounds, one process; the medians give a line: its
slope is the cost of one more element while the arrays stay in cache (both sizes
should fit in L2), its intercept the cost of the call
itself (validation, dispatch, the launch). Where two backends' slopes differ, their
loops do; where intercepts differ, their Python or C glue does. Medians of timed
calls on a shared machine: compare rows of one run, never a lone figure.

Both sizes must take the same path: below ``config.PARALLEL_MIN_ELEMENTS`` (2^16)
adam_step runs Numba's loops through its one-call path, from it on through the
parallel loop's launch (the C library's threshold for a team of threads is
``config.C_PARALLEL_MIN_ELEMENTS``), and a line through one point of each measures
neither. The default sizes (2^14 and 3 * 2^14) take the one-call path and keep
even float32 states (28 bytes an element) within 1.3 MiB.

Run it under ``env $(python bench/compare_revisions.py --print-numba-avx2-env)
FASTADAM_ISA=avx2`` for the AVX2 kernels, and with ``OMP_WAIT_POLICY=passive`` so
that libgomp's spinning threads after a C call do not slow the Numba call that
follows it (``bench/backend_switch.py``).
"""

from __future__ import annotations

import argparse
import time

import ml_dtypes
import numpy as np

import fastadam
from fastadam import _q8, config
from fastadam.bench import parse_size


def _arrays(dtype: str, n: int, rng: np.random.Generator) -> tuple[tuple, dict]:
    p = rng.standard_normal(n).astype(np.float32)
    g = (rng.standard_normal(n) * 1e-2).astype(np.float32)
    if dtype == "q8":
        m, v, am, av = _q8.zeros_state(n)
        return (p, g, m, v), {"exp_avg_absmax": am, "exp_avg_sq_absmax": av}
    state = np.dtype(ml_dtypes.bfloat16) if dtype == "bf16" else np.float32
    return (p, g, np.zeros(n, state), np.zeros(n, state)), {}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dtype", default="float32,bf16,q8")
    ap.add_argument("--sizes", default="2^14,49152", help="two sizes, both in cache")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=15)
    args = ap.parse_args()
    small, large = (parse_size(s) for s in args.sizes.split(","))
    limits = [config.PARALLEL_MIN_ELEMENTS]
    if args.threads > 1:  # one C thread below its threshold, a team from it on
        limits.append(config.C_PARALLEL_MIN_ELEMENTS)
    for limit in limits:
        if (small < limit) != (large < limit):
            raise SystemExit(f"--sizes {small} and {large} straddle {limit}: two code paths")
    fastadam.set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    print(f"- threads: {args.threads}; sizes {small} and {large}; medians of {args.rounds} "
          "alternating rounds")  # fmt: skip
    print("\n| dtype | backend | ns per element | µs per call |\n| --- | --- | ---: | ---: |")
    for dtype in args.dtype.split(","):
        cases = {(be, n): _arrays(dtype, n, rng) for be in ("c", "numba") for n in (small, large)}
        times: dict = {key: [] for key in cases}
        step = 1
        for _ in range(args.rounds + 1):  # the first round warms up (and compiles)
            for (be, n), (arrays, kw) in cases.items():
                reps = max(1, 2**21 // n)
                t = time.perf_counter()
                for _ in range(reps):
                    fastadam.adam_step(*arrays, step=step, lr=1e-3, backend=be, **kw)
                    step += 1
                times[(be, n)].append((time.perf_counter() - t) / reps)
        for be in ("c", "numba"):
            t0, t1 = (float(np.median(times[(be, n)][1:])) for n in (small, large))
            slope = (t1 - t0) / (large - small)
            print(f"| {dtype} | {be} | {slope * 1e9:.3f} | {(t0 - slope * small) * 1e6:.1f} |")


if __name__ == "__main__":
    main()
