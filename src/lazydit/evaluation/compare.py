"""One harness for every way of making a DiT cheaper: samplers, step counts and caching methods side by side, with
the same labels, noise, guidance and evaluator (`lazydit compare`).

A configuration is one string, `SAMPLER-T[+METHOD[:key=value,...]]`:
    ddim-10                               DDIM with 10 steps
    dpm++2m-10                            DPM-Solver++(2M) with 10 steps
    ddim-20+fora:interval=2               any registered caching policy (`lazydit.lazy.POLICIES`) with its options
    ddim-20+fbcache:target=0.5            ... with `target=r`: its threshold calibrated to lazy ratio r
    ddim-20+lazy:gates=default,target=0.5 LazyDiT gates (a file, or default / default-lookahead), calibrated to r
    ddim-20+l2c:router=FILE,target=0.5    a Learning-to-Cache router bank, calibrated to r
Calibration (`target`) bisects the method's threshold on the class grid (4 images per class) as the paper table does,
then every configuration samples the same `num_samples` labels and initial noise (`lazydit.evaluation.driver`).

Per configuration: FID / sFID / IS / precision / recall / KID, PSNR against a fine reference sampler (the first
`ref_samples` images of the same noise sampled with `reference`; default min(num_samples, 1000)), lazy ratio, TMACs,
seconds. Rows are resumable (one JSON and one .npz per row in the run folder; a rerun with other settings is refused
naming them, except the reference's, which rows do not depend on); `write_report` writes markdown, CSV, JSON and the
two frontier plots (quality vs TMACs, quality vs seconds: one curve per method).
"""

import json
import math
import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from lazydit.errors import UsageError
from lazydit.files import write_text_atomic
from lazydit.lazy import LazyConfig, make_policy
from lazydit.lazy.policies import GATE_METHODS, POLICIES, _value, gate_policy  # GATE_METHODS: lazy, l2c (banks)
from lazydit.sampling import SAMPLER_LABELS, SAMPLERS


@dataclass(frozen=True)
class CompareConfig:
    """What every row of a comparison shares."""

    num_samples: int = 5000  # images per configuration
    cfg_scale: float = 1.5  # classifier-free guidance scale
    seed: int = 0  # labels and initial noise (the same for every configuration)
    batch_size: int = 250  # images per sampling batch (a resumable part)
    micro_batch: int | None = 16  # images per sampler call (CPU cache; the same samples; batch-level methods decide
    # per call, as they would for a user's batch of this size)
    reference: str = "ddim-50"  # fine sampler the PSNR is measured against
    ref_samples: int | None = None  # images of the reference (the first ones of every row's noise); None:
    # min(num_samples, 1000), no more reference images than a row has
    calib_per_class: int = 4  # class-grid images per class for calibrating a `target`

    @property
    def reference_count(self) -> int:
        """Images of the reference: ref_samples, or min(num_samples, 1000) when it is None."""
        return min(self.num_samples, 1000) if self.ref_samples is None else self.ref_samples


# settings a finished row does not depend on (the reference is a file of its own, named by both)
REFERENCE_SETTINGS = ("reference", "ref_samples")
CLI_FLAGS = {"num_samples": "--num-samples", "cfg_scale": "--cfg", "seed": "--seed", "batch_size": "--batch-size",
             "micro_batch": "--micro-batch", "model": "--model"}  # how `lazydit compare` sets each setting


def settings_diff(saved: dict, now: dict) -> list:
    """The settings a finished row was made with that differ from this run's, as 'name (--flag): saved X, now Y'
    (the reference's settings are left out: rows do not depend on them)."""
    keys = [k for k in dict.fromkeys([*now, *saved]) if k not in REFERENCE_SETTINGS]
    return [f"{k}{f' ({CLI_FLAGS[k]})' if k in CLI_FLAGS else ''}: saved {saved.get(k)!r}, now {now.get(k)!r}"
            for k in keys if saved.get(k) != now.get(k)]


