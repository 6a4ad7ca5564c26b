"""The paper's analyses as figures, on the embedded default.

    python experiments/analysis_figures.py similarity   # consecutive-step cosine similarity per layer and step
    python experiments/analysis_figures.py heatmap      # Figure 4: layer x step laziness, MHSA and FFN
    python experiments/analysis_figures.py agreement    # look-ahead vs reference gate decisions, shipped and at 40%
    python experiments/analysis_figures.py ablation     # MHSA only / FFN only / both: quality vs lazy ratio
    python experiments/analysis_figures.py all

similarity: DDIM-50 (CFG 1.5) on a 40-image class grid with the bare model; for every block's MHSA and FFN the
cosine similarity between its output at step k+1 and at step k (per image, flattened over tokens and channels,
averaged over images): the quantity whose lower bound the paper proves high (Theorem 2), and the reason reusing a
cached output works. Writes docs/images/similarity.png and docs/similarity.json.
heatmap: Lazy-50 with the shipped gates, threshold calibrated to 20% and 40% (--heatmap-targets) at CFG 1.5, the
layer x gated-step lazy ratio on the 40-image grid. Writes docs/images/fig4_heatmap.png and docs/fig4_heatmap.json.
ablation: gates for T=20 trained with a penalty on MHSA only (rho_attn = rho, rho_mlp = 0, only MHSA allowed to
skip), on FFN only, and on both (equal rho, the shipped T=20 gates); each at several calibrated lazy ratios,
scored with `lazydit eval` (--ablation-samples images per point, same labels and noise). Writes
docs/images/ablation.png and docs/ablation.json; trained gates and samples go to --run (resumable).
"""

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from lazydit.assets import default_model
from lazydit.lazy.shipped import default_gates
from lazydit.files import savefig_atomic, write_text_atomic
from lazydit.lazy import LazyConfig, policy_for
from lazydit.pipeline import calibrate_threshold, class_grid_labels, sample
from lazydit.sampling.ddim import ddim_sample

BRANCH_NAMES = ("MHSA", "FFN")


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def similarity(model, args):
    """(T-1, L, 2) mean cosine similarity of each module's output between consecutive sampling steps."""
    y = class_grid_labels(model.config.num_classes, 4)
    outs = {}  # (layer, branch) -> list over steps of (B, N*D)
    hooks = []
    for i, blk in enumerate(model.blocks):
        for b, name in enumerate(("attn", "mlp")):
            hooks.append(getattr(blk, name).register_forward_hook(
                lambda m, a, o, key=(i, b): outs.setdefault(key, []).append(o.detach().flatten(1).float())))
    try:
        ddim_sample(model, y, args.steps, cfg_scale=args.cfg, seed=args.seed, progress=False)
    finally:
        for h in hooks:
            h.remove()
    L, T = len(model.blocks), args.steps
    sim = np.zeros((T - 1, L, 2))
    for (i, b), seq in outs.items():
        for s in range(T - 1):
            sim[s, i, b] = torch.nn.functional.cosine_similarity(seq[s], seq[s + 1], dim=1).mean().item()
    plt = _plt()
    from matplotlib.colors import LogNorm

    gap = np.clip(1 - sim, 1e-6, None)  # 1 - cosine similarity: log scale shows where it departs from 1
    norm = LogNorm(vmin=gap.min(), vmax=gap.max())
    fig, axes = plt.subplots(1, 3, figsize=(15, 3.8), dpi=120, layout="constrained")
    for ax, b in zip(axes[:2], (0, 1)):
        im = ax.imshow(gap[:, :, b].T, aspect="auto", origin="lower", cmap="magma_r", norm=norm,
                       extent=(1.5, T + 0.5, -0.5, L - 0.5))
        ax.set_title(f"{BRANCH_NAMES[b]}: 1 - cos(out at step s-1, out at step s); mean cos {sim[:, :, b].mean():.4f}",
                     fontsize=8)
        ax.set_xlabel("sampling step s (1 = first)")
        ax.set_ylabel("layer")
        fig.colorbar(im, ax=ax, label="1 - cosine similarity")
    for b, style in ((0, "-"), (1, "--")):
        for i in range(L):
            axes[2].plot(range(2, T + 1), gap[:, i, b], style, lw=1, color=plt.cm.viridis(i / max(1, L - 1)),
                         label=f"{BRANCH_NAMES[b]} layer {i}")
    axes[2].set_yscale("log")
    axes[2].set_xlabel("sampling step s")
    axes[2].set_ylabel("1 - cosine similarity")
    axes[2].set_title("per layer (solid MHSA, dashed FFN)", fontsize=8)
    axes[2].legend(fontsize=5, ncol=2)
    fig.suptitle(f"Consecutive-step similarity of module outputs, DDIM-{T}, CFG {args.cfg}, 40 images "
                 f"(min cos {sim.min():.3f})", fontsize=10)
    docs = Path(args.docs)
    savefig_atomic(fig, docs / "images" / "similarity.png", bbox_inches="tight")
    plt.close(fig)
    write_text_atomic(docs / "similarity.json", json.dumps(dict(
        steps=T, cfg=args.cfg, images=len(y), min=float(sim.min()), mean_per_branch=sim.mean((0, 1)).tolist(),
        mean_per_layer_branch=sim.mean(0).tolist(), per_step_layer_branch=sim.round(5).tolist()), indent=1))
    print(f"similarity: min {sim.min():.4f}, mean MHSA {sim[:, :, 0].mean():.4f}, FFN {sim[:, :, 1].mean():.4f}")
    return sim


