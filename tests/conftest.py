import numpy as np
import pytest
import torch

from lazydit import create_model

torch.set_num_threads(1)  # tiny models: threads only add overhead


@pytest.fixture(autouse=True)
def no_system_data(tmp_path_factory, monkeypatch):
    """Every test runs as on a machine without datasets: the data root is an empty folder (a test that needs
    Fashion-MNIST-shaped data takes `fake_fmnist`), and caches go to a private folder."""
    monkeypatch.setenv("LAZYDIT_DATA", str(tmp_path_factory.mktemp("no-datasets")))
    monkeypatch.setenv("LAZYDIT_CACHE", str(tmp_path_factory.mktemp("cache")))


def tiny_model(seed=0, **overrides):
    """A small random DiT whose adaLN and final layer are NOT zero, so every module matters."""
    torch.manual_seed(seed)
    kw = dict(depth=3, hidden_size=32, num_heads=2, patch_size=2, input_size=8, in_channels=1, num_classes=4,
              learn_sigma=False)
    kw.update(overrides)
    model = create_model("DiT-S/2", **kw)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.05)
    return model.eval()


@pytest.fixture
def model():
    return tiny_model()


def write_idx(path, arr):
    """Write a uint8 IDX file (gzipped) like the Debian dataset's."""
    import gzip
    import struct

    arr = np.asarray(arr, dtype=np.uint8)
    header = struct.pack(">HBB", 0, 8, arr.ndim) + struct.pack(f">{arr.ndim}I", *arr.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + arr.tobytes())


@pytest.fixture
def fake_fmnist(tmp_path, monkeypatch):
    """A small Fashion-MNIST-shaped dataset in IDX format (random images, 10 classes), also the default data root
    ($LAZYDIT_DATA) of the test that takes it."""
    rng = np.random.default_rng(0)
    d = tmp_path / "fmnist"
    d.mkdir()
    for split, n in (("train", 256), ("t10k", 64)):
        write_idx(d / f"{split}-images-idx3-ubyte.gz", rng.integers(0, 256, (n, 28, 28)))
        write_idx(d / f"{split}-labels-idx1-ubyte.gz", np.arange(n) % 10)
    monkeypatch.setenv("LAZYDIT_DATA", str(d))
    return d
