"""Attaching a caching policy to a model from the outside: Config -> State -> Hook -> `apply_lazy()`, in the manner
of diffusers' hooks.

- `BranchHook`: one per gated branch (attn and mlp of every block). It owns that branch's cache, the input recorded
  for training and any pending decision, runs the module on the rows that compute, merges mixed batches, and
  counts. The branch module's `forward` is overridden on the instance (bound with `types.MethodType`, so
  `copy.deepcopy` of an attached model stays correct); module types and state-dict keys stay as they were.
- `LazyRun`: what the hooks of one model share: the policy, the mode, the current step, the statistics.
- For policies that plan ahead, each block's `forward` is overridden too (`_block_forward`), so that a skipped
  branch skips its norm and modulation; the block registry (`lazydit.models.registry`) says where they are.
- `apply_lazy()` attaches and returns a `LazyHandle`; `handle.remove()` restores the bare model.

Modes: "sample" (hard per-row decisions), "soft" (gate training: y = p F(z) + (1 - p) cache), "record" (run every
branch and fill the caches), "off" (the bare model).
"""

import copy
import types

import torch

from lazydit.errors import GateMismatchError, UsageError
from lazydit.lazy.config import LazyConfig
from lazydit.lazy.gates import LazyGates
from lazydit.lazy.policies import Policy, policy_for
from lazydit.lazy.stats import LazyStats, StatsCollector
from lazydit.models.dit import modulate
from lazydit.models.registry import block_spec, model_blocks

MODES = ("off", "record", "soft", "sample")


class _Transient:
    """deepcopy leaves out the attributes named in `_transient` (compiled functions close over the original
    modules; scratch buffers are rebuilt)."""

    _transient: tuple = ()

    def __deepcopy__(self, memo):
        new = copy.copy(self)
        memo[id(self)] = new
        for key, value in self.__dict__.items():
            setattr(new, key, {} if key in self._transient and isinstance(value, dict) else
                    None if key in self._transient else copy.deepcopy(value, memo))
        return new


class LazyRun(_Transient):
    """State shared by the hooks of one model: policy, config, mode, current step k, statistics."""

    _transient = ("scratch",)

    def __init__(self, policy: Policy, mode: str, depth: int, kinds: tuple):
        self.policy, self.config, self.mode = policy, policy.config, mode
        self.depth, self.branches, self.kinds = depth, len(kinds), kinds
        self.hooks: list = []  # BranchHook per (layer, branch), layer-major
        self.k = 0  # current respaced step index
        self.timesteps = policy.timesteps  # k -> original timestep
        self.timestep_index = {t: k for k, t in enumerate(self.timesteps)}
        self.collector = StatsCollector(policy.steps, depth, kinds, self.config.record_decisions)
        self.probs: list = []  # soft mode: (branch, p (B,)) per branch evaluation, for the training penalty
        self.skippable = self.config.skippable(kinds)
        self.caller = None  # a function naming the sampler that calls the model, for the mismatch error (diffusers)
        self.scratch: dict = {}  # reused buffers: the gated residual's (B, N, D), the modulation weight subsets
        self.blocks: list = []  # the model's blocks (block-level policies)
        self.block_cache = BlockCache()  # block-level policies: the cached residual and the policy's state

    @property
    def t(self) -> int:
        """The original timestep of the current step."""
        return self.timesteps[self.k]

    def set_timestep(self, t):
        """Map the (original) timestep the model is called at to the policy's respaced index; start the step."""
        t0 = int(t.reshape(-1)[0]) if torch.is_tensor(t) else int(t)
        if t0 not in self.timestep_index:
            T = self.policy.steps
            where = f" by {self.caller()}" if self.caller else ""
            raise GateMismatchError(
                f"the model was called{where} at timestep {t0}, which is not on the schedule the "
                f"{type(self.policy).__name__} policy is defined on ({self.policy.schedule_name()}, timesteps "
                f"{_short(self.timesteps[::-1])}): sample with that schedule, or train gates for yours")
        k = self.timestep_index[t0]
        if self.mode == "sample" and k == self.policy.steps - 1:
            self.reset()  # the first sampling step starts a new batch
        self.k = k
        if self.mode == "sample":
            self.policy.begin_step(self, k)

    def reset(self):
        """Forget every cache (a new batch starts)."""
        self.probs.clear()
        self.block_cache.reset()
        for h in self.hooks:
            h.reset()