def heatmap(model, args):
    """Figure 4: which layers and steps go lazy, from the shipped T=50 gates at the --heatmap-targets ratios.

    Only the gated (even) steps are drawn: under the reference parity every odd step computes every module, and at
    a 50% target every gated module skips, so the structure shows below 50%.
    """
    gates = default_gates(50)
    y = class_grid_labels(model.config.num_classes, 4)
    targets = [float(t) for t in args.heatmap_targets.split(",")]
    maps, out = [], dict(cfg=args.cfg, images=len(y), steps=50, rows=[])
    for target in targets:
        th, _ = calibrate_threshold(model, gates, target, y, cfg_scale=args.cfg, seed=args.seed, progress=False)
        _, rep = sample(model, y, 50, policy=policy_for(gates, LazyConfig(threshold=th)), cfg_scale=args.cfg, seed=args.seed,
                        progress=False)
        r = np.asarray(rep.stats["per_step_layer_branch"])[0::2][::-1]  # gated steps k = 48, 46, ..., 0 (order run)
        maps.append((target, th, rep.lazy_ratio, r))
        out["rows"].append(dict(target=target, threshold=th, lazy_ratio=rep.lazy_ratio,
                                per_layer=r.mean(0).tolist(), per_gated_step=r.mean((1, 2)).tolist(),
                                gated_step_layer_branch=r.tolist()))
        print(f"heatmap {target:.0%}: lazy {rep.lazy_ratio:.3f} (threshold {th:.3g}); per layer MHSA "
              f"{r.mean(0)[:, 0].round(2).tolist()}, FFN {r.mean(0)[:, 1].round(2).tolist()}", flush=True)
    plt = _plt()
    L = maps[0][3].shape[1]
    fig, axes = plt.subplots(len(maps), 2, figsize=(10, 0.9 + (0.9 + 0.22 * L) * len(maps)), dpi=130,
                             sharex=True, sharey=True, squeeze=False)
    for row, (target, th, ratio, r) in zip(axes, maps):
        for ax, b in zip(row, (0, 1)):
            im = ax.imshow(r[:, :, b].T, aspect="auto", cmap="viridis", vmin=0, vmax=1, origin="lower",
                           extent=(0.5, r.shape[0] + 0.5, -0.5, L - 0.5))
            ax.set_title(f"{BRANCH_NAMES[b]}, Lazy-50@{target:.0%}: {r[:, :, b].mean() / 2:.1%} of all steps lazy",
                         fontsize=8)
            ax.set_ylabel("layer")
    fig.supxlabel("gated step, in sampling order (the odd steps between them always compute)", fontsize=9)
    fig.colorbar(im, ax=axes, fraction=0.02, label="share of the 80 rows (40 images x CFG) skipped")
    fig.suptitle(f"Layer x step laziness of the shipped T=50 gates (CFG {args.cfg}, 40-image class grid)",
                 fontsize=10)
    savefig_atomic(fig, Path(args.docs) / "images" / "fig4_heatmap.png", bbox_inches="tight")
    plt.close(fig)
    write_text_atomic(Path(args.docs) / "fig4_heatmap.json", json.dumps(out, indent=1))
    return out


