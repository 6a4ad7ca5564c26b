"""The `lazydit` command line: parses arguments and calls the library."""

import argparse
import json
import sys

import torch


def _print_table(rows, cols):
    widths = [max(len(c), *(len(_fmt(r.get(c))) for r in rows)) for c in cols]
    print("  ".join(c.ljust(w) for c, w in zip(cols, widths)))
    for r in rows:
        print("  ".join(_fmt(r.get(c)).ljust(w) for c, w in zip(cols, widths)))


def _fmt(v):
    if isinstance(v, float):
        return f"{v:.4g}"
    return "" if v is None else str(v)


def _emit(args, rows, cols):
    if args.json:
        print(json.dumps(rows, indent=1))
    else:
        _print_table(rows, cols)


MODEL_CHOICES = ("--model takes 'default' (the shipped Fashion-MNIST DiT), a DiT file (.pt / .pth released or "
                 "training checkpoint, lazydit .safetensors) or a Large-DiT checkpoint folder "
                 "(consolidated_ema.00-of-01.pth + model_args.pth)")
IMAGENET_SAMPLE_CLASSES = (207, 360, 387, 974, 88, 979, 417, 279)  # DiT's sample.py
DECODE_BATCH = 32  # images per VAE decode call


def _config_overrides(args) -> dict:
    """--model-config "depth=2,num_heads=2" and --image-size (latent = size / 8) as config-field overrides."""
    out = {}
    for item in filter(None, (getattr(args, "model_config", None) or "").split(",")):
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"--model-config: expected key=value, got {item!r}")
        try:
            out[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            out[key.strip()] = value.strip()
    size = getattr(args, "image_size", None)
    if size:
        if size % 8:
            raise ValueError(f"--image-size {size} is not a multiple of 8 (the VAE's factor)")
        out["input_size"] = size // 8
    return out


def _load_large(path, args, overrides):
    """A Large-DiT from a checkpoint folder or a file in one; --image-size must agree with model_args.pth."""
    from .large_dit import ARGS_FILE, EMA_FILE, MODEL_FILE, load_large_dit, read_model_args

    folder = path if path.is_dir() else path.parent
    if path.is_dir() and not any((path / f).is_file() for f in (EMA_FILE, MODEL_FILE)):
        raise FileNotFoundError(f"--model {path}: a folder without a Large-DiT checkpoint ({EMA_FILE} or "
                                f"{MODEL_FILE}); {MODEL_CHOICES}")
    size = getattr(args, "image_size", None)
    if size and (folder / ARGS_FILE).is_file():
        saved = read_model_args(folder / ARGS_FILE).get("image_size")
        if saved is not None and int(saved) != size:
            raise ValueError(f"{path}: a {saved}px Large-DiT (model_args.pth), not {size}px: drop --image-size")
    return load_large_dit(path, name=args.model_name, device=args.device, **overrides)


def _load_model(args):
    """--model: 'default', a DiT file (config from --model-name / --image-size / --model-config, or from a released
    file's name DiT-XL-2-256x256.pt), or a Large-DiT folder (or model_args.pth / consolidated*.pth inside one)."""
    import re
    from pathlib import Path

    from .assets import default_model
    from .checkpoint import load_dit
    from .large_dit import ARGS_FILE, EMA_FILE, MODEL_FILE

    if args.model in (None, "default"):
        return default_model(args.device)
    path, name, overrides = Path(args.model), args.model_name, _config_overrides(args)
    if path.is_dir() or path.name in (ARGS_FILE, EMA_FILE, MODEL_FILE) or (
            path.suffix == ".pth" and (path.parent / ARGS_FILE).is_file()):
        return _load_large(path.parent if path.name == ARGS_FILE else path, args, overrides)
    if not path.exists():
        raise FileNotFoundError(f"--model {path}: no such file or folder; {MODEL_CHOICES}")
    if path.suffix not in (".pt", ".pth", ".safetensors"):
        raise ValueError(f"--model {path}: not a model file; {MODEL_CHOICES}")
    released = re.fullmatch(r"DiT-(S|B|L|XL)-([248])-(\d+)x\3\.pt", path.name)  # DiT-XL-2-512x512.pt
    if name is None and released:
        name = f"DiT-{released[1]}/{released[2]}"
        overrides.setdefault("input_size", int(released[3]) // 8)
    if name is None and path.suffix != ".safetensors":
        raise ValueError(f"{path} carries no model config: pass --model-name (e.g. DiT-XL/2) and --image-size "
                         "(256 or 512)")
    return load_dit(path, name, **overrides).to(args.device)


def _load_vae(args, model):
    """The VAE of --vae for decoding, or None for pixel models; an error for a latent model without one."""
    C = model.config.in_channels
    if not getattr(args, "vae", None):
        if C not in (1, 3):
            raise ValueError(f"the model samples {C}-channel latents: pass --vae VAE_FOLDER (e.g. a local copy of "
                             "stabilityai/sd-vae-ft-ema) to decode them into images")
        return None
    from .vae import load_vae

    vae = load_vae(args.vae, args.device)
    if vae.config.latent_channels != C:
        raise ValueError(f"--vae {args.vae} has {vae.config.latent_channels} latent channels, the model {C}")
    return vae


def _default_labels(num_classes, per_class, device):
    """(labels, classes per grid row): every class of small label sets (<= 10), DiT's sample.py classes for
    ImageNet-1k, else the first 10; each repeated per_class times, one class per column."""
    from .pipeline import class_grid_labels

    if num_classes <= 10:
        return class_grid_labels(num_classes, per_class, device), num_classes
    classes = IMAGENET_SAMPLE_CLASSES if num_classes == 1000 else tuple(range(10))
    return torch.tensor(classes, device=device).repeat(per_class), len(classes)


def _load_gates(path, steps, device):
    from .assets import default_gates
    from .lazy import LazyGates

    if path in ("default", "default-lookahead"):
        return default_gates(steps, device, lookahead=path == "default-lookahead")
    gates = LazyGates.load(path).to(device)
    return gates


def cmd_demo(args):
    from .demo import run_demo

    rows = run_demo(args.out, per_class=args.per_class, cfg_scale=args.cfg, seed=args.seed, device=args.device,
                    progress=not args.json)
    _emit(args, rows, ["sampler", "steps", "lazy_ratio", "tmacs", "gmacs", "seconds", "png"])
    if not args.json:
        print(f"\nside by side: {args.out}/compare.png")


def cmd_pretrain(args):
    from .pretrain import PretrainConfig, pretrain

    cfg = PretrainConfig(model=args.model_name, data=args.data, out=args.out, steps=args.iters,
                         batch_size=args.batch_size, lr=args.lr, ema_decay=args.ema_decay, seed=args.seed,
                         ckpt_every=args.ckpt_every, max_minutes=args.max_minutes, bf16=args.bf16,
                         resume=args.resume, flip=args.flip)
    path = pretrain(cfg, device=args.device)
    print(json.dumps({"model": str(path)}) if args.json else f"EMA model written to {path}")


def cmd_train_gates(args):
    from . import distributed
    from .data import InfiniteSampler, load_fashion_mnist
    from .training import GateTrainConfig, train_gates

    args.device = distributed.init_distributed(args.device)  # torchrun: one GPU per process; else a no-op
    if args.tf32:
        distributed.set_tf32(True)
    main = distributed.is_main()  # only rank 0 prints, writes and shows progress
    model = _load_model(args)
    cfg = model.config
    if args.batch_size % distributed.world_size():
        sys.exit(f"error: --batch-size {args.batch_size} (global) is not divisible by {distributed.world_size()} "
                 "processes")
    shape = f"{cfg.in_channels}x{cfg.input_size}x{cfg.input_size}"
    W, R, local = distributed.world_size(), distributed.rank(), args.batch_size // distributed.world_size()
    source = {}
    if args.latents:  # the fast path: pre-extracted latents, this rank's shard, per-rank iterator state
        from .imagefolder import LatentSampler, LatentSet

        lat = LatentSet(args.latents)
        C, h = lat.latents.shape[2] // (2 if lat.moments else 1), lat.latents.shape[3]
        if (C, h) != (cfg.in_channels, cfg.input_size):
            sys.exit(f"error: {args.latents} holds {C}x{h}x{h} latents, but the model takes {shape}")
        if int(lat.labels.max()) >= cfg.num_classes:
            sys.exit(f"error: {args.latents} has labels up to {int(lat.labels.max())}, the model "
                     f"{cfg.num_classes} classes")
        data = LatentSampler(lat, local, seed=args.seed, rank=R, world_size=W, flip=lat.meta.get("flip") == "both")
        source = {"latents": str(args.latents)}
    elif args.vae:  # images encoded on the fly (slower)
        from .imagefolder import EncodedLoader, ImageFolder, ImageFolderLoader
        from .vae import load_vae

        if not args.data:
            sys.exit("error: --vae needs --data IMAGE_DIR (class sub-folders, e.g. ImageNet's train/)")
        vae = load_vae(args.vae, args.device)
        if vae.config.latent_channels != cfg.in_channels:
            sys.exit(f"error: --vae has {vae.config.latent_channels} latent channels, the model takes {shape}")
        ds = ImageFolder(args.data, image_size=cfg.input_size * 2 ** (len(vae.config.block_out_channels) - 1))
        if len(ds.classes) > cfg.num_classes:
            sys.exit(f"error: {args.data} has {len(ds.classes)} classes, the model {cfg.num_classes}")
        data = EncodedLoader(ImageFolderLoader(ds, local, rank=R, world_size=W, seed=args.seed, flip=True,
                                               num_workers=args.workers), vae, seed=args.seed)
        source = {"data": str(args.data), "vae": str(args.vae)}
    elif (cfg.in_channels, cfg.input_size) == (1, 28):  # Fashion-MNIST: every rank slices the same global batches
        x, y = load_fashion_mnist("train", args.data)
        data = distributed.RankSlice(InfiniteSampler(x, y, args.batch_size, seed=args.seed))
    else:
        sys.exit(f"error: train-gates reads Fashion-MNIST for the 1x28x28 pixel model; this model takes {shape}: "
                 "pass --latents LATENT_DIR (from `lazydit extract-latents`, fast) or --data IMAGE_DIR --vae "
                 "VAE_FOLDER (encodes on the fly)")
    rho_attn = args.rho if args.rho_attn is None else args.rho_attn
    rho_mlp = args.rho if args.rho_mlp is None else args.rho_mlp
    tcfg = GateTrainConfig(steps=args.steps, iters=args.iters, batch_size=args.batch_size, lr=args.lr,
                           rho_attn=rho_attn, rho_mlp=rho_mlp, seed=args.seed, ckpt_every=args.ckpt_every,
                           out=args.out, resume=args.resume, lookahead=args.lookahead, bf16=args.bf16)
    gates = train_gates(model, data, tcfg, progress=not args.json,
                        extra_meta={"model_path": str(args.model or "default"), **source})
    distributed.cleanup()
    if not main:
        return
    result = {"gates": f"{args.out}/gates.safetensors", "steps": args.steps, "threshold": gates.threshold}
    if args.target_ratio is not None:
        th, ratio = _calibrate_and_save(model, gates, args, f"{args.out}/gates.safetensors")
        result.update(threshold=th, calibrated_lazy_ratio=ratio)
    print(json.dumps(result) if args.json else "\n".join(f"{k}: {v}" for k, v in result.items()))


def cmd_extract_latents(args):
    import numpy as np

    from .imagefolder import ImageFolder, LatentSet, extract_latents
    from .vae import load_vae

    ds = ImageFolder(args.data, image_size=args.image_size)
    vae = load_vae(args.vae, args.device)
    out = extract_latents(vae, ds, args.out, batch_size=args.batch_size, flip=args.flip, posterior=args.posterior,
                          seed=args.seed, dtype=np.dtype(args.dtype), num_workers=args.workers,
                          progress=not args.json)
    lat = LatentSet(out)
    res = {"latents": str(out), "images": len(lat), "classes": len(ds.classes), "shape": list(lat.latents.shape)}
    print(json.dumps(res) if args.json else "\n".join(f"{k}: {v}" for k, v in res.items()))


def cmd_sample_ddp(args):
    from . import distributed

    args.device = distributed.init_distributed(args.device)  # torchrun: one GPU per process; else a no-op
    if args.tf32:
        distributed.set_tf32(True)
    main = distributed.is_main()
    model = _load_model(args)
    vae = _load_vae(args, model)
    decode = None
    if vae is not None:
        from functools import partial

        from .vae import decode as vae_decode

        decode = partial(vae_decode, vae, batch_size=DECODE_BATCH)
        with torch.no_grad():  # joins the resume check of the parts
            decode.fingerprint = f"{float(sum(p.double().abs().sum() for p in vae.parameters())):.6e}"
    gates = _load_gates(args.gates, args.steps, args.device) if args.gates else None
    res = distributed.sample_sharded(model, args.num_samples, args.steps, gates=gates, cfg_scale=args.cfg,
                                     batch_size=args.batch_size, seed=args.seed, num_classes=args.num_classes,
                                     out_npz=args.out, threshold=args.threshold, keep_parts=args.keep_parts,
                                     progress=main and not args.json, decode=decode)
    distributed.cleanup()
    if main:
        print(json.dumps(res) if args.json else "\n".join(f"{k}: {v}" for k, v in res.items()))


def _calibrate_and_save(model, gates, args, out):
    """Bisect the threshold to args.target_ratio on the class-grid batch and write the gates with the result."""
    from .pipeline import calibrate_threshold

    yc, _ = _default_labels(model.config.num_classes, args.calib_per_class, args.device)
    th, ratio = calibrate_threshold(model, gates, args.target_ratio, yc, cfg_scale=args.cfg, seed=args.seed,
                                    progress=not args.json)
    gates.threshold = th
    gates.save(out, extra={"calibration": {"target": args.target_ratio, "reached": ratio, "cfg_scale": args.cfg,
                                           "images": len(yc), "seed": args.seed}})
    return th, ratio


def cmd_calibrate(args):
    model = _load_model(args)
    gates = _load_gates(args.gates, args.steps, args.device)
    out = args.out or args.gates
    th, ratio = _calibrate_and_save(model, gates, args, out)
    res = {"gates": out, "threshold": th, "lazy_ratio": ratio}
    print(json.dumps(res) if args.json else "\n".join(f"{k}: {v}" for k, v in res.items()))


def cmd_sample(args):
    from .images import save_grid, save_npz
    from .pipeline import sample

    model = _load_model(args)
    vae = _load_vae(args, model)
    gates = _load_gates(args.gates, args.steps, args.device) if args.gates else None
    nc = model.config.num_classes
    if args.labels:
        y = torch.tensor([int(v) for v in args.labels.split(",")], device=args.device)
        if (y < 0).any() or (y >= nc).any():
            sys.exit(f"error: labels must be in [0, {nc})")
        nrow = min(len(y), 10)
    else:
        y, nrow = _default_labels(nc, args.per_class, args.device)
    x, rep = sample(model, y, args.steps, gates=gates, threshold=args.threshold, cfg_scale=args.cfg,
                    seed=args.seed, uniform=args.uniform, tie_cfg=args.tie_cfg, compile=args.compile,
                    progress=not args.json)
    if vae is not None:
        from .vae import decode

        x = decode(vae, x, batch_size=DECODE_BATCH)
    if args.out.endswith(".npz"):
        save_npz(x, args.out, labels=y.cpu().numpy())
    else:
        scale = args.scale if args.scale is not None else (3 if x.shape[-1] < 64 else 1)
        save_grid(x, args.out, nrow=nrow, scale=scale)
    row = {**rep.row(), "out": args.out}
    if args.heatmap and gates is not None:
        from .plots import laziness_heatmap

        laziness_heatmap(rep.stats["per_step_layer_branch"], args.heatmap, title=f"{rep.name}")
        row["heatmap"] = args.heatmap
    if args.report and gates is not None:
        row["per_step"], row["per_layer"], row["per_branch"] = (rep.stats[k] for k in
                                                                ("per_step", "per_layer", "per_branch"))
    _emit(args, [row], ["sampler", "steps", "lazy_ratio", "tmacs", "gmacs", "seconds", "out"])


def _extractor_and_ref(args):
    """The feature extractor and its reference statistics for `eval`."""
    from . import features

    if args.extractor == "fmnist":
        ext = features.default_classifier(args.device)
        ref = features.load_reference(args.ref) if args.ref else features.default_reference()
        return ext, ref
    from .evaluation import reference_from_images
    from .inception import load_inception

    if not args.inception_weights or not args.ref:
        sys.exit("error: --extractor inception needs --inception-weights FILE and --ref FILE")
    ext = load_inception(args.inception_weights, args.device)
    try:
        return ext, features.load_reference(args.ref)
    except ValueError:  # an ADM reference batch: real images under arr_0
        import numpy as np

        with np.load(args.ref) as f:
            if "arr_0" not in f.files:
                raise ValueError(f"{args.ref}: neither lazydit reference statistics nor an ADM batch (arr_0)")
            return ext, reference_from_images(ext, f["arr_0"], progress=not args.json)


def cmd_eval(args):
    from .evaluation import EvalConfig, evaluate_config, score
    from .metrics import load_npz_samples

    extractor, ref = _extractor_and_ref(args)
    if args.samples:  # score an existing ADM .npz
        images = load_npz_samples(args.samples)
        row = dict(sampler=args.samples, n=len(images), **score(extractor, images, ref, progress=not args.json))
    else:
        model = _load_model(args)
        if model.config.in_channels not in (1, 3):
            raise ValueError("eval samples pixel models only; for a latent model write the images with "
                             "`lazydit sample-ddp --vae VAE_FOLDER --out s.npz`, then `lazydit eval --samples s.npz`")
        gates = None if args.gates in (None, "none") else _load_gates(args.gates, args.steps, args.device)
        cfg = EvalConfig(steps=args.steps, cfg_scale=args.cfg, num_samples=args.num_samples,
                         batch_size=args.batch_size, seed=args.seed, threshold=args.threshold, uniform=args.uniform,
                         tie_cfg=args.tie_cfg, name=args.name, micro_batch=args.micro_batch)
        row = evaluate_config(model, cfg, extractor, ref, gates=gates, out=args.out, progress=not args.json)
        row["out"] = args.out
    _emit(args, [row], ["sampler", "steps", "n", "fid", "sfid", "inception_score", "precision", "recall", "kid",
                        "lazy_ratio", "tmacs", "seconds"])


def cmd_cost(args):
    from .cost import forward_macs
    from .models import model_config

    cfg = model_config(args.model, **({"input_size": args.image_size // 8} if args.image_size else {}))
    rows = []
    for s in [int(v) for v in args.steps.split(",")]:
        rows.append(dict(model=args.model, image_size=args.image_size or cfg.input_size * 8, steps=s,
                         tmacs=round(s * forward_macs(cfg) / 1e12, 3),
                         tmacs_with_attention=round(s * forward_macs(cfg, True) / 1e12, 3)))
    _emit(args, rows, ["model", "image_size", "steps", "tmacs", "tmacs_with_attention"])


def build_parser():
    p = argparse.ArgumentParser(prog="lazydit", description="LazyDiT: learned lazy gates for diffusion transformers")
    sub = p.add_subparsers(dest="command", required=True)

    def common(sp, model=True):
        sp.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
        sp.add_argument("--seed", type=int, default=0)
        sp.add_argument("--json", action="store_true", help="print the figures as JSON")
        if model:
            sp.add_argument("--model", default="default",
                            help="'default' (the shipped Fashion-MNIST DiT), a DiT file (.safetensors from lazydit, "
                                 "released .pt, training checkpoint) or a Large-DiT checkpoint folder "
                                 "(consolidated_ema.00-of-01.pth + model_args.pth)")
            sp.add_argument("--model-name", default=None,
                            help="zoo name (DiT-XL/2, ...) for DiT files without a config (a released file's name, "
                                 "DiT-XL-2-256x256.pt, gives it); Large-DiT: only without model_args.pth")
            sp.add_argument("--image-size", type=int, default=None,
                            help="image size of the model (256 or 512; latent = size / 8) for files without a "
                                 "config (default: a released file's name, else the zoo's 256)")
            sp.add_argument("--model-config", default=None,
                            help="config fields for files without a config, e.g. 'num_classes=10,learn_sigma=false'")

    sp = sub.add_parser("demo", help="sample the shipped model with DDIM-50, DDIM-25 and Lazy-50 (offline)")
    common(sp, model=False)
    sp.add_argument("--out", default="lazydit-demo")
    sp.add_argument("--per-class", type=int, default=4)
    sp.add_argument("--cfg", type=float, default=2.0)
    sp.set_defaults(func=cmd_demo)

    sp = sub.add_parser("pretrain", help="train a class-conditional DiT on Fashion-MNIST (with EMA)")
    common(sp, model=False)
    sp.add_argument("--model-name", default="DiT-FMNIST")
    sp.add_argument("--data", default=None, help="folder with the Fashion-MNIST IDX files")
    sp.add_argument("--out", default="runs/pretrain")
    sp.add_argument("--iters", type=int, default=20000)
    sp.add_argument("--batch-size", type=int, default=64)
    sp.add_argument("--lr", type=float, default=3e-4)
    sp.add_argument("--ema-decay", type=float, default=0.999)
    sp.add_argument("--ckpt-every", type=int, default=500)
    sp.add_argument("--max-minutes", type=float, default=None)
    sp.add_argument("--bf16", action="store_true")
    sp.add_argument("--flip", action="store_true", help="random horizontal flips")
    sp.add_argument("--resume", action="store_true")
    sp.set_defaults(func=cmd_pretrain)

    sp = sub.add_parser("extract-latents", help="encode an image folder (ImageNet train/) once into VAE latents "
                                                "for train-gates --latents; resumable")
    common(sp, model=False)
    sp.add_argument("--data", required=True, help="image folder with class sub-folders (ImageNet's train/)")
    sp.add_argument("--vae", required=True, help="local AutoencoderKL folder (stabilityai/sd-vae-ft-ema)")
    sp.add_argument("--image-size", type=int, default=256, help="center-crop size (latent = size / 8)")
    sp.add_argument("--out", required=True, help="latent folder (a rerun with the same arguments resumes)")
    sp.add_argument("--batch-size", type=int, default=64, help="images per VAE call")
    sp.add_argument("--flip", choices=["random", "both", "none"], default="random",
                    help="random: one view per image, mirrored with p=1/2; both: image and mirror (2x disk); none")
    sp.add_argument("--posterior", choices=["sample", "mean", "moments"], default="sample",
                    help="store one posterior sample (DiT), its mean, or mean and std (fresh samples per draw)")
    sp.add_argument("--dtype", choices=["float16", "float32"], default="float16")
    sp.add_argument("--workers", type=int, default=4, help="threads decoding images")
    sp.set_defaults(func=cmd_extract_latents)

    sp = sub.add_parser("train-gates", help="train LazyDiT gates on a frozen model (3-pass recipe)")
    common(sp)
    sp.add_argument("--data", default=None, help="Fashion-MNIST IDX folder (the pixel model), or with --vae an "
                                                 "image folder with class sub-folders (latent models)")
    sp.add_argument("--latents", default=None, help="latent folder from `lazydit extract-latents` (latent models)")
    sp.add_argument("--vae", default=None, help="AutoencoderKL folder: encode --data images on the fly")
    sp.add_argument("--workers", type=int, default=4, help="threads decoding images (--data with --vae)")
    sp.add_argument("--steps", type=int, required=True, help="T, sampling steps the gates are for")
    sp.add_argument("--iters", type=int, default=500)
    sp.add_argument("--batch-size", type=int, default=64,
                    help="GLOBAL batch: under torchrun each of the N processes takes batch-size / N rows")
    sp.add_argument("--lr", type=float, default=1e-4)
    sp.add_argument("--rho", type=float, default=1e-2, help="penalty on both branches")
    sp.add_argument("--rho-attn", type=float, default=None)
    sp.add_argument("--rho-mlp", type=float, default=None)
    sp.add_argument("--ckpt-every", type=int, default=100)
    sp.add_argument("--out", default="runs/gates")
    sp.add_argument("--resume", action="store_true")
    sp.add_argument("--target-ratio", type=float, default=None,
                    help="after training, calibrate the threshold to this lazy ratio")
    sp.add_argument("--calib-per-class", type=int, default=4)
    sp.add_argument("--cfg", type=float, default=2.0, help="guidance scale used for calibration")
    sp.add_argument("--lookahead", action="store_true",
                    help="look-ahead gates: plan step k from the inputs of step k+1 (faster; beyond the paper)")
    sp.add_argument("--bf16", action="store_true", help="bf16 autocast of the model passes (gates stay fp32)")
    sp.add_argument("--tf32", action="store_true", help="allow TF32 matmuls/convolutions on CUDA")
    sp.set_defaults(func=cmd_train_gates)

    sp = sub.add_parser("sample-ddp", help="sample an ADM .npz for FID over all torchrun processes (or one), "
                                           "as DiT's sample_ddp.py; resumable")
    common(sp)
    sp.add_argument("--gates", default=None, help="gate file, or 'default' / 'default-lookahead' (none: plain DDIM)")
    sp.add_argument("--steps", type=int, default=50)
    sp.add_argument("--cfg", type=float, default=1.5)
    sp.add_argument("--threshold", type=float, default=None)
    sp.add_argument("--num-samples", type=int, default=50000)
    sp.add_argument("--batch-size", type=int, default=32, help="images per batch and PROCESS")
    sp.add_argument("--num-classes", type=int, default=None, help="labels uniform over these (default: the model's)")
    sp.add_argument("--keep-parts", action="store_true", help="keep <out>.parts/ after writing the .npz")
    sp.add_argument("--tf32", action="store_true", help="allow TF32 matmuls/convolutions on CUDA")
    sp.add_argument("--vae", default=None, help="AutoencoderKL folder decoding the latents (latent models)")
    sp.add_argument("--out", default="samples.npz")
    sp.set_defaults(func=cmd_sample_ddp)

    sp = sub.add_parser("calibrate", help="set a gate file's threshold so sampling reaches a target lazy ratio")
    common(sp)
    sp.add_argument("--gates", required=True)
    sp.add_argument("--steps", type=int, required=True)
    sp.add_argument("--target-ratio", type=float, required=True)
    sp.add_argument("--calib-per-class", type=int, default=4)
    sp.add_argument("--cfg", type=float, default=2.0)
    sp.add_argument("--out", default=None, help="write here instead of over --gates")
    sp.set_defaults(func=cmd_calibrate)

    sp = sub.add_parser("sample", help="sample a PNG grid or an ADM .npz (arr_0: N x H x W x C uint8)")
    common(sp)
    sp.add_argument("--gates", default=None, help="gate file, or 'default' / 'default-lookahead' for the shipped "
                                                  "reference / look-ahead set of --steps")
    sp.add_argument("--steps", type=int, default=50)
    sp.add_argument("--cfg", type=float, default=2.0)
    sp.add_argument("--threshold", type=float, default=None)
    sp.add_argument("--labels", default=None, help="comma-separated class labels (default: every class of <= 10, "
                                                   "DiT's sample.py classes for 1000, else the first 10)")
    sp.add_argument("--per-class", type=int, default=4)
    sp.add_argument("--scale", type=int, default=None, help="PNG upscaling (default: 3 below 64 px, else 1)")
    sp.add_argument("--vae", default=None, help="AutoencoderKL folder decoding the latents (latent models)")
    sp.add_argument("--report", action="store_true", help="add per-step/layer/branch lazy ratios (with --json)")
    sp.add_argument("--uniform", action="store_true", help="one skip decision per module for the whole batch")
    sp.add_argument("--tie-cfg", action="store_true", help="cond and uncond rows of a pair decide together")
    sp.add_argument("--heatmap", default=None, help="also write the layer x step laziness heat map (PNG)")
    sp.add_argument("--compile", action="store_true", help="torch.compile the branches (look-ahead gates only)")
    sp.add_argument("--out", default="samples.png")
    sp.set_defaults(func=cmd_sample)

    sp = sub.add_parser("eval", help="sample one configuration and score it: FID, sFID, IS, precision, recall, "
                                     "KID, lazy ratio, TMACs, wall-clock")
    common(sp)
    sp.add_argument("--gates", default=None, help="gate file, 'default', 'default-lookahead' or none (plain DDIM)")
    sp.add_argument("--steps", type=int, default=50)
    sp.add_argument("--cfg", type=float, default=2.0)
    sp.add_argument("--threshold", type=float, default=None)
    sp.add_argument("--uniform", action="store_true")
    sp.add_argument("--tie-cfg", action="store_true")
    sp.add_argument("--num-samples", type=int, default=5000)
    sp.add_argument("--batch-size", type=int, default=250)
    sp.add_argument("--micro-batch", type=int, default=None,
                    help="images per sampler call inside a batch (on CPU 16 is ~1.4x faster than 250; same samples)")
    sp.add_argument("--name", default=None, help="row label")
    sp.add_argument("--out", default=None, help="also keep the samples as an ADM .npz (resumable parts meanwhile)")
    sp.add_argument("--samples", default=None, help="score this ADM .npz instead of sampling")
    sp.add_argument("--extractor", choices=["fmnist", "inception"], default="fmnist",
                    help="fmnist: the shipped classifier and test-split statistics; inception: InceptionV3 (FID)")
    sp.add_argument("--inception-weights", default=None, help="pt_inception-2015-12-05-6726825d.pth (local file)")
    sp.add_argument("--ref", default=None, help="reference statistics (.npz from lazydit) or an ADM reference batch")
    sp.set_defaults(func=cmd_eval)

    sp = sub.add_parser("cost", help="TMACs per image the paper's way (Linear+Conv, CFG not doubled)")
    sp.add_argument("--model", default="DiT-XL/2")
    sp.add_argument("--image-size", type=int, default=None, help="image size; latent = size / 8")
    sp.add_argument("--steps", default="50")
    sp.add_argument("--json", action="store_true")
    sp.set_defaults(func=cmd_cost)
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    from .checkpoint import CheckpointError
    from .data import DataMissingError
    from .lazy import GateMismatchError

    try:
        args.func(args)
    except (DataMissingError, GateMismatchError, CheckpointError, FileNotFoundError, ValueError, ImportError) as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
