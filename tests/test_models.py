"""The DiT base model: reference names and shapes, zoo, embeddings, forward and guidance (docs/method-notes.md §1-2)."""

import math

import numpy as np
import pytest
import torch

from lazydit import create_model
from lazydit.models.dit import get_2d_sincos_pos_embed, model_config, timestep_embedding

from conftest import tiny_model


def assert_close(a, b, atol=1e-5, rtol=1.3e-6):
    """torch.allclose with a useful message (torch.testing.assert_close costs ~1.5 s of imports on first use)."""
    assert a.shape == b.shape, (a.shape, b.shape)
    assert a.dtype == b.dtype, (a.dtype, b.dtype)
    assert torch.allclose(a, b, atol=atol, rtol=rtol), f"max abs diff {(a - b).abs().max().item():.3g}"


def meta_model(name, **overrides):
    """create_model on the meta device (no memory, no real init).

    normal_ on a meta tensor goes through torch._refs, whose first use imports torch._dynamo (~3 s of CPU);
    the values of meta tensors do not exist anyway, so normal_ is a no-op on them while the model is built.
    """
    orig = torch.Tensor.normal_

    def normal_(self, *args, **kwargs):
        return self if self.is_meta else orig(self, *args, **kwargs)

    torch.Tensor.normal_ = normal_
    try:
        with torch.device("meta"):
            return create_model(name, **overrides)
    finally:
        torch.Tensor.normal_ = orig


@pytest.fixture(scope="module")
def xl_meta():
    m = meta_model("DiT-XL/2")
    assert m.pos_embed.is_meta
    return m


# ------------------------------------------------------------------ DiT-XL/2 layout (released checkpoint)


def test_xl2_parameter_count(xl_meta):
    assert sum(p.numel() for p in xl_meta.parameters()) == 675_129_632


XL2_KEYS = {
    "x_embedder.proj.weight": (1152, 4, 2, 2),
    "x_embedder.proj.bias": (1152,),
    "pos_embed": (1, 256, 1152),
    "t_embedder.mlp.0.weight": (1152, 256),
    "t_embedder.mlp.0.bias": (1152,),
    "t_embedder.mlp.2.weight": (1152, 1152),
    "t_embedder.mlp.2.bias": (1152,),
    "y_embedder.embedding_table.weight": (1001, 1152),
    "final_layer.linear.weight": (32, 1152),
    "final_layer.linear.bias": (32,),
    "final_layer.adaLN_modulation.1.weight": (2304, 1152),
    "final_layer.adaLN_modulation.1.bias": (2304,),
}
for _i in (0, 13, 27):
    XL2_KEYS.update({
        f"blocks.{_i}.attn.qkv.weight": (3456, 1152),
        f"blocks.{_i}.attn.qkv.bias": (3456,),
        f"blocks.{_i}.attn.proj.weight": (1152, 1152),
        f"blocks.{_i}.attn.proj.bias": (1152,),
        f"blocks.{_i}.mlp.fc1.weight": (4608, 1152),
        f"blocks.{_i}.mlp.fc1.bias": (4608,),
        f"blocks.{_i}.mlp.fc2.weight": (1152, 4608),
        f"blocks.{_i}.mlp.fc2.bias": (1152,),
        f"blocks.{_i}.adaLN_modulation.1.weight": (6912, 1152),
        f"blocks.{_i}.adaLN_modulation.1.bias": (6912,),
    })


def test_xl2_state_dict_layout(xl_meta):
    sd = xl_meta.state_dict()
    for k, shape in XL2_KEYS.items():
        assert k in sd, k
        assert tuple(sd[k].shape) == shape, k
    # x_embedder 2 + pos_embed 1 + t_embedder 4 + y_embedder 1 + 28 blocks x 10 + final_layer 4
    assert len(sd) == 2 + 1 + 4 + 1 + 28 * 10 + 4 == 292
    assert "blocks.28.attn.qkv.weight" not in sd
    # LayerNorms have no affine parameters: no keys at all
    assert not [k for k in sd if "norm" in k]
    # every block has exactly the 10 reference keys
    block0 = sorted(k[len("blocks.0."):] for k in sd if k.startswith("blocks.0."))
    assert block0 == sorted([
        "attn.qkv.weight", "attn.qkv.bias", "attn.proj.weight", "attn.proj.bias", "mlp.fc1.weight",
        "mlp.fc1.bias", "mlp.fc2.weight", "mlp.fc2.bias", "adaLN_modulation.1.weight", "adaLN_modulation.1.bias",
    ])


def test_pos_embed_is_frozen_but_saved(xl_meta):
    assert xl_meta.pos_embed.requires_grad is False
    assert "pos_embed" in xl_meta.state_dict()
    assert "pos_embed" in dict(xl_meta.named_parameters())


