"""``python -m fastadam bench --model``: whole-model optimizer steps over GPT-2 shapes.

What the mode accepts and refuses, the shapes it builds, and a tiny model run
end to end. As in test_bench_cli.py, timings are never judged.
"""

from __future__ import annotations

import importlib.util
import json
import math

import numpy as np
import pytest

import fastadam
from fastadam import bench, bench_model

HAS_TORCH = importlib.util.find_spec("torch") is not None

TINY = "gpt2:n_layer=2,n_embd=16,vocab=64,n_positions=8"
TINY_SPEC = dict(n_layer=2, n_embd=16, vocab=64, n_positions=8)
FAST = [b for b in ("numba", "c") if b in fastadam.available_backends()]


def gpt2_elements(n_layer: int, n_embd: int, vocab: int, n_positions: int) -> int:
    """GPT-2's parameter count, tensor by tensor (independent of ModelSpec.elements)."""
    d = n_embd
    per_layer = (
        2 * d  # ln_1 weight, bias
        + d * 3 * d + 3 * d  # attn.c_attn weight, bias
        + d * d + d  # attn.c_proj
        + 2 * d  # ln_2
        + d * 4 * d + 4 * d  # mlp.c_fc
        + 4 * d * d + d  # mlp.c_proj
    )  # fmt: skip
    return vocab * d + n_positions * d + n_layer * per_layer + 2 * d


# -- the shapes ------------------------------------------------------------------------


def test_gpt2_small_has_gpt2s_148_tensors_and_124m_elements():
    spec = bench_model.MODELS["gpt2-small"]
    shapes = spec.shapes()
    assert len(shapes) == spec.tensors == 148
    total = sum(math.prod(s) for s in shapes.values())
    assert total == spec.elements == 124_439_808
    assert shapes["wte.weight"] == (50257, 768)
    assert shapes["wpe.weight"] == (1024, 768)
    assert shapes["h.0.attn.c_attn.weight"] == (768, 2304)
    assert shapes["h.11.mlp.c_proj.weight"] == (3072, 768)
    assert shapes["h.11.mlp.c_fc.bias"] == (3072,)
    assert list(shapes)[-2:] == ["ln_f.weight", "ln_f.bias"]


def test_gpt2_mini_has_76_tensors():
    spec = bench_model.MODELS["gpt2-mini"]
    shapes = spec.shapes()
    assert len(shapes) == spec.tensors == 76
    expected = gpt2_elements(n_layer=6, n_embd=128, vocab=4096, n_positions=256)
    assert expected == 1_746_944
    assert sum(math.prod(s) for s in shapes.values()) == spec.elements == expected


def test_model_arrays_are_float32_of_the_shapes_with_no_zero_gradient():
    spec = bench_model.custom_model("gpt2", [f"{k}={v}" for k, v in TINY_SPEC.items()])
    params, grads = bench_model.make_model_arrays(spec)
    shapes = list(spec.shapes().values())
    assert [p.shape for p in params] == [g.shape for g in grads] == shapes
    assert all(a.dtype == np.float32 and a.flags.c_contiguous for a in params + grads)
    assert all(np.all(g != 0) for g in grads)
    again, _ = bench_model.make_model_arrays(spec)  # same seed, same values
    assert all(np.array_equal(a, b) for a, b in zip(params, again))


# -- --model parsing ---------------------------------------------------------------------


def test_parse_models_names_in_order_without_duplicates():
    got = bench_model.parse_models("gpt2-small, gpt2-mini,gpt2-small")
    assert [s.name for s in got] == ["gpt2-small", "gpt2-mini"]


def test_parse_models_custom_specs_among_names():
    got = bench_model.parse_models(f"gpt2-mini,{TINY},gpt2-mini:n_layer=2,gpt2-small")
    assert [s.name for s in got] == [
        "gpt2-mini",
        TINY,
        "gpt2-mini:n_layer=2",
        "gpt2-small",
    ]
    tiny = got[1]
    assert tiny.as_dict() == TINY_SPEC
    assert tiny.tensors == 4 + 12 * 2
    assert tiny.elements == gpt2_elements(**TINY_SPEC)
    # keys not given keep the base model's values
    assert got[2].as_dict() == dict(bench_model.MODELS["gpt2-mini"].as_dict(), n_layer=2)
    only_layers = bench_model.parse_models("gpt2:n_layer=1")[0]
    assert only_layers.as_dict() == dict(bench_model.MODELS["gpt2-small"].as_dict(), n_layer=1)
    # the name lists the keys given, in a fixed order
    swapped = bench_model.parse_models("gpt2:vocab=64,n_embd=16,n_positions=8,n_layer=2")[0]
    assert swapped.name == TINY


