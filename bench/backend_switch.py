"""The first step of one backend right after a step of another, in one process.

    python bench/backend_switch.py [--backend numba] [--after c] [--dtype q8] [--size 2^24]
        [--threads 2] [--rounds 7]

Each round steps ``--after`` once (float32 states, arrays of its own), then times
three ``adam_step`` calls of ``--backend`` one by one; then the same after a step of
``--backend`` itself. Prints the median ns per element of each of the three calls in
both cases. The bench (``python -m fastadam bench``) times each backend's steps apart,
and its medians hide a slow first call; a program that switches backends every step
pays it every step. With C's OpenMP threads still spinning after their step
(libgomp's default wait policy), the first Numba step after it has fewer cores
(BENCHMARKS.md, session 19); ``OMP_WAIT_POLICY=passive`` is the control.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

import fastadam
from fastadam import _q8
from fastadam.bench import parse_size
from fastadam.functional import adam_step


def _stepper(backend: str, dtype: str, n: int, rng: np.random.Generator):
    p = rng.standard_normal(n).astype(np.float32)
    g = (rng.standard_normal(n) * 1e-2).astype(np.float32)
    if dtype == "q8":
        cm, cv, am, av = _q8.zeros_state(n)
        return lambda t: adam_step(p, g, cm, cv, step=t, lr=1e-3, backend=backend,
                                   exp_avg_absmax=am, exp_avg_sq_absmax=av)  # fmt: skip
    m, v = np.zeros(n, np.float32), np.zeros(n, np.float32)
    return lambda t: adam_step(p, g, m, v, step=t, lr=1e-3, backend=backend)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backend", default="numba")
    ap.add_argument("--after", default="c")
    ap.add_argument("--dtype", choices=("float32", "q8"), default="q8")
    ap.add_argument("--size", default="2^24")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=7)
    args = ap.parse_args()
    n = parse_size(args.size)
    fastadam.set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    timed = _stepper(args.backend, args.dtype, n, rng)
    before = {args.after: _stepper(args.after, "float32", n, rng), args.backend: timed}
    for t in range(1, 4):  # compile and warm every step
        for step in before.values():
            step(t)
    times: dict[tuple[str, int], list[float]] = {}
    for r in range(args.rounds):
        for name, step in before.items():
            step(10 + r)
            for k in range(3):
                t0 = time.perf_counter()
                timed(20 + 3 * r + k)
                times.setdefault((name, k), []).append(time.perf_counter() - t0)
    print(f"{args.backend} {args.dtype} step, n = {args.size}, {args.threads} threads, "
          f"median of {args.rounds} rounds, ns per element")  # fmt: skip
    for name in before:
        calls = ", ".join(f"{np.median(times[(name, k)]) * 1e9 / n:.3f}" for k in range(3))
        print(f"after a {name} step: calls 1-3 {calls}")


if __name__ == "__main__":
    main()