class BranchHook(_Transient):
    """One gated branch: its module, cache, recorded input and pending decision; both execution paths."""

    _transient = ("fn",)

    def __init__(self, run: LazyRun, layer: int, branch: int, module, norm=None):
        self.run, self.layer, self.branch, self.module, self.norm = run, layer, branch, module, norm
        self.forward = type(module).forward  # the bare module's forward
        self.fn = None  # the fused branch function of the plans-ahead path (built lazily, maybe compiled)
        self.reset()

    def reset(self):
        self.cache = None  # (B, N, D) pre-gate output of the last step
        self.z = None  # record mode, look-ahead: the input Z recorded at that step
        self.score = None  # look-ahead: (B,) device compute decisions for the next step
        self.plan = None  # plans-ahead: (B,) host compute decisions of this step
        self.skips = None  # LazyConfig.max_skips: (B,) consecutive skips of each row so far (None: none)
        self.history = None  # forecast reuse: the per-row history of computed outputs (ForecastHistory)

    # -------------------------------------------------------------- shared by both paths

    def _decide(self, rows: int, z):
        """Compute decisions (B,) bool or None (all compute): nothing to reuse, or a branch that may not skip, always
        computes; otherwise the policy decides (and LazyConfig.max_skips caps each row's run of skips: a skip may
        reuse a cache that was itself reused, max_skips times in a row at most)."""
        run = self.run
        if self.cache is None or self.cache.shape[0] != rows or self.branch not in run.skippable:
            compute = None
        else:
            compute = run.policy.compute_rows(self, run.k, z)
        cap = run.config.max_skips
        if cap is None:
            return compute
        if compute is None:
            self.skips = None
            return None
        prev = (torch.zeros(rows, dtype=torch.long, device=compute.device) if self.skips is None
                else self.skips.to(compute.device))
        compute = compute | (prev >= cap)
        self.skips = torch.where(compute, 0, prev + 1)
        return compute

    def remember(self, out, rows=None):
        """Rows `rows` (index tensor; None: all) of `out` were computed at this step: the forecast history learns
        them (policies with forecast > 0 only)."""
        policy = self.run.policy
        if not policy.forecast:
            return
        if self.history is None:
            self.history = policy.new_history()
        self.history.update(out.detach(), policy.clock(self.run), rows)

    def forecast(self, dtype):
        """This step's forecast of every row (LazyConfig.forecast, TaylorSeer; docs/method-notes.md)."""
        if self.history is None:
            raise RuntimeError("forecast reuse before any computed step")
        return self.history.predict(self.run.policy.clock(self.run), dtype)

    def _reused(self):
        """What skipped rows receive, as a tensor the caller may write into: the policy's reuse, copied only when it
        is the cache itself (a forecast is a new tensor already)."""
        out = self.run.policy.reuse(self, self.run.k)
        return out.clone() if out is self.cache else out

    def _count(self, rows: int, computed: int, decision):
        self.run.collector.count(self.run.k, self.layer, self.branch, rows, computed, decision)

    # -------------------------------------------------------------- module-level path (policies that read Z_k)

    def __call__(self, z, *extra, **kwargs):
        """The lazy forward of the branch module on its modulated input z (B, N, D)."""
        run, module = self.run, self.module
        forward = self.forward if not kwargs else (lambda m, *a: self.forward(m, *a, **kwargs))
        mode = run.mode
        if mode == "off":
            return forward(module, z, *extra)
        if mode == "record":
            out = forward(module, z, *extra)
            self.cache = out.detach()
            self.remember(out)
            if run.policy.records_inputs:
                self.z = z.detach()
            return out
        if mode == "soft":  # y = p F(z) + (1 - p) reuse (the cache, or its forecast)
            if self.cache is None:
                raise RuntimeError("soft mode needs caches: run the model once in 'record' mode first")
            p = run.policy.compute_prob(self, run.k, z)
            run.probs.append((self.branch, p))
            pb = p.to(z.dtype)[:, None, None]
            return pb * forward(module, z, *extra) + (1 - pb) * run.policy.reuse(self, run.k)
        B = z.shape[0]
        compute = self._decide(B, None if run.policy.plans_ahead else z)
        n = B if compute is None else int(compute.sum())  # one host sync per branch, as the reference
        if n == B:
            out = forward(module, z, *extra)
            if run.policy.plans_ahead:  # a block that is not fused runs plans-ahead policies here
                run.policy.computed(self, run.k, z)
            self.remember(out)
        elif n == 0:
            out = run.policy.reuse(self, run.k)  # reuse; the cache stays as it is
        else:
            idx = compute.nonzero().squeeze(1).to(z.device)
            out = self._reused()  # a buffer of our own: the computed rows are written into it
            out[idx] = forward(module, z[idx], *_rows(extra, idx, B)).to(out.dtype)
            self.remember(out, idx)
        self.cache = out
        self._count(B, n, compute)
        return out

    # -------------------------------------------------------------- block-level path (policies that plan ahead)

    def decide_ahead(self, rows: int):
        """This step's host (B,) bool decisions (None: every row computes), before the branch input exists."""
        return self._decide(rows, None)

    def run_branch(self, x, shift, scale, gate, extra=(), rows=None):
        """x (B, N, D) -> x + gate * F(modulate(norm(x), shift, scale)), in sample mode.

        The decisions are known before the branch starts (`rows`: this step's `decide_ahead`), so skipped rows reuse
        without touching the norm or the modulation; shift and scale may be None when no row computes.
        """
        run, B = self.run, x.shape[0]
        if self.fn is None:
            cfg = run.config
            fn = _branch_fn(self.norm, self.module, compiled=cfg.compile, scratch=run.scratch)
            self.fn = torch.compile(fn, mode=cfg.compile_mode) if cfg.compile else fn
        if rows is None or bool(rows.all()):
            x, out, z = self.fn(x, shift, scale, gate, *extra)
            run.policy.computed(self, run.k, z)
            self.remember(out)
            n = B
        elif _skips_all(rows):
            out = run.policy.reuse(self, run.k)
            x = _residual(x, gate, out, run.scratch)
            n = 0
        else:
            idx = rows.nonzero().squeeze(1)
            idx = idx.pin_memory().to(x.device, non_blocking=True) if x.is_cuda else idx.to(x.device)
            _, part, _ = self.fn(x[idx], shift[idx], scale[idx], gate[idx], *extra)
            out = self._reused()  # a buffer of our own: the computed rows are written into it
            out[idx] = part.to(out.dtype)
            self.remember(out, idx)
            x = _residual(x, gate, out, run.scratch)
            n = len(idx)
        self.cache = out
        self._count(B, n, rows)
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
    """The fused work of one branch: Z = modulate(norm(x)), out = F(Z), the gated residual; returns (x, out, Z)."""
    forward = type(module).forward

    def branch(x, shift, scale, gate, *extra):
        if compiled or torch.is_grad_enabled():
            z = modulate(norm(x), shift, scale)  # (B, N, D)
        else:  # the same ops and rounding, without two (B, N, D) temporaries
            z = norm(x).mul_(1 + scale.unsqueeze(1)).add_(shift.unsqueeze(1))
        out = forward(module, z, *extra)
        x = x + gate.unsqueeze(1) * out if compiled else _residual(x, gate, out, scratch)  # compiled: fused
        return x, out, z

    return branch


