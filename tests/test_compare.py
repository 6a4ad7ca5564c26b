"""The comparison harness: configuration strings, one protocol for every row, resumable rows, the report, the CLI."""

import json

import numpy as np
import pytest

from lazydit.cli import main
from lazydit.errors import UsageError
from lazydit.evaluation import compare as cmp
from lazydit.evaluation.compare import compare, write_report
from lazydit.evaluation.rows import RowSettings, parse_spec
from lazydit.evaluation.fmnist import default_classifier, default_reference
from lazydit.evaluation.metrics import load_npz_samples
from lazydit.lazy import FORA, LazyGates, Learning2Cache, ReferenceGates

from conftest import tiny_model


def test_parse_spec():
    s = parse_spec("ddim-20+fora:interval=2")
    assert (s.sampler, s.steps, s.method, s.options, s.target) == ("ddim", 20, "fora", (("interval", 2),), None)
    s = parse_spec("dpm++2m-10")
    assert (s.sampler, s.steps, s.method, s.family) == ("dpm++2m", 10, None, "DPM++2M")
    s = parse_spec("dpm++2m-20+lazy:gates=default,target=0.5")
    assert s.target == 0.5 and s.family == "LazyDiT +DPM++2M" and dict(s.options) == {"gates": "default"}
    assert parse_spec("ddim-20+taylorseer:interval=3,order=2").family == "taylorseer O=2"
    for bad, msg in (("euler-10", "SAMPLER-T"), ("ddim", "SAMPLER-T"), ("ddim-0", "T must"),
                     ("ddim-10+magic", "unknown method"), ("ddim-10+fora:interval", "key=value"),
                     ("ddim-10+fbcache:target=1.5", "target"), ("ddim-10+lazy:target=0.5", "gates=FILE"),
                     ("ddim-10+l2c:target=0.5", "router=FILE")):
        with pytest.raises(UsageError, match=msg):
            parse_spec(bad)


def test_build_policy_kinds(tmp_path):
    model = tiny_model()
    assert cmp.build_policy(parse_spec("ddim-10"), model) is None
    assert isinstance(cmp.build_policy(parse_spec("ddim-10+fora:interval=2"), model), FORA)
    g = LazyGates.for_model(model, 10)
    g.save(tmp_path / "g.safetensors")
    r = LazyGates.for_model(model, 10, router=True)
    r.save(tmp_path / "r.safetensors")
    assert type(cmp.build_policy(parse_spec(f"ddim-10+lazy:gates={tmp_path}/g.safetensors"), model)) is ReferenceGates
    assert isinstance(cmp.build_policy(parse_spec(f"ddim-10+l2c:router={tmp_path}/r.safetensors"), model),
                      Learning2Cache)
    with pytest.raises(UsageError, match="router bank"):
        cmp.build_policy(parse_spec(f"ddim-10+lazy:gates={tmp_path}/r.safetensors"), model)
    with pytest.raises(UsageError, match="gate bank"):
        cmp.build_policy(parse_spec(f"ddim-10+l2c:router={tmp_path}/g.safetensors"), model)


@pytest.fixture(scope="module")
def fmnist_tiny():
    return tiny_model(input_size=28, patch_size=4, num_classes=10)


def test_compare_one_protocol_resumable(tmp_path, fmnist_tiny, monkeypatch):
    model = fmnist_tiny
    cfg = RowSettings(num_samples=24, batch_size=12, micro_batch=None, ref_samples=12, reference="ddim-8",
                        calib_per_class=1)
    specs = ["ddim-4", "ddim-8+fora:interval=1", "ddim-8+fora:interval=2", "ddim-8+teacache:target=0.4",
             "dpm++2m-4"]
    run = tmp_path / "run"
    rows = compare(model, specs, cfg, default_classifier(), default_reference(), run, progress=False,
                   log=lambda m: None)
    assert [r["sampler"] for r in rows] == specs
    by = dict(zip(specs, rows))
    # FORA with interval 1 is DDIM-8 itself: its images equal the reference's (same labels and noise)
    fora1 = load_npz_samples(run / "ddim-8+fora_interval=1.npz")
    assert np.array_equal(fora1[: cfg.ref_samples], load_npz_samples(run / "reference-ddim-8-n12.npz"))
    assert by["ddim-8+fora:interval=1"]["psnr_vs_ref"] == float("inf")
    assert by["ddim-8+fora:interval=2"]["lazy_ratio"] == pytest.approx(3 / 8)
    assert by["ddim-8+fora:interval=2"]["tmacs"] < by["ddim-8+fora:interval=1"]["tmacs"]
    tea = by["ddim-8+teacache:target=0.4"]
    assert abs(tea["calibration_ratio"] - 0.4) <= 1 / 8 and len(tea["coefficients"]) == 5
    assert {r["family"] for r in rows} == {"DDIM", "fora", "teacache", "DPM++2M"}
    # every row saw the same labels
    labels = [np.load(run / f"{parse_spec(s).filename}.npz")["arr_1"] for s in specs]
    assert all(np.array_equal(labels[0], lab) for lab in labels)

    # resumable: finished rows are read back, nothing is sampled again
    monkeypatch.setattr(cmp, "run_row", lambda *a, **k: pytest.fail("a finished row was sampled again"))
    again = compare(model, specs, cfg, default_classifier(), default_reference(), run, progress=False)
    assert [r["fid"] for r in again] == [r["fid"] for r in rows]
    with pytest.raises(UsageError, match="other settings"):
        compare(model, specs[:1], RowSettings(**{**cfg.__dict__, "cfg_scale": 3.0}), default_classifier(),
                default_reference(), run, progress=False)

    out = tmp_path / "docs" / "cmp"
    write_report(rows, cfg, out, title="t", command="cmd")
    md = (tmp_path / "docs" / "cmp.md").read_text()
    assert "Generated by `cmd`" in md and md.count("\n| ddim-") == 4
    csv = (tmp_path / "docs" / "cmp.csv").read_text().splitlines()
    assert csv[0].startswith("config,family") and len(csv) == 1 + len(specs)
    assert len(json.loads((tmp_path / "docs" / "cmp.json").read_text())["rows"]) == len(specs)
    for suffix in ("tmacs", "seconds"):
        assert (tmp_path / "docs" / f"cmp_{suffix}.png").stat().st_size > 10_000


