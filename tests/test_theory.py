"""Theory: exact Hermite coefficients of a ReLU, quadrature, residuals, and the exact
random-features population error, each against closed forms, quadrature or Monte Carlo."""

from __future__ import annotations

import json
import math

import pytest
import torch

from randfeat_torch.targets import hermite_orthonormal
from randfeat_torch.theory import (
    hermite_coefficients_1d,
    moments_1d,
    relu_hermite_coefficients,
    relu_rf_population_error,
    residual_errors,
)

F64 = torch.float64
RELU_VARIANCE = 0.5 - 1 / (2 * math.pi)
CASES = [(1.0, 0.0), (2.0, 0.5), (1.0, -1.5), (3.0, 4.0)]


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def triangle(z: torch.Tensor) -> torch.Tensor:
    """Triangle wave of period 4 in s = 5 z, equal to s on [-1, 1]."""
    return (torch.remainder(5 * z - 1, 4) - 2).abs() - 1


def test_unit_relu_coefficients_are_the_textbook_ones():
    coef = relu_hermite_coefficients(1.0, 0.0, 10)
    expected = [1 / math.sqrt(2 * math.pi), 0.5]
    for k in range(2, 11):
        double_factorial = math.prod(range(k - 3, 0, -2))  # (k-3)!!, with (-1)!! = 1
        even = (-1) ** (k // 2 + 1) * double_factorial / math.sqrt(2 * math.pi * math.factorial(k))
        expected.append(even if k % 2 == 0 else 0.0)
    assert coef.dtype == F64 and coef.shape == (11,)
    assert torch.allclose(coef, torch.tensor(expected, dtype=F64), rtol=1e-14, atol=1e-16)


@pytest.mark.parametrize(("norm", "bias"), CASES)
def test_relu_coefficients_match_quadrature(norm, bias):
    exact = relu_hermite_coefficients(norm, bias, 12)
    quad = hermite_coefficients_1d(lambda z: torch.relu(norm * z + bias), 12)
    assert torch.allclose(exact, quad, rtol=0, atol=1e-6 * norm)
    assert float((exact - quad).abs().max()) < 1e-10 * max(norm, abs(bias))
    # Moments of relu(N(b, s^2)): E = s phi(b/s) + b Phi(b/s), E f^2 = (s^2 + b^2) Phi + b s phi.
    pdf = math.exp(-0.5 * (bias / norm) ** 2) / math.sqrt(2 * math.pi)
    cdf = 0.5 * math.erfc(-bias / (norm * math.sqrt(2)))
    mean, variance = moments_1d(lambda z: torch.relu(norm * z + bias))
    assert mean == pytest.approx(float(exact[0]), rel=1e-10)
    second = (norm**2 + bias**2) * cdf + bias * norm * pdf
    assert variance == pytest.approx(second - float(exact[0]) ** 2, rel=1e-9)


@pytest.mark.parametrize(("norm", "bias"), CASES[1:])
def test_relu_coefficients_match_monte_carlo(norm, bias):
    z = torch.randn(1_000_000, generator=gen(7), dtype=F64)
    products = torch.relu(norm * z + bias) * hermite_orthonormal(z, 4)  # (5, n)
    mc, se = products.mean(dim=1), products.std(dim=1) / math.sqrt(z.numel())
    exact = relu_hermite_coefficients(norm, bias, 4)
    assert ((mc - exact).abs() < 5 * se).all(), (mc, exact, se)


def test_relu_coefficients_give_mean_parseval_and_residuals():
    coef = relu_hermite_coefficients(1.0, 0.0, 60)
    assert float(coef[0]) == pytest.approx(1 / math.sqrt(2 * math.pi), rel=1e-14)
    assert float(coef.square().sum()) == pytest.approx(0.5, abs=1e-3)  # E relu(z)^2
    residuals = residual_errors(coef.square(), RELU_VARIANCE, 4)
    assert len(residuals) == 5 and residuals[0] == 1.0
    assert residuals[1] == pytest.approx(1 - 0.25 / RELU_VARIANCE, rel=1e-12)
    assert residuals[1] == pytest.approx(0.2665, abs=1e-4)
    assert residuals[2] == pytest.approx(0.0330, abs=1e-4)
    assert residuals[3] == residuals[2]  # odd degrees >= 3 carry no energy
    assert residuals[3] > residuals[4] > 0


def test_residual_errors_clamp_and_refuse_unknown_degrees():
    energy = torch.tensor([0.3, 0.6, 0.4 + 1e-12])  # explains slightly more than the variance
    assert residual_errors(energy, 1.0, 2) == pytest.approx([1.0, 0.4, 0.0])
    assert residual_errors(energy, 1.0, 2)[2] == 0.0
    with pytest.raises(ValueError):
        residual_errors(energy, 1.0, 3)


def test_quadrature_recovers_a_hermite_polynomial():
    coef = hermite_coefficients_1d(lambda z: hermite_orthonormal(z, 3)[3], 8)
    assert torch.allclose(coef, torch.eye(9, dtype=F64)[3], atol=1e-12)
    mean, variance = moments_1d(lambda z: hermite_orthonormal(z, 3)[3])
    assert mean == pytest.approx(0.0, abs=1e-12)
    assert variance == pytest.approx(1.0, rel=1e-12)


def test_quadrature_of_a_triangle_wave_matches_its_series():
    # tri(s) = (8/pi^2) sum_{n odd} (-1)^((n-1)/2) sin(n pi s / 2) / n^2 with s = 5 z, and
    # sin(w z) = e^{-w^2/2} sum_{k odd} (-1)^((k-1)/2) w^k h_k(z) / sqrt(k!). Up to degree 150
    # only the fundamental n = 1 counts (n = 3 contributes < e^{-100}).
    degree, omega = 150, 5 * math.pi / 2
    coef = hermite_coefficients_1d(triangle, degree)
    k = torch.arange(degree + 1, dtype=F64)
    magnitude = torch.exp(-(omega**2) / 2 + k * math.log(omega) - 0.5 * torch.lgamma(k + 1))
    sign = torch.where(k % 2 == 1, (-1.0) ** ((k - 1) / 2), 0.0)
    assert torch.allclose(coef, 8 / math.pi**2 * sign * magnitude, rtol=0, atol=1e-8)
    mean, variance = moments_1d(triangle)
    assert mean == pytest.approx(0.0, abs=1e-9)
    assert variance == pytest.approx(1 / 3, rel=1e-6)
    # Parseval: the fundamental carries a fraction 96/pi^4 of the variance, the rest lies in
    # degrees beyond 150 (harmonic n = 3 peaks near degree (3 omega)^2 = 555).
    captured = float(coef[1:].square().sum()) / variance
    assert 0.97 < captured < 1.0
    assert captured == pytest.approx(96 / math.pi**4, rel=1e-6)


def test_rf_error_is_zero_when_the_target_is_a_feature():
    w = torch.randn(1, 50, 10, generator=gen(0), dtype=F64)
    w_star = torch.randn(10, generator=gen(1), dtype=F64)
    w[0, 0] = w_star / w_star.norm() * 2
    assert float(relu_rf_population_error(w, w_star)[0]) < 1e-8


def test_rf_error_decreases_with_nested_features():
    big = torch.randn(1, 500, 10, generator=gen(2), dtype=F64)
    w_star = torch.randn(10, generator=gen(3), dtype=F64)
    errors = [float(relu_rf_population_error(big[:, :width], w_star)[0]) for width in (5, 50, 500)]
    assert 0 < errors[2] <= errors[1] <= errors[0] < 1, errors
    assert errors[0] > 0.5 and errors[2] < 0.05, errors


def test_rf_error_at_known_angles():
    # One feature u at angle t to w*: error = 1 - (Cov / Var f)^2 with
    # Cov = (sin t + (pi - t) cos t) / (2 pi) - 1 / (2 pi), Var f = 1/2 - 1/(2 pi).
    w_star = torch.tensor([0.0, 2.0, 0.0], dtype=F64)
    sixty = torch.tensor([[[0.0, 0.5, math.sqrt(3) / 2]]], dtype=F64)
    cov = (math.sqrt(3) / 2 + math.pi / 3) / (2 * math.pi) - 1 / (2 * math.pi)
    expected = 1 - (cov / RELU_VARIANCE) ** 2
    assert float(relu_rf_population_error(sixty, w_star)[0]) == pytest.approx(expected, rel=1e-12)
    # relu(-s) has covariance -1/(2 pi) with relu(s).
    opposite = -torch.ones(1, 1, 1, dtype=F64)
    expected = 1 - (1 / (2 * math.pi * RELU_VARIANCE)) ** 2
    error = relu_rf_population_error(opposite, torch.ones(1, dtype=F64))
    assert float(error[0]) == pytest.approx(expected, rel=1e-12)
    # Features orthogonal to w* are independent of the target: nothing is explained.
    orthogonal = torch.randn(1, 20, 3, generator=gen(11), dtype=F64)
    orthogonal[..., 1] = 0
    assert float(relu_rf_population_error(orthogonal, w_star)[0]) == pytest.approx(1.0, abs=1e-12)


def test_rf_error_survives_a_rank_two_gram():
    # In d = 1 every feature is a multiple of relu(x) or relu(-x): a 100 x 100 Gram of rank 2.
    scales = torch.rand(1, 100, 1, generator=gen(12), dtype=F64) + 0.1
    negative = relu_rf_population_error(-scales, torch.ones(1, dtype=F64))
    expected = 1 - (1 / (2 * math.pi * RELU_VARIANCE)) ** 2
    assert float(negative[0]) == pytest.approx(expected, rel=1e-9)
    both = torch.cat([-scales, scales[:, :1]], dim=1)
    assert float(relu_rf_population_error(both, torch.ones(1, dtype=F64))[0]) < 1e-9


def test_rf_error_is_unchanged_by_a_duplicate_feature():
    # A rescaled copy of a row makes Cov(phi) singular (the eigenvalue fallback).
    w = torch.randn(1, 40, 8, generator=gen(4), dtype=F64)
    w_star = torch.randn(8, generator=gen(5), dtype=F64)
    error = relu_rf_population_error(w, w_star)
    duplicated = torch.cat([w, 3 * w[:, :1]], dim=1)
    assert 0 < float(error[0]) < 1
    assert torch.allclose(relu_rf_population_error(duplicated, w_star), error, rtol=0, atol=1e-10)
    # A copy moved by 1e-7 leaves Cholesky a pivot ~1e-14: too small to trust. In the limit
    # the copy adds the derivative feature, which explains ~1e-5 here; an unguarded solve
    # "explains" 3e-4.
    nudge = 1e-7 * torch.randn(1, 1, 8, generator=gen(13), dtype=F64)
    nearly = float(relu_rf_population_error(torch.cat([w, w[:, :1] + nudge], dim=1), w_star)[0])
    assert float(error[0]) - 2e-5 <= nearly <= float(error[0]) + 1e-8


def test_rf_error_matches_monte_carlo_least_squares():
    d, width, n = 6, 20, 400_000
    w = torch.randn(1, width, d, generator=gen(6), dtype=F64)
    w_star = torch.randn(d, generator=gen(7), dtype=F64)
    exact = float(relu_rf_population_error(w, w_star)[0])

    def features(x: torch.Tensor) -> torch.Tensor:
        return torch.cat([torch.relu(x @ w[0].T), torch.ones(len(x), 1, dtype=F64)], dim=1)

    data = gen(8)
    x_train, x_test = (torch.randn(n, d, generator=data, dtype=F64) for _ in range(2))
    a = features(x_train)
    coef = torch.linalg.solve(a.T @ a, a.T @ torch.relu(x_train @ w_star))
    mse = float((features(x_test) @ coef - torch.relu(x_test @ w_star)).square().mean())
    variance = float(w_star.square().sum()) * RELU_VARIANCE
    assert 0.05 < exact < 0.95
    assert mse / variance == pytest.approx(exact, abs=0.003)  # 5 standard errors of the MC mean


def test_rf_error_handles_replicas_and_float32_input():
    w = torch.randn(2, 30, 8, generator=gen(9))
    w_star = torch.randn(8, generator=gen(10))
    errors = relu_rf_population_error(w, w_star)
    assert errors.shape == (2,) and errors.dtype == F64
    assert float(errors[0]) != pytest.approx(float(errors[1]), abs=1e-3)
    for r in range(2):
        alone = relu_rf_population_error(w[r : r + 1], w_star)
        assert float(alone[0]) == pytest.approx(float(errors[r]), abs=1e-12)
    with pytest.raises(ValueError):
        relu_rf_population_error(w, torch.randn(7))


def test_reference_errors_go_into_the_record_and_tensorboard(run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    result = run("model=frozen", "model.bias=false")
    theory = result.theory
    assert theory["best_constant"] == 1.0
    assert theory["best_degree_1"] == pytest.approx(1 - 0.25 / (0.5 - 1 / (2 * math.pi)))
    assert theory["best_degree_2"] < theory["best_degree_1"]
    assert theory["best_degree_3"] == pytest.approx(theory["best_degree_2"])  # odd k >= 3 vanish
    assert 0 < theory["rf_population_error"] < 1
    record = json.loads((result.run_dir / "metrics.json").read_text())
    assert record["theory"] == pytest.approx(theory)
    events = EventAccumulator(str(result.run_dir))
    events.Reload()
    steps = [e.step for e in events.Scalars("theory/rf_population_error")]
    assert steps == [0, result.steps_done]


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["input=sphere"], set()),  # Gaussian closed forms: omitted, not wrong
        (["model=trainable"], {"best_constant", "best_degree_1", "best_degree_4"}),
        (["target=parity", "target.k=3"], {"best_degree_2", "best_degree_3"}),
        (["target=parity", "input=sphere"], set()),
        (["target=zigzag"], {"best_degree_1", "best_degree_4"}),
        (["target=polynomial", "target.degree=5"], {"best_degree_5"}),
    ],
)
def test_reference_errors_appear_only_where_they_apply(run, overrides, expected):
    theory = run(*overrides).theory
    assert expected <= set(theory)
    assert not expected or "rf_population_error" not in theory
    if not expected:
        assert theory == {}


def test_parity_reference_errors_are_a_step(run):
    theory = run("target=parity", "target.k=3").theory
    assert [theory[f"best_degree_{k}"] for k in range(1, 5)] == [1.0, 1.0, 0.0, 0.0]


def test_polynomial_reference_errors_split_its_energy_by_degree(run):
    theory = run("target=polynomial", "target.degree=3", "target.include_lower=true").theory
    assert theory["best_degree_3"] == pytest.approx(0, abs=1e-12)
    assert 1 >= theory["best_degree_1"] >= theory["best_degree_2"] >= 0
