"""Checkpoints: loading DiT weights strictly (flat state dicts, training checkpoints, lazydit .safetensors). Loading
any model by kind (the shipped default, DiT files, Large-DiT folders, diffusers folders) is `lazydit.loading`."""

import argparse
import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from lazydit.errors import CheckpointError
from lazydit.files import atomic_write
from lazydit.models.dit import DiT, DiTConfig, create_model, model_config


def read_state_dict(path, key: str | None = None) -> dict:
    """Read a DiT state dict from a .pt/.pth (flat, or a training checkpoint: `ema` preferred) or .safetensors."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if path.suffix == ".safetensors":
        try:
            return load_file(str(path))
        except Exception as e:  # SafetensorError: random bytes, a truncated file
            raise CheckpointError(f"{path}: not a readable .safetensors file ({type(e).__name__}: {e})") from e
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):  # DiT's train.py stores args as a Namespace
            obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # truncated or foreign files
        raise CheckpointError(f"{path}: not a PyTorch checkpoint torch can read safely (truncated, corrupt or another "
                              f"format; {type(e).__name__}): pass a DiT checkpoint (.pt / .pth / .safetensors)") from e
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: expected a state dict, found {type(obj).__name__}")
    if key is not None:
        if key not in obj:
            raise CheckpointError(f"{path}: no entry {key!r} (entries: {sorted(obj)[:10]})")
        return obj[key]
    for k in ("ema", "model"):  # training checkpoints {model, ema, opt, args}: sample from ema
        if k in obj and isinstance(obj[k], dict):
            return obj[k]
    return obj


def load_state_dict_strict(model: torch.nn.Module, state: dict, source: str = "checkpoint"):
    """load_state_dict(strict=True) with one message listing missing, unexpected and mis-shaped keys."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [f"{k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
              for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or shapes:
        def fmt(items):
            return ", ".join(items[:8]) + (f", ... ({len(items)} in all)" if len(items) > 8 else "")
        lines = [f"{source} does not fit the model"]
        if missing:
            lines.append(f"  missing keys: {fmt(missing)}")
        if unexpected:
            lines.append(f"  unexpected keys: {fmt(unexpected)}")
        if shapes:
            lines.append(f"  mis-shaped keys: {fmt(shapes)}")
        raise CheckpointError("\n".join(lines))
    bad = [k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise CheckpointError(f"{source} holds non-finite (NaN or Inf) weights in {', '.join(bad[:8])}"
                              f"{f' and {len(bad) - 8} more' if len(bad) > 8 else ''}: the file is damaged")
    model.load_state_dict(state, strict=True)
    return model


def load_dit(path, name: str | None = None, **overrides) -> DiT:
    """Build a DiT and load weights into it strictly.

    Args:
        path: a released flat state dict (`DiT-XL-2-256x256.pt`), a training checkpoint (`ema` is used), or a
            lazydit `.safetensors` model (whose metadata names its config; `name` may then be None).
        name: zoo name (`"DiT-XL/2"`) when the file carries no config.
        **overrides: DiTConfig fields (e.g. input_size=64 for 512x512).
    Returns:
        The DiT in eval mode.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    meta = read_model_metadata(path) if path.suffix == ".safetensors" else {}
    if str(meta.get("format", "")).startswith("lazydit-gates"):
        raise CheckpointError(f"{path} is a gate file (lazydit train-gates), not a DiT: pass it as --gates, and a DiT "
                              "as --model")
    if meta.get("kind") == "lazydit-autoencoder":
        raise CheckpointError(f"{path} is an autoencoder (lazydit train-autoencoder), not a DiT: pass a DiT as --model "
                              "(its autoencoder goes to --vae, or to --autoencoder when pretraining)")
    if "config" in meta and not isinstance(meta["config"], dict):
        raise CheckpointError(f"{path}: its metadata 'config' is not a JSON object: not a lazydit model file")
    if "config" in meta:
        cfg = DiTConfig(**{**meta["config"], **overrides})
        model, name = DiT(cfg), meta.get("name") or name
        model.name = name
    elif name is None:
        raise CheckpointError(f"{path} carries no model config: pass the zoo name (--model-name DiT-XL/2)")
    else:
        model = create_model(name, **overrides)
    load_state_dict_strict(model, read_state_dict(path), source=str(path))
    if meta.get("autoencoder"):  # a latent model names the autoencoder file beside it that decodes its samples
        model.autoencoder_file = path.parent / meta["autoencoder"]
    return model.eval()


def save_model(model: DiT, path, extra: dict | None = None):
    """Save a DiT as .safetensors with its config (and name) in the metadata."""
    meta = {"config": json.dumps(model.config.__dict__), "name": getattr(model, "name", "") or ""}
    for k, v in (extra or {}).items():
        meta[k] = v if isinstance(v, str) else json.dumps(v)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    atomic_write(path, lambda tmp: save_file(state, tmp, metadata=meta))


def read_model_metadata(path) -> dict:
    """Metadata of a lazydit .safetensors model: {"config": dict, "name": str, ...}."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = dict(f.metadata() or {})
    except Exception as e:  # SafetensorError: random bytes, a truncated file
        raise CheckpointError(f"{path}: not a readable .safetensors file ({type(e).__name__}: {e})") from e
    out = {}
    for k, v in meta.items():
        try:
            out[k] = json.loads(v)
        except json.JSONDecodeError:
            out[k] = v
    return out


__all__ = ["load_dit", "save_model", "read_state_dict", "load_state_dict_strict", "model_config"]
