"""Smoke test: benchmarks/bench_gpu.py runs its tiny CPU preset and reports every row."""

import importlib.util
import json
import math
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_gpu.py"


def load():
    spec = importlib.util.spec_from_file_location("bench_gpu", BENCH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_bench_gpu_cpu_smoke(capsys, tmp_path):
    out = load().main(["--preset", "cpu-smoke", "--threads", "1", "--json-out", str(tmp_path / "b.json")])
    printed = capsys.readouterr().out
    assert json.loads((tmp_path / "b.json").read_text()) == json.loads(json.dumps(out))
    assert printed.splitlines()[0].startswith("# ") and "torch " in printed and "float32" in printed
    for name in ("dense", "plan50-ref", "plan50-la", "trained-ref", "trained-la", "train-gates"):
        assert name in printed
    json_lines = [ln for ln in printed.splitlines() if ln.startswith("{")]
    assert len(json_lines) == 1 and json.loads(json_lines[0])["rows"] == out["rows"]

    assert out["device"] == "cpu" and out["compile_mode"] == "off" and out["dtype"] == "float32"
    assert out["torch"] and out["batches"] == [1, 2] and out["steps"] == 4
    samplers = ["dense", "plan50-ref", "plan50-la", "trained-ref", "trained-la"]
    assert [(r["batch"], r["sampler"]) for r in out["rows"]] == [(b, s) for b in (1, 2) for s in samplers]
    for r in out["rows"]:
        assert r["compile"] == "eager" and r["steps"] == 4 and r["repeats"] == 1
        assert 0 < r["min_s"] <= r["median_s"] < 10 and r["speedup_vs_dense_eager"] > 0
        assert 0.0 <= r["lazy_ratio"] <= 0.5 and r["tmacs"] > 0
        assert r["compilable"] == (r["mode"] != "reference")
        if r["sampler"] == "dense":
            assert r["lazy_ratio"] == 0.0 and r["speedup_vs_dense_eager"] == 1.0
        if r["gates"] == "plan50":  # every even step skips every module: 2 of 4 steps
            assert r["lazy_ratio"] == 0.5
    assert [t["kind"] for t in out["training"]] == ["reference", "look-ahead"]
    for t in out["training"]:
        assert t["batch"] == 4 and t["timed_iters"] >= 1 and math.isfinite(t["steps_per_s"]) and t["steps_per_s"] > 0
        assert math.isfinite(t["final_loss"])
    assert {"model", "train_ref", "train_la", "sample_b1", "sample_b2"} <= set(out["sections"])
