import argparse

import pytest
import torch

from lazydit.errors import CheckpointError
from lazydit.models.registry import block_spec
from lazydit.models.large_dit import (
    EMA_FILE,
    LARGE_DIT_MODELS,
    LargeDiT,
    LargeDiTConfig,
    apply_rotary_emb,
    create_large_dit,
    large_dit_config,
    load_large_dit,
    parameter_count,
    precompute_freqs_cis,
    save_large_dit,
)

# A tiny model in the reference's own terms: the zoo name plus the constructor arguments that shrink it.
TINY_ARGS = dict(model="DiT_Llama_600M_patch2", image_size=64, num_classes=5, qk_norm=True,
                 dim=64, n_layers=2, n_heads=4)
TINY = dict(hidden_size=64, depth=2, num_heads=4, input_size=8, num_classes=5, qk_norm=True)


def randomised(model, seed=0):
    """Perturb every parameter so that zero-initialised parts matter."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model.eval()


def write_release(folder, model, args):
    """The released layout, written the way the reference train.py does: torch.save of a state dict and a Namespace."""
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), folder / EMA_FILE)
    torch.save(argparse.Namespace(**args), folder / "model_args.pth")
    return folder


def test_reference_keys_and_shapes():
    model = create_large_dit("DiT-Llama-600M/2", **{k: v for k, v in TINY.items()})
    keys = set(model.state_dict())
    for k in ("x_embedder.weight", "x_embedder.bias", "t_embedder.mlp.0.weight", "t_embedder.mlp.2.bias",
              "y_embedder.embedding_table.weight", "layers.0.attention.wq.weight", "layers.0.attention.wo.weight",
              "layers.0.attention.q_norm.weight", "layers.0.attention.k_norm.bias", "layers.1.feed_forward.w3.weight",
              "layers.1.attention_norm.weight", "layers.1.ffn_norm.weight", "layers.1.adaLN_modulation.1.bias",
              "final_layer.linear.weight", "final_layer.adaLN_modulation.1.weight"):
        assert k in keys, k
    assert not any("wq.bias" in k or "w1.bias" in k or "freqs" in k for k in keys)
    assert model.layers[0].feed_forward.w1.weight.shape == (256, 64)  # 256 * ceil(floor(8*64/3) / 256)
    assert model.layers[0].adaLN_modulation[1].weight.shape == (6 * 64, 64)
    assert model.x_embedder.weight.shape == (64, 2 * 2 * 4)
    assert model.blocks is model.layers
    assert block_spec(model.layers[0]).branches == ("attention", "feed_forward")


@pytest.mark.parametrize("name,hidden", [("DiT-Llama-600M/2", 4096), ("DiT-Llama-3B/2", 8192),
                                         ("DiT-Llama-7B/2", 11008)])
def test_zoo_ffn_width_and_cond(name, hidden):
    cfg = large_dit_config(name)
    assert cfg.ffn_hidden_size == hidden == 256 * -(-(8 * cfg.hidden_size // 3) // 256)
    assert cfg.cond_size == min(cfg.hidden_size, 1024)


def test_parameter_counts_on_meta():
    counts = {n: parameter_count(n) for n in LARGE_DIT_MODELS}
    assert counts == {"DiT-Llama-600M/2": 609_738_272, "DiT-Llama-3B/2": 4_237_430_816,
                      "DiT-Llama-7B/2": 7_293_295_648}
    assert parameter_count("DiT_Llama_7B_patch2", qk_norm=True) == counts["DiT-Llama-7B/2"] + 32 * 4 * 4096


def test_forward_shapes_and_zero_init():
    torch.manual_seed(0)
    model = LargeDiT(LargeDiTConfig(**TINY)).eval()
    x, t, y = torch.randn(3, 4, 8, 8), torch.tensor([0, 500, 999]), torch.tensor([0, 4, 5])
    out = model(x, t, y)
    assert out.shape == (3, 8, 8, 8)
    assert torch.count_nonzero(out) == 0  # adaLN-Zero: the final linear is zero at init
    h = model.x_embedder(model.patchify(x))  # ... and every block is the identity at init
    c = model.t_embedder(t) + model.y_embedder(y, False)
    assert torch.equal(model.layers[0](h, model.rotary(h.shape[1], h.device), c), h)
    randomised(model)
    out = model(x, t, y)
    assert out.abs().sum() > 0
    cfg = model.forward_with_cfg(torch.cat([x[:2], x[:2]]), t[:1].repeat(4), torch.tensor([1, 2, 5, 5]), 4.0)
    assert cfg.shape == (4, 8, 8, 8)
    assert torch.allclose(cfg[:2, :3], cfg[2:, :3])  # guidance on 3 of the 4 eps channels, as the reference
    with pytest.raises(ValueError, match="takes 8x8"):
        model(torch.randn(1, 4, 16, 16), t[:1], y[:1])


def test_patchify_roundtrip_order():
    model = LargeDiT(LargeDiTConfig(**{**TINY, "learn_sigma": False}))
    x = torch.randn(2, 4, 8, 8)
    tokens = model.patchify(x)  # (C, p, p) order
    assert tokens.shape == (2, 16, 16)
    assert torch.equal(tokens[0, 1, :4], x[0, 0, 0:2, 2:4].reshape(-1))
    back = tokens.view(2, 16, 4, 2, 2).permute(0, 1, 3, 4, 2).reshape(2, 16, 16)  # to (p, p, C)
    assert torch.equal(model.unpatchify(back), x)


def test_rope_sanity():
    f = precompute_freqs_cis(8, 16)
    assert f.shape == (16, 4) and f.dtype == torch.complex64
    assert torch.allclose(f.abs(), torch.ones(16, 4))
    assert torch.allclose(f[1].angle(), torch.tensor([1.0, 1e4 ** -0.25, 1e4 ** -0.5, 1e4 ** -0.75]), atol=1e-6)
    torch.manual_seed(0)
    q, k = torch.randn(1, 16, 2, 8), torch.randn(1, 16, 2, 8)
    q_same, k_same = q[:, :1].expand(1, 16, 2, 8), k[:, :1].expand(1, 16, 2, 8)  # same vectors at every position
    rq, rk = apply_rotary_emb(q_same, k_same, f)
    assert torch.allclose(rq[:, 0], q_same[:, 0]) and torch.allclose(rq.norm(dim=-1), q_same.norm(dim=-1))
    scores = torch.einsum("bmhd,bnhd->bhmn", rq, rk)  # depends on n - m only
    assert torch.allclose(scores[:, :, 2, 5], scores[:, :, 7, 10], atol=1e-5)
    assert not torch.allclose(scores[:, :, 2, 5], scores[:, :, 2, 6], atol=1e-3)
    # pairs (2i, 2i+1) rotate by m * theta_i
    m, i = 3, 1
    a, b = q_same[0, 0, 0, 2 * i], q_same[0, 0, 0, 2 * i + 1]
    ang = m * 1e4 ** (-2 * i / 8)
    assert torch.allclose(rq[0, m, 0, 2 * i], a * torch.cos(torch.tensor(ang)) - b * torch.sin(torch.tensor(ang)),
                          atol=1e-5)


def test_gqa_matches_repeated_heads():
    torch.manual_seed(0)
    cfg = LargeDiTConfig(**{**TINY, "num_kv_heads": 2, "qk_norm": False})
    model = randomised(LargeDiT(cfg))
    att = model.layers[0].attention
    assert att.wk.weight.shape == (32, 64)
    z = torch.randn(2, 16, 64)
    f = model.rotary(16, z.device)
    full = LargeDiT(LargeDiTConfig(**{**TINY, "qk_norm": False})).layers[0].attention
    with torch.no_grad():
        full.wq.weight.copy_(att.wq.weight)
        full.wo.weight.copy_(att.wo.weight)
        for name in ("wk", "wv"):  # kv head j serves query heads 2j, 2j+1
            w = getattr(att, name).weight.view(2, 1, 16, 64).expand(2, 2, 16, 64).reshape(64, 64)
            getattr(full, name).weight.copy_(w)
    assert torch.allclose(att(z, f), full(z, f), atol=1e-5)


def test_load_release_folder_strict(tmp_path):
    model = randomised(create_large_dit("DiT-Llama-600M/2", **TINY))
    folder = write_release(tmp_path / "ckpt", model, TINY_ARGS)
    loaded = load_large_dit(folder)
    assert loaded.config.hidden_size == 64 and loaded.config.input_size == 8 and loaded.config.qk_norm
    assert loaded.name == "DiT-Llama-600M/2" and not loaded.training
    x, t, y = torch.randn(2, 4, 8, 8), torch.tensor([10, 900]), torch.tensor([1, 3])
    assert torch.equal(loaded(x, t, y), model(x, t, y))
    # dict args, explicit file pair, and our own writer
    torch.save(dict(TINY_ARGS), folder / "model_args.pth")
    assert load_large_dit([folder / "model_args.pth", folder / EMA_FILE]).config.depth == 2
    save_large_dit(loaded, tmp_path / "ours")
    again = load_large_dit(tmp_path / "ours", dtype=torch.bfloat16)
    assert again.x_embedder.weight.dtype == torch.bfloat16
    assert torch.equal(again.x_embedder.weight, model.x_embedder.weight.to(torch.bfloat16))


def test_load_errors(tmp_path):
    model = randomised(create_large_dit("DiT-Llama-600M/2", **TINY))
    folder = write_release(tmp_path / "ckpt", model, TINY_ARGS)
    # args that do not fit the weights
    torch.save(argparse.Namespace(**{**TINY_ARGS, "qk_norm": False}), folder / "model_args.pth")
    with pytest.raises(CheckpointError, match="unexpected keys: .*q_norm"):
        load_large_dit(folder)
    wrong_size = {**TINY_ARGS, "model": "DiT_Llama_3B_patch2", "dim": None}
    torch.save(argparse.Namespace(**wrong_size), folder / "model_args.pth")
    with pytest.raises(CheckpointError, match="mis-shaped"):
        load_large_dit(folder)
    torch.save(argparse.Namespace(model="DiT-XL/2", image_size=256), folder / "model_args.pth")
    with pytest.raises(CheckpointError, match="not a Large-DiT"):
        load_large_dit(folder)
    torch.save({"lr": 1e-4}, folder / "model_args.pth")
    with pytest.raises(CheckpointError, match="training arguments"):
        load_large_dit(folder)
    # truncated or foreign weights
    torch.save(argparse.Namespace(**TINY_ARGS), folder / "model_args.pth")
    raw = (folder / EMA_FILE).read_bytes()
    (folder / EMA_FILE).write_bytes(raw[: len(raw) // 2])
    with pytest.raises(CheckpointError, match="cannot be read"):
        load_large_dit(folder)
    (folder / EMA_FILE).write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="cannot be read"):
        load_large_dit(folder)
    # missing pieces
    with pytest.raises(FileNotFoundError, match="not found"):
        load_large_dit(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="consolidated_ema"):
        load_large_dit(tmp_path / "empty")
    torch.save(model.state_dict(), tmp_path / "bare.pth")
    with pytest.raises(ValueError, match="pass the model name"):
        load_large_dit(tmp_path / "bare.pth")
    with pytest.raises(CheckpointError, match="mis-shaped"):
        load_large_dit(tmp_path / "bare.pth", name="DiT-Llama-600M/2")  # full-size config vs tiny weights
    tiny = {k: v for k, v in TINY.items()}
    assert load_large_dit(tmp_path / "bare.pth", name="DiT_Llama_600M_patch2", **tiny).config.depth == 2


def test_macs_match_linear_layers():
    """forward_macs counts every Linear of one forward of one image (weights x rows), as pytorch-OpCounter."""
    cfg = LargeDiTConfig(**{**TINY, "num_kv_heads": 2})
    model = LargeDiT(cfg)
    counted = []
    hooks = [m.register_forward_hook(lambda m, i, o: counted.append(i[0].numel() // i[0].shape[-1] * m.weight.numel()))
             for m in model.modules() if isinstance(m, torch.nn.Linear)]
    model(torch.randn(1, 4, 8, 8), torch.tensor([3]), torch.tensor([1]))
    for h in hooks:
        h.remove()
    from lazydit.models.cost import forward_macs
    assert forward_macs(cfg) == sum(counted)