def _short(ts: list) -> str:
    """A timestep list for a message: the first 4 and the last 2."""
    return str(ts) if len(ts) <= 6 else f"[{', '.join(map(str, ts[:4]))}, ..., {', '.join(map(str, ts[-2:]))}]"


def _rows(extra: tuple, idx, B: int) -> tuple:
    """The rows idx of every per-row tensor argument (batch-first, B rows) of a branch module."""
    return tuple(a[idx] if torch.is_tensor(a) and a.dim() > 0 and a.shape[0] == B else a for a in extra)


def _hooked_forward(self, z, *extra, **kwargs):
    """Replacement forward of an attached branch module."""
    return self._lazy_hook(z, *extra, **kwargs)


def _block_forward(self, x, *args, **kwargs):
    """Replacement forward of a block under a plans-ahead policy (sample mode; other modes run the block as is)."""
    run, hooks, spec = self._lazy_block
    if run.mode != "sample":
        return type(self).forward(self, x, *args, **kwargs)
    c, extras = spec.inputs(self, *args, **kwargs)
    rows = [hook.decide_ahead(x.shape[0]) for hook in hooks]  # plans ahead: no decision depends on a branch output
    mods = _modulations(self, spec, c, tuple(_skips_all(r) for r in rows), run.scratch)
    for b, hook in enumerate(hooks):
        x = hook.run_branch(x, *mods[b], extras[b], rows=rows[b])
    return x


