"""The block engine (`Policy.engine = "block"`: look-ahead gates, forced plans, Learning-to-Cache, the static
schedules): a step's decisions are known before any branch input exists, so a skipped branch skips its norm and
modulation too.

On a fused block (`BlockSpec.fused`: the DiT formula) the block's `forward` is replaced too (`_block_forward`, sample
mode only; other modes run the block as is, through the branch hooks of `engine_module`). It reads the block's
parts from the registry, takes every branch's decisions first (host tensors: plans, schedules, a look-ahead plan
moved once per step), and computes the adaLN chunks the block needs (`_modulations`: a branch that every row skips
needs its gate only). Then:

- a static step (`static_pattern`: every branch computes every row or skips every row; FORA, TaylorSeer, a
  ForcedPlan, a Learning-to-Cache router, the look-ahead gates' all-or-nothing steps) runs the block as one region,
  `block_region`: the computed branches' norm -> modulate -> module -> gated residual and the skipped branches'
  gate * reuse add, with the pattern a Python constant. What skipped rows receive (`BranchHook.reused`, the
  forecast), the caches and histories (`keep`), the policy's callbacks and the counting run outside it, so the
  region has no host sync and no data-dependent branch: under `torch.compile(fullgraph=True)` it is one graph
  (tests/test_fused.py). With `LazyConfig(compile=True)` it is compiled once per run (the modules are arguments,
  so every block of one structure shares the graph of a pattern). What broke the graph before, with the block's
  forward compiled whole: `bool(rows.any())` / `bool(rows.all())` on the decisions (`_skips_all`, `run_branch`),
  the `data_ptr()` stamp of `_modulations`' weight subsets, and the hooks' counting and caching between branches.
- a step where some branch computes part of its rows runs branch by branch (`BlockHook.run_branch`): skipped rows
  add gate * reuse to the residual; computing rows are gathered and run norm -> modulate -> module -> gated
  residual as one function (`_branch_fn`, a `torch.compile` region with `LazyConfig(compile=True)`).
  So does a step where a token-wise policy's branch computes part of its tokens (`BranchHook.decide_tokens`): the
  chosen tokens of x are gathered and run through the same function (norm, modulation and module act on each token
  alone), their outputs are written into a copy of the cache, and the whole gated residual is added.

On a block that is not fused the module engine's hook runs the plan.

When no graph is recorded, the gated residual and the partial modulation use buffers kept in `LazyRun.scratch`: on
a CPU, allocating these temporaries is most of what a skipped step costs.
"""

import types

import torch

from lazydit.lazy.engine_module import ModuleHook, hook_modules
from lazydit.lazy.engine_module import attach as attach_module
from lazydit.lazy.hooks import gather_tokens, scatter_tokens
from lazydit.models.dit import modulate


class BlockHook(ModuleHook):
    """A branch hook of a fused block: also runs the branch from the block's input x (`run_branch`)."""

    _transient = ("fn",)

    def __init__(self, run, layer: int, branch: int, module, norm):
        self.norm = norm
        self.fn = None  # the fused branch function (built lazily, maybe compiled)
        super().__init__(run, layer, branch, module)

    def run_branch(self, x, shift, scale, gate, extra=(), rows=None, tokens=None):
        """x (B, N, D) -> x + gate * F(modulate(norm(x), shift, scale)), in sample mode.

        The decisions are known before the branch starts (`rows`, `tokens`: this step's `decide_tokens(B, N,
        None)`), so skipped rows reuse without touching the norm or the modulation; shift and scale may be None when
        no row computes. `tokens` (B, n): every row computes only these tokens, the others keep the cache.
        """
        run, B = self.run, x.shape[0]
        if self.fn is None:
            cfg = run.config
            fn = _branch_fn(self.norm, self.module, compiled=cfg.compile, scratch=run.scratch)
            self.fn = torch.compile(fn, mode=cfg.compile_mode) if cfg.compile else fn
        if tokens is not None:
            idx = _to_device(tokens, x)
            _, part, _ = self.fn(gather_tokens(x, idx), shift, scale, gate, *extra)
            out = scatter_tokens(self.reused(writable=True), idx, part)  # a copy of the cache, chosen tokens fresh
            self.keep(out, learn=False)  # a merged output: the cache, not a point of a forecast history
            x = _residual(x, gate, out, run.scratch)
            self.count(B, B, None, x.shape[1], fresh=idx.shape[1])
            return x
        if rows is None or bool(rows.all()):
            x, out, z = self.fn(x, shift, scale, gate, *extra)
            run.policy.computed(self, run.k, z)
            self.keep(out)
            n = B
        elif _skips_all(rows):
            out = self.reused()
            x = _residual(x, gate, out, run.scratch)
            self.keep(out, learn=False)
            n = 0
        else:
            idx = _to_device(rows.nonzero().squeeze(1), x)
            _, part, _ = self.fn(x[idx], shift[idx], scale[idx], gate[idx], *extra)
            out = self.reused(writable=True)  # a buffer of our own: the computed rows are written into it
            out[idx] = part.to(out.dtype)
            self.keep(out, idx)
            x = _residual(x, gate, out, run.scratch)
            n = len(idx)
        self.count(B, n, rows, x.shape[1])
        return x


