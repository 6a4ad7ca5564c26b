"""Lazy variants past the paper's limits against DDIM at equal TMACs, on the embedded default (issue: beyond the
paper): a quality-versus-TMACs frontier.

    python experiments/beyond_paper.py                 # train, calibrate, sample, score; resumable per row
    python experiments/beyond_paper.py --write-only    # the write-up from the finished rows
    python experiments/beyond_paper.py --plan first-look   # the first look's rows (T = 20 only)

Plans:
  frontier    (default) every variant of --variants at every T of --steps and lazy ratio of --ratios (parity
              variants only up to 50%, their ceiling), each against DDIM with round(T (1 - r)) steps, the DDIM row of
              equal TMACs; plus DDIM at every T. Each row also gets its PSNR against a fine reference sampler
              (--fine-ref on the first --fine-ref-samples images of the same labels and noise).
  first-look  the rows of the first look (T = 20: ref, forecast, every, every+fc+df at 50%; every and every+fc+df
              at 70%; every+cap2).

Variants (gates trained here with the same budget: --iters optimiser steps of --batch-size, rho 1e-2, seed 0):
  ref        the shipped reference gates of T (the paper's recipe: data, parity, plain reuse)
  forecast   parity gates trained and sampled with first-order forecast reuse (data recipe)
  forecast+df  the same, trained data-free on the model's own trajectories (no dataset)
  every      gates on every step (no parity), plain reuse (data recipe)
  every+fc+df  every-step gates, first-order forecast, trained data-free on the model's own trajectories
  every+cap2   the `every` gates sampled with at most 2 consecutive skips per module and row (LazyConfig.max_skips)
  every+ro3    every-step gates trained chain-aware (--rollout 3: the 3 steps before each trained one sample with
               the gates' own decisions), sampled with at most 3 consecutive skips (the chains training saw)
  every+fc+ro3 every+ro3 with first-order forecast reuse (trained and sampled with it)
  every+fc+ro6 every+fc+ro3 with a rollout (and skip cap) of 6: runs of 3 skips cap the lazy ratio at 75% (T = 20),
               runs of 6 let it reach 80% and beyond
  every+router+fc+ro3  every+fc+ro3 with Learning-to-Cache's router in place of the gates: one input-independent
               score per step, layer and branch, so decisions are known before the step and a skipped module costs
               no norm, modulation or host sync (the same decision for every row)
Each Lazy row is calibrated to its target lazy ratio on the 40-image class grid (as the paper table), then every
row samples the same --num-samples labels and initial noise (lazydit.evaluation.driver), CFG --cfg, and is scored
with the shipped evaluator. Pairings: each Lazy-T@r against the DDIM row of about the same TMACs, with 95%
paired-bootstrap intervals of the FID difference. Nothing is tuned: one seed, one budget, the same settings for
every row. Writes <docs>/beyond_paper.md, .csv and .json.
"""

import argparse
import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from lazydit.assets import SHIPPED_GATES, default_model, default_model_name
from lazydit.lazy.shipped import default_gates
from lazydit.cpu import tune_allocator
from lazydit.data.sources import gate_training_data
from lazydit.evaluation import rows as row_engine
from lazydit.evaluation.rows import RowSettings, parse_spec
from lazydit.evaluation.fmnist import default_classifier, default_reference
from lazydit.files import savefig_atomic, write_text_atomic
from lazydit.lazy import LazyConfig, LazyGates, apply_lazy, policy_for
from lazydit.pipeline import class_grid_labels
from lazydit.sampling.ddim import ddim_sample
from lazydit.training.gates import RESULT_FIELDS, GateTrainConfig, train_gates
from lazydit.training.trajectories import trajectory_data

VARIANTS = {  # name -> GateTrainConfig fields (None: the shipped reference gates)
    "ref": None,
    "forecast": dict(forecast=1),
    "forecast+df": dict(forecast=1, data_free=True),
    "every": dict(every_step=True),
    "every+fc+df": dict(every_step=True, forecast=1, data_free=True),
    "every+ro3": dict(every_step=True, rollout=3),
    "every+fc+ro3": dict(every_step=True, forecast=1, rollout=3),
    "every+fc+ro6": dict(every_step=True, forecast=1, rollout=6),
    "every+router+fc+ro3": dict(every_step=True, forecast=1, rollout=3, router=True),
}
SAMPLING = {  # variants that sample another variant's gates with a LazyConfig option: name -> (gates, options)
    "every+cap2": ("every", dict(max_skips=2)),
}  # rollout gates (every+ro3, every+fc+ro3) sample with max_skips = their rollout by themselves (lazydit.lazy)


