"""`lazydit tune`: the sampler and caching setting with the best images for a compute budget, measured on the
user's own model and device.

Given a model and a budget B, either a share of DDIM-50's TMACs on that model (`budget_kind="tmacs"`) or seconds per
image on this device at the batch size and dtype the user samples with (`budget_kind="seconds"`), `tune`:
1. lists the candidates within the budget (`candidates`): every solver of `lazydit.sampling.SAMPLERS` (DDIM,
   DPM-Solver++(2M), UniPC, on the reference respacing and diffusers' spacings) at every T of the grid that fits;
   FORA (interval 2, 3), TaylorSeer (interval 2-4, order 1-2) and FoCa (interval 3, 5, 7) at the largest T of the
   grid whose static cost fits; FBCache and TeaCache calibrated to the lazy ratio r that fits at each T the bare
   sampler does not fit; for the embedded default also its shipped LazyDiT gates (reference, forecast, every-forecast) at the T they are
   shipped for, calibrated to the r that fits. Costs are exact (`lazydit.models.cost`); a calibrated run's are
   measured from its samples, and a candidate whose measured TMACs exceed the budget is never scored. A seconds
   budget is first turned into TMACs by timing dense DDIM-10 (seconds per MAC on this device), which lists the
   candidates; then every candidate, calibrated, is timed in interleaved rounds (`lazydit.bench.time_interleaved`,
   the project's one timing routine) at the user's batch size, and one whose median seconds per image exceed B is
   never scored (the TMACs list, taken within SECONDS_SLACK of the equivalent, is an upper bound: lazy rows
   cost more seconds than their MACs say).
2. measures quality without a dataset: the distance to the model's own converged sampler (`fine`, e.g. DDIM-250)
   from the same labels and noise: FID between the candidate's and the fine sampler's images in an extractor's
   feature space (the shipped Fashion-MNIST classifier for the embedded default), and PSNR to the same-noise fine
   image. Without an extractor the ranking metric is the MSE to the fine images (PSNR's, the same order). With
   reference statistics of real data (`ref`), every scored row also gets its FID to data, and the report gives
   both rankings of the finalists side by side (the choice stays with the distance to the fine sampler).
3. prunes by successive halving: every candidate is scored on n0 images, the better half (at least two) by the
   ranking metric is scored again on 2 n0, ... up to num_samples. Labels are `driver.eval_labels(num_samples)` and
   batch i (of n0 images, the smallest count, kept fixed) is seeded seed * 1_000_003 + i, as the row engine's
   driver seeds it: the images scored at n are exactly the first n of every larger count.
4. picks the winner of the two best finalists with a paired bootstrap of the ranking metric (rows of the runner-up,
   the best and the fine images resampled together): a winner when the interval of (runner-up - best) excludes 0,
   else a tie, settled for the cheaper (fewer TMACs; fewer seconds for a seconds budget).
5. writes recipe.json, frontier.md / .csv / .json / .png and report.md into the run folder; rows/ holds what every
   candidate sampled (resumable parts) and one JSON per (candidate, n), so a killed tune continues where it stopped
   and gives the same recipe.

`load_recipe(folder)` reads a recipe back: `.sampler`, `.steps`, `.cfg_scale`, `.policy(model)` (the calibrated
policy; refuses a model whose weights differ from the tuned one).
"""

import json
import math
import os
import platform
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from lazydit.errors import UsageError
from lazydit.evaluation.metrics import fid_of_samples
from lazydit.files import weights_fingerprint, write_text_atomic

RECIPE_FORMAT = "lazydit-recipe"
STEPS_GRID = (5, 6, 7, 8, 10, 12, 14, 16, 20, 25, 30, 40, 50)
STATIC_METHODS = ("fora:interval=2", "fora:interval=3",
                  *(f"taylorseer:interval={i},order={o}" for i in (2, 3, 4) for o in (1, 2)),
                  *(f"foca:interval={i}" for i in (3, 5, 7)))
RESIDUAL_METHODS = ("fbcache", "teacache")
GATE_KINDS = {"default": "reference", "default-forecast": "forecast", "default-every-forecast": "every-forecast"}
GATE_MAX_RATIO = {"reference": 0.48, "forecast": 0.48, "every-forecast": 0.8}  # parity caps the first two at 0.5
RATIO_MARGIN = 0.03  # calibrate a little past the ratio that fits: the eval images' ratio differs from the grid's
MAX_RATIO = 0.8
GATE_RECIPE = dict(forecast=1, lr=1e-4, rho_attn=1e-2, rho_mlp=1e-2, data_free=True)  # gates tune trains: the
# forecast variant of docs/beyond_paper.md, on the model's own trajectories
GATE_RATIOS = (0.25, 0.48)  # tune trains gates for the T whose fitting lazy ratio lies in this range (two at most)
BUDGET_KINDS = ("tmacs", "seconds")
PROBE_STEPS = 10  # the dense DDIM run a seconds budget is converted to TMACs with
SECONDS_SLACK = 1.1  # a seconds budget lists the candidates within this many times its TMACs equivalent


@dataclass(frozen=True)
class TuneSettings:
    """What a tune's results depend on (a resumed run must have the same)."""

    budget: float  # share of DDIM-50's TMACs on the model, or seconds per image (budget_kind)
    budget_kind: str = "tmacs"  # "tmacs" or "seconds"
    num_samples: int = 256  # images of the final round
    n0: int = 64  # images of the first round (and the sampling batch)
    fine: str = "ddim-250"  # the converged sampler quality is measured against
    cfg_scale: float = 1.5
    seed: int = 0
    micro_batch: int | None = 16  # images per sampler call (the same samples; a compute detail)
    reps: int = 200  # bootstrap draws of the winner's interval
    level: float = 0.95
    calib_per_class: int = 4
    timing_repeats: int = 3  # interleaved timed rounds per candidate (seconds budgets)
    train_gates: bool = False  # train forecast gates for this model (GATE_RECIPE) and make them candidates
    gate_iters: int = 200  # their optimiser steps, of gate_batch trajectories from a pool of gate_pool
    gate_batch: int = 32
    gate_pool: int = 256

    @property
    def levels(self) -> list:
        """The image counts of the rounds: n0, 2 n0, ..., num_samples."""
        out, n = [], min(self.n0, self.num_samples)
        while n < self.num_samples:
            out.append(n)
            n *= 2
        return out + [self.num_samples]


def check_budget(budget: float, kind: str = "tmacs"):
    """Refuse a budget tune does not take (an `OptionRangeError`: the CLI exits 2)."""
    from lazydit.errors import OptionRangeError

    if kind not in BUDGET_KINDS:
        raise OptionRangeError(f"--budget-kind {kind!r}: choose {' or '.join(BUDGET_KINDS)}")
    if not (isinstance(budget, (int, float)) and math.isfinite(budget) and budget > 0):
        raise OptionRangeError(f"--budget {budget}: " + ("seconds per image must be > 0" if kind == "seconds" else
                                                         "a share of DDIM-50's TMACs lies in (0, 1]"))
    if kind == "tmacs" and budget > 1:
        raise OptionRangeError(f"--budget {budget}: a share of DDIM-50's TMACs lies in (0, 1]")


