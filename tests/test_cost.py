"""Cost accounting the paper's way (docs/method-notes.md §4): Table 3 TMACs, lazy savings, and a hook-based MAC count."""

import pytest
import torch
import torch.nn as nn

from lazydit.models.cost import attention_matmul_macs, forward_macs, gate_macs, module_macs, sampling_macs
from lazydit.lazy import LazyStats
from lazydit.models.dit import model_config

from conftest import tiny_model

XL256 = model_config("DiT-XL/2")
XL512 = model_config("DiT-XL/2", input_size=64)


def test_forward_macs_xl2_256():
    assert forward_macs(XL256) == pytest.approx(114.39e9, abs=0.005e9)
    assert forward_macs(XL256, attention_matmuls=True) == pytest.approx(118.6e9, abs=0.05e9)
    assert isinstance(forward_macs(XL256), int)


def test_forward_macs_xl2_512():
    assert forward_macs(XL512) == pytest.approx(456.89e9, abs=0.005e9)
    assert forward_macs(XL512, attention_matmuls=True) == pytest.approx(524.5e9, abs=0.05e9)


def test_module_macs_xl2():
    N, D = 256, 1152
    m = module_macs(XL256)
    assert m == {"attn": 4 * N * D * D, "mlp": 8 * N * D * D}
    assert attention_matmul_macs(XL256) == 2 * N * N * D
    assert gate_macs(XL256) == 2 * 28 * N * D


@pytest.mark.parametrize("steps,tmacs", [(50, 5.72), (40, 4.57), (25, 2.86), (20, 2.29), (7, 0.80)])
def test_table3_ddim_256(steps, tmacs):
    assert sampling_macs(XL256, steps) / 1e12 == pytest.approx(tmacs, abs=0.01)


@pytest.mark.parametrize("steps,tmacs", [(50, 22.85), (10, 4.57)])
def test_table3_ddim_512(steps, tmacs):
    assert sampling_macs(XL512, steps) / 1e12 == pytest.approx(tmacs, abs=0.01)


def _half_lazy_stats(cfg, steps, rows=2):
    """Every module skipped on every even step, for all rows (both CFG halves): exactly half when T is even."""
    total = torch.full((steps, cfg.depth, 2), rows, dtype=torch.long)
    skipped = torch.zeros_like(total)
    skipped[0::2] = rows
    return LazyStats(skipped, total)


@pytest.mark.parametrize("attention_matmuls", [False, True])
def test_sampling_macs_half_lazy_by_hand(attention_matmuls):
    cfg, T = XL256, 50
    stats = _half_lazy_stats(cfg, T)
    assert stats.lazy_ratio == 0.5
    F = forward_macs(cfg, attention_matmuls)
    m = module_macs(cfg)
    attn = m["attn"] + (attention_matmul_macs(cfg) if attention_matmuls else 0)
    expected = T * F - 0.5 * T * cfg.depth * (attn + m["mlp"]) + T * gate_macs(cfg)
    got = sampling_macs(cfg, T, stats, attention_matmuls=attention_matmuls)
    assert got == pytest.approx(expected, rel=1e-12)


def test_sampling_macs_half_lazy_xl2_table3():
    stats = _half_lazy_stats(XL256, 50, rows=8)  # the row count does not matter: MACs are per image
    assert sampling_macs(XL256, 50, stats) / 1e12 == pytest.approx(2.87, abs=0.02)


def test_sampling_macs_branches_and_no_skip():
    cfg, T = XL256, 20
    total = torch.full((T, cfg.depth, 2), 4, dtype=torch.long)
    none = LazyStats(torch.zeros_like(total), total)
    assert sampling_macs(cfg, T, none) == pytest.approx(T * forward_macs(cfg) + T * gate_macs(cfg))
    skipped = torch.zeros_like(total)
    skipped[3, :, 0] = 4  # all attention modules of one step, all rows
    skipped[5, 2, 1] = 2  # half the rows of one FFN
    got = sampling_macs(cfg, T, LazyStats(skipped, total))
    m = module_macs(cfg)
    expected = T * forward_macs(cfg) - cfg.depth * m["attn"] - 0.5 * m["mlp"] + T * gate_macs(cfg)
    assert got == pytest.approx(expected, rel=1e-12)
    assert sampling_macs(cfg, T) == float(T * forward_macs(cfg))


@pytest.mark.parametrize("overrides", [dict(), dict(in_channels=4, learn_sigma=True, patch_size=4, input_size=16)])
def test_forward_macs_matches_hooked_count(overrides):
    """Count Linear and Conv MACs of a real forward of ONE image with hooks, as pytorch-OpCounter does."""
    model = tiny_model(**overrides)
    cfg = model.config
    macs = []

    def linear_hook(mod, inp, out):
        macs.append(out.numel() * mod.in_features)

    def conv_hook(mod, inp, out):
        macs.append(out.numel() * mod.in_channels * mod.kernel_size[0] * mod.kernel_size[1])

    hooks = [mod.register_forward_hook(linear_hook if isinstance(mod, nn.Linear) else conv_hook)
             for mod in model.modules() if isinstance(mod, (nn.Linear, nn.Conv2d))]
    try:
        with torch.no_grad():
            model(torch.randn(1, cfg.in_channels, cfg.input_size, cfg.input_size), torch.tensor([10]),
                  torch.tensor([1]))
    finally:
        for h in hooks:
            h.remove()
    assert sum(macs) == forward_macs(cfg)
    m = module_macs(cfg)
    block = model.blocks[0]
    assert m["attn"] == cfg.num_tokens * (block.attn.qkv.weight.numel() + block.attn.proj.weight.numel())
    assert m["mlp"] == cfg.num_tokens * (block.mlp.fc1.weight.numel() + block.mlp.fc2.weight.numel())


def test_config_for_image_size_divides_by_the_latent_factor():
    from lazydit.errors import OptionRangeError
    from lazydit.models.dit import config_for_image_size, image_per_latent

    assert image_per_latent("DiT-XL/2") == 8 and image_per_latent("DiT-FMNIST-Latent") == 2
    assert image_per_latent("DiT-FMNIST") == 1  # pixel model
    assert config_for_image_size("DiT-XL/2", 512) == XL512  # 512 px = 64 latents of SD-VAE
    assert config_for_image_size("DiT-XL/2") == XL256
    assert config_for_image_size("DiT-FMNIST-Latent", 56).input_size == 28
    assert config_for_image_size("DiT-FMNIST", 56).input_size == 56
    for name, size, multiple in (("DiT-XL/2", 260, 16), ("DiT-FMNIST-Latent", 30, 4), ("DiT-FMNIST", 30, 4),
                                 ("DiT-XL/2", 0, 16)):
        with pytest.raises(OptionRangeError, match=f"size {size} does not fit {name}: image sizes are multiples "
                                                   f"of {multiple} "):
            config_for_image_size(name, size)
