"""The eval harness: same labels/noise for every configuration, resumable generation, every metric in one row."""

import json
from dataclasses import asdict

import numpy as np
import pytest
import torch

from lazydit.evaluation.driver import EvalConfig, eval_labels, evaluate_config, generate
from lazydit.evaluation.features import reference_stats
from lazydit.evaluation.fmnist import FMNISTClassifier
from lazydit.lazy import LazyGates, policy_for

from conftest import tiny_model


@pytest.fixture(scope="module")
def setup():
    model = tiny_model(input_size=28, patch_size=7, num_classes=10)
    torch.manual_seed(0)
    ext = FMNISTClassifier(channels=(4, 8, 8, 16)).eval()
    real = np.random.default_rng(0).integers(0, 256, (64, 28, 28, 1), dtype=np.uint8)
    return model, ext, reference_stats(ext, real, progress=False)


def test_labels_are_uniform_and_seeded():
    y = eval_labels(100, 10, seed=3)
    assert torch.equal(torch.bincount(y), torch.full((10,), 10))
    assert torch.equal(y, eval_labels(100, 10, seed=3)) and not torch.equal(y, eval_labels(100, 10, seed=4))


def test_generate_writes_an_adm_npz_and_refuses_foreign_parts(setup, tmp_path):
    model, _, _ = setup
    cfg = EvalConfig(steps=4, cfg_scale=2.0, num_samples=10, batch_size=4, seed=1)
    full = generate(model, cfg, progress=False)
    assert full["images"].shape == (10, 28, 28, 1) and full["images"].dtype == np.uint8
    out = tmp_path / "s.npz"
    parts = tmp_path / "s.npz.parts"
    parts.mkdir()
    (parts / "config.json").write_text("{}")
    with pytest.raises(ValueError, match="another configuration"):
        generate(model, cfg, out=out, progress=False)
    (parts / "config.json").unlink()
    first = generate(model, cfg, out=out, progress=False)
    assert not parts.exists()  # parts are removed once the .npz is written
    with np.load(out) as f:
        assert np.array_equal(f["arr_0"], full["images"]) and np.array_equal(f["arr_1"], full["labels"])
    assert np.array_equal(first["images"], full["images"])


def test_resume_reuses_written_parts(setup, tmp_path, monkeypatch):
    model, _, _ = setup
    cfg = EvalConfig(steps=4, num_samples=8, batch_size=4)
    out = tmp_path / "s.npz"
    import lazydit.evaluation.driver as ev

    calls = []
    real_sample = ev.sample

    def failing_sample(*a, **kw):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt  # interrupted during the second batch
        return real_sample(*a, **kw)

    monkeypatch.setattr(ev, "sample", failing_sample)
    with pytest.raises(KeyboardInterrupt):
        generate(model, cfg, out=out, progress=False)
    assert (tmp_path / "s.npz.parts" / "part_00000.npz").exists()
    calls.clear()
    monkeypatch.setattr(ev, "sample", lambda *a, **kw: (calls.append(1), real_sample(*a, **kw))[1])
    resumed = generate(model, cfg, out=out, progress=False)
    assert len(calls) == 1  # only the missing batch was sampled
    assert np.array_equal(resumed["images"], generate(model, cfg, progress=False)["images"])


def test_evaluate_config_interrupted_while_scoring_samples_nothing_again(setup, tmp_path, monkeypatch):
    model, ext, ref = setup
    cfg = EvalConfig(steps=4, num_samples=8, batch_size=4)
    out = tmp_path / "s.npz"
    import lazydit.evaluation.driver as ev

    real_score, real_sample = ev.score, ev.sample

    def interrupted(*a, **kw):
        raise KeyboardInterrupt

    monkeypatch.setattr(ev, "score", interrupted)
    with pytest.raises(KeyboardInterrupt):
        evaluate_config(model, cfg, ext, ref, out=out, progress=False)
    assert out.exists() and len(list((tmp_path / "s.npz.parts").glob("part_*.npz"))) == 2  # kept until scored
    monkeypatch.setattr(ev, "score", real_score)
    monkeypatch.setattr(ev, "sample", interrupted)  # a second sampling would raise
    row = evaluate_config(model, cfg, ext, ref, out=out, progress=False)
    assert not (tmp_path / "s.npz.parts").exists()  # scored: the parts are gone
    monkeypatch.setattr(ev, "sample", real_sample)
    assert row["fid"] == evaluate_config(model, cfg, ext, ref, progress=False)["fid"]
    assert row["lazy_ratio"] == 0 and row["n"] == 8


def test_evaluate_config_row_has_every_column(setup):
    model, ext, ref = setup
    gates = LazyGates.for_model(model, 4, threshold=0.75)  # skip every even step
    cfg = EvalConfig(steps=4, num_samples=12, batch_size=6)
    dense = evaluate_config(model, cfg, ext, ref, progress=False)
    lazy = evaluate_config(model, cfg, ext, ref, policy=policy_for(gates), progress=False)
    for row in (dense, lazy):
        for k in ("fid", "sfid", "inception_score", "precision", "recall", "kid", "lazy_ratio", "tmacs", "seconds"):
            assert isinstance(row[k], float) and np.isfinite(row[k]), k
        json.dumps(row)
    assert dense["sampler"] == "DDIM-4" and lazy["sampler"] == "Lazy-4"
    assert dense["lazy_ratio"] == 0 and lazy["lazy_ratio"] == 0.5
    assert lazy["tmacs"] < 0.6 * dense["tmacs"]


def test_micro_batch_changes_neither_images_nor_resumable_parts(setup, tmp_path):
    model, _, _ = setup
    cfg = EvalConfig(steps=4, cfg_scale=2.0, num_samples=10, batch_size=5, seed=1)
    whole = generate(model, cfg, progress=False)
    out = tmp_path / "s.npz"
    parts = tmp_path / "s.npz.parts"
    parts.mkdir()
    meta = {**json.loads(json.dumps(asdict(cfg))), "micro_batch": None, "policy": None}
    (parts / "config.json").write_text(json.dumps(meta))  # parts written without micro-batching
    chunked = generate(model, EvalConfig(**{**vars(cfg), "micro_batch": 2}), out=out, progress=False)
    assert np.array_equal(chunked["images"], whole["images"])
