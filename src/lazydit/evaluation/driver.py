"""Evaluate one sampler configuration: samples (ADM .npz) + every quality metric + lazy ratio + TMACs + wall-clock.

Every configuration sees the same labels and the same initial noise (batch i is seeded with seed * 1_000_003 + i),
so rows of a table differ only by the sampler. Generation is written batch by batch into `<out>.parts/` and an
interrupted run continues where it stopped; `evaluate_config` removes the parts only once the row is scored, so an
interruption while scoring costs no sampling either.
"""

import time
from dataclasses import asdict, dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

from lazydit.data.vae import own_decoder
from lazydit.sampling.parts import SampleParts, remove_parts
from lazydit.models.cost import sampling_macs
from lazydit.images import save_npz, to_uint8
from lazydit.lazy import LazyStats
from lazydit.models.registry import BRANCH_NAMES
from lazydit.pipeline import sample


@dataclass
class EvalConfig:
    steps: int = 50  # T, DDIM sampling steps
    cfg_scale: float = 2.0  # classifier-free guidance scale (1.0: none)
    num_samples: int = 5000  # images generated and scored
    batch_size: int = 250  # images per sampling batch
    seed: int = 0  # labels and initial noise (the same for every configuration)
    name: str | None = None  # row label (default: DDIM-T / Lazy-T / Lazy-LA-T)
    micro_batch: int | None = None  # images per sampler call inside a batch (cache-friendly on CPU; same samples)
    sampler: str = "ddim"  # "ddim" or "dpm++2m" (lazydit.sampling.SAMPLERS), with or without a caching policy


def eval_labels(num_samples: int, num_classes: int, seed: int = 0) -> torch.Tensor:
    """Labels uniform over classes (each class num_samples / C times, shuffled by seed): (num_samples,) long."""
    y = torch.arange(num_samples) % num_classes
    return y[torch.randperm(num_samples, generator=torch.Generator().manual_seed(seed))]


def generate(model, cfg: EvalConfig, policy=None, out=None, progress: bool = True, first: int | None = None,
             decode=None, keep_parts: bool = False) -> dict:
    """Sample cfg.num_samples images with one configuration, batch by batch, resumable.

    Args:
        model: a DiT (eval mode) on its device.
        cfg: EvalConfig.
        policy: the caching Policy (gates: `lazydit.lazy.policy_for(gates, LazyConfig(...))`), or None: the bare
            sampler.
        out: ADM .npz to write (arr_0 uint8 N x H x W x C, arr_1 labels); parts go to `<out>.parts/` meanwhile.
        progress: progress bar over batches.
        first: sample only the first `first` images (whole batches) of the run, with the labels and noise they have
            in the whole run (a fidelity reference for the rows' first images).
        decode: latents -> images for a latent model (default: the autoencoder its file names, if any).
        keep_parts: leave `<out>.parts/` in place after writing `out` (the caller removes it when it has used the
            samples: `evaluate_config` scores them first, so an interrupted scoring samples nothing again).
    Returns:
        dict(images (N, H, W, C) uint8, labels (N,), name, steps, lazy_ratio, tmacs, seconds, seconds_per_image,
        stats (LazyStats or None)).
    """
    device = next(model.parameters()).device
    decode = decode or own_decoder(model)
    y_all = eval_labels(cfg.num_samples, model.config.num_classes, cfg.seed)
    n_batches = (min(cfg.num_samples, first or cfg.num_samples) + cfg.batch_size - 1) // cfg.batch_size
    parts = None
    if out:
        meta = {**asdict(cfg), "micro_batch": None,  # a compute detail: parts stay valid across it
                **({} if first is None else {"first": first}),
                "policy": None if policy is None else policy.describe()}
        parts = SampleParts(out, meta).prepare()
    images, labels, seconds, skipped, total = [], [], 0.0, None, None
    name = cfg.name
    bar = tqdm(range(n_batches), desc=cfg.name or "eval", unit="batch", disable=not progress)
    for i in bar:
        y = y_all[i * cfg.batch_size : (i + 1) * cfg.batch_size]
        done = parts.read(f"part_{i:05d}") if parts else None
        if done is not None:
            img, lab, info = done
        else:
            try:
                x, rep = sample(model, y.to(device), cfg.steps, policy=policy, cfg_scale=cfg.cfg_scale, seed=cfg.seed * 1_000_003 + i, progress=False, name=cfg.name,
                                micro_batch=cfg.micro_batch, sampler=cfg.sampler)
            except BaseException:  # an error or Ctrl-C before the first part: no empty parts folder is left
                if parts is not None:
                    parts.remove_if_empty()
                raise
            img, lab = to_uint8(x if decode is None else decode(x)), y.numpy()
            info = dict(name=rep.name, seconds=rep.seconds)
            if rep.lazy is not None:
                info.update(skipped=rep.lazy.skipped.tolist(), total=rep.lazy.total.tolist(),
                            kinds=list(rep.lazy.kinds))
            if parts is not None:
                parts.write(f"part_{i:05d}", img, lab, info)
        name = name or info["name"]
        images.append(img)
        labels.append(lab)
        seconds += info["seconds"]
        if "skipped" in info:
            s, t = torch.tensor(info["skipped"]), torch.tensor(info["total"])
            kinds = info.get("kinds", BRANCH_NAMES[: s.shape[-1]])  # parts written before kinds were recorded
            skipped = s if skipped is None else skipped + s
            total = t if total is None else total + t
    images, labels = np.concatenate(images), np.concatenate(labels)
    stats = LazyStats(skipped, total, tuple(kinds)) if skipped is not None else None
    overhead = policy.overhead_macs(model.config) if policy is not None else None
    if out:
        save_npz(images, out, labels=labels)
        if not keep_parts:
            parts.remove()
    return dict(images=images, labels=labels, name=name, steps=cfg.steps,
                lazy_ratio=stats.lazy_ratio if stats else 0.0,
                tmacs=sampling_macs(model.config, cfg.steps, stats, overhead=overhead) / 1e12, seconds=seconds,
                seconds_per_image=seconds / len(images), stats=stats)


