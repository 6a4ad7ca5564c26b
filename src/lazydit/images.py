"""Images: tensors in [-1, 1] to uint8, PNG grids, and ADM-format .npz sample batches."""

from pathlib import Path

import numpy as np
import torch
from PIL import Image


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
    """Save (B, C, H, W) samples in [-1, 1] as a PNG grid."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    make_grid(to_uint8(x), nrow, scale=scale).save(path)


def save_npz(x: torch.Tensor | np.ndarray, path, labels=None):
    """Save samples as an ADM-evaluator batch: arr_0 (N, H, W, C) uint8 (and arr_1 labels when given)."""
    arr = x if isinstance(x, np.ndarray) else to_uint8(x)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    if labels is None:
        np.savez(path, arr_0=arr)
    else:
        np.savez(path, arr_0=arr, arr_1=np.asarray(labels))
