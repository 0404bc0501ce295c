"""One-array steps of the fast backends and torch's fused Adam, side by side.

    python bench/vs_torch_fused.py [--sizes 2^24,2^26] [--dtype float32,float64,bf16]
        [--min-time 4]

``python -m fastadam bench`` times its backends one after another at each size,
so their ratio moves with whatever the machine did in between; this times them
in the bench's alternating rounds (fastadam.bench.time_interleaved), over the
same buffers, and prints each one's time and speed-up over torch fused (over the first
backend for bf16 states, which torch does not have). Under ``FASTADAM_ISA=avx2`` and a
Numba compiled for an AVX2 CPU (``env $(python bench/compare_revisions.py
--print-numba-avx2-env)``) it gives the figures behind ``backend="auto"``'s rule for
AVX2 CPUs (fastadam/backends/__init__.py).
"""

from __future__ import annotations

import argparse
import sys

import fastadam
from fastadam import bench


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="2^24,2^26")
    parser.add_argument("--dtype", default="float32", help="float32, float64 and/or bf16")
    parser.add_argument("--min-time", type=float, default=4.0, help="seconds per backend")
    args = parser.parse_args()
    print(f"C variant {fastadam.backends.get('c').isa()}, Numba target {bench.numba_target()}")
    for dtype in args.dtype.split(","):
        names = ["c", "numba"] + ([] if dtype == bench.BF16_STATES else ["torch-fused"])
        print(f"\n{dtype}\n\n| n | " + " | ".join(names) + " |\n| --- |" + " ---: |" * len(names))
        for n in bench.parse_sizes(args.sizes):
            state = bench.make_state(n, dtype)
            timed = bench.time_interleaved(
                {b: bench.make_step(b, state) for b in names}, min_time=args.min_time, repeat=None
            )
            ref = timed[names[2] if len(names) > 2 else names[0]][0]
            moved = bench.bytes_per_element(dtype) * n
            cells = [
                f"{bench.format_seconds(t)} ({ref / t:.2f}×, {moved / t / 1e9:.1f} GB/s)"
                for t, _ in timed.values()
            ]
            print(f"| {bench.format_n(n)} | " + " | ".join(cells) + " |")
            del state
    return 0


if __name__ == "__main__":
    sys.exit(main())
