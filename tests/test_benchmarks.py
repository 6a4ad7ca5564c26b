"""Smoke tests: the benchmark and experiment scripts run on CPU with a tiny config and write their tables."""

import csv
import importlib.util
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from lazydit.evaluation import rows as row_engine
from lazydit.lazy.shipped import default_gates
from lazydit.evaluation.metrics import load_npz_samples, paired_psnr
from lazydit.lazy import LazyGates

ROOT = Path(__file__).resolve().parents[1]


def load(name, folder="benchmarks"):
    spec = importlib.util.spec_from_file_location(name, ROOT / folder / f"{name}.py")
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


def test_bench_fast_pairs_each_shipped_gate_set_with_ddim_of_equal_tmacs():
    from lazydit.assets import default_model

    bench, model = load("bench_fast"), default_model()
    rows = [bench.TimedRow("dense-11", model, 11)]
    partners = bench.pair_rows("reference:20,reference:10", rows, model, model)
    r10 = default_gates(10).meta["calibration"]["reached"]
    partner10 = f"dense-{round(10 * (1 - r10))}"
    assert partners == {"reference-lazy-20": "dense-11", "reference-lazy-10": partner10}  # 45% of 20 steps: 11
    assert [r.name for r in rows] == ["dense-11", "reference-lazy-20", partner10, "reference-lazy-10"]  # no twins
    assert rows[1].policy.gates.steps == 20 and rows[1].policy.threshold == default_gates(20).threshold


def test_bench_fast_pairs_a_calibrated_gate_file_and_refuses_an_uncalibrated_one(tmp_path):
    from lazydit.assets import default_model

    bench, model = load("bench_fast"), default_model()
    gates = default_gates(20, kind="every-forecast")  # a calibrated file, saved under a folder of its own
    (tmp_path / "mine").mkdir()
    gates.save(tmp_path / "mine" / "gates.safetensors")
    rows = []
    partners = bench.pair_rows(str(tmp_path / "mine" / "gates.safetensors"), rows, model, model)
    steps = round(20 * (1 - gates.meta["calibration"]["reached"]))
    assert partners == {"mine-lazy-20": f"dense-{steps}"}
    assert rows[1].policy.threshold == gates.threshold and rows[1].policy.gates.meta["forecast"] == 1
    bare = LazyGates.for_model(model, 20)
    bare.save(tmp_path / "bare.safetensors")
    with pytest.raises(SystemExit, match="calibrate it first"):
        bench.pair_rows(str(tmp_path / "bare.safetensors"), [], model, model)
    for bad, why in (("forecast", "expected KIND:T"), (str(tmp_path / "none.safetensors"), "no such gate file")):
        with pytest.raises(SystemExit, match=why):
            bench.pair_rows(bad, [], model, model)


def test_beyond_paper_interpolates_the_ddim_curve_at_equal_tmacs():
    bp = load("beyond_paper", "experiments")
    ddim = [dict(tmacs=1.0, fid=4.0), dict(tmacs=2.0, fid=3.0), dict(tmacs=4.0, fid=2.0)]
    assert bp.ddim_fid_at(ddim, 1.5) == 3.5 and bp.ddim_fid_at(ddim, 3.0) == 2.5 and bp.ddim_fid_at(ddim, 2.0) == 3.0
    assert bp.ddim_fid_at(ddim, 0.5) is None and bp.ddim_fid_at(ddim, 5.0) is None  # no extrapolation


def md_tables(md: str) -> list:
    """Every markdown table of `md` as a list of {header cell: cell} rows (a row of another width fails)."""
    tables, block = [], []
    for line in md.splitlines() + [""]:
        if line.startswith("|"):
            block.append([c.strip() for c in line.strip()[1:-1].split("|")])
        elif block:
            head, rule, *body = block
            assert len(rule) == len(head) and all(len(r) == len(head) for r in body), block
            tables.append([dict(zip(head, r)) for r in body])
            block = []
    return tables


def table(md: str, first: str) -> dict:
    """The table whose first header cell is `first`, as {first cell of a row: row}."""
    found = [t for t in md_tables(md) if t and next(iter(t[0])) == first]
    assert len(found) == 1, f"{len(found)} tables with first column {first!r}"
    return {r[first]: r for r in found[0]}


