"""Token-wise caching: ToCa (Zou et al., "Accelerating Diffusion Transformers with Token-wise Feature Caching", ICLR
2025), the one method here that decides below the module: between full steps the MLP of every block recomputes a
scored share of its tokens and keeps the cache for the others.

The rule is that of ToCa's DiT code (github.com/Shenyi-Z/ToCa, `DiT-ToCa/models.py` and `DiT-ToCa/cache_functions/`:
`cal_type`, `force_init`, `force_scheduler`, `fresh_ratio_scheduler`, `cache_cutfresh`, `score_evaluate`), with
k the respaced index counting down from T - 1 (ToCa's `current['step']`), l the block, N the `interval` (ToCa's
`fresh_threshold`) and N_tok the tokens of a row:

- **Full steps** (`cal_type`, `force_scheduler`): the first step, and every k with k % c == 0, where the cycle c is
  re-timed at each full step k_f as round(N / (1 + w - 2 w k_f / T)), w = 0.4, and c = 2 while k_f lies in
  [int(0.2 T), int(0.4 T)); with ratio 0, w = 0 and no such window (FORA's schedule). ToCa re-times the cycle
  inside block 0 of a full step (`force_init`), so blocks 1..L-1 of that step are full only if k is also a multiple
  of the new cycle; this is kept (`full`). A full block computes every token of both branches and resets its
  staleness counters.
- **Other steps**: attention is reused whole (ToCa's DiT computes no attention tokens between full steps); the MLP
  recomputes int(r N_tok) tokens of every row, r = clamp(ratio x layer x step x module factor, 0, 1)
  (`fresh_ratio_scheduler`, float32 as ToCa rounds it): "ddim50" (ToCa-ddim50, the DDIM-50 setting) step factor
  3 - 4 k / T, layer factor 0.8 + 0.4 l / (L - 1); "ddpm250" (ToCa-ddpm250) 1.4 - 0.8 k / T and 1.8 - 1.6 l / (L - 1);
  module factor 2.5 for the MLP, 0 for attention; "constant": r = ratio for both branches. A branch whose count
  int(r N_tok) is N_tok computes whole; attention below that is reused whole (it mixes tokens, so it has no exact
  partial evaluation). Under "ddim50" the MLP computes no token while k > 0.75 T.
- **Score** of each token (`score_evaluate`, `cache_cutfresh`): s1 + soft_weight x s / N, s the steps since the
  token last computed (ToCa's cache frequency score s3, from the counter before this step's update), then the
  spatial bonus s4 (`local_selection_with_bonus`): in each grid x grid patch of the token grid the highest-scoring
  token gains bonus x its score; the int(r N_tok) highest scores compute (ties: the lower index first).

ToCa's recommended s1 is its attention score (column sums of the head-mean attention map of the last full step,
L2-normalised); lazydit's attention is fused (scaled_dot_product_attention) and produces no map, so s1 here is
ToCa's `random` score (`score="random"`, uniform in [0, 1), the choice ToCa's `sample_ddp.py` defaults to, which
keeps fused attention) or nothing (`score="stale"`: s3 and s4 alone, a deterministic stalest-first rotation).
Random draws come from a generator seeded by (seed, k, layer, branch), so a run is reproducible; ToCa draws once
for the conditional half of a CFG batch and repeats it for the unconditional half, as `LazyConfig(tie_cfg=True)`
does here. ToCa's "global" force fresh is the only one (ToCa supports no other).

Cost: a partial MLP is the MLP on int(r N_tok) tokens, so its MACs are that share of the MLP's, exactly; the run
counts tokens (`token_wise`), so `handle.stats()`'s lazy ratio is 1 - the share of computed tokens and
`lazydit.models.cost.sampling_macs` subtracts what was skipped, token by token. The score (O(N_tok) per branch and
step) is not a Linear MAC and is not counted (`overhead_macs` is 0).
"""

import math

import torch

from lazydit.errors import OptionRangeError, UsageError
from lazydit.lazy.config import LazyConfig
from lazydit.lazy.hooks import TOKENWISE_KINDS
from lazydit.lazy.policies import Policy, register_policy

SCHEDULES = ("ddim50", "ddpm250", "constant")  # ToCa-ddim50, ToCa-ddpm250, constant (fresh_ratio_scheduler)
SCORES = ("random", "stale")  # s1: ToCa's random score, or none (s3 and s4 alone)
_FACTORS = {"ddim50": (2.0, -0.2), "ddpm250": (0.4, 0.8)}  # (step_weight, layer_weight) of each ToCa schedule


def token_count(ratio: float, tokens: int) -> int:
    """How many of `tokens` compute at fresh ratio `ratio`, as ToCa's `cache_cutfresh` rounds it: the ratio clamped to
    [0, 1] in float32, times the token count, truncated."""
    return int(torch.tensor(ratio).clamp(0.0, 1.0) * tokens)


