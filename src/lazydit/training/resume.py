"""The one `--resume` check of every trainer: a checkpoint continues only under the settings that made it."""

from lazydit.errors import UsageError


def check_resume_settings(ckpt, saved: dict, cfg, fields, missing_ok: bool = False):
    """Raise UsageError naming every result-shaping setting in which `cfg` differs from the checkpoint's.

    Args:
        ckpt: the checkpoint path (for the message).
        saved: the settings stored in the checkpoint.
        cfg: the config of this call (a dataclass).
        fields: the names of the settings that shape the result.
        missing_ok: settings the checkpoint does not store pass (checkpoints older than the setting).
    """
    diff = [f"{k}: checkpoint {saved.get(k)!r}, now {getattr(cfg, k)!r}" for k in fields
            if (k in saved or not missing_ok) and saved.get(k) != getattr(cfg, k)]
    if diff:  # the saved result would record arguments that did not make the state it continues
        raise UsageError(f"--resume: {ckpt} was trained with other settings ({'; '.join(diff)}): resume with "
                         "the same ones, or start a new run with another --out")
