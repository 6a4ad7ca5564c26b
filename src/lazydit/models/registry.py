"""Where a transformer block keeps the parts that caching methods act on.

A caching method (`lazydit.lazy`) never reads a block's attributes by name: it asks this registry. Each block type
registers a `BlockSpec`: the names of its gated branches (the modules whose output can be reused) and their kinds,
the norm in front of each, its adaLN modulation, and how its forward arguments split into the conditioning vector
and the extra arguments of each branch. DiT's and Large-DiT's blocks register themselves where they are defined;
diffusers' `BasicTransformerBlock` (DiT and PixArt transformers) is described in `lazydit.models.diffusers_dit`,
registered on first use; another model's block needs one `register_block` call.

For a block whose spec is `fused` (DiT, Large-DiT), one branch b computes
    x = x + gate_b * F_b(modulate(norm_b(x), shift_b, scale_b), *extra_b)
with (shift_b, scale_b, gate_b) = chunks 3b, 3b+1, 3b+2 of `modulation(c).chunk(3 * branches)`, and policies that
plan ahead run each branch as one fused function. Other blocks run their own forward; the branch modules are hooked
where the block calls them (every policy works; a skipped branch still pays for its norm and modulation).
"""

from dataclasses import dataclass
from typing import Callable

BRANCH_NAMES = ("attn", "mlp")  # the branches of a DiT block: branch 0 and 1 (gate files, statistics, CLI)
BRANCH_KINDS = ("attn", "cross", "mlp")  # every kind of branch (cross: cross-attention to text, PixArt)
MODEL_BLOCKS = ("blocks", "transformer_blocks")  # where a model keeps its blocks (lazydit / diffusers)


def _condition_only(block, c):
    """DiT: forward(x, c); no branch takes extra arguments."""
    return c, ((), ())


@dataclass(frozen=True)
class BlockSpec:
    """How a block type is laid out (see the module docstring)."""

    branches: tuple  # attribute names of the gated branch modules, in order (attn first, then mlp)
    norms: tuple  # attribute names of the norm in front of each branch
    modulation: str = "adaLN_modulation"  # attribute name of the module mapping c to the (shift, scale, gate) chunks
    inputs: Callable = _condition_only  # (block, *forward args after x) -> (c, (extra args of each branch))
    kinds: tuple = BRANCH_NAMES  # kind of each branch (BRANCH_KINDS): what LazyConfig.skippable_kinds selects
    fused: bool = True  # the block computes the formula of the module docstring (block-level fused path allowed)
    modulated: Callable | None = None  # (block, x, *args, **kwargs) -> branch 0's modulated input, for blocks
    # that are not fused (TeaCache's probe); None: modulate(norm_0(x), shift_0, scale_0) from `modulation`

    def modules(self, block) -> list:
        """The branch modules of `block`, in branch order."""
        return [getattr(block, name) for name in self.branches]


_REGISTRY: dict = {}


def register_block(block_type: type, spec):
    """Describe a block type for every caching method (subclasses inherit the description).

    Args:
        block_type: the block class.
        spec: a BlockSpec, or a function block -> BlockSpec for types whose instances differ (diffusers' blocks have
            a cross-attention or not).
    """
    _REGISTRY[block_type] = spec


def block_spec(block) -> BlockSpec:
    """The BlockSpec of a block instance (looked up along its class's MRO).

    Raises:
        TypeError: the block type was never registered.
    """
    if type(block).__module__.startswith("diffusers."):
        import lazydit.models.diffusers_dit  # noqa: F401  (registers diffusers' blocks)
    for cls in type(block).__mro__:
        if cls in _REGISTRY:
            spec = _REGISTRY[cls]
            return spec if isinstance(spec, BlockSpec) else spec(block)
    raise TypeError(f"{type(block).__name__} is not a registered transformer block: describe it with "
                    "lazydit.models.registry.register_block(BlockType, BlockSpec(branches=..., norms=...))")


def model_blocks(model) -> list:
    """The transformer blocks of a model, in depth order (`model.blocks`, or diffusers' `transformer_blocks`)."""
    for name in MODEL_BLOCKS:
        blocks = getattr(model, name, None)
        if blocks is not None:
            return list(blocks)
    raise TypeError(f"{type(model).__name__} has no `blocks` or `transformer_blocks`: lazydit's caching methods need a "
                    "DiT-style model")


def model_width(model) -> int:
    """Hidden size D of a model's blocks (lazydit configs: hidden_size; diffusers: heads x head dim)."""
    cfg = model.config
    if hasattr(cfg, "hidden_size"):
        return cfg.hidden_size
    return cfg.num_attention_heads * cfg.attention_head_dim
