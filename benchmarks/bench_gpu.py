"""One-GPU benchmark of LazyDiT on DiT-XL/2 256²: sampling wall-clock, gate-training throughput, peak memory.

    python benchmarks/bench_gpu.py                        # one GPU, under 5 minutes, no downloads
    python benchmarks/bench_gpu.py --quick                # batch 1 and 8, one repeat, a shorter training
    python benchmarks/bench_gpu.py --preset cpu-smoke     # (or --tiny) same code paths on CPU in seconds

The model is DiT-XL/2 at 256² (latent input 32) with random weights; its zero-initialised adaLN and final layers
get small random values so that every module matters. Default dtype bf16, TF32 on.

Sampling rows (50 DDIM steps, CFG 1.5, per batch of 1, 8 and 32 images; CFG doubles the rows):
  dense         the bare model
  plan50-ref    zero reference gates, threshold 0.75: every even step skips every module (real gate code path)
  plan50-la     the same plan with look-ahead gates (LazyGates(..., lookahead=True))
  trained-ref   reference gates from a short train_gates run on random N(0,1) latents with labels
  trained-la    look-ahead gates from the same recipe
Compile settings: "eager" for every row and, with compile on (the GPU default), "compiled": dense compiles each
block (`block.compile()`, on a copy of the model), look-ahead rows run `sample(..., compile=True)` (one
torch.compile region per branch). Reference gates branch on a host value per module, so no compiled region can
span them: they run eager only (marked † in the table; compare them with both dense rows).

Gate training: steps per second of `train_gates` at --train-batch (64: the global batch on one GPU), timed after
--train-warmup iterations; the same runs give the "trained" gates (reference, then look-ahead). In a reduced
precision the 3-pass loss runs under torch.autocast (the sampler's fp32 noise meets bf16 weights).

Prints a header, a table and one JSON object (also written to --json-out): median seconds over --repeats after a
warm-up (every row interleaved per repeat, same seed, torch.cuda.synchronize around each run), peak GPU memory
per row and per section (torch.cuda.max_memory_allocated).
"""

import argparse
import contextlib
import copy
import json
import platform
import statistics
import time

import torch

from lazydit.bench import TimedRow, random_model, time_interleaved
from lazydit.files import write_text_atomic
from lazydit.lazy import LazyConfig, LazyGates, policy_for
from lazydit.training.gates import GateTrainConfig, train_gates

PRESETS = {
    "gpu": dict(device="cuda", model="DiT-XL/2", image_size=256, dtype="bfloat16", batch="1,8,32", steps=50,
                cfg=1.5, repeats=3, big_repeats=2, compile=True, train_iters=30, train_warmup=5, train_batch=64,
                rho=0.1, train_lr=1e-3),
    "cpu-smoke": dict(device="cpu", model="tiny", image_size=64, dtype="float32", batch="1,2", steps=4, cfg=1.5,
                      repeats=1, big_repeats=1, compile=False, train_iters=3, train_warmup=1, train_batch=4,
                      rho=0.1, train_lr=1e-3),
}
QUICK = dict(batch="1,8", repeats=1, big_repeats=1, train_iters=12, train_warmup=2)
BIG_BATCH = 32  # batches of at least this many images use --big-repeats


def is_cuda(device) -> bool:
    return str(device).startswith("cuda")


class RandomLatents:
    """Infinite (x0 ~ N(0,1) (B, C, H, W), y (B,)) batches on the device: the gate-training data."""

    def __init__(self, cfg, batch, device, seed=0):
        self.shape = (batch, cfg.in_channels, cfg.input_size, cfg.input_size)
        self.num_classes, self.device = cfg.num_classes, device
        self.gen = torch.Generator(device=device).manual_seed(seed)

    def __iter__(self):
        return self

    def __next__(self):
        x0 = torch.randn(self.shape, generator=self.gen, device=self.device)
        y = torch.randint(self.num_classes, self.shape[:1], generator=self.gen, device=self.device)
        return x0, y


