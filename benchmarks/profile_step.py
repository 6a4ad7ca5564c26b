"""What one sampling step costs, by part of the model: the steps of a lazy run by kind, and a step of plain DDIM, on
the embedded default (issue: wall-clock that follows the MACs).

    python benchmarks/profile_step.py                          # batch 16 with CFG, T = 50, the look-ahead gates
    python benchmarks/profile_step.py --kind every-forecast --steps 20   # another shipped kind
    python benchmarks/profile_step.py --md docs/profile_step.md --json-out docs/profile_step.json

Every step of sampling runs is timed (perf_counter around the model call; dense and lazy runs alternate, --repeats
of each); then one more run of each is profiled with torch.profiler, each model call in its own session, with a
labelled range around the embedders, every block's adaLN modulation and the final layer (inclusive time), and every
aten op by self time (what the blocks' branches, norms, modulations and gated residuals are made of). Times are
averaged over the steps of each kind: "dense" (plain DDIM-T), and the lazy run's steps by the share of module-rows
they ran: "computed" (>= 90%: the odd steps of parity gates), "skipped" (<= 10%: their even steps, on which the
shipped look-ahead gates skip ~97% of the modules), "mixed" (the rest: every-step gates). A block whose branches
all skip computes only the gate columns of its modulation, outside the adaLN module: that product shows under
`addmm`, not under the adaLN part. Prints a markdown table and one JSON object.
"""

import argparse
import json
import platform
import statistics
import time
from collections import defaultdict

import torch
from torch.autograd.profiler import record_function

from lazydit.assets import default_model
from lazydit.lazy.shipped import default_gates
from lazydit.cpu import tune_allocator
from lazydit.files import write_text_atomic
from lazydit.lazy import apply_lazy, policy_for
from lazydit.sampling.ddim import ddim_sample

# the parts of the model a step is split into (labelled ranges), in table order
PARTS = ("embed", "adaLN", "attn branch", "mlp branch", "final layer")


def label_parts(model):
    """Forward pre/post hooks that open and close a record_function range around each part; returns the handles."""
    handles = []

    def wrap(module, name):
        ctx = {}

        def pre(mod, args, kwargs=None):
            ctx["r"] = record_function(name)
            ctx["r"].__enter__()

        def post(mod, args, out, kwargs=None):
            ctx.pop("r").__exit__(None, None, None)

        handles.append(module.register_forward_pre_hook(pre))
        handles.append(module.register_forward_hook(post))

    for m in (model.x_embedder, model.t_embedder, model.y_embedder):
        wrap(m, "embed")
    for block in model.blocks:
        wrap(block.adaLN_modulation, "adaLN")
    wrap(model.final_layer, "final layer")
    return handles


KINDS = ("dense", "computed", "mixed", "skipped")  # columns: a bare step; lazy steps by the share of module-rows run


def step_kinds(model, y, steps, cfg, gates):
    """Respaced index k -> kind of step: "dense" without gates; with gates, from a first run's statistics,
    "computed" (at least 90% of the module-rows ran), "skipped" (at most 10%) or "mixed"."""
    if gates is None:
        return {k: "dense" for k in range(steps)}
    handle = apply_lazy(model, policy_for(gates))
    try:
        _run(model, y, steps, cfg)
        st = handle.stats()
    finally:
        handle.remove()
    run = 1 - (st.skipped.sum((1, 2)).double() / st.total.sum((1, 2)).double())  # (T,) share computed
    return {k: "computed" if run[k] >= 0.9 else "skipped" if run[k] <= 0.1 else "mixed" for k in range(steps)}


def timed_steps(model, y, steps, cfg, kinds):
    """Seconds of every model call of one sampling run, by kind (perf_counter, no profiler)."""
    out, t0 = defaultdict(list), {}

    def before(mod, args):
        t0["t"] = time.perf_counter()

    def after(mod, args, res):
        out[kinds[model._step]].append(time.perf_counter() - t0["t"])

    h = [model.register_forward_pre_hook(before), model.register_forward_hook(after)]
    try:
        _run(model, y, steps, cfg)
    finally:
        for x in h:
            x.remove()
    return out


def _run(model, y, steps, cfg):
    def count(info):
        model._step = info["k"] - 1

    model._step = steps - 1
    ddim_sample(model, y, steps, cfg_scale=cfg, seed=0, progress=False, callback=count)


