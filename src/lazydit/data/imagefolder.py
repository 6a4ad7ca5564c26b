"""ImageNet-style data: an ImageFolder with the DiT/ADM preprocessing (PIL + numpy), and pre-extracted VAE latents.

Images: class sub-folders sorted -> label index (torchvision's ImageFolder rule); `center_crop_arr` as DiT's train.py;
random horizontal flip; scaled to [-1, 1] exactly as ToTensor + Normalize(0.5, 0.5).

Latents (`extract_latents`, `LatentSampler`): VAE latents extracted once to a folder. How flips are stored is a choice:
- "random" (default): one view per image, flipped with probability 1/2 (seeded), and one posterior sample, both drawn
  once. For at most one epoch (gate training: 500 steps x 256 = 128k draws of ImageNet's 1.28M images) this is the
  reference's distribution exactly; over more epochs each image always comes back with the same flip and noise.
- "both": the latents of the image and of its mirror image (2x the disk); the sampler picks one at random per draw.
- "none": unflipped only; `LatentSampler(flip=True)` then mirrors the latent itself, an approximation (the VAE is
  not exactly flip-equivariant).
The posterior can be stored as one scaled sample ("sample", the default, as fast-DiT), its mean ("mean"), or
mean and std ("moments", 2x the disk), from which the sampler draws a fresh sample per draw, as the reference does.
"""

import json
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from lazydit.files import atomic_write
from lazydit.errors import DataMissingError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp")
LATENT_FORMAT = "lazydit-latents-v1"
FLIP_MODES = ("random", "both", "none")
POSTERIOR_MODES = ("sample", "mean", "moments")


def center_crop_arr(pil_image, image_size):
    """ADM/DiT center crop: BOX-halve while the short side >= 2 size, BICUBIC-resize it to size, crop the center."""
    while min(*pil_image.size) >= 2 * image_size:
        pil_image = pil_image.resize(tuple(x // 2 for x in pil_image.size), resample=Image.BOX)
    scale = image_size / min(*pil_image.size)
    pil_image = pil_image.resize(tuple(round(x * scale) for x in pil_image.size), resample=Image.BICUBIC)
    arr = np.array(pil_image)
    crop_y = (arr.shape[0] - image_size) // 2
    crop_x = (arr.shape[1] - image_size) // 2
    return Image.fromarray(arr[crop_y : crop_y + image_size, crop_x : crop_x + image_size])


def to_tensor(arr: np.ndarray) -> torch.Tensor:
    """(H, W, 3) uint8 -> (3, H, W) float32 in [-1, 1], computed as ToTensor then Normalize(0.5, 0.5)."""
    x = torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1))).float().div(255)
    return x.sub_(0.5).div_(0.5)


def flip_decision(seed: int, epoch: int, index: int) -> bool:
    """Whether image `index` is mirrored in `epoch`: p = 1/2, a pure function of (seed, epoch, index)."""
    return bool(np.random.default_rng([seed, epoch, index]).random() < 0.5)


class ImageFolder:
    """Images in class sub-folders (root/<class>/**/<image>), labels by sorted class name, as torchvision's."""

    def __init__(self, root, image_size: int = 256, allow_empty: bool = False):
        self.root, self.image_size = Path(root), image_size
        if not self.root.is_dir():
            raise DataMissingError(f"image folder not found: {self.root}\n"
                                   "Expected root/<class name>/<image>.JPEG, e.g. ImageNet's train/ folder.")
        self.classes = sorted(e.name for e in os.scandir(self.root) if e.is_dir())
        self.class_to_idx = {c: i for i, c in enumerate(self.classes)}
        self.samples = []  # (path, label)
        empty = []
        for c in self.classes:
            found = [Path(d) / f for d, _, files in sorted(os.walk(self.root / c, followlinks=True))
                     for f in sorted(files) if f.lower().endswith(IMAGE_EXTENSIONS)]
            empty += [] if found else [c]
            self.samples += [(p, self.class_to_idx[c]) for p in found]
        if not self.samples:
            raise DataMissingError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) in class sub-folders of {self.root}")
        if empty and not allow_empty:
            raise DataMissingError(f"{self.root}: class folders without images: {', '.join(empty[:10])}"
                                   f"{' ...' if len(empty) > 10 else ''} (pass allow_empty=True to keep their labels)")
        self.targets = np.array([label for _, label in self.samples], dtype=np.int64)

    def __len__(self):
        return len(self.samples)

    def load(self, index: int, flip: bool = False) -> np.ndarray:
        """Image `index` preprocessed: (size, size, 3) uint8, center-cropped, mirrored if flip."""
        path = self.samples[index][0]
        with Image.open(path) as im:
            arr = np.array(center_crop_arr(im.convert("RGB"), self.image_size))
        return arr[:, ::-1] if flip else arr

    def __getitem__(self, index: int):
        """(x (3, size, size) float32 in [-1, 1], label), unflipped."""
        return to_tensor(self.load(index)), int(self.targets[index])


