"""Closed-form checks of the ADM-style metrics (FID, IS, precision/recall, KID) and the .npz loader."""

import numpy as np
import pytest
import torch

from lazydit.images import save_npz
from lazydit.evaluation.metrics import (
    feature_stats,
    fid_from_features,
    frechet_distance,
    inception_score,
    inception_score_splits,
    kid,
    load_npz_samples,
    manifold_radii,
    bootstrap_fid_draws,
    paired_bootstrap_fid,
    paired_interval,
    paired_psnr,
    precision_recall,
)


def random_spd(rng, d):
    a = rng.standard_normal((d, d))
    return a @ a.T + 0.5 * np.eye(d)


# ---------------------------------------------------------------- FID


def test_feature_stats_float64_and_cov():
    x = np.random.default_rng(0).standard_normal((50, 3)).astype(np.float32)
    mu, sigma = feature_stats(x)
    assert mu.dtype == np.float64 and sigma.dtype == np.float64
    np.testing.assert_allclose(sigma, np.cov(x.astype(np.float64), rowvar=False))
    np.testing.assert_allclose(mu, x.astype(np.float64).mean(0))


def test_fid_identical_features_is_zero():
    x = np.random.default_rng(0).standard_normal((2000, 16))
    assert abs(fid_from_features(x, x.copy())) < 1e-6


def test_frechet_diagonal_closed_form():
    m1, m2 = np.array([0.0, 1.0, -2.0, 3.0]), np.array([1.0, 1.0, 0.5, -1.0])
    s1, s2 = np.array([1.0, 4.0, 0.25, 2.0]), np.array([9.0, 1.0, 1.0, 0.5])
    expected = np.sum((m1 - m2) ** 2) + np.sum(s1 + s2 - 2 * np.sqrt(s1 * s2))
    assert frechet_distance(m1, np.diag(s1), m2, np.diag(s2)) == pytest.approx(expected, rel=1e-10)


