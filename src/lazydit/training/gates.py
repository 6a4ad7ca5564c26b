"""Gate training on a frozen DiT: the released 3-pass recipe (docs/method-notes.md), checkpointed and resumable, data-parallel
under torchrun (see `train_gates`)."""

import contextlib
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from lazydit import ranks as dist
from lazydit.training.resume import check_resume_settings, load_checkpoint, plain, restoring, save_checkpoint
from lazydit.errors import NonFiniteError, UsageError
from lazydit.sampling.schedule import Schedule
from lazydit.lazy import LazyGates, apply_lazy


@dataclass
class GateTrainConfig:
    steps: int = 50  # T: sampling steps the gates are for
    iters: int = 500  # optimiser steps (reference: 500)
    batch_size: int = 64  # images per step, the GLOBAL batch over all ranks (reference script: 64 per GPU x 8)
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
    bf16: bool = False  # bf16 autocast of the model's forward passes (gates, loss and AdamW stay fp32)
    every_step: bool = False  # gates on every step, no parity: any k in 1..T-1 is drawn (beyond the paper)
    data_free: bool = False  # data yields (trajectories (B, T, C, H, W), y) of the frozen model's own sampling
    # (`lazydit.training.trajectories`), not (x0, y): x_k is read off the trajectory instead of noising data
    forecast: int = 0  # order of the forecast reuse the soft mix trains with (0: the cache, as the paper; 1, 2)
    timesteps: tuple | None = None  # T ascending original timesteps to train on instead of lazydit's respacing (another
    # sampler's schedule: `lazydit.diffusers.scheduler_timesteps`); the gates are keyed by them
    schedule: str | None = None  # that schedule in words, for mismatch errors (e.g. "DDIMScheduler, leading spacing")
    router: bool = False  # train a Learning-to-Cache router (one input-independent score per step, layer, branch;
    # initialised N(0, 1) and clamped to [-5, 5] after every update, as L2C) instead of LazyDiT gates
    rollout: int = 0  # chain-aware training (beyond the paper): the `rollout` steps before each trained one sample
    # with the gates' own hard decisions, so the soft mix reuses caches as stale as sampling's (0: the reference)


# the fields that shape the trained gates: a resumed run must match the checkpoint's (iters may grow)
RESULT_FIELDS = ("steps", "batch_size", "lr", "weight_decay", "rho_attn", "rho_mlp", "label_drop", "seed", "lookahead",
                 "bf16", "every_step", "data_free", "forecast", "router",
                 "timesteps", "rollout")


def gate_loss_step(model, handle, x_k, y, k: int, drop, sched: Schedule, rho_attn: float, rho_mlp: float,
                   k_start: int | None = None, rollout: int = 0):
    """One 3-pass loss evaluation (record at k, teacher and soft student at k-1).

    Args:
        model: the frozen DiT with gates attached through `handle`.
        x_k: (B, C, H, W) the input at respaced index k_start (data noised to it, or a sampling trajectory's state);
            y: (B,) labels; drop: (B,) 0/1 label-drop mask shared by the passes.
        k: respaced index (odd under the reference parity); the gates of index k-1 are trained.
        k_start: first recorded index (>= k; default k): forecast reuse of order n records the n steps before k too,
            so that the soft mix at k-1 extrapolates from as many computed outputs as sampling would.
        rollout: pass 1 runs its last `rollout` steps (k + rollout - 1 .. k) in sample mode with the gates' hard
            decisions instead of recording them: a module that skips there keeps the cache of its last computed
            step, so the soft mix at k-1 reuses an output as stale as sampling would (skips that chain: every-step
            gates). 0: every step of pass 1 records, the reference.
    Returns:
        (loss, mse, p_attn (B, L), p_mlp (B, L)).
    """
    B, C = x_k.shape[:2]
    handle.reset()  # a new batch: no cache or forecast history from the last one
    with torch.no_grad():  # pass 1: DDIM steps k_start .. k that fill every cache (and forecast history)
        x_prev = x_k
        for j in range(k if k_start is None else k_start, k - 1, -1):
            handle.mode = "sample" if j < k + rollout else "record"  # rollout: the gates decide, as in sampling
            x_j = x_prev
            eps = model(x_j, sched.timesteps(j, B, x_j.device), y, force_drop_ids=drop)[:, :C].float()
            x_prev = sched.ddim_step(x_j, eps, j)
        handle.mode = "off"  # pass 2: teacher, the full model at k-1
        t_prev = sched.timesteps(k - 1, B, x_k.device)
        teacher = model(x_prev, t_prev, y, force_drop_ids=drop)
    handle.mode = "soft"  # pass 3: student, y = p F(Z) + (1 - p) cache with the gates of index k-1
    handle.probs.clear()
    student = model(x_prev, t_prev, y, force_drop_ids=drop)
    mse = ((teacher.float() - student.float()) ** 2).mean(dim=(1, 2, 3)).mean()  # all output channels
    p_attn = torch.stack([p.float() for b, p in handle.probs if b == 0], dim=1)  # (B, L)
    p_mlp = torch.stack([p.float() for b, p in handle.probs if b == 1], dim=1)
    loss = mse + rho_attn * p_attn.sum(1).mean() + rho_mlp * p_mlp.sum(1).mean()
    handle.probs.clear()
    return loss, mse, p_attn, p_mlp


