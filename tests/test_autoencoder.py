"""The Fashion-MNIST autoencoder and latent DiTs that name it: round trip, strict loading, decoding wherever samples
become images, latent pretraining and its resume, gates that tell a latent model from the pixel one."""

from pathlib import Path

import numpy as np
import pytest
import torch

from lazydit.assets import default_autoencoder
from lazydit.data.vae import decode, decoder_for, own_decoder
from lazydit.errors import CheckpointError, GateMismatchError, UsageError
from lazydit.models.autoencoder import AutoencoderConfig, TinyAutoencoder, load_autoencoder, save_autoencoder
from lazydit.evaluation.driver import EvalConfig, generate
from lazydit.lazy import LazyGates
from lazydit.models.checkpoint import load_dit, save_model
from lazydit.models.dit import create_model
from lazydit.training.autoencoder import AutoencoderTrainConfig, train_autoencoder
from lazydit.training.pretrain import PretrainConfig, pretrain

TEST100 = Path(__file__).parent / "data" / "fmnist_test100.npz"  # 10 test-split images per class
# The shipped autoencoder's reconstruction error on those 100 images (posterior mean), per pixel in [-1, 1]:
# measured 0.0038 (PSNR 30.2 dB; 0.0039 with posterior noise); the bound leaves room for kernel rounding only.
ROUND_TRIP_MSE = 0.005


def test_shipped_autoencoder_round_trips_real_images():
    ae = default_autoencoder()
    x = torch.from_numpy(np.load(TEST100)["images"]).float().div(127.5).sub(1).unsqueeze(1)
    z = ae.encode(x, sample=False)
    assert z.shape == (100, 4, 14, 14)
    assert 0.8 < float(z.std()) < 1.2  # the scale makes latents about unit std, as DiT expects
    rec = decode(ae, z)
    assert float((rec - x).pow(2).mean()) < ROUND_TRIP_MSE
    sampled = decode(ae, ae.encode(x, generator=torch.Generator().manual_seed(0)))  # posterior noise: still close
    assert float((sampled - x).pow(2).mean()) < ROUND_TRIP_MSE


def _latent_model(tmp_path, ae_name="ae.safetensors"):
    """A tiny latent DiT saved beside a tiny autoencoder its file names."""
    torch.manual_seed(0)
    ae = TinyAutoencoder(AutoencoderConfig(width=8), scale=0.5)
    save_autoencoder(ae, tmp_path / ae_name)
    model = create_model("DiT-S/2", depth=1, hidden_size=32, num_heads=2, input_size=14, in_channels=4,
                         num_classes=10, learn_sigma=False)
    save_model(model, tmp_path / "m.safetensors", extra={"autoencoder": ae_name})
    return tmp_path / "m.safetensors", ae


def test_a_latent_model_decodes_with_the_autoencoder_it_names(tmp_path):
    path, ae = _latent_model(tmp_path)
    model = load_dit(path)
    assert model.autoencoder_file == tmp_path / "ae.safetensors"
    z = torch.randn(2, 4, 14, 14)
    assert torch.equal(own_decoder(model)(z), ae.eval().decode(z))
    assert isinstance(decoder_for(model), TinyAutoencoder)
    g = generate(model, EvalConfig(steps=2, num_samples=4, batch_size=2, cfg_scale=1.0), progress=False)
    assert g["images"].shape == (4, 28, 28, 1)  # images, not latents, reach the evaluator
    (tmp_path / "ae.safetensors").unlink()
    with pytest.raises(CheckpointError, match="names its autoencoder"):
        decoder_for(load_dit(path))


def test_gates_of_a_latent_model_refuse_the_pixel_model_of_the_same_size():
    latent = create_model("DiT-FMNIST-Latent")
    pixel = create_model("DiT-FMNIST")  # same depth and width: only the stored config tells them apart
    gates = LazyGates.for_model(latent, steps=10)
    gates.check_model(latent)
    with pytest.raises(GateMismatchError, match="another model config"):
        gates.check_model(pixel)


