"""Feature statistics and scores of any extractor (the Fashion-MNIST classifier of `lazydit.evaluation.fmnist`, or
InceptionV3): features of image batches, reference statistics and their file format, and every metric of a sample
set against a reference, as ADM's evaluator. The formulas themselves are in `lazydit.evaluation.metrics`."""

import json
import warnings
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from lazydit.errors import SmallSampleWarning
from lazydit.files import atomic_write
from lazydit.files import weights_fingerprint as fingerprint  # the extractor's, in reference files
from lazydit.evaluation.metrics import feature_stats, frechet_distance, inception_score, kid, precision_recall

REF_FORMAT = "lazydit-fmnist-reference"  # marker of a reference-statistics file
REF_KEYS = ("mu", "sigma", "mu_s", "sigma_s", "pool", "mean_probs")


# ---------------------------------------------------------------- images -> features


def images_to_tensor(images) -> torch.Tensor:
    """uint8 (N, H, W, C) or (N, H, W) numpy -> float32 (N, C, H, W) tensor in [-1, 1]."""
    images = np.asarray(images)
    if images.dtype != np.uint8:
        raise ValueError(f"images must be uint8 (ADM .npz layout), got {images.dtype}")
    if images.ndim == 3:
        images = images[..., None]
    if images.ndim != 4:
        raise ValueError(f"images must be (N, H, W, C) uint8, got shape {images.shape}")
    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2)  # (N, C, H, W)
    return x.float() / 127.5 - 1.0


def extract_features(extractor, images, batch_size=500, progress=True) -> dict:
    """Run the extractor over uint8 (N, H, W, C) images. Returns numpy dict(pool (N, F), spatial (N, S), probs (N, K)).

    Args:
        extractor: FMNISTClassifier, or any module with `.features(x)` and a static `preprocess(images)` giving its
            own input convention (InceptionV3FID); run in eval mode, on its own device.
        images: uint8 numpy (N, H, W, C) with C = the extractor's in_channels (ADM .npz layout), or (N, H, W).
        batch_size: images per forward pass.
        progress: show a tqdm bar.
    """
    images = np.asarray(images)
    if images.ndim == 3:
        images = images[..., None]
    if images.ndim != 4 or images.dtype != np.uint8:
        raise ValueError(f"images must be (N, H, W, C) uint8, got {images.shape} {images.dtype}")
    preprocess = getattr(extractor, "preprocess", images_to_tensor)  # FMNISTClassifier: [-1, 1]
    c_in = getattr(extractor, "arch", {}).get("in_channels", 1)
    if not hasattr(extractor, "preprocess") and images.shape[1:] != (28, 28, c_in):
        raise ValueError(f"the Fashion-MNIST extractor needs (N, 28, 28, {c_in}) images, got {images.shape}")
    if len(images) == 0:
        raise ValueError("no images")
    device = next(extractor.parameters()).device
    was_training = extractor.training
    extractor.eval()
    out = {"pool": [], "spatial": [], "probs": []}
    try:
        with torch.no_grad():
            for i in tqdm(range(0, len(images), batch_size), desc="features", disable=not progress,
                          unit="batch"):
                x = preprocess(images[i : i + batch_size]).to(device)
                f = extractor.features(x)
                out["pool"].append(f["pool"].float().cpu().numpy())
                out["spatial"].append(f["spatial"].float().cpu().numpy())
                out["probs"].append(torch.softmax(f["logits"].float(), dim=1).cpu().numpy())
    finally:
        extractor.train(was_training)
    return {k: np.concatenate(v) for k, v in out.items()}


# ---------------------------------------------------------------- classifier files


# ---------------------------------------------------------------- reference statistics


