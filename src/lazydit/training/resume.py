"""What `--resume` of every trainer shares: checkpoints written as plain data and read with torch's safe loader
(never unpickling code), the run folder checked before any work, and a checkpoint continued only under the settings
that made it."""

from lazydit.errors import CheckpointError, LazyditError, UsageError


def check_resume_settings(ckpt, saved: dict, cfg, fields, missing_ok: bool = False):
    """Raise UsageError naming every result-shaping setting in which `cfg` differs from the checkpoint's.

    Args:
        ckpt: the checkpoint path (for the message).
        saved: the settings stored in the checkpoint.
        cfg: the config of this call (a dataclass).
        fields: the names of the settings that shape the result.
        missing_ok: settings the checkpoint does not store pass (checkpoints older than the setting).
    """
    diff = [f"{k}: checkpoint {saved.get(k)!r}, now {getattr(cfg, k)!r}" for k in fields
            if (k in saved or not missing_ok) and saved.get(k) != plain(getattr(cfg, k))]  # saved as plain()
    if diff:  # the saved result would record arguments that did not make the state it continues
        raise UsageError(f"--resume: {ckpt} was trained with other settings ({'; '.join(diff)}): resume with "
                         "the same ones, or start a new run with another --out")


# ---------------------------------------------------------------- checkpoints: saved plain, read without unpickling

# the keys each trainer writes into <out>/checkpoint.pt and needs back (pretrain's older checkpoints lack args, log)
CHECKPOINT_KEYS = {
    "train-gates": ("gates", "opt", "gen", "iter", "log", "config"),
    "pretrain": ("model", "ema", "opt", "sampler", "rng", "gen", "step"),
    "train-autoencoder": ("model", "opt", "sampler", "gen", "step", "args", "log"),
}
_SETTINGS_KEY = {"train-gates": "config", "pretrain": "args", "train-autoencoder": "args"}


def _writer(state: dict):
    """The command whose checkpoint `state` looks like (by the keys only that one writes), or None."""
    if "gates" in state:
        return "train-gates"
    if "ema" in state:
        return "pretrain"
    if "model" in state and "sampler" in state:
        return "train-autoencoder"
    return None


def plain(obj, where: str = "checkpoint"):
    """`obj` with paths as str and numpy scalars as Python numbers: what torch's safe loader (weights_only=True)
    reads back (tensors, dicts, lists, tuples, str, numbers, bool, None). Anything else is a TypeError (a bug of the
    trainer that saves it: the checkpoint would not load on --resume).

    Args:
        obj: a training state (nested dicts, lists, tuples, tensors, plain values).
        where: the name of obj in the error message.
    """
    import collections
    import os

    import numpy as np
    import torch

    if obj is None or isinstance(obj, (bool, int, float, str, torch.Tensor, torch.Size)):
        return obj
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, dict) and type(obj) in (dict, collections.OrderedDict):
        return type(obj)((k, plain(v, f"{where}[{k!r}]")) for k, v in obj.items())
    if type(obj) in (list, tuple):
        return type(obj)(plain(v, f"{where}[{i}]") for i, v in enumerate(obj))
    raise TypeError(f"{where} is a {type(obj).__module__}.{type(obj).__qualname__}, which torch's safe loader "
                    "refuses: save tensors and plain data only")


def save_checkpoint(state: dict, path):
    """Write a training state atomically as plain data (`plain`), so that `load_checkpoint` reads it back."""
    from lazydit.files import torch_save_atomic

    torch_save_atomic(plain(state), path)


