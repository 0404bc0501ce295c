"""fastadam.torch.AdamW against torch.optim.AdamW(fused=True) on bfloat16 parameters.

    python bench/lowp_torch_step.py [--model gpt2-mini] [--steps 10] [--threads 2]
        [--backend auto] [--keep-grads]

A GPT-2-shaped model's parameters (fastadam.bench_model's shapes) in bfloat16,
each optimizer over its own copies: fastadam.torch.AdamW without and with
``master_weights``, and torch's fused AdamW on the same bfloat16 parameters.
The optimizers are stepped alternately in one process (round k steps each of
them once), so a busy moment of the machine hits them all alike; each prints
its median time per step and torch's median over it. By default every step
gets new gradient tensors (two sets, alternating, made before the timing), as
``zero_grad(set_to_none=True)`` and ``backward()`` give a training loop;
``--keep-grads`` keeps the same gradient tensors for every step.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="gpt2-mini", help="a fastadam.bench_model spec")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per optimizer")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--backend", default="auto", help="fastadam.torch's backend")
    parser.add_argument("--keep-grads", action="store_true", help="the same grads every step")
    args = parser.parse_args()
    # before torch and fastadam's C library start their thread pools
    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    import torch

    import fastadam.torch as fat
    from fastadam.bench_model import make_model_arrays, parse_models

    torch.set_num_threads(args.threads)
    (spec,) = parse_models(args.model)
    arrays, grad_arrays = make_model_arrays(spec)

    def make(build: Callable[[list[torch.Tensor]], torch.optim.Optimizer]) -> Callable[[], None]:
        params = [torch.tensor(a).to(torch.bfloat16).requires_grad_(True) for a in arrays]
        sets = [[torch.tensor(g * (k + 1)).to(torch.bfloat16) for g in grad_arrays]
                for k in range(1 if args.keep_grads else 2)]  # fmt: skip
        opt = build(params)
        count = [0]

        def step() -> None:
            grads = sets[count[0] % len(sets)]
            count[0] += 1
            for p, g in zip(params, grads):  # untimed: what backward() would have done
                p.grad = g
            t0 = time.perf_counter()
            opt.step()
            times.append(time.perf_counter() - t0)

        times: list[float] = []
        step.times = times  # type: ignore[attr-defined]
        return step

    lr = 1e-3
    steppers = {
        "torch fused": make(lambda ps: torch.optim.AdamW(ps, lr=lr, fused=True)),
        "fastadam": make(lambda ps: fat.AdamW(ps, lr=lr, backend=args.backend)),
        "fastadam master": make(
            lambda ps: fat.AdamW(ps, lr=lr, backend=args.backend, master_weights=True)
        ),
    }
    for _ in range(args.warmup):
        for s in steppers.values():
            s()
    for s in steppers.values():
        s.times.clear()  # type: ignore[attr-defined]
    for _ in range(args.steps):
        for s in steppers.values():
            s()
    med = {k: statistics.median(s.times) for k, s in steppers.items()}  # type: ignore[attr-defined]
    print(f"{spec.name}: {spec.tensors} bfloat16 tensors, {spec.elements:,} elements; "
          f"{args.threads} threads; backend {args.backend}; "
          f"{'same' if args.keep_grads else 'new'} grads each step; "
          f"median of {args.steps} steps")  # fmt: skip
    ref = med["torch fused"]
    for k, t in med.items():
        print(f"  {k:16s} {t * 1e3:8.3f} ms   torch fused / this = {ref / t:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
