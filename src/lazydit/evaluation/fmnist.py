"""The Fashion-MNIST evaluators: small classifiers that stand in for ADM's Inception-v3 on this dataset.

Its globally pooled penultimate features give FID, precision/recall and KID ("pool_3"), the first channels of an
intermediate 7x7 map give sFID ("mixed_6/conv"), and its softmax gives the Inception Score (the metric driver is
`lazydit.evaluation.features`). Two are shipped, each with the reference statistics of the test split:

- `FMNISTClassifier` ("fmnist"): a plain CNN (3x3 convs, BatchNorm, ReLU, max pooling), the default evaluator;
- `FMNISTResNet` ("fmnist-resnet"): a second, independently trained extractor of another architecture (a 5x5 stem,
  residual blocks with GroupNorm and GELU, average pooling, 160 pooled features) and another seed, so that a small
  FID gap can be checked against an evaluator that shares neither weights nor design with the first.

Both are rebuilt by scripts/build_fmnist_eval.py (`--arch cnn` / `--arch resnet`).
"""

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from lazydit.errors import CheckpointError
from lazydit.evaluation.features import fingerprint, load_reference
from lazydit.files import atomic_write
from lazydit.models.checkpoint import load_state_dict_strict, read_model_metadata

ASSETS = Path(__file__).resolve().parent.parent / "assets"
DEFAULT_CLASSIFIER = ASSETS / "fmnist_classifier.safetensors"
DEFAULT_REFERENCE = ASSETS / "fmnist_test_ref.npz"
RESNET_CLASSIFIER = ASSETS / "fmnist_resnet.safetensors"  # the second extractor ("fmnist-resnet")
RESNET_REFERENCE = ASSETS / "fmnist_resnet_test_ref.npz"
FORMAT = "lazydit-fmnist-classifier"  # metadata marker of a classifier file


def _block(cin, cout):
    """3x3 conv (no bias) + BatchNorm + ReLU, size preserving."""
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class FMNISTClassifier(nn.Module):
    """Small CNN for (B, 1, 28, 28) images in [-1, 1]: 28 -> pool -> 14 -> pool -> 7 -> 7 -> global pool -> 10."""

    def __init__(self, channels=(32, 64, 128, 128), num_classes=10, spatial_channels=7, in_channels=1):
        super().__init__()
        if len(channels) != 4:
            raise ValueError(f"channels must have 4 entries, got {channels}")
        if not 0 < spatial_channels <= channels[2]:
            raise ValueError(f"spatial_channels must be in 1..{channels[2]}, got {spatial_channels}")
        self.arch = dict(channels=list(channels), num_classes=num_classes, spatial_channels=spatial_channels,
                         in_channels=in_channels)
        c1, c2, c3, c4 = channels
        self.conv1 = _block(in_channels, c1)  # 28x28
        self.conv2 = _block(c1, c2)  # 14x14
        self.conv3 = _block(c2, c3)  # 7x7: its first `spatial_channels` channels are the sFID features
        self.conv4 = _block(c3, c4)  # 7x7: globally pooled -> the FID / precision / recall / KID features
        self.head = nn.Linear(c4, num_classes)
        self.spatial_channels = spatial_channels

    def _trunk(self, x):
        """Returns (spatial map (B, C3, 7, 7), pooled features (B, C4))."""
        h = F.max_pool2d(self.conv1(x), 2)  # (B, C1, 14, 14)
        h = F.max_pool2d(self.conv2(h), 2)  # (B, C2, 7, 7)
        s = self.conv3(h)  # (B, C3, 7, 7)
        pool = self.conv4(s).mean(dim=(2, 3))  # (B, C4)
        return s, pool

    def forward(self, x):
        """Class logits (B, num_classes) of images x (B, 1, 28, 28) in [-1, 1]."""
        return self.head(self._trunk(x)[1])

    def features(self, x):
        """dict(pool (B, C4), spatial (B, spatial_channels*49), logits (B, num_classes)) of x (B, 1, 28, 28)."""
        s, pool = self._trunk(x)
        spatial = s[:, : self.spatial_channels].flatten(1)  # (B, 7*7*7)
        return dict(pool=pool, spatial=spatial, logits=self.head(pool))


class _Residual(nn.Module):
    """x + conv(gelu(norm(conv(gelu(norm(x)))))): a pre-activation residual block with GroupNorm, size preserving."""

    def __init__(self, c, groups=8):
        super().__init__()
        self.norm1, self.conv1 = nn.GroupNorm(groups, c), nn.Conv2d(c, c, 3, padding=1)
        self.norm2, self.conv2 = nn.GroupNorm(groups, c), nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x):
        h = self.conv1(F.gelu(self.norm1(x)))
        return x + self.conv2(F.gelu(self.norm2(h)))


