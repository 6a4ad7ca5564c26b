"""Look-ahead gates: plans fixed one step ahead, skipped modules skip their LayerNorm too."""

import copy

import pytest
import torch

from lazydit import ddim_sample
from lazydit.sampling.schedule import Schedule
from lazydit.lazy import ForcedPlan, LazyConfig, LazyGates, apply_lazy, policy_for
from lazydit.training.gates import GateTrainConfig, train_gates

from conftest import tiny_model

T = 10


def labels(n=4):
    return torch.arange(n) % 4


def random_gates(model, lookahead, scale=0.3, seed=1, threshold=0.5):
    g = LazyGates.for_model(model, T, threshold, lookahead=lookahead)
    torch.manual_seed(seed)
    g.weight.data.normal_(0, scale)
    g.weight.data[:, :, 1::2] = 0  # reference parity: odd-index gates untrained
    return g


def run(model, gates, cfg_scale=3.0, seed=0, **kw):
    with apply_lazy(model, gates, LazyConfig(record_decisions=True, **kw)) as h:
        x = ddim_sample(model, labels(), T, cfg_scale=cfg_scale, seed=seed, progress=False)
        return x, h.decisions.clone(), h.stats()


def test_lookahead_with_reference_decisions_gives_identical_samples(model):
    x_ref, dec, stats = run(model, random_gates(model, lookahead=False))
    assert 0.05 < stats.lazy_ratio < 0.45  # a mix of computing and skipping rows
    partial = dec.any(-1) & ~dec.all(-1)
    assert partial.any()  # some modules compute for part of the rows only (gather / scatter)
    # the plans-ahead path (norm and modulation skipped with the module) with a per-row plan (T, L, 2, B): skip
    # where the reference skipped
    with apply_lazy(model, ForcedPlan(~dec, config=LazyConfig(record_decisions=True))) as h:
        x_la = ddim_sample(model, labels(), T, cfg_scale=3.0, seed=0, progress=False)
        assert torch.equal(h.decisions, dec)
    torch.testing.assert_close(x_la, x_ref, rtol=0, atol=1e-6)


def test_lookahead_plan_scores_the_inputs_of_the_step_before(model):
    import math

    gates = random_gates(model, lookahead=True)
    # odd-index gates are never used by look-ahead sampling; random ones would skip rows if they were
    gates.weight.data[:, :, 1::2].normal_(0, 0.3, generator=torch.Generator().manual_seed(2))
    x_la, dec, stats = run(model, gates)
    assert 0.05 < stats.lazy_ratio < 0.45
    # replay the same plan through the reference path and grab every module's input Z there
    zs = {}
    hooks = [getattr(blk, name).register_forward_pre_hook(
        lambda m, a, i=i, b=b: zs.setdefault((i, b), []).append(a[0].detach().clone()))
        for i, blk in enumerate(model.blocks) for b, name in enumerate(("attn", "mlp"))]
    with apply_lazy(model, ForcedPlan(~dec, ahead=False)):
        x_replay = ddim_sample(model, labels(), T, cfg_scale=3.0, seed=0, progress=False)
    for hk in hooks:
        hk.remove()
    torch.testing.assert_close(x_replay, x_la, rtol=0, atol=1e-6)
    L, B = len(model.blocks), dec.shape[-1]
    assert set(zs) == {(i, b) for i in range(L) for b in range(2)}
    th = math.log(gates.threshold) - math.log1p(-gates.threshold)  # p >= threshold <=> logit >= th

    def decide(z, i, b, k):  # the threshold decision (B,) of gate k on the input z (B, N, D)
        return z.sum(1) @ gates.weight[i, b, k] >= th

    gated, odd_own_skip, own_input_differs = 0, 0, 0
    for (i, b), inputs in zs.items():
        assert len(inputs) == T and all(z.shape[0] == B for z in inputs)
        z = {k: inputs[T - 1 - k] for k in range(T)}  # Z_k, the input at respaced step k (run from T-1 down to 0)
        for k in range(T):
            if k % 2 == 1 or k == T - 1:  # odd step (reference parity) or the first step: every row computes
                assert dec[k, i, b].all(), (i, b, k)
                odd_own_skip += int((~decide(z[k], i, b, k)).sum())
            else:  # gated even step: the plan is gate k's decision on Z_{k+1}, recorded at the step before
                plan = decide(z[k + 1], i, b, k)
                assert torch.equal(dec[k, i, b], plan), (i, b, k)
                own_input_differs += int((plan != decide(z[k], i, b, k)).sum())
                gated += 1
    assert gated == L * 2 * len(range(0, T - 1, 2))  # every gated step of every module was checked
    assert odd_own_skip > 0  # the odd steps computed although their own gates would have skipped rows
    assert own_input_differs > 0  # scoring the step's own input Z_k gives other plans: the check discriminates


