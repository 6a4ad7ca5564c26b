import copy

import pytest
import torch

from lazydit import ddim_sample
from lazydit.errors import GateMismatchError
from lazydit.lazy import ForcedPlan, LazyConfig, LazyGates, apply_lazy, policy_for
from lazydit.models.dit import modulate
from lazydit.pipeline import sample

from conftest import tiny_model


def labels(n=4):
    return torch.arange(n) % 4


def random_gates(model, steps, scale=1.0, seed=1):
    g = LazyGates.for_model(model, steps)
    torch.manual_seed(seed)
    g.weight.data.normal_(0, scale)
    g.weight.data[:, :, 1::2] = 0  # reference parity: odd-index gates untrained
    return g


@pytest.mark.parametrize("cfg_scale", [1.0, 3.0])
def test_all_computing_gates_are_bit_identical(model, cfg_scale):
    y = labels()
    bare = ddim_sample(model, y, 10, cfg_scale=cfg_scale, seed=0, progress=False)
    gates = LazyGates.for_model(model, 10)  # zero gates: p = 0.5 -> compute
    with apply_lazy(model, gates) as h:
        lazy = ddim_sample(model, y, 10, cfg_scale=cfg_scale, seed=0, progress=False)
        assert h.stats().lazy_ratio == 0.0
    assert torch.equal(bare, lazy)


def test_attach_keeps_types_and_keys_and_remove_restores(model):
    keys = {k: v.clone() for k, v in model.state_dict().items()}
    types_before = [type(m) for m in model.modules()]
    h = apply_lazy(model, LazyGates.for_model(model, 10))
    assert list(model.state_dict()) == list(keys)
    assert [type(m) for m in model.modules()] == types_before
    twin = copy.deepcopy(model)  # deepcopy binds the copy's forwards to the copied modules
    assert twin.blocks[0].attn.forward.__self__ is twin.blocks[0].attn
    assert twin._lazy_run is not model._lazy_run
    h.remove()
    assert "forward" not in model.blocks[0].attn.__dict__
    assert not hasattr(model, "_lazy_run")
    with pytest.raises(RuntimeError):
        apply_lazy(twin, LazyGates.for_model(model, 10))


def test_forced_skip_reuses_previous_pre_gate_output_times_current_gate(model):
    T, y = 10, labels(2)
    block = model.blocks[1]
    seen = {"attn": [], "block_in": [], "block_out": []}
    def grab_block(m, args, out):  # a forward hook must return None, or it replaces the output
        seen["block_in"].append([t.detach().clone() for t in args])
        seen["block_out"].append(out.detach().clone())

    hooks = [
        block.attn.register_forward_hook(lambda m, a, out: seen["attn"].append(out.detach().clone())),
        block.register_forward_hook(grab_block),
    ]
    force = torch.zeros(T, 3, 2, dtype=torch.bool)
    force[T - 2, 1, 0] = True  # skip block 1's attn at the second sampling step (respaced index T-2)
    with apply_lazy(model, ForcedPlan(force, ahead=False)) as h:  # the reference path: the module is called
        ddim_sample(model, y, T, seed=0, progress=False)
        stats = h.stats()
    for hk in hooks:
        hk.remove()
    # the attn "output" at step 2 is exactly the pre-gate output cached at step 1
    assert torch.equal(seen["attn"][1], seen["attn"][0])
    # and the block scaled it by the CURRENT step's gate_msa: recompute block 1 at step 2 by hand
    x1, c1 = seen["block_in"][1]
    shift_mlp, scale_mlp, gate_mlp = block.adaLN_modulation(c1).chunk(6, dim=1)[3:]
    gate_msa = block.adaLN_modulation(c1).chunk(6, dim=1)[2]
    xa = x1 + gate_msa.unsqueeze(1) * seen["attn"][0]
    expected = xa + gate_mlp.unsqueeze(1) * block.mlp(modulate(block.norm2(xa), shift_mlp, scale_mlp))
    torch.testing.assert_close(seen["block_out"][1], expected, rtol=0, atol=1e-6)
    assert int(stats.skipped.sum()) == 2 and int(stats.skipped[T - 2, 1, 0]) == 2


