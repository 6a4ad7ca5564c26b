"""Does each method's wall-clock follow its TMACs? Every method of the comparison against dense DDIM-T, in one run.

    python benchmarks/bench_methods.py                    # CPU, the embedded default; thresholds from the comparison
    python benchmarks/bench_methods.py --preset tiny      # a few seconds: smoke test of the script itself

Rows: the configurations of `experiments/compare_methods.py` (the same strings, `lazydit.evaluation.compare`), with
the thresholds its finished rows calibrated (read from --rows, the comparison's run folder; a configuration whose
row is not finished is calibrated here on the class grid). Every row is timed with the project's one timing routine
(`lazydit.bench.time_interleaved`: a warm-up, then interleaved rounds), on --batch images with CFG, in micro-batches
of 16 as the comparison samples. For each row: its TMACs ratio to dense DDIM-T, its wall-clock ratio (the median over
rounds of the ratio within a round), and how far the second is from the first (`gap` = time ratio / TMACs ratio - 1;
the issue's goal: |gap| <= 15%). Prints a table and one JSON object (also written to --json-out).
"""

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

from lazydit.bench import TimedRow, paired_ratio, random_model, time_interleaved
from lazydit.cpu import tune_allocator
from lazydit.evaluation.rows import RowSettings, build_policy, calibrate, parse_spec
from lazydit.files import write_text_atomic
from lazydit.pipeline import class_grid_labels

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "experiments"))

PRESETS = {
    "cpu": dict(model="embedded", batch=16, cfg=1.5, repeats=5),
    "tiny": dict(model="tiny", batch=4, cfg=1.5, repeats=1),
}
TINY_SPECS = ["ddim-8", "ddim-4", "dpm++2m-4", "ddim-8+fora:interval=2", "ddim-8+taylorseer:interval=2,order=1",
              "ddim-8+fbcache:target=0.5", "ddim-8+teacache:target=0.5"]


def rows_for(args, model):
    """(spec, threshold, coefficients) of every configuration."""
    if args.model == "tiny":
        specs = TINY_SPECS
    else:
        from compare_methods import specs as comparison_specs

        specs = comparison_specs(Path(args.rows))
    out = []
    cfg = RowSettings(cfg_scale=args.cfg)
    yc = class_grid_labels(model.config.num_classes, 4 if args.model != "tiny" else 1)
    for text in specs:
        spec = parse_spec(text)
        done = Path(args.rows) / f"{spec.filename}.json"
        bank = dict(spec.options).get("gates", dict(spec.options).get("router"))
        if bank is not None and not str(bank).startswith("default") and not Path(str(bank)).exists():
            print(f"  skipped {text}: {bank} is not trained yet", flush=True)
            continue
        if done.exists():  # the threshold (and fitted polynomial) the committed row sampled with
            row = json.loads(done.read_text())
            policy = build_policy(spec, model, row.get("threshold"), fitted={"coefficients": row["coefficients"]}
                                  if row.get("coefficients") else None)
            if policy is not None:
                policy.prepare(model, yc, args.cfg, 0, spec.sampler)
        elif spec.target is not None:
            policy, _ = calibrate(spec, model, yc, cfg)
        else:
            policy = build_policy(spec, model)
            if policy is not None:
                policy.prepare(model, yc, args.cfg, 0, spec.sampler)
        out.append((spec, policy))
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    ap.add_argument("--model", help="'embedded' or 'tiny'")
    ap.add_argument("--batch", type=int, help="images (CFG doubles the rows)")
    ap.add_argument("--cfg", type=float)
    ap.add_argument("--repeats", type=int)
    ap.add_argument("--rows", default="runs/compare", help="the comparison's run folder (thresholds)")
    ap.add_argument("--json-out", default=None)
    args = ap.parse_args(argv)
    tuned = tune_allocator()
    for k, v in PRESETS[args.preset].items():
        if getattr(args, k, None) is None:
            setattr(args, k, v)
    if args.model == "embedded":
        from lazydit.assets import default_model

        model = default_model()
    else:
        model = random_model("DiT-S/2", None, depth=2, hidden_size=64, num_heads=2, input_size=8, in_channels=1,
                             num_classes=4, learn_sigma=False)
    configs = rows_for(args, model)
    dense = max((s for s, p in configs if p is None and s.sampler == "ddim"), key=lambda s: s.steps)
    timed_rows = [TimedRow(s.text, model, s.steps, policy=p, sampler=s.sampler) for s, p in configs]
    y = torch.arange(args.batch) % model.config.num_classes
    t0 = time.time()
    timed = time_interleaved(timed_rows, y, cfg_scale=args.cfg, repeats=args.repeats, vary_seed=True, micro_batch=16)
    base = timed[dense.text]
    results = []
    for r in timed_rows:
        t, rep = timed[r.name]["times"], timed[r.name]["report"]
        macs = rep.tmacs / base["report"].tmacs
        time_ratio = paired_ratio(t, base["times"])
        results.append(dict(config=r.name, lazy_ratio=round(rep.lazy_ratio, 4), tmacs=rep.tmacs,
                            tmacs_ratio=round(macs, 4), median_s=round(statistics.median(t), 4),
                            time_ratio=round(time_ratio, 4), gap=round(time_ratio / macs - 1, 4)))
    out = dict(preset=args.preset, device="cpu", device_name=platform.processor() or platform.machine(),
               threads=torch.get_num_threads(), torch=torch.__version__, model=args.model, batch=args.batch,
               cfg=args.cfg, repeats=args.repeats, micro_batch=16, allocator_tuned=tuned, dense=dense.text,
               seconds=round(time.time() - t0, 1), rows=results)
    print(f"{'config':52} {'lazy':>6} {'TMACs/dense':>11} {'time/dense':>10} {'gap':>7}")
    for r in results:
        print(f"{r['config']:52} {r['lazy_ratio']:6.1%} {r['tmacs_ratio']:11.3f} {r['time_ratio']:10.3f} "
              f"{r['gap']:+7.1%}")
    print(json.dumps(out))
    if args.json_out:
        write_text_atomic(args.json_out, json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()
