"""LazyDiT gates and their attachment to a DiT from the outside.

Config -> State -> hook -> `apply_lazy()`, in the manner of diffusers' hooks: every block's `attn` and `mlp`
instance gets its `forward` overridden (bound with `types.MethodType`, so `copy.deepcopy` stays correct); module
types and state-dict keys stay as they were, and `handle.remove()` restores the bare model.

Conventions (the released code's): a gate gives p = sigmoid(sum_tokens Z . w_k), the probability to COMPUTE;
a row skips its module when p < threshold (0.5), reusing the module's pre-gate output of the previous step.

Two kinds of gates (a flag of the gate bank, stored in its file):
- reference (the paper's, the default): the gate of step k scores Z_k, the module's modulated input at step k itself,
  so the module's LayerNorm and modulation always run and every module branches on a fresh score (one host sync
  per module, as the released code).
- look-ahead (beyond the reference): the gate of step k scores Z_{k+1}, the input recorded at the last fully
  computed step (the odd step k+1 under the reference parity). The plan of step k is known when step k+1 ends:
  one host transfer per step pair, and a skipped module costs nothing, not its LayerNorm or modulation either.
  Trained by the same 3-pass recipe (the record pass already produces Z_{k+1}).
"""

import copy
import json
import math
import types
from dataclasses import dataclass, field, fields
from pathlib import Path

import torch
import torch.nn as nn
from safetensors import safe_open
from safetensors.torch import save_file