def _skips_all(rows) -> bool:
    """Whether host decisions `rows` ((B,) bool, True = compute; None: all compute) skip every row."""
    return rows is not None and not bool(rows.any())


def _modulations(block, spec, c, skipped: tuple, scratch: dict) -> list:
    """(shift, scale, gate) of every branch of `block` from its adaLN modulation of c (B, C).

    A branch that every row skips needs its gate only (the gated residual of the reused output): when the modulation
    is SiLU -> Linear (DiT, Large-DiT), only the columns of the chunks needed are computed, from a row subset of the
    weight kept in `scratch` per block and pattern (rebuilt when the weight changes). The dot products are those of
    the full product, so the values are the same (checked in tests/test_fast_path.py); a fully skipped DiT block
    then pays a third of its modulation. Otherwise every chunk is computed and shift, scale are None where skipped.
    """
    nb = len(skipped)
    mod = getattr(block, spec.modulation)
    lin = mod[-1] if isinstance(mod, torch.nn.Sequential) and len(mod) == 2 and isinstance(mod[0], torch.nn.SiLU) \
        and isinstance(mod[1], torch.nn.Linear) else None
    if not any(skipped) or lin is None or torch.is_grad_enabled():
        chunks = mod(c).chunk(3 * nb, dim=1)
        return [(None, None, chunks[3 * b + 2]) if skipped[b] else chunks[3 * b : 3 * b + 3] for b in range(nb)]
    stamp = (lin.weight.data_ptr(), lin.weight._version, None if lin.bias is None else lin.bias._version)
    key = ("modulation", id(block), skipped)
    entry = scratch.get(key)
    if entry is None or entry[0] != stamp:
        D = lin.out_features // (3 * nb)
        cols = [j for b in range(nb) for j in ((3 * b + 2,) if skipped[b] else (3 * b, 3 * b + 1, 3 * b + 2))]
        idx = torch.cat([torch.arange(j * D, (j + 1) * D) for j in cols]).to(lin.weight.device)
        entry = scratch[key] = (stamp, D, lin.weight[idx], None if lin.bias is None else lin.bias[idx])
    _, D, weight, bias = entry
    parts = iter(torch.nn.functional.linear(mod[0](c), weight, bias).split(D, dim=1))
    return [(None, None, next(parts)) if skipped[b] else (next(parts), next(parts), next(parts)) for b in range(nb)]


