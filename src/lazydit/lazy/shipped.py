"""The gate sets shipped with the embedded default, by name: `default_gates(T, kind=...)`, and `resolve_gates` for
what `--gates` and `lazy:gates=` take (a file, or 'default' / 'default-<kind>')."""

from lazydit.assets import SHIPPED_GATES, TRAIN_FLAGS, _missing, gates_path
from lazydit.errors import GateMismatchError
from lazydit.lazy.gates import LazyGates


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