def test_xl2_512_pos_embed_shape():
    m = meta_model("DiT-XL/2", input_size=64)
    assert tuple(m.pos_embed.shape) == (1, 1024, 1152)
    assert tuple(m.state_dict()["x_embedder.proj.weight"].shape) == (1152, 4, 2, 2)


# ------------------------------------------------------------------ zoo


# Published by the DiT paper (Peebles & Xie, "Scalable Diffusion Models with Transformers", 2023), not read from the
# code: per size, Table 1's heads and Gflops of the 256x256 model at patch 4 (input 32, p = 4), and the parameter
# counts the paper reports (DiT-S 33M, B 130M, L 458M, XL 675M).
PUBLISHED = {"S": (6, 1.4, 33e6), "B": (12, 5.6, 130e6), "L": (16, 19.7, 458e6), "XL": (16, 29.1, 675e6)}


@pytest.mark.parametrize("size", sorted(PUBLISHED))
@pytest.mark.parametrize("patch", [2, 4, 8])
def test_zoo_entries_match_the_published_dit_sizes(size, patch):
    from lazydit.models.cost import forward_macs

    heads, gflops_p4, params = PUBLISHED[size]
    name = f"DiT-{size}/{patch}"
    cfg = model_config(name)
    assert cfg.num_heads == heads and cfg.patch_size == patch
    assert (cfg.input_size, cfg.in_channels, cfg.num_classes, cfg.learn_sigma) == (32, 4, 1000, True)  # 256 px
    assert cfg.out_channels == 8
    # the patch changes only the embedder and the final layer: every patch size has the published count (+- 1M)
    assert sum(p.numel() for p in meta_model(name).parameters()) == pytest.approx(params, abs=1e6)
    if patch == 4:  # the paper's "Gflops" count multiply-adds, attention matmuls included
        assert forward_macs(cfg, attention_matmuls=True) / 1e9 == pytest.approx(gflops_p4, rel=0.01)


def test_zoo_overrides():
    cfg = model_config("DiT-XL/2", input_size=64, learn_sigma=False)
    assert cfg.input_size == 64 and cfg.num_tokens == 1024 and cfg.out_channels == 4
    assert cfg.depth == 28


def test_unknown_model_and_field_raise():
    with pytest.raises(ValueError, match="unknown DiT model"):
        model_config("DiT-XXL/2")
    with pytest.raises(ValueError):
        create_model("DiT-S/3")
    with pytest.raises(ValueError, match="bogus"):
        model_config("DiT-S/2", bogus=1)
    with pytest.raises(ValueError):
        create_model("DiT-S/2", hidden=32)


# ------------------------------------------------------------------ embeddings


def _expected_pos_embed(D, grid):
    """The MAE/DiT 2-D table, written from the formula: the first half encodes the column index (grid[0] of
    meshgrid(w, h)), the second the row; each half is [sin(pos w_i), cos(pos w_i)], w_i = 1e4^(-i/(D/4))."""
    quarter = D // 4
    omega = 1.0 / 10000 ** (np.arange(quarter, dtype=np.float64) / quarter)
    table = np.zeros((grid * grid, D))
    for row in range(grid):
        for col in range(grid):
            m = row * grid + col
            table[m] = np.concatenate([np.sin(col * omega), np.cos(col * omega),
                                       np.sin(row * omega), np.cos(row * omega)])
    return table


def test_pos_embed_formula():
    model = create_model("DiT-S/2", depth=1, hidden_size=32, num_heads=2, input_size=8)  # grid 4, D 32
    pe = model.pos_embed.detach()[0].double().numpy()
    assert pe.shape == (16, 32)
    # position 0: sin parts zero, cos parts one, in both halves
    np.testing.assert_array_equal(pe[0], np.concatenate([np.zeros(8), np.ones(8), np.zeros(8), np.ones(8)]))
    # spot values: position 1 is (row 0, col 1), position 4 is (row 1, col 0)
    assert pe[1, 0] == pytest.approx(math.sin(1.0), abs=1e-6)
    assert pe[1, 8] == pytest.approx(math.cos(1.0), abs=1e-6)
    assert pe[1, 1] == pytest.approx(math.sin(10000 ** (-1 / 8)), abs=1e-6)
    assert pe[1, 16] == 0 and pe[1, 24] == 1
    assert pe[4, 0] == 0 and pe[4, 8] == 1
    assert pe[4, 16] == pytest.approx(math.sin(1.0), abs=1e-6)
    np.testing.assert_allclose(pe, _expected_pos_embed(32, 4), atol=1e-6)
    np.testing.assert_allclose(get_2d_sincos_pos_embed(64, 5), _expected_pos_embed(64, 5), atol=1e-12)