def reference_stats(extractor, images, batch_size=500, progress=True) -> dict:
    """Reference statistics of uint8 (N, 28, 28, 1) images: mu/sigma (pool), mu_s/sigma_s (spatial), pool, mean_probs.

    pool (N, F) is kept in float16 for precision/recall and KID; mu/sigma are float64 from the float32 features.
    """
    f = extract_features(extractor, images, batch_size=batch_size, progress=progress)
    mu, sigma = feature_stats(f["pool"])
    mu_s, sigma_s = feature_stats(f["spatial"])
    return dict(mu=mu, sigma=sigma, mu_s=mu_s, sigma_s=sigma_s, pool=f["pool"].astype(np.float16),
                mean_probs=f["probs"].mean(axis=0), meta={"n": int(len(images)), "fingerprint": fingerprint(extractor)})


def save_reference(path, stats: dict, meta: dict | None = None):
    """Write reference statistics to a compressed .npz (keys REF_KEYS + `meta`, a JSON string)."""
    missing = [k for k in REF_KEYS if k not in stats]
    if missing:
        raise ValueError(f"reference stats lack {missing}")
    md = {**stats.get("meta", {}), **(meta or {}), "format": REF_FORMAT}
    arrays = {k: np.asarray(stats[k]) for k in REF_KEYS}

    def write(tmp):
        with open(tmp, "wb") as f:  # a file object: np.savez would append .npz to a path
            np.savez_compressed(f, **arrays, meta=np.array(json.dumps(md)))

    atomic_write(path, write)


