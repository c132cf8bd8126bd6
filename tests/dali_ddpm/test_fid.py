"""FID-C's Fréchet distance against scipy's matrix square root, and its basic properties."""

import pytest
import torch

from dali_ddpm.evaluate import class_histogram
from dali_ddpm.fid import FeatureClassifier, fid_c, frechet_distance, gaussian_stats


def test_frechet_distance_matches_scipy_sqrtm():
    linalg = pytest.importorskip("scipy.linalg")
    g = torch.Generator().manual_seed(0)
    a = torch.randn(300, 8, generator=g, dtype=torch.float64) @ torch.randn(8, 8, generator=g, dtype=torch.float64)
    b = torch.randn(300, 8, generator=g, dtype=torch.float64) * 2 + 0.5
    (m1, s1), (m2, s2) = gaussian_stats(a), gaussian_stats(b)
    covmean = linalg.sqrtm(s1.numpy() @ s2.numpy()).real
    expected = float(((m1 - m2) ** 2).sum() + torch.trace(s1) + torch.trace(s2) - 2 * torch.trace(torch.from_numpy(covmean)))
    assert frechet_distance(m1, s1, m2, s2) == pytest.approx(expected, rel=1e-6)
    assert expected > 1


def test_fid_is_zero_for_identical_sets_and_grows_with_a_shift():
    x = torch.randn(200, 4, generator=torch.Generator().manual_seed(1))
    assert fid_c(x, x) == pytest.approx(0, abs=1e-6)
    assert fid_c(x, x + 1) == pytest.approx(4, rel=1e-6)  # ||mu shift||^2 = 4, same covariance


def test_classifier_shapes_and_histogram():
    model = FeatureClassifier()
    x = torch.randn(5, 1, 32, 32)
    assert model(x).shape == (5, 10) and model.features(x).shape == (5, 64)
    logits = torch.eye(10)[[0, 0, 3, 9]]
    assert class_histogram(logits) == [0.5, 0, 0, 0.25, 0, 0, 0, 0, 0, 0.25]
