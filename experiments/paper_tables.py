"""The paper's Table 1 / Table 3 on the embedded default: DDIM at many step counts against LazyDiT at equal TMACs.

    python experiments/paper_tables.py [--num-samples 5000] [--cfg 1.5] [--run runs/paper_tables] [--docs docs]
    python experiments/paper_tables.py --only DDIM-25,Lazy-50@50   # some rows; the write-up uses whatever is done

Rows: DDIM 50, 40, 30, 25, 20, 14, 10, 7 and Lazy 50@20%, 50@40%, 50@50%, 40@50%, 20@30%, 20@50%, 10@30%, with the
shipped gates of each T (reference gates, 3-pass recipe, rho 1e-2); plus LazyLA-50@50 and LazyLA-50@40, the
shipped look-ahead gates (beyond the paper: the fast sampling path), next to the reference rows. The ratio of a
Lazy row is reached by calibrating the compute threshold on a 40-image class grid at the table's guidance scale;
rows run on the row engine (lazydit.evaluation.rows, calibration by lazydit.pipeline.calibrate); the threshold, the
calibration ratio and the ratio measured over all samples are recorded.
Every row samples the same labels and the same initial noise (lazydit.evaluation.driver), and is scored with the
shipped Fashion-MNIST evaluator against the test-split statistics: FID, sFID, IS, precision, recall (k=3), KID.
Rows are `Row(steps, target, lookahead)` values (named DDIM-25, Lazy-50@40, LazyLA-50@40); `--only` takes names.
Each finished row is saved as JSON under --run and skipped when the script runs again; an interrupted row resumes
from its last sampled batch. `--timing` then measures the wall-clock column on a quiet machine in one run: every
finished row samples the same --timing-images images (micro-batches of --micro-batch) after a warm-up, in
--timing-rounds rounds with the rows interleaved (order rotated each round); the median seconds per image go to
<run>/timing.json and replace the batched wall-clock of the long runs, which other jobs on the machine disturb.
Every pairing gets a 95% paired-bootstrap interval of FID(Lazy) - FID(DDIM) (--bootstrap draws; rows share labels
and noise, so the same rows are resampled in both): each row keeps its own draws (lazydit.evaluation.metrics.
bootstrap_fid_draws), which pair exactly with any other row's (paired_interval).
Beyond the paper, every row also gets its fidelity to a fine reference sampler (--fine-ref DDIM-250, sampled after
the rows on the first --fine-ref-samples 1,000 labels and noises of the rows): the PSNR of its images against the
reference's images of the same labels and noise (lazydit.evaluation.metrics.paired_psnr), which tells the error of
reusing module outputs apart from the error of taking fewer steps, whatever FID makes of either. The bootstrap also
compares every DDIM row with the next step count (STEP_PAIRS: does each step count beat the one below it?).
Writes <docs>/paper_tables.md, <docs>/paper_tables.csv and <docs>/images/quality_vs_tmacs.png from the rows that
are done, and <docs>/paper_tables.json: every finished row's record (metrics, bootstrap draws, PSNRs) and the timing
run. The rows of that record are not sampled again: on a clean checkout the command samples only the rows it lacks
(5,000 images a row take 5-40 CPU-minutes), pairs them with the recorded ones and rewrites the tables. A recorded
row's images are not committed; `--images-of DDIM-50` samples them again (its record stays) where a new row needs
them for its PSNR in the reuse / step-count split, and prints the FID they reproduce next to the recorded one.
"""

import argparse
import csv
import io
import json
import platform
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from lazydit.lazy.shipped import default_gates
from lazydit.loading import load_model
from lazydit.bench import TimedRow, time_interleaved
from lazydit.cpu import tune_allocator
from lazydit.files import savefig_atomic, write_text_atomic
from lazydit.evaluation import rows as row_engine
from lazydit.evaluation.driver import eval_labels
from lazydit.evaluation.fmnist import default_classifier, default_reference
from lazydit.evaluation.rows import RowSettings, parse_spec
from lazydit.lazy import LazyConfig, policy_for


