"""Data: Fashion-MNIST IDX loading, clear errors, the deterministic resumable sampler."""

import gzip
import shutil
import struct

import numpy as np
import pytest
import torch

from lazydit.errors import DataMissingError
from lazydit.data.fashion_mnist import InfiniteSampler, load_fashion_mnist, read_idx

from conftest import write_idx


def test_load_train_and_test(fake_fmnist):
    x, y = load_fashion_mnist("train", fake_fmnist)
    assert x.shape == (256, 1, 28, 28) and x.dtype == torch.float32
    assert y.shape == (256,) and y.dtype == torch.long
    assert x.min() >= -1 and x.max() <= 1
    assert x.min() == -1 and x.max() == 1  # 0 -> -1, 255 -> 1 (random bytes hit both)
    assert y.tolist() == [i % 10 for i in range(256)]
    xt, yt = load_fashion_mnist("test", fake_fmnist)
    assert xt.shape == (64, 1, 28, 28) and yt.shape == (64,)


def test_pixel_scaling(tmp_path):
    write_idx(tmp_path / "train-images-idx3-ubyte.gz", np.array([[[0, 255], [127, 128]]]))
    write_idx(tmp_path / "train-labels-idx1-ubyte.gz", np.array([7]))
    x, y = load_fashion_mnist("train", tmp_path)
    expected = torch.tensor([[[[-1.0, 1.0], [127 / 127.5 - 1, 128 / 127.5 - 1]]]])
    assert torch.allclose(x, expected, atol=1e-6) and y.tolist() == [7]


def test_uncompressed_files_and_env(tmp_path, monkeypatch):
    imgs = np.random.default_rng(1).integers(0, 256, (5, 28, 28))
    write_idx(tmp_path / "a.gz", imgs)
    with gzip.open(tmp_path / "a.gz", "rb") as f:
        (tmp_path / "t10k-images-idx3-ubyte").write_bytes(f.read())
    write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", np.arange(5))
    monkeypatch.setenv("LAZYDIT_DATA", str(tmp_path))
    x, y = load_fashion_mnist("test")
    assert x.shape == (5, 1, 28, 28)
    assert torch.equal(((x + 1) * 127.5).round().to(torch.uint8)[:, 0], torch.from_numpy(imgs.astype(np.uint8)))


def test_missing_folder_message(tmp_path):
    with pytest.raises(DataMissingError) as info:
        load_fashion_mnist("train", tmp_path / "nowhere")
    msg = str(info.value)
    assert "apt-get install -y dataset-fashion-mnist" in msg
    assert "--data" in msg
    assert isinstance(info.value, FileNotFoundError)


def test_bad_split(fake_fmnist):
    with pytest.raises(ValueError):
        load_fashion_mnist("valid", fake_fmnist)


def test_truncated_idx_raises_value_error(tmp_path, fake_fmnist):
    with gzip.open(fake_fmnist / "train-images-idx3-ubyte.gz", "rb") as f:
        raw = f.read()
    # an uncompressed IDX file cut in the pixel data
    (tmp_path / "cut-idx").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(ValueError, match="truncated"):
        read_idx(tmp_path / "cut-idx")
    # a well-formed gzip stream of a cut IDX file
    with gzip.open(tmp_path / "cut.gz", "wb") as f:
        f.write(raw[:-1])
    with pytest.raises(ValueError, match="truncated"):
        read_idx(tmp_path / "cut.gz")
    # in a dataset folder: the loader reports it too
    root = tmp_path / "root"
    shutil.copytree(fake_fmnist, root)
    with gzip.open(root / "train-images-idx3-ubyte.gz", "wb") as f:
        f.write(raw[: len(raw) - 28 * 28])
    with pytest.raises(ValueError, match="truncated"):
        load_fashion_mnist("train", root)


def test_not_idx_raises_value_error(tmp_path):
    (tmp_path / "x").write_bytes(b"\x00\x00\x0d\x01" + b"\x00\x00\x00\x01" + b"\x00" * 4)  # float IDX
    with pytest.raises(ValueError, match="unsigned-byte"):
        read_idx(tmp_path / "x")
    (tmp_path / "y").write_bytes(b"\x00\x00")
    with pytest.raises(ValueError, match="too short"):
        read_idx(tmp_path / "y")


