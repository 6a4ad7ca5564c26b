"""What the execution engines share: the state of one lazy run (`LazyRun`) and of one gated branch (`BranchHook`).

A policy is attached from the outside (`lazydit.lazy.attach.apply_lazy`) through one of three engines, named by the
policy's `engine` attribute, one file each:

- `engine_module`: the branch module's `forward` is replaced by its hook, which decides on the branch input z
  (the reference gates' path);
- `engine_block`: the block's `forward` is replaced too, so that decisions known before z exists skip the norm and
  the modulation of a skipped branch (look-ahead gates, forced plans, static schedules);
- `engine_residual`: no branch hooks; the blocks reuse one cached residual per step (FBCache, TeaCache).

`BranchHook` holds what both branch engines share: the branch's cache and forecast history, the input recorded for
training, pending decisions, the guards around `Policy.compute_rows`, the one question for what skipped rows
receive (`reused`), the one place the cache and the history are updated (`keep`), and the counting.

Token-wise policies (`token_wise = True` on the policy class, e.g. `lazydit.lazy.tokens.ToCa`) decide below the
module as well: on a branch every row of which computes, `decide_tokens` asks `policy.compute_tokens(hook, k, z)`
for the (B, n) indices of the tokens that compute; the engines run the module on those tokens only
(`gather_tokens`) and write its output into a copy of the cache (`scatter_tokens`). Only branches of a token-wise
kind (TOKENWISE_KINDS: the output at a token is a function of that token's input alone, so the partial output is
exactly the full output at those tokens) are asked. The counts of a token-wise run are in tokens (`count`).

Modes: "sample" (hard per-row decisions), "soft" (gate training: y = p F(z) + (1 - p) reuse), "record" (run every
branch and fill the caches), "off" (the bare model).
"""

import copy

import torch

from lazydit.errors import GateMismatchError
from lazydit.lazy.policies import Policy
from lazydit.lazy.stats import StatsCollector

MODES = ("off", "record", "soft", "sample")
TOKENWISE_KINDS = ("mlp",)  # branch kinds whose output at a token depends on that token's input alone


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
        self.depth, self.num_branches, self.kinds = depth, len(kinds), kinds
        self.hooks: list = []  # BranchHook per (layer, branch), layer-major
        self.k = 0  # current respaced step index
        self.timesteps = policy.timesteps  # k -> original timestep
        self.timestep_index = {t: k for k, t in enumerate(self.timesteps)}
        self.collector = StatsCollector(policy.steps, depth, kinds, self.config.record_decisions)
        self.probs: list = []  # soft mode: (branch, p (B,)) per branch evaluation, for the training penalty
        self.skippable = self.config.skippable(kinds)
        self.caller = None  # a function naming the sampler that calls the model, for the mismatch error (diffusers)
        self.scratch: dict = {}  # the block engine's reused buffers: the gated residual, modulation weight subsets
        self.blocks: list = []  # the model's blocks
        self.block_cache = None  # the residual engine's BlockCache (None on the branch engines)
        self.token_wise = bool(getattr(policy, "token_wise", False))  # counts in tokens; asks compute_tokens

    @property
    def t(self) -> int:
        """The original timestep of the current step."""
        return self.timesteps[self.k]

    def set_timestep(self, t):
        """Map the (original) timestep the model is called at to the policy's respaced index; start the step."""
        t0 = int(t.reshape(-1)[0]) if torch.is_tensor(t) else int(t)
        if t0 not in self.timestep_index:
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
        if self.block_cache is not None:
            self.block_cache.reset()
        for h in self.hooks:
            h.reset()


