"""Where gate training reads its data: Fashion-MNIST for Fashion-MNIST models (encoded by the autoencoder the model
names, for the latent default), pre-extracted latents (fast) or an image folder encoded on the fly for latent DiTs. Each source yields this process's share of every global batch."""

from lazydit import ranks as dist
from lazydit.errors import UsageError


def gate_training_data(model, batch_size: int, *, data=None, latents=None, vae=None, workers: int = 4,
                       seed: int = 0, progress: bool = True):
    """The batch iterator for `train_gates` and a description of the source for the gate file's metadata.

    Args:
        model: the model the gates are for (its input shape and classes are checked against the data).
        batch_size: the GLOBAL batch; under torchrun each of the W processes gets batch_size / W rows.
        data: Fashion-MNIST IDX folder (pixel model; default: Debian's), or with `vae` an image folder with class
            sub-folders.
        latents: a folder from `lazydit extract-latents` (latent models, the fast path).
        vae: AutoencoderKL folder encoding `data` on the fly.
        workers: threads decoding images (`data` with `vae`).
        seed: data order (and flips).
        progress: a progress bar while Fashion-MNIST is encoded for the embedded default (process 0; the latents
            are cached between runs, `lazydit.data.fashion_mnist.cached_posterior`).
    Returns:
        (iterator of (x0, y), dict describing the source)
    Raises:
        UsageError: the data does not fit the model, or no source fits it.
    """
    cfg = model.config
    W, R = dist.world_size(), dist.rank()
    if batch_size % W:
        raise UsageError(f"--batch-size {batch_size} (global) is not divisible by {W} processes")
    local = batch_size // W
    shape = f"{cfg.in_channels}x{cfg.input_size}x{cfg.input_size}"
    if latents:  # the fast path: pre-extracted latents, this rank's shard, per-rank iterator state
        from lazydit.data.imagefolder import LatentSampler, LatentSet

        lat = LatentSet(latents)
        C, h = lat.latents.shape[2] // (2 if lat.moments else 1), lat.latents.shape[3]
        if (C, h) != (cfg.in_channels, cfg.input_size):
            raise UsageError(f"{latents} holds {C}x{h}x{h} latents, but the model takes {shape}")
        if int(lat.labels.max()) >= cfg.num_classes:
            raise UsageError(f"{latents} has labels up to {int(lat.labels.max())}, the model {cfg.num_classes} "
                               "classes")
        it = LatentSampler(lat, local, seed=seed, rank=R, world_size=W, flip=lat.meta.get("flip") == "both")
        return it, {"latents": str(latents)}
    if vae:  # images encoded on the fly (slower)
        from lazydit.data.imagefolder import EncodedLoader, ImageFolder, ImageFolderLoader
        from lazydit.data.vae import load_vae

        if not data:
            raise UsageError("--vae needs --data IMAGE_DIR (class sub-folders, e.g. ImageNet's train/)")
        device = next(model.parameters()).device
        enc = load_vae(vae, device)
        if enc.config.latent_channels != cfg.in_channels:
            raise UsageError(f"--vae has {enc.config.latent_channels} latent channels, the model takes {shape}")
        ds = ImageFolder(data, image_size=cfg.input_size * 2 ** (len(enc.config.block_out_channels) - 1))
        if len(ds.classes) > cfg.num_classes:
            raise UsageError(f"{data} has {len(ds.classes)} classes, the model {cfg.num_classes}")
        it = EncodedLoader(ImageFolderLoader(ds, local, rank=R, world_size=W, seed=seed, flip=True,
                                             num_workers=workers), enc, seed=seed)
        return it, {"data": str(data), "vae": str(vae)}
    if getattr(model, "autoencoder_file", None):  # a latent model with its own autoencoder (the embedded default):
        # Fashion-MNIST encoded once, posterior sampled per batch; every rank slices the same global batches
        from lazydit.data.fashion_mnist import PosteriorSampler, cached_posterior, load_fashion_mnist
        from lazydit.data.vae import decoder_for

        ae = decoder_for(model)
        x, y = load_fashion_mnist("train", data)
        if ae.factor * cfg.input_size != x.shape[-1]:
            raise UsageError(f"{model.autoencoder_file} does not make the model's {shape} latents of Fashion-MNIST")
        moments = cached_posterior(ae, x, progress=progress and dist.is_main())  # encoded once, then cached
        it = PosteriorSampler(moments, y, batch_size, seed=seed)
        return dist.RankSlice(it), {"autoencoder": str(model.autoencoder_file)}
    if (cfg.in_channels, cfg.input_size) == (1, 28):  # Fashion-MNIST: every rank slices the same global batches
        from lazydit.data.fashion_mnist import InfiniteSampler, load_fashion_mnist

        x, y = load_fashion_mnist("train", data)
        return dist.RankSlice(InfiniteSampler(x, y, batch_size, seed=seed)), {}
    raise UsageError(f"train-gates reads Fashion-MNIST for the 1x28x28 pixel model; this model takes {shape}: pass "
                       "--latents LATENT_DIR (from `lazydit extract-latents`, fast) or --data IMAGE_DIR --vae VAE_FOLDER "
                       "(encodes on the fly)")
