"""Training the Fashion-MNIST autoencoder of the embedded latent default (`lazydit.models.autoencoder`)."""

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from lazydit.data.fashion_mnist import InfiniteSampler, load_fashion_mnist
from lazydit.training.resume import check_resume_settings, load_checkpoint, restoring, save_checkpoint
from lazydit.errors import NonFiniteError
from lazydit.files import write_text_atomic
from lazydit.models.autoencoder import AutoencoderConfig, TinyAutoencoder, save_autoencoder


@dataclass
class AutoencoderTrainConfig:
    data: str | None = None  # Fashion-MNIST IDX folder (default: Debian's)
    out: str = "runs/autoencoder"  # run folder: checkpoint.pt, autoencoder.safetensors, log.json
    latent_channels: int = 4  # C of the latents
    width: int = 64  # channels of the inner stages
    downsample: int = 1  # stride-2 stages: latents are 28 / 2**downsample wide
    iters: int = 6000  # optimiser steps
    batch_size: int = 128  # images per step
    lr: float = 2e-3  # Adam learning rate, cosine-decayed to 0 over `iters`
    kl_weight: float = 1e-4  # weight of the KL term (per latent element) against the MSE (per pixel)
    seed: int = 0  # data order, posterior noise and init
    ckpt_every: int = 500  # optimiser steps between atomic checkpoints
    max_minutes: float | None = None  # wall-clock budget of the call: stop and save then
    resume: bool = False  # continue from out/checkpoint.pt when there (same settings), else start


RESULT_FIELDS = ("latent_channels", "width", "downsample", "iters", "batch_size", "lr", "kl_weight", "seed")


@torch.no_grad()
def latent_scale(ae: TinyAutoencoder, x, batch_size: int = 1000) -> float:
    """1 / std of the unscaled posterior means of `x` (SD-VAE's scaling factor, measured on the data)."""
    means = torch.cat([ae.posterior(x[i : i + batch_size])[0] for i in range(0, len(x), batch_size)])
    return float(1.0 / means.std())


def train_autoencoder(cfg: AutoencoderTrainConfig, device="cpu", progress=True) -> Path:
    """Train the KL autoencoder on the Fashion-MNIST train split; returns out/autoencoder.safetensors.

    Loss: mean squared error per pixel + kl_weight * KL per latent element, posterior sampled (as SD-VAE without
    its perceptual and adversarial terms). The saved file's scale makes the training latents unit-std.

    Args:
        cfg: AutoencoderTrainConfig.
        device: torch device.
        progress: show a progress bar.
    Returns:
        Path of the trained autoencoder (also its reconstruction MSE on the test split in the metadata).
    """
    deadline = None if cfg.max_minutes is None else time.time() + 60 * cfg.max_minutes
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    x, y = load_fashion_mnist("train", cfg.data)
    ae = TinyAutoencoder(AutoencoderConfig(latent_channels=cfg.latent_channels, width=cfg.width,
                                           downsample=cfg.downsample)).to(device)
    opt = torch.optim.Adam(ae.parameters(), lr=cfg.lr)
    sampler = InfiniteSampler(x, y, cfg.batch_size, seed=cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    step, log = 0, []
    ckpt = out / "checkpoint.pt"
    if cfg.resume and ckpt.exists():
        state = load_checkpoint(ckpt, "train-autoencoder")  # never unpickles code: refused with one CheckpointError
        check_resume_settings(ckpt, state["args"], cfg, RESULT_FIELDS)
        with restoring(ckpt):  # a state that does not fit this run: one CheckpointError, not a traceback
            ae.load_state_dict(state["model"])
            opt.load_state_dict(state["opt"])
            sampler.load_state_dict(state["sampler"])
            gen.set_state(state["gen"])
            step, log = int(state["step"]), list(state["log"])

    def save(final: bool):
        save_checkpoint(dict(model=ae.state_dict(), opt=opt.state_dict(), sampler=sampler.state_dict(),
                               gen=gen.get_state(), step=step, args=asdict(cfg), log=log), ckpt)
        write_text_atomic(out / "log.json", json.dumps(log))
        if final:
            ae.eval()
            ae.scale = latent_scale(ae, x[:10000].to(device))
            xt, _ = load_fashion_mnist("test", cfg.data)
            with torch.no_grad():
                rec = torch.cat([ae.decode(ae.encode(xt[i : i + 1000].to(device), sample=False)).cpu()
                                 for i in range(0, len(xt), 1000)])
            mse = float((rec - xt).pow(2).mean())
            save_autoencoder(ae, out / "autoencoder.safetensors",
                             extra={"train": asdict(cfg), "step": step, "test_mse": mse,
                                    "test_psnr_db": 10 * math.log10(4.0 / mse)})
            ae.train()

    ae.train()
    bar = tqdm(total=cfg.iters, initial=step, desc="autoencoder", disable=not progress)
    while step < cfg.iters:
        xb, _ = next(sampler)
        xb = xb.to(device)
        for g in opt.param_groups:
            g["lr"] = cfg.lr * 0.5 * (1 + math.cos(math.pi * step / cfg.iters))
        rec, kl = ae(xb, generator=gen)
        mse = (rec - xb).pow(2).mean()
        loss = mse + cfg.kl_weight * kl.mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        step += 1
        if not math.isfinite(loss.item()):  # before this step's weights reach a checkpoint
            raise NonFiniteError(f"autoencoder training diverged at step {step}: lower --lr")
        log.append((step, mse.item(), kl.mean().item()))
        bar.update(1)
        bar.set_postfix(mse=f"{log[-1][1]:.4f}", kl=f"{log[-1][2]:.2f}")
        out_of_time = deadline is not None and time.time() > deadline
        if step % cfg.ckpt_every == 0 and step < cfg.iters and not out_of_time:
            save(final=False)
        if out_of_time:
            break
    bar.close()
    save(final=True)
    return out / "autoencoder.safetensors"
