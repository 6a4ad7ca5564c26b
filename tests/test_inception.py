"""The FID Inception-v3 (lazydit.inception) with random weights only: no download, one core, a few seconds."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from lazydit.errors import CheckpointError
from lazydit.evaluation.inception import (
    FID_WEIGHTS_URL,
    NUM_PARAMS,
    InceptionV3FID,
    InceptionWeightsError,
    _resize_tf1_bilinear,
    load_inception,
    preprocess,
)


def random_state(seed=0):
    """A random state dict whose activations stay O(1) through the 94 conv layers (He init, random BN stats)."""
    g = torch.Generator().manual_seed(seed)
    state = {}
    for k, v in InceptionV3FID().state_dict().items():
        if k.endswith("num_batches_tracked"):
            state[k] = torch.zeros_like(v)
        elif k.endswith("conv.weight"):
            state[k] = torch.randn(v.shape, generator=g) * math.sqrt(2.0 / v[0].numel())
        elif k.endswith("bn.weight") or k.endswith("running_var"):
            state[k] = 0.75 + 0.5 * torch.rand(v.shape, generator=g)
        else:  # bn.bias, running_mean, fc.weight, fc.bias
            state[k] = 0.05 * torch.randn(v.shape, generator=g)
    return state


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    path = tmp_path_factory.mktemp("inception") / "pt_inception.pth"
    state = random_state()
    torch.save(state, path)
    return path, state


@pytest.fixture(scope="module")
def net(weights):
    return load_inception(weights[0])


@pytest.fixture(scope="module")
def images():
    """Two small uint8 RGB images (NHWC, ADM .npz layout)."""
    return np.random.default_rng(0).integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def feats(net, images):
    return net.features(preprocess(images))


def test_architecture_matches_pytorch_fid():
    m = InceptionV3FID()
    # torchvision Inception3's published 27,161,264 (1000 classes, with AuxLogits) - 3,326,696 (AuxLogits)
    # + 8 * 2049 (1008-way fc): pytorch-fid's FID Inception.
    assert sum(p.numel() for p in m.parameters()) == NUM_PARAMS == 23_850_960
    sd = m.state_dict()
    assert len(sd) == 94 * 6 + 2  # 94 conv+bn blocks (weight, bn weight/bias/mean/var/count) + fc
    assert not any(k.startswith("AuxLogits") for k in sd)
    assert sd["fc.weight"].shape == (1008, 2048)
    for k, shape in {  # keys of the pytorch-fid file (TF name -> PyTorch name map of the weight conversion)
        "Conv2d_1a_3x3.conv.weight": (32, 3, 3, 3),
        "Mixed_5b.branch_pool.conv.weight": (32, 192, 1, 1),
        "Mixed_6a.branch3x3dbl_3.conv.weight": (96, 96, 3, 3),
        "Mixed_6d.branch1x1.conv.weight": (192, 768, 1, 1),  # TF mixed_6/conv
        "Mixed_6e.branch7x7dbl_5.conv.weight": (192, 192, 1, 7),
        "Mixed_7a.branch7x7x3_4.bn.running_var": (192,),
        "Mixed_7b.branch3x3_2a.conv.weight": (384, 384, 1, 3),
        "Mixed_7c.branch3x3dbl_3b.bn.running_mean": (384,),
    }.items():
        assert tuple(sd[k].shape) == shape, k
    assert not any(p.requires_grad for p in m.parameters()) and not m.training


def test_load_strict_and_output_shapes(net, weights, feats):
    state = weights[1]
    for k, v in net.state_dict().items():
        assert torch.equal(v, state[k]), k
    assert feats["pool"].shape == (2, 2048)
    assert feats["spatial"].shape == (2, 7 * 17 * 17)
    assert feats["logits"].shape == (2, 1008)
    for v in feats.values():
        assert v.dtype == torch.float32 and torch.isfinite(v).all()
    assert feats["pool"].std() > 1e-3  # random weights, but activations neither vanish nor explode
    assert (feats["spatial"] >= 0).all()  # post-ReLU, like TF's mixed_6/conv


def test_deterministic(net, images, feats):
    again = net.features(preprocess(images))
    for k in feats:
        assert torch.equal(feats[k], again[k]), k


def test_feature_definitions(net, images, feats):
    """spatial = Mixed_6d.branch1x1[:, :7] in NHWC order, pool = pre-fc, logits = pool @ W^T without bias."""
    captured = {}
    hook = net.Mixed_6d.branch1x1.register_forward_hook(lambda m, i, o: captured.setdefault("s", o.clone()))
    try:
        x = preprocess(images[:1])
        f = net.features(x)
    finally:
        hook.remove()
    s = captured["s"]
    assert s.shape == (1, 192, 17, 17)
    assert torch.equal(f["spatial"], s[:, :7].permute(0, 2, 3, 1).reshape(1, -1))
    torch.testing.assert_close(f["pool"], feats["pool"][:1], rtol=1e-4, atol=1e-5)  # batch independent (eval BN)
    torch.testing.assert_close(f["logits"], f["pool"] @ net.fc.weight.T)
    net.logits_bias = True
    try:
        torch.testing.assert_close(net.features(x)["logits"], net.fc(f["pool"]))
    finally:
        net.logits_bias = False


def test_safetensors_and_missing_bn_counters(weights, tmp_path, net):
    state = {k: v for k, v in weights[1].items() if not k.endswith("num_batches_tracked")}  # as a TF conversion
    path = tmp_path / "inception.safetensors"
    save_file(state, str(path))
    m = load_inception(path)
    for k, v in net.state_dict().items():
        assert torch.equal(m.state_dict()[k], v), k
    pth = tmp_path / "no_counters.pth"
    torch.save(state, pth)
    load_inception(pth)


def test_missing_file_names_the_download(tmp_path):
    with pytest.raises(FileNotFoundError, match="pytorch-fid") as e:
        load_inception(tmp_path / "nope.pth")
    assert FID_WEIGHTS_URL in str(e.value)


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_truncated_file(weights, tmp_path, suffix):
    state = weights[1]
    full = tmp_path / f"full{suffix}"
    if suffix == ".pth":
        torch.save(state, full)
    else:
        save_file(state, str(full))
    data = full.read_bytes()
    cut = tmp_path / f"cut{suffix}"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(InceptionWeightsError, match="truncated or not a weights file"):
        load_inception(cut)
    junk = tmp_path / f"page{suffix}"
    junk.write_text("<html>404</html>")
    with pytest.raises(ValueError, match="truncated or not a weights file"):
        load_inception(junk)


def test_missing_and_unexpected_keys(weights, tmp_path):
    state = dict(weights[1])
    del state["Mixed_6d.branch1x1.conv.weight"]
    state["AuxLogits.fc.weight"] = torch.zeros(1008, 768)  # torchvision's aux head: not in the FID Inception
    path = tmp_path / "bad.pth"
    torch.save(state, path)
    with pytest.raises(InceptionWeightsError) as e:
        load_inception(path)
    msg = str(e.value)
    assert "missing keys: Mixed_6d.branch1x1.conv.weight" in msg
    assert "unexpected keys: AuxLogits.fc.weight" in msg
    assert isinstance(e.value, CheckpointError) and isinstance(e.value, ValueError)

    state = dict(weights[1])
    state["fc.weight"] = torch.zeros(1000, 2048)  # torchvision's 1000-way classifier
    torch.save(state, path)
    with pytest.raises(InceptionWeightsError, match="mis-shaped keys: fc.weight"):
        load_inception(path)

    torch.save([1, 2, 3], path)
    with pytest.raises(InceptionWeightsError, match="not a weights file"):
        load_inception(path)


def test_preprocess():
    rgb = np.arange(2 * 4 * 5 * 3, dtype=np.uint8).reshape(2, 4, 5, 3)
    x = preprocess(rgb)
    assert x.dtype == torch.float32 and x.shape == (2, 3, 4, 5)
    assert torch.equal(x, torch.from_numpy(rgb).permute(0, 3, 1, 2).float())
    assert torch.equal(InceptionV3FID.preprocess(torch.from_numpy(rgb)), x)
    gray = rgb[..., 0]
    for g in (gray, gray[..., None]):
        y = preprocess(g)
        assert y.shape == (2, 3, 4, 5)
        assert torch.equal(y[:, 0], y[:, 2]) and torch.equal(y[:, 0], torch.from_numpy(gray).float())
    with pytest.raises(ValueError, match="uint8"):
        preprocess(rgb.astype(np.float32))
    with pytest.raises(ValueError, match=r"\(N, H, W, C\)"):
        preprocess(np.zeros((2, 4, 5, 2), np.uint8))


def test_input_checks(net):
    with pytest.raises(ValueError, match=r"\[0, 255\]"):
        net.features(torch.rand(1, 3, 8, 8) * 2 - 1)  # [-1, 1] images
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        net.features(torch.rand(3, 8, 8))
    with pytest.raises(ValueError):
        InceptionV3FID(resize="bicubic")
    with pytest.raises(ValueError):
        InceptionV3FID(normalize="imagenet")


def test_input_pipeline():
    """Resize + normalisation choices, checked on the prepared 299x299 input (no network pass)."""
    x = torch.rand(2, 3, 32, 24) * 255
    m = InceptionV3FID()
    ref = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False) / 127.5 - 1
    torch.testing.assert_close(m._prepare(x), ref)
    assert m._prepare(torch.full((1, 3, 299, 299), 255.0)).eq(1).all()  # no resize at 299, 255 -> 1
    tf = InceptionV3FID(resize="tf1", normalize="tf")
    assert tf._prepare(torch.full((1, 3, 299, 299), 128.0)).eq(0).all()  # (x - 128) / 128
    assert tf._prepare(x).shape == (2, 3, 299, 299)
    # TF1 legacy bilinear: source = dst * in / out, no half-pixel offset, edge clamp
    row = torch.tensor([0.0, 10.0, 20.0]).view(1, 1, 1, 3)
    out = _resize_tf1_bilinear(row, (1, 6))
    torch.testing.assert_close(out.flatten(), torch.tensor([0.0, 5.0, 10.0, 15.0, 20.0, 20.0]))
    img = torch.arange(12.0).view(1, 1, 3, 4)
    torch.testing.assert_close(_resize_tf1_bilinear(img, (3, 4)), img)  # same size: identity
    # 3x4 -> 2x2: rows sampled at 0 and 1.5, columns at 0 and 2
    torch.testing.assert_close(_resize_tf1_bilinear(img, (2, 2)).flatten(), torch.tensor([0.0, 2.0, 6.0, 8.0]))


def test_equals_pytorch_fid_on_the_same_weights(weights, images, feats, monkeypatch):
    """pytorch-fid's FID Inception (torchvision's Inception3 with FIDInceptionA/C/E_1/E_2), the same random weights."""
    pf = pytest.importorskip("pytorch_fid.inception")  # needs torchvision: skipped where it is not installed
    state = weights[1]
    monkeypatch.setattr(pf, "load_state_dict_from_url", lambda *a, **k: dict(state))  # instead of the download
    blocks = pf.InceptionV3([pf.InceptionV3.DEFAULT_BLOCK_INDEX], resize_input=True, normalize_input=True).eval()
    full = pf.fid_inception_v3().eval()  # the whole network, with its 1008-way fc
    plain = pf._inception_v3(num_classes=1008, aux_logits=False, weights=None).eval()  # torchvision's, unpatched
    plain.load_state_dict(state)
    captured = {}
    full.Mixed_6d.branch1x1.register_forward_hook(lambda m, i, o: captured.setdefault("s", o.clone()))
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255  # pytorch-fid's input range: [0, 1]
    with torch.no_grad():
        pool = blocks(x)[0].flatten(1)  # (B, 2048): the FID features
        x299 = 2 * F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False) - 1
        logits = full(x299)  # fc with its bias
        logits_plain = plain(x299)
    torch.testing.assert_close(feats["pool"], pool, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(feats["logits"], logits - full.fc.bias, rtol=1e-4, atol=1e-4)  # ADM's: no bias
    spatial = captured["s"][:, :7].permute(0, 2, 3, 1).flatten(1)  # Mixed_6d.branch1x1 = TF mixed_6/conv
    torch.testing.assert_close(feats["spatial"], spatial, rtol=1e-4, atol=1e-5)
    # the comparison sees the FID patches: torchvision's own blocks (zero-padded averages) give other logits
    assert not torch.allclose(logits_plain, logits, rtol=1e-2, atol=1e-2)


def test_tf1_mode_equals_torch_fidelity_on_the_same_weights(weights, images):
    """torch-fidelity's InceptionV3 (TF1 resize, (x - 128) / 128) = resize="tf1", normalize="tf", same weights."""
    tfe = pytest.importorskip("torch_fidelity.feature_extractor_inceptionv3")  # needs torchvision too
    ref = tfe.FeatureExtractorInceptionV3("inception-v3-compat", ["2048", "logits_unbiased", "logits"],
                                          feature_extractor_weights_path=str(weights[0]))
    ours = load_inception(weights[0], resize="tf1", normalize="tf")
    with torch.no_grad():
        pool, logits_unbiased, logits = ref(torch.from_numpy(images).permute(0, 3, 1, 2).contiguous())
    f = ours.features(preprocess(images))
    torch.testing.assert_close(f["pool"], pool, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(f["logits"], logits_unbiased, rtol=1e-4, atol=1e-4)
    ours.logits_bias = True
    torch.testing.assert_close(ours.features(preprocess(images))["logits"], logits, rtol=1e-4, atol=1e-4)


def test_extractor_and_reference_reads_stats_or_an_adm_batch(weights, net, images, tmp_path):
    from lazydit.errors import LazyditError, UsageError
    from lazydit.evaluation.features import extractor_and_reference, reference_stats, save_reference

    batch = tmp_path / "adm_ref.npz"
    np.savez(batch, arr_0=images)
    ext, ref = extractor_and_reference("inception", ref=batch, inception_weights=weights[0], progress=False)
    assert isinstance(ext, InceptionV3FID)
    direct = reference_stats(net, images, progress=False)
    np.testing.assert_allclose(ref["mu"], direct["mu"], rtol=1e-5, atol=1e-6)  # the batch's own statistics
    stats = tmp_path / "stats.npz"
    save_reference(stats, direct)
    _, loaded = extractor_and_reference("inception", ref=stats, inception_weights=weights[0])
    np.testing.assert_array_equal(loaded["mu"], direct["mu"])
    np.savez(tmp_path / "other.npz", x=images)
    with pytest.raises(LazyditError, match="neither lazydit reference statistics nor an ADM batch"):
        extractor_and_reference("inception", ref=tmp_path / "other.npz", inception_weights=weights[0])
    with pytest.raises(UsageError, match="weights file and a reference file"):
        extractor_and_reference("inception", ref=batch)
    with pytest.raises(UsageError, match="unknown feature extractor 'clip'"):
        extractor_and_reference("clip")