@dataclass(frozen=True)
class MethodSpec:
    """A parsed configuration string."""

    text: str  # as given (the row's name)
    sampler: str  # key of lazydit.sampling.SAMPLERS
    steps: int  # T
    method: str | None = None  # registered policy name, "lazy" or "l2c"; None: the bare sampler
    options: tuple = ()  # (key, value) pairs, values parsed as int / float / str
    target: float | None = None  # calibrate the threshold to this lazy ratio

    @property
    def family(self) -> str:
        """The curve this row belongs to in the frontier plots: the method (with its sampler if not DDIM)."""
        label = SAMPLER_LABELS[self.sampler]
        if self.method is None:
            return label
        name = {"lazy": "LazyDiT", "l2c": "L2C"}.get(self.method, self.method)
        opts = dict(self.options)
        if self.method == "lazy" and opts.get("gates") not in (None, "default"):
            name += f" [{Path(str(opts['gates'])).parent.name or opts['gates']}]"
        if self.method == "taylorseer":  # one curve per order: the interval sweeps along it
            name += f" O={opts.get('order', 4)}"
        return name + ("" if self.sampler == "ddim" else f" +{label}")

    @property
    def filename(self) -> str:
        return re.sub(r"[^A-Za-z0-9.+=,@-]+", "_", self.text)


def parse_spec(text: str) -> MethodSpec:
    """Parse `SAMPLER-T[+METHOD[:key=value,...]]` (see the module docstring).

    Raises:
        UsageError: an unknown sampler or method, a bad step count or option.
    """
    samplers = "|".join(re.escape(k) for k in SAMPLERS)
    m = re.fullmatch(rf"({samplers})-(\d+)(?:\+(.*))?", text.strip())
    if not m:
        raise UsageError(f"{text!r}: expected SAMPLER-T[+METHOD[:key=value,...]] with a sampler of "
                         f"{', '.join(SAMPLERS)}, e.g. ddim-20+fora:interval=2")
    steps = int(m[2])
    if not 1 <= steps <= 1000:
        raise UsageError(f"{text!r}: T must be in [1, 1000], got {steps}")
    if m[3] is None:
        return MethodSpec(text, m[1], steps)
    name, _, opts = m[3].partition(":")
    if name not in POLICIES and name not in GATE_METHODS:
        raise UsageError(f"{text!r}: unknown method {name!r}; choose from "
                         f"{', '.join(sorted([*POLICIES, *GATE_METHODS]))}")
    options, target = [], None
    for item in filter(None, opts.split(",")):
        key, sep, value = item.partition("=")
        if not sep:
            raise UsageError(f"{text!r}: expected key=value, got {item!r}")
        if key == "target":
            target = float(value)
            if not 0 < target < 1:
                raise UsageError(f"{text!r}: target must lie in (0, 1), got {value}")
        else:
            options.append((key.strip(), _value(value.strip())))
    if name in GATE_METHODS:
        need = "gates" if name == "lazy" else "router"
        if need not in dict(options):
            raise UsageError(f"{text!r}: {name} needs {need}=FILE" + (" (or gates=default)" if name == "lazy" else ""))
    return MethodSpec(text, m[1], steps, name, tuple(options), target)


def build_policy(spec: MethodSpec, model, threshold: float | None = None, device="cpu"):
    """The caching policy of a configuration (None for a bare sampler), with `threshold` if given."""
    if spec.method is None:
        return None
    opts = dict(spec.options)
    if spec.method in GATE_METHODS:  # the same code as `--method lazy:...` / `l2c:...` (lazydit.lazy.policies)
        if threshold is not None:
            opts["threshold"] = threshold
        return gate_policy(spec.method, opts, spec.steps, LazyConfig(), device, what=spec.text)
    if threshold is not None:
        opts["threshold"] = threshold
    text = spec.method + (":" + ",".join(f"{k}={v}" for k, v in opts.items()) if opts else "")
    return make_policy(text, spec.steps)