def test_autoencoder_save_load_is_exact_and_strict(tmp_path):
    torch.manual_seed(0)
    ae = TinyAutoencoder(AutoencoderConfig(width=8), scale=0.7).eval()
    save_autoencoder(ae, tmp_path / "ae.safetensors")
    back = load_autoencoder(tmp_path / "ae.safetensors")
    x = torch.rand(3, 1, 28, 28) * 2 - 1
    assert back.scale == 0.7
    assert torch.equal(back.decode(back.encode(x, sample=False)), ae.decode(ae.encode(x, sample=False)))
    other = TinyAutoencoder(AutoencoderConfig(width=16))
    from safetensors.torch import load_file, save_file
    from safetensors import safe_open

    with safe_open(str(tmp_path / "ae.safetensors"), "pt") as f:
        meta = f.metadata()
    save_file({k: v.contiguous() for k, v in other.state_dict().items()}, str(tmp_path / "bad.safetensors"),
              metadata=meta)
    with pytest.raises(CheckpointError, match="mis-shaped"):
        load_autoencoder(tmp_path / "bad.safetensors")
    save_file(load_file(str(tmp_path / "ae.safetensors")), str(tmp_path / "nometa.safetensors"))
    with pytest.raises(CheckpointError, match="not a lazydit autoencoder"):
        load_autoencoder(tmp_path / "nometa.safetensors")


def test_posterior_sampling_and_scale():
    torch.manual_seed(0)
    ae = TinyAutoencoder(AutoencoderConfig(width=8), scale=2.0).eval()
    x = torch.rand(2, 1, 28, 28) * 2 - 1
    mean, logvar = ae.posterior(x)
    assert torch.allclose(ae.encode(x, sample=False), 2.0 * mean)
    g = lambda: torch.Generator().manual_seed(3)  # noqa: E731
    z = ae.encode(x, generator=g())
    noise = torch.randn(mean.shape, generator=g())
    assert torch.allclose(z, 2.0 * (mean + (0.5 * logvar).exp() * noise), atol=1e-6)
    assert torch.allclose(ae.decode(z, clamp=False), ae.decoder(z / 2.0))


def test_latent_pretraining_names_its_decoder(tmp_path, fake_fmnist):
    ae_path = train_autoencoder(AutoencoderTrainConfig(data=str(fake_fmnist), out=str(tmp_path / "ae"), width=8,
                                                       iters=3, batch_size=8), progress=False)
    base = dict(data=str(fake_fmnist), batch_size=4, ckpt_every=2, warmup=2, preview=False,
                model="DiT-FMNIST-Latent", autoencoder=str(ae_path))
    path = pretrain(PretrainConfig(**base, out=str(tmp_path / "dit"), iters=2), progress=False)
    model = load_dit(path)
    assert model.autoencoder_file == tmp_path / "dit" / "autoencoder.safetensors"
    z = torch.randn(2, 4, 14, 14)
    assert own_decoder(model)(z).shape == (2, 1, 28, 28)
    with pytest.raises(UsageError, match="--autoencoder"):  # a latent model needs its autoencoder
        pretrain(PretrainConfig(**{**base, "autoencoder": None}, out=str(tmp_path / "x"), iters=1), progress=False)


def test_autoencoder_training_resumes_exactly(tmp_path, fake_fmnist):
    base = dict(data=str(fake_fmnist), width=8, batch_size=8, ckpt_every=2)
    full = load_autoencoder(train_autoencoder(AutoencoderTrainConfig(**base, out=str(tmp_path / "a"), iters=4),
                                              progress=False))
    cut = AutoencoderTrainConfig(**base, out=str(tmp_path / "b"), iters=4, max_minutes=0.0)  # stops after step 1
    train_autoencoder(cut, progress=False)
    resumed = load_autoencoder(train_autoencoder(
        AutoencoderTrainConfig(**base, out=str(tmp_path / "b"), iters=4, resume=True), progress=False))
    for (k, a), (_, b) in zip(full.state_dict().items(), resumed.state_dict().items()):
        assert torch.equal(a, b), k
    assert full.scale == resumed.scale


def test_cli_trains_an_autoencoder_and_costs_the_latent_model(tmp_path, fake_fmnist, capsys):
    import json

    from lazydit.cli import main

    main(["train-autoencoder", "--data", str(fake_fmnist), "--out", str(tmp_path / "ae"), "--width", "8",
          "--iters", "2", "--batch-size", "8", "--json"])
    out = json.loads(capsys.readouterr().out)["autoencoder"]
    assert load_autoencoder(out).config.latent_channels == 4
    main(["cost", "--model", "DiT-FMNIST-Latent", "--steps", "50", "--json"])
    row = json.loads(capsys.readouterr().out)[0]
    # 4x14x14 latents of 28x28 images, patch 2: the same 49 tokens of 16 values as the pixel model's patch 4
    assert row["image_size"] == 28 and row["tmacs"] == 0.006592
