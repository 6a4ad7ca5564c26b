"""lazydit: LazyDiT (AAAI 2025) learned lazy gates for diffusion transformers.

The package tree is the architecture (docs/architecture.md): `models` (DiT, Large-DiT, the block registry),
`sampling` (schedule, DDIM), `lazy` (gates and every caching policy), `training`, `evaluation`, `data`, and `cli`.
Names below are imported on first use, so that `lazydit --help` does not wait for torch.
"""

__version__ = "0.1.0"

_EXPORTS = {
    "DIT_MODELS": "lazydit.models.dit", "DiT": "lazydit.models.dit", "DiTConfig": "lazydit.models.dit",
    "create_model": "lazydit.models.dit", "ddim_sample": "lazydit.sampling.ddim",
    "respaced_timesteps": "lazydit.sampling.schedule", "load_default": "lazydit.assets",
    "default_gates": "lazydit.lazy.shipped", "default_autoencoder": "lazydit.assets", "tune_allocator": "lazydit.cpu",
    "load_recipe": "lazydit.tuning", "tune": "lazydit.tuning",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(_EXPORTS[name]), name)
    if not name.startswith("_"):  # a subpackage or module (`lazydit.data.vae.decode` after a plain `import lazydit`)
        import importlib.util

        if importlib.util.find_spec(f"{__name__}.{name}") is not None:
            return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module 'lazydit' has no attribute {name!r}")
