"""--resume never unpickles code: a checkpoint.pt dropped into a run folder is read with torch's safe loader, and every
file that is not a checkpoint of the command (code in a pickle, truncated, random bytes, another command's) ends in
one line; run folders and option clashes are refused before any data work; Fashion-MNIST latents are encoded once
and cached."""

import os
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from lazydit.cli import main
from lazydit.errors import CheckpointError
from lazydit.lazy import LazyGates
from lazydit.training.autoencoder import AutoencoderTrainConfig, train_autoencoder
from lazydit.training.gates import GateTrainConfig, train_gates
from lazydit.training.pretrain import PretrainConfig, pretrain
from lazydit.training.resume import load_checkpoint, plain

from test_cli_errors import run
from conftest import tiny_model

TRAINERS = ("train-gates", "pretrain", "train-autoencoder")




def one_line_error(code, err):
    assert code == 1 and "Traceback" not in err and "\n" not in err and err.startswith("error: "), err
    return err


def argv_of(cmd, data, out):
    """The tiniest run of each trainer on the fake Fashion-MNIST (train-gates: the embedded default model)."""
    data, out = str(data), str(out)
    if cmd == "train-gates":
        return ["train-gates", "--steps", "4", "--iters", "2", "--batch-size", "4", "--ckpt-every", "1", "--data",
                data, "--out", out, "--json"]
    if cmd == "pretrain":
        return ["pretrain", "--model-name", "DiT-FMNIST", "--iters", "2", "--batch-size", "4", "--ckpt-every", "1",
                "--warmup", "1", "--data", data, "--out", out, "--json"]
    return ["train-autoencoder", "--width", "8", "--iters", "2", "--batch-size", "8", "--ckpt-every", "1", "--data",
            data, "--out", out, "--json"]


def real_checkpoint(cmd, data, out: Path) -> Path:
    """A checkpoint.pt as `cmd` writes it (library calls: no preview grid)."""
    if cmd == "train-gates":
        cfg = GateTrainConfig(steps=4, iters=1, batch_size=4, ckpt_every=1, out=str(out))
        x = torch.randn(16, 1, 8, 8)
        from lazydit.data.fashion_mnist import InfiniteSampler

        train_gates(tiny_model(), InfiniteSampler(x, torch.arange(16) % 4, 4), cfg, progress=False)
    elif cmd == "pretrain":
        pretrain(PretrainConfig(data=str(data), out=str(out), iters=1, batch_size=4, ckpt_every=1, preview=False),
                 progress=False)
    else:
        train_autoencoder(AutoencoderTrainConfig(data=str(data), out=str(out), width=8, iters=1, batch_size=8,
                                                 ckpt_every=1), progress=False)
    return out / "checkpoint.pt"


class RunsShell:
    """Unpickled, this would run a shell command (os.system) that creates the marker file."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class OpensFile:
    """Unpickled, this would create the marker file (builtins.open(marker, 'w'))."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


# ---------------------------------------------------------------- (a) a pickle with code in it is never run


@pytest.mark.parametrize("cmd", TRAINERS)
@pytest.mark.parametrize("payload", [RunsShell, OpensFile])
def test_crafted_checkpoint_is_refused_without_running_it(cmd, payload, tmp_path, fake_fmnist, capsys):
    out, marker = tmp_path / "run", tmp_path / "pwned"
    out.mkdir()
    # keys of a real checkpoint, so that only the payload can make it fail
    torch.save({"gates": torch.zeros(1), "model": {}, "ema": {}, "opt": {}, "sampler": {}, "rng": torch.zeros(1),
                "gen": torch.zeros(1), "iter": 0, "step": 0, "log": [], "config": {}, "args": payload(marker)},
               out / "checkpoint.pt")
    err = one_line_error(*run(capsys, [*argv_of(cmd, fake_fmnist, out), "--resume"]))
    assert "holds objects other than tensors and plain data" in err and "refused for safety" in err, err
    assert str(out / "checkpoint.pt") in err and "delete it" in err
    assert not marker.exists()  # the payload never ran


