"""Attaching a caching policy to a model from the outside, in the manner of diffusers' hooks: `apply_lazy()` hands
every block to the engine the policy names (`Policy.engine`) and returns a `LazyHandle`; `handle.remove()`
restores the bare model.

- "module" (`engine_module`): the branch modules' `forward` is replaced; decisions on the branch input z.
- "block" (`engine_block`): the fused blocks' `forward` is replaced too; decisions before z exists.
- "residual" (`engine_residual`): the blocks' `forward` is replaced; one cached residual per step.

The state the engines share is in `lazydit.lazy.hooks` (`LazyRun`, `BranchHook`).
"""

from lazydit.errors import UsageError
from lazydit.lazy.config import LazyConfig
from lazydit.lazy.engine_block import attach as attach_block
from lazydit.lazy.engine_module import attach as attach_module
from lazydit.lazy.engine_residual import attach as attach_residual
from lazydit.lazy.gates import LazyGates
from lazydit.lazy.hooks import MODES, LazyRun
from lazydit.lazy.policies import ENGINES, Policy, policy_for
from lazydit.lazy.stats import LazyStats
from lazydit.models.registry import block_spec, model_blocks

ATTACH = {"module": attach_module, "block": attach_block, "residual": attach_residual}  # Policy.engine -> attach


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
    def label(self) -> str:
        """What runs, as report rows name it ("Lazy-10", "FORA-20"): a sampler's `desc`, since samplers know
        nothing about caching."""
        return f"{self.run.policy.label}-{self.run.policy.steps}"

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
    attach = ATTACH.get(policy.engine)
    if attach is None:
        raise UsageError(f"{type(policy).__name__}.engine is {policy.engine!r}: it must be one of {ENGINES}")
    policy.check_model(model)
    if policy.config.compile and policy.engine != "block":
        raise UsageError(f"compile needs a policy that plans ahead (look-ahead gates, a forced plan), not "
                         f"{type(policy).__name__}: the reference path branches on every module")
    blocks = model_blocks(model)
    specs = [block_spec(b) for b in blocks]
    run = LazyRun(policy, mode, len(blocks), specs[0].kinds)
    run.blocks = blocks
    for i, (block, spec) in enumerate(zip(blocks, specs)):
        if spec.kinds != specs[0].kinds:
            raise UsageError(f"block {i} has branches {spec.kinds}, block 0 {specs[0].kinds}: one kind of block only")
        run.hooks.extend(attach(run, i, block, spec))
    model._lazy_run = run
    hook = model.register_forward_pre_hook(_pre_hook, with_kwargs=True)
    return LazyHandle(model, run, hook)
