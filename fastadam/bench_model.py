"""``fastadam bench --model``: a whole model's optimizer step, optimizer against optimizer.

The size sweep times one array at a time. A real model is a list of tensors,
most of them small (biases, layer norms) and a few large (embeddings, MLP
weights), and an optimizer that makes one call per tensor pays its per-call
cost once per tensor. This mode builds a model's parameter list with GPT-2's
shapes (no transformers dependency) and times, on that list:

* ``fastadam.torch.AdamW`` with float32 states, with bfloat16 states, and with
  8-bit states (``state_dtype="8bit"``: tensors below 4,096 elements keep float32 ones);
* ``fastadam.AdamW`` over NumPy arrays (the gradients passed as a list);
* ``torch.optim.AdamW(fused=True)`` and ``torch.optim.AdamW(foreach=True)``.

Each optimizer gets its own copy of the parameters and gradients (the same
initial values, the random gradients set once and stepped every step) and its
own state. All of them are timed in alternating rounds in one process
(:func:`fastadam.bench.time_interleaved`), so their ratios compare like with
like. Reported per row: median ms per step, GB/s (28 B/element with float32
states, 20 with bfloat16, about 16 with 8-bit ones), speed-up over torch fused,
and µs per tensor (ms per step over the tensor count: what a step costs per
tensor, kernel time included).

Models: ``gpt2-small`` (12 layers, 768 wide, 50,257-token vocabulary, 1,024
positions: 148 tensors, 124.4M elements), ``gpt2-mini`` (6 layers, 128 wide,
4,096 tokens, 256 positions: 76 tensors, 1.7M elements), or a custom spec,
``gpt2:n_layer=2,n_embd=64,vocab=1000,n_positions=128`` (keys not given keep
gpt2-small's values; ``gpt2-mini:n_layer=2`` starts from gpt2-mini's).
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

import fastadam
from fastadam import bench
from fastadam._q8 import MIN_8BIT_SIZE

#: The keys of a model spec, in the order a custom spec's name lists them.
SPEC_KEYS: tuple[str, ...] = ("n_layer", "n_embd", "vocab", "n_positions")
#: A custom spec's prefix that means "gpt2-small's values, with these changes".
CUSTOM_BASE = "gpt2"
#: Refuse models past this many elements (each optimizer holds 4 arrays of it).
MAX_MODEL_ELEMENTS = bench.MAX_SIZE


@dataclass(frozen=True)
class ModelSpec:
    """A GPT-2-shaped model: its name and the four numbers its shapes follow from."""

    name: str
    n_layer: int
    n_embd: int
    vocab: int
    n_positions: int

    def shapes(self) -> dict[str, tuple[int, ...]]:
        """Parameter name -> shape, in GPT-2's order (Hugging Face names and layout)."""
        d = self.n_embd
        shapes: dict[str, tuple[int, ...]] = {
            "wte.weight": (self.vocab, d),
            "wpe.weight": (self.n_positions, d),
        }
        for i in range(self.n_layer):
            h = f"h.{i}."
            shapes.update(
                {
                    h + "ln_1.weight": (d,),
                    h + "ln_1.bias": (d,),
                    h + "attn.c_attn.weight": (d, 3 * d),
                    h + "attn.c_attn.bias": (3 * d,),
                    h + "attn.c_proj.weight": (d, d),
                    h + "attn.c_proj.bias": (d,),
                    h + "ln_2.weight": (d,),
                    h + "ln_2.bias": (d,),
                    h + "mlp.c_fc.weight": (d, 4 * d),
                    h + "mlp.c_fc.bias": (4 * d,),
                    h + "mlp.c_proj.weight": (4 * d, d),
                    h + "mlp.c_proj.bias": (d,),
                }
            )
        shapes.update({"ln_f.weight": (d,), "ln_f.bias": (d,)})
        return shapes

    @property
    def tensors(self) -> int:
        """2 embeddings, 12 tensors per layer, the final layer norm's 2."""
        return 4 + 12 * self.n_layer

    @property
    def elements(self) -> int:
        """(vocab + n_positions) d + n_layer (12 d² + 13 d) + 2 d."""
        d = self.n_embd
        return (self.vocab + self.n_positions) * d + self.n_layer * (12 * d * d + 13 * d) + 2 * d

    def as_dict(self) -> dict[str, int]:
        return {k: getattr(self, k) for k in SPEC_KEYS}


MODELS: dict[str, ModelSpec] = {
    "gpt2-small": ModelSpec("gpt2-small", n_layer=12, n_embd=768, vocab=50257, n_positions=1024),
    "gpt2-mini": ModelSpec("gpt2-mini", n_layer=6, n_embd=128, vocab=4096, n_positions=256),
}


