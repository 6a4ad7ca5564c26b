"""The LazyDiT gate bank and its file format.

One Linear(D, 1, bias=False) per block, branch and respaced step, zero-initialised, stored as one (L, 2, T, D)
parameter. Conventions (the released code's): a gate gives p = sigmoid(sum_tokens Z . w_k), the probability to
COMPUTE; a row skips its module when p < threshold (0.5 unless calibrated). See docs/method-notes.md.

A router bank (`router=True`, Learning-to-Cache) is the same file with D = 1: one input-independent logit per block,
branch and step, p = sigmoid(w_k), the same for every row.

The bank is (L, nb, T, D) for blocks of nb branches (DiT: attn, mlp; PixArt: attn, cross, mlp). Gates are keyed by
the timesteps they were trained on (`timestep_map`, ascending: index k runs the model at timestep_map[k]; lazydit's
respacing of T steps unless trained on another sampler's schedule, e.g. a diffusers scheduler's), and the file
records that schedule in words (`schedule`) so that a mismatch error can name it.
"""

import json
import math
from pathlib import Path

import torch
import torch.nn as nn
from safetensors import safe_open
from safetensors.torch import save_file

from lazydit.errors import GateMismatchError, UsageError
from lazydit.files import atomic_write
from lazydit.models.registry import model_blocks
from lazydit.sampling.schedule import respaced_timesteps, respacing_name

GATE_FORMAT = "lazydit-gates-v1"
GATE_FILE = "gates.safetensors"  # the weights file of a gate folder (save_pretrained)


