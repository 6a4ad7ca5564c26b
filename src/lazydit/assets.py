"""The embedded default shipped inside the package (docs/embedded.md): a latent Fashion-MNIST DiT
(DiT-FMNIST-Latent), the small autoencoder it decodes with (`default_autoencoder`), and its gate sets."""

from pathlib import Path

from lazydit.models.checkpoint import load_dit
from lazydit.errors import GateMismatchError
from lazydit.lazy import LazyGates

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


def default_gates(steps: int, device="cpu", kind: str = "reference") -> LazyGates:
    """A shipped gate set of the embedded default.

    Args:
        steps: T, the sampling steps the gates were trained for.
        device: where the gates go.
        kind: which set (SHIPPED_GATES): "reference" (the paper's recipe; T = 10, 20, 40, 50), "lookahead" (T = 50),
            "forecast" (a skipped module receives the first-order extrapolation of its last two computed outputs;
            T = 10, 20, 50), "every-forecast" (gates on every step, trained on their own skip chains, with forecast
            reuse, so lazy ratios past 50%; T = 20, 50).
    Returns:
        LazyGates, calibrated (their threshold is stored in the file).
    """
    if kind not in SHIPPED_GATES:
        raise GateMismatchError(f"no shipped gates of kind {kind!r}: the kinds are {', '.join(SHIPPED_GATES)}")
    shipped = SHIPPED_GATES[kind]
    if steps not in shipped:
        what = "gates" if kind == "reference" else f"{kind} gates"
        raise GateMismatchError(f"shipped {what} exist for T in {shipped}, not {steps}: train your own with "
                                f"`lazydit train-gates --steps {steps}{TRAIN_FLAGS[kind]}`")
    path = gates_path(steps, kind)
    if not path.is_file():
        raise _missing(path)
    return LazyGates.load(path).to(device)


def shipped_kind(spec: str) -> str | None:
    """The kind a `--gates` value names ('default' -> 'reference', 'default-<kind>' -> kind), None for a file."""
    if spec == "default":
        return "reference"
    if spec.startswith("default-") and spec[len("default-"):] in SHIPPED_GATES:
        return spec[len("default-"):]
    return None


def resolve_gates(spec: str, steps: int, device="cpu") -> LazyGates:
    """A gate file, or 'default' / 'default-<kind>' (SHIPPED_GATES, e.g. default-lookahead): a shipped set for T."""
    kind = shipped_kind(spec)
    if kind is not None:
        return default_gates(steps, device, kind)
    return LazyGates.load(spec).to(device)
