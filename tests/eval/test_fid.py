"""FID matrix: exactness against scipy's sqrtm and torchmetrics, symmetry, bad inputs."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest
import scipy.linalg
import torch

from eval.fid import FeatureStats, FIDInputError, fid_matrix, fid_trace, frechet_distance


def _oracle(mu1, s1, mu2, s2) -> float:
    """Textbook FID with scipy's sqrtm (the pytorch-fid / clean-fid way), float64."""
    covmean = scipy.linalg.sqrtm(s1 @ s2)
    covmean = np.real(covmean)
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


def _gaussian_with_stats(rng, n, mu, cov):
    """n samples whose sample mean and (n-1) sample covariance are exactly mu and cov (n > d)."""
    d = mu.shape[0]
    z = rng.standard_normal((n, d))
    z -= z.mean(0)
    # whiten so that z^T z / (n - 1) = I exactly, then colour with cov's Cholesky factor
    w = np.linalg.cholesky(z.T @ z / (n - 1))
    z = np.linalg.solve(w, z.T).T
    return z @ np.linalg.cholesky(cov).T + mu


def _random_cov(rng, d, decay=1.0):
    a = rng.standard_normal((d, d)) / np.sqrt(d)
    return a @ a.T * decay + 0.05 * np.eye(d)


def _rel(a, b):
    return abs(a - b) / abs(b)


def test_known_statistics_match_scipy_oracle():
    rng = np.random.default_rng(0)
    d = 24
    mus = [rng.standard_normal(d) * s for s in (0.0, 0.5, 1.0)]
    covs = [_random_cov(rng, d, k) for k in (1.0, 2.0, 0.5)]
    sets = [_gaussian_with_stats(rng, 200, m, c) for m, c in zip(mus, covs)]
    stats = [FeatureStats.from_features(x) for x in sets]
    for s, m, c in zip(stats, mus, covs):  # the statistics are the known ones
        np.testing.assert_allclose(s.mu.numpy(), m, atol=1e-12)
        np.testing.assert_allclose(s.sigma.numpy(), c, atol=1e-12)
    mat = fid_matrix(stats[:2], stats)
    for i in range(2):
        for j in range(3):
            assert _rel(mat[i, j], _oracle(mus[i], covs[i], mus[j], covs[j])) < 1e-8 or (i == j and mat[i, j] < 1e-9)
    assert mat[0, 0] < 1e-9 and mat[1, 1] < 1e-9


@pytest.mark.parametrize("n,d", [(30, 64), (64, 64), (10, 100)])
def test_rank_deficient_n_le_d_matches_scipy_oracle(n, d):
    rng = np.random.default_rng(n + d)
    x = rng.standard_normal((n, d)) @ _random_cov(rng, d) + 0.3
    y = rng.standard_normal((n + 3, d)) * 1.5
    ours = frechet_distance(x, y)
    oracle = _oracle(x.mean(0), np.cov(x, rowvar=False), y.mean(0), np.cov(y, rowvar=False))
    assert _rel(ours, oracle) < 1e-6
    # the n_a x n_b form is used (samples kept) and agrees with the d x d form
    dense = frechet_distance(FeatureStats.from_features(x, keep_samples=False),
                             FeatureStats.from_features(y, keep_samples=False))
    assert _rel(ours, dense) < 1e-8


def test_singular_covariance_with_many_samples():
    """n > d but a duplicated feature makes S singular: Cholesky fails, the eigh factor is used."""
    rng = np.random.default_rng(3)
    x = rng.standard_normal((300, 20))
    x[:, 5] = x[:, 4]
    y = rng.standard_normal((250, 20)) + 0.2
    ours = frechet_distance(x, y)
    oracle = _oracle(x.mean(0), np.cov(x, rowvar=False), y.mean(0), np.cov(y, rowvar=False))
    assert _rel(ours, oracle) < 1e-6


class _Identity(torch.nn.Module):
    def __init__(self, d):
        super().__init__()
        self.num_features = d

    def forward(self, x):
        return x


