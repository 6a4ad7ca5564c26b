"""Smoke tests: the benchmark scripts run on CPU with a tiny config and print their table."""

import importlib.util
import json
from pathlib import Path

import pytest

from lazydit.metrics import load_npz_samples, paired_psnr

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


def test_paper_tables_small_run_writes_markdown_csv_and_plot(tmp_path, capsys):
    args = ["--only", "DDIM-7,DDIM-10,Lazy-10@30", "--num-samples", "20", "--batch-size", "20", "--calib-per-class", "1", "--run",
            str(tmp_path / "run"), "--docs", str(tmp_path / "docs"), "--quiet", "--fidelity-ref", "DDIM-7"]
    load("paper_tables").main(args)
    md = (tmp_path / "docs" / "paper_tables.md").read_text()
    assert "| Lazy-10@30 |" in md and "| DDIM-7 |" in md and "Rows not run yet" in md
    run = tmp_path / "run"
    db = paired_psnr(load_npz_samples(run / "Lazy-10@30.npz"), load_npz_samples(run / "DDIM-7.npz"))["psnr"]
    lazy_line = next(line for line in md.splitlines() if line.startswith("| Lazy-10@30 |") and " G |" in line)
    assert "PSNR vs DDIM-7 (dB)" in md and lazy_line.endswith(f" {db:.2f} |")
    assert next(line for line in md.splitlines() if line.startswith("| DDIM-7 |") and " G |" in line).endswith(" ref |")
    pair = next(line for line in md.splitlines() if line.startswith("| Lazy-10@30 | DDIM-7 |"))  # equal TMACs
    assert pair.endswith(f" {db:.2f} / ref |")
    assert (tmp_path / "docs" / "images" / "quality_vs_tmacs.png").stat().st_size > 0
    rows = (tmp_path / "docs" / "paper_tables.csv").read_text().splitlines()
    assert rows[0].startswith("sampler,steps,target") and rows[0].endswith(",psnr_vs_ref") and len(rows) == 4
    lazy = json.loads((tmp_path / "run" / "Lazy-10@30.json").read_text())
    assert abs(lazy["calibration_ratio"] - 0.3) < 0.05 and lazy["threshold"] is not None
    capsys.readouterr()
    load("paper_tables").main(args)  # finished rows are not run again
    assert "FID" not in capsys.readouterr().out
    load("paper_tables").main(args + ["--timing", "--timing-images", "4", "--timing-rounds", "2", "--bootstrap", "5"])
    timing = json.loads((tmp_path / "run" / "timing.json").read_text())
    assert set(timing["rows"]) == {"DDIM-7", "DDIM-10", "Lazy-10@30"} and all(len(t["all"]) == 2 for t in timing["rows"].values())
    md = (tmp_path / "docs" / "paper_tables.md").read_text()
    assert "medians of 2 interleaved rounds" in md and f"{timing['rows']['DDIM-7']['median']:.4f}" in md
    boots = json.loads((tmp_path / "run" / "bootstrap.json").read_text())["pairs"]
    boot = boots["Lazy-10@30 vs DDIM-7"]
    # the pairing split into reuse (Lazy-10 - DDIM-10) and step count (DDIM-10 - DDIM-7), with its PSNRs to DDIM-10
    reuse, steps = boots["Lazy-10@30 vs DDIM-10"], boots["DDIM-10 vs DDIM-7"]
    assert reuse["delta"] + steps["delta"] == pytest.approx(boot["delta"], abs=1e-9)
    to10 = [paired_psnr(load_npz_samples(run / f"{n}.npz"), load_npz_samples(run / "DDIM-10.npz"))["psnr"]
            for n in ("Lazy-10@30", "DDIM-7")]
    assert (f"| Lazy-10@30 | DDIM-7 | DDIM-10 | {boot['delta']:+.3f} [" in md
            and f"| {reuse['delta']:+.3f} [{reuse['lo']:+.3f}, {reuse['hi']:+.3f}] |" in md
            and f" {to10[0]:.2f} / {to10[1]:.2f} |" in md)
    assert boot["lo"] <= boot["hi"] and f"{boot['delta']:+.3f} [{boot['lo']:+.3f}, {boot['hi']:+.3f}]" in md
