import json

import numpy as np
import pytest
import torch
from PIL import Image

from lazydit.errors import DataMissingError
from lazydit.data.imagefolder import (
    ImageFolder,
    ImageFolderLoader,
    LatentSampler,
    LatentSet,
    center_crop_arr,
    extract_latents,
    flip_decision,
    shard_indices,
    to_tensor,
)


def make_folder(root, per_class=4, size=(40, 24)):
    """3 classes (created out of order), images of mixed formats and sizes, and a stray text file."""
    rng = np.random.default_rng(0)
    exts = [".png", ".jpg", ".webp", ".JPEG"]
    for c in ("n02", "n01", "n03"):
        (root / c / "sub").mkdir(parents=True)
        for i in range(per_class):
            w, h = size[0] + 3 * i, size[1] + i
            arr = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
            where = root / c / ("sub" if i == per_class - 1 else "")
            Image.fromarray(arr).save(where / f"img{i}{exts[i % 4]}", quality=95)
        (root / c / "notes.txt").write_text("not an image")
    return root


@pytest.fixture
def folder(tmp_path):
    return make_folder(tmp_path / "train")


def test_center_crop_matches_reference_steps():
    rng = np.random.default_rng(1)
    img = Image.fromarray(rng.integers(0, 256, (130, 300, 3), dtype=np.uint8))  # 300 x 130 (W x H)
    out = center_crop_arr(img, 32)
    # halve twice with BOX (130 >= 64, 65 >= 64), then BICUBIC to the same size, then crop x from (75 - 32) // 2
    step = img.resize((150, 65), resample=Image.BOX).resize((75, 32), resample=Image.BOX)
    step = step.resize((75, 32), resample=Image.BICUBIC)
    assert np.array_equal(np.array(out), np.array(step)[:, 21:53])
    img = Image.fromarray(rng.integers(0, 256, (57, 101, 3), dtype=np.uint8))
    out = center_crop_arr(img, 20)  # halve once (57 >= 40) to 50 x 28, bicubic to round(50 * 20 / 28) = 36 x 20
    step = img.resize((50, 28), resample=Image.BOX).resize((36, 20), resample=Image.BICUBIC)
    assert np.array(out).shape == (20, 20, 3)
    assert np.array_equal(np.array(out), np.array(step)[:, 8:28])
    tall = center_crop_arr(Image.fromarray(rng.integers(0, 256, (50, 21, 3), dtype=np.uint8)), 16)  # upscale path
    assert np.array(tall).shape == (16, 16, 3)


def test_image_folder_labels_and_preprocessing(folder):
    ds = ImageFolder(folder, image_size=16)
    assert ds.classes == ["n01", "n02", "n03"] and len(ds) == 12
    assert list(ds.targets) == [0] * 4 + [1] * 4 + [2] * 4
    assert ds.samples[0][0].name == "img0.png" and ds.samples[3][0].parent.name == "sub"  # walked, sorted
    x, y = ds[5]
    assert x.shape == (3, 16, 16) and x.dtype == torch.float32 and y == 1
    assert -1 <= x.min() and x.max() <= 1
    with Image.open(ds.samples[5][0]) as im:
        ref = np.array(center_crop_arr(im.convert("RGB"), 16)).astype(np.float32)
    assert torch.allclose(x, torch.from_numpy(ref.transpose(2, 0, 1) / 127.5 - 1), atol=1e-6)
    assert np.array_equal(ds.load(5, flip=True), ds.load(5)[:, ::-1])
    arr = np.array([[[0, 128, 255]]], dtype=np.uint8)
    assert torch.equal(to_tensor(arr).flatten(), (torch.tensor([0.0, 128.0, 255.0]) / 255 - 0.5) / 0.5)