@dataclass(frozen=True)
class Row:
    steps: int
    variant: str | None = None  # None: plain DDIM
    target: float | None = None

    @property
    def name(self) -> str:
        return f"DDIM-{self.steps}" if self.variant is None else \
            f"Lazy[{self.variant}]-{self.steps}@{round(100 * self.target)}"


FIRST_LOOK = (Row(10), *(Row(20, v, 0.5) for v in ("ref", "forecast", "every", "every+fc+df")),  # in run order
              Row(6), Row(20, "every", 0.7), Row(20, "every+fc+df", 0.7), Row(20), Row(20, "every+cap2", 0.5))


def has_parity(variant: str) -> bool:
    """Whether a variant's gates keep the reference parity (odd steps always compute: at most 50% lazy)."""
    variant = SAMPLING[variant][0] if variant in SAMPLING else variant
    return not (VARIANTS[variant] or {}).get("every_step", False)


def partner(row: Row) -> Row:
    """The DDIM row of (about) equal TMACs: round(T (1 - r)) steps."""
    return Row(max(1, round(row.steps * (1 - row.target))))


def plan_rows(args) -> tuple:
    """The rows of --plan, in the order they run (each T's cheapest pairings first)."""
    if args.plan == "first-look":
        return FIRST_LOOK
    lazy = [Row(T, v, r) for T in args.steps for r in args.ratios for v in args.variants
            if r <= 0.5 or not has_parity(v)]
    ddim = sorted({partner(r) for r in lazy} | {Row(T) for T in args.steps}, key=lambda r: r.steps)
    return tuple(ddim) + tuple(lazy)


def plan_pairs(rows) -> tuple:
    """(lazy row, its equal-TMACs DDIM row) for every lazy row of the plan."""
    return tuple((r, partner(r)) for r in rows if r.variant)


def gates_for(row: Row, model, args):
    """The gate set of a row's variant (trained once per variant and T, resumable) and how the row engine names it
    (`gates=`: 'default', 'default-<kind>' for a shipped set, or the trained file)."""
    variant = SAMPLING[row.variant][0] if row.variant in SAMPLING else row.variant
    fields = VARIANTS[variant]
    if fields is None:
        return default_gates(row.steps), "default"
    out = Path(args.run) / f"gates-{variant}-T{row.steps}"
    path = out / "gates.safetensors"
    if path.exists():
        return LazyGates.load(path), str(path)
    cfg = GateTrainConfig(steps=row.steps, iters=args.iters, batch_size=args.batch_size, rho_attn=1e-2,
                          rho_mlp=1e-2, seed=args.seed, out=str(out), ckpt_every=50,
                          resume=(out / "checkpoint.pt").exists(), **fields)
    kind = shipped_match(cfg)
    if kind is not None:
        return default_gates(cfg.steps, kind=kind), "default" if kind == "reference" else f"default-{kind}"
    if cfg.data_free:
        data, source = trajectory_data(model, row.steps, args.batch_size, size=args.pool, cfg_scale=args.cfg,
                                       seed=args.seed, progress=not args.quiet)
    else:
        data, source = gate_training_data(model, args.batch_size, seed=args.seed)  # through a latent model's autoencoder
    return train_gates(model, data, cfg, progress=not args.quiet, extra_meta=source), str(path)


def shipped_equal(cfg: GateTrainConfig):
    """The shipped gate set that `cfg` would train again (`shipped_match`), or None."""
    kind = shipped_match(cfg)
    return None if kind is None else default_gates(cfg.steps, kind=kind)