def agreement(model, args):
    """How often the look-ahead gates decide like the reference gates (shipped T=50 sets, same noise, 40 images).

    At the shipped thresholds (~48% lazy) almost every gated module skips under both, so the agreement is also
    measured with both sets calibrated to each of --agreement-targets, where the gates have a choice.
    """
    from lazydit.lazy import apply_lazy

    y = class_grid_labels(model.config.num_classes, 4)
    gates = {kind: default_gates(50, kind=kind) for kind in ("reference", "lookahead")}
    settings = ["shipped"] + [float(t) for t in args.agreement_targets.split(",") if t]
    out = dict(cfg=args.cfg, images=len(y), steps=50, settings=[])
    for target in settings:
        dec, ratio, ths = {}, {}, {}
        for kind, g in gates.items():
            th = g.threshold if target == "shipped" else calibrate_threshold(
                model, g, target, y, cfg_scale=args.cfg, seed=args.seed, progress=False)[0]
            with apply_lazy(model, g, LazyConfig(threshold=th, record_decisions=True)) as h:
                ddim_sample(model, y, 50, cfg_scale=args.cfg, seed=args.seed, progress=False)
                dec[kind], ratio[kind] = h.decisions[0::2], h.stats().lazy_ratio  # even (gated) steps
            ths[kind] = th
        same = (dec["reference"] == dec["lookahead"]).double()  # (T/2, L, 2, B)
        row = dict(target=target, threshold=ths, lazy_ratio=ratio, agreement=float(same.mean()),
                   agreement_per_branch=dict(zip(("attn", "mlp"), same.mean((0, 1, 3)).tolist())),
                   agreement_per_layer=same.mean((0, 2, 3)).tolist(),
                   both_skip=float((~dec["reference"] & ~dec["lookahead"]).double().mean()),
                   both_compute=float((dec["reference"] & dec["lookahead"]).double().mean()),
                   only_reference_skips=float((~dec["reference"] & dec["lookahead"]).double().mean()),
                   only_lookahead_skips=float((dec["reference"] & ~dec["lookahead"]).double().mean()))
        out["settings"].append(row)
        print(f"agreement at {target}: {row['agreement']:.4f} of gated decisions equal; lazy ratio reference "
              f"{ratio['reference']:.4f}, look-ahead {ratio['lookahead']:.4f}", flush=True)
    write_text_atomic(Path(args.docs) / "lookahead_agreement.json", json.dumps(out, indent=1))
    return out


