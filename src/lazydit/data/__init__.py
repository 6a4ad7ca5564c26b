"""Data: Fashion-MNIST (`fashion_mnist`), image folders and pre-extracted latents (`imagefolder`), and the VAE
of latent DiTs (`vae`)."""

from lazydit.data.fashion_mnist import InfiniteSampler, load_fashion_mnist

__all__ = ["InfiniteSampler", "load_fashion_mnist"]
_SUBMODULES = ("fashion_mnist", "imagefolder", "sources", "vae")


def __getattr__(name):  # the submodules on first use: `lazydit.data.vae.decode` after a plain `import lazydit`
    if name in _SUBMODULES:
        import importlib

        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
