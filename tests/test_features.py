"""The Fashion-MNIST feature extractor (lazydit.features): shapes, files, reference statistics, metrics."""

import numpy as np
import pytest
import torch

from lazydit.errors import CheckpointError
from lazydit.models.checkpoint import save_model
from lazydit.evaluation.fmnist import FMNISTClassifier, load_classifier, save_classifier, train_classifier
from lazydit.evaluation.features import (
    evaluate,
    extract_features,
    fingerprint,
    load_reference,
    reference_stats,
    save_reference,
)

TINY = (4, 8, 8, 8)  # channels: pool F = 8, spatial 7*49 = 343


def tiny_extractor(seed=0):
    torch.manual_seed(seed)
    return FMNISTClassifier(channels=TINY).eval()


def blobs(n, seed=0, shift=0.0):
    """uint8 (n, 28, 28, 1) images: random bright rectangles on a dark background (+ optional brightness shift)."""
    rng = np.random.default_rng(seed)
    x = np.zeros((n, 28, 28), dtype=np.float64)
    for i in range(n):
        r, c = rng.integers(2, 16, 2)
        h, w = rng.integers(6, 12, 2)
        x[i, r : r + h, c : c + w] = rng.uniform(120, 255)
    x = x + rng.normal(0, 10, x.shape) + shift
    return np.clip(x, 0, 255).astype(np.uint8)[..., None]


def test_features_shapes():
    m = FMNISTClassifier()
    x = torch.rand(3, 1, 28, 28) * 2 - 1
    f = m.features(x)
    assert f["pool"].shape == (3, 128) and f["spatial"].shape == (3, 7 * 7 * 7) and f["logits"].shape == (3, 10)
    torch.testing.assert_close(m(x), f["logits"])


