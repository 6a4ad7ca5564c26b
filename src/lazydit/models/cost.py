"""Cost accounting the paper's way (docs/method-notes.md §4): MACs of Linear and Conv layers of one forward of one image."""

from lazydit.models.dit import DiTConfig
from lazydit.models.large_dit import LargeDiTConfig


def module_macs(cfg: DiTConfig | LargeDiTConfig) -> dict:
    """Linear MACs of one attn and one mlp module for one image: DiT {"attn": 4 N D^2, "mlp": 2 N D H}; Large-DiT
    (SwiGLU FFN, grouped kv heads) {"attn": N D (2 D + 2 kv), "mlp": 3 N D H}."""
    N, D = cfg.num_tokens, cfg.hidden_size
    if isinstance(cfg, LargeDiTConfig):
        kv = (cfg.num_kv_heads or cfg.num_heads) * cfg.head_dim
        return {"attn": N * D * (2 * D + 2 * kv), "mlp": 3 * N * D * cfg.ffn_hidden_size}  # wq wk wv wo; w1 w2 w3
    H = int(D * cfg.mlp_ratio)
    return {"attn": N * D * 3 * D + N * D * D, "mlp": N * D * H + N * H * D}


def attention_matmul_macs(cfg: DiTConfig) -> int:
    """MACs of the attention matmuls (QK^T and AV) of one block for one image: 2 N^2 D."""
    return 2 * cfg.num_tokens**2 * cfg.hidden_size


def forward_macs(cfg: DiTConfig | LargeDiTConfig, attention_matmuls: bool = False) -> int:
    """MACs of one DiT forward of one image, Linear and Conv layers as pytorch-OpCounter counts them.

    Args:
        cfg: the model config.
        attention_matmuls: also count QK^T and AV (the "full" count; the paper leaves them out).
    Returns:
        MACs (int). DiT-XL/2 at 256^2: 114.39e9 (118.6e9 with attention matmuls).
    """
    N, D, p = cfg.num_tokens, cfg.hidden_size, cfg.patch_size
    m = module_macs(cfg)
    if isinstance(cfg, LargeDiTConfig):  # adaLN from a condition of width min(D, 1024); no biases
        cond = cfg.cond_size
        per_block = m["attn"] + m["mlp"] + cond * 6 * D + (2 * N * N * D if attention_matmuls else 0)
        embed = N * cfg.in_channels * p * p * D + 256 * cond + cond * cond
        return cfg.depth * per_block + embed + cond * 2 * D + N * D * p * p * cfg.out_channels
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


def forecast_macs(cfg: DiTConfig, order: int) -> int:
    """Elementwise multiply-adds of forecast reuse of `order` in one forward of one image (not Linear MACs: counted
    so that a forecast is not free): every branch evaluation either extends its history (a computed row) or
    evaluates the polynomial (a skipped row), `order` multiply-adds per output element: 2 L N D order."""
    return 2 * cfg.depth * cfg.num_tokens * cfg.hidden_size * order


def sampling_macs(cfg: DiTConfig | LargeDiTConfig, steps: int, stats=None, attention_matmuls: bool = False,
                  forecast: int = 0, overhead: int | None = None) -> float:
    """MACs per image of a whole sampling run (CFG not doubled, as the paper).

    Args:
        cfg: the model config.
        steps: T.
        stats: LazyStats of the run (None for plain DDIM): skipped modules are subtracted, gates added. A
            token-wise run counts tokens (`lazydit.lazy.tokens`): a branch run on n of N tokens saves (N - n) / N of
            its MACs, exact for its Linear layers (each token is one row of their products); such partial runs
            are of token-wise branches only (the MLP), so attention, matmuls included, is skipped or run whole.
        attention_matmuls: count attention matmuls too (skipping an attn module skips them as well).
        forecast: order of the forecast reuse (its elementwise work is added, `forecast_macs`).
        overhead: what the caching policy adds per forward of one image (`Policy.overhead_macs`); None: the gate
            scores and the forecast (LazyDiT's gates).
    Returns:
        MACs per image (float).
    """
    total = steps * forward_macs(cfg, attention_matmuls)
    if stats is None:
        return float(total)
    m = module_macs(cfg)
    attn = m["attn"] + (attention_matmul_macs(cfg) if attention_matmuls else 0)
    skipped = stats.skipped.sum(dim=(0, 1)).double()  # (2,) per branch
    rows = float(stats.total.sum()) / (2 * cfg.depth * steps)  # rows (or tokens) per forward (both CFG halves)
    saved = (float(skipped[0]) * attn + float(skipped[1]) * m["mlp"]) / rows  # per row = per image (unit-free)
    if overhead is None:
        overhead = gate_macs(cfg) + forecast_macs(cfg, forecast)
    return float(total - saved + steps * overhead)
