"""The bench's 8-bit rows (issue 18): --dtype q8 counts 16.0625 B/element, prints
the state memory per element, and the 8-bit/float32 time ratio is a target."""

from __future__ import annotations

import json
import math

import pytest

import fastadam
from fastadam import bench


def test_q8_rows(tmp_path, capsys, restore_threads):
    backends = [b for b in ("numba", "c") if b in fastadam.available_backends()]
    if not backends:
        pytest.skip("no fast backend loads here")
    out_json = tmp_path / "bench.json"
    argv = ["--sizes", "2^12", "--backends", ",".join(backends), "--dtype", "float32,q8"]
    argv += ["--threads", "1", "--repeat", "1", "--no-progress", "--no-per-call"]
    argv += ["--json", str(out_json)]
    assert bench.main(argv) == 0
    stdout = capsys.readouterr().out
    records = json.loads(out_json.read_text())
    assert sorted((r["backend"], r["dtype"]) for r in records) == sorted(
        (b, d) for b in backends for d in ("float32", "q8")
    )
    for r in records:
        per_element = {"float32": 28, "q8": 16.0625}[r["dtype"]]
        assert math.isclose(r["gbps"], per_element * r["n"] / r["median_s"] / 1e9, rel_tol=1e-9)
    assert "roofline q8:" in stdout and "(16.0625 B/element" in stdout
    assert "optimizer state 2.03 B/element" in stdout and "optimizer state 8 B/element" in stdout
    assert "roofline time ratio q8/float32" in stdout


def test_q8_target():
    n = bench.TARGET_LARGE_N
    recs = [bench._record("sweep", "c", n, d, t, 5, 2, 100.0)
            for d, t in (("float32", 1.0), ("q8", 0.6))]  # fmt: skip
    got = [t for t in bench.evaluate_targets(recs, [])
           if t["target"] == "8-bit-state time / float32-state time"]  # fmt: skip
    assert [(round(t["value"], 9), t["goal"], t["met"]) for t in got] == [(0.6, 0.65, True)]