def shard_indices(n: int, epoch: int, seed: int, rank: int = 0, world_size: int = 1, shuffle: bool = True):
    """This rank's indices for an epoch: a seeded permutation (shared by all ranks), every world_size-th from rank,
    cut to n // world_size so that every rank takes the same number of steps. Returns an int64 tensor."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} outside world size {world_size}")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed + epoch)) if shuffle else torch.arange(n)
    return order[rank::world_size][: n // world_size]


class ImageFolderLoader:
    """Endless batches (x (B, 3, H, W) float32 in [-1, 1], y (B,) int64) of one rank's shard, epoch after epoch.

    Deterministic for (seed, rank, world_size): the epoch's order comes from seed + epoch, the flips from
    `flip_decision(seed, epoch, index)`; `state_dict()` / `load_state_dict()` resume mid-epoch.
    """

    def __init__(self, dataset: ImageFolder, batch_size: int, rank: int = 0, world_size: int = 1, seed: int = 0,
                 shuffle: bool = True, flip: bool = True, num_workers: int = 0):
        if len(dataset) < world_size * batch_size:
            raise ValueError(f"{len(dataset)} images are too few for {world_size} rank(s) x batch {batch_size}")
        self.dataset, self.batch_size, self.rank, self.world_size = dataset, batch_size, rank, world_size
        self.seed, self.shuffle, self.flip = seed, shuffle, flip
        self.epoch, self.pos = 0, 0
        self._shard, self._shard_epoch = None, None
        self._pool = ThreadPoolExecutor(num_workers) if num_workers > 0 else None

    def __len__(self):
        """Full batches per epoch on this rank."""
        return (len(self.dataset) // self.world_size) // self.batch_size

    def state_dict(self):
        return {"epoch": self.epoch, "pos": self.pos}

    def load_state_dict(self, state):
        self.epoch, self.pos = int(state["epoch"]), int(state["pos"])

    def _item(self, index: int):
        flip = self.flip and flip_decision(self.seed, self.epoch, index)
        return to_tensor(self.dataset.load(index, flip))

    def __next__(self):
        if self.pos + self.batch_size > len(self.dataset) // self.world_size:
            self.epoch, self.pos = self.epoch + 1, 0
        if self._shard_epoch != self.epoch:
            self._shard = shard_indices(len(self.dataset), self.epoch, self.seed, self.rank, self.world_size,
                                        self.shuffle).tolist()
            self._shard_epoch = self.epoch
        idx = self._shard[self.pos : self.pos + self.batch_size]
        self.pos += self.batch_size
        items = list(self._pool.map(self._item, idx)) if self._pool else [self._item(i) for i in idx]
        return torch.stack(items), torch.from_numpy(self.dataset.targets[idx])

    def __iter__(self):
        return self

    def close(self):
        if self._pool is not None:
            self._pool.shutdown()


def _extraction_settings(vae, dataset, image_size, flip, posterior, dtype, seed, batch_size):
    """What a partial extraction must share with the current call to be resumed."""
    return dict(format=LATENT_FORMAT, n=len(dataset), classes=dataset.classes, image_size=image_size,
                first=str(dataset.samples[0][0].relative_to(dataset.root)),
                last=str(dataset.samples[-1][0].relative_to(dataset.root)),
                flip=flip, posterior=posterior, dtype=np.dtype(dtype).name, seed=seed, batch_size=batch_size,
                latent_channels=int(vae.config.latent_channels),
                latent_factor=2 ** (len(vae.config.block_out_channels) - 1))


def _save_npy(path, arr):
    with open(path, "wb") as f:  # a file object: np.save would append ".npy" to a temporary name
        np.save(f, arr)


def _write_json(path, obj):
    atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(obj, indent=1)))


def extract_latents(vae, dataset: ImageFolder, out_dir, batch_size: int = 64, flip: str = "random",
                    posterior: str = "sample", seed: int = 0, dtype=np.float16, num_workers: int = 0,
                    progress: bool = False) -> Path:
    """Encode every image of `dataset` once and store the latents in `out_dir`; resumes an interrupted run.

    Layout: latents.npy (N, V, C, h, w) with V = 2 views for flip="both" (view 1 = the mirror image) else 1, and
    C = 4 (a scaled posterior sample or mean) or 8 (scaled mean then std, posterior="moments"); labels.npy (N,);
    meta.json, written last, marks a complete extraction. Progress is kept in latents.npy.partial + progress.json
    after every batch, so a rerun with the same arguments continues where the last one stopped, with the same result.

    Args:
        vae: a diffusers AutoencoderKL (see `lazydit.data.vae.load_vae`).
        dataset: the ImageFolder (its image_size sets the crop).
        out_dir: output folder.
        batch_size: images per VAE call.
        flip: "random", "both" or "none" (see the module docstring).
        posterior: "sample", "mean" or "moments".
        seed: for the flips and the posterior noise.
        dtype: storage dtype (float16 or float32).
        num_workers: threads decoding images.
        progress: show a progress bar.
    Returns:
        out_dir as a Path.
    """
    from lazydit.data.vae import encode, posterior as vae_posterior

    if flip not in FLIP_MODES or posterior not in POSTERIOR_MODES:
        raise ValueError(f"flip must be one of {FLIP_MODES} and posterior one of {POSTERIOR_MODES}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    fp = _extraction_settings(vae, dataset, dataset.image_size, flip, posterior, dtype, seed, batch_size)
    if (out / "meta.json").is_file():
        meta = json.loads((out / "meta.json").read_text())
        if {k: meta.get(k) for k in fp} != fp:
            raise ValueError(f"{out} holds latents extracted with other settings: choose another folder")
        return out
    n, views, C = len(dataset), 2 if flip == "both" else 1, fp["latent_channels"] * (2 if posterior == "moments" else 1)
    h = dataset.image_size // fp["latent_factor"]
    shape = (n, views, C, h, h)
    partial, prog = out / "latents.npy.partial", out / "progress.json"
    done = 0
    if not partial.is_file() and prog.is_file() and (out / "latents.npy").is_file():
        partial = out / "latents.npy"  # interrupted after the final rename: only the labels and meta.json are left
    if partial.is_file() and prog.is_file():
        state = json.loads(prog.read_text())
        if state.get("fingerprint") != fp:
            raise ValueError(f"{out} holds a partial extraction with other settings: "
                             "delete it or choose another folder")
        mm, done = np.lib.format.open_memmap(partial, mode="r+"), int(state["done"])
        if mm.shape != shape:
            raise ValueError(f"{partial}: shape {mm.shape}, expected {shape}")
    else:
        mm = np.lib.format.open_memmap(partial, mode="w+", dtype=np.dtype(dtype), shape=shape)
        _write_json(prog, {"fingerprint": fp, "done": 0})
    pool = ThreadPoolExecutor(num_workers) if num_workers > 0 else None
    starts = range(done, n, batch_size)
    if progress:
        from tqdm.auto import tqdm

        starts = tqdm(starts, desc="extract latents", unit="batch", initial=done // batch_size,
                      total=-(-n // batch_size))
    try:
        for start in starts:
            idx = list(range(start, min(start + batch_size, n)))
            flips = [flip == "random" and flip_decision(seed, 0, i) for i in idx]
            load = lambda a: to_tensor(dataset.load(*a))  # noqa: E731
            x = torch.stack(list(pool.map(load, zip(idx, flips)) if pool else map(load, zip(idx, flips))))
            gen = torch.Generator().manual_seed(int(np.random.SeedSequence([seed, start]).generate_state(1)[0]))
            for v, xv in enumerate([x, x.flip(-1)][:views]):
                if posterior == "moments":
                    z = torch.cat(vae_posterior(vae, xv), dim=1)
                else:
                    z = encode(vae, xv, sample=posterior == "sample", generator=gen)
                mm[start : start + len(idx), v] = z.cpu().numpy().astype(mm.dtype)
            mm.flush()
            _write_json(prog, {"fingerprint": fp, "done": start + len(idx)})
    finally:
        if pool is not None:
            pool.shutdown()
    del mm
    atomic_write(out / "labels.npy", lambda tmp: _save_npy(tmp, dataset.targets))
    if partial != out / "latents.npy":
        os.replace(partial, out / "latents.npy")
    _write_json(out / "meta.json", {**fp, "shape": list(shape), "scale": 0.18215,
                                   "views": "image, mirror image" if views == 2 else "image (flip: " + flip + ")"})
    prog.unlink()
    return out


class LatentSet:
    """A finished extraction: latents (N, V, C, h, w) memory-mapped, labels (N,), meta."""

    def __init__(self, folder):
        folder = Path(folder)
        if not (folder / "meta.json").is_file():
            hint = (" (an extraction was interrupted: rerun extract_latents with the same arguments to finish it)"
                    if (folder / "latents.npy.partial").is_file() else "")
            raise DataMissingError(f"no extracted latents in {folder}{hint}")
        self.folder = folder
        self.meta = json.loads((folder / "meta.json").read_text())
        self.latents = np.load(folder / "latents.npy", mmap_mode="r")
        self.labels = np.load(folder / "labels.npy")
        if self.latents.shape[0] != len(self.labels) or list(self.latents.shape) != self.meta["shape"]:
            raise DataMissingError(f"{folder}: latents {self.latents.shape} and labels {self.labels.shape} "
                                   "do not match meta.json")

    def __len__(self):
        return len(self.labels)

    @property
    def moments(self) -> bool:
        return self.meta["posterior"] == "moments"


class LatentSampler:
    """Endless shuffled batches (z (B, C, h, w) float32, y (B,) int64) from extracted latents, one rank's shard.

    The epoch's order is shared by all ranks (seed + epoch); views, flips and posterior noise come from a per-rank
    generator. `state_dict()` / `load_state_dict()` resume exactly, as data.InfiniteSampler.

    Args:
        latents: a LatentSet or its folder.
        batch_size: per rank.
        seed, rank, world_size: sharding as `shard_indices`.
        flip: random mirror views: picks one of the two stored views ("both"), or mirrors the latent ("none"/"random",
            an approximation; off by default since "random" extraction already holds the reference's flips).
        device: where batches go.
    """

    def __init__(self, latents, batch_size: int, seed: int = 0, rank: int = 0, world_size: int = 1,
                 flip: bool = False, device=None):
        self.data = latents if isinstance(latents, LatentSet) else LatentSet(latents)
        n = len(self.data)
        if n < world_size * batch_size:
            raise ValueError(f"{n} latents are too few for {world_size} rank(s) x batch {batch_size}")
        self.batch_size, self.seed, self.rank, self.world_size = batch_size, seed, rank, world_size
        self.flip, self.device = flip, device
        self.generator = torch.Generator().manual_seed(seed * 65_537 + rank)
        self.epoch, self.pos, self._shard, self._shard_epoch = 0, 0, None, None

    def state_dict(self):
        return {"generator": self.generator.get_state(), "epoch": self.epoch, "pos": self.pos}

    def load_state_dict(self, state):
        self.generator.set_state(state["generator"])
        self.epoch, self.pos = int(state["epoch"]), int(state["pos"])

    def __next__(self):
        n = len(self.data)
        if self.pos + self.batch_size > n // self.world_size:
            self.epoch, self.pos = self.epoch + 1, 0
        if self._shard_epoch != self.epoch:
            self._shard = shard_indices(n, self.epoch, self.seed, self.rank, self.world_size)
            self._shard_epoch = self.epoch
        idx = self._shard[self.pos : self.pos + self.batch_size].sort().values.numpy()  # sorted: sequential reads
        self.pos += self.batch_size
        z = torch.from_numpy(np.ascontiguousarray(self.data.latents[idx])).float()  # (B, V, C, h, w)
        B, V = z.shape[:2]
        if V == 2 and self.flip:
            z = z[torch.arange(B), torch.randint(0, 2, (B,), generator=self.generator)]
        else:
            z = z[:, 0]
            if self.flip:
                mask = torch.rand(B, generator=self.generator) < 0.5
                z = torch.where(mask[:, None, None, None], z.flip(-1), z)
        if self.data.moments:
            mean, std = z.chunk(2, dim=1)
            z = mean + std * torch.randn(mean.shape, generator=self.generator)
        y = torch.from_numpy(self.data.labels[idx])
        if self.device is not None:
            z, y = z.to(self.device), y.to(self.device)
        return z, y

    def __iter__(self):
        return self


class EncodedLoader:
    """Batches of an ImageFolderLoader encoded on the fly by the VAE: (z (B, C, h, w) float32 scaled latents, y (B,)).

    The slow path of gate training (no extraction first): one VAE encode per batch, a posterior sample from a
    per-rank CPU generator (seed, rank), so `state_dict()` / `load_state_dict()` (loader position and generator)
    resume exactly.

    Args:
        loader: an ImageFolderLoader (this rank's shard; its dataset's image_size = latent size x the VAE factor).
        vae: a diffusers AutoencoderKL (see `lazydit.data.vae.load_vae`), on the device that should encode.
        seed: for the posterior noise.
    """

    def __init__(self, loader: ImageFolderLoader, vae, seed: int = 0):
        self.loader, self.vae = loader, vae
        self.generator = torch.Generator().manual_seed(seed * 65_537 + loader.rank)

    def state_dict(self):
        return {"loader": self.loader.state_dict(), "generator": self.generator.get_state()}

    def load_state_dict(self, state):
        self.loader.load_state_dict(state["loader"])
        self.generator.set_state(state["generator"])

    def __next__(self):
        from lazydit.data.vae import encode

        x, y = next(self.loader)
        z = encode(self.vae, x, generator=self.generator)
        return z, y.to(z.device)

    def __iter__(self):
        return self

    def close(self):
        self.loader.close()


__all__ = ["center_crop_arr", "to_tensor", "flip_decision", "ImageFolder", "ImageFolderLoader", "shard_indices",
           "extract_latents", "LatentSet", "LatentSampler", "EncodedLoader", "IMAGE_EXTENSIONS"]