def test_frechet_full_covariance_vs_eigendecomposition():
    rng = np.random.default_rng(1)
    d = 6
    m1, m2 = rng.standard_normal(d), rng.standard_normal(d)
    s1, s2 = random_spd(rng, d), random_spd(rng, d)
    # Tr sqrt(s1 s2) = Tr sqrt(s1^1/2 s2 s1^1/2), a symmetric PSD matrix: sum of sqrt of its eigenvalues.
    w, v = np.linalg.eigh(s1)
    s1_half = v @ np.diag(np.sqrt(w)) @ v.T
    tr_covmean = np.sum(np.sqrt(np.linalg.eigvalsh(s1_half @ s2 @ s1_half)))
    expected = np.sum((m1 - m2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * tr_covmean
    assert frechet_distance(m1, s1, m2, s2) == pytest.approx(expected, rel=1e-9)
    assert frechet_distance(m2, s2, m1, s1) == pytest.approx(expected, rel=1e-9)  # symmetric


def test_fid_from_samples_close_to_closed_form():
    rng = np.random.default_rng(2)
    m1, m2 = np.zeros(4), np.array([1.0, -0.5, 0.0, 2.0])
    s1, s2 = np.array([1.0, 2.0, 0.5, 1.0]), np.array([0.5, 2.0, 2.0, 3.0])
    a = m1 + np.sqrt(s1) * rng.standard_normal((20000, 4))
    b = m2 + np.sqrt(s2) * rng.standard_normal((20000, 4))
    expected = np.sum((m1 - m2) ** 2) + np.sum(s1 + s2 - 2 * np.sqrt(s1 * s2))
    assert fid_from_features(a, b) == pytest.approx(expected, rel=0.03, abs=0.02)


def test_frechet_non_finite_sqrtm_falls_back_to_eps():
    # s1 s2 = [[0, 1], [0, 0]] is nilpotent: sqrtm is infinite, so ADM adds eps I to both and retries.
    s1, s2, eps = np.array([[0.0, 1.0], [0.0, 0.0]]), np.eye(2), 1e-6
    with pytest.warns(UserWarning, match="singular product"):
        fd = frechet_distance(np.zeros(2), s1, np.ones(2), s2, eps=eps)
    # sqrtm([[e, 1], [0, e]] (1 + e)) has trace 2 sqrt(e (1 + e))
    assert fd == pytest.approx(2 + 0 + 2 - 4 * np.sqrt(eps * (1 + eps)), rel=1e-9)


def test_frechet_shape_mismatch():
    with pytest.raises(ValueError):
        frechet_distance(np.zeros(2), np.eye(2), np.zeros(3), np.eye(3))


# ---------------------------------------------------------------- precision / recall


def test_pr_separated_clusters_zero():
    rng = np.random.default_rng(0)
    real = rng.standard_normal((200, 8))
    fake = rng.standard_normal((150, 8)) + 100.0
    assert precision_recall(real, fake) == (0.0, 0.0)


def test_pr_identical_sets_one():
    x = np.random.default_rng(0).standard_normal((300, 8))
    assert precision_recall(x, x.copy()) == (1.0, 1.0)
    assert precision_recall(x, x[::-1].copy(), batch=64) == (1.0, 1.0)


def clusters(rng, n_per, centers):
    return np.concatenate([c + rng.standard_normal((n_per, len(c))) for c in centers])


def test_pr_half_the_modes():
    rng = np.random.default_rng(0)
    centers = 50.0 * np.eye(4, 8)
    real = clusters(rng, 100, centers)
    # exact: the fake set is the real points of modes 0 and 1
    fake = real[:200].copy()
    assert precision_recall(real, fake) == (1.0, 0.5)
    assert precision_recall(real, fake, batch=37) == (1.0, 0.5)  # blocking does not change anything
    # fresh samples of modes 0 and 1 (k-NN balls of 100 points in 8-D miss some): high precision, recall <= 0.5
    fresh = clusters(rng, 100, centers[:2])
    p, r = precision_recall(real, fresh)
    assert p > 0.75 and 0.35 < r <= 0.5


def test_pr_hand_checked_1d():
    real = np.array([0.0, 1.0, 3.0, 6.0, 10.0])[:, None]
    fake = np.array([0.0, 0.5, 1.0, 1.5, 19.0, 19.5, 20.0, 20.5])[:, None]
    # k = 3 with the point itself as the 0-th neighbour: the 4th smallest distance in its own set.
    np.testing.assert_array_equal(manifold_radii(real), [6, 5, 3, 5, 9])
    np.testing.assert_array_equal(manifold_radii(fake), [1.5, 1, 1, 1.5, 1.5, 1, 1, 1.5])
    np.testing.assert_array_equal(manifold_radii(fake, batch=2), manifold_radii(fake))
    # real balls cover [-6, 19] -> fake 0, .5, 1, 1.5 and 19 (on the boundary: <=) are in: 5/8.
    # fake balls cover [-1.5, 3] u [17.5, 22] -> real 0, 1 and 3 (boundary) are in: 3/5.
    assert precision_recall(real, fake) == (5 / 8, 3 / 5)
    assert precision_recall(real, fake, batch=2) == (5 / 8, 3 / 5)


def test_pr_needs_more_than_k_points():
    with pytest.raises(ValueError):
        precision_recall(np.zeros((3, 2)), np.zeros((10, 2)))


# ---------------------------------------------------------------- Inception Score


def test_is_uniform_is_one():
    probs = np.full((100, 10), 0.1)
    assert inception_score(probs) == pytest.approx(1.0, abs=1e-12)


def test_is_one_hot_even_is_num_classes():
    C = 5
    probs = np.eye(C)[np.arange(100) % C]  # every split of 10 holds each class twice
    assert inception_score(probs, splits=10) == pytest.approx(C, rel=1e-12)
    np.testing.assert_allclose(inception_score_splits(probs, 10), np.full(10, C))


def test_is_matches_direct_formula_single_split():
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((64, 7))
    p = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    py = p.mean(0)
    expected = np.exp(np.mean(np.sum(p * (np.log(p) - np.log(py)), axis=1)))
    assert inception_score(p, splits=1) == pytest.approx(expected, rel=1e-12)
    assert len(inception_score_splits(p, splits=4)) == 4


# ---------------------------------------------------------------- KID


def test_kid_full_subset_matches_direct_unbiased_mmd():
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((60, 5)), rng.standard_normal((60, 5)) + 0.3
    k = lambda x, y: (x @ y.T / 5 + 1) ** 3  # noqa: E731
    m = 60
    kxx, kyy, kxy = k(a, a), k(b, b), k(a, b)
    expected = (kxx.sum() - np.trace(kxx) + kyy.sum() - np.trace(kyy)) / (m * (m - 1)) - 2 * kxy.mean()
    # subsets of all 60 rows: every subset is a permutation of the full sets
    assert kid(a, b, subsets=3, subset_size=60) == pytest.approx(expected, rel=1e-9)
    with pytest.raises(ValueError, match="exceeds the smaller set"):  # never shrunk silently
        kid(a, b, subsets=3, subset_size=61)


def test_inception_score_adm_chunks_and_equal_splits():
    from lazydit.evaluation.metrics import inception_score, inception_score_adm, inception_score_splits

    rng = np.random.default_rng(0)
    p = rng.dirichlet(np.ones(20) * 0.3, size=12000)
    # ADM: chunks of 5,000, 5,000 and 2,000 rows
    chunks = [inception_score_splits(p[i : i + 5000], 1)[0] for i in (0, 5000, 10000)]
    assert inception_score_adm(p) == pytest.approx(np.mean(chunks), rel=1e-12)
    assert inception_score_adm(p[:5000]) == pytest.approx(inception_score(p[:5000], splits=1), rel=1e-12)
    # at 50,000 rows ten equal splits are ADM's ten chunks
    q = rng.dirichlet(np.ones(20) * 0.3, size=50000)
    assert inception_score(q, splits=10) == pytest.approx(inception_score_adm(q), rel=1e-12)


def test_kid_same_distribution_small_and_grows_with_shift():
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((1000, 16)), rng.standard_normal((1000, 16))
    kw = dict(subsets=10, subset_size=200)
    same = kid(a, b, **kw)
    shifted = [kid(a, b + s, **kw) for s in (0.25, 0.5, 1.0)]
    assert abs(same) < 0.02
    assert shifted[0] > 5 * abs(same) + 0.05
    assert shifted[0] < shifted[1] < shifted[2]


# ---------------------------------------------------------------- .npz loader


def test_load_npz_round_trip(tmp_path):
    imgs = np.random.default_rng(0).integers(0, 256, (4, 8, 8, 3), dtype=np.uint8)
    save_npz(imgs, tmp_path / "a.npz", labels=[0, 1, 2, 3])
    np.testing.assert_array_equal(load_npz_samples(tmp_path / "a.npz"), imgs)
    x = torch.rand(2, 1, 8, 8) * 2 - 1
    save_npz(x, tmp_path / "b.npz")
    out = load_npz_samples(tmp_path / "b.npz")
    assert out.shape == (2, 8, 8, 1) and out.dtype == np.uint8


def test_load_npz_errors(tmp_path):
    np.savez(tmp_path / "key.npz", images=np.zeros((2, 8, 8, 3), np.uint8))
    with pytest.raises(ValueError, match="arr_0"):
        load_npz_samples(tmp_path / "key.npz")
    np.savez(tmp_path / "dtype.npz", arr_0=np.zeros((2, 8, 8, 3), np.float32))
    with pytest.raises(ValueError, match="uint8"):
        load_npz_samples(tmp_path / "dtype.npz")
    np.savez(tmp_path / "shape.npz", arr_0=np.zeros((2, 8, 8), np.uint8))
    with pytest.raises(ValueError, match="uint8"):
        load_npz_samples(tmp_path / "shape.npz")


def test_paired_bootstrap_fid_cancels_shared_noise():
    rng = np.random.default_rng(0)
    ref = rng.standard_normal((4000, 4))
    mu, sigma = feature_stats(ref)
    base = rng.standard_normal((1000, 4))  # the shared part: same labels and noise in both samplers
    same = paired_bootstrap_fid(base, base.copy(), mu, sigma, reps=50)
    assert same["delta"] == 0 and same["lo"] == 0 == same["hi"] and same["std_a"] > 0  # each FID alone varies
    shifted = paired_bootstrap_fid(base + 0.3, base, mu, sigma, reps=50)
    assert shifted["lo"] > 0 and shifted["delta"] == pytest.approx(
        fid_from_features(base + 0.3, ref) - fid_from_features(base, ref))
    tiny = paired_bootstrap_fid(base + 0.01 * rng.standard_normal(base.shape), base, mu, sigma, reps=50)
    assert tiny["std"] < tiny["std_a"] / 5  # pairing: far tighter than one FID's own spread
    with pytest.raises(ValueError, match="row-aligned"):
        paired_bootstrap_fid(base, base[:10], mu, sigma)


def test_bootstrap_draws_pair_later_exactly():
    """Each set's draws, computed alone (another day, another machine), pair into the joint paired bootstrap: the
    resampled rows depend only on (N, reps, seed), and each draw is the FID of those rows."""
    rng = np.random.default_rng(3)
    ref = rng.standard_normal((2000, 3))
    mu, sigma = feature_stats(ref)
    a = rng.standard_normal((300, 3))
    b = a + 0.05 * rng.standard_normal(a.shape)
    da, db = (bootstrap_fid_draws(x, mu, sigma, reps=20, seed=7) for x in (a, b))
    idx = np.random.default_rng(7).integers(0, 300, 300)  # the first draw's rows
    assert da[0] == pytest.approx(fid_from_features(a[idx], ref), rel=1e-6)
    later = paired_interval(fid_from_features(a, ref), fid_from_features(b, ref), da, db)
    joint = paired_bootstrap_fid(a, b, mu, sigma, reps=20, seed=7)
    assert later["lo"] == joint["lo"] and later["hi"] == joint["hi"] and later["std"] == joint["std"]
    assert later["delta"] == pytest.approx(joint["delta"])
    assert not np.array_equal(da, bootstrap_fid_draws(a, mu, sigma, reps=20, seed=8))  # the seed picks the rows
    with pytest.raises(ValueError, match="same number of draws"):
        paired_interval(1.0, 2.0, da, db[:5])


def test_paired_psnr_closed_form():
    a = np.zeros((4, 2, 2, 1), dtype=np.uint8)
    b = a.copy()
    b[0] = 255  # row 0: mse 255^2 -> 0 dB; rows 1..3 equal -> inf
    out = paired_psnr(a, b)
    assert out["mse"] == pytest.approx(255**2 / 4)
    assert out["psnr"] == pytest.approx(10 * np.log10(4))  # pooled over rows: mse is a quarter of the peak
    assert out["median"] == np.inf and out["identical"] == 0.75
    c = a.copy()
    c[...] = 1  # every pixel off by one: 20 log10(255) dB
    assert paired_psnr(a, c)["median"] == pytest.approx(20 * np.log10(255))
    assert paired_psnr(a, a)["psnr"] == np.inf
    with pytest.raises(ValueError, match="row-aligned"):
        paired_psnr(a, a[:3])
