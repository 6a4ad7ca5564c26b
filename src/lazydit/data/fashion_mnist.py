"""Data: the embedded Fashion-MNIST default (Debian's `dataset-fashion-mnist` IDX files)."""

import gzip
import hashlib
import os
import struct
import zipfile
import zlib
from pathlib import Path

import numpy as np
import torch
from lazydit.errors import DataMissingError

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_CLASSES = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]
_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}



def _find(root: Path, stem: str) -> Path:
    for name in (stem + ".gz", stem):
        if (root / name).is_file():
            return root / name
    pair = next(p for p in _FILES.values() if stem in p)
    raise DataMissingError(
        f"Fashion-MNIST file {stem}(.gz) not found in {root}\n"
        "the dataset is needed by lazydit pretrain, train-autoencoder, train-gates (without --data-free), "
        "scripts/build_fmnist_eval.py and the experiments that train on it\n"
        "get it in one of three ways: sudo apt-get install -y dataset-fashion-mnist "
        f"(IDX files in {FASHION_MNIST_DIR}), or pass --data DIR, or set LAZYDIT_DATA=DIR (DIR holding "
        f"{pair[0]} and {pair[1]}, .gz or not)"
    )


def read_idx(path) -> np.ndarray:
    """Read an IDX file (optionally gzipped) into a uint8 numpy array."""
    opener = gzip.open if str(path).endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (EOFError, OSError, zlib.error) as e:
        raise ValueError(f"{path}: truncated or corrupt ({type(e).__name__}: {e})") from e
    if len(raw) < 4:
        raise ValueError(f"{path}: not an IDX file (too short)")
    zero, dtype, ndim = struct.unpack(">HBB", raw[:4])
    if zero != 0 or dtype != 0x08:
        raise ValueError(f"{path}: not an unsigned-byte IDX file (magic {raw[:4].hex()})")
    if len(raw) < 4 + 4 * ndim:
        raise ValueError(f"{path}: truncated IDX header")
    dims = struct.unpack(f">{ndim}I", raw[4 : 4 + 4 * ndim])
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(dims)):
        raise ValueError(f"{path}: truncated IDX file ({data.size} of {int(np.prod(dims))} values)")
    return data.reshape(dims)


def load_fashion_mnist(split: str = "train", root=None):
    """Fashion-MNIST as tensors.

    Args:
        split: "train" (60k) or "test" (10k).
        root: folder with the IDX files; default $LAZYDIT_DATA or /usr/share/datasets/fashion-mnist.
    Returns:
        images (N, 1, 28, 28) float32 in [-1, 1], labels (N,) long.
    """
    if split not in _FILES:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    root = Path(root or os.environ.get("LAZYDIT_DATA") or FASHION_MNIST_DIR)
    img_stem, lbl_stem = _FILES[split]
    images = read_idx(_find(root, img_stem))
    labels = read_idx(_find(root, lbl_stem))
    if images.shape[0] != labels.shape[0]:
        raise ValueError(f"{root}: {images.shape[0]} images but {labels.shape[0]} labels")
    x = torch.from_numpy(images.astype(np.float32) / 127.5 - 1.0).unsqueeze(1)
    return x, torch.from_numpy(labels.astype(np.int64))


class InfiniteSampler:
    """Endless shuffled mini-batches of (x, y) from in-memory tensors, deterministic for a seed."""

    def __init__(self, x, y, batch_size: int, seed: int = 0, flip: bool = False):
        self.x, self.y, self.batch_size, self.flip = x, y, batch_size, flip
        self.generator = torch.Generator().manual_seed(seed)
        self._perm, self._pos = None, 0

    def state_dict(self):
        return {"generator": self.generator.get_state(), "perm": self._perm, "pos": self._pos}

    def load_state_dict(self, state):
        self.generator.set_state(state["generator"])
        self._perm, self._pos = state["perm"], state["pos"]

    def __next__(self):
        n = self.x.shape[0]
        if self._perm is None or self._pos + self.batch_size > n:
            self._perm, self._pos = torch.randperm(n, generator=self.generator), 0
        idx = self._perm[self._pos : self._pos + self.batch_size]
        self._pos += self.batch_size
        x, y = self.x[idx], self.y[idx]
        if self.flip:  # reference preprocessing: random horizontal flip
            mask = torch.rand(len(idx), generator=self.generator) < 0.5
            x = torch.where(mask[:, None, None, None], x.flip(-1), x)
        return x, y

    def __iter__(self):
        return self


