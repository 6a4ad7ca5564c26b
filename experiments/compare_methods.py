"""Every method at its best on the embedded default (DiT-FMNIST-Latent), at fixed shares of DDIM-50's TMACs.

    python experiments/compare_methods.py --budgets 0.15        # select on seed 1, then the final rows on seed 0
    python experiments/compare_methods.py --timing              # seconds of every final row: one quiet run
    python experiments/compare_methods.py --write-only          # the write-up from the committed records

Protocol, the same for every family (written down before any row ran):
1. **Grid at a budget B** (a share of DDIM-50's TMACs): every configuration below whose TMACs fit B. Solvers (DDIM,
   DPM-Solver++(2M) and UniPC, each on the reference respacing and on the uniform / trailing / logSNR spacings) at
   the largest T that fits. Static caches at the largest T of STEPS whose measured cost fits, for every option set:
   FORA interval 2-4; TaylorSeer interval 2-6 x order 1-3 x warm-up 1-2; FoCa interval 2-7 x warm-up 2-3; ToCa
   interval 2-5 x fresh ratio 0.07 / 0.15 / 0.3. Calibrated caches (FBCache, TeaCache) at lazy ratios 0.2, 0.4, 0.6,
   0.8: the T of STEPS whose fitting ratio is nearest to each, calibrated to the ratio that fits. LazyDiT: every
   shipped gate set (reference, forecast, every-step forecast, look-ahead) at its T, calibrated to the ratio that
   fits, where the gates reach it. L2C: a router trained here (`--l2c-steps`), calibrated likewise.
2. **Selection on a separate seed**: every grid configuration sampled with seed SELECT_SEED (other labels, noise
   and calibration grid than the reported rows), SELECT_N images, scored by FID against the test split with the
   shipped extractor. The lowest FID of each family is that family's setting at B; ties keep the cheaper.
3. **Final rows** on seed 0, FINAL_N images, the same labels and noise for every row: FID (with 200 bootstrap draws)
   under the shipped extractor and under the second, independently trained one (`fmnist-resnet`); PSNR to DDIM-250
   and FID between the first FINE_N images and DDIM-250's (same noise), with paired bootstrap draws.
4. **The claim rule**: at each budget the best LazyDiT row against the best other row (by FID under the shipped
   extractor): "X beats Y" only where the three paired intervals (FID, FID under the second extractor, FID to
   DDIM-250) exclude 0 with the same sign; otherwise the table says which disagree.
Records (metrics and bootstrap draws, no images) are committed in docs/compare_methods.json, so budgets run in
different sessions pair exactly; the run folder holds the samples and is resumable per row.
"""

import argparse
import json
import math
import platform
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from lazydit.assets import SHIPPED_GATES, default_model
from lazydit.cpu import tune_allocator
from lazydit.errors import UsageError
from lazydit.evaluation import fmnist
from lazydit.evaluation.features import extract_features
from lazydit.evaluation.metrics import (bootstrap_fid_draws, feature_stats, fid_of_samples, frechet_distance,
                                        load_npz_samples, paired_interval, paired_psnr)
from lazydit.evaluation.rows import RowSettings, build_policy, parse_spec, reference_samples, run_row
from lazydit.files import write_text_atomic
from lazydit.models.cost import sampling_macs
from lazydit.pipeline import sample
from lazydit.tuning import GATE_MAX_RATIO, RATIO_MARGIN, ratio_that_fits

BUDGETS = (0.10, 0.15, 0.20, 0.30, 0.50)
STEPS = (4, 5, 6, 7, 8, 9, 10, 12, 14, 16, 18, 20, 25, 30, 40, 50)
SELECT_SEED, SELECT_N = 1, 500
FINAL_N, FINE, FINE_N, REPS = 5000, "ddim-250", 1000, 200
SOLVERS = {"DDIM": ("ddim",), "DPM-Solver++(2M)": ("dpm++2m", "dpm++2m-uniform", "dpm++2m-trailing", "dpm++2m-logsnr"),
           "UniPC": ("unipc", "unipc-uniform", "unipc-trailing", "unipc-logsnr")}
