"""Row records: a row's bootstrap draws and PSNR, kept so that it pairs with rows sampled elsewhere."""

import json

import numpy as np
import pytest

from lazydit.evaluation import records
from lazydit.evaluation.features import extract_features
from lazydit.evaluation.fmnist import default_classifier, default_reference
from lazydit.evaluation.metrics import (bootstrap_fid_draws, feature_stats, frechet_distance, paired_bootstrap_fid,
                                       paired_psnr)
from lazydit.images import save_npz


@pytest.fixture(scope="module")
def rows(tmp_path_factory):
    d = tmp_path_factory.mktemp("rows")
    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, (12, 28, 28, 1), dtype=np.uint8)
    b = np.clip(a.astype(int) + rng.integers(-20, 21, a.shape), 0, 255).astype(np.uint8)
    save_npz(a, d / "a.npz")
    save_npz(b, d / "b.npz")
    return d, a, b


def test_complete_adds_draws_and_psnr_once(rows):
    d, a, b = rows
    ext, ref = default_classifier(), default_reference()
    rec = dict(fid=1.0)
    assert records.complete(rec, d / "a.npz", reps=4, seed=3, fine=b[:5], extractor=ext, ref=ref)
    feats = extract_features(ext, a, progress=False)["pool"]
    assert rec["fid_draws"] == bootstrap_fid_draws(feats, ref["mu"], ref["sigma"], 4, 3).tolist()
    assert rec["psnr_vs_ref"] == paired_psnr(a[:5], b[:5])["psnr"] and rec["psnr_vs_ref_samples"] == 5
    assert not records.complete(rec, d / "a.npz", reps=4, seed=3, fine=b[:5], extractor=ext, ref=ref)  # nothing new
    assert records.complete(rec, d / "a.npz", reps=6, seed=3, extractor=ext, ref=ref)  # other settings: redrawn
    assert len(rec["fid_draws"]) == 6


def test_pair_of_records_equals_the_joint_paired_bootstrap(rows):
    d, a, b = rows
    ext, ref = default_classifier(), default_reference()
    fa, fb = (extract_features(ext, x, progress=False)["pool"] for x in (a, b))
    ra, rb = ({"fid": frechet_distance(*feature_stats(f), ref["mu"], ref["sigma"])} for f in (fa, fb))
    for rec, name in ((ra, "a"), (rb, "b")):  # each alone, as if sampled on two machines
        records.complete(rec, d / f"{name}.npz", reps=8, seed=0, extractor=ext, ref=ref)
    joint = paired_bootstrap_fid(fa, fb, ref["mu"], ref["sigma"], reps=8, seed=0)
    got = records.pair(ra, rb, reps=8, seed=0)
    assert (got["lo"], got["hi"], got["std"]) == (joint["lo"], joint["hi"], joint["std"])
    assert got["delta"] == pytest.approx(joint["delta"])
    assert records.pair(ra, rb, reps=8, seed=1) is None  # other resamples: not paired
    assert records.pair(ra, {"fid": 1.0}, reps=8, seed=0) is None


def test_read_committed_only_with_the_same_settings(tmp_path):
    path = tmp_path / "t.json"
    assert records.read_committed(path, cfg=1.5) == {}
    path.write_text(json.dumps(dict(cfg=1.5, num_samples=10, rows=[dict(sampler="DDIM-7", fid=3.0)])))
    assert records.read_committed(path, cfg=1.5, num_samples=10) == {"DDIM-7": dict(sampler="DDIM-7", fid=3.0)}
    assert records.read_committed(path, cfg=2.0, num_samples=10) == {}


def test_mirror_restores_or_commits(tmp_path):
    run, kept = tmp_path / "run" / "ref.npz", tmp_path / "docs" / "ref.npz"
    assert not records.mirror(run, kept) and not kept.exists()  # neither: nothing to do
    kept.parent.mkdir()
    kept.write_bytes(b"committed")
    assert records.mirror(run, kept) and run.read_bytes() == b"committed"  # a clean checkout: restored
    kept.unlink()
    assert records.mirror(run, kept) and kept.read_bytes() == b"committed"  # sampled here: committed
