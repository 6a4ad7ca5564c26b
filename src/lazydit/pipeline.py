"""High-level runs: sample with or without a caching policy and report the cost; calibrate a gate threshold to a
target lazy ratio."""

import time
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from lazydit.models.cost import sampling_macs
from lazydit.sampling import SAMPLER_LABELS, SAMPLERS, check_policy_schedule
from lazydit.errors import GateMismatchError, NonFiniteError, UsageError
from lazydit.lazy import ForcedPlan, LazyConfig, LazyGates, LazyStats, Policy, apply_lazy, policy_for


@dataclass
class SampleReport:
    """What one sampling run cost: steps, lazy ratio, TMACs per image (paper's way), seconds."""

    name: str
    steps: int
    lazy_ratio: float
    tmacs: float
    seconds: float
    stats: dict = field(default_factory=dict)  # per step / layer / branch ratios (lazy runs)
    lazy: LazyStats | None = field(default=None, repr=False)  # the raw counts (lazy runs)

    def row(self) -> dict:
        return dict(sampler=self.name, steps=self.steps, lazy_ratio=round(self.lazy_ratio, 4),
                    tmacs=self.tmacs, gmacs=round(self.tmacs * 1e3, 4), seconds=round(self.seconds, 3))


def class_grid_labels(num_classes: int, per_class: int, device="cpu") -> torch.Tensor:
    """Labels 0..C-1, each repeated per_class times, ordered so that a grid of C columns shows one class per column."""
    return torch.arange(num_classes, device=device).repeat(per_class)


def sample(model, y, steps: int, *, policy: Policy | None = None, cfg_scale: float = 1.0, seed: int = 0, x=None,
           progress: bool = True, name: str | None = None, micro_batch: int | None = None, sampler: str = "ddim"):
    """Sample with plain DDIM (or another sampler), or with a caching policy attached for the run, and report the
    cost.

    Args:
        model: a DiT.
        y: (B,) labels.
        steps: T.
        policy: the caching Policy for T steps (None: the bare sampler). Gates are a policy like every other
            method: `lazydit.lazy.policy_for(gates, LazyConfig(...))` (reference, look-ahead or router gates), or
            `make_policy("lazy:gates=FILE", T)`; other methods `make_policy("fora:interval=2", T)`, `ForcedPlan`.
        cfg_scale: guidance scale (1.0: none).
        seed: initial-noise seed (same seed, same noise for every sampler).
        x: explicit initial noise (overrides seed).
        progress: progress bar.
        name: label of the report row.
        micro_batch: run the sampler on at most this many images at a time (the initial noise is still drawn for
            the whole batch from `seed`, so the samples are those of one big batch up to float rounding). Small
            chunks keep activations in cache: on CPU, 16 images with CFG run ~1.4x faster per image than 250.
            Per-row decisions do not change, batch-uniform ones (`uniform`) are then taken per chunk. The policy
            is attached per chunk, so with `compile` leave it None.
        sampler: a key of `lazydit.sampling.SAMPLERS`: "ddim", "dpm++2m" and "unipc" run at the policy's timesteps
            (the reference respacing without one), so any policy attaches to them; a spaced one ("dpm++2m-trailing",
            ...) runs at its own and refuses a policy defined on others (UsageError).
    Returns:
        (samples (B, C, H, W), SampleReport)
    """
    if isinstance(policy, LazyGates):
        raise UsageError("sample(policy=...) takes a Policy: a gate bank becomes one with "
                         "lazydit.lazy.policy_for(gates, LazyConfig(...))")
    if getattr(policy, "gates", None) is not None:
        policy.gates.check_steps(steps)  # names the steps the gates were trained for, and how to train others
    if policy is not None and policy.steps != steps:
        raise GateMismatchError(f"the {type(policy).__name__} policy is defined on T={policy.steps} steps, not {steps}")
    if sampler not in SAMPLERS:
        raise UsageError(f"unknown sampler {sampler!r}: choose from {', '.join(SAMPLERS)}")
    check_policy_schedule(sampler, steps, policy)  # a spaced sampler (dpm++2m-trailing, ...) takes its own timesteps
    name = name or _default_name(steps, policy, sampler)
    if micro_batch is not None and y.shape[0] > micro_batch:
        return _sample_chunked(model, y, steps, micro_batch, policy=policy, cfg_scale=cfg_scale, seed=seed, x=x,
                               progress=progress, name=name, sampler=sampler)
    handle = apply_lazy(model, policy) if policy is not None else None
    watch = FiniteWatch(steps)
    try:
        sync = torch.cuda.synchronize if y.is_cuda else (lambda: None)
        sync()
        t0 = time.perf_counter()
        out = SAMPLERS[sampler](model, y, steps, x=x, cfg_scale=cfg_scale, seed=seed, progress=progress, desc=name,
                                callback=watch, timesteps=None if policy is None else policy.timesteps)
        sync()
        seconds = time.perf_counter() - t0
        watch.check()
        stats = handle.stats() if handle else None
    finally:
        if handle:
            handle.remove()
    return out, _report(model, steps, policy, stats, seconds, name)


