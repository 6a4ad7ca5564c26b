"""Files that are never half-written (write to a temporary file in the target folder, then rename), and the
fingerprint of weights that resumable outputs record to refuse mixing runs."""

import hashlib
import os
import tempfile
from pathlib import Path

import torch


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


def write_text_atomic(path, text: str):
    """Write a text file (JSON, CSV, markdown) atomically."""
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def savefig_atomic(fig, path, **kwargs):
    """fig.savefig to `path` atomically (the format from the file's suffix, since the temporary name has none)."""
    fmt = Path(path).suffix.lstrip(".") or "png"
    atomic_write(path, lambda tmp: fig.savefig(tmp, format=fmt, **kwargs))


def weights_fingerprint(module) -> str:
    """Short sha256 of a module's state dict (names and bytes, any dtype or device): the same weights, the same
    fingerprint. Reference statistics record their extractor's; resumable sampling records its model's and gates'."""
    h = hashlib.sha256()
    for k, v in sorted(module.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().reshape(-1).contiguous().view(torch.uint8).cpu().numpy().tobytes())
    return h.hexdigest()[:16]
