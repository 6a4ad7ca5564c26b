"""Smoke tests: the benchmark scripts run on CPU with a tiny config and print their table."""

import importlib.util
import json
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def load(name):
    spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_bench_fast_tiny(capsys, tmp_path):
    out = load("bench_fast").main(["--preset", "tiny", "--json-out", str(tmp_path / "b.json")])
    printed = capsys.readouterr().out
    assert "la-lazy-10" in printed and "ref-lazy-10" in printed and "dense-5" in printed
    rows = {r["sampler"]: r for r in out["rows"]}
    assert rows["la-lazy-10"]["lazy_ratio"] == rows["ref-lazy-10"]["lazy_ratio"] == 0.5  # the plan50 schedule
    assert rows["dense-10"]["speedup_vs_dense"] == 1.0 and rows["dense-5"]["over_half_steps"] == 1.0
    assert json.loads((tmp_path / "b.json").read_text())["rows"] == out["rows"]