@pytest.mark.parametrize(
    "bad, message",
    [
        ("gpt2-huge", "unknown model 'gpt2-huge'"),
        ("gpt2-mini,bert", "unknown model 'bert'"),
        ("llama:n_layer=2", "unknown model 'llama' before ':'"),
        ("gpt2:depth=3", "bad model spec item 'depth=3'"),
        ("gpt2:n_layer=0", "expected a positive integer"),
        ("gpt2:n_layer=two", "expected a positive integer"),
        ("gpt2:n_layer=2,n_layer=3", "n_layer given twice"),
        ("n_layer=2", "belongs to no model spec"),
        ("gpt2:", "changes nothing"),
        (",", "--model is empty"),
        ("gpt2:n_embd=100000", "more than this command's limit"),
    ],
)
def test_bad_model_is_an_argparse_error(bad, message, capsys):
    assert bench.main(["--model", bad]) == 2
    err = capsys.readouterr().err
    assert "argument --model:" in err
    assert message in err
    assert "gpt2-small, gpt2-mini" in err  # the message lists the valid names


@pytest.mark.parametrize(
    "extra",
    [
        ["--sizes", "2^10"],
        ["--dtype", "bf16"],
        ["--roofline-per-size"],
        ["--no-per-call"],
        ["--plot", "x.png"],
    ],
)
def test_sweep_options_are_refused_with_model(extra, capsys):
    assert bench.main(["--model", TINY, *extra]) == 2
    err = capsys.readouterr().err
    assert f"{extra[0]} is an option of the size sweep, not of --model" in err


def _numels(model: str) -> list[int]:
    return [math.prod(s) for s in bench_model.parse_models(model)[0].shapes().values()]


