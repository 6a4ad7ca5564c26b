"""lazydit on Hugging Face diffusers: DiT and PixArt transformers and their pipelines. The transformers' blocks and
the model wrappers are `lazydit.models.diffusers_dit` (re-exported here); this module adds pipelines, schedulers and
converters.

- diffusers' `BasicTransformerBlock` (the blocks of `DiTTransformer2DModel` and `PixArtTransformer2DModel`) is in the
  block registry: branches `attn1` (self-attention), `attn2` (cross-attention, PixArt) and `ff`, hooked where the
  block calls them. Every caching policy attaches; policies that plan ahead (look-ahead gates, FORA, ...) decide
  before the step as usual, but a skipped branch still pays for its norm and modulation (the block's own forward
  builds them), and the block-level residual caches (FBCache, TeaCache) work as on lazydit's models.
- `DiffusersDiT` puts a `DiTTransformer2DModel` behind lazydit's model interface (`forward(x, t, y)`, a `DiTConfig`,
  `blocks`), so every lazydit tool runs on it: the samplers, `train_gates` (data or data-free), calibration, `eval`,
  `compare`. Its blocks are the transformer's own: gates trained through it attach to the pipeline's transformer.
- `DiffusersPixArt` does the same for a `PixArtTransformer2DModel`, text conditioning as caption labels: a
  `CaptionBank` of caption embeddings (precomputed with the pipeline's text encoder, or given as tensors) and the
  negative prompt as the null label. Gates train data-free on the model's own trajectories for those captions.
- `enable_lazy(pipe, gates)` / `disable_lazy(pipe)` attach to a pipeline's transformer (`DiTPipeline`, the PixArt
  pipelines). Gates are keyed by the timesteps they were trained on: lazydit's respacing is diffusers' DDIM with
  `timestep_spacing="linspace"`; for another scheduler or spacing train on `scheduler_timesteps(scheduler, T)`
  (`GateTrainConfig(timesteps=...)`). A call at another timestep raises, naming both schedules.
- `to_diffusers(dit)` / `from_diffusers(transformer)`: converters between lazydit's DiT and `DiTTransformer2DModel`
  (diffusers' own key mapping). The two do not compute the same function: diffusers embeds the timestep with
  `downscale_freq_shift=1` (frequencies exp(-ln(10^4) i / (128 - 1)), the reference divides by 128) and normalises
  the FFN input with eps 1e-5 (the reference: 1e-6); the outputs differ by ~1% relative. `to_diffusers(dit,
  reference_exact=True)` builds the transformer with `norm_eps=1e-6` and sets every block's
  `time_proj.downscale_freq_shift = 0`: then it computes the reference function (the second patch is an attribute,
  not in the config: reapply it with `make_reference_exact(transformer)` after `from_pretrained`).
"""

import copy
import json
from pathlib import Path

import torch

from lazydit.errors import LazyditError, UsageError
from lazydit.lazy import apply_lazy
from lazydit.models.diffusers_dit import (CaptionBank, DiffusersDiT, DiffusersPixArt, dit_config_of,  # noqa: F401
                                          load_captions, wrap)
from lazydit.models.dit import DiT

try:
    from diffusers import DiTTransformer2DModel
except ImportError as e:  # pragma: no cover - diffusers is an optional dependency
    raise ImportError("lazydit.diffusers needs the diffusers package: pip install diffusers") from e


# ---------------------------------------------------------------- pipelines


def scheduler_timesteps(scheduler, steps: int) -> list:
    """The T ascending timesteps a diffusers scheduler runs the model at for `steps` inference steps (train gates
    for them with `GateTrainConfig(timesteps=..., schedule=schedule_name(scheduler))`)."""
    s = copy.deepcopy(scheduler)
    s.set_timesteps(steps)
    ts = sorted({int(t) for t in s.timesteps})
    if len(ts) != steps:
        raise UsageError(f"{type(scheduler).__name__} runs {len(s.timesteps)} model calls at {len(ts)} distinct "
                         f"timesteps for {steps} steps: gates need one call per timestep")
    return ts


