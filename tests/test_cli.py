import json
from pathlib import Path

import numpy as np
import pytest
import torch

from lazydit.assets import DEFAULT_AUTOENCODER, SHIPPED_GATES, SHIPPED_STEPS, TRAIN_FLAGS, default_model, gates_path
from lazydit.lazy.shipped import default_gates
from lazydit.models.checkpoint import save_model
from lazydit.cli import main
from lazydit.lazy import LazyGates

from conftest import tiny_model


def run_json(capsys, *argv):
    main(list(argv) + ["--json"])
    return json.loads(capsys.readouterr().out)


def test_shipped_assets_fit_together():
    model = default_model()
    assert model.name == "DiT-FMNIST-Latent"
    assert model.config.input_size == 14 and model.config.in_channels == 4 and model.config.num_classes == 10
    assert model.autoencoder_file == DEFAULT_AUTOENCODER  # the shipped autoencoder, beside it
    for T in SHIPPED_STEPS:
        g = default_gates(T)
        g.check_model(model)
        assert g.steps == T and torch.all(g.weight[:, :, 1::2] == 0)
        assert "training" in g.meta
    default_gates(50, kind="lookahead").check_model(model)
    for T in SHIPPED_GATES["forecast"]:  # beyond the paper: the reference parity with first-order forecast reuse
        g = default_gates(T, kind="forecast")
        g.check_model(model)
        assert g.steps == T and g.parity and g.meta["forecast"] == 1 and g.meta["training"]["forecast"] == 1
    for T in SHIPPED_GATES["every-forecast"]:  # past 50%: every step gated, trained on its own chains
        g = default_gates(T, kind="every-forecast")
        g.check_model(model)
        t = g.meta["training"]
        assert not g.parity and g.meta["forecast"] == 1 and t["every_step"] and t["rollout"] == 3


@pytest.mark.parametrize("T,kind", [(T, kind) for kind, steps in SHIPPED_GATES.items() for T in steps])
def test_shipped_gates_refuse_the_pixel_dit(T, kind):
    from lazydit.errors import GateMismatchError
    from lazydit.models.dit import create_model

    pixel = create_model("DiT-FMNIST")  # same depth and width; patch 4 on 1x28x28 pixels
    with pytest.raises(GateMismatchError, match="config"):
        default_gates(T, kind=kind).check_model(pixel)


def test_shipped_gate_kinds_are_named_and_refused_clearly():
    from lazydit.lazy.shipped import resolve_gates, shipped_kind
    from lazydit.errors import GateMismatchError

    assert shipped_kind("default") == "reference" and shipped_kind("default-lookahead") == "lookahead"
    assert shipped_kind("my-gates.safetensors") is None and shipped_kind("default-nope") is None
    assert resolve_gates("default-lookahead", 50).lookahead and not resolve_gates("default", 50).lookahead
    with pytest.raises(GateMismatchError, match="the kinds are reference, lookahead, forecast, every-forecast"):
        default_gates(50, kind="nope")
    with pytest.raises(GateMismatchError, match=r"lookahead gates exist for T in \(50,\), not 20"):
        default_gates(20, kind="lookahead")
    with pytest.raises(GateMismatchError, match="--steps 40 --every-step --forecast 1 --rollout 3`"):
        default_gates(40, kind="every-forecast")


# the GateTrainConfig fields that tell the shipped kinds apart, each set by a train-gates flag of the same name
KIND_FIELDS = ("lookahead", "every_step", "data_free", "forecast", "rollout")


@pytest.mark.parametrize("T,kind", [(T, kind) for kind, steps in SHIPPED_GATES.items() for T in steps])
def test_train_flags_of_each_kind_retrain_the_shipped_files_kind(T, kind):
    """The options a missing shipped set's error suggests (TRAIN_FLAGS), parsed by the real parser, set the
    training fields recorded in the shipped file of that kind (older files record no rollout: 0)."""
    from lazydit.cli import build_parser
    from lazydit.training.gates import GateTrainConfig

    args = build_parser().parse_args(["train-gates", "--steps", str(T), "--out", "run", *TRAIN_FLAGS[kind].split()])
    trained = default_gates(T, kind=kind).meta["training"]
    assert set(KIND_FIELDS) <= set(GateTrainConfig.__dataclass_fields__)
    assert {f: getattr(args, f) or 0 for f in KIND_FIELDS} == {f: trained.get(f) or 0 for f in KIND_FIELDS}