class FMNISTResNet(nn.Module):
    """The second extractor: a small residual network for (B, 1, 28, 28) images in [-1, 1].

    5x5 stem -> residual block at 28x28 -> avg pool -> 14x14 widen + residual block -> avg pool -> 7x7 widen (the
    sFID map: its first `spatial_channels` channels) -> residual block -> widen -> global average pool (the FID
    features) -> linear head.
    """

    def __init__(self, channels=(16, 32, 96, 160), num_classes=10, spatial_channels=7, in_channels=1):
        super().__init__()
        if len(channels) != 4:
            raise ValueError(f"channels must have 4 entries, got {channels}")
        if not 0 < spatial_channels <= channels[2]:
            raise ValueError(f"spatial_channels must be in 1..{channels[2]}, got {spatial_channels}")
        self.arch = dict(kind="resnet", channels=list(channels), num_classes=num_classes,
                         spatial_channels=spatial_channels, in_channels=in_channels)
        c1, c2, c3, c4 = channels
        self.stem = nn.Conv2d(in_channels, c1, 5, padding=2)  # 28x28
        self.res1 = _Residual(c1)
        self.widen2, self.res2 = nn.Conv2d(c1, c2, 3, padding=1), _Residual(c2)  # 14x14
        self.widen3 = nn.Conv2d(c2, c3, 3, padding=1)  # 7x7: the sFID map
        self.res3 = _Residual(c3)
        self.widen4 = nn.Conv2d(c3, c4, 1)
        self.norm = nn.GroupNorm(8, c4)
        self.head = nn.Linear(c4, num_classes)
        self.spatial_channels = spatial_channels

    def _trunk(self, x):
        h = F.avg_pool2d(self.res1(self.stem(x)), 2)  # (B, C1, 14, 14)
        h = F.avg_pool2d(self.res2(self.widen2(h)), 2)  # (B, C2, 7, 7)
        s = self.widen3(h)  # (B, C3, 7, 7)
        pool = F.gelu(self.norm(self.widen4(self.res3(s)))).mean(dim=(2, 3))  # (B, C4)
        return s, pool

    def forward(self, x):
        """Class logits (B, num_classes) of images x (B, 1, 28, 28) in [-1, 1]."""
        return self.head(self._trunk(x)[1])

    def features(self, x):
        """dict(pool (B, C4), spatial (B, spatial_channels*49), logits (B, num_classes)) of x (B, 1, 28, 28)."""
        s, pool = self._trunk(x)
        return dict(pool=pool, spatial=s[:, : self.spatial_channels].flatten(1), logits=self.head(pool))


ARCHITECTURES = {"cnn": FMNISTClassifier, "resnet": FMNISTResNet}  # arch "kind" -> class (absent kind: "cnn")


def build_classifier(arch: dict) -> nn.Module:
    """The classifier an architecture dict (a file's "arch" metadata) describes, with fresh weights.

    Raises:
        CheckpointError: an unknown architecture kind.
    """
    arch = dict(arch)
    kind = arch.pop("kind", "cnn")
    if kind not in ARCHITECTURES:
        raise CheckpointError(f"unknown classifier architecture {kind!r}: this lazydit knows "
                              f"{', '.join(ARCHITECTURES)}")
    return ARCHITECTURES[kind](**arch)


def save_classifier(model: nn.Module, path, meta: dict | None = None):
    """Save the classifier as .safetensors; metadata = format marker, architecture, fingerprint + `meta` (JSON)."""
    md = {"format": FORMAT, "arch": json.dumps(model.arch), "fingerprint": fingerprint(model)}
    for k, v in (meta or {}).items():
        md[k] = v if isinstance(v, str) else json.dumps(v)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    atomic_write(path, lambda tmp: save_file(state, tmp, metadata=md))


def read_classifier_metadata(path) -> dict:
    """Metadata of a classifier file (JSON values decoded); raises CheckpointError on a file of another kind."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"classifier not found: {path}")
    try:
        meta = read_model_metadata(path)
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path}: not a safetensors file ({type(e).__name__}: {e})") from e
    if meta.get("format") != FORMAT or not isinstance(meta.get("arch"), dict):
        raise CheckpointError(f"{path}: not a lazydit Fashion-MNIST classifier (metadata format "
                              f"{meta.get('format')!r}, keys {sorted(meta)}); rebuild it with "
                              "scripts/build_fmnist_eval.py")
    return meta


def load_classifier(path, device="cpu") -> nn.Module:
    """Build the classifier from the file's architecture and load its weights strictly (eval mode)."""
    meta = read_classifier_metadata(path)
    model = build_classifier(meta["arch"])
    load_state_dict_strict(model, load_file(str(path)), source=str(path))
    model.meta = meta
    return model.eval().to(device)


