"""A small KL autoencoder between Fashion-MNIST images and DiT latents: SD-VAE + DiT in miniature.

The embedded default is a latent DiT, as the paper's models are: images (1, 28, 28) in [-1, 1] are encoded to
latents (4, 14, 14) (a factor-2 autoencoder with 4 channels; SD-VAE has factor 8 at 256x256), the DiT denoises
latents with patch 2 (49 tokens), as DiT-XL/2 does, and the decoder turns its samples into images. Factor 4
(4x7x7 latents) was measured first and rejected: its reconstructions alone score FID 2.9 (docs/embedded.md). As for SD-VAE, latents are
`scale * posterior sample` with `scale` (the metadata's `scale`, the role of DiT's 0.18215) set after training so
that the training latents have unit standard deviation.

`TinyAutoencoder.encode / decode` work on scaled latents; `lazydit.data.vae.decode` accepts this model as well as
diffusers' AutoencoderKL.
"""

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from lazydit.errors import CheckpointError
from lazydit.files import atomic_write


@dataclass
class AutoencoderConfig:
    in_channels: int = 1  # image channels
    latent_channels: int = 4  # C of the latents (the DiT's in_channels)
    width: int = 64  # channels of the inner stages (the 28x28 stage has width / 2)
    downsample: int = 1  # stride-2 stages: latent size = image size / 2**downsample


def _conv(i, o, k=3, s=1):
    return nn.Conv2d(i, o, k, s, padding=(k - 1) // 2 if s == 1 else 1)


class TinyAutoencoder(nn.Module):
    """A KL autoencoder: `encode(x) -> scaled latents`, `decode(z) -> images in [-1, 1]`.

    Args:
        config: AutoencoderConfig.
        scale: latent scale (set after training so that training latents have unit std).
    """

    def __init__(self, config: AutoencoderConfig | None = None, scale: float = 1.0):
        super().__init__()
        self.config = c = config or AutoencoderConfig()
        self.scale = float(scale)
        w, act = c.width, nn.SiLU
        enc = [_conv(c.in_channels, w // 2), act(), _conv(w // 2, w // 2), act()]
        ch = w // 2
        for _ in range(c.downsample):
            enc += [nn.Conv2d(ch, w, 4, 2, 1), act(), _conv(w, w), act()]
            ch = w
        enc += [nn.Conv2d(w, 2 * c.latent_channels, 1)]  # posterior mean and log-variance
        dec = [_conv(c.latent_channels, w), act(), _conv(w, w), act()]
        for i in range(c.downsample):
            o = w if i < c.downsample - 1 else w // 2
            dec += [nn.Upsample(scale_factor=2, mode="nearest"), _conv(w, o), act(), _conv(o, o), act()]
        dec += [_conv(w // 2, c.in_channels)]
        self.encoder, self.decoder = nn.Sequential(*enc), nn.Sequential(*dec)

    @property
    def factor(self) -> int:
        """Image size / latent size."""
        return 2 ** self.config.downsample

    def posterior(self, x):
        """Images -> unscaled posterior (mean, log-variance), each (B, C, H/f, W/f)."""
        mean, logvar = self.encoder(x).chunk(2, dim=1)
        return mean, logvar.clamp(-30.0, 20.0)

    @torch.no_grad()
    def encode(self, x, sample: bool = True, generator: torch.Generator | None = None):
        """Images (B, 1, 28, 28) in [-1, 1] -> scaled latents (B, C, 28/f, 28/f): scale * (mean + std * noise).

        Args:
            x: images, on the autoencoder's device.
            sample: draw from the posterior (False: its mean).
            generator: for the posterior noise (CPU generator).
        Returns:
            Scaled latents, float32.
        """
        mean, logvar = self.posterior(x.to(self.encoder[0].weight.dtype))
        if sample:
            noise = torch.randn(mean.shape, generator=generator).to(mean.device, mean.dtype)
            mean = mean + (0.5 * logvar).exp() * noise
        return mean.float() * self.scale

    def decode(self, z, clamp: bool = True):
        """Scaled latents (B, C, h, w) -> images (B, 1, f h, f w), clamped to [-1, 1] unless clamp=False."""
        x = self.decoder(z.to(self.decoder[0].weight.dtype) / self.scale).float()
        return x.clamp(-1, 1) if clamp else x

    def forward(self, x, generator: torch.Generator | None = None):
        """Training pass: (reconstruction, KL per latent element), posterior sampled."""
        mean, logvar = self.posterior(x)
        noise = torch.randn(mean.shape, generator=generator).to(mean.device, mean.dtype)
        z = mean + (0.5 * logvar).exp() * noise
        kl = 0.5 * (mean.pow(2) + logvar.exp() - 1.0 - logvar)
        return self.decoder(z), kl


def save_autoencoder(ae: TinyAutoencoder, path, extra: dict | None = None):
    """Write `ae` as .safetensors with its config and scale in the metadata (atomically)."""
    from safetensors.torch import save_file

    meta = {"kind": "lazydit-autoencoder", "config": json.dumps(asdict(ae.config)), "scale": repr(ae.scale)}
    meta.update({k: v if isinstance(v, str) else json.dumps(v) for k, v in (extra or {}).items()})
    state = {k: v.detach().contiguous().cpu() for k, v in ae.state_dict().items()}
    atomic_write(Path(path), lambda tmp: save_file(state, tmp, metadata=meta))


def load_autoencoder(path, device="cpu") -> TinyAutoencoder:
    """Load a `save_autoencoder` file strictly (eval mode, frozen).

    Raises:
        CheckpointError: not such a file, or weights that do not fit its config.
    """
    from safetensors import safe_open

    path = Path(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = dict(f.metadata() or {})
            state = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:
        raise CheckpointError(f"{path}: not a readable safetensors file ({type(e).__name__}: {e})") from e
    if meta.get("kind") != "lazydit-autoencoder":
        raise CheckpointError(f"{path}: not a lazydit autoencoder (metadata kind {meta.get('kind')!r})")
    ae = TinyAutoencoder(AutoencoderConfig(**json.loads(meta["config"])), scale=float(meta["scale"]))
    from lazydit.models.checkpoint import load_state_dict_strict

    load_state_dict_strict(ae, state, source=str(path))
    return ae.to(device).eval().requires_grad_(False)