@dataclass(frozen=True)
class Row:
    """One row of the tables: DDIM at `steps`, or LazyDiT at `steps` calibrated to the lazy ratio `target`."""

    steps: int  # T, DDIM sampling steps
    target: float | None = None  # lazy ratio the threshold is calibrated to; None: plain DDIM
    lookahead: bool = False  # the shipped look-ahead gates instead of the reference gates (a Lazy row)

    def __post_init__(self):
        if self.steps < 1:
            raise ValueError(f"steps must be positive, got {self.steps}")
        if self.target is None and self.lookahead:
            raise ValueError("a look-ahead row needs a target lazy ratio")
        if self.target is not None and not 0 < self.target < 1:
            raise ValueError(f"target must lie in (0, 1), got {self.target}")

    @property
    def lazy(self) -> bool:
        return self.target is not None

    @property
    def kind(self) -> str:
        """The code path: "DDIM" (bare model), "Lazy" (reference gates) or "LazyLA" (look-ahead gates)."""
        return "LazyLA" if self.lookahead else "Lazy" if self.lazy else "DDIM"

    @property
    def name(self) -> str:
        """DDIM-25, Lazy-50@40, LazyLA-50@40: the row's label in the JSON/sample files, the markdown and the CSV."""
        return f"DDIM-{self.steps}" if not self.lazy else f"{self.kind}-{self.steps}@{round(self.target * 100)}"

    @property
    def dense(self) -> "Row":
        """The DDIM row with this row's step count (Lazy-50@40 -> DDIM-50)."""
        return Row(self.steps)

    def __str__(self):
        return self.name


DDIM_ROWS = tuple(Row(s) for s in (50, 40, 30, 25, 20, 14, 10, 7))
LAZY_ROWS = tuple(Row(t, r) for t, r in ((50, 0.2), (50, 0.4), (50, 0.5), (40, 0.5), (20, 0.3), (20, 0.5), (10, 0.3)))
# beyond the paper: look-ahead gates (the fast path), next to the reference
LOOKAHEAD_ROWS = tuple(Row(t, r, lookahead=True) for t, r in ((50, 0.5), (50, 0.4)))
ROWS = DDIM_ROWS + LAZY_ROWS + LOOKAHEAD_ROWS  # in table order
ROWS_BY_NAME = {r.name: r for r in ROWS}
PAIRS = ((Row(50, 0.5), Row(25)), (Row(40, 0.5), Row(20)), (Row(20, 0.5), Row(10)), (Row(10, 0.3), Row(7)),
         (Row(50, 0.4), Row(30)), (Row(20, 0.3), Row(14)), (Row(50, 0.2), Row(40)),
         (Row(50, 0.5, lookahead=True), Row(25)), (Row(50, 0.4, lookahead=True), Row(30)))  # equal TMACs
EXTRA_PAIRS = ((Row(50, 0.4, lookahead=True), Row(50, 0.4)), (Row(50, 0.4), Row(50, 0.5)), (Row(25), Row(20)),
               (Row(30), Row(20)))  # paired differences that explain the pairings
# DDIM against DDIM with the next step count: does every step count beat the one below it? (> 0: it does)
STEP_PAIRS = tuple((a, b) for a, b in zip(sorted(DDIM_ROWS, key=lambda r: r.steps),
                                          sorted(DDIM_ROWS, key=lambda r: r.steps)[1:]))
# FID(Lazy-T) - FID(DDIM-S) = [FID(Lazy-T) - FID(DDIM-T)] (reuse) + [FID(DDIM-T) - FID(DDIM-S)] (step count)
DECOMP_PAIRS = tuple(dict.fromkeys(p for lz, dd in PAIRS if not lz.lookahead
                                   for p in ((lz, lz.dense), (lz.dense, dd))))
# the images of each side of a pairing against DDIM-T's (same noise): skipping modules against taking fewer steps
DECOMP_PSNR = tuple(dict.fromkeys(p for lz, dd in PAIRS if not lz.lookahead for p in ((lz, lz.dense), (dd, lz.dense))))
assert all(r in ROWS_BY_NAME.values() for pair in PAIRS + EXTRA_PAIRS + DECOMP_PAIRS + STEP_PAIRS for r in pair)
COLUMNS = ("sampler", "steps", "target", "lazy_ratio", "tmacs", "fid", "sfid", "inception_score", "precision",
           "recall", "kid", "seconds_per_image", "threshold", "psnr_vs_ref")