# -- --model parsing ------------------------------------------------------------------


def _spec_error(text: str) -> argparse.ArgumentTypeError:
    return argparse.ArgumentTypeError(
        f"{text}; --model takes {', '.join(MODELS)} or a spec such as "
        f"{CUSTOM_BASE}:n_layer=2,n_embd=64,vocab=1000,n_positions=128"
    )


def custom_model(base: str, assignments: Sequence[str]) -> ModelSpec:
    """``base`` (``gpt2`` for gpt2-small, or a model's name) with ``key=value`` changes."""
    base = base.strip()
    if base == CUSTOM_BASE:
        start = MODELS["gpt2-small"]
    elif base in MODELS:
        start = MODELS[base]
    else:
        raise _spec_error(f"unknown model {base!r} before ':'")
    values = start.as_dict()
    given: dict[str, int] = {}
    for item in assignments:
        key, eq, value = (s.strip() for s in item.partition("="))
        if not eq or key not in SPEC_KEYS:
            raise _spec_error(
                f"bad model spec item {item.strip()!r}: expected key=value, "
                f"key one of {', '.join(SPEC_KEYS)}"
            )
        if key in given:
            raise _spec_error(f"{key} given twice in a model spec")
        try:
            n = int(value)
        except ValueError:
            n = 0
        if n < 1:
            raise _spec_error(f"bad model spec item {item.strip()!r}: expected a positive integer")
        given[key] = n
    if not given:
        raise _spec_error(f"model spec {base + ':'!r} changes nothing: add key=value items")
    values.update(given)
    name = f"{base}:" + ",".join(f"{k}={given[k]}" for k in SPEC_KEYS if k in given)
    spec = ModelSpec(name, **values)
    if spec.elements > MAX_MODEL_ELEMENTS:
        raise _spec_error(
            f"model {name!r} has {spec.elements:,} elements, more than this command's "
            f"limit of {MAX_MODEL_ELEMENTS:,}"
        )
    return spec


def parse_models(text: str) -> list[ModelSpec]:
    """``"gpt2-mini,gpt2:n_layer=2,n_embd=64"`` -> the specs, in the order given.

    Names are comma-separated; a custom spec's ``key=value`` items are too, and
    run from its ``base:`` to the next name (an item without ``=``).
    """
    specs: list[ModelSpec] = []
    custom: tuple[str, list[str]] | None = None  # the custom spec being read

    def finish_custom() -> None:
        nonlocal custom
        if custom is not None:
            specs.append(custom_model(*custom))
            custom = None

    for token in (t.strip() for t in text.split(",")):
        if not token:
            continue
        if ":" in token:
            finish_custom()
            base, _, first = token.partition(":")
            custom = (base, [first] if first.strip() else [])
        elif "=" in token:
            if custom is None:
                raise _spec_error(f"{token!r} belongs to no model spec (write gpt2:{token},...)")
            custom[1].append(token)
        else:
            finish_custom()
            if token not in MODELS:
                raise _spec_error(f"unknown model {token!r}")
            specs.append(MODELS[token])
    finish_custom()
    if not specs:
        raise _spec_error("--model is empty")
    unique: dict[str, ModelSpec] = {}
    for s in specs:
        unique.setdefault(s.name, s)
    return list(unique.values())


# -- the optimizers -------------------------------------------------------------------

#: Row labels (the ``optimizer`` field of the JSON records).
FASTADAM_TORCH = "fastadam.torch.AdamW"
FASTADAM_NUMPY = "fastadam.AdamW (NumPy arrays)"
TORCH_LABELS = {
    "torch-fused": "torch.optim.AdamW(fused=True)",
    "torch-foreach": "torch.optim.AdamW(foreach=True)",
}
TORCH_FUSED = TORCH_LABELS["torch-fused"]
LR = 1e-3  # every optimizer: torch's AdamW defaults otherwise (weight_decay 1e-2)