class BlockProbe:
    """What a block-level policy sees at the input of block `first_cached` of one step (`Policy.skip_blocks`).

    Attributes:
        run: the LazyRun (k, t, depth, policy).
        x0: (B, N, D) hidden state entering block 0.
        x: (B, N, D) hidden state entering block first_cached (x0 when that is block 0).
        block0, args, kwargs: block 0 and its forward arguments after x.
        cached: whether a residual of this batch's shape is cached (a skip is possible).
        state: a dict the policy keeps between steps of one batch (emptied by `reset`).
    """

    def __init__(self, run, x0, x, block0, args, kwargs, cached: bool, state: dict):
        self.run, self.x0, self.x, self.block0, self.args, self.kwargs = run, x0, x, block0, args, kwargs
        self.cached, self.state = cached, state

    def modulated(self, branch: int = 0) -> torch.Tensor:
        """Block 0's modulated input of `branch` at this step: modulate(norm_b(x0), shift_b, scale_b), (B, N, D)."""
        block = self.block0
        spec = block_spec(block)
        if spec.modulated is not None:
            if branch != 0:
                raise ValueError("this block type describes the modulated input of branch 0 only")
            return spec.modulated(block, self.x0, *self.args, **self.kwargs)
        c, _ = spec.inputs(block, *self.args, **self.kwargs)
        mods = getattr(block, spec.modulation)(c).chunk(3 * len(spec.branches), dim=1)
        return modulate(getattr(block, spec.norms[branch])(self.x0), mods[3 * branch], mods[3 * branch + 1])


class BlockCache:
    """The block-level state of one run: the cached residual, this step's decision, the policy's state dict."""

    def __init__(self):
        self.reset()

    def reset(self):
        self.residual = None  # (B, N, D): output of the last block - input of block first_cached, last computed step
        self.x_start = None  # input of block first_cached at this (computed) step
        self.x0 = None  # input of block 0 at this step
        self.skip = False  # this step reuses the residual
        self.state: dict = {}


def _residual_block_forward(self, x, *args, **kwargs):
    """Replacement forward of a block under a block-level policy (sample mode; other modes run the block as is)."""
    run, i = self._lazy_residual
    bare = type(self).forward
    if run.mode != "sample":
        return bare(self, x, *args, **kwargs)
    cache, first = run.block_cache, run.policy.first_cached
    if i == 0:
        cache.x0, cache.skip = x, False
    if i == first:
        cached = cache.residual is not None and cache.residual.shape == x.shape
        probe = BlockProbe(run, cache.x0, x, run.blocks[0], args, kwargs, cached, cache.state)
        cache.skip = bool(run.policy.skip_blocks(probe)) and cached
        if cache.skip:
            x = x + cache.residual.to(x.dtype)
        else:
            cache.x_start = x
    B = x.shape[0]
    if cache.skip and i >= first:
        for b in range(run.branches):
            run.collector.count(run.k, i, b, B, 0, None)
        return x
    out = bare(self, x, *args, **kwargs)
    for b in range(run.branches):
        run.collector.count(run.k, i, b, B, B, None)
    if i == run.depth - 1:
        cache.residual = (out - cache.x_start).detach()
    return out


def _pre_hook(model, args, kwargs):
    t = args[1] if len(args) > 1 else kwargs["t"] if "t" in kwargs else kwargs["timestep"]  # lazydit / diffusers
    model._lazy_run.set_timestep(t)


