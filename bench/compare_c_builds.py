"""Several builds of the C library, and torch's fused Adam, stepping the same buffers in
one process: for kernel changes (a prefetch distance, a loop form) whose effect is smaller
than the minute-to-minute drift of a shared machine's memory bandwidth.

    python bench/compare_c_builds.py LIB.so [LIB.so ...] [--sizes 2^24] [--dtype float32|bf16|q8]
        [--threads 2] [--min-time 4]

Each LIB is a libfastadam_c built from another source tree, e.g. with the prefetch
distance changed::

    mkdir ../pf4k && cp -r csrc CMakeLists.txt ../pf4k/ && (edit ../pf4k/csrc/...)
    cmake -S ../pf4k -B ../pf4k/b -DCMAKE_BUILD_TYPE=Release && cmake --build ../pf4k/b
    python bench/compare_c_builds.py ../pf4k/b/libfastadam_c.so "$(python -c \
        'import fastadam, os; print(os.path.dirname(fastadam.__file__))')/libfastadam_c.so"

Every library runs the same float32 (or bf16-state, or 8-bit-state) step with the same
scalars, timed in the bench's alternating rounds (``fastadam.bench.time_interleaved``); a
row is named by the directory above the library's. ``FASTADAM_ISA`` picks the variant of
every library.
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys

from fastadam import _q8, bench
from fastadam._scalars import STATE_BF16_NEAREST, STATE_SAME_DTYPE, compute_scalars
from fastadam.backends import _c_q8  # noqa: F401  (declares fa_adam_f32_q8 on the shared ffi)
from fastadam.backends import c as c_backend


def _label(path: str) -> str:
    parts = os.path.abspath(path).split(os.sep)
    return parts[-3] if parts[-2] in ("b", "build") and len(parts) > 2 else parts[-2]


def _step(lib, state, dtype: str):
    ffi = c_backend.ffi
    ptrs = [ffi.cast("void *", ffi.from_buffer(a, require_writable=True)) for a in state]
    n = state[0].size
    steps = itertools.count(1)
    rounding = STATE_BF16_NEAREST if dtype == "bf16" else STATE_SAME_DTYPE

    def scalars():
        sc = compute_scalars(
            next(steps), 1e-3, 0.9, 0.999, 1e-8, 0.0, True, False, False, False, None, rounding
        )
        return c_backend._struct_for(_q8.fold(sc) if dtype == "q8" else sc)

    if dtype == "q8":  # (θ, g, codes m, codes v, scales m, scales v), no max_exp_avg_sq
        kernel, args = lib.fa_adam_f32_q8, ptrs
    else:
        kernel = lib.fa_adam_f32_bf16 if dtype == "bf16" else lib.fa_adam_f32
        args = [*ptrs, ffi.NULL]

    def run() -> None:
        rc = kernel(*args, n, scalars())
        if rc:
            c_backend._raise_code(rc)

    run.keep = state  # the pointers above do not keep the arrays alive
    return run


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("libraries", nargs="+")
    parser.add_argument("--sizes", default="2^24")
    parser.add_argument("--dtype", choices=("float32", "bf16", "q8"), default="float32")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--min-time", type=float, default=4.0, help="seconds per library")
    args = parser.parse_args()
    libs = {}
    for path in args.libraries:
        lib = c_backend.ffi.dlopen(path)
        lib.fa_set_num_threads(args.threads)
        libs[_label(path)] = lib
    with_torch = args.dtype == "float32"
    names = list(libs) + (["torch-fused"] if with_torch else [])
    if with_torch:
        import torch

        torch.set_num_threads(args.threads)
    print(
        f"ISA {c_backend.isa()}, {args.threads} threads, {args.dtype}; × = speed-up over the first"
    )
    print("| n | " + " | ".join(names) + " |\n| --- |" + " ---: |" * len(names))
    for n in bench.parse_sizes(args.sizes):
        kind = {"bf16": bench.BF16_STATES, "q8": bench.Q8_STATES}.get(args.dtype, "float32")
        state = bench.make_state(n, kind)
        fns = {name: _step(lib, state, args.dtype) for name, lib in libs.items()}
        if with_torch:
            fns["torch-fused"] = bench.make_step("torch-fused", state)
        timed = bench.time_interleaved(fns, min_time=args.min_time, repeat=None)
        first = timed[names[0]][0]
        cells = [f"{bench.format_seconds(t)} ({first / t:.2f}×)" for t, _ in timed.values()]
        print(f"| {bench.format_n(n)} | " + " | ".join(cells) + " |")
        del state, fns
    return 0


if __name__ == "__main__":
    sys.exit(main())
