"""A whole model's optimizer step: one buffer versus one call per array.

    pytest bench/test_bench_model.py --benchmark-only

The parameters are shaped like a small GPT-style transformer: 101 float32
arrays, 10.6M elements (token and position embeddings, 8 blocks of layer norm
+ attention + MLP weights and biases, a final layer norm and an untied output
head). Most arrays are small (256-element biases), a few are large, as in a
real model. Variants, per fast backend:

* ``flat-optimizer``: ``fastadam.Adam`` over a ``FlatParams``: one kernel call;
* ``list-optimizer``: ``fastadam.Adam`` over the 101 separate arrays: 101 calls;
* ``flat-adam_step``: one ``adam_step`` over a plain buffer of the same total
  size (the floor: no optimizer bookkeeping at all);

and ``torch.optim.Adam(fused=True)`` / ``(foreach=True)`` over the same 101
arrays as tensors (sharing their memory). The gap between the first two is the
per-call overhead that ``FlatParams`` removes.
"""

from __future__ import annotations

import numpy as np
import pytest

import fastadam
from fastadam.bench import bytes_per_element, make_state

VOCAB, D_MODEL, LAYERS, CONTEXT, MLP_RATIO = 8192, 256, 8, 512, 4


def transformer_shapes() -> dict[str, tuple[int, ...]]:
    """Parameter name -> shape of a small pre-norm transformer language model."""
    d, h = D_MODEL, MLP_RATIO * D_MODEL
    shapes: dict[str, tuple[int, ...]] = {"tok_emb": (VOCAB, d), "pos_emb": (CONTEXT, d)}
    for i in range(LAYERS):
        shapes.update(
            {
                f"h{i}.ln1.weight": (d,),
                f"h{i}.ln1.bias": (d,),
                f"h{i}.attn.qkv.weight": (3 * d, d),
                f"h{i}.attn.qkv.bias": (3 * d,),
                f"h{i}.attn.proj.weight": (d, d),
                f"h{i}.attn.proj.bias": (d,),
                f"h{i}.ln2.weight": (d,),
                f"h{i}.ln2.bias": (d,),
                f"h{i}.mlp.fc.weight": (h, d),
                f"h{i}.mlp.fc.bias": (h,),
                f"h{i}.mlp.proj.weight": (d, h),
                f"h{i}.mlp.proj.bias": (d,),
            }
        )
    shapes.update({"ln_f.weight": (d,), "ln_f.bias": (d,), "lm_head.weight": (VOCAB, d)})
    return shapes


SHAPES = transformer_shapes()
TOTAL = sum(int(np.prod(s)) for s in SHAPES.values())
BYTES_PER_STEP = bytes_per_element(np.float32) * TOTAL
GROUP = f"model: {len(SHAPES)} arrays, {TOTAL / 1e6:.1f}M float32"
ROUNDS = 30  # ~10 ms a step at the memory limit on 2 cores: well under a second each


def _model(seed: int = 0) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """(params, grads): name -> float32 array, mid-training-like values."""
    rng = np.random.default_rng(seed)
    params = {k: rng.standard_normal(s, dtype=np.float32) for k, s in SHAPES.items()}
    grads = {k: rng.standard_normal(s, dtype=np.float32) for k, s in SHAPES.items()}
    return params, grads


def _run(benchmark, report_gbps, fn, name: str) -> None:
    benchmark.group = GROUP
    benchmark.extra_info.update(variant=name, arrays=len(SHAPES), elements=TOTAL)
    benchmark.pedantic(fn, rounds=ROUNDS, iterations=1, warmup_rounds=2)
    report_gbps(benchmark, BYTES_PER_STEP)


@pytest.mark.parametrize("backend", ["numba", "c"])
def test_flat_optimizer(benchmark, report_gbps, require_backend, backend: str) -> None:
    require_backend(backend)
    params, grads = _model()
    flat = fastadam.FlatParams(params)
    for k, g in grads.items():
        flat.grads[k][...] = g
    opt = fastadam.Adam(flat, lr=1e-3, backend=backend)
    _run(benchmark, report_gbps, opt.step, f"flat-optimizer-{backend}")


@pytest.mark.parametrize("backend", ["numba", "c"])
def test_list_optimizer(benchmark, report_gbps, require_backend, backend: str) -> None:
    require_backend(backend)
    params, grads = _model()
    opt = fastadam.Adam(list(params.values()), lr=1e-3, backend=backend)
    grad_list = list(grads.values())
    _run(benchmark, report_gbps, lambda: opt.step(grad_list), f"list-optimizer-{backend}")


@pytest.mark.parametrize("backend", ["numba", "c"])
def test_flat_adam_step(benchmark, report_gbps, require_backend, backend: str) -> None:
    require_backend(backend)
    p, g, m, v = make_state(TOTAL, np.float32)
    steps = iter(range(1, 1 << 30))

    def step() -> None:
        fastadam.adam_step(p, g, m, v, step=next(steps), lr=1e-3, backend=backend)

    _run(benchmark, report_gbps, step, f"flat-adam_step-{backend}")


@pytest.mark.parametrize("kind", ["fused", "foreach"])
def test_torch_adam(benchmark, report_gbps, require_backend, kind: str) -> None:
    require_backend("torch-" + kind)
    import torch

    params, grads = _model()
    tensors = []
    for k, p in params.items():
        t = torch.from_numpy(p).requires_grad_(True)
        t.grad = torch.from_numpy(grads[k])
        tensors.append(t)
    opt = torch.optim.Adam(tensors, lr=1e-3, **{kind: True})
    _run(benchmark, report_gbps, opt.step, f"torch-{kind}")
