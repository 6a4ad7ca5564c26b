"""Sample-quality metrics on precomputed features, matching the ADM evaluator (openai/guided-diffusion).

FID / sFID (Fréchet distance of feature Gaussians), Inception Score, improved precision / recall
(Kynkäänniemi et al. 2019, k = 3) and KID. Feature extraction (Inception-v3) is not part of this module:
every function takes feature or probability arrays of shape (N, D).
"""

import warnings
from pathlib import Path

import numpy as np
from scipy import linalg
from scipy.special import xlogy


def feature_stats(feats):
    """Mean and covariance of a feature set. Args: feats (N, D). Returns: (mu (D,), sigma (D, D)) in float64."""
    feats = np.asarray(feats, dtype=np.float64)
    return feats.mean(axis=0), np.cov(feats, rowvar=False)


def frechet_distance(mu1, sigma1, mu2, sigma2, eps=1e-6):
    """|mu1-mu2|^2 + Tr(s1 + s2 - 2 sqrtm(s1 s2)) as ADM. Args: two (mu, sigma) pairs, eps jitter. Returns: float."""
    mu1, mu2 = np.atleast_1d(mu1).astype(np.float64), np.atleast_1d(mu2).astype(np.float64)
    sigma1, sigma2 = np.atleast_2d(sigma1).astype(np.float64), np.atleast_2d(sigma2).astype(np.float64)
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
        raise ValueError(f"shape mismatch: mu {mu1.shape} vs {mu2.shape}, sigma {sigma1.shape} vs {sigma2.shape}")
    with warnings.catch_warnings():  # ADM passes disp=False (deprecated in SciPy 1.17) to silence sqrtm
        warnings.simplefilter("ignore")
        covmean = linalg.sqrtm(sigma1 @ sigma2)
    if not np.isfinite(covmean).all():
        warnings.warn(f"fid calculation produces singular product; adding {eps} to diagonal of cov estimates")
        offset = np.eye(sigma1.shape[0]) * eps
        covmean = linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(f"Imaginary component {np.max(np.abs(covmean.imag))}")
        covmean = covmean.real
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def fid_from_features(a, b):
    """FID between two feature sets. Args: a (N1, D), b (N2, D). Returns: float."""
    return frechet_distance(*feature_stats(a), *feature_stats(b))


def inception_score_splits(probs, splits=10):
    """Per-split IS exp(E_x KL(p(y|x) || p(y))). Args: probs (N, C) softmax rows, splits. Returns: (splits,) array."""
    probs = np.asarray(probs, dtype=np.float64)
    scores = []
    for part in np.array_split(probs, splits):
        py = part.mean(axis=0, keepdims=True)
        kl = (xlogy(part, part) - xlogy(part, py)).sum(axis=1).mean()  # 0 log 0 = 0
        scores.append(np.exp(kl))
    return np.array(scores)


def inception_score(probs, splits=10):
    """Mean IS over `splits` equal splits: the improved-GAN / torch-fidelity convention, which every table of this
    project uses (std: inception_score_splits(...).std()).

    Not ADM's: ADM's evaluator cuts the rows into chunks of 5,000 (`inception_score_adm`), so the two agree at
    50,000 samples (ten chunks of 5,000 either way) but not below: at 5,000 samples ADM scores one chunk, and ten
    splits of 500 read lower, the more so the more classes there are (each split's marginal p(y) is noisier).

    Args: probs (N, C) class probabilities, splits number of splits. Returns: float.
    """
    return float(inception_score_splits(probs, splits).mean())


def inception_score_adm(probs, split_size=5000):
    """IS as ADM's evaluator computes it: the mean over consecutive chunks of `split_size` rows (the last one may be
    shorter). Args: probs (N, C) class probabilities, split_size. Returns: float."""
    probs = np.asarray(probs, dtype=np.float64)
    return float(np.mean([inception_score_splits(probs[i : i + split_size], 1)[0]
                          for i in range(0, len(probs), split_size)]))


