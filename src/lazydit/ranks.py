"""torchrun's process group for every multi-process run: setup, rank and world, rank-sliced data.

Everything here also runs in a single process: without torchrun's environment (WORLD_SIZE unset) `init_distributed`
does nothing, `rank()` is 0 and `world_size()` is 1. Sharded sampling, which builds on it, is
`lazydit.distributed.sample_sharded`.
"""

import datetime
import os

import torch
import torch.distributed as dist

# ---------------------------------------------------------------- process group


def init_distributed(device=None, backend: str | None = None, timeout_minutes: float = 60.0) -> torch.device:
    """Join torchrun's process group, or do nothing in a single process.

    Reads RANK, WORLD_SIZE and LOCAL_RANK (torchrun's environment). On CUDA every process takes the GPU of its local
    rank (`cuda:LOCAL_RANK`, whatever index `device` names) and the group uses NCCL; on CPU it uses gloo.
    Calling it again once the group is up only returns the device.

    Args:
        device: "cuda", "cpu", a torch.device, or None (CUDA when available).
        backend: override the backend ("nccl" / "gloo").
        timeout_minutes: collective timeout (rank 0 assembles a 50K-image .npz while the others wait).
    Returns:
        The device this process should use.
    """
    device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
    if "WORLD_SIZE" not in os.environ:
        return device
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        backend = backend or ("nccl" if device.type == "cuda" else "gloo")
        dist.init_process_group(backend, timeout=datetime.timedelta(minutes=timeout_minutes))
    return device


def is_distributed() -> bool:
    """A process group is up (possibly of one process)."""
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main() -> bool:
    """Rank 0, or a single process: the one that writes files and prints."""
    return rank() == 0


def barrier():
    if is_distributed():
        dist.barrier()


def cleanup():
    """Leave the process group (no-op without one)."""
    if is_distributed():
        dist.destroy_process_group()


def set_tf32(enabled: bool = True):
    """Allow TF32 in CUDA matmuls and cuDNN convolutions (Ampere and newer; a no-op elsewhere)."""
    torch.backends.cuda.matmul.allow_tf32 = enabled
    torch.backends.cudnn.allow_tf32 = enabled


def all_reduce_(t: torch.Tensor, op=None) -> torch.Tensor:
    """In-place all_reduce (SUM by default) of a tensor; identity in a single process."""
    if is_distributed():
        dist.all_reduce(t, op=op or dist.ReduceOp.SUM)
    return t


# ---------------------------------------------------------------- data


class RankSlice:
    """This rank's contiguous slice of every batch of a global-batch iterator.

    Every rank runs the same iterator (same seed) of global batches of B rows; rank r keeps rows
    [r B / W, (r + 1) B / W). `state_dict` / `load_state_dict` pass through, so the state is the same on every rank.
    """

    def __init__(self, data, rank_: int | None = None, world: int | None = None):
        self.data = data
        self.rank = rank() if rank_ is None else rank_
        self.world = world_size() if world is None else world

    def __next__(self):
        batch = next(self.data)
        B = batch[0].shape[0]
        if B % self.world:
            raise ValueError(f"global batch {B} is not divisible by the world size {self.world}")
        b = B // self.world
        return tuple(t[self.rank * b : (self.rank + 1) * b] for t in batch)

    def __iter__(self):
        return self

    def state_dict(self):
        return self.data.state_dict()

    def load_state_dict(self, state):
        self.data.load_state_dict(state)
