"""The `lazydit` command line: it parses arguments and calls the library, nothing else.

Errors the user can fix (`LazyditError`, bad files, unavailable devices, Ctrl-C) end with one line on stderr and a
non-zero exit; `--debug` (or LAZYDIT_DEBUG=1) shows the traceback instead. Heavy imports happen inside the commands,
so `lazydit --help` answers at once.
"""

import argparse
import json
import os
import sys

DEFAULT_CFG = 1.5  # guidance scale of every command (the paper's FID setting)
IMAGENET_SAMPLE_CLASSES = (207, 360, 387, 974, 88, 979, 417, 279)  # DiT's sample.py
DECODE_BATCH = 32  # images per VAE decode call
TEMP_NAME_EXTRA = 15  # what an atomic write's temporary file adds to a name: "." + name + ".XXXXXXXX.tmp"
NAME_MAX = 255  # bytes in one file name on the file systems lazydit writes to (ext4, xfs, btrfs, APFS, NTFS)


# ---------------------------------------------------------------- output


def _fmt(v):
    if isinstance(v, float):
        return f"{v:.4g}"
    return "" if v is None else str(v)


def _emit(args, rows, cols):
    """Rows as a table, or as JSON with --json."""
    if args.json:
        print(json.dumps(rows, indent=1))
        return
    widths = [max(len(c), *(len(_fmt(r.get(c))) for r in rows)) for c in cols]
    print("  ".join(c.ljust(w) for c, w in zip(cols, widths)))
    for r in rows:
        print("  ".join(_fmt(r.get(c)).ljust(w) for c, w in zip(cols, widths)))


def _emit_dict(args, res: dict):
    print(json.dumps(res) if args.json else "\n".join(f"{k}: {v}" for k, v in res.items()))


# ---------------------------------------------------------------- validation before any work


def _at_least(lo: int, hi: int | None = None):
    """argparse type: an integer >= lo (and <= hi): sizes >= 1; worker threads >= 0, 0 decoding in the main
    thread; sampling steps in [1, 1000]."""

    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
        if v < lo:
            raise argparse.ArgumentTypeError(f"must be at least {lo}, got {v}")
        if hi is not None and v > hi:
            raise argparse.ArgumentTypeError(f"must be at most {hi}, got {v}")
        return v

    return parse


_positive, _count = _at_least(1), _at_least(0)
_seed = _at_least(0, 2**63 - 1)  # torch generators take 64-bit seeds; DDP sampling adds the rank to seed * world
_steps = _at_least(1, 1000)  # T: the respacing picks T of the 1000 training timesteps


def _step_list(text: str) -> list:
    """argparse type: comma-separated step counts, each in [1, 1000]."""
    return [_steps(v.strip()) for v in text.split(",")]


def _real(lo: float, hi: float = float("inf"), lo_open: bool = True):
    """argparse type: a finite number in (lo, hi) ((lo, ...] closed at lo when lo_open is False): learning rates,
    penalties, decays, minutes."""
    import math

    def parse(text: str) -> float:
        try:
            v = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        ok = math.isfinite(v) and (v > lo if lo_open else v >= lo) and v < hi
        if not ok:
            left = "(" if lo_open else "["
            right = ", inf)" if hi == float("inf") else f", {hi:g})"
            raise argparse.ArgumentTypeError(f"must be a finite number in {left}{lo:g}{right}, got {text}")
        return v

    return parse


_rate, _penalty, _decay = _real(0), _real(0, lo_open=False), _real(0, 1, lo_open=False)


def _fraction(text: str) -> float:
    """argparse type: a number strictly between 0 and 1 (thresholds, lazy ratios)."""
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not 0 < v < 1:
        raise argparse.ArgumentTypeError(f"must lie strictly between 0 and 1, got {v}")
    return v


def _finite(text: str) -> float:
    """argparse type: a finite number >= 0 (guidance scales: 1 is none, below 1 weakens the condition)."""
    import math

    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(v) or v < 0:
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0 (1: no guidance), got {text}")
    return v


_OUTPUT_LOCKS = []  # main's ExitStack while a command runs: the output locks `_check_out(lock=True)` takes


def _check_out(path, folder: bool = False, ext: tuple = (), flag: str = "--out", apart_from=None, lock: bool = False):
    """Refuse an output path that cannot be written, before any work: a folder where a file goes (or the reverse),
    a parent that is a file or a symlink loop, a parent without write permission, a file that exists and is not a
    regular one (device, FIFO, socket), a name whose extension is not one of `ext` (lower case, e.g. (".npz",):
    the format written; compared case-insensitively), the same file as `apart_from` (--out; symlinks resolved).

    lock=True (under `main`): hold `lazydit.files.output_lock` on the output until the command ends, so a second
    run writing it is refused (under torchrun only rank 0 takes it: the other ranks write parts of the same run)."""
    from pathlib import Path

    from lazydit.errors import UsageError
    from lazydit.files import output_lock, output_target, refuse_symlink_loop

    if path is None:
        return
    p = Path(path)
    longest = max((len(part.encode()) for part in p.parts), default=0)
    if longest + TEMP_NAME_EXTRA > NAME_MAX:  # the temporary file beside it is named .<name>.<random>.tmp
        raise UsageError(f"{flag} {path}: a name of {longest} bytes is too long here (at most "
                         f"{NAME_MAX - TEMP_NAME_EXTRA}: the temporary file beside it adds {TEMP_NAME_EXTRA})")
    if folder:
        refuse_symlink_loop(p)
        if p.exists() and not p.is_dir():
            raise UsageError(f"{p} is a file: give a folder path")
    else:
        if p.is_dir():
            raise UsageError(f"{p} is a folder: give a file path")
        p = output_target(p)  # loops; an existing device, FIFO, socket; a symlink: its target
    anc = p.parent
    while not anc.exists():
        anc = anc.parent
    if not anc.is_dir():
        raise UsageError(f"cannot write {path}: {anc} is a file, not a folder")
    if not os.access(anc, os.W_OK):
        raise UsageError(f"cannot write {path}: no write permission in {anc}")
    if _in_shipped_assets(p):
        raise UsageError(f"{flag} {path} is inside lazydit's shipped assets: write it elsewhere")
    if ext and not str(path).lower().endswith(tuple(ext)):
        names = " or ".join(ext)
        raise UsageError(f"{flag} {path}: lazydit writes {names} here (the extension names the format): give a name "
                         f"ending in {names}")
    if apart_from is not None and (Path(path).resolve() == Path(apart_from).resolve() or (
            Path(path).exists() and Path(apart_from).exists() and os.path.samefile(path, apart_from))):
        raise UsageError(f"{flag} {path} is the same file as --out {apart_from}: one would overwrite the other; give "
                         "them different names")
    if lock and _OUTPUT_LOCKS and os.environ.get("RANK", "0") == "0":
        _OUTPUT_LOCKS[-1].enter_context(output_lock(path, what=str(path)))


# ---------------------------------------------------------------- arguments -> library objects


def _device(args):
    """--device as a checked name: 'auto' resolved, an unknown or unavailable device refused before any work."""
    import torch

    from lazydit.errors import UsageError

    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(args.device)
    except RuntimeError:
        raise UsageError(f"--device {args.device}: not a torch device (e.g. cpu, cuda, cuda:1, mps, auto)") from None
    if dev.type not in ("cpu", "cuda", "mps"):
        raise UsageError(f"--device {args.device}: lazydit runs on cpu, cuda[:N] or mps (or auto), not {dev.type}")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"--device {args.device}: this torch ({torch.__version__}) sees no CUDA GPU; use "
                             "--device cpu, or install a CUDA build of torch")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise UsageError(f"--device {args.device}: only {torch.cuda.device_count()} CUDA device(s) visible")
    elif dev.type == "mps" and not torch.backends.mps.is_available():
        raise UsageError(f"--device {args.device}: MPS is not available on this machine; use --device cpu")
    return args.device