def reset_peak(device):
    if is_cuda(device):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()


def peak_gib(device):
    return round(torch.cuda.max_memory_allocated() / 2**30, 3) if is_cuda(device) else None


def train_section(model, args, lookahead):
    """train_gates for --train-iters at --train-batch; steps/s over the iterations after the warm-up."""
    cfg = GateTrainConfig(steps=args.steps, iters=args.train_iters, batch_size=args.train_batch, lr=args.train_lr,
                          rho_attn=args.rho, rho_mlp=args.rho, lookahead=lookahead, seed=0)
    data = RandomLatents(model.config, args.train_batch, args.device)
    stamps, logs = [], []

    def callback(rec):  # train_gates has already synced (loss.item()) when it calls back
        stamps.append(time.perf_counter())
        logs.append(rec)

    dtype = getattr(torch, args.dtype)
    autocast = dtype != torch.float32
    ctx = torch.autocast(torch.device(args.device).type, dtype=dtype) if autocast else contextlib.nullcontext()
    reset_peak(args.device)
    t0 = time.perf_counter()
    with ctx:
        gates = train_gates(model, data, cfg, threshold=0.5, progress=False, callback=callback)
    total = time.perf_counter() - t0
    w = min(max(args.train_warmup, 1), len(stamps) - 1)  # timed window: iterations w+1 .. iters
    timed = len(stamps) - w
    sps = timed / (stamps[-1] - stamps[w - 1]) if timed > 0 and stamps[-1] > stamps[w - 1] else float("nan")
    info = dict(kind="look-ahead" if lookahead else "reference", batch=args.train_batch, iters=len(stamps),
                warmup=w, timed_iters=timed, steps_per_s=round(sps, 3), images_per_s=round(sps * args.train_batch, 1),
                seconds=round(total, 2), autocast=args.dtype if autocast else None, rho=args.rho, lr=args.train_lr,
                final_loss=logs[-1]["loss"], final_soft_skip=round(logs[-1]["skip"], 4),
                peak_mem_gib=peak_gib(args.device))
    return gates.to(args.device), info


def dynamo_stats():
    try:
        from torch._dynamo.utils import counters
    except Exception:  # pragma: no cover - torch without dynamo
        return {}
    return {"stats": dict(counters.get("stats", {})), "frames": dict(counters.get("frames", {}))}


