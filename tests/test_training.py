import torch

from lazydit.data.fashion_mnist import InfiniteSampler
from lazydit.lazy import LazyGates, policy_for
from lazydit.pipeline import sample
from lazydit.training.gates import GateTrainConfig, train_gates

from conftest import tiny_model


def toy_data(seed=0, n=64, batch=8):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, 8, 8, generator=g).clamp(-1, 1)
    y = torch.arange(n) % 4
    return InfiniteSampler(x, y, batch, seed=seed)


def test_lazy_ratio_rises_with_rho():
    model = tiny_model(seed=2)
    ratios = []
    for rho in (0.0, 1e-5, 1e-3):
        cfg = GateTrainConfig(steps=10, iters=30, batch_size=8, lr=1e-2, rho_attn=rho, rho_mlp=rho, seed=0)
        gates = train_gates(model, toy_data(), cfg, progress=False)
        assert not any(p.requires_grad for p in model.parameters())
        assert torch.all(gates.weight[:, :, 1::2] == 0)  # odd-index gates are never trained
        _, rep = sample(model, torch.arange(8) % 4, 10, policy=policy_for(gates), cfg_scale=1.5, progress=False)
        ratios.append(rep.lazy_ratio)
    assert ratios[0] < ratios[1] < ratios[2], ratios
    assert ratios[2] > 0.3


def test_resume_gives_the_same_gates(tmp_path):
    model = tiny_model(seed=2)
    base = dict(steps=10, iters=12, batch_size=8, lr=1e-2, rho_attn=0.1, rho_mlp=0.1, seed=3, ckpt_every=5)
    full = train_gates(model, toy_data(1), GateTrainConfig(**base, out=str(tmp_path / "a")), progress=False)

    # interrupted after 7 steps (a checkpoint was written at 5), then resumed in a fresh process-like state
    class Stop(Exception):
        pass

    def stop_at_7(rec):
        if rec["iter"] == 7:
            raise Stop

    try:
        train_gates(model, toy_data(1), GateTrainConfig(**base, out=str(tmp_path / "b")), progress=False,
                    callback=stop_at_7)
    except Stop:
        pass
    assert not (tmp_path / "b" / "gates.safetensors").exists()
    resumed = train_gates(model, toy_data(1), GateTrainConfig(**base, out=str(tmp_path / "b"), resume=True),
                          progress=False)
    assert torch.equal(full.weight, resumed.weight)
    saved = LazyGates.load(tmp_path / "b" / "gates.safetensors")
    assert torch.equal(saved.weight, full.weight)
    assert saved.meta["training"]["rho_attn"] == 0.1


def test_calibrate_and_save_writes_the_threshold_it_reached(tmp_path):
    from lazydit.training.calibrate import calibrate_and_save

    model = tiny_model()
    gates = LazyGates.for_model(model, 6)
    with torch.no_grad():
        gates.weight.normal_(generator=torch.Generator().manual_seed(0))  # gate scores spread around 0
    y = torch.arange(4)
    out = tmp_path / "g.safetensors"
    th, ratio = calibrate_and_save(model, gates, 0.25, y, out, cfg_scale=1.5, seed=3, progress=False)
    assert abs(ratio - 0.25) < 0.05 and gates.threshold == th
    saved = LazyGates.load(out)
    assert saved.threshold == th
    assert saved.meta["calibration"] == {"target": 0.25, "reached": ratio, "cfg_scale": 1.5, "images": 4, "seed": 3}
    _, rep = sample(model, y, 6, policy=policy_for(saved), cfg_scale=1.5, seed=3, progress=False)
    assert rep.lazy_ratio == ratio  # the file reproduces the reached ratio