def test_extract_features_uint8_nhwc():
    m = tiny_extractor()
    imgs = blobs(10)
    f = extract_features(m, imgs, batch_size=4, progress=False)
    assert f["pool"].shape == (10, 8) and f["spatial"].shape == (10, 343) and f["probs"].shape == (10, 10)
    np.testing.assert_allclose(f["probs"].sum(1), 1, rtol=1e-5)
    with torch.no_grad():  # same as feeding [-1, 1] NCHW floats by hand
        ref = m.features(torch.from_numpy(imgs).permute(0, 3, 1, 2).float() / 127.5 - 1)
    np.testing.assert_allclose(f["pool"], ref["pool"].numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(extract_features(m, imgs[..., 0], progress=False)["pool"], f["pool"])  # (N, H, W)
    with pytest.raises(ValueError, match="uint8"):
        extract_features(m, imgs.astype(np.float32), progress=False)
    with pytest.raises(ValueError, match="28, 28"):
        extract_features(m, np.zeros((2, 32, 32, 3), np.uint8), progress=False)


def test_classifier_round_trip_and_wrong_file(tmp_path, model):
    m = tiny_extractor()
    path = tmp_path / "c.safetensors"
    save_classifier(m, path, {"test_accuracy": 0.5, "train_args": {"epochs": 1}})
    m2 = load_classifier(path)
    assert m2.arch == m.arch and m2.meta["test_accuracy"] == 0.5 and m2.meta["train_args"] == {"epochs": 1}
    assert fingerprint(m2) == fingerprint(m) == m2.meta["fingerprint"]
    x = torch.rand(2, 1, 28, 28)
    torch.testing.assert_close(m2(x), m(x))
    # a DiT file, a text file, a classifier file with a tampered architecture
    save_model(model, tmp_path / "dit.safetensors")
    with pytest.raises(CheckpointError, match="not a lazydit Fashion-MNIST classifier"):
        load_classifier(tmp_path / "dit.safetensors")
    (tmp_path / "junk.safetensors").write_text("hello")
    with pytest.raises(CheckpointError, match="not a safetensors file"):
        load_classifier(tmp_path / "junk.safetensors")
    from safetensors.torch import load_file, save_file

    state = load_file(str(path))
    del state["head.bias"]
    save_file(state, str(tmp_path / "bad.safetensors"), metadata={"format": "lazydit-fmnist-classifier",
                                                                 "arch": '{"channels": [4, 8, 8, 8]}'})
    with pytest.raises(CheckpointError, match="missing keys: head.bias"):
        load_classifier(tmp_path / "bad.safetensors")
    with pytest.raises(FileNotFoundError):
        load_classifier(tmp_path / "nope.safetensors")


def test_reference_round_trip(tmp_path):
    m = tiny_extractor()
    stats = reference_stats(m, blobs(40), progress=False)
    path = tmp_path / "ref.npz"
    save_reference(path, stats, {"split": "test"})
    ref = load_reference(path)
    for k in ("mu", "sigma", "mu_s", "sigma_s", "pool", "mean_probs"):
        np.testing.assert_array_equal(ref[k], stats[k])
    assert ref["pool"].dtype == np.float16 and ref["sigma"].dtype == np.float64 and ref["sigma_s"].shape == (343, 343)
    assert ref["meta"]["split"] == "test" and ref["meta"]["n"] == 40 and ref["meta"]["fingerprint"] == fingerprint(m)
    np.savez(tmp_path / "other.npz", arr_0=np.zeros((2, 28, 28, 1), np.uint8))
    with pytest.raises(ValueError, match="not a lazydit reference"):
        load_reference(tmp_path / "other.npz")
    (tmp_path / "junk.npz").write_text("hello")
    with pytest.raises(ValueError):
        load_reference(tmp_path / "junk.npz")


def test_evaluate_self_and_shifted():
    m = tiny_extractor()
    imgs = blobs(200)
    ref = reference_stats(m, imgs, progress=False)
    kw = dict(progress=False, kid_subsets=5, kid_subset_size=100)
    same = evaluate(m, imgs, ref, **kw)
    assert set(same) == {"fid", "sfid", "inception_score", "precision", "recall", "kid"}
    assert abs(same["fid"]) < 1e-3 and abs(same["sfid"]) < 1e-2
    assert same["precision"] == 1.0 and same["recall"] == 1.0
    assert same["inception_score"] >= 1.0 and abs(same["kid"]) < 1e-2
    other = evaluate(m, blobs(200, seed=1, shift=60), ref, **kw)
    assert other["fid"] > 100 * max(abs(same["fid"]), 1e-6) and other["sfid"] > same["sfid"]
    assert other["kid"] > same["kid"]
    # precomputed features give the same numbers; another extractor's reference is refused
    assert evaluate(m, extract_features(m, imgs, progress=False), ref, **kw) == same
    with pytest.raises(ValueError, match="another extractor"):
        evaluate(tiny_extractor(seed=1), imgs, ref, **kw)


def test_train_classifier_deterministic():
    rng = np.random.default_rng(0)
    x = torch.from_numpy(rng.uniform(-1, 1, (64, 1, 28, 28)).astype(np.float32))
    y = torch.arange(64) % 10
    kw = dict(epochs=1, batch_size=16, lr=1e-3, seed=3, progress=False, channels=TINY, max_steps=3)
    m1, acc1 = train_classifier(x, y, x[:16], y[:16], **kw)
    m2, acc2 = train_classifier(x, y, x[:16], y[:16], **kw)
    assert fingerprint(m1) == fingerprint(m2) and acc1 == acc2 and 0 <= acc1 <= 1
    m3, _ = train_classifier(x, y, x[:16], y[:16], **{**kw, "seed": 4})
    assert fingerprint(m3) != fingerprint(m1)
    assert not m1.training


def test_extractor_and_reference_defaults_to_the_shipped_fmnist_pair(tmp_path):
    from lazydit.evaluation import fmnist
    from lazydit.evaluation.features import extractor_and_reference

    ext, ref = extractor_and_reference("fmnist")
    assert isinstance(ext, FMNISTClassifier) and fingerprint(ext) == fingerprint(fmnist.default_classifier())
    assert ref["meta"] == fmnist.default_reference()["meta"]
    images = np.random.default_rng(0).integers(0, 256, (16, 28, 28, 1), dtype=np.uint8)
    own = reference_stats(tiny_extractor(), images, progress=False)
    save_reference(tmp_path / "r.npz", own)
    _, ref = extractor_and_reference("fmnist", ref=tmp_path / "r.npz")  # --ref replaces the shipped statistics
    np.testing.assert_array_equal(ref["mu"], own["mu"])


def test_the_second_extractor_is_another_architecture_with_its_own_shipped_reference(tmp_path):
    from lazydit.errors import CheckpointError
    from lazydit.evaluation import fmnist
    from lazydit.evaluation.features import extractor_and_reference

    ext, ref = extractor_and_reference("fmnist-resnet")
    first = fmnist.default_classifier()
    assert isinstance(ext, fmnist.FMNISTResNet) and not isinstance(ext, FMNISTClassifier)
    assert ext.meta["arch"]["kind"] == "resnet" and ext.meta["train_args"]["seed"] != first.meta["train_args"]["seed"]
    assert ref["meta"]["fingerprint"] == fingerprint(ext) != fingerprint(first)
    assert ref["meta"]["n"] == 10000 and ref["mu"].shape == (ext.arch["channels"][3],) != first.arch["channels"][3:]
    assert ext.meta["test_accuracy"] > 0.85
    images = np.random.default_rng(0).integers(0, 256, (32, 28, 28, 1), dtype=np.uint8)
    f = extract_features(ext, images, progress=False)
    assert f["pool"].shape == (32, 160) and f["spatial"].shape == (32, 7 * 49) and f["probs"].shape == (32, 10)
    # round trip of the architecture kind; an unknown kind is one line
    m = fmnist.FMNISTResNet(channels=(8, 8, 16, 16))
    fmnist.save_classifier(m, tmp_path / "r.safetensors")
    back = fmnist.load_classifier(tmp_path / "r.safetensors")
    assert isinstance(back, fmnist.FMNISTResNet) and fingerprint(back) == fingerprint(m)
    with pytest.raises(CheckpointError, match="unknown classifier architecture 'vit'"):
        fmnist.build_classifier(dict(kind="vit", channels=[8, 8, 16, 16]))


def test_train_classifier_builds_the_architecture_asked_for():
    from lazydit.evaluation import fmnist

    rng = np.random.default_rng(0)
    x = torch.from_numpy(rng.uniform(-1, 1, (32, 1, 28, 28)).astype(np.float32))
    y = torch.arange(32) % 10
    m, acc = train_classifier(x, y, x[:8], y[:8], epochs=1, batch_size=16, progress=False, channels=(8, 8, 16, 16),
                              max_steps=2, arch="resnet")
    assert isinstance(m, fmnist.FMNISTResNet) and 0 <= acc <= 1
