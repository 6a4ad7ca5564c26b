"""lazydit: LazyDiT (AAAI 2025) learned lazy gates for diffusion transformers."""

from .models import DIT_MODELS, DiT, DiTConfig, create_model
from .diffusion import ddim_sample, respaced_timesteps

__version__ = "0.1.0"