def _overrides(args) -> dict:
    """--model-config "depth=2,num_heads=2" as config-field overrides."""
    from lazydit.errors import LazyditError

    out = {}
    for item in filter(None, (getattr(args, "model_config", None) or "").split(",")):
        key, sep, value = item.partition("=")
        if not sep:
            raise LazyditError(f"--model-config: expected key=value, got {item!r}")
        try:
            out[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            out[key.strip()] = value.strip()
    return out


def _model(args):
    from lazydit.loading import load_model

    return load_model(args.model, name=args.model_name, image_size=args.image_size, overrides=_overrides(args),
                      device=_device(args), captions=getattr(args, "captions", None))


def _lazy_config(args):
    from lazydit.lazy import LazyConfig

    return LazyConfig(threshold=args.threshold, uniform=args.uniform, tie_cfg=args.tie_cfg,
                      compile=getattr(args, "compile", False), max_skips=args.max_skips, forecast=args.forecast)


def _policy(args):
    """The policy of --gates / --method (at most one of them; gates become their policy with the sampling options),
    or None for the bare sampler."""
    from lazydit.errors import LazyditError

    if args.gates not in (None, "none") and args.method:
        raise LazyditError("pass --gates or --method, not both")
    if args.method:
        from lazydit.lazy import make_policy

        return make_policy(args.method, args.steps, _lazy_config(args), device=args.device)  # apply_lazy checks the fit
    if args.gates in (None, "none"):
        return None
    from lazydit.lazy import policy_for
    from lazydit.lazy.shipped import resolve_gates

    gates = resolve_gates(args.gates, args.steps, args.device)
    gates.check_steps(args.steps)
    return policy_for(gates, _lazy_config(args))


def _prepare(policy, model, args):
    """Fit what a method fits on the model before sampling (TeaCache's polynomial), on the class grid (4 per class)."""
    if policy is None:
        return
    from lazydit.pipeline import class_grid_labels

    y = class_grid_labels(min(model.config.num_classes, 10), 4, next(model.parameters()).device)
    policy.prepare(model, y, args.cfg, args.seed, args.sampler)


def cmd_compare(args):
    from pathlib import Path

    from lazydit.evaluation.compare import compare, write_report
    from lazydit.evaluation.rows import RowSettings, parse_spec

    _device(args)
    for s in args.configs:
        parse_spec(s)  # every configuration is checked before the model loads
    parse_spec(args.reference)
    _check_out(args.out, folder=True, lock=True)
    extractor, ref = _extractor_and_ref(args)
    model = _model(args)
    cfg = RowSettings(num_samples=args.num_samples, cfg_scale=args.cfg, seed=args.seed, batch_size=args.batch_size,
                        micro_batch=args.micro_batch, reference=args.reference, ref_samples=args.ref_samples)

    def command_line():
        """`lazydit compare` with the configurations and every option that shapes the results (all of them but
        --json and --device; --ref-samples resolved), so that the report says how to regenerate it."""
        import shlex

        parser = build_parser()
        sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices["compare"]
        words = ["lazydit", "compare", *args.configs]
        for a in sub._actions:
            if not a.option_strings or a.help == argparse.SUPPRESS or a.dest in ("help", "json", "device"):
                continue
            v = cfg.reference_count if a.dest == "ref_samples" else getattr(args, a.dest, None)
            if v is not None and v is not False:
                words += [a.option_strings[0]] + ([] if v is True else [str(v)])
        return " ".join(shlex.quote(w) for w in words)

    rows = compare(model, args.configs, cfg, extractor, ref, Path(args.out) / "rows", progress=not args.json,
                   log=(lambda m: None) if args.json else (lambda m: print(m, flush=True)))
    write_report(rows, cfg, Path(args.out) / "compare", command=command_line())
    for r in rows:
        r["config"] = r["sampler"]
    _emit(args, rows, ["config", "lazy_ratio", "tmacs", "fid", "sfid", "inception_score", "precision", "recall",
                       "psnr_vs_ref", "seconds_per_image"])
    if not args.json:
        print(f"wrote {args.out}/compare.md, .csv, .json, compare_tmacs.png, compare_seconds.png")


def _tune_extractor(args, model):
    """--extractor fmnist / fmnist-resnet (the shipped Fashion-MNIST extractors) or module:function (called with no
    arguments: a module with `.features(x)`), else the shipped Fashion-MNIST classifier for the embedded default,
    else none (PSNR only)."""
    if not args.extractor:
        return "auto"
    import importlib

    from lazydit.errors import UsageError

    if args.extractor in ("fmnist", "fmnist-resnet"):
        from lazydit.evaluation import fmnist

        load = fmnist.default_classifier if args.extractor == "fmnist" else fmnist.resnet_classifier
        return load(next(model.parameters()).device)

    mod, sep, fn = args.extractor.partition(":")
    if not sep or not mod or not fn:
        raise UsageError(f"--extractor {args.extractor!r}: expected module:function")
    try:
        ext = getattr(importlib.import_module(mod), fn)()
    except (ImportError, AttributeError) as e:
        raise UsageError(f"--extractor {args.extractor}: {e}") from None
    return ext.to(next(model.parameters()).device).eval() if hasattr(ext, "to") else ext


def cmd_tune(args):
    from lazydit.evaluation.rows import parse_spec
    from lazydit.tuning import check_budget, tune

    check_budget(args.budget, args.budget_kind)
    parse_spec(args.fine)
    _check_out(args.out, folder=True, lock=True)
    import torch

    model = _model(args).to(getattr(torch, args.dtype))
    extractor = _tune_extractor(args, model)
    ref = args.ref
    if ref == "default":  # the shipped test-split statistics of the extractor in use
        from lazydit.evaluation import fmnist

        ref = (fmnist.resnet_reference() if args.extractor == "fmnist-resnet" else fmnist.default_reference())
    recipe = tune(model, args.budget, args.out, budget_kind=args.budget_kind, num_samples=args.num_samples,
                  n0=args.first, fine=args.fine, cfg_scale=args.cfg, seed=args.seed, max_minutes=args.max_minutes,
                  extractor=extractor, model_name=args.model, progress=not args.json, micro_batch=args.batch_size,
                  ref=ref, train_gates=args.train_gates, gate_iters=args.gate_iters,
                  log=(lambda m: None) if args.json else (lambda m: print(m, flush=True)))
    q = recipe["quality"]
    row = dict(config=recipe["config"], tmacs=recipe["tmacs"], budget_share=recipe["budget_share"],
               metric=q["metric"], value=q["value"], psnr_to_fine=q["psnr_to_fine"], decision=q["decision"],
               out=args.out)
    _emit(args, [row], ["config", "tmacs", "budget_share", "metric", "value", "psnr_to_fine", "decision", "out"])
    if not args.json:
        print(f"wrote {args.out}/recipe.json, report.md, frontier.md, .csv, .json, .png")


def _recipe_flags(args):
    """Refuse --steps / --gates / --method / --sampler given with --recipe (the recipe sets them)."""
    from lazydit.errors import UsageError

    p = argparse.ArgumentParser(add_help=False)
    for flag in ("--steps", "--gates", "--method", "--sampler", "--cfg"):
        p.add_argument(flag, default=None)
    given, _ = p.parse_known_args(getattr(args, "_argv", []))
    clash = [f"--{k}" for k in ("steps", "gates", "method", "sampler") if getattr(given, k) is not None]
    if clash:
        raise UsageError(f"--recipe sets the sampler, steps and caching method: drop {', '.join(clash)}")
    return given.cfg is not None


def _labels(args, num_classes):
    """(labels, classes per grid row): --labels, else every class of small label sets (<= 10), DiT's sample.py
    classes for ImageNet-1k, else the first 10; each repeated --per-class times, one class per column."""
    import torch

    from lazydit.errors import LazyditError
    from lazydit.pipeline import class_grid_labels

    device = args.device
    if getattr(args, "labels", None) is not None:
        if not args.labels.strip():
            raise LazyditError("--labels is empty: give comma-separated class numbers, e.g. 0,3,7")
        try:
            y = torch.tensor([int(v) for v in args.labels.split(",")], device=device)
        except ValueError:
            raise LazyditError(f"--labels {args.labels!r}: expected comma-separated class numbers, e.g. 0,3,7") from None
        if (y < 0).any() or (y >= num_classes).any():
            raise LazyditError(f"labels must be in [0, {num_classes})")
        return y, min(len(y), 10)
    per_class = args.per_class
    if num_classes <= 10:
        return class_grid_labels(num_classes, per_class, device), num_classes
    classes = IMAGENET_SAMPLE_CLASSES if num_classes == 1000 else tuple(range(10))
    return torch.tensor(classes, device=device).repeat(per_class), len(classes)


# ---------------------------------------------------------------- commands


def cmd_demo(args):
    from lazydit.demo import run_demo

    _check_out(args.out, folder=True)
    rows = run_demo(args.out, per_class=args.per_class, cfg_scale=args.cfg, seed=args.seed, device=_device(args),
                    progress=not args.json, kind=args.gates)
    _emit(args, rows, ["sampler", "steps", "lazy_ratio", "tmacs", "gmacs", "seconds", "png"])
    if not args.json:
        print(f"\nside by side: {args.out}/compare.png")


def cmd_pretrain(args):
    from lazydit.models.dit import model_config
    from lazydit.training.pretrain import PretrainConfig, pretrain
    from lazydit.training.resume import check_run_folder

    check_run_folder(args.out, args.resume)  # before any data work
    _check_out(args.out, folder=True, lock=True)  # one run at a time in a run folder

    autoencoder = args.autoencoder
    if autoencoder is None and model_config(args.model_name).in_channels == 4:  # a latent model: the shipped one
        from lazydit.assets import DEFAULT_AUTOENCODER

        autoencoder = str(DEFAULT_AUTOENCODER)
    cfg = PretrainConfig(model=args.model_name, data=args.data, out=args.out, iters=args.iters,
                         batch_size=args.batch_size, lr=args.lr, ema_decay=args.ema_decay, seed=args.seed,
                         ckpt_every=args.ckpt_every, max_minutes=args.max_minutes, bf16=args.bf16,
                         resume=args.resume, flip=args.flip, autoencoder=autoencoder, warmup=args.warmup)
    path = pretrain(cfg, device=_device(args))
    print(json.dumps({"model": str(path)}) if args.json else f"EMA model written to {path}")


def cmd_train_autoencoder(args):
    from lazydit.training.autoencoder import AutoencoderTrainConfig, train_autoencoder
    from lazydit.training.resume import check_run_folder

    check_run_folder(args.out, args.resume)  # before any data work
    _check_out(args.out, folder=True, lock=True)  # one run at a time in a run folder

    cfg = AutoencoderTrainConfig(data=args.data, out=args.out, latent_channels=args.latent_channels,
                                 width=args.width, downsample=args.downsample, iters=args.iters, batch_size=args.batch_size, lr=args.lr,
                                 kl_weight=args.kl_weight, seed=args.seed, ckpt_every=args.ckpt_every,
                                 max_minutes=args.max_minutes, resume=args.resume)
    path = train_autoencoder(cfg, device=_device(args), progress=not args.json)
    print(json.dumps({"autoencoder": str(path)}) if args.json else f"autoencoder written to {path}")


def cmd_train_gates(args):
    from lazydit import ranks
    from lazydit.data.sources import gate_training_data
    from lazydit.errors import UsageError
    from lazydit.lazy.gates import check_reachable
    from lazydit.training.gates import GateTrainConfig, train_gates
    from lazydit.training.resume import check_run_folder

    check_run_folder(args.out, args.resume)  # before any data work (encoding Fashion-MNIST takes a while)
    _check_out(args.out, folder=True, lock=True)  # one run at a time in a run folder
    check_reachable(args.target_ratio, parity=not args.every_step, name="--target-ratio")
    if args.every_step and args.lookahead:
        raise UsageError("--every-step and --lookahead do not go together: look-ahead gates need the parity")
    if args.rollout and args.lookahead:
        raise UsageError("--rollout and --lookahead do not go together: look-ahead gates always compute the step "
                         "after a skip, so their skips never chain")
    if args.rollout and not args.every_step:
        raise UsageError(f"--rollout {args.rollout} trains the skip chains of every-step gates: add --every-step "
                         "(under the reference parity every other step computes)")
    if args.data_free and (args.data or args.latents or args.vae):
        raise UsageError("--data-free trains on the model's own trajectories: drop --data / --latents / --vae")
    args.device = ranks.init_distributed(_device(args))  # torchrun: one GPU per process; else a no-op
    if args.tf32:
        ranks.set_tf32(True)
    model = _model(args)
    timesteps, schedule = _scheduler_schedule(args)
    if args.data_free:
        from lazydit.training.trajectories import trajectory_data

        data, source = trajectory_data(model, args.steps, args.batch_size, size=args.pool, cfg_scale=args.cfg,
                                       seed=args.seed, progress=ranks.is_main() and not args.json,
                                       timesteps=timesteps)
    else:
        data, source = gate_training_data(model, args.batch_size, data=args.data, latents=args.latents,
                                          vae=args.vae, workers=args.workers, seed=args.seed)
    cfg = GateTrainConfig(steps=args.steps, iters=args.iters, batch_size=args.batch_size, lr=args.lr,
                          rho_attn=args.rho if args.rho_attn is None else args.rho_attn,
                          rho_mlp=args.rho if args.rho_mlp is None else args.rho_mlp, seed=args.seed,
                          ckpt_every=args.ckpt_every, out=args.out, resume=args.resume, lookahead=args.lookahead,
                          bf16=args.bf16, every_step=args.every_step, data_free=args.data_free,
                          forecast=args.forecast, timesteps=timesteps, schedule=schedule, rollout=args.rollout)
    gates = train_gates(model, data, cfg, progress=not args.json,
                        extra_meta={"model_path": str(args.model or "default"), **source})
    ranks.cleanup()
    if not ranks.is_main():  # only rank 0 prints and writes
        return
    out = f"{args.out}/gates.safetensors"
    result = {"gates": out, "steps": args.steps, "threshold": gates.threshold}
    if args.target_ratio is not None:
        th, ratio = _calibrate_and_save(model, gates, args, out)
        result.update(threshold=th, calibrated_lazy_ratio=ratio)
    _emit_dict(args, result)


def _scheduler_schedule(args):
    """(timesteps, schedule name) of --scheduler for --steps, or (None, None): lazydit's respacing."""
    if not args.scheduler:
        return None, None
    from lazydit.errors import LazyditError

    try:
        from lazydit.diffusers import load_scheduler, schedule_name, scheduler_timesteps
    except ImportError as e:
        raise LazyditError("--scheduler reads a diffusers scheduler: pip install diffusers") from e
    try:
        scheduler = load_scheduler(args.scheduler)
    except LazyditError as e:  # the message starts with the folder: name the flag too
        raise LazyditError(f"--scheduler {e}") from e
    return tuple(scheduler_timesteps(scheduler, args.steps)), schedule_name(scheduler, args.steps)


def cmd_extract_latents(args):
    import numpy as np

    from lazydit.data.imagefolder import ImageFolder, LatentSet, extract_latents
    from lazydit.data.vae import load_vae

    _check_out(args.out, folder=True, lock=True)  # one run at a time in a latent folder
    ds = ImageFolder(args.data, image_size=args.image_size)
    vae = load_vae(args.vae, _device(args))
    out = extract_latents(vae, ds, args.out, batch_size=args.batch_size, flip=args.flip, posterior=args.posterior,
                          seed=args.seed, dtype=np.dtype(args.dtype), num_workers=args.workers,
                          progress=not args.json)
    lat = LatentSet(out)
    _emit_dict(args, {"latents": str(out), "images": len(lat), "classes": len(ds.classes),
                      "shape": list(lat.latents.shape)})


def cmd_sample_ddp(args):
    from functools import partial

    from lazydit import distributed, ranks
    from lazydit.data.vae import decode, decoder_for
    from lazydit.files import weights_fingerprint

    _check_out(args.out, ext=(".npz",), lock=True)
    args.device = ranks.init_distributed(_device(args))  # torchrun: one GPU per process; else a no-op
    if args.tf32:
        ranks.set_tf32(True)
    model = _model(args)
    vae = decoder_for(model, args.vae, args.device)
    dec = None
    if vae is not None:
        dec = partial(decode, vae, batch_size=DECODE_BATCH)
        dec.fingerprint = weights_fingerprint(vae)  # joins the resume check of the parts
    policy = _policy(args)
    _prepare(policy, model, args)
    res = distributed.sample_sharded(model, args.num_samples, args.steps, policy=policy,
                                     cfg_scale=args.cfg, batch_size=args.batch_size, seed=args.seed,
                                     num_classes=args.num_classes, out_npz=args.out,
                                     keep_parts=args.keep_parts, progress=ranks.is_main() and not args.json,
                                     decode=dec, sampler=args.sampler)
    ranks.cleanup()
    if ranks.is_main():
        _emit_dict(args, res)


def _calibrate_and_save(model, gates, args, out):
    """`calibrate_and_save` with the command's options, on the class-grid batch of --calib-per-class."""
    from lazydit.training.calibrate import calibrate_and_save

    yc, _ = _labels(argparse.Namespace(device=args.device, per_class=args.calib_per_class), model.config.num_classes)
    return calibrate_and_save(model, gates, args.target_ratio, yc, out, cfg_scale=args.cfg, seed=args.seed,
                              progress=not args.json)


def _is_shipped_file(path) -> bool:
    """Whether `path` names a file in lazydit's shipped assets (symlinks resolved)."""
    from pathlib import Path

    from lazydit.assets import ASSETS

    return Path(path).resolve().parent == ASSETS.resolve()


def _in_shipped_assets(path) -> bool:
    """Whether `path` (a file or a folder) lies in lazydit's shipped assets folder, or is it (symlinks resolved)."""
    from pathlib import Path

    from lazydit.assets import ASSETS

    resolved, assets = Path(path).resolve(), ASSETS.resolve()
    return resolved == assets or assets in resolved.parents


def cmd_calibrate(args):
    from lazydit.errors import GateMismatchError, UsageError
    from lazydit.lazy.gates import check_reachable
    from lazydit.lazy.shipped import resolve_gates, shipped_kind

    shipped = shipped_kind(args.gates) is not None or _is_shipped_file(args.gates)
    if args.in_place and (shipped or args.out):
        raise UsageError("--in-place rewrites a gate file of yours: not the shipped gates, and not with --out")
    if not args.in_place and not args.out:
        raise UsageError("calibrate writes a new gate file: pass --out FILE (or --in-place to rewrite --gates)")
    if shipped and args.steps is None:
        raise UsageError("--gates default needs --steps T: which shipped set (10, 20, 40 or 50)")
    if args.out and _is_shipped_file(args.out):
        raise UsageError(f"--out {args.out} is a file shipped with lazydit: write the calibrated gates elsewhere")
    _check_out(args.out, ext=(".safetensors",), lock=True)
    model = _model(args)
    gates = resolve_gates(args.gates, args.steps, args.device)
    check_reachable(args.target_ratio, parity=gates.parity, name="--target-ratio")
    if args.steps is not None and args.steps != gates.steps:
        raise GateMismatchError(f"{args.gates} holds gates for T={gates.steps}, not --steps {args.steps}")
    args.steps = gates.steps
    out = args.out or args.gates
    th, ratio = _calibrate_and_save(model, gates, args, out)
    _emit_dict(args, {"gates": out, "threshold": th, "lazy_ratio": ratio})


def cmd_sample(args):
    from lazydit.data.vae import decode, decoder_for
    from lazydit.errors import UsageError
    from lazydit.images import save_grid, save_npz
    from lazydit.pipeline import sample

    _check_out(args.out, ext=(".png", ".npz"), lock=True)
    _check_out(args.heatmap, ext=(".png",), flag="--heatmap", apart_from=args.out, lock=True)
    if (args.heatmap or args.report) and args.gates in (None, "none") and not args.method and not args.recipe:
        raise UsageError("--heatmap and --report show where a caching method skips: pass --gates or --method")
    if args.report and not args.json:
        raise UsageError("--report adds per-step/layer/branch ratios to the JSON row: pass --json too")
    cfg_given = _recipe_flags(args) if args.recipe else None
    if args.recipe:
        from lazydit.tuning import load_recipe

        recipe = load_recipe(args.recipe)
    model = _model(args)
    vae = decoder_for(model, args.vae, args.device)
    if args.recipe:
        policy = recipe.policy(model)  # refuses a model the recipe was not tuned on
        args.steps, args.sampler = recipe.steps, recipe.sampler
        if not cfg_given:
            args.cfg = recipe.cfg_scale
    else:
        policy = _policy(args)
        _prepare(policy, model, args)
    y, nrow = _labels(args, model.config.num_classes)
    x, rep = sample(model, y, args.steps, policy=policy, cfg_scale=args.cfg, seed=args.seed, progress=not args.json,
                    sampler=args.sampler)
    if vae is not None:
        x = decode(vae, x, batch_size=DECODE_BATCH)
    if args.out.lower().endswith(".npz"):
        save_npz(x, args.out, labels=y.cpu().numpy())
    else:
        scale = args.scale if args.scale is not None else (3 if x.shape[-1] < 64 else 1)
        save_grid(x, args.out, nrow=nrow, scale=scale)
    row = {**rep.row(), "out": args.out}
    if args.heatmap and rep.lazy is not None:
        from lazydit.plots import laziness_heatmap

        laziness_heatmap(rep.stats["per_step_layer_branch"], args.heatmap, title=f"{rep.name}")
        row["heatmap"] = args.heatmap
    if args.report and rep.lazy is not None:
        row.update({k: rep.stats[k] for k in ("per_step", "per_layer", "per_branch")})
    _emit(args, [row], ["sampler", "steps", "lazy_ratio", "tmacs", "gmacs", "seconds", "out"])


def _extractor_and_ref(args):
    """The feature extractor and its reference statistics for `eval` (`extractor_and_reference`)."""
    from lazydit.errors import LazyditError
    from lazydit.evaluation.features import extractor_and_reference

    if args.extractor == "inception" and (not args.inception_weights or not args.ref):
        raise LazyditError("--extractor inception needs --inception-weights FILE and --ref FILE")
    return extractor_and_reference(args.extractor, args.device, ref=args.ref,
                                   inception_weights=args.inception_weights, progress=not args.json)


EVAL_SAMPLING_OPTIONS = ("model", "model_name", "image_size", "model_config", "steps", "cfg", "sampler", "gates",
                         "method", "threshold", "uniform", "tie_cfg", "max_skips", "forecast", "num_samples",
                         "batch_size", "micro_batch", "name", "out")


def _check_eval_options(args):
    """`eval --samples` scores a file, so options that shape sampling would be ignored: refuse them; precision and
    recall take k = 3 neighbours, so fewer than 4 samples cannot be scored (refused before sampling)."""
    from lazydit.errors import UsageError

    if args.samples:
        defaults = vars(build_parser().parse_args(["eval"]))
        given = [k for k in EVAL_SAMPLING_OPTIONS if getattr(args, k) != defaults.get(k)]
        if given:
            flags = ", ".join("--" + k.replace("_", "-") for k in given)
            raise UsageError(f"eval --samples scores an existing .npz: {flags} would be ignored; drop "
                             f"{'it' if len(given) == 1 else 'them'}, or sample with eval without --samples")
    elif args.num_samples < 4:
        raise UsageError(f"--num-samples {args.num_samples}: precision and recall need at least 4 samples (k = 3 "
                         "neighbours); FID needs thousands to rank samplers")


def cmd_eval(args):
    from lazydit.errors import LazyditError, UsageError
    from lazydit.evaluation.driver import EvalConfig, evaluate_config, score
    from lazydit.evaluation.metrics import load_npz_samples

    _device(args)
    _check_eval_options(args)
    _check_out(args.out, ext=(".npz",), lock=True)
    extractor, ref = _extractor_and_ref(args)
    if args.samples:  # score an existing ADM .npz
        images = load_npz_samples(args.samples)
        if len(images) < 4:
            raise UsageError(f"{args.samples} holds {len(images)} sample(s): precision and recall need at least 4 "
                             "samples (k = 3 neighbours); FID needs thousands to rank samplers")
        row = dict(sampler=args.samples, n=len(images), **score(extractor, images, ref, progress=not args.json))
    else:
        model = _model(args)
        if model.config.in_channels not in (1, 3) and not getattr(model, "autoencoder_file", None):
            raise LazyditError("eval samples pixel models and models that name their autoencoder (the embedded "
                               "default); for another latent model write the images with "
                               "`lazydit sample-ddp --vae VAE_FOLDER --out s.npz`, then `lazydit eval --samples s.npz`")
        policy = _policy(args)
        _prepare(policy, model, args)
        cfg = EvalConfig(steps=args.steps, cfg_scale=args.cfg, num_samples=args.num_samples,
                         batch_size=args.batch_size, seed=args.seed, name=args.name, micro_batch=args.micro_batch,
                         sampler=args.sampler)
        row = evaluate_config(model, cfg, extractor, ref, policy=policy, out=args.out, progress=not args.json)
        row["out"] = args.out
    _emit(args, [row], ["sampler", "steps", "n", "fid", "sfid", "inception_score", "precision", "recall", "kid",
                        "lazy_ratio", "tmacs", "seconds"])


def cmd_cost(args):
    from lazydit.assets import default_model_name
    from lazydit.errors import OptionRangeError
    from lazydit.models.cost import forward_macs
    from lazydit.models.dit import config_for_image_size, image_per_latent

    name = default_model_name() if args.model == "default" else args.model  # 'default': the shipped model
    try:
        cfg = config_for_image_size(name, args.image_size, what="--image-size")
    except OptionRangeError as e:
        print(f"lazydit cost: error: {e} (see lazydit cost --help)", file=sys.stderr)
        raise SystemExit(2)
    factor = image_per_latent(name)

    def tmacs(macs):  # 3 decimals, as the paper; small models keep 4 significant digits
        return round(macs / 1e12, 3) if macs >= 1e11 else float(f"{macs / 1e12:.4g}")

    rows = []
    for s in args.steps:
        rows.append(dict(model=name, image_size=args.image_size or cfg.input_size * factor, steps=s,
                         tmacs=tmacs(s * forward_macs(cfg)), tmacs_with_attention=tmacs(s * forward_macs(cfg, True))))
    _emit(args, rows, ["model", "image_size", "steps", "tmacs", "tmacs_with_attention"])


# ---------------------------------------------------------------- the parser


def _common(sp, model=True):
    sp.add_argument("--device", default="auto", help="torch device; auto: cuda when available, else cpu")
    sp.add_argument("--seed", type=_seed, default=0, help="labels, noise and data order")
    sp.add_argument("--json", action="store_true", help="print the figures as JSON")
    if model:
        sp.add_argument("--model", default="default",
                        help="'default' (the shipped Fashion-MNIST DiT), a DiT file (.safetensors from lazydit, "
                             "released .pt, training checkpoint) or a Large-DiT checkpoint folder "
                             "(consolidated_ema.00-of-01.pth + model_args.pth)")
        sp.add_argument("--model-name", default=None,
                        help="zoo name (DiT-XL/2, ...) for DiT files without a config (a released file's name, "
                             "DiT-XL-2-256x256.pt, gives it); Large-DiT: only without model_args.pth")
        sp.add_argument("--image-size", type=_positive, default=None,
                        help="image size of the model (256 or 512; latent = size / 8) for files without a config "
                             "(default: a released file's name, else the zoo's 256)")
        sp.add_argument("--model-config", default=None,
                        help="config fields for files without a config, e.g. 'num_classes=10,learn_sigma=false'")


def _sampling(sp, steps=50, gates=True, compile_flag=False):
    """The options every sampling command shares."""
    sp.add_argument("--steps", type=_steps, default=steps, help="T, sampling steps")
    sp.add_argument("--cfg", type=_finite, default=DEFAULT_CFG, help="classifier-free guidance scale (1: none)")
    spaced = [f"{s}-{p}" for s in ("dpm++2m", "unipc") for p in ("uniform", "trailing", "logsnr")]
    sp.add_argument("--sampler", choices=["ddim", "dpm++2m", "unipc", *spaced], default="ddim",  # = sampling.SAMPLERS
                    help="DDIM, DPM-Solver++(2M) or UniPC at the same timesteps (gates and methods attach to each); "
                         "-uniform / -trailing / -logsnr: at diffusers' spacings (methods only on those timesteps)")
    if not gates:
        return

    class method_text(argparse.Action):
        """--method: refuse an empty one at once (it would otherwise mean plain sampling)."""

        def __call__(self, parser, namespace, values, option_string=None):
            if not values.strip():
                parser.error("--method is empty: name a method, e.g. fora:interval=2")
            setattr(namespace, self.dest, values)

    sp.add_argument("--gates", default=None,
                    help="gate file, or a shipped set for --steps: default (the paper's recipe), default-lookahead, "
                         "default-forecast, default-every-forecast; or none: plain sampling (default: none)")
    sp.add_argument("--method", default=None, action=method_text,
                    help="another caching policy instead of gates: a registered name[:key=value,...] (fora:interval=2, "
                         "teacache:threshold=0.1, ...), lazy:gates=FILE|default[-KIND][,threshold=P] or "
                         "l2c:router=FILE[,threshold=P] (as compare's configurations; target= calibration is "
                         "compare's), or package.module:Class[:key=value,...] (see docs/architecture.md)")
    sp.add_argument("--threshold", type=_fraction, default=None, help="gate compute threshold (default: the gates')")
    sp.add_argument("--uniform", action="store_true", help="one skip decision per module for the whole batch")
    sp.add_argument("--tie-cfg", action="store_true", help="cond and uncond rows of a pair decide together")
    sp.add_argument("--max-skips", type=_count, default=None,
                    help="at most this many consecutive skips per module and row (every-step gates; default: the "
                         "--rollout the gates were trained with, else any)")
    sp.add_argument("--forecast", type=int, choices=(0, 1, 2), default=None,
                    help="order of the forecast a skipped module receives (default: the one the gates were trained "
                         "with; 0: a copy)")
    if compile_flag:
        sp.add_argument("--compile", action="store_true", help="torch.compile the branches (look-ahead gates only)")


def _evaluator(sp):
    sp.add_argument("--extractor", choices=["fmnist", "fmnist-resnet", "inception"], default="fmnist",
                    help="fmnist: the shipped classifier and test-split statistics; fmnist-resnet: the second, "
                    "independently trained Fashion-MNIST extractor; inception: InceptionV3 (FID)")
    sp.add_argument("--inception-weights", default=None, help="pt_inception-2015-12-05-6726825d.pth (local file)")
    sp.add_argument("--ref", default=None, help="reference statistics (.npz from lazydit) or an ADM reference batch")


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors: 'lazydit sample: error: ... (lazydit sample --help)', exit status 2."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser():
    import re

    class fmt(argparse.ArgumentDefaultsHelpFormatter):
        """Appends '(default: X)' unless the help already says its default ('default: ...') or there is none to
        show (None, an off switch)."""

        def _get_help_string(self, action):
            text = action.help or ""
            if action.default is None or action.default is False or re.search(r"\bdefault:", text, re.I):
                return text
            return super()._get_help_string(action)

    class deprecated(argparse.Action):
        """A renamed option still accepted (hidden from --help) with a one-line warning."""

        def __call__(self, parser, namespace, values, option_string=None):
            print(f"warning: {option_string} is deprecated: use {self.metavar}", file=sys.stderr)
            setattr(namespace, self.dest, values)

    p = _Parser(prog="lazydit", description="LazyDiT: learned lazy gates for diffusion transformers")
    p.add_argument("--debug", action="store_true", help="show tracebacks (also LAZYDIT_DEBUG=1)")
    sub = p.add_subparsers(dest="command", required=True)

    def add(name, func, help_, **kw):
        sp = sub.add_parser(name, help=help_, description=help_, formatter_class=fmt, **kw)
        sp.set_defaults(func=func)
        return sp

    sp = add("demo", cmd_demo, "sample the shipped model with DDIM-50, DDIM-25 and Lazy-50 (offline)")
    _common(sp, model=False)
    sp.add_argument("--out", default="lazydit-demo", help="folder for the PNG grids")
    sp.add_argument("--per-class", type=_positive, default=4, help="images per class")
    sp.add_argument("--cfg", type=_finite, default=DEFAULT_CFG, help="classifier-free guidance scale")
    sp.add_argument("--gates", default="reference",
                    help="kind of the shipped T=50 gates the Lazy-50 row uses: reference, lookahead, forecast or "
                         "every-forecast")

    sp = add("pretrain", cmd_pretrain, "train a class-conditional DiT on Fashion-MNIST (with EMA)")
    _common(sp, model=False)
    sp.add_argument("--model-name", default="DiT-FMNIST-Latent",
                    help="zoo name of the model to train: the embedded default's latent model (on the shipped "
                         "autoencoder unless --autoencoder says otherwise), or DiT-FMNIST on pixels")
    sp.add_argument("--data", default=None, help="folder with the Fashion-MNIST IDX files (default: Debian's)")
    sp.add_argument("--out", default="runs/pretrain", help="run folder (checkpoint, EMA model, previews)")
    sp.add_argument("--iters", type=_positive, default=20000, help="optimiser steps")
    sp.add_argument("--batch-size", type=_positive, default=64, help="images per optimiser step")
    sp.add_argument("--lr", type=_rate, default=3e-4, help="AdamW learning rate")
    sp.add_argument("--ema-decay", type=_decay, default=0.999, help="EMA decay of the weights")
    sp.add_argument("--ckpt-every", type=_positive, default=500, help="optimiser steps between checkpoints")
    sp.add_argument("--max-minutes", type=_rate, default=None,
                    help="wall-clock budget of the whole run, previews included: stop and save then")
    sp.add_argument("--bf16", action="store_true", help="bf16 autocast (CUDA)")
    sp.add_argument("--flip", action="store_true", help="random horizontal flips")
    sp.add_argument("--resume", action="store_true", help="continue from <out>/checkpoint.pt")
    sp.add_argument("--warmup", type=_positive, default=200, help="linear lr warm-up, in optimiser steps")
    sp.add_argument("--autoencoder", default=None,
                    help="the autoencoder whose latents a latent model learns (a train-autoencoder file; default for a "
                         "latent model: the shipped one); the model then decodes with it")

    sp = add("train-autoencoder", cmd_train_autoencoder,
             "train the small Fashion-MNIST autoencoder a latent DiT (DiT-FMNIST-Latent) models")
    _common(sp, model=False)
    sp.add_argument("--data", default=None, help="folder with the Fashion-MNIST IDX files (default: Debian's)")
    sp.add_argument("--out", default="runs/autoencoder", help="run folder (checkpoint, autoencoder.safetensors)")
    sp.add_argument("--latent-channels", type=_positive, default=4, help="latent channels C")
    sp.add_argument("--width", type=_positive, default=64, help="channels of the inner stages")
    sp.add_argument("--downsample", type=_positive, default=1, help="stride-2 stages (latents 28 / 2^N wide)")
    sp.add_argument("--iters", type=_positive, default=6000, help="optimiser steps")
    sp.add_argument("--batch-size", type=_positive, default=128, help="images per optimiser step")
    sp.add_argument("--lr", type=_rate, default=2e-3, help="Adam learning rate (cosine decay)")
    sp.add_argument("--kl-weight", type=_rate, default=1e-4, help="weight of the KL term")
    sp.add_argument("--ckpt-every", type=_positive, default=500, help="optimiser steps between checkpoints")
    sp.add_argument("--max-minutes", type=_rate, default=None, help="wall-clock budget: stop and save then")
    sp.add_argument("--resume", action="store_true", help="continue from <out>/checkpoint.pt")

    sp = add("extract-latents", cmd_extract_latents, "encode an image folder (ImageNet train/) once into VAE latents "
                                                     "for train-gates --latents; resumable")
    _common(sp, model=False)
    sp.add_argument("--data", required=True, help="image folder with class sub-folders (ImageNet's train/)")
    sp.add_argument("--vae", required=True, help="local AutoencoderKL folder (stabilityai/sd-vae-ft-ema)")
    sp.add_argument("--image-size", type=int, default=256, help="center-crop size (latent = size / 8)")
    sp.add_argument("--out", required=True, help="latent folder (a rerun with the same arguments resumes)")
    sp.add_argument("--batch-size", type=_positive, default=64, help="images per VAE call")
    sp.add_argument("--flip", choices=["random", "both", "none"], default="random",
                    help="random: one view per image, mirrored with p=1/2; both: image and mirror (2x disk); none")
    sp.add_argument("--posterior", choices=["sample", "mean", "moments"], default="sample",
                    help="store one posterior sample (DiT), its mean, or mean and std (fresh samples per draw)")
    sp.add_argument("--dtype", choices=["float16", "float32"], default="float16", help="storage dtype")
    sp.add_argument("--workers", type=_count, default=4, help="threads decoding images")

    sp = add("train-gates", cmd_train_gates, "train LazyDiT gates on a frozen model (3-pass recipe)")
    _common(sp)
    sp.add_argument("--data", default=None, help="Fashion-MNIST IDX folder (Fashion-MNIST models), or with --vae an "
                                                 "image folder with class sub-folders (latent models)")
    sp.add_argument("--latents", default=None, help="latent folder from `lazydit extract-latents` (latent models)")
    sp.add_argument("--vae", default=None, help="AutoencoderKL folder: encode --data images on the fly")
    sp.add_argument("--workers", type=_count, default=4, help="threads decoding images (--data with --vae)")
    sp.add_argument("--steps", type=_steps, required=True, help="T, sampling steps the gates are for")
    sp.add_argument("--iters", type=_positive, default=500, help="optimiser steps")
    sp.add_argument("--batch-size", type=_positive, default=64,
                    help="GLOBAL batch: under torchrun each of the N processes takes batch-size / N rows")
    sp.add_argument("--lr", type=_rate, default=1e-4, help="AdamW learning rate")
    sp.add_argument("--rho", type=_penalty, default=1e-2, help="penalty on the compute probabilities of both branches")
    sp.add_argument("--rho-attn", type=_penalty, default=None, help="penalty on attn only (default: --rho)")
    sp.add_argument("--rho-mlp", type=_penalty, default=None, help="penalty on mlp only (default: --rho)")
    sp.add_argument("--ckpt-every", type=_positive, default=100, help="optimiser steps between checkpoints")
    sp.add_argument("--out", default="runs/gates", help="run folder (checkpoint.pt, gates.safetensors)")
    sp.add_argument("--resume", action="store_true", help="continue from <out>/checkpoint.pt")
    sp.add_argument("--target-ratio", type=_fraction, default=None,
                    help="after training, calibrate the threshold to this lazy ratio")
    sp.add_argument("--calib-per-class", type=_positive, default=4, help="calibration images per class")
    sp.add_argument("--cfg", type=_finite, default=DEFAULT_CFG,
                    help="guidance scale of calibration (and of the trajectories, with --data-free)")
    sp.add_argument("--every-step", action="store_true",
                    help="gates on every step, no parity: lazy ratios past 50%% (beyond the paper)")
    sp.add_argument("--data-free", action="store_true",
                    help="train on the frozen model's own DDIM trajectories: no dataset needed (beyond the paper)")
    sp.add_argument("--pool", type=_positive, default=512, help="trajectories sampled once for --data-free")
    sp.add_argument("--forecast", type=int, choices=(0, 1, 2), default=0,
                    help="skipped modules get an extrapolation of this order of their last computed outputs "
                         "(0: a copy, as the paper; beyond the paper)")
    sp.add_argument("--lookahead", action="store_true",
                    help="look-ahead gates: plan step k from the inputs of step k+1 (faster; beyond the paper)")
    sp.add_argument("--rollout", type=_count, default=0,
                    help="sample the N steps before each trained step with the gates' own decisions, so that "
                         "skips chain as in sampling (for --every-step; 0: the reference recipe; beyond the paper)")
    sp.add_argument("--captions", default=None,
                    help="a text-conditional diffusers model (PixArt): caption embeddings (.safetensors: embeds "
                         "(N, S, D_text), optional mask, negative, negative_mask), its labels (use --data-free)")
    sp.add_argument("--scheduler", default=None,
                    help="a diffusers pipeline or scheduler folder: train for the timesteps its scheduler runs at "
                         "--steps (default: lazydit's respacing = diffusers' DDIM with 'linspace' spacing)")
    sp.add_argument("--bf16", action="store_true", help="bf16 autocast of the model passes (gates stay fp32)")
    sp.add_argument("--tf32", action="store_true", help="allow TF32 matmuls/convolutions on CUDA")

    sp = add("sample-ddp", cmd_sample_ddp, "sample an ADM .npz for FID over all torchrun processes (or one), "
                                           "as DiT's sample_ddp.py; resumable")
    _common(sp)
    _sampling(sp)
    sp.add_argument("--num-samples", type=_positive, default=50000, help="images in the .npz")
    sp.add_argument("--batch-size", type=_positive, default=32, help="images per batch and PROCESS")
    sp.add_argument("--num-classes", type=_positive, default=None, help="labels uniform over these (default: the model's)")
    sp.add_argument("--keep-parts", action="store_true", help="keep <out>.parts/ after writing the .npz")
    sp.add_argument("--tf32", action="store_true", help="allow TF32 matmuls/convolutions on CUDA")
    sp.add_argument("--vae", default=None, help="AutoencoderKL folder (or a train-autoencoder file) decoding the "
                    "latents of a latent model (default: the autoencoder its file names, as the embedded default's)")
    sp.add_argument("--out", default="samples.npz", help="the ADM .npz to write")

    sp = add("calibrate", cmd_calibrate, "set a gate file's threshold so sampling reaches a target lazy ratio")
    _common(sp)
    sp.add_argument("--gates", required=True, help="gate file, or 'default' / 'default-<kind>' (e.g. default-lookahead)")
    sp.add_argument("--steps", type=_steps, default=None, help="T of the gates (checked; needed for 'default')")
    sp.add_argument("--target-ratio", type=_fraction, required=True, help="lazy ratio to reach")
    sp.add_argument("--calib-per-class", type=_positive, default=4, help="calibration images per class")
    sp.add_argument("--cfg", type=_finite, default=DEFAULT_CFG, help="guidance scale of the calibration sampling")
    sp.add_argument("--out", default=None, help="the calibrated gate file to write")
    sp.add_argument("--in-place", action="store_true", help="rewrite --gates instead of writing --out")

    sp = add("sample", cmd_sample, "sample a PNG grid or an ADM .npz (arr_0: N x H x W x C uint8)")
    _common(sp)
    _sampling(sp, compile_flag=True)
    sp.add_argument("--labels", default=None, help="comma-separated class labels (default: every class of <= 10, "
                                                   "DiT's sample.py classes for 1000, else the first 10)")
    sp.add_argument("--per-class", type=_positive, default=4, help="images per class of the default labels")
    sp.add_argument("--scale", type=_at_least(1, 16), default=None,
                    help="PNG upscaling, 1 to 16 (default: 3 below 64 px, else 1)")
    sp.add_argument("--vae", default=None, help="AutoencoderKL folder (or a train-autoencoder file) decoding the "
                    "latents of a latent model (default: the autoencoder its file names, as the embedded default's)")
    sp.add_argument("--report", action="store_true",
                    help="add per-step (sampling order: the first sampling step first, as the heat map), per-layer "
                         "and per-branch lazy ratios to the row (with --json)")
    sp.add_argument("--heatmap", default=None, help="also write the layer x step laziness heat map (PNG)")
    sp.add_argument("--recipe", default=None,
                    help="a `lazydit tune` folder: sample with its sampler, steps, guidance and calibrated caching "
                         "policy (not with --steps, --gates, --method, --sampler)")
    sp.add_argument("--out", default="samples.png", help="a .png grid or an ADM .npz")

    sp = add("eval", cmd_eval, "sample one configuration and score it: FID, sFID, IS, precision, recall, KID, lazy "
                               "ratio, TMACs, wall-clock")
    _common(sp)
    _sampling(sp)
    sp.add_argument("--num-samples", type=_positive, default=5000, help="images sampled and scored")
    sp.add_argument("--batch-size", type=_positive, default=250, help="images per sampling batch")
    sp.add_argument("--micro-batch", type=_positive, default=16,
                    help="images per sampler call inside a batch, as compare's: the same samples as one call (on CPU "
                         "16 is ~1.4x faster than 250); batch-wide decisions (--uniform, fbcache, teacache) are "
                         "taken per call")
    sp.add_argument("--name", default=None, help="row label")
    sp.add_argument("--out", default=None, help="also keep the samples as an ADM .npz (resumable parts meanwhile)")
    sp.add_argument("--samples", default=None, help="score this ADM .npz instead of sampling")
    _evaluator(sp)

    sp = add("compare", cmd_compare, "every configuration on the same labels, noise and evaluator: quality, PSNR to a "
                                     "fine reference, TMACs and seconds; markdown, CSV, JSON and frontier plots")
    _common(sp)
    sp.add_argument("configs", nargs="+", metavar="CONFIG",
                    help="SAMPLER-T[+METHOD[:key=value,...]], e.g. ddim-10, dpm++2m-10, ddim-20+fora:interval=2, "
                         "ddim-20+teacache:target=0.5, ddim-20+lazy:gates=default,target=0.5, "
                         "ddim-20+l2c:router=FILE,target=0.5 (target: threshold calibrated to that lazy ratio)")
    sp.add_argument("--cfg", type=_finite, default=DEFAULT_CFG, help="classifier-free guidance scale (1: none)")
    sp.add_argument("--num-samples", type=_positive, default=5000, help="images per configuration")
    sp.add_argument("--batch-size", type=_positive, default=250, help="images per sampling batch (resumable part)")
    sp.add_argument("--micro-batch", type=_positive, default=16,
                    help="images per sampler call inside a batch, as eval's: the same samples as one call (on CPU "
                         "16 is ~1.4x faster than 250); batch-wide decisions (fbcache, teacache) are taken per call")
    sp.add_argument("--fine-sampler", dest="reference", default="ddim-50", metavar="SAMPLER-T",
                    help="fine sampler (SAMPLER-T) the PSNR is measured against (not --ref, the FID statistics)")
    sp.add_argument("--reference", dest="reference", action=deprecated, metavar="--fine-sampler",
                    default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    sp.add_argument("--ref-samples", type=_positive, default=None,
                    help="images the fine sampler samples for the PSNR, the first of every row's (default: "
                         "min(--num-samples, 1000))")
    sp.add_argument("--out", default="runs/compare-cli", help="folder: rows/ (resumable) and the report")
    _evaluator(sp)

    sp = add("tune", cmd_tune, "the sampler and caching setting with the best images for a budget (TMACs or seconds "
                               "per image), measured on this model against its own converged sampler; writes a "
                               "recipe (resumable)")
    _common(sp)
    sp.add_argument("--budget", type=float, required=True,
                    help="the budget: with --budget-kind tmacs a share of DDIM-50's TMACs on this model, in (0, 1]; "
                         "with seconds, seconds per image on this device")
    sp.add_argument("--budget-kind", choices=["tmacs", "seconds"], default="tmacs",
                    help="tmacs (exact MAC counts) or seconds (every candidate timed here, at --batch-size and "
                         "--dtype)")
    sp.add_argument("--batch-size", type=_positive, default=16,
                    help="images per sampler call: the batch you will sample with (seconds are timed at it)")
    sp.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32",
                    help="the model's dtype while tuning (the one you will sample with)")
    sp.add_argument("--ref", default=None, metavar="STATS",
                    help="reference statistics of real data for the extractor (.npz from lazydit; 'default': the "
                         "shipped Fashion-MNIST test split of --extractor): rank the finalists by FID to data too")
    sp.add_argument("--train-gates", action=argparse.BooleanOptionalAction, default=None,
                    help="train data-free forecast gates for this model as candidates (default: yes, except for the "
                         "embedded default, whose shipped gates are candidates); kept and reused in --out/gates/")
    sp.add_argument("--gate-iters", type=_positive, default=200, help="optimiser steps of each gate set tune trains")
    sp.add_argument("--num-samples", type=_positive, default=256, help="images of the final round")
    sp.add_argument("--first", type=_positive, default=64,
                    help="images of the first round (successive halving doubles them up to --num-samples)")
    sp.add_argument("--fine", default="ddim-250", metavar="SAMPLER-T",
                    help="the converged sampler quality is measured against (ddim-100 for speed)")
    sp.add_argument("--max-minutes", type=_rate, default=None,
                    help="stop the search then: candidates not scored are listed as not tried")
    sp.add_argument("--cfg", type=_finite, default=DEFAULT_CFG, help="classifier-free guidance scale (1: none)")
    sp.add_argument("--extractor", default=None, metavar="MODULE:FUNCTION",
                    help="feature extractor for FID to the fine sampler: fmnist or fmnist-resnet (the shipped "
                         "Fashion-MNIST ones), or a function returning a module with .features(x); default: the "
                         "shipped classifier for the embedded default, else PSNR only")
    sp.add_argument("--out", required=True, help="run folder: recipe.json, report.md, frontier.*, rows/ (resumable)")

    sp = add("cost", cmd_cost, "TMACs per image the paper's way (Linear+Conv, CFG not doubled)")
    sp.add_argument("--model", default="default",
                    help="zoo name (DiT-XL/2, DiT-FMNIST, ...), or 'default' (the shipped Fashion-MNIST DiT, as "
                         "every command)")
    sp.add_argument("--image-size", type=_positive, default=None,
                    help="image size, a multiple of the latent factor (8: SD-VAE models, 2: DiT-FMNIST-Latent, 1: "
                         "pixel models) x the patch size (default: the zoo model's)")
    sp.add_argument("--steps", type=_step_list, default="50", help="comma-separated step counts")
    sp.add_argument("--json", action="store_true", help="print the figures as JSON")
    return p


def _one_line(message: str) -> str:
    return "; ".join(line.strip() for line in message.splitlines() if line.strip())


def _fail(message: str):
    """One line on stderr and exit status 1 (SystemExit carries the message)."""
    sys.exit(_one_line("error: " + message))


def _one_line_warning(message, category, filename, lineno, file=None, line=None):
    """warnings.showwarning for the CLI: 'warning: <message>' on one line, without the source line."""
    print(f"warning: {message}", file=sys.stderr if file is None else file)


def main(argv=None):
    args = build_parser().parse_args(argv)
    args._argv = list(sys.argv[1:] if argv is None else argv)  # what was given (sample --recipe refuses some)
    from contextlib import ExitStack

    from lazydit.cpu import tune_allocator
    from lazydit.files import Terminated, terminating_signals

    tune_allocator()  # the CPU's malloc keeps activation-sized blocks (see lazydit.cpu); process-wide, so here

    def run():
        # SIGTERM / SIGHUP raise Terminated, so temporary files go and locks are released as on Ctrl-C; `held`:
        # the output locks the command takes (_check_out(lock=True)), released when it ends, however it ends
        with terminating_signals(), ExitStack() as held:
            _OUTPUT_LOCKS.append(held)
            try:
                return args.func(args)
            finally:
                _OUTPUT_LOCKS.remove(held)

    if args.debug or os.environ.get("LAZYDIT_DEBUG"):
        return run()
    import warnings

    from lazydit.errors import LazyditError, OptionRangeError

    try:
        with warnings.catch_warnings():  # restores the usual warning display when the command returns
            warnings.showwarning = _one_line_warning
            return run()
    except Terminated as e:  # before KeyboardInterrupt, its base class
        print("terminated", file=sys.stderr)
        raise SystemExit(128 + e.signum) from None
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        raise SystemExit(130) from None
    except OptionRangeError as e:  # an option's value out of range: exit 2, as the parser's own refusals
        print(_one_line("error: " + str(e)), file=sys.stderr)
        raise SystemExit(2) from None
    except (LazyditError, OSError, ValueError, ImportError, EOFError) as e:  # EOFError: a truncated torch file
        _fail(str(e) or type(e).__name__)
    except RuntimeError as e:  # torch: an unavailable or unknown device
        if "device" not in str(e).lower() and "cuda" not in str(e).lower():
            raise
        _fail(str(e))


if __name__ == "__main__":
    main()
