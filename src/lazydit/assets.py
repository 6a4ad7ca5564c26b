"""The embedded default shipped inside the package (docs/embedded.md): a latent Fashion-MNIST DiT
(DiT-FMNIST-Latent), the small autoencoder it decodes with (`default_autoencoder`), and its gate sets."""

from pathlib import Path

from lazydit.models.checkpoint import load_dit
from lazydit.errors import GateMismatchError
from lazydit.lazy import LazyGates

ASSETS = Path(__file__).parent / "assets"
DEFAULT_MODEL = ASSETS / "fmnist_dit.safetensors"
DEFAULT_AUTOENCODER = ASSETS / "fmnist_autoencoder.safetensors"  # 28x28x1 <-> 4x14x14 latents
SHIPPED_STEPS = (10, 20, 40, 50)  # reference gates
SHIPPED_LOOKAHEAD_STEPS = (50,)  # look-ahead gates


def gates_path(steps: int, lookahead: bool = False) -> Path:
    return ASSETS / f"fmnist_gates_T{steps}{'_lookahead' if lookahead else ''}.safetensors"


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
    are `lazydit.default_gates(T)` for T in SHIPPED_STEPS (look-ahead: `default_gates(50, lookahead=True)`)."""
    return default_model(device)


def default_gates(steps: int, device="cpu", lookahead: bool = False) -> LazyGates:
    """The shipped gate set for T = steps (reference gates: 10, 20, 40 or 50; look-ahead gates: 50)."""
    shipped = SHIPPED_LOOKAHEAD_STEPS if lookahead else SHIPPED_STEPS
    if steps not in shipped:
        kind = "look-ahead gates" if lookahead else "gates"
        raise GateMismatchError(f"shipped {kind} exist for T in {shipped}, not {steps}: train your own with "
                         f"`lazydit train-gates --steps {steps}{' --lookahead' if lookahead else ''}`")
    path = gates_path(steps, lookahead)
    if not path.is_file():
        raise _missing(path)
    return LazyGates.load(path).to(device)


def resolve_gates(spec: str, steps: int, device="cpu") -> LazyGates:
    """A gate file, or 'default' / 'default-lookahead': the shipped reference / look-ahead set for T = steps."""
    if spec in ("default", "default-lookahead"):
        return default_gates(steps, device, lookahead=spec == "default-lookahead")
    return LazyGates.load(spec).to(device)
