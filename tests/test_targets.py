"""Targets: exact moments against Monte Carlo, orthonormality of the Hermite basis, seeding."""

from __future__ import annotations

import itertools
import math
from fractions import Fraction

import pytest
import torch

from randfeat_torch.targets import (
    HermitePolynomial,
    Parity,
    ReluNeuron,
    Zigzag,
    hermite_orthonormal,
    sample_inputs,
    zigzag,
)

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


@pytest.mark.parametrize(
    ("d", "degree", "terms", "include_lower"), [(2, 4, 5, False), (5, 3, 12, True)]
)
def test_polynomial_is_its_sum_of_hermite_products(d, degree, terms, include_lower):
    """f(x) = sum_t coef_t prod_i h_{power of i in t}(x_i), with repeated coordinates (the
    powers > 1) present."""
    target = HermitePolynomial(d, degree, terms, include_lower, seed=2, device=CPU)
    assert any(len(set(m)) < len(m) for m in target.monomials)
    x = torch.randn(200, d, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    h = [hermite_orthonormal(x[:, i], degree) for i in range(d)]  # each (degree + 1, n)
    expected = torch.zeros(200, dtype=torch.float64)
    for monomial, coef in zip(target.monomials, target.coef.double(), strict=True):
        term = torch.ones(200, dtype=torch.float64)
        for i in set(monomial):
            term *= h[i][monomial.count(i)]
        expected += coef * term
    assert torch.allclose(target(x.float()).double(), expected, rtol=1e-4, atol=1e-4)


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


def zigzag_by_relus(z: torch.Tensor, a: int) -> torch.Tensor:
    """psi_a as its definition: -1 + [z+a]_+ + sum_i 2 (-1)^i [z+a-2i]_+ - [z-a]_+."""
    out = -1 + torch.relu(z + a) - torch.relu(z - a)
    for i in range(1, a):
        out = out + 2 * (-1) ** i * torch.relu(z + a - 2 * i)
    return out


@pytest.mark.parametrize("a", [1, 3, 5, 9])
def test_zigzag_closed_form_equals_the_sum_of_relus(a):
    z = torch.linspace(-a - 5, a + 5, 20_001, dtype=torch.float64)
    assert torch.allclose(zigzag(z, a), zigzag_by_relus(z, a), atol=1e-9)


def test_zigzag_is_a_triangle_wave_of_period_4_with_flat_tails():
    a = 7
    z = torch.linspace(-a, a - 4, 5001, dtype=torch.float64)
    assert torch.allclose(zigzag(z, a), zigzag(z + 4, a), atol=1e-9)  # period 4 inside
    assert float(zigzag(z, a).min()) == -1 and float(zigzag(z, a).max()) == pytest.approx(1)
    tails = torch.tensor([-a - 100.0, -a - 0.5, a + 0.5, a + 1e6], dtype=torch.float64)
    assert zigzag(tails, a).tolist() == [-1.0, -1.0, 1.0, 1.0]


def test_zigzag_target_uses_a_direction_of_the_given_norm():
    target = Zigzag(6, norm=6.0, a=217, seed=0, device=CPU)
    assert float(target.w.norm()) == pytest.approx(6.0, rel=1e-6)
    x = torch.randn(100, 6)
    assert torch.equal(target(x), zigzag(x.double() @ target.w.double(), 217).float())


def exact_zigzag(z: Fraction, a: int) -> float:
    """psi_a(z) in rational arithmetic from its definition as a shifted wave, rounded once."""
    if abs(z) >= a:
        return 1.0 if z > 0 else -1.0
    u = (z + a) % 4
    return float((u if u <= 2 else 4 - u) - 1)


# The zigzag's scale at d: a = 6 d^2 + 1, z ~ N(0, d^2). 38,745,320 is the last d with a < 2^53
# (a exact in float64), 2^40 gives a = 6 * 2^80 + 1 (no float holds it).
@pytest.mark.parametrize("d", [1, 20, 1024, 4000, 38_745_320, 2**40])
def test_zigzag_is_correctly_rounded_at_every_scale(d):
    """Shifting z by a in float32 lost the wave (0.25 off at d = 1024, a constant from d ~ 2000).
    Tolerance: a correctly rounded float32 result is within half an ulp of the exact value,
    ulp(y) <= 2^-23 |y| for normal y, so |got - exact| <= 2^-24 |exact|."""
    a = 6 * d * d + 1
    z = torch.randn(2000, generator=torch.Generator().manual_seed(d % 2**31)) * d
    edge = float(torch.tensor(float(a), dtype=torch.float32))  # a rounded to float32
    z = torch.cat([z, torch.tensor([edge, -edge, edge * (1 + 2**-23), 2.0**-30, -(2.0**-30)])])
    exact = torch.tensor([exact_zigzag(Fraction(v), a) for v in z.tolist()], dtype=torch.float64)
    got = zigzag(z, a)
    assert got.dtype == torch.float32
    assert bool(((got.double() - exact).abs() <= 2.0**-24 * exact.abs()).all())


@pytest.mark.parametrize("d", [20, 1024, 4000])
def test_zigzag_target_is_psi_of_the_exact_inner_product(d):
    """y against psi_a at <w*, x> summed exactly (math.fsum of the float32 products, which are
    exact in float64). Tolerance: float64 summation of d terms errs by at most
    gamma_d sum_i |x_i w_i|, gamma_d = d u / (1 - d u), u = 2^-53, which moves psi (slope 1)
    as much; fsum's own rounding, 2^-53 |z|, as much again; then one float32 rounding,
    2^-24 |y|."""
    target = Zigzag(d, norm=float(d), a=6 * d * d + 1, seed=0, device=CPU)
    x = torch.randn(64, d, generator=torch.Generator().manual_seed(5))
    products = x.double() * target.w.double()
    z = [Fraction(math.fsum(row)) for row in products.tolist()]
    exact = torch.tensor([exact_zigzag(v, target.a) for v in z], dtype=torch.float64)
    u = 2.0**-53
    tolerance = (
        d * u / (1 - d * u) * products.abs().sum(1)
        + u * products.sum(1).abs()
        + 2.0**-24 * exact.abs()
    )
    assert bool(((target(x).double() - exact).abs() <= tolerance).all())
    assert float(tolerance.max()) < 2e-7  # the float32 rounding of |y| <= 1, and not much more


def test_parity_values_and_orthogonality_to_every_lower_order_parity():
    d, k = 6, 3
    target = Parity(d, k, seed=2, device=CPU)
    cube = torch.tensor(list(itertools.product([-1.0, 1.0], repeat=d)))  # all 2^d points
    y = target(cube)
    assert set(y.tolist()) == {-1.0, 1.0}
    assert torch.equal(y, cube[:, target.subset].prod(1))
    for size in range(d + 1):
        for subset in itertools.combinations(range(d), size):
            correlation = float((y * cube[:, list(subset)].prod(1)).mean())
            assert correlation == (1.0 if list(subset) == target.subset else 0.0)


@pytest.mark.parametrize("kind", ["gaussian", "sphere", "hypercube"])
def test_input_distributions(kind):
    x = sample_inputs(kind, 20_000, 9, torch.Generator().manual_seed(0), CPU)
    assert x.shape == (20_000, 9)
    assert float(x.square().sum(1).mean()) == pytest.approx(9, rel=0.02)  # E|x|^2 = d for all
    if kind == "sphere":
        assert torch.allclose(x.norm(dim=1), torch.full((20_000,), 3.0))
    if kind == "hypercube":
        assert set(x.unique().tolist()) == {-1.0, 1.0}
    assert float(x.mean().abs()) < 0.02
