"""Beyond the paper: gates on every step (no parity), a cap on consecutive skips, and data-free gate training on the
frozen model's own trajectories."""

import pytest
import torch

from lazydit.errors import UsageError
from lazydit.lazy import ForcedPlan, LazyConfig, LazyGates, policy_for
from lazydit.pipeline import calibrate_threshold, sample
from lazydit.sampling.ddim import ddim_sample
from lazydit.training.gates import GateTrainConfig, train_gates
from lazydit.training.trajectories import trajectory_data, trajectory_pool

from conftest import tiny_model
from test_training import toy_data


@pytest.mark.parametrize("cfg_scale", [1.0, 2.0])
def test_every_step_gates_all_computing_are_the_bare_model(model, cfg_scale):
    gates = LazyGates.for_model(model, 6, threshold=0.0, parity=False)  # p >= 0: every row computes
    y = torch.tensor([0, 1, 2])
    x, rep = sample(model, y, 6, policy=policy_for(gates), cfg_scale=cfg_scale, progress=False)
    assert torch.equal(x, ddim_sample(model, y, 6, cfg_scale=cfg_scale, progress=False))
    assert rep.lazy_ratio == 0.0


def test_every_step_gates_can_skip_past_half(model):
    gates = LazyGates.for_model(model, 8, threshold=0.75, parity=False)  # zero gates: p = 0.5 < 0.75, all skip
    _, rep = sample(model, torch.tensor([0, 1]), 8, policy=policy_for(gates), progress=False)
    assert rep.lazy_ratio == pytest.approx(7 / 8)  # only the first step computes (nothing to reuse before it)
    parity = LazyGates.for_model(model, 8, threshold=0.75)
    assert sample(model, torch.tensor([0, 1]), 8, policy=policy_for(parity), progress=False)[1].lazy_ratio == pytest.approx(0.5)


@pytest.mark.parametrize("ahead", [True, False])
def test_max_skips_one_turns_an_all_skip_plan_into_the_parity_schedule(model, ahead):
    T, y = 8, torch.tensor([0, 1, 3])
    everything = torch.ones(T, len(model.blocks), 2, dtype=torch.bool)
    capped, rep = sample(model, y, T, policy=ForcedPlan(everything, parity=False, ahead=ahead,
                                                         config=LazyConfig(max_skips=1)), progress=False)
    parity, rep_p = sample(model, y, T, policy=ForcedPlan(everything, parity=True, ahead=ahead), progress=False)
    assert torch.equal(capped, parity) and torch.equal(rep.lazy.skipped, rep_p.lazy.skipped)


def test_max_skips_zero_never_skips(model):
    everything = torch.ones(6, len(model.blocks), 2, dtype=torch.bool)
    x, rep = sample(model, torch.tensor([2]), 6, policy=ForcedPlan(everything, parity=False,
                                                                   config=LazyConfig(max_skips=0)), progress=False)
    assert rep.lazy_ratio == 0 and torch.equal(x, ddim_sample(model, torch.tensor([2]), 6, progress=False))


def test_max_skips_is_per_row():
    """Row 0 skips every step, row 1 never: the cap forces row 0 alone, as if it ran by itself."""
    model = tiny_model()
    T, L = 7, len(model.blocks)
    plan = torch.zeros(T, L, 2, 2, dtype=torch.bool)
    plan[..., 0] = True
    cfg = LazyConfig(max_skips=2)
    both, _ = sample(model, torch.tensor([0, 1]), T, policy=ForcedPlan(plan, parity=False, config=cfg), progress=False)
    alone, _ = sample(model, torch.tensor([0]), T, policy=ForcedPlan(plan[..., :1], parity=False, config=cfg),
                      progress=False)
    torch.testing.assert_close(both[:1], alone, rtol=1e-5, atol=1e-6)  # mixed batches: gather/scatter rounding


