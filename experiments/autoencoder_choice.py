"""Which autoencoder for the latent embedded default: what its reconstructions alone cost in FID, and how much latent
error its decoder tolerates.

    python experiments/autoencoder_choice.py NAME=AE_FILE [NAME=AE_FILE ...] [--out docs/autoencoder_choice.json]

For each autoencoder (`lazydit train-autoencoder` files): the first 5,000 train-split images are encoded (posterior
mean, and one posterior sample) and decoded, and scored with the shipped Fashion-MNIST evaluator against the
test-split statistics, next to the untouched images (the floor: train against test). A latent DiT cannot score
better than its decoder's reconstructions. Then unit-std Gaussian noise of size s is added to the latents of the
first 1,000 test images before decoding: pixel MSE against the images, how gracefully the decoder takes the
sampler's latent errors. Needs the dataset (apt-get install -y dataset-fashion-mnist).
"""

import argparse
import json
import platform
from pathlib import Path

import torch

from lazydit.data.fashion_mnist import load_fashion_mnist
from lazydit.evaluation.features import evaluate, extract_features
from lazydit.evaluation.fmnist import default_classifier, default_reference
from lazydit.files import write_text_atomic
from lazydit.images import to_uint8
from lazydit.models.autoencoder import load_autoencoder

NOISE = (0.1, 0.2, 0.4)  # latent noise sizes (latents have unit std)


@torch.no_grad()
def measure(ae, x_train, x_test, extractor, ref) -> dict:
    def fid(images):
        m = evaluate(extractor, extract_features(extractor, to_uint8(images), progress=False), ref, progress=False)
        return dict(fid=round(m["fid"], 4), sfid=round(m["sfid"], 4))

    def roundtrip(x, sample):
        g = torch.Generator().manual_seed(0)
        return torch.cat([ae.decode(ae.encode(x[i : i + 500], sample=sample, generator=g))
                          for i in range(0, len(x), 500)])

    rec_mean, rec_sample = roundtrip(x_train, False), roundtrip(x_train, True)
    z = ae.encode(x_test, sample=False)
    g = torch.Generator().manual_seed(1)
    noisy = {str(s): round(float((ae.decode(z + s * torch.randn(z.shape, generator=g)) - x_test).pow(2).mean()), 5)
             for s in NOISE}
    return dict(latent_shape=list(z.shape[1:]), params=sum(p.numel() for p in ae.parameters()),
                test_mse=round(float((ae.decode(z) - x_test).pow(2).mean()), 5),
                reconstruction_mean=fid(rec_mean), reconstruction_sample=fid(rec_sample), noisy_latent_mse=noisy)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("autoencoders", nargs="+", metavar="NAME=AE_FILE")
    ap.add_argument("--out", default="docs/autoencoder_choice.json")
    args = ap.parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    x_train = load_fashion_mnist("train")[0][:5000]
    x_test = load_fashion_mnist("test")[0][:1000]
    extractor, ref = default_classifier(), default_reference()
    floor = evaluate(extractor, extract_features(extractor, to_uint8(x_train), progress=False), ref, progress=False)
    out = dict(command="python experiments/autoencoder_choice.py " + " ".join(args.autoencoders),
               machine=platform.processor() or platform.machine(), torch=torch.__version__,
               floor_train_vs_test=dict(fid=round(floor["fid"], 4), sfid=round(floor["sfid"], 4)), autoencoders={})
    for spec in args.autoencoders:
        name, _, path = spec.partition("=")
        res = out["autoencoders"][name] = measure(load_autoencoder(path), x_train, x_test, extractor, ref)
        print(name, json.dumps(res), flush=True)
    write_text_atomic(Path(args.out), json.dumps(out, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
