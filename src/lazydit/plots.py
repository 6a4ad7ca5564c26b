"""Plots: the layer x step laziness heat map (the paper's Figure 4), one panel per branch (MHSA and FFN side by side
for DiT); training loss curves."""

import numpy as np

from lazydit.files import savefig_atomic


BRANCH_TITLES = {"attn": "MHSA", "cross": "cross-attention", "mlp": "FFN"}


def laziness_heatmap(per_step_layer_branch, path, title: str = "", kinds=("attn", "mlp")):
    """Write a PNG heat map of the lazy ratio per layer (rows) and sampling step (columns, first step left), one panel
    per branch.

    Args:
        per_step_layer_branch: (T, L, nb) nested list or array of lazy ratios (LazyStats.ratio((0, 1, 2))).
        path: output PNG.
        title: figure title.
        kinds: the branch kinds, in order (DiT: attn, mlp; PixArt: attn, cross, mlp).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    r = np.asarray(per_step_layer_branch, dtype=float)[::-1]  # sampling order: k = T-1 first
    T, L, nb = r.shape
    # constrained layout: the figure title gets its own row above the panel titles (they overlapped at small T)
    # and panels at least 1.6 inches wide, so that their axis labels do not run into each other
    fig, axes = plt.subplots(1, nb, figsize=(max(2 + 0.12 * T * nb, 1.2 + 1.6 * nb), 1.2 + 0.25 * L), dpi=130,
                             sharey=True, layout="constrained")
    names = [BRANCH_TITLES.get(k, k) for k in kinds] if len(kinds) == nb else [f"branch {b}" for b in range(nb)]
    for ax, b, name in zip(np.atleast_1d(axes), range(nb), names):
        im = ax.imshow(r[:, :, b].T, aspect="auto", cmap="viridis", vmin=0, vmax=1, origin="lower",
                       extent=(0.5, T + 0.5, -0.5, L - 0.5))
        ax.set_title(f"{name}: {r[:, :, b].mean():.0%} lazy", fontsize=9)
        ax.set_xlabel("sampling step")
    np.atleast_1d(axes)[0].set_ylabel("layer")
    fig.colorbar(im, ax=axes, fraction=0.03, label="lazy ratio")
    if title:
        fig.suptitle(title, fontsize=10)
    savefig_atomic(fig, path, bbox_inches="tight")
    plt.close(fig)


def loss_curves(curves, path, title: str = "", smooth: int = 100):
    """Training losses against optimiser steps, one panel per curve, raw and as a running mean.

    Args:
        curves: list of (label, steps, losses) with steps and losses sequences of one length.
        path: PNG to write (atomically).
        title: figure title.
        smooth: window of the running mean, in steps.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(curves), figsize=(4.8 * len(curves), 3.4), dpi=120, squeeze=False)
    for ax, (label, steps, losses) in zip(axes[0], curves):
        steps, losses = np.asarray(steps), np.asarray(losses, dtype=float)
        ax.plot(steps, losses, color="tab:blue", alpha=0.25, lw=0.6)
        if len(losses) >= smooth:
            run = np.convolve(losses, np.ones(smooth) / smooth, mode="valid")
            ax.plot(steps[smooth - 1 :], run, color="tab:blue", lw=1.5, label=f"mean of {smooth} steps")
            ax.legend(fontsize=8)
            ax.set_ylim(0, np.percentile(losses, 99) * 1.1)
        ax.set_xlabel("optimiser step")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    savefig_atomic(fig, path)
    plt.close(fig)