# ---------------------------------------------------------------- candidates


def _branch_macs(cfg) -> int:
    from lazydit.models.cost import module_macs

    m = module_macs(cfg)
    return cfg.depth * (m["attn"] + m["mlp"])  # what one step saves when every branch of every block skips


def static_macs(policy, cfg) -> float:
    """Exact MACs per image of a static schedule (FORA, TaylorSeer): the steps it computes, the steps it skips and
    its overhead (`Policy.overhead_macs`), as `sampling_macs` counts a run of it."""
    from lazydit.models.cost import sampling_macs

    T = policy.steps
    skipped = sum(not policy.computes(k) for k in range(T))
    return sampling_macs(cfg, T) - skipped * _branch_macs(cfg) + T * policy.overhead_macs(cfg)


def ratio_that_fits(cfg, steps: int, overhead: int, budget_macs: float) -> float:
    """The lazy ratio at which a run of `steps` steps with `overhead` MACs per forward costs `budget_macs` (<= 0:
    the bare sampler already fits)."""
    from lazydit.models.cost import sampling_macs

    return (sampling_macs(cfg, steps) + steps * overhead - budget_macs) / (steps * _branch_macs(cfg))


def candidates(model, budget_macs: float, shipped_default: bool, steps_grid=STEPS_GRID):
    """The configuration strings (`rows.parse_spec`) whose cost fits the budget, and what was left out and why.

    Returns:
        (list of (configuration, estimated MACs per image), list of dict(what, why))
    """
    from lazydit.assets import SHIPPED_GATES
    from lazydit.evaluation.rows import build_policy, parse_spec
    from lazydit.models.cost import sampling_macs
    from lazydit.sampling import SAMPLERS

    cfg, out, skipped = model.config, [], []
    bare_fits = [T for T in steps_grid if sampling_macs(cfg, T) <= budget_macs]
    for s in SAMPLERS:  # every solver and spacing (`lazydit.sampling.SAMPLERS`) the spacing can take
        for T in bare_fits:
            try:
                parse_spec(f"{s}-{T}")
            except UsageError:
                continue
            out.append((f"{s}-{T}", sampling_macs(cfg, T)))
    over = [T for T in steps_grid if T not in bare_fits]
    if over:
        skipped.append(dict(what=f"the bare solvers at T in {over}", why="over the budget"))
    for m in STATIC_METHODS:
        fits = [(T, c) for T in steps_grid
                for c in [static_macs(build_policy(parse_spec(f"ddim-{T}+{m}"), model), cfg)] if c <= budget_macs]
        if not fits:
            skipped.append(dict(what=m, why="over the budget at every T of the grid"))
            continue
        T, c = max(fits)  # the most steps of this schedule that fit; fewer steps of it cost less and lie further
        out.append((f"ddim-{T}+{m}", c))  # from the fine sampler, as a bare sampler with fewer steps
        if len(fits) > 1:
            skipped.append(dict(what=f"{m} at T in {[t for t, _ in fits[:-1]]}",
                                why=f"within the budget but not scored: T={T} of the same schedule fits"))
    cap = min(MAX_RATIO, (cfg.depth - 1) / cfg.depth - 0.02)  # the first block always computes
    for m in RESIDUAL_METHODS:
        ovh = build_policy(parse_spec(f"ddim-10+{m}"), model).overhead_macs(cfg)
        for T in over:
            r = math.ceil((ratio_that_fits(cfg, T, ovh, budget_macs) + RATIO_MARGIN) * 100) / 100
            if r <= cap:
                out.append((f"ddim-{T}+{m}:target={r:g}", sampling_macs(cfg, T) - r * T * _branch_macs(cfg)
                            + T * ovh))
            else:
                skipped.append(dict(what=f"ddim-{T}+{m}", why=f"needs a lazy ratio of {r:.2f} (> {cap:.2f})"))
    if shipped_default:
        for gates, kind in GATE_KINDS.items():
            for T in SHIPPED_GATES[kind]:
                ovh = build_policy(parse_spec(f"ddim-{T}+lazy:gates={gates}"), model).overhead_macs(cfg)
                r = math.ceil((ratio_that_fits(cfg, T, ovh, budget_macs) + RATIO_MARGIN) * 100) / 100
                if r <= RATIO_MARGIN + 0.01:
                    skipped.append(dict(what=f"ddim-{T}+lazy:gates={gates}",
                                        why=f"DDIM-{T} fits the budget bare: gates would only remove compute"))
                elif r > GATE_MAX_RATIO[kind]:
                    skipped.append(dict(what=f"ddim-{T}+lazy:gates={gates}",
                                        why=f"needs a lazy ratio of {r:.2f} (these gates reach "
                                            f"{GATE_MAX_RATIO[kind]:.2f})"))
                else:
                    out.append((f"ddim-{T}+lazy:gates={gates},target={r:g}",
                                sampling_macs(cfg, T) - r * T * _branch_macs(cfg) + T * ovh))
    return out, skipped


# ---------------------------------------------------------------- metrics


