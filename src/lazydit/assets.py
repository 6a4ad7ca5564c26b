"""The embedded default shipped inside the package (docs/embedded.md): a latent Fashion-MNIST DiT
(DiT-FMNIST-Latent), the small autoencoder it decodes with (`default_autoencoder`), and where its gate sets lie
(loading them by name, `default_gates` / `resolve_gates`, is `lazydit.lazy.shipped`)."""

from pathlib import Path

from lazydit.models.checkpoint import load_dit

ASSETS = Path(__file__).parent / "assets"
DEFAULT_MODEL = ASSETS / "fmnist_dit.safetensors"
DEFAULT_AUTOENCODER = ASSETS / "fmnist_autoencoder.safetensors"  # 28x28x1 <-> 4x14x14 latents
SHIPPED_GATES = {  # kind -> the T values it is shipped for (`--gates default` / `default-<kind>`)
    "reference": (10, 20, 40, 50),  # the paper's recipe (docs/method-notes.md)
    "lookahead": (50,),  # look-ahead gates: decide one step ahead (docs/method-notes.md)
    "forecast": (10, 20, 50),  # first-order forecast reuse (beyond the paper; docs/beyond_paper_notes.md)
    "every-forecast": (20, 50),  # gates on every step, chain-aware (rollout 3), forecast reuse: past 50% (same notes)
}
SHIPPED_STEPS = SHIPPED_GATES["reference"]
TRAIN_FLAGS = {  # kind -> the `lazydit train-gates` options that train it (as scripts/build_embedded.sh does)
    "reference": "", "lookahead": " --lookahead", "forecast": " --forecast 1",
    "every-forecast": " --every-step --forecast 1 --rollout 3",
}


def gates_path(steps: int, kind: str = "reference") -> Path:
    return ASSETS / f"fmnist_gates_T{steps}{'' if kind == 'reference' else '_' + kind}.safetensors"


def _missing(path: Path):
    return FileNotFoundError(
        f"shipped asset {path.name} is missing from {path.parent}: reinstall lazydit, or rebuild it with the "
        "commands in docs/embedded.md"
    )


def default_model(device="cpu"):
    """The shipped EMA Fashion-MNIST DiT (eval mode) on `device`: a latent model (4x14x14) whose samples
    `lazydit.data.vae.own_decoder(model)` turns into 28x28 images (every sampling entry point does so itself)."""
    if not DEFAULT_MODEL.is_file():
        raise _missing(DEFAULT_MODEL)
    model = load_dit(DEFAULT_MODEL)
    if getattr(model, "autoencoder_file", None) and not model.autoencoder_file.is_file():
        raise _missing(model.autoencoder_file)  # a latent default decodes with the autoencoder it names
    return model.to(device)


def default_model_name() -> str:
    """Zoo name of the shipped DiT (`lazydit cost --model default`), read from its file's metadata."""
    from lazydit.models.checkpoint import read_model_metadata

    if not DEFAULT_MODEL.is_file():
        raise _missing(DEFAULT_MODEL)
    return read_model_metadata(DEFAULT_MODEL)["name"]


def default_autoencoder(device="cpu"):
    """The shipped Fashion-MNIST autoencoder (`lazydit.models.autoencoder.TinyAutoencoder`, eval mode, frozen):
    images (B, 1, 28, 28) in [-1, 1] <-> unit-std latents (B, 4, 14, 14), for the shipped latent DiT (DiT-FMNIST-Latent)."""
    from lazydit.models.autoencoder import load_autoencoder

    if not DEFAULT_AUTOENCODER.is_file():
        raise _missing(DEFAULT_AUTOENCODER)
    return load_autoencoder(DEFAULT_AUTOENCODER, device)


def load_default(device="cpu"):
    """The embedded default, ready to sample: the shipped Fashion-MNIST DiT (`lazydit.load_default()`); its gates
    are `lazydit.default_gates(T)` for T in SHIPPED_STEPS (other kinds: `default_gates(T, kind=...)`, SHIPPED_GATES)."""
    return default_model(device)