def test_skipped_modules_skip_their_layernorm(model):
    calls = {"ref": 0, "la": 0}
    gates_ref = LazyGates.for_model(model, T, threshold=0.75)  # zero gates, p = 0.5 < 0.75: skip every even step
    gates_la = LazyGates.for_model(model, T, threshold=0.75, lookahead=True)
    for key, g in (("ref", gates_ref), ("la", gates_la)):
        hk = model.blocks[0].norm1.register_forward_hook(lambda *a, key=key: calls.__setitem__(key, calls[key] + 1))
        x, _, stats = run(model, g)
        hk.remove()
        assert stats.lazy_ratio == 0.5  # even steps 8, 6, 4, 2, 0 skip; odd steps 9 .. 1 compute
    assert calls["ref"] == T  # the reference path normalises every step
    assert calls["la"] == T // 2  # look-ahead: only the computing (odd) steps


@pytest.mark.parametrize("lookahead", [False, True])
def test_uniform_equals_per_sample_when_all_rows_agree(model, lookahead):
    g = LazyGates.for_model(model, T, threshold=0.75, lookahead=lookahead)  # every row agrees: skip even steps
    x1, d1, s1 = run(model, g)
    x2, d2, s2 = run(model, g, uniform=True)
    x3, d3, s3 = run(model, g, tie_cfg=True)
    assert torch.equal(x1, x2) and torch.equal(x1, x3)
    assert torch.equal(d1, d2) and torch.equal(s1.skipped, s2.skipped)


