"""Resumable sampling into parts: every batch of samples is written atomically to `<out>.parts/`, so an
interrupted run (`lazydit eval`, `lazydit sample-ddp` under torchrun) continues where it stopped. A `config.json` in
the folder records what the parts were made with; parts of another run are never mixed in."""

import json
import shutil
from pathlib import Path

import numpy as np

from lazydit.errors import LazyditError
from lazydit.files import atomic_write


class PartsMismatchError(LazyditError, ValueError):
    """A parts folder holds samples of another run."""


def parts_folder(out) -> Path:
    """The parts folder of an output file: `<out>.parts/`."""
    return Path(str(out) + ".parts")


def remove_parts(out):
    """Remove the parts folder of `out` (nothing if there is none)."""
    shutil.rmtree(parts_folder(out), ignore_errors=True)


class SampleParts:
    """The parts folder of an output file `out`: `<out>.parts/`, with `config.json` and one .npz per batch.

    Args:
        out: the final output (e.g. `s.npz`).
        meta: what shapes the samples (configuration, model and gate fingerprints); JSON-serialisable.
    """

    def __init__(self, out, meta: dict):
        self.folder = parts_folder(out)
        self.meta = json.loads(json.dumps(meta, sort_keys=True))  # tuples -> lists, as read back

    def prepare(self, write: bool = True):
        """Create the folder and record `meta` (write=True: one process does), or check the recorded one.

        Raises:
            PartsMismatchError: the folder holds parts of another run.
        """
        path = self.folder / "config.json"
        if write:
            self.folder.mkdir(parents=True, exist_ok=True)
        if path.exists():
            if json.loads(path.read_text()) != self.meta:
                raise PartsMismatchError(f"{self.folder} holds parts of another run (another configuration, model, "
                                         "gates or world size): delete it or choose another output")
        elif write:
            atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(self.meta, sort_keys=True)))
        return self

    def path(self, name: str) -> Path:
        return self.folder / f"{name}.npz"

    def read(self, name: str):
        """(images, labels, info) of a written part, or None."""
        path = self.path(name)
        if not path.exists():
            return None
        with np.load(path) as f:
            return f["arr_0"], f["arr_1"], json.loads(str(f["info"]))

    def write(self, name: str, images, labels, info: dict):
        """Write one part atomically: images (uint8), labels, and `info` (JSON) about how it was made."""
        path = self.path(name)
        path.parent.mkdir(parents=True, exist_ok=True)

        def write(tmp):
            with open(tmp, "wb") as f:  # a file object: np.savez would append .npz to a path
                np.savez(f, arr_0=images, arr_1=labels, info=np.array(json.dumps(info)))

        atomic_write(path, write)

    def remove(self):
        shutil.rmtree(self.folder, ignore_errors=True)

    def remove_if_empty(self):
        """Remove the folder when it holds no part yet (only config.json): a run that failed before its first part
        leaves nothing behind."""
        if self.folder.is_dir() and not any(self.folder.rglob("*.npz")):
            self.remove()