@dataclass(frozen=True)
class Row:
    """One optimizer to time: its label, kernel backend and state dtype."""

    optimizer: str
    backend: str  # a fastadam backend, or "torch"
    state_dtype: str  # "float32", "bfloat16" or "8bit"

    @property
    def key(self) -> str:
        return f"{self.optimizer} [{self.backend}, {self.state_dtype} states]"

    def _kinds(self, spec: ModelSpec) -> list[tuple[int, str]]:
        """(elements, the bench's step kind) of each tensor: with 8-bit states, those
        below fastadam.torch's min_8bit_size (4096) keep float32 states."""
        kind = {"bfloat16": bench.BF16_STATES, "8bit": bench.Q8_STATES}.get(
            self.state_dtype, "float32"
        )
        out = []
        for shape in spec.shapes().values():
            n = int(np.prod(shape))
            small_q8 = kind == bench.Q8_STATES and n < MIN_8BIT_SIZE  # the optimizers' default
            out.append((n, "float32" if small_q8 else kind))
        return out

    def step_bytes(self, spec: ModelSpec) -> float:
        """Bytes one step over ``spec``'s tensors moves: 28 per element with float32
        states, 20 with bfloat16, about 16.06 with 8-bit ones."""
        return sum(n * bench.bytes_per_element(k) for n, k in self._kinds(spec))

    def state_bytes(self, spec: ModelSpec) -> int:
        """Optimizer state memory (both moments, their scales) over ``spec``'s tensors."""
        return round(sum(n * bench.state_bytes_per_element(k, n) for n, k in self._kinds(spec)))


def _torch_available() -> bool:
    return importlib.util.find_spec("torch") is not None


def plan_rows(requested: list[str] | None, has_torch: bool) -> tuple[list[Row], list[str]]:
    """(rows to time, notes about rows skipped) for ``--backends`` (None: the default).

    fastadam's rows run on each fastadam backend named (default: ``auto``'s);
    the torch rows are those named, or both when the list names none.
    """
    requested = requested or []
    if bench.BNB in requested:
        raise bench.BenchError(
            f"{bench.BNB} is a peer of the size sweep's 8-bit rows (--dtype q8), not of --model"
        )
    available = set(fastadam.available_backends())
    reasons = fastadam.unavailable_reasons()
    fa = [b for b in requested if b in bench.FASTADAM_BACKENDS]
    for b in fa:
        if b not in available:
            raise bench.BenchError(
                f"backend {b!r} is unavailable here: {reasons.get(b, 'unknown reason')}"
            )
    if not fa:
        fa = [fastadam.auto_backend()]
    named_torch = [b for b in requested if b in bench.TORCH_BACKENDS]
    if named_torch and not has_torch:
        raise bench.BenchError(f"backend {named_torch[0]!r} needs torch, which is not installed")
    notes = []
    rows = []
    if has_torch:
        rows += [Row(FASTADAM_TORCH, b, "float32") for b in fa]
        rows += [Row(FASTADAM_TORCH, b, "bfloat16") for b in fa]
        rows += [Row(FASTADAM_TORCH, b, "8bit") for b in fa]
    rows += [Row(FASTADAM_NUMPY, b, "float32") for b in fa]
    if has_torch:
        rows += [Row(TORCH_LABELS[b], "torch", "float32") for b in named_torch or TORCH_LABELS]
    else:
        notes.append(
            "skipping the torch rows (fastadam.torch.AdamW, torch.optim.AdamW fused and "
            "foreach): torch is not installed (pip install 'fastadam[torch]')"
        )
    return rows, notes


def make_model_arrays(spec: ModelSpec, seed: int = 0) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """(params, grads): float32 arrays of the model's shapes.

    Parameters as GPT-2 initializes its weights (normal, std 0.02); gradients
    normal with no zero (a zero gradient would let the moments decay towards
    the subnormal range, which is slow on x86 and measures the FPU instead).
    """
    rng = np.random.default_rng(seed)
    params, grads = [], []
    for shape in spec.shapes().values():
        p = rng.standard_normal(shape, dtype=np.float32)
        p *= 0.02
        g = rng.standard_normal(shape, dtype=np.float32)
        g[g == 0] = 1
        g *= 1e-3
        params.append(p)
        grads.append(g)
    return params, grads


def make_optimizer_step(
    row: Row, params: list[np.ndarray], grads: list[np.ndarray]
) -> Callable[[], Any]:
    """A no-argument callable doing one step of ``row``'s optimizer over its own copies
    of ``params`` and ``grads`` (its state is created at the first call)."""
    if row.optimizer == FASTADAM_NUMPY:
        ps = [p.copy() for p in params]
        gs = [g.copy() for g in grads]
        opt = fastadam.AdamW(ps, lr=LR, backend=row.backend)
        return lambda: opt.step(gs)
    import torch

    # Tensors in torch's own memory, as a model's parameters and gradients are
    # (64-byte aligned, like the states the optimizers allocate), not views of
    # NumPy arrays (which start 16 bytes past a page, so against torch-made
    # states every vector of a step would straddle two cache lines).
    tensors = []
    for p, g in zip(params, grads):
        t = torch.tensor(p).requires_grad_(True)
        t.grad = torch.tensor(g)
        tensors.append(t)
    if row.optimizer == FASTADAM_TORCH:
        from fastadam.torch import AdamW

        sdt: Any = {"bfloat16": torch.bfloat16, "8bit": "8bit"}.get(row.state_dtype)
        return AdamW(tensors, lr=LR, state_dtype=sdt, backend=row.backend).step
    kind = {TORCH_LABELS["torch-fused"]: "fused", TORCH_LABELS["torch-foreach"]: "foreach"}
    options: dict[str, Any] = {kind[row.optimizer]: True}
    return torch.optim.AdamW(tensors, lr=LR, **options).step