def load_reference(path) -> dict:
    """Read a reference .npz: dict of REF_KEYS arrays + `meta` (dict). Raises ValueError on a file of another kind."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"reference statistics not found: {path}")
    try:
        with np.load(path, allow_pickle=False) as f:
            files = set(f.files)
            missing = [k for k in (*REF_KEYS, "meta") if k not in files]
            if missing:
                raise ValueError(f"{path}: not a lazydit reference-statistics file (missing {missing}; keys "
                                 f"{sorted(files)})")
            out = {k: f[k] for k in REF_KEYS}
            meta = json.loads(str(f["meta"]))
    except (OSError, EOFError) as e:
        raise ValueError(f"{path}: cannot be read as .npz ({type(e).__name__}: {e})") from e
    except ValueError as e:
        if "pickle" not in str(e):
            raise
        raise ValueError(f"{path}: not an .npz file (reference statistics are an .npz written by lazydit, e.g. "
                         "scripts/build_fmnist_eval.py, or an ADM reference batch)") from None
    if meta.get("format") != REF_FORMAT:
        raise ValueError(f"{path}: not a lazydit reference-statistics file (format {meta.get('format')!r})")
    out["meta"] = meta
    return out


EXTRACTORS = ("fmnist", "fmnist-resnet", "inception")  # --extractor: the two Fashion-MNIST ones, ADM's


def extractor_and_reference(kind: str, device="cpu", ref=None, inception_weights=None, progress: bool = True):
    """A feature extractor and the reference statistics to score samples against.

    Args:
        kind: "fmnist" (the shipped Fashion-MNIST classifier), "fmnist-resnet" (the second, independently trained
            Fashion-MNIST extractor) or "inception" (InceptionV3, ADM's evaluator).
        device: where the extractor runs.
        ref: a reference file: lazydit reference statistics (`save_reference`), or, for inception, an ADM reference
            batch (real uint8 images under `arr_0`, whose statistics are computed here). None with "fmnist": the
            shipped test-split statistics of that Fashion-MNIST extractor.
        inception_weights: pytorch-fid's Inception weights file (required with "inception").
        progress: show a bar while an ADM batch is featurised.
    Returns:
        (extractor, reference statistics as `load_reference` returns them).
    Raises:
        UsageError: an unknown kind, or "inception" without `inception_weights` and `ref`.
        LazyditError: `ref` is neither reference statistics nor an ADM batch.
    """
    from lazydit.errors import LazyditError, UsageError

    if kind not in EXTRACTORS:
        raise UsageError(f"unknown feature extractor {kind!r}: choose one of {', '.join(EXTRACTORS)}")
    if kind == "fmnist":
        from lazydit.evaluation import fmnist

        return fmnist.default_classifier(device), load_reference(ref) if ref else fmnist.default_reference()
    if kind == "fmnist-resnet":
        from lazydit.evaluation import fmnist

        return fmnist.resnet_classifier(device), load_reference(ref) if ref else fmnist.resnet_reference()
    if not inception_weights or not ref:
        raise UsageError("the inception extractor needs its weights file and a reference file")
    from lazydit.evaluation.inception import load_inception

    ext = load_inception(inception_weights, device)
    try:
        return ext, load_reference(ref)
    except ValueError:  # an ADM reference batch: real images under arr_0
        with np.load(ref) as f:
            if "arr_0" not in f.files:
                raise LazyditError(f"{ref}: neither lazydit reference statistics nor an ADM batch (arr_0)")
            return ext, reference_stats(ext, f["arr_0"], progress=progress)


# ---------------------------------------------------------------- metrics


FEW_SAMPLES = 2000  # below this many samples FID's bias swamps the differences between samplers: a warning


def evaluate(extractor, images, ref: dict, batch_size=500, progress=True, is_splits=10, k=3, kid_subsets=100,
             kid_subset_size=1000, check_fingerprint=True) -> dict:
    """Every metric of generated images against reference statistics, as ADM's evaluator (+ KID).

    Args:
        extractor: the classifier that built `ref`.
        images: uint8 (N, 28, 28, 1) samples, or a dict from extract_features of them.
        ref: reference statistics (load_reference / reference_stats).
        is_splits: Inception Score splits (clipped to N; equal splits, not ADM's chunks of 5,000: see
            `metrics.inception_score`); k: precision/recall neighbourhood;
        kid_subsets, kid_subset_size: KID subsampling (the subset size is cut to the smaller set).
        check_fingerprint: raise if `ref` records a different extractor than `extractor`.
    Returns:
        dict(fid, sfid, inception_score, precision, recall, kid) of floats.
    """
    if check_fingerprint:
        want = (ref.get("meta") or {}).get("fingerprint")
        have = fingerprint(extractor)
        if want is not None and want != have:
            raise ValueError(f"the reference statistics were computed with another extractor (fingerprint {want}, "
                             f"this one {have}): metrics would be meaningless")
    f = images if isinstance(images, dict) else extract_features(extractor, images, batch_size, progress)
    if len(f["pool"]) < FEW_SAMPLES:
        warnings.warn(f"FID on {len(f['pool'])} samples is biased upward and noisy (it falls as samples grow): use "
                      f"at least {FEW_SAMPLES:,} to rank samplers, and the same count for every row (the tables use "
                      "5,000)", SmallSampleWarning, stacklevel=2)
    if len(f["pool"]) <= k:
        raise ValueError(f"need more than k={k} samples for precision/recall, got {len(f['pool'])}")
    mu, sigma = feature_stats(f["pool"])
    mu_s, sigma_s = feature_stats(f["spatial"])
    ref_pool = np.asarray(ref["pool"], dtype=np.float32)
    gen_pool = f["pool"].astype(np.float32)
    out = dict(
        fid=frechet_distance(mu, sigma, ref["mu"], ref["sigma"]),
        sfid=frechet_distance(mu_s, sigma_s, ref["mu_s"], ref["sigma_s"]),
        inception_score=inception_score(f["probs"], splits=max(1, min(is_splits, len(f["probs"])))),
    )
    out["precision"], out["recall"] = precision_recall(ref_pool, gen_pool, k=k)
    # KID subsets of kid_subset_size rows, or of every generated row when there are fewer (a smaller subset than
    # asked: KID's variance grows, its mean stays unbiased)
    out["kid"] = kid(gen_pool, ref_pool, subsets=kid_subsets, subset_size=min(kid_subset_size, len(gen_pool),
                                                                              len(ref_pool)))
    return out
