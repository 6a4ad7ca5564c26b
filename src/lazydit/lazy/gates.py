"""The LazyDiT gate bank and its file format.

One Linear(D, 1, bias=False) per block, branch and respaced step, zero-initialised, stored as one (L, 2, T, D)
parameter. Conventions (the released code's): a gate gives p = sigmoid(sum_tokens Z . w_k), the probability to
COMPUTE; a row skips its module when p < threshold (0.5 unless calibrated). See docs/method-notes.md.

A router bank (`router=True`, Learning-to-Cache) is the same file with D = 1: one input-independent logit per block,
branch and step, p = sigmoid(w_k), the same for every row.
"""

import json
import math
from pathlib import Path

import torch
import torch.nn as nn
from safetensors import safe_open
from safetensors.torch import save_file

from lazydit.errors import GateMismatchError
from lazydit.files import atomic_write
from lazydit.models.registry import model_blocks
from lazydit.sampling.schedule import respaced_timesteps

GATE_FORMAT = "lazydit-gates-v1"


def logit_of(p: float) -> float:
    """log(p / (1 - p)) of a threshold, clamped so that thresholds at 0 or 1 stay finite."""
    p = min(max(p, 1e-300), 1 - 1e-16)
    return math.log(p) - math.log1p(-p)


class LazyGates(nn.Module):
    """The gate bank: one Linear(D, 1, bias=False) per block, branch and respaced step, zero-initialised.

    `weight` is one parameter of shape (L, 2, T, D) (branch 0 = attn, 1 = mlp), so data-parallel training sees
    the whole bank every step.
    """

    def __init__(self, depth: int, hidden_size: int, steps: int, threshold: float = 0.5, meta: dict | None = None,
                 parity: bool = True, lookahead: bool = False, router: bool = False):
        super().__init__()
        self.router = router  # Learning-to-Cache: one logit per (layer, branch, step), the input is not read
        self.weight = nn.Parameter(torch.zeros(depth, 2, steps, 1 if router else hidden_size))
        self.threshold = threshold
        self.parity = parity  # reference parity: odd respaced indices always compute (their gates are untrained)
        self.lookahead = lookahead  # gate k scores the input recorded at step k+1 (see the module docstring)
        if lookahead and not parity:
            raise ValueError("look-ahead gates need the reference parity (the odd step k+1 computes every module)")
        self.meta = dict(meta or {})  # model name/config, training arguments, ...

    @property
    def depth(self):
        return self.weight.shape[0]

    @property
    def steps(self):
        return self.weight.shape[2]

    @property
    def hidden_size(self):
        return self.weight.shape[3]

    @classmethod
    def for_model(cls, model, steps: int, threshold: float = 0.5, lookahead: bool = False, parity: bool = True,
                  router: bool = False):
        """Zero gates sized for `model` (a DiT) and T = steps, with the model's config in the metadata (parity
        False: every step gated, beyond the paper; router: a Learning-to-Cache router bank)."""
        cfg = model.config
        meta = {"model_name": getattr(model, "name", "") or "", "model_config": dict(cfg.__dict__)}
        gates = cls(len(model_blocks(model)), cfg.hidden_size, steps, threshold, meta, parity=parity,
                    lookahead=lookahead, router=router)
        return gates.to(next(model.parameters()).device)

    def logit(self, layer: int, branch: int, k: int, z: torch.Tensor) -> torch.Tensor:
        """Gate score of every row: sum over tokens of Z . w_k. z (B, N, D) -> (B,) (a router: w_k for every row)."""
        if self.router:
            return self.weight[layer, branch, k, 0].to(z.dtype).expand(z.shape[0])
        w = self.weight[layer, branch, k].to(z.dtype)
        return z.sum(dim=1) @ w

    def save(self, path, extra: dict | None = None):
        """Write the gates as .safetensors with metadata (model config, T, threshold, timestep map, extras)."""
        meta = {**self.meta, **(extra or {})}
        meta.update(format=GATE_FORMAT, steps=self.steps, threshold=self.threshold, parity=self.parity,
                    lookahead=self.lookahead, router=self.router, timestep_map=respaced_timesteps(self.steps))
        self.meta = {k: v for k, v in meta.items() if k != "format"}
        header = {k: json.dumps(v) for k, v in meta.items()}
        tensor = {"weight": self.weight.detach().float().contiguous().cpu()}
        atomic_write(path, lambda tmp: save_file(tensor, tmp, metadata=header))

    @classmethod
    def load(cls, path, map_location="cpu"):
        """Read gates written by `save`."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"gate file not found: {path}")
        try:
            with safe_open(str(path), framework="pt", device=str(map_location)) as f:
                header = dict(f.metadata() or {})
                weight = f.get_tensor("weight")
        except Exception as e:
            raise GateMismatchError(f"{path}: not a lazydit gate file ({type(e).__name__}: {e})") from e
        meta = {k: json.loads(v) for k, v in header.items()}
        if meta.pop("format", None) != GATE_FORMAT:
            raise GateMismatchError(f"{path}: not a lazydit gate file (format {header.get('format')!r})")
        if not bool(torch.isfinite(weight).all()):
            raise GateMismatchError(f"{path}: the gate bank holds non-finite (NaN or Inf) weights: the file is damaged "
                                    "or training diverged")
        L, two, T, D = weight.shape
        router = bool(meta.get("router", False))
        if two != 2 or T != meta.get("steps") or (router and D != 1):
            raise GateMismatchError(f"{path}: gate bank of shape {tuple(weight.shape)} does not match its metadata")
        gates = cls(L, D, T, float(meta.get("threshold", 0.5)), meta, parity=bool(meta.get("parity", True)),
                    lookahead=bool(meta.get("lookahead", False)), router=router)
        gates.weight.data.copy_(weight)
        return gates

    def check_model(self, model):
        """Raise GateMismatchError unless these gates fit `model` (depth, width, and the stored config)."""
        cfg, depth = model.config, len(model_blocks(model))
        if depth != self.depth or (cfg.hidden_size != self.hidden_size and not self.router):
            raise GateMismatchError(
                f"gates are for a model of depth {self.depth} and width {self.hidden_size}, "
                f"but this model has depth {depth} and width {cfg.hidden_size}"
                f" (gates trained for {self.meta.get('model_name') or 'another model'})"
            )
        stored = self.meta.get("model_config")
        if stored:
            diff = [f"{k}: gates {stored[k]!r} vs model {getattr(cfg, k)!r}"
                    for k in stored if hasattr(cfg, k) and stored[k] != getattr(cfg, k)]
            if diff:
                raise GateMismatchError("gates were trained for another model config: " + "; ".join(diff))

    def check_steps(self, steps: int):
        """Raise GateMismatchError unless these gates were trained for `steps` sampling steps."""
        if steps != self.steps:
            raise GateMismatchError(
                f"gates were trained for T={self.steps} sampling steps, not {steps}: "
                f"sample with {self.steps} steps or train gates for {steps} (lazydit train-gates --steps {steps})"
            )