def mse(a, b) -> float:
    """Mean squared error of two row-aligned uint8 image sets."""
    return float(((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2).mean())


def paired_bootstrap(metric, a, b, fine, reps: int = 200, seed: int = 0, level: float = 0.95) -> dict:
    """Paired-bootstrap interval of metric(a, fine) - metric(b, fine) for row-aligned sets a, b, fine (the same
    labels and noise row by row): each draw resamples the same rows of all three, so the shared noise cancels.

    (`metrics.bootstrap_fid_draws` keeps its reference statistics fixed; here the reference is a sample of the same
    noise too, so its rows are resampled with the others.) The interval is `metrics.paired_interval`'s.
    """
    from lazydit.evaluation.metrics import paired_interval

    rng = np.random.default_rng(seed)
    n = len(fine)
    da, db = np.empty(reps), np.empty(reps)
    for i in range(reps):
        idx = rng.integers(0, n, n)
        da[i], db[i] = metric(a[idx], fine[idx]), metric(b[idx], fine[idx])
    return paired_interval(metric(a, fine), metric(b, fine), da, db, level)


# ---------------------------------------------------------------- sampling, resumable


def _sample(model, spec, policy, st: TuneSettings, n: int, rows: Path, name: str, fp: str, progress: bool):
    """The first n images of a configuration (batches of n0, the driver's labels and seeds), from and into its
    resumable parts `rows/<name>.parts/`. Returns (images (n, H, W, C) uint8, LazyStats or None, seconds)."""
    import torch
    from tqdm.auto import tqdm

    from lazydit.data.vae import own_decoder
    from lazydit.evaluation.driver import eval_labels
    from lazydit.images import to_uint8
    from lazydit.lazy import LazyStats
    from lazydit.pipeline import sample
    from lazydit.sampling.parts import SampleParts

    device = next(model.parameters()).device
    decode = own_decoder(model)
    bs = min(st.n0, st.num_samples)
    y_all = eval_labels(st.num_samples, model.config.num_classes, st.seed)
    meta = dict(config=spec.text, sampler=spec.sampler, steps=spec.steps, cfg_scale=st.cfg_scale, seed=st.seed,
                num_samples=st.num_samples, batch_size=bs, model=fp,
                policy=None if policy is None else policy.describe())
    parts = SampleParts(rows / f"{name}.npz", meta).prepare()
    images, seconds, skipped, total, kinds = [], 0.0, None, None, None
    for i in tqdm(range(math.ceil(n / bs)), desc=spec.text, unit="batch", disable=not progress, leave=False):
        done = parts.read(f"part_{i:05d}")
        if done is None:
            y = y_all[i * bs : (i + 1) * bs]
            x, rep = sample(model, y.to(device), spec.steps, policy=policy, cfg_scale=st.cfg_scale,
                            seed=st.seed * 1_000_003 + i, progress=False, micro_batch=st.micro_batch,
                            sampler=spec.sampler)
            img = to_uint8(x if decode is None else decode(x))
            info = dict(seconds=rep.seconds)
            if rep.lazy is not None:
                info.update(skipped=rep.lazy.skipped.tolist(), total=rep.lazy.total.tolist(),
                            kinds=list(rep.lazy.kinds))
            parts.write(f"part_{i:05d}", img, y.numpy(), info)
        else:
            img, _, info = done
        images.append(img)
        seconds += info["seconds"]
        if "skipped" in info:
            s, t = torch.tensor(info["skipped"]), torch.tensor(info["total"])
            skipped = s if skipped is None else skipped + s
            total = t if total is None else total + t
            kinds = tuple(info["kinds"])
    stats = LazyStats(skipped, total, kinds) if skipped is not None else None
    return np.concatenate(images)[:n], stats, seconds


# ---------------------------------------------------------------- the search


class _Stop(Exception):
    """The search's time (or run count) is spent."""


def _settings_diff(saved: dict, now: dict) -> list:
    return [f"{k}: saved {saved.get(k)!r}, now {now.get(k)!r}" for k in dict.fromkeys([*now, *saved])
            if saved.get(k) != now.get(k)]


def default_extractor(model):
    """The shipped Fashion-MNIST classifier when `model` is the embedded default (same weights), else None."""
    if not is_shipped_default(model):
        return None
    from lazydit.evaluation.fmnist import default_classifier

    return default_classifier(next(model.parameters()).device)


def denoiser_fingerprint(model) -> str:
    """The fingerprint a recipe keeps of its model: the weights of the network that denoises (a diffusers wrapper's
    transformer, without a text-conditional wrapper's caption bank), so that a pipeline's transformer matches."""
    return weights_fingerprint(getattr(model, "transformer", model))


def is_shipped_default(model) -> bool:
    from lazydit.assets import default_model

    try:
        return weights_fingerprint(model) == weights_fingerprint(default_model())
    except (FileNotFoundError, RuntimeError, ValueError):
        return False


def tune(model, budget: float, out, *, budget_kind: str = "tmacs", num_samples: int = 256, n0: int = 64,
         fine: str = "ddim-250", cfg_scale: float = 1.5, seed: int = 0, max_minutes: float | None = None,
         extractor="auto", model_name: str | None = None, reps: int = 200, micro_batch: int | None = 16,
         configs: list | None = None, max_runs: int | None = None, progress: bool = True, log=print, ref=None,
         timing_repeats: int = 3, train_gates: bool | None = None, gate_iters: int = 200) -> dict:
    """The sampler and caching setting with the best images within a budget on `model` (see the module docstring);
    writes the recipe and the frontier into `out`, resumably.

    Args:
        model: the model (eval mode) on its device (`lazydit.loading.load_model`).
        budget: a share of DDIM-50's TMACs on this model, in (0, 1] ("tmacs"), or seconds per image ("seconds").
        out: the run folder (rows/ and the outputs).
        budget_kind: "tmacs" or "seconds" (measured on this device, at `micro_batch` images per call and the model's
            dtype: convert the model to the dtype you sample with first).
        num_samples, n0: images of the final and of the first round (the first round's count is the batch).
        fine: the converged bare sampler quality is measured against (SAMPLER-T).
        cfg_scale, seed: guidance and the labels / noise every candidate shares.
        max_minutes: stop the search then; candidates not scored are listed as not tried.
        extractor: a feature extractor (`.features(x)`, as `evaluation.features.extract_features` takes), "auto"
            (the shipped Fashion-MNIST classifier for the embedded default, else none) or None: without one the
            ranking metric is the MSE (PSNR) to the fine images.
        model_name: the model's name in the recipe (default: model.name, else its class).
        reps: bootstrap draws of the final comparison.
        configs: score these configuration strings instead of `candidates` (the budget still applies).
        max_runs: stop after scoring this many (candidate, n) pairs in this call (as max_minutes; for tests).
        ref: reference statistics of real data for the extractor (`evaluation.features.load_reference`, or its
            path): every scored row also gets its FID to data, and the report ranks the finalists both ways.
        timing_repeats: interleaved timed rounds per candidate (seconds budgets).
        train_gates: train data-free forecast gates (GATE_RECIPE, `gate_iters` steps) for the step counts
            `gate_steps` picks and make them candidates; kept in out/gates/ and reused (a killed training resumes).
            None: for every model but the embedded default, whose shipped gates are candidates already.
    Returns:
        the recipe (dict), as written to out/recipe.json.
    """
    from tqdm.auto import tqdm

    from lazydit.evaluation.metrics import feature_stats, frechet_distance, paired_psnr
    from lazydit.evaluation.rows import RowSettings, build_policy, calibrate, parse_spec
    from lazydit.models.cost import sampling_macs
    from lazydit.pipeline import class_grid_labels

    check_budget(budget, budget_kind)
    if num_samples < 2 or n0 < 2:
        raise UsageError(f"--num-samples and the first round need at least 2 images, got {num_samples} and {n0}")
    fine_spec = parse_spec(fine)
    if fine_spec.method is not None:
        raise UsageError(f"--fine must be a bare sampler (e.g. ddim-250), not {fine!r}")
    st = TuneSettings(budget=float(budget), budget_kind=budget_kind, num_samples=num_samples, n0=min(n0, num_samples),
                      fine=fine, cfg_scale=cfg_scale, seed=seed, micro_batch=micro_batch, reps=reps,
                      timing_repeats=timing_repeats,
                      train_gates=(not is_shipped_default(model)) if train_gates is None else bool(train_gates),
                      gate_iters=gate_iters)
    out = Path(out)
    rows = out / "rows"
    rows.mkdir(parents=True, exist_ok=True)
    t_start = time.time()
    deadline = None if max_minutes is None else t_start + 60 * max_minutes
    fp = weights_fingerprint(model)
    shipped = is_shipped_default(model)
    if isinstance(extractor, str) and extractor == "auto":
        extractor = default_extractor(model) if shipped else None
    metric_name = "fid_to_fine" if extractor is not None else "mse_to_fine"
    ref = _reference(ref, extractor)
    state = {**asdict(st), "model": fp, "metric": metric_name, "configs": configs,
             "ref": None if ref is None else ref["meta"].get("fingerprint", "given")}
    state_path = out / "tune.json"
    if state_path.exists():
        diff = _settings_diff(json.loads(state_path.read_text()), state)
        if diff:
            raise UsageError(f"{out} holds a tune with other settings ({'; '.join(diff)}): use another --out, or the "
                             "saved settings to resume it")
    else:
        write_text_atomic(state_path, json.dumps(state, indent=1))
    cfg = model.config
    ddim50 = sampling_macs(cfg, 50)
    budget_macs = st.budget * ddim50
    device = next(model.parameters()).device
    timing_path = rows / "timing.json"
    timed = json.loads(timing_path.read_text()) if timing_path.exists() else {"rows": {}}
    bs = st.micro_batch or min(st.n0, st.num_samples)

    def time_rows(rows_to_time):
        """Median seconds per image of TimedRows not timed yet (interleaved; kept in rows/timing.json)."""
        from lazydit.bench import time_interleaved
        from lazydit.evaluation.driver import eval_labels

        todo = [r for r in rows_to_time if r.name not in timed["rows"]]
        if todo:
            y = eval_labels(bs, cfg.num_classes, st.seed).to(device)
            res = time_interleaved(todo, y, cfg_scale=st.cfg_scale, repeats=st.timing_repeats, micro_batch=bs)
            for name, r in res.items():
                timed["rows"][name] = dict(seconds_per_image=float(np.median(r["times"])) / bs, times=r["times"],
                                           batch=bs)
            write_text_atomic(timing_path, json.dumps(timed, indent=1))
        return {r.name: timed["rows"][r.name]["seconds_per_image"] for r in rows_to_time}

    seconds_per_mac = None
    if st.budget_kind == "seconds":
        from lazydit.bench import TimedRow

        probe = f"ddim-{PROBE_STEPS}"
        log(f"tune: timing {probe} at {bs} images per call to turn {st.budget:g} s per image into TMACs")
        seconds_per_mac = time_rows([TimedRow(probe, model, PROBE_STEPS)])[probe] / sampling_macs(cfg, PROBE_STEPS)
        budget_macs = st.budget / seconds_per_mac

    # a seconds budget lists within SECONDS_SLACK x its TMACs equivalent: seconds per MAC vary a little with T (fixed
    # costs per step), and the timing below decides
    listing = budget_macs * (SECONDS_SLACK if st.budget_kind == "seconds" else 1.0)
    if configs is None:
        cands, not_tried = candidates(model, listing, shipped)
    else:
        cands, not_tried = [], []
        for text in configs:
            s = parse_spec(text)
            p = build_policy(s, model)
            est = sampling_macs(cfg, s.steps) if p is None else (
                static_macs(p, cfg) if hasattr(p, "computes") else sampling_macs(cfg, s.steps) + s.steps * p.overhead_macs(cfg))
            if s.target is not None:
                est -= s.target * s.steps * _branch_macs(cfg)
            if est <= listing or st.budget_kind == "seconds":  # a given configuration is timed whatever its MACs
                cands.append((text, est))
            else:
                not_tried.append(dict(what=text, why=f"estimated {est / 1e12:.6f} TMACs: over the budget"))
    what = (f"{st.budget:g} x DDIM-50 = {budget_macs / 1e12:.6f} TMACs" if st.budget_kind == "tmacs" else
            f"{st.budget:g} s per image (~{budget_macs / 1e12:.6f} TMACs at dense speed)")
    log(f"tune: {len(cands)} candidates within {what}; rounds at {st.levels} images; quality: "
        f"{metric_name.replace('_', ' ')} ({fine})")

    runs = [0]
    fine_images = {}
    feats_cache = {}

    def check_time():
        if (deadline is not None and time.time() > deadline) or (max_runs is not None and runs[0] >= max_runs):
            raise _Stop

    def features(key, images):
        if extractor is None:
            return images
        if key not in feats_cache:
            from lazydit.evaluation.features import extract_features

            feats_cache[key] = extract_features(extractor, images, progress=False)["pool"]
        return feats_cache[key]

    def metric(a, b):
        return fid_of_samples(a, b) if extractor is not None else mse(a, b)

    def fine_at(n):
        if n not in fine_images:
            imgs, _, _ = _sample(model, fine_spec, None, st, n, rows, f"fine-{fine_spec.filename}", fp, progress)
            fine_images[n] = imgs
        return fine_images[n]

    def policy_of(spec):
        """(policy, calibration dict) of a configuration, calibrated once (rows/<name>.calib.json)."""
        path = rows / f"{_file(spec)}.calib.json"
        if path.exists():
            cal = json.loads(path.read_text())
        else:
            check_time()
            yc = class_grid_labels(cfg.num_classes, st.calib_per_class, device)
            rs = RowSettings(cfg_scale=st.cfg_scale, seed=st.seed, calib_per_class=st.calib_per_class)
            cal = {}
            if spec.target is not None:
                try:
                    p, reached = calibrate(spec, model, yc, rs)
                    cal = dict(threshold=p.threshold, calibration_ratio=round(reached, 4), fitted=p.fitted())
                except UsageError as e:
                    cal = dict(error=str(e))
            else:
                p = build_policy(spec, model, device=device)
                if p is not None:
                    p.prepare(model, yc, st.cfg_scale, st.seed, spec.sampler)
                    cal = dict(threshold=getattr(p, "threshold", None), fitted=p.fitted())
            write_text_atomic(path, json.dumps(cal, indent=1))
        if "error" in cal:
            return None, cal
        return build_policy(spec, model, cal.get("threshold") if spec.target is not None else None, device=device,
                            fitted=cal.get("fitted")), cal

    if st.train_gates and configs is None:
        cands += _trained_candidates(model, st, out, budget_macs, not_tried, check_time, progress, log)

    timed_s = {}  # config -> timed seconds per image (seconds budgets)
    if st.budget_kind == "seconds":
        from lazydit.bench import TimedRow

        trows = []
        for text, _ in tqdm(cands, desc="calibrating", unit="config", disable=not progress):
            spec = parse_spec(text)
            policy, cal = policy_of(spec)
            if "error" not in cal:
                trows.append(TimedRow(text, model, spec.steps, policy, spec.sampler))
        log(f"tune: timing {len(trows)} candidates ({st.timing_repeats} interleaved rounds of {bs} images)")
        timed_s = time_rows(trows)
        kept = []
        for text, est in cands:
            if text in timed_s and timed_s[text] > st.budget:
                not_tried.append(dict(what=text, why=f"measured {timed_s[text]:.4g} s per image: over the budget "
                                                     "(not scored)"))
            else:
                kept.append((text, est))
        cands = kept

    def score(text, n):
        """The record of a configuration at n images (read back if this folder has it)."""
        spec = parse_spec(text)
        path = rows / f"{_file(spec)}-n{n}.json"
        if path.exists():
            return json.loads(path.read_text())
        policy, cal = policy_of(spec)
        if "error" in cal:
            return dict(config=text, n=n, error=cal["error"])
        check_time()
        t0 = time.time()
        images, stats, seconds = _sample(model, spec, policy, st, n, rows, _file(spec), fp, progress)
        overhead = policy.overhead_macs(cfg) if policy is not None else None
        tmacs = sampling_macs(cfg, spec.steps, stats, overhead=overhead) / 1e12
        rec = dict(config=text, family=spec.family, method=spec.method or "none", sampler_name=spec.sampler,
                   steps=spec.steps, n=n, tmacs=tmacs, budget_share=tmacs * 1e12 / ddim50,
                   lazy_ratio=round(stats.lazy_ratio, 4) if stats else 0.0, seconds_per_image=seconds / n,
                   threshold=cal.get("threshold"), fitted=cal.get("fitted") or {},
                   calibration_ratio=cal.get("calibration_ratio"), target=spec.target,
                   timed_seconds_per_image=timed_s.get(text))
        over = (tmacs * 1e12 > budget_macs if st.budget_kind == "tmacs"
                else timed_s.get(text, math.inf) > st.budget)
        if over:
            rec["over_budget"] = True  # measured over the budget: never scored
        else:
            fine_ref = fine_at(n)
            p = paired_psnr(images, fine_ref)
            rec.update(psnr_to_fine=p["psnr"], mse_to_fine=p["mse"])
            if extractor is not None:
                rec["fid_to_fine"] = fid_of_samples(features((text, n), images), features(("fine", n), fine_ref))
            if data_ref is not None:
                mu, sigma = feature_stats(features((text, n), images))
                rec["fid_to_ref"] = frechet_distance(mu, sigma, data_ref["mu"], data_ref["sigma"])
        rec["wall_s"] = round(time.time() - t0, 2)
        write_text_atomic(path, json.dumps(rec, indent=1))
        runs[0] += 1
        return rec

    data_ref = ref

    def cost(r):
        """What "cheaper" means for this budget: seconds per image (timed) or TMACs."""
        return r["timed_seconds_per_image"] if st.budget_kind == "seconds" else r["tmacs"]

    def key(r):
        return (r[metric_name], cost(r), r["config"])

    alive = [c for c, _ in cands]
    scored = {}  # config -> list of records, one per n
    final, final_n, stopped = [], None, None
    for li, n in enumerate(st.levels):
        level = []
        try:
            for text in tqdm(alive, desc=f"round {li + 1}/{len(st.levels)} ({n} images)", unit="config",
                             disable=not progress):
                rec = score(text, n)
                scored.setdefault(text, []).append(rec)
                if "error" in rec:
                    not_tried.append(dict(what=text, why=rec["error"]))
                elif rec.get("over_budget"):
                    not_tried.append(dict(what=text, why=f"measured {rec['tmacs']:.6f} TMACs at {n} images: over "
                                                         "the budget (not scored)"))
                else:
                    level.append(rec)
        except _Stop:
            stopped = n
            for text in alive:
                if not (text in scored and scored[text][-1]["n"] == n):
                    not_tried.append(dict(what=text, why=f"not scored at {n} images: the search's time "
                                                         "(--max-minutes) ran out"))
            if final_n is None:  # the first round was cut short: rank what it scored
                final, final_n = sorted(level, key=key), n
            break
        final, final_n = sorted(level, key=key), n
        if n == st.num_samples:
            break
        alive = [r["config"] for r in final[: max(2, math.ceil(len(final) / 2))]]
        for r in final[len(alive):]:
            r["pruned_at"] = n
    if not final:
        raise UsageError("no candidate was scored within the budget" + (
            " before --max-minutes ran out" if stopped else "") + f": {'; '.join(d['what'] + ': ' + d['why'] for d in not_tried[-5:])}")

    # winner and ties
    best = final[0]
    decision, interval, runner = "only candidate", None, None
    chosen = best
    if len(final) > 1:
        runner = final[1]
        fine_final = fine_at(final_n)
        a = features((runner["config"], final_n), _images(model, runner, st, rows, fp, final_n))
        b = features((best["config"], final_n), _images(model, best, st, rows, fp, final_n))
        interval = paired_bootstrap(metric, a, b, features(("fine", final_n), fine_final), st.reps, st.seed,
                                    st.level)
        if interval["lo"] > 0:
            decision = "winner"
        else:
            decision = "tie"
            chosen = min((best, runner), key=lambda r: (cost(r), r[metric_name]))
    recipe = _recipe(model, model_name, fp, chosen, best, runner, decision, interval, st, metric_name, final_n,
                     ddim50, budget_macs, not_tried, stopped, extractor, device)
    recipe["budget"]["seconds_per_mac"] = seconds_per_mac
    if st.budget_kind == "seconds":
        recipe["budget"].update(seconds=st.budget, batch_size=bs, dtype=str(next(model.parameters()).dtype))
    recipe["seconds_per_image"] = chosen.get("timed_seconds_per_image") or chosen["seconds_per_image"]
    if data_ref is not None:
        recipe["rankings"] = _rankings(final, metric_name)
    table = _frontier_rows(scored, final, chosen, metric_name)
    write_outputs(out, recipe, table, st, metric_name)
    log(f"tune: {chosen['config']} ({decision}), {chosen['tmacs']:.6f} TMACs ({chosen['budget_share']:.1%} of "
        f"DDIM-50), {metric_name.replace('_', ' ')} {chosen[metric_name]:.4g} on {final_n} images "
        f"({time.time() - t_start:.0f} s)")
    return recipe


def _reference(ref, extractor):
    """Reference statistics of real data (a dict or a path) checked against the extractor, or None."""
    if ref is None:
        return None
    if extractor is None:
        raise UsageError("--ref needs a feature extractor (--extractor): FID to data is computed in its features")
    if not isinstance(ref, dict):
        from lazydit.evaluation.features import load_reference

        try:
            ref = load_reference(ref)
        except (FileNotFoundError, ValueError) as e:
            raise UsageError(f"--ref: {e}") from None
    want = ref.get("meta", {}).get("fingerprint")
    if want is not None and hasattr(extractor, "state_dict") and weights_fingerprint(extractor) != want:
        raise UsageError(f"--ref: these statistics were computed with another feature extractor (fingerprint {want}, "
                         f"the extractor's {weights_fingerprint(extractor)})")
    return ref


def _rankings(final: list, metric_name: str) -> dict:
    """The finalists ranked by the distance to the fine sampler and by FID to data, and where the two agree."""
    by_fine = [r["config"] for r in sorted(final, key=lambda r: r[metric_name])]
    by_ref = [r["config"] for r in sorted(final, key=lambda r: r["fid_to_ref"])]
    n = len(final)
    pos = {c: i for i, c in enumerate(by_ref)}
    concordant = sum((pos[by_fine[i]] < pos[by_fine[j]]) for i in range(n) for j in range(i + 1, n))
    pairs = n * (n - 1) // 2
    return dict(by_fine=by_fine, by_ref=by_ref, same_best=by_fine[0] == by_ref[0],
                kendall_tau=None if pairs == 0 else round(2 * concordant / pairs - 1, 4),
                fid_to_ref={r["config"]: r["fid_to_ref"] for r in final})


def _trained_candidates(model, st, out: Path, budget_macs: float, not_tried: list, check_time, progress, log) -> list:
    """Train (or reuse) forecast gates for the step counts `gate_steps` picks; their calibrated candidates."""
    from lazydit.evaluation.rows import build_policy, parse_spec
    from lazydit.models.cost import sampling_macs

    cfg, out_cands = model.config, []
    steps = gate_steps(cfg, budget_macs)
    if not steps:
        not_tried.append(dict(what="trained gates", why="no step count of the grid needs a lazy ratio in "
                                                        f"{GATE_RATIOS[0]:g}-{GATE_RATIOS[1]:g} at this budget"))
    for T in steps:
        folder = out / "gates" / f"forecast-T{T}"
        try:
            check_time()
            log(f"tune: training forecast gates for T={T} ({st.gate_iters} steps, data-free) in {folder}")
            path = train_tune_gates(model, T, folder, iters=st.gate_iters, batch_size=st.gate_batch,
                                    pool=st.gate_pool, cfg_scale=st.cfg_scale, seed=st.seed, progress=progress,
                                    callback=lambda info: check_time())
        except _Stop:
            not_tried.append(dict(what=f"forecast gates for T={T}", why="training stopped by --max-minutes (its "
                                  "checkpoint is kept: run tune again to continue it)"))
            continue
        text = f"ddim-{T}+lazy:gates={path}"
        ovh = build_policy(parse_spec(text), model).overhead_macs(cfg)
        r = math.ceil((ratio_that_fits(cfg, T, ovh, budget_macs) + RATIO_MARGIN) * 100) / 100
        if r > GATE_MAX_RATIO["forecast"]:
            not_tried.append(dict(what=text, why=f"needs a lazy ratio of {r:.2f} (these gates reach "
                                                 f"{GATE_MAX_RATIO['forecast']:.2f})"))
            continue
        out_cands.append((f"{text},target={r:g}", sampling_macs(cfg, T) - r * T * _branch_macs(cfg) + T * ovh))
    return out_cands


def _file(spec) -> str:
    """A configuration's file stem in rows/: its sanitised text, shortened with a hash when long (gate paths)."""
    import hashlib

    name = spec.filename
    return name if len(name) <= 120 else f"{name[:80]}-{hashlib.sha1(spec.text.encode()).hexdigest()[:12]}"


def gate_steps(cfg, budget_macs: float, steps_grid=STEPS_GRID) -> list:
    """The step counts tune trains gates for: of the T whose bare sampler is over the budget and whose fitting lazy
    ratio lies in GATE_RATIOS, the smallest and the largest."""
    from lazydit.models.cost import gate_macs, sampling_macs

    fits = [T for T in steps_grid if sampling_macs(cfg, T) > budget_macs
            and GATE_RATIOS[0] <= ratio_that_fits(cfg, T, gate_macs(cfg), budget_macs) + RATIO_MARGIN
            <= GATE_RATIOS[1]]
    return sorted({fits[0], fits[-1]}) if fits else []


def train_tune_gates(model, steps: int, folder: Path, *, iters: int, batch_size: int, pool: int, cfg_scale: float,
                     seed: int, progress: bool, callback=None) -> Path:
    """Data-free forecast gates for `steps` (GATE_RECIPE) in `folder`, resumed from its checkpoint; returns the gate
    file (reused when the folder holds it)."""
    from lazydit.training.gates import GateTrainConfig, train_gates
    from lazydit.training.trajectories import trajectory_data

    path = folder / "gates.safetensors"
    if path.is_file():
        return path
    cfg = GateTrainConfig(steps=steps, iters=iters, batch_size=batch_size, seed=seed, out=str(folder), ckpt_every=25,
                          resume=(folder / "checkpoint.pt").is_file(), **GATE_RECIPE)
    data, source = trajectory_data(model, steps, batch_size, size=pool, cfg_scale=cfg_scale, seed=seed,
                                   progress=progress)
    train_gates(model, data, cfg, progress=progress, extra_meta=dict(source=source, trained_by="lazydit tune"),
                callback=callback)
    return path


def _images(model, rec, st, rows, fp, n):
    """A scored configuration's first n images, from its parts (nothing is sampled again)."""
    from lazydit.evaluation.rows import build_policy, parse_spec

    spec = parse_spec(rec["config"])
    policy = build_policy(spec, model, rec.get("threshold") if spec.target is not None else None,
                          device=next(model.parameters()).device, fitted=rec.get("fitted"))
    return _sample(model, spec, policy, st, n, rows, _file(spec), fp, progress=False)[0]


def _machine(device) -> dict:
    import torch

    d = dict(platform=platform.platform(), python=platform.python_version(), torch=torch.__version__,
             device=str(device), cpus=os.cpu_count())
    if str(device).startswith("cuda"):
        d["gpu"] = torch.cuda.get_device_name(device)
    return d


def _recipe(model, model_name, fp, chosen, best, runner, decision, interval, st, metric_name, final_n, ddim50,
            budget_macs, not_tried, stopped, extractor, device) -> dict:
    from lazydit.evaluation.rows import parse_spec

    spec = parse_spec(chosen["config"])
    policy_spec = None
    if spec.method is not None:
        opts = dict(spec.options)
        if chosen.get("threshold") is not None:
            opts["threshold"] = chosen["threshold"]
        policy_spec = spec.method + (":" + ",".join(f"{k}={v}" for k, v in opts.items()) if opts else "")
    other = runner if chosen is best else best
    notes = []
    if st.train_gates:
        notes.append(f"gates trained here: forecast LazyDiT gates, data-free, {st.gate_iters} steps of "
                     f"{st.gate_batch} trajectories (out/gates/)")
    if extractor is None:
        notes.append("no feature extractor for this model (pass --extractor module:function): ranked by the MSE "
                     "(PSNR) to the fine sampler's images only, no FID")
    if stopped is not None:
        notes.append(f"the search stopped at the {stopped}-image round (--max-minutes): the choice is among the "
                     f"candidates scored at {final_n} images")
    return dict(
        format=RECIPE_FORMAT, version=1,
        model=dict(name=model_name or getattr(model, "name", None) or type(model).__name__,
                   fingerprint=denoiser_fingerprint(model)),
        config=chosen["config"], sampler=spec.sampler, steps=spec.steps, method=spec.method,
        policy_spec=policy_spec, threshold=chosen.get("threshold"), fitted=chosen.get("fitted") or {},
        cfg_scale=st.cfg_scale, seed=st.seed,
        tmacs=chosen["tmacs"], lazy_ratio=chosen["lazy_ratio"],
        budget=dict(kind=st.budget_kind, share=st.budget if st.budget_kind == "tmacs" else None,
                    tmacs=budget_macs / 1e12, ddim50_tmacs=ddim50 / 1e12),
        budget_share=chosen["budget_share"],
        quality=dict(metric=metric_name, value=chosen[metric_name], psnr_to_fine=chosen["psnr_to_fine"],
                     fid_to_fine=chosen.get("fid_to_fine"), samples=final_n, fine=st.fine,
                     decision=decision, best=best["config"], versus=None if other is None else other["config"],
                     interval=None if interval is None else dict(
                         what=f"{metric_name}(runner-up {runner['config']}) - {metric_name}(best {best['config']})",
                         **interval, level=st.level, seed=st.seed)),
        settings=asdict(st), machine=_machine(device), not_tried=not_tried, notes=notes)


COLUMNS = ("config", "family", "tmacs", "budget_share", "seconds_per_image", "lazy_ratio", "n_first", "fid_first",
           "psnr_first", "n_last", "fid_last", "psnr_last", "fid_to_ref_last", "status")


def _frontier_rows(scored, final, chosen, metric_name) -> list:
    finalists = {r["config"] for r in final}
    table = []
    for text, recs in scored.items():
        ok = [r for r in recs if "error" not in r and not r.get("over_budget")]
        if not ok:
            continue
        first, last = ok[0], ok[-1]
        status = ("chosen" if text == chosen["config"] else "finalist" if text in finalists
                  else f"pruned after {last['n']} images")
        timed = last.get("timed_seconds_per_image")
        table.append(dict(config=text, family=first["family"], method=first["method"], tmacs=last["tmacs"],
                          budget_share=last["budget_share"], lazy_ratio=last["lazy_ratio"],
                          seconds_per_image=timed if timed is not None else last["seconds_per_image"],
                          seconds_source="timed" if timed is not None else "sampling clock",
                          fid_to_ref_last=last.get("fid_to_ref"),
                          n_first=first["n"], fid_first=first.get("fid_to_fine"), psnr_first=first["psnr_to_fine"],
                          mse_first=first["mse_to_fine"], n_last=last["n"], fid_last=last.get("fid_to_fine"),
                          psnr_last=last["psnr_to_fine"], mse_last=last["mse_to_fine"], status=status,
                          scores=[{k: r.get(k) for k in ("n", "tmacs", "fid_to_fine", "psnr_to_fine", "mse_to_fine",
                                                         "fid_to_ref")}
                                  for r in ok]))
    return sorted(table, key=lambda r: r["tmacs"])


def _finite(obj):
    """JSON without Infinity / NaN (PSNR of identical images is inf): such numbers become the strings "inf" /
    "nan"."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return str(obj)
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def write_outputs(out: Path, recipe: dict, table: list, st: TuneSettings, metric_name: str):
    """recipe.json, frontier.md / .csv / .json / .png and report.md, each written atomically."""
    import matplotlib.pyplot as plt

    from lazydit.evaluation.compare import frontier_figure
    from lazydit.files import savefig_atomic

    fmt = lambda v, f: "" if v is None else format(v, f)  # noqa: E731
    write_text_atomic(out / "recipe.json", json.dumps(_finite(recipe), indent=1))
    write_text_atomic(out / "frontier.json", json.dumps(_finite(dict(settings=asdict(st), metric=metric_name,
                                                                     rows=table)), indent=1))
    write_text_atomic(out / "frontier.csv", "\n".join(
        [",".join(COLUMNS)] + [",".join("" if r[c] is None else str(r[c]) for c in COLUMNS) for r in table]) + "\n")
    n0 = st.levels[0]
    budget_text = (f"{st.budget:g} x DDIM-50 TMACs" if st.budget_kind == "tmacs" else
                   f"{st.budget:g} s per image ({recipe['budget']['batch_size']} images per call, "
                   f"{recipe['budget']['dtype']})")
    timed = st.budget_kind == "seconds"
    lines = [f"# Frontier: {recipe['model']['name']} at {budget_text}", "",
             f"Quality is the distance to {st.fine} from the same labels and noise: FID between the two image sets "
             "in the extractor's feature space (blank without one) and PSNR to the same-noise image. "
             f"Every candidate was scored on the first {n0} images; the better half went on to twice as many, up to "
             f"{st.num_samples} (successive halving). Seconds per image: "
             + ("timed before scoring, median of interleaved rounds on this device." if timed else
                "the sampling run's own clock (not a quiet timing: tune with --budget-kind seconds for that)."), "",
             f"| configuration | TMACs | share of DDIM-50 | s / image | lazy ratio | FID to fine @{n0} | "
             f"PSNR @{n0} (dB) | images (last) | FID to fine (last) | PSNR (last) | FID to data (last) | status |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in table:
        lines.append(f"| {r['config']} | {r['tmacs']:.6f} | {r['budget_share']:.3f} | "
                     f"{r['seconds_per_image']:.4g} | {r['lazy_ratio']:.1%} | "
                     f"{fmt(r['fid_first'], '.4f')} | {r['psnr_first']:.2f} | {r['n_last']} | "
                     f"{fmt(r['fid_last'], '.4f')} | {r['psnr_last']:.2f} | {fmt(r['fid_to_ref_last'], '.4f')} | "
                     f"{r['status']} |")
    write_text_atomic(out / "frontier.md", "\n".join(lines) + "\n")
    y_key = "fid_first" if metric_name == "fid_to_fine" else "mse_first"
    fig_rows = [dict(r, fid=r[y_key]) for r in table]
    ch = next(r for r in table if r["status"] == "chosen")
    for x_key, x_label, name in (("tmacs", "TMACs per image", "frontier.png"),
                                 ("seconds_per_image", "seconds per image" + ("" if timed else " (sampling clock)"),
                                  "frontier_seconds.png")):
        fig = frontier_figure(fig_rows, x_key, x_label, f"{recipe['model']['name']}: distance to {st.fine} vs "
                                                        f"{x_label.split(' (')[0]} ({n0} images each)")
        ax = fig.axes[0]
        ax.set_ylabel(("FID to the fine sampler" if y_key == "fid_first" else "MSE to the fine sampler")
                      + " (lower is better)")
        ax.plot([ch[x_key]], [ch[y_key]], marker="*", ms=16, color="k", ls="none", label=f"chosen: {ch['config']}")
        if (x_key == "tmacs") == (st.budget_kind == "tmacs"):
            ax.axvline(recipe["budget"]["tmacs"] if x_key == "tmacs" else st.budget, color="grey", ls=":", lw=1,
                       label="budget")
        ax.legend(fontsize=7, ncol=2)
        savefig_atomic(fig, out / name)
        plt.close(fig)
    q = recipe["quality"]
    iv = q["interval"]
    why = {"only candidate": "it was the only candidate scored within the budget.",
           "winner": (f"it beats the runner-up {q['versus']} on {q['samples']} images: the paired-bootstrap "
                      f"{iv and int(iv['level'] * 100)}% interval of {q['metric']}(runner-up) - {q['metric']}(it) is "
                      f"[{iv and fmt(iv['lo'], '.4g')}, {iv and fmt(iv['hi'], '.4g')}] (difference "
                      f"{iv and fmt(iv['delta'], '.4g')}), which excludes 0."),
           "tie": (f"the best two ({q['best']} and {q['versus'] if q['best'] == recipe['config'] else recipe['config']}"
                   f") are tied on {q['samples']} images: the paired-bootstrap {iv and int(iv['level'] * 100)}% "
                   f"interval of the difference, [{iv and fmt(iv['lo'], '.4g')}, {iv and fmt(iv['hi'], '.4g')}], "
                   "holds 0; the cheaper (fewer TMACs) is chosen.")}[q["decision"]]
    report = [f"# lazydit tune: {recipe['model']['name']}", "",
              (f"Budget: {st.budget:g} x DDIM-50 = {recipe['budget']['tmacs']:.6f} TMACs per image." if not timed
               else f"Budget: {budget_text} on {recipe['machine']['platform']} ({recipe['machine']['device']}); "
                    f"dense DDIM-{PROBE_STEPS} ran at {recipe['budget']['seconds_per_mac'] * 1e12:.4g} s per TMAC, "
                    f"so the candidates were listed within {recipe['budget']['tmacs']:.6f} TMACs and each was "
                    "timed."), "",
              f"**Chosen: `{recipe['config']}`** ({recipe['tmacs']:.6f} TMACs, {recipe['budget_share']:.1%} of "
              f"DDIM-50; {q['metric'].replace('_', ' ')} {q['value']:.4g}, PSNR to {st.fine} "
              f"{q['psnr_to_fine']:.2f} dB on {q['samples']} images)" +
              (f", threshold {recipe['threshold']:.6g}" if recipe.get("threshold") is not None else "") + ".", "",
              f"Why: {why}", "", f"{len(table)} candidates scored (frontier.md).", ""]
    if recipe.get("rankings"):
        rk = recipe["rankings"]
        report += ["## Two rankings of the finalists", "",
                   f"By the distance to {st.fine} (the choice) and by FID to real data (--ref), on {q['samples']} "
                   f"images: the two rankings {'agree' if rk['same_best'] else 'disagree'} on the best "
                   f"({rk['by_fine'][0]}" + ("" if rk["same_best"] else f" against {rk['by_ref'][0]}") + ")"
                   + ("" if rk["kendall_tau"] is None else f"; Kendall's tau over the finalists {rk['kendall_tau']:+.2f}")
                   + ".", "", "| rank | by distance to the fine sampler | by FID to data (FID) |", "|---:|---|---|"]
        report += [f"| {i + 1} | {a} | {b} ({rk['fid_to_ref'][b]:.4f}) |"
                   for i, (a, b) in enumerate(zip(rk["by_fine"], rk["by_ref"]))] + [""]
    report += ["## Not tried", ""]
    report += [f"- {d['what']}: {d['why']}" for d in recipe["not_tried"]] or ["- nothing"]
    report += ["", "## Notes", ""] + [f"- {x}" for x in recipe["notes"]]
    write_text_atomic(out / "report.md", "\n".join(report) + "\n")


# ---------------------------------------------------------------- recipes


class Recipe:
    """A tune's result (`load_recipe`): the sampler, steps, guidance and calibrated caching policy it chose."""

    def __init__(self, doc: dict, path=None):
        self.doc, self.path = doc, path
        self.sampler, self.steps, self.cfg_scale = doc["sampler"], int(doc["steps"]), float(doc["cfg_scale"])
        self.config, self.method, self.threshold = doc["config"], doc.get("method"), doc.get("threshold")
        self.fingerprint, self.model_name = doc["model"]["fingerprint"], doc["model"]["name"]

    def __repr__(self):
        return f"Recipe({self.config!r}, {self.doc['tmacs']:.6f} TMACs, model {self.model_name})"

    def check_model(self, model):
        """Raise `UsageError` unless `model` has the weights the recipe was tuned on."""
        have = denoiser_fingerprint(model)
        if have != self.fingerprint:
            raise UsageError(f"the recipe {self.path or ''} was tuned on model {self.model_name} (fingerprint "
                             f"{self.fingerprint}), not this one (fingerprint {have}): tune this model")

    def policy(self, model):
        """The calibrated caching policy for `model` (None: the recipe is a bare sampler)."""
        from lazydit.evaluation.rows import build_policy, parse_spec

        self.check_model(model)
        spec = parse_spec(self.config)
        device = next(model.parameters()).device
        policy = build_policy(spec, model, self.threshold if spec.target is not None else None, device=device,
                              fitted=self.doc.get("fitted") or None)
        if policy is not None:
            policy.check_model(model)
        return policy


def load_recipe(folder) -> Recipe:
    """The recipe a tune wrote into `folder` (or the recipe.json file itself)."""
    path = Path(folder)
    path = path / "recipe.json" if path.is_dir() else path
    if not path.is_file():
        raise UsageError(f"{folder}: no recipe.json (the folder `lazydit tune --out` wrote)")
    try:
        doc = json.loads(path.read_text())
    except ValueError:
        raise UsageError(f"{path}: not a lazydit recipe (not JSON)") from None
    if not isinstance(doc, dict) or doc.get("format") != RECIPE_FORMAT:
        raise UsageError(f"{path}: not a lazydit recipe (format {doc.get('format') if isinstance(doc, dict) else None!r})")
    return Recipe(doc, path)