def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", choices=sorted(PRESETS), default="gpu")
    ap.add_argument("--tiny", action="store_true", help="alias of --preset cpu-smoke")
    ap.add_argument("--quick", action="store_true", help=f"shorter run: {QUICK}")
    ap.add_argument("--device", default=None)
    ap.add_argument("--model", help="'tiny' or a zoo name, e.g. DiT-XL/2 (random weights)")
    ap.add_argument("--image-size", type=int, default=None, help="pixels (latent input = image size / 8)")
    ap.add_argument("--dtype", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--batch", help="comma-separated batch sizes (images; CFG doubles the rows)")
    ap.add_argument("--steps", type=int)
    ap.add_argument("--cfg", type=float)
    ap.add_argument("--repeats", type=int)
    ap.add_argument("--big-repeats", type=int, help=f"repeats at batches >= {BIG_BATCH}")
    ap.add_argument("--compile", dest="compile", action="store_true", default=None, help="add the compiled rows")
    ap.add_argument("--no-compile", dest="compile", action="store_false")
    ap.add_argument("--compile-mode", default=None, help="torch.compile mode, e.g. reduce-overhead (CUDA graphs)")
    ap.add_argument("--no-tf32", dest="tf32", action="store_false", default=True)
    ap.add_argument("--train-iters", type=int)
    ap.add_argument("--train-warmup", type=int)
    ap.add_argument("--train-batch", type=int)
    ap.add_argument("--rho", type=float, help="gate penalty (attn and mlp)")
    ap.add_argument("--train-lr", type=float)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json-out", default=None)
    args = ap.parse_args(argv)
    if args.tiny:
        args.preset = "cpu-smoke"
    for k, v in {**PRESETS[args.preset], **(QUICK if args.quick else {})}.items():
        if getattr(args, k, None) is None:
            setattr(args, k, v)
    return args


def main(argv=None):
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    cuda = is_cuda(args.device)
    if cuda:
        if not torch.cuda.is_available():
            raise SystemExit("CUDA is not available: run on a GPU or use --preset cpu-smoke (--device cpu)")
        torch.backends.cuda.matmul.allow_tf32 = args.tf32
        torch.backends.cudnn.allow_tf32 = args.tf32
    t_start = time.perf_counter()
    compile_mode = (args.compile_mode or "default") if args.compile else "off"
    device_name = torch.cuda.get_device_name(args.device) if cuda else (platform.processor() or platform.machine())
    header = dict(device=args.device, device_name=device_name, torch=torch.__version__,
                  cuda=torch.version.cuda if cuda else None, dtype=args.dtype, compile_mode=compile_mode,
                  tf32=bool(args.tf32 and cuda), threads=torch.get_num_threads())
    print(f"# {device_name} | torch {torch.__version__}" + (f" (CUDA {torch.version.cuda})" if cuda else "") +
          f" | {args.dtype} | compile: {compile_mode} | TF32: {'on' if header['tf32'] else 'off'}", flush=True)

    sections = {}
    reset_peak(args.device)
    tiny = dict(depth=2, hidden_size=64, num_heads=2, input_size=8, num_classes=4) if args.model == "tiny" else {}
    model = random_model("DiT-S/2" if tiny else args.model, None if tiny else args.image_size, args.device,
                         getattr(torch, args.dtype), **tiny)
    T = args.steps
    sections["model"] = dict(params_m=round(sum(p.numel() for p in model.parameters()) / 1e6, 2),
                             peak_mem_gib=peak_gib(args.device))
    print(f"  model {args.model} ({sections['model']['params_m']}M params, input {model.config.input_size}): "
          f"{time.perf_counter() - t_start:.1f} s", flush=True)

    training = []  # the trained gates come from the throughput runs
    trained = {}
    for la in (False, True):
        gates, info = train_section(model, args, lookahead=la)
        trained[la] = gates
        training.append(info)
        sections[f"train_{'la' if la else 'ref'}"] = dict(peak_mem_gib=info["peak_mem_gib"], seconds=info["seconds"])
        print(f"  train-gates {info['kind']}: {info['steps_per_s']} steps/s at batch {args.train_batch} "
              f"({info['seconds']} s)", flush=True)

    gate_sets = {
        "plan50": (LazyGates.for_model(model, T, threshold=0.75),
                   LazyGates.for_model(model, T, threshold=0.75, lookahead=True)),
        "trained": (trained[False], trained[True]),
    }
    dense_c = None
    if args.compile:  # a copy, so that the lazy rows run the model's own blocks
        dense_c = copy.deepcopy(model)
        for blk in dense_c.blocks:
            blk.compile(mode=args.compile_mode)
    rows, info = [], {}  # TimedRow per (sampler, compile setting), and what the table says of it

    def add(sampler, kind, mode, setting, model_, gates=None, lazy=None):
        name = f"{sampler}/{setting}"
        rows.append(TimedRow(name, model_, T, None if gates is None else policy_for(gates, lazy)))
        info[name] = dict(sampler=sampler, gates=kind, mode=mode, compile=setting)

    add("dense", "none", "dense", "eager", model)
    if dense_c is not None:
        add("dense", "none", "dense", "compiled", dense_c)
    for name, (ref, la) in gate_sets.items():
        add(f"{name}-ref", name, "reference", "eager", model, ref)
        add(f"{name}-la", name, "look-ahead", "eager", model, la)
        if args.compile:
            add(f"{name}-la", name, "look-ahead", "compiled", model, la,
                LazyConfig(compile=True, compile_mode=args.compile_mode))

    results = []
    for B in [int(b) for b in str(args.batch).split(",")]:
        y = torch.arange(B, device=args.device) % model.config.num_classes
        repeats = args.big_repeats if B >= BIG_BATCH else args.repeats
        t0 = time.perf_counter()
        timed = time_interleaved(rows, y, cfg_scale=args.cfg, repeats=repeats)
        sections[f"sample_b{B}"] = dict(
            peak_mem_gib=round(max(t["peak_gib"] for t in timed.values()), 3) if cuda else None,
            seconds=round(time.perf_counter() - t0, 2), repeats=repeats)
        med = {k: statistics.median(t["times"]) for k, t in timed.items()}
        base_e, base_c = med["dense/eager"], med.get("dense/compiled")
        for r in rows:
            rep, m, t = timed[r.name]["report"], med[r.name], timed[r.name]
            results.append(dict(
                batch=B, **info[r.name], compilable=info[r.name]["mode"] != "reference", steps=rep.steps,
                lazy_ratio=round(rep.lazy_ratio, 4), tmacs=rep.tmacs, median_s=round(m, 4),
                min_s=round(min(t["times"]), 4), repeats=repeats, speedup_vs_dense_eager=round(base_e / m, 3),
                speedup_vs_dense_compiled=round(base_c / m, 3) if base_c is not None else None,
                peak_mem_gib=round(t["peak_gib"], 3) if cuda else None,
            ))
        print(f"  sampling batch {B} ({repeats} repeats): {sections[f'sample_b{B}']['seconds']} s", flush=True)

    out = dict(benchmark="bench_gpu", preset=args.preset, quick=args.quick, **header, model=args.model,
               image_size=args.image_size if args.model != "tiny" else None, input_size=model.config.input_size,
               steps=T, cfg=args.cfg, batches=[int(b) for b in str(args.batch).split(",")], repeats=args.repeats,
               big_repeats=args.big_repeats, rows=results, training=training, sections=sections,
               dynamo=dynamo_stats() if args.compile else None,
               total_seconds=round(time.perf_counter() - t_start, 1))
    print_table(out)
    print(json.dumps(out))
    if args.json_out:
        write_text_atomic(args.json_out, json.dumps(out, indent=1))
    return out


def print_table(out):
    mem = out["device"].startswith("cuda")
    comp = out["compile_mode"] != "off"
    print(f"{'batch':>5} {'sampler':12} {'compile':9} {'lazy':>6} {'TMACs':>9} {'median s':>9} {'min s':>8} "
          f"{'vs dense':>8}" + (f" {'vs dense-c':>10}" if comp else "") + (f" {'peak GiB':>8}" if mem else ""))
    for r in out["rows"]:
        c = r["compile"] + ("†" if comp and not r["compilable"] else "")
        line = (f"{r['batch']:5d} {r['sampler']:12} {c:9} {r['lazy_ratio']:6.1%} {r['tmacs']:9.4g} "
                f"{r['median_s']:9.3f} {r['min_s']:8.3f} {r['speedup_vs_dense_eager']:7.2f}x")
        if comp:
            line += f" {r['speedup_vs_dense_compiled']:9.2f}x"
        if mem:
            line += f" {r['peak_mem_gib']:8.2f}"
        print(line)
    if comp:
        print("† reference gates sync the host once per module: no torch.compile region can span them (eager only)")
    print(f"{'train-gates':17} {'batch':>5} {'iters':>5} {'steps/s':>8} {'img/s':>8} {'soft skip':>9}"
          + (f" {'peak GiB':>8}" if mem else ""))
    for t in out["training"]:
        line = (f"{t['kind']:17} {t['batch']:5d} {t['timed_iters']:5d} {t['steps_per_s']:8.3f} "
                f"{t['images_per_s']:8.1f} {t['final_soft_skip']:9.1%}")
        if mem:
            line += f" {t['peak_mem_gib']:8.2f}"
        print(line)
    if mem:
        print("peak GiB per section: " + ", ".join(f"{k} {v['peak_mem_gib']}" for k, v in out["sections"].items()))
    print(f"total {out['total_seconds']} s")


if __name__ == "__main__":
    main()