def test_timestep_embedding_cos_sin_order():
    t = torch.tensor([0, 1, 500, 999])
    emb = timestep_embedding(t, 256)
    assert emb.shape == (4, 256)
    half = 128
    freqs = np.exp(-math.log(1e4) * np.arange(half) / half)
    args = t.double().numpy()[:, None] * freqs[None]
    expected = np.concatenate([np.cos(args), np.sin(args)], axis=1)
    np.testing.assert_allclose(emb.double().numpy(), expected, atol=2e-4)
    # t = 0: cos half ones, sin half zeros
    assert torch.equal(emb[0], torch.cat([torch.ones(128), torch.zeros(128)]))
    assert emb[1, 0].item() == pytest.approx(math.cos(1.0), abs=1e-6)
    assert emb[1, 128].item() == pytest.approx(math.sin(1.0), abs=1e-6)
    assert emb[1, 1].item() == pytest.approx(math.cos(math.exp(-math.log(1e4) / 128)), abs=1e-6)


# ------------------------------------------------------------------ forward and guidance


@pytest.mark.parametrize("in_channels,learn_sigma,c_out", [(1, False, 1), (1, True, 2), (4, True, 8), (4, False, 4)])
def test_forward_shape(in_channels, learn_sigma, c_out):
    model = tiny_model(in_channels=in_channels, learn_sigma=learn_sigma)
    x = torch.randn(3, in_channels, 8, 8)
    with torch.no_grad():
        out = model(x, torch.tensor([0, 500, 999]), torch.tensor([0, 1, 4]))  # 4 = null label
    assert out.shape == (3, c_out, 8, 8)
    assert torch.isfinite(out).all()


def test_zero_init_final_layer_outputs_zero():
    model = create_model("DiT-S/2", depth=1, hidden_size=32, num_heads=2, input_size=8)
    with torch.no_grad():
        out = model(torch.randn(2, 4, 8, 8), torch.tensor([3, 700]), torch.tensor([1, 1000]))
    assert out.shape == (2, 8, 8, 8) and torch.count_nonzero(out) == 0


def _cfg_inputs(in_channels, B=2, num_classes=4):
    torch.manual_seed(5)
    half = torch.randn(B, in_channels, 8, 8)
    y = torch.arange(B) % num_classes
    x = torch.cat([half, torch.randn_like(half)])  # the second half is ignored by forward_with_cfg
    t = torch.full((2 * B,), 321)
    return half, x, t, torch.cat([y, torch.full_like(y, num_classes)])


def test_forward_with_cfg_latent_guides_first_three_channels():
    model = tiny_model(in_channels=4, learn_sigma=True)
    half, x, t, y = _cfg_inputs(4)
    w = 4.0
    with torch.no_grad():
        got = model.forward_with_cfg(x, t, y, w)
        full = model(torch.cat([half, half]), t, y)
    cond, uncond = full.chunk(2)
    assert got.shape == full.shape == (4, 8, 8, 8)
    guided = uncond[:, :3] + w * (cond[:, :3] - uncond[:, :3])
    assert_close(got[:2, :3], guided)
    assert_close(got[2:, :3], guided)
    # channel 3 and the variance channels pass through: the conditional rows keep the conditional output
    assert_close(got[:2, 3:], cond[:, 3:])
    # (reference: `rest` is taken over the whole batch, so the unconditional rows keep their own)
    assert_close(got[2:, 3:], uncond[:, 3:])
    assert not torch.allclose(got[:2, 3], guided[:, 0])  # channel 3 really is not guided


@pytest.mark.parametrize("learn_sigma", [False, True])
def test_forward_with_cfg_one_channel_guides_eps(learn_sigma):
    model = tiny_model(in_channels=1, learn_sigma=learn_sigma)
    half, x, t, y = _cfg_inputs(1)
    w = 2.5
    with torch.no_grad():
        got = model.forward_with_cfg(x, t, y, w)
        full = model(torch.cat([half, half]), t, y)
    cond, uncond = full.chunk(2)
    guided = uncond[:, :1] + w * (cond[:, :1] - uncond[:, :1])
    assert_close(got[:2, :1], guided)
    assert_close(got[2:, :1], guided)
    if learn_sigma:
        assert_close(got[:2, 1:], cond[:, 1:])
    assert got.shape[1] == (2 if learn_sigma else 1)


def test_forward_with_cfg_scale_one_is_conditional():
    model = tiny_model(in_channels=4, learn_sigma=True)
    half, x, t, y = _cfg_inputs(4)
    with torch.no_grad():
        got = model.forward_with_cfg(x, t, y, 1.0)
        cond = model(half, t[:2], y[:2])
    assert_close(got[:2, :3], cond[:, :3], atol=1e-5, rtol=1e-5)
