"""Fréchet distances between many feature sets: per-set statistics once, all pairs from them.

FID(a, b) = ||mu_a - mu_b||^2 + tr S_a + tr S_b - 2 tr sqrt(S_a S_b)

Everything is float64, and the cross term is exact (no iteration, no regulariser, no general
non-symmetric eigenproblem). Every set gets a factor F with S = F F^T (d x r):

* n <= d: F = A^T with A = (X - mu) / sqrt(n - 1) (the centred samples; r = n, no decomposition);
* n > d:  F = the Cholesky factor of S (r = d), or, when S is singular, U diag(sqrt(lambda)) from
  ``eigh`` with the eigenvalues clamped at 0 and the null space dropped (r = rank).

Then S_a S_b = F_a (F_a^T F_b) F_b^T has the same non-zero eigenvalues as K K^T with
K = F_a^T F_b (r_a x r_b), so tr sqrt(S_a S_b) = sum sqrt(eigvalsh(K K^T)) = nuclear norm of K,
solved on the smaller side (min(r_a, r_b) squared): with n < d samples this is the n_a x n_b
form, with many samples the d x d one. An N x N matrix needs N + N factors and N^2 cross terms;
the mean terms for all pairs come from one broadcast. Pairs are put in a canonical order, so that
``frechet_distance(a, b) == frechet_distance(b, a)`` bit for bit.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from dmm.io import atomic_file

__all__ = [
    "FIDInputError",
    "FeatureStats",
    "fid_matrix",
    "fid_trace",
    "frechet_distance",
    "validate_features",
]

# Statistics files written by older code must not be trusted: bump when the format changes.
STATS_FORMAT = 1


class FIDInputError(ValueError):
    """Features or statistics that cannot give a Fréchet distance (the message says why)."""


def validate_features(features, name: str = "features") -> torch.Tensor:
    """Return ``features`` as a float64 ``[n, d]`` tensor, or raise :class:`FIDInputError`."""
    if isinstance(features, np.ndarray):
        x = torch.from_numpy(np.asarray(features))
    elif isinstance(features, torch.Tensor):
        x = features.detach().cpu()
    else:
        raise FIDInputError(f"{name}: expected a tensor or array of shape [n, d], got {type(features).__name__}")
    if x.dim() != 2:
        raise FIDInputError(f"{name}: expected features of shape [n, d], got shape {tuple(x.shape)}")
    if not (x.is_floating_point() or x.dtype in (torch.int32, torch.int64, torch.uint8)):
        raise FIDInputError(f"{name}: expected real-valued features, got dtype {x.dtype}")
    n, d = x.shape
    if n < 2:
        raise FIDInputError(f"{name}: a covariance needs at least 2 samples, got {n}")
    if d < 1:
        raise FIDInputError(f"{name}: features have dimension 0")
    x = x.to(torch.float64)
    finite = torch.isfinite(x)
    if not bool(finite.all()):
        bad_rows = (~finite).any(dim=1).nonzero().flatten()
        raise FIDInputError(
            f"{name}: {int((~finite).sum())} NaN/inf values in {bad_rows.numel()} of {n} samples "
            f"(first bad sample index {int(bad_rows[0])}); refusing to compute statistics"
        )
    return x


def _factor(sigma: torch.Tensor) -> torch.Tensor:
    """F with sigma = F F^T: Cholesky when positive definite, else eigh (clamped, null space dropped)."""
    chol, info = torch.linalg.cholesky_ex(sigma)
    if int(info) == 0 and bool(torch.isfinite(chol).all()):
        return chol
    vals, vecs = torch.linalg.eigh(sigma)
    keep = vals > vals.max().clamp_min(0) * sigma.shape[0] * torch.finfo(sigma.dtype).eps
    return vecs[:, keep] * vals[keep].sqrt()


def _sum_sqrt_eigvalsh(m: torch.Tensor) -> float:
    vals = torch.linalg.eigvalsh((m + m.T) * 0.5)
    return float(vals.clamp_min(0).sqrt().sum())


@dataclass(eq=False)
class FeatureStats:
    """Float64 mean and covariance of one feature set (plus its centred samples when n < d)."""

    n: int
    mu: torch.Tensor  # [d] float64
    sigma: torch.Tensor  # [d, d] float64, unbiased (n - 1)
    centered: torch.Tensor | None = None  # [n, d] float64, (X - mu) / sqrt(n - 1); kept when n <= d
    name: str = ""
    _factor: torch.Tensor | None = field(default=None, repr=False)
    _key: bytes | None = field(default=None, repr=False)

    @classmethod
    def from_features(cls, features, name: str = "", keep_samples: bool | None = None) -> FeatureStats:
        """Statistics of ``features`` ``[n, d]``.

        ``keep_samples``: keep the centred samples (they are the factor, see the module doc); by
        default only when ``n <= d``, where they are the smaller factor.
        """
        x = validate_features(features, name or "features")
        n, d = x.shape
        mu = x.mean(dim=0)
        a = (x - mu) / np.sqrt(n - 1)
        sigma = a.T @ a
        if keep_samples is None:
            keep_samples = n <= d
        return cls(n=n, mu=mu, sigma=(sigma + sigma.T) * 0.5, centered=a if keep_samples else None, name=name)

    @property
    def dim(self) -> int:
        return int(self.mu.shape[0])

    def factor(self) -> torch.Tensor:
        """F (d x r) with S = F F^T, computed once and cached."""
        if self._factor is None:
            if self.centered is not None and self.n <= self.dim:
                self._factor = self.centered.T
            else:
                self._factor = _factor(self.sigma)
        return self._factor

    def trace(self) -> float:
        return float(torch.diagonal(self.sigma).sum())

    def key(self) -> bytes:
        """A content key used to put pairs in a canonical order."""
        if self._key is None:
            h = hashlib.sha1(self.mu.numpy().tobytes())
            h.update(str(self.n).encode())
            self._key = h.digest()
        return self._key

    # ----------------------------------------------------------------- persistence
    def save(self, path: str | os.PathLike) -> Path:
        """Write the statistics atomically to ``path`` (``.npz``)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        arrays = {
            "format": np.array(STATS_FORMAT),
            "n": np.array(self.n),
            "mu": self.mu.numpy(),
            "sigma": self.sigma.numpy(),
        }
        if self.centered is not None:
            arrays["centered"] = self.centered.numpy()
        with atomic_file(path) as tmp, open(tmp, "wb") as f:
            np.savez(f, **arrays)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike, name: str = "") -> FeatureStats:
        """Read statistics written by :meth:`save`; raise :class:`FIDInputError` if unusable."""
        path = Path(path)
        try:
            with np.load(path, allow_pickle=False) as z:
                fmt = int(z["format"])
                n = int(z["n"])
                mu = torch.from_numpy(np.array(z["mu"], dtype=np.float64))
                sigma = torch.from_numpy(np.array(z["sigma"], dtype=np.float64))
                centered = torch.from_numpy(np.array(z["centered"], dtype=np.float64)) if "centered" in z else None
        except Exception as exc:  # zip errors, missing keys, truncated files
            raise FIDInputError(f"{path}: not a readable statistics file ({type(exc).__name__}: {exc})") from exc
        d = mu.shape[0] if mu.dim() == 1 else -1
        if fmt != STATS_FORMAT or d < 1 or sigma.shape != (d, d) or n < 2:
            raise FIDInputError(f"{path}: statistics file has an unexpected format or shape")
        if not (bool(torch.isfinite(mu).all()) and bool(torch.isfinite(sigma).all())):
            raise FIDInputError(f"{path}: statistics contain NaN/inf")
        if centered is not None and centered.shape != (n, d):
            raise FIDInputError(f"{path}: stored samples have shape {tuple(centered.shape)}, expected {(n, d)}")
        return cls(n=n, mu=mu, sigma=sigma, centered=centered, name=name or path.stem)


