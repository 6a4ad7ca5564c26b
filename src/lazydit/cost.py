"""Cost accounting the paper's way (spec 3.5): MACs of Linear and Conv layers of one forward of one image."""

from .models import DiTConfig


def _large(cfg) -> bool:
    return type(cfg).__name__ == "LargeDiTConfig"


def module_macs(cfg: DiTConfig) -> dict:
    """Linear MACs of one attn and one mlp module for one image: {"attn": 4 N D^2, "mlp": 2 N D H}."""
    if _large(cfg):  # Large-DiT: SwiGLU FFN, no biases (lazydit.large_dit)
        from .large_dit import module_macs as large_module_macs

        return large_module_macs(cfg)
    N, D = cfg.num_tokens, cfg.hidden_size
    H = int(D * cfg.mlp_ratio)
    return {"attn": N * D * 3 * D + N * D * D, "mlp": N * D * H + N * H * D}


def attention_matmul_macs(cfg: DiTConfig) -> int:
    """MACs of the attention matmuls (QK^T and AV) of one block for one image: 2 N^2 D."""
    return 2 * cfg.num_tokens**2 * cfg.hidden_size


def forward_macs(cfg: DiTConfig, attention_matmuls: bool = False) -> int:
    """MACs of one DiT forward of one image, Linear and Conv layers as pytorch-OpCounter counts them.

    Args:
        cfg: the model config.
        attention_matmuls: also count QK^T and AV (the "full" count; the paper leaves them out).
    Returns:
        MACs (int). DiT-XL/2 at 256^2: 114.39e9 (118.6e9 with attention matmuls).
    """
    if _large(cfg):
        from .large_dit import forward_macs as large_forward_macs

        return large_forward_macs(cfg, attention_matmuls)
    N, D, p = cfg.num_tokens, cfg.hidden_size, cfg.patch_size
    m = module_macs(cfg)
    per_block = m["attn"] + m["mlp"] + D * 6 * D  # + adaLN modulation Linear(D, 6D) on one row
    if attention_matmuls:
        per_block += attention_matmul_macs(cfg)
    patch = N * cfg.in_channels * p * p * D
    t_embed = 256 * D + D * D
    final = D * 2 * D + N * D * p * p * cfg.out_channels
    return cfg.depth * per_block + patch + t_embed + final


def gate_macs(cfg: DiTConfig) -> int:
    """MACs of the 2 L gate scores of one forward of one image: 2 L N D."""
    return 2 * cfg.depth * cfg.num_tokens * cfg.hidden_size


def sampling_macs(cfg: DiTConfig, steps: int, stats=None, attention_matmuls: bool = False) -> float:
    """MACs per image of a whole sampling run (CFG not doubled, as the paper).

    Args:
        cfg: the model config.
        steps: T.
        stats: LazyStats of the run (None for plain DDIM): skipped modules are subtracted, gates added.
        attention_matmuls: count attention matmuls too (skipping an attn module skips them as well).
    Returns:
        MACs per image (float).
    """
    total = steps * forward_macs(cfg, attention_matmuls)
    if stats is None:
        return float(total)
    m = module_macs(cfg)
    attn = m["attn"] + (attention_matmul_macs(cfg) if attention_matmuls else 0)
    skipped = stats.skipped.sum(dim=(0, 1)).double()  # (2,) per branch
    rows = float(stats.total.sum()) / (2 * cfg.depth * steps)  # rows per forward (both CFG halves)
    saved = (float(skipped[0]) * attn + float(skipped[1]) * m["mlp"]) / rows  # per row = per image
    return float(total - saved + steps * gate_macs(cfg))
