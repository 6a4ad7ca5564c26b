"""Multi-process runs on CPU: torchrun with 2 gloo processes vs one process seeing the same global batches."""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from lazydit import distributed as sharded
from lazydit import ranks as dist
from lazydit.data.fashion_mnist import InfiniteSampler
from lazydit.images import to_uint8
from lazydit.lazy import LazyGates, policy_for
from lazydit.pipeline import sample
from lazydit.training.gates import GateTrainConfig, train_gates

from conftest import tiny_model

BASE = dict(steps=10, iters=4, batch_size=8, lr=1e-2, rho_attn=0.1, rho_mlp=0.1, seed=3, ckpt_every=2)
SAMPLING = dict(num_samples=13, steps=10, cfg_scale=1.5, batch_size=3, seed=5)  # 3 batches x 3 x 2 ranks = 18 -> 13

WORKER = textwrap.dedent('''
    import json, sys
    from pathlib import Path
    import torch
    torch.set_num_threads(1)
    from lazydit import create_model
    from lazydit import distributed as sharded
    from lazydit import ranks as dist
    from lazydit.data.fashion_mnist import InfiniteSampler
    from lazydit.lazy import LazyGates, policy_for
    from lazydit.training.gates import GateTrainConfig, train_gates

    def tiny_model(seed=0):  # as tests/conftest.py
        torch.manual_seed(seed)
        model = create_model("DiT-S/2", depth=3, hidden_size=32, num_heads=2, patch_size=2, input_size=8,
                             in_channels=1, num_classes=4, learn_sigma=False)
        with torch.no_grad():
            for p in model.parameters():
                if p.requires_grad:
                    p.add_(torch.randn_like(p) * 0.05)
        return model.eval()

    def toy_x():
        g = torch.Generator().manual_seed(0)
        return torch.randn(64, 1, 8, 8, generator=g).clamp(-1, 1), torch.arange(64) % 4

    out = Path(sys.argv[1])
    base, sampling = json.loads(sys.argv[2]), json.loads(sys.argv[3])
    device = dist.init_distributed("cpu")
    assert dist.world_size() == 2 and device.type == "cpu"
    model = tiny_model(seed=2)
    data = lambda: dist.RankSlice(InfiniteSampler(*toy_x(), base["batch_size"], seed=1))  # this rank's half
    train_gates(model, data(), GateTrainConfig(**base, out=str(out / "a")), progress=False)
    train_gates(model, data(), GateTrainConfig(**{**base, "iters": 2}, out=str(out / "b")), progress=False)
    train_gates(model, data(), GateTrainConfig(**base, out=str(out / "b"), resume=True), progress=False)
    train_gates(model, data(), GateTrainConfig(**{**base, "iters": 2}, out=str(out / "c")), progress=False)
    gates = LazyGates.load(out / "a" / "gates.safetensors")
    res = sharded.sample_sharded(model, policy=policy_for(gates), out_npz=out / "s.npz", progress=False, **sampling)
    if dist.is_main():
        (out / "res.json").write_text(json.dumps(res))
    # this rank's shard run alone, batch by batch, in this process: the .npz must hold exactly these images
    from lazydit.images import to_uint8
    from lazydit.pipeline import sample
    import numpy as np
    gen = sharded.rank_generator(sampling["seed"], dist.rank(), dist.world_size(), device)
    alone = []
    for b in range(sharded.shard_plan(sampling["num_samples"], sampling["batch_size"], dist.world_size())):
        z, y = sharded.draw_batch(gen, sampling["batch_size"], model.config, model.config.num_classes, device)
        x, _ = sample(model, y, sampling["steps"], policy=policy_for(gates), cfg_scale=sampling["cfg_scale"], x=z, progress=False)
        alone.append(to_uint8(x))
    np.save(out / f"alone_rank{dist.rank()}.npy", np.concatenate(alone))
    dist.cleanup()
''')