def _as_stats(x, name: str) -> FeatureStats:
    return x if isinstance(x, FeatureStats) else FeatureStats.from_features(x, name=name)


def _cross_term(a: FeatureStats, b: FeatureStats) -> float:
    """tr sqrt(S_a S_b) = nuclear norm of F_a^T F_b, on the smaller side."""
    if a.key() > b.key():  # canonical order: the result does not depend on argument order
        a, b = b, a
    k = a.factor().T @ b.factor()  # [r_a, r_b]
    return _sum_sqrt_eigvalsh(k @ k.T if k.shape[0] <= k.shape[1] else k.T @ k)


def _check_dims(sets: Sequence[FeatureStats]) -> int:
    dims = {s.dim for s in sets}
    if len(dims) > 1:
        listing = ", ".join(f"{s.name or i!s}: {s.dim}" for i, s in enumerate(sets))
        raise FIDInputError(f"feature sets of different dimension cannot be compared ({listing})")
    return dims.pop()


def _finish(mean_term: float, tr_a: float, tr_b: float, cross: float) -> float:
    value = mean_term + (tr_a + tr_b) - 2.0 * cross  # (tr_a + tr_b) keeps the result symmetric
    # Round-off on (near-)identical sets can give a tiny negative number: report it as 0.
    if value < 0 and -value <= 1e-9 * max(tr_a + tr_b, 1e-300) + 1e-12:
        return 0.0
    return value


