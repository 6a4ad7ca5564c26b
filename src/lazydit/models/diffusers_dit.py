"""diffusers' DiT and PixArt transformers as lazydit models: their blocks in the block registry, and wrappers that
put them behind lazydit's model interface (`forward(x, t, y)`, a `DiTConfig`, `blocks`).

- diffusers' `BasicTransformerBlock` (the blocks of `DiTTransformer2DModel` and `PixArtTransformer2DModel`) is in the
  block registry: branches `attn1` (self-attention), `attn2` (cross-attention, PixArt) and `ff`, hooked where the
  block calls them. The registry imports this module when it first meets a diffusers block.
- `DiffusersDiT` wraps a `DiTTransformer2DModel`; its blocks are the transformer's own, so gates trained through it
  attach to the pipeline's transformer.
- `DiffusersPixArt` does the same for a `PixArtTransformer2DModel`, text conditioning as caption labels: a
  `CaptionBank` of caption embeddings and the negative prompt as the null label.

Pipelines (`enable_lazy`), schedulers and the converters to and from lazydit's DiT are `lazydit.diffusers`.
"""

import torch

from lazydit.errors import UsageError
from lazydit.models.dit import DiTConfig
from lazydit.models.registry import BlockSpec, register_block

try:
    from diffusers import DiTTransformer2DModel
    from diffusers.models.attention import BasicTransformerBlock
except ImportError as e:  # pragma: no cover - diffusers is an optional dependency
    raise ImportError("lazydit.models.diffusers_dit needs the diffusers package: pip install diffusers") from e


# ---------------------------------------------------------------- the block registry


def _modulated(block, x, *args, timestep=None, class_labels=None, **kwargs):
    """Block 0's modulated self-attention input (TeaCache's probe), as the block computes it."""
    if block.norm_type == "ada_norm_zero":
        return block.norm1(x, timestep, class_labels, hidden_dtype=x.dtype)[0]
    if block.norm_type == "ada_norm_single":
        shift, scale = (block.scale_shift_table[None] + timestep.reshape(x.shape[0], 6, -1)).chunk(6, dim=1)[:2]
        return block.norm1(x) * (1 + scale) + shift
    raise UsageError(f"TeaCache's probe does not know diffusers' norm_type {block.norm_type!r}")


def _basic_block_spec(block) -> BlockSpec:
    cross = block.attn2 is not None
    return BlockSpec(branches=("attn1", "attn2", "ff") if cross else ("attn1", "ff"), norms=(),
                     kinds=("attn", "cross", "mlp") if cross else ("attn", "mlp"), fused=False, modulated=_modulated)


register_block(BasicTransformerBlock, _basic_block_spec)


# ---------------------------------------------------------------- a diffusers DiT behind lazydit's interface


def dit_config_of(transformer) -> DiTConfig:
    """The lazydit DiTConfig that describes a DiTTransformer2DModel (shapes, classes, learned sigma)."""
    c = transformer.config
    D = c.num_attention_heads * c.attention_head_dim
    ff = transformer.transformer_blocks[0].ff.net[0].proj.out_features
    out = c.out_channels or c.in_channels
    return DiTConfig(input_size=c.sample_size, patch_size=c.patch_size, in_channels=c.in_channels, hidden_size=D,
                     depth=c.num_layers, num_heads=c.num_attention_heads, mlp_ratio=ff / D, class_dropout_prob=0.1,
                     num_classes=c.num_embeds_ada_norm, learn_sigma=out == 2 * c.in_channels)


class DiffusersDiT(torch.nn.Module):
    """A `DiTTransformer2DModel` with lazydit's model interface: forward(x, t, y, force_drop_ids=None) -> (B, C_out,
    H, W), `config` (a DiTConfig), `blocks` (the transformer's own blocks)."""

    def __init__(self, transformer):
        super().__init__()
        if not isinstance(transformer, DiTTransformer2DModel):
            raise UsageError(f"DiffusersDiT wraps a DiTTransformer2DModel, not {type(transformer).__name__}")
        self.transformer = transformer
        self.config = dit_config_of(transformer)
        self.guided_channels = self.config.in_channels  # DiTPipeline guides every latent channel
        self.name = "diffusers:DiTTransformer2DModel"

    @property
    def blocks(self):
        return self.transformer.transformer_blocks

    def forward(self, x, t, y, force_drop_ids=None):
        if force_drop_ids is not None:  # label drop by the null label, as DiT's LabelEmbedder.token_drop
            y = torch.where(force_drop_ids == 1, self.config.num_classes, y)
        return self.transformer(x, timestep=t, class_labels=y).sample


