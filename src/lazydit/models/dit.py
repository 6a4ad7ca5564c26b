"""DiT: the diffusion transformer of Peebles & Xie (2023), with the reference module names and shapes.

Module names are a contract: a released checkpoint (`DiT-XL-2-256x256.pt`) loads with `strict=True`.
"""

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from lazydit.models.registry import BlockSpec, register_block


@dataclass
class DiTConfig:
    input_size: int = 32  # spatial size of the (latent) input, square
    patch_size: int = 2  # p: tokens are p x p patches, N = (input_size / p)^2
    in_channels: int = 4  # C_in: 4 for SD-VAE latents, 1 for Fashion-MNIST pixels
    hidden_size: int = 1152  # D
    depth: int = 28  # L, number of blocks
    num_heads: int = 16  # attention heads, head dim D / heads
    mlp_ratio: float = 4.0  # FFN hidden width / D
    class_dropout_prob: float = 0.1  # label drop rate in training; > 0 adds the null label row
    num_classes: int = 1000  # the null label is index num_classes
    learn_sigma: bool = True  # C_out = 2 C_in (eps + variance interpolation) when True

    @property
    def out_channels(self) -> int:
        return self.in_channels * 2 if self.learn_sigma else self.in_channels

    @property
    def num_tokens(self) -> int:
        return (self.input_size // self.patch_size) ** 2


# (depth, hidden, heads) per size; the patch size completes the name.
_SIZES = {"XL": (28, 1152, 16), "L": (24, 1024, 16), "B": (12, 768, 12), "S": (12, 384, 6)}
DIT_MODELS = {
    f"DiT-{s}/{p}": dict(depth=d, hidden_size=h, num_heads=nh, patch_size=p)
    for s, (d, h, nh) in _SIZES.items()
    for p in (2, 4, 8)
}
# A class-conditional pixel-space DiT for 28x28 Fashion-MNIST: the embedded default's transformer (below), on pixels
# instead of latents.
DIT_MODELS["DiT-FMNIST"] = dict(
    depth=6, hidden_size=192, num_heads=3, patch_size=4, input_size=28, in_channels=1, num_classes=10,
    learn_sigma=False,
)
# The embedded default (docs/embedded.md): the same transformer on the 4x14x14 latents of a small Fashion-MNIST
# autoencoder (lazydit.models.autoencoder), patch 2 as DiT-XL/2 (49 tokens), guidance on 3 of 4 channels as the
# reference.
DIT_MODELS["DiT-FMNIST-Latent"] = dict(
    depth=6, hidden_size=192, num_heads=3, patch_size=2, input_size=14, in_channels=4, num_classes=10,
    learn_sigma=False,
)
# Image size / latent size of the latent models' autoencoders (`lazydit cost --image-size`): SD-VAE's 8 otherwise.
IMAGE_PER_LATENT = {"DiT-FMNIST-Latent": 2}


def modulate(x, shift, scale):
    """adaLN modulation: x (B, N, D), shift/scale (B, D)."""
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


def timestep_embedding(t, dim, max_period=10000):
    """Sinusoidal embedding of (original, 0..999) timesteps t (B,) -> (B, dim), [cos, sin] order."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t[:, None].float() * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


class TimestepEmbedder(nn.Module):
    """256-d sinusoid -> Linear -> SiLU -> Linear."""

    def __init__(self, hidden_size, frequency_embedding_size=256):
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(frequency_embedding_size, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size)
        )
        self.frequency_embedding_size = frequency_embedding_size

    def forward(self, t):
        return self.mlp(timestep_embedding(t, self.frequency_embedding_size).to(self.mlp[0].weight.dtype))


class LabelEmbedder(nn.Module):
    """Class labels -> vectors; row num_classes is the null label used for classifier-free guidance."""

    def __init__(self, num_classes, hidden_size, dropout_prob):
        super().__init__()
        self.embedding_table = nn.Embedding(num_classes + int(dropout_prob > 0), hidden_size)
        self.num_classes = num_classes
        self.dropout_prob = dropout_prob

    def token_drop(self, labels, force_drop_ids=None):
        """Replace labels by the null label: randomly (rate dropout_prob) or where force_drop_ids == 1."""
        if force_drop_ids is None:
            drop_ids = torch.rand(labels.shape[0], device=labels.device) < self.dropout_prob
        else:
            drop_ids = force_drop_ids == 1
        return torch.where(drop_ids, self.num_classes, labels)

    def forward(self, labels, train, force_drop_ids=None):
        if (train and self.dropout_prob > 0) or force_drop_ids is not None:
            labels = self.token_drop(labels, force_drop_ids)
        return self.embedding_table(labels)


class PatchEmbed(nn.Module):
    """(B, C, H, W) -> (B, N, D) through a p x p stride-p convolution (timm's PatchEmbed keys)."""

    def __init__(self, img_size, patch_size, in_chans, embed_dim):
        super().__init__()
        self.num_patches = (img_size // patch_size) ** 2
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size, bias=True)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)


class Attention(nn.Module):
    """Multi-head self-attention (timm's Attention keys: qkv, proj)."""

    def __init__(self, dim, num_heads):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=True)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # (B, h, N, C/h) each
        x = F.scaled_dot_product_attention(q, k, v)
        return self.proj(x.transpose(1, 2).reshape(B, N, C))


