"""Look-ahead gates: plans fixed one step ahead, skipped modules skip their LayerNorm too."""

import copy

import pytest
import torch

from lazydit import ddim_sample
from lazydit.diffusion import Schedule
from lazydit.lazy import LazyGates, apply_lazy
from lazydit.training import GateTrainConfig, train_gates

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
    with apply_lazy(model, gates, record_decisions=True, **kw) as h:
        x = ddim_sample(model, labels(), T, cfg_scale=cfg_scale, seed=seed, progress=False)
        return x, h.state.decisions.clone(), h.stats()


def test_lookahead_with_reference_decisions_gives_identical_samples(model):
    x_ref, dec, stats = run(model, random_gates(model, lookahead=False))
    assert 0.05 < stats.lazy_ratio < 0.45  # a mix of computing and skipping rows
    partial = dec.any(-1) & ~dec.all(-1)
    assert partial.any()  # some modules compute for part of the rows only (gather / scatter)
    la = LazyGates.for_model(model, T, lookahead=True)
    with apply_lazy(model, la, record_decisions=True) as h:
        h.state.force = ~dec  # (T, L, 2, B) per-row plan: skip where the reference skipped
        x_la = ddim_sample(model, labels(), T, cfg_scale=3.0, seed=0, progress=False)
        assert torch.equal(h.state.decisions, dec)
    torch.testing.assert_close(x_la, x_ref, rtol=0, atol=1e-6)


def test_lookahead_plan_scores_the_inputs_of_the_step_before(model):
    gates = random_gates(model, lookahead=True)
    x_la, dec, stats = run(model, gates)
    assert 0.05 < stats.lazy_ratio < 0.45
    # replay the same plan through the reference path and grab every module's input Z there
    zs = {}
    hooks = [getattr(blk, name).register_forward_pre_hook(
        lambda m, a, i=i, b=b: zs.setdefault((i, b), []).append(a[0].detach().clone()))
        for i, blk in enumerate(model.blocks) for b, name in enumerate(("attn", "mlp"))]
    ref = LazyGates.for_model(model, T)
    with apply_lazy(model, ref) as h:
        h.state.force = ~dec
        x_replay = ddim_sample(model, labels(), T, cfg_scale=3.0, seed=0, progress=False)
    for hk in hooks:
        hk.remove()
    torch.testing.assert_close(x_replay, x_la, rtol=0, atol=1e-6)
    th = h.state.logit_threshold
    for (i, b), inputs in zs.items():
        for s, k in enumerate(range(T - 1, -1, -1)):
            if k % 2 == 1 and k >= 1:  # odd step k: every row computes and scores gate k-1
                logit = inputs[s].sum(1) @ gates.weight[i, b, k - 1]
                assert torch.equal(dec[k - 1, i, b], logit >= th), (i, b, k)
            else:
                assert dec[k, i, b].all() or k < T - 1


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
    with apply_lazy(model, g, record_decisions=True) as h:
        twin = copy.deepcopy(model)
        ddim_sample(model, labels(), T, cfg_scale=3.0, seed=0, progress=False)  # builds the branch functions
        twin._lazy_state.reset_stats()
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
        p_mlp = [p for b, p in h.state.probs if b == 1][1]
    hk.remove()
    z_rec, z_now = zs["z"]
    assert not torch.allclose(z_rec, z_now)
    expected = torch.sigmoid(z_rec.sum(1) @ g.weight[1, 1, 2])
    torch.testing.assert_close(p_mlp, expected)


def test_train_lookahead_gates_and_sample(fake_fmnist):
    from lazydit.data import InfiniteSampler, load_fashion_mnist
    model = tiny_model(input_size=28, patch_size=7, num_classes=10)
    x, y = load_fashion_mnist("train", fake_fmnist)
    data = InfiniteSampler(x, y, 8, seed=0)
    cfg = GateTrainConfig(steps=T, iters=3, batch_size=8, lookahead=True, rho_attn=1.0, rho_mlp=1.0)
    g = train_gates(model, data, cfg, progress=False)
    assert g.lookahead and g.weight.abs().sum() > 0
    assert g.weight[:, :, 1::2].abs().sum() == 0  # odd-index gates untouched (parity)
    with apply_lazy(model, g):
        ddim_sample(model, torch.arange(4), T, seed=0, progress=False)


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
        apply_lazy(model, LazyGates.for_model(model, T), compile=True)


def test_gates_attach_to_large_dit_unchanged():
    from lazydit.cost import sampling_macs
    from lazydit.large_dit import LargeDiT, LargeDiTConfig

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
    for branches, expect in ((("attn",), (0.5, 0.0)), (("mlp",), (0.0, 0.5)), (("attn", "mlp"), (0.5, 0.5))):
        with apply_lazy(model, g, branches=branches) as h:
            ddim_sample(model, labels(), T, cfg_scale=3.0, seed=0, progress=False)
            assert h.stats().ratio(2).tolist() == list(expect)
