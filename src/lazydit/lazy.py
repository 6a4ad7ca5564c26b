"""LazyDiT gates and their attachment to a DiT from the outside.

Config -> State -> hook -> `apply_lazy()`, in the manner of diffusers' hooks: every block's `attn` and `mlp`
instance gets its `forward` overridden (bound with `types.MethodType`, so `copy.deepcopy` stays correct); module
types and state-dict keys stay as they were, and `handle.remove()` restores the bare model.

Conventions (the released code's): a gate gives p = sigmoid(sum_tokens Z . w_k), the probability to COMPUTE;
a row skips its module when p < threshold (0.5), reusing the module's pre-gate output of the previous step.
"""

import json
import math
import types
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
from safetensors import safe_open
from safetensors.torch import save_file

from .checkpoint import atomic_write
from .diffusion import respaced_timesteps

BRANCHES = ("attn", "mlp")
GATE_FORMAT = "lazydit-gates-v1"
MODES = ("off", "record", "soft", "sample")


class GateMismatchError(ValueError):
    """Gates used with a model or a step count they were not trained for."""


class LazyGates(nn.Module):
    """The gate bank: one Linear(D, 1, bias=False) per block, branch and respaced step, zero-initialised.

    `weight` is one parameter of shape (L, 2, T, D) (branch 0 = attn, 1 = mlp), so data-parallel training sees
    the whole bank every step.
    """

    def __init__(self, depth: int, hidden_size: int, steps: int, threshold: float = 0.5, meta: dict | None = None,
                 parity: bool = True):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(depth, 2, steps, hidden_size))
        self.threshold = threshold
        self.parity = parity  # reference parity: odd respaced indices always compute (their gates are untrained)
        self.meta = dict(meta or {})  # model name/config, training arguments, ...

    @property
    def depth(self):
        return self.weight.shape[0]

    @property
    def steps(self):
        return self.weight.shape[2]

    @property
    def hidden_size(self):
        return self.weight.shape[3]

    @classmethod
    def for_model(cls, model, steps: int, threshold: float = 0.5):
        """Zero gates sized for `model` (a DiT) and T = steps, with the model's config in the metadata."""
        cfg = model.config
        meta = {"model_name": getattr(model, "name", "") or "", "model_config": dict(cfg.__dict__)}
        gates = cls(len(model.blocks), cfg.hidden_size, steps, threshold, meta)
        return gates.to(next(model.parameters()).device)

    def logit(self, layer: int, branch: int, k: int, z: torch.Tensor) -> torch.Tensor:
        """Gate score of every row: sum over tokens of Z . w_k. z (B, N, D) -> (B,)."""
        w = self.weight[layer, branch, k].to(z.dtype)
        return z.sum(dim=1) @ w

    def save(self, path, extra: dict | None = None):
        """Write the gates as .safetensors with metadata (model config, T, threshold, timestep map, extras)."""
        meta = {**self.meta, **(extra or {})}
        meta.update(format=GATE_FORMAT, steps=self.steps, threshold=self.threshold, parity=self.parity,
                    timestep_map=respaced_timesteps(self.steps))
        self.meta = {k: v for k, v in meta.items() if k != "format"}
        header = {k: json.dumps(v) for k, v in meta.items()}
        tensor = {"weight": self.weight.detach().float().contiguous().cpu()}
        atomic_write(path, lambda tmp: save_file(tensor, tmp, metadata=header))

    @classmethod
    def load(cls, path, map_location="cpu"):
        """Read gates written by `save`."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"gate file not found: {path}")
        try:
            with safe_open(str(path), framework="pt", device=str(map_location)) as f:
                header = dict(f.metadata() or {})
                weight = f.get_tensor("weight")
        except Exception as e:
            raise GateMismatchError(f"{path}: not a lazydit gate file ({type(e).__name__}: {e})") from e
        meta = {k: json.loads(v) for k, v in header.items()}
        if meta.pop("format", None) != GATE_FORMAT:
            raise GateMismatchError(f"{path}: not a lazydit gate file (format {header.get('format')!r})")
        L, two, T, D = weight.shape
        if two != 2 or T != meta.get("steps"):
            raise GateMismatchError(f"{path}: gate bank of shape {tuple(weight.shape)} does not match its metadata")
        gates = cls(L, D, T, float(meta.get("threshold", 0.5)), meta, parity=bool(meta.get("parity", True)))
        gates.weight.data.copy_(weight)
        return gates

    def check_model(self, model):
        """Raise GateMismatchError unless these gates fit `model` (depth, width, and the stored config)."""
        cfg = model.config
        if len(model.blocks) != self.depth or cfg.hidden_size != self.hidden_size:
            raise GateMismatchError(
                f"gates are for a model of depth {self.depth} and width {self.hidden_size}, "
                f"but this model has depth {len(model.blocks)} and width {cfg.hidden_size}"
                f" (gates trained for {self.meta.get('model_name') or 'another model'})"
            )
        stored = self.meta.get("model_config")
        if stored:
            diff = [f"{k}: gates {stored[k]!r} vs model {getattr(cfg, k)!r}"
                    for k in stored if hasattr(cfg, k) and stored[k] != getattr(cfg, k)]
            if diff:
                raise GateMismatchError("gates were trained for another model config: " + "; ".join(diff))

    def check_steps(self, steps: int):
        """Raise GateMismatchError unless these gates were trained for `steps` sampling steps."""
        if steps != self.steps:
            raise GateMismatchError(
                f"gates were trained for T={self.steps} sampling steps, not {steps}: "
                f"sample with {self.steps} steps or train gates for {steps} (lazydit train-gates --steps {steps})"
            )


@dataclass
class LazyStats:
    """Counts of module evaluations per (respaced step, layer, branch): skipped and total rows."""

    skipped: torch.Tensor  # (T, L, 2) int64
    total: torch.Tensor  # (T, L, 2) int64

    @property
    def lazy_ratio(self) -> float:
        """Skipped module evaluations / all module evaluations (both CFG halves, every step)."""
        return float(self.skipped.sum()) / max(1, int(self.total.sum()))

    def ratio(self, dims) -> torch.Tensor:
        """Lazy ratio kept along `dims` (0 step, 1 layer, 2 branch), summed over the others."""
        keep = (dims,) if isinstance(dims, int) else tuple(dims)
        red = tuple(d for d in range(3) if d not in keep)
        skipped, total = (self.skipped.sum(red), self.total.sum(red)) if red else (self.skipped, self.total)
        return skipped.double() / total.clamp(min=1).double()

    def as_dict(self) -> dict:
        return {
            "lazy_ratio": self.lazy_ratio,
            "per_step": self.ratio(0).tolist(),
            "per_layer": self.ratio(1).tolist(),
            "per_branch": dict(zip(BRANCHES, self.ratio(2).tolist())),
            "per_step_layer_branch": self.ratio((0, 1, 2)).tolist(),
        }


@dataclass
class LazyState:
    """What the attached modules share: mode, current step, caches, statistics."""

    gates: LazyGates
    mode: str = "sample"
    threshold: float = 0.5
    timestep_index: dict = field(default_factory=dict)  # original timestep -> respaced index k
    k: int = 0  # current respaced step index
    caches: dict = field(default_factory=dict)  # (layer, branch) -> (B, N, D) pre-gate output of the last step
    probs: list = field(default_factory=list)  # soft mode: (branch, p (B,)) per module, for the penalty
    force: torch.Tensor | None = None  # optional (T, L, 2) bool plan: True = skip every row there
    uniform: bool = False  # one decision per module for the whole batch (majority of the rows' decisions)
    tie_cfg: bool = False  # cond row b and uncond row b + B/2 decide together (compute if either computes)
    skipped: torch.Tensor | None = None
    total: torch.Tensor | None = None

    @property
    def logit_threshold(self) -> float:
        th = min(max(self.threshold, 1e-300), 1 - 1e-16)
        return math.log(th) - math.log1p(-th)

    def __post_init__(self):
        self.timestep_index = {t: k for k, t in enumerate(respaced_timesteps(self.gates.steps))}
        self.reset_stats()

    def reset(self):
        """Forget the caches (a new batch starts)."""
        self.caches.clear()
        self.probs.clear()

    def reset_stats(self):
        shape = (self.gates.steps, self.gates.depth, 2)
        self.skipped = torch.zeros(shape, dtype=torch.long)
        self.total = torch.zeros(shape, dtype=torch.long)

    def stats(self) -> LazyStats:
        return LazyStats(self.skipped.clone(), self.total.clone())

    def set_timestep(self, t: torch.Tensor):
        """Map the (original) timesteps the model is called with to the respaced index of the gates."""
        t0 = int(t.reshape(-1)[0]) if torch.is_tensor(t) else int(t)
        if t0 not in self.timestep_index:
            raise GateMismatchError(
                f"the model was called at timestep {t0}, which is not on the {self.gates.steps}-step schedule the "
                f"gates were trained for: sample with steps={self.gates.steps} or train gates for your step count"
            )
        k = self.timestep_index[t0]
        if self.mode == "sample" and k == self.gates.steps - 1:
            self.reset()  # the first sampling step starts a new batch
        self.k = k

    def run(self, module, layer: int, branch: int, z: torch.Tensor) -> torch.Tensor:
        """The lazy forward of one module on its modulated input z (B, N, D)."""
        forward = type(module).forward
        mode = self.mode
        if mode == "off":
            return forward(module, z)
        if mode == "record":
            out = forward(module, z)
            self.caches[(layer, branch)] = out.detach()
            return out
        cache = self.caches.get((layer, branch))
        if mode == "soft":  # y = p F(z) + (1 - p) cache
            if cache is None:
                raise RuntimeError("soft mode needs caches: run the model once in 'record' mode first")
            p = torch.sigmoid(self.gates.logit(layer, branch, self.k, z))
            self.probs.append((branch, p))
            pb = p.to(z.dtype)[:, None, None]
            return pb * forward(module, z) + (1 - pb) * cache
        # sample: hard decisions per row
        B = z.shape[0]
        if cache is None or cache.shape[0] != B or (self.gates.parity and self.k % 2 == 1):
            out = forward(module, z)  # nothing to reuse, or an odd step under the reference parity: compute
            n_compute = B
        else:
            if self.force is not None:
                compute = torch.full((B,), not bool(self.force[self.k, layer, branch]), device=z.device)
            else:
                # p >= threshold, compared in logit space so that thresholds near 0 or 1 stay exact
                compute = self.gates.logit(layer, branch, self.k, z).float() >= self.logit_threshold
                if self.tie_cfg and B % 2 == 0:
                    either = compute[: B // 2] | compute[B // 2 :]
                    compute = torch.cat([either, either])
                if self.uniform:
                    compute = (2 * compute.sum() >= B).expand(B)
            n_compute = int(compute.sum())  # one host sync per module, as the reference
            if n_compute == B:
                out = forward(module, z)
            elif n_compute == 0:
                out = cache  # reuse and leave the cache as it is
            else:
                idx = compute.nonzero().squeeze(1)
                out = cache.clone()
                out[idx] = forward(module, z[idx]).to(out.dtype)
        self.caches[(layer, branch)] = out
        self.skipped[self.k, layer, branch] += B - n_compute
        self.total[self.k, layer, branch] += B
        return out


def _lazy_forward(self, z):
    """Replacement forward of an attached attn/mlp instance."""
    state, layer, branch = self._lazy_ctx
    return state.run(self, layer, branch, z)


def _pre_hook(model, args, kwargs):
    t = args[1] if len(args) > 1 else kwargs["t"]
    model._lazy_state.set_timestep(t)


class LazyHandle:
    """Returned by `apply_lazy`: the shared state, plus reset / remove / stats."""

    def __init__(self, model, state, hook):
        self.model, self.state, self._hook = model, state, hook

    @property
    def mode(self):
        return self.state.mode

    @mode.setter
    def mode(self, value):
        if value not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {value!r}")
        self.state.mode = value

    def reset(self):
        """Forget caches (and soft-mode probabilities)."""
        self.state.reset()

    def reset_stats(self):
        self.state.reset_stats()

    def stats(self) -> LazyStats:
        return self.state.stats()

    def remove(self):
        """Detach the gates: the model is the bare model again."""
        self._hook.remove()
        for block in self.model.blocks:
            for name in BRANCHES:
                module = getattr(block, name)
                module.__dict__.pop("forward", None)
                module.__dict__.pop("_lazy_ctx", None)
        self.model.__dict__.pop("_lazy_state", None)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.remove()


def apply_lazy(model, gates: LazyGates, mode: str = "sample", threshold: float | None = None,
               uniform: bool = False, tie_cfg: bool = False) -> LazyHandle:
    """Attach LazyDiT gates to a DiT from the outside.

    Args:
        model: a DiT (blocks with `attn` and `mlp` sub-modules).
        gates: a LazyGates bank that fits the model (checked).
        mode: "sample" (hard per-row skips), "soft" (training mix), "record" (fill caches), "off" (bare).
        threshold: compute iff p >= threshold; defaults to the gates' own (0.5 unless calibrated).
        uniform: batch-uniform decisions (beyond the reference): a module computes for every row when at least
            half of the rows would compute, else every row reuses its cache.
        tie_cfg: tie the decisions of the cond and uncond halves of a CFG batch (beyond the reference, which
            lets them decide independently): a pair computes if either row would.
    Returns:
        LazyHandle; `handle.remove()` restores the bare model.
    """
    if getattr(model, "_lazy_state", None) is not None:
        raise RuntimeError("gates are already attached to this model: remove the first handle")
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    gates.check_model(model)
    state = LazyState(gates, mode=mode, threshold=gates.threshold if threshold is None else threshold,
                      uniform=uniform, tie_cfg=tie_cfg)
    model._lazy_state = state
    for i, block in enumerate(model.blocks):
        for b, name in enumerate(BRANCHES):
            module = getattr(block, name)
            module._lazy_ctx = (state, i, b)
            module.forward = types.MethodType(_lazy_forward, module)
    hook = model.register_forward_pre_hook(_pre_hook, with_kwargs=True)
    return LazyHandle(model, state, hook)
