"""Train a small CNN on scikit-learn's 8x8 digits with ``fastadam.torch.Adam``.

A twin of the model, from the same initial weights and fed the same batches,
is trained in lockstep with ``torch.optim.Adam``, so the two trajectories can
be compared epoch by epoch: their losses and accuracies should agree to the
printed digits and the largest parameter difference should stay tiny (the
kernels agree with torch to a few ULP per step).

Usage::

    python examples/torch_digits.py [--backend auto|numpy|numba|c] [--epochs 15] [--seed 0]
                                    [--batch-size 64] [--lr 3e-3] [--torch-threads 1]
                                    [--param-dtype float32|bfloat16|float16]
                                    [--master-weights] [--param-rounding nearest|stochastic]

With ``--param-dtype bfloat16`` the fastadam model trains in bfloat16 (its
weights, activations and gradients), the twin stays float32: either with
float32 master weights in the optimizer (``--master-weights``), or pure
bfloat16 weights rounded to nearest or stochastically (``--param-rounding``).

The data ship with scikit-learn (no download); training takes seconds on a laptop.
"""

from __future__ import annotations

import argparse
import copy
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn

import fastadam
import fastadam.torch


def make_model() -> nn.Module:
    """A small CNN for 1x8x8 images: two conv blocks, then a two-layer classifier."""
    return nn.Sequential(
        nn.Conv2d(1, 16, kernel_size=3, padding=1),  # 16 x 8 x 8
        nn.ReLU(),
        nn.MaxPool2d(2),  # 16 x 4 x 4
        nn.Conv2d(16, 32, kernel_size=3, padding=1),  # 32 x 4 x 4
        nn.ReLU(),
        nn.MaxPool2d(2),  # 32 x 2 x 2
        nn.Flatten(),
        nn.Linear(32 * 2 * 2, 64),
        nn.ReLU(),
        nn.Linear(64, 10),
    )


def load_data(seed: int) -> tuple[torch.Tensor, ...]:
    """Digits as float32 tensors: images (N, 1, 8, 8) scaled to [0, 1], labels (N,) int64.

    A stratified 80/20 train/test split, fixed by ``seed``.
    """
    digits = load_digits()
    x = (digits.images / 16.0).astype(np.float32)[:, None, :, :]
    y = digits.target.astype(np.int64)
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=0.2, random_state=seed, stratify=y)
    return tuple(torch.from_numpy(a) for a in (x_tr, y_tr, x_te, y_te))


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """Fraction of ``x`` classified as ``y`` (``x`` cast to the model's dtype)."""
    model.eval()
    x = x.to(next(model.parameters()).dtype)
    acc = (model(x).argmax(dim=1) == y).double().mean().item()
    model.train()
    return acc


@torch.no_grad()
def max_param_diff(a: nn.Module, b: nn.Module) -> float:
    """Largest |difference| between corresponding parameters of two models."""
    return max((p - q).abs().max().item() for p, q in zip(a.parameters(), b.parameters()))


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--backend", default="auto", choices=("auto",) + fastadam.BACKEND_NAMES)
    ap.add_argument("--epochs", type=int, default=15)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument(
        "--state-dtype",
        choices=("float32", "bfloat16", "8bit"),
        default=None,
        help="dtype of fastadam's moment estimates (default: the weights' own, float32 with "
        "master weights; bfloat16: half the memory; the torch.optim.Adam twin keeps float32, so "
        "the printed |dparam| then shows the difference)",
    )
    ap.add_argument(
        "--param-dtype",
        choices=("float32", "bfloat16", "float16"),
        default="float32",
        help="dtype of the fastadam model's weights (and activations); the twin stays float32",
    )
    ap.add_argument(
        "--master-weights",
        action="store_true",
        help="low-precision weights: keep float32 master weights in the optimizer",
    )
    ap.add_argument(
        "--param-rounding",
        choices=("nearest", "stochastic"),
        default="nearest",
        help="how low-precision weights are rounded (stochastic: unbiased, from a counter hash)",
    )
    ap.add_argument(
        "--torch-threads",
        type=int,
        default=1,
        help="torch intra-op threads (default 1: for a model this small, more threads only "
        "add wake-up latency)",
    )
    return ap.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Train both models and print their per-epoch trajectories; return the exit status."""
    args = parse_args(argv)
    torch.set_num_threads(args.torch_threads)
    torch.manual_seed(args.seed)
    x_tr, y_tr, x_te, y_te = load_data(args.seed)

    model = make_model()
    twin = copy.deepcopy(model)  # same initial weights
    lowp = args.param_dtype != "float32"
    dtype = getattr(torch, args.param_dtype)
    model.to(dtype)
    state_dtype: Any = args.state_dtype  # None, "8bit", or a torch dtype's name
    if state_dtype not in (None, "8bit"):
        state_dtype = getattr(torch, state_dtype)
    opt = fastadam.torch.Adam(
        model.parameters(),
        lr=args.lr,
        state_dtype=state_dtype,
        backend=args.backend,
        master_weights=args.master_weights,
        param_rounding=args.param_rounding,
        seed=args.seed,
    )
    ref_opt = torch.optim.Adam(twin.parameters(), lr=args.lr)
    loss_fn = nn.CrossEntropyLoss()
    # One shuffling stream for both models: they see the same batches in the same order.
    gen = torch.Generator().manual_seed(args.seed)

    backend = fastadam.auto_backend() if args.backend == "auto" else args.backend
    print(f"digits: {len(x_tr)} train / {len(x_te)} test images, backend {backend!r}")
    if lowp:
        how = "float32 master weights" if args.master_weights else f"{args.param_rounding} rounding"
        print(f"fastadam model in {args.param_dtype} ({how}); the torch twin in float32")
    print("epoch  loss(fastadam)  loss(torch)  acc(fastadam)  acc(torch)  max|dparam|")
    start = time.perf_counter()
    for epoch in range(1, args.epochs + 1):
        perm = torch.randperm(len(x_tr), generator=gen)
        totals = [0.0, 0.0]
        for i in range(0, len(x_tr), args.batch_size):
            idx = perm[i : i + args.batch_size]
            xb, yb = x_tr[idx], y_tr[idx]
            for k, (m, o) in enumerate(((model, opt), (twin, ref_opt))):
                o.zero_grad()
                loss = loss_fn(m(xb.to(dtype) if k == 0 else xb).float(), yb)
                loss.backward()
                o.step()
                totals[k] += loss.item() * len(idx)
        n = len(x_tr)
        print(
            f"{epoch:5d}  {totals[0] / n:14.6f}  {totals[1] / n:11.6f}  "
            f"{accuracy(model, x_te, y_te):13.4f}  {accuracy(twin, x_te, y_te):10.4f}  "
            f"{max_param_diff(model, twin):11.3e}"
        )
    elapsed = time.perf_counter() - start
    print(f"trained {args.epochs} epochs of both models in {elapsed:.1f} s")
    print(f"test accuracy: {accuracy(model, x_te, y_te):.3f}")
    if lowp:
        print(f"test accuracy of the float32 twin: {accuracy(twin, x_te, y_te):.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
