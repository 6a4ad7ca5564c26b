"""Any model lazydit runs, by kind: the shipped default, a DiT file, a Large-DiT folder or a diffusers folder.

This sits above the model files (`lazydit.models`), the shipped assets and the diffusers wrappers it chooses from.
"""

import json
import re
from pathlib import Path

from lazydit.errors import CheckpointError
from lazydit.models.checkpoint import load_dit, read_state_dict


MODEL_KINDS = ("'default' (the shipped Fashion-MNIST DiT), a DiT file (.pt / .pth released or training checkpoint, "
               "lazydit .safetensors), a Large-DiT checkpoint folder (consolidated_ema.00-of-01.pth + model_args.pth) "
               "or a diffusers DiT (a DiTPipeline folder, its transformer/ folder, or a .safetensors beside its "
               "config.json)")


def load_model(spec, *, name: str | None = None, image_size: int | None = None, overrides: dict | None = None,
               device="cpu", captions=None):
    """Any model lazydit runs, by kind: the shipped default, a DiT file or a Large-DiT folder.

    Args:
        spec: "default"; a DiT file (a released `DiT-XL-2-256x256.pt`, whose name gives its config; a DiT
            `train.py` checkpoint or flat state dict, with `name`; a lazydit .safetensors, which carries its
            config); or a Large-DiT folder (or its model_args.pth / consolidated*.pth).
        name: zoo name for files without a config (`DiT-XL/2`; Large-DiT: only without model_args.pth).
        image_size: image size of a latent model (latent = size / 8), for files without a config.
        overrides: more config fields for files without a config.
        device: where the model goes.
        captions: a text-conditional diffusers transformer (PixArt) only: a file of caption embeddings (see
            `lazydit.diffusers.load_captions`), which become its labels.
    Returns:
        The model in eval mode.
    Raises:
        CheckpointError: the path is not a model of a known kind, or does not fit the config.
    """
    from lazydit.models.large_dit import ARGS_FILE, EMA_FILE, MODEL_FILE

    overrides = dict(overrides or {})
    if image_size:
        if image_size % 8:
            raise CheckpointError(f"image size {image_size} is not a multiple of 8 (the VAE's factor)")
        overrides["input_size"] = image_size // 8
    if spec in (None, "default"):
        if captions is not None:
            raise CheckpointError("--captions is for a text-conditional diffusers model (a PixArt pipeline or "
                                  "transformer folder), not the shipped class-conditional model")
        from lazydit.assets import default_model

        return default_model(device)
    path = Path(spec)
    diffusers_folder = _diffusers_folder(path)
    if diffusers_folder is not None:
        return _load_diffusers(diffusers_folder, device, captions)
    if captions is not None:
        raise CheckpointError("--captions is for a text-conditional diffusers model (a PixArt pipeline or "
                              f"transformer folder), not {spec}")
    if path.is_dir() or path.name in (ARGS_FILE, EMA_FILE, MODEL_FILE) or (
            path.suffix == ".pth" and (path.parent / ARGS_FILE).is_file()):
        return _load_large(path.parent if path.name == ARGS_FILE else path, name, image_size, overrides, device)
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or folder; a model is {MODEL_KINDS}")
    if path.suffix not in (".pt", ".pth", ".safetensors"):
        raise CheckpointError(f"{path}: not a model file; a model is {MODEL_KINDS}")
    released = re.fullmatch(r"DiT-(S|B|L|XL)-([248])-(\d+)x\3\.pt", path.name)  # DiT-XL-2-512x512.pt
    if name is None and released:
        name = f"DiT-{released[1]}/{released[2]}"
        overrides.setdefault("input_size", int(released[3]) // 8)
    if name is None and path.suffix != ".safetensors":
        read_state_dict(path)  # a file that is no checkpoint at all says so, not that it lacks a config
        raise CheckpointError(f"{path} carries no model config: pass --model-name (e.g. DiT-XL/2) and --image-size "
                              "(256 or 512)")
    return load_dit(path, name, **overrides).to(device)


def _diffusers_folder(path: Path):
    """The diffusers transformer folder `path` names (a pipeline folder, its transformer/, or a weights file beside
    a diffusers config.json), or None."""
    for folder in (path / "transformer", path, path.parent if path.is_file() else None):
        if folder is None or not (folder / "config.json").is_file():
            continue
        try:
            cfg = json.loads((folder / "config.json").read_text())
        except (OSError, ValueError):
            continue
        if str(cfg.get("_class_name", "")).endswith("Transformer2DModel"):
            return folder
    return None


def _load_diffusers(folder: Path, device, captions=None):
    """A diffusers transformer folder behind lazydit's model interface: `DiffusersDiT`, or `DiffusersPixArt` with
    the caption labels of `captions`."""
    cls = json.loads((folder / "config.json").read_text())["_class_name"]
    if cls not in ("DiTTransformer2DModel", "PixArtTransformer2DModel"):
        raise CheckpointError(f"{folder}: a {cls}; lazydit runs diffusers' DiTTransformer2DModel and "
                              "PixArtTransformer2DModel")
    if (cls == "PixArtTransformer2DModel") != (captions is not None):
        raise CheckpointError(f"{folder}: a {cls}: " + ("text-conditional, pass --captions FILE (caption embeddings)"
                                                        if captions is None else "class-conditional, drop --captions"))
    try:
        import diffusers

        from lazydit.models.diffusers_dit import CaptionBank, DiffusersDiT, DiffusersPixArt, load_captions
    except ImportError as e:
        raise CheckpointError(f"{folder} is a diffusers model: pip install diffusers") from e
    try:
        tr = getattr(diffusers, cls).from_pretrained(str(folder), local_files_only=True).to(device).eval()
    except (OSError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"{folder}: not a loadable diffusers {cls} ({type(e).__name__}: {e})") from e
    if captions is None:
        return DiffusersDiT(tr)
    return DiffusersPixArt(tr, CaptionBank(**load_captions(captions, device)))


def _load_large(path: Path, name, image_size, overrides, device):
    """A Large-DiT from a checkpoint folder or a file in one; image_size must agree with model_args.pth."""
    from lazydit.models.large_dit import ARGS_FILE, EMA_FILE, MODEL_FILE, load_large_dit, read_model_args

    folder = path if path.is_dir() else path.parent
    if path.is_dir() and not any((path / f).is_file() for f in (EMA_FILE, MODEL_FILE)):
        raise CheckpointError(f"{path}: a folder without a Large-DiT checkpoint ({EMA_FILE} or {MODEL_FILE}); a model "
                              f"is {MODEL_KINDS}")
    if image_size and (folder / ARGS_FILE).is_file():
        saved = read_model_args(folder / ARGS_FILE).get("image_size")
        if saved is not None and int(saved) != image_size:
            raise CheckpointError(f"{path}: a {saved}px Large-DiT (model_args.pth), not {image_size}px: drop "
                                  "--image-size")
    return load_large_dit(path, name=name, device=device, **overrides)


__all__ = ["load_model", "MODEL_KINDS"]
