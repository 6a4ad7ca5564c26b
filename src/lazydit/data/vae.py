"""The autoencoder between images and DiT latents: SD's VAE (diffusers AutoencoderKL, e.g.
stabilityai/sd-vae-ft-ema) or lazydit's own small one (`lazydit.models.autoencoder`, the embedded default's).

Latents as DiT: `z = 0.18215 * vae.encode(x).latent_dist.sample()`, images `vae.decode(z / 0.18215)`, x in [-1, 1].
diffusers is an optional dependency: `pip install 'lazydit[imagenet]'`. `decode` and `decoder_for` take either kind.
"""

from pathlib import Path

import torch

from lazydit.errors import CheckpointError
from lazydit.models.autoencoder import TinyAutoencoder, load_autoencoder

SCALE = 0.18215  # DiT's latent scale (the sd-vae-ft-* config's scaling_factor)
WEIGHT_FILES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")
FP16_WEIGHT_FILES = ("diffusion_pytorch_model.fp16.safetensors", "diffusion_pytorch_model.fp16.bin")


def _autoencoder_kl():
    """diffusers' AutoencoderKL, or an ImportError that says how to install it."""
    try:
        from diffusers.models import AutoencoderKL
    except ImportError as e:
        raise ImportError(
            "the VAE needs diffusers, which is not installed: pip install 'lazydit[imagenet]' "
            f"(or pip install diffusers) ({e})"
        ) from e
    return AutoencoderKL


def _vae_folder(folder: Path):
    """(folder with config.json and weights, variant or None); accepts a pipeline folder with a `vae/` inside."""
    if not folder.is_dir():
        raise FileNotFoundError(
            f"VAE folder not found: {folder}\nDownload https://huggingface.co/stabilityai/sd-vae-ft-ema "
            "(config.json and diffusion_pytorch_model.safetensors) into it."
        )
    if not (folder / "config.json").is_file() and (folder / "vae" / "config.json").is_file():
        folder = folder / "vae"
    missing = [] if (folder / "config.json").is_file() else ["config.json"]
    variant = None
    if not any((folder / f).is_file() for f in WEIGHT_FILES):
        if any((folder / f).is_file() for f in FP16_WEIGHT_FILES):
            variant = "fp16"
        else:
            missing.append(" or ".join(WEIGHT_FILES))
    if missing:
        raise FileNotFoundError(f"incomplete VAE folder {folder}: missing {', '.join(missing)}")
    return folder, variant


