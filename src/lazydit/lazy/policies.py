"""Caching policies: which rows of a branch compute at a step, and what a skipped row receives.

A policy is the whole of a caching method. The engines (`lazy/engine_*.py`, attached by
`lazydit.lazy.attach.apply_lazy`) own the caches, run the modules, merge mixed batches and count every evaluation; a
policy only answers the questions below. Adding a method is one subclass (see docs/architecture.md for a complete
example): it then gets statistics, heat maps, TMACs, the CLI (`--method`) and the benchmarks from the code that
already exists.

A policy names its engine in one class attribute, `Policy.engine` (one of ENGINES):
- "module": decisions read this step's branch input z (the reference gates);
- "block": decisions are known before the step's branch inputs exist, so a skipped branch skips its norm and
  modulation too (on fused blocks; on others the module engine runs them);
- "residual": one cached residual of a run of blocks, one decision per step (`skip_blocks`); no branch hooks.

Every question is asked per branch hook (`hook.layer`, `hook.branch`, `hook.cache` ...) at respaced index k
(T-1 is the first sampling step, 0 the last):
- `begin_step(run, k)`: the model is about to be called at step k (every hook is in `run.hooks`).
- `compute_rows(hook, k, z)`: (B,) bool, True = compute, or None = every row computes. Asked only when the hook
  holds a cache for exactly these rows and the branch may skip; `z` is this step's modulated input on the module
  engine, None on the block engine (the decisions come before it exists).
- `reuse(hook, k)`: what the skipped rows receive, (B, N, D), asked once per branch and step: the cached output of
  the last step, or the forecast of the branch's history (`new_history`, `lazydit.lazy.forecast`) by default.
- `computed(hook, k, z)`: every row of the branch computed at step k from input z (block engine only).
- `compute_prob(hook, k, z)`: (B,) probability to compute, for the soft mix of gate training (learned policies).

Residual policies (`engine = "residual"`) cache one residual instead of branch outputs and answer one question
per step, at the input of block `first_cached`:
- `skip_blocks(probe)`: whether this step reuses the cached residual of blocks first_cached .. L-1 (the whole batch
  together); `probe` (`lazydit.lazy.engine_residual.BlockProbe`) holds the step's inputs and a state dict kept
  until the next batch.

`prepare(model, y, cfg_scale, seed, sampler)` runs before sampling for methods fitted on the model (TeaCache's
rescaling polynomial); it is a no-op for the others.
"""

import copy
import importlib
import math
from dataclasses import dataclass, replace

import torch

from lazydit.errors import GateMismatchError, OptionRangeError, UsageError
from lazydit.lazy.config import LazyConfig
from lazydit.lazy.gates import LazyGates, logit_of


@dataclass(frozen=True)
class Calibration:
    """How a policy's `threshold` is calibrated to a target lazy ratio (`lazydit.pipeline.calibrate`).

    The lazy ratio never falls as the threshold rises, so a bisection finds it; the search runs over [lo, hi] in
    `space`: "logit" for a threshold in (0, 1) (gate probabilities), "log" for a positive threshold (distances).
    """

    space: str  # "logit" or "log"
    lo: float  # the bracket, in that space
    hi: float
    whole_steps: bool = False  # decisions are whole steps (residual caches): ratios come in steps of about 1/T

    def threshold(self, v: float) -> float:
        """The threshold at point v of the search space."""
        return 1 / (1 + math.exp(-v)) if self.space == "logit" else math.exp(v)


GATE_CALIBRATION = Calibration("logit", -60.0, 60.0)  # gate logits are sums over tokens: they can be large
DISTANCE_CALIBRATION = Calibration("log", math.log(1e-6), math.log(1e3), whole_steps=True)


ENGINES = ("module", "block", "residual")  # the values of Policy.engine (lazydit.lazy.attach runs each)