def _to_device(idx, x):
    """Host indices on x's device (through pinned memory to a GPU, without waiting)."""
    return idx.pin_memory().to(x.device, non_blocking=True) if x.is_cuda else idx.to(x.device)


def _block_forward(self, x, *args, **kwargs):
    """Replacement forward of a fused block (sample mode; other modes run the block as is)."""
    run, hooks, spec = self._lazy_block
    if run.mode != "sample":
        return type(self).forward(self, x, *args, **kwargs)
    c, extras = spec.inputs(self, *args, **kwargs)
    B, N = x.shape[:2]
    rows, tokens = zip(*(hook.decide_tokens(B, N, None) for hook in hooks))  # none depends on a branch output
    pattern = static_pattern(rows) if all(t is None for t in tokens) else None
    skipped = tuple(not p for p in pattern) if pattern is not None else tuple(_skips_all(r) for r in rows)
    mods = _modulations(self, spec, c, skipped, run.scratch)
    if pattern is None:  # some branch computes part of the rows or tokens: branch by branch, gathering them
        for b, hook in enumerate(hooks):
            x = hook.run_branch(x, *mods[b], extras[b], rows=rows[b], tokens=tokens[b])
        return x
    # every branch computes every row or skips every row: the decisions are Python constants, the block's work one
    # region (compiled whole with LazyConfig(compile=True)); what skipped rows receive, the caches, the histories,
    # the policy's callbacks and the counting run outside it
    reuses = tuple(None if p else hook.reused() for hook, p in zip(hooks, pattern))
    parts = tuple((hook.norm, hook.module) for hook in hooks)
    x, outs, zs = _region(run)(x, tuple(mods), reuses, tuple(extras), parts, pattern)
    for hook, p, r, out, z, reuse in zip(hooks, pattern, rows, outs, zs, reuses):
        if p:
            run.policy.computed(hook, run.k, z)
            hook.keep(out)
        else:
            hook.keep(reuse, learn=False)
        hook.count(B, B if p else 0, r, N)
    return x


def static_pattern(rows) -> tuple | None:
    """The step's plan of a block as Python constants, from host decisions `rows` (per branch: (B,) bool, True =
    compute, or None = all compute): per branch True (every row computes) or False (every row skips); None when
    some branch computes part of its rows. The decisions of the block engine's policies live on the host (plans,
    schedules, a look-ahead plan moved once per step), so this reads no device."""
    pattern = []
    for r in rows:
        if r is None:
            pattern.append(True)
        elif r.is_cuda:  # a policy of its own deciding on the device: take the general path (no sync here)
            return None
        else:
            n = int(r.sum())
            if 0 < n < r.numel():
                return None
            pattern.append(n == r.numel())
    return tuple(pattern)


def _region(run):
    """The block region of `run`: `block_region`, or its `torch.compile` with LazyConfig(compile=True) (one
    compiled function for every block: its modules are arguments, so blocks of one structure share the graph of a
    pattern)."""
    fn = run.scratch.get("region")
    if fn is None:
        cfg = run.config
        if cfg.compile:
            fn = torch.compile(block_region, mode=cfg.compile_mode)
        else:
            def fn(*args):
                return block_region(*args, scratch=run.scratch)
        run.scratch["region"] = fn
    return fn