def shipped_match(cfg: GateTrainConfig):
    """The kind of the shipped gate set that `cfg` would train again, or None: the same fields that shape the gates
    (lazydit.training.gates.RESULT_FIELDS) and iterations, on the same model and data (`forecast` is the shipped kind
    `forecast`, `every+fc+ro3` is `every-forecast`: calibrated here, they give the thresholds of the gates this
    script trained, to every digit). Its threshold is calibrated again for each row like any other."""
    want = {f: getattr(cfg, f) for f in RESULT_FIELDS}
    for kind, steps in SHIPPED_GATES.items():
        if cfg.steps not in steps:
            continue
        have = default_gates(cfg.steps, kind=kind).meta.get("training", {})
        if have.get("final_iter") == cfg.iters and all(have.get(f) == v for f, v in want.items()):
            return kind
    return None


def row_spec(row: Row, gates_file) -> str:
    """The row as a configuration of the row engine: DDIM-T, or the variant's gates (with its sampling options)
    calibrated to the target."""
    if not row.variant:
        return f"ddim-{row.steps}"
    opts = "".join(f",{k}={v}" for k, v in SAMPLING.get(row.variant, (None, {}))[1].items())
    return f"ddim-{row.steps}+lazy:gates={gates_file},target={row.target}{opts}"


def run_row(row: Row, model, extractor, ref, args) -> dict:
    """Sample and score one row on the row engine (its variant's gates trained first, its threshold calibrated)."""
    extra, gates_file = {}, None
    if row.variant:
        gates, gates_file = gates_for(row, model, args)
        extra = dict(variant=row.variant, forecast=gates.meta.get("forecast", 0), parity=gates.parity)
    settings = RowSettings(num_samples=args.num_samples, cfg_scale=args.cfg, seed=args.seed, batch_size=250,
                           micro_batch=16, calib_per_class=4)
    res = row_engine.run_row(parse_spec(row_spec(row, gates_file)), model, extractor, ref, settings,
                             Path(args.run), progress=not args.quiet, name=row.name)
    return {**res, **extra}


def skip_runs(row: Row, res: dict, model, args) -> dict:
    """How deep reuse chains go: the longest run of consecutive skips of every module and row, sampling the
    40-image class grid with the row's gates, threshold and options (mean and max over modules and rows)."""
    gates, _ = gates_for(row, model, args)
    opts = SAMPLING.get(row.variant, (None, {}))[1]
    y = class_grid_labels(model.config.num_classes, 4)
    handle = apply_lazy(model, policy_for(gates, LazyConfig(threshold=res["threshold"], record_decisions=True,
                                                             **opts)))
    try:
        ddim_sample(model, y, row.steps, cfg_scale=args.cfg, seed=args.seed, progress=False)
        skipped = (~handle.decisions).flip(0).float()  # (T, L, 2, B) in sampling order, 1 = skipped
    finally:
        handle.remove()
    run = best = torch.zeros_like(skipped[0])
    for step in skipped:
        run = (run + 1) * step
        best = torch.maximum(best, run)
    return dict(mean=float(best.mean()), max=int(best.max()))


def fine_reference(model, args):
    """The fine reference's images (--fine-ref on the first --fine-ref-samples labels and noises; sampled once,
    resumable, or the paper table's committed copy), or None with --no-fine-ref and none sampled yet."""
    from lazydit.evaluation.rows import RowSettings, parse_spec, reference_samples

    cfg = RowSettings(num_samples=args.num_samples, cfg_scale=args.cfg, seed=args.seed, batch_size=250,
                        micro_batch=16, reference=args.fine_ref, ref_samples=args.fine_ref_samples)
    from lazydit.evaluation.records import mirror, read_committed

    name = f"reference-{parse_spec(args.fine_ref).filename}-n{args.fine_ref_samples}.npz"
    path = Path(args.run) / name
    if read_committed(Path(args.docs) / "paper_tables.json", num_samples=args.num_samples, cfg=args.cfg,
                      seed=args.seed):  # the paper table's, of the same labels and noise
        mirror(path, Path(args.docs) / f"paper_tables_{name}")
    if args.no_fine_ref and not path.exists():
        return None
    return reference_samples(model, cfg, Path(args.run), progress=not args.quiet)  # sampled once, then read


MARKERS = {10: "v", 20: "s", 50: "^"}  # the frontier plot's marker of each T