def toy_x():
    g = torch.Generator().manual_seed(0)
    return torch.randn(64, 1, 8, 8, generator=g).clamp(-1, 1), torch.arange(64) % 4


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    """Run the worker under torchrun with 2 gloo processes once; its outputs for the tests below."""
    out = tmp_path_factory.mktemp("ddp")
    worker = out / "worker.py"
    worker.write_text(WORKER)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone", str(worker),
           str(out), json.dumps(BASE), json.dumps(SAMPLING)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    if proc.returncode != 0:
        pytest.fail(f"torchrun failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return out


def test_two_process_gates_equal_one_process_on_the_same_global_batches(two_ranks):
    model = tiny_model(seed=2)
    single = train_gates(model, InfiniteSampler(*toy_x(), 8, seed=1), GateTrainConfig(**BASE), progress=False)
    ddp = LazyGates.load(two_ranks / "a" / "gates.safetensors")
    assert single.weight.abs().sum() > 0
    torch.testing.assert_close(ddp.weight, single.weight.detach(), rtol=1e-4, atol=1e-6)
    assert ddp.meta["training"]["world_size"] == 2
    # the logged (rank-averaged) losses are the global batch's
    ck = torch.load(two_ranks / "a" / "checkpoint.pt", weights_only=False)
    assert ck["world_size"] == 2 and len(ck["data_ranks"]) == 2
    # resumed under torchrun (2 iters, then 2 more) = straight through
    resumed = LazyGates.load(two_ranks / "b" / "gates.safetensors")
    torch.testing.assert_close(resumed.weight, ddp.weight, rtol=1e-5, atol=1e-7)
    # a 2-process checkpoint resumes in one process (the data state is the same on both ranks)
    cross = train_gates(model, InfiniteSampler(*toy_x(), 8, seed=1),
                        GateTrainConfig(**BASE, out=str(two_ranks / "c"), resume=True), progress=False)
    torch.testing.assert_close(cross.weight.detach(), single.weight.detach(), rtol=1e-4, atol=1e-6)


def test_sharded_npz_holds_each_ranks_shard_in_global_index_order(two_ranks):
    model = tiny_model(seed=2)
    gates = LazyGates.load(two_ranks / "a" / "gates.safetensors")
    n, bs, world = SAMPLING["num_samples"], SAMPLING["batch_size"], 2
    expected, ratios = {}, []
    for r in range(world):  # each rank alone: its generator (seed * world + rank), noise then labels per batch
        g = torch.Generator().manual_seed(SAMPLING["seed"] * world + r)
        for b in range(3):
            z = torch.randn(bs, 1, 8, 8, generator=g)
            y = torch.randint(0, 4, (bs,), generator=g)
            x, rep = sample(model, y, SAMPLING["steps"], policy=policy_for(gates), cfg_scale=SAMPLING["cfg_scale"], x=z,
                            progress=False)
            ratios.append(rep.lazy_ratio)
            for i, (img, lab) in enumerate(zip(to_uint8(x), y.numpy())):
                expected[(b * bs + i) * world + r] = (img, lab)  # global index = local index * world + rank
    with np.load(two_ranks / "s.npz") as f:
        arr, labels = f["arr_0"], f["arr_1"]
    assert arr.shape == (n, 8, 8, 1) and arr.dtype == np.uint8 and labels.shape == (n,)
    np.testing.assert_array_equal(labels, [expected[g][1] for g in range(n)])
    diff = np.abs(arr.astype(int) - np.stack([expected[g][0] for g in range(n)]).astype(int))
    assert diff.max() <= 1 and (diff > 0).mean() < 0.01  # another process: uint8 rounding of float noise only
    alone = [np.load(two_ranks / f"alone_rank{r}.npy") for r in range(world)]  # each rank's shard run alone
    np.testing.assert_array_equal(arr, np.stack([alone[g % world][g // world] for g in range(n)]))
    res = json.loads((two_ranks / "res.json").read_text())
    assert res["world_size"] == 2 and res["batches_per_rank"] == 3 and res["num_samples"] == n
    assert res["lazy_ratio"] == pytest.approx(np.mean(ratios), abs=0.02) and res["lazy_ratio"] > 0
    assert not (two_ranks / "s.npz.parts").exists()


def test_single_process_sample_sharded_and_resume(tmp_path, monkeypatch):
    import lazydit.pipeline as pipeline

    model = tiny_model(seed=1)
    kw = dict(num_samples=5, steps=4, cfg_scale=1.0, batch_size=2, seed=7)
    res = sharded.sample_sharded(model, out_npz=tmp_path / "a.npz", progress=False, **kw)
    assert res["world_size"] == 1 and res["batches_per_rank"] == 3 and res["lazy_ratio"] == 0.0
    assert not (tmp_path / "a.npz.parts").exists()
    with np.load(tmp_path / "a.npz") as f:
        full, labels = f["arr_0"], f["arr_1"]
    g = torch.Generator().manual_seed(7)  # one process: seed * 1 + 0, batches in order
    zs, ys = zip(*[(torch.randn(2, 1, 8, 8, generator=g), torch.randint(0, 4, (2,), generator=g)) for _ in range(3)])
    x, _ = sample(model, torch.cat(ys), 4, x=torch.cat(zs), progress=False)
    np.testing.assert_array_equal(labels, torch.cat(ys)[:5].numpy())
    assert np.abs(full.astype(int) - to_uint8(x)[:5].astype(int)).max() <= 1

    # interrupted: parts of 2 batches exist, the third is missing; the rerun samples only that one
    sharded.sample_sharded(model, out_npz=tmp_path / "b.npz", progress=False, keep_parts=True, **kw)
    parts = tmp_path / "b.npz.parts"
    (parts / "rank00000" / "b000002.npz").unlink()
    (tmp_path / "b.npz").unlink()
    calls = []
    real = pipeline.sample
    monkeypatch.setattr(pipeline, "sample", lambda *a, **k: calls.append(1) or real(*a, **k))
    sharded.sample_sharded(model, out_npz=tmp_path / "b.npz", progress=False, keep_parts=True, **kw)
    assert len(calls) == 1
    with np.load(tmp_path / "b.npz") as f:
        np.testing.assert_array_equal(f["arr_0"], full)
        np.testing.assert_array_equal(f["arr_1"], labels)
    with pytest.raises(ValueError, match="another run"):  # parts of another configuration are not mixed in
        sharded.sample_sharded(model, out_npz=tmp_path / "b.npz", progress=False, **{**kw, "seed": 8})


def test_rank_slice_and_single_process_helpers(monkeypatch):
    for var in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "MASTER_ADDR", "MASTER_PORT",
                "TORCHELASTIC_RUN_ID"):  # torchrun's environment, whoever runs this test
        monkeypatch.delenv(var, raising=False)
    assert not dist.is_distributed()
    assert dist.rank() == 0 and dist.world_size() == 1 and dist.is_main()
    dist.barrier()
    assert dist.init_distributed("cpu") == torch.device("cpu")
    assert dist.init_distributed(torch.device("cpu")) == torch.device("cpu")
    assert not dist.is_distributed()  # without torchrun's environment no process group is started
    x, y = torch.arange(8.0)[:, None], torch.arange(8)
    glob = InfiniteSampler(x, y, 8, seed=0)
    halves = [dist.RankSlice(InfiniteSampler(x, y, 8, seed=0), r, 2) for r in range(2)]
    whole = dist.RankSlice(InfiniteSampler(x, y, 8, seed=0))  # this process's rank and world: 0 of 1
    assert (whole.rank, whole.world) == (0, 1)
    for _ in range(2):
        gx, gy = next(glob)
        parts = [next(h) for h in halves]
        assert torch.equal(torch.cat([p[0] for p in parts]), gx) and torch.equal(torch.cat([p[1] for p in parts]), gy)
        assert all(torch.equal(a, b) for a, b in zip(next(whole), (gx, gy)))
    assert sharded.shard_plan(50000, 32, 8) == 196


def test_bf16_gate_training_keeps_fp32_gates():
    from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

    def train(bf16):
        """Train 2 iterations; the dtypes seen: model activations, and the optimiser's params, grads and state."""
        model = tiny_model(seed=2)
        seen = {"act": set(), "param": set(), "grad": set(), "state": set()}
        hooks = [m.register_forward_hook(lambda m, a, out: seen["act"].add(out.dtype))
                 for m in model.modules() if isinstance(m, torch.nn.Linear)]

        def pre(opt, args, kwargs):  # gradients are in place when the optimiser steps
            for p in (p for g in opt.param_groups for p in g["params"]):
                seen["param"].add(p.dtype)
                seen["grad"].add(p.grad.dtype)

        def post(opt, args, kwargs):
            seen["state"].update(v.dtype for st in opt.state.values() for v in st.values()
                                 if torch.is_tensor(v) and v.is_floating_point())

        hooks += [register_optimizer_step_pre_hook(pre), register_optimizer_step_post_hook(post)]
        losses = []
        try:
            gates = train_gates(model, InfiniteSampler(*toy_x(), 8, seed=1),
                                GateTrainConfig(**{**BASE, "iters": 2}, bf16=bf16), progress=False,
                                callback=lambda rec: losses.append(rec["loss"]))
        finally:
            for h in hooks:
                h.remove()
        assert next(model.parameters()).dtype == torch.float32  # the frozen model is not cast
        return gates.weight.detach(), seen, losses

    w16, seen16, loss16 = train(bf16=True)
    w32, seen32, loss32 = train(bf16=False)
    assert seen16["act"] == {torch.bfloat16}  # every Linear of the model passes ran in bf16 under autocast
    assert seen32["act"] == {torch.float32}
    for seen in (seen16, seen32):  # the gate bank, its gradients and AdamW's moments stay fp32
        assert seen["param"] == seen["grad"] == seen["state"] == {torch.float32}
    assert w16.dtype == torch.float32 and torch.isfinite(w16).all() and w16.abs().sum() > 0
    assert not torch.equal(w16, w32)  # bf16 rounding changed the gradients
    assert (w16 - w32).norm() < 1e-4 * w32.norm()  # but the gates trained the same way (AdamW's steps ~ lr)
    assert len(loss16) == len(loss32) == 2 and loss16 != loss32
    assert loss16 == pytest.approx(loss32, rel=1e-4)


def test_sample_ddp_cli_single_process(tmp_path, capsys):
    from lazydit.cli import main

    out = tmp_path / "s.npz"
    main(["sample-ddp", "--device", "cpu", "--steps", "4", "--num-samples", "3", "--batch-size", "2", "--seed", "2",
          "--out", str(out), "--json"])
    res = json.loads(capsys.readouterr().out)
    assert res["world_size"] == 1 and res["num_samples"] == 3
    with np.load(out) as f:
        assert f["arr_0"].shape == (3, 28, 28, 1) and f["arr_0"].dtype == np.uint8 and f["arr_1"].shape == (3,)