class CaptionBank(torch.nn.Module):
    """Text conditioning as labels: caption embeddings precomputed once with the pipeline's text encoder (or given
    as tensors), indexed by y, with the negative (unconditional) embedding as the null label N."""

    def __init__(self, embeds, mask=None, negative=None, negative_mask=None):
        super().__init__()
        if embeds.dim() != 3:
            raise UsageError(f"caption embeddings are (N, S, D_text), got {tuple(embeds.shape)}")
        N, S = embeds.shape[:2]
        mask = torch.ones(N, S, dtype=torch.long, device=embeds.device) if mask is None else mask
        negative = torch.zeros_like(embeds[0]) if negative is None else negative.reshape(S, -1)
        negative_mask = torch.ones_like(mask[0]) if negative_mask is None else negative_mask.reshape(S)
        self.register_buffer("embeds", torch.cat([embeds, negative[None]]))
        self.register_buffer("mask", torch.cat([mask, negative_mask[None]]))

    def __len__(self):
        return self.embeds.shape[0] - 1


def load_captions(path, device="cpu") -> dict:
    """Caption embeddings from a .safetensors (or torch) file: `embeds` (N, S, D_text), optional `mask` (N, S),
    `negative` (S, D_text) and `negative_mask` (S,); the keyword arguments of `CaptionBank`."""
    from pathlib import Path

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"caption file not found: {path}")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            tensors = load_file(str(path), device=str(device))
        else:
            tensors = torch.load(path, map_location=device, weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file is one message
        raise UsageError(f"{path}: not a caption file ({type(e).__name__}: {e})") from e
    if not isinstance(tensors, dict) or "embeds" not in tensors:
        raise UsageError(f"{path}: a caption file holds 'embeds' (N, S, D_text) and optionally 'mask', 'negative', "
                         "'negative_mask'")
    keys = ("embeds", "mask", "negative", "negative_mask")
    return {k: tensors[k] for k in keys if k in tensors}


class DiffusersPixArt(torch.nn.Module):
    """A `PixArtTransformer2DModel` with lazydit's model interface, text conditioning as caption labels: y indexes
    a `CaptionBank` (y = N: the negative prompt), so lazydit's samplers (with guidance), `train_gates` (data-free:
    the model's own trajectories for the bank's captions), calibration and `compare` run on it unchanged. The
    gates it trains attach to the PixArt pipeline's transformer (`enable_lazy`)."""

    def __init__(self, transformer, captions: CaptionBank):
        super().__init__()
        from diffusers import PixArtTransformer2DModel

        if not isinstance(transformer, PixArtTransformer2DModel):
            raise UsageError(f"DiffusersPixArt wraps a PixArtTransformer2DModel, not {type(transformer).__name__}")
        self.transformer, self.captions = transformer, captions
        c = transformer.config
        D = c.num_attention_heads * c.attention_head_dim
        ff = transformer.transformer_blocks[0].ff.net[0].proj.out_features
        out = c.out_channels or c.in_channels
        self.config = DiTConfig(input_size=c.sample_size, patch_size=c.patch_size, in_channels=c.in_channels,
                                hidden_size=D, depth=c.num_layers, num_heads=c.num_attention_heads, mlp_ratio=ff / D,
                                class_dropout_prob=0.1, num_classes=len(captions),
                                learn_sigma=out == 2 * c.in_channels)
        self.guided_channels = c.in_channels  # the PixArt pipelines guide every latent channel
        self.name = "diffusers:PixArtTransformer2DModel"

    @property
    def blocks(self):
        return self.transformer.transformer_blocks

    def forward(self, x, t, y, force_drop_ids=None):
        if force_drop_ids is not None:  # the negative prompt, as label drop
            y = torch.where(force_drop_ids == 1, len(self.captions), y)
        cond = {"resolution": None, "aspect_ratio": None}
        return self.transformer(x, encoder_hidden_states=self.captions.embeds[y].to(x.dtype), timestep=t,
                                encoder_attention_mask=self.captions.mask[y], added_cond_kwargs=cond).sample


def wrap(model):
    """lazydit's interface for a diffusers DiT (a pipeline, its transformer), or the model itself if it has it."""
    model = getattr(model, "transformer", model)
    return DiffusersDiT(model) if isinstance(model, DiTTransformer2DModel) else model
