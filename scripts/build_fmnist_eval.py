"""Rebuild a Fashion-MNIST evaluator shipped in src/lazydit/assets/ (lazydit.evaluation.fmnist).

Trains the feature extractor on the 60k train split, saves it (test accuracy and training arguments in its
metadata), then saves the reference statistics of the 10k test split. Two are shipped (from the repository root):

    OMP_NUM_THREADS=1 python3 scripts/build_fmnist_eval.py             # the CNN: fmnist_classifier.safetensors,
                                                                       # fmnist_test_ref.npz (about 9 CPU-minutes)
    OMP_NUM_THREADS=1 python3 scripts/build_fmnist_eval.py --arch resnet --seed 1 --channels 16 32 96 160 --epochs 5
                                                                       # the second extractor: fmnist_resnet.*

Needs the Debian Fashion-MNIST IDX files (apt-get install -y dataset-fashion-mnist) or --data DIR.
"""

import argparse
import os
import platform
import time

import numpy as np
import torch

from lazydit.data.fashion_mnist import load_fashion_mnist
from lazydit.evaluation.fmnist import (
    ARCHITECTURES,
    DEFAULT_CLASSIFIER,
    DEFAULT_REFERENCE,
    RESNET_CLASSIFIER,
    RESNET_REFERENCE,
    load_classifier,
    save_classifier,
    train_classifier,
)
from lazydit.evaluation.features import evaluate, reference_stats, save_reference


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=None, help="Fashion-MNIST IDX folder (default: Debian's)")
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--weight-decay", type=float, default=5e-4)
    p.add_argument("--channels", type=int, nargs=4, default=[16, 32, 64, 128])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--arch", choices=list(ARCHITECTURES), default="cnn", help="cnn (the default evaluator) or resnet "
                   "(the second extractor)")
    p.add_argument("--classifier-out", default=None, help="default: the shipped file of --arch")
    p.add_argument("--reference-out", default=None, help="default: the shipped file of --arch")
    p.add_argument("--threads", type=int, default=1, help="torch threads (the shared build machine: 1)")
    args = p.parse_args(argv)
    shipped = {"cnn": (DEFAULT_CLASSIFIER, DEFAULT_REFERENCE), "resnet": (RESNET_CLASSIFIER, RESNET_REFERENCE)}
    args.classifier_out = args.classifier_out or str(shipped[args.arch][0])
    args.reference_out = args.reference_out or str(shipped[args.arch][1])
    torch.set_num_threads(args.threads)

    xtr, ytr = load_fashion_mnist("train", args.data)
    xte, yte = load_fashion_mnist("test", args.data)
    t0 = time.perf_counter()
    model, acc = train_classifier(xtr, ytr, xte, yte, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                                  seed=args.seed, progress=True, channels=tuple(args.channels),
                                  weight_decay=args.weight_decay, arch=args.arch)
    train_s = time.perf_counter() - t0
    print(f"test accuracy {acc:.4f} after {args.epochs} epochs in {train_s / 60:.1f} min "
          f"({args.threads} thread(s), {platform.processor() or platform.machine()})")
    train_args = {k: v for k, v in vars(args).items() if k not in ("classifier_out", "reference_out", "data")}
    save_classifier(model, args.classifier_out, {"test_accuracy": round(acc, 6), "train_args": train_args,
                                                 "train_seconds": round(train_s, 1),
                                                 "dataset": "Fashion-MNIST train (60k); accuracy on test (10k)"})

    model = load_classifier(args.classifier_out)  # the saved weights are what the reference must match
    test_u8 = np.round((xte.permute(0, 2, 3, 1).numpy() + 1.0) * 127.5).astype(np.uint8)  # (N, 28, 28, 1)
    t1 = time.perf_counter()
    stats = reference_stats(model, test_u8)
    save_reference(args.reference_out, stats, {"split": "test", "classifier": os.path.basename(args.classifier_out),
                                               "test_accuracy": round(acc, 6)})
    ref_s = time.perf_counter() - t1

    # sanity: train split (real data, other images) vs the test reference: FID should be small, P/R high
    t2 = time.perf_counter()
    train_u8 = np.round((xtr[:10000].permute(0, 2, 3, 1).numpy() + 1.0) * 127.5).astype(np.uint8)
    m = evaluate(model, train_u8, stats, progress=False)
    print("train[:10000] vs test reference: " + ", ".join(f"{k} {v:.4f}" for k, v in m.items())
          + f" ({time.perf_counter() - t2:.0f}s)")
    for path in (args.classifier_out, args.reference_out):
        print(f"{path}: {os.path.getsize(path) / 1e6:.2f} MB")
    print(f"timing: training {train_s:.0f}s, reference statistics {ref_s:.0f}s")


if __name__ == "__main__":
    main()
