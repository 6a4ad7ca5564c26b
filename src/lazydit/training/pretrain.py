"""Base-model training (the DiT reference recipe, scaled down for the embedded Fashion-MNIST default)."""

import copy
import json
import math
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from lazydit.training.resume import check_resume_settings, load_checkpoint, restoring, save_checkpoint
from lazydit.errors import NonFiniteError, UsageError
from lazydit.models.checkpoint import save_model
from lazydit.files import write_text_atomic
from lazydit.data.fashion_mnist import InfiniteSampler, PosteriorSampler, cached_posterior, load_fashion_mnist
from lazydit.sampling.schedule import NUM_TRAIN_TIMESTEPS, TrainingLoss
from lazydit.sampling.ddim import ddim_sample
from lazydit.images import save_grid
from lazydit.models.dit import create_model
from lazydit.models.autoencoder import load_autoencoder


def _latent_data(path, x, y, model, cfg, device, progress=False):
    """(autoencoder, PosteriorSampler over its latents of the images x, encoded once and cached) for a latent
    model."""
    ae = load_autoencoder(path, device)
    C, size = model.config.in_channels, model.config.input_size
    if ae.config.latent_channels != C or x.shape[-1] // ae.factor != size:
        raise UsageError(f"--autoencoder {path} makes {ae.config.latent_channels}x{x.shape[-1] // ae.factor}^2 "
                         f"latents, the model takes {C}x{size}^2")
    return ae, PosteriorSampler(cached_posterior(ae, x, progress=progress), y, cfg.batch_size, seed=cfg.seed)


@dataclass
class PretrainConfig:
    model: str = "DiT-FMNIST"  # zoo name
    data: str | None = None  # Fashion-MNIST IDX folder (default: Debian's)
    out: str = "runs/pretrain"  # run folder: checkpoint.pt, model.safetensors (EMA), previews
    iters: int = 20000  # optimiser steps
    batch_size: int = 64  # images per step
    lr: float = 3e-4  # AdamW learning rate (reference: 1e-4 at batch 256)
    warmup: int = 200  # linear lr warm-up, in optimiser steps
    weight_decay: float = 0.0  # AdamW weight decay (reference: 0)
    ema_decay: float = 0.999  # EMA of the weights (reference: 0.9999 over 400k steps)
    flip: bool = False  # random horizontal flip (reference: on; Fashion-MNIST: off)
    seed: int = 0  # data order, noise and init
    ckpt_every: int = 500  # optimiser steps between atomic checkpoints (+ a preview grid)
    max_minutes: float | None = None  # wall-clock budget of the whole call, previews included: stop and save then
    bf16: bool = False  # bf16 autocast (CUDA)
    resume: bool = False  # continue from out/checkpoint.pt when there (same result-shaping settings), else start
    preview: bool = True  # write a DDIM-25 sample grid with every checkpoint
    autoencoder: str | None = None  # latent model: train on this autoencoder's latents (posterior sampled per
    # step, as DiT on SD-VAE) and name it in the saved model, which then decodes with it; None: pixels


# the fields that shape the trained model: a resumed run must match the checkpoint's (iters and the budget may grow)
RESULT_FIELDS = ("model", "batch_size", "lr", "warmup", "weight_decay", "ema_decay", "flip", "seed", "bf16",
                 "autoencoder")


class _OutOfTime(Exception):
    """The --max-minutes budget ended during a preview."""


def _ema_update(ema, model, decay):
    with torch.no_grad():
        for e, p in zip(ema.parameters(), model.parameters()):
            e.lerp_(p, 1 - decay)


