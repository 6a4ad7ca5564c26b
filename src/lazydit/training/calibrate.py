"""Calibrating trained gates to a target lazy ratio and writing the result: what `lazydit calibrate` and
`lazydit train-gates --target-ratio` do after training."""

from lazydit.pipeline import calibrate_threshold


def calibrate_and_save(model, gates, target: float, y, out, *, cfg_scale: float = 1.0, seed: int = 0,
                       progress: bool = True) -> tuple:
    """Bisect the gates' threshold to `target` on the labels `y`, set it, and write the gates to `out`.

    Args:
        model: the model the gates were trained on.
        gates: the LazyGates; their `threshold` is replaced by the calibrated one.
        target: the lazy ratio to reach.
        y: (B,) labels of the calibration batch.
        out: the .safetensors file written (atomically); its metadata gains a `calibration` record (target,
            reached ratio, guidance scale, number of images, seed).
        cfg_scale: the guidance scale the threshold is for.
        seed: the noise seed of the calibration batch.
        progress: print each bisection step.
    Returns:
        (threshold, reached lazy ratio).
    Raises:
        UsageError: the target is out of reach (see `calibrate_threshold`); nothing is written then.
    """
    th, ratio = calibrate_threshold(model, gates, target, y, cfg_scale=cfg_scale, seed=seed, progress=progress)
    gates.threshold = th
    gates.save(out, extra={"calibration": {"target": target, "reached": ratio, "cfg_scale": cfg_scale,
                                           "images": len(y), "seed": seed}})
    return th, ratio
