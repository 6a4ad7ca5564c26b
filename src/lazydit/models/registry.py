"""Where a transformer block keeps the parts that caching methods act on.

A caching method (`lazydit.lazy`) never reads a block's attributes by name: it asks this registry. Each block type
registers a `BlockSpec`: the names of its gated branches (the modules whose output can be reused), the norm in
front of each, its adaLN modulation, and how its forward arguments split into the conditioning vector and the
extra arguments of each branch. DiT's and Large-DiT's blocks register themselves where they are defined; another
model's block needs one `register_block` call.

For a block of this registry, one branch b computes
    x = x + gate_b * F_b(modulate(norm_b(x), shift_b, scale_b), *extra_b)
with (shift_b, scale_b, gate_b) = chunks 3b, 3b+1, 3b+2 of `modulation(c).chunk(3 * branches)`.
"""

from dataclasses import dataclass
from typing import Callable

BRANCH_NAMES = ("attn", "mlp")  # what lazydit calls branch 0 and 1 of every model (gate files, statistics, CLI)


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

    def modules(self, block) -> list:
        """The branch modules of `block`, in branch order."""
        return [getattr(block, name) for name in self.branches]


_REGISTRY: dict = {}


def register_block(block_type: type, spec: BlockSpec):
    """Describe a block type for every caching method (subclasses inherit the description)."""
    _REGISTRY[block_type] = spec


def block_spec(block) -> BlockSpec:
    """The BlockSpec of a block instance (looked up along its class's MRO).

    Raises:
        TypeError: the block type was never registered.
    """
    for cls in type(block).__mro__:
        if cls in _REGISTRY:
            return _REGISTRY[cls]
    raise TypeError(f"{type(block).__name__} is not a registered transformer block: describe it with "
                    "lazydit.models.registry.register_block(BlockType, BlockSpec(branches=..., norms=...))")


def model_blocks(model) -> list:
    """The transformer blocks of a model, in depth order (`model.blocks`)."""
    blocks = getattr(model, "blocks", None)
    if blocks is None:
        raise TypeError(f"{type(model).__name__} has no `blocks`: lazydit's caching methods need a DiT-style model")
    return list(blocks)