def _sq_dists(x, y):
    """Squared Euclidean distances (float32, clamped at 0, as ADM's DistanceBlock). Returns: (len(x), len(y))."""
    d = (x * x).sum(1)[:, None] - 2 * (x @ y.T) + (y * y).sum(1)[None, :]
    return np.maximum(d, 0)


def _sq_radii(feats, k, batch):
    """Squared distance to the k-th nearest neighbour (self = 0-th), in row x column blocks. Returns: (N,)."""
    if len(feats) <= k:
        raise ValueError(f"need more than k={k} points, got {len(feats)}")
    radii = np.empty(len(feats), dtype=np.float32)
    for i in range(0, len(feats), batch):
        rows = feats[i : i + batch]
        best = np.empty((len(rows), 0), dtype=np.float32)  # running k+1 smallest squared distances
        for j in range(0, len(feats), batch):
            cand = np.concatenate([best, _sq_dists(rows, feats[j : j + batch])], axis=1)
            best = np.partition(cand, min(k, cand.shape[1] - 1), axis=1)[:, : k + 1]
        radii[i : i + batch] = np.partition(best, k, axis=1)[:, k]
    return radii


def manifold_radii(feats, k=3, batch=10000):
    """k-NN radius of each point within its own set, the point itself counting as the 0-th neighbour.

    Args: feats (N, D), k, batch block size. Returns: (N,) float32 distances.
    """
    return np.sqrt(_sq_radii(np.asarray(feats, dtype=np.float32), k, batch))


def precision_recall(real_feats, fake_feats, k=3, batch=10000):
    """Improved precision / recall (Kynkäänniemi 2019) as ADM's ManifoldEstimator.

    Precision = share of fake points within distance <= radius of some real point; recall = share of real
    points within the radius of some fake point. Args: real_feats (N1, D), fake_feats (N2, D), k, batch.
    Returns: (precision, recall) floats.
    """
    real = np.asarray(real_feats, dtype=np.float32)
    fake = np.asarray(fake_feats, dtype=np.float32)
    r_real, r_fake = _sq_radii(real, k, batch), _sq_radii(fake, k, batch)  # compare squared, as ADM
    real_in = np.zeros(len(real), dtype=bool)
    fake_in = np.zeros(len(fake), dtype=bool)
    for i in range(0, len(real), batch):
        for j in range(0, len(fake), batch):
            d = _sq_dists(real[i : i + batch], fake[j : j + batch])
            real_in[i : i + batch] |= (d <= r_fake[None, j : j + batch]).any(axis=1)
            fake_in[j : j + batch] |= (d <= r_real[i : i + batch, None]).any(axis=0)
    return float(fake_in.mean()), float(real_in.mean())


def kid(a, b, subsets=100, subset_size=1000, degree=3, gamma=None, coef0=1, seed=0):
    """Kernel Inception Distance: unbiased MMD^2 with kernel (gamma x.y + coef0)^degree, gamma = 1/D by default.

    Args: a (N1, D), b (N2, D), subsets, subset_size (at most min(N1, N2)), degree, gamma, coef0, seed.
    Returns: float, the mean over subsets.
    Raises:
        ValueError: subset_size exceeds a set (as torchmetrics; callers with few samples pass a smaller one).
    """
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    gamma = 1.0 / a.shape[1] if gamma is None else gamma
    if subset_size > min(len(a), len(b)):
        raise ValueError(f"KID subset size {subset_size} exceeds the smaller set ({min(len(a), len(b))} rows): pass "
                         "a smaller subset_size")
    m = subset_size
    rng = np.random.default_rng(seed)
    vals = []
    for _ in range(subsets):
        x = a[rng.choice(len(a), m, replace=False)]
        y = b[rng.choice(len(b), m, replace=False)]
        kxx, kyy, kxy = ((u @ v.T * gamma + coef0) ** degree for u, v in ((x, x), (y, y), (x, y)))
        within = (kxx.sum() - np.trace(kxx) + kyy.sum() - np.trace(kyy)) / (m * (m - 1))
        vals.append(within - 2 * kxy.mean())
    return float(np.mean(vals))