def calibrate(spec: MethodSpec, model, y, cfg: CompareConfig, iters: int = 16, tol: float = 0.005):
    """Bisect the threshold of a configuration so that sampling labels y reaches spec.target.

    Gate banks: a row computes iff p >= threshold (more skipping as it rises; bisected in logit space).
    FBCache / TeaCache: a step skips while the distance is below the threshold (more skipping as it rises;
    bisected in log space over [1e-6, 1e3]).
    Returns:
        (threshold, reached lazy ratio, TeaCache's fitted coefficients or None)
    Raises:
        UsageError: the target is out of reach (the message gives the reachable range).
    """
    from lazydit.pipeline import sample

    gate = spec.method in GATE_METHODS
    lo, hi = (-30.0, 30.0) if gate else (math.log(1e-6), math.log(1e3))
    to_th = (lambda v: 1 / (1 + math.exp(-v))) if gate else math.exp
    prepared = build_policy(spec, model, None if gate else 1.0)
    prepared.prepare(model, y, cfg.cfg_scale, cfg.seed, spec.sampler)  # TeaCache's fit: once
    best = None

    def ratio(th):
        policy = build_policy(spec, model, th)
        if hasattr(prepared, "coefficients"):
            policy.coefficients = prepared.coefficients
        return sample(model, y, spec.steps, policy=policy, cfg_scale=cfg.cfg_scale, seed=cfg.seed, progress=False,
                      sampler=spec.sampler)[1].lazy_ratio

    for _ in range(iters):
        mid = (lo + hi) / 2
        r = ratio(to_th(mid))
        if best is None or abs(r - spec.target) < abs(best[1] - spec.target):
            best = (to_th(mid), r)
        if abs(r - spec.target) <= tol:
            break
        lo, hi = (mid, hi) if r < spec.target else (lo, mid)
    # block-level methods skip whole steps: their ratios come in steps of about 1/T
    if abs(best[1] - spec.target) > max(4 * tol, 0.02, 0 if gate else 1 / spec.steps):
        reach = [ratio(to_th(v)) for v in ((-30.0, 30.0) if gate else (math.log(1e-6), math.log(1e3)))]
        raise UsageError(f"{spec.text}: a lazy ratio of {spec.target} is out of reach: thresholds give "
                         f"{min(reach):.3f} to {max(reach):.3f} on the calibration batch")
    return best[0], best[1], (getattr(prepared, "coefficients", None))


def _eval_config(spec: MethodSpec, cfg: CompareConfig, name: str):
    from lazydit.evaluation.driver import EvalConfig

    return EvalConfig(steps=spec.steps, cfg_scale=cfg.cfg_scale, num_samples=cfg.num_samples,
                      batch_size=cfg.batch_size, seed=cfg.seed, name=name, micro_batch=cfg.micro_batch,
                      sampler=spec.sampler)


def reference_samples(model, cfg: CompareConfig, run: Path, progress: bool = True) -> np.ndarray:
    """The fine reference's images of the first cfg.reference_count labels and noises (sampled once, resumable)."""
    from lazydit.evaluation.driver import generate
    from lazydit.evaluation.metrics import load_npz_samples

    spec = parse_spec(cfg.reference)
    if spec.method is not None:
        raise UsageError(f"the reference must be a bare sampler (e.g. ddim-50), not {cfg.reference!r}")
    n = cfg.reference_count
    path = run / f"reference-{spec.filename}-n{n}.npz"
    if not path.exists():
        generate(model, _eval_config(spec, cfg, f"reference {spec.text}"), out=path, progress=progress, first=n)
    return load_npz_samples(path)[:n]


def run_row(spec: MethodSpec, model, extractor, ref: dict, cfg: CompareConfig, run: Path,
            progress: bool = True) -> dict:
    """One configuration: calibrate (if a target), prepare, sample (resumable), score; the row as a dict."""
    from lazydit.evaluation.driver import evaluate_config
    from lazydit.pipeline import class_grid_labels

    device = next(model.parameters()).device
    yc = class_grid_labels(model.config.num_classes, cfg.calib_per_class, device)
    extra, threshold, coefficients = {}, None, None
    if spec.target is not None:
        threshold, reached, coefficients = calibrate(spec, model, yc, cfg)
        extra = dict(target=spec.target, threshold=threshold, calibration_ratio=round(reached, 4))
    policy = build_policy(spec, model, threshold, device)
    if policy is not None:
        if coefficients is not None:
            policy.coefficients = coefficients
        policy.prepare(model, yc, cfg.cfg_scale, cfg.seed, spec.sampler)
        if getattr(policy, "coefficients", None) is not None:
            extra["coefficients"] = list(policy.coefficients)
    row = evaluate_config(model, _eval_config(spec, cfg, spec.text), extractor, ref, policy=policy,
                          out=run / f"{spec.filename}.npz", progress=progress)
    return {**row, **extra, "method": spec.method or "none", "family": spec.family, "sampler_name": spec.sampler}