def _config_dict(cfg) -> dict:
    """A model config as a plain dict (lazydit dataclass configs, diffusers FrozenDicts), JSON values only."""
    items = dict(cfg) if isinstance(cfg, dict) else dict(cfg.__dict__)
    return json.loads(json.dumps(items, default=lambda v: v if not isinstance(v, tuple) else list(v)))


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
                 parity: bool = True, lookahead: bool = False, router: bool = False, num_branches: int = 2,
                 timestep_map: list | None = None):
        super().__init__()
        self.router = router  # Learning-to-Cache: one logit per (layer, branch, step), the input is not read
        self.weight = nn.Parameter(torch.zeros(depth, num_branches, steps, 1 if router else hidden_size))
        self.timestep_map = list(respaced_timesteps(steps) if timestep_map is None else timestep_map)
        if len(self.timestep_map) != steps or sorted(set(self.timestep_map)) != self.timestep_map:
            raise ValueError(f"timestep_map must hold {steps} distinct ascending timesteps, got {self.timestep_map}")
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

    @property
    def num_branches(self):
        return self.weight.shape[1]

    @property
    def timesteps(self) -> list:
        """The original timestep of every index k (ascending): what the gates were trained on."""
        return self.timestep_map

    def schedule_name(self) -> str:
        """The schedule the gates were trained on, in words."""
        return self.meta.get("schedule") or respacing_name(self.steps)

    @classmethod
    def for_model(cls, model, steps: int, threshold: float = 0.5, lookahead: bool = False, parity: bool = True,
                  router: bool = False, timestep_map: list | None = None, schedule: str | None = None):
        """Zero gates sized for `model` (a DiT, or a diffusers transformer) and T = steps, with the model's config in
        the metadata (parity False: every step gated, beyond the paper; router: a Learning-to-Cache router bank;
        timestep_map / schedule: another sampler's timesteps, ascending, and their name)."""
        from lazydit.models.registry import block_spec, model_width

        blocks = model_blocks(model)
        meta = {"model_name": getattr(model, "name", "") or "", "model_config": _config_dict(model.config),
                "branch_kinds": list(block_spec(blocks[0]).kinds)}
        if schedule:
            meta["schedule"] = schedule
        gates = cls(len(blocks), model_width(model), steps, threshold, meta, parity=parity, lookahead=lookahead,
                    router=router, num_branches=len(meta["branch_kinds"]), timestep_map=timestep_map)
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
                    lookahead=self.lookahead, router=self.router, timestep_map=self.timestep_map)
        self.meta = {k: v for k, v in meta.items() if k != "format"}
        header = {k: json.dumps(v) for k, v in meta.items()}
        tensor = {"weight": self.weight.detach().float().contiguous().cpu()}
        atomic_write(path, lambda tmp: save_file(tensor, tmp, metadata=header))

    def save_pretrained(self, folder, extra: dict | None = None):
        """Write a diffusers-style gate folder: `gates.safetensors` (the file of `save`) and `config.json` (its
        metadata, readable without torch). `LazyGates.load` and `--gates` take the folder."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self.save(folder / GATE_FILE, extra)
        config = {"_class_name": "LazyGates", "format": GATE_FORMAT, "shape": list(self.weight.shape), **self.meta}
        atomic_write(folder / "config.json", lambda tmp: Path(tmp).write_text(json.dumps(config, indent=1)))

    @classmethod
    def from_pretrained(cls, folder, map_location="cpu"):
        """Read a gate folder written by `save_pretrained` (its config.json must agree with the gate file)."""
        folder = Path(folder)
        if not (folder / GATE_FILE).is_file():
            raise FileNotFoundError(f"{folder}: no {GATE_FILE} (a gate folder holds {GATE_FILE} and config.json)")
        gates = cls.load(folder / GATE_FILE, map_location)
        cfg_file = folder / "config.json"
        if cfg_file.is_file():
            try:
                cfg = json.loads(cfg_file.read_text())
            except ValueError as e:
                raise GateMismatchError(f"{cfg_file}: not JSON ({e})") from e
            diff = [k for k in ("steps", "threshold", "timestep_map", "branch_kinds", "parity", "lookahead", "router")
                    if k in cfg and cfg[k] != gates.meta.get(k)]
            if diff:
                raise GateMismatchError(f"{folder}: config.json and {GATE_FILE} disagree on {', '.join(diff)}: "
                                        f"rewrite the folder with save_pretrained")
        return gates

    @classmethod
    def load(cls, path, map_location="cpu"):
        """Read gates written by `save` (a .safetensors file) or `save_pretrained` (a folder)."""
        path = Path(path)
        if path.is_dir():
            return cls.from_pretrained(path, map_location)
        if not path.is_file():
            raise FileNotFoundError(f"gate file not found: {path}")
        try:
            with safe_open(str(path), framework="pt", device=str(map_location)) as f:
                header = dict(f.metadata() or {})
                weight = f.get_tensor("weight")
        except Exception as e:
            raise GateMismatchError(f"{path}: not a lazydit gate file ({type(e).__name__}: {e})") from e
        meta = _read_header(path, header)
        if meta.pop("format", None) != GATE_FORMAT:
            raise GateMismatchError(f"{path}: not a lazydit gate file (format {header.get('format')!r})")
        if not bool(torch.isfinite(weight).all()):
            raise GateMismatchError(f"{path}: the gate bank holds non-finite (NaN or Inf) weights: the file is damaged "
                                    "or training diverged")
        if weight.dim() != 4:
            raise GateMismatchError(f"{path}: the gate bank has shape {tuple(weight.shape)}, not (layers, branches, "
                                    "steps, width)")
        L, nb, T, D = weight.shape
        router, parity, lookahead = (_flag(path, meta, k, d) for k, d in
                                     (("router", False), ("parity", True), ("lookahead", False)))
        threshold = meta.get("threshold", 0.5)
        if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not 0 <= threshold <= 1:
            raise GateMismatchError(f"{path}: threshold {threshold!r} is not a number in [0, 1]: the file is damaged; "
                                    "use the gate file it was copied from, or train the gates again "
                                    "(lazydit train-gates)")
        kinds = meta.get("branch_kinds", ["attn", "mlp"])
        tmap = meta.get("timestep_map") or respaced_timesteps(T)
        if (not isinstance(kinds, list) or not isinstance(tmap, list) or nb != len(kinds) or T != meta.get("steps")
                or (router and D != 1) or len(tmap) != T):
            raise GateMismatchError(f"{path}: gate bank of shape {tuple(weight.shape)} does not match its metadata")
        gates = cls(L, D, T, float(threshold), meta, parity=parity, lookahead=lookahead, router=router, num_branches=nb,
                    timestep_map=tmap)
        gates.weight.data.copy_(weight)
        return gates

    def check_model(self, model):
        """Raise GateMismatchError unless these gates fit `model` (depth, width, and the stored config)."""
        from lazydit.models.registry import block_spec, model_width

        blocks = model_blocks(model)
        depth, width, kinds = len(blocks), model_width(model), list(block_spec(blocks[0]).kinds)
        if depth != self.depth or (width != self.hidden_size and not self.router):
            raise GateMismatchError(
                f"gates are for a model of depth {self.depth} and width {self.hidden_size}, "
                f"but this model has depth {depth} and width {width}"
                f" (gates trained for {self.meta.get('model_name') or 'another model'})"
            )
        if kinds != self.meta.get("branch_kinds", ["attn", "mlp"]):
            raise GateMismatchError(f"gates are for blocks with branches {self.meta.get('branch_kinds')}, this "
                                    f"model's blocks have {kinds}")
        stored, cfg = self.meta.get("model_config"), _config_dict(model.config)
        if stored:
            diff = [f"{k}: gates {stored[k]!r} vs model {cfg[k]!r}"
                    for k in stored if not k.startswith("_") and k in cfg and stored[k] != cfg[k]]
            if diff:
                raise GateMismatchError("gates were trained for another model config: " + "; ".join(diff))

    def check_steps(self, steps: int):
        """Raise GateMismatchError unless these gates were trained for `steps` sampling steps."""
        if steps != self.steps:
            raise GateMismatchError(
                f"gates were trained for T={self.steps} sampling steps, not {steps}: "
                f"sample with {self.steps} steps or train gates for {steps} (lazydit train-gates --steps {steps})"
            )


def _read_header(path, header: dict) -> dict:
    """The JSON values of a gate file's metadata; a value that is not JSON names the file and the key."""
    meta = {}
    for k, v in header.items():
        try:
            meta[k] = json.loads(v)
        except ValueError:
            raise GateMismatchError(f"{path}: metadata {k!r} is not JSON ({v[:40]!r}): not a lazydit gate file, or "
                                    "a damaged one") from None
    return meta


