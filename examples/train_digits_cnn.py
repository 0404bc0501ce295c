"""Train a small convolutional network on scikit-learn's 8x8 digits with fastadam.

Everything is NumPy: the convolutions are im2col + one matrix product, the
backward pass is written out by hand, and every parameter lives in one
:class:`fastadam.FlatParams`, so a whole optimizer step is a single fused
``fastadam.Adam.step()`` call over one buffer.

The network (activations are channels-last, ``(batch, height, width, channels)``)::

    image (B, 8, 8, 1)
    -> [conv 3x3, padding 1 -> ReLU -> max-pool 2x2]  once per entry of --channels
    -> flatten -> dense -> 10 logits -> softmax cross-entropy

Run it from the repository root::

    python examples/train_digits_cnn.py                      # defaults: ~0.98 test accuracy
    python examples/train_digits_cnn.py --backend numpy --epochs 5 --no-progress

The data set ships with scikit-learn (1797 images, 8x8 pixels, 0..16 grey
levels); nothing is downloaded.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import math
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

import fastadam

KERNEL = 3  # convolution kernel side, in pixels
POOL = 2  # max-pool window side and stride, in pixels
NUM_CLASSES = 10
IMAGE_SIZE = 8  # the digits are 8x8 pixels

DEFAULT_CHANNELS = (16, 32)
DEFAULT_EPOCHS = 15
DEFAULT_BATCH_SIZE = 64
DEFAULT_LR = 1e-2
DEFAULT_SEED = 0
DEFAULT_TEST_FRACTION = 0.25

Params = dict[str, np.ndarray]
Cache = dict[str, Any]


# --- data ---------------------------------------------------------------------


def load_data(
    seed: int = DEFAULT_SEED,
    test_fraction: float = DEFAULT_TEST_FRACTION,
    dtype: np.dtype | type = np.float32,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The digits, split (stratified, by ``seed``) and standardized.

    Returns:
        ``(x_train, y_train, x_test, y_test)``: images of shape ``(n, 8, 8)`` in
        ``dtype`` and int64 labels of shape ``(n,)``. The images are shifted and
        scaled by one mean and one standard deviation taken over all pixels of
        the training images (so the test set never leaks into them); a single
        pair keeps the spatial structure the convolution relies on, where
        per-pixel scaling would blow up the always-blank border pixels.
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = digits.images.astype(np.float64)  # (1797, 8, 8), grey levels 0..16
    y = digits.target.astype(np.int64)
    x_train, x_test, y_train, y_test = train_test_split(
        x, y, test_size=test_fraction, random_state=seed, stratify=y
    )
    mean, std = x_train.mean(), x_train.std()
    x_train = ((x_train - mean) / std).astype(dtype)
    x_test = ((x_test - mean) / std).astype(dtype)
    return x_train, y_train, x_test, y_test


# --- the model ----------------------------------------------------------------


def param_shapes(
    channels: Sequence[int] = DEFAULT_CHANNELS, image_size: int = IMAGE_SIZE
) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every parameter array, in the order they are packed.

    Conv weights are ``(out_channels, in_channels, 3, 3)`` (torch's layout);
    the dense weight is ``(10, features)`` with the features in the
    channels-last order of the last pooled activation.
    """
    if not channels:
        raise ValueError("channels must name at least one convolution layer")
    shapes: dict[str, tuple[int, ...]] = {}
    side, c_in = image_size, 1
    for i, c_out in enumerate(channels):
        if side % POOL:
            raise ValueError(f"{len(channels)} conv layers do not fit an {image_size}px image")
        shapes[f"conv{i}.weight"] = (c_out, c_in, KERNEL, KERNEL)
        shapes[f"conv{i}.bias"] = (c_out,)
        side, c_in = side // POOL, c_out
    shapes["dense.weight"] = (NUM_CLASSES, side * side * c_in)
    shapes["dense.bias"] = (NUM_CLASSES,)
    return shapes


