"""Train the digits CNN data-parallel, with its fastadam optimizer state sharded over the ranks.

Each rank (process) trains the same model on its own part of every epoch
(``DistributedSampler``); ``DistributedDataParallel`` averages the gradients;
``ZeroRedundancyOptimizer`` gives each rank a ``fastadam.torch.AdamW`` over
only its share of the parameters, so each rank keeps only its share of the
optimizer state (``exp_avg``, ``exp_avg_sq``), steps only those parameters,
and broadcasts them to the other ranks.

Usage::

    torchrun --nproc-per-node 2 examples/distributed_digits.py [--epochs 15] [--seed 0]
        [--batch-size 64] [--lr 3e-3] [--weight-decay 1e-2] [--backend auto|numpy|numba|c]
        [--checkpoint PATH]

    python examples/distributed_digits.py ...   # one process (world size 1), no torchrun

Everything runs on the CPU over the gloo backend; the data ship with
scikit-learn (no download). Threads: fastadam gives each rank its share of
the machine's cores (``fastadam.get_num_threads()``: the CPUs divided by
torchrun's ``LOCAL_WORLD_SIZE``, unless ``FASTADAM_NUM_THREADS`` says
otherwise), and torch's intra-op pool is set to the same number, so the
ranks on one machine do not oversubscribe it.

Rank 0 prints the training loss (averaged over all ranks' samples) and the
test accuracy per epoch, each rank's optimizer-state memory and thread
count, and finally ``test accuracy: 0.9xx``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.optim import ZeroRedundancyOptimizer
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

import fastadam
import fastadam.torch

# The model and the data split are torch_digits.py's, the single-process example.
sys.path.insert(0, str(Path(__file__).resolve().parent))
from torch_digits import accuracy, load_data, make_model  # noqa: E402


def init_distributed() -> None:
    """Join the job torchrun started, or make a one-process group when run without it.

    torchrun sets RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT, which the
    default ``env://`` rendezvous reads. Without them there is nobody to meet:
    an in-process store (no network at all) is enough for a world of one.
    """
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        dist.init_process_group("gloo")
    else:
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)


def moment_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of the ``exp_avg``/``exp_avg_sq`` (and ``max_exp_avg_sq``) tensors ``optimizer`` holds.

    The 0-d ``step`` counters (4 bytes per parameter tensor) are left out.
    """
    return sum(
        t.numel() * t.element_size()
        for st in optimizer.state.values()
        for key, t in st.items()
        if key != "step" and isinstance(t, torch.Tensor)
    )


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--backend", default="auto", choices=("auto",) + fastadam.BACKEND_NAMES)
    ap.add_argument("--epochs", type=int, default=15)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--batch-size", type=int, default=64,
        help="global batch size, split evenly over the ranks (default 64)",
    )  # fmt: skip
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--weight-decay", type=float, default=1e-2)
    ap.add_argument(
        "--checkpoint", type=Path, default=None,
        help="save the model and the consolidated optimizer state here (rank 0) at the end",
    )  # fmt: skip
    return ap.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Train on every rank of the job; rank 0 reports. Returns the exit status."""
    args = parse_args(argv)
    # fastadam's per-rank budget (CPUs // LOCAL_WORLD_SIZE) for torch's
    # kernels too: torch's own default would be every core, on every rank.
    torch.set_num_threads(fastadam.get_num_threads())
    init_distributed()
    try:
        return train(args)
    finally:
        dist.destroy_process_group()


def train(args: argparse.Namespace) -> int:
    rank, world = dist.get_rank(), dist.get_world_size()
    if args.batch_size % world:
        raise SystemExit(f"--batch-size {args.batch_size} must be a multiple of {world} ranks")
    torch.manual_seed(args.seed)  # the same initial weights on every rank
    x_tr, y_tr, x_te, y_te = load_data(args.seed)  # the same split on every rank

    model = make_model()
    ddp = DistributedDataParallel(model)  # also broadcasts rank 0's weights, to be sure
    optimizer = ZeroRedundancyOptimizer(
        ddp.parameters(),
        optimizer_class=fastadam.torch.AdamW,
        lr=args.lr,
        weight_decay=args.weight_decay,
        backend=args.backend,
    )
    train_set = TensorDataset(x_tr, y_tr)
    # Each rank draws its own disjoint part of every epoch's shuffle (the
    # sampler pads the last part with repeats so all ranks take as many steps).
    sampler = DistributedSampler(train_set, num_replicas=world, rank=rank, seed=args.seed)
    loader = DataLoader(train_set, batch_size=args.batch_size // world, sampler=sampler)
    loss_fn = nn.CrossEntropyLoss()

    if rank == 0:
        backend = fastadam.auto_backend() if args.backend == "auto" else args.backend
        print(
            f"world size {world}: {len(x_tr)} train / {len(x_te)} test images, "
            f"{args.batch_size // world} per rank and step, fastadam backend {backend!r}"
        )
        print("epoch  train-loss  test-acc")
    start = time.perf_counter()
    for epoch in range(1, args.epochs + 1):
        sampler.set_epoch(epoch)  # a new shuffle each epoch, the same on every rank
        totals = torch.zeros(2, dtype=torch.float64)  # summed loss, samples
        for xb, yb in loader:
            optimizer.zero_grad()
            loss = loss_fn(ddp(xb), yb)
            loss.backward()  # DDP all-reduces (averages) the gradients here
            optimizer.step()  # this rank's shard, then every shard is broadcast
            totals += torch.tensor([loss.item() * len(yb), len(yb)], dtype=torch.float64)
        dist.all_reduce(totals)  # the epoch's loss over every rank's samples
        if rank == 0:  # every rank holds the same weights: one evaluation is enough
            print(f"{epoch:5d}  {totals[0] / totals[1]:10.6f}  {accuracy(model, x_te, y_te):8.4f}")
    elapsed = time.perf_counter() - start

    # What each rank holds: its shard of the parameters, of the state, its threads.
    local = optimizer.optim
    mine = [p for g in local.param_groups for p in g["params"]]
    report = (
        len(mine), sum(p.numel() for p in mine), moment_bytes(local),
        fastadam.get_num_threads(), torch.get_num_threads(),
    )  # fmt: skip
    reports = [None] * world
    dist.all_gather_object(reports, report)
    if args.checkpoint is not None:
        optimizer.consolidate_state_dict(to=0)  # a collective: every rank sends its shard
    if rank == 0:
        params = list(model.parameters())
        print(f"trained {args.epochs} epochs in {elapsed:.1f} s")
        for r, (n_t, n_el, nbytes, threads, torch_threads) in enumerate(reports):
            print(
                f"rank {r}: {n_t} of {len(params)} parameter tensors ({n_el:,} elements), "
                f"{threads} fastadam threads, {torch_threads} torch threads, "
                f"optimizer state {nbytes / 1024:.1f} KiB"
            )
        unsharded = sum(2 * p.numel() * p.element_size() for p in params)
        print(f"unsharded state: {unsharded / 1024:.1f} KiB (one AdamW over the whole model)")
        if args.checkpoint is not None:
            torch.save(
                {"model": model.state_dict(), "optimizer": optimizer.state_dict()},
                args.checkpoint,
            )
            print(f"checkpoint (model + consolidated optimizer state): {args.checkpoint}")
        print(f"test accuracy: {accuracy(model, x_te, y_te):.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
