"""Large-DiT ("DiT-Llama", Alpha-VLLM LLaMA2-Accessory `Large-DiT-ImageNet`), with the reference module names.

A LLaMA-style DiT (docs/method-notes.md §6): Linear patch embedding, 1-D rotary embeddings on q and k, optional LayerNorm on
q and k, bias-free attention and SwiGLU FFN, RMSNorm, conditioning width min(D, 1024), adaLN-Zero.
Module names are a contract: the released `consolidated_ema.00-of-01.pth` (with its `model_args.pth`) loads with
`strict=True` (`load_large_dit`).
"""

import argparse
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from lazydit.errors import CheckpointError
from lazydit.models.checkpoint import load_state_dict_strict
from lazydit.files import torch_save_atomic
from lazydit.models.dit import (
    ConditionalTransformer,
    FinalLayer,
    LabelEmbedder,
    TimestepEmbedder,
    modulate,
    zoo_config,
)
from lazydit.models.registry import BlockSpec, register_block

ARGS_FILE = "model_args.pth"
EMA_FILE = "consolidated_ema.00-of-01.pth"
MODEL_FILE = "consolidated.00-of-01.pth"


@dataclass
class LargeDiTConfig:
    input_size: int = 32  # latent size, square (image_size // 8)
    patch_size: int = 2
    in_channels: int = 4
    hidden_size: int = 4096  # D ("dim")
    depth: int = 32  # L ("n_layers")
    num_heads: int = 32  # "n_heads"
    num_kv_heads: int | None = None  # "n_kv_heads" (grouped-query attention); None = num_heads
    multiple_of: int = 256  # the SwiGLU hidden width is rounded up to a multiple of this
    ffn_dim_multiplier: float | None = None
    norm_eps: float = 1e-5  # RMSNorm eps
    qk_norm: bool = False  # LayerNorm on q and k (on in the released 7B recipe)
    rope_theta: float = 10000.0
    max_tokens: int = 4096  # length of the precomputed rotary table
    class_dropout_prob: float = 0.1
    num_classes: int = 1000
    learn_sigma: bool = True

    @property
    def out_channels(self) -> int:
        return self.in_channels * 2 if self.learn_sigma else self.in_channels

    @property
    def num_tokens(self) -> int:
        return (self.input_size // self.patch_size) ** 2

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def cond_size(self) -> int:
        """Width of the timestep/label embedding c: min(D, 1024)."""
        return min(self.hidden_size, 1024)

    @property
    def ffn_hidden_size(self) -> int:
        """SwiGLU width as the reference: int(2 * 4D / 3), times ffn_dim_multiplier, rounded up to multiple_of."""
        hidden = int(2 * (4 * self.hidden_size) / 3)
        if self.ffn_dim_multiplier is not None:
            hidden = int(self.ffn_dim_multiplier * hidden)
        return self.multiple_of * ((hidden + self.multiple_of - 1) // self.multiple_of)


# Zoo: our names -> config fields; the reference names (`DiT_Llama_7B_patch2`, as in model_args.pth) map onto them.
LARGE_DIT_MODELS = {
    "DiT-Llama-600M/2": dict(hidden_size=1536, depth=16, num_heads=32, patch_size=2),
    "DiT-Llama-3B/2": dict(hidden_size=3072, depth=32, num_heads=32, patch_size=2),
    "DiT-Llama-7B/2": dict(hidden_size=4096, depth=32, num_heads=32, patch_size=2),
}
REFERENCE_NAMES = {
    "DiT_Llama_600M_patch2": "DiT-Llama-600M/2",
    "DiT_Llama_3B_patch2": "DiT-Llama-3B/2",
    "DiT_Llama_7B_patch2": "DiT-Llama-7B/2",
}


def precompute_freqs_cis(dim: int, end: int, theta: float = 10000.0) -> torch.Tensor:
    """1-D rotary table: (end, dim/2) complex64, entry [m, i] = exp(j m theta^(-2i/dim)). Always on the CPU."""
    freqs = 1.0 / (theta ** (torch.arange(0, dim, 2, device="cpu")[: dim // 2].float() / dim))
    t = torch.arange(end, device="cpu").float()
    angles = torch.outer(t, freqs)  # (end, dim/2)
    return torch.polar(torch.ones_like(angles), angles)


def apply_rotary_emb(xq, xk, freqs_cis):
    """Rotate q (B, N, h, hd) and k (B, N, h_kv, hd) by freqs_cis (N, hd/2), pairs (2i, 2i+1), in float32."""
    shape = (1, freqs_cis.shape[0], 1, freqs_cis.shape[1])
    f = freqs_cis.view(shape)
    xq_ = torch.view_as_complex(xq.float().reshape(*xq.shape[:-1], -1, 2))
    xk_ = torch.view_as_complex(xk.float().reshape(*xk.shape[:-1], -1, 2))
    xq_out = torch.view_as_real(xq_ * f).flatten(3)
    xk_out = torch.view_as_real(xk_ * f).flatten(3)
    return xq_out.type_as(xq), xk_out.type_as(xk)


class RMSNorm(nn.Module):
    """x / sqrt(mean(x^2) + eps) * weight, computed in float32 (apex FusedRMSNorm's keys: `weight`)."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x) * self.weight


class Attention(nn.Module):
    """Bias-free multi-head attention with rotary q/k and optional q/k LayerNorm: wq, wk, wv, wo, q_norm, k_norm."""

    def __init__(self, dim: int, n_heads: int, n_kv_heads: int | None, qk_norm: bool):
        super().__init__()
        self.n_heads = n_heads
        self.n_kv_heads = n_heads if n_kv_heads is None else n_kv_heads
        self.n_rep = n_heads // self.n_kv_heads
        self.head_dim = dim // n_heads
        self.wq = nn.Linear(dim, n_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(dim, self.n_kv_heads * self.head_dim, bias=False)
        self.wv = nn.Linear(dim, self.n_kv_heads * self.head_dim, bias=False)
        self.wo = nn.Linear(n_heads * self.head_dim, dim, bias=False)
        if qk_norm:  # over the whole projection, before the split into heads, as the reference
            self.q_norm = nn.LayerNorm(n_heads * self.head_dim)
            self.k_norm = nn.LayerNorm(self.n_kv_heads * self.head_dim)
        else:
            self.q_norm = self.k_norm = nn.Identity()

    def forward(self, x, freqs_cis):
        """x (B, N, D), freqs_cis (N, head_dim/2) complex -> (B, N, D)."""
        B, N, _ = x.shape
        xq, xk, xv = self.wq(x), self.wk(x), self.wv(x)
        dtype = xq.dtype
        xq, xk = self.q_norm(xq), self.k_norm(xk)
        xq = xq.view(B, N, self.n_heads, self.head_dim)
        xk = xk.view(B, N, self.n_kv_heads, self.head_dim)
        xv = xv.view(B, N, self.n_kv_heads, self.head_dim)
        xq, xk = apply_rotary_emb(xq, xk, freqs_cis)
        xq, xk = xq.to(dtype), xk.to(dtype)
        if self.n_rep > 1:  # query head i uses kv head i // n_rep
            xk = xk.repeat_interleave(self.n_rep, dim=2)
            xv = xv.repeat_interleave(self.n_rep, dim=2)
        out = F.scaled_dot_product_attention(xq.transpose(1, 2), xk.transpose(1, 2), xv.transpose(1, 2))
        return self.wo(out.transpose(1, 2).flatten(2))  # (B, N, h * hd)


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x), bias-free."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)
        self.w3 = nn.Linear(dim, hidden, bias=False)

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class TransformerBlock(nn.Module):
    """adaLN-Zero LLaMA block.

    With c = t_emb + y_emb (B, min(D, 1024)) and rotary table f:
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = adaLN_modulation(c).chunk(6, dim=1)
        x = x + gate_msa[:, None] * attention(modulate(attention_norm(x), shift_msa, scale_msa), f)
        x = x + gate_mlp[:, None] * feed_forward(modulate(ffn_norm(x), shift_mlp, scale_mlp))
    The gates multiply as they are (no tanh, unlike later Lumina/Next-DiT blocks). Same chunk order as DiTBlock.
    Caching methods find its parts through the block registry (registered below): the branches are `attention`
    (called with the rotary table as its extra argument) and `feed_forward`.
    """

    def __init__(self, layer_id: int, cfg: LargeDiTConfig):
        super().__init__()
        D = cfg.hidden_size
        self.layer_id = layer_id
        self.dim = D
        self.head_dim = cfg.head_dim
        self.attention = Attention(D, cfg.num_heads, cfg.num_kv_heads, cfg.qk_norm)
        self.feed_forward = FeedForward(D, cfg.ffn_hidden_size)
        self.attention_norm = RMSNorm(D, eps=cfg.norm_eps)
        self.ffn_norm = RMSNorm(D, eps=cfg.norm_eps)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(cfg.cond_size, 6 * D, bias=True))

    def modulation(self, c):
        """c (B, cond) -> the six (B, D) chunks: shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp."""
        return self.adaLN_modulation(c).chunk(6, dim=1)

    def forward(self, x, freqs_cis, adaln_input=None):
        """x (B, N, D), freqs_cis (N, hd/2), adaln_input c (B, cond) or None (unmodulated, as the reference)."""
        if adaln_input is None:
            x = x + self.attention(self.attention_norm(x), freqs_cis)
            return x + self.feed_forward(self.ffn_norm(x))
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.modulation(adaln_input)
        x = x + gate_msa.unsqueeze(1) * self.attention(modulate(self.attention_norm(x), shift_msa, scale_msa),
                                                        freqs_cis)
        x = x + gate_mlp.unsqueeze(1) * self.feed_forward(modulate(self.ffn_norm(x), shift_mlp, scale_mlp))
        return x


def _block_inputs(block, freqs_cis, adaln_input=None):
    """A block's forward arguments for caching methods: (c, (extra args of attention, of feed_forward))."""
    return adaln_input, ((freqs_cis,), ())


register_block(TransformerBlock, BlockSpec(branches=("attention", "feed_forward"),
                                           norms=("attention_norm", "ffn_norm"),
                                           inputs=_block_inputs))


class LargeDiT(ConditionalTransformer):
    """Class-conditional DiT-Llama; `forward(x, t, y)` as our DiT's. Blocks are `layers` (also `blocks`)."""

    def __init__(self, config: LargeDiTConfig):
        super().__init__(config)
        self.input_size = config.input_size
        self.learn_sigma = config.learn_sigma
        p, C, D = config.patch_size, config.in_channels, config.hidden_size
        self.x_embedder = nn.Linear(p * p * C, D, bias=True)
        self.t_embedder = TimestepEmbedder(config.cond_size)
        self.y_embedder = LabelEmbedder(config.num_classes, config.cond_size, config.class_dropout_prob)
        self.layers = nn.ModuleList([TransformerBlock(i, config) for i in range(config.depth)])
        self.final_layer = FinalLayer(D, p, self.out_channels, cond_size=config.cond_size)
        # Not a buffer (not in the reference state dict, and complex: kept out of .to(dtype)); moved in forward.
        self.freqs_cis = precompute_freqs_cis(config.head_dim, config.max_tokens, config.rope_theta)
        self.initialize_weights()

    @property
    def blocks(self):
        """The transformer blocks (alias of `layers`, the reference name), for code written for DiT."""
        return self.layers

    def initialize_weights(self):
        """The reference initialisation: xavier Linear weights, N(0, 0.02) embeddings, zero adaLN and output."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        self.zero_adaln()

    def patchify(self, x):
        """(B, C, H, W) -> (B, N, C*p*p), features ordered (C, p, p) as the reference."""
        B, C, H, W = x.shape
        if (H, W) != (self.input_size, self.input_size):
            raise ValueError(f"input of size {H}x{W}, but this model takes {self.input_size}x{self.input_size}")
        p = self.patch_size
        x = x.view(B, C, H // p, p, W // p, p)
        return x.permute(0, 2, 4, 1, 3, 5).flatten(-3).flatten(1, 2)

    def rotary(self, n_tokens: int, device) -> torch.Tensor:
        """The first n_tokens rows of the rotary table, on `device` (moved once and kept there)."""
        if n_tokens > self.freqs_cis.shape[0]:
            raise ValueError(f"{n_tokens} tokens exceed the rotary table ({self.freqs_cis.shape[0]})")
        if self.freqs_cis.device != torch.device(device):
            self.freqs_cis = self.freqs_cis.to(device)
        return self.freqs_cis[:n_tokens]

    def forward(self, x, t, y, force_drop_ids=None):
        """x (B, C, H, W), t (B,) original timesteps, y (B,) labels -> (B, C_out, H, W)."""
        x = self.x_embedder(self.patchify(x))  # (B, N, D)
        c = self.t_embedder(t) + self.y_embedder(y, self.training, force_drop_ids)  # (B, cond)
        freqs_cis = self.rotary(x.shape[1], x.device)
        for layer in self.layers:
            x = layer(x, freqs_cis, adaln_input=c)
        return self.unpatchify(self.final_layer(x, c))


def large_dit_config(name: str, **overrides) -> LargeDiTConfig:
    """The LargeDiTConfig of a zoo entry (`"DiT-Llama-7B/2"` or the reference `"DiT_Llama_7B_patch2"`)."""
    return zoo_config(LARGE_DIT_MODELS, LargeDiTConfig, REFERENCE_NAMES.get(name, name), overrides, "Large-DiT")


def create_large_dit(name: str, **overrides) -> LargeDiT:
    """Build a zoo Large-DiT, reference-initialised (use `with torch.device("meta"):` to build without memory).

    Args:
        name: a key of LARGE_DIT_MODELS or a reference name (`DiT_Llama_3B_patch2`).
        **overrides: LargeDiTConfig fields (input_size=64 for 512x512, qk_norm=True, ...).
    Returns:
        The LargeDiT, with `.name` set to our zoo name.
    """
    model = LargeDiT(large_dit_config(name, **overrides))
    model.name = REFERENCE_NAMES.get(name, name)
    return model


def _torch_load(path: Path, what: str, weights_only: bool = True, mmap: bool = False):
    """torch.load with CheckpointError for truncated or foreign files (argparse.Namespace allowed)."""
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(str(path), map_location="cpu", weights_only=weights_only, mmap=mmap)
    except Exception as e:
        if mmap and "mmap" in str(e):  # legacy (non-zip) files cannot be memory-mapped
            return _torch_load(path, what, weights_only, mmap=False)
        raise CheckpointError(f"{path}: cannot be read as {what} ({type(e).__name__}: {e})") from e


def read_model_args(path, trust: bool = False) -> dict:
    """Read a Large-DiT `model_args.pth` (the training script's argparse.Namespace, or a dict) into a dict.

    Args:
        path: the file.
        trust: when the safe loader refuses the file, unpickle it with weights_only=False, which runs whatever code
            the pickle names: only for files you trust (the released `model_args.pth` from its source). Default
            False: refused with a CheckpointError.
    Returns:
        The arguments as a dict (at least `model`; usually `image_size`, `num_classes`, `qk_norm`).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Large-DiT arguments not found: {path}")
    try:
        args = _torch_load(path, ARGS_FILE)
    except CheckpointError as e:
        if not trust:
            raise CheckpointError(f"{e}\n(if the file is a trusted pickle with other objects, pass trust=True)") from e
        args = _torch_load(path, ARGS_FILE, weights_only=False)
    if isinstance(args, argparse.Namespace):
        args = vars(args)
    if not isinstance(args, dict) or "model" not in args:
        raise CheckpointError(f"{path}: expected the training arguments (a Namespace or dict with 'model'), "
                              f"found {type(args).__name__}")
    return dict(args)


def config_from_args(args: dict, **overrides) -> LargeDiTConfig:
    """LargeDiTConfig from `model_args.pth` entries: model name, image_size (latent = image_size / 8), num_classes,
    qk_norm, and any LargeDiTConfig field (or reference constructor argument: dim, n_layers, ...) present.
    A model name outside the zoo is accepted when the args carry hidden_size, depth and num_heads."""
    name = args["model"]
    fields = {}
    if args.get("image_size") is not None:
        if int(args["image_size"]) % 8:
            raise CheckpointError(f"model_args image_size {args['image_size']} is not a multiple of 8")
        fields["input_size"] = int(args["image_size"]) // 8
    aliases = {"dim": "hidden_size", "n_layers": "depth", "n_heads": "num_heads", "n_kv_heads": "num_kv_heads"}
    for k, v in args.items():
        k = aliases.get(k, k)
        if k in LargeDiTConfig.__dataclass_fields__ and v is not None:
            fields[k] = v
    fields.update(overrides)
    if REFERENCE_NAMES.get(name, name) in LARGE_DIT_MODELS:
        return large_dit_config(name, **fields)
    if {"hidden_size", "depth", "num_heads"} <= set(fields):  # a custom model whose args carry its config
        return LargeDiTConfig(**fields)
    raise CheckpointError(f"model_args names model {name!r}, not a Large-DiT ({', '.join(REFERENCE_NAMES)})")


def _find_files(path):
    """(weights, args or None) from a checkpoint folder, a weights file, or a pair of files in any order."""
    if isinstance(path, (list, tuple)):
        paths = [Path(p) for p in path]
        args = [p for p in paths if p.name == ARGS_FILE]
        weights = [p for p in paths if p.name != ARGS_FILE]
        if len(weights) != 1 or len(args) > 1:
            raise ValueError(f"expected one weights file and at most one {ARGS_FILE}, got {[str(p) for p in paths]}")
        return weights[0], (args[0] if args else None)
    path = Path(path)
    if path.is_dir():
        for name in (EMA_FILE, MODEL_FILE):
            if (path / name).is_file():
                return path / name, (path / ARGS_FILE if (path / ARGS_FILE).is_file() else None)
        raise FileNotFoundError(f"{path}: no {EMA_FILE} (or {MODEL_FILE}); download a checkpoint folder of "
                                "https://huggingface.co/Alpha-VLLM/Large-DiT (e.g. 240218_7b_bs512_step620k)")
    if not path.is_file():
        raise FileNotFoundError(f"Large-DiT checkpoint not found: {path}")
    sibling = path.parent / ARGS_FILE
    return path, (sibling if sibling.is_file() else None)


def load_large_dit(path, name: str | None = None, dtype=torch.float32, device="cpu", trust_args: bool = False,
                   **overrides) -> LargeDiT:
    """Build a Large-DiT from a released checkpoint and load its weights strictly.

    The model is built on the meta device and the weights are assigned (memory-mapped reads), so a 7B checkpoint
    costs its own size once, not twice.

    Args:
        path: a checkpoint folder (`consolidated_ema.00-of-01.pth` preferred over `consolidated.00-of-01.pth`, plus
            `model_args.pth`), a weights file (its sibling `model_args.pth` is used when present), or a
            (weights, model_args) pair.
        name: zoo or reference name, needed only when there is no `model_args.pth`; it overrides the args' model.
        dtype: parameter dtype (None keeps the file's).
        device: where the model goes.
        trust_args: unpickle `model_args.pth` unsafely if the safe loader refuses it.
        **overrides: LargeDiTConfig fields (e.g. input_size=64 when there are no args for a 512x512 model).
    Returns:
        The LargeDiT in eval mode.
    """
    weights, args_path = _find_files(path)
    args = read_model_args(args_path, trust=trust_args) if args_path is not None else {}
    if name is not None:
        args["model"] = name
    if "model" not in args:
        raise ValueError(f"{weights}: no {ARGS_FILE} next to it; pass the model name (e.g. DiT-Llama-7B/2)")
    cfg = config_from_args(args, **overrides)
    state = _torch_load(weights, "a Large-DiT state dict", mmap=True)
    if not isinstance(state, dict):
        raise CheckpointError(f"{weights}: expected a state dict, found {type(state).__name__}")
    with torch.device("meta"):
        model = LargeDiT(cfg)
    model.name = REFERENCE_NAMES.get(args["model"], args["model"])
    source = f"{weights} (with {args_path or 'no model_args'}: {model.name}, {cfg.input_size * 8}px, " \
             f"qk_norm={cfg.qk_norm})"
    with warnings.catch_warnings():  # the strict check's copy into meta tensors is a no-op: silence its warning
        warnings.simplefilter("ignore", UserWarning)
        load_state_dict_strict(model, state, source=source)
    model.load_state_dict(state, strict=True, assign=True)
    if dtype is not None:
        model.to(dtype)
    return model.to(device).eval()


def save_large_dit(model: LargeDiT, folder, args: dict | None = None, ema: bool = True):
    """Write a checkpoint folder in the released format: consolidated(_ema).00-of-01.pth + model_args.pth.

    Args:
        model: the LargeDiT.
        folder: output folder (created).
        args: extra training arguments; `model`, `image_size`, `num_classes`, `qk_norm` and the config fields are
            filled in from the model.
        ema: name the weights `consolidated_ema` (else `consolidated`).
    """
    folder = Path(folder)
    cfg = model.config
    ref = {v: k for k, v in REFERENCE_NAMES.items()}
    name = getattr(model, "name", None)
    meta = dict(model=ref.get(name, "DiT_Llama_custom"), image_size=cfg.input_size * 8, num_classes=cfg.num_classes,
                qk_norm=cfg.qk_norm)
    meta.update(asdict(cfg))  # beyond the reference's args: the whole config, so custom sizes reload too
    meta.update(args or {})
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    torch_save_atomic(state, folder / (EMA_FILE if ema else MODEL_FILE))
    torch_save_atomic(argparse.Namespace(**meta), folder / ARGS_FILE)


def parameter_count(name: str, **overrides) -> int:
    """Parameters of a zoo model, counted on the meta device."""
    with torch.device("meta"):
        model = create_large_dit(name, **overrides)
    return sum(p.numel() for p in model.parameters())


__all__ = ["LargeDiT", "LargeDiTConfig", "LARGE_DIT_MODELS", "REFERENCE_NAMES", "TransformerBlock",
           "create_large_dit", "large_dit_config", "load_large_dit", "save_large_dit", "read_model_args",
           "config_from_args", "precompute_freqs_cis", "apply_rotary_emb", "parameter_count"]
