"""The ImageNet-scale CLI paths on tiny random-weight files in the real formats (a flat DiT .pt, a Large-DiT
folder, an AutoencoderKL folder, an image folder): extract-latents -> train-gates (resumable) -> sample --vae."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from lazydit import create_model
from lazydit.cli import main
from lazydit.lazy import LazyGates

pytest.importorskip("diffusers")

DIT_CONFIG = "depth=2,hidden_size=32,num_heads=2,num_classes=4"


def run_json(capsys, *argv):
    capsys.readouterr()
    main([*map(str, argv), "--json", "--device", "cpu"])
    return json.loads(capsys.readouterr().out)


def fails(*argv):
    with pytest.raises(SystemExit) as e:
        main([*map(str, argv), "--device", "cpu"])
    return str(e.value)


def perturbed(model, seed):
    """Random weights everywhere (the zero-initialised adaLN and final layer too), eval mode."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model.eval()


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Tiny files: DiT flat state dict (.pt), Large-DiT folder, AutoencoderKL folder (x2), 3-class image folder."""
    from diffusers.models import AutoencoderKL

    from lazydit.models.large_dit import LargeDiT, LargeDiTConfig, save_large_dit

    root = tmp_path_factory.mktemp("imagenet")
    torch.manual_seed(0)
    dit = perturbed(create_model("DiT-S/2", input_size=8, depth=2, hidden_size=32, num_heads=2, num_classes=4), 0)
    torch.save(dit.state_dict(), root / "tiny-dit.pt")  # as the released DiT-XL-2-256x256.pt: no config inside
    large = LargeDiT(LargeDiTConfig(input_size=8, hidden_size=64, depth=2, num_heads=4, num_classes=4, qk_norm=True))
    save_large_dit(perturbed(large, 1), root / "large-dit")
    torch.manual_seed(2)
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), layers_per_block=1,
                        latent_channels=4, norm_num_groups=4, sample_size=16)  # one 2x downsampling: 16 px <-> 8
    vae.save_pretrained(root / "vae")
    rng = np.random.default_rng(0)
    for c in ("n01", "n02", "n03"):
        (root / "train" / c).mkdir(parents=True)
        for i in range(4):
            arr = rng.integers(0, 256, (20 + i, 24 + 2 * i, 3), dtype=np.uint8)
            Image.fromarray(arr).save(root / "train" / c / f"img{i}.png")
    return root


@pytest.fixture(scope="module")
def latents(files, tmp_path_factory):
    out = tmp_path_factory.mktemp("lat") / "latents"
    main(["extract-latents", "--data", str(files / "train"), "--vae", str(files / "vae"), "--image-size", "16",
          "--out", str(out), "--batch-size", "5", "--workers", "0", "--device", "cpu", "--json"])
    return out


def dit_args(files):
    return ["--model", files / "tiny-dit.pt", "--model-name", "DiT-S/2", "--image-size", "64",
            "--model-config", DIT_CONFIG]


def test_extract_latents_writes_a_complete_folder(latents, files, capsys):
    meta = json.loads((latents / "meta.json").read_text())
    assert meta["shape"] == [12, 1, 4, 8, 8] and meta["flip"] == "random" and meta["image_size"] == 16
    assert list(np.load(latents / "labels.npy")) == [0] * 4 + [1] * 4 + [2] * 4
    again = run_json(capsys, "extract-latents", "--data", files / "train", "--vae", files / "vae", "--image-size", 16,
                     "--out", latents, "--batch-size", 5, "--workers", 0)  # finished: returns at once
    assert again == {"latents": str(latents), "images": 12, "classes": 3, "shape": [12, 1, 4, 8, 8]}


def test_train_gates_from_latents_end_to_end_resumable(latents, files, tmp_path, capsys):
    common = ["train-gates", *dit_args(files), "--latents", latents, "--steps", 10, "--batch-size", 4,
              "--rho", 0.05, "--lr", 1e-2, "--ckpt-every", 2]
    a = run_json(capsys, *common, "--iters", 4, "--out", tmp_path / "a")
    half = run_json(capsys, *common, "--iters", 2, "--out", tmp_path / "b")  # "interrupted" after 2 iterations
    g_half = LazyGates.load(half["gates"])
    b = run_json(capsys, *common, "--iters", 4, "--out", tmp_path / "b", "--resume")
    ga, gb = LazyGates.load(a["gates"]), LazyGates.load(b["gates"])
    assert torch.equal(ga.weight, gb.weight) and ga.steps == 10 and ga.depth == 2
    assert not torch.equal(ga.weight, g_half.weight)  # the resumed half did train
    assert ga.meta["latents"] == str(latents) and ga.meta["training"]["final_iter"] == 4
    # the gates drive lazy sampling of the same model, decoded by the VAE
    [row] = run_json(capsys, "sample", *dit_args(files), "--vae", files / "vae", "--gates", a["gates"],
                     "--steps", 10, "--labels", "0,1,2", "--out", tmp_path / "lazy.npz")
    assert row["sampler"] == "Lazy-10" and np.load(tmp_path / "lazy.npz")["arr_0"].shape == (3, 16, 16, 3)


def test_train_gates_from_images_with_vae_resumes(files, tmp_path, capsys):
    common = ["train-gates", *dit_args(files), "--data", files / "train", "--vae", files / "vae", "--steps", 6,
              "--batch-size", 4, "--lr", 1e-2, "--ckpt-every", 1, "--workers", 0]
    a = run_json(capsys, *common, "--iters", 2, "--out", tmp_path / "a")
    run_json(capsys, *common, "--iters", 1, "--out", tmp_path / "b")
    b = run_json(capsys, *common, "--iters", 2, "--out", tmp_path / "b", "--resume")
    assert torch.equal(LazyGates.load(a["gates"]).weight, LazyGates.load(b["gates"]).weight)


def test_sample_decodes_latents_to_png_and_npz(files, tmp_path, capsys):
    [row] = run_json(capsys, "sample", *dit_args(files), "--vae", files / "vae", "--steps", 4, "--per-class", 1,
                     "--out", tmp_path / "grid.png")
    with Image.open(tmp_path / "grid.png") as im:  # 4 classes in a row of 16 px images, 2 px padding, scale 3
        assert im.mode == "RGB" and im.size == (3 * (4 * 18 + 2), 3 * 20)
    run_json(capsys, "sample", *dit_args(files), "--vae", files / "vae", "--steps", 4, "--labels", "3,1",
             "--out", tmp_path / "s.npz")
    with np.load(tmp_path / "s.npz") as f:
        assert f["arr_0"].shape == (2, 16, 16, 3) and f["arr_0"].dtype == np.uint8
        assert list(f["arr_1"]) == [3, 1] and f["arr_0"].std() > 0
    res = run_json(capsys, "sample-ddp", *dit_args(files), "--vae", files / "vae", "--steps", 4, "--num-samples", 5,
                   "--batch-size", 3, "--out", tmp_path / "ddp.npz")
    assert res["num_samples"] == 5
    with np.load(tmp_path / "ddp.npz") as f:
        assert f["arr_0"].shape == (5, 16, 16, 3) and f["arr_0"].dtype == np.uint8


def test_large_dit_folder_trains_and_samples(files, latents, tmp_path, capsys):
    folder = files / "large-dit"
    for model in (folder, folder / "model_args.pth", folder / "consolidated_ema.00-of-01.pth"):
        [row] = run_json(capsys, "sample", "--model", model, "--vae", files / "vae", "--steps", 4, "--labels", "0,2",
                         "--out", tmp_path / "plain.npz")
        assert row["sampler"] == "DDIM-4" and row["lazy_ratio"] == 0
    plain = np.load(tmp_path / "plain.npz")["arr_0"]
    assert plain.shape == (2, 16, 16, 3)
    g = run_json(capsys, "train-gates", "--model", folder, "--latents", latents, "--steps", 4, "--iters", 2,
                 "--batch-size", 4, "--out", tmp_path / "g")
    [row] = run_json(capsys, "sample", "--model", folder, "--vae", files / "vae", "--steps", 4, "--labels", "0,2",
                     "--gates", g["gates"], "--threshold", 0.9, "--out", tmp_path / "lazy.npz")
    assert row["sampler"] == "Lazy-4" and row["lazy_ratio"] > 0
    assert np.load(tmp_path / "lazy.npz")["arr_0"].shape == (2, 16, 16, 3)
    assert "not 512px" in fails("sample", "--model", folder, "--image-size", 512, "--vae", files / "vae")


def test_clear_errors(files, latents, tmp_path):
    msg = fails("sample", "--model", tmp_path / "nowhere.pt")
    assert "no such file or folder" in msg and "Large-DiT" in msg
    (tmp_path / "empty").mkdir()
    assert "without a Large-DiT checkpoint" in fails("sample", "--model", tmp_path / "empty")
    (tmp_path / "notes.txt").write_text("x")
    assert "not a model file" in fails("sample", "--model", tmp_path / "notes.txt")
    assert "--model-name" in fails("sample", "--model", files / "tiny-dit.pt")
    assert "--vae VAE_FOLDER" in fails("sample", *dit_args(files), "--steps", 4)
    assert "--vae VAE_FOLDER" in fails("sample-ddp", *dit_args(files), "--steps", 4, "--out", tmp_path / "x.npz")
    assert "--latents LATENT_DIR" in fails("train-gates", *dit_args(files), "--steps", 4)
    assert "latents, but the model takes 4x14x14" in fails("train-gates", "--latents", latents, "--steps", 4)  # the default


def test_train_gates_from_latents_under_torchrun_shards_per_rank(files, latents, tmp_path, capsys):
    """2 gloo processes, each a LatentSampler shard of batch 2, = one process on the two shards side by side."""
    from lazydit.models.checkpoint import load_dit
    from lazydit.data.imagefolder import LatentSampler
    from lazydit.training.gates import GateTrainConfig, train_gates

    common = ["train-gates", *dit_args(files), "--latents", latents, "--steps", 10, "--batch-size", 4, "--rho", 0.05,
              "--lr", 1e-2, "--iters", 3, "--seed", 1, "--out", tmp_path / "ddp", "--device", "cpu"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone", "-m",
           "lazydit.cli", *map(str, common), "--json"]
    proc = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    ddp = LazyGates.load(tmp_path / "ddp" / "gates.safetensors")
    assert ddp.meta["training"]["world_size"] == 2
    ck = torch.load(tmp_path / "ddp" / "checkpoint.pt", weights_only=False)
    assert [s["pos"] for s in ck["data_ranks"]] == [6, 6]  # 3 batches of 2 from each rank's 6-latent shard

    class SideBySide:  # the global batch: rank 0's rows, then rank 1's
        def __init__(self):
            self.ranks = [LatentSampler(latents, 2, seed=1, rank=r, world_size=2) for r in range(2)]

        def __next__(self):
            (z0, y0), (z1, y1) = (next(s) for s in self.ranks)
            return torch.cat([z0, z1]), torch.cat([y0, y1])

    model = load_dit(files / "tiny-dit.pt", "DiT-S/2", input_size=8, depth=2, hidden_size=32, num_heads=2,
                     num_classes=4)
    single = train_gates(model, SideBySide(), GateTrainConfig(steps=10, iters=3, batch_size=4, lr=1e-2, rho_attn=0.05,
                                                              rho_mlp=0.05, seed=1), progress=False)
    torch.testing.assert_close(ddp.weight, single.weight.detach(), rtol=1e-4, atol=1e-6)
    # per-rank data states: a 2-process checkpoint does not resume in one process
    common[common.index("--iters") + 1] = 5
    assert "resume with 2 process(es)" in fails(*common, "--resume")


def test_released_file_name_gives_model_name_and_size(files, tmp_path, capsys):
    import shutil

    released = tmp_path / "DiT-S-2-64x64.pt"  # as DiT-XL-2-256x256.pt: DiT-S/2, latent 64 / 8 = 8
    shutil.copy(files / "tiny-dit.pt", released)
    [row] = run_json(capsys, "sample", "--model", released, "--model-config", DIT_CONFIG, "--vae", files / "vae",
                     "--steps", 2, "--labels", "1", "--out", tmp_path / "r.npz")
    assert np.load(tmp_path / "r.npz")["arr_0"].shape == (1, 16, 16, 3)
    assert "mis-shaped" in fails("sample", "--model", released, "--model-config", DIT_CONFIG, "--image-size", 128,
                                 "--vae", files / "vae")