def compare(model, specs: list, cfg: CompareConfig, extractor, ref: dict, run, progress: bool = True,
            log=print) -> list:
    """Run every configuration not yet finished in `run`, add PSNR to the reference, return the rows.

    Args:
        model: a DiT (eval mode) on its device.
        specs: configuration strings (see the module docstring); parsed and checked before any work.
        cfg: CompareConfig shared by every row.
        extractor, ref: the evaluator (e.g. `lazydit.evaluation.fmnist.default_classifier()` and
            `default_reference()`).
        run: folder of the resumable rows.
    Returns:
        the rows (dicts), in the order of `specs`.
    """
    from lazydit.evaluation.metrics import load_npz_samples, paired_psnr

    parsed = [parse_spec(s) for s in specs]
    for s in parsed:  # options and files are checked before anything runs
        if s.method is not None:
            build_policy(s, model, 0.5 if s.target is not None else None).check_model(model)
    if len({s.filename for s in parsed}) != len(parsed):
        raise UsageError("two configurations have the same name")
    run = Path(run)
    run.mkdir(parents=True, exist_ok=True)
    meta = {**asdict(cfg), "model": getattr(model, "name", "")}
    for s in parsed:  # every finished row is checked before any work
        path = run / f"{s.filename}.json"
        if path.exists():
            diff = settings_diff(json.loads(path.read_text()).get("compare") or {}, meta)
            if diff:
                raise UsageError(f"{path} was made with other settings: {'; '.join(diff)}: use another --out (run "
                                 "folder), or the saved settings to resume it")
    rows = []
    for s in parsed:
        path = run / f"{s.filename}.json"
        if path.exists():
            row = json.loads(path.read_text())
        else:
            t0 = time.time()
            row = {**run_row(s, model, extractor, ref, cfg, run, progress), "compare": meta}
            write_text_atomic(path, json.dumps(row, indent=1))
            log(f"{s.text}: FID {row['fid']:.3f}, lazy {row['lazy_ratio']:.1%}, {row['tmacs']:.5f} TMACs "
                f"({time.time() - t0:.0f} s)")
        rows.append(row)
    ref_images = reference_samples(model, cfg, run, progress)
    for s, row in zip(parsed, rows):
        images = load_npz_samples(run / f"{s.filename}.npz")[: len(ref_images)]
        row["psnr_vs_ref"] = paired_psnr(images, ref_images[: len(images)])["psnr"]
    return rows


COLUMNS = ("config", "family", "lazy_ratio", "tmacs", "fid", "fid_vs_ddim", "sfid", "inception_score", "precision", "recall", "kid",
           "psnr_vs_ref", "seconds_per_image", "threshold")