class GateLoss(torch.nn.Module):
    """The gates and the 3-pass loss as one module, so that DistributedDataParallel can wrap it.

    Only the gate bank is a sub-module (the frozen model is held outside the module tree): DDP then broadcasts and
    averages just the one gate parameter, which every step uses whole (no find_unused_parameters).
    """

    def __init__(self, gates, model, handle, sched: Schedule, cfg: GateTrainConfig):
        super().__init__()
        self.gates = gates
        self._ctx = (model, handle, sched, cfg)  # a plain tuple: not registered as sub-modules

    def forward(self, x_k, y, k: int, drop, k_start: int | None = None):
        model, handle, sched, cfg = self._ctx
        amp = (torch.autocast(x_k.device.type, dtype=torch.bfloat16) if cfg.bf16 else contextlib.nullcontext())
        with amp:
            return gate_loss_step(model, handle, x_k, y, k, drop, sched, cfg.rho_attn, cfg.rho_mlp, k_start,
                                  cfg.rollout)


def train_gates(model, data, cfg: GateTrainConfig, threshold: float = 0.5, progress: bool = True,
                extra_meta: dict | None = None, callback=None) -> LazyGates:
    """Train LazyDiT gates on a frozen model, in one process or data-parallel over a torchrun process group.

    Data parallelism (when torch.distributed is initialised, see `lazydit.ranks.init_distributed`): `data`
    yields this rank's share of the global batch (W ranks, equal shares in rank order: `ranks.RankSlice`
    of the same global-batch iterator on every rank, or `ImageFolderLoader` / `LatentSampler` with rank and
    world_size). Every rank draws the step index k, the label-drop mask and the noise of the GLOBAL batch from the
    same seeded generator and keeps its rank's rows, and the gradient of the one gate parameter is averaged by
    `DistributedDataParallel` around `GateLoss` (the mean of per-rank batch means = the global batch mean), so the
    gates equal those of one process that sees the same global batches, up to float rounding. The logged loss,
    mse and skip share are averaged over ranks. Only rank 0 writes the checkpoint and the gate file and shows the
    progress bar; the checkpoint keeps every rank's data-iterator state, so resuming needs the same world size
    when the data state differs per rank.

    Args:
        model: a DiT; it is frozen (requires_grad False) and put in eval mode.
        data: an iterator of (x0 (B, C, H, W), y (B,)) batches (this rank's share), e.g. `InfiniteSampler` (with
            cfg.data_free: of (trajectories (B, T, C, H, W), y), e.g. `training.trajectories.trajectory_data`); on resume
            its `load_state_dict` is called with the saved position when it has one.
        cfg: GateTrainConfig (cfg.bf16: bf16 autocast of the model passes; gates and AdamW stay fp32).
        threshold: compute threshold stored with the gates.
        progress: progress bar with loss and lazy ratio (rank 0).
        extra_meta: more metadata for the gate file (e.g. the model path).
        callback: called on every rank as callback(dict(iter=i, loss=..., mse=..., skip=...)) after each step.
    Returns:
        The trained LazyGates, the same on every rank (also written to out/gates.safetensors when cfg.out is set).
    """
    if cfg.steps < 2:
        raise ValueError("gate training needs T >= 2 (a recorded step before every trained one)")
    if cfg.every_step and cfg.lookahead:
        raise UsageError("look-ahead gates plan step k at step k+1, which must compute: they need the parity, "
                         "not every_step")
    device = next(model.parameters()).device
    rank, world, main = dist.rank(), dist.world_size(), dist.is_main()
    model.eval().requires_grad_(False)
    if cfg.router and cfg.lookahead:
        raise UsageError("a Learning-to-Cache router reads no input: it has no look-ahead form")
    if cfg.rollout < 0:
        raise UsageError(f"rollout must be >= 0 steps, got {cfg.rollout}")
    if cfg.rollout and cfg.lookahead:
        raise UsageError("rollout samples with the gates' own decisions; look-ahead gates decide one step ahead "
                         "and always compute the step after a skip: train them without rollout")
    gates = LazyGates.for_model(model, cfg.steps, threshold, lookahead=cfg.lookahead, parity=not cfg.every_step,
                                router=cfg.router, timestep_map=cfg.timesteps, schedule=cfg.schedule)
    gates.meta["forecast"] = cfg.forecast  # sampling with these gates uses the same reuse
    gen = torch.Generator().manual_seed(cfg.seed)
    if cfg.router:  # L2C: the router's scores start N(0, 1)
        gates.weight.data.copy_(torch.randn(gates.weight.shape, generator=gen))
    opt = torch.optim.AdamW(gates.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = Schedule(cfg.steps, cfg.timesteps)
    # record at k, train gates k-1: the even indices under the reference parity, every index but the first step's
    # (T-1, which has nothing to reuse) with every_step
    odd = torch.arange(1, cfg.steps) if cfg.every_step else torch.arange(1, cfg.steps, 2)
    gated_share = len(odd) / cfg.steps  # the share of sampling steps whose modules the gates decide
    it, log = 0, []
    out = Path(cfg.out) if cfg.out else None
    ckpt = out / "checkpoint.pt" if out else None

    def data_states():
        if not hasattr(data, "state_dict"):
            return None
        mine = data.state_dict()
        if not dist.is_distributed():
            return [mine]
        every = [None] * world
        torch.distributed.all_gather_object(every, mine)
        return every

    def save_ckpt():
        states = data_states()  # collective: every rank takes part
        if not main:
            return
        state = dict(gates=gates.state_dict(), opt=opt.state_dict(), gen=gen.get_state(), iter=it, log=log,
                     config=asdict(cfg), world_size=world)
        if states is not None:
            state["data"], state["data_ranks"] = states[0], states
        save_checkpoint(state, ckpt)  # plain data: --resume reads it with torch's safe loader

    if cfg.resume:
        if ckpt is None or not ckpt.exists():
            raise FileNotFoundError(f"--resume: no checkpoint at {ckpt}")
        state = load_checkpoint(ckpt, "train-gates")  # never unpickles code: refused with one CheckpointError
        check_resume_settings(ckpt, {"rollout": 0, **state["config"]}, cfg, RESULT_FIELDS)  # rollout: newer
        saved_world = state.get("world_size", 1)
        with restoring(ckpt):  # a state that does not fit this run: one CheckpointError, not a traceback
            if "data" in state and hasattr(data, "load_state_dict"):
                ranks = state.get("data_ranks", [state["data"]])
                if saved_world == world:
                    data.load_state_dict(ranks[rank])
                elif all(_same(r, ranks[0]) for r in ranks):  # a rank-independent state (RankSlice of one iterator)
                    data.load_state_dict(ranks[0])
                else:
                    raise UsageError(f"checkpoint {ckpt} was written by {saved_world} process(es) with per-rank "
                                     f"data states: resume with {saved_world} process(es), not {world}")
            gates.load_state_dict(state["gates"])
            opt.load_state_dict(state["opt"])
            gen.set_state(state["gen"])
            it, log = int(state["iter"]), list(state["log"])

    handle = apply_lazy(model, gates, mode="soft")
    loss_fn = GateLoss(gates, model, handle, sched, cfg)
    if dist.is_distributed():  # after a resume: DDP broadcasts rank 0's gates, equal anyway
        ids = [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" \
            else None
        loss_fn = torch.nn.parallel.DistributedDataParallel(loss_fn, device_ids=ids)
    bar = tqdm(total=cfg.iters, initial=it, desc=f"train-gates T={cfg.steps}", disable=not (progress and main))
    t0 = time.time()
    try:
        while it < cfg.iters:
            x0, y = next(data)  # data_free: x0 holds whole trajectories (B, T, C, H, W)
            b = x0.shape[0]  # this rank's share; the global batch is world * b
            sl = slice(rank * b, (rank + 1) * b)
            k = int(odd[torch.randint(len(odd), (1,), generator=gen)])
            drop = (torch.rand(world * b, generator=gen)[sl] < cfg.label_drop).long().to(device)
            shape = x0.shape[2:] if cfg.data_free else x0.shape[1:]
            noise = torch.randn((world * b, *shape), generator=gen)[sl].to(device)
            # forecast: record the steps before k too; rollout: sample the steps before k with the gates
            k_start = min(k + cfg.rollout + cfg.forecast, cfg.steps - 1)
            if cfg.data_free:  # the frozen model's own state at step k_start
                x_k = x0[:, cfg.steps - 1 - k_start].to(device)
            else:
                x_k = sched.q_sample(x0.to(device), k_start, noise)  # (3) data noised to step k_start
            loss, mse, pa, pm = loss_fn(x_k, y.to(device), k, drop, k_start)
            opt.zero_grad(set_to_none=True)
            loss.backward()  # DDP: the gate gradient is averaged over ranks here
            opt.step()
            if cfg.router:
                gates.weight.data.clamp_(-5, 5)
            it += 1
            skip = torch.cat([pa, pm], 1).detach().lt(threshold).float().mean()
            figs = dist.all_reduce_(torch.stack([loss.detach(), mse.detach(), skip]).double()) / world
            rec = dict(iter=it, k=k, loss=float(figs[0]), mse=float(figs[1]), skip=float(figs[2]))
            # before this step's state reaches a checkpoint or the gate file: the loss (of the gates before the
            # update) and the updated gates themselves
            if not (math.isfinite(rec["loss"]) and bool(torch.isfinite(gates.weight).all())):
                raise NonFiniteError(
                    f"gate training diverged at iteration {it} (loss {rec['loss']}): the model's outputs or the "
                    "learning rate overflow (try a lower --lr, check the model file); no gate file was written, the "
                    "last checkpoint (if any) is kept")
            log.append(rec)
            bar.update(1)
            # the share of gated decisions below the threshold on this batch, spread over all T steps as sampling
            # counts it (odd steps always compute under the parity): the lazy ratio these gates would give if the
            # batch were typical, before any calibration
            bar.set_postfix(loss=f"{rec['loss']:.4g}", **{f"lazy@{threshold:g}": f"{rec['skip'] * gated_share:.0%}"})
            if callback is not None:
                callback(rec)
            if ckpt is not None and (it % cfg.ckpt_every == 0 or it == cfg.iters):
                save_ckpt()
    finally:
        handle.remove()
        bar.close()
    gates.meta["training"] = {**plain(asdict(cfg)), "final_iter": it, "seconds": time.time() - t0,
                              "world_size": world}
    gates.meta.update(extra_meta or {})
    if out is not None and main:
        gates.save(out / "gates.safetensors")
    dist.barrier()  # the gate file exists for every rank on return
    return gates


def _same(a, b) -> bool:
    """Equality of nested states (dicts, lists, tensors, numbers)."""
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if torch.is_tensor(a) and torch.is_tensor(b):
        return a.shape == b.shape and a.dtype == b.dtype and torch.equal(a, b)
    return type(a) is type(b) and a == b