def load_vae(folder, device="cpu", dtype=torch.float32):
    """Load an AutoencoderKL strictly from a local folder (the layout of stabilityai/sd-vae-ft-ema), frozen, eval.

    Args:
        folder: folder with config.json and diffusion_pytorch_model.safetensors (or .bin); a pipeline folder with a
            `vae/` sub-folder works too. Nothing is downloaded.
        device: where the VAE goes.
        dtype: its parameter dtype.
    Returns:
        The diffusers AutoencoderKL.
    """
    AutoencoderKL = _autoencoder_kl()
    folder, variant = _vae_folder(Path(folder))
    try:
        vae, info = AutoencoderKL.from_pretrained(str(folder), torch_dtype=dtype, variant=variant,
                                                  local_files_only=True, low_cpu_mem_usage=False,
                                                  output_loading_info=True)
    except Exception as e:  # truncated weights, foreign config, ...
        raise CheckpointError(f"{folder}: cannot be loaded as an AutoencoderKL ({type(e).__name__}: {e})") from e
    problems = {k: info.get(k) for k in ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs")}
    problems = {k: v for k, v in problems.items() if v}
    if problems:  # diffusers only warns and initialises missing weights at random: be strict instead
        lines = [f"  {k.replace('_', ' ')}: {', '.join(map(str, v[:8]))}{' ...' if len(v) > 8 else ''}"
                 for k, v in problems.items()]
        raise CheckpointError(f"{folder}: the weights do not fit the AutoencoderKL of its config.json\n"
                              + "\n".join(lines))
    return vae.to(device).eval().requires_grad_(False)


def _batches(n: int, batch_size: int | None, progress: bool, desc: str):
    step = batch_size or max(n, 1)
    starts = range(0, n, step)
    if progress:
        from tqdm.auto import tqdm

        starts = tqdm(starts, desc=desc, unit="batch")
    for s in starts:
        yield slice(s, min(s + step, n))


def _vae_param(vae):
    return next(vae.parameters())


@torch.no_grad()
def encode(vae, images, sample: bool = True, generator: torch.Generator | None = None,
           batch_size: int | None = None, progress: bool = False) -> torch.Tensor:
    """Images -> DiT latents: SCALE times a posterior sample (or its mean).

    Args:
        vae: an AutoencoderKL.
        images: (B, 3, H, W) in [-1, 1], any device and float dtype.
        sample: draw from the posterior, as DiT's training (False: the posterior mean).
        generator: for the posterior noise (a CPU generator works with any device).
        batch_size: encode this many images at a time (None: all at once).
        progress: show a progress bar.
    Returns:
        (B, 4, H/8, W/8) float32 latents on the VAE's device.
    """
    p = _vae_param(vae)
    out = []
    for sl in _batches(images.shape[0], batch_size, progress, "encode"):
        dist = vae.encode(images[sl].to(p.device, p.dtype)).latent_dist
        z = dist.sample(generator=generator) if sample else dist.mean
        out.append(z.float() * SCALE)
    return torch.cat(out) if out else images.new_zeros(0)


@torch.no_grad()
def posterior(vae, images, batch_size: int | None = None, progress: bool = False):
    """Images -> SCALE-scaled posterior (mean, std), each (B, 4, H/8, W/8) float32: z = mean + std * noise."""
    p = _vae_param(vae)
    means, stds = [], []
    for sl in _batches(images.shape[0], batch_size, progress, "encode"):
        dist = vae.encode(images[sl].to(p.device, p.dtype)).latent_dist
        means.append(dist.mean.float() * SCALE)
        stds.append(dist.std.float() * SCALE)
    return torch.cat(means), torch.cat(stds)


@torch.no_grad()
def decode(vae, latents, batch_size: int | None = None, progress: bool = False, clamp: bool = True) -> torch.Tensor:
    """DiT latents -> images: vae.decode(latents / SCALE).

    Args:
        vae: an AutoencoderKL, or a TinyAutoencoder (which takes scaled latents itself).
        latents: (B, 4, h, w), any device and float dtype.
        batch_size: decode this many at a time (None: all at once).
        progress: show a progress bar.
        clamp: clamp to [-1, 1] (the decoder can overshoot slightly).
    Returns:
        (B, 3, 8h, 8w) float32 images on the VAE's device ((B, 1, 4h, 4w) for the Fashion-MNIST autoencoder).
    """
    p = _vae_param(vae)
    out = []
    for sl in _batches(latents.shape[0], batch_size, progress, "decode"):
        if isinstance(vae, TinyAutoencoder):
            x = vae.decode(latents[sl].to(p.device), clamp=False)
        else:
            x = vae.decode((latents[sl].float() / SCALE).to(p.device, p.dtype)).sample.float()
        out.append(x.clamp(-1, 1) if clamp else x)
    return torch.cat(out) if out else latents.new_zeros(0)


__all__ = ["SCALE", "load_vae", "encode", "decode", "posterior"]


def decoder_for(model, folder=None, device="cpu"):
    """The autoencoder that turns `model`'s samples into images: None for a pixel model (1 or 3 channels); for a
    latent one the AutoencoderKL of `folder`, a lazydit autoencoder file given as `folder`, or (no `folder`) the
    autoencoder the model file names (the embedded default's).

    Raises:
        CheckpointError: a latent model without a decoder, or one of another latent width.
    """
    C = model.config.in_channels
    if not folder and getattr(model, "autoencoder_file", None):
        folder = model.autoencoder_file
        if not Path(folder).is_file():
            raise CheckpointError(f"the model names its autoencoder {Path(folder).name}, which is missing from "
                                  f"{Path(folder).parent}: copy it beside the model file (or pass --vae FILE)")
    if folder and Path(folder).is_file():
        ae = load_autoencoder(folder, device)
        if ae.config.latent_channels != C:
            raise CheckpointError(f"{folder} has {ae.config.latent_channels} latent channels, the model {C}")
        return ae
    if not folder:
        if C not in (1, 3):
            raise CheckpointError(f"the model samples {C}-channel latents: pass --vae VAE_FOLDER (e.g. a local copy of "
                                  "stabilityai/sd-vae-ft-ema) to decode them into images")
        return None
    vae = load_vae(folder, device)
    if vae.config.latent_channels != C:
        raise CheckpointError(f"--vae {folder} has {vae.config.latent_channels} latent channels, the model {C}")
    return vae


def own_decoder(model):
    """A function latents -> images for a model whose file names its autoencoder (the embedded default), on the
    model's device; None for every other model (pixel models, and latent models decoded with an explicit VAE)."""
    path = getattr(model, "autoencoder_file", None)
    if not path:
        return None
    ae = decoder_for(model, path, next(model.parameters()).device)
    return lambda z: decode(ae, z)
