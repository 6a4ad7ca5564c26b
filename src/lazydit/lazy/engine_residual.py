"""The residual engine (`Policy.engine = "residual"`: first-block cache, TeaCache): no branch hooks; the blocks
reuse one cached residual per step.

Every block's `forward` is replaced (`_residual_block_forward`, sample mode only). At the input of block
`Policy.first_cached` the policy answers `skip_blocks(probe)` once for the whole batch (`BlockProbe`); a skipped step
adds the cached residual (the last block's output minus that input, at the last computed step: `BlockCache`) and
passes the later blocks through. Counting is per block and branch, as on the branch engines.
"""

import types

import torch

from lazydit.models.dit import modulate
from lazydit.models.registry import block_spec


class BlockProbe:
    """What a residual policy sees at the input of block `first_cached` of one step (`Policy.skip_blocks`).

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
    """The residual state of one run: the cached residual, this step's decision, the policy's state dict."""

    def __init__(self):
        self.reset()

    def reset(self):
        self.residual = None  # (B, N, D): output of the last block - input of block first_cached, last computed step
        self.x_start = None  # input of block first_cached at this (computed) step
        self.x0 = None  # input of block 0 at this step
        self.skip = False  # this step reuses the residual
        self.state: dict = {}


def _residual_block_forward(self, x, *args, **kwargs):
    """Replacement forward of a block under a residual policy (sample mode; other modes run the block as is)."""
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
        for b in range(run.num_branches):
            run.collector.count(run.k, i, b, B, 0, None)
        return x
    out = bare(self, x, *args, **kwargs)
    for b in range(run.num_branches):
        run.collector.count(run.k, i, b, B, B, None)
    if i == run.depth - 1:
        cache.residual = (out - cache.x_start).detach()
    return out


def attach(run, layer: int, block, spec) -> list:
    """Attach block `layer` to the residual engine (one residual for the model); no branch hooks."""
    if run.block_cache is None:
        run.block_cache = BlockCache()
    block._lazy_residual = (run, layer)
    block.forward = types.MethodType(_residual_block_forward, block)
    return []