@pytest.mark.parametrize("n,d", [(120, 48), (40, 64)])
def test_matches_torchmetrics(n, d):
    from torchmetrics.image.fid import FrechetInceptionDistance

    g = torch.Generator().manual_seed(n)
    rows = [torch.randn(n, d, generator=g, dtype=torch.float64) * (1 + k / 3) + k * 0.1 for k in range(3)]
    cols = [torch.randn(n + 7, d, generator=g, dtype=torch.float64) @ torch.randn(d, d, generator=g,
                                                                                  dtype=torch.float64) / d**0.5
            for _ in range(2)]
    ours = fid_matrix(rows, cols)
    for i, x in enumerate(rows):
        for j, y in enumerate(cols):
            m = FrechetInceptionDistance(feature=_Identity(d), normalize=False)
            m.update(y, real=True)
            m.update(x, real=False)
            ref = float(m.compute())
            assert _rel(ours[i, j], ref) <= 1e-6, (i, j, ours[i, j], ref)


def test_symmetric_and_zero_on_identical_sets():
    g = torch.Generator().manual_seed(1)
    sets = [torch.randn(50, 16, generator=g, dtype=torch.float64) * (k + 1) for k in range(3)]
    sets.append(sets[0].clone())
    mat = fid_matrix(sets)
    assert np.array_equal(mat, mat.T)
    assert np.all(np.diag(mat) == 0.0)
    assert mat[0, 3] == 0.0  # a copy of set 0
    assert mat[0, 1] > 1.0
    a, b = FeatureStats.from_features(sets[1]), FeatureStats.from_features(sets[2])
    assert frechet_distance(a, b) == frechet_distance(b, a)
    # rows/cols matrix agrees with the pairwise function
    full = fid_matrix(sets[:2], sets[1:3])
    assert full[1, 0] == mat[1, 1] and abs(full[0, 1] - mat[0, 2]) < 1e-9 * mat[0, 2]
    assert fid_trace(full) == pytest.approx(full[0, 0] + full[1, 1])


def test_float32_features_are_promoted():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(40, 8, generator=g)
    y = torch.randn(40, 8, generator=g) + 1
    assert frechet_distance(x, y) == pytest.approx(frechet_distance(x.double(), y.double()), rel=1e-12)
    assert FeatureStats.from_features(x).sigma.dtype == torch.float64


@pytest.mark.parametrize(
    "bad,match",
    [
        (np.zeros((1, 4)), "at least 2 samples"),
        (np.zeros(5), r"shape \[n, d\]"),
        (np.array([[0.0, 1.0], [np.nan, 2.0], [1.0, 1.0]]), "NaN/inf"),
        (np.array([[0.0, np.inf], [1.0, 2.0]]), "NaN/inf"),
    ],
)
def test_bad_features_raise_clear_errors(bad, match):
    with pytest.raises(FIDInputError, match=match):
        FeatureStats.from_features(bad, name="student/anime")
    with pytest.raises(FIDInputError, match="student/anime"):
        FeatureStats.from_features(bad, name="student/anime")


def test_dimension_mismatch():
    with pytest.raises(FIDInputError, match="different dimension"):
        fid_matrix([np.random.rand(5, 3)], [np.random.rand(5, 4)])
    with pytest.raises(FIDInputError, match="different dimension"):
        frechet_distance(np.random.rand(5, 3), np.random.rand(5, 4))


def test_stats_roundtrip_and_corrupt_file(tmp_path):
    x = np.random.default_rng(0).standard_normal((10, 6))
    s = FeatureStats.from_features(x, keep_samples=True)
    path = s.save(tmp_path / "a.npz")
    back = FeatureStats.load(path)
    assert torch.equal(back.mu, s.mu) and torch.equal(back.sigma, s.sigma)
    assert frechet_distance(back, x + 1) == frechet_distance(s, x + 1)
    (tmp_path / "bad.npz").write_bytes(path.read_bytes()[:100])
    with pytest.raises(FIDInputError, match="not a readable statistics file"):
        FeatureStats.load(tmp_path / "bad.npz")
    assert not list(tmp_path.glob("*.tmp"))
