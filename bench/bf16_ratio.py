"""bf16-state step time / float32-state step time, measured interleaved.

`python -m fastadam bench --dtype all` times each dtype in its own block; on a
shared machine the bandwidth drifts between blocks. This script alternates
rounds of float32-state and bf16-state steps over the same θ and g, so both see
the same machine, and reports the median per-element time of each and their
ratio (the issue's target: <= 0.75 at 2^24 elements and above).

    python bench/bf16_ratio.py                    # 2^24 and 2^26, numba and c
    python bench/bf16_ratio.py --sizes 26 --rounds 9 --backends c
"""

from __future__ import annotations

import argparse
import time

import numpy as np

import fastadam
from fastadam.bench import make_state


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="24,26", help="log2 of the element counts")
    ap.add_argument("--backends", default="numba,c")
    ap.add_argument("--rounds", type=int, default=7, help="alternations of the two dtypes")
    ap.add_argument("--calls", type=int, default=5, help="timed steps per dtype per round")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        fastadam.set_num_threads(args.threads)
    print(f"threads: {fastadam.get_num_threads()}; ns per element, median of "
          f"{args.rounds} rounds x {args.calls} steps each")  # fmt: skip
    print("| backend | n | float32 states | bf16 states | ratio |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for e in (int(s) for s in args.sizes.split(",")):
        n = 1 << e
        p, g, m32, v32 = make_state(n, "float32")
        _, _, m16, v16 = make_state(n, "bf16")
        for backend in args.backends.split(","):
            times: dict[str, list[float]] = {"f32": [], "bf16": []}
            step = 0
            for _ in range(args.rounds):
                for name, (m, v) in (("f32", (m32, v32)), ("bf16", (m16, v16))):
                    for _ in range(args.calls + 1):  # the first call of a block is not timed
                        step += 1
                        t0 = time.perf_counter()
                        fastadam.adam_step(p, g, m, v, step=step, lr=1e-3, backend=backend)
                        times[name].append(time.perf_counter() - t0)
                    times[name].pop(-args.calls - 1)
            f32, bf16 = (np.median(times[k]) / n * 1e9 for k in ("f32", "bf16"))
            print(f"| {backend} | 2^{e} | {f32:.3f} | {bf16:.3f} | {bf16 / f32:.2f} |")


if __name__ == "__main__":
    main()