def test_missing_and_empty_folders(tmp_path):
    with pytest.raises(DataMissingError, match="not found"):
        ImageFolder(tmp_path / "nope")
    (tmp_path / "empty" / "n01").mkdir(parents=True)
    with pytest.raises(DataMissingError, match="no images"):
        ImageFolder(tmp_path / "empty")
    make_folder(tmp_path / "partly", per_class=1)
    (tmp_path / "partly" / "n00").mkdir()
    with pytest.raises(DataMissingError, match="without images: n00"):
        ImageFolder(tmp_path / "partly")
    ds = ImageFolder(tmp_path / "partly", allow_empty=True)
    assert ds.classes[0] == "n00" and list(ds.targets) == [1, 2, 3]


def test_flip_determinism(folder):
    ds = ImageFolder(folder, image_size=16)
    assert flip_decision(0, 0, 3) == flip_decision(0, 0, 3)
    assert 0.3 < np.mean([flip_decision(0, 0, i) for i in range(400)]) < 0.7
    a = ImageFolderLoader(ds, 4, seed=7)
    b = ImageFolderLoader(ds, 4, seed=7, num_workers=2)
    batches = [next(a) for _ in range(4)]  # crosses an epoch boundary (3 batches per epoch)
    for xa, ya in batches:
        xb, yb = next(b)
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    b.close()
    # every image comes out either as itself or mirrored, as flip_decision says
    order = shard_indices(len(ds), 0, 7)
    for j, i in enumerate(order[:4].tolist()):
        mirrored = flip_decision(7, 0, i)
        assert torch.equal(batches[0][0][j], to_tensor(ds.load(i, mirrored)))
    # resume mid-epoch
    c = ImageFolderLoader(ds, 4, seed=7)
    next(c)
    state = c.state_dict()
    d = ImageFolderLoader(ds, 4, seed=7)
    d.load_state_dict(state)
    assert torch.equal(next(d)[0], batches[1][0])


def test_sharding_is_disjoint(folder):
    ds = ImageFolder(folder, image_size=16)
    shards = [shard_indices(12, 3, seed=1, rank=r, world_size=3) for r in range(3)]
    assert all(len(s) == 4 for s in shards)
    assert sorted(torch.cat(shards).tolist()) == list(range(12))
    assert sorted(shard_indices(11, 0, 1, rank=0, world_size=3).tolist() + shard_indices(11, 0, 1, 1, 3).tolist()
                  + shard_indices(11, 0, 1, 2, 3).tolist()) != list(range(11))  # 11 % 3: two left out, equal steps
    loaders = [ImageFolderLoader(ds, 2, rank=r, world_size=3, seed=1, flip=False) for r in range(3)]
    seen = [torch.cat([next(ld)[0] for _ in range(2)]) for ld in loaders]
    flat = torch.cat(seen).flatten(1)
    assert len({tuple(row.tolist()) for row in flat}) == 12  # all 12 images, none twice
    with pytest.raises(ValueError, match="too few"):
        ImageFolderLoader(ds, 8, world_size=2)


class FakeVAE(torch.nn.Module):
    """diffusers AutoencoderKL's encode interface on a stride-2 conv (no diffusers import: fast, and optional)."""

    class Posterior:
        def __init__(self, moments):
            self.mean, logvar = moments.chunk(2, dim=1)
            self.std = torch.exp(0.5 * logvar.clamp(-30, 20))

        def sample(self, generator=None):  # as DiagonalGaussianDistribution.sample
            return self.mean + self.std * torch.randn(self.mean.shape, generator=generator)

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(3, 8, 2, stride=2)
        self.config = type("Config", (), {"latent_channels": 4, "block_out_channels": (8, 16)})()

    def encode(self, x):
        return type("Out", (), {"latent_dist": self.Posterior(self.conv(x))})()


@pytest.fixture
def tiny_vae():
    return FakeVAE().eval().requires_grad_(False)