def profiled_steps(model, y, steps, cfg, kinds):
    """Self CPU microseconds per label (parts, branch internals) and per aten op, averaged per kind of step."""
    by_kind = defaultdict(lambda: defaultdict(float))
    n = defaultdict(int)
    prof = {}

    def before(mod, args):
        prof["p"] = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU])
        prof["p"].__enter__()

    def after(mod, args, res):
        p = prof.pop("p")
        p.__exit__(None, None, None)
        kind = kinds[model._step]
        n[kind] += 1
        total = 0.0
        for e in p.key_averages():
            if e.key.startswith("ProfilerStep"):
                continue
            # the labelled parts inclusive (their ops' time), aten ops by self time
            by_kind[kind][e.key] += e.cpu_time_total if e.key in PARTS else e.self_cpu_time_total
            total += e.self_cpu_time_total
        by_kind[kind]["(all)"] += total

    h = [model.register_forward_pre_hook(before), model.register_forward_hook(after)]
    parts = label_parts(model)
    try:
        _run(model, y, steps, cfg)
    finally:
        for x in h + parts:
            x.remove()
    return {k: {op: us / n[k] for op, us in v.items()} for k, v in by_kind.items()}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--kind", default="lookahead", help="the shipped gates profiled (lazydit.assets.SHIPPED_GATES)")
    ap.add_argument("--batch", type=int, default=16, help="images (CFG doubles the rows)")
    ap.add_argument("--cfg", type=float, default=2.0)
    ap.add_argument("--repeats", type=int, default=3, help="timed runs (median per step over all of them)")
    ap.add_argument("--top", type=int, default=14, help="aten ops listed")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--md", default=None, help="also write the markdown table here")
    ap.add_argument("--json-out", default=None)
    ap.add_argument("--no-tune-allocator", action="store_true", help="leave glibc's malloc as it is")
    args = ap.parse_args(argv)
    tuned = False if args.no_tune_allocator else tune_allocator()
    if args.threads:
        torch.set_num_threads(args.threads)
    model = default_model()
    y = torch.arange(args.batch) % model.config.num_classes
    gates = default_gates(args.steps, kind=args.kind)
    res = dict(steps=args.steps, batch=args.batch, cfg=args.cfg, threads=torch.get_num_threads(),
               machine=platform.processor() or platform.machine(), torch=torch.__version__, allocator_tuned=tuned,
               kind=args.kind, wall_ms={}, profile={}, steps_of_kind={})
    times = defaultdict(list)

    kinds_of = {lazy: step_kinds(model, y, args.steps, args.cfg, gates if lazy else None) for lazy in (False, True)}

    def run(lazy, measure):
        kinds = kinds_of[lazy]
        handle = apply_lazy(model, policy_for(gates)) if lazy else None
        try:
            return measure(model, y, args.steps, args.cfg, kinds)
        finally:
            if handle:
                handle.remove()

    for lazy in (False, True):  # warm-up
        run(lazy, lambda m, y_, s, c, k: _run(m, y_, s, c))
    for _ in range(args.repeats):  # dense and lazy runs alternate, so that machine drift hits both alike
        for lazy in (False, True):
            for kind, t in run(lazy, timed_steps).items():
                times[kind] += t
    for lazy in (False, True):
        res["profile"].update(run(lazy, profiled_steps))
    for kind, t in times.items():
        res["wall_ms"][kind] = round(1e3 * statistics.median(t), 3)
    cols = tuple(k for k in KINDS if k in res["wall_ms"])
    for lazy in (False, True):
        for kind in kinds_of[lazy].values():
            res["steps_of_kind"][kind] = res["steps_of_kind"].get(kind, 0) + 1
    prof = res["profile"]
    ops = sorted({op for k in cols for op in prof.get(k, {}) if op not in PARTS and op != "(all)"},
                 key=lambda op: -max(prof.get(k, {}).get(op, 0) for k in cols))[: args.top]
    lines = [f"Per model call (one step), `{args.kind}` gates, batch {args.batch} with CFG ({2 * args.batch} rows), "
             f"T = {args.steps} (steps of each kind: "
             + ", ".join(f"{k} {res['steps_of_kind'][k]}" for k in cols) + "), "
             f"{res['threads']} threads, torch {res['torch']}, allocator "
             f"{'tuned (lazydit.tune_allocator)' if tuned else 'as it is'}.", "",
             "| | " + " | ".join(cols) + " |", "|---|" + "---:|" * len(cols),
             "| **wall-clock ms (median, no profiler)** | " + " | ".join(f"{res['wall_ms'].get(k, 0):.2f}"
                                                                          for k in cols) + " |",
             "| profiled self CPU ms, all ops | " + " | ".join(f"{prof.get(k, {}).get('(all)', 0) / 1e3:.2f}"
                                                              for k in cols) + " |"]
    for part in PARTS:
        if any(part in prof.get(k, {}) for k in cols):
            lines.append(f"| part: {part} (inclusive) | " + " | ".join(f"{prof.get(k, {}).get(part, 0) / 1e3:.3f}"
                                                                   for k in cols) + " |")
    for op in ops:
        lines.append(f"| `{op}` | " + " | ".join(f"{prof.get(k, {}).get(op, 0) / 1e3:.3f}" for k in cols) + " |")
    table = "\n".join(lines)
    print(table)
    print(json.dumps(res))
    if args.md:
        write_text_atomic(args.md, table + "\n")
    if args.json_out:
        write_text_atomic(args.json_out, json.dumps(res, indent=1))
    return res


if __name__ == "__main__":
    main()