def frontier_plot(rows: list, path: Path):
    """FID against TMACs: the DDIM curve and one curve per variant and T (over its lazy ratios)."""
    from lazydit.evaluation.compare import frontier_figure

    def curve(r):  # a curve per variant and T: a colour per variant, a marker per T
        v = r.get("variant")
        if not v:
            return dict(r, family="DDIM", method="none")
        return dict(r, family=f"Lazy[{v}]-{r['steps']}", method=v, color_group=v, marker=MARKERS.get(r["steps"], "s"))

    fig = frontier_figure([curve(r) for r in rows], "tmacs", "TMACs per image",
                          "FID vs TMACs on the embedded default (lower left is better)")
    path.parent.mkdir(parents=True, exist_ok=True)
    savefig_atomic(fig, path)


def ddim_fid_at(ddim: list, tmacs: float) -> float | None:
    """FID of the DDIM curve at `tmacs`, linear between the two DDIM rows around it (rows sorted by TMACs); None
    outside the sampled range. A point estimate: the paired interval is for the round(T (1 - r)) partner."""
    for lo, hi in zip(ddim, ddim[1:]):
        if lo["tmacs"] <= tmacs <= hi["tmacs"]:
            w = (tmacs - lo["tmacs"]) / (hi["tmacs"] - lo["tmacs"])
            return lo["fid"] + w * (hi["fid"] - lo["fid"])
    return None


def rows_csv(rows: list) -> str:
    """The table's rows as CSV (one line per row; PSNR and skip runs empty where not measured)."""
    import csv
    import io

    cols = ["sampler", "variant", "steps", "target", "lazy_ratio", "tmacs", "fid", "sfid", "precision", "recall",
            "psnr_vs_ref", "threshold"]
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(cols + ["skip_run_mean", "skip_run_max"])
    for r in rows:
        sr = r.get("skip_runs") or {}
        w.writerow(["" if r.get(c) is None else r[c] for c in cols] + [sr.get("mean", ""), sr.get("max", "")])
    return buf.getvalue()


def command(args, names: list) -> str:
    """The command line that samples the rows `names` (--only where they are not the whole plan)."""
    parts = ["python experiments/beyond_paper.py", f"--plan {args.plan}"]
    if args.plan == "frontier":
        parts += [f"--steps {','.join(map(str, args.steps))}", f"--ratios {','.join(f'{r:g}' for r in args.ratios)}",
                  f"--variants {','.join(args.variants)}"]
    if set(names) != {r.name for r in plan_rows(args)}:
        parts.append(f"--only '{','.join(names)}'")
    if args.fine_ref_samples != 1000:
        parts.append(f"--fine-ref-samples {args.fine_ref_samples}")
    return " ".join(parts)


def committed(args) -> tuple:
    """The rows recorded by earlier runs with this run's samples, guidance, seed, fine reference and gate training
    budget, and their pairings: (name -> record, pair key -> interval), from <docs>/beyond_paper.json. Its DDIM rows
    give way to those of the paper table (<docs>/paper_tables.json: the same labels, noise and settings), which
    carry bootstrap draws (lazydit.evaluation.records) and so pair with new rows."""
    from lazydit.evaluation.records import read_committed

    settings = dict(num_samples=args.num_samples, cfg=args.cfg, seed=args.seed, fine_ref_samples=args.fine_ref_samples)
    own = read_committed(Path(args.docs) / "beyond_paper.json", iters=args.iters, batch_size=args.batch_size,
                         pool=args.pool, **settings)  # gates trained with this budget
    table = read_committed(Path(args.docs) / "paper_tables.json", **settings)
    ddim = {k: v for k, v in table.items() if k.startswith("DDIM-")}
    pairs = json.loads((Path(args.docs) / "beyond_paper.json").read_text())["pairs"] if own else {}
    return {**own, **ddim}, pairs


