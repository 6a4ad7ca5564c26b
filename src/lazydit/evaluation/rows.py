"""The row engine every table of lazydit runs on (`lazydit compare`, the paper table, the beyond-the-paper
frontier): one configuration string names what runs, and a row is that configuration sampled into resumable parts,
scored, and written as a record.

A configuration is one string, `SAMPLER-T[+METHOD[:key=value,...]]`:
    ddim-10                               DDIM with 10 steps
    dpm++2m-10                            DPM-Solver++(2M) with 10 steps
    ddim-20+fora:interval=2               any registered caching policy (`lazydit.lazy.POLICIES`) with its options
    ddim-20+fbcache:target=0.5            ... with `target=r`: its threshold calibrated to lazy ratio r
    ddim-20+lazy:gates=default,target=0.5 LazyDiT gates (a file, or default / default-<kind>), calibrated to r;
                                          LazyConfig options too (max_skips=2, forecast=1, uniform=1, tie_cfg=1)
    ddim-20+l2c:router=FILE,target=0.5    a Learning-to-Cache router bank, calibrated to r
    ddim-20+mypkg.mod:MyPolicy:k=v        a policy of your own (a `lazydit.lazy.Policy` subclass)
Calibration (`target`) bisects the method's threshold on the class grid (4 images per class;
`lazydit.pipeline.calibrate`, for any method whose `Policy.calibration` says how); then every row samples the same
`num_samples` labels and initial noise (`lazydit.evaluation.driver`). A row's record holds its metrics, lazy ratio,
TMACs and seconds; `lazydit.evaluation.records` adds its bootstrap draws and its PSNR to a fine reference sampler's
images of the same noise (`reference_samples`), and pairs two records.
"""

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lazydit.errors import UsageError
from lazydit.lazy import LazyConfig, make_policy
from lazydit.lazy.policies import GATE_METHODS, POLICIES, _value, gate_policy  # GATE_METHODS: lazy, l2c (banks)
from lazydit.sampling import SAMPLER_LABELS, SAMPLERS, check_policy_schedule, sampler_timesteps


@dataclass(frozen=True)
class RowSettings:
    """What every row of a table shares: samples, guidance, noise, batching, the fine reference."""

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
    samplers = "|".join(re.escape(k) for k in sorted(SAMPLERS, key=len, reverse=True))  # the longest name first
    m = re.fullmatch(rf"({samplers})-(\d+)(?:\+(.*))?", text.strip())
    if not m:
        raise UsageError(f"{text!r}: expected SAMPLER-T[+METHOD[:key=value,...]] with a sampler of "
                         f"{', '.join(SAMPLERS)}, e.g. ddim-20+fora:interval=2")
    steps = int(m[2])
    if not 1 <= steps <= 1000:
        raise UsageError(f"{text!r}: T must be in [1, 1000], got {steps}")
    try:
        sampler_timesteps(SAMPLERS[m[1]], steps)  # a spaced sampler's T fits its spacing (logsnr: T <= 38)
    except UsageError as e:
        raise type(e)(f"{text!r}: {e}") from None
    if m[3] is None:
        return MethodSpec(text, m[1], steps)
    name, _, opts = m[3].partition(":")
    cls, _, rest = opts.partition(":")
    if name not in POLICIES and cls and "=" not in cls:  # module:Class[:key=value,...], a policy of your own
        name, opts = f"{name}:{cls}", rest
    elif name not in POLICIES:
        raise UsageError(f"{text!r}: unknown method {name!r}; choose from {', '.join(sorted(POLICIES))}, or give "
                         "package.module:Class")
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