def test_paper_tables_rows_and_only():
    pt = load("paper_tables", "experiments")
    Row = pt.Row
    assert [r.name for r in pt.ROWS[:8]] == [f"DDIM-{s}" for s in (50, 40, 30, 25, 20, 14, 10, 7)]
    assert Row(50, 0.4).name == "Lazy-50@40" and Row(50, 0.4, lookahead=True).name == "LazyLA-50@40"
    assert Row(10, 0.3).name == "Lazy-10@30" and Row(10, 0.3).dense == Row(10) and Row(10).name == "DDIM-10"
    assert [r.kind for r in (Row(7), Row(7, 0.5), Row(7, 0.5, lookahead=True))] == ["DDIM", "Lazy", "LazyLA"]
    assert len(pt.ROWS_BY_NAME) == len(pt.ROWS) == 17 and all(pt.ROWS_BY_NAME[r.name] is r for r in pt.ROWS)
    assert (Row(50, 0.5), Row(25)) in pt.PAIRS and (Row(50, 0.5, lookahead=True), Row(25)) in pt.PAIRS
    # the decomposition covers the reference pairings only: Lazy-T vs DDIM-T, DDIM-T vs DDIM-S
    assert (Row(10, 0.3), Row(10)) in pt.DECOMP_PAIRS and (Row(10), Row(7)) in pt.DECOMP_PAIRS
    assert not any(r.lookahead for pair in pt.DECOMP_PAIRS for r in pair)
    assert pt.select_rows("DDIM-7, Lazy-10@30,DDIM-7") == (Row(7), Row(10, 0.3)) and pt.select_rows(None) == pt.ROWS
    with pytest.raises(ValueError, match=r"unknown rows \['Lazy-10@31'\]; choose from DDIM-50, .*LazyLA-50@40"):
        pt.select_rows("DDIM-7,Lazy-10@31")
    with pytest.raises(ValueError):
        Row(10, lookahead=True)