def spatial_bonus(score: torch.Tensor, bonus: float, grid: int = 2) -> torch.Tensor:
    """ToCa's uniform spatial distribution term s4: in every grid x grid patch of the square token grid, the token of
    the highest score (the first one in raster order on ties) gains bonus x its score.

    Args:
        score: (B, N) token scores, N a square (the token grid, raster order).
        bonus: ToCa's bonus ratio (0.6).
        grid: the patch side (ToCa: 2); a grid that does not divide the side leaves smaller patches at the edges.
    Returns:
        (B, N) scores.
    Raises:
        UsageError: N is not a square (no token grid).
    """
    if bonus == 0:
        return score
    B, N = score.shape
    side = math.isqrt(N)
    if side * side != N:
        raise UsageError(f"toca's spatial bonus needs a square token grid, got {N} tokens: pass bonus=0")
    per = -(-side // grid)  # patches per side
    pos = torch.arange(N, device=score.device)
    patch = ((pos // side) // grid * per + (pos % side) // grid).expand(B, N)
    top = torch.full((B, per * per), -math.inf, dtype=score.dtype, device=score.device)
    top = top.scatter_reduce(1, patch, score, "amax").gather(1, patch)  # (B, N): the best score of each token's patch
    first = torch.full((B, per * per), N, dtype=torch.long, device=score.device)
    first = first.scatter_reduce(1, patch, torch.where(score == top, pos, N), "amin").gather(1, patch)
    return score + (first == pos) * top * bonus


def _real(name: str, value, lo: float, hi: float = math.inf) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not lo <= value <= hi:
        bounds = f"in [{lo}, {hi}]" if hi < math.inf else f">= {lo}"
        raise OptionRangeError(f"toca: {name} must be a number {bounds}, got {value!r}")
    return float(value)


def _integer(name: str, value, lo: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < lo:
        raise OptionRangeError(f"toca: {name} must be an integer >= {lo}, got {value!r}")
    return value


def _choice(name: str, value, choices: tuple) -> str:
    if value not in choices:
        raise OptionRangeError(f"toca: {name} must be one of {', '.join(choices)}, got {value!r}")
    return value


@register_policy("toca")
class ToCa(Policy):
    """ToCa: full steps on ToCa's re-timed cycle; between them attention reuses its cache and the MLP recomputes the
    best-scored share of its tokens (the rule: this module's docstring).

    Options (`--method toca:interval=N,ratio=R,schedule=S,...`; ToCa's DDIM-50 setting by default):
        interval: N, ToCa's fresh_threshold (3 for DDIM-50, 4 for DDPM-250).
        ratio: ToCa's fresh_ratio in [0, 1] (0.07); 0: FORA on interval N.
        schedule: how the ratio varies over steps, blocks and branches: ddim50, ddpm250 or constant.
        soft_weight: the weight of the staleness score s3 (ToCa's soft_fresh_weight, 0.25).
        bonus, grid: the spatial bonus s4 (0.6 on 2 x 2 patches; bonus=0: none).
        score: random (ToCa's random s1) or stale (no s1).
        seed: seed of the random scores.
    """

    engine = "block"  # decisions are known before the step: a reused attention skips its norm and modulation too
    label = "ToCa"
    token_wise = True  # answers compute_tokens; the run counts tokens

    def __init__(self, steps: int, config: LazyConfig | None = None, interval: int = 3, ratio: float = 0.07,
                 schedule: str = "ddim50", soft_weight: float = 0.25, bonus: float = 0.6, grid: int = 2,
                 score: str = "random", seed: int = 0):
        super().__init__(steps, config)
        self.interval = _integer("interval", interval, 1)
        self.ratio = _real("ratio", ratio, 0.0, 1.0)
        self.schedule = _choice("schedule", schedule, SCHEDULES)
        self.soft_weight = _real("soft_weight", soft_weight, 0.0)
        self.bonus = _real("bonus", bonus, 0.0)
        self.grid = _integer("grid", grid, 1)
        self.score = _choice("score", score, SCORES)
        self.seed = _integer("seed", seed, 0)
        self.forecast = 0  # the cache, never a forecast
        self._full_first, self._full_rest = self._full_steps()

    def check_model(self, model):
        """Raise UsageError unless the model's blocks have one attention and one MLP branch (ToCa's DiT)."""
        from lazydit.models.registry import block_spec, model_blocks

        kinds = tuple(block_spec(model_blocks(model)[0]).kinds)
        if kinds != ("attn", "mlp"):
            raise UsageError(f"toca is defined on blocks of one attention and one MLP branch (DiT); this model's "
                             f"blocks have {', '.join(kinds)}")

    def cycle(self, k: int) -> int:
        """The cycle of full steps after a full step at k (ToCa's `force_scheduler`).

        Args:
            k: the respaced index of the full step.
        Returns:
            c: the next full step is the next k' < k with k' % c == 0.
        """
        w = 0.0 if self.ratio == 0 else 0.4
        factor = torch.tensor(1 + w - 2 * w * k / self.steps)  # float32, as ToCa
        if self.ratio != 0 and k in range(int(self.steps * 0.2), int(self.steps * 0.4)):
            return 2
        return int(torch.round(self.interval / factor))

    def _full_steps(self) -> tuple:
        """(the full steps of block 0, those of blocks 1..L-1): ToCa's `cal_type`, the cycle re-timed in block 0."""
        first, rest = set(), set()
        cycle, last = self.interval, self.steps - 1
        for k in range(last, -1, -1):
            if k == last or k % cycle == 0:
                first.add(k)
                cycle = self.cycle(k)
                if k == last or k % cycle == 0:
                    rest.add(k)
        return frozenset(first), frozenset(rest)

    def full(self, k: int, layer: int) -> bool:
        """Whether block `layer` computes every token of both branches at step k."""
        return k in (self._full_first if layer == 0 else self._full_rest)

    def fresh_ratio(self, k: int, layer: int, depth: int, kind: str) -> float:
        """The share of tokens a branch recomputes at a step that is not full (ToCa's `fresh_ratio_scheduler`; its 27
        is L - 1 here).

        Args:
            k: the respaced index; layer: the block; depth: L; kind: the branch kind ("attn" or "mlp").
        Returns:
            The ratio before clamping to [0, 1] (it is negative early under "ddim50").
        """
        if self.schedule == "constant":
            return self.ratio
        step_weight, layer_weight = _FACTORS[self.schedule]
        step_factor = 1 + step_weight - 2 * step_weight * k / self.steps
        layer_factor = 1 + layer_weight - 2 * layer_weight * layer / max(1, depth - 1)
        module_weight, module_time_weight = 2.5, 0.6
        module_factor = (1 - (1 - module_time_weight) * module_weight) if kind == "attn" else \
            (1 + module_time_weight * module_weight)
        return self.ratio * layer_factor * step_factor * module_factor

    def tokens(self, k: int, layer: int, depth: int, kind: str, n_tokens: int) -> int:
        """How many of the n_tokens tokens of each row branch `kind` of block `layer` (of `depth`) computes at step k:
        all on a full step, else `token_count` of `fresh_ratio`."""
        if self.full(k, layer):
            return n_tokens
        return token_count(self.fresh_ratio(k, layer, depth, kind), n_tokens)

    def compute_rows(self, hook, k, z):
        """Every row computes on a full step and on the MLP (whose tokens `compute_tokens` chooses); between full
        steps attention computes whole when its count is every token, and is reused whole otherwise."""
        kind = hook.run.kinds[hook.branch]
        if self.full(k, hook.layer) or kind in TOKENWISE_KINDS:
            return None  # every row computes (a token-wise branch: the tokens `compute_tokens` chooses)
        B, N = hook.cache.shape[:2]
        if self.tokens(k, hook.layer, hook.run.depth, kind, N) == N:
            return None
        return torch.zeros(B, dtype=torch.bool)  # attention is reused whole

    def compute_tokens(self, hook, k, z):
        """The tokens of the MLP of block `hook.layer` that compute at step k.

        Args:
            hook: the branch (its cache is (B, N_tok, D); `hook.token_state` keeps its staleness counters, (B, N_tok)
                int32 on the host, None after a full step).
            k: the respaced index.
            z: unused (the choice is known before the branch input exists).
        Returns:
            (B, n) long host indices, the n best scores of every row, or None on a full step (every token).
        """
        if self.full(k, hook.layer):
            hook.token_state = None  # every token is fresh
            return None
        B, N = hook.cache.shape[:2]
        n = self.tokens(k, hook.layer, hook.run.depth, hook.run.kinds[hook.branch], N)
        stale = hook.token_state if hook.token_state is not None else torch.zeros(B, N, dtype=torch.int32)
        score = self.token_scores(hook, k, stale)
        idx = score.argsort(dim=1, descending=True, stable=True)[:, :n]
        hook.token_state = (stale + 1).scatter_(1, idx, 0)
        return idx

    def token_scores(self, hook, k: int, stale: torch.Tensor) -> torch.Tensor:
        """The scores of the tokens of one branch at step k: s1 (random or none) + soft_weight x the staleness over
        `interval`, then the spatial bonus.

        Args:
            hook: the branch (its layer and branch index seed the random draws).
            k: the respaced index.
            stale: (B, N_tok) int32 steps since each token last computed.
        Returns:
            (B, N_tok) float32 scores on the host.
        """
        B, N = stale.shape
        if self.score == "random":
            nb = hook.run.num_branches
            g = torch.Generator().manual_seed(((self.seed * self.steps + k) * hook.run.depth + hook.layer) * nb
                                              + hook.branch)
            tie = self.config.tie_cfg and B % 2 == 0
            s1 = torch.rand(B // 2 if tie else B, N, generator=g)
            s1 = torch.cat([s1, s1]) if tie else s1
        else:
            s1 = torch.zeros(B, N)
        return spatial_bonus(s1 + self.soft_weight * (stale.float() / self.interval), self.bonus, self.grid)
