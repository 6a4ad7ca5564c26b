import sys

import pytest
import torch

from lazydit.errors import CheckpointError
from lazydit.data.vae import SCALE, decode, encode, load_vae, posterior

diffusers = pytest.importorskip("diffusers")


@pytest.fixture(scope="module")
def vae_dir(tmp_path_factory):
    """A tiny AutoencoderKL (one 2x downsampling) saved with save_pretrained, like sd-vae-ft-ema's folder."""
    from diffusers.models import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), layers_per_block=1,
                        latent_channels=4, norm_num_groups=4, sample_size=16)
    folder = tmp_path_factory.mktemp("vae") / "sd-vae-ft-ema"
    vae.save_pretrained(folder)
    return folder


def test_load_strict_and_frozen(vae_dir):
    vae = load_vae(vae_dir)
    assert not vae.training and not any(p.requires_grad for p in vae.parameters())
    assert vae.config.latent_channels == 4
    assert load_vae(vae_dir, dtype=torch.bfloat16).dtype == torch.bfloat16


def test_encode_decode_scaling(vae_dir):
    vae = load_vae(vae_dir)
    torch.manual_seed(1)
    x = torch.rand(5, 3, 16, 16) * 2 - 1
    z = encode(vae, x, sample=False, batch_size=2)
    assert z.shape == (5, 4, 8, 8) and z.dtype == torch.float32
    with torch.no_grad():
        ref = vae.encode(x).latent_dist
        assert torch.allclose(z, ref.mean * SCALE, atol=1e-6)
        img = decode(vae, z, batch_size=3, clamp=False)
        assert img.shape == (5, 3, 16, 16)
        assert torch.allclose(img, vae.decode(ref.mean).sample, atol=1e-5)
    assert decode(vae, z).abs().max() <= 1
    mean, std = posterior(vae, x, batch_size=4)
    assert torch.allclose(mean, z, atol=1e-6) and torch.allclose(std, ref.std * SCALE, atol=1e-6)


def test_sampling_is_seeded(vae_dir):
    vae = load_vae(vae_dir)
    x = torch.rand(3, 3, 16, 16) * 2 - 1
    a = encode(vae, x, generator=torch.Generator().manual_seed(0))
    b = encode(vae, x, generator=torch.Generator().manual_seed(0))
    c = encode(vae, x, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b) and not torch.equal(a, c)
    mean = encode(vae, x, sample=False)
    assert not torch.allclose(a, mean)


def test_folder_errors(vae_dir, tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        load_vae(tmp_path / "missing")
    (tmp_path / "nothing").mkdir()
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_vae(tmp_path / "nothing")
    half = tmp_path / "truncated"
    half.mkdir()
    (half / "config.json").write_text((vae_dir / "config.json").read_text())
    raw = (vae_dir / "diffusion_pytorch_model.safetensors").read_bytes()
    (half / "diffusion_pytorch_model.safetensors").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(CheckpointError, match="cannot be loaded"):
        load_vae(half)
    # weights with a key missing and a foreign one: diffusers would only warn
    from safetensors.torch import load_file, save_file

    state = load_file(str(vae_dir / "diffusion_pytorch_model.safetensors"))
    del state["decoder.conv_norm_out.weight"]
    state["extra.weight"] = torch.zeros(1)
    save_file(state, str(half / "diffusion_pytorch_model.safetensors"))
    with pytest.raises(CheckpointError, match="(?s)missing keys: .*conv_norm_out.*unexpected keys: .*extra"):
        load_vae(half)
    # a pipeline folder with the VAE in vae/
    pipe = tmp_path / "pipeline"
    (pipe / "vae").mkdir(parents=True)
    for f in vae_dir.iterdir():
        (pipe / "vae" / f.name).write_bytes(f.read_bytes())
    assert load_vae(pipe).config.latent_channels == 4


def test_missing_diffusers_message(vae_dir, monkeypatch):
    monkeypatch.setitem(sys.modules, "diffusers", None)
    monkeypatch.setitem(sys.modules, "diffusers.models", None)
    with pytest.raises(ImportError, match=r"lazydit\[imagenet\]"):
        load_vae(vae_dir)