STATIC = {"FORA": [f"fora:interval={i}" for i in (2, 3, 4)],
          "TaylorSeer": [f"taylorseer:interval={i},order={o},warmup={w}" for i in range(2, 7) for o in (1, 2, 3)
                         for w in (1, 2)],
          "FoCa": [f"foca:interval={i},warmup={w}" for i in range(2, 8) for w in (2, 3)],
          "ToCa": [f"toca:interval={i},ratio={r}" for i in (2, 3, 4, 5) for r in (0.07, 0.15, 0.3)]}
CALIBRATED = {"FBCache": "fbcache", "TeaCache": "teacache"}
CALIBRATED_RATIOS = (0.2, 0.4, 0.6, 0.8)
GATES = {"reference": "default", "forecast": "default-forecast", "every-forecast": "default-every-forecast",
         "lookahead": "default-lookahead"}
LAZY = "LazyDiT"  # the family of our own variants (every shipped gate set competes in it)


@dataclass(frozen=True)
class Sizes:
    """Image counts of the protocol (the defaults are the committed run's; tests shrink them)."""

    select_n: int = SELECT_N  # images per selection run (seed SELECT_SEED)
    final_n: int = FINAL_N  # images per final row (seed 0)
    fine_n: int = FINE_N  # DDIM-250 images the distance to the fine sampler uses
    reps: int = REPS  # bootstrap draws
    families: tuple | None = None  # run only these families (None: all)


def probe_macs(model, text: str, cache: dict) -> float:
    """MACs per image of a configuration, measured from its statistics on 2 images (static and token-wise caches)."""
    if text not in cache:
        spec = parse_spec(text)
        policy = build_policy(spec, model)
        _, rep = sample(model, torch.arange(2) % model.config.num_classes, spec.steps, policy=policy, cfg_scale=1.5,
                        seed=0, progress=False, sampler=spec.sampler)
        cache[text] = sampling_macs(model.config, spec.steps, rep.lazy, overhead=policy.overhead_macs(model.config))
    return cache[text]


def grid(model, budget: float, l2c: dict, cache: dict, families=None) -> list:
    """(family, configuration) of every grid point at a budget (see the module docstring), of `families` only when
    given."""
    keep = (lambda fam: True) if families is None else (lambda fam: fam in families)
    cfg = model.config
    cap = budget * sampling_macs(cfg, 50)
    bare = max(T for T in range(1, 51) if sampling_macs(cfg, T) <= cap)
    out = [(fam, f"{s}-{bare}") for fam, samplers in SOLVERS.items() if keep(fam) for s in samplers]
    for fam, methods in STATIC.items():
        for m in methods if keep(fam) else ():  # the cost grows with T: the first T from the top that fits
            T = next((T for T in sorted(STEPS, reverse=True)
                      if T > bare and probe_macs(model, f"ddim-{T}+{m}", cache) <= cap), None)
            if T is not None:
                out.append((fam, f"ddim-{T}+{m}"))

    def fitted(T, method_text):
        ovh = build_policy(parse_spec(f"ddim-{T}+{method_text}"), model).overhead_macs(cfg)
        return math.ceil((ratio_that_fits(cfg, T, ovh, cap) + RATIO_MARGIN) * 100) / 100

    for fam, m in CALIBRATED.items():
        if not keep(fam):
            continue
        chosen = set()
        for r in CALIBRATED_RATIOS:
            T = min((T for T in STEPS if T > bare), key=lambda T: abs(fitted(T, m) - r))
            if T not in chosen and fitted(T, m) <= 0.85:
                chosen.add(T)
                out.append((fam, f"ddim-{T}+{m}:target={fitted(T, m):g}"))
    for kind, name in GATES.items() if keep(LAZY) else ():
        for T in SHIPPED_GATES[kind]:
            r = fitted(T, f"lazy:gates={name}")
            if RATIO_MARGIN + 0.01 < r <= GATE_MAX_RATIO.get(kind, 0.48):
                out.append((LAZY, f"ddim-{T}+lazy:gates={name},target={r:g}"))
    for T, path in l2c.items() if keep("L2C") else ():
        r = fitted(T, f"l2c:router={path}")
        if RATIO_MARGIN + 0.01 < r <= 0.48:
            out.append(("L2C", f"ddim-{T}+l2c:router={path},target={r:g}"))
    return out