class Mlp(nn.Module):
    """fc1 -> GELU(tanh) -> fc2 (timm's Mlp keys)."""

    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class DiTBlock(nn.Module):
    """adaLN-Zero transformer block."""

    def __init__(self, hidden_size, num_heads, mlp_ratio=4.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(hidden_size, num_heads)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size))

    def forward(self, x, c):
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + gate_msa.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift_msa, scale_msa))
        x = x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))
        return x


register_block(DiTBlock, BlockSpec(branches=("attn", "mlp"), norms=("norm1", "norm2")))


class FinalLayer(nn.Module):
    """LayerNorm -> modulate -> Linear(D, p*p*C_out); adaLN from a condition of width cond_size (default D)."""

    def __init__(self, hidden_size, patch_size, out_channels, cond_size=None):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels, bias=True)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(cond_size or hidden_size, 2 * hidden_size))

    def forward(self, x, c):
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


class ConditionalTransformer(nn.Module):
    """What DiT and Large-DiT share: the config's shape attributes, patch output layout, classifier-free guidance,
    the adaLN-Zero initialisation."""

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.in_channels = config.in_channels
        self.out_channels = config.out_channels
        self.patch_size = config.patch_size
        self.num_heads = config.num_heads

    def zero_adaln(self):
        """adaLN-Zero: every block's modulation and the final layer (modulation and linear) start at zero."""
        for block in self.blocks:
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)
        for lin in (self.final_layer.adaLN_modulation[-1], self.final_layer.linear):
            nn.init.zeros_(lin.weight)
            nn.init.zeros_(lin.bias)

    def unpatchify(self, x):
        """(B, N, p*p*C_out) -> (B, C_out, H, W), features ordered (p, p, C) as the reference."""
        c, p = self.out_channels, self.patch_size
        h = w = int(x.shape[1] ** 0.5)
        x = x.reshape(x.shape[0], h, w, p, p, c)
        x = torch.einsum("nhwpqc->nchpwq", x)
        return x.reshape(x.shape[0], c, h * p, w * p)

    def forward_with_cfg(self, x, t, y, cfg_scale):
        """Classifier-free guidance as the reference: batch [x; x] with labels [y; null] (3 of 4 latent channels)."""
        half = x[: len(x) // 2]
        return combine_cfg(self.forward(torch.cat([half, half]), t, y), self.in_channels, cfg_scale)


class DiT(ConditionalTransformer):
    """Class-conditional diffusion transformer."""

    def __init__(self, config: DiTConfig):
        super().__init__(config)
        D = config.hidden_size
        self.x_embedder = PatchEmbed(config.input_size, config.patch_size, config.in_channels, D)
        self.t_embedder = TimestepEmbedder(D)
        self.y_embedder = LabelEmbedder(config.num_classes, D, config.class_dropout_prob)
        self.pos_embed = nn.Parameter(torch.zeros(1, self.x_embedder.num_patches, D), requires_grad=False)
        self.blocks = nn.ModuleList([DiTBlock(D, config.num_heads, config.mlp_ratio) for _ in range(config.depth)])
        self.final_layer = FinalLayer(D, config.patch_size, self.out_channels)
        self.initialize_weights()

    def initialize_weights(self):
        """The reference initialisation (adaLN-Zero)."""

        def _basic_init(module):
            if isinstance(module, nn.Linear):
                torch.nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.constant_(module.bias, 0)

        self.apply(_basic_init)
        if self.pos_embed.device.type != "meta":
            grid = int(self.x_embedder.num_patches**0.5)
            pos = get_2d_sincos_pos_embed(self.pos_embed.shape[-1], grid)
            self.pos_embed.data.copy_(torch.from_numpy(pos).float().unsqueeze(0))
        w = self.x_embedder.proj.weight.data
        nn.init.xavier_uniform_(w.view([w.shape[0], -1]))
        nn.init.constant_(self.x_embedder.proj.bias, 0)
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        self.zero_adaln()

    def forward(self, x, t, y, force_drop_ids=None):
        """x (B, C, H, W), t (B,) original timesteps, y (B,) labels -> (B, C_out, H, W)."""
        x = self.x_embedder(x) + self.pos_embed  # (B, N, D)
        c = self.t_embedder(t) + self.y_embedder(y, self.training, force_drop_ids)  # (B, D)
        for block in self.blocks:
            x = block(x, c)
        return self.unpatchify(self.final_layer(x, c))


def guided_channels(in_channels):
    """Channels CFG applies to: the reference guides 3 of 4 latent channels; all eps channels otherwise."""
    return 3 if in_channels == 4 else in_channels


def combine_cfg(out, in_channels, cfg_scale, guided: int | None = None):
    """out (2B, C_out, H, W) of [cond; uncond] rows -> eps_u + w (eps_c - eps_u) on the guided channels, both halves
    (`guided`: how many; default the reference's `guided_channels`)."""
    g = guided_channels(in_channels) if guided is None else guided
    eps, rest = out[:, :g], out[:, g:]
    cond, uncond = eps.chunk(2)
    half_eps = uncond + cfg_scale * (cond - uncond)
    return torch.cat([torch.cat([half_eps, half_eps]), rest], dim=1)


def get_2d_sincos_pos_embed(embed_dim, grid_size):
    """(grid_size^2, embed_dim) fixed 2-D sin-cos table (MAE / DiT reference)."""
    grid_h = np.arange(grid_size, dtype=np.float32)
    grid_w = np.arange(grid_size, dtype=np.float32)
    grid = np.stack(np.meshgrid(grid_w, grid_h), axis=0).reshape([2, 1, grid_size, grid_size])
    emb_h = _1d_sincos(embed_dim // 2, grid[0])
    emb_w = _1d_sincos(embed_dim // 2, grid[1])
    return np.concatenate([emb_h, emb_w], axis=1)


def _1d_sincos(embed_dim, pos):
    omega = np.arange(embed_dim // 2, dtype=np.float64) / (embed_dim / 2.0)
    omega = 1.0 / 10000**omega
    out = np.einsum("m,d->md", pos.reshape(-1), omega)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)


def zoo_config(zoo: dict, config_cls, name: str, overrides: dict, kind: str = "DiT"):
    """A config dataclass from a zoo entry with fields overridden; ValueError for unknown names or fields."""
    if name not in zoo:
        raise ValueError(f"unknown {kind} model {name!r}; choose one of {', '.join(zoo)}")
    fields = {**zoo[name], **overrides}
    unknown = set(fields) - set(config_cls.__dataclass_fields__)
    if unknown:
        raise ValueError(f"unknown {kind} config fields: {sorted(unknown)}")
    return config_cls(**fields)


def model_config(name: str, **overrides) -> DiTConfig:
    """The DiTConfig of a zoo entry (`"DiT-XL/2"`), with fields overridden."""
    return zoo_config(DIT_MODELS, DiTConfig, name, overrides)


def image_per_latent(name: str) -> int:
    """Image size / model input size of a zoo model: 1 for pixel models, the autoencoder's factor for latent ones
    (4 input channels: IMAGE_PER_LATENT's entry, else SD-VAE's 8).

    Args:
        name: a key of DIT_MODELS.
    Returns:
        The factor (int).
    """
    return IMAGE_PER_LATENT.get(name, 8) if model_config(name).in_channels == 4 else 1


def config_for_image_size(name: str, image_size: int | None = None, *, what: str = "image size") -> DiTConfig:
    """The DiTConfig of a zoo model sized for `image_size` x `image_size` images (pixels, not latents).

    Args:
        name: a key of DIT_MODELS.
        image_size: the image side; None keeps the zoo entry's input size.
        what: how the message names the size (the CLI passes its flag, `--image-size`).
    Returns:
        The config, `input_size = image_size // image_per_latent(name)`.
    Raises:
        OptionRangeError: `image_size` is not a positive multiple of image_per_latent(name) x patch size (an image
            of whole patches of whole latents).
    """
    from lazydit.errors import OptionRangeError

    cfg = model_config(name)
    factor = image_per_latent(name)
    multiple = factor * cfg.patch_size
    if image_size is None:
        return cfg
    if image_size <= 0 or image_size % multiple:
        raise OptionRangeError(f"{what} {image_size} does not fit {name}: image sizes are multiples of {multiple} "
                               f"(image/latent factor {factor} x patch {cfg.patch_size})")
    return model_config(name, input_size=image_size // factor)


def create_model(name: str, **overrides) -> DiT:
    """Build a zoo model, e.g. `create_model("DiT-XL/2", input_size=64)` for 512x512 images.

    Args:
        name: a key of DIT_MODELS.
        **overrides: DiTConfig fields (input_size, in_channels, num_classes, learn_sigma, ...).
    Returns:
        The DiT, reference-initialised, on the default (or current `torch.device` context) device.
    """
    model = DiT(model_config(name, **overrides))
    model.name = name
    return model