def test_compare_checks_every_config_before_work(tmp_path, fmnist_tiny):
    with pytest.raises(UsageError, match="interval"):
        compare(fmnist_tiny, ["ddim-4", "ddim-8+fora:interval=0"], RowSettings(num_samples=4),
                default_classifier(), default_reference(), tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()


def test_cli_compare(tmp_path, capsys):
    out = tmp_path / "cmp"
    main(["compare", "ddim-3", "ddim-4+fora:interval=2", "--num-samples", "8", "--batch-size", "8",
          "--ref-samples", "4", "--reference", "ddim-6", "--out", str(out), "--json"])
    rows = json.loads(capsys.readouterr().out)
    assert [r["config"] for r in rows] == ["ddim-3", "ddim-4+fora:interval=2"]
    assert (out / "compare.md").exists() and (out / "compare_tmacs.png").exists()


def test_cli_compare_bad_config_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["compare", "ddim-3", "warp-9", "--out", str(tmp_path / "x")])
    message = str(e.value.code)
    assert message.startswith("error: 'warp-9': expected SAMPLER-T") and "\n" not in message
    assert not (tmp_path / "x").exists()


def test_cli_sample_with_dpm_and_a_method(tmp_path, capsys):
    main(["sample", "--steps", "4", "--sampler", "dpm++2m", "--method", "teacache:threshold=0.05", "--per-class", "1",
          "--out", str(tmp_path / "s.png"), "--json"])
    row = json.loads(capsys.readouterr().out)[0]
    assert row["sampler"] == "TeaCache-4+DPM++2M" and row["out"] == str(tmp_path / "s.png")
    from PIL import Image

    with Image.open(tmp_path / "s.png") as im:  # one row of ten 28 px images, 2 px apart, scaled 3x
        assert im.format == "PNG" and im.size == (3 * (10 * 30 + 2), 3 * 32)
        first = np.asarray(im)[6:6 + 84, 6:6 + 84]  # the first image: a sample, not a flat tile
        assert first.std() > 10


def test_report_compares_each_row_with_ddim_at_equal_tmacs(tmp_path):
    def row(name, tmacs, fid, method="none", sampler="ddim"):
        return dict(sampler=name, family=name, method=method, sampler_name=sampler, lazy_ratio=0.0, tmacs=tmacs,
                    fid=fid, sfid=1.0, inception_score=1.0, precision=0.5, recall=0.5, kid=0.0, psnr_vs_ref=20.0,
                    seconds_per_image=0.01)

    rows = [row("ddim-5", 1.0, 8.0), row("ddim-10", 2.0, 6.0), row("x", 1.5, 6.5, "fora"),
            row("far", 3.0, 5.0, "fora"), row("dpm++2m-5", 1.0, 9.0, sampler="dpm++2m")]
    write_report(rows, RowSettings(), tmp_path / "r")
    assert [r["fid_vs_ddim"] for r in rows] == [0.0, 0.0, -0.5, None, 1.0]
    assert "| x | 0.0% | 1.50000 | 0.750 | 6.500 | -0.500 |" in (tmp_path / "r.md").read_text()


def test_frontier_figure_colours_groups_apart_and_scales_wide_costs():
    """Thirteen curves (past tab10's ten colours) get thirteen colours unless they share a colour group, and costs
    spanning more than a decade get a log axis (the beyond-the-paper frontier: T = 10 to 50)."""
    rows = [dict(family="DDIM", method="none", fid=f, tmacs=t) for f, t in ((18.5, 2.6e-4), (2.3, 1.3e-3),
                                                                            (1.5, 6.6e-3))]
    rows += [dict(family=f"m{i}", method=f"m{i}", fid=2.0 + i / 10, tmacs=1e-3 + i * 1e-4) for i in range(12)]
    fig = cmp.frontier_figure(rows, "tmacs", "TMACs", "t")
    ax = fig.axes[0]
    assert ax.get_xscale() == "log" and ax.get_yscale() == "log"
    assert len({line.get_color() for line in ax.get_lines()}) == 13
    grouped = [dict(r, color_group="g" if r["method"] != "none" else "DDIM", marker="v") for r in rows]
    ax = cmp.frontier_figure(grouped, "tmacs", "TMACs", "t").axes[0]
    assert len({line.get_color() for line in ax.get_lines()}) == 2
    assert {line.get_marker() for line in ax.get_lines()} == {"v"}
    narrow = [r for r in rows if r["tmacs"] < 2e-3 and r["fid"] < 5]  # within a decade and 3x: linear axes
    ax = cmp.frontier_figure(narrow, "tmacs", "TMACs", "t").axes[0]
    assert ax.get_xscale() == "linear" and ax.get_yscale() == "linear"