def test_paper_tables_only_unknown_row_is_a_usage_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        load("paper_tables", "experiments").main(["--only", "DDIM-7,Lazy-9@30", "--run", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "Lazy-9@30" in err and "Lazy-10@30" in err and "LazyLA-50@40" in err


def test_paper_tables_small_run_writes_markdown_csv_and_plot(tmp_path, capsys, monkeypatch):
    pt = load("paper_tables", "experiments")
    sample_row, calls = pt.run_row, []

    def calibrate(spec, model, y, cfg):  # the bisection itself is not what this test is about
        calls.append((spec.steps, spec.target, len(y), cfg.cfg_scale))
        # half the gate file's own threshold (~0.3 lazy): ~0.13 lazy once it reaches the sampler
        return row_engine.build_policy(spec, model, 1e-3), 0.0123

    full = pt.default_reference()
    ref = {**full, "pool": full["pool"][:400]}  # mu / sigma whole; precision/recall and KID on 400 test images
    monkeypatch.setattr(row_engine, "calibrate", calibrate)
    monkeypatch.setattr(pt, "default_reference", lambda: ref)
    run, docs = tmp_path / "run", tmp_path / "docs"
    names = ("DDIM-7", "DDIM-10", "Lazy-10@30")
    args = ["--only", ",".join(names), "--num-samples", "4", "--batch-size", "4", "--calib-per-class", "1",
            "--run", str(run), "--docs", str(docs), "--quiet", "--fine-ref", "ddim-12", "--fine-ref-samples", "4",
            "--bootstrap", "5"]
    pt.main(args)
    assert calls == [(10, 0.3, 10, 1.5)]  # one calibration, of the Lazy row, on a 10-image class grid
    printed = capsys.readouterr().out
    assert all(re.search(rf"^{re.escape(n)}: FID ", printed, re.M) for n in names)

    # per-row JSON and samples
    rows = {n: json.loads((run / f"{n}.json").read_text()) for n in names}
    keys = {"sampler", "steps", "fid", "sfid", "inception_score", "precision", "recall", "kid", "lazy_ratio", "tmacs",
            "seconds_per_image", "threshold", "num_samples", "cfg_scale", "micro_batch"}
    assert all(keys <= set(r) and r["num_samples"] == 4 and r["cfg_scale"] == 1.5 for r in rows.values())
    assert {n: r["steps"] for n, r in rows.items()} == {"DDIM-7": 7, "DDIM-10": 10, "Lazy-10@30": 10}
    lazy = rows["Lazy-10@30"]
    assert {"target", "calibration_ratio", "rho"} <= set(lazy) and (lazy["target"], lazy["calibration_ratio"]) == (
        0.3, 0.0123)
    assert lazy["threshold"] == 1e-3 and 0 < lazy["lazy_ratio"] < 0.2  # the calibrated threshold, not the file's
    assert rows["DDIM-10"]["lazy_ratio"] == 0 and rows["DDIM-10"]["threshold"] is None
    assert lazy["tmacs"] < rows["DDIM-10"]["tmacs"]
    assert all(len(load_npz_samples(run / f"{n}.npz")) == 4 for n in names)
    boot = json.loads((run / "bootstrap.json").read_text())
    assert boot["reps"] == 5 and boot["level"] == 0.95
    assert set(boot["pairs"]) == {"Lazy-10@30 vs DDIM-7", "Lazy-10@30 vs DDIM-10", "DDIM-10 vs DDIM-7",
                                  "DDIM-7 vs DDIM-10"}  # the last: does DDIM-10 beat DDIM-7 (step-count table)
    assert boot["pairs"]["DDIM-7 vs DDIM-10"]["delta"] == pytest.approx(-boot["pairs"]["DDIM-10 vs DDIM-7"]["delta"])
    fine = run / "reference-ddim-12-n4.npz"  # the fine reference: DDIM-12 of the rows' first 4 labels and noises
    assert len(load_npz_samples(fine)) == 4
    assert all({"delta", "lo", "hi"} <= set(b) and b["lo"] <= b["hi"] for b in boot["pairs"].values())
    # the pairing = reuse (Lazy-10 - DDIM-10) + step count (DDIM-10 - DDIM-7)
    b = boot["pairs"]
    assert b["Lazy-10@30 vs DDIM-10"]["delta"] + b["DDIM-10 vs DDIM-7"]["delta"] == pytest.approx(
        b["Lazy-10@30 vs DDIM-7"]["delta"], abs=1e-9)

    png = docs / "images" / "quality_vs_tmacs.png"
    assert png.stat().st_size > 0
    drawn = []  # the later write-ups hand their rows to the plot; drawing it once is enough here
    monkeypatch.setattr(pt, "plot", lambda rows, path, ref: drawn.append((path, ref, {r["sampler"]: r for r in rows})))

    # a second run resamples nothing; --timing measures the finished rows in one more
    stamps = {p.name: p.stat().st_mtime_ns for p in run.iterdir()
              if p.suffix in (".json", ".npz") and p.name != "bootstrap.json"}  # bootstrap.json: rewritten, derived
    pt.main(args)
    assert not re.search(r"^\S+: FID ", capsys.readouterr().out, re.M)
    pt.main(args + ["--timing", "--timing-images", "1", "--timing-rounds", "2"])
    assert {p: run.joinpath(p).stat().st_mtime_ns for p in stamps} == stamps
    timing = json.loads((run / "timing.json").read_text())
    assert {"images", "micro_batch", "rounds", "cfg", "threads", "machine", "torch", "rows"} <= set(timing)
    assert timing["images"] == 1 and timing["rounds"] == 2 and set(timing["rows"]) == set(names)
    assert all(len(t["all"]) == 2 and t["median"] > 0 for t in timing["rows"].values())
    assert len(drawn) == 2 and drawn[-1][:2] == (png, "DDIM-12") and set(drawn[-1][2]) == set(names)
    assert {n: r["seconds_per_image"] for n, r in drawn[-1][2].items()} == {
        n: t["median"] for n, t in timing["rows"].items()}

    # CSV: the columns, one line per finished row
    with open(docs / "paper_tables.csv", newline="") as f:
        reader = csv.DictReader(f)
        assert tuple(reader.fieldnames) == pt.COLUMNS
        csv_rows = {r["sampler"]: r for r in reader}
    assert list(csv_rows) == ["DDIM-10", "DDIM-7", "Lazy-10@30"]  # table order
    assert csv_rows["Lazy-10@30"]["target"] == "0.3" and csv_rows["DDIM-7"]["target"] == ""
    assert float(csv_rows["Lazy-10@30"]["fid"]) == lazy["fid"]

    # markdown: the sections and the tables, by structure
    md = (docs / "paper_tables.md").read_text()
    heads = [line for line in md.splitlines() if line.startswith("#")]
    assert heads[0].startswith("# The paper's Table 1") and any(h.startswith("## Equal-TMACs pairings") for h in heads)
    assert any(h.startswith("## Where each difference comes from") for h in heads)
    assert "python experiments/paper_tables.py --num-samples 4" in md
    main_t = table(md, "sampler")
    assert list(main_t) == ["DDIM-10", "DDIM-7", "Lazy-10@30"]
    assert {n: main_t[n]["s / image"] for n in names} == {n: f"{t['median']:.4f}" for n, t in
                                                          timing["rows"].items()}  # the timing run's medians
    psnr_col = "PSNR vs DDIM-12 (dB)"
    db = {n: paired_psnr(load_npz_samples(run / f"{n}.npz"), load_npz_samples(fine))["psnr"] for n in names}
    assert all(main_t[n][psnr_col] == f"{v:.2f}" for n, v in db.items())
    steps_t = table(md, "fewer")["DDIM-7"]
    fid7, fid10 = rows["DDIM-7"]["fid"], rows["DDIM-10"]["fid"]
    assert steps_t["more"] == "DDIM-10" and steps_t["more steps better?"].startswith("yes" if fid7 > fid10 else "no")
    assert main_t["Lazy-10@30"]["threshold"] == "0.001" and main_t["DDIM-7"]["threshold"] == ""
    pairing = table(md, "Lazy")
    assert list(pairing) == ["Lazy-10@30"] and pairing["Lazy-10@30"]["DDIM"] == "DDIM-7"  # equal TMACs
    pb = b["Lazy-10@30 vs DDIM-7"]
    assert next(v for k, v in pairing["Lazy-10@30"].items() if k.startswith("FID Lazy - DDIM")) == (
        f"{pb['delta']:+.3f} [{pb['lo']:+.3f}, {pb['hi']:+.3f}]")
    decomp = table(md, "Lazy-T")["Lazy-10@30"]
    assert (decomp["DDIM-S"], decomp["DDIM-T"]) == ("DDIM-7", "DDIM-10")
    total, reuse, step = (float(v.split()[0]) for k, v in decomp.items() if k.startswith(("FID ", "reuse", "steps")))
    assert total == pytest.approx(reuse + step, abs=2e-3)
    to10 = [paired_psnr(load_npz_samples(run / f"{n}.npz"), load_npz_samples(run / "DDIM-10.npz"))["psnr"]
            for n in ("Lazy-10@30", "DDIM-7")]
    assert next(v for k, v in decomp.items() if k.startswith("PSNR")) == f"{to10[0]:.2f} / {to10[1]:.2f}"
    missing = re.search(r"^Rows not run yet: (.*)\.$", md, re.M).group(1).split(", ")
    assert sorted(missing + list(names)) == sorted(pt.ROWS_BY_NAME)

    # a clean checkout (no run folder) samples nothing: the committed records pair and split exactly as before
    record = json.loads((docs / "paper_tables.json").read_text())
    assert (record["num_samples"], record["cfg"], record["seed"]) == (4, 1.5, 0)
    assert all(len(r["fid_draws"]) == 5 and "psnr_vs_ref" in r for r in record["rows"])
    fine_bytes = fine.read_bytes()
    shutil.rmtree(run)
    monkeypatch.setattr(pt, "run_row", lambda *a, **k: pytest.fail("a recorded row was sampled again"))
    fresh = [a if a != str(run) else str(tmp_path / "fresh") for a in args]
    pt.main(fresh + ["--no-fine-ref"])
    committed_fine = docs / "paper_tables_reference-ddim-12-n4.npz"  # restored: later rows get their PSNR
    assert (tmp_path / "fresh" / fine.name).read_bytes() == committed_fine.read_bytes() == fine_bytes
    assert json.loads((tmp_path / "fresh" / "bootstrap.json").read_text())["pairs"] == b
    assert (docs / "paper_tables.md").read_text() == md

    # a row sampled on a later day next to a committed one: --images-of samples the committed row's images again
    # (not its record), the same images, so the new row gets its PSNR against them in the split
    record["rows"] = [r for r in record["rows"] if r["sampler"] != "Lazy-10@30"]
    (docs / "paper_tables.json").write_text(json.dumps(record))
    monkeypatch.setattr(pt, "run_row", sample_row)
    later = [a if a != str(run) else str(tmp_path / "later") for a in args]
    pt.main(later + ["--no-fine-ref", "--images-of", "DDIM-10"])
    out = capsys.readouterr().out
    fid10 = f"{rows['DDIM-10']['fid']:.4f}"
    assert f"DDIM-10 images sampled again: FID {fid10}, recorded {fid10}" in out
    assert not (tmp_path / "later" / "DDIM-10.json").exists()  # the record stays the committed one
    again = json.loads((tmp_path / "later" / "Lazy-10@30.json").read_text())
    assert again["psnr_to"]["DDIM-10"] == pytest.approx(to10[0], abs=1e-9)
    assert table(docs.joinpath("paper_tables.md").read_text(), "Lazy-T")["Lazy-10@30"] == decomp


def test_evaluator_evidence_degradations_do_what_they_say():
    ev = load("evaluator_evidence", "experiments")
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (3, 28, 28, 1), dtype=np.uint8)
    flat = np.full((2, 28, 28, 1), 77, np.uint8)
    assert np.array_equal(ev.blur(flat, 0.7), flat)  # a blur keeps constant images (normalised kernel)
    assert not np.array_equal(ev.blur(img, 0.5), img)
    assert np.array_equal(ev.noise(img, 0), img)  # zero noise is the identity
    assert abs(float((ev.noise(flat, 4).astype(float) - 77).std()) - 4) < 0.3
    s = ev.shift(img, 1)
    assert np.array_equal(s[:, :, 1:], img[:, :, :-1]) and not s[:, :, 0].any()
    assert ev.psnr(img, img) == float("inf")


def test_timing_reads_thresholds_from_the_committed_table(tmp_path):
    """--timing on a clean checkout: rows without a run JSON take their threshold from <docs>/paper_tables.csv."""
    import argparse

    pt = load("paper_tables", "experiments")
    docs, run = tmp_path / "docs", tmp_path / "run"
    docs.mkdir(), run.mkdir()
    (docs / "paper_tables.csv").write_text("sampler,threshold\nDDIM-25,\nLazy-50@50,0.75\nLazy-10@30,0.5\n")
    (run / "Lazy-10@30.json").write_text(json.dumps({"threshold": 0.6}))  # the run's own row wins
    rows = pt.select_rows("DDIM-25,Lazy-50@50,Lazy-10@30,DDIM-7")
    got = pt.finished_thresholds(rows, argparse.Namespace(run=str(run), docs=str(docs)))
    assert {r.name: th for r, th in got.items()} == {"DDIM-25": None, "Lazy-50@50": 0.75, "Lazy-10@30": 0.6}


def test_time_interleaved_warms_up_then_rotates_the_order(monkeypatch):
    import lazydit.bench as bench
    from lazydit.pipeline import SampleReport

    calls = []

    def fake_sample(model, y, steps, **kw):
        calls.append(kw["name"])
        return None, SampleReport(kw["name"], steps, 0.0, 0.0, 1.0)

    monkeypatch.setattr(bench, "sample", fake_sample)
    rows = [bench.TimedRow(n, None, 2) for n in "abc"]
    y = __import__("torch").zeros(2)
    out = bench.time_interleaved(rows, y, cfg_scale=1.0, repeats=3, micro_batch=4)
    assert calls == list("abc") + list("bca") + list("cab") + list("abc")  # warm-up, then rotated rounds
    assert all(o["times"] == [1.0] * 3 for o in out.values())


def test_beyond_paper_small_run(tmp_path, fake_fmnist):
    """Two rows with tiny settings: gates trained for the variant, calibrated, sampled, paired, written up."""
    bp = load("beyond_paper", "experiments")
    run, docs = tmp_path / "run", tmp_path / "docs"
    bp.main(["--num-samples", "8", "--iters", "2", "--batch-size", "4", "--bootstrap", "3", "--run", str(run),
             "--docs", str(docs), "--only", "DDIM-10,Lazy[forecast]-20@50", "--fine-ref", "ddim-12",
             "--fine-ref-samples", "4", "--quiet"])
    out = json.loads((docs / "beyond_paper.json").read_text())
    rows = {r["sampler"]: r for r in out["rows"]}
    assert set(rows) == {"DDIM-10", "Lazy[forecast]-20@50"}
    lazy = rows["Lazy[forecast]-20@50"]
    assert lazy["forecast"] == 1 and lazy["lazy_ratio"] == 0.5 and lazy["skip_runs"] == {"mean": 1.0, "max": 1}
    assert set(out["pairs"]) == {"Lazy[forecast]-20@50 vs DDIM-10"}
    assert (run / "gates-forecast-T20" / "gates.safetensors").exists()
    assert (run / "reference-ddim-12-n4.npz").exists() and 5 < rows["DDIM-10"]["psnr_vs_ref"] < 100
    assert "| Lazy[forecast]-20@50 vs DDIM-10 |" in (docs / "beyond_paper.md").read_text()
    assert (docs / "images" / "beyond_paper_frontier.png").stat().st_size > 0
    with open(docs / "beyond_paper.csv", newline="") as f:
        table = {r["sampler"]: r for r in csv.DictReader(f)}
    assert set(table) == set(rows) and float(table["Lazy[forecast]-20@50"]["fid"]) == lazy["fid"]
    assert table["DDIM-10"]["variant"] == "" and table["Lazy[forecast]-20@50"]["skip_run_max"] == "1"

    # a clean checkout samples nothing: the committed records (with their draws) pair as before
    shutil.rmtree(run)
    md = (docs / "beyond_paper.md").read_text()
    bp.main(["--num-samples", "8", "--iters", "2", "--batch-size", "4", "--bootstrap", "3", "--run",
             str(tmp_path / "fresh"), "--docs", str(docs),
             "--only", "DDIM-10,Lazy[forecast]-20@50", "--fine-ref", "ddim-12", "--fine-ref-samples", "4", "--quiet",
             "--no-fine-ref"])
    assert json.loads((docs / "beyond_paper.json").read_text()) == out
    assert (docs / "beyond_paper.md").read_text() == md
    assert not (tmp_path / "fresh" / "gates-forecast-T20").exists()  # no gates trained, no row sampled


def test_beyond_paper_samples_a_shipped_gate_set_trained_the_same_way():
    """A variant's gates are not trained again where a shipped file was trained with every field that shapes them."""
    from dataclasses import replace

    from lazydit.training.gates import GateTrainConfig

    bp = load("beyond_paper", "experiments")
    budget = dict(iters=500, batch_size=64, rho_attn=1e-2, rho_mlp=1e-2, seed=0, ckpt_every=50, out="elsewhere")
    fc = GateTrainConfig(steps=10, **budget, **bp.VARIANTS["forecast"])
    assert torch.equal(bp.shipped_equal(fc).weight, default_gates(10, kind="forecast").weight)
    every = GateTrainConfig(steps=20, **budget, **bp.VARIANTS["every+fc+ro3"])
    assert torch.equal(bp.shipped_equal(every).weight, default_gates(20, kind="every-forecast").weight)
    for other in (replace(fc, iters=400), replace(fc, seed=1), replace(fc, rho_mlp=2e-2), replace(fc, forecast=2),
                  replace(fc, steps=40), replace(every, rollout=6), replace(fc, data_free=True)):
        assert bp.shipped_equal(other) is None


def test_beyond_paper_frontier_plan():
    """Every variant at every T and ratio (parity variants to 50%), each against DDIM of equal TMACs."""
    bp = load("beyond_paper", "experiments")
    args = bp.argparse.Namespace(plan="frontier", steps=[10, 20], ratios=[0.3, 0.7], variants=["forecast", "every+ro3"])
    rows = bp.plan_rows(args)
    names = [r.name for r in rows]
    assert names[:6] == ["DDIM-3", "DDIM-6", "DDIM-7", "DDIM-10", "DDIM-14", "DDIM-20"]  # DDIM first, by steps
    assert "Lazy[forecast]-10@70" not in names and "Lazy[every+ro3]-10@70" in names  # the parity caps at 50%
    pairs = {a.name: b.name for a, b in bp.plan_pairs(rows)}
    assert pairs["Lazy[forecast]-10@30"] == "DDIM-7" and pairs["Lazy[every+ro3]-20@70"] == "DDIM-6"
    assert len(pairs) == 6


def test_bench_methods_tiny(tmp_path, capsys):
    out = load("bench_methods").main(["--preset", "tiny", "--rows", str(tmp_path / "none"),
                                      "--json-out", str(tmp_path / "m.json")])
    rows = {r["config"]: r for r in out["rows"]}
    assert out["dense"] == "ddim-8" and rows["ddim-8"]["time_ratio"] == 1.0 and rows["ddim-8"]["gap"] == 0.0
    assert rows["ddim-4"]["tmacs_ratio"] == 0.5
    assert rows["ddim-8+fora:interval=2"]["lazy_ratio"] == 0.375  # k = 7, 6, 4, 2, 0 compute
    assert json.loads((tmp_path / "m.json").read_text())["rows"] == out["rows"]
    assert "TMACs/dense" in capsys.readouterr().out


def test_compare_methods_small_run(tmp_path):
    """Two families at one budget with tiny sizes: the grid fits the budget, selection on seed 1 picks each family's
    best, the final rows carry both extractors' FIDs and the distance to DDIM-250 with draws, the write-up exists."""
    cm = load("compare_methods", "experiments")
    run, docs = tmp_path / "run", tmp_path / "docs"
    sizes = ["--select-n", "4", "--final-n", "8", "--fine-n", "4", "--reps", "5", "--run", str(run), "--docs", str(docs)]
    cm.main(["--budgets", "0.15", "--families", "DDIM,FORA", *sizes, "--quiet"])
    out = json.loads((docs / "compare_methods.json").read_text())
    assert out["budgets"] == [0.15] and out["sizes"]["final_n"] == 8
    sel = out["selection"]["0.15"]
    cap = 0.15 * out["ddim50_tmacs"]
    assert {r["family"] for r in sel["grid"]} == {"DDIM", "FORA"} and len(sel["grid"]) == 4  # ddim-7, FORA 2-4
    assert all(r["tmacs"] <= cap * 1.0001 for r in sel["grid"])
    fora = [r for r in sel["grid"] if r["family"] == "FORA"]
    assert sel["best"]["FORA"] == min(fora, key=lambda r: (r["fid"], r["tmacs"]))["config"]  # the rule, on seed 1
    rows = {r["family"]: r for r in out["rows"]}
    assert set(rows) == {"DDIM", "FORA"} and rows["DDIM"]["config"] == "ddim-7"
    for r in rows.values():
        assert r["seed"] == 0 and r["n"] == 8
        assert len(r["fid_fmnist_draws"]) == len(r["fid_resnet_draws"]) == len(r["fid_to_fine_draws"]) == 5
        assert r["fid_fmnist"] != r["fid_resnet"] and r["fid_to_fine"] >= 0 and r["psnr_to_fine"] > 0
    assert "0.15" not in out["verdicts"]  # no LazyDiT row: nothing to claim
    md = (docs / "compare_methods.md").read_text()
    assert "`ddim-7`" in md and "not run yet: 10%, 20%, 30%, 50%" in md and str(run) not in md
    assert "**`" + sel["best"]["FORA"] + "`**" in (docs / "compare_methods_selection.md").read_text()
    assert (docs / "compare_methods_tmacs.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"  # a PNG, not a stub
    cm.main(["--timing", "--repeats", "1", *sizes])  # the seconds of every final row, in one interleaved run
    timed = json.loads((docs / "compare_methods.json").read_text())
    assert timed["rows"][0]["fid_fmnist"] == out["rows"][0]["fid_fmnist"]  # the records are kept
    assert all(r["timed_seconds_per_image"] > 0 for r in timed["rows"]) and timed["timing"]["repeats"] == 1
    assert (docs / "compare_methods_seconds.png").is_file()