class LazyHandle:
    """Returned by `apply_lazy`: the run's state, plus mode / reset / stats / remove."""

    def __init__(self, model, run: LazyRun, hook):
        self.model, self.run, self._hook = model, run, hook

    @property
    def policy(self) -> Policy:
        return self.run.policy

    @property
    def mode(self):
        return self.run.mode

    @mode.setter
    def mode(self, value):
        if value not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {value!r}")
        self.run.mode = value

    @property
    def probs(self) -> list:
        """Soft mode: (branch, p (B,)) of every branch evaluation since the last `reset()` / `probs.clear()`."""
        return self.run.probs

    @property
    def decisions(self):
        """(T, L, 2, B) bool, True = computed, of the last batch (with LazyConfig(record_decisions=True))."""
        return self.run.collector.decisions

    def reset(self):
        """Forget caches (and soft-mode probabilities)."""
        self.run.reset()

    def reset_stats(self):
        self.run.collector.reset()

    def stats(self) -> LazyStats:
        return self.run.collector.stats()

    def remove(self):
        """Detach the policy: the model is the bare model again."""
        self._hook.remove()
        for block in model_blocks(self.model):
            block.__dict__.pop("forward", None)
            block.__dict__.pop("_lazy_block", None)
            block.__dict__.pop("_lazy_residual", None)
            for module in block_spec(block).modules(block):
                module.__dict__.pop("forward", None)
                module.__dict__.pop("_lazy_hook", None)
        self.model.__dict__.pop("_lazy_run", None)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.remove()


def apply_lazy(model, policy, config: LazyConfig | None = None, mode: str = "sample") -> LazyHandle:
    """Attach a caching policy (or LazyDiT gates) to a model from the outside.

    Args:
        model: a DiT or Large-DiT (any model whose blocks are in `lazydit.models.registry`).
        policy: a `Policy`, or a `LazyGates` bank (it becomes `ReferenceGates` or `LookaheadGates` with `config`).
        config: LazyConfig for a gate bank (a Policy carries its own).
        mode: "sample" (hard per-row skips), "soft" (training mix), "record" (fill caches), "off" (bare).
    Returns:
        LazyHandle; `handle.remove()` (or leaving a `with` block) restores the bare model.
    """
    if getattr(model, "_lazy_run", None) is not None:
        raise RuntimeError("a caching policy is already attached to this model: remove the first handle")
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if isinstance(policy, LazyGates):
        policy = policy_for(policy, config)
    elif config is not None:
        raise ValueError("pass the LazyConfig to the policy's constructor, not to apply_lazy")
    policy.check_model(model)
    if policy.config.compile and not policy.plans_ahead:
        raise UsageError(f"compile needs a policy that plans ahead (look-ahead gates, a forced plan), not "
                           f"{type(policy).__name__}: the reference path branches on every module")
    blocks = model_blocks(model)
    specs = [block_spec(b) for b in blocks]
    run = LazyRun(policy, mode, len(blocks), specs[0].kinds)
    run.blocks = blocks
    for i, (block, spec) in enumerate(zip(blocks, specs)):
        if spec.kinds != specs[0].kinds:
            raise UsageError(f"block {i} has branches {spec.kinds}, block 0 {specs[0].kinds}: one kind of block only")
        if policy.caches_blocks:  # one residual for the model, no branch hooks
            block._lazy_residual = (run, i)
            block.forward = types.MethodType(_residual_block_forward, block)
            continue
        hooks = []
        modules = spec.modules(block)
        norms = [getattr(block, n) for n in spec.norms] if spec.fused else [None] * len(modules)
        for b, (module, norm) in enumerate(zip(modules, norms)):
            hook = BranchHook(run, i, b, module, norm)
            module._lazy_hook = hook
            module.forward = types.MethodType(_hooked_forward, module)
            hooks.append(hook)
        run.hooks.extend(hooks)
        if policy.plans_ahead and spec.fused:
            block._lazy_block = (run, hooks, spec)  # the registry is read once, not per step
            block.forward = types.MethodType(_block_forward, block)
    model._lazy_run = run
    hook = model.register_forward_pre_hook(_pre_hook, with_kwargs=True)
    return LazyHandle(model, run, hook)
