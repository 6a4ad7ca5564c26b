"""What a caching policy computed: counts of module evaluations per (respaced step, layer, branch)."""

from dataclasses import dataclass, field

import numpy as np
import torch

from lazydit.models.registry import BRANCH_NAMES


@dataclass
class LazyStats:
    """Counts of module evaluations per (respaced step, layer, branch): skipped and total rows.

    A token-wise policy's run (`lazydit.lazy.tokens.ToCa`) counts tokens instead (a row is N of them; a branch run
    on n of a row's N tokens skipped N - n), so its lazy ratio is the share of tokens that reused the cache. Every
    ratio below, and the MACs of `lazydit.models.cost.sampling_macs`, read the same in either unit.
    """

    skipped: torch.Tensor  # (T, L, branches) int64
    total: torch.Tensor  # (T, L, branches) int64
    kinds: tuple = field(default=BRANCH_NAMES)  # the kind of each branch (the registry's BlockSpec.kinds)

    def __post_init__(self):
        if len(self.kinds) != self.skipped.shape[-1]:
            raise ValueError(f"{self.skipped.shape[-1]} branches counted, {len(self.kinds)} kinds named: {self.kinds}")

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
        """The ratios as plain lists: `per_step` in sampling order (the first sampling step, respaced index k = T-1,
        first; the heat map's columns); `per_layer` by layer; `per_branch` by branch name; `per_step_layer_branch`
        (T, L, nb) indexed by respaced index k as the counters are (k = 0 is the last sampling step)."""
        return {
            "lazy_ratio": self.lazy_ratio,
            "per_step": self.ratio(0).flip(0).tolist(),  # sampling order, as the heat map
            "per_layer": self.ratio(1).tolist(),
            "per_branch": dict(zip(self.kinds, self.ratio(2).tolist())),
            "per_step_layer_branch": self.ratio((0, 1, 2)).tolist(),
        }


class StatsCollector:
    """Counts every branch evaluation of a run, for every policy alike (and, optionally, each row's decision)."""

    def __init__(self, steps: int, depth: int, kinds: tuple = BRANCH_NAMES, record_decisions: bool = False):
        self.shape, self.kinds = (steps, depth, len(kinds)), tuple(kinds)
        self.record_decisions = record_decisions
        self.reset()

    def reset(self):
        # numpy counters: counting every branch evaluation must cost next to nothing (a torch in-place index add is
        # ~10 us of dispatch, twice per branch and step); views of the same memory as torch tensors
        self._skipped = np.zeros(self.shape, dtype=np.int64)
        self._total = np.zeros(self.shape, dtype=np.int64)
        self.skipped, self.total = torch.from_numpy(self._skipped), torch.from_numpy(self._total)
        self.decisions = None  # (T, L, branches, B) bool, True = computed (record_decisions)

    def count(self, k: int, layer: int, branch: int, rows: int, computed: int, decision=None, unit: int = 1):
        """One branch evaluation at step k over `rows` rows, `computed` units of which ran the module.

        Args:
            decision: (rows,) bool compute decisions (any device), or None when every row computed.
            unit: the units of one row: 1 (rows are counted), or N (tokens are: `computed` is in tokens).
        """
        self._skipped[k, layer, branch] += rows * unit - computed
        self._total[k, layer, branch] += rows * unit
        if self.record_decisions:
            if self.decisions is None or self.decisions.shape[-1] != rows:
                self.decisions = torch.ones(*self.shape, rows, dtype=torch.bool)
            self.decisions[k, layer, branch] = True if decision is None else decision.cpu()

    def stats(self) -> LazyStats:
        return LazyStats(self.skipped.clone(), self.total.clone(), self.kinds)