from .checkpoint import atomic_write
from .diffusion import respaced_timesteps
from .models import modulate

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
                 parity: bool = True, lookahead: bool = False):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(depth, 2, steps, hidden_size))
        self.threshold = threshold
        self.parity = parity  # reference parity: odd respaced indices always compute (their gates are untrained)
        self.lookahead = lookahead  # gate k scores the input recorded at step k+1 (see the module docstring)
        if lookahead and not parity:
            raise ValueError("look-ahead gates need the reference parity (the odd step k+1 computes every module)")
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
    def for_model(cls, model, steps: int, threshold: float = 0.5, lookahead: bool = False):
        """Zero gates sized for `model` (a DiT) and T = steps, with the model's config in the metadata."""
        cfg = model.config
        meta = {"model_name": getattr(model, "name", "") or "", "model_config": dict(cfg.__dict__)}
        gates = cls(len(model.blocks), cfg.hidden_size, steps, threshold, meta, lookahead=lookahead)
        return gates.to(next(model.parameters()).device)

    def logit(self, layer: int, branch: int, k: int, z: torch.Tensor) -> torch.Tensor:
        """Gate score of every row: sum over tokens of Z . w_k. z (B, N, D) -> (B,)."""
        w = self.weight[layer, branch, k].to(z.dtype)
        return z.sum(dim=1) @ w

    def save(self, path, extra: dict | None = None):
        """Write the gates as .safetensors with metadata (model config, T, threshold, timestep map, extras)."""
        meta = {**self.meta, **(extra or {})}
        meta.update(format=GATE_FORMAT, steps=self.steps, threshold=self.threshold, parity=self.parity,
                    lookahead=self.lookahead, timestep_map=respaced_timesteps(self.steps))
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
        gates = cls(L, D, T, float(meta.get("threshold", 0.5)), meta, parity=bool(meta.get("parity", True)),
                    lookahead=bool(meta.get("lookahead", False)))
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
    force: torch.Tensor | None = None  # optional skip plan, True = skip: (T, L, 2) every row, or (T, L, 2, B) per row
    uniform: bool = False  # one decision per module for the whole batch (majority of the rows' decisions)
    tie_cfg: bool = False  # cond row b and uncond row b + B/2 decide together (compute if either computes)
    skippable: tuple = (0, 1)  # branches allowed to skip (0 attn, 1 mlp): the individual-laziness ablation
    skipped: torch.Tensor | None = None
    total: torch.Tensor | None = None
    record_decisions: bool = False  # keep every row's decision in `decisions`
    decisions: torch.Tensor | None = None  # (T, L, 2, B) bool, True = computed (when record_decisions)
    inputs: dict = field(default_factory=dict)  # look-ahead, record mode: (layer, branch) -> Z of the recorded step
    scores: dict = field(default_factory=dict)  # look-ahead sampling: (layer, branch) -> (B,) compute, next step
    plan: torch.Tensor | None = None  # look-ahead sampling: (L, 2, B) bool compute plan of this step, on the host
    compile: bool = False  # look-ahead: run each branch as a torch.compile region
    compile_mode: str | None = None  # torch.compile mode of those regions
    fns: dict = field(default_factory=dict)  # look-ahead: (layer, branch) -> fused branch function (built lazily)
    scratch: dict = field(default_factory=dict)  # look-ahead: a reused (B, N, D) buffer for gated residuals

    def __deepcopy__(self, memo):
        """Copy everything but the branch functions (they close over the original modules and are rebuilt) and the
        scratch buffer."""
        new = copy.copy(self)
        memo[id(self)] = new
        for f in fields(self):
            setattr(new, f.name, {} if f.name in ("fns", "scratch") else copy.deepcopy(getattr(self, f.name), memo))
        return new

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
        self.inputs.clear()
        self.scores.clear()
        self.plan = None

    def reset_stats(self):
        shape = (self.gates.steps, self.gates.depth, 2)
        self.skipped = torch.zeros(shape, dtype=torch.long)
        self.total = torch.zeros(shape, dtype=torch.long)
        self.decisions = None

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
        if self.mode == "sample" and self.gates.lookahead:
            self.plan = None
            if self.scores and k % 2 == 0:  # the scores of step k+1 become the plan of step k: one transfer
                L = self.gates.depth
                plan = torch.stack([torch.stack([self.scores[(i, b)] for b in range(2)]) for i in range(L)])
                self.plan = self._combine(plan).cpu()
            self.scores.clear()

    def _combine(self, compute: torch.Tensor) -> torch.Tensor:
        """Apply tie_cfg / uniform to compute decisions (..., B)."""
        B = compute.shape[-1]
        if self.tie_cfg and B % 2 == 0:
            either = compute[..., : B // 2] | compute[..., B // 2 :]
            compute = torch.cat([either, either], dim=-1)
        if self.uniform:
            compute = (2 * compute.sum(-1, keepdim=True) >= B).expand(compute.shape)
        return compute

    def _forced(self, layer: int, branch: int, B: int) -> torch.Tensor:
        """Compute decisions (B,) of the forced plan at the current step, on the host."""
        f = self.force[self.k, layer, branch].cpu()
        return (~f).expand(B) if f.dim() == 0 else ~f

    def _count(self, layer: int, branch: int, B: int, n_compute: int, rows: torch.Tensor | None):
        self.skipped[self.k, layer, branch] += B - n_compute
        self.total[self.k, layer, branch] += B
        if self.record_decisions:
            if self.decisions is None or self.decisions.shape[-1] != B:
                self.decisions = torch.ones(self.gates.steps, self.gates.depth, 2, B, dtype=torch.bool)
            self.decisions[self.k, layer, branch] = True if rows is None else rows.cpu()

    def run(self, module, layer: int, branch: int, z: torch.Tensor, *extra) -> torch.Tensor:
        """The lazy forward of one module on its modulated input z (B, N, D) (reference gates)."""
        forward = type(module).forward
        mode = self.mode
        if mode == "off":
            return forward(module, z, *extra)
        if mode == "record":
            out = forward(module, z, *extra)
            self.caches[(layer, branch)] = out.detach()
            if self.gates.lookahead:
                self.inputs[(layer, branch)] = z.detach()
            return out
        cache = self.caches.get((layer, branch))
        if mode == "soft":  # y = p F(z) + (1 - p) cache
            if cache is None:
                raise RuntimeError("soft mode needs caches: run the model once in 'record' mode first")
            zg = self.inputs[(layer, branch)] if self.gates.lookahead else z  # look-ahead: score recorded Z
            p = torch.sigmoid(self.gates.logit(layer, branch, self.k, zg))
            self.probs.append((branch, p))
            pb = p.to(z.dtype)[:, None, None]
            return pb * forward(module, z, *extra) + (1 - pb) * cache
        # sample: hard decisions per row
        B = z.shape[0]
        compute = None
        if (cache is None or cache.shape[0] != B or (self.gates.parity and self.k % 2 == 1)
                or branch not in self.skippable):
            out = forward(module, z, *extra)  # nothing to reuse, or an odd step under the reference parity: compute
            n_compute = B
        else:
            if self.force is not None:
                compute = self._forced(layer, branch, B)
            else:
                # p >= threshold, compared in logit space so that thresholds near 0 or 1 stay exact
                compute = self._combine(self.gates.logit(layer, branch, self.k, z).float() >= self.logit_threshold)
            n_compute = int(compute.sum())  # one host sync per module, as the reference
            if n_compute == B:
                out = forward(module, z, *extra)
            elif n_compute == 0:
                out = cache  # reuse and leave the cache as it is
            else:
                idx = compute.nonzero().squeeze(1).to(z.device)
                out = cache.clone()
                out[idx] = forward(module, z[idx], *extra).to(out.dtype)
        self.caches[(layer, branch)] = out
        self._count(layer, branch, B, n_compute, compute)
        return out

    def run_branch(self, layer: int, branch: int, x, shift, scale, gate, norm, module, extra=()) -> torch.Tensor:
        """One look-ahead branch of a block in sample mode: x (B, N, D) -> x + gate * F(modulate(norm(x))).

        The plan of this step was fixed when step k+1 ended; skipped rows reuse the cached output without
        touching LayerNorm or modulation. At an odd step every row computes and scores the gate of step k-1.
        """
        key, B = (layer, branch), x.shape[0]
        cache = self.caches.get(key)
        rows = None  # host (B,) bool compute decisions; None: every row computes
        if cache is not None and cache.shape[0] == B and self.k % 2 == 0 and branch in self.skippable:
            if self.force is not None:
                rows = self._forced(layer, branch, B)
            elif self.plan is not None and self.plan.shape[-1] == B:
                rows = self.plan[layer, branch]
        fn = self.fns.get(key)
        if fn is None:
            fn = _branch_fn(norm, module, compiled=self.compile, scratch=self.scratch)
            fn = self.fns[key] = torch.compile(fn, mode=self.compile_mode) if self.compile else fn
        if rows is None or bool(rows.all()):
            w = None
            if self.k % 2 == 1 and self.force is None:
                w = self.gates.weight[layer, branch, self.k - 1]
            x, out, logit = fn(x, shift, scale, gate, w, *extra)
            if logit is not None:  # p >= threshold in logit space, kept on the device until the step ends
                self.scores[key] = logit.float() >= self.logit_threshold
            n_compute = B
        elif not bool(rows.any()):
            out = cache
            x = _residual(x, gate, out, self.scratch)
            n_compute = 0
        else:
            idx = rows.nonzero().squeeze(1)
            idx = idx.pin_memory().to(x.device, non_blocking=True) if x.is_cuda else idx.to(x.device)
            _, part, _ = fn(x[idx], shift[idx], scale[idx], gate[idx], None, *extra)
            out = cache.clone()
            out[idx] = part.to(out.dtype)
            x = _residual(x, gate, out, self.scratch)
            n_compute = len(idx)
        self.caches[key] = out
        self._count(layer, branch, B, n_compute, rows)
        return x


def _residual(x, gate, out, scratch: dict | None = None):
    """x + gate * out, (B, N, D) + (B, D) * (B, N, D), rounded as the block does it (product, then sum).

    When no graph is recorded the sum is taken in place and the product goes to a reused buffer: on a CPU,
    allocating these temporaries (page faults) is most of what a skipped step costs.
    """
    if torch.is_grad_enabled():
        return x + gate.unsqueeze(1) * out
    if scratch is None:
        return x.add_(gate.unsqueeze(1) * out)
    buf = scratch.get("buf")
    if buf is None or buf.shape != out.shape or buf.dtype != out.dtype or buf.device != out.device:
        buf = scratch["buf"] = torch.empty_like(out)
    return x.add_(torch.mul(gate.unsqueeze(1), out, out=buf))


def _branch_fn(norm, module, compiled: bool = False, scratch: dict | None = None):
    """The fused work of one branch: Z = modulate(norm(x)), out = F(Z), the gated residual, and the gate score."""
    forward = type(module).forward

    def branch(x, shift, scale, gate, w, *extra):
        if compiled or torch.is_grad_enabled():
            z = modulate(norm(x), shift, scale)  # (B, N, D)
        else:  # the same ops and rounding, without two (B, N, D) temporaries
            z = norm(x).mul_(1 + scale.unsqueeze(1)).add_(shift.unsqueeze(1))
        out = forward(module, z, *extra)
        logit = None if w is None else z.sum(dim=1) @ w.to(z.dtype)  # (B,) score of the next (even) step
        x = x + gate.unsqueeze(1) * out if compiled else _residual(x, gate, out, scratch)  # compiled: fused
        return x, out, logit

    return branch


def _lazy_forward(self, z, *extra):
    """Replacement forward of an attached attn/mlp instance."""
    state, layer, branch = self._lazy_ctx
    return state.run(self, layer, branch, z, *extra)


def branch_names(block):
    """Names of a block's two gated sub-modules: DiT's (attn, mlp), or the block class's `lazy_branches`."""
    return getattr(type(block), "lazy_branches", BRANCHES)


def norm_names(block):
    """Names of the norms in front of the two branches: DiT's (norm1, norm2), or the class's `lazy_norms`."""
    return getattr(type(block), "lazy_norms", ("norm1", "norm2"))


def _lookahead_block_forward(self, x, *args, **kwargs):
    """Replacement forward of a block under look-ahead gates (sample mode; other modes run the block as is).

    Blocks other than DiT's describe themselves with `lazy_branches`, `lazy_norms` and `lazy_inputs(*args)` ->
    (c, (extra args of branch 0, extra args of branch 1)), e.g. Large-DiT's rotary frequencies.
    """
    state, layer = self._lazy_block_ctx
    if state.mode != "sample":
        return type(self).forward(self, x, *args, **kwargs)
    c, extras = self.lazy_inputs(*args, **kwargs) if hasattr(self, "lazy_inputs") else (args[0], ((), ()))
    mods = self.adaLN_modulation(c).chunk(6, dim=1)
    for b, (norm, name) in enumerate(zip(norm_names(self), branch_names(self))):  # chunks: shift, scale, gate
        x = state.run_branch(layer, b, x, *mods[3 * b : 3 * b + 3], getattr(self, norm), getattr(self, name),
                             extras[b])
    return x


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
            block.__dict__.pop("forward", None)
            block.__dict__.pop("_lazy_block_ctx", None)
            for name in branch_names(block):
                module = getattr(block, name)
                module.__dict__.pop("forward", None)
                module.__dict__.pop("_lazy_ctx", None)
        self.model.__dict__.pop("_lazy_state", None)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.remove()


def apply_lazy(model, gates: LazyGates, mode: str = "sample", threshold: float | None = None,
               uniform: bool = False, tie_cfg: bool = False, compile: bool = False, compile_mode: str | None = None,
               record_decisions: bool = False, branches=("attn", "mlp")) -> LazyHandle:
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
        compile: look-ahead gates only: run each branch's fused work (LayerNorm, modulate, module, gated residual,
            gate score) as a `torch.compile` region (one per branch, no graph break inside).
        compile_mode: `torch.compile` mode of those regions, e.g. "reduce-overhead" for CUDA graphs on a GPU.
        record_decisions: keep every row's decision, `handle.state.decisions` (T, L, 2, B), True = computed.
        branches: the branches allowed to be lazy, ("attn",) or ("mlp",) for the paper's individual-laziness
            ablation; the other branch always computes. Names are DiT's ("attn", "mlp") for every model.
    Returns:
        LazyHandle; `handle.remove()` restores the bare model.
    """
    if getattr(model, "_lazy_state", None) is not None:
        raise RuntimeError("gates are already attached to this model: remove the first handle")
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    gates.check_model(model)
    if compile and not gates.lookahead:
        raise ValueError("compile=True needs look-ahead gates (the reference path branches on every module)")
    state = LazyState(gates, mode=mode, threshold=gates.threshold if threshold is None else threshold,
                      uniform=uniform, tie_cfg=tie_cfg, record_decisions=record_decisions, compile=compile,
                      compile_mode=compile_mode, skippable=tuple(BRANCHES.index(b) for b in branches))
    model._lazy_state = state
    for i, block in enumerate(model.blocks):
        for b, name in enumerate(branch_names(block)):
            module = getattr(block, name)
            module._lazy_ctx = (state, i, b)
            module.forward = types.MethodType(_lazy_forward, module)
        if gates.lookahead:
            if not all(hasattr(block, a) for a in (*norm_names(block), "adaLN_modulation")):
                raise TypeError(f"look-ahead gates need DiT-style blocks (two norms, adaLN_modulation), "
                                f"not {type(block).__name__}")
            block._lazy_block_ctx = (state, i)
            block.forward = types.MethodType(_lookahead_block_forward, block)
    hook = model.register_forward_pre_hook(_pre_hook, with_kwargs=True)
    return LazyHandle(model, state, hook)
