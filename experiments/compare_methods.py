"""Every method a user would pick instead of LazyDiT, in one protocol, on the embedded default (lazydit.evaluation.compare).

    python experiments/compare_methods.py                # train what is learned, sample, score; resumable per row
    python experiments/compare_methods.py --write-only   # the write-up from the finished rows

The learned methods are trained here on the frozen model with one budget each (--iters optimiser steps of
--batch-size Fashion-MNIST images, seed 0), by their own recipes:
  L2C        a Learning-to-Cache router for T=20 (GateTrainConfig(router=True): scores N(0, 1), clamped to [-5, 5],
             lr 1e-3, penalty 5e-6 on every compute probability: L2C's settings for 20 steps)
  forecast   LazyDiT gates with first-order forecast reuse (the best variant of docs/beyond_paper.md: lr 1e-4,
             rho 1e-2, as the reference gates)
The shipped reference gates of T=20 are LazyDiT as the paper trains it. Methods with a threshold are calibrated to
target lazy ratios on the 40-image class grid (LazyDiT 0.5; L2C 0.3 and 0.5, its parity caps it at 0.5; FBCache and
TeaCache, which skip whole steps, 0.5 and 0.7); FORA and TaylorSeer sweep their interval. Nothing is tuned on the
results: the knob values below were fixed before any row ran (the 0.3 targets of FBCache and TeaCache were swapped
for 0.7 before their rows ran, to keep the sweep within the CPU time at hand; the DPM-Solver++ Lazy row runs
last).
"""

import argparse
from pathlib import Path

from lazydit.assets import default_model
from lazydit.cpu import tune_allocator
from lazydit.data.sources import gate_training_data
from lazydit.evaluation.compare import compare, write_report
from lazydit.evaluation.rows import RowSettings
from lazydit.evaluation.fmnist import default_classifier, default_reference
from lazydit.training.gates import GateTrainConfig, train_gates

T = 20
LEARNED = {  # name -> GateTrainConfig fields
    "router": dict(router=True, lr=1e-3, rho_attn=5e-6, rho_mlp=5e-6),
    "forecast": dict(forecast=1, lr=1e-4, rho_attn=1e-2, rho_mlp=1e-2),
}


def specs(run: Path) -> list:
    """The configurations, in the order they run (the reference curves first)."""
    router = run / "router-T20" / "gates.safetensors"
    forecast = run / "forecast-T20" / "gates.safetensors"
    return [
        "ddim-5", "ddim-10", "ddim-20", "dpm++2m-5", "dpm++2m-10",
        f"ddim-{T}+lazy:gates=default,target=0.5",
        f"ddim-{T}+lazy:gates={forecast},target=0.5",
        f"ddim-{T}+fora:interval=2", f"ddim-{T}+fora:interval=3",
        f"ddim-{T}+taylorseer:interval=2,order=1,warmup=2", f"ddim-{T}+taylorseer:interval=3,order=2,warmup=2",
        f"ddim-{T}+fbcache:target=0.5", f"ddim-{T}+fbcache:target=0.7",
        f"ddim-{T}+teacache:target=0.5", f"ddim-{T}+teacache:target=0.7",
        f"ddim-{T}+l2c:router={router},target=0.3", f"ddim-{T}+l2c:router={router},target=0.5",
        f"dpm++2m-{T}+lazy:gates=default,target=0.5",  # the shipped DDIM gates on DPM-Solver++'s same timesteps
    ]


def train(name: str, model, args):
    out = Path(args.run) / f"{name}-T{T}"
    if (out / "gates.safetensors").exists():
        return
    cfg = GateTrainConfig(steps=T, iters=args.iters, batch_size=args.batch_size, seed=args.seed, out=str(out),
                          ckpt_every=50, resume=(out / "checkpoint.pt").exists(), **LEARNED[name])
    data, _ = gate_training_data(model, args.batch_size, seed=args.seed)  # through a latent model's autoencoder
    train_gates(model, data, cfg, progress=not args.quiet)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--num-samples", type=int, default=5000)
    ap.add_argument("--cfg", type=float, default=1.5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--iters", type=int, default=500, help="training iterations of each learned method")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--ref-samples", type=int, default=1000, help="images of the DDIM-50 fidelity reference")
    ap.add_argument("--run", default="runs/compare")
    ap.add_argument("--docs", default="docs")
    ap.add_argument("--only", default=None, help="run only these configurations (comma-separated indices)")
    ap.add_argument("--write-only", action="store_true")
    ap.add_argument("--timing", default=None,
                    help="benchmarks/bench_methods.py JSON: its seconds per image (a quiet CPU, one interleaved run) "
                         "replace the ones measured while the rows sampled")
    ap.add_argument("--quiet", action="store_true")
    args = ap.parse_args(argv)
    tune_allocator()
    run = Path(args.run)
    run.mkdir(parents=True, exist_ok=True)
    model = default_model()
    cfg = RowSettings(num_samples=args.num_samples, cfg_scale=args.cfg, seed=args.seed, ref_samples=args.ref_samples)
    every = specs(run)
    todo = every if args.only is None else [every[int(i)] for i in args.only.split(",")]
    if args.write_only:  # only the finished rows
        from lazydit.evaluation.rows import parse_spec

        todo = [s for s in every if (run / f"{parse_spec(s).filename}.json").exists()]
    else:
        for name in LEARNED:
            train(name, model, args)
    rows = compare(model, todo, cfg, default_classifier(), default_reference(), run, progress=not args.quiet,
                   log=lambda m: print(m, flush=True))
    notes = ""
    if args.timing:
        import json

        bench = json.loads(Path(args.timing).read_text())
        per_image = {b["config"]: b["median_s"] / bench["batch"] for b in bench["rows"]}
        for r in rows:
            r["seconds_per_image_sampling_run"] = r["seconds_per_image"]
            r["seconds_per_image"] = per_image.get(r["sampler"], float("nan"))
        notes = (f"Seconds per image: `python benchmarks/bench_methods.py` ({bench['device_name']}, "
                 f"{bench['threads']} threads, batch {bench['batch']} with CFG in micro-batches of "
                 f"{bench['micro_batch']}, median of {bench['repeats']} interleaved rounds), not the sampling run's "
                 "own clock (other work shared the CPU then; those figures stay in the JSON).")
    for r in rows:  # paths of this machine's run folder do not belong in the write-up
        r["sampler"] = r["sampler"].replace(str(run) + "/", "")
    write_report(rows, cfg, Path(args.docs) / "compare_methods", title="Every method in one harness",
                 command="python experiments/compare_methods.py" + (f" --timing {args.timing}" if args.timing
                                                                    else ""), notes=notes)
    print(f"wrote {args.docs}/compare_methods.md ({len(rows)} rows)")


if __name__ == "__main__":
    main()
