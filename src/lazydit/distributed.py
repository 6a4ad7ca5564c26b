"""Sharded ADM sampling over torchrun's processes (the process group itself: `lazydit.ranks`).

Everything here also runs in a single process: without torchrun's environment (WORLD_SIZE unset) there is one rank.

    torchrun --nproc_per_node 8 -m lazydit.cli sample-ddp --model DiT-XL-2-256x256.pt --steps 50 --out s.npz
    torchrun --nproc_per_node 8 -m lazydit.cli train-gates --steps 50 --batch-size 512 ...   # global batch

Sharded sampling (`sample_sharded`) follows DiT's `sample_ddp.py`: rank r draws its initial noise and its labels
(`torch.randint`, uniform over classes) from one generator seeded with seed * world + r, in batches of batch_size;
the image of local index l (counted over the rank's batches) gets the global index l * world + r, the order of the
reference's PNG names. Rank 0 assembles the first num_samples global indices into one ADM .npz (rank-interleaved).
"""

import math
import time
import zipfile
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from lazydit.files import atomic_write, weights_fingerprint
from lazydit.ranks import all_reduce_, barrier, is_distributed, rank, world_size
from lazydit.sampling.parts import PartsMismatchError, SampleParts
from lazydit.images import to_uint8

# ---------------------------------------------------------------- sharded sampling


def shard_plan(num_samples: int, batch_size: int, world: int) -> int:
    """Batches per rank: ceil(num_samples / (world * batch_size)), as sample_ddp.py (the tail is dropped later)."""
    if num_samples < 1 or batch_size < 1:
        raise ValueError("num_samples and batch_size must be positive")
    return math.ceil(num_samples / (world * batch_size))


def rank_generator(seed: int, rank_: int, world: int, device) -> torch.Generator:
    """The generator of one rank's noise and labels: seeded with seed * world + rank (docs/method-notes.md §5)."""
    return torch.Generator(device=device).manual_seed(seed * world + rank_)


def draw_batch(gen: torch.Generator, batch_size: int, config, num_classes: int, device):
    """One batch of initial noise (B, C, H, W) and labels (B,), in this order, as sample_ddp.py."""
    z = torch.randn(batch_size, config.in_channels, config.input_size, config.input_size, generator=gen,
                    device=device)
    y = torch.randint(0, num_classes, (batch_size,), generator=gen, device=device)
    return z, y


def _provenance(model, policy) -> dict:
    """What resumed parts must share with this run: the model's config and weights, the policy's gate bank's."""
    fp = {"model_config": {k: v for k, v in vars(model.config).items() if isinstance(v, (int, float, str, bool))},
          "model": weights_fingerprint(model)}
    gates = getattr(policy, "gates", None)
    if gates is not None:
        fp["gates"] = dict(weights=weights_fingerprint(gates), threshold=policy.threshold, lookahead=gates.lookahead)
    return fp


def _write_npy_entry(zf: zipfile.ZipFile, name: str, shape, dtype, chunks):
    """Stream one .npy member (arr_0.npy) into an open zip: header, then the row chunks in order."""
    header = {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)), "fortran_order": False, "shape": tuple(shape)}
    with zf.open(name, "w", force_zip64=True) as f:
        np.lib.format.write_array_header_1_0(f, header)
        for chunk in chunks:
            f.write(np.ascontiguousarray(chunk, dtype=dtype).tobytes())


def assemble_npz(store: SampleParts, out, num_samples: int, batch_size: int, world: int, batches: int):
    """Write the ADM .npz from every rank's parts in `store`, streaming (memory: one batch of every rank).

    Global index g = local index l * world + rank: batch b of all ranks covers g in [b B W, (b + 1) B W), with
    row i of rank r at i * world + r. The first num_samples global indices are kept.
    Returns the labels (num_samples,).
    """
    files = [[f"rank{r:05d}/b{b:06d}" for r in range(world)] for b in range(batches)]
    first = store.read(files[0][0])[0]
    H, W, C = first.shape[1:]
    labels = np.empty(num_samples, dtype=np.int64)

    def chunks():
        done = 0
        for b in range(batches):
            if done >= num_samples:
                break
            block = np.empty((batch_size * world, H, W, C), dtype=np.uint8)
            lab = np.empty(batch_size * world, dtype=np.int64)
            for r in range(world):
                img, y, _ = store.read(files[b][r])
                block[r::world], lab[r::world] = img, y
            m = min(len(block), num_samples - done)
            labels[done : done + m] = lab[:m]
            done += m
            yield block[:m]

    def write(tmp):
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
            _write_npy_entry(zf, "arr_0.npy", (num_samples, H, W, C), np.uint8, chunks())
            _write_npy_entry(zf, "arr_1.npy", (num_samples,), np.int64, [labels])

    atomic_write(Path(out), write)
    return labels