def score(extractor, images, ref: dict, batch_size: int = 250, progress: bool = True) -> dict:
    """FID, sFID, IS, precision, recall (k=3) and KID of uint8 images against reference statistics."""
    from lazydit.evaluation.features import evaluate, extract_features

    return evaluate(extractor, extract_features(extractor, images, batch_size, progress), ref, progress=progress)


def evaluate_config(model, cfg: EvalConfig, extractor, ref: dict, policy=None, out=None,
                    progress: bool = True) -> dict:
    """One row of a results table: generate (resumable), then every metric against the reference statistics.

    Args:
        model, cfg, policy, out: as `generate`.
        extractor: feature extractor with `.features(x)` (e.g. lazydit.evaluation.fmnist.default_classifier()).
        ref: reference statistics made with the same extractor (e.g. lazydit.evaluation.fmnist.default_reference()).
    Returns:
        dict(sampler, steps, n, fid, sfid, inception_score, precision, recall, kid, lazy_ratio, tmacs,
        seconds, seconds_per_image).
    """
    t0 = time.time()
    g = generate(model, cfg, policy, out, progress, keep_parts=True)
    metrics = score(extractor, g["images"], ref, progress=progress)
    if out:  # scored: the parts have served (until here a rerun reads them instead of sampling again)
        remove_parts(out)
    row = dict(sampler=g["name"], steps=cfg.steps, n=len(g["images"]), **{k: float(v) for k, v in metrics.items()},
               lazy_ratio=round(g["lazy_ratio"], 4), tmacs=g["tmacs"], seconds=round(g["seconds"], 2),
               seconds_per_image=round(g["seconds_per_image"], 5), cfg_scale=cfg.cfg_scale, seed=cfg.seed,
               threshold=getattr(policy, "threshold", None),
               wall_s=round(time.time() - t0, 1))
    if g["stats"] is not None:
        row["per_branch"] = g["stats"].as_dict()["per_branch"]
    return row
