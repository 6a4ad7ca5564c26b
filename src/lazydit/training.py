"""Gate training on a frozen DiT: the released 3-pass recipe (spec 3.4), checkpointed and resumable."""

import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .checkpoint import torch_save_atomic
from .diffusion import Schedule
from .lazy import LazyGates, apply_lazy


@dataclass
class GateTrainConfig:
    steps: int = 50  # T: sampling steps the gates are for
    iters: int = 500  # optimiser steps (reference: 500)
    batch_size: int = 64  # images per step (reference script: 64 per GPU x 8)
    lr: float = 1e-4  # AdamW learning rate (reference)
    weight_decay: float = 0.0  # AdamW weight decay (reference)
    rho_attn: float = 1e-2  # penalty on the attn compute probabilities (paper: 1e-2 .. 1e-1)
    rho_mlp: float = 1e-2  # penalty on the mlp compute probabilities
    label_drop: float = 0.1  # share of labels replaced by the null label, shared by all three passes
    seed: int = 0  # data order, step indices, noise
    ckpt_every: int = 100  # steps between atomic checkpoints
    out: str | None = None  # folder for checkpoint.pt and gates.safetensors (None: no files)
    resume: bool = False  # continue from out/checkpoint.pt
    lookahead: bool = False  # train look-ahead gates: gate k-1 scores the input recorded at step k (beyond the paper)


def gate_loss_step(model, handle, x0, y, k: int, drop, noise, sched: Schedule, rho_attn: float, rho_mlp: float):
    """One 3-pass loss evaluation (record at odd k, teacher and soft student at k-1).

    Args:
        model: the frozen DiT with gates attached through `handle`.
        x0: (B, C, H, W) data; y: (B,) labels; drop: (B,) 0/1 label-drop mask shared by the passes.
        k: odd respaced index; the gates of index k-1 are trained.
        noise: (B, C, H, W) eps for q_sample.
    Returns:
        (loss, mse, p_attn (B, L), p_mlp (B, L)).
    """
    B, C = x0.shape[:2]
    with torch.no_grad():  # pass 1: one full DDIM step at k that fills every cache
        handle.mode = "record"
        x_k = sched.q_sample(x0, k, noise)
        eps = model(x_k, sched.timesteps(k, B, x0.device), y, force_drop_ids=drop)[:, :C]
        x_prev = sched.ddim_step(x_k, eps, k)
        handle.mode = "off"  # pass 2: teacher, the full model at k-1
        t_prev = sched.timesteps(k - 1, B, x0.device)
        teacher = model(x_prev, t_prev, y, force_drop_ids=drop)
    handle.mode = "soft"  # pass 3: student, y = p F(Z) + (1 - p) cache with the gates of index k-1
    handle.state.probs.clear()
    student = model(x_prev, t_prev, y, force_drop_ids=drop)
    mse = ((teacher - student) ** 2).mean(dim=(1, 2, 3)).mean()  # all output channels
    p_attn = torch.stack([p for b, p in handle.state.probs if b == 0], dim=1)  # (B, L)
    p_mlp = torch.stack([p for b, p in handle.state.probs if b == 1], dim=1)
    loss = mse + rho_attn * p_attn.sum(1).mean() + rho_mlp * p_mlp.sum(1).mean()
    handle.state.probs.clear()
    return loss, mse, p_attn, p_mlp


def train_gates(model, data, cfg: GateTrainConfig, threshold: float = 0.5, progress: bool = True,
                extra_meta: dict | None = None, callback=None) -> LazyGates:
    """Train LazyDiT gates on a frozen model.

    Args:
        model: a DiT; it is frozen (requires_grad False) and put in eval mode.
        data: an iterator of (x0 (B, C, H, W), y (B,)) batches, e.g. `InfiniteSampler`; on resume its
            `load_state_dict` is called with the saved position when it has one.
        cfg: GateTrainConfig.
        threshold: compute threshold stored with the gates.
        progress: progress bar with loss and lazy ratio.
        extra_meta: more metadata for the gate file (e.g. the model path).
        callback: called as callback(dict(iter=i, loss=..., mse=..., skip=...)) after each step.
    Returns:
        The trained LazyGates (also written to out/gates.safetensors when cfg.out is set).
    """
    if cfg.steps < 2:
        raise ValueError("gate training needs T >= 2 (odd respaced indices)")
    device = next(model.parameters()).device
    model.eval().requires_grad_(False)
    gates = LazyGates.for_model(model, cfg.steps, threshold, lookahead=cfg.lookahead)
    opt = torch.optim.AdamW(gates.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    gen = torch.Generator().manual_seed(cfg.seed)
    sched = Schedule(cfg.steps)
    odd = torch.arange(1, cfg.steps, 2)  # trains gates k-1: the even indices (reference parity)
    it, log = 0, []
    out = Path(cfg.out) if cfg.out else None
    ckpt = out / "checkpoint.pt" if out else None

    def save_ckpt():
        state = dict(gates=gates.state_dict(), opt=opt.state_dict(), gen=gen.get_state(), iter=it, log=log,
                     config=asdict(cfg))
        if hasattr(data, "state_dict"):
            state["data"] = data.state_dict()
        torch_save_atomic(state, ckpt)

    if cfg.resume:
        if ckpt is None or not ckpt.exists():
            raise FileNotFoundError(f"--resume: no checkpoint at {ckpt}")
        state = torch.load(ckpt, map_location="cpu", weights_only=False)
        if state["config"]["steps"] != cfg.steps:
            raise ValueError(f"checkpoint is for T={state['config']['steps']}, not {cfg.steps}")
        gates.load_state_dict(state["gates"])
        opt.load_state_dict(state["opt"])
        gen.set_state(state["gen"])
        it, log = state["iter"], state["log"]
        if "data" in state and hasattr(data, "load_state_dict"):
            data.load_state_dict(state["data"])

    handle = apply_lazy(model, gates, mode="soft", threshold=threshold)
    bar = tqdm(total=cfg.iters, initial=it, desc=f"train-gates T={cfg.steps}", disable=not progress)
    t0 = time.time()
    try:
        while it < cfg.iters:
            x0, y = next(data)
            x0, y = x0.to(device), y.to(device)
            B = x0.shape[0]
            k = int(odd[torch.randint(len(odd), (1,), generator=gen)])
            drop = (torch.rand(B, generator=gen) < cfg.label_drop).long().to(device)
            noise = torch.randn(x0.shape, generator=gen).to(device)
            loss, mse, pa, pm = gate_loss_step(model, handle, x0, y, k, drop, noise, sched,
                                               cfg.rho_attn, cfg.rho_mlp)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            it += 1
            skip = float(torch.cat([pa, pm], 1).detach().lt(threshold).float().mean())
            rec = dict(iter=it, k=k, loss=loss.item(), mse=mse.item(), skip=skip)
            log.append(rec)
            bar.update(1)
            bar.set_postfix(loss=f"{rec['loss']:.4g}", lazy=f"{skip:.0%}")
            if callback is not None:
                callback(rec)
            if ckpt is not None and (it % cfg.ckpt_every == 0 or it == cfg.iters):
                save_ckpt()
    finally:
        handle.remove()
        bar.close()
    gates.meta["training"] = {**asdict(cfg), "final_iter": it, "seconds": time.time() - t0}
    gates.meta.update(extra_meta or {})
    if out is not None:
        gates.save(out / "gates.safetensors")
    return gates
