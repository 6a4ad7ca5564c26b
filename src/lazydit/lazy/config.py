"""One frozen configuration of a lazy run, passed whole from the CLI to the hooks."""

from dataclasses import dataclass

from lazydit.models.registry import BRANCH_KINDS, BRANCH_NAMES


@dataclass(frozen=True)
class LazyConfig:
    """How a caching policy's decisions are post-processed and executed (all defaults: the reference behaviour).

    Gate policies read `threshold`, `uniform` and `tie_cfg`; every policy honours `skippable_kinds`; `compile` and
    `compile_mode` apply to policies that plan ahead (look-ahead gates, forced plans, static schedules).
    """

    threshold: float | None = None  # compute iff p >= threshold; None: the gate file's own (0.5 unless calibrated)
    uniform: bool = False  # one decision per module for the whole batch: compute iff at least half the rows would
    tie_cfg: bool = False  # cond row b and uncond row b + B/2 of a CFG batch decide together (compute if either would)
    skippable_kinds: tuple = BRANCH_NAMES  # branch kinds allowed to skip: ("attn",) / ("mlp",) for the individual-
    # laziness ablation; a model with cross-attention (PixArt) lets it skip when "attn" is listed too (or "cross" alone)
    compile: bool = False  # run each branch's fused work (norm, modulate, module, gated residual) as a torch.compile region
    compile_mode: str | None = None  # torch.compile mode of those regions ("reduce-overhead": CUDA graphs on a GPU)
    record_decisions: bool = False  # keep every row's decision: handle.decisions, (T, L, 2, B) bool, True = computed
    max_skips: int | None = None  # at most this many consecutive skips per module and row, then it computes (None:
    # the --rollout the gates were trained with, else any)
    forecast: int | None = None  # the forecast ORDER: skipped rows get an extrapolation of order 0 (copy), 1 or 2;
    # None: the gates' own (0)

    def __post_init__(self):
        if self.threshold is not None and not 0 <= self.threshold <= 1:
            raise ValueError(f"threshold must lie in [0, 1], got {self.threshold}")
        if self.forecast is not None and self.forecast not in (0, 1, 2):
            raise ValueError(f"forecast order must be 0, 1 or 2 (or None), got {self.forecast}")
        if self.max_skips is not None and self.max_skips < 0:
            raise ValueError(f"max_skips must be >= 0 (or None), got {self.max_skips}")
        object.__setattr__(self, "skippable_kinds", tuple(self.skippable_kinds))
        unknown = [b for b in self.skippable_kinds if b not in BRANCH_KINDS]
        if unknown:
            raise ValueError(f"unknown branch kinds {unknown}: choose from {BRANCH_KINDS}")

    def skippable(self, kinds: tuple = BRANCH_NAMES) -> tuple:
        """Indices of the branches allowed to skip, for a block whose branches are of `kinds` (DiT: attn, mlp)."""
        allowed = set(self.skippable_kinds) | ({"cross"} if "attn" in self.skippable_kinds else set())
        return tuple(i for i, kind in enumerate(kinds) if kind in allowed)