def load_scheduler(folder):
    """A diffusers scheduler from a local folder: a pipeline folder (its `scheduler/`) or a scheduler folder.

    Args:
        folder: the folder (str or Path); nothing is downloaded.
    Returns:
        The scheduler, built by the diffusers class its `scheduler_config.json` names (`_class_name`).
    Raises:
        LazyditError: no `scheduler_config.json` there, or a class diffusers does not have. The message starts with
            `folder` as given.
    """
    import diffusers

    path = Path(folder)
    path = path / "scheduler" if (path / "scheduler" / "scheduler_config.json").is_file() else path
    cfg_file = path / "scheduler_config.json"
    if not cfg_file.is_file():
        raise LazyditError(f"{folder}: no scheduler_config.json (a pipeline folder or its scheduler/ folder)")
    name = json.loads(cfg_file.read_text()).get("_class_name", "")
    cls = getattr(diffusers, name, None)
    if cls is None:
        raise LazyditError(f"{folder}: unknown diffusers scheduler {name!r}")
    return cls.from_pretrained(str(path), local_files_only=True)


def schedule_name(scheduler, steps: int | None = None) -> str:
    """A scheduler and its spacing in words, e.g. "DDIMScheduler, timestep_spacing='leading', 10 steps"."""
    spacing = scheduler.config.get("timestep_spacing")
    n = steps if steps is not None else (len(scheduler.timesteps) if scheduler.timesteps is not None else None)
    return (f"{type(scheduler).__name__}" + (f", timestep_spacing={spacing!r}" if spacing else "")
            + (f", {n} steps" if n else ""))


def enable_lazy(pipe, gates, config=None):
    """Attach LazyDiT gates (or any caching policy) to a diffusers pipeline's transformer.

    Args:
        pipe: a `DiTPipeline` or PixArt pipeline (anything with `.transformer` and `.scheduler`).
        gates: LazyGates (trained for the pipeline's scheduler timesteps), a Policy, or a `lazydit tune` recipe
            (`lazydit.load_recipe(folder)`): its calibrated policy, built for the pipeline's transformer (call the
            pipeline with num_inference_steps=recipe.steps and guidance_scale=recipe.cfg_scale).
        config: LazyConfig of the gates.
    Returns:
        the LazyHandle (`.stats()`, `.decisions`); state resets at every pipeline call's first step.
    Raises:
        UsageError: a policy is already enabled on this pipeline; a recipe tuned on other weights, for another
            sampler than DDIM, without a caching policy, or whose timesteps the pipeline's scheduler does not run.
    """
    if getattr(pipe, "_lazy_handle", None) is not None:
        raise UsageError("lazy sampling is already enabled on this pipeline: disable_lazy(pipe) first")
    if isinstance(getattr(gates, "doc", None), dict) and gates.doc.get("format") == "lazydit-recipe":
        gates = _recipe_policy(pipe, gates)  # a `lazydit.tuning.Recipe` (duck-typed: tuning sits above this layer)
    handle = apply_lazy(pipe.transformer, gates, config)
    handle.run.caller = lambda: f"the pipeline's {schedule_name(pipe.scheduler)}"
    pipe._lazy_handle = handle
    return handle


def _denoiser(transformer):
    """lazydit's view of a pipeline's transformer, enough to build a policy for it: DiT as `DiffusersDiT`, PixArt
    as `DiffusersPixArt` over a one-caption placeholder bank (a policy reads the blocks and sizes, not captions)."""
    from diffusers import PixArtTransformer2DModel

    if isinstance(transformer, PixArtTransformer2DModel):
        width = transformer.config.caption_channels
        return DiffusersPixArt(transformer, CaptionBank(torch.zeros(1, 1, width), negative=torch.zeros(1, width)))
    return DiffusersDiT(transformer)