def test_bare_pickle_with_code_is_refused_without_running_it(tmp_path):
    import pickle

    marker = tmp_path / "pwned"
    for protocol in (2, 4):
        (tmp_path / "checkpoint.pt").write_bytes(pickle.dumps({"iter": OpensFile(marker)}, protocol=protocol))
        with pytest.raises(CheckpointError, match="refused for safety"):
            load_checkpoint(tmp_path / "checkpoint.pt", "train-gates")
        assert not marker.exists()


# ---------------------------------------------------------------- (b) damaged and foreign files: one line


@pytest.mark.parametrize("cmd", TRAINERS)
def test_damaged_or_foreign_checkpoint_is_one_line(cmd, tmp_path, fake_fmnist, capsys):
    whole = real_checkpoint(cmd, fake_fmnist, tmp_path / "real").read_bytes()
    other = {"train-gates": "pretrain", "pretrain": "train-autoencoder", "train-autoencoder": "train-gates"}[cmd]
    foreign = real_checkpoint(other, fake_fmnist, tmp_path / "other").read_bytes()
    out = tmp_path / "run"
    out.mkdir()
    cases = {
        "truncated": (whole[: len(whole) // 2], "is truncated or corrupt"),
        "random": (np.random.default_rng(0).bytes(5000), "not a checkpoint torch can read safely"),
        "empty": (b"", "is truncated or corrupt"),
        "another command's": (foreign, f"is not a {cmd} checkpoint (`lazydit {other}` wrote it)"),
    }
    torch.save(tiny_model().state_dict(), tmp_path / "flat.pt")
    cases["a model's weights"] = ((tmp_path / "flat.pt").read_bytes(), f"is not a {cmd} checkpoint (it lacks ")
    for name, (content, expected) in cases.items():
        (out / "checkpoint.pt").write_bytes(content)
        err = one_line_error(*run(capsys, [*argv_of(cmd, fake_fmnist, out), "--resume"]))
        assert expected in err and str(out / "checkpoint.pt") in err, (name, err)
        assert (out / "checkpoint.pt").read_bytes() == content  # nothing overwritten


def test_checkpoint_of_another_model_is_one_line(tmp_path, capsys):
    """Keys right, shapes wrong (gates of a deeper model): a CheckpointError naming the file, not a traceback."""
    x = torch.randn(16, 1, 8, 8)
    from lazydit.data.fashion_mnist import InfiniteSampler

    cfg = GateTrainConfig(steps=4, iters=1, batch_size=4, ckpt_every=1, out=str(tmp_path / "run"))
    train_gates(tiny_model(depth=4), InfiniteSampler(x, torch.arange(16) % 4, 4), cfg, progress=False)
    with pytest.raises(CheckpointError, match="does not fit this run") as e:
        train_gates(tiny_model(), InfiniteSampler(x, torch.arange(16) % 4, 4),
                    GateTrainConfig(**{**cfg.__dict__, "iters": 2, "resume": True}), progress=False)
    assert "\n" not in str(e.value) and str(tmp_path / "run" / "checkpoint.pt") in str(e.value)


# ---------------------------------------------------------------- (c) what the trainers save loads safely, and resumes


@pytest.mark.parametrize("cmd", TRAINERS)
def test_saved_checkpoints_load_with_the_safe_loader(cmd, tmp_path, fake_fmnist):
    ckpt = real_checkpoint(cmd, fake_fmnist, tmp_path / "run")
    torch.load(ckpt, map_location="cpu", weights_only=True)  # raises on anything but tensors and plain data
    assert isinstance(load_checkpoint(ckpt, cmd), dict)


def test_paths_and_tuples_in_the_config_are_saved_plain_and_resume(tmp_path):
    from lazydit.data.fashion_mnist import InfiniteSampler

    def data():
        return InfiniteSampler(torch.randn(32, 1, 8, 8, generator=torch.Generator().manual_seed(0)),
                               torch.arange(32) % 4, 4, seed=1)

    base = dict(steps=4, batch_size=4, lr=1e-2, rho_attn=0.1, rho_mlp=0.1, ckpt_every=2, timesteps=(0, 300, 600, 900))
    full = train_gates(tiny_model(), data(), GateTrainConfig(**base, iters=4, out=tmp_path / "a"), progress=False)
    train_gates(tiny_model(), data(), GateTrainConfig(**base, iters=2, out=tmp_path / "b"), progress=False)
    state = torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=True)
    assert state["config"]["out"] == str(tmp_path / "b") and state["config"]["timesteps"] == (0, 300, 600, 900)
    resumed = train_gates(tiny_model(), data(), GateTrainConfig(**base, iters=4, out=tmp_path / "b", resume=True),
                          progress=False)
    assert torch.equal(full.weight, resumed.weight)  # bit-identical after the resume


def test_plain_refuses_what_the_safe_loader_would():
    assert plain({"p": Path("/x"), "n": np.int64(3), "t": (1, None)}) == {"p": "/x", "n": 3, "t": (1, None)}
    with pytest.raises(TypeError, match=r"checkpoint\['a'\] is a numpy.ndarray"):
        plain({"a": np.zeros(2)})


def test_cli_resume_of_the_default_model_is_bit_identical(tmp_path, fake_fmnist, capsys, monkeypatch):
    monkeypatch.setenv("LAZYDIT_CACHE", str(tmp_path / "cache"))
    common = ["train-gates", "--steps", "6", "--batch-size", "4", "--data", str(fake_fmnist), "--rho", "0.05",
              "--ckpt-every", "2", "--lr", "1e-2", "--json"]
    main([*common, "--iters", "4", "--out", str(tmp_path / "a")])
    main([*common, "--iters", "2", "--out", str(tmp_path / "b")])
    main([*common, "--iters", "4", "--out", str(tmp_path / "b"), "--resume"])
    capsys.readouterr()
    a, b = (LazyGates.load(tmp_path / d / "gates.safetensors") for d in "ab")
    assert torch.equal(a.weight, b.weight)


# ---------------------------------------------------------------- (d, e) refused before any data work


@pytest.fixture
def no_data_work(monkeypatch):
    """Every way to data (the model, Fashion-MNIST, the sources) fails the test if reached."""
    import lazydit.cli
    import lazydit.data.fashion_mnist
    import lazydit.data.sources
    import lazydit.training.autoencoder
    import lazydit.training.pretrain

    def reached(*a, **kw):
        raise AssertionError("data work started before the refusal")

    monkeypatch.setattr(lazydit.cli, "_model", reached)
    monkeypatch.setattr(lazydit.data.sources, "gate_training_data", reached)
    for mod in (lazydit.data.fashion_mnist, lazydit.training.pretrain, lazydit.training.autoencoder):
        monkeypatch.setattr(mod, "load_fashion_mnist", reached)


@pytest.mark.parametrize("cmd", TRAINERS)
def test_out_that_is_a_file_is_refused_before_data_work(cmd, tmp_path, no_data_work, capsys):
    (tmp_path / "file").write_text("x")
    t0 = time.time()
    err = one_line_error(*run(capsys, argv_of(cmd, tmp_path, tmp_path / "file")))
    assert f"--out {tmp_path / 'file'} is a file, not a run folder" in err
    err = one_line_error(*run(capsys, argv_of(cmd, tmp_path, tmp_path / "file" / "run")))
    assert f"{tmp_path / 'file'} is a file, not a folder" in err
    (tmp_path / "run" / "checkpoint.pt").mkdir(parents=True)
    err = one_line_error(*run(capsys, [*argv_of(cmd, tmp_path, tmp_path / "run"), "--resume"]))
    assert f"{tmp_path / 'run' / 'checkpoint.pt'} is not a file" in err
    assert time.time() - t0 < 10


@pytest.mark.parametrize("cmd", ["train-gates", "pretrain", "train-autoencoder"])
def test_resume_without_checkpoint_is_refused_before_data_work(cmd, tmp_path, no_data_work, capsys):
    t0 = time.time()
    err = one_line_error(*run(capsys, [*argv_of(cmd, tmp_path, tmp_path / "new"), "--resume"]))
    assert f"--resume: no checkpoint at {tmp_path / 'new' / 'checkpoint.pt'}: drop --resume" in err
    assert time.time() - t0 < 10 and not (tmp_path / "new").exists()


def test_rollout_without_every_step_is_refused_before_data_work(tmp_path, no_data_work, capsys):
    err = one_line_error(*run(capsys, [*argv_of("train-gates", tmp_path, tmp_path / "g"), "--rollout", "2"]))
    assert "--rollout 2 trains the skip chains of every-step gates: add --every-step" in err
    assert not (tmp_path / "g").exists()


# ---------------------------------------------------------------- (f) Fashion-MNIST latents: encoded once, cached


@pytest.fixture
def encodings(monkeypatch, tmp_path):
    """The cache in a private folder, and the number of encoder runs."""
    import lazydit.data.fashion_mnist as fm

    monkeypatch.setenv("LAZYDIT_CACHE", str(tmp_path / "cache"))
    calls = []
    real = fm.encode_posterior

    def counted(*a, **kw):
        calls.append(1)
        return real(*a, **kw)

    monkeypatch.setattr(fm, "encode_posterior", counted)
    return calls


def default_moments(fake_fmnist, progress=False):
    from lazydit.assets import default_model
    from lazydit.data.sources import gate_training_data

    it, _ = gate_training_data(default_model(), 4, data=str(fake_fmnist), progress=progress)
    return it.data.order.x  # RankSlice -> PosteriorSampler -> InfiniteSampler over the moments


def test_latents_are_encoded_once_then_read_from_the_cache(tmp_path, fake_fmnist, encodings, capsys):
    first = default_moments(fake_fmnist, progress=True)
    assert "encoding Fashion-MNIST latents" in capsys.readouterr().err  # the progress bar
    assert len(encodings) == 1 and len(list((tmp_path / "cache").glob("fmnist-posterior-*.npz"))) == 1
    again = default_moments(fake_fmnist)
    assert len(encodings) == 1 and torch.equal(first, again)  # no encoder run, the same bits


def test_corrupt_or_stale_cache_is_encoded_again(tmp_path, fake_fmnist, encodings):
    first = default_moments(fake_fmnist)
    (path,) = (tmp_path / "cache").glob("fmnist-posterior-*.npz")
    whole = path.read_bytes()
    path.write_bytes(whole[: len(whole) // 2])  # truncated
    assert torch.equal(default_moments(fake_fmnist), first) and len(encodings) == 2
    with np.load(path) as f:  # readable, but the moments changed behind the checksum
        stored = dict(f)
    stored["moments"][0, 0, 0, 0] += 1
    with open(path, "wb") as f:
        np.savez(f, **stored)
    assert torch.equal(default_moments(fake_fmnist), first) and len(encodings) == 3
    assert path.read_bytes() == whole  # replaced by a sound file
    # other images: another key, encoded again (the cached file stays for the old ones)
    from conftest import write_idx

    write_idx(fake_fmnist / "train-images-idx3-ubyte.gz", np.full((256, 28, 28), 7))
    other = default_moments(fake_fmnist)
    assert len(encodings) == 4 and not torch.equal(other, first)
    assert len(list((tmp_path / "cache").glob("fmnist-posterior-*.npz"))) == 2


def test_cache_is_keyed_by_the_autoencoder_weights(tmp_path, fake_fmnist, encodings):
    from lazydit.assets import DEFAULT_AUTOENCODER
    from lazydit.data.fashion_mnist import cached_posterior, load_fashion_mnist
    from lazydit.models.autoencoder import load_autoencoder

    x, _ = load_fashion_mnist("train", fake_fmnist)
    ae = load_autoencoder(DEFAULT_AUTOENCODER, "cpu")
    first = cached_posterior(ae, x, progress=False)
    with torch.no_grad():
        next(ae.parameters()).add_(0.01)
    changed = cached_posterior(ae, x, progress=False)
    assert len(encodings) == 2 and not torch.equal(first, changed)
    ae.scale *= 2
    cached_posterior(ae, x, progress=False)
    assert len(encodings) == 3
