"""ToCa (`lazydit.lazy.tokens`), token-wise caching, against its own definition: all tokens is the bare model, a
partial MLP is the full MLP on the chosen tokens, the token counts are those of ToCa's published control flow, the
TMACs follow from those counts in closed form."""

import pytest
import torch

from lazydit.errors import OptionRangeError, UsageError
from lazydit.lazy import FORA, POLICIES, LazyConfig, apply_lazy
from lazydit.lazy.policies import make_policy
from lazydit.lazy.tokens import ToCa, spatial_bonus
from lazydit.models.cost import attention_matmul_macs, forward_macs, module_macs, sampling_macs
from lazydit.models.dit import modulate
from lazydit.pipeline import sample

Y = torch.tensor([0, 1, 2, 3])
N_TOKENS = 16  # the tiny DiT: 8 x 8 input, patch 2


def run(model, policy, T, sampler="ddim"):
    return sample(model, Y, T, policy=policy, cfg_scale=2.0, seed=0, progress=False, sampler=sampler)


class Recording(ToCa):
    """ToCa that keeps the tokens it chose: {(k, layer, branch): (B, n) indices}."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.chosen = {}

    def compute_tokens(self, hook, k, z):
        idx = super().compute_tokens(hook, k, z)
        if idx is not None:
            self.chosen[k, hook.layer, hook.branch] = idx.clone()
        return idx


def published_counts(T, L, N, interval, ratio, schedule):
    """{(k, layer): (attention tokens, MLP tokens) computed per row}, by ToCa's DiT control flow as its code runs it:
    per block `cal_type` against the threshold in effect, `force_scheduler` re-timing it inside block 0 of a full
    step, `fresh_ratio_scheduler` and `cache_cutfresh`'s rounding (written out again, stateful, step by step)."""
    counts, cal_threshold = {}, None
    for step in reversed(range(T)):
        for layer in range(L):
            first_step = step == T - 1
            fresh_interval = interval if first_step else cal_threshold
            if step % fresh_interval == 0 or first_step:
                counts[step, layer] = (N, N)
                if layer == 0:  # force_init -> force_scheduler
                    w = 0.0 if ratio == 0 else 0.4
                    cal_threshold = torch.round(interval / torch.tensor(1 + w - 2 * w * step / T))
                    if step in range(int(T * 0.2), int(T * 0.4)) and ratio != 0:
                        cal_threshold = 2
                continue
            if schedule == "constant":
                r_attn = r_mlp = ratio
            else:
                sw, lw = {"ddim50": (2.0, -0.2), "ddpm250": (0.4, 0.8)}[schedule]
                step_factor = 1 + sw - 2 * sw * step / T
                layer_factor = 1 + lw - 2 * lw * layer / (L - 1)
                r_attn = ratio * layer_factor * step_factor * (1 - (1 - 0.6) * 2.5)
                r_mlp = ratio * layer_factor * step_factor * (1 + 0.6 * 2.5)
            n_mlp = int(torch.clamp(torch.tensor(r_mlp), 0.0, 1.0) * N)
            n_attn = int(torch.clamp(torch.tensor(r_attn), 0.0, 1.0) * N)
            counts[step, layer] = (N if n_attn == N else 0, n_mlp)  # attention: whole or reused
    return counts


@pytest.mark.parametrize("sampler", ["ddim", "dpm++2m"])  # samplers at the policy's timesteps
def test_all_tokens_is_the_bare_model(model, sampler):
    T = 8
    ref, _ = run(model, None, T, sampler)
    x, rep = run(model, ToCa(T, ratio=1.0, schedule="constant"), T, sampler)
    assert torch.equal(x, ref)
    assert rep.lazy_ratio == 0.0


def test_ratio_zero_is_fora(model):
    """ratio 0: no token between full steps, and ToCa's cycle is FORA's (no re-timing): the same samples and MACs."""
    T = 10
    x_fora, rep_fora = run(model, FORA(T, interval=3), T)
    x, rep = run(model, ToCa(T, ratio=0.0, interval=3), T)
    assert torch.equal(x, x_fora)
    assert rep.lazy_ratio == rep_fora.lazy_ratio and rep.tmacs == rep_fora.tmacs