class FiniteWatch:
    """Sampler callback that stops a run whose samples turn NaN or Inf, naming the first such step.

    On the CPU it checks every step as it ends (free: CPU tensors are already computed) and raises there; on an
    accelerator it keeps one flag per step on the device (no host sync per step) and `check()` reads them once
    after the run. Either way the caller raises before anything is written.
    """

    def __init__(self, steps: int):
        self.steps, self.flags = steps, []

    def __call__(self, info: dict):
        ok = torch.isfinite(info["x_prev"]).all()
        if ok.device.type == "cpu":
            if not ok:
                self._fail(info["i"])
        else:
            self.flags.append(ok)

    def check(self):
        if self.flags:
            ok = torch.stack(self.flags).cpu()
            if not ok.all():
                self._fail(int((~ok).nonzero()[0]))

    def _fail(self, i: int):
        raise NonFiniteError(f"sampling produced NaN or Inf at step {i + 1} of {self.steps}: the model overflows "
                             "(weights far too large, or a dtype too narrow for them) or the guidance scale is "
                             "extreme; nothing was written")


def _default_name(steps: int, policy, sampler: str = "ddim") -> str:
    """DDIM-T, DPM++2M-T, or the policy's label (Lazy-T, FORA-T, ...; "+DPM++2M" when not DDIM)."""
    if policy is None:
        return f"{SAMPLER_LABELS[sampler]}-{steps}"
    return f"{policy.label}-{steps}" + ("" if sampler == "ddim" else f"+{SAMPLER_LABELS[sampler]}")


def _report(model, steps, policy, stats, seconds, name):
    return SampleReport(
        name=name, steps=steps,
        lazy_ratio=stats.lazy_ratio if stats else 0.0,
        tmacs=sampling_macs(model.config, steps, stats,
                            overhead=policy.overhead_macs(model.config) if policy is not None else None) / 1e12,
        seconds=seconds, stats=stats.as_dict() if stats else {}, lazy=stats,
    )


def _sample_chunked(model, y, steps, micro_batch, *, policy, seed, x, progress, name, cfg_scale, sampler):
    """`sample` over chunks of `micro_batch` images with the noise of the whole batch; one merged report."""
    if isinstance(policy, ForcedPlan) and policy.plan.dim() == 4:
        raise ValueError("micro_batch does not split a per-row skip plan: pass the whole batch or a (T, L, 2) plan")
    if x is None:  # the noise `ddim_sample` would draw for the whole batch
        c = model.config
        g = torch.Generator(device=y.device).manual_seed(seed)
        x = torch.randn((y.shape[0], c.in_channels, c.input_size, c.input_size), generator=g, device=y.device)
    outs, reports = [], []
    starts = range(0, y.shape[0], micro_batch)
    for s in tqdm(starts, desc=name or f"sample-{steps}", unit="chunk", disable=not progress, leave=False):
        out, rep = sample(model, y[s : s + micro_batch], steps, policy=policy, x=x[s : s + micro_batch], seed=seed,
                          cfg_scale=cfg_scale, progress=False, name=name, sampler=sampler)
        outs.append(out)
        reports.append(rep)
    lazy = None
    if reports[0].lazy is not None:
        lazy = LazyStats(sum(r.lazy.skipped for r in reports), sum(r.lazy.total for r in reports),
                         reports[0].lazy.kinds)
    return torch.cat(outs), _report(model, steps, policy, lazy, sum(r.seconds for r in reports), name)