def select_rows(only: str | None) -> tuple:
    """The rows named in a comma-separated list (all rows for None / ""); ValueError names the valid ones."""
    if not only:
        return ROWS
    names = [n.strip() for n in only.split(",") if n.strip()]
    unknown = [n for n in names if n not in ROWS_BY_NAME]
    if unknown:
        raise ValueError(f"unknown rows {unknown}; choose from {', '.join(ROWS_BY_NAME)}")
    return tuple(ROWS_BY_NAME[n] for n in dict.fromkeys(names))


def pair_key(a: Row, b: Row) -> str:
    """The key of a paired difference in bootstrap.json ("Lazy-50@50 vs DDIM-25")."""
    return f"{a.name} vs {b.name}"


def row_gates(row: Row):
    """The shipped gates a Lazy row samples with: look-ahead or reference, for its T."""
    return default_gates(row.steps, kind="lookahead" if row.lookahead else "reference")


def row_spec(row: Row) -> str:
    """The row as a configuration of the row engine: DDIM-T, or the shipped gates of T calibrated to the target."""
    if not row.lazy:
        return f"ddim-{row.steps}"
    return f"ddim-{row.steps}+lazy:gates={'default-lookahead' if row.lookahead else 'default'},target={row.target}"


def run_row(row: Row, model, extractor, ref, args):
    """Sample and score one row on the row engine (calibrating the threshold of a Lazy row first)."""
    settings = RowSettings(num_samples=args.num_samples, cfg_scale=args.cfg, seed=args.seed,
                           batch_size=args.batch_size, micro_batch=args.micro_batch,
                           calib_per_class=args.calib_per_class)
    out = row_engine.run_row(parse_spec(row_spec(row)), model, extractor, ref, settings, Path(args.run),
                       progress=not args.quiet, name=row.name)
    if row.lazy:
        out["rho"] = row_gates(row).meta.get("training", {}).get("rho_attn")
    return out


def finished_thresholds(rows, args) -> dict:
    """Row -> its compute threshold (None for DDIM rows) for every finished row: from <run>/<row>.json, else from
    the committed table (<docs>/paper_tables.csv), so that `--timing` also runs on a clean checkout."""
    run, found = Path(args.run), {}
    for r in rows:
        if (run / f"{r.name}.json").exists():
            found[r] = json.loads((run / f"{r.name}.json").read_text()).get("threshold")
    table = Path(args.docs) / "paper_tables.csv"
    if table.exists():
        with open(table, newline="") as f:
            for rec in csv.DictReader(f):
                r = ROWS_BY_NAME.get(rec["sampler"])
                if r in rows and r not in found:
                    found[r] = float(rec["threshold"]) if rec.get("threshold") else None
    return found


def time_rows(rows, model, args) -> dict:
    """Median sampling seconds per image of every finished row, all measured in this one run by the project's one
    timing routine (`lazydit.bench.time_interleaved`, as `benchmarks/bench_fast.py`): a warm-up of every row, then
    --timing-rounds rounds with the rows interleaved (order rotated each round), --timing-images images in
    micro-batches of --micro-batch."""
    done = finished_thresholds(rows, args)
    if not done:
        raise SystemExit("--timing: no finished rows to time")
    y = eval_labels(args.num_samples, model.config.num_classes, args.seed)[: args.timing_images]
    timed_rows = [TimedRow(r.name, model, r.steps, policy_for(row_gates(r), LazyConfig(threshold=th)) if r.lazy
                           else None) for r, th in done.items()]
    timed = time_interleaved(timed_rows, y, cfg_scale=args.cfg, repeats=args.timing_rounds,
                             micro_batch=args.micro_batch)
    out = dict(images=len(y), micro_batch=args.micro_batch, rounds=args.timing_rounds, cfg=args.cfg,
               threads=torch.get_num_threads(), machine=platform.processor() or platform.machine(),
               torch=torch.__version__,
               rows={name: dict(median=statistics.median(t["times"]) / len(y),
                                all=[round(v / len(y), 6) for v in t["times"]],
                                lazy_ratio=round(t["report"].lazy_ratio, 4)) for name, t in timed.items()})
    write_text_atomic(Path(args.run) / "timing.json", json.dumps(out, indent=1))
    return out