class BranchHook(_Transient):
    """One gated branch: its module, cache, forecast history, recorded input and pending decisions. An engine's
    subclass runs the branch (`engine_module.ModuleHook`, `engine_block.BlockHook`)."""

    def __init__(self, run: LazyRun, layer: int, branch: int, module):
        self.run, self.layer, self.branch, self.module = run, layer, branch, module
        self.forward = type(module).forward  # the bare module's forward
        self.reset()

    def reset(self):
        self.cache = None  # (B, N, D) pre-gate output of the last step
        self.history = self.run.policy.new_history()  # forecast reuse: the per-row ForecastHistory (None: the cache)
        self.z = None  # record mode, look-ahead: the input Z recorded at that step
        self.score = None  # look-ahead: (B,) device compute decisions for the next step
        self.plan = None  # plans ahead: (B,) host compute decisions of this step
        self.skips = None  # LazyConfig.max_skips: (B,) consecutive skips of each row so far (None: none)
        self.token_state = None  # token-wise policies: their per-token state of this branch (ToCa: staleness)

    def decide(self, rows: int, z):
        """Compute decisions (B,) bool or None (all compute): nothing to reuse, or a branch that may not skip, always
        computes; otherwise the policy decides, on z (None when it decides before z exists), and
        LazyConfig.max_skips caps each row's run of skips (a skip may reuse a cache that was itself reused,
        max_skips times in a row at most)."""
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

    def decide_tokens(self, rows: int, tokens: int, z):
        """Row and token decisions of this branch at this step: `decide`, then, for a branch every row of which
        computes, the token-wise policy's `compute_tokens`.

        The policy is asked only when it is token-wise, the branch is of a token-wise kind (TOKENWISE_KINDS) and may
        skip, and the hook holds a cache of exactly these rows and tokens.

        Args:
            rows: B, the rows of the batch.
            tokens: N, the tokens of each row.
            z: the branch input (module engine) or None (block engine), as for `decide`.
        Returns:
            (compute, idx): `compute` as `decide` returns it ((B,) bool, or None: every row computes); `idx` the
            (B, n) long indices of the tokens that compute in every row, 0 < n < N, or None (whole rows). A policy
            choosing no token makes every row skip (compute all False); one choosing every token is whole rows.
        """
        compute = self.decide(rows, z)
        run = self.run
        if (compute is not None or not run.token_wise or self.cache is None
                or tuple(self.cache.shape[:2]) != (rows, tokens) or self.branch not in run.skippable
                or run.kinds[self.branch] not in TOKENWISE_KINDS):
            return compute, None
        idx = run.policy.compute_tokens(self, run.k, z)
        if idx is None or idx.shape[1] == tokens:
            return None, None
        if idx.shape[1] == 0:
            return torch.zeros(rows, dtype=torch.bool), None
        return None, idx

    def reused(self, writable: bool = False) -> torch.Tensor:
        """What skipped rows receive at this step, asked of the policy once (`Policy.reuse`: the cache, or the
        history's forecast). `writable`: the caller writes computed rows into it, so the cache itself is copied (a
        forecast is a new tensor already)."""
        out = self.run.policy.reuse(self, self.run.k)
        return out.clone() if writable and out is self.cache else out

    def keep(self, out: torch.Tensor, rows=None, learn: bool = True):
        """`out` is the branch's output of this step: it becomes the cache, and the rows that computed it (`rows`,
        an index tensor; None: all) go into the forecast history. `learn=False`: no row computed (the history stays
        as it is). The one place the cache and the history change in sample and record mode."""
        self.cache = out
        if learn and self.history is not None:
            self.history.learn(out, self.run, rows)

    def count(self, rows: int, computed: int, decision, tokens: int = 1, fresh: int | None = None):
        """Count one evaluation of the branch at this step.

        Args:
            rows: B, the rows of the batch.
            computed: the rows that ran the module.
            decision: (B,) bool compute decisions, or None (every row computed).
            tokens: N, the tokens of each row.
            fresh: a token-wise partial evaluation: every computing row ran the module on `fresh` of its N tokens
                (None: on all of them).
        A token-wise run (`LazyRun.token_wise`) counts in tokens, a row being N of them, so that its lazy ratio is
        the share of tokens that reused the cache; any other run counts rows. Ratios and MACs
        (`lazydit.models.cost.sampling_macs`) read the same in either unit.
        """
        unit = tokens if self.run.token_wise else 1
        done = computed * (unit if fresh is None else fresh)
        self.run.collector.count(self.run.k, self.layer, self.branch, rows, done, decision, unit=unit)


def gather_tokens(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """The tokens idx (B, n) of every row of x (B, N, D): (B, n, D)."""
    return x.gather(1, idx.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


def scatter_tokens(out: torch.Tensor, idx: torch.Tensor, part: torch.Tensor) -> torch.Tensor:
    """Write part (B, n, D) into the tokens idx (B, n) of out (B, N, D), in place; returns out."""
    return out.scatter_(1, idx.unsqueeze(-1).expand(-1, -1, out.shape[-1]), part.to(out.dtype))


def _short(ts: list) -> str:
    """A timestep list for a message: the first 4 and the last 2."""
    return str(ts) if len(ts) <= 6 else f"[{', '.join(map(str, ts[:4]))}, ..., {', '.join(map(str, ts[-2:]))}]"