def test_demo_prints_rows_and_writes_pngs(tmp_path, capsys):
    rows = run_json(capsys, "demo", "--out", str(tmp_path), "--per-class", "1")
    assert [r["sampler"] for r in rows] == ["DDIM-50", "DDIM-25", "Lazy-50"]
    for r in rows:
        assert {"steps", "lazy_ratio", "tmacs", "seconds"} <= set(r)
    assert rows[0]["lazy_ratio"] == 0 and rows[2]["lazy_ratio"] > 0.2
    assert rows[2]["tmacs"] < rows[0]["tmacs"]
    assert abs(rows[1]["tmacs"] * 2 - rows[0]["tmacs"]) < 1e-12
    for name in ("ddim50.png", "ddim25.png", "lazy50.png", "lazy50_heatmap.png", "compare.png"):
        assert (tmp_path / name).stat().st_size > 0


def test_demo_samples_with_another_shipped_gate_kind(tmp_path, capsys):
    rows = run_json(capsys, "demo", "--out", str(tmp_path), "--per-class", "1", "--gates", "forecast")
    assert [r["sampler"] for r in rows] == ["DDIM-50", "DDIM-25", "Lazy-50"]
    assert 0.4 < rows[2]["lazy_ratio"] <= 0.5  # the forecast gates' calibrated 48%, under the parity cap
    assert (tmp_path / "lazy50_heatmap.png").stat().st_size > 0


def test_sample_npz_is_adm_format(tmp_path, capsys):
    out = tmp_path / "s.npz"
    rows = run_json(capsys, "sample", "--steps", "10", "--gates", "default", "--labels", "0,3,9", "--out", str(out),
                    "--heatmap", str(tmp_path / "h.png"))
    assert (tmp_path / "h.png").stat().st_size > 0
    arr = np.load(out)["arr_0"]
    assert arr.shape == (3, 28, 28, 1) and arr.dtype == np.uint8
    assert rows[0]["sampler"] == "Lazy-10"


def test_shipped_forecast_gates_sample_from_the_cli(tmp_path, capsys):
    labels = ",".join(map(str, range(10)))
    plain = run_json(capsys, "sample", "--steps", "20", "--gates", "default", "--labels", labels,
                     "--out", str(tmp_path / "p.npz"))
    fc = run_json(capsys, "sample", "--steps", "20", "--gates", "default-forecast", "--labels", labels,
                  "--out", str(tmp_path / "f.npz"))
    assert fc[0]["sampler"] == "Lazy-20" and fc[0]["lazy_ratio"] == pytest.approx(0.5, abs=0.02)  # calibrated to 50%
    a, b = np.load(tmp_path / "p.npz")["arr_0"], np.load(tmp_path / "f.npz")["arr_0"]
    assert a.shape == b.shape and not np.array_equal(a, b)  # another gate set than --gates default
    with pytest.raises(SystemExit, match="trained with forecast order 1"):  # the file enforces its variant
        main(["sample", "--steps", "20", "--gates", "default-forecast", "--forecast", "0", "--labels", "0"])


def test_shipped_every_step_forecast_gates_go_past_half_with_their_chain_cap(tmp_path, capsys):
    labels = ",".join(map(str, range(10)))
    rows = run_json(capsys, "sample", "--steps", "20", "--gates", "default-every-forecast", "--labels", labels,
                    "--out", str(tmp_path / "e.npz"))
    assert 0.6 < rows[0]["lazy_ratio"] < 0.8  # calibrated to 70%, past the parity's 50%
    free = run_json(capsys, "sample", "--steps", "20", "--gates", "default-every-forecast", "--max-skips", "19",
                    "--labels", labels, "--out", str(tmp_path / "f.npz"))
    assert free[0]["lazy_ratio"] > rows[0]["lazy_ratio"]  # without the cap of 3 (their --rollout), longer chains


def test_sample_with_gates_for_another_T_fails_clearly(capsys):
    with pytest.raises(SystemExit) as e:
        main(["sample", "--steps", "25", "--gates", "default"])
    assert "shipped gates exist" in str(e.value)
    with pytest.raises(SystemExit) as e:
        main(["sample", "--steps", "50", "--gates", str(gates_path(20))])
    assert "T=20" in str(e.value)


def test_gates_for_another_model_fail_clearly(tmp_path):
    other = tiny_model()
    save_model(other, tmp_path / "m.safetensors")
    with pytest.raises(SystemExit) as e:
        main(["sample", "--model", str(tmp_path / "m.safetensors"), "--steps", "50", "--gates", "default"])
    assert "gates are for a model" in str(e.value)


