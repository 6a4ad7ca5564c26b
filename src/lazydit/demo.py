"""`lazydit demo`: the shipped Fashion-MNIST model sampled with DDIM-50, DDIM-25 and Lazy-50, side by side."""

from pathlib import Path

import torch

from lazydit.assets import default_model
from lazydit.lazy import policy_for
from lazydit.lazy.shipped import default_gates
from lazydit.data.vae import own_decoder
from lazydit.files import savefig_atomic
from lazydit.images import make_grid, save_grid, to_uint8
from lazydit.pipeline import class_grid_labels, sample
from lazydit.plots import laziness_heatmap


def run_demo(out="lazydit-demo", per_class: int = 4, cfg_scale: float = 2.0, seed: int = 0, device="cpu",
             progress: bool = True, kind: str = "reference") -> list:
    """Sample the same 10-class grid three ways and write PNG grids.

    Args:
        out: output folder (ddim50.png, ddim25.png, lazy50.png, lazy50_heatmap.png, compare.png).
        per_class: samples per class (grid rows).
        cfg_scale: guidance scale.
        seed: initial noise seed, shared by the three samplers.
        device: torch device.
        kind: which shipped T=50 gates the Lazy-50 row samples with (lazydit.assets.SHIPPED_GATES).
    Returns:
        list of report rows (dicts with sampler, steps, lazy_ratio, tmacs, gmacs, seconds, png).
    """
    out = Path(out)
    model = default_model(device)
    gates = default_gates(50, device, kind)
    decode = own_decoder(model) or (lambda x: x)  # the latent default's autoencoder
    y = class_grid_labels(model.config.num_classes, per_class, device)
    noise = torch.randn(len(y), model.config.in_channels, model.config.input_size, model.config.input_size,
                        generator=torch.Generator().manual_seed(seed)).to(device)
    sample(model, y[:2], 2, cfg_scale=cfg_scale, x=noise[:2], progress=False)  # warm-up
    runs = [("DDIM-50", 50, None), ("DDIM-25", 25, None), ("Lazy-50", 50, policy_for(gates))]
    rows, grids = [], []
    for name, steps, g in runs:
        x, rep = sample(model, y, steps, policy=g, cfg_scale=cfg_scale, x=noise, progress=progress, name=name)
        x = decode(x)
        png = out / f"{name.lower().replace('-', '')}.png"
        save_grid(x, png, nrow=model.config.num_classes, scale=3)
        grids.append((rep, to_uint8(x)))
        rows.append({**rep.row(), "png": str(png)})
        if g is not None:
            laziness_heatmap(rep.stats["per_step_layer_branch"], out / f"{png.stem}_heatmap.png",
                             title=f"{name}: where the gates skip (lazy ratio {rep.lazy_ratio:.0%})")
    compare_figure(grids, model.config.num_classes, out / "compare.png")
    return rows


def compare_figure(grids, nrow, path):
    """One PNG with the samplers' grids side by side, titled with steps, lazy ratio and cost."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(grids), figsize=(4.6 * len(grids), 2.6), dpi=130)
    for ax, (rep, imgs) in zip(axes, grids):
        ax.imshow(make_grid(imgs, nrow), cmap="gray", vmin=0, vmax=255, interpolation="nearest")
        ax.set_title(f"{rep.name}: lazy {rep.lazy_ratio:.0%}, {rep.tmacs * 1e3:.2f} GMACs, {rep.seconds:.1f} s",
                     fontsize=9)
        ax.axis("off")
    fig.tight_layout()
    savefig_atomic(fig, path)
    plt.close(fig)
