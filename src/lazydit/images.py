"""Images: tensors in [-1, 1] to uint8, PNG grids, and ADM-format .npz sample batches."""


import numpy as np
import torch
from PIL import Image

from lazydit.files import atomic_write


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """(B, C, H, W) in [-1, 1] -> (B, H, W, C) uint8, as DiT: clamp(127.5 x + 128, 0, 255)."""
    return torch.clamp(127.5 * x.float() + 128.0, 0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def make_grid(images: np.ndarray, nrow: int, pad: int = 2, scale: int = 1) -> Image.Image:
    """(B, H, W, C) uint8 -> one PIL image with `nrow` images per row."""
    B, H, W, C = images.shape
    ncol = nrow
    nrows = (B + ncol - 1) // ncol
    grid = np.full((nrows * (H + pad) + pad, ncol * (W + pad) + pad, C), 255, dtype=np.uint8)
    for i in range(B):
        r, c = divmod(i, ncol)
        grid[pad + r * (H + pad) : pad + r * (H + pad) + H, pad + c * (W + pad) : pad + c * (W + pad) + W] = images[i]
    img = Image.fromarray(grid[..., 0] if C == 1 else grid)
    if scale != 1:
        img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
    return img


def save_grid(x: torch.Tensor, path, nrow: int, scale: int = 1):
    """Save (B, C, H, W) samples in [-1, 1] as a PNG grid (atomically: a failed write leaves no partial file)."""
    img = make_grid(to_uint8(x), nrow, scale=scale)
    atomic_write(path, lambda tmp: img.save(tmp, format="PNG"))


def save_npz(x: torch.Tensor | np.ndarray, path, labels=None):
    """Save samples as an ADM-evaluator batch: arr_0 (N, H, W, C) uint8 (and arr_1 labels when given)."""
    arr = x if isinstance(x, np.ndarray) else to_uint8(x)
    arrays = {"arr_0": arr} if labels is None else {"arr_0": arr, "arr_1": np.asarray(labels)}

    def write(tmp):
        with open(tmp, "wb") as f:  # a file object: np.savez would append .npz to a temporary name
            np.savez(f, **arrays)

    atomic_write(path, write)  # a failed write (disk full) leaves the previous file or none, never half a file