def load_checkpoint(path, what: str) -> dict:
    """Read `<out>/checkpoint.pt` of trainer `what` with torch's safe loader: tensors and plain data only, never
    an object a pickle would construct (a file with code in it is refused without running any of it).

    Args:
        path: the checkpoint file.
        what: the command that writes it: "train-gates", "pretrain" or "train-autoencoder".
    Returns:
        The training state, with every key that trainer writes.
    Raises:
        CheckpointError: one line naming the file and what to do, for a file that holds other objects (refused
            for safety), a truncated or corrupt one, or a torch file that is not a `what` checkpoint.
    """
    import pickle
    import warnings
    from pathlib import Path

    import torch

    path = Path(path)
    redo = f"delete it, or start a new run with another --out (lazydit {what} without --resume)"
    try:
        with warnings.catch_warnings():  # torch warns about the pickle protocol of foreign files: the error says it
            warnings.simplefilter("ignore")
            state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "GLOBAL" in str(e) or _bare_pickle(path):  # a class or function to call (never called), or a pickle
            # torch.save did not write (its files are zip archives): refused before anything in it is built
            raise CheckpointError(
                f"--resume: {path} holds objects other than tensors and plain data, which a lazydit checkpoint never "
                f"does: refused for safety (nothing in it was run); {redo}") from e
        raise CheckpointError(f"--resume: {path} is not a checkpoint torch can read safely (truncated, corrupt or "
                              f"another format; nothing in it was run): {redo}") from e
    except (IsADirectoryError, PermissionError) as e:
        raise CheckpointError(f"--resume: cannot read {path} ({e.strerror}): {redo}") from e
    except Exception as e:  # a truncated zip (RuntimeError), an empty file (EOFError), random bytes, ...
        raise CheckpointError(f"--resume: {path} is truncated or corrupt ({type(e).__name__}), not a readable "
                              f"{what} checkpoint: {redo}") from e
    if not isinstance(state, dict):
        raise CheckpointError(f"--resume: {path} holds a {type(state).__name__}, not a {what} checkpoint: {redo}")
    other = _writer(state)
    if other is not None and other != what:
        raise CheckpointError(f"--resume: {path} is not a {what} checkpoint (`lazydit {other}` wrote it): {redo}")
    missing = [k for k in CHECKPOINT_KEYS[what] if k not in state]
    if missing:
        raise CheckpointError(f"--resume: {path} is not a {what} checkpoint (it lacks {', '.join(missing)}): {redo}")
    settings = state.get(_SETTINGS_KEY[what], {})
    if not isinstance(settings, dict) or not isinstance(state["log"] if "log" in state else [], list):
        raise CheckpointError(f"--resume: {path} is not a {what} checkpoint (its settings or log are no dict and "
                              f"list): {redo}")
    return state


def _bare_pickle(path) -> bool:
    """The file is a pickle of protocol 2 or more outside a zip archive (not what torch.save writes)."""
    import zipfile

    try:
        with open(path, "rb") as f:
            return f.read(1) == b"\x80" and not zipfile.is_zipfile(path)
    except OSError:
        return False


class restoring:
    """`with restoring(path):` around the load_state_dict calls of a resume: a state that does not fit this run
    (other shapes, a damaged entry) becomes one CheckpointError naming the file, not a traceback."""

    def __init__(self, path):
        self.path = path

    def __enter__(self):
        return self

    def __exit__(self, kind, e, tb):
        if kind is None or isinstance(e, LazyditError) or not issubclass(kind, (RuntimeError, KeyError, TypeError,
                                                                                 ValueError, IndexError)):
            return False
        detail = "; ".join(line.strip() for line in str(e).splitlines() if line.strip())
        raise CheckpointError(f"--resume: {self.path} does not fit this run ({type(e).__name__}: {detail}): resume "
                              "with the model and settings that wrote it, or start a new run with another --out") from e


def check_run_folder(out, resume: bool):
    """Refuse a run folder a trainer cannot use, before any data work: `out` (or a folder above it) is a file, or
    --resume finds no checkpoint file in it.

    Args:
        out: the run folder (--out).
        resume: --resume was given.
    Raises:
        UsageError: out is not a folder, or --resume has nothing to continue.
        CheckpointError: out/checkpoint.pt is not a file.
    """
    from pathlib import Path

    if out is None:
        if resume:
            raise UsageError("--resume needs --out, the run folder that holds checkpoint.pt")
        return
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} is a file, not a run folder: give a folder (it holds checkpoint.pt and the "
                         "results)")
    above = out.parent
    while not above.exists():
        above = above.parent
    if not above.is_dir():
        raise UsageError(f"--out {out}: {above} is a file, not a folder")
    ckpt = out / "checkpoint.pt"
    if resume and ckpt.exists() and not ckpt.is_file():
        raise CheckpointError(f"--resume: {ckpt} is not a file: remove it, or start a new run with another --out")
    if resume and not ckpt.exists():
        raise UsageError(f"--resume: no checkpoint at {ckpt}: drop --resume to start a new run there, or give the "
                         "--out of the run to continue")
