"""Theory: exact Hermite coefficients of a ReLU, quadrature, residuals, and the exact
random-features population error, each against closed forms, quadrature or Monte Carlo."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch.special import ndtr

from randfeat_torch import theory
from randfeat_torch.targets import (
    ReluNeuron,
    Zigzag,
    build_target,
    hermite_orthonormal,
    zigzag,
)
from randfeat_torch.theory import (
    bivariate_normal_cdf,
    hermite_coefficients_1d,
    moments_1d,
    normal_pdf,
    relu_hermite_coefficients,
    relu_mean,
    relu_neuron_sum,
    relu_population_moments,
    relu_product_mean,
    relu_rf_population_error,
    relu_square_mean,
    relu_sum,
    residual_errors,
)

F64 = torch.float64
RELU_VARIANCE = 0.5 - 1 / (2 * math.pi)
CASES = [(1.0, 0.0), (2.0, 0.5), (1.0, -1.5), (3.0, 4.0)]


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def rf_error(w: torch.Tensor, w_star: torch.Tensor) -> torch.Tensor:
    """The exact RF error of bias-free features w for the bias-free neuron relu(<w*, x>)."""
    return relu_rf_population_error(w, None, relu_neuron_sum(w_star))


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
    # c_4 = -1 / sqrt(2 pi 4!): degree 4 explains c_4^2 = 1 / (48 pi) more (float64 sums of
    # five terms, then a cancellation by 1 / 0.0136: good to 1e-13 relative).
    fourth = 1 / (48 * math.pi) / RELU_VARIANCE
    assert residuals[4] == pytest.approx(residuals[2] - fourth, rel=1e-12)


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
    assert float(rf_error(w, w_star)[0]) < 1e-8


def test_rf_error_decreases_with_nested_features():
    big = torch.randn(1, 500, 10, generator=gen(2), dtype=F64)
    w_star = torch.randn(10, generator=gen(3), dtype=F64)
    errors = [float(rf_error(big[:, :width], w_star)[0]) for width in (5, 50, 500)]
    assert 0 < errors[2] <= errors[1] <= errors[0] < 1, errors
    assert errors[0] > 0.5 and errors[2] < 0.05, errors


def test_rf_error_at_known_angles():
    # One feature u at angle t to w*: error = 1 - (Cov / Var f)^2 with
    # Cov = (sin t + (pi - t) cos t) / (2 pi) - 1 / (2 pi), Var f = 1/2 - 1/(2 pi).
    w_star = torch.tensor([0.0, 2.0, 0.0], dtype=F64)
    sixty = torch.tensor([[[0.0, 0.5, math.sqrt(3) / 2]]], dtype=F64)
    cov = (math.sqrt(3) / 2 + math.pi / 3) / (2 * math.pi) - 1 / (2 * math.pi)
    expected = 1 - (cov / RELU_VARIANCE) ** 2
    assert float(rf_error(sixty, w_star)[0]) == pytest.approx(expected, rel=1e-12)
    # relu(-s) has covariance -1/(2 pi) with relu(s).
    opposite = -torch.ones(1, 1, 1, dtype=F64)
    expected = 1 - (1 / (2 * math.pi * RELU_VARIANCE)) ** 2
    error = rf_error(opposite, torch.ones(1, dtype=F64))
    assert float(error[0]) == pytest.approx(expected, rel=1e-12)
    # Features orthogonal to w* are independent of the target: nothing is explained.
    orthogonal = torch.randn(1, 20, 3, generator=gen(11), dtype=F64)
    orthogonal[..., 1] = 0
    assert float(rf_error(orthogonal, w_star)[0]) == pytest.approx(1.0, abs=1e-12)


def test_rf_error_survives_a_rank_two_gram():
    # In d = 1 every feature is a multiple of relu(x) or relu(-x): a 100 x 100 Gram of rank 2.
    scales = torch.rand(1, 100, 1, generator=gen(12), dtype=F64) + 0.1
    negative = rf_error(-scales, torch.ones(1, dtype=F64))
    expected = 1 - (1 / (2 * math.pi * RELU_VARIANCE)) ** 2
    assert float(negative[0]) == pytest.approx(expected, rel=1e-9)
    both = torch.cat([-scales, scales[:, :1]], dim=1)
    assert float(rf_error(both, torch.ones(1, dtype=F64))[0]) < 1e-9


def test_rf_error_is_unchanged_by_a_duplicate_feature():
    # A rescaled copy of a row makes Cov(phi) singular (the eigenvalue fallback).
    w = torch.randn(1, 40, 8, generator=gen(4), dtype=F64)
    w_star = torch.randn(8, generator=gen(5), dtype=F64)
    error = rf_error(w, w_star)
    duplicated = torch.cat([w, 3 * w[:, :1]], dim=1)
    assert 0 < float(error[0]) < 1
    assert torch.allclose(rf_error(duplicated, w_star), error, rtol=0, atol=1e-10)
    # A copy moved by 1e-7 leaves Cholesky a pivot ~1e-14: too small to trust. In the limit
    # the copy adds the derivative feature, which explains ~1e-5 here; an unguarded solve
    # "explains" 3e-4.
    nudge = 1e-7 * torch.randn(1, 1, 8, generator=gen(13), dtype=F64)
    nearly = float(rf_error(torch.cat([w, w[:, :1] + nudge], dim=1), w_star)[0])
    assert float(error[0]) - 2e-5 <= nearly <= float(error[0]) + 1e-8


def test_rf_error_matches_monte_carlo_least_squares():
    d, width, n = 6, 20, 400_000
    w = torch.randn(1, width, d, generator=gen(6), dtype=F64)
    w_star = torch.randn(d, generator=gen(7), dtype=F64)
    exact = float(rf_error(w, w_star)[0])

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
    errors = rf_error(w, w_star)
    assert errors.shape == (2,) and errors.dtype == F64
    assert float(errors[0]) != pytest.approx(float(errors[1]), abs=1e-3)
    # A batched and a single float64 solve of the P = 30 system agree to P cond(Cov) eps64
    # (cond about 400 here: 3e-12) on an error of order 1.
    cov = relu_population_moments(w.double(), None, relu_neuron_sum(w_star)).cov
    tol = 30 * float(torch.linalg.cond(cov).max()) * torch.finfo(F64).eps
    for r in range(2):
        alone = rf_error(w[r : r + 1], w_star)
        assert float(alone[0]) == pytest.approx(float(errors[r]), abs=tol)
    with pytest.raises(ValueError):
        rf_error(w, torch.randn(7))


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
        (["model=frozen", "model.activation=tanh"], {"best_degree_1"}),  # RF: ReLU only
        (["target=parity", "target.k=3"], {"best_degree_2", "best_degree_3"}),
        (["target=parity", "input=sphere"], set()),
        (["target=zigzag"], {"best_degree_1", "best_degree_4"}),
        (["target=polynomial", "target.degree=5", "n_test=2000"], {"best_degree_5"}),
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


def test_polynomial_reference_errors_split_its_energy_by_degree(run, make_cfg):
    overrides = ["target=polynomial", "target.degree=3", "target.include_lower=true"]
    theory = run(*overrides).theory
    target = build_target(make_cfg(*overrides).target, torch.device("cpu"))
    # Each term is orthonormal: the best degree-l error is the share of the squared
    # coefficients of the terms of degree > l.
    squares = target.coef.double().square()
    degrees = torch.tensor([len(m) for m in target.monomials])
    assert {1, 2, 3} <= set(degrees.tolist())  # every degree present: each entry is tested
    for degree in range(4):
        left = float(squares[degrees > degree].sum() / squares.sum())
        assert theory[f"best_degree_{degree}" if degree else "best_constant"] == pytest.approx(
            left, abs=1e-6
        )


def simpson(values: torch.Tensor, step: float) -> float:
    return (
        step
        / 3
        * float(values[0] + values[-1] + 4 * values[1:-1:2].sum() + 2 * values[2:-1:2].sum())
    )


def bivariate_by_quadrature(h: float, k: float, rho: float) -> float:
    """P(X <= h, Y <= k) = int phi(x) Phi((k - rho x) / s) dx by Simpson's rule, over the
    side of h with less mass (the other side's rounding would swamp 1e-12)."""
    s = math.sqrt((1 - rho) * (1 + rho))
    lo, hi = (-12.0, h) if h < 0 else (h, 12.0)
    x = torch.linspace(lo, hi, 400_001, dtype=F64)  # steps of <= 3e-5, << s = 0.0045 at worst
    part = simpson(normal_pdf(x) * ndtr((k - rho * x) / s), (hi - lo) / 400_000)
    return part if h < 0 else float(ndtr(torch.tensor(k, dtype=F64))) - part


def test_bivariate_cdf_is_exact_where_closed_forms_exist():
    rho = torch.linspace(-1, 1, 2001, dtype=F64)
    zero = torch.zeros_like(rho)
    origin = 0.25 + torch.asin(rho) / (2 * math.pi)
    assert (bivariate_normal_cdf(zero, zero, rho) - origin).abs().max() < 1e-15
    h, k = 4 * torch.randn(2, 200, generator=gen(20), dtype=F64)
    cdf_h, cdf_k = ndtr(h), ndtr(k)
    one = torch.ones_like(h)
    assert torch.allclose(bivariate_normal_cdf(h, k, 0 * one), cdf_h * cdf_k, rtol=0, atol=1e-15)
    assert torch.allclose(bivariate_normal_cdf(h, k, one), ndtr(torch.minimum(h, k)), atol=0)
    opposite = (cdf_h - ndtr(-k)).clamp_min(0)  # P(-k <= X <= h)
    assert torch.allclose(bivariate_normal_cdf(h, k, -one), opposite, rtol=0, atol=1e-15)
    rho = torch.rand(200, generator=gen(21), dtype=F64) * 2 - 1
    swapped = bivariate_normal_cdf(k, h, rho)
    assert torch.allclose(bivariate_normal_cdf(h, k, rho), swapped, rtol=0, atol=1e-15)


@pytest.mark.parametrize("rho", [0.1, -0.5, 0.74, -0.9, 0.93, -0.97, 0.999, -0.99999])
def test_bivariate_cdf_matches_quadrature_in_every_band(rho):
    for h in (-5.0, -1.3, 0.0, 0.4, 2.7):
        for k in (-3.1, 0.0, 1.2, 4.5):
            value = float(bivariate_normal_cdf(*(torch.tensor(v, dtype=F64) for v in (h, k, rho))))
            assert value == pytest.approx(bivariate_by_quadrature(h, k, rho), abs=1e-12), (h, k)


def test_relu_product_mean_is_the_arc_cosine_kernel_without_biases():
    rho = torch.linspace(-1, 1, 401, dtype=F64)
    theta = torch.acos(rho)
    kernel = 2.0 * 3.0 * (torch.sin(theta) + (math.pi - theta) * rho) / (2 * math.pi)
    two, three, zero = (torch.tensor(v, dtype=F64) for v in (2.0, 3.0, 0.0))
    assert (relu_product_mean(two, zero, three, zero, rho) - kernel).abs().max() < 1e-14


@pytest.mark.parametrize(("norm", "bias"), CASES)
def test_relu_product_mean_limits(norm, bias):
    norm, bias = torch.tensor(norm, dtype=F64), torch.tensor(bias, dtype=F64)
    other = (torch.tensor(0.7, dtype=F64), torch.tensor(-0.3, dtype=F64))
    independent = relu_product_mean(norm, bias, *other, torch.tensor(0.0, dtype=F64))
    assert float(independent) == pytest.approx(float(relu_mean(norm, bias) * relu_mean(*other)))
    same = relu_product_mean(norm, bias, norm, bias, torch.tensor(1.0, dtype=F64))
    assert float(same) == pytest.approx(float(relu_square_mean(norm, bias)), rel=1e-14)


def test_relu_product_mean_matches_quadrature():
    # E[relu(s1 X + b1) E[relu(s2 Y + b2) | X]], the inner mean in closed form, Y | X normal.
    cases = torch.rand(40, 5, generator=gen(22), dtype=F64)
    for s1, b1, s2, b2, r in cases.tolist():
        s1, s2, b1, b2, r = 0.2 + 3 * s1, 0.2 + 3 * s2, 8 * b1 - 4, 8 * b2 - 4, 2 * r - 1
        lo = max(-b1 / s1, -12.0)
        x = torch.linspace(lo, 12.0, 20_001, dtype=F64)
        spread = torch.full_like(x, s2 * math.sqrt((1 - r) * (1 + r)))
        integrand = normal_pdf(x) * torch.relu(s1 * x + b1) * relu_mean(spread, b2 + s2 * r * x)
        expected = simpson(integrand, (12.0 - lo) / 20_000)
        value = float(relu_product_mean(*(torch.tensor(v, dtype=F64) for v in (s1, b1, s2, b2, r))))
        assert value == pytest.approx(expected, abs=1e-10 * s1 * s2)


def test_population_moments_with_biases_match_monte_carlo():
    d, width, n = 5, 12, 400_000
    w = torch.randn(2, width, d, generator=gen(23), dtype=F64)
    b = torch.randn(2, width, generator=gen(24), dtype=F64)
    w_star = torch.randn(d, generator=gen(25), dtype=F64)
    target = relu_neuron_sum(w_star, bias=-0.8)
    moments = relu_population_moments(w, b, target)
    x = torch.randn(n, d, generator=gen(26), dtype=F64)
    phi = torch.relu(x @ w.transpose(1, 2) + b.unsqueeze(1))  # (2, n, width)
    y = torch.relu(x @ w_star - 0.8)
    assert float(y.mean()) == pytest.approx(target.mean, abs=4 * float(y.std()) / n**0.5)
    assert float(y.var()) == pytest.approx(target.variance, rel=0.01)

    def within(estimates: torch.Tensor, exact: torch.Tensor) -> None:
        mean = estimates.mean(1)
        error = (estimates.std(1) / n**0.5).clamp_min(1e-12)
        assert float(((mean - exact) / error).abs().max()) < 5.5

    centred = phi - phi.mean(1, keepdim=True)
    within(phi, moments.mean)
    within(centred.unsqueeze(-1) * centred.unsqueeze(-2), moments.cov)
    within(centred * (y - y.mean()).unsqueeze(-1), moments.cross)
    assert torch.equal(moments.cov, moments.cov.transpose(1, 2))


def test_rf_error_with_biases_matches_monte_carlo_least_squares():
    d, width, n = 6, 20, 400_000
    w = torch.randn(1, width, d, generator=gen(27), dtype=F64)
    b = torch.randn(1, width, generator=gen(28), dtype=F64)
    w_star = 2 * torch.randn(d, generator=gen(29), dtype=F64)
    target = relu_neuron_sum(w_star, bias=1.5)
    exact = float(relu_rf_population_error(w, b, target)[0])

    def features(x: torch.Tensor) -> torch.Tensor:
        return torch.cat([torch.relu(x @ w[0].T + b[0]), torch.ones(len(x), 1, dtype=F64)], 1)

    data = gen(30)
    x_train, x_test = (torch.randn(n, d, generator=data, dtype=F64) for _ in range(2))
    a = features(x_train)
    coef = torch.linalg.solve(a.T @ a, a.T @ torch.relu(x_train @ w_star + 1.5))
    mse = float((features(x_test) @ coef - torch.relu(x_test @ w_star + 1.5)).square().mean())
    assert 0.05 < exact < 0.95
    assert mse / target.variance == pytest.approx(exact, rel=0.03)


def test_zigzag_moments_and_rf_error_match_monte_carlo_least_squares():
    """A zigzag slow enough for 20 features to follow it in part: its exact mean, variance and
    random-features population error against 400,000 samples."""
    d, width, n = 4, 20, 400_000
    target = Zigzag(d=d, norm=1.5, a=3, seed=0, device=torch.device("cpu"))
    relu = relu_sum(target)
    w = torch.randn(1, width, d, generator=gen(36), dtype=F64)
    b = torch.randn(1, width, generator=gen(37), dtype=F64)
    exact = float(relu_rf_population_error(w, b, relu)[0])

    def features(x: torch.Tensor) -> torch.Tensor:
        return torch.cat([torch.relu(x @ w[0].T + b[0]), torch.ones(len(x), 1, dtype=F64)], 1)

    data = gen(38)
    x_train, x_test = (torch.randn(n, d, generator=data, dtype=F64) for _ in range(2))
    y_train, y_test = (zigzag(x @ target.w.double(), target.a) for x in (x_train, x_test))
    assert float(y_test.mean()) == pytest.approx(relu.mean, abs=4 * float(y_test.std()) / n**0.5)
    assert float(y_test.var()) == pytest.approx(relu.variance, rel=0.01)
    a = features(x_train)
    coef = torch.linalg.solve(a.T @ a, a.T @ y_train)
    mse = float((features(x_test) @ coef - y_test).square().mean())
    assert 0.05 < exact < 0.95
    assert mse / relu.variance == pytest.approx(exact, rel=0.03)


def zigzag_poisson_variance(norm: float) -> float:
    """Var psi_a(norm z) for a far past the Gaussian's reach: 1/3 plus Poisson's terms."""
    m = torch.arange(1, 60, dtype=F64)
    terms = 4 * (-1) ** m * torch.exp(-0.5 * (math.pi * m * norm) ** 2) / (math.pi * m) ** 2
    return 1 / 3 + float(terms.sum())


@pytest.mark.parametrize("norm", [0.3, 0.7, 1.0, 3.0, 1000.0, 1e5])
def test_zigzag_variance_is_exact_at_every_norm(norm):
    """psi_1(y) = clamp(y, -1, 1): Var = s^2 int_{-c}^{c} z^2 phi + 2 Q(c), c = 1/s, the
    integral by its series 2 phi(0) sum_n (-1/2)^n c^(2n+3) / (n! (2n+3)) (no cancellation at
    small c). With a = 6 d^2 + 1 and norm d the wave is all there is (a/norm >= 12 for d >= 2).
    The trapezoid this replaced aliased the wave: 2e-5 off at d = 4000, 1e-2 at 1e5, 0 at 1e6."""
    c = 1 / norm
    inside = sum(
        (-0.5) ** n * c ** (2 * n + 3) / (math.factorial(n) * (2 * n + 3)) for n in range(80)
    )
    clamp = norm**2 * 2 / math.sqrt(2 * math.pi) * inside + 2 * float(
        ndtr(torch.tensor(-c, dtype=F64))
    )
    assert theory.zigzag_moments(norm, 1) == (0.0, pytest.approx(clamp, abs=1e-13))
    d = max(2, round(norm))
    wave = theory.zigzag_moments(float(d), 6 * d * d + 1)[1]
    assert wave == pytest.approx(zigzag_poisson_variance(d), abs=1e-15)


@pytest.mark.parametrize("norm", [0.5, 1.5, 7.0, 20.0])
@pytest.mark.parametrize("a", [3, 5, 41])
def test_zigzag_variance_agrees_with_the_trapezoid_where_it_resolves_the_wave(norm, a):
    assert theory.zigzag_moments(norm, a)[1] == pytest.approx(
        moments_1d(lambda z: zigzag(norm * z, a))[1], abs=2e-9
    )


@pytest.mark.parametrize(("norm", "a"), [(4096.0, 1), (4096.0, 4097), (20000.0, 40961)])
def test_zigzag_mass_beyond_a_summed_equals_euler_maclaurin(norm, a):
    """The two ways of :func:`theory._zigzag_beyond` meet at ZIGZAG_SUMMED_NORM."""
    t = torch.linspace(-1, 1, 9, dtype=F64)
    summed = theory._zigzag_beyond(norm, a, t, euler_maclaurin=False)
    assert torch.allclose(summed, theory._zigzag_beyond(norm, a, t, True), rtol=1e-13, atol=0)
    assert float(summed.min()) > 1e-9  # a case where the mass beyond a matters


def test_zigzag_is_its_sum_of_relus_and_its_features_are_blind_to_it():
    target = Zigzag(d=4, norm=4.0, a=97, seed=0, device=torch.device("cpu"))
    coef, shift = target.relu_terms()
    z = torch.linspace(-150, 150, 30_001, dtype=F64)
    rebuilt = (coef * torch.relu(z.unsqueeze(-1) + shift)).sum(-1) - 1
    assert (rebuilt - zigzag(z, 97)).abs().max() < 1e-9
    # Width-32 random features cannot follow 24 oscillations per standard deviation.
    w = torch.randn(1, 32, 4, generator=gen(31), dtype=F64) / 2
    b = torch.randn(1, 32, generator=gen(32), dtype=F64)
    assert float(relu_rf_population_error(w, b, relu_sum(target))[0]) > 0.97
    neuron = ReluNeuron(d=4, norm=1.0, bias=0.0, seed=0, device=torch.device("cpu"))
    assert float(relu_rf_population_error(w, b, relu_sum(neuron))[0]) < 0.2


@pytest.mark.parametrize("d", [3, 12, 64])
def test_mehler_series_and_bivariate_cdf_give_the_same_gram(monkeypatch, d):
    # Pairs with |rho| < 0.3 go through Mehler's series, the others through the CDF: at d = 3
    # most pairs are far, at d = 64 almost none. All through the CDF must agree to rounding.
    w = torch.randn(2, 150, d, generator=gen(33), dtype=F64) / d**0.5
    b = torch.randn(2, 150, generator=gen(34), dtype=F64)
    target = relu_neuron_sum(torch.randn(d, generator=gen(35), dtype=F64), bias=0.3)
    mixed = relu_population_moments(w, b, target)
    monkeypatch.setattr(theory, "MEHLER_CORRELATION", 0.0)
    direct = relu_population_moments(w, b, target)
    assert (mixed.cov - direct.cov).abs().max() < 1e-14