def write_up(done: dict, args) -> dict:
    """The write-up of the rows sampled under --run (`done`, completed here into records: bootstrap draws, PSNR,
    skip runs) and the committed ones; a pairing of two committed rows without draws keeps its recorded interval."""
    from lazydit.evaluation import records

    run, extractor, ref = Path(args.run), default_classifier(), default_reference()
    model = default_model()
    rows_all = plan_rows(args)
    pairs_all = plan_pairs(rows_all)
    fine = fine_reference(model, args)
    for r in rows_all:
        if r.name not in done:
            continue
        changed = records.complete(done[r.name], run / f"{r.name}.npz", reps=args.bootstrap, seed=args.seed,
                                   fine=fine, extractor=extractor, ref=ref)
        if r.variant and "skip_runs" not in done[r.name]:
            done[r.name]["skip_runs"], changed = skip_runs(r, done[r.name], model, args), True
        if changed:
            write_text_atomic(run / f"{r.name}.json", json.dumps(done[r.name], indent=1))
    recorded, recorded_pairs = committed(args)
    sampled, done = set(done), {**recorded, **done}
    pairs = {}
    for a, b in pairs_all:
        key = f"{a.name} vs {b.name}"
        if a.name not in done or b.name not in done:
            continue
        bs = records.pair(done[a.name], done[b.name], args.bootstrap, args.seed) if args.bootstrap else None
        if bs is None and key in recorded_pairs and not {a.name, b.name} & sampled:
            bs = recorded_pairs[key]  # both rows as recorded: the interval of the run that sampled them
        pairs[key] = bs or dict(delta=done[a.name]["fid"] - done[b.name]["fid"])  # no draws: no interval
    out = dict(plan=args.plan, num_samples=args.num_samples, cfg=args.cfg, seed=args.seed, iters=args.iters,
               batch_size=args.batch_size, pool=args.pool, fine_ref=args.fine_ref,
               fine_ref_samples=args.fine_ref_samples, rows=[done[r.name] for r in rows_all if r.name in done],
               pairs=pairs)
    title = "(first look)" if args.plan == "first-look" else "(frontier)"
    lines = [f"# Beyond the paper: lazy variants against DDIM at equal TMACs {title}", "",
             f"Generated by `{command(args, [r['sampler'] for r in out['rows']])}` on the embedded default "
             f"({default_model_name()}): {args.num_samples:,} samples "
             f"per row, the same labels and noise, CFG {args.cfg}; gates trained with {args.iters} iterations of "
             f"{args.batch_size} (data-free: a pool of {args.pool} trajectories); each Lazy row calibrated to its "
             "target ratio on the 40-image class grid. Variants: `ref` the shipped reference gates; `forecast` "
             "first-order forecast reuse; `every` gates on every step; `fc` forecast, `df` data-free; `cap2` at "
             "most 2 consecutive skips per module and row; `roN` trained chain-aware (`--rollout N`) and sampled "
             "with at most N consecutive skips; `router` Learning-to-Cache's input-independent scores in place of the "
             "gates (one decision per step, layer and branch for every row). Longest skip run: of every module and "
             "row on the class grid, mean / max (how stale a reused output gets). "
             f"PSNR: against {args.fine_ref.upper()} on the first {args.fine_ref_samples:,} images of "
             "the same labels and noise.", "",
             "| row | lazy ratio | TMACs | FID | sFID | precision | recall | PSNR (dB) | longest skip run |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in out["rows"]:
        sr, ps = r.get("skip_runs"), r.get("psnr_vs_ref")
        lines.append(f"| {r['sampler']} | {r['lazy_ratio']:.1%} | {r['tmacs']:.5f} | {r['fid']:.3f} | "
                     f"{r['sfid']:.3f} | {r['precision']:.3f} | {r['recall']:.3f} | "
                     + (f"{ps:.2f} | " if ps is not None else " | ")
                     + (f"{sr['mean']:.2f} / {sr['max']} |" if sr else " |"))
    ddim = sorted((r for r in out["rows"] if not r.get("variant")), key=lambda r: r["tmacs"])
    lines += ["", "| pairing (about equal TMACs) | TMACs ratio | ΔFID [95% paired bootstrap] | ΔFID vs DDIM at equal "
                  "TMACs (interpolated) |", "|---|---:|---:|---:|"]
    for a, b in pairs_all:
        key = f"{a.name} vs {b.name}"
        if key in pairs:
            d, at = pairs[key], ddim_fid_at(ddim, done[a.name]["tmacs"])
            d["vs_interpolated"] = None if at is None else done[a.name]["fid"] - at
            lines.append(f"| {key} | {done[a.name]['tmacs'] / done[b.name]['tmacs']:.3f} | "
                         f"{d['delta']:+.3f}" + (f" [{d['lo']:+.3f}, {d['hi']:+.3f}]" if "lo" in d else "") + " | "
                         + ("" if at is None else f"{d['vs_interpolated']:+.3f}") + " |")
    if args.plan == "frontier" and out["rows"]:
        frontier_plot(out["rows"], Path(args.docs) / "images" / "beyond_paper_frontier.png")
        lines += ["", "![FID vs TMACs](images/beyond_paper_frontier.png)"]
    write_text_atomic(Path(args.docs) / "beyond_paper.csv", rows_csv(out["rows"]))
    write_text_atomic(Path(args.docs) / "beyond_paper.json", json.dumps(out, indent=1))
    write_text_atomic(Path(args.docs) / "beyond_paper.md", "\n".join(lines) + "\n")
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--plan", choices=("frontier", "first-look"), default="frontier")
    ap.add_argument("--steps", type=lambda t: [int(v) for v in t.split(",")], default=[10, 20, 50],
                    help="frontier: T values")
    ap.add_argument("--ratios", type=lambda t: [float(v) for v in t.split(",")], default=[0.2, 0.3, 0.5, 0.7, 0.8],
                    help="frontier: target lazy ratios")
    ap.add_argument("--variants", type=lambda t: t.split(","), default=["forecast", "every+ro3"],
                    help=f"frontier: variants (of {sorted(VARIANTS) + sorted(set(SAMPLING) - set(VARIANTS))})")
    ap.add_argument("--fine-ref", default="ddim-250", help="the fine reference sampler of the PSNR column")
    ap.add_argument("--fine-ref-samples", type=int, default=1000)
    ap.add_argument("--no-fine-ref", action="store_true", help="no PSNR column unless the reference exists")
    ap.add_argument("--num-samples", type=int, default=5000)
    ap.add_argument("--cfg", type=float, default=1.5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--iters", type=int, default=500, help="gate training iterations (every variant)")
    ap.add_argument("--batch-size", type=int, default=64, help="gate training batch (every variant)")
    ap.add_argument("--pool", type=int, default=512, help="trajectories of the data-free variant")
    ap.add_argument("--bootstrap", type=int, default=200)
    ap.add_argument("--run", default="runs/beyond_paper")
    ap.add_argument("--docs", default="docs")
    ap.add_argument("--only", default=None, help="comma-separated row names")
    ap.add_argument("--write-only", action="store_true")
    ap.add_argument("--quiet", action="store_true")
    args = ap.parse_args(argv)
    tune_allocator()
    run = Path(args.run)
    run.mkdir(parents=True, exist_ok=True)
    args.fine_ref_samples = min(args.fine_ref_samples, args.num_samples)  # the first images of the rows' noise
    unknown = [v for v in args.variants if v not in VARIANTS and v not in SAMPLING]
    if unknown:
        ap.error(f"unknown variants {unknown}")
    rows = [r for r in plan_rows(args) if not args.only or r.name in args.only.split(",")]
    if not args.write_only:
        model, extractor, ref = default_model(), default_classifier(), default_reference()
        recorded = committed(args)[0]
        for row in rows:
            path = run / f"{row.name}.json"
            if path.exists() or row.name in recorded:
                continue
            t0 = time.time()
            res = run_row(row, model, extractor, ref, args)
            write_text_atomic(path, json.dumps(res, indent=1))
            print(f"{row.name}: FID {res['fid']:.3f}, lazy {res['lazy_ratio']:.1%} ({time.time() - t0:.0f} s)",
                  flush=True)
    done = {p.stem: json.loads(p.read_text()) for p in run.glob("*.json")}
    done = {k: v for k, v in done.items() if v.get("n") == args.num_samples}
    if done or committed(args)[0]:
        out = write_up(done, args)
        print(f"wrote {args.docs}/beyond_paper.md ({len(out['rows'])} rows)")


if __name__ == "__main__":
    main()
