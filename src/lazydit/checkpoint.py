"""Checkpoints: loading DiT weights strictly (flat state dicts, training checkpoints), atomic writes."""

import argparse
import json
import os
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .models import DiT, DiTConfig, create_model, model_config


class CheckpointError(ValueError):
    """A checkpoint file does not fit the model it is loaded into."""


def atomic_write(path, write_fn):
    """Call write_fn(tmp_path) and rename the result onto path, so an interrupted write never leaves half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write_fn(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600 files; give the usual permissions
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def torch_save_atomic(obj, path):
    atomic_write(path, lambda tmp: torch.save(obj, tmp))


def read_state_dict(path, key: str | None = None) -> dict:
    """Read a DiT state dict from a .pt/.pth (flat, or a training checkpoint: `ema` preferred) or .safetensors."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if path.suffix == ".safetensors":
        return load_file(str(path))
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):  # DiT's train.py stores args as a Namespace
            obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # truncated or foreign files
        raise CheckpointError(f"{path}: cannot be read as a PyTorch checkpoint ({type(e).__name__}: {e})") from e
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
    if "config" in meta:
        cfg = DiTConfig(**{**meta["config"], **overrides})
        model, name = DiT(cfg), meta.get("name") or name
        model.name = name
    elif name is None:
        raise ValueError(f"{path} carries no model config: pass the model name (e.g. --model DiT-XL/2)")
    else:
        model = create_model(name, **overrides)
    load_state_dict_strict(model, read_state_dict(path), source=str(path))
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

    with safe_open(str(path), framework="pt") as f:
        meta = dict(f.metadata() or {})
    out = {}
    for k, v in meta.items():
        try:
            out[k] = json.loads(v)
        except json.JSONDecodeError:
            out[k] = v
    return out


__all__ = ["load_dit", "save_model", "read_state_dict", "load_state_dict_strict", "CheckpointError",
           "atomic_write", "torch_save_atomic", "model_config"]