def test_mixed_batch_equals_rows_one_by_one():
    model = tiny_model(seed=3)
    T = 10
    gates = random_gates(model, T, scale=0.05)
    y = labels(4)
    noise = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(5))
    batch, rep = sample(model, y, T, policy=policy_for(gates), cfg_scale=2.0, x=noise, progress=False)
    assert 0 < rep.lazy_ratio < 0.5  # decisions really differ between rows
    per_step = torch.tensor(rep.stats["per_step"])
    assert ((per_step > 0) & (per_step < 1)).any(), "no mixed step: the test would not exercise gather/scatter"
    rows = [sample(model, y[i : i + 1], T, policy=policy_for(gates), cfg_scale=2.0, x=noise[i : i + 1], progress=False)[0]
            for i in range(4)]
    torch.testing.assert_close(batch, torch.cat(rows), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("parity", [True, False])
def test_parity_odd_steps_always_compute(parity):
    model = tiny_model(seed=3)
    T = 9  # odd T: the first step (k = T - 1 = 8) is even, so only its empty caches make it compute, not parity
    L, D = len(model.blocks), model.config.hidden_size
    k = torch.arange(T)
    # the steps that may skip: not the first (nothing cached yet), and under the reference parity not the odd ones
    may_skip = (k != T - 1) & ((k % 2 == 0) | (not parity))

    def per_step(gates, policy=None):
        _, rep = sample(model, labels(4), T, policy=policy or policy_for(gates), progress=False)
        return rep, torch.tensor(rep.stats["per_step"][::-1], dtype=torch.float64)  # sampling order -> index k

    # every module wants to skip at every step: zero gates (p = 0.5) under threshold 0.75, or a forced plan
    _, ratio = per_step(LazyGates(L, D, T, threshold=0.75, parity=parity))
    assert torch.equal(ratio, may_skip.double())
    _, ratio = per_step(None, policy=ForcedPlan(torch.ones(T, L, 2, dtype=torch.bool), parity=parity))
    assert torch.equal(ratio, may_skip.double())

    # extreme random gates at EVERY index (odd ones too): rows decide differently, and only where they may
    gates = LazyGates(L, D, T, parity=parity)
    gates.weight.data.normal_(0, 10.0, generator=torch.Generator().manual_seed(1))
    rep, ratio = per_step(gates)
    full = torch.tensor(rep.stats["per_step_layer_branch"], dtype=torch.float64)
    assert full.shape == (T, L, 2) and torch.allclose(full.mean(dim=(1, 2)), ratio)
    assert len(rep.stats["per_layer"]) == L and set(rep.stats["per_branch"]) == {"attn", "mlp"}
    assert torch.all(ratio[~may_skip] == 0)  # the first step, and the odd steps under parity, compute every row
    assert torch.all((ratio[may_skip] > 0) & (ratio[may_skip] < 1))  # the others skip some rows, not all
    assert 0 < rep.lazy_ratio < int(may_skip.sum()) / T


def test_same_seed_same_samples(model):
    gates = random_gates(model, 10, scale=0.05)
    a, _ = sample(model, labels(), 10, policy=policy_for(gates), cfg_scale=1.5, seed=7, progress=False)
    b, _ = sample(model, labels(), 10, policy=policy_for(gates), cfg_scale=1.5, seed=7, progress=False)
    c, _ = sample(model, labels(), 10, policy=policy_for(gates), cfg_scale=1.5, seed=8, progress=False)
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_gate_file_round_trip_and_mismatches(tmp_path, model):
    gates = random_gates(model, 20)
    gates.threshold = 0.3
    path = tmp_path / "g.safetensors"
    gates.save(path, extra={"training": {"rho_attn": 0.1}})
    back = LazyGates.load(path)
    assert torch.equal(back.weight, gates.weight) and back.threshold == 0.3 and back.steps == 20
    assert back.meta["training"]["rho_attn"] == 0.1
    assert back.meta["model_config"]["hidden_size"] == 32
    assert back.meta["timestep_map"][:3] == [0, 53, 105]
    # another model: different depth, different width, same shape but different config
    for other in (tiny_model(depth=2), tiny_model(hidden_size=64), tiny_model(num_classes=7)):
        with pytest.raises(GateMismatchError):
            apply_lazy(other, back)
    # another step count
    with pytest.raises(GateMismatchError, match="T=20"):
        sample(model, labels(), 10, policy=policy_for(back), progress=False)
    h = apply_lazy(model, back)
    with pytest.raises(GateMismatchError, match=r"timestep 979, which is not on .*respacing of T=20 steps"):
        ddim_sample(model, labels(), 50, progress=False)
    h.remove()
    # not a gate file
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"garbage" * 10)
    with pytest.raises(GateMismatchError):
        LazyGates.load(bad)