class Policy:
    """Base class of every caching policy: computes everything (subclasses decide otherwise)."""

    calibration: Calibration | None = None  # how `threshold` is calibrated to a lazy ratio; None: no threshold

    engine = "module"  # how the policy runs (ENGINES): "module" decides on z, "block" before z, "residual" per step
    first_cached = 0  # residual engine: the residual of blocks first_cached .. L-1 is what a skipped step reuses
    records_inputs = False  # record mode keeps each branch's input Z as well as its output (look-ahead training)
    label = "Cached"  # report rows are named f"{label}-{T}"

    def __init__(self, steps: int, config: LazyConfig | None = None):
        self.steps = steps  # T: the policy is defined on the reference respacing of T steps
        self.config = config or LazyConfig()
        self.forecast = self.config.forecast or 0  # order of the forecast a skipped row receives (0: the cache)

    @property
    def timesteps(self) -> list:
        """The original timestep of every respaced index k (ascending): the reference respacing of T steps."""
        from lazydit.sampling.schedule import respaced_timesteps

        return respaced_timesteps(self.steps)

    def schedule_name(self) -> str:
        """The schedule the policy is defined on, in words (for mismatch errors)."""
        from lazydit.sampling.schedule import respacing_name

        return respacing_name(self.steps)

    def check_model(self, model):
        """Raise unless this policy fits `model` (gate banks check depth and width)."""

    def overhead_macs(self, cfg) -> int:
        """What the method adds to one forward of one image, in MACs (`lazydit.models.cost`): the forecast's
        elementwise work (forecast > 0); subclasses add their scores or probes."""
        from lazydit.models.cost import forecast_macs

        return forecast_macs(cfg, self.forecast)

    def describe(self) -> dict:
        """What shapes this policy's samples, as JSON (resumable outputs record it): class, T, config, and every
        plain option of the instance."""
        from dataclasses import asdict

        opts = {k: v for k, v in vars(self).items() if isinstance(v, (bool, int, float, str)) and k != "steps"}
        return {"policy": type(self).__name__, "steps": self.steps, "config": asdict(self.config), **opts}

    def prepare(self, model, y, cfg_scale: float = 1.0, seed: int = 0, sampler: str = "ddim"):
        """Fit what the method fits on the model (labels y, guidance, noise seed, sampler of the run); default none.
        What it fitted is `fitted()`."""

    def fitted(self) -> dict:
        """What `prepare` fitted, as JSON (recorded with a row; empty for methods that fit nothing)."""
        return {}

    def load_fitted(self, state: dict):
        """Take back what `fitted()` returned (from a row's record), so that `prepare` fits nothing again."""
        if state:
            raise UsageError(f"{type(self).__name__} fits nothing, got {sorted(state)}")

    def with_threshold(self, threshold: float) -> "Policy":
        """The same method at another threshold, sharing what `prepare` fitted (the calibrator samples with it).

        Raises:
            UsageError: the method has no threshold to calibrate (`calibration` is None).
        """
        if self.calibration is None:
            raise UsageError(f"{type(self).__name__} has no threshold to calibrate to a lazy ratio")
        new = copy.copy(self)
        new.threshold = threshold
        return new

    def begin_step(self, run, k: int):
        """Called when the model is called at respaced step k."""

    def skip_blocks(self, probe) -> bool:
        """Block-level policies: whether this step reuses the cached residual (see the module docstring)."""
        return False

    def new_history(self):
        """The history a branch keeps of its computed outputs for forecast reuse (forecast > 0): Newton divided
        differences in the timestep; None (forecast 0): skipped rows receive the cache."""
        from lazydit.lazy.forecast import ForecastHistory

        return ForecastHistory(self.forecast) if self.forecast else None

    def compute_rows(self, hook, k: int, z):
        """(B,) bool compute decisions of this branch at step k, or None: every row computes."""
        return None

    def reuse(self, hook, k: int) -> torch.Tensor:
        """What the skipped rows receive: the branch output cached at the last step, or, when the branch keeps a
        history (`new_history`), its forecast at this step."""
        return hook.cache if hook.history is None else hook.history.forecast(hook.run, hook.cache.dtype)

    def computed(self, hook, k: int, z: torch.Tensor):
        """Every row of the branch computed at step k, from modulated input z (block engine)."""

    def compute_prob(self, hook, k: int, z: torch.Tensor) -> torch.Tensor:
        raise UsageError(f"{type(self).__name__} has no soft decisions to train")

    def combine(self, compute: torch.Tensor) -> torch.Tensor:
        """Apply the config's tie_cfg and uniform options to compute decisions (..., B)."""
        B = compute.shape[-1]
        if self.config.tie_cfg and B % 2 == 0:
            either = compute[..., : B // 2] | compute[..., B // 2 :]
            compute = torch.cat([either, either], dim=-1)
        if self.config.uniform:
            compute = (2 * compute.sum(-1, keepdim=True) >= B).expand(compute.shape)
        return compute


class ReferenceGates(Policy):
    """LazyDiT as released: the gate of step k scores Z_k, the branch's own modulated input at step k, so the norm
    and modulation always run and every branch branches on a fresh score (one host sync per branch). Under the
    reference parity odd steps always compute (their gates are untrained)."""

    label = "Lazy"
    calibration = GATE_CALIBRATION  # a row computes iff p >= threshold: more skipping as it rises

    def __init__(self, gates: LazyGates, config: LazyConfig | None = None):
        super().__init__(gates.steps, config)
        self.gates = gates
        trained = int(gates.meta.get("forecast", 0))  # the reuse the gates were trained with
        if self.config.forecast is not None and self.config.forecast != trained:
            raise GateMismatchError(
                f"these gates were trained with forecast order {trained}, not {self.config.forecast}: sample with "
                f"forecast={trained} (--forecast {trained}), or train gates for order {self.config.forecast}")
        self.forecast = trained
        rollout = int(gates.meta.get("training", {}).get("rollout", 0))  # chain-aware training saw runs this long
        if rollout and self.config.max_skips is None:  # so sampling keeps to them unless told otherwise
            self.config = replace(self.config, max_skips=rollout)
        self.threshold = gates.threshold if self.config.threshold is None else self.config.threshold
        self.logit_threshold = logit_of(self.threshold)

    def with_threshold(self, threshold: float) -> "ReferenceGates":
        new = copy.copy(self)
        new.config = replace(self.config, threshold=threshold)
        new.threshold, new.logit_threshold = threshold, logit_of(threshold)
        return new

    def check_model(self, model):
        self.gates.check_model(model)

    @property
    def timesteps(self) -> list:
        return self.gates.timesteps

    def schedule_name(self) -> str:
        return self.gates.schedule_name()

    def overhead_macs(self, cfg) -> int:
        from lazydit.models.cost import gate_macs

        return super().overhead_macs(cfg) + (0 if self.gates.router else gate_macs(cfg))

    def gated(self, k: int) -> bool:
        """Whether step k may skip at all (the reference parity: even steps only)."""
        return not (self.gates.parity and k % 2 == 1)

    def compute_rows(self, hook, k, z):
        if not self.gated(k):
            return None
        # p >= threshold, compared in logit space so that thresholds near 0 or 1 stay exact
        return self.combine(self.gates.logit(hook.layer, hook.branch, k, z).float() >= self.logit_threshold)

    def compute_prob(self, hook, k, z):
        return torch.sigmoid(self.gates.logit(hook.layer, hook.branch, k, z))


class LookaheadGates(ReferenceGates):
    """Look-ahead gates (beyond the reference): the gate of step k scores Z_{k+1}, the input of the last fully
    computed step (the odd step k+1 under the parity). The plan of step k is known when step k+1 ends: one host
    transfer per step pair, and a skipped branch costs nothing, not its norm or modulation either."""

    engine = "block"
    records_inputs = True
    label = "Lazy-LA"

    def begin_step(self, run, k):
        scores = [h.score for h in run.hooks]
        plan = None
        if k % 2 == 0 and scores and all(s is not None for s in scores):  # step k+1 scored every branch
            L, nb = run.depth, run.num_branches
            plan = self.combine(torch.stack(scores).view(L, nb, -1)).cpu()  # (L, nb, B): one transfer
        for h in run.hooks:
            h.plan = None if plan is None else plan[h.layer, h.branch]
            h.score = None

    def compute_rows(self, hook, k, z):
        if not self.gated(k) or hook.plan is None or hook.plan.shape[-1] != hook.cache.shape[0]:
            return None
        return hook.plan

    def computed(self, hook, k, z):
        if k % 2 == 1:  # score the next (even) step's gate on this step's input, kept on the device
            hook.score = self.gates.logit(hook.layer, hook.branch, k - 1, z).float() >= self.logit_threshold

    def compute_prob(self, hook, k, z):
        return super().compute_prob(hook, k, hook.z)  # the input recorded at step k+1


class ForcedPlan(Policy):
    """A fixed skip plan: (T, L, 2) bool (True = skip, every row) or (T, L, 2, B) (per row). Under `parity` odd
    steps compute whatever the plan says (as the gates' parity does). `ahead=False` executes it on the module engine
    of the reference gates (the norm and modulation run for every row) instead of the block engine; the
    samples are the same."""

    engine = "block"
    label = "Forced"

    def __init__(self, plan: torch.Tensor, parity: bool = True, ahead: bool = True, config: LazyConfig | None = None):
        super().__init__(plan.shape[0], config)
        self.plan = plan.bool().cpu()
        self.parity = parity
        self.engine = "block" if ahead else "module"

    def describe(self) -> dict:
        import hashlib

        return {**super().describe(), "plan": hashlib.sha256(self.plan.numpy().tobytes()).hexdigest()[:16],
                "shape": list(self.plan.shape)}

    def check_model(self, model):
        from lazydit.models.registry import block_spec, model_blocks

        blocks = model_blocks(model)
        depth, nb = len(blocks), len(block_spec(blocks[0]).branches)
        if self.plan.dim() not in (3, 4) or self.plan.shape[1:3] != (depth, nb):
            raise UsageError(f"a forced plan is (T, {depth}, {nb}) or (T, {depth}, {nb}, B) for this model, "
                               f"not {tuple(self.plan.shape)}")

    def compute_rows(self, hook, k, z):
        if self.parity and k % 2 == 1:
            return None
        skip = self.plan[k, hook.layer, hook.branch]
        return (~skip).expand(hook.cache.shape[0]) if skip.dim() == 0 else ~skip


class Learning2Cache(ReferenceGates):
    """Learning-to-Cache: a router bank (`LazyGates(router=True)`, trained by `train_gates` with
    `GateTrainConfig(router=True)`) holds one input-independent score per step, layer and branch; under the parity
    odd steps compute everything, and on even steps a module computes iff sigmoid(score) >= threshold, for every
    row alike. The decisions are known before the step, so a skipped module skips its norm and modulation too."""

    engine = "block"
    label = "L2C"

    def compute_rows(self, hook, k, z):
        if not self.gated(k):
            return None
        compute = bool(self.gates.weight[hook.layer, hook.branch, k, 0] >= self.logit_threshold)
        return torch.full((hook.cache.shape[0],), compute, dtype=torch.bool)


def policy_for(gates: LazyGates, config: LazyConfig | None = None) -> Policy:
    """The policy of a gate bank: Learning2Cache for a router bank, LookaheadGates for look-ahead gates,
    ReferenceGates otherwise."""
    if gates.router:
        return Learning2Cache(gates, config)
    return (LookaheadGates if gates.lookahead else ReferenceGates)(gates, config)


# ---------------------------------------------------------------- policies by name (the CLI's --method)

POLICIES: dict = {}


def register_policy(name: str):
    """Class decorator: make a policy selectable as `--method name[:key=value,...]`.

    The class is built as cls(steps=T, config=LazyConfig, **options); options are parsed as int, float or str.
    """

    def deco(cls):
        POLICIES[name] = cls
        return cls

    return deco


def _options(text: str, what: str) -> dict:
    """`key=value,...` as a dict, values parsed as int, float or str (`_value`)."""
    options = {}
    for item in filter(None, text.split(",")):
        key, sep, value = item.partition("=")
        if not sep:
            raise UsageError(f"{what}: expected key=value, got {item!r}")
        options[key.strip()] = _value(value.strip())
    return options


def _value(text: str):
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


GATE_METHODS = {"lazy": "gates", "l2c": "router"}  # methods of a gate / router bank read from a file (its key)
BANK_SAMPLING_OPTIONS = {"threshold": float, "max_skips": int, "forecast": int, "uniform": bool,
                         "tie_cfg": bool}  # the LazyConfig fields a bank method takes as options


def gate_policy(method: str, options: dict, steps: int, config: LazyConfig | None = None, device="cpu",
                what: str = "") -> Policy:
    """The policy of a gate bank named like a method: `lazy` (gates=FILE, or default / default-<kind>: the shipped
    sets, `lazydit.lazy.shipped.resolve_gates`) or `l2c` (router=FILE), with optional LazyConfig options
    (BANK_SAMPLING_OPTIONS: threshold, max_skips, forecast, uniform, tie_cfg); the same for `--method` and the row
    engine's configurations (`lazydit.evaluation.rows`).

    Args:
        method: "lazy" or "l2c".
        options: the parsed key=value options (no `target`: calibration is `lazydit compare`'s).
        steps: T (the bank must be for T steps).
        config: LazyConfig of the sampling; the options override its fields.
        what: how errors name the request (e.g. "--method lazy:gates=x").
    Raises:
        UsageError: a missing file key, an unknown option, a router bank for `lazy` or a gate bank for `l2c`.
        GateMismatchError: a bank for another T.
    """
    from lazydit.lazy.shipped import resolve_gates

    need, opts = GATE_METHODS[method], dict(options)
    if need not in opts:
        raise UsageError(f"{what}: {method} needs {need}=FILE" + (" (or gates=default)" if method == "lazy" else ""))
    path = str(opts.pop(need))
    sampling = {k: opts.pop(k) for k in BANK_SAMPLING_OPTIONS if k in opts}
    if opts:
        raise UsageError(f"{what}: unknown option(s) {', '.join(sorted(opts))} of {method} (it takes {need}= and "
                         f"{'=, '.join(BANK_SAMPLING_OPTIONS)}=)")
    gates = resolve_gates(path, steps, device)
    gates.check_steps(steps)
    if (method == "l2c") != gates.router:
        raise UsageError(f"{what}: {path} is {'a router' if gates.router else 'a gate'} bank: use "
                         f"{'l2c:router' if gates.router else 'lazy:gates'}=")
    config = config or LazyConfig()
    try:
        config = replace(config, **{k: BANK_SAMPLING_OPTIONS[k](v) for k, v in sampling.items()})
    except (TypeError, ValueError) as e:
        raise OptionRangeError(f"{what}: {e}") from None
    return policy_for(gates, config)


def _bank_method(method: str):
    """The registry entry of a gate-bank method: built like a policy class, from T, a LazyConfig and options."""

    def build(steps: int, config: LazyConfig | None = None, device="cpu", **options) -> Policy:
        return gate_policy(method, options, steps, config, device, what=method)

    build.__doc__ = f"`{method}:{GATE_METHODS[method]}=FILE[,threshold=p]`: the policy of a {GATE_METHODS[method]} bank."
    return build


POLICIES["lazy"], POLICIES["l2c"] = _bank_method("lazy"), _bank_method("l2c")  # LazyDiT's gates, Learning-to-Cache


def make_policy(spec: str, steps: int, config: LazyConfig | None = None, device="cpu") -> Policy:
    """Build a policy from `name[:key=value,...]` (a registered name), `lazy:gates=FILE|default[-<kind>]` /
    `l2c:router=FILE` (a gate or router bank, as `lazydit compare`'s configurations; `threshold=` optional; the
    bank is loaded on `device`) or `module:Class[:key=value,...]`.

    Raises:
        UsageError: an empty spec, unknown name, a class that is not a Policy, or bad options (`target=`, which
            calibrates, belongs to `lazydit compare` and `lazydit calibrate`).
    """
    if not spec.strip():
        raise UsageError("--method is empty: name a method, e.g. fora:interval=2 (see lazydit sample --help)")
    head, _, rest = spec.partition(":")
    if head in GATE_METHODS:
        options = _options(rest, f"--method {spec}")
        if "target" in options:
            bank = options.get(GATE_METHODS[head], "FILE")
            raise UsageError(f"--method {spec}: target= calibrates the threshold inside `lazydit compare` only; "
                             f"here calibrate once (lazydit calibrate --gates {bank} --steps {steps} --target-ratio "
                             f"{options['target']} --out calibrated.safetensors) and pass "
                             f"{head}:{GATE_METHODS[head]}=calibrated.safetensors, or give threshold= / --threshold")
        return gate_policy(head, options, steps, config, device, what=f"--method {spec}")
    if head in POLICIES:
        cls, opts = POLICIES[head], rest
    elif rest:  # module:Class[:options]
        name, _, opts = rest.partition(":")
        try:
            cls = getattr(importlib.import_module(head), name)
        except (ImportError, AttributeError) as e:
            raise UsageError(f"--method {spec}: cannot import {head}:{name} ({e})") from e
    else:
        known = ", ".join(sorted(POLICIES))
        raise UsageError(f"--method {spec}: unknown method; registered: {known} (or give package.module:Class)")
    if not (isinstance(cls, type) and issubclass(cls, Policy)):
        raise UsageError(f"--method {spec}: {cls!r} is not a lazydit Policy")
    options = _options(opts, f"--method {spec}")
    import inspect

    try:
        params = inspect.signature(cls).parameters
        takes = None if any(p.kind is p.VAR_KEYWORD for p in params.values()) else [
            p for p in params if p not in ("steps", "config", "device")]
    except (TypeError, ValueError):  # a callable without a signature: let the call say it
        takes = None
    unknown = [k for k in options if takes is not None and k not in takes]
    if unknown:
        offered = ", ".join(f"{p}=" for p in takes) or "no options"
        raise UsageError(f"--method {spec}: {head} takes {offered} (not {', '.join(f'{k}=' for k in unknown)})")
    try:
        return cls(steps=steps, config=config, **options)
    except TypeError as e:
        raise UsageError(f"--method {spec}: {e}") from e