def build_policy(spec: MethodSpec, model, threshold: float | None = None, device="cpu", fitted: dict | None = None):
    """The caching policy of a configuration (None for a bare sampler), with `threshold` if given and what a record
    says it fitted (`Policy.load_fitted`), if given."""
    if spec.method is None:
        return None
    opts = dict(spec.options)
    if threshold is not None:
        opts["threshold"] = threshold
    if spec.method in GATE_METHODS:  # the same code as `--method lazy:...` / `l2c:...` (lazydit.lazy.policies)
        policy = gate_policy(spec.method, opts, spec.steps, LazyConfig(), device, what=spec.text)
    else:
        policy = make_policy(spec.method + (":" + ",".join(f"{k}={v}" for k, v in opts.items()) if opts else ""),
                             spec.steps, device=device)
    if fitted:
        policy.load_fitted(fitted)
    check_policy_schedule(spec.sampler, spec.steps, policy)  # before anything is fitted or sampled
    return policy


def calibrate(spec: MethodSpec, model, y, cfg: RowSettings):
    """The policy of a configuration with its threshold calibrated so that sampling labels y reaches spec.target
    (`lazydit.pipeline.calibrate`: the method states how its threshold is searched, `Policy.calibration`).

    Returns:
        (the calibrated policy, reached lazy ratio)
    Raises:
        UsageError: the method has no threshold, or the target is out of reach (the message gives the range).
    """
    from lazydit.pipeline import calibrate as calibrate_policy

    device = next(model.parameters()).device
    try:
        return calibrate_policy(build_policy(spec, model, device=device), model, y, spec.target,
                                cfg_scale=cfg.cfg_scale, seed=cfg.seed, sampler=spec.sampler)
    except UsageError as e:
        raise UsageError(f"{spec.text}: {e}") from None


def _eval_config(spec: MethodSpec, cfg: RowSettings, name: str):
    from lazydit.evaluation.driver import EvalConfig

    return EvalConfig(steps=spec.steps, cfg_scale=cfg.cfg_scale, num_samples=cfg.num_samples,
                      batch_size=cfg.batch_size, seed=cfg.seed, name=name, micro_batch=cfg.micro_batch,
                      sampler=spec.sampler)


def reference_samples(model, cfg: RowSettings, run: Path, progress: bool = True) -> np.ndarray:
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


def run_row(spec: MethodSpec, model, extractor, ref: dict, cfg: RowSettings, run: Path, progress: bool = True,
            name: str | None = None) -> dict:
    """One configuration: calibrate (if a target), prepare, sample into resumable parts, score.

    Args:
        spec: the parsed configuration (`parse_spec`).
        model: the model (eval mode) on its device.
        extractor, ref: the evaluator and its reference statistics.
        cfg: what every row of the table shares.
        run: the folder of the row's samples (`<name>.npz`, and its parts while it samples).
        progress: progress bars.
        name: the row's label and file name (default: the configuration string, and its file-safe form).
    Returns:
        the row's record: metrics, lazy ratio, TMACs, seconds, the calibration (target, threshold, ratio reached),
        what the policy fitted, method, family, sampler.
    """
    from lazydit.evaluation.driver import evaluate_config
    from lazydit.pipeline import class_grid_labels

    device = next(model.parameters()).device
    yc = class_grid_labels(model.config.num_classes, cfg.calib_per_class, device)
    extra = {}
    if spec.target is not None:  # calibrated (and fitted) on the class grid
        policy, reached = calibrate(spec, model, yc, cfg)
        extra = dict(target=spec.target, threshold=policy.threshold, calibration_ratio=round(reached, 4))
    else:
        policy = build_policy(spec, model, device=device)
        if policy is not None:
            policy.prepare(model, yc, cfg.cfg_scale, cfg.seed, spec.sampler)
    if policy is not None:
        extra.update(policy.fitted())
    row = evaluate_config(model, _eval_config(spec, cfg, name or spec.text), extractor, ref, policy=policy,
                          out=Path(run) / f"{name or spec.filename}.npz", progress=progress)
    return {**row, **extra, "method": spec.method or "none", "family": spec.family, "sampler_name": spec.sampler}