def _recipe_policy(pipe, recipe):
    """The policy of a tune recipe for a pipeline's transformer, after checking that the pipeline samples what the
    recipe was tuned for."""
    if recipe.sampler != "ddim":
        raise UsageError(f"the recipe samples with {recipe.sampler}-{recipe.steps}: a pipeline takes DDIM recipes "
                         "only (tune with a DDIM winner, or sample with `lazydit sample --recipe`)")
    if type(pipe.scheduler).__name__ != "DDIMScheduler":
        raise UsageError(f"the recipe is for DDIM; the pipeline runs {schedule_name(pipe.scheduler)}: give it a "
                         "DDIMScheduler")
    policy = recipe.policy(_denoiser(pipe.transformer))  # refuses other weights
    if policy is None:
        raise UsageError(f"the recipe is plain {recipe.config}: no caching to enable; call the pipeline with "
                         f"num_inference_steps={recipe.steps}")
    have = scheduler_timesteps(pipe.scheduler, recipe.steps)
    if list(have) != list(policy.timesteps):
        raise UsageError(f"the recipe's policy runs at {policy.schedule_name()} ({list(policy.timesteps)[:4]}...), "
                         f"the pipeline's {schedule_name(pipe.scheduler, recipe.steps)} at {have[:4]}...: use "
                         "timestep_spacing='linspace'")
    return policy


def disable_lazy(pipe):
    """Detach what `enable_lazy` attached: the pipeline's transformer is the bare model again."""
    handle = pipe.__dict__.pop("_lazy_handle", None)
    if handle is not None:
        handle.remove()


# ---------------------------------------------------------------- converters


def _block_keys(i: int) -> dict:
    """lazydit DiT key -> diffusers DiTTransformer2DModel key(s) of block i (qkv splits in three)."""
    b, d = f"blocks.{i}.", f"transformer_blocks.{i}."
    keys = {b + "adaLN_modulation.1." + p: d + "norm1.linear." + p for p in ("weight", "bias")}
    keys.update({b + "attn.proj." + p: d + "attn1.to_out.0." + p for p in ("weight", "bias")})
    keys.update({b + "mlp.fc1." + p: d + "ff.net.0.proj." + p for p in ("weight", "bias")})
    keys.update({b + "mlp.fc2." + p: d + "ff.net.2." + p for p in ("weight", "bias")})
    return keys


_SHARED = {"t_embedder.mlp.0.": "norm1.emb.timestep_embedder.linear_1.",
           "t_embedder.mlp.2.": "norm1.emb.timestep_embedder.linear_2.",
           "y_embedder.embedding_table.": "norm1.emb.class_embedder.embedding_table."}
_TOP = {"x_embedder.proj.": "pos_embed.proj.", "final_layer.adaLN_modulation.1.": "proj_out_1.",
        "final_layer.linear.": "proj_out_2."}


def make_reference_exact(transformer):
    """Set every block's timestep projection to the reference's frequencies (downscale_freq_shift 0); with
    `norm_eps=1e-6` in its config the transformer then computes lazydit's (the reference) DiT function."""
    for block in transformer.transformer_blocks:
        block.norm1.emb.time_proj.downscale_freq_shift = 0
    return transformer


