"""Targets: exact moments against Monte Carlo, orthonormality of the Hermite basis, seeding."""

from __future__ import annotations

import math

import pytest
import torch

from randfeat_torch.targets import HermitePolynomial, ReluNeuron, hermite_orthonormal

CPU = torch.device("cpu")
N_MC = 400_000


def monte_carlo(target, n: int = N_MC, seed: int = 123) -> tuple[float, float, float]:
    """Sample mean, sample variance, and the standard error of the mean."""
    gen = torch.Generator().manual_seed(seed)
    y = target(torch.randn(n, target.d, generator=gen)).double()
    return float(y.mean()), float(y.var()), float(y.std() / math.sqrt(n))


@pytest.mark.parametrize(
    ("degree", "terms", "include_lower", "d"),
    [(1, 4, False, 6), (2, 16, False, 10), (3, 12, True, 5), (4, 6, False, 3), (2, 3, False, 2)],
)
def test_polynomial_mean_and_variance_match_monte_carlo(degree, terms, include_lower, d):
    target = HermitePolynomial(d, degree, terms, include_lower, seed=1, device=CPU)
    assert (target.mean, target.variance) == (0.0, pytest.approx(1.0))
    mean, var, se = monte_carlo(target)
    assert abs(mean - target.mean) < 5 * se
    # Var of the sample variance grows with the kurtosis of high-degree Hermite products.
    assert var == pytest.approx(target.variance, rel=0.04 * degree)


def test_polynomial_has_requested_degree_and_distinct_terms():
    target = HermitePolynomial(20, 3, 30, include_lower=True, seed=4, device=CPU)
    degrees = [len(m) for m in target.monomials]
    assert max(degrees) == 3 and min(degrees) >= 1
    assert len(set(target.monomials)) == 30
    exact = HermitePolynomial(20, 3, 30, include_lower=False, seed=4, device=CPU)
    assert {len(m) for m in exact.monomials} == {3}


def test_hermite_basis_is_orthonormal_under_the_gaussian():
    x = torch.randn(1_000_000, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    h = hermite_orthonormal(x, 4)
    gram = (h @ h.T) / x.numel()
    assert torch.allclose(gram, torch.eye(5, dtype=torch.float64), atol=0.03)


@pytest.mark.parametrize(("norm", "bias"), [(1.0, 0.0), (2.0, 0.5), (3.0, -2.0)])
def test_relu_neuron_moments_match_monte_carlo(norm, bias):
    target = ReluNeuron(7, norm, bias, seed=3, device=CPU)
    assert float(target.w.norm()) == pytest.approx(norm, rel=1e-6)
    mean, var, se = monte_carlo(target)
    assert abs(mean - target.mean) < 5 * se
    assert var == pytest.approx(target.variance, rel=0.02)


def test_unit_relu_neuron_moments_are_the_textbook_ones():
    target = ReluNeuron(4, 1.0, 0.0, seed=0, device=CPU)
    assert target.mean == pytest.approx(1 / math.sqrt(2 * math.pi))
    assert target.variance == pytest.approx(0.5 - 1 / (2 * math.pi))


def test_target_seed_alone_decides_the_target():
    a, b = ReluNeuron(5, 1, 0, seed=0, device=CPU), ReluNeuron(5, 1, 0, seed=0, device=CPU)
    c = ReluNeuron(5, 1, 0, seed=1, device=CPU)
    assert torch.equal(a.w, b.w) and not torch.equal(a.w, c.w)
    p = HermitePolynomial(9, 2, 5, False, seed=0, device=CPU)
    q = HermitePolynomial(9, 2, 5, False, seed=0, device=CPU)
    assert p.monomials == q.monomials and torch.equal(p.coef, q.coef)