def sample_sharded(model, num_samples: int, steps: int, *, policy=None, cfg_scale: float = 1.0, batch_size: int = 32,
                   seed: int = 0, num_classes: int | None = None, out_npz, keep_parts: bool = False,
                   progress: bool = True, decode=None, sampler: str = "ddim") -> dict:
    """Sample num_samples images over all ranks (or one process) into one ADM .npz, resumable.

    Every rank (call it on all of them) samples `shard_plan(num_samples, batch_size, world)` batches of batch_size
    with `lazydit.pipeline.sample`, noise and labels from `rank_generator(seed, rank, world)` (`draw_batch`), and writes
    each batch atomically to `<out_npz>.parts/rank<r>/b<i>.npz`; a rerun skips the batches already there (replaying
    their draws), so an interrupted run continues. Rank 0 then writes `out_npz`: arr_0 (N, H, W, C) uint8 and arr_1
    (N,) labels in global-index order (g = local index * world + rank, as sample_ddp.py's PNG names), cut to
    N = num_samples, and removes the parts (unless keep_parts). The parts folder must be visible to rank 0
    (one node, or a shared filesystem), as the reference's PNG folder.

    Args:
        model: a DiT (eval mode) on this rank's device.
        num_samples: N images in the .npz (the last global batch is sampled in full and cut).
        steps: T, DDIM steps.
        policy: the caching Policy for T (gates: `lazydit.lazy.policy_for(gates, LazyConfig(...))`; None: the bare
            sampler; see `lazydit.pipeline.sample`).
        cfg_scale: guidance scale (1.0: none).
        batch_size: images per batch and rank (sample_ddp.py's per_proc_batch_size).
        seed: global seed; rank r uses seed * world + r.
        num_classes: labels are uniform over [0, num_classes) (default: the model's).
        out_npz: the .npz to write.
        keep_parts: keep `<out_npz>.parts/` after assembling.
        sampler: "ddim" or "dpm++2m" (`lazydit.sampling.SAMPLERS`).
        progress: progress bar (rank 0).
        decode: a callable from the model's samples to images in [-1, 1] (B, 3, H, W), applied to every batch before
            it is written (latent models: the VAE decoder, e.g. `functools.partial(lazydit.data.vae.decode, vae)`); None
            writes the samples as they are. Its `fingerprint` attribute (JSON), when it has one, joins the resume check.
    Returns:
        dict(out, num_samples, world_size, batches_per_rank, lazy_ratio, tmacs (per image), seconds (wall-clock of
        this call, the slowest rank), sample_seconds (sampling time summed over every batch and rank, resumed ones
        included)). lazy_ratio and tmacs are means over every sampled batch of every rank (all batches are the
        same size, so this is the ratio over all module evaluations; the cut tail is included).
    """
    t_start = time.perf_counter()
    from lazydit.pipeline import sample

    device = next(model.parameters()).device
    rk, world = rank(), world_size()
    num_classes = model.config.num_classes if num_classes is None else num_classes
    batches = shard_plan(num_samples, batch_size, world)
    out_npz = Path(out_npz)
    meta = dict(num_samples=num_samples, steps=steps, cfg_scale=cfg_scale, batch_size=batch_size, seed=seed,
                num_classes=num_classes, world_size=world,
                **({} if sampler == "ddim" else {"sampler": sampler}),  # DDIM parts of earlier versions stay valid
                **_provenance(model, policy), policy=None if policy is None else policy.describe())
    if decode is not None:
        meta["decode"] = getattr(decode, "fingerprint", True)
    store = SampleParts(out_npz, meta)
    if rk == 0:
        store.prepare(write=True)
    barrier()
    store.prepare(write=False)
    gen = rank_generator(seed, rk, world, device)
    ratio_sum, tmacs_sum, sec_sum = 0.0, 0.0, 0.0
    bar = tqdm(range(batches), desc=f"sample {num_samples} x{world}", unit="batch", disable=not (progress and rk == 0))
    for b in bar:
        z, y = draw_batch(gen, batch_size, model.config, num_classes, device)  # drawn even when resumed: same stream
        name = f"rank{rk:05d}/b{b:06d}"
        done = store.read(name)
        if done is not None:
            _, labels, info = done
            if not np.array_equal(labels, y.cpu().numpy()):
                raise PartsMismatchError(f"{store.path(name)}: labels differ from this run's draws: delete {store.folder}")
        else:
            try:
                x, rep = sample(model, y, steps, policy=policy, cfg_scale=cfg_scale, x=z, progress=False,
                                sampler=sampler)
            except BaseException:  # an error or Ctrl-C before the first part: one process leaves no empty folder
                if world == 1:
                    store.remove_if_empty()
                raise
            info = dict(lazy_ratio=rep.lazy_ratio, tmacs=rep.tmacs, seconds=rep.seconds)
            store.write(name, to_uint8(x if decode is None else decode(x)), y.cpu().numpy(), info)
        ratio_sum += info["lazy_ratio"]
        tmacs_sum += info["tmacs"]
        sec_sum += info["seconds"]
    sums = all_reduce_(torch.tensor([ratio_sum, tmacs_sum, sec_sum], dtype=torch.float64, device=device))
    if rk == 0:
        assemble_npz(store, out_npz, num_samples, batch_size, world, batches)
        if not keep_parts:
            store.remove()
    wall = all_reduce_(torch.tensor([time.perf_counter() - t_start], dtype=torch.float64, device=device),
                       op=dist.ReduceOp.MAX if is_distributed() else None)  # also waits for the .npz
    n = batches * world
    return dict(out=str(out_npz), num_samples=num_samples, world_size=world, batches_per_rank=batches,
                lazy_ratio=float(sums[0]) / n, tmacs=float(sums[1]) / n, seconds=float(wall[0]),
                sample_seconds=float(sums[2]))


__all__ = ["shard_plan", "rank_generator", "draw_batch", "assemble_npz", "sample_sharded"]