def test_extract_latents_round_trip(folder, tiny_vae, tmp_path):
    from lazydit.data.vae import encode

    ds = ImageFolder(folder, image_size=16)
    out = extract_latents(tiny_vae, ds, tmp_path / "lat", batch_size=5, flip="both", posterior="mean",
                          dtype=np.float32)
    lat = LatentSet(out)
    assert lat.latents.shape == (12, 2, 4, 8, 8) and list(lat.labels) == list(ds.targets)
    x = torch.stack([ds[i][0] for i in range(12)])
    assert np.allclose(lat.latents[:, 0], encode(tiny_vae, x, sample=False).numpy(), atol=1e-6)
    assert np.allclose(lat.latents[:, 1], encode(tiny_vae, x.flip(-1), sample=False).numpy(), atol=1e-6)
    meta = json.loads((out / "meta.json").read_text())
    assert meta["scale"] == 0.18215 and not (out / "progress.json").exists()
    # done already: a rerun returns at once; other settings are refused
    assert extract_latents(tiny_vae, ds, out, batch_size=5, flip="both", posterior="mean", dtype=np.float32) == out
    with pytest.raises(ValueError, match="other settings"):
        extract_latents(tiny_vae, ds, out, batch_size=5, flip="none", posterior="mean", dtype=np.float32)
    # the sampler: shapes, views, resume
    s = LatentSampler(out, 4, seed=3, flip=True)
    z, y = next(s)
    assert z.shape == (4, 4, 8, 8) and y.dtype == torch.int64
    state = s.state_dict()
    a = [next(s) for _ in range(3)]
    s2 = LatentSampler(out, 4, seed=3, flip=True)
    s2.load_state_dict(state)
    for (za, ya), (zb, yb) in zip(a, [next(s2) for _ in range(3)]):
        assert torch.equal(za, zb) and torch.equal(ya, yb)
    rows = [LatentSampler(out, 3, seed=0, rank=r, world_size=2) for r in range(2)]
    ys = [set(next(r)[0].flatten(1).sum(1).tolist()) for r in rows]
    assert not ys[0] & ys[1]


def test_extract_latents_resume(folder, tiny_vae, tmp_path, monkeypatch):
    ds = ImageFolder(folder, image_size=16)
    ref = extract_latents(tiny_vae, ds, tmp_path / "ref", batch_size=4, flip="random", posterior="sample", seed=5)
    calls = {"n": 0}
    real_load = ImageFolder.load

    def flaky(self, index, flip=False):
        calls["n"] += 1
        if calls["n"] == 6:  # dies inside the second batch
            raise KeyboardInterrupt
        return real_load(self, index, flip)

    monkeypatch.setattr(ImageFolder, "load", flaky)
    with pytest.raises(KeyboardInterrupt):
        extract_latents(tiny_vae, ds, tmp_path / "res", batch_size=4, flip="random", posterior="sample", seed=5)
    assert json.loads((tmp_path / "res" / "progress.json").read_text())["done"] == 4
    with pytest.raises(DataMissingError, match="interrupted"):
        LatentSet(tmp_path / "res")
    monkeypatch.setattr(ImageFolder, "load", real_load)
    out = extract_latents(tiny_vae, ds, tmp_path / "res", batch_size=4, flip="random", posterior="sample", seed=5)
    a, b = np.load(ref / "latents.npy"), np.load(out / "latents.npy")
    assert a.dtype == np.float16 and a.shape == (12, 1, 4, 8, 8)
    assert np.array_equal(a, b)
    # moments: the sampler draws fresh posterior samples around the stored mean
    mom = LatentSet(extract_latents(tiny_vae, ds, tmp_path / "mom", batch_size=6, flip="none", posterior="moments"))
    assert mom.latents.shape == (12, 1, 8, 8, 8) and mom.moments
    z1, _ = next(LatentSampler(mom, 12, seed=0))
    z2, _ = next(LatentSampler(mom, 12, seed=1))
    assert z1.shape == (12, 4, 8, 8) and not torch.equal(z1, z2)
