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
import statistics

import fastadam
from fastadam.bench import _fastadam_step, make_state, time_calls


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
    print(f"threads: {fastadam.get_num_threads()}; ns per element, median over "
          f"{args.rounds} rounds of the median of {args.calls} steps")  # fmt: skip
    print("| backend | n | float32 states | bf16 states | ratio |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for e in (int(s) for s in args.sizes.split(",")):
        n = 1 << e
        p, g, m32, v32 = make_state(n, "float32")
        _, _, m16, v16 = make_state(n, "bf16")
        for backend in args.backends.split(","):
            steps = {
                "f32": _fastadam_step(backend, (p, g, m32, v32)),
                "bf16": _fastadam_step(backend, (p, g, m16, v16)),
            }
            rounds: dict[str, list[float]] = {"f32": [], "bf16": []}
            for _ in range(args.rounds):
                for name, fn in steps.items():  # one untimed warm-up call per block
                    rounds[name].append(time_calls(fn, min_time=0.0, repeat=args.calls)[0])
            f32, bf16 = (statistics.median(rounds[k]) / n * 1e9 for k in ("f32", "bf16"))
            print(f"| {backend} | 2^{e} | {f32:.3f} | {bf16:.3f} | {bf16 / f32:.2f} |")


if __name__ == "__main__":
    main()
