"""lazydit's caches beside diffusers' own hooks and cache-dit, on the same tiny DiTPipeline (issue: diffusers).

    python experiments/diffusers_hooks.py            # writes docs/diffusers_hooks.md and .json

One random-weight DiTPipeline (12 blocks of width 64, 8x8x4 latents, a tiny VAE), DDIM with linspace spacing, 20
steps, guidance 4.0, 8 class labels, one generator seed: every row samples the same noise. The weights are random,
so the images mean nothing; what the table shows is what each implementation computes: the share of branch
evaluations (self-attention and FFN of every block and step) it skipped, counted the same way for every row (calls
of the attention's query projection and the FFN's first layer, which a skipped branch never makes; for lazydit the
count equals its own statistics), how far its images are from the bare pipeline's (PSNR), and, where two
implementations claim the same rule at the same threshold, how far apart their images are. A row that does not run
says why. cache-dit is optional (pip install cache-dit).
"""

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from lazydit.diffusers import disable_lazy, enable_lazy
from lazydit.files import write_text_atomic
from lazydit.lazy import make_policy

STEPS, SCALE, LABELS = 20, 4.0, [0, 1, 2, 3, 4, 5, 6, 7]
THRESHOLDS = (0.2, 0.4)  # first-block cache thresholds (on this random model 0.05 and 0.08 never skip)


def tiny_pipeline(layers: int = 12):
    from diffusers import AutoencoderKL, DDIMScheduler, DiTPipeline, DiTTransformer2DModel

    torch.manual_seed(0)
    tr = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=32, in_channels=4, out_channels=8,
                               num_layers=layers, sample_size=8, patch_size=2, num_embeds_ada_norm=1000).eval()
    with torch.no_grad():
        for p in tr.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), layers_per_block=1,
                        latent_channels=4, norm_num_groups=4, sample_size=16).eval()
    sched = DDIMScheduler(beta_schedule="linear", beta_start=1e-4, beta_end=0.02, clip_sample=False,
                          timestep_spacing="linspace")
    pipe = DiTPipeline(transformer=tr, vae=vae, scheduler=sched)
    pipe.set_progress_bar_config(disable=True)
    return pipe


class BranchCounter:
    """Counts the branch evaluations that really ran, per pipeline call: calls of each block's attention query
    projection and of its FFN's first layer. A branch that a cache skips (lazydit's hooks, diffusers' hooks or
    cache-dit) never reaches them, while hooks on the branch module itself would fire either way."""

    def __init__(self, pipe):
        self.calls, self.handles = 0, []
        for block in pipe.transformer.transformer_blocks:
            for inner in (block.attn1.to_q, block.ff.net[0]):
                self.handles.append(inner.register_forward_pre_hook(self._hit))

    def _hit(self, *_):
        self.calls += 1

    def remove(self):
        for h in self.handles:
            h.remove()


def run(pipe):
    """Images (N, H, W, 3) in [0, 1] and the share of branch evaluations skipped."""
    counter = BranchCounter(pipe)
    try:
        out = pipe(class_labels=LABELS, guidance_scale=SCALE, generator=torch.Generator().manual_seed(0),
                   num_inference_steps=STEPS, output_type="np").images
    finally:
        counter.remove()
    L = len(pipe.transformer.transformer_blocks)
    return out, 1 - counter.calls / (2 * L * STEPS)


def psnr(a, b):
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(1.0 / mse)


def with_lazydit(pipe, spec, config=None):
    handle = enable_lazy(pipe, make_policy(spec, STEPS, config))
    try:
        out, share = run(pipe)
        assert abs(share - handle.stats().lazy_ratio) < 1e-9  # the counter agrees with lazydit's statistics
        return out, share
    finally:
        disable_lazy(pipe)


def with_diffusers(pipe, apply, config):
    import diffusers.hooks as hooks

    getattr(hooks, apply)(pipe.transformer, getattr(hooks, config[0])(**config[1]))
    return run(pipe)


def with_cache_dit(pipe, **config):
    import cache_dit

    cache_dit.enable_cache(pipe, cache_config=cache_dit.DBCacheConfig(**config))
    try:
        return run(pipe)
    finally:
        cache_dit.disable_cache(pipe)