def pretrain(cfg: PretrainConfig, device="cpu", progress=True) -> Path:
    """Train a class-conditional DiT on Fashion-MNIST with EMA; returns the path of the EMA model.

    Args:
        cfg: PretrainConfig.
        device: torch device for training.
        progress: show a progress bar.
    Returns:
        out/model.safetensors, the EMA weights with the config in the metadata.
    """
    deadline = None if cfg.max_minutes is None else time.time() + 60 * cfg.max_minutes
    out = Path(cfg.out)
    torch.manual_seed(cfg.seed)
    x, y = load_fashion_mnist("train", cfg.data)
    out.mkdir(parents=True, exist_ok=True)
    model = create_model(cfg.model).to(device)
    ae = None
    if cfg.autoencoder:  # latents: the posterior (mean, std) of every image, sampled afresh in each step
        ae, sampler = _latent_data(cfg.autoencoder, x, y, model, cfg, device, progress)
    elif model.config.in_channels != x.shape[1]:
        raise UsageError(f"{cfg.model} takes {model.config.in_channels}-channel inputs: pass the autoencoder whose "
                         "latents it models (--autoencoder FILE)")
    else:
        sampler = InfiniteSampler(x, y, cfg.batch_size, seed=cfg.seed, flip=cfg.flip)
    ema = copy.deepcopy(model).requires_grad_(False).eval()
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    loss_fn = TrainingLoss()
    step, log = 0, []
    ckpt = out / "checkpoint.pt"
    if cfg.resume and ckpt.exists():
        state = load_checkpoint(ckpt, "pretrain")  # never unpickles code: refused with one CheckpointError
        check_resume_settings(ckpt, state.get("args", {}), cfg, RESULT_FIELDS, missing_ok=True)
        with restoring(ckpt):  # a state that does not fit this run: one CheckpointError, not a traceback
            model.load_state_dict(state["model"])
            ema.load_state_dict(state["ema"])
            opt.load_state_dict(state["opt"])
            sampler.load_state_dict(state["sampler"])
            torch.set_rng_state(state["rng"])
            step, log = int(state["step"]), list(state.get("log", []))
    gen = torch.Generator(device="cpu").manual_seed(cfg.seed + 1)  # timesteps and noise
    if cfg.resume and ckpt.exists():
        with restoring(ckpt):
            gen.set_state(state["gen"])

    def save():
        save_checkpoint(dict(model=model.state_dict(), ema=ema.state_dict(), opt=opt.state_dict(),
                               sampler=sampler.state_dict(), rng=torch.get_rng_state(), gen=gen.get_state(), step=step,
                               args=asdict(cfg), log=log), ckpt)
        extra = {"pretrain": asdict(cfg), "step": step}
        if ae is not None:  # the model names its decoder, a copy beside it under the same file name
            name = Path(cfg.autoencoder).name
            if not (out / name).is_file():
                shutil.copyfile(cfg.autoencoder, out / name)
            extra["autoencoder"] = name
        save_model(ema, out / "model.safetensors", extra=extra)
        write_text_atomic(out / "log.json", json.dumps(log))
        if not cfg.preview:
            return

        def stop_at_deadline(_):
            if deadline is not None and time.time() > deadline:
                raise _OutOfTime

        labels = torch.arange(10, device=device).repeat_interleave(4)
        try:
            samples = ddim_sample(ema, labels, 25, cfg_scale=2.0, seed=0, progress=False, callback=stop_at_deadline)
        except _OutOfTime:  # the budget ends inside the preview: no grid this time
            return
        if ae is not None:
            samples = ae.decode(samples)
        save_grid(samples.reshape(10, 4, *samples.shape[1:]).transpose(0, 1).reshape(samples.shape),
                  out / f"preview_{step:06d}.png", nrow=10, scale=2)

    model.train()
    start = step
    bar = tqdm(total=cfg.iters, initial=step, desc="pretrain", disable=not progress)
    while step < cfg.iters:
        xb, yb = next(sampler)
        xb, yb = xb.to(device), yb.to(device)
        t = torch.randint(0, NUM_TRAIN_TIMESTEPS, (xb.shape[0],), generator=gen).to(device)
        noise = torch.randn(xb.shape, generator=gen).to(device)
        for g in opt.param_groups:
            g["lr"] = cfg.lr * min(1.0, (step + 1) / max(1, cfg.warmup))
        with torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16, enabled=cfg.bf16):
            loss = loss_fn(model, xb, t, yb, noise).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        _ema_update(ema, model, cfg.ema_decay if step >= cfg.warmup else 0.0)
        step += 1
        loss_value = loss.item()
        if not math.isfinite(loss_value):  # before this step's weights reach a checkpoint
            raise NonFiniteError(f"training diverged: the loss is {loss_value} at step {step}: lower --lr (or use "
                                 f"fp32); the last checkpoint is kept")
        log.append((step, loss_value))
        bar.update(1)
        bar.set_postfix(loss=f"{loss_value:.4f}")
        out_of_time = deadline is not None and time.time() > deadline
        if step % cfg.ckpt_every == 0 or step == cfg.iters or out_of_time:
            save()
        if out_of_time:
            break
    bar.close()
    if step == start:
        save()
    return out / "model.safetensors"