def test_uniform_and_tie_cfg_apply_to_lookahead_plans(model):
    g = random_gates(model, lookahead=True)
    _, d, _ = run(model, g, uniform=True)
    assert (d.all(-1) | ~d.any(-1)).all()  # one decision per module for the whole batch
    _, d, _ = run(model, g, tie_cfg=True)
    B = d.shape[-1]
    assert torch.equal(d[..., : B // 2], d[..., B // 2 :])


def test_lookahead_deepcopy_samples_like_the_original(model):
    g = random_gates(model, lookahead=True)
    x1, d1, _ = run(model, g)
    with apply_lazy(model, g, LazyConfig(record_decisions=True)):
        twin = copy.deepcopy(model)
        ddim_sample(model, labels(), T, cfg_scale=3.0, seed=0, progress=False)  # builds the branch functions
        twin._lazy_run.collector.reset()
        x2 = ddim_sample(twin, labels(), T, cfg_scale=3.0, seed=0, progress=False)
        for p in twin.parameters():
            p.data.zero_()  # the twin's branch functions must not run the original's modules
        x3 = ddim_sample(model, labels(), T, cfg_scale=3.0, seed=0, progress=False)
    assert torch.equal(x1, x2) and torch.equal(x1, x3)


def test_lookahead_flag_survives_save_and_load(model, tmp_path):
    g = random_gates(model, lookahead=True)
    g.save(tmp_path / "g.safetensors")
    g2 = LazyGates.load(tmp_path / "g.safetensors")
    assert g2.lookahead and torch.equal(g2.weight, g.weight)
    with pytest.raises(ValueError):
        LazyGates(2, 8, T, parity=False, lookahead=True)


def test_lookahead_soft_mode_scores_the_recorded_input(model):
    g = random_gates(model, lookahead=True)
    x = torch.randn(2, 1, 8, 8)
    y = torch.tensor([0, 1])
    sched = Schedule(T)
    zs = {}
    hk = model.blocks[1].mlp.register_forward_pre_hook(lambda m, a: zs.setdefault("z", []).append(a[0].clone()))
    with apply_lazy(model, g, mode="record") as h:
        model(x, sched.timesteps(3, 2, x.device), y)
        h.mode = "soft"
        model(x * 0.5, sched.timesteps(2, 2, x.device), y)
        p_mlp = [p for b, p in h.probs if b == 1][1]
    hk.remove()
    z_rec, z_now = zs["z"]
    assert not torch.allclose(z_rec, z_now)
    expected = torch.sigmoid(z_rec.sum(1) @ g.weight[1, 1, 2])
    torch.testing.assert_close(p_mlp, expected)


def test_train_lookahead_gates_and_sample(fake_fmnist):
    from lazydit.data.fashion_mnist import InfiniteSampler, load_fashion_mnist
    model = tiny_model(input_size=28, patch_size=7, num_classes=10)
    x, y = load_fashion_mnist("train", fake_fmnist)
    data = InfiniteSampler(x, y, 8, seed=0)
    cfg = GateTrainConfig(steps=T, iters=3, batch_size=8, lookahead=True, rho_attn=1.0, rho_mlp=1.0)
    g = train_gates(model, data, cfg, progress=False)
    assert g.lookahead and g.weight.abs().sum() > 0
    assert g.weight[:, :, 1::2].abs().sum() == 0  # odd-index gates untouched (parity)
    y = torch.arange(4)
    plain = ddim_sample(model, y, T, seed=0, progress=False)
    with apply_lazy(model, g) as h:
        x_lazy = ddim_sample(model, y, T, seed=0, progress=False)
        stats = h.stats()
    assert x_lazy.shape == plain.shape == (4, 1, 28, 28) and x_lazy.dtype == torch.float32
    assert torch.isfinite(x_lazy).all()
    L = len(model.blocks)
    assert torch.equal(stats.total, torch.full((T, L, 2), 4))  # every module of every step counted, 4 rows each
    assert stats.lazy_ratio == int(stats.skipped.sum()) / (T * L * 2 * 4)
    per_step = stats.ratio(0)
    assert (per_step[1::2] == 0).all() and per_step[T - 1] == 0  # odd steps and the first step compute
    untrained = (g.weight[:, :, 0::2].transpose(0, 2) == 0).flatten(1).all(1)  # even steps no iteration drew
    assert untrained.any() and (per_step[0::2][untrained] == 0).all()  # zero gates: p = 0.5 >= 0.5, compute
    # the strong penalty (rho = 1) pushed the trained gates below 0.5: some modules skip, at most the even half
    assert 0 < stats.lazy_ratio <= 0.5
    assert not torch.allclose(x_lazy, plain)  # skipped modules reuse stale outputs: not plain DDIM any more
    assert (x_lazy - plain).norm() < 0.05 * plain.norm()  # but close to it: the same noise, a few reused branches
    from lazydit.pipeline import sample
    x_rep, rep = sample(model, y, T, policy=policy_for(g), seed=0, progress=False)  # the pipeline reports the same run
    assert torch.equal(x_rep, x_lazy) and rep.lazy_ratio == stats.lazy_ratio


def test_compiled_lookahead_equals_eager(model):
    torch._dynamo.reset()
    g = random_gates(model, lookahead=True)
    x_eager, d_eager, _ = run(model, g)
    assert (d_eager.any(-1) & ~d_eager.all(-1)).any()  # partial plans: compiled regions see row subsets too
    try:
        x_comp, d_comp, _ = run(model, g, compile=True)
    except Exception as e:  # no C++ toolchain for inductor on this machine
        if "compil" in type(e).__name__.lower() or "InductorError" in type(e).__name__:
            pytest.skip(f"torch.compile unavailable here: {type(e).__name__}")
        raise
    assert torch.equal(d_comp, d_eager)
    torch.testing.assert_close(x_comp, x_eager, rtol=1e-3, atol=1e-4)  # fused kernels round differently


def test_compile_needs_lookahead_gates(model):
    with pytest.raises(ValueError, match="look-ahead"):
        apply_lazy(model, LazyGates.for_model(model, T), LazyConfig(compile=True))


def test_gates_attach_to_large_dit_unchanged():
    from lazydit.models.cost import sampling_macs
    from lazydit.models.large_dit import LargeDiT, LargeDiTConfig

    torch.manual_seed(0)
    m = LargeDiT(LargeDiTConfig(hidden_size=32, depth=2, num_heads=4, input_size=8, num_classes=4, qk_norm=True,
                                learn_sigma=True)).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    y, x = torch.tensor([0, 1, 2, 3]), torch.randn(4, 4, 8, 8)
    dense = ddim_sample(m, y, T, x=x, cfg_scale=1.5, progress=False)
    skipped = {}
    for look in (False, True):
        with apply_lazy(m, LazyGates.for_model(m, T, lookahead=look)) as h:  # zero gates: every module computes
            assert torch.equal(ddim_sample(m, y, T, x=x, cfg_scale=1.5, progress=False), dense)
        with apply_lazy(m, LazyGates.for_model(m, T, threshold=0.75, lookahead=look)) as h:  # skip even steps
            skipped[look] = ddim_sample(m, y, T, x=x, cfg_scale=1.5, progress=False)
            assert h.stats().lazy_ratio == 0.5
            assert sampling_macs(m.config, T, h.stats()) < 0.6 * sampling_macs(m.config, T)
    assert not torch.allclose(skipped[False], dense)
    torch.testing.assert_close(skipped[True], skipped[False], rtol=0, atol=1e-6)
    assert "forward" not in m.blocks[0].attention.__dict__  # removed again


@pytest.mark.parametrize("lookahead", [False, True])
def test_only_the_allowed_branch_is_lazy(model, lookahead):
    g = LazyGates.for_model(model, T, threshold=0.75, lookahead=lookahead)  # would skip both on even steps
    for kinds, expect in ((("attn",), (0.5, 0.0)), (("mlp",), (0.0, 0.5)), (("attn", "mlp"), (0.5, 0.5))):
        with apply_lazy(model, g, LazyConfig(skippable_kinds=kinds)) as h:
            ddim_sample(model, labels(), T, cfg_scale=3.0, seed=0, progress=False)
            assert h.stats().ratio(2).tolist() == list(expect)
