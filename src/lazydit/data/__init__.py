"""Data: Fashion-MNIST (`fashion_mnist`), image folders and pre-extracted latents (`imagefolder`), and the VAE
of latent DiTs (`vae`)."""

from lazydit.data.fashion_mnist import InfiniteSampler, load_fashion_mnist

__all__ = ["InfiniteSampler", "load_fashion_mnist"]