def ablation(model, args):
    """Quality vs lazy ratio for MHSA-only, FFN-only and both-branch laziness at T=20."""
    from lazydit.data.sources import gate_training_data
    from lazydit.evaluation.driver import EvalConfig, evaluate_config
    from lazydit.evaluation.fmnist import default_classifier, default_reference
    from lazydit.lazy import LazyGates
    from lazydit.training.gates import GateTrainConfig, train_gates

    T, run = 20, Path(args.run)
    extractor, ref = default_classifier(), default_reference()
    y = class_grid_labels(model.config.num_classes, 4)
    variants = {"MHSA only": (("attn",), (args.rho, 0.0)), "FFN only": (("mlp",), (0.0, args.rho)),
                "both (equal rho)": (("attn", "mlp"), None)}
    targets = {"MHSA only": (0.05, 0.1, 0.15, 0.2), "FFN only": (0.05, 0.1, 0.15, 0.2),
               "both (equal rho)": (0.1, 0.2, 0.3, 0.4)}
    results = {}
    base_cfg = dict(steps=T, cfg_scale=args.cfg, num_samples=args.ablation_samples, batch_size=250, seed=args.seed,
                    micro_batch=16)  # same samples, faster on a CPU
    rows_path = run / "ablation_rows.json"
    done = json.loads(rows_path.read_text()) if rows_path.exists() else {}
    dense = done.get("DDIM-20") or evaluate_config(model, EvalConfig(**base_cfg, name="DDIM-20"), extractor, ref,
                                                   out=run / "DDIM-20.npz", progress=not args.quiet)
    done["DDIM-20"] = dense
    write_text_atomic(rows_path, json.dumps(done, indent=1))  # an interrupted run does not sample it again
    for vname, (branches, rhos) in variants.items():
        if rhos is None:
            gates = default_gates(T)
        else:
            out = run / f"gates_T20_{branches[0]}"
            gfile = out / "gates.safetensors"
            if gfile.exists():
                gates = LazyGates.load(gfile)
            else:
                cfg = GateTrainConfig(steps=T, rho_attn=rhos[0], rho_mlp=rhos[1], out=str(out), ckpt_every=50,
                                      resume=(out / "checkpoint.pt").exists())
                data, _ = gate_training_data(model, cfg.batch_size, seed=cfg.seed)  # latent models: encoded
                gates = train_gates(model, data, cfg, progress=not args.quiet)
        tag = branches[0] if len(branches) == 1 else "both"
        for target in targets[vname]:
            key = f"{vname}@{target}"
            if key not in done:
                th, reached = calibrate_threshold(model, gates, target, y, lazy=LazyConfig(skippable_kinds=branches),
                                                  cfg_scale=args.cfg, seed=args.seed, progress=False)
                ecfg = EvalConfig(**base_cfg, name=key)
                row = evaluate_config(model, ecfg, extractor, ref,
                                      policy=policy_for(gates, LazyConfig(threshold=th, skippable_kinds=branches)),
                                      out=run / f"ablation_{tag}_{target}.npz", progress=not args.quiet)
                done[key] = {**row, "variant": vname, "target": target, "calibration_ratio": reached}
                write_text_atomic(rows_path, json.dumps(done, indent=1))
                print(f"{key}: lazy {row['lazy_ratio']:.3f} FID {row['fid']:.3f}", flush=True)
            results.setdefault(vname, []).append(done[key])
    write_text_atomic(rows_path, json.dumps(done, indent=1))
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8), dpi=120)
    for ax, key, label in zip(axes, ("fid", "sfid"), ("FID", "sFID")):
        for (vname, rows), color in zip(results.items(), ("tab:orange", "tab:green", "tab:red")):
            ax.plot([0] + [r["lazy_ratio"] for r in rows], [dense[key]] + [r[key] for r in rows], "o-",
                    color=color, label=vname)
        ax.set_xlabel("lazy ratio (share of all module evaluations skipped)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"Individual laziness, DDIM-{T}, CFG {args.cfg}, {args.ablation_samples} samples per point "
                 f"(0 = DDIM-{T})", fontsize=10)
    fig.tight_layout()
    savefig_atomic(fig, Path(args.docs) / "images" / "ablation.png")
    plt.close(fig)
    write_text_atomic(Path(args.docs) / "ablation.json", json.dumps(dict(
        steps=T, cfg=args.cfg, samples=args.ablation_samples, rho=args.rho, dense=dense, variants=results), indent=1))
    return results


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("figure", choices=["similarity", "heatmap", "agreement", "ablation", "all"])
    ap.add_argument("--steps", type=int, default=50, help="similarity: DDIM steps")
    ap.add_argument("--cfg", type=float, default=1.5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--heatmap-targets", default="0.2,0.4", help="heatmap: lazy ratios to draw (below 0.5)")
    ap.add_argument("--agreement-targets", default="0.4", help="agreement: calibrated lazy ratios besides "
                    "the shipped thresholds")
    ap.add_argument("--rho", type=float, default=1e-2, help="ablation: the penalty of the lazy branch")
    ap.add_argument("--ablation-samples", type=int, default=1000)
    ap.add_argument("--run", default="runs/analysis")
    ap.add_argument("--docs", default="docs")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--quiet", action="store_true")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    Path(args.run).mkdir(parents=True, exist_ok=True)
    (Path(args.docs) / "images").mkdir(parents=True, exist_ok=True)
    model = default_model()
    for fig in (("similarity", "heatmap", "agreement", "ablation") if args.figure == "all" else (args.figure,)):
        globals()[fig](model, args)


if __name__ == "__main__":
    main()