@pytest.mark.parametrize("engine", ["block", "module"])
def test_partial_mlp_is_the_full_mlp_on_the_chosen_tokens(model, engine):
    """At a step that is not full, block b's MLP cache holds the full MLP's output at the chosen tokens (bit for bit:
    on a CPU a row of a product does not depend on how many rows are computed) and the last cache elsewhere; the
    attention cache is reused whole; the block output is x + gate * attn cache, + gate * that MLP output."""
    T = 10
    policy = Recording(T, interval=5, ratio=0.5, schedule="constant")  # k = 9 full, k = 8 not (cycle 7)
    policy.engine = engine  # the module engine runs the same decisions on the block's own forward
    assert policy.full(9, 0) and not any(policy.full(8, b) for b in range(3))
    inputs, outputs = {}, {}
    for i, block in enumerate(model.blocks):
        block.register_forward_pre_hook(lambda m, a, i=i: inputs.__setitem__(i, tuple(t.clone() for t in a)))
        block.register_forward_hook(lambda m, a, out, i=i: outputs.__setitem__(i, out.clone()))
    handle = apply_lazy(model, policy)
    x = torch.randn(8, 1, 8, 8)
    y = torch.cat([Y, torch.full_like(Y, 4)])
    with torch.no_grad():
        model(x, torch.full((8,), policy.timesteps[9]), y)
        before = [(h.cache.clone(), h.layer, h.branch) for h in handle.run.hooks]
        model(x, torch.full((8,), policy.timesteps[8]), y)
    after = {(h.layer, h.branch): h.cache for h in handle.run.hooks}
    handle.remove()
    for cache, layer, branch in before:
        if branch == 0:
            assert torch.equal(after[layer, 0], cache)  # attention reused whole
            continue
        block, (x_in, c) = model.blocks[layer], inputs[layer]
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = block.adaLN_modulation(c).chunk(6, dim=1)
        x_mid = x_in + gate_msa.unsqueeze(1) * after[layer, 0]
        full = block.mlp(modulate(block.norm2(x_mid), shift_mlp, scale_mlp))
        idx = policy.chosen[8, layer, 1]
        assert idx.shape == (8, 8)
        fresh = torch.zeros(8, N_TOKENS, dtype=torch.bool).scatter_(1, idx, True)
        new = after[layer, 1]
        assert torch.equal(new[fresh], full[fresh])
        assert torch.equal(new[~fresh], cache[~fresh])
        assert torch.equal(outputs[layer], x_mid + gate_mlp.unsqueeze(1) * new)


@pytest.mark.parametrize("T,interval,ratio,schedule", [(50, 3, 0.07, "ddim50"), (40, 4, 0.07, "ddpm250"),
                                                        (12, 2, 0.4, "constant")])
def test_token_counts_follow_the_published_rule(model, T, interval, ratio, schedule):
    policy = ToCa(T, interval=interval, ratio=ratio, schedule=schedule)
    _, rep = run(model, policy, T)
    L, B = len(model.blocks), 2 * len(Y)
    want = published_counts(T, L, N_TOKENS, interval, ratio, schedule)
    computed = (rep.lazy.total - rep.lazy.skipped) / B  # (T, L, 2) tokens per row: the run counts tokens
    assert torch.equal(rep.lazy.total, torch.full((T, L, 2), B * N_TOKENS))
    got = {(k, layer): (int(computed[k, layer, 0]), int(computed[k, layer, 1])) for k in range(T) for layer in range(L)}
    assert got == want
    assert 0 < sum(n for _, n in want.values() if 0 < n < N_TOKENS)  # some MLP computed part of its tokens
    share = sum(a + m for a, m in want.values()) / (2 * N_TOKENS * T * L)
    assert rep.lazy_ratio == pytest.approx(1 - share, abs=1e-15)  # 1 - the computed token share