def init_params(
    rng: np.random.Generator,
    channels: Sequence[int] = DEFAULT_CHANNELS,
    dtype: np.dtype | type = np.float32,
) -> Params:
    """Fresh parameters: He-normal weights (std ``sqrt(2 / fan_in)``, for ReLU), zero biases."""
    params: Params = {}
    for name, shape in param_shapes(channels).items():
        if name.endswith(".bias"):
            params[name] = np.zeros(shape, dtype=dtype)
        else:
            fan_in = math.prod(shape[1:])
            params[name] = (rng.standard_normal(shape) * math.sqrt(2.0 / fan_in)).astype(dtype)
    return params


def conv_layers(params: Params) -> int:
    """How many conv blocks ``params`` describes."""
    return sum(1 for name in params if name.endswith(".weight") and name.startswith("conv"))


def im2col(x: np.ndarray) -> np.ndarray:
    """The 3x3 patches of ``x`` (B, H, W, C), zero-padded by 1, as rows.

    Returns ``(B*H*W, C*3*3)``; the column order ``(c, ky, kx)`` matches a
    ``(F, C, 3, 3)`` weight reshaped to ``(F, C*9)``.
    """
    b, h, w, c = x.shape
    pad = KERNEL // 2
    xp = np.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    windows = sliding_window_view(xp, (KERNEL, KERNEL), axis=(1, 2))  # (B, H, W, C, 3, 3) view
    return windows.reshape(b * h * w, c * KERNEL * KERNEL)  # the one copy


def col2im(cols: np.ndarray, shape: tuple[int, int, int, int]) -> np.ndarray:
    """Adjoint of :func:`im2col`: add each patch row back onto the (B, H, W, C) image."""
    b, h, w, c = shape
    pad = KERNEL // 2
    patches = cols.reshape(b, h, w, c, KERNEL, KERNEL)
    xp = np.zeros((b, h + 2 * pad, w + 2 * pad, c), dtype=cols.dtype)
    for ky in range(KERNEL):
        for kx in range(KERNEL):
            xp[:, ky : ky + h, kx : kx + w, :] += patches[..., ky, kx]
    return xp[:, pad : pad + h, pad : pad + w, :]