def complete_records(args):
    """Complete every finished row's record under --run (lazydit.evaluation.records.complete: bootstrap draws, PSNR
    against the fine reference once that is sampled) and add its PSNR against the DDIM-T rows it is compared with in
    the reuse / step-count split (`psnr_to`), so that once committed (<docs>/paper_tables.json) the row never has to
    be sampled again. Needs the row's samples, so it runs where they are."""
    from lazydit.evaluation import records
    from lazydit.evaluation.metrics import load_npz_samples, paired_psnr

    run, extractor = Path(args.run), default_classifier()
    fine_path = fine_reference_path(args)
    fine = load_npz_samples(fine_path)[: args.fine_ref_samples] if fine_path.exists() else None
    for path in sorted(run.glob("*.json")):
        npz = run / f"{path.stem}.npz"
        if path.stem in ("timing", "bootstrap") or not npz.exists():
            continue
        rec = json.loads(path.read_text())
        changed = records.complete(rec, npz, reps=args.bootstrap, seed=args.seed, fine=fine, extractor=extractor,
                                   ref=default_reference())
        for a, dense in DECOMP_PSNR:
            if a.name == path.stem and dense.name not in rec.get("psnr_to", {}) and (run / f"{dense.name}.npz").exists():
                db = paired_psnr(load_npz_samples(npz), load_npz_samples(run / f"{dense.name}.npz"))["psnr"]
                rec.setdefault("psnr_to", {})[dense.name], changed = db, True
        if changed:
            write_text_atomic(path, json.dumps(rec, indent=1))


def committed_rows(args) -> dict:
    """Row name -> record of the rows in <docs>/paper_tables.json sampled with this run's samples, guidance and
    seed (a clean checkout's finished rows: not sampled again; {} without the file)."""
    from lazydit.evaluation.records import read_committed

    found = read_committed(Path(args.docs) / "paper_tables.json", num_samples=args.num_samples, cfg=args.cfg,
                           seed=args.seed)
    return {k: v for k, v in found.items() if k in ROWS_BY_NAME}


def bootstrap_pairs(by: dict, args) -> dict:
    """Paired-bootstrap 95% intervals of FID(A) - FID(B) for every pairing whose two rows have bootstrap draws of
    the same reps and seed (rows sampled on different days or machines pair exactly: lazydit.evaluation.records)."""
    from lazydit.evaluation.records import pair

    out = dict(reps=args.bootstrap, level=0.95, pairs={})
    for a, b in dict.fromkeys(PAIRS + EXTRA_PAIRS + DECOMP_PAIRS + STEP_PAIRS):
        bs = a.name in by and b.name in by and pair(by[a.name], by[b.name], args.bootstrap, args.seed)
        if bs:
            out["pairs"][pair_key(a, b)] = bs
            print(f"{a} - {b}: FID {bs['delta']:+.3f} [{bs['lo']:+.3f}, {bs['hi']:+.3f}]", flush=True)
    write_text_atomic(Path(args.run) / "bootstrap.json", json.dumps(out, indent=1))
    return out


def fine_reference_config(args):
    """The RowSettings whose reference sampler (--fine-ref on the first --fine-ref-samples images of the rows'
    own labels and noise) every row's PSNR is measured against."""
    from lazydit.evaluation.rows import RowSettings

    return RowSettings(num_samples=args.num_samples, cfg_scale=args.cfg, seed=args.seed, batch_size=args.batch_size,
                         micro_batch=args.micro_batch, reference=args.fine_ref, ref_samples=args.fine_ref_samples)


def fine_reference_path(args) -> Path:
    """The fine reference's images under --run, restored from their committed copy (<docs>/paper_tables_<name>,
    sampled once: 250 steps cost as much as five DDIM-50 rows of its size) where the run lacks them."""
    from lazydit.evaluation.rows import parse_spec
    from lazydit.evaluation.records import mirror

    name = f"reference-{parse_spec(args.fine_ref).filename}-n{args.fine_ref_samples}.npz"
    if committed_rows(args) or not (Path(args.docs) / "paper_tables.json").exists():  # same samples, cfg and seed
        mirror(Path(args.run) / name, Path(args.docs) / f"paper_tables_{name}")
    return Path(args.run) / name