def test_missing_data_says_how_to_get_it(tmp_path):
    with pytest.raises(SystemExit) as e:
        main(["train-gates", "--steps", "10", "--iters", "1", "--data", str(tmp_path / "none"), "--out",
              str(tmp_path / "g")])
    assert "apt-get install -y dataset-fashion-mnist" in str(e.value) and "--data" in str(e.value)


def test_train_gates_cli_resume_and_calibrate(tmp_path, fake_fmnist, capsys):
    common = ["train-gates", "--steps", "10", "--batch-size", "4", "--data", str(fake_fmnist), "--rho", "0.05",
              "--ckpt-every", "2", "--lr", "1e-2"]
    a = run_json(capsys, *common, "--iters", "4", "--out", str(tmp_path / "a"))
    run_json(capsys, *common, "--iters", "2", "--out", str(tmp_path / "b"))
    b = run_json(capsys, *common, "--iters", "4", "--out", str(tmp_path / "b"), "--resume")
    ga, gb = LazyGates.load(a["gates"]), LazyGates.load(b["gates"])
    assert torch.equal(ga.weight, gb.weight)
    for changed in (["--lr", "1e-3"], ["--rho", "0.1"], ["--seed", "3"], ["--lookahead"], ["--batch-size", "8"]):
        before = (tmp_path / "b" / "gates.safetensors").read_bytes()
        with pytest.raises(SystemExit) as e:  # provenance: the state came from other settings
            main([*common, *changed, "--iters", "6", "--out", str(tmp_path / "b"), "--resume"])
        assert "other settings" in str(e.value) and "\n" not in str(e.value)
        assert (tmp_path / "b" / "gates.safetensors").read_bytes() == before
    res = run_json(capsys, "calibrate", "--gates", a["gates"], "--steps", "10", "--target-ratio", "0.2",
                   "--calib-per-class", "1", "--out", str(tmp_path / "c.safetensors"))
    assert abs(res["lazy_ratio"] - 0.2) < 0.1
    assert LazyGates.load(tmp_path / "c.safetensors").threshold == pytest.approx(res["threshold"])
    before = Path(a["gates"]).read_bytes()
    for argv, expect in ((["--target-ratio", "0.9", "--out", str(tmp_path / "d.safetensors")], "out of reach"),
                         (["--target-ratio", "0.2"], "--out FILE"),
                         (["--target-ratio", "0.2", "--steps", "20", "--out", str(tmp_path / "d.safetensors")], "T=10")):
        with pytest.raises(SystemExit) as e:
            main(["calibrate", "--gates", a["gates"], "--calib-per-class", "1", *argv])
        assert expect in str(e.value) and "\n" not in str(e.value)
    assert not (tmp_path / "d.safetensors").exists() and Path(a["gates"]).read_bytes() == before
    with pytest.raises(SystemExit, match="not the shipped gates"):
        main(["calibrate", "--gates", "default", "--steps", "50", "--target-ratio", "0.3", "--in-place"])


def test_cost_prints_paper_figures(capsys):
    rows = run_json(capsys, "cost", "--model", "DiT-XL/2", "--image-size", "256", "--steps", "50,40,25,20,7")
    for r, want in zip(rows, (5.72, 4.57, 2.86, 2.29, 0.80)):
        assert abs(r["tmacs"] - want) <= 0.01
    rows = run_json(capsys, "cost", "--model", "DiT-XL/2", "--image-size", "512", "--steps", "50,10")
    for r, want in zip(rows, (22.85, 4.57)):
        assert abs(r["tmacs"] - want) <= 0.01


def test_eval_scores_shipped_model_and_an_existing_npz(tmp_path, capsys):
    out = tmp_path / "s.npz"
    [row] = run_json(capsys, "eval", "--gates", "default", "--steps", "10", "--num-samples", "20",
                     "--batch-size", "10", "--out", str(out), "--device", "cpu")
    assert row["sampler"] == "Lazy-10" and row["n"] == 20 and 0 < row["lazy_ratio"] < 0.5
    assert {"fid", "sfid", "inception_score", "precision", "recall", "kid", "tmacs", "seconds"} <= set(row)
    [again] = run_json(capsys, "eval", "--samples", str(out), "--device", "cpu")
    assert again["fid"] == pytest.approx(row["fid"]) and again["n"] == 20
    with pytest.raises(SystemExit, match="inception-weights"):
        main(["eval", "--extractor", "inception", "--device", "cpu"])