def train_router(model, steps: int, run: Path, iters: int, progress: bool) -> Path:
    """A Learning-to-Cache router for T steps (L2C's settings, as for T = 20: lr 1e-3, penalty 5e-6), data-free."""
    from lazydit.training.gates import GateTrainConfig, train_gates
    from lazydit.training.trajectories import trajectory_data

    out = run / f"router-T{steps}"
    if not (out / "gates.safetensors").exists():
        cfg = GateTrainConfig(steps=steps, iters=iters, batch_size=64, out=str(out), ckpt_every=50, router=True,
                              lr=1e-3, rho_attn=5e-6, rho_mlp=5e-6, data_free=True,
                              resume=(out / "checkpoint.pt").exists())
        data, _ = trajectory_data(model, steps, 64, size=512, progress=progress)
        train_gates(model, data, cfg, progress=progress)
    return out / "gates.safetensors"


def _draws_to_fine(feats, fine_feats, reps: int, seed: int) -> np.ndarray:
    """FID(row, fine) of each bootstrap resample of the rows both sets share (same indices for every row)."""
    rng = np.random.default_rng(seed)
    n = len(fine_feats)
    draws = (rng.integers(0, n, n) for _ in range(reps))
    return np.array([fid_of_samples(feats[idx], fine_feats[idx]) for idx in draws])


def score_final(rec: dict, npz: Path, extractors: dict, fine_images, reps: int) -> dict:
    """FID and draws under both extractors, PSNR and FID to the fine sampler (with draws) of a final row."""
    images = load_npz_samples(npz)
    for key, (ext, ref) in extractors.items():
        feats = extract_features(ext, images, progress=False)["pool"]
        mu, sigma = feature_stats(feats)
        rec[f"fid_{key}"] = frechet_distance(mu, sigma, ref["mu"], ref["sigma"])
        rec[f"fid_{key}_draws"] = bootstrap_fid_draws(feats, ref["mu"], ref["sigma"], reps, 0).tolist()
        if key == "fmnist":
            fine = extract_features(ext, fine_images, progress=False)["pool"]
            rec["fid_to_fine"] = fid_of_samples(feats[: len(fine)], fine)
            rec["fid_to_fine_draws"] = _draws_to_fine(feats[: len(fine)], fine, reps, 0).tolist()
    rec["psnr_to_fine"] = paired_psnr(images[: len(fine_images)], fine_images)["psnr"]
    return rec


def _row(path: Path, make, report) -> dict:
    """A row's record: read back from `path`, else made, written atomically and reported (record, seconds)."""
    if path.exists():
        return json.loads(path.read_text())
    t0 = time.time()
    row = make()
    write_text_atomic(path, json.dumps(row, indent=1))
    report(row, time.time() - t0)
    return row


def select(model, budget: float, run: Path, extractor, ref, l2c: dict, cache: dict, sizes: Sizes, progress: bool,
           log) -> dict:
    """Run the grid on the selection seed; the best configuration of each family."""
    st = RowSettings(num_samples=sizes.select_n, seed=SELECT_SEED)
    folder = run / f"select-{budget:g}"
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for fam, text in grid(model, budget, l2c, cache, sizes.families):
        spec = parse_spec(text)

        def make():
            try:
                row = run_row(spec, model, extractor, ref, st, folder, progress)
            except UsageError as e:  # a target out of a method's reach: recorded, not fatal
                return dict(sampler=text, error=f"{type(e).__name__}: {e}")
            return {k: v for k, v in row.items() if k != "fid_draws"}

        row = _row(folder / f"{spec.filename}.json", make,
                   lambda r, s: log(f"select {budget:g} {text}: FID {r.get('fid', float('nan')):.3f} ({s:.0f} s)"))
        rows.append(dict(row, family=fam, config=text))
    cap = budget * sampling_macs(model.config, 50)
    best = {}
    for r in rows:
        if "error" in r or r["tmacs"] * 1e12 > cap * 1.02:  # measured on the selection images: 2% slack
            continue
        b = best.get(r["family"])
        if b is None or (r["fid"], r["tmacs"]) < (b["fid"], b["tmacs"]):
            best[r["family"]] = r
    return dict(grid=rows, best={f: r["config"] for f, r in best.items()})


