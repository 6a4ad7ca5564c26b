"""Row records of the experiment tables: what a row must keep so that it never has to be sampled again.

A table row (5,000 images) takes minutes to an hour of CPU, and a machine may not keep its run folder. A row's
record is its JSON (metrics) plus what pairing it with rows sampled elsewhere needs, computed once from its images:
- `fid_draws`: the FID of each bootstrap resample (`metrics.bootstrap_fid_draws`, seed `fid_draws_seed`). The
  resampled rows depend only on (N, reps, seed), so two records' draws pair exactly (`pair`), on any day or machine.
- `psnr_vs_ref`: PSNR against a fine reference sampler's images of the same labels and noise (first
  `psnr_vs_ref_samples` images).
Experiments commit their records (e.g. docs/paper_tables.json) and read them back with `read_committed`; the fine
reference's images, which every later row needs for its PSNR, travel with them (`mirror`).
"""

import json
import shutil
from pathlib import Path

from lazydit.files import atomic_write
from lazydit.evaluation.metrics import bootstrap_fid_draws, load_npz_samples, paired_interval, paired_psnr


def complete(rec: dict, samples: Path, *, reps: int, seed: int, fine=None, extractor=None, ref=None) -> bool:
    """Add to a row's record the bootstrap draws and the fine-reference PSNR it lacks (or has for other settings).

    Args:
        rec: the row's record (changed in place).
        samples: the row's images (.npz, as `evaluate_config` writes them).
        reps: bootstrap draws (0: none).
        seed: resampling seed.
        fine: (M, H, W, C) uint8 images of the fine reference, or None (no PSNR).
        extractor: feature extractor of the FID (needed when draws are missing).
        ref: its reference statistics, dict(mu, sigma).
    Returns:
        Whether `rec` changed.
    """
    changed, images = False, None
    if reps and (rec.get("fid_draws_seed"), len(rec.get("fid_draws", ()))) != (seed, reps):
        from lazydit.evaluation.features import extract_features

        images = load_npz_samples(samples)
        feats = extract_features(extractor, images, progress=False)["pool"]
        rec["fid_draws"] = bootstrap_fid_draws(feats, ref["mu"], ref["sigma"], reps, seed).tolist()
        rec["fid_draws_seed"], changed = seed, True
    if fine is not None and rec.get("psnr_vs_ref_samples") != len(fine):
        images = load_npz_samples(samples) if images is None else images
        rec["psnr_vs_ref"] = paired_psnr(images[: len(fine)], fine)["psnr"]
        rec["psnr_vs_ref_samples"], changed = len(fine), True
    return changed


def pair(a: dict, b: dict, reps: int, seed: int, level: float = 0.95) -> dict | None:
    """Paired-bootstrap interval of FID(a) - FID(b) from two records (`metrics.paired_interval`), or None unless
    both carry `reps` draws of `seed`."""
    if not all(len(r.get("fid_draws", ())) == reps and r.get("fid_draws_seed") == seed for r in (a, b)):
        return None
    return paired_interval(a["fid"], b["fid"], a["fid_draws"], b["fid_draws"], level)


def read_committed(path: Path, key: str = "sampler", **settings) -> dict:
    """Name -> record of the rows of a committed JSON (dict(rows=[...], **settings)) whose settings all equal
    `settings` ({} without the file or with other settings: such rows are not comparable)."""
    path = Path(path)
    if not path.exists():
        return {}
    doc = json.loads(path.read_text())
    if any(doc.get(k) != v for k, v in settings.items()):
        return {}
    return {r[key]: r for r in doc["rows"]}


def mirror(run_file: Path, committed_file: Path) -> bool:
    """Keep a run's file and its committed copy alike: restore the run's file from the copy where the run lacks it
    (a clean checkout), else commit the run's file where the copy is missing. Both writes are atomic.

    Returns:
        Whether the run has the file now.
    """
    run_file, committed_file = Path(run_file), Path(committed_file)
    if not run_file.exists() and committed_file.exists():
        atomic_write(run_file, lambda tmp: shutil.copyfile(committed_file, tmp))
    elif run_file.exists() and not committed_file.exists():
        atomic_write(committed_file, lambda tmp: shutil.copyfile(run_file, tmp))
    return run_file.exists()