@pytest.mark.parametrize("attention_matmuls", [False, True])
def test_tmacs_follow_the_token_counts(model, attention_matmuls):
    """TMACs = T dense forwards - per block and step: the attention MACs where it was reused, (N - n) / N of the MLP
    MACs where n of N tokens computed."""
    T, cfg = 20, model.config
    policy = ToCa(T, interval=3, ratio=0.2, schedule="constant")
    _, rep = run(model, policy, T)
    m = module_macs(cfg)
    attn = m["attn"] + (attention_matmul_macs(cfg) if attention_matmuls else 0)
    saved = 0.0
    for (k, layer), (n_attn, n_mlp) in published_counts(T, len(model.blocks), N_TOKENS, 3, 0.2, "constant").items():
        saved += attn * (N_TOKENS - n_attn) / N_TOKENS + m["mlp"] * (N_TOKENS - n_mlp) / N_TOKENS
    expected = T * forward_macs(cfg, attention_matmuls) - saved
    got = sampling_macs(cfg, T, rep.lazy, attention_matmuls=attention_matmuls, overhead=policy.overhead_macs(cfg))
    assert got == pytest.approx(expected, rel=1e-12)
    assert saved > 0
    if not attention_matmuls:
        assert rep.tmacs * 1e12 == pytest.approx(expected, rel=1e-12)


def test_runs_are_deterministic_and_the_seed_matters(model):
    T = 12
    make = lambda seed: Recording(T, interval=3, ratio=0.3, schedule="constant", seed=seed)
    (a, rep_a), (b, rep_b) = run(model, p := make(0), T), run(model, q := make(0), T)
    assert torch.equal(a, b) and torch.equal(rep_a.lazy.skipped, rep_b.lazy.skipped)
    assert p.chosen.keys() == q.chosen.keys() and all(torch.equal(p.chosen[key], q.chosen[key]) for key in p.chosen)
    other = make(1)
    run(model, other, T)
    assert any(not torch.equal(p.chosen[key], other.chosen[key]) for key in p.chosen)


def test_block_and_module_engines_agree(model):
    T = 12
    block = run(model, ToCa(T, interval=3, ratio=0.3, schedule="constant"), T)
    policy = ToCa(T, interval=3, ratio=0.3, schedule="constant")
    policy.engine = "module"
    module = run(model, policy, T)
    assert torch.equal(block[0], module[0]) and torch.equal(block[1].lazy.skipped, module[1].lazy.skipped)


def test_staleness_rotates_the_tokens(model):
    """score=stale without the bonus: the stalest tokens compute first, so consecutive partial steps of a block
    choose disjoint tokens until every token has computed once."""
    T = 12
    policy = Recording(T, interval=6, ratio=0.25, schedule="constant", score="stale", bonus=0.0)
    run(model, policy, T)
    partial = [k for k in range(T - 1, -1, -1) if not policy.full(k, 1)]
    first_run = []
    for k in partial:
        if policy.full(k + 1, 1):
            first_run = [k]
        elif first_run and first_run[-1] == k + 1:
            first_run.append(k)
        if len(first_run) == 4:
            break
    assert len(first_run) == 4  # four partial steps in a row: 4 x 4 tokens cover the 16
    seen = torch.cat([policy.chosen[k, 1, 1] for k in first_run], dim=1)
    assert all(sorted(row.tolist()) == list(range(N_TOKENS)) for row in seen)


def test_tie_cfg_gives_both_halves_the_same_tokens(model):
    T = 10
    policy = Recording(T, interval=3, ratio=0.3, schedule="constant", config=LazyConfig(tie_cfg=True))
    run(model, policy, T)
    assert policy.chosen
    for idx in policy.chosen.values():
        assert torch.equal(idx[:4], idx[4:])