def test_8bit_rows_count_their_bytes_per_tensor():
    """gpt2-mini with 8-bit states: its 4096 x 128 embedding and 128 x 512 MLP
    weights are 8-bit, its biases and layer norms float32."""
    spec = bench_model.parse_models("gpt2-mini")[0]
    numels = _numels("gpt2-mini")
    big = [n for n in numels if n >= 4096]
    assert 4096 * 128 in big and 128 in numels and 128 not in big
    row = bench_model.Row("fastadam.torch.AdamW", "c", "8bit")
    small = sum(numels) - sum(big)
    blocks = sum(-(-n // 256) for n in big)
    assert row.state_bytes(spec) == 8 * small + 2 * sum(big) + 8 * blocks
    assert math.isclose(row.step_bytes(spec), 28 * small + (16 + 16 / 256) * sum(big))
    f32 = bench_model.Row("fastadam.torch.AdamW", "c", "float32")
    assert f32.state_bytes(spec) == 8 * sum(numels) and f32.step_bytes(spec) == 28 * sum(numels)


def test_rows_follow_backends():
    auto = fastadam.auto_backend()
    rows, notes = bench_model.plan_rows(None, has_torch=True)
    assert notes == []
    assert [(r.optimizer, r.backend, r.state_dtype) for r in rows] == [
        ("fastadam.torch.AdamW", auto, "float32"),
        ("fastadam.torch.AdamW", auto, "bfloat16"),
        ("fastadam.torch.AdamW", auto, "8bit"),
        ("fastadam.AdamW (NumPy arrays)", auto, "float32"),
        ("torch.optim.AdamW(fused=True)", "torch", "float32"),
        ("torch.optim.AdamW(foreach=True)", "torch", "float32"),
    ]
    rows, _ = bench_model.plan_rows(["numpy", "torch-fused"], has_torch=True)
    assert [(r.optimizer, r.backend) for r in rows] == [
        ("fastadam.torch.AdamW", "numpy"),
        ("fastadam.torch.AdamW", "numpy"),
        ("fastadam.torch.AdamW", "numpy"),
        ("fastadam.AdamW (NumPy arrays)", "numpy"),
        ("torch.optim.AdamW(fused=True)", "torch"),
    ]
    rows, notes = bench_model.plan_rows(None, has_torch=False)
    assert [(r.optimizer, r.backend) for r in rows] == [("fastadam.AdamW (NumPy arrays)", auto)]
    assert "torch is not installed" in notes[0]
    with pytest.raises(bench.BenchError, match="needs torch"):
        bench_model.plan_rows(["c", "torch-foreach"], has_torch=False)
    with pytest.raises(bench.BenchError, match="not of --model"):
        bench_model.plan_rows(["c", "bitsandbytes"], has_torch=True)


# -- a tiny model, end to end ----------------------------------------------------------------


def _run_tiny(tmp_path, capsys, *extra: str) -> tuple[list[dict], str, str]:
    out_json = tmp_path / "model.json"
    argv = ["--model", TINY, "--threads", "1", "--repeat", "1", "--no-progress"]
    argv += ["--json", str(out_json), *extra]
    assert bench.main(argv) == 0
    captured = capsys.readouterr()
    return json.loads(out_json.read_text()), captured.out, captured.err


def test_tiny_model_end_to_end(tmp_path, capsys, restore_threads):
    records, stdout, _ = _run_tiny(tmp_path, capsys, "--markdown")
    auto = fastadam.auto_backend()
    expected = [("fastadam.AdamW (NumPy arrays)", auto, "float32")]
    if HAS_TORCH:
        expected = [
            ("fastadam.torch.AdamW", auto, "float32"),
            ("fastadam.torch.AdamW", auto, "bfloat16"),
            ("fastadam.torch.AdamW", auto, "8bit"),
            *expected,
            ("torch.optim.AdamW(fused=True)", "torch", "float32"),
            ("torch.optim.AdamW(foreach=True)", "torch", "float32"),
        ]
    assert [(r["optimizer"], r["backend"], r["state_dtype"]) for r in records] == expected
    elements = gpt2_elements(**TINY_SPEC)
    for r in records:
        assert r["kind"] == "model"
        assert r["model"] == TINY
        assert r["spec"] == TINY_SPEC
        assert (r["tensors"], r["elements"]) == (28, elements)
        assert r["threads"] == 1
        assert r["repeats"] == 1
        assert r["median_s"] > 0
        assert math.isclose(r["ms_per_step"], r["median_s"] * 1e3)
        assert math.isclose(r["us_per_tensor"], r["median_s"] * 1e6 / 28)
        # 8-bit states: tensors of >= 4096 elements move 16 B/element and two 4-byte
        # scales per 256, the rest 28 (the tiny model has none that large)
        big = [n for n in _numels(TINY) if n >= 4096]
        blocks = sum(-(-n // 256) for n in big)
        step_bytes = {
            "float32": 28 * elements,
            "bfloat16": 20 * elements,
            "8bit": 28 * (elements - sum(big)) + 16 * sum(big) + 16 / 256 * sum(big),
        }[r["state_dtype"]]
        assert math.isclose(r["gbps"], step_bytes / r["median_s"] / 1e9)
        state_bytes = {
            "float32": 8 * elements,
            "bfloat16": 4 * elements,
            "8bit": 8 * (elements - sum(big)) + 2 * sum(big) + 8 * blocks,
        }[r["state_dtype"]]
        assert r["state_bytes"] == state_bytes
        if HAS_TORCH:
            fused = next(x for x in records if x["optimizer"] == "torch.optim.AdamW(fused=True)")
            assert math.isclose(r["speedup_vs_torch_fused"], fused["median_s"] / r["median_s"])
        else:
            assert r["speedup_vs_torch_fused"] is None

    assert "- kernel variants: C " in stdout  # the sweep's machine header, as Markdown
    assert "- threads: 1" in stdout
    assert f"| {TINY} | 2 | 16 | 64 | 8 | 28 | {elements:,} |" in stdout
    table = [line for line in stdout.splitlines() if line.startswith(f"| {TINY} | ")]
    assert len(table) == 1 + len(records)  # the models table, then one row per optimizer
    assert "Speed targets" not in stdout  # a custom model has none


@pytest.mark.skipif(not HAS_TORCH, reason="the torch rows need torch")
def test_backends_filter_in_model_mode(tmp_path, capsys, restore_threads):
    if not FAST:
        pytest.skip("no fast backend loads here")
    records, stdout, _ = _run_tiny(tmp_path, capsys, "--backends", ",".join(FAST + ["torch-fused"]))
    assert [(r["optimizer"], r["backend"], r["state_dtype"]) for r in records] == [
        *(("fastadam.torch.AdamW", b, "float32") for b in FAST),
        *(("fastadam.torch.AdamW", b, "bfloat16") for b in FAST),
        *(("fastadam.torch.AdamW", b, "8bit") for b in FAST),
        *(("fastadam.AdamW (NumPy arrays)", b, "float32") for b in FAST),
        ("torch.optim.AdamW(fused=True)", "torch", "float32"),
    ]
    assert "alternating rounds" in stdout


def test_without_torch_only_the_numpy_row_runs(tmp_path, capsys, monkeypatch, restore_threads):
    monkeypatch.setattr(bench_model, "_torch_available", lambda: False)
    records, stdout, stderr = _run_tiny(tmp_path, capsys)
    assert [r["optimizer"] for r in records] == ["fastadam.AdamW (NumPy arrays)"]
    assert records[0]["speedup_vs_torch_fused"] is None
    assert "skipping the torch rows" in stderr and "torch is not installed" in stderr
    assert "fastadam.AdamW (NumPy arrays)" in stdout


# -- targets -----------------------------------------------------------------------------------


def _model_rec(model, optimizer, backend, state_dtype, speedup):
    return {
        "model": model,
        "optimizer": optimizer,
        "backend": backend,
        "state_dtype": state_dtype,
        "speedup_vs_torch_fused": speedup,
    }


def test_model_targets():
    fa, fused = "fastadam.torch.AdamW", "torch.optim.AdamW(fused=True)"
    records = [
        _model_rec("gpt2-mini", fa, "c", "float32", 1.6),
        _model_rec("gpt2-mini", fa, "numba", "float32", 1.4),
        _model_rec("gpt2-mini", fa, "numba", "bfloat16", 0.9),  # no bf16 target on mini
        _model_rec("gpt2-mini", fused, "torch", "float32", 1.0),
        _model_rec("gpt2-mini", "fastadam.AdamW (NumPy arrays)", "c", "float32", 0.5),
        _model_rec("gpt2-small", fa, "c", "float32", 1.04),
        _model_rec("gpt2-small", fa, "numpy", "float32", 0.1),  # the reference: no target
        _model_rec("gpt2-small", fa, "c", "bfloat16", 1.31),
        _model_rec("gpt2:n_layer=2", fa, "c", "float32", 0.1),  # custom: no target
    ]

    def decided(isa):
        targets, notes = bench_model.evaluate_model_targets(records, isa)
        got = {(t["model"], t["backend"], t["state_dtype"]): (t["goal"], t["met"]) for t in targets}
        return got, notes

    got, notes = decided("avx512")
    assert got == {
        ("gpt2-mini", "c", "float32"): (1.5, True),
        ("gpt2-mini", "numba", "float32"): (1.5, False),
        ("gpt2-small", "c", "float32"): (1.05, False),
        ("gpt2-small", "c", "bfloat16"): (1.3, True),
    }
    assert notes == []
    got, notes = decided("avx2")
    assert ("gpt2-small", "c", "bfloat16") not in got
    assert len(got) == 3
    assert notes == [
        "gpt2-small, bfloat16 states: target >= 1.3x torch fused not checked "
        "(AVX-512 machines only; the C backend's ISA here is avx2)"
    ]
    targets, _ = bench_model.evaluate_model_targets(records, "avx512")
    table = bench_model.model_targets_table(targets, markdown=True)
    assert "| gpt2-small | fastadam.torch.AdamW | c | bf16 | speed-up vs torch fused |" in table
    assert table.count("NOT MET") == 2