@torch.no_grad()
def encode_posterior(ae, x, batch_size: int = 1000, progress: bool = False,
                     desc: str = "encoding Fashion-MNIST latents") -> torch.Tensor:
    """Images -> their scaled posterior moments under a lazydit autoencoder, for latent training.

    Args:
        ae: a TinyAutoencoder (lazydit.models.autoencoder), on the device that should encode.
        x: (N, 1, 28, 28) images in [-1, 1] (any device).
        batch_size: images per encoder call.
        progress: a progress bar over the images, named `desc`.
    Returns:
        (N, 2C, h, w) float32 on the CPU: scale * posterior mean, then scale * posterior std, along channels.
    """
    from tqdm.auto import tqdm

    device = next(ae.parameters()).device
    parts = []
    with tqdm(total=len(x), desc=desc, unit="img", disable=not progress) as bar:
        for i in range(0, len(x), batch_size):
            mean, logvar = ae.posterior(x[i : i + batch_size].to(device))
            parts.append(torch.cat([mean, (0.5 * logvar).exp()], dim=1).float().cpu() * ae.scale)
            bar.update(len(parts[-1]))
    return torch.cat(parts)


def cache_dir() -> Path:
    """lazydit's cache folder: $LAZYDIT_CACHE, else ~/.cache/lazydit."""
    return Path(os.environ.get("LAZYDIT_CACHE") or Path.home() / ".cache" / "lazydit")


def _digest(t: torch.Tensor) -> str:
    return hashlib.sha256(t.detach().cpu().contiguous().numpy().data).hexdigest()


def cached_posterior(ae, x, batch_size: int = 1000, progress: bool = True) -> torch.Tensor:
    """`encode_posterior(ae, x)`, encoded once and kept in `cache_dir()` for the next run (Fashion-MNIST's 60,000
    images take a minute or more on a CPU; the file of the embedded default's latents is about 380 MB).

    The cache file is named by a fingerprint of the autoencoder (its weights, `lazydit.files.weights_fingerprint`,
    and scale), of the images (a sha256 of `x`), of the encoding device type and batch size; it stores a sha256 of
    its moments, checked on every read. A file that does not match (stale, truncated, corrupt) is encoded again and
    replaced (atomically); a cache folder that cannot be written only costs the encoding.

    Args:
        ae, x, batch_size: as `encode_posterior`.
        progress: a progress bar while encoding.
    Returns:
        The moments, bit-identical to `encode_posterior`'s.
    """
    from lazydit.files import atomic_write, weights_fingerprint

    device = next(ae.parameters()).device
    key = hashlib.sha256(f"posterior-v1|{weights_fingerprint(ae)}|{float(ae.scale)!r}|{device.type}|{batch_size}|"
                         f"{tuple(x.shape)}|{x.dtype}|{_digest(x)}".encode()).hexdigest()[:24]
    path = cache_dir() / f"fmnist-posterior-{key}.npz"
    if path.is_file():
        try:
            with np.load(path, allow_pickle=False) as f:
                moments, stored_key, digest = f["moments"], str(f["key"]), str(f["sha256"])
            moments = torch.from_numpy(moments)
            if (stored_key == key and moments.dtype == torch.float32 and moments.ndim == 4
                    and moments.shape[0] == x.shape[0] and _digest(moments) == digest):
                return moments
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile, zlib.error):
            pass  # unreadable: encode again
    moments = encode_posterior(ae, x, batch_size, progress=progress)

    def write(tmp):
        with open(tmp, "wb") as f:
            np.savez(f, moments=moments.numpy(), key=np.array(key), sha256=np.array(_digest(moments)))

    try:
        atomic_write(path, write)
    except OSError:
        pass  # a read-only or full cache folder: the next run encodes again
    return moments


class PosteriorSampler:
    """Endless shuffled batches of latents (z, y), z = mean + std * noise drawn afresh for every batch (DiT trains
    on posterior samples of SD-VAE the same way), from the moments of `encode_posterior`; deterministic for a seed.

    Args:
        moments: (N, 2C, h, w) scaled posterior means and stds.
        y: (N,) labels.
        batch_size: rows per batch.
        seed: data order and posterior noise.
    """

    def __init__(self, moments, y, batch_size: int, seed: int = 0):
        self.order = InfiniteSampler(moments, y, batch_size, seed=seed)
        self.generator = torch.Generator().manual_seed(seed + 2)

    def state_dict(self):
        return {"order": self.order.state_dict(), "generator": self.generator.get_state()}

    def load_state_dict(self, state):
        self.order.load_state_dict(state["order"])
        self.generator.set_state(state["generator"])

    def __next__(self):
        moments, y = next(self.order)
        mean, std = moments.chunk(2, dim=1)
        return mean + std * torch.randn(mean.shape, generator=self.generator), y

    def __iter__(self):
        return self
