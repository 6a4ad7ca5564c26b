"""Dense vs reference-lazy vs look-ahead-lazy sampling wall-clock, measured in one run (issue: fast lazy sampling).

    python benchmarks/bench_fast.py                       # CPU, the embedded default with its shipped gates
    python benchmarks/bench_fast.py --preset gpu          # one GPU: DiT-XL/2 256², random weights, bf16, 50% plan
    python benchmarks/bench_fast.py --preset tiny         # a few seconds: smoke test of the script itself
    python benchmarks/bench_fast.py --preset xl-cpu       # DiT-XL/2 256² on the CPU, every method at T = 10 (~10
                                                          # quiet CPU-minutes at 5 repeats; see `xl_cpu_rows`)

Rows, per batch size and compile setting, all at --steps with CFG:
  dense-T      plain DDIM-T (the bare model)
  dense-T/2    plain DDIM with half the steps (what lazy sampling must beat at equal MACs)
  ref-lazy-T   reference gates: score each module on its current input, one host sync per module (the paper's code)
  la-lazy-T    look-ahead gates: plan of step k fixed at step k+1, skipped modules skip LayerNorm/modulate too
  KIND-lazy-T  with --pairs KIND:T,...: the shipped gates of that kind and T at their calibrated ratio r, each
               timed against dense-round(T (1 - r)), the DDIM row of (about) equal TMACs ("/ partner" column); a
               calibrated gate file in place of KIND:T is named after its folder
Compile settings: "eager" for every row; with --compile also "compiled": dense rows compile each DiT block
(regional `torch.compile`), look-ahead rows compile each branch (`apply_lazy(..., compile=True)`); the reference
path branches on a host value per module and stays eager (its row is repeated for comparison).

Gates: "shipped" (the embedded default's reference and look-ahead gates, at their calibrated ratios) or "plan50"
(zero gates with threshold 0.75 through the real code path: every even step skips every module, ~49% lazy).
Prints a table and one JSON object (also written to --json-out): median seconds over --repeats after a warm-up,
ratios against dense-T and dense-T/2 measured in the same run (the median over repeats of the ratio within a
repeat, so that machine drift between repeats cancels), peak memory on CUDA.
"""

import argparse
import copy
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from lazydit.assets import default_model
from lazydit.lazy.shipped import default_gates
from lazydit.files import write_text_atomic
from lazydit.bench import TimedRow, paired_ratio, random_model, time_interleaved
from lazydit.cpu import tune_allocator
from lazydit.lazy import LazyConfig, LazyGates, policy_for

PRESETS = {
    "cpu": dict(model="embedded", batch="16", steps=50, cfg=2.0, dtype="float32", gates="shipped", repeats=5),
    "gpu": dict(model="DiT-XL/2", batch="1,8", steps=50, cfg=1.5, dtype="bfloat16", gates="plan50", repeats=3,
                compile=True, device="cuda"),
    "tiny": dict(model="tiny", batch="2", steps=10, cfg=2.0, dtype="float32", gates="plan50", repeats=1),
    "xl-cpu": dict(model="DiT-XL/2", batch="1", steps=10, cfg=1.5, dtype="float32", gates="plans", repeats=5),
}


def build(args, gates: bool = True):
    """The model and the two gate sets (reference, look-ahead); `gates=False`: the model alone."""
    dtype = getattr(torch, args.dtype)
    if args.model == "embedded":
        model = default_model(args.device).to(dtype)
    elif args.model == "tiny":
        model = random_model("DiT-S/2", None, args.device, dtype, depth=2, hidden_size=64, num_heads=2, input_size=8,
                             in_channels=1, num_classes=4, learn_sigma=False)
    else:
        model = random_model(args.model, args.image_size, args.device, dtype)
    if not gates:
        return model
    if args.gates == "shipped":
        ref, la = default_gates(args.steps, args.device), default_gates(args.steps, args.device, kind="lookahead")
    else:  # zero gates give p = 0.5 < 0.75: every gated (even) step skips every module
        ref = LazyGates.for_model(model, args.steps, threshold=0.75)
        la = LazyGates.for_model(model, args.steps, threshold=0.75, lookahead=True)
    return model, ref, la


