"""Start-up cost of the Numba backend with a warm on-disk cache.

    python bench/first_call.py [--runs 5] [--backend numba]

Numba compiles the kernels once and caches the machine code on disk; every
later process only loads it. This script runs one fresh process to make sure
the cache is warm, then ``--runs`` fresh processes that each time, from before
``import fastadam`` to after the first step:

* ``import``: ``import numpy, fastadam``;
* ``first step``: the first ``adam_step(..., backend=...)`` on 1,000 float32
  elements (the serial kernel: cache lookup, load, TBB set-up);
* ``first parallel step``: the first step on 2^20 elements (the parallel
  kernel, a second cached function, and the thread pool's start);
* ``total``: import to the end of both.

It prints the median of each over the runs (seconds). Timing belongs here, not
in the tests: ``tests/test_no_alloc.py`` only checks that the cache is hit.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

CHILD = """
import json, sys, time
t0 = time.perf_counter()
import numpy as np
import fastadam
t1 = time.perf_counter()
backend = sys.argv[1]
small = [np.ones(1000, np.float32) for _ in range(4)]
t2 = time.perf_counter()
fastadam.adam_step(*small, step=1, lr=1e-3, backend=backend)
t3 = time.perf_counter()
big = [np.ones(1 << 20, np.float32) for _ in range(4)]
t4 = time.perf_counter()
fastadam.adam_step(*big, step=1, lr=1e-3, backend=backend)
t5 = time.perf_counter()
print(json.dumps({"import": t1 - t0, "first step": t3 - t2,
                  "first parallel step": t5 - t4, "total": (t5 - t0) - (t4 - t3) - (t2 - t1)}))
"""


def run_child(backend: str) -> dict[str, float]:
    """One fresh interpreter; its timings in seconds (array allocation excluded)."""
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parent.parent)  # run against this checkout
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    out = subprocess.run(
        [sys.executable, "-c", CHILD, backend],
        capture_output=True,
        text=True,
        env=env,
        check=True,
    ).stdout
    return json.loads(out)


def main(argv: list[str] | None = None) -> int:
    """Print the median start-up timings of ``--runs`` fresh processes."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--backend", default="numba")
    args = ap.parse_args(argv)
    run_child(args.backend)  # warm the cache (compiles if it was cold or stale)
    runs = [run_child(args.backend) for _ in range(args.runs)]
    print(f"backend={args.backend}, warm cache, median of {args.runs} fresh processes:")
    for key in runs[0]:
        print(f"  {key:<20} {statistics.median(r[key] for r in runs) * 1e3:8.1f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
