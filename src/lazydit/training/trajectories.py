"""Data-free gate training (beyond the paper): the frozen model's own sampling trajectories as training inputs.

The reference recipe noises dataset images to x_k; at sampling time the model sees its own trajectory instead. Here
a pool of trajectories is sampled once with the dense model (DDIM over the T-step respacing, with the guidance
scale the gates will sample at), and gate training reads x_k off them: the teacher is the dense model's output at
the next step of the same trajectory, exactly the quantity the lazy model must reproduce. No dataset is needed: a
user with only a checkpoint can train gates.
"""

import torch
from tqdm.auto import tqdm

from lazydit import ranks as dist
from lazydit.data.fashion_mnist import InfiniteSampler
from lazydit.errors import NonFiniteError, UsageError
from lazydit.sampling.ddim import ddim_sample


def trajectory_pool(model, steps: int, size: int, *, cfg_scale: float = 1.5, seed: int = 0, batch_size: int = 64,
                    progress: bool = True, timesteps: list | None = None):
    """Sample `size` dense DDIM trajectories of T = steps and keep every state.

    Args:
        model: the frozen model (eval mode) on its device.
        steps: T.
        size: trajectories (labels uniform over the model's classes, shuffled by `seed`).
        cfg_scale: guidance scale of the sampling the gates are trained for.
        seed: labels and initial noise (batch i from seed * 1_000_003 + i).
        batch_size: trajectories sampled at a time.
        progress: progress bar.
        timesteps: T ascending original timesteps (the schedule the gates are trained for; default: the respacing).
    Returns:
        (traj (size, T, C, H, W) float32 on the CPU, traj[:, j] the input of sampling step j, i.e. of respaced index
        k = T - 1 - j; labels (size,) long).
    """
    if size < 1:
        raise UsageError(f"the trajectory pool needs at least one trajectory, got {size}")
    device = next(model.parameters()).device
    c = model.config
    g = torch.Generator().manual_seed(seed)
    y_all = (torch.arange(size) % c.num_classes)[torch.randperm(size, generator=g)]
    traj = torch.empty(size, steps, c.in_channels, c.input_size, c.input_size)
    for i in tqdm(range(0, size, batch_size), desc=f"trajectories T={steps}", unit="batch",
                  disable=not progress):
        y = y_all[i : i + batch_size].to(device)
        states = []

        def keep(info):  # the state the model was called on at this step (the conditional half under CFG)
            states.append(info["x"][: len(y)].float().cpu())

        ddim_sample(model, y, steps, cfg_scale=cfg_scale, seed=seed * 1_000_003 + i // batch_size, progress=False,
                    callback=keep, timesteps=timesteps)
        traj[i : i + len(y)] = torch.stack(states, dim=1)
    if not bool(torch.isfinite(traj).all()):
        raise NonFiniteError("the model's sampling trajectories hold NaN or Inf: check the model file and the "
                             "guidance scale")
    return traj, y_all


def trajectory_data(model, steps: int, batch_size: int, *, size: int = 512, cfg_scale: float = 1.5, seed: int = 0,
                    progress: bool = True, timesteps: list | None = None):
    """The batch iterator of data-free gate training: shuffled (trajectories, labels) from one pool, this
    process's share of every global batch (every rank samples the same pool from the same seed).

    Args:
        model, steps, size, cfg_scale, seed, progress, timesteps: as `trajectory_pool`.
        batch_size: the GLOBAL batch.
    Returns:
        (iterator of (traj (b, T, C, H, W), y (b,)), dict describing the source for the gate file's metadata)
    """
    W = dist.world_size()
    if batch_size % W:
        raise UsageError(f"--batch-size {batch_size} (global) is not divisible by {W} processes")
    traj, y = trajectory_pool(model, steps, size, cfg_scale=cfg_scale, seed=seed, progress=progress,
                              timesteps=timesteps)
    source = {"data_free": {"pool": size, "cfg_scale": cfg_scale, "seed": seed}}
    return dist.RankSlice(InfiniteSampler(traj, y, batch_size, seed=seed)), source