def write_up(rows, boot, args, meta):
    """Markdown + CSV + the quality-versus-TMACs plot from the finished rows, and <docs>/paper_tables.json: every
    row's record (metrics, bootstrap draws, PSNRs), from which a later run on another machine pairs new rows with
    these without sampling them again."""
    docs = Path(args.docs)
    (docs / "images").mkdir(parents=True, exist_ok=True)
    order = {n: i for i, n in enumerate(ROWS_BY_NAME)}
    rows = sorted(rows, key=lambda r: order.get(r["sampler"], len(order)))
    has_fid = any("psnr_vs_ref" in r for r in rows)

    def psnr(r):  # the PSNR cell of a row ("" without a reference)
        if not has_fid:
            return ""
        return f" {r['psnr_vs_ref']:.2f} |" if "psnr_vs_ref" in r else " |"

    buf = io.StringIO(newline="")
    w = csv.DictWriter(buf, fieldnames=COLUMNS, extrasaction="ignore")
    w.writeheader()
    w.writerows(rows)
    write_text_atomic(docs / "paper_tables.csv", buf.getvalue())
    by = {r["sampler"]: r for r in rows}
    tpath, record = Path(args.run) / "timing.json", docs / "paper_tables.json"
    timing = (json.loads(tpath.read_text()) if tpath.exists()  # else the timing run of the committed record
              else json.loads(record.read_text()).get("timing") if record.exists() else None)
    write_text_atomic(record, json.dumps(dict(num_samples=args.num_samples, cfg=args.cfg, seed=args.seed,
                                              fine_ref=args.fine_ref, fine_ref_samples=args.fine_ref_samples,
                                              timing=timing, rows=rows), indent=1))
    if timing:  # the wall-clock column of one quiet run, comparable across rows
        for r in rows:
            if r["sampler"] in timing["rows"]:
                r["seconds_per_image"] = timing["rows"][r["sampler"]]["median"]
                r["timed"] = True
    speed = (f"seconds per image are medians of {timing['rounds']} interleaved rounds sampling the same "
             f"{timing['images']} images per row in micro-batches of {timing['micro_batch']} ({timing['threads']} "
             "threads, `--timing`, one run)" if timing else
             f"seconds per image are the batched sampling wall-clock of the long runs (batch {args.batch_size}), "
             "not a latency benchmark")
    lines = [
        "# The paper's Table 1 / Table 3 on the embedded default",
        "",
        f"Command: `{meta['command']}` ({meta['machine']}, torch {meta['torch']}, {meta['threads']} threads).",
        f"{args.num_samples} samples per row, the same labels (uniform over the 10 classes) and initial noise for "
        f"every row, CFG {args.cfg}, scored with the shipped Fashion-MNIST classifier against the test split "
        f"(`lazydit eval`). TMACs per image counted the paper's way (docs/method-notes.md §4); {speed}.",
        "",
        "| sampler | lazy ratio | TMACs | FID | sFID | IS | precision | recall | KID | s / image | threshold |"
        + (f" PSNR vs {fine_name(args)} (dB) |" if has_fid else ""),
        "|---|---|---|---|---|---|---|---|---|---|---|" + ("---|" if has_fid else ""),
    ]
    for r in rows:
        th = "" if r.get("threshold") is None else f"{r['threshold']:.3g}"
        mark = " *" if timing and not r.get("timed") else ""
        lines.append(f"| {r['sampler']} | {r['lazy_ratio']:.1%} | {r['tmacs'] * 1e3:.3f} G | {r['fid']:.3f} | "
                     f"{r['sfid']:.3f} | {r['inception_score']:.3f} | {r['precision']:.3f} | {r['recall']:.3f} | "
                     f"{r['kid']:.4f} | {r['seconds_per_image']:.4f}{mark} | {th} |" + psnr(r))
    if timing and not all(r.get("timed") for r in rows):
        lines += ["", "\\* not in the timing run: the batched wall-clock of the long run."]
    lines += ["", "(TMACs column in GMACs per image: the embedded model is tiny.)"]
    if has_fid:
        lines += ["", f"PSNR vs {fine_name(args)}: how close each row's first {args.fine_ref_samples:,} images are to "
                  f"the images a fine sampler ({fine_name(args)}) makes from the same labels and noise (PSNR of the "
                  "mean squared error over those images; beyond the paper)."]
    lines += ["",
              "## Equal-TMACs pairings (the paper's claim: Lazy with more steps beats DDIM with fewer)", "",
              "| Lazy | DDIM | TMACs Lazy / DDIM | wall-clock Lazy / DDIM | FID Lazy | FID DDIM | FID Lazy - DDIM "
              "(95% paired bootstrap) | Lazy better? |" + (" PSNR Lazy / DDIM (dB) |" if has_fid else ""),
              "|---|---|---|---|---|---|---|---|" + ("---|" if has_fid else "")]
    for lz, dd in PAIRS:
        if lz.name in by and dd.name in by:
            a, b = by[lz.name], by[dd.name]
            bs = boot["pairs"].get(pair_key(lz, dd))
            ci = "" if bs is None else f"{bs['delta']:+.3f} [{bs['lo']:+.3f}, {bs['hi']:+.3f}]"
            spans = " (interval spans 0)" if bs and bs["lo"] < 0 < bs["hi"] else ""
            lines.append(f"| {lz} | {dd} | {a['tmacs'] / b['tmacs']:.3f} | "
                         f"{a['seconds_per_image'] / b['seconds_per_image']:.3f} | {a['fid']:.3f} | {b['fid']:.3f} | "
                         f"{ci} | "
                         f"{'yes' if a['fid'] < b['fid'] else 'no'}{spans} |"
                         + (f"{psnr(a)[:-2]} /{psnr(b)}" if has_fid else ""))
    extra = [(a, b, boot["pairs"][pair_key(a, b)]) for a, b in EXTRA_PAIRS if pair_key(a, b) in boot["pairs"]]
    if extra:
        lines += ["", "Other paired differences (same labels and noise; 95% paired bootstrap of FID(A) - FID(B)):", "",
                  "| A | B | FID A - FID B | 95% interval |", "|---|---|---|---|"]
        lines += [f"| {a} | {b} | {bs['delta']:+.3f} | [{bs['lo']:+.3f}, {bs['hi']:+.3f}] |" for a, b, bs in extra]
    steps = [(a, b, by[a.name], by[b.name], boot["pairs"].get(pair_key(a, b))) for a, b in STEP_PAIRS
             if a.name in by and b.name in by]
    if steps:
        ratio = (f" DDIM-10's FID is {by['DDIM-10']['fid'] / by['DDIM-50']['fid']:.2f}x DDIM-50's."
                 if "DDIM-10" in by and "DDIM-50" in by else "")
        lines += ["", "## Does every DDIM step count beat the one below it?", "",
                  "FID(DDIM-S) - FID(DDIM-S') for consecutive step counts S < S' (same labels and noise; 95% paired "
                  "bootstrap): above 0 means the extra steps help." + ratio, "",
                  "| fewer | more | FID fewer | FID more | FID fewer - more (95% paired bootstrap) | more steps better? |",
                  "|---|---|---|---|---|---|"]
        for a, b, ra, rb, bs in steps:
            ci = f"{ra['fid'] - rb['fid']:+.3f}" if bs is None else (f"{bs['delta']:+.3f} "
                                                                     f"[{bs['lo']:+.3f}, {bs['hi']:+.3f}]")
            verdict = ("yes" if ra["fid"] > rb["fid"] else "no") + (" (interval spans 0)" if bs and bs["lo"] < 0 <
                                                                   bs["hi"] else "")
            lines.append(f"| {a} | {b} | {ra['fid']:.3f} | {rb['fid']:.3f} | {ci} | {verdict} |")
    lines += decomposition(by, boot, args)
    missing = [n for n in ROWS_BY_NAME if n not in by]
    if missing:
        lines += ["", f"Rows not run yet: {', '.join(missing)}."]
    notes = docs / "paper_tables_notes.md"  # the hand-written reading of the numbers, kept across reruns
    if notes.exists():
        lines += ["", notes.read_text().rstrip()]
    write_text_atomic(docs / "paper_tables.md", "\n".join(lines) + "\n")
    plot(rows, docs / "images" / "quality_vs_tmacs.png", fine_name(args))