def _flag(path, meta: dict, key: str, default: bool) -> bool:
    """A true/false field of the header: JSON true or false only ("no" or 1 is refused, not read as true)."""
    v = meta.get(key, default)
    if not isinstance(v, bool):
        raise GateMismatchError(f"{path}: metadata {key!r} is {v!r}, not true or false")
    return v


PARITY_RATIO_CAP = 0.5  # the reference parity computes every odd step, so at most half the modules skip


def check_reachable(target: float | None, parity: bool = True, name: str = "target lazy ratio"):
    """Refuse a calibration target that gates under the reference parity cannot reach, before any work.

    The reference parity computes every odd step, so no threshold takes the lazy ratio past 0.5; gates on every
    step (`parity=False`) have no such cap. The exact reachable range of a gate set is only known by sampling
    (calibration states it); this check only refuses what is out of reach by construction.

    Args:
        target: the lazy ratio asked for, or None (nothing asked: nothing to check).
        parity: whether the gates follow the reference parity (`LazyGates.parity`).
        name: how the message names the target (the CLI passes its flag, `--target-ratio`).
    Raises:
        UsageError: `parity` and `target` > 0.5.
    """
    if parity and target is not None and target > PARITY_RATIO_CAP:
        raise UsageError(f"{name} {target}: out of reach, the reference parity (odd steps always compute) caps the "
                         f"lazy ratio at {PARITY_RATIO_CAP}")