def _shipped(path: Path) -> Path:
    """A shipped evaluator file, or FileNotFoundError naming how to rebuild it."""
    if not path.is_file():
        arch = " --arch resnet ..." if path in (RESNET_CLASSIFIER, RESNET_REFERENCE) else ""
        raise FileNotFoundError(f"shipped asset {path.name} is missing from {path.parent}: reinstall lazydit, or "
                                f"rebuild it with `OMP_NUM_THREADS=1 python scripts/build_fmnist_eval.py{arch}`")
    return path


def default_classifier(device="cpu") -> FMNISTClassifier:
    """The shipped Fashion-MNIST classifier (eval mode) on `device`."""
    return load_classifier(_shipped(DEFAULT_CLASSIFIER), device)


def default_reference() -> dict:
    """The shipped reference statistics of the 10,000-image Fashion-MNIST test split (see load_reference)."""
    return load_reference(_shipped(DEFAULT_REFERENCE))


def resnet_classifier(device="cpu") -> FMNISTResNet:
    """The shipped second extractor (FMNISTResNet, eval mode) on `device`."""
    return load_classifier(_shipped(RESNET_CLASSIFIER), device)


def resnet_reference() -> dict:
    """The second extractor's reference statistics of the Fashion-MNIST test split."""
    return load_reference(_shipped(RESNET_REFERENCE))


# ---------------------------------------------------------------- training


def _random_shift(x, generator, max_shift=2):
    """Shift each image by up to max_shift pixels (background -1 fills in). x (B, C, H, W) -> same shape."""
    b, _, h, w = x.shape
    xp = F.pad(x, (max_shift,) * 4, value=-1.0)
    dy = torch.randint(0, 2 * max_shift + 1, (b,), generator=generator)
    dx = torch.randint(0, 2 * max_shift + 1, (b,), generator=generator)
    rows = (dy[:, None] + torch.arange(h))[:, None, :, None]  # (B, 1, H, 1)
    cols = (dx[:, None] + torch.arange(w))[:, None, None, :]  # (B, 1, 1, W)
    return xp[torch.arange(b)[:, None, None, None], torch.arange(x.shape[1])[None, :, None, None], rows, cols]


def evaluate_accuracy(model, images, labels, batch_size=1000) -> float:
    """Top-1 accuracy of model on float images (N, 1, 28, 28) in [-1, 1] and labels (N,)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    correct = 0
    with torch.no_grad():
        for i in range(0, len(images), batch_size):
            pred = model(images[i : i + batch_size].to(device)).argmax(1).cpu()
            correct += int((pred == labels[i : i + batch_size]).sum())
    model.train(was_training)
    return correct / max(len(images), 1)


def train_classifier(train_images, train_labels, test_images, test_labels, epochs=4, batch_size=128, lr=2e-3,
                     seed=0, progress=True, channels=(32, 64, 128, 128), weight_decay=5e-4, augment=True,
                     num_classes=10, max_steps=None, device="cpu", arch="cnn"):
    """Train a classifier (`arch`: "cnn" FMNISTClassifier, "resnet" FMNISTResNet) with AdamW + one-cycle (cosine) lr, random shifts and horizontal flips.

    Args:
        train_images, test_images: float (N, 1, 28, 28) tensors in [-1, 1] (load_fashion_mnist's layout).
        train_labels, test_labels: long (N,) tensors.
        epochs, batch_size, lr, weight_decay: optimisation; max_steps stops early (tests).
        seed: init, data order and augmentation (deterministic on CPU).
        progress: tqdm bar; channels: architecture widths; augment: shifts of up to 2 px + flips.
        arch: the architecture kind (`ARCHITECTURES`).
    Returns:
        (model in eval mode, test accuracy in [0, 1]).
    """
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    model = build_classifier(dict(kind=arch, channels=channels, num_classes=num_classes,
                                  in_channels=train_images.shape[1])).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    n = len(train_images)
    steps_per_epoch = max(n // batch_size, 1)
    total = epochs * steps_per_epoch if max_steps is None else min(max_steps, epochs * steps_per_epoch)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=max(total, 1), pct_start=0.15)
    model.train()
    step = 0
    bar = tqdm(total=total, desc="classifier", disable=not progress, unit="step")
    while step < total:
        perm = torch.randperm(n, generator=gen)
        for i in range(steps_per_epoch):
            if step >= total:
                break
            idx = perm[i * batch_size : (i + 1) * batch_size]
            x, y = train_images[idx], train_labels[idx]
            if augment:
                x = _random_shift(x, gen)
                flip = torch.rand(len(idx), generator=gen) < 0.5
                x = torch.where(flip[:, None, None, None], x.flip(-1), x)
            loss = F.cross_entropy(model(x.to(device)), y.to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            step += 1
            bar.update(1)
            if step % 50 == 0:
                bar.set_postfix(loss=f"{loss.item():.3f}")
    bar.close()
    model.eval()
    acc = evaluate_accuracy(model, test_images, test_labels) if len(test_images) else float("nan")
    return model, acc