def write_report(rows: list, cfg: CompareConfig, out, title: str = "Comparison", command: str = "",
                 notes: str = "") -> dict:
    """Markdown, CSV, JSON and the frontier plots (`out`.md / .csv / .json, `out`_tmacs.png / _seconds.png)."""
    from lazydit.files import savefig_atomic

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    table = [{**{c: r.get(c) for c in COLUMNS}, "config": r["sampler"]} for r in rows]
    dense = max((r for r in rows if r["method"] == "none"), key=lambda r: r["tmacs"], default=None)
    fmt = lambda v, f: "" if v is None else format(v, f)  # noqa: E731
    lines = [f"# {title}", ""]
    if command:
        lines += [f"Generated by `{command}`.", ""]
    lines += [f"{cfg.num_samples:,} samples per configuration, the same labels and initial noise, CFG {cfg.cfg_scale}; "
              "FID − DDIM at equal TMACs: against the DDIM rows' FID interpolated linearly in TMACs (blank outside "
              "their range; negative: better than DDIM with fewer steps); "
              f"PSNR against {cfg.reference} on the first {cfg.reference_count:,} images of the same noise; "
              f"seconds per image of sampling in micro-batches of {cfg.micro_batch}, measured while the rows sampled "
              "unless a note below says otherwise.", ""]
    curve = sorted((r["tmacs"], r["fid"]) for r in rows if r["method"] == "none" and r["sampler_name"] == "ddim")
    for r in rows:  # FID of DDIM at the same TMACs, linear between the DDIM rows (None outside their range)
        inside = len(curve) > 1 and curve[0][0] <= r["tmacs"] <= curve[-1][0]
        r["fid_vs_ddim"] = (r["fid"] - float(np.interp(r["tmacs"], *zip(*curve)))) if inside else None
    lines += ["| configuration | lazy ratio | TMACs | TMACs vs " + (dense["sampler"] if dense else "dense") +
              " | FID | FID − DDIM at equal TMACs | sFID | IS | precision | recall | PSNR (dB) | s / image |",
              "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['sampler']} | {r['lazy_ratio']:.1%} | {r['tmacs']:.5f} | "
                     f"{fmt(r['tmacs'] / dense['tmacs'] if dense else None, '.3f')} | {r['fid']:.3f} | "
                     f"{fmt(r['fid_vs_ddim'], '+.3f')} | "
                     f"{r['sfid']:.3f} | {r['inception_score']:.2f} | {r['precision']:.3f} | {r['recall']:.3f} | "
                     f"{fmt(r.get('psnr_vs_ref'), '.2f')} | {r['seconds_per_image']:.4f} |")
    if notes:
        lines += ["", notes]
    header = ",".join(COLUMNS)
    csv = [header] + [",".join("" if t[c] is None else str(t[c]) for c in COLUMNS) for t in table]
    write_text_atomic(out.with_suffix(".md"), "\n".join(lines) + "\n")
    write_text_atomic(out.with_suffix(".csv"), "\n".join(csv) + "\n")
    write_text_atomic(out.with_suffix(".json"), json.dumps(dict(config=asdict(cfg), rows=rows), indent=1))
    for x_key, x_label, suffix in (("tmacs", "TMACs per image", "tmacs"),
                                   ("seconds_per_image", "seconds per image (this run)", "seconds")):
        fig = frontier_figure(rows, x_key, x_label, f"{title}: FID vs {x_label}")
        savefig_atomic(fig, out.parent / f"{out.name}_{suffix}.png")
    return dict(rows=rows)


def frontier_figure(rows: list, x_key: str, x_label: str, title: str):
    """FID against cost, one curve per method family (bare samplers dashed).

    Args:
        rows: dicts with `family` (one curve each), `method` ("none": a bare sampler), `fid` and `x_key`; optional
            `color_group` (families of one group share a colour; default: the family) and `marker`.
        x_key, x_label: the cost column and its axis label.
        title: the figure's title.
    Returns:
        the matplotlib figure (log axes where the values span more than 3x in FID or 10x in cost).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    fig, ax = plt.subplots(figsize=(7.5, 4.8), dpi=130)
    families = {}
    for r in rows:
        families.setdefault(r["family"], []).append(r)
    groups = list(dict.fromkeys(r.get("color_group", r["family"]) for r in rows))
    cmap = plt.get_cmap("tab10" if len(groups) <= 10 else "tab20")  # no two groups share a colour
    for fam, rs in families.items():
        rs = sorted(rs, key=lambda r: r[x_key])
        bare = rs[0]["method"] == "none"
        color = cmap(groups.index(rs[0].get("color_group", fam)) % cmap.N)
        ax.plot([r[x_key] for r in rs], [r["fid"] for r in rs], "--" if bare else "-", color=color,
                marker=rs[0].get("marker") or ("o" if bare else "s"), label=fam, lw=1.2 if bare else 1.6)
    fids, xs = [r["fid"] for r in rows], [r[x_key] for r in rows]
    plain = FuncFormatter(lambda v, _: f"{v:g}")  # 0.002, not 2x10^-3
    if max(fids) > 3 * min(fids):  # an outlier would flatten the frontier: log scale
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(plain)
        ax.yaxis.set_minor_formatter(plain)
    if min(xs) > 0 and max(xs) > 10 * min(xs):  # costs over more than a decade: log scale, ticks at 1, 2, 5
        ax.set_xscale("log")
        ax.xaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
        ax.xaxis.set_major_formatter(plain)
        ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel(x_label)
    ax.set_ylabel("FID (lower is better)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    return fig