def maxpool_forward(a: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """2x2 max-pool of ``a`` (B, H, W, C) with stride 2.

    Returns the pooled ``(B, H/2, W/2, C)`` and, per output, which of its four
    inputs won (0..3, the first on ties) for the backward pass.
    """
    b, h, w, c = a.shape
    windows = a.reshape(b, h // POOL, POOL, w // POOL, POOL, c).transpose(0, 1, 3, 5, 2, 4)
    windows = windows.reshape(b, h // POOL, w // POOL, c, POOL * POOL)
    winner = windows.argmax(axis=-1)
    return np.take_along_axis(windows, winner[..., None], axis=-1)[..., 0], winner


def maxpool_backward(dout: np.ndarray, winner: np.ndarray) -> np.ndarray:
    """Gradient of :func:`maxpool_forward`: each output's gradient goes to its winner only.

    Only the winner, not every tied input: a tie (e.g. two ReLU zeros) would
    otherwise count the same output's gradient twice.
    """
    b, h2, w2, c = dout.shape
    dwin = np.zeros((b, h2, w2, c, POOL * POOL), dtype=dout.dtype)
    np.put_along_axis(dwin, winner[..., None], dout[..., None], axis=-1)
    dwin = dwin.reshape(b, h2, w2, c, POOL, POOL).transpose(0, 1, 4, 2, 5, 3)
    return dwin.reshape(b, h2 * POOL, w2 * POOL, c)


def forward(params: Params, x: np.ndarray) -> tuple[np.ndarray, Cache]:
    """Logits for a batch of images.

    Args:
        params: the arrays from :func:`init_params` (or ``FlatParams.params``).
        x: images ``(B, 8, 8)``, converted to the parameters' dtype.

    Returns:
        ``(logits (B, 10), cache)``; the cache holds what :func:`backward` needs.
    """
    dtype = params["dense.weight"].dtype
    a = np.asarray(x, dtype=dtype)[..., None]  # (B, H, W, 1)
    cache: Cache = {"layers": []}
    for i in range(conv_layers(params)):
        w, bias = params[f"conv{i}.weight"], params[f"conv{i}.bias"]
        b, h, wd, _ = a.shape
        cols = im2col(a)
        z = cols @ w.reshape(w.shape[0], -1).T
        z += bias
        z = z.reshape(b, h, wd, w.shape[0])
        relu = np.maximum(z, 0)
        a, winner = maxpool_forward(relu)
        # z > 0 is the ReLU's derivative (taken as 0 at exactly 0).
        cache["layers"].append(
            {"cols": cols, "in_shape": (b, h, wd, w.shape[1]), "active": z > 0, "winner": winner}
        )
    cache["pooled_shape"] = a.shape
    features = a.reshape(a.shape[0], -1)
    cache["features"] = features
    logits = features @ params["dense.weight"].T
    logits += params["dense.bias"]
    return logits, cache


def softmax_cross_entropy(logits: np.ndarray, labels: np.ndarray) -> tuple[float, np.ndarray]:
    """Mean cross-entropy (nats per example) and its gradient with respect to ``logits``.

    Works on log-softmax (the logits shifted by their row maximum) so that no
    ``exp`` overflows and no ``log`` sees a zero.

    Args:
        logits: ``(B, K)``.
        labels: ``(B,)`` integers in ``[0, K)``.

    Returns:
        ``(loss, dlogits)`` with ``dlogits`` of shape ``(B, K)`` and the logits' dtype.
    """
    n = logits.shape[0]
    shifted = logits - logits.max(axis=1, keepdims=True)
    log_norm = np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    log_probs = shifted - log_norm
    rows = np.arange(n)
    loss = -float(log_probs[rows, labels].mean())
    dlogits = np.exp(log_probs)
    dlogits[rows, labels] -= 1
    dlogits /= n
    return loss, dlogits


def backward(params: Params, grads: Params, cache: Cache, dlogits: np.ndarray) -> None:
    """Backpropagate ``dlogits`` (B, 10) through the network.

    Writes (overwrites, does not accumulate) every parameter's gradient into
    ``grads[name]``, in place: with ``grads = flat.grads`` the gradients land
    straight in ``FlatParams.grad`` for the optimizer, with no copy.
    """
    np.matmul(dlogits.T, cache["features"], out=grads["dense.weight"])
    np.sum(dlogits, axis=0, out=grads["dense.bias"])
    da = (dlogits @ params["dense.weight"]).reshape(cache["pooled_shape"])
    for i in reversed(range(len(cache["layers"]))):
        layer = cache["layers"][i]
        w = params[f"conv{i}.weight"]
        dz = maxpool_backward(da, layer["winner"])
        dz *= layer["active"]
        dz2 = dz.reshape(-1, w.shape[0])  # (B*H*W, F)
        np.matmul(dz2.T, layer["cols"], out=grads[f"conv{i}.weight"].reshape(w.shape[0], -1))
        np.sum(dz2, axis=0, out=grads[f"conv{i}.bias"])
        if i:  # the first layer's input is the image: no gradient needed
            da = col2im(dz2 @ w.reshape(w.shape[0], -1), layer["in_shape"])


def loss_and_grad(flat: fastadam.FlatParams, x: np.ndarray, labels: np.ndarray) -> float:
    """Forward + backward on one batch; the gradients end up in ``flat.grad``. Returns the loss."""
    logits, cache = forward(flat.params, x)
    loss, dlogits = softmax_cross_entropy(logits, labels)
    backward(flat.params, flat.grads, cache, dlogits)
    return loss


def predict(params: Params, x: np.ndarray, batch_size: int = 512) -> np.ndarray:
    """Predicted class (int64, shape ``(n,)``) of each image in ``x`` (n, 8, 8)."""
    out = [
        forward(params, x[i : i + batch_size])[0].argmax(axis=1)
        for i in range(0, len(x), batch_size)
    ]
    return np.concatenate(out)


def accuracy(params: Params, x: np.ndarray, labels: np.ndarray) -> float:
    """Fraction of ``x`` classified correctly, in [0, 1]."""
    return float(np.mean(predict(params, x) == labels))


# --- training -----------------------------------------------------------------


@dataclass
class TrainResult:
    """What :func:`train` leaves behind. Times are wall-clock seconds."""

    flat: fastadam.FlatParams
    opt: fastadam.Adam
    history: list[dict[str, float]] = field(default_factory=list)  # one dict per epoch
    optimizer_seconds: float = 0.0  # sum over all opt.step() calls
    train_seconds: float = 0.0  # the batch loops (forward, backward, step), no evaluation
    steps: int = 0


def train(
    data: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray],
    *,
    channels: Sequence[int] = DEFAULT_CHANNELS,
    epochs: int = DEFAULT_EPOCHS,
    batch_size: int = DEFAULT_BATCH_SIZE,
    lr: float = DEFAULT_LR,
    weight_decay: float = 0.0,
    seed: int = DEFAULT_SEED,
    backend: str = "auto",
    state_dtype: str | None = None,
    cosine: bool = True,
    max_steps: int | None = None,
    evaluate: bool = True,
    progress: bool = False,
    log: Callable[[str], None] | None = None,
) -> TrainResult:
    """Train a fresh model with ``fastadam.Adam`` over one float32 ``FlatParams``.

    Deterministic given ``seed`` (it draws the initial weights and the batch
    order) and the BLAS; the backend does not change the result, since every
    fastadam backend is bit-identical to the NumPy reference.

    Args:
        data: ``(x_train, y_train, x_test, y_test)`` from :func:`load_data`.
        state_dtype: the optimizer's ``exp_avg``/``exp_avg_sq`` dtype: None (float32,
            the parameters') or ``"bfloat16"`` (stochastically rounded; half the memory).
        max_steps: stop after this many optimizer steps (for quick checks).
        evaluate: compute train/test accuracy after every epoch.
        progress: show a tqdm bar over each epoch's batches.
        log: called with one line per epoch (e.g. ``print``).
    """
    from tqdm import tqdm

    x_train, y_train, x_test, y_test = data
    rng = np.random.default_rng(seed)
    flat = fastadam.FlatParams(init_params(rng, channels), dtype=np.float32)
    opt = fastadam.Adam(
        flat, lr=lr, weight_decay=weight_decay, state_dtype=state_dtype, backend=backend
    )
    result = TrainResult(flat=flat, opt=opt)
    n = len(x_train)
    total_steps = epochs * -(-n // batch_size)
    if max_steps is not None:
        total_steps = min(total_steps, max_steps)
    for epoch in range(1, epochs + 1):
        order = rng.permutation(n)
        starts = range(0, n, batch_size)
        bar = tqdm(
            starts,
            desc=f"epoch {epoch}/{epochs}",
            unit="batch",
            leave=False,
            disable=not progress,
            dynamic_ncols=True,
        )
        total_loss, seen = 0.0, 0
        t_epoch = time.perf_counter()
        for start in bar:
            if cosine:
                # Cosine decay from lr to 0 over the run: big steps early, and the
                # last epochs settle instead of hopping between nearby minima.
                frac = result.steps / total_steps
                opt.param_groups[0]["lr"] = lr * 0.5 * (1.0 + math.cos(math.pi * frac))
            idx = order[start : start + batch_size]
            loss = loss_and_grad(flat, x_train[idx], y_train[idx])
            t0 = time.perf_counter()
            opt.step()
            result.optimizer_seconds += time.perf_counter() - t0
            result.steps += 1
            total_loss += loss * len(idx)
            seen += len(idx)
            bar.set_postfix(loss=f"{loss:.4f}", refresh=False)
            if max_steps is not None and result.steps >= max_steps:
                break
        bar.close()
        result.train_seconds += time.perf_counter() - t_epoch
        record = {"epoch": epoch, "loss": total_loss / seen}
        if evaluate:
            record["train_acc"] = accuracy(flat.params, x_train, y_train)
            record["test_acc"] = accuracy(flat.params, x_test, y_test)
        result.history.append(record)
        if log is not None:
            line = f"epoch {epoch:3d}  loss {record['loss']:.4f}"
            if evaluate:
                line += f"  train acc {record['train_acc']:.4f}  test acc {record['test_acc']:.4f}"
            log(line)
        if max_steps is not None and result.steps >= max_steps:
            break
    return result


def time_optimizer_backends(
    result: TrainResult, backends: Sequence[str], repeats: int = 200, warmup: int = 10
) -> dict[str, list[float]]:
    """Seconds per ``opt.step()`` of each backend on the trained model, ``repeats`` samples each.

    Each backend steps its own copies of the trained parameters, the last
    batch's gradient and the optimizer state (through ``state_dict``), so the
    trained model is left untouched and every backend does the same work.
    """
    src = result.opt
    times: dict[str, list[float]] = {}
    for name in backends:
        flat = fastadam.FlatParams(result.flat.params, dtype=result.flat.dtype)  # copies the values
        flat.grad[...] = result.flat.grad  # same names and order, so the same layout
        group = src.param_groups[0]
        opt = fastadam.Adam(
            flat,
            lr=group["lr"],
            betas=group["betas"],
            eps=group["eps"],
            weight_decay=group["weight_decay"],
            state_dtype="8bit" if src.min_8bit_size is not None else src.state_dtype,
            backend=name,
        )
        opt.load_state_dict(copy.deepcopy(src.state_dict()))
        for _ in range(warmup):  # JIT, caches, lazy library loads
            opt.step()
        samples = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            opt.step()
            samples.append(time.perf_counter() - t0)
        times[name] = samples
    return times


# --- command line -------------------------------------------------------------


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def _nonnegative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


def _channels(text: str) -> tuple[int, ...]:
    try:
        out = tuple(int(c) for c in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers, got {text!r}"
        ) from None
    if not 1 <= len(out) <= 3 or min(out) < 1:
        raise argparse.ArgumentTypeError("1 to 3 positive channel counts (8 -> 4 -> 2 -> 1 px)")
    return out


def _blas_threads(n: int) -> contextlib.AbstractContextManager[Any]:
    """A context that caps the BLAS thread pool at ``n`` threads, restored on exit.

    The products here are tiny (at most 4096 x 9 by 9 x 16, or 1024 x 144 by
    144 x 32): a threaded BLAS gains nothing on them and, on a busy machine,
    its spinning workers slowed training several-fold in our runs. One thread
    also makes the results independent of the core count. threadpoolctl comes
    with scikit-learn; without it the BLAS keeps its own setting.
    """
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        return contextlib.nullcontext()
    return threadpool_limits(limits=n, user_api="blas")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="Train a NumPy CNN on scikit-learn's 8x8 digits with fastadam.Adam.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument(
        "--backend",
        default="auto",
        choices=("auto", *fastadam.BACKEND_NAMES),
        help="fastadam kernel used for training",
    )
    p.add_argument("--epochs", type=_positive_int, default=DEFAULT_EPOCHS)
    p.add_argument(
        "--seed",
        type=int,
        default=DEFAULT_SEED,
        help="train/test split, initial weights and batch order",
    )
    p.add_argument("--batch-size", type=_positive_int, default=DEFAULT_BATCH_SIZE)
    p.add_argument("--lr", type=float, default=DEFAULT_LR, help="Adam learning rate")
    p.add_argument("--weight-decay", type=float, default=0.0, help="Adam (L2) weight decay")
    p.add_argument(
        "--channels",
        type=_channels,
        default=DEFAULT_CHANNELS,
        help="output channels of each conv block, comma-separated",
    )
    p.add_argument("--test-fraction", type=float, default=DEFAULT_TEST_FRACTION)
    p.add_argument(
        "--threads",
        type=_positive_int,
        default=None,
        help="fastadam.set_num_threads (default: fastadam's own)",
    )
    p.add_argument(
        "--blas-threads",
        type=_positive_int,
        default=1,
        help="BLAS threads for the forward/backward matrix products",
    )
    p.add_argument(
        "--bench-steps",
        type=_nonnegative_int,
        default=200,
        help="opt.step() calls timed per backend for the table (0: skip)",
    )
    p.add_argument(
        "--state-dtype",
        choices=("float32", "bfloat16", "8bit"),
        default="float32",
        help="dtype of Adam's moment estimates (bfloat16: half the memory, stochastic rounding; "
        "8bit: block-wise 8-bit states, about a quarter of the memory)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Train, report per-epoch metrics and optimizer timings; return the exit status."""
    args = build_parser().parse_args(argv)
    if not 0.0 < args.test_fraction < 1.0:
        print("error: --test-fraction must be in (0, 1)", file=sys.stderr)
        return 2
    if args.threads is not None:
        fastadam.set_num_threads(args.threads)
    try:
        backend = fastadam.auto_backend() if args.backend == "auto" else args.backend
        fastadam.Adam([np.zeros(1, np.float32)], backend=backend)  # fail early, with the reason
    except (fastadam.BackendUnavailableError, ValueError) as exc:  # ValueError: FASTADAM_BACKEND
        print(f"error: {exc}", file=sys.stderr)
        return 2
    with _blas_threads(args.blas_threads):
        return _run(args, backend)


def _run(args: argparse.Namespace, backend: str) -> int:

    data = load_data(args.seed, args.test_fraction)
    n_params = sum(math.prod(s) for s in param_shapes(args.channels).values())
    print(
        f"digits: {len(data[0])} train / {len(data[2])} test images; "
        f"model: conv {'-'.join(map(str, args.channels))} + dense, {n_params} parameters; "
        f"backend: {backend}"
    )

    # The first step on a backend pays one-time costs (Numba loading its
    # compiled kernels, the C library being opened): pay them on scratch arrays
    # so the optimizer time below is the steady-state cost of training.
    t0 = time.perf_counter()
    scratch = fastadam.FlatParams([np.zeros(16, np.float32)])
    fastadam.Adam(scratch, state_dtype=args.state_dtype, backend=backend).step()
    print(
        f"first {backend} step (one-time load/JIT, not counted below): "
        f"{(time.perf_counter() - t0) * 1e3:.1f} ms"
    )

    result = train(
        data,
        channels=args.channels,
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        weight_decay=args.weight_decay,
        seed=args.seed,
        backend=backend,
        state_dtype=args.state_dtype,
        progress=not args.no_progress,
        log=print,
    )
    share = result.optimizer_seconds / result.train_seconds if result.train_seconds else 0.0
    print(
        f"optimizer ({backend}): {result.optimizer_seconds * 1e3:.1f} ms in {result.steps} "
        f"steps ({result.optimizer_seconds / result.steps * 1e6:.1f} us/step), "
        f"{share:.1%} of {result.train_seconds:.2f} s training"
    )

    if args.bench_steps > 0:
        names = fastadam.available_backends()
        times = time_optimizer_backends(result, names, repeats=args.bench_steps)
        base = statistics.median(times["numpy"]) if "numpy" in times else None
        print(
            f"\nopt.step() on this model ({result.flat.size} float32 elements, one buffer), "
            f"{args.bench_steps} calls per backend:"
        )
        print(f"  {'backend':<8} {'median us':>10} {'min us':>9} {'vs numpy':>9}")
        for name, samples in times.items():
            med = statistics.median(samples)
            ratio = f"{base / med:.2f}x" if base else "-"
            print(f"  {name:<8} {med * 1e6:>10.1f} {min(samples) * 1e6:>9.1f} {ratio:>9}")
        missing = sorted(set(fastadam.BACKEND_NAMES) - set(names))
        for name in missing:
            reason = fastadam.unavailable_reasons().get(name, "?").split(";")[0]
            print(f"  {name:<8} unavailable: {reason}")
        print()

    test_acc = accuracy(result.flat.params, data[2], data[3])
    print(f"test accuracy: {test_acc:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