def final(model, budget: float, chosen: dict, run: Path, extractors: dict, fine_images, sizes: Sizes, progress: bool,
          log) -> list:
    """The final rows (seed 0) of every family's chosen configuration, scored both ways."""
    st = RowSettings(num_samples=sizes.final_n, seed=0, reference=FINE, ref_samples=sizes.fine_n)
    ext, ref = extractors["fmnist"]
    out = []
    for fam, text in chosen.items():
        spec = parse_spec(text)

        def make():
            row = run_row(spec, model, ext, ref, st, run, progress)
            return score_final({k: v for k, v in row.items() if k != "fid_draws"}, run / f"{spec.filename}.npz",
                               extractors, fine_images, sizes.reps)

        row = _row(run / f"{spec.filename}.json", make,
                   lambda r, s: log(f"final {budget:g} {text}: FID {r['fid']:.3f} / {r['fid_resnet']:.3f}, to fine "
                                    f"{r['fid_to_fine']:.3f}, PSNR {r['psnr_to_fine']:.2f} ({s:.0f} s)"))
        out.append(dict(row, family=fam, config=text, budget=budget))
    return out


def time_rows(model, rows: list, repeats: int, batch: int = 16) -> dict:
    """Seconds per image of every final row's configuration (calibrated as its record says), timed together in one
    interleaved run (`lazydit.bench.time_interleaved`) at `batch` images per call."""
    from lazydit.bench import TimedRow, time_interleaved

    timed, seen = [], set()
    for r in rows:
        if r["config"] in seen:
            continue
        seen.add(r["config"])
        spec = parse_spec(r["config"])
        fitted = {"coefficients": r["coefficients"]} if "coefficients" in r else None
        policy = build_policy(spec, model, r.get("threshold") if spec.target is not None else None, fitted=fitted)
        timed.append(TimedRow(r["config"], model, spec.steps, policy, spec.sampler))
    y = torch.arange(batch) % model.config.num_classes
    res = time_interleaved(timed, y, cfg_scale=1.5, repeats=repeats, micro_batch=batch)
    return {name: float(np.median(v["times"])) / batch for name, v in res.items()}


def verdict(a: dict, b: dict) -> dict:
    """a (best LazyDiT) against b (best other): the three paired intervals of (a - b) and the claim they allow."""
    iv = {k: paired_interval(a[f], b[f], a[f + "_draws"], b[f + "_draws"])
          for k, f in (("fmnist", "fid_fmnist"), ("resnet", "fid_resnet"), ("fine", "fid_to_fine"))}
    signs = {k: (1 if v["lo"] > 0 else -1 if v["hi"] < 0 else 0) for k, v in iv.items()}
    if all(s == -1 for s in signs.values()):
        claim = f"{a['config']} beats {b['config']}"
    elif all(s == 1 for s in signs.values()):
        claim = f"{b['config']} beats {a['config']}"
    else:
        claim = "no claim: " + ", ".join(f"{k} {'lower' if s < 0 else 'higher' if s > 0 else 'tie'}"
                                         for k, s in signs.items())
    return dict(intervals=iv, signs=signs, claim=claim)