def frechet_distance(a, b) -> float:
    """FID between two feature sets (``[n, d]`` arrays or :class:`FeatureStats`)."""
    sa, sb = _as_stats(a, "first set"), _as_stats(b, "second set")
    _check_dims([sa, sb])
    mean_term = float(((sa.mu - sb.mu) ** 2).sum())
    return _finish(mean_term, sa.trace(), sb.trace(), _cross_term(sa, sb))


def fid_matrix(rows: Sequence, cols: Sequence | None = None, progress=None) -> np.ndarray:
    """``M[i, j] = FID(rows[i], cols[j])`` for every pair (``cols`` defaults to ``rows``).

    Each statistic (mean, covariance, its square root) is computed once per set; with
    ``cols=None`` only the upper triangle is computed and mirrored (FID is symmetric).
    ``progress``: optional callable ``progress(done, total)``.
    """
    rs = [_as_stats(x, f"row set {i}") for i, x in enumerate(rows)]
    same = cols is None
    cs = rs if same else [_as_stats(x, f"column set {j}") for j, x in enumerate(cols)]
    if not rs or not cs:
        raise FIDInputError("fid_matrix needs at least one feature set on each side")
    _check_dims(rs + ([] if same else cs))
    mu_r = torch.stack([s.mu for s in rs])
    mu_c = torch.stack([s.mu for s in cs])
    mean_terms = ((mu_r[:, None, :] - mu_c[None, :, :]) ** 2).sum(-1)
    tr_r = [s.trace() for s in rs]
    tr_c = [s.trace() for s in cs]
    out = np.zeros((len(rs), len(cs)), dtype=np.float64)
    pairs = [(i, j) for i in range(len(rs)) for j in range(len(cs)) if not same or j >= i]
    for k, (i, j) in enumerate(pairs):
        out[i, j] = _finish(float(mean_terms[i, j]), tr_r[i], tr_c[j], _cross_term(rs[i], cs[j]))
        if same:
            out[j, i] = out[i, j]
        if progress is not None:
            progress(k + 1, len(pairs))
    return out


def fid_trace(matrix: np.ndarray) -> float:
    """FIDt := trace of the FID matrix (the paper's Eq. 15)."""
    m = np.asarray(matrix, dtype=np.float64)
    if m.ndim != 2 or m.shape[0] != m.shape[1]:
        raise FIDInputError(f"FIDt needs a square FID matrix, got shape {m.shape}")
    return float(np.trace(m))
