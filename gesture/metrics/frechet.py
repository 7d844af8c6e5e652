"""Fréchet distances of feature sets (FGD), numpy float64."""

from __future__ import annotations

import numpy as np


def _sym(m: np.ndarray) -> np.ndarray:
    return (m + m.T) / 2


def _psd_sqrt(m: np.ndarray) -> np.ndarray:
    """Symmetric square root of a symmetric PSD matrix; tiny negative eigenvalues (round-off) count as 0."""
    w, v = np.linalg.eigh(_sym(m))
    return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """Fréchet distance of N(mu1, sigma1) and N(mu2, sigma2): ``mu [F], sigma [F, F] -> float >= 0``.

    ``|mu1 - mu2|^2 + tr(S1) + tr(S2) - 2 tr((S1^1/2 S2 S1^1/2)^1/2)`` in float64. The trace term comes from the
    eigenvalues of the symmetric PSD matrix ``S1^1/2 S2 S1^1/2`` (clamped at 0), not from ``scipy.linalg.sqrtm`` of
    the non-symmetric ``S1 S2``, which returned complex / negative results on near-singular covariances.
    """
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    s1, s2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    f = mu1.shape[-1] if mu1.ndim else 1
    if mu1.shape != mu2.shape or s1.shape != (f, f) or s2.shape != (f, f):
        raise ValueError(f"frechet_distance: mu {mu1.shape} / {mu2.shape}, sigma {s1.shape} / {s2.shape} "
                         f"do not describe two {f}-d Gaussians")
    sqrt_s1 = _psd_sqrt(s1)
    inner = _sym(sqrt_s1 @ _sym(s2) @ sqrt_s1)
    trace_sqrt = float(np.sqrt(np.clip(np.linalg.eigvalsh(inner), 0.0, None)).sum())
    diff = (mu1 - mu2).reshape(-1)
    value = float(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * trace_sqrt)
    return max(value, 0.0)


def feature_statistics(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``features [n, F] -> (mu [F], sigma [F, F])`` in float64 (unbiased covariance, n >= 2)."""
    x = np.asarray(features, np.float64)
    if x.ndim != 2 or x.shape[0] < 2:
        raise ValueError(f"feature_statistics: need features [n >= 2, F], got shape {x.shape}")
    return x.mean(axis=0), np.atleast_2d(np.cov(x, rowvar=False))


def frechet_distance_features(a: np.ndarray, b: np.ndarray) -> float:
    """Fréchet distance between the Gaussians fitted to ``a [n, F]`` and ``b [m, F]``."""
    return frechet_distance(*feature_statistics(a), *feature_statistics(b))