def test_every_step_training_trains_every_index_but_the_first_and_calibrates_past_half():
    model = tiny_model(seed=2)
    cfg = GateTrainConfig(steps=6, iters=40, batch_size=8, lr=1e-2, rho_attn=1e-3, rho_mlp=1e-3, every_step=True)
    gates = train_gates(model, toy_data(), cfg, progress=False)
    assert not gates.parity and gates.meta["training"]["every_step"]
    trained = (gates.weight != 0).flatten(0, 1).any(0).any(-1)  # (T,)
    assert trained[:5].all() and not trained[5]  # index T-1 (the first step) has nothing to reuse: never trained
    th, ratio = calibrate_threshold(model, gates, 0.7, torch.arange(8) % 4, cfg_scale=1.5, progress=False)
    assert ratio > 0.6


def test_every_step_and_lookahead_do_not_mix():
    with pytest.raises(UsageError, match="parity"):
        train_gates(tiny_model(), toy_data(), GateTrainConfig(steps=4, iters=1, every_step=True, lookahead=True),
                    progress=False)


def test_trajectory_pool_holds_the_dense_sampling_states(model):
    traj, y = trajectory_pool(model, 5, 6, cfg_scale=2.0, seed=3, batch_size=4, progress=False)
    assert traj.shape == (6, 5, 1, 8, 8) and sorted(y.tolist()) == [0, 0, 1, 1, 2, 3]
    states = []
    ddim_sample(model, y[:4], 5, cfg_scale=2.0, seed=3 * 1_000_003, progress=False,
                callback=lambda info: states.append(info["x"][:4]))
    assert torch.equal(traj[:4], torch.stack(states, 1))  # traj[:, i] is the input of sampling step i


def test_data_free_training_needs_no_dataset_and_rho_raises_laziness(monkeypatch, tmp_path):
    monkeypatch.setenv("LAZYDIT_DATA", str(tmp_path / "nothing-here"))
    model = tiny_model(seed=2)
    ratios = []
    for rho in (0.0, 1e-3):
        data, source = trajectory_data(model, 8, 8, size=16, cfg_scale=1.5, seed=0, progress=False)
        cfg = GateTrainConfig(steps=8, iters=30, batch_size=8, lr=1e-2, rho_attn=rho, rho_mlp=rho, data_free=True)
        gates = train_gates(model, data, cfg, progress=False, extra_meta=source)
        assert gates.meta["data_free"]["pool"] == 16 and gates.meta["training"]["data_free"]
        ratios.append(sample(model, torch.arange(8) % 4, 8, policy=policy_for(gates), cfg_scale=1.5, progress=False)[1].lazy_ratio)
    assert ratios[0] < ratios[1] and ratios[1] > 0.2, ratios


def test_data_free_cli_trains_and_refuses_a_dataset(tmp_path, capsys):
    import json

    from lazydit.cli import main

    common = ["train-gates", "--steps", "4", "--iters", "2", "--batch-size", "4", "--data-free", "--pool", "8",
              "--json"]
    main([*common, "--every-step", "--out", str(tmp_path / "g")])
    out = json.loads(capsys.readouterr().out)
    g = LazyGates.load(out["gates"])
    assert not g.parity and g.meta["training"]["data_free"] and g.meta["data_free"]["pool"] == 8
    with pytest.raises(SystemExit) as e:
        main([*common, "--data", str(tmp_path), "--out", str(tmp_path / "h")])
    assert "drop --data" in str(e.value)


def _loss_with(model, gates, x, y, k, k_start, rollout):
    from lazydit.lazy import apply_lazy
    from lazydit.sampling.schedule import Schedule
    from lazydit.training.gates import gate_loss_step

    with apply_lazy(model, gates, mode="soft") as handle:
        drop = torch.zeros(len(y), dtype=torch.long)
        out = gate_loss_step(model, handle, x, y, k, drop, Schedule(gates.steps), 1e-2, 1e-2, k_start, rollout)
        return out, [h.cache.clone() for h in handle.run.hooks]


def test_rollout_with_every_gate_computing_is_the_recorded_recipe():
    """Hard decisions that all compute fill the caches as recording does: the same loss, bit for bit."""
    model, T, k, R = tiny_model(seed=2), 8, 2, 3
    gates = LazyGates.for_model(model, T, threshold=0.0, parity=False)  # p >= 0: every row computes
    gates.weight.data.normal_(0, 0.1, generator=torch.Generator().manual_seed(0))
    x, y = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(1)), torch.tensor([0, 1, 2, 3])
    (loss_r, *_), caches_r = _loss_with(model, gates, x, y, k, k + R, R)
    (loss_0, *_), caches_0 = _loss_with(model, gates, x, y, k, k + R, 0)
    assert torch.equal(loss_r, loss_0)
    assert all(torch.equal(a, b) for a, b in zip(caches_r, caches_0))