def measure_model(
    spec: ModelSpec,
    rows: list[Row],
    threads: int,
    *,
    min_time: float,
    repeat: int | None,
) -> list[dict[str, Any]]:
    """Build every row's optimizer over ``spec``'s parameters, time them in
    alternating rounds, and return one record per row."""
    params, grads = make_model_arrays(spec)
    fns = {row.key: make_optimizer_step(row, params, grads) for row in rows}
    del params, grads  # each optimizer holds its own copies
    try:
        timed = bench.time_interleaved(fns, min_time=min_time, repeat=repeat)
    finally:
        del fns
        gc.collect()
    records: list[dict[str, Any]] = []
    for row in rows:
        median, reps = timed[row.key]
        records.append(
            {
                "kind": "model",
                "model": spec.name,
                "spec": spec.as_dict(),
                "tensors": spec.tensors,
                "elements": spec.elements,
                "optimizer": row.optimizer,
                "backend": row.backend,
                "state_dtype": row.state_dtype,
                "state_bytes": row.state_bytes(spec),
                "median_s": median,
                "repeats": reps,
                "ms_per_step": median * 1e3,
                "us_per_tensor": median * 1e6 / spec.tensors,
                "gbps": row.step_bytes(spec) / median / 1e9,
                "speedup_vs_torch_fused": None,
                "threads": threads,
            }
        )
    fused = next((r for r in records if r["optimizer"] == TORCH_FUSED), None)
    if fused is not None:
        for r in records:
            r["speedup_vs_torch_fused"] = fused["median_s"] / r["median_s"]
    return records


# -- targets ----------------------------------------------------------------------------

#: (model, state dtype, speed-up of fastadam.torch.AdamW over torch fused, needs AVX-512).
MODEL_TARGETS: tuple[tuple[str, str, float, bool], ...] = (
    ("gpt2-mini", "float32", 1.5, False),
    ("gpt2-small", "float32", 1.05, False),
    ("gpt2-small", "bfloat16", 1.3, True),
)
#: The backends the targets are set for (numpy is the reference, not a target).
TARGET_BACKENDS = ("c", "numba")


def evaluate_model_targets(
    records: list[dict[str, Any]], c_isa: str | None
) -> tuple[list[dict[str, Any]], list[str]]:
    """(each target the records decide, notes on targets not checked on this machine)."""
    out, notes = [], []
    for model, sdt, goal, avx512 in MODEL_TARGETS:
        for r in records:
            if (r["model"], r["state_dtype"], r["optimizer"]) != (model, sdt, FASTADAM_TORCH):
                continue
            if r["backend"] not in TARGET_BACKENDS or r["speedup_vs_torch_fused"] is None:
                continue
            if avx512 and c_isa != "avx512":
                note = (
                    f"{model}, {sdt} states: target >= {goal:g}x torch fused not checked "
                    f"(AVX-512 machines only; the C backend's ISA here is {c_isa or 'n/a'})"
                )
                if note not in notes:
                    notes.append(note)
                continue
            value = r["speedup_vs_torch_fused"]
            out.append(
                {
                    "model": model,
                    "optimizer": r["optimizer"],
                    "backend": r["backend"],
                    "state_dtype": sdt,
                    "target": "speed-up vs torch fused",
                    "value": value,
                    "goal": goal,
                    "met": value >= goal,
                }
            )
    return out, notes


# -- tables ------------------------------------------------------------------------------


def _mib(n_bytes: float) -> str:
    return f"{n_bytes / 2**20:,.1f}"


def models_table(specs: list[ModelSpec], markdown: bool) -> str:
    rows = [
        [
            s.name,
            str(s.n_layer),
            str(s.n_embd),
            str(s.vocab),
            str(s.n_positions),
            str(s.tensors),
            f"{s.elements:,}",
            _mib(4 * s.elements),
        ]
        for s in specs
    ]
    headers = ["model", "n_layer", "n_embd", "vocab", "n_positions", "tensors", "elements"]
    headers.append("params MiB")
    return bench.render_table(headers, rows, markdown, [False] + [True] * 7)