def main(argv=None):
    from lazydit.lazy import LazyConfig

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--docs", default="docs")
    args = ap.parse_args(argv)
    bare, _ = run(tiny_pipeline())
    rows, ours = [dict(row="bare pipeline", skipped=0.0, psnr=float("inf"))], {}

    def add(name, fn, *a, same_as=None, **kw):
        try:
            out, share = fn(tiny_pipeline(), *a, **kw)
        except Exception as e:  # noqa: BLE001 - a row that cannot run is reported, not hidden
            rows.append(dict(row=name, error=f"{type(e).__name__}: {str(e).splitlines()[0][:120]}"))
            return None
        row = dict(row=name, skipped=share, psnr=psnr(out, bare))
        if same_as is not None:
            row["max_diff_to_lazydit"] = float(np.abs(out - ours[same_as]).max())
        rows.append(row)
        return out

    for th in THRESHOLDS:
        ours[th] = add(f"lazydit fbcache:threshold={th}", with_lazydit, f"fbcache:threshold={th}")
    for th in THRESHOLDS:
        add(f"cache-dit FBCache (DBCacheConfig F1B0, no warm-up), threshold {th}", with_cache_dit, same_as=th,
            Fn_compute_blocks=1, Bn_compute_blocks=0, residual_diff_threshold=th, max_warmup_steps=1)
    add("cache-dit DBCache defaults (F8B0, threshold 0.08, 8 warm-up steps)", with_cache_dit)
    add("diffusers apply_first_block_cache, threshold 0.2", with_diffusers, "apply_first_block_cache",
        ("FirstBlockCacheConfig", dict(threshold=0.2)))
    add("diffusers apply_taylorseer_cache (defaults: interval 5, 3 warm-up steps, order 1)", with_diffusers,
        "apply_taylorseer_cache", ("TaylorSeerCacheConfig", {}))
    add("lazydit taylorseer:interval=5,order=1,warmup=3", with_lazydit, "taylorseer:interval=5,order=1,warmup=3")
    add("diffusers apply_pyramid_attention_broadcast (self-attention every 2nd step, timesteps 100-800)",
        with_diffusers, "apply_pyramid_attention_broadcast",
        ("PyramidAttentionBroadcastConfig", dict(spatial_attention_block_skip_range=2,
                                                 current_timestep_callback=lambda: 500)))
    add("lazydit fora:interval=2, self-attention only", with_lazydit, "fora:interval=2",
        LazyConfig(skippable_kinds=("attn",)))
    add("lazydit fora:interval=2", with_lazydit, "fora:interval=2")
    add("lazydit teacache:threshold=0.3,coefficients=1/0 (raw distance)", with_lazydit,
        "teacache:threshold=0.3,coefficients=1/0")
    intro = __doc__.split("\n\n")[2].replace("\n", " ")
    lines = ["# lazydit beside diffusers' hooks and cache-dit (tiny random DiTPipeline)", "",
             f"Generated by `python experiments/diffusers_hooks.py`. {intro}", "",
             "| row | branch evaluations skipped | PSNR to bare (dB) | max abs diff to lazydit at the same threshold |",
             "|---|---:|---:|---:|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['row']} | does not run: {r['error']} | | |")
            continue
        d = r.get("max_diff_to_lazydit")
        lines.append(f"| {r['row']} | {r['skipped']:.1%} | "
                     f"{'∞' if r['psnr'] == float('inf') else format(r['psnr'], '.1f')} | "
                     f"{'' if d is None else format(d, '.2g')} |")
    same = [r["row"] for r in rows if r.get("max_diff_to_lazydit") == 0.0]
    broken = [r["row"] for r in rows if "error" in r]
    idle = [r["row"] for r in rows if r.get("skipped") == 0.0 and r["row"] != "bare pipeline"]
    lines += ["", "Reading: " + (f"{len(same)} row(s) give exactly lazydit's images at the same threshold ("
                                 + "; ".join(same) + "). " if same else "")
              + (f"Not runnable on DiTPipeline as shipped: {'; '.join(broken)}. " if broken else "")
              + (f"Ran but skipped nothing here: {'; '.join(idle)}." if idle else "")]
    write_text_atomic(Path(args.docs) / "diffusers_hooks.json", json.dumps(rows, indent=1, default=str))
    write_text_atomic(Path(args.docs) / "diffusers_hooks.md", "\n".join(lines) + "\n")
    print("\n".join(lines))
    return rows


if __name__ == "__main__":
    main()