def calibrate(policy: Policy, model, y, target: float, *, cfg_scale: float = 1.0, seed: int = 0,
              sampler: str = "ddim", iters: int = 16, tol: float = 0.005, progress: bool = False):
    """Bisect a policy's threshold so that sampling labels y reaches the target lazy ratio: the one calibrator of
    every method (gates, routers, FBCache, TeaCache, a policy of your own that states its `calibration`).

    What the policy fits before sampling (`prepare`, e.g. TeaCache's polynomial) is fitted once, on y, first; every
    threshold tried shares it (`Policy.with_threshold`).
    Args:
        policy: the method to calibrate, defined on T steps; `policy.calibration` says where the search runs.
        model, y: the model and the (B,) labels of the calibration batch.
        target: wanted lazy ratio.
        cfg_scale, seed, sampler: of the sampling the threshold is for.
        iters, tol: at most `iters` bisection steps; stop once within `tol` of the target.
        progress: print each threshold tried and the ratio it reached.
    Returns:
        (the policy at the calibrated threshold, the lazy ratio it reached on y)
    Raises:
        UsageError: the policy has no threshold, or the target is out of reach (more than max(4 tol, 0.02), or 1/T
            for whole-step decisions, from the closest ratio); the message gives the reachable range.
    """
    cal = policy.calibration
    if cal is None:
        raise UsageError(f"{type(policy).__name__} has no threshold to calibrate to a lazy ratio")
    check_policy_schedule(sampler, policy.steps, policy)
    policy.prepare(model, y, cfg_scale, seed, sampler)

    def at(v):
        p = policy.with_threshold(cal.threshold(v))
        _, rep = sample(model, y, policy.steps, policy=p, cfg_scale=cfg_scale, seed=seed, progress=False,
                        sampler=sampler)
        if progress:
            print(f"  threshold {p.threshold:.6g}: lazy ratio {rep.lazy_ratio:.4f} (target {target:.4f})")
        return p, rep.lazy_ratio

    lo, hi, best = cal.lo, cal.hi, None
    for _ in range(iters):
        mid = (lo + hi) / 2
        p, r = at(mid)
        if best is None or abs(r - target) < abs(best[1] - target):
            best = (p, r)
        if abs(r - target) <= tol:
            break
        lo, hi = (mid, hi) if r < target else (lo, mid)
    if abs(best[1] - target) > max(4 * tol, 0.02, 1 / policy.steps if cal.whole_steps else 0):
        reach = [at(v)[1] for v in (cal.lo, cal.hi)]
        parity = getattr(getattr(policy, "gates", None), "parity", False)
        raise UsageError(f"a lazy ratio of {target} is out of reach of {policy.label}-{policy.steps}: thresholds "
                         f"give {min(reach):.3f} to {max(reach):.3f} on the calibration batch"
                         + (" (the reference parity caps it at 0.5)" if parity else ""))
    return best


def calibrate_threshold(model, gates: LazyGates, target: float, y, *, lazy: LazyConfig | None = None,
                        cfg_scale: float = 1.0, seed: int = 0, progress: bool = True):
    """The calibrated threshold of a gate bank (what its file stores): `calibrate` on the bank's policy.

    Args:
        model, gates: the DiT and its gates (T = gates.steps).
        target: wanted lazy ratio (at most ~0.5 with the reference parity).
        y: (B,) labels of the calibration batch.
        lazy: LazyConfig of the sampling the threshold is for (its own threshold is replaced).
    Returns:
        (threshold, reached lazy ratio)
    """
    policy, ratio = calibrate(policy_for(gates, lazy), model, y, target, cfg_scale=cfg_scale, seed=seed,
                              progress=progress)
    return policy.threshold, ratio