def _toca_bonus(score, bonus_ratio, grid_size=2):
    """ToCa's `local_selection_with_bonus`, by its reshape into grid x grid blocks (N divisible into them)."""
    B, N = score.shape
    side = int(N**0.5)
    s = score.view(B, side // grid_size, grid_size, side // grid_size, grid_size).permute(0, 1, 3, 2, 4)
    s = s.reshape(B, -1, grid_size * grid_size)
    top, at = s.max(dim=-1, keepdim=True)
    s = s + torch.zeros_like(s).scatter_(-1, at, 1) * top * bonus_ratio
    s = s.view(B, side // grid_size, side // grid_size, grid_size, grid_size).permute(0, 1, 3, 2, 4)
    return s.reshape(B, N)


def test_spatial_bonus_is_tocas():
    g = torch.Generator().manual_seed(0)
    score = torch.rand(6, 64, generator=g)
    score[0, :4] = 0.5  # ties inside a patch: the first token in raster order gets the bonus
    assert torch.equal(spatial_bonus(score, 0.6, 2), _toca_bonus(score, 0.6, 2))
    assert torch.equal(spatial_bonus(score, 0.6, 4), _toca_bonus(score, 0.6, 4))
    odd = spatial_bonus(torch.rand(2, 49, generator=g), 0.6, 2)  # 7 x 7: patches of 2 x 2, 2 x 1, 1 x 2, 1 x 1
    assert odd.shape == (2, 49)
    with pytest.raises(UsageError, match="square"):
        spatial_bonus(torch.rand(1, 12), 0.6)


def test_spec_and_options():
    assert POLICIES["toca"] is ToCa
    p = make_policy("toca:interval=4,ratio=0.1,schedule=ddpm250,soft_weight=0.5,bonus=0,grid=1,score=stale,seed=3",
                    250)
    assert isinstance(p, ToCa)
    assert (p.interval, p.ratio, p.schedule, p.soft_weight, p.bonus, p.grid, p.score, p.seed) == \
        (4, 0.1, "ddpm250", 0.5, 0.0, 1, "stale", 3)
    d = make_policy("toca", 50)
    assert (d.interval, d.ratio, d.schedule, d.soft_weight, d.bonus, d.score) == (3, 0.07, "ddim50", 0.25, 0.6,
                                                                                   "random")
    assert make_policy("toca:ratio=1", 10).ratio == 1.0
    for bad in ("toca:interval=0", "toca:interval=2.5", "toca:ratio=1.5", "toca:ratio=-0.1", "toca:schedule=cosine",
                "toca:score=attention", "toca:grid=0", "toca:soft_weight=-1", "toca:bonus=x", "toca:seed=-1"):
        with pytest.raises(OptionRangeError) as err:
            make_policy(bad, 10)
        assert "\n" not in str(err.value) and str(err.value).startswith("toca: ")
    with pytest.raises(UsageError, match="nope"):
        make_policy("toca:nope=1", 10)


def test_the_model_must_have_attention_and_mlp_branches():
    from types import SimpleNamespace

    from lazydit.models.registry import BlockSpec, register_block

    class CrossBlock(torch.nn.Module):
        pass

    register_block(CrossBlock, BlockSpec(branches=("attn1", "attn2", "ff"), norms=("n1", "n2", "n3"),
                                         kinds=("attn", "cross", "mlp"), fused=False))
    with pytest.raises(UsageError, match="attention and one MLP"):
        ToCa(10).check_model(SimpleNamespace(blocks=[CrossBlock()]))


def test_diffusers_blocks_run_toca_on_the_module_engine():
    """diffusers' DiT blocks are not fused: the module engine's hooks run the same decisions."""
    pytest.importorskip("diffusers")
    from lazydit.models.diffusers_dit import DiffusersDiT
    from test_diffusers import tiny_transformer

    model, y, T = DiffusersDiT(tiny_transformer(num_classes=10)), torch.tensor([0, 1]), 8
    go = lambda policy: sample(model, y, T, policy=policy, cfg_scale=2.0, seed=0, progress=False)
    assert torch.equal(go(ToCa(T, ratio=1.0, schedule="constant"))[0], go(None)[0])
    _, rep = go(ToCa(T, interval=3, ratio=0.3, schedule="constant"))
    computed = (rep.lazy.total - rep.lazy.skipped) / 4  # 4 rows of 16 tokens
    want = published_counts(T, 2, N_TOKENS, 3, 0.3, "constant")
    assert {key: (int(computed[key][0]), int(computed[key][1])) for key in want} == want