def test_image_label_count_mismatch(tmp_path, fake_fmnist):
    root = tmp_path / "root"
    shutil.copytree(fake_fmnist, root)
    write_idx(root / "t10k-labels-idx1-ubyte.gz", np.arange(63) % 10)
    with pytest.raises(ValueError, match="labels"):
        load_fashion_mnist("test", root)


def test_truncated_gzip_stream_raises_value_error(fake_fmnist, tmp_path):
    data = (fake_fmnist / "train-images-idx3-ubyte.gz").read_bytes()
    (tmp_path / "cut.gz").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError):
        read_idx(tmp_path / "cut.gz")


def test_truncated_header_raises_value_error(tmp_path):
    (tmp_path / "h").write_bytes(b"\x00\x00\x08\x03\x00\x00\x01")
    with pytest.raises(ValueError):
        read_idx(tmp_path / "h")


# ------------------------------------------------------------------ sampler


def _data(n=12):
    x = torch.arange(n, dtype=torch.float32).view(n, 1, 1, 1).expand(n, 1, 2, 2).contiguous()
    return x, torch.arange(n)


def _take(sampler, k):
    return [next(sampler) for _ in range(k)]


def test_sampler_deterministic_per_seed():
    x, y = _data()
    a = [b[1].tolist() for b in _take(InfiniteSampler(x, y, 4, seed=7), 9)]
    b = [b[1].tolist() for b in _take(InfiniteSampler(x, y, 4, seed=7), 9)]
    c = [b[1].tolist() for b in _take(InfiniteSampler(x, y, 4, seed=8), 9)]
    assert a == b and a != c


def test_sampler_covers_each_index_once_per_epoch():
    x, y = _data()
    s = InfiniteSampler(x, y, 4, seed=0)
    epochs = []
    for _ in range(4):
        seen = []
        for bx, by in _take(s, 3):
            assert bx.shape == (4, 1, 2, 2) and by.shape == (4,)
            assert torch.equal(bx[:, 0, 0, 0].long(), by)  # images and labels stay paired
            seen += by.tolist()
        assert sorted(seen) == list(range(12))
        epochs.append(seen)
    assert len({tuple(e) for e in epochs}) > 1  # reshuffled between epochs
    assert iter(s) is s


@pytest.mark.parametrize("flip", [False, True])
def test_sampler_resume(flip):
    torch.manual_seed(0)
    x, y = torch.randn(12, 1, 3, 3), torch.arange(12)
    a = InfiniteSampler(x, y, 4, seed=3, flip=flip)
    _take(a, 5)  # mid-epoch
    state = a.state_dict()
    rest_a = _take(a, 7)
    b = InfiniteSampler(x, y, 4, seed=99, flip=flip)
    _take(b, 2)
    b.load_state_dict(state)
    rest_b = _take(b, 7)
    for (xa, ya), (xb, yb) in zip(rest_a, rest_b):
        assert torch.equal(ya, yb) and torch.equal(xa, xb)


def test_sampler_resume_through_torch_save(tmp_path):
    x, y = _data()
    a = InfiniteSampler(x, y, 4, seed=1)
    _take(a, 4)
    torch.save(a.state_dict(), tmp_path / "s.pt")
    expected = [b[1].tolist() for b in _take(a, 6)]
    b = InfiniteSampler(x, y, 4, seed=1)
    b.load_state_dict(torch.load(tmp_path / "s.pt", weights_only=True))
    assert [bb[1].tolist() for bb in _take(b, 6)] == expected


def test_sampler_flip_flips_some_rows():
    x = torch.arange(16 * 4, dtype=torch.float32).view(16, 1, 2, 2)
    s = InfiniteSampler(x, torch.arange(16), 16, seed=0, flip=True)
    bx, by = next(s)
    flipped = [not torch.equal(bx[i], x[by[i]]) for i in range(16)]
    assert any(flipped) and not all(flipped)
    for i in range(16):
        assert torch.equal(bx[i], x[by[i]]) or torch.equal(bx[i], x[by[i]].flip(-1))