def xl_cpu_rows(model, T: int) -> list:
    """The --preset xl-cpu rows, all through the real code paths at T steps (plans of zero gates, as "plan50": p = 0.5
    for every module, so threshold 0.75 skips every module a gate may skip):

      dense-T, dense-T/2      the bare model
      ref-lazy-T@50           reference gates (module engine: each module scores its own input), parity: even steps
      la-lazy-T@50            look-ahead gates (block engine: a skipped module skips its norm and modulation too)
      forecast-lazy-T@50      reference gates with first-order forecast reuse (LazyConfig(forecast=1))
      every-forecast-lazy-T@50  every-step gates (parity off) with forecast 1 and max_skips=1: every other step
      ref-every-lazy-T@70     every-step reference gates, max_skips=3: steps skipped 8 7 6, 4 3 2, 0 at T = 10
      plan-lazy-T@70          that 70% plan as a ForcedPlan on the block engine (the look-ahead gates' execution path;
                              look-ahead gates themselves plan step pairs, so they stop at 50%)
      every-forecast-lazy-T@70  every-step gates with forecast 1 and max_skips=3 (the 70% plan)
      FORA-T                  FORA interval 2
      TaylorSeer-T            TaylorSeer interval 2, order 1 (warm-up 2)
    """
    from lazydit.lazy import FORA, ForcedPlan, TaylorSeer

    def gates(parity=True, lookahead=False, forecast=0):
        g = LazyGates.for_model(model, T, threshold=0.75, lookahead=lookahead, parity=parity)
        if forecast:
            g.meta["forecast"] = forecast  # zero gates "trained" for forecast reuse of this order
        return g

    def every(forecast, max_skips):
        return policy_for(gates(parity=False, forecast=forecast), LazyConfig(forecast=forecast, max_skips=max_skips))

    skip70 = torch.zeros(T, len(model.blocks), 2, dtype=torch.bool)  # the max_skips=3 plan of every-step gates
    for k in range(T - 2, -1, -1):
        skip70[k] = (T - 2 - k) % 4 != 3
    return [TimedRow(f"dense-{T}", model, T), TimedRow(f"dense-{T // 2}", model, T // 2),
            TimedRow(f"ref-lazy-{T}@50", model, T, policy_for(gates())),
            TimedRow(f"la-lazy-{T}@50", model, T, policy_for(gates(lookahead=True))),
            TimedRow(f"forecast-lazy-{T}@50", model, T, policy_for(gates(forecast=1), LazyConfig(forecast=1))),
            TimedRow(f"every-forecast-lazy-{T}@50", model, T, every(1, 1)),
            TimedRow(f"ref-every-lazy-{T}@70", model, T, every(0, 3)),
            TimedRow(f"plan-lazy-{T}@70", model, T, ForcedPlan(skip70, parity=False)),
            TimedRow(f"every-forecast-lazy-{T}@70", model, T, every(1, 3)),
            TimedRow(f"FORA-{T}", model, T, FORA(T, interval=2)),
            TimedRow(f"TaylorSeer-{T}", model, T, TaylorSeer(T, interval=2, order=1))]


def xl_cpu(args, model, tuned: bool) -> dict:
    """--preset xl-cpu: every row of `xl_cpu_rows` in one interleaved run; per row the median seconds, TMACs, and
    seconds / (dense-T seconds x TMACs ratio): 1.0 means the row costs what its MACs say, > 1 its overhead beyond
    them (the median over rounds of the ratio within a round)."""
    T, B = args.steps, int(args.batch.split(",")[0])
    rows = xl_cpu_rows(model, T)
    y = torch.arange(B, device=args.device) % model.config.num_classes
    t0 = time.time()
    timed = time_interleaved(rows, y, cfg_scale=args.cfg, repeats=args.repeats, vary_seed=True,
                             micro_batch=args.micro_batch)
    dense_t, dense_rep = timed[f"dense-{T}"]["times"], timed[f"dense-{T}"]["report"]
    results = []
    for r in rows:
        t, rep = timed[r.name]["times"], timed[r.name]["report"]
        macs = rep.tmacs / dense_rep.tmacs
        results.append(dict(sampler=r.name, steps=rep.steps, lazy_ratio=round(rep.lazy_ratio, 4), tmacs=rep.tmacs,
                            tmacs_ratio=round(macs, 4), median_s=round(statistics.median(t), 4),
                            min_s=round(min(t), 4), times=[round(v, 4) for v in t],
                            over_macs=round(statistics.median(a / (b * macs) for a, b in zip(t, dense_t)), 3)))
    print(f"  batch {B}: {time.time() - t0:.1f} s", flush=True)
    out = dict(preset=args.preset, device=args.device, device_name=platform.processor() or platform.machine(),
               threads=torch.get_num_threads(), torch=torch.__version__, model=args.model,
               image_size=args.image_size, dtype=args.dtype, batch=B, steps=T, cfg=args.cfg, repeats=args.repeats,
               micro_batch=args.micro_batch, allocator_tuned=tuned, rows=results)
    print(f"{'sampler':28} {'lazy':>6} {'TMACs':>9} {'MACs':>6} {'median s':>9} {'s / (dense s x MACs)':>21}")
    for r in results:
        print(f"{r['sampler']:28} {r['lazy_ratio']:6.1%} {r['tmacs']:9.5f} {r['tmacs_ratio']:6.3f} "
              f"{r['median_s']:9.3f} {r['over_macs']:20.3f}x")
    print(json.dumps(out))
    if args.json_out:
        write_text_atomic(args.json_out, json.dumps(out, indent=1))
    return out


def pair_rows(spec: str | None, rows: list, dense, model) -> dict:
    """Append the --pairs rows (shipped gates of KIND at T, or a calibrated gate file, and DDIM of about equal
    TMACs) to `rows`.

    Returns:
        lazy row name -> its partner's row name.
    """
    partners = {}
    device = next(model.parameters()).device
    for item in (spec.split(",") if spec else []):
        if item.endswith(".safetensors") or Path(item).is_dir():  # a gate file (`lazydit calibrate` sets its ratio)
            if not Path(item).exists():
                raise SystemExit(f"--pairs {item}: no such gate file")
            gates = LazyGates.load(item, map_location=device)
            T, kind = gates.steps, Path(item).parent.name if Path(item).is_file() else Path(item).name
            if "calibration" not in gates.meta:
                raise SystemExit(f"--pairs {item}: calibrate it first "
                                 f"(lazydit calibrate --gates {item} --target-ratio R)")
        else:
            kind, _, T = item.partition(":")
            if not T.isdigit():
                raise SystemExit(f"--pairs {item}: expected KIND:T (e.g. forecast:20) or a calibrated gate file")
            T = int(T)
            gates = default_gates(T, device, kind=kind)
        steps = max(1, round(T * (1 - gates.meta["calibration"]["reached"])))  # DDIM of about equal TMACs
        partner = f"dense-{steps}"
        if partner not in {row.name for row in rows}:
            rows.append(TimedRow(partner, dense, steps))
        name = f"{kind}-lazy-{T}"
        rows.append(TimedRow(name, model, T, policy_for(gates)))
        partners[name] = partner
    return partners


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    ap.add_argument("--model", help="'embedded', 'tiny' or a zoo name (random weights)")
    ap.add_argument("--image-size", type=int, default=256)
    ap.add_argument("--batch", help="comma-separated batch sizes (images; CFG doubles the rows)")
    ap.add_argument("--steps", type=int)
    ap.add_argument("--cfg", type=float)
    ap.add_argument("--dtype", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--gates", choices=["shipped", "plan50", "plans"],
                    help="plans: --preset xl-cpu's own zero-gate plans (xl_cpu_rows)")
    ap.add_argument("--repeats", type=int)
    ap.add_argument("--pairs", default=None,
                    help="comma-separated KIND:T (e.g. forecast:20,forecast:10), shipped gates of a kind, or gate files "
                         "calibrated by `lazydit calibrate`: each against DDIM at equal TMACs, in the same interleaved "
                         "run")
    ap.add_argument("--micro-batch", type=int, default=None,
                    help="images per sampler call (the paper table's --timing uses 16; default: the whole batch)")
    ap.add_argument("--compile", action="store_true", default=None, help="also run the compiled setting")
    ap.add_argument("--compile-mode", default=None, help="torch.compile mode, e.g. reduce-overhead (CUDA graphs)")
    ap.add_argument("--device", default=None)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json-out", default=None)
    ap.add_argument("--no-tune-allocator", action="store_true",
                    help="leave glibc's malloc as it is (default: lazydit.tune_allocator(), as the CLI does)")
    args = ap.parse_args(argv)
    tuned = False if args.no_tune_allocator else tune_allocator()
    for k, v in PRESETS[args.preset].items():
        if getattr(args, k, None) is None:
            setattr(args, k, v)
    args.device = args.device or "cpu"
    args.compile = bool(args.compile)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if args.preset == "xl-cpu":
        model = build(args, gates=False)
        return xl_cpu(args, model, tuned)
    model, ref, la = build(args)
    T, half = args.steps, args.steps // 2
    settings = ["eager"] + (["compiled"] if args.compile else [])
    results = []
    for B in [int(b) for b in args.batch.split(",")]:
        y = torch.arange(B, device=args.device) % model.config.num_classes
        for setting in settings:
            dense = model
            if setting == "compiled":
                dense = copy.deepcopy(model)
                for blk in dense.blocks:
                    blk.compile(mode=args.compile_mode)
            la_cfg = LazyConfig(compile=setting == "compiled", compile_mode=args.compile_mode)
            rows = [TimedRow(f"dense-{T}", dense, T), TimedRow(f"dense-{half}", dense, half),
                    TimedRow(f"ref-lazy-{T}", model, T, policy_for(ref)),
                    TimedRow(f"la-lazy-{T}", model, T, policy_for(la, la_cfg))]
            partners = pair_rows(args.pairs, rows, dense, model)
            t0 = time.time()
            timed = time_interleaved(rows, y, cfg_scale=args.cfg, repeats=args.repeats, vary_seed=True,
                                     micro_batch=args.micro_batch)
            for r in rows:
                t, rep = timed[r.name]["times"], timed[r.name]["report"]
                results.append(dict(
                    batch=B, setting=setting, sampler=r.name, steps=rep.steps, lazy_ratio=round(rep.lazy_ratio, 4),
                    tmacs=rep.tmacs, median_s=round(statistics.median(t), 4), min_s=round(min(t), 4),
                    speedup_vs_dense=round(1 / paired_ratio(t, timed[f"dense-{T}"]["times"]), 3),
                    over_half_steps=round(paired_ratio(t, timed[f"dense-{half}"]["times"]), 3),
                    peak_mem_gib=None if timed[r.name]["peak_gib"] is None else round(timed[r.name]["peak_gib"], 2),
                ))
                if r.name in partners:
                    results[-1].update(partner=partners[r.name], over_partner=round(
                        paired_ratio(t, timed[partners[r.name]]["times"]), 3))
            print(f"  batch {B} {setting}: {time.time() - t0:.1f} s", flush=True)
    device_name = torch.cuda.get_device_name() if args.device.startswith("cuda") else (platform.processor() or
                                                                                     platform.machine())
    out = dict(preset=args.preset, device=args.device, device_name=device_name, threads=torch.get_num_threads(),
               torch=torch.__version__, model=args.model, dtype=args.dtype, steps=T, cfg=args.cfg, gates=args.gates,
               repeats=args.repeats, micro_batch=args.micro_batch, compile_mode=args.compile_mode,
               allocator_tuned=tuned, rows=results)
    print(f"{'batch':>5} {'setting':9} {'sampler':16} {'lazy':>6} {'TMACs':>9} {'median s':>9} "
          f"{'vs dense':>8} {'/ half-T':>8} {'/ partner':>20}")
    for r in results:
        partner = f"{r['over_partner']:.3f}x {r['partner']}" if "partner" in r else ""
        print(f"{r['batch']:5d} {r['setting']:9} {r['sampler']:16} {r['lazy_ratio']:6.1%} {r['tmacs']:9.5f} "
              f"{r['median_s']:9.3f} {r['speedup_vs_dense']:7.2f}x {r['over_half_steps']:7.3f}x {partner:>20}")
    print(json.dumps(out))
    if args.json_out:
        write_text_atomic(args.json_out, json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()
