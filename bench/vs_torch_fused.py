"""One-array steps of the fast backends and torch's fused Adam, side by side.

    python bench/vs_torch_fused.py [--sizes 2^24,2^26] [--min-time 4]

``python -m fastadam bench`` times its backends one after another at each size,
so their ratio moves with whatever the machine did in between; this times them
in the bench's alternating rounds (fastadam.bench.time_interleaved), over the
same float32 buffers, and prints each one's time and speed-up over torch fused.
"""

from __future__ import annotations

import argparse
import sys

from fastadam import bench


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="2^24,2^26")
    parser.add_argument("--min-time", type=float, default=4.0, help="seconds per backend")
    args = parser.parse_args()
    names = ("c", "numba", "torch-fused")
    print("| n | " + " | ".join(names) + " |\n| --- |" + " ---: |" * len(names))
    for n in bench.parse_sizes(args.sizes):
        state = bench.make_state(n, "float32")
        timed = bench.time_interleaved(
            {b: bench.make_step(b, state) for b in names}, min_time=args.min_time, repeat=None
        )
        fused = timed["torch-fused"][0]
        cells = [
            f"{bench.format_seconds(t)} ({fused / t:.2f}×, {28 * n / t / 1e9:.1f} GB/s)"
            for t, _ in timed.values()
        ]
        print(f"| {bench.format_n(n)} | " + " | ".join(cells) + " |")
        del state
    return 0


if __name__ == "__main__":
    sys.exit(main())