def to_diffusers(dit: DiT, reference_exact: bool = False):
    """A `DiTTransformer2DModel` with the weights of a lazydit DiT (diffusers' convert_dit_to_diffusers mapping).

    Args:
        dit: a lazydit DiT (class_dropout_prob > 0: diffusers' label table has the null row).
        reference_exact: build with norm_eps 1e-6 and the reference timestep frequencies (see the module docstring);
            False: diffusers' stock DiT (as the released diffusers checkpoints).
    Returns:
        the transformer, in eval mode, on the DiT's device and dtype.
    """
    c = dit.config
    if c.class_dropout_prob <= 0:
        raise UsageError("diffusers' DiT always has the null label row: convert a DiT with class_dropout_prob > 0")
    if c.hidden_size % c.num_heads or int(c.hidden_size * c.mlp_ratio) != 4 * c.hidden_size:
        raise UsageError("diffusers' DiT block has an FFN of 4 D: this DiT's mlp_ratio differs")
    p = next(dit.parameters())
    with torch.device(p.device):
        tr = DiTTransformer2DModel(num_attention_heads=c.num_heads, attention_head_dim=c.hidden_size // c.num_heads,
                                   in_channels=c.in_channels, out_channels=c.out_channels, num_layers=c.depth,
                                   sample_size=c.input_size, patch_size=c.patch_size, num_embeds_ada_norm=c.num_classes,
                                   norm_eps=1e-6 if reference_exact else 1e-5)
    src, dst = dit.state_dict(), {}
    for k, v in src.items():
        for a, b in _TOP.items():
            if k.startswith(a):
                dst[b + k[len(a):]] = v
    for i in range(c.depth):
        for a, b in _block_keys(i).items():
            dst[b] = src[a]
        for part, q in zip(src[f"blocks.{i}.attn.qkv.weight"].chunk(3), ("q", "k", "v")):
            dst[f"transformer_blocks.{i}.attn1.to_{q}.weight"] = part
        for part, q in zip(src[f"blocks.{i}.attn.qkv.bias"].chunk(3), ("q", "k", "v")):
            dst[f"transformer_blocks.{i}.attn1.to_{q}.bias"] = part
        for a, b in _SHARED.items():
            for suffix in ("weight", "bias"):
                if a + suffix in src:
                    dst[f"transformer_blocks.{i}.{b}{suffix}"] = src[a + suffix]
    missing, unexpected = tr.load_state_dict(dst, strict=False)
    missing = [k for k in missing if not k.endswith("pos_embed.pos_embed")]  # a fixed buffer, built alike
    if missing or unexpected:
        raise UsageError(f"conversion to diffusers left keys out: missing {missing[:5]}, unexpected {unexpected[:5]}")
    tr = tr.to(p.dtype).eval()
    return make_reference_exact(tr) if reference_exact else tr


def from_diffusers(transformer) -> DiT:
    """A lazydit DiT with the weights of a `DiTTransformer2DModel` (the inverse mapping; block 0's copy of the
    timestep and label embedders is used, and every block's copy must be the same)."""
    c = dit_config_of(transformer)
    src = transformer.state_dict()
    p = next(transformer.parameters())
    with torch.device(p.device):
        dit = DiT(c)
    dst = {}
    for k, v in src.items():
        for a, b in _TOP.items():
            if k.startswith(b):
                dst[a + k[len(b):]] = v
    for i in range(c.depth):
        for a, b in _block_keys(i).items():
            dst[a] = src[b]
        for kind in ("weight", "bias"):
            dst[f"blocks.{i}.attn.qkv.{kind}"] = torch.cat(
                [src[f"transformer_blocks.{i}.attn1.to_{q}.{kind}"] for q in "qkv"])
        for a, b in _SHARED.items():
            for suffix in ("weight", "bias"):
                key = f"transformer_blocks.{i}.{b}{suffix}"
                if key not in src:
                    continue
                if i == 0:
                    dst[a + suffix] = src[key]
                elif not torch.equal(src[key], dst[a + suffix]):
                    raise UsageError(f"block {i} has its own {b}{suffix}: lazydit's DiT shares one embedder")
    dst["pos_embed"] = dit.pos_embed.detach().clone()  # fixed sin-cos, built alike
    dit.load_state_dict(dst, strict=True)
    return dit.to(p.dtype).eval()


__all__ = ["CaptionBank", "DiffusersDiT", "DiffusersPixArt", "dit_config_of", "load_captions", "wrap",  # models
           "scheduler_timesteps", "schedule_name", "load_scheduler", "enable_lazy", "disable_lazy",
           "make_reference_exact", "to_diffusers", "from_diffusers"]
