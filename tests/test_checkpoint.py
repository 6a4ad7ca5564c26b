"""Checkpoints: strict loading of flat / training / safetensors files, clear errors, atomic writes."""

import os

import pytest
import torch

from lazydit import create_model
from lazydit.errors import CheckpointError
from lazydit.files import atomic_write, torch_save_atomic
from lazydit.models.checkpoint import load_dit, read_model_metadata, read_state_dict, save_model

OVR = dict(depth=2, hidden_size=32, num_heads=2, input_size=8, num_classes=10)


def random_dit(seed=0, **overrides):
    torch.manual_seed(seed)
    model = create_model("DiT-S/2", **{**OVR, **overrides})
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.1)
    return model


def assert_same_state(model, state):
    own = model.state_dict()
    assert set(own) == set(state)
    for k, v in own.items():
        assert torch.equal(v, state[k]), k


def test_flat_state_dict_round_trip(tmp_path):
    model = random_dit()
    path = tmp_path / "flat.pt"
    torch.save(model.state_dict(), path)
    loaded = load_dit(path, "DiT-S/2", **OVR)
    assert_same_state(loaded, model.state_dict())
    assert loaded.training is False
    assert loaded.config == model.config


def test_training_checkpoint_uses_ema(tmp_path):
    model, ema = random_dit(seed=0), random_dit(seed=1)
    # an AdamW-like optimizer state (building a real torch.optim optimizer costs seconds of imports)
    opt = {"state": {0: {"step": torch.tensor(3.0), "exp_avg": torch.zeros(4), "exp_avg_sq": torch.zeros(4)}},
           "param_groups": [{"lr": 1e-4, "betas": (0.9, 0.999), "weight_decay": 0.0, "params": [0]}]}
    path = tmp_path / "0001000.pt"
    torch.save({"model": model.state_dict(), "ema": ema.state_dict(), "opt": opt,
                "args": {"model": "DiT-S/2", "global_seed": 0}}, path)
    loaded = load_dit(path, "DiT-S/2", **OVR)
    assert_same_state(loaded, ema.state_dict())
    assert not torch.equal(loaded.blocks[0].attn.qkv.weight, model.blocks[0].attn.qkv.weight)
    # an explicit entry can still be asked for
    assert_same_state(model, read_state_dict(path, key="model"))
    with pytest.raises(CheckpointError, match="no entry"):
        read_state_dict(path, key="nope")


def test_training_checkpoint_without_ema_uses_model(tmp_path):
    model = random_dit()
    path = tmp_path / "ckpt.pt"
    torch.save({"model": model.state_dict(), "args": {}}, path)
    assert_same_state(load_dit(path, "DiT-S/2", **OVR), model.state_dict())


def test_safetensors_round_trip_needs_no_name(tmp_path):
    model = random_dit()
    path = tmp_path / "sub" / "model.safetensors"
    save_model(model, path, extra={"steps": 123, "note": "hi"})
    assert sorted(os.listdir(path.parent)) == ["model.safetensors"]  # no temporary file left
    meta = read_model_metadata(path)
    assert meta["name"] == "DiT-S/2" and meta["steps"] == 123 and meta["note"] == "hi"
    loaded = load_dit(path)
    assert loaded.config == model.config
    assert loaded.name == "DiT-S/2"
    assert_same_state(loaded, model.state_dict())
    x = torch.randn(2, 4, 8, 8)
    t, y = torch.tensor([5, 900]), torch.tensor([1, 10])
    with torch.no_grad():
        assert torch.equal(loaded(x, t, y), model.eval()(x, t, y))


def test_wrong_config_lists_missing_unexpected_misshaped(tmp_path):
    other = random_dit(depth=3, hidden_size=48, num_heads=2)
    state = other.state_dict()
    del state["y_embedder.embedding_table.weight"]
    path = tmp_path / "other.pt"
    torch.save(state, path)
    with pytest.raises(CheckpointError) as info:
        load_dit(path, "DiT-S/2", **OVR)
    msg = str(info.value)
    assert isinstance(info.value, ValueError)
    assert str(path) in msg
    assert "missing keys: y_embedder.embedding_table.weight" in msg
    assert "unexpected keys: blocks.2." in msg
    assert "mis-shaped keys:" in msg
    assert "pos_embed: file (1, 16, 48) vs model (1, 16, 32)" in msg
    assert "in all)" in msg  # long lists are cut and counted


def test_missing_blocks_are_reported(tmp_path):
    shallow = random_dit(depth=1)
    path = tmp_path / "shallow.pt"
    torch.save(shallow.state_dict(), path)
    with pytest.raises(CheckpointError, match=r"missing keys: blocks\.1\.") as info:
        load_dit(path, "DiT-S/2", **OVR)
    assert "unexpected" not in str(info.value) and "mis-shaped" not in str(info.value)


def test_truncated_file_raises_checkpoint_error(tmp_path):
    full = tmp_path / "full.pt"
    torch.save(random_dit().state_dict(), full)
    data = full.read_bytes()
    cut = tmp_path / "cut.pt"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="not a PyTorch checkpoint torch can read safely"):
        load_dit(cut, "DiT-S/2", **OVR)


def test_not_a_state_dict(tmp_path):
    path = tmp_path / "list.pt"
    torch.save([torch.zeros(1)], path)
    with pytest.raises(CheckpointError, match="expected a state dict"):
        load_dit(path, "DiT-S/2", **OVR)


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_dit(tmp_path / "nope.pt", "DiT-S/2", **OVR)
    with pytest.raises(FileNotFoundError):
        load_dit(tmp_path / "nope.safetensors")
    with pytest.raises(FileNotFoundError):
        read_state_dict(tmp_path / "nope.pt")


def test_pt_without_name_asks_for_model_name(tmp_path):
    path = tmp_path / "flat.pt"
    torch.save(random_dit().state_dict(), path)
    with pytest.raises(CheckpointError, match="--model-name") as info:  # a LazyditError: one line in the CLI
        load_dit(path)
    assert "DiT-XL/2" in str(info.value)


def test_atomic_write_failure_keeps_old_content(tmp_path):
    target = tmp_path / "out.bin"
    target.write_bytes(b"old")

    def bad(tmp):
        with open(tmp, "wb") as f:
            f.write(b"half a fi")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        atomic_write(target, bad)
    assert target.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["out.bin"]


def test_atomic_write_success_and_new_folder(tmp_path):
    target = tmp_path / "a" / "b" / "out.pt"
    torch_save_atomic({"x": torch.arange(3)}, target)
    assert os.listdir(target.parent) == ["out.pt"]
    assert torch.equal(torch.load(target, weights_only=True)["x"], torch.arange(3))
    atomic_write(target, lambda tmp: open(tmp, "wb").write(b"new"))
    assert target.read_bytes() == b"new"
    assert os.listdir(target.parent) == ["out.pt"]


def test_reference_training_checkpoint_with_namespace_args(tmp_path):
    import argparse

    model, ema = random_dit(seed=0), random_dit(seed=1)
    path = tmp_path / "0050000.pt"
    torch.save({"model": model.state_dict(), "ema": ema.state_dict(), "opt": {},
                "args": argparse.Namespace(model="DiT-S/2", global_seed=0)}, path)
    assert_same_state(load_dit(path, "DiT-S/2", **OVR), ema.state_dict())