def _psd_sqrt(sigma) -> np.ndarray:
    """The symmetric square root of a covariance (negative eigenvalues from rounding clipped to 0)."""
    w, v = np.linalg.eigh(sigma)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def _frechet_rooted(mu, sigma, ref_mu, ref_root, ref_trace) -> float:
    """Fréchet distance with Tr sqrtm(S R) = sum sqrt(eig(R^1/2 S R^1/2)): a symmetric eigenproblem, not sqrtm,
    so it holds for rank-deficient covariances (fewer samples than features) too."""
    ev = np.linalg.eigvalsh(ref_root @ sigma @ ref_root)
    diff = mu - ref_mu
    return diff @ diff + np.trace(sigma) + ref_trace - 2 * np.sqrt(np.clip(ev, 0, None)).sum()


def fid_of_samples(a, b) -> float:
    """FID between two feature sets (N, D) by the symmetric eigenproblem of `bootstrap_fid_draws`: N may be below D.
    Args: a, b: (N1, D), (N2, D) features. Returns: float."""
    mu_b, sigma_b = feature_stats(b)
    return float(_frechet_rooted(*feature_stats(a), mu_b, _psd_sqrt(sigma_b), np.trace(sigma_b)))


def bootstrap_fid_draws(feats, ref_mu, ref_sigma, reps=200, seed=0) -> np.ndarray:
    """FID of `reps` bootstrap resamples of one sample set, drawn from `seed`.

    The resampled row indices depend only on (len(feats), reps, seed), so two sets of the same size drawn with the
    same seed resample the same rows: the draws of each set can be computed on its own (on another day, on another
    machine) and paired later with `paired_interval`; together they equal `paired_bootstrap_fid` of the two sets.
    Args:
        feats: (N, D) features of the sample set.
        ref_mu, ref_sigma: reference statistics (D,), (D, D).
        reps: bootstrap draws.
        seed: resampling seed.
    Returns:
        (reps,) float64 FIDs, one per draw.
    """
    feats = np.asarray(feats, dtype=np.float64)
    rng = np.random.default_rng(seed)
    ref_mu, ref_sigma = np.asarray(ref_mu, dtype=np.float64), np.asarray(ref_sigma, dtype=np.float64)
    root, const = _psd_sqrt(ref_sigma), np.trace(ref_sigma)  # sigma_ref^(1/2), once
    out = np.empty(reps)
    for i in range(reps):
        mu, sigma = feature_stats(feats[rng.integers(0, len(feats), len(feats))])
        out[i] = _frechet_rooted(mu, sigma, ref_mu, root, const)
    return out


def paired_interval(fid_a: float, fid_b: float, draws_a, draws_b, level=0.95) -> dict:
    """Paired-bootstrap interval of FID(a) - FID(b) from each set's `bootstrap_fid_draws` (same size, reps, seed).

    Args:
        fid_a, fid_b: FID of each whole set.
        draws_a, draws_b: (reps,) bootstrap FIDs of each set, drawn with the same seed.
        level: two-sided confidence level of the percentile interval.
    Returns:
        dict(delta, lo, hi, std, std_a, std_b, reps), as `paired_bootstrap_fid`.
    """
    fa, fb = np.asarray(draws_a, dtype=np.float64), np.asarray(draws_b, dtype=np.float64)
    if fa.shape != fb.shape:
        raise ValueError(f"paired draws need the same number of draws, got {fa.shape} and {fb.shape}")
    d, q = fa - fb, (1 - level) / 2
    return dict(delta=float(fid_a - fid_b), lo=float(np.quantile(d, q)), hi=float(np.quantile(d, 1 - q)),
                std=float(d.std(ddof=1)), std_a=float(fa.std(ddof=1)), std_b=float(fb.std(ddof=1)), reps=len(d))


