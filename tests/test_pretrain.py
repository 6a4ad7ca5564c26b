import torch

from lazydit.models.checkpoint import load_dit
from lazydit.training.pretrain import PretrainConfig, pretrain


def test_pretrain_resume_matches_uninterrupted(tmp_path, fake_fmnist):
    base = dict(data=str(fake_fmnist), batch_size=4, ckpt_every=2, warmup=2, preview=False)
    full = load_dit(pretrain(PretrainConfig(**base, out=str(tmp_path / "a"), iters=6), progress=False))
    pretrain(PretrainConfig(**base, out=str(tmp_path / "b"), iters=4), progress=False)
    resumed = load_dit(pretrain(PretrainConfig(**base, out=str(tmp_path / "b"), iters=6, resume=True),
                                progress=False))
    for (k, a), (_, b) in zip(full.state_dict().items(), resumed.state_dict().items()):
        assert torch.equal(a, b), k
    assert resumed.config.input_size == 28 and resumed.name == "DiT-FMNIST"