def write_up(doc: dict, docs: Path, command: str):
    """docs/compare_methods.md / .csv / .json and the two frontier plots from the records."""
    sizes = Sizes(**{k: v for k, v in doc["sizes"].items() if k != "families"})
    from lazydit.evaluation.compare import frontier_figure
    from lazydit.files import savefig_atomic

    rows = doc["rows"]
    fmt = lambda v, f: "" if v is None else format(v, f)  # noqa: E731
    lines = ["# Every method at its best, on the embedded default", "",
             f"Generated by `{command}` (protocol: the docstring of experiments/compare_methods.py). Budgets run: "
             f"{', '.join(f'{b:.0%}' for b in sorted(doc['budgets']))} of DDIM-50's TMACs"
             + (f"; not run yet: {', '.join(f'{b:.0%}' for b in BUDGETS if b not in doc['budgets'])}"
                if set(BUDGETS) - set(doc["budgets"]) else "") + ".", "",
             f"{sizes.final_n:,} samples per row (seed 0: the same labels and noise for every row), CFG 1.5. Each "
             f"family's setting was chosen on seed {SELECT_SEED} ({sizes.select_n:,} images, FID under the shipped "
             "extractor; the "
             "grid is in compare_methods_selection.md). FID: against the 10,000-image test split under the shipped "
             "extractor and under the second one (fmnist-resnet). To DDIM-250: FID between the row's first "
             f"{sizes.fine_n:,} images and DDIM-250's from the same noise, and PSNR to them.", ""]
    for b in sorted(doc["budgets"]):
        rs = sorted((r for r in rows if r["budget"] == b), key=lambda r: r["fid_fmnist"])
        lines += [f"## {b:.0%} of DDIM-50 ({b * doc['ddim50_tmacs']:.5f} TMACs)", "",
                  "| family | configuration | lazy ratio | TMACs | FID | FID (2nd extractor) | FID to DDIM-250 | "
                  "PSNR to DDIM-250 (dB) | s / image |", "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
        for r in rs:
            lines.append(f"| {r['family']} | `{r['config']}` | {r['lazy_ratio']:.1%} | {r['tmacs']:.5f} | "
                         f"{r['fid_fmnist']:.3f} | {r['fid_resnet']:.3f} | {r['fid_to_fine']:.3f} | "
                         f"{r['psnr_to_fine']:.2f} | {fmt(r.get('timed_seconds_per_image'), '.4f')} |")
        v = doc["verdicts"].get(f"{b:g}")
        if v:
            iv = v["intervals"]
            lines += ["", f"Best LazyDiT `{v['lazy']}` − best other `{v['other']}` (paired 95% intervals): FID "
                          f"{iv['fmnist']['delta']:+.3f} [{iv['fmnist']['lo']:+.3f}, {iv['fmnist']['hi']:+.3f}], "
                          f"2nd extractor {iv['resnet']['delta']:+.3f} [{iv['resnet']['lo']:+.3f}, "
                          f"{iv['resnet']['hi']:+.3f}], to DDIM-250 {iv['fine']['delta']:+.3f} "
                          f"[{iv['fine']['lo']:+.3f}, {iv['fine']['hi']:+.3f}]: **{v['claim']}**."]
        lines.append("")
    write_text_atomic(docs / "compare_methods.md", "\n".join(lines))
    cols = ("budget", "family", "config", "lazy_ratio", "tmacs", "fid_fmnist", "fid_resnet", "fid_to_fine",
            "psnr_to_fine", "timed_seconds_per_image")
    write_text_atomic(docs / "compare_methods.csv", "\n".join(
        [",".join(cols)] + [",".join("" if r.get(c) is None else str(r[c]) for c in cols) for r in rows]) + "\n")
    write_text_atomic(docs / "compare_methods.json", json.dumps(doc, indent=1))
    sel = ["# compare_methods: the selection runs", "",
           f"Seed {SELECT_SEED}, {sizes.select_n:,} images per configuration, FID under the shipped extractor; the "
           "lowest "
           "FID of each family within the budget is its setting (bold).", ""]
    for b in sorted(doc["budgets"]):
        s = doc["selection"][f"{b:g}"]
        sel += [f"## {b:.0%} of DDIM-50", "", "| family | configuration | lazy ratio | TMACs | FID |",
                "|---|---|---:|---:|---:|"]
        for r in sorted(s["grid"], key=lambda r: (r["family"], r.get("fid", math.inf))):
            name = f"**`{r['config']}`**" if s["best"].get(r["family"]) == r["config"] else f"`{r['config']}`"
            sel.append(f"| {r['family']} | {name} | " + (f"{r['lazy_ratio']:.1%} | {r['tmacs']:.5f} | {r['fid']:.3f} |"
                                                         if "error" not in r else f" | | {r['error'][:80]} |"))
        sel.append("")
    write_text_atomic(docs / "compare_methods_selection.md", "\n".join(sel))
    plot = [dict(r, fid=r["fid_fmnist"], family=r["family"], method="none" if r["family"] in SOLVERS else r["family"])
            for r in rows]
    for x_key, label, name in (("tmacs", "TMACs per image", "tmacs"),
                               ("timed_seconds_per_image", "seconds per image (quiet timing)", "seconds")):
        pts = [r for r in plot if r.get(x_key)]
        if pts:
            fig = frontier_figure(pts, x_key, label, f"Every method at its best: FID vs {label}")
            savefig_atomic(fig, docs / f"compare_methods_{name}.png")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--budgets", default="", help="comma-separated shares of DDIM-50's TMACs to run (e.g. 0.15)")
    ap.add_argument("--run", default="runs/compare-latent")
    ap.add_argument("--docs", default="docs")
    ap.add_argument("--l2c-steps", default="", help="comma-separated T of the L2C routers to train (e.g. 14)")
    ap.add_argument("--l2c-iters", type=int, default=300)
    ap.add_argument("--write-only", action="store_true")
    ap.add_argument("--timing", action="store_true", help="time every final row (run it on a quiet machine)")
    ap.add_argument("--repeats", type=int, default=5, help="interleaved timed rounds of --timing")
    ap.add_argument("--quiet", action="store_true")
    ap.add_argument("--select-n", type=int, default=SELECT_N, help=argparse.SUPPRESS)  # tests shrink the sizes
    ap.add_argument("--final-n", type=int, default=FINAL_N, help=argparse.SUPPRESS)
    ap.add_argument("--fine-n", type=int, default=FINE_N, help=argparse.SUPPRESS)
    ap.add_argument("--reps", type=int, default=REPS, help=argparse.SUPPRESS)
    ap.add_argument("--families", default=None, help="run only these families (comma-separated, e.g. DDIM,FORA)")
    args = ap.parse_args(argv)
    sizes = Sizes(args.select_n, args.final_n, args.fine_n, args.reps,
                  None if args.families is None else tuple(args.families.split(",")))
    tune_allocator()
    run, docs = Path(args.run), Path(args.docs)
    run.mkdir(parents=True, exist_ok=True)
    path = docs / "compare_methods.json"
    doc = json.loads(path.read_text()) if path.exists() else {}
    want = {k: v for k, v in vars(sizes).items() if k != "families"}
    if doc.get("protocol") != "at-its-best-v1" or doc.get("sizes") != want:  # records of other sizes do not pair
        doc = dict(protocol="at-its-best-v1", sizes=want, budgets=[], rows=[], selection={}, verdicts={})
    model = default_model()
    doc["ddim50_tmacs"] = sampling_macs(model.config, 50) / 1e12
    command = "python experiments/compare_methods.py --budgets " + ",".join(f"{b:g}" for b in sorted(
        set(doc["budgets"]) | {float(b) for b in filter(None, args.budgets.split(","))}))
    if args.timing:
        secs = time_rows(model, doc["rows"], args.repeats)
        for r in doc["rows"]:
            r["timed_seconds_per_image"] = secs[r["config"]]
        doc["timing"] = dict(repeats=args.repeats, batch=16, machine=platform.platform(),
                             threads=torch.get_num_threads())
    if not args.write_only and not args.timing:
        log = print
        extractors = {"fmnist": (fmnist.default_classifier(), fmnist.default_reference()),
                      "resnet": (fmnist.resnet_classifier(), fmnist.resnet_reference())}
        fine_images = reference_samples(model, RowSettings(num_samples=sizes.final_n, reference=FINE,
                                                           ref_samples=sizes.fine_n), run, not args.quiet)
        l2c = {int(T): train_router(model, int(T), run, args.l2c_iters, not args.quiet)
               for T in filter(None, args.l2c_steps.split(","))}
        cache = {}
        for b in (float(x) for x in filter(None, args.budgets.split(","))):
            s = select(model, b, run, *extractors["fmnist"], l2c, cache, sizes, not args.quiet, log)
            doc["selection"][f"{b:g}"] = s
            rows = final(model, b, s["best"], run, extractors, fine_images, sizes, not args.quiet, log)
            doc["rows"] = [r for r in doc["rows"] if r["budget"] != b] + rows
            doc["budgets"] = sorted(set(doc["budgets"]) | {b})
            lazy = [r for r in rows if r["family"] == LAZY]
            other = [r for r in rows if r["family"] != LAZY]
            if lazy and other:
                a, o = min(lazy, key=lambda r: r["fid_fmnist"]), min(other, key=lambda r: r["fid_fmnist"])
                doc["verdicts"][f"{b:g}"] = dict(lazy=a["config"], other=o["config"], **verdict(a, o))
            write_up(doc, docs, command)  # after every budget: nothing finished is lost
    write_up(doc, docs, command)


if __name__ == "__main__":
    main()