def block_region(x, mods, reuses, extras, parts, pattern, scratch: dict | None = None):
    """One fused block's step whose plan is Python constants (`pattern`, per branch True = every row computes):
    computed branches run norm -> modulate -> module -> gated residual (`_branch`), skipped ones add gate * reuse.

    Args:
        x: (B, N, D) block input.
        mods: per branch (shift, scale, gate) ((B, D); shift and scale None where the branch skips).
        reuses: per branch what the skipped rows receive ((B, N, D); None where the branch computes).
        extras: per branch the module's extra arguments.
        parts: per branch (norm, module).
        pattern: per branch True (compute) or False (skip); part of the compiled function's guards.
        scratch: eager only: the run's scratch dict (the gated residual's reused buffer); None under
            `torch.compile` (functional ops: the compiler fuses them).
    Returns:
        (x, outs, zs): the block output and per branch the module output and its modulated input (None where
        skipped). Under `torch.compile(fullgraph=True)` this is one graph (no host sync, no data-dependent branch:
        tests/test_fused.py).
    """
    compiled = scratch is None
    outs, zs = [], []
    for b, (norm, module) in enumerate(parts):
        shift, scale, gate = mods[b]
        if pattern[b]:
            x, out, z = _branch(norm, module, x, shift, scale, gate, extras[b], compiled, scratch)
        else:
            x, out, z = (x + gate.unsqueeze(1) * reuses[b] if compiled else
                         _residual(x, gate, reuses[b], scratch)), None, None
        outs.append(out)
        zs.append(z)
    return x, tuple(outs), tuple(zs)


def _skips_all(rows) -> bool:
    """Whether host decisions `rows` ((B,) bool, True = compute; None: all compute) skip every row."""
    return rows is not None and not bool(rows.any())


def _residual(x, gate, out, scratch: dict | None = None):
    """x + gate * out, (B, N, D) + (B, D) * (B, N, D), rounded as the block does it (product, then sum).

    When no graph is recorded the sum is taken in place and the product goes to a reused buffer.
    """
    if torch.is_grad_enabled():
        return x + gate.unsqueeze(1) * out
    if scratch is None:
        return x.add_(gate.unsqueeze(1) * out)
    buf = scratch.get("buf")
    if buf is None or buf.shape != out.shape or buf.dtype != out.dtype or buf.device != out.device:
        buf = scratch["buf"] = torch.empty_like(out)
    return x.add_(torch.mul(gate.unsqueeze(1), out, out=buf))


def _branch(norm, module, x, shift, scale, gate, extra, compiled: bool, scratch: dict | None):
    """The fused work of one branch: Z = modulate(norm(x)), out = F(Z), the gated residual; returns (x, out, Z).
    `compiled`: functional ops for `torch.compile` (it fuses them); otherwise in place, the same ops and rounding."""
    if compiled or torch.is_grad_enabled():
        z = modulate(norm(x), shift, scale)  # (B, N, D)
    else:  # the same ops and rounding, without two (B, N, D) temporaries
        z = norm(x).mul_(1 + scale.unsqueeze(1)).add_(shift.unsqueeze(1))
    out = type(module).forward(module, z, *extra)
    x = x + gate.unsqueeze(1) * out if compiled else _residual(x, gate, out, scratch)  # compiled: fused
    return x, out, z


def _branch_fn(norm, module, compiled: bool = False, scratch: dict | None = None):
    """`_branch` of one branch as a function of (x, shift, scale, gate, *extra) (the partial rows' path)."""

    def branch(x, shift, scale, gate, *extra):
        return _branch(norm, module, x, shift, scale, gate, extra, compiled, scratch)

    return branch


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


def attach(run, layer: int, block, spec) -> list:
    """Attach block `layer` to the block engine (a block that is not fused: to the module engine's hooks); returns
    its branch hooks."""
    if not spec.fused:
        return attach_module(run, layer, block, spec)
    hooks = hook_modules(run, layer, spec.modules(block), BlockHook, norm=[getattr(block, n) for n in spec.norms])
    block._lazy_block = (run, hooks, spec)  # the registry is read once, not per step
    block.forward = types.MethodType(_block_forward, block)
    return hooks