def model_table(records: list[dict[str, Any]], markdown: bool) -> str:
    rows = [
        [
            r["model"],
            r["optimizer"],
            r["backend"],
            "bf16" if r["state_dtype"] == "bfloat16" else r["state_dtype"],
            _mib(r["state_bytes"]),
            f"{r['ms_per_step']:.2f}",
            f"{r['gbps']:.1f}",
            bench._fmt_ratio(r["speedup_vs_torch_fused"]),
            f"{r['us_per_tensor']:.1f}",
        ]
        for r in records
    ]
    headers = ["model", "optimizer", "backend", "states", "state MiB", "ms/step", "GB/s"]
    headers += ["×torch-fused", "µs/tensor"]
    return bench.render_table(headers, rows, markdown, [False] * 4 + [True] * 5)


def model_targets_table(targets: list[dict[str, Any]], markdown: bool) -> str:
    rows = [
        [
            t["model"],
            t["optimizer"],
            t["backend"],
            "bf16" if t["state_dtype"] == "bfloat16" else t["state_dtype"],
            t["target"],
            f"{t['value']:.2f}",
            f">= {t['goal']:g}",
            "met" if t["met"] else "NOT MET",
        ]
        for t in targets
    ]
    headers = ["model", "optimizer", "backend", "states", "target", "measured", "goal", ""]
    return bench.render_table(headers, rows, markdown, [False] * 5 + [True, True, False])


# -- the mode --------------------------------------------------------------------------------

#: Sweep options that mean nothing here: (attribute, option, value when not given).
_SWEEP_ONLY = (
    ("sizes", "--sizes", None),
    ("dtype", "--dtype", None),
    ("roofline_per_size", "--roofline-per-size", False),
    ("no_per_call", "--no-per-call", False),
    ("plot", "--plot", None),
)


def run(args: argparse.Namespace) -> int:
    """``bench --model``: measure, print the tables (the targets with ``--targets``), write
    ``--json``; return 0."""
    for attr, option, unset in _SWEEP_ONLY:
        if getattr(args, attr, unset) != unset:
            raise bench.BenchError(f"{option} is an option of the size sweep, not of --model")
    specs: list[ModelSpec] = args.model
    has_torch = _torch_available()
    rows, notes = plan_rows(args.backends, has_torch)
    for note in notes:
        print(note, file=sys.stderr)

    threads = bench.apply_threads(args.threads, has_torch)  # torch's too: the same count

    from tqdm import tqdm

    cpu_before = bench._cpu_seconds()
    wall_before = time.perf_counter()
    records: list[dict[str, Any]] = []
    bar = tqdm(
        total=len(specs),
        file=sys.stderr,
        unit="model",
        disable=True if args.no_progress else None,
        leave=False,
        dynamic_ncols=True,
    )
    try:
        for spec in specs:
            bar.set_description(f"{spec.name}: {len(rows)} optimizers")
            records += measure_model(
                spec, rows, threads, min_time=args.min_time, repeat=args.repeat
            )
            bar.update()
    finally:
        bar.close()
    wall = time.perf_counter() - wall_before

    info = bench.machine_info(threads)
    bench.note_others_busy(info, cpu_before, wall)
    md = args.markdown
    out = [f"- {line}" if md else line for line in bench.header_lines(info, {})]
    out += ["", "Models (GPT-2 shapes, float32 parameters):", "", models_table(specs, md)]
    rounds = args.repeat if args.repeat is not None else bench.INTERLEAVE_ROUNDS
    if len(rows) == 1:
        how = "median of timed steps"
    else:
        how = f"median of timed steps, the optimizers timed in {rounds} alternating rounds"
    out += [
        "",
        f"Optimizer step over the whole model ({how}; each optimizer has its own "
        "parameters, gradients and states; GB/s counts 28 B/element with float32 states, "
        "20 with bf16; µs/tensor = ms/step / tensors):",
        "",
        model_table(records, md),
    ]
    if args.targets:
        targets, target_notes = evaluate_model_targets(records, info["c_isa"])
        if targets:
            out += ["", "Speed targets:", "", model_targets_table(targets, md)]
        if target_notes:
            out += [""] + [f"- {n}" if md else n for n in target_notes]
    print("\n".join(out))

    bench.finish_run(info, args.json, records)
    return 0
