"""Wall-clock of DDIM-50, DDIM-25 and Lazy-50 (shipped gates) on the embedded default, measured in one run.

    python benchmarks/bench_lazy.py [--batch 16] [--cfg 2.0] [--repeats 5] [--device cpu] [--json-out FILE]

Prints a table and JSON: per sampler the median seconds over repeats (after a warm-up), lazy ratio, TMACs,
and the ratios Lazy-50 / DDIM-50 and Lazy-50 / DDIM-25.
"""

import argparse
import json
import platform
import statistics

import torch

from lazydit.assets import default_gates, default_model
from lazydit.pipeline import sample


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=16, help="images per batch (CFG doubles the rows)")
    ap.add_argument("--cfg", type=float, default=2.0)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json-out", default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model = default_model(args.device)
    gates = default_gates(args.steps, args.device)
    y = torch.arange(args.batch, device=args.device) % model.config.num_classes
    half = args.steps // 2
    runs = [(f"DDIM-{args.steps}", args.steps, None), (f"DDIM-{half}", half, None), (f"Lazy-{args.steps}", args.steps, gates)]
    sample(model, y, 4, cfg_scale=args.cfg, progress=False)  # warm-up
    times = {name: [] for name, _, _ in runs}
    reports = {}
    for r in range(args.repeats):  # interleave the samplers so drift hits all of them alike
        for name, steps, g in runs:
            _, rep = sample(model, y, steps, gates=g, cfg_scale=args.cfg, seed=r, progress=False, name=name)
            times[name].append(rep.seconds)
            reports[name] = rep
    rows = []
    for name, steps, _ in runs:
        rep = reports[name]
        rows.append(dict(sampler=name, steps=steps, lazy_ratio=round(rep.lazy_ratio, 4), gmacs=round(rep.tmacs * 1e3, 3),
                         median_s=round(statistics.median(times[name]), 4), min_s=round(min(times[name]), 4)))
    med = {r["sampler"]: r["median_s"] for r in rows}
    lazy, dense, halfn = f"Lazy-{args.steps}", f"DDIM-{args.steps}", f"DDIM-{half}"
    result = dict(
        device=args.device, cpu=platform.processor() or platform.machine(), threads=torch.get_num_threads(),
        torch=torch.__version__, batch=args.batch, cfg=args.cfg, repeats=args.repeats, rows=rows,
        lazy_over_dense=round(med[lazy] / med[dense], 3), lazy_over_half_steps=round(med[lazy] / med[halfn], 3),
    )
    print(f"{'sampler':10} {'steps':>5} {'lazy':>7} {'GMACs':>8} {'median s':>9} {'min s':>8}")
    for r in rows:
        print(f"{r['sampler']:10} {r['steps']:5d} {r['lazy_ratio']:7.1%} {r['gmacs']:8.3f} {r['median_s']:9.3f} {r['min_s']:8.3f}")
    print(f"{lazy} / {dense}: {result['lazy_over_dense']:.3f}x    {lazy} / {halfn}: {result['lazy_over_half_steps']:.3f}x")
    print(json.dumps(result))
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