def test_batch_uniform_equals_per_sample_when_rows_agree():
    model = tiny_model(seed=3)
    gates = random_gates(model, 10, scale=0.05)
    y = torch.zeros(4, dtype=torch.long)
    noise = torch.randn(1, 1, 8, 8, generator=torch.Generator().manual_seed(2)).expand(4, -1, -1, -1)
    a, ra = sample(model, y, 10, policy=policy_for(gates), x=noise, progress=False)
    b, rb = sample(model, y, 10, policy=policy_for(gates, LazyConfig(uniform=True)), x=noise, progress=False)
    assert 0 < ra.lazy_ratio and ra.lazy_ratio == rb.lazy_ratio
    assert torch.equal(a, b)


def test_batch_uniform_and_tied_cfg_decisions():
    model = tiny_model(seed=3)
    gates = random_gates(model, 10, scale=0.05)
    y = torch.arange(4) % 4
    for kw in (dict(uniform=True), dict(tie_cfg=True)):
        h = apply_lazy(model, gates, LazyConfig(**kw))
        ddim_sample(model, y, 10, cfg_scale=2.0, seed=1, progress=False)
        skipped = h.stats().skipped
        h.remove()
        if kw.get("uniform"):
            assert torch.all((skipped == 0) | (skipped == 8))  # all 8 rows or none
        else:
            assert torch.all(skipped % 2 == 0)  # cond/uncond pairs skip together
        assert skipped.sum() > 0


@pytest.mark.parametrize("lookahead", [False, True])
def test_micro_batches_give_the_samples_and_counts_of_one_batch(lookahead):
    model = tiny_model(seed=3)
    T = 10
    gates = random_gates(model, T, scale=0.05)
    gates.lookahead = lookahead
    y = labels(7)
    whole, rep = sample(model, y, T, policy=policy_for(gates), cfg_scale=2.0, seed=4, progress=False)
    assert 0 < rep.lazy_ratio < 0.5
    chunked, rep3 = sample(model, y, T, policy=policy_for(gates), cfg_scale=2.0, seed=4, progress=False, micro_batch=3)
    torch.testing.assert_close(chunked, whole, rtol=1e-5, atol=1e-5)  # same noise: drawn for the whole batch
    assert torch.equal(rep3.lazy.skipped, rep.lazy.skipped) and torch.equal(rep3.lazy.total, rep.lazy.total)
    assert rep3.lazy_ratio == rep.lazy_ratio and rep3.tmacs == rep.tmacs
    plain, _ = sample(model, y, T, cfg_scale=2.0, seed=4, progress=False)
    plain3, r = sample(model, y, T, cfg_scale=2.0, seed=4, progress=False, micro_batch=2)
    torch.testing.assert_close(plain3, plain, rtol=1e-5, atol=1e-5)
    assert r.lazy is None and r.name == "DDIM-10"
    with pytest.raises(ValueError, match="per-row skip plan"):
        sample(model, y, T, policy=ForcedPlan(torch.zeros(T, 3, 2, 14, dtype=torch.bool)), progress=False,
               micro_batch=3)


def test_stats_name_their_branches_and_refuse_a_count_that_does_not_fit():
    from lazydit.lazy import LazyStats

    skipped, total = torch.tensor([[[0, 1, 2]]]), torch.tensor([[[4, 4, 4]]])
    stats = LazyStats(skipped, total, ("attn", "cross", "mlp"))
    assert stats.as_dict()["per_branch"] == {"attn": 0.0, "cross": 0.25, "mlp": 0.5}
    with pytest.raises(ValueError, match="3 branches counted, 2 kinds"):
        LazyStats(skipped, total)  # the two DiT branch names do not fit a three-branch count


def test_skippable_kinds_select_branches_by_kind():
    assert LazyConfig().skippable() == (0, 1)
    assert LazyConfig(skippable_kinds=("mlp",)).skippable() == (1,)
    assert LazyConfig(skippable_kinds=("attn",)).skippable(("attn", "cross", "mlp")) == (0, 1)  # cross with attn
    with pytest.raises(ValueError, match="unknown branch kinds"):
        LazyConfig(skippable_kinds=("ff",))


def test_the_handle_names_what_runs_for_a_bare_samplers_progress_bar(model):
    gates = LazyGates.for_model(model, 10)
    with apply_lazy(model, gates) as lazy:
        assert lazy.label == "Lazy-10"
    with apply_lazy(model, ForcedPlan(torch.zeros(4, len(model.blocks), 2, dtype=torch.bool))) as forced:
        assert forced.label == "Forced-4"