def test_rollout_with_every_gate_skipping_reuses_the_first_recorded_step():
    """All-skip decisions chain: after R skipped steps the soft mix reuses the outputs recorded R steps earlier."""
    from lazydit.lazy import apply_lazy
    from lazydit.sampling.schedule import Schedule

    model, T, k, R = tiny_model(seed=2), 8, 2, 3
    gates = LazyGates.for_model(model, T, threshold=1.0, parity=False)  # p = 0.5 < 1: every row skips
    x, y = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(1)), torch.tensor([0, 1, 2, 3])
    (_, _, p_attn, _), caches = _loss_with(model, gates, x, y, k, k + R, R)
    assert p_attn.shape == (4, len(model.blocks))
    with apply_lazy(model, gates, mode="record") as handle, torch.no_grad():
        model(x, Schedule(T).timesteps(k + R, 4, x.device), y, force_drop_ids=torch.zeros(4, dtype=torch.long))
        first = [h.cache for h in handle.run.hooks]
    assert all(torch.equal(a, b) for a, b in zip(caches, first))
    (_, *_), dense = _loss_with(model, gates, x, y, k, k + R, 0)  # recording every step: the caches of step k
    assert not any(torch.equal(a, b) for a, b in zip(dense, first))


def test_rollout_training_records_its_setting_and_refuses_lookahead(tmp_path, capsys):
    model = tiny_model(seed=2)
    cfg = GateTrainConfig(steps=6, iters=4, batch_size=8, lr=1e-2, every_step=True, rollout=2)
    gates = train_gates(model, toy_data(), cfg, progress=False)
    assert gates.meta["training"]["rollout"] == 2 and (gates.weight != 0).any()
    with pytest.raises(UsageError, match="look-ahead"):
        train_gates(model, toy_data(), GateTrainConfig(steps=6, iters=1, lookahead=True, rollout=1), progress=False)
    from lazydit.cli import main

    with pytest.raises(SystemExit) as e:
        main(["train-gates", "--steps", "4", "--iters", "1", "--data-free", "--lookahead", "--rollout", "2",
              "--out", str(tmp_path / "g")])
    assert "--rollout and --lookahead" in str(e.value)


def test_rollout_gates_sample_with_their_chain_cap_unless_told_otherwise(model):
    from lazydit.lazy import policy_for

    T, y = 8, torch.tensor([0, 1])
    gates = LazyGates.for_model(model, T, threshold=0.75, parity=False)  # zero gates: every module skips
    gates.meta["training"] = {"rollout": 2}  # as train_gates records it
    assert policy_for(gates).config.max_skips == 2
    assert policy_for(gates, LazyConfig(max_skips=5)).config.max_skips == 5  # an explicit cap wins
    _, capped = sample(model, y, T, policy=policy_for(gates), progress=False)
    _, same = sample(model, y, T, policy=policy_for(gates, LazyConfig(max_skips=2)), progress=False)
    del gates.meta["training"]
    _, free = sample(model, y, T, policy=policy_for(gates), progress=False)
    assert free.lazy_ratio == pytest.approx(7 / 8)  # uncapped: only the first step computes
    assert capped.lazy_ratio == same.lazy_ratio < free.lazy_ratio  # runs of at most 2 skips, then a computed step


def test_check_reachable_caps_only_parity_gates_at_one_half():
    from lazydit.lazy.gates import check_reachable

    for target in (None, 0.0, 0.3, 0.5):
        check_reachable(target)  # within the parity's reach: no error
    with pytest.raises(UsageError, match=r"^target lazy ratio 0.51: out of reach, .* caps the lazy ratio at 0.5$"):
        check_reachable(0.51)
    with pytest.raises(UsageError, match=r"^--target-ratio 0.9: out of reach"):
        check_reachable(0.9, parity=True, name="--target-ratio")
    check_reachable(0.9, parity=False)  # every-step gates: no cap by construction
