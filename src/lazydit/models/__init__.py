"""The models: DiT (`dit`), Large-DiT (`large_dit`), where their blocks keep the parts caching methods need
(`registry`), and checkpoint loading by kind (`checkpoint`)."""

from lazydit.models.dit import DIT_MODELS, DiT, DiTConfig, create_model, model_config

__all__ = ["DIT_MODELS", "DiT", "DiTConfig", "create_model", "model_config"]