def fine_name(args) -> str:
    """The fine reference sampler as the tables name it (DDIM-250)."""
    return args.fine_ref.upper()


def decomposition(by, boot, args) -> list:
    """Markdown lines splitting each pairing's FID difference into the reuse part and the step-count part."""
    def diff(a, b):
        bs = boot["pairs"].get(pair_key(a, b))
        d = by[a.name]["fid"] - by[b.name]["fid"]
        return f"{d:+.3f}" if bs is None else f"{bs['delta']:+.3f} [{bs['lo']:+.3f}, {bs['hi']:+.3f}]"

    def psnr_to(a, ref):
        db = by[a.name].get("psnr_to", {}).get(ref.name)
        return "n/a" if db is None else f"{db:.2f}"

    out = []
    for lz, dd in PAIRS:
        dt = lz.dense
        if lz.lookahead or not all(r.name in by for r in (lz, dd, dt)):
            continue
        out.append(f"| {lz} | {dd} | {dt} | {diff(lz, dd)} | {diff(lz, dt)} | {diff(dt, dd)} | "
                   f"{psnr_to(lz, dt)} / {psnr_to(dd, dt)} |")
    if not out:
        return []
    return ["", "## Where each difference comes from: reuse versus step count", "",
            "FID(Lazy-T) - FID(DDIM-S) = [FID(Lazy-T) - FID(DDIM-T)], what reusing module outputs costs at T steps, "
            "+ [FID(DDIM-T) - FID(DDIM-S)], what T dense steps buy over S. The last column compares the images "
            "themselves with DDIM-T's of the same noise: skipping modules against taking fewer steps.", "",
            "| Lazy-T | DDIM-S | DDIM-T | FID Lazy-T - DDIM-S | reuse: Lazy-T - DDIM-T | steps: DDIM-T - DDIM-S | "
            "PSNR to DDIM-T: Lazy-T / DDIM-S (dB) |", "|---|---|---|---|---|---|---|"] + out