def paired_bootstrap_fid(a, b, ref_mu, ref_sigma, reps=200, seed=0, level=0.95):
    """Confidence interval of FID(a) - FID(b) against reference statistics, for two samplers run on the same seeds.

    Row i of `a` and of `b` come from the same label and initial noise, so each bootstrap draw resamples the same
    rows of both: the shared part of the sampling noise cancels and the interval is far tighter than two separate
    ones. (Not part of the ADM evaluator; how far apart two rows of a table really are.)
    Args:
        a, b: (N, D) features of the two sample sets, row-aligned.
        ref_mu, ref_sigma: reference statistics (D,), (D, D).
        reps: bootstrap draws.
        seed: resampling seed.
        level: two-sided confidence level of the percentile interval.
    Returns:
        dict(delta (FID(a) - FID(b) on all rows), lo, hi (percentile interval of the draws), std (of the draws),
        std_a, std_b (bootstrap std of each FID alone), reps).
    """
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"paired bootstrap needs row-aligned sets of one shape, got {a.shape} and {b.shape}")
    fid_a, fid_b = (frechet_distance(*feature_stats(x), ref_mu, ref_sigma) for x in (a, b))
    return paired_interval(fid_a, fid_b, bootstrap_fid_draws(a, ref_mu, ref_sigma, reps, seed),
                           bootstrap_fid_draws(b, ref_mu, ref_sigma, reps, seed), level)


def paired_psnr(a, b, data_range=255.0):
    """Fidelity of one sample set to another drawn from the same noise: PSNR of row i of `a` against row i of `b`.

    Not a quality metric (the ADM evaluator has none like it): it measures how far a cheaper sampler's images drift
    from a reference sampler's images of the same labels and initial noise (e.g. Lazy-50 or DDIM-25 against DDIM-50).
    Args:
        a, b: (N, ...) row-aligned arrays of one shape (e.g. ADM uint8 batches (N, H, W, C)).
        data_range: peak value (255 for uint8 images).
    Returns:
        dict(psnr (dB, of the MSE over all rows: finite unless every row is equal), median (dB, of the per-row
        PSNRs, inf for equal rows), mse (mean), identical (share of rows that are equal)).
    """
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape or a.ndim < 2:
        raise ValueError(f"paired PSNR needs row-aligned sets of one shape, got {a.shape} and {b.shape}")
    mse = ((a - b) ** 2).reshape(len(a), -1).mean(axis=1)  # (N,)
    with np.errstate(divide="ignore"):
        per_row = 10 * np.log10(data_range**2 / mse)  # inf where mse == 0
        pooled = 10 * np.log10(data_range**2 / mse.mean())
    return dict(psnr=float(pooled), median=float(np.median(per_row)), mse=float(mse.mean()),
                identical=float((mse == 0).mean()))


def load_npz_samples(path):
    """Load an ADM sample batch. Args: path to .npz with arr_0 (N, H, W, C) uint8. Returns: that array.

    Raises:
        FileNotFoundError: no such file. ValueError: not a readable .npz with such an arr_0 (truncated, another
        format, wrong shape or dtype).
    """
    import zipfile

    if not Path(path).is_file():
        raise FileNotFoundError(f"sample batch not found: {path}")
    with open(path, "rb") as f:
        if f.read(4) != b"PK\x03\x04":  # every .npz is a zip archive
            raise ValueError(f"{path}: not an .npz file (an ADM sample batch is an .npz with arr_0: N x H x W x C uint8)")
    try:
        with np.load(path, allow_pickle=False) as f:  # a zip archive: an NpzFile
            if "arr_0" not in f.files:
                raise ValueError(f"no 'arr_0' in it (keys: {f.files})")
            arr = f["arr_0"]
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as e:
        raise ValueError(f"{path}: not a readable ADM sample batch (.npz with arr_0: N x H x W x C uint8): "
                         f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    if arr.dtype != np.uint8 or arr.ndim != 4 or arr.shape[-1] not in (1, 3):
        raise ValueError(f"{path}: arr_0 must be (N, H, W, C) uint8 with C in (1, 3), got {arr.shape} {arr.dtype}")
    return arr
