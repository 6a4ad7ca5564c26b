"""Measuring samplers on your own model: random-weight zoo models and one interleaved timing routine.

The speed benchmarks (`benchmarks/`) and the experiment drivers use these, so that every wall-clock figure of the
project is taken the same way: a warm-up call of every row (compilation, allocator), then interleaved rounds, so
that machine drift hits every row alike, and ratios as the median over rounds of the ratio within a round.
"""

import statistics
from dataclasses import dataclass

import torch

from lazydit.lazy import Policy
from lazydit.models.dit import create_model
from lazydit.pipeline import sample


def random_model(name: str, image_size: int | None = 256, device="cpu", dtype=torch.float32, seed: int = 0,
                 **overrides):
    """A zoo DiT with random weights in eval mode, its zero-initialised layers (adaLN-Zero, final linear) drawn from
    N(0, 0.02) so that every module matters; built on `device` (DiT-XL/2 has 675M parameters).

    Args:
        name: a zoo name (`DiT-XL/2`, ...).
        image_size: image size of a latent model (latent = size / 8); None keeps the zoo's (or the overrides').
        **overrides: DiTConfig fields.
    """
    if image_size is not None:
        overrides.setdefault("input_size", image_size // 8)
    torch.manual_seed(seed)
    with torch.device(device):
        model = create_model(name, **overrides)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad and p.abs().sum() == 0:
                p.normal_(0, 0.02)
    return model.to(dtype).eval().requires_grad_(False)


@dataclass
class TimedRow:
    """One sampler configuration to time."""

    name: str  # row label
    model: object  # the model to sample (e.g. a compiled copy for a compiled dense row)
    steps: int  # T
    policy: Policy | None = None  # the caching policy (gates: lazydit.lazy.policy_for(gates, LazyConfig(...)))
    sampler: str = "ddim"  # "ddim" or "dpm++2m"


def time_interleaved(rows, y, *, cfg_scale: float, repeats: int, vary_seed: bool = False,
                     micro_batch: int | None = None, rotate: bool = True) -> dict:
    """Wall-clock of every row: one warm-up call each, then `repeats` interleaved rounds.

    The one timing routine of the project: `benchmarks/bench_fast.py` and the paper table's `--timing` both call it,
    so that their figures are taken the same way.

    Args:
        rows: TimedRow list.
        y: (B,) labels on the models' device.
        cfg_scale: guidance scale of every row.
        repeats: timed rounds.
        vary_seed: round i samples from seed i (else seed 0 every time).
        micro_batch: images per sampler call (see `lazydit.pipeline.sample`; None: the whole batch at once).
        rotate: start round i at row i (mod the row count), so that no row always runs first or after the same one.
    Returns:
        name -> dict(times (list of seconds, one per round), report (the last SampleReport), peak_gib (the highest
        CUDA memory peak of that row's calls; None on the CPU)).
    """
    cuda = y.is_cuda
    out = {r.name: dict(times=[], report=None, peak_gib=0.0 if cuda else None) for r in rows}
    for i in range(repeats + 1):  # round 0: the warm-up
        shift = (i % len(rows)) if rotate and i else 0
        for r in rows[shift:] + rows[:shift]:
            if cuda:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            _, rep = sample(r.model, y, r.steps, policy=r.policy, cfg_scale=cfg_scale,
                            seed=i - 1 if vary_seed and i else 0, progress=False, name=r.name,
                            micro_batch=micro_batch, sampler=r.sampler)
            o = out[r.name]
            if cuda:
                o["peak_gib"] = max(o["peak_gib"], torch.cuda.max_memory_allocated() / 2**30)
            if i > 0:
                o["times"].append(rep.seconds)
                o["report"] = rep
    return out


def paired_ratio(times_a, times_b) -> float:
    """Median over rounds of a / b within a round: robust to drift between rounds."""
    return statistics.median(a / b for a, b in zip(times_a, times_b))