def plot(rows, path, ref="DDIM-50"):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("fid", "FID"), ("sfid", "sFID"), ("inception_score", "IS")]
    if any("psnr_vs_ref" in r for r in rows):
        panels.append(("psnr_vs_ref", f"PSNR vs {ref} (dB)"))
    fig, axes = plt.subplots(1, len(panels), figsize=(4.4 * len(panels), 3.8), dpi=120)
    for ax, (key, label) in zip(axes, panels):
        ddim = sorted((r for r in rows if r.get("target") is None and key in r), key=lambda r: r["tmacs"])
        lazy = [r for r in rows if r.get("target") is not None and key in r and not r["sampler"].startswith("LazyLA")]
        ahead = [r for r in rows if r["sampler"].startswith("LazyLA") and key in r]  # on the reference rows: no labels
        ax.plot([r["tmacs"] * 1e3 for r in ddim], [r[key] for r in ddim], "o-", color="tab:blue", label="DDIM")
        for r in ddim:
            ax.annotate(str(r["steps"]), (r["tmacs"] * 1e3, r[key]), fontsize=7, xytext=(3, 3),
                        textcoords="offset points", color="tab:blue")
        ax.plot([r["tmacs"] * 1e3 for r in lazy], [r[key] for r in lazy], "s", color="tab:red", label="LazyDiT")
        for r in lazy:
            ax.annotate(r["sampler"].replace("Lazy-", ""), (r["tmacs"] * 1e3, r[key]), fontsize=7, xytext=(3, -9),
                        textcoords="offset points", color="tab:red")
        if ahead:
            ax.plot([r["tmacs"] * 1e3 for r in ahead], [r[key] for r in ahead], "D", mfc="none", ms=9,
                    color="tab:purple", label="LazyDiT, look-ahead gates")
        ax.set_xlabel("GMACs per image")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle("Quality vs cost on the embedded default (lower FID/sFID, higher IS and PSNR are better)",
                 fontsize=10)
    fig.tight_layout()
    savefig_atomic(fig, path)
    plt.close(fig)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="default",
                    help="the model (default: the shipped one; another model runs the DDIM rows only, the Lazy rows "
                         "use the shipped gates)")
    ap.add_argument("--num-samples", type=int, default=5000)
    ap.add_argument("--batch-size", type=int, default=250)
    ap.add_argument("--micro-batch", type=int, default=16,
                    help="images per sampler call inside a batch (CPU cache; the samples do not change)")
    ap.add_argument("--cfg", type=float, default=1.5, help="guidance scale (the paper's tables: 1.5)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--calib-per-class", type=int, default=4, help="calibration batch: images per class")
    ap.add_argument("--only", default=None, help="comma-separated row names (default: all)")
    ap.add_argument("--run", default="runs/paper_tables", help="folder for per-row JSON and samples")
    ap.add_argument("--docs", default="docs", help="where the markdown, CSV and plot go")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--write-only", action="store_true", help="only rewrite the docs from finished rows")
    ap.add_argument("--timing", action="store_true", help="measure the wall-clock column of the finished rows")
    ap.add_argument("--timing-images", type=int, default=32)
    ap.add_argument("--timing-rounds", type=int, default=5)
    ap.add_argument("--bootstrap", type=int, default=200,
                    help="bootstrap draws per row, paired for the FID difference of each pairing (0: no intervals)")
    ap.add_argument("--fine-ref", default="ddim-250",
                    help="fine reference sampler of the PSNR column (a bare sampler: ddim-250)")
    ap.add_argument("--fine-ref-samples", type=int, default=1000,
                    help="images of the fine reference: the first ones of every row's labels and noise")
    ap.add_argument("--images-of", default=None,
                    help="comma-separated committed rows whose images to sample again (not their records), for the "
                         "image-by-image PSNR of the rows sampled now against them (the reuse / step-count split)")
    ap.add_argument("--no-fine-ref", action="store_true", help="do not sample the fine reference in this call")
    ap.add_argument("--quiet", action="store_true")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    run = Path(args.run)
    run.mkdir(parents=True, exist_ok=True)
    try:
        rows = select_rows(args.only)
    except ValueError as e:
        ap.error(f"--only: {e}")
    try:
        select_rows(args.images_of)
    except ValueError as e:
        ap.error(f"--images-of: {e}")
    meta = dict(command="python experiments/paper_tables.py" + (f" --num-samples {args.num_samples}"
                                                                 if args.num_samples != 5000 else "")
                + (f" --model {args.model}" if args.model != "default" else "")
                + (f" --fine-ref-samples {args.fine_ref_samples}" if args.fine_ref_samples != 1000 else ""),
                machine=platform.processor() or platform.machine(), torch=torch.__version__,
                threads=torch.get_num_threads())
    recorded = committed_rows(args)
    if args.timing:
        tune_allocator()  # as bench_fast and the CLI (lazydit.cpu)
        time_rows(rows, load_model(args.model), args)
    elif not args.write_only:
        model = load_model(args.model)
        extractor, ref = default_classifier(), default_reference()
        for row in rows:
            path = run / f"{row.name}.json"
            if path.exists() or row.name in recorded:
                continue
            t0 = time.time()
            res = run_row(row, model, extractor, ref, args)
            res["num_samples"], res["cfg_scale"], res["micro_batch"] = args.num_samples, args.cfg, args.micro_batch
            write_text_atomic(path, json.dumps(res, indent=1))
            print(f"{row.name}: FID {res['fid']:.3f} lazy {res['lazy_ratio']:.1%} ({time.time() - t0:.0f} s)",
                  flush=True)
        for row in select_rows(args.images_of) if args.images_of else ():
            if row.name in recorded and not (run / f"{row.name}.npz").exists():
                res = run_row(row, model, extractor, ref, args)  # the images only: the record stays as committed
                print(f"{row.name} images sampled again: FID {res['fid']:.4f}, recorded {recorded[row.name]['fid']:.4f}",
                      flush=True)
        if not args.no_fine_ref and not fine_reference_path(args).exists():
            from lazydit.evaluation.rows import reference_samples

            reference_samples(model, fine_reference_config(args), run, progress=not args.quiet)
    complete_records(args)
    done = [json.loads(p.read_text()) for p in sorted(run.glob("*.json")) if p.stem not in ("timing", "bootstrap")]
    done = {r["sampler"]: r for r in done if r.get("num_samples") == args.num_samples and r.get("cfg_scale") == args.cfg}
    done = {**recorded, **done}  # a row sampled here replaces its committed record
    boot = bootstrap_pairs(done, args) if args.bootstrap else {"pairs": {}}
    if done:
        write_up(list(done.values()), boot, args, meta)
        print(f"wrote {args.docs}/paper_tables.md, .csv and images/quality_vs_tmacs.png ({len(done)} rows)")


if __name__ == "__main__":
    main()
