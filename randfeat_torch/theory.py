"""Closed-form and numerical predictions under z ~ N(0, 1) and x ~ N(0, I_d), in float64.

- ``relu_hermite_coefficients``: exact Hermite coefficients of relu(norm z + bias).
- ``hermite_coefficients_1d`` and ``moments_1d``: the same, and the mean and variance, of any
  1D function by quadrature against the Gaussian density.
- ``residual_errors``: the normalised error of the best polynomial of each degree, from the
  energy per Hermite degree.
- ``bivariate_normal_cdf`` and ``relu_product_mean``: E[relu(U) relu(V)] for jointly Gaussian
  U, V with any means, in closed form up to the bivariate normal CDF (Genz's method).
- ``relu_population_moments``: the exact mean, covariance and target covariance of ReLU random
  features (with or without hidden biases) for a ReLU neuron or a zigzag: the population
  Gram matrix, with no samples. ``relu_rf_population_error``: the exact population error of
  the best output layer from them; ``optimizer.population=true`` fits that output layer.
- ``reference_errors``: the numbers of a run's ``theory`` section, where they apply.

Hermite coefficients are taken in the orthonormal basis h_k = He_k / sqrt(k!) (as in
``randfeat_torch.targets.hermite_orthonormal``): c_k = E[f(z) h_k(z)], so that
sum_k c_k^2 = E f^2 and sum_{k>=1} c_k^2 = Var f.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy
import torch
from omegaconf import DictConfig

from randfeat_torch.config import exact_moments_apply
from randfeat_torch.models import LinearizedNet, TwoLayerNet
from randfeat_torch.ridge import mirror_lower, solve_psd
from randfeat_torch.targets import (
    HermitePolynomial,
    Parity,
    ReluNeuron,
    Target,
    Zigzag,
    hermite_terms,
    normal_pdf,
    relu_mean,
    relu_square_mean,
    zigzag,
)

REPORTED_DEGREES = 4  # best_degree_1 .. best_degree_L, L = max(this, the target's own degree)

# Gauss-Legendre points for the bivariate normal CDF by |rho| band (Genz 2004): 6 below 0.3,
# 12 below 0.75, 20 below 0.925, and 20 on the near-singular branch above.
CORRELATION_BANDS = ((0.3, 6), (0.75, 12), (0.925, 20))
HIGH_CORRELATION_POINTS = 20
_LEGENDRE = {n: numpy.polynomial.legendre.leggauss(n) for n in (6, 12, 20)}
POPULATION_MAX_ENTRIES = 2**26  # replicas * width^2 above which theory skips the RF Gram matrix
POPULATION_ROWS = 64  # rows of the population Gram matrix at once (its temporaries stay in cache)
POPULATION_TERMS = 256  # target ReLU terms at once in Cov(phi, f)
POPULATION_PAIRS = 2**19  # pairs of units at once through the bivariate CDF (~0.2 GB of buffers)
MEHLER_CORRELATION = 0.3  # |rho| below which the Gram matrix uses Mehler's series ...
MEHLER_TERMS = 28  # ... cut after this degree: 0.3^29 = 7e-16


def normal_cdf_(x: torch.Tensor) -> torch.Tensor:
    """Phi(x) in place of x: ``torch.special.ndtr`` without a temporary, for the long
    buffers of the bivariate CDF."""
    return x.mul_(-1.0 / math.sqrt(2.0)).erfc_().mul_(0.5)


def _bivariate_cdf_moderate(
    h: torch.Tensor, k: torch.Tensor, rho: torch.Tensor, points: int
) -> torch.Tensor:
    """|rho| < 0.925: Phi(h) Phi(k) + (1/2 pi) int_0^asin(rho) exp(-(h^2 + k^2 -
    2 h k sin t) / (2 cos^2 t)) dt (Drezner and Wesolowsky's form of d Phi2 / d rho), by
    Gauss-Legendre with ``points`` nodes. h, k, rho broadcast together; the loop runs in place,
    as it is bound by memory traffic at the sizes of a Gram matrix."""
    angle = torch.asin(rho)
    hk = h * k
    neg_half_sq = -0.5 * (h * h + k * k)
    one = torch.ones((), dtype=hk.dtype, device=hk.device)
    shape = torch.broadcast_tensors(hk, angle)[0].shape  # (broadcast_shapes imports sympy)
    total = torch.zeros(shape, dtype=hk.dtype, device=hk.device)
    nodes, weights = _LEGENDRE[points]
    for x, weight in zip(nodes.tolist(), weights.tolist(), strict=True):
        sin = torch.sin(angle * (0.5 * (1.0 + x)))
        exponent = torch.addcmul(neg_half_sq, hk, sin)
        exponent.div_(torch.addcmul(one, sin, sin, value=-1.0))
        total.add_(exponent.exp_(), alpha=weight)
    total.mul_(angle).mul_(0.25 / math.pi)  # (asin(rho) / 2) (1 / 2 pi)
    return total.add_(torch.special.ndtr(h) * torch.special.ndtr(k))


def _bivariate_cdf_high(h: torch.Tensor, k: torch.Tensor, rho: torch.Tensor) -> torch.Tensor:
    """rho >= HIGH_CORRELATION: Phi(min(h, k)) - int_rho^1 (density at (h, k)) drho'. With
    x = sqrt(1 - rho'^2) the integrand is exp(-b^2 / 2x^2) g(x) / 2 pi, b = |h - k|, and
    g(x) = exp(-hk / (1 + sqrt(1 - x^2))) / sqrt(1 - x^2) = exp(-hk/2) (1 + c x^2 + c d x^4 +
    O(x^6)), c = (4 - hk)/8, d = (12 - hk)/16 (Genz 2004). The series part is integrated in
    closed form, M_n = int_0^a x^2n exp(-b^2 / 2x^2) dx, M_0 = a E - b sqrt(2 pi) Phi(-b/a),
    M_n = (a^(2n+1) E - b^2 M_(n-1)) / (2n + 1), E = exp(-b^2 / 2a^2); the smooth O(x^6)
    rest by Gauss-Legendre. Every exponential carries exp(-hk/2) inside it, so none overflows."""
    a = torch.sqrt((1.0 - rho) * (1.0 + rho)).clamp_min(1e-150)
    hk, b2 = h * k, (h - k).square()
    b = torch.sqrt(b2)
    c, d = (4.0 - hk) / 8.0, (12.0 - hk) / 16.0
    edge = torch.exp(-0.5 * b2 / (a * a) - 0.5 * hk)
    tail = torch.exp(torch.special.log_ndtr(-b / a) - 0.5 * hk)
    m0 = a * edge - b * math.sqrt(2.0 * math.pi) * tail
    m1 = (a**3 * edge - b2 * m0) / 3.0
    m2 = (a**5 * edge - b2 * m1) / 5.0
    total = m0 + c * (m1 + d * m2)
    nodes, weights = _LEGENDRE[HIGH_CORRELATION_POINTS]
    for node, weight in zip(nodes.tolist(), weights.tolist(), strict=True):
        x, weight = 0.5 * a * (1.0 + node), 0.5 * a * weight
        xs = x * x
        t = torch.sqrt(1.0 - xs)
        exact = torch.exp(-0.5 * b2 / xs - hk / (1.0 + t)) / t
        series = torch.exp(-0.5 * b2 / xs - 0.5 * hk) * (1.0 + c * xs * (1.0 + d * xs))
        total += weight * (exact - series)
    return torch.special.ndtr(torch.minimum(h, k)) - total / (2.0 * math.pi)


def bivariate_normal_cdf(h: torch.Tensor, k: torch.Tensor, rho: torch.Tensor) -> torch.Tensor:
    """P(X <= h, Y <= k) for standard normal X, Y of correlation rho, elementwise, float64.

    Genz's method (Statistics and Computing 14, 2004): Gauss-Legendre on the
    Drezner-Wesolowsky integral for |rho| < 0.925 (CORRELATION_BANDS), and on the rest of a
    series that takes out the singularity at |rho| = 1 above, where rho < 0 uses
    P(X <= h, Y <= k; rho) = Phi(h) - P(X <= h, Y <= -k; -rho). Exact at rho = +-1.
    Accurate to about 1e-15 against P(0, 0; rho) = 1/4 + asin(rho) / 2 pi and against 1D
    quadrature (tests/test_theory.py).
    """
    h, k, rho = (t.to(torch.float64) for t in (h, k, rho))
    rho = rho.clamp(-1.0, 1.0)
    (below, points), *bands = CORRELATION_BANDS
    shape = torch.broadcast_tensors(h, k, rho)[0].shape
    if rho.shape == shape:  # one rho per entry: each band computes its own entries only
        h, k = h.expand(shape), k.expand(shape)
        size = rho.abs()
        out = torch.full(shape, torch.nan, dtype=torch.float64, device=rho.device)
        band = size < below
        out[band] = _bivariate_cdf_moderate(h[band], k[band], rho[band], points)
    else:  # every entry by the cheapest band first (h and k may stay a column and a row)
        out = _bivariate_cdf_moderate(h, k, rho, points)
        h, k, rho = torch.broadcast_tensors(h, k, rho)
        size = rho.abs()
    for above, points in bands:
        band = (size >= below) & (size < above)
        out[band] = _bivariate_cdf_moderate(h[band], k[band], rho[band], points)
        below = above
    high = size >= below
    hh, kh, rh = h[high], k[high], rho[high]
    negative = rh < 0
    flipped = _bivariate_cdf_high(hh, torch.where(negative, -kh, kh), rh.abs())
    out[high] = torch.where(negative, torch.special.ndtr(hh) - flipped, flipped)
    return out.clamp_(0.0, 1.0)


def relu_product_mean(
    norm1: torch.Tensor,
    bias1: torch.Tensor,
    norm2: torch.Tensor,
    bias2: torch.Tensor,
    rho: torch.Tensor,
) -> torch.Tensor:
    """E[relu(norm1 X + bias1) relu(norm2 Y + bias2)], X, Y standard normal of correlation rho,
    elementwise, float64. With s = sqrt(1 - rho^2) and t_i = bias_i / norm_i it is
    norm1 norm2 ((t1 t2 + rho) Phi2(t1, t2; rho) + t1 phi(t2) Phi((t1 - rho t2) / s)
    + t2 phi(t1) Phi((t2 - rho t1) / s) + s exp(-(t1^2 - 2 rho t1 t2 + t2^2) / 2 s^2) / 2 pi),
    from E[X 1{X <= t1, Y <= t2}] and E[XY 1{X <= t1, Y <= t2}] of the truncated bivariate
    normal; at rho = 0 it is the product of the two means, at rho = 1 and zero biases the
    arc-cosine kernel's norm1 norm2 / 2."""
    rho = rho.clamp(-1.0, 1.0)
    t1, t2 = bias1 / norm1, bias2 / norm2
    one = torch.ones((), dtype=rho.dtype, device=rho.device)
    s_sq = torch.addcmul(one, rho, rho, value=-1.0).clamp_min_(1e-300)
    s = torch.sqrt(s_sq)
    t12 = t1 * t2
    # t1 phi(t2) Phi((t1 - rho t2) / s) and the same with 1 and 2 swapped, in place.
    value = normal_cdf_(torch.addcmul(t1, rho, t2, value=-1.0).div_(s)).mul_(t1 * normal_pdf(t2))
    swapped = normal_cdf_(torch.addcmul(t2, rho, t1, value=-1.0).div_(s))
    value.addcmul_(swapped, t2 * normal_pdf(t1))
    # s exp(-(t1^2 - 2 rho t1 t2 + t2^2) / 2 s^2) / 2 pi
    exponent = torch.addcmul(t1 * t1 + t2 * t2, rho, t12, value=-2.0).div_(s_sq).mul_(-0.5)
    value.addcmul_(exponent.exp_(), s, value=1.0 / (2.0 * math.pi))
    value.addcmul_(bivariate_normal_cdf(t1, t2, rho), t12 + rho)
    return value.mul_(norm1 * norm2)


def _hermite_sums(x: torch.Tensor, weights: torch.Tensor, degree: int) -> torch.Tensor:
    """sum_i weights_i h_k(x_i) for k = 0..degree: x, weights (n,) -> (degree + 1,)."""
    return torch.stack([term.sum() for term in hermite_terms(x, weights, degree)])


def relu_hermite_coefficients(
    norm: float | torch.Tensor, bias: float | torch.Tensor, max_degree: int
) -> torch.Tensor:
    """c_k = E[relu(norm z + bias) h_k(z)], z ~ N(0, 1), exactly: float64, (max_degree + 1,),
    or (max_degree + 1, *shape) for tensors norm and bias of one shape (one ReLU per entry).

    With t = -bias / norm and T_k = int_t^inf He_k(z) phi(z) dz (T_0 = Q(t) = 1 - Phi(t),
    T_k = He_{k-1}(t) phi(t) for k >= 1), and z He_k = He_{k+1} + k He_{k-1},
    c_k sqrt(k!) = norm (T_{k+1} + k T_{k-1}) + bias T_k. The recurrence collapses this to
    c_0 = norm phi(t) + bias Q(t), c_1 = norm Q(t) and, for k >= 2,
    c_k = norm phi(t) He_{k-2}(t) / sqrt(k!) = norm phi(t) h_{k-2}(t) / sqrt(k (k - 1)),
    which is evaluated without the cancellation of the three-term form. Against a 60-digit
    reference the largest error is <= 3e-15 * max_k |c_k| for max_degree <= 1000 and
    |t| <= 37 (c_0 alone loses t^2 * 1e-16 relative when t >> 1); past |t| ~ 37.5, phi(t)
    underflows and the c_k, k >= 2, read 0, which they are to ~1e-150 * norm.
    """
    norm = torch.as_tensor(norm, dtype=torch.float64)
    bias = torch.as_tensor(bias, dtype=torch.float64, device=norm.device)
    if not bool((norm > 0).all()):
        raise ValueError(f"norm must be > 0, got {norm.min().item()}")
    if max_degree < 0:
        raise ValueError(f"max_degree must be >= 0, got {max_degree}")
    t = -bias / norm
    pdf = normal_pdf(t)
    tail = 0.5 * torch.erfc(t / math.sqrt(2.0))
    coef = torch.empty(max_degree + 1, *t.shape, dtype=torch.float64, device=t.device)
    coef[0] = norm * pdf + bias * tail
    if max_degree >= 1:
        coef[1] = norm * tail
    if max_degree >= 2:
        k = torch.arange(2, max_degree + 1, dtype=torch.float64, device=t.device)
        terms = hermite_terms(t, norm * pdf, max_degree - 2)
        coef[2:] = torch.stack([term.clone() for term in terms])
        coef[2:] /= torch.sqrt(k * (k - 1)).view(-1, *[1] * t.dim())
    return coef


def _gaussian_trapezoid(lo: float, hi: float, points: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Nodes (points,) and trapezoid weights times the N(0, 1) density on [lo, hi], float64."""
    if not (lo < hi and points >= 2):
        raise ValueError(f"need lo < hi and points >= 2, got lo={lo}, hi={hi}, points={points}")
    nodes = torch.linspace(lo, hi, points, dtype=torch.float64)
    weights = (hi - lo) / (points - 1) * normal_pdf(nodes)
    weights[0] *= 0.5
    weights[-1] *= 0.5
    return nodes, weights


def hermite_coefficients_1d(
    fn: Callable[[torch.Tensor], torch.Tensor],
    max_degree: int,
    lo: float = -12.0,
    hi: float = 12.0,
    points: int = 2_000_001,
) -> torch.Tensor:
    """c_k = E[fn(z) h_k(z)], z ~ N(0, 1), k = 0..max_degree, by quadrature: (max_degree + 1,).

    ``fn`` maps a float64 tensor of nodes to float64 values. The trapezoid rule on a uniform
    grid is exponentially accurate for smooth integrands that decay at both ends, so the
    error comes from kinks: about h^2 |jump of fn'| / 8 per kink, h = (hi - lo) / (points - 1)
    (h = 1.2e-5 by default: <= 2e-11 per unit slope jump; 1e-10 measured, k <= 150, on a
    triangle wave of slope 5).
    Cutting the line at [lo, hi] costs at most sqrt(E[fn^2; z outside [lo, hi]]) for every k
    (Cauchy-Schwarz, as E h_k^2 = 1): ~1e-16 at +-12 for fn of polynomial growth.
    Each degree is one in-place pass over the grid (about 2 ms at the default size, 2 cores).
    """
    if max_degree < 0:
        raise ValueError(f"max_degree must be >= 0, got {max_degree}")
    nodes, weights = _gaussian_trapezoid(lo, hi, points)
    return _hermite_sums(nodes, weights * fn(nodes), max_degree)


def moments_1d(
    fn: Callable[[torch.Tensor], torch.Tensor],
    lo: float = -12.0,
    hi: float = 12.0,
    points: int = 2_000_001,
) -> tuple[float, float]:
    """(E fn(z), Var fn(z)), z ~ N(0, 1), by the quadrature of ``hermite_coefficients_1d``."""
    nodes, weights = _gaussian_trapezoid(lo, hi, points)
    values = fn(nodes)
    mean = float(weights @ values)
    return mean, float(weights @ (values - mean).square())


def residual_errors(
    coefficients_squared_by_degree: torch.Tensor, variance: float, max_degree: int
) -> list[float]:
    """Normalised error of the best polynomial of degree <= l, for l = 0..max_degree.

    ``coefficients_squared_by_degree``: (K + 1,), the energy of each Hermite degree k (sum of
    the squared orthonormal coefficients of total degree k; index 0 is the squared mean).
    Entry l is (variance - sum_{k=1..l} energy_k) / variance, so l = 0 (the mean) gives 1.0;
    negatives from rounding are clamped to 0.
    """
    energy = torch.as_tensor(coefficients_squared_by_degree, dtype=torch.float64)
    if energy.dim() != 1 or max_degree >= energy.numel() or max_degree < 0:
        raise ValueError(
            f"need 0 <= max_degree < {energy.numel()} energies (1D), got max_degree={max_degree}"
        )
    if variance <= 0:
        raise ValueError(f"variance must be > 0, got {variance}")
    explained = torch.cumsum(energy[1 : max_degree + 1], dim=0)
    explained = torch.cat([explained.new_zeros(1), explained])
    return ((variance - explained) / variance).clamp_min(0.0).tolist()


@dataclass
class ReluSum:
    """A target f(x) = constant + sum_l coef_l relu(<direction, x> + shift_l), with its exact
    mean and variance under x ~ N(0, I_d) (the constant enters only the mean)."""

    direction: torch.Tensor
    coef: torch.Tensor
    shift: torch.Tensor
    mean: float
    variance: float


def relu_neuron_sum(w_star: torch.Tensor, bias: float = 0.0) -> ReluSum:
    """The ReLU neuron relu(<w*, x> + bias) as a :class:`ReluSum` of one term."""
    norm = w_star.to(torch.float64).norm().reshape(1)
    shift = torch.full_like(norm, float(bias))
    mean = relu_mean(norm, shift)
    variance = relu_square_mean(norm, shift) - mean.square()
    return ReluSum(w_star, torch.ones_like(norm), shift, float(mean), float(variance))


ZIGZAG_TRAPEZOID_NORM = 0.5  # below: the trapezoid of moments_1d (the wave is slow there)
ZIGZAG_SUMMED_NORM = 4096.0  # below: the pieces beyond +-a one by one; above: Euler-Maclaurin
_ZIGZAG_NODES = torch.from_numpy(numpy.stack(numpy.polynomial.legendre.leggauss(32)))


def _zigzag_beyond(norm: float, a: int, t: torch.Tensor, euler_maclaurin: bool) -> torch.Tensor:
    """R(t) = sum_{j > (a-1)/2} [phi((2j + t)/s) + phi((2j - t)/s)] / s, s = norm, at t: the
    Gaussian mass that the pieces of the wave beyond +-a would carry. Summed term by term (up
    to where phi underflows, 19.3 s + 1 terms at most), or for large s by Euler-Maclaurin with
    step h = 2/s, sum_k h f(x0 + k h) = Q(x0) + h f/2 - h^2 f'/12 + h^4 f'''/720 at x0 (the
    next term, h^6 f^(5) / 30240, is < 1e-24 for s >= 4096)."""
    first = (a + 1) // 2  # the first piece past a: y = 2j + t on [a, a + 2]
    if euler_maclaurin:
        h = 2.0 / norm
        x0 = torch.stack([(a + 1 + t) / norm, (a + 1 - t) / norm])
        pdf = normal_pdf(x0)
        series = 0.5 * h + h**2 / 12 * x0 + h**4 / 720 * x0 * (3 - x0 * x0)
        return (0.5 * (torch.special.ndtr(-x0) + series * pdf)).sum(0)
    last = math.ceil((38.6 * norm + 1) / 2)  # phi(38.6) ~ 1e-324
    if last < first:
        return torch.zeros_like(t)
    j = torch.arange(first, last + 1, dtype=torch.float64).unsqueeze(-1)
    return ((normal_pdf((2 * j + t) / norm) + normal_pdf((2 * j - t) / norm)) / norm).sum(0)


@functools.lru_cache(maxsize=64)
def zigzag_moments(norm: float, a: int) -> tuple[float, float]:
    """(mean, variance) of the zigzag psi_a(s z), z ~ N(0, 1), s = norm, computed once per
    (norm, a) in a process, whichever part of a run asks.

    psi_a is odd, so the mean is 0. Its square is 1 beyond +-a and t^2 on each piece
    y = 2j + t, t in [-1, 1], |j| <= (a-1)/2, of [-a, a]; by Poisson's summation over all j,
    sum_j phi((2j + t)/s)/s = 1/2 + sum_m exp(-(pi m s)^2 / 2) cos(pi m t), so that
    Var = 1/3 + sum_m 4 (-1)^m exp(-(pi m s)^2/2) / (pi m)^2 - int t^2 R(t) dt + 2 Q(a/s),
    R the mass of the pieces beyond +-a (:func:`_zigzag_beyond`), integrated by 32-point
    Gauss-Legendre. This is exact to ~1e-15 at every s >= 0.5 (the trapezoid on a grid of
    step 1.2e-5 in z aliases the wave: Var off by 2e-5 at s = 4000, 1e-2 at s = 1e5, 0 at 1e6);
    below, the wave is slow and the trapezoid of :func:`moments_1d` is used (~1e-10)."""
    if norm < ZIGZAG_TRAPEZOID_NORM:
        return 0.0, moments_1d(lambda z: zigzag(norm * z, a))[1]
    m = torch.arange(1, math.ceil(12.3 / norm) + 1, dtype=torch.float64)  # exp(-745) = 0
    poisson = 4 * (-1) ** m * torch.exp(-0.5 * (math.pi * m * norm) ** 2) / (math.pi * m) ** 2
    t, weights = _ZIGZAG_NODES
    beyond = _zigzag_beyond(norm, a, t, euler_maclaurin=norm >= ZIGZAG_SUMMED_NORM)
    outside = 2 * float(torch.special.ndtr(torch.tensor(-a / norm, dtype=torch.float64)))
    return 0.0, 1 / 3 + float(poisson.sum()) - float(weights @ (t * t * beyond)) + outside


@functools.lru_cache(maxsize=64)
def zigzag_energies(norm: float, a: int, max_degree: int) -> tuple[float, ...]:
    """The energy of each Hermite degree 0..max_degree of psi_a(norm z), z ~ N(0, 1), by the
    quadrature of :func:`hermite_coefficients_1d` (0.1-0.2 s): once per (norm, a, degree) in a
    process, so that the jobs of a sweep on one zigzag compute their reference errors once."""
    coefficients = hermite_coefficients_1d(lambda z: zigzag(norm * z, a), max_degree)
    return tuple(coefficients.square().tolist())


def relu_sum(target: Target) -> ReluSum | None:
    """A ReLU neuron or a zigzag as a :class:`ReluSum`; None for any other target."""
    if isinstance(target, ReluNeuron):
        return relu_neuron_sum(target.w, target.bias)
    if isinstance(target, Zigzag):
        coef, shift = target.relu_terms()
        return ReluSum(target.w, coef, shift, *zigzag_moments(target.norm, target.a))
    return None


@dataclass
class PopulationMoments:
    """Exact moments of features phi_j = relu(<w_j, x> + b_j) and a target f under
    x ~ N(0, I_d), float64: mean = E phi: (R, P), cov = Cov(phi): (R, P, P) (None where only
    its Cholesky factor is kept, see ``solvers.FactorCache``) and cross = Cov(phi, f): (R, P)."""

    mean: torch.Tensor
    cov: torch.Tensor | None
    cross: torch.Tensor


def _mehler(
    rows: torch.Tensor, cols: torch.Tensor, rho: torch.Tensor, out: torch.Tensor
) -> torch.Tensor:
    """sum_{k=1..K} rows_k cols_k rho^k by Horner, in place in out: rows (K + 1, R, m), cols
    (K + 1, R, n) Hermite coefficients, rho and out (R, m, n)."""
    top = rows.shape[0] - 1
    torch.mul(rows[top].unsqueeze(-1), cols[top].unsqueeze(-2), out=out)
    for k in range(top - 1, 0, -1):
        out.mul_(rho).addcmul_(rows[k].unsqueeze(-1), cols[k].unsqueeze(-2))
    return out.mul_(rho)


def _units(w: torch.Tensor, b: torch.Tensor | None) -> tuple[torch.Tensor, ...]:
    """(norm (R, P), unit rows (R, P, d), bias (R, P), E phi (R, P)) of the units, float64."""
    if w.dim() != 3:
        raise ValueError(f"need w (R, width, d), got {tuple(w.shape)}")
    w = w.detach().to(torch.float64)
    norm = w.norm(dim=-1)
    if not bool((norm > 0).all()):
        raise ValueError("every row of w must be nonzero")
    bias = torch.zeros_like(norm) if b is None else b.detach().to(torch.float64)
    return norm, w / norm.unsqueeze(-1), bias, relu_mean(norm, bias)


def relu_feature_covariance(w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    """The exact Cov(phi): (R, P, P) of ReLU random features phi_j = relu(<w_j, x> + b_j) with
    first layers w: (R, P, d) and hidden biases b: (R, P) or None, under x ~ N(0, I_d).

    <w_j, x> + b_j ~ N(b_j, |w_j|^2) with correlation rho_ij = <w_i, w_j> / |w_i| |w_j|
    between units, so every entry is a :func:`relu_product_mean`. The matrix is filled one
    block of rows at a time, below the diagonal only, and mirrored; its diagonal is E relu^2
    exactly. Where |rho_ij| < MEHLER_CORRELATION (almost every pair at d >> 1), Mehler's formula
    Cov = sum_{k >= 1} c_k(i) c_k(j) rho^k with the units' exact Hermite coefficients is
    cheaper: cut at MEHLER_TERMS, its tail is below |rho|^(MEHLER_TERMS + 1) |c(i)| |c(j)| <= 7e-16
    E relu_i^2 ^ 1/2 E relu_j^2 ^ 1/2 (Cauchy-Schwarz). Costs about 0.1 s at P = 2048 (2
    cores) and no samples."""
    norm, unit, bias, mean = _units(w, b)
    hermite = relu_hermite_coefficients(norm, bias, MEHLER_TERMS)  # (K + 1, R, P)
    cov = torch.empty(*norm.shape, norm.shape[-1], dtype=torch.float64, device=w.device)
    width = norm.shape[-1]
    far: list[tuple[torch.Tensor, ...]] = []  # (replica, row, column, rho) left to the CDF

    def exact_pairs() -> None:
        """The pairs in ``far`` by the bivariate CDF, into cov; empties ``far``."""
        pairs = [torch.cat(parts) for parts in zip(*far, strict=True)]
        far.clear()
        for part in torch.arange(len(pairs[0]), device=w.device).split(POPULATION_PAIRS):
            r, m, n, rho = (t[part] for t in pairs)
            product = relu_product_mean(norm[r, m], bias[r, m], norm[r, n], bias[r, n], rho)
            cov[r, m, n] = product - mean[r, m] * mean[r, n]

    pending = 0  # pairs in far: computed about POPULATION_PAIRS at a time
    for start in range(0, width, POPULATION_ROWS):
        stop = min(width, start + POPULATION_ROWS)
        rows = slice(start, stop)
        rho = unit[:, rows] @ unit[:, :stop].transpose(1, 2)
        rho[:, :, rows].diagonal(dim1=1, dim2=2).zero_()  # the diagonal is set exactly below
        _mehler(hermite[:, :, rows], hermite[:, :, :stop], rho, out=cov[:, rows, :stop])
        replica, i, j = (rho.abs() >= MEHLER_CORRELATION).nonzero(as_tuple=True)
        far.append((replica, i + start, j, rho[replica, i, j]))
        pending += len(i)
        if pending >= POPULATION_PAIRS or stop == width:
            exact_pairs()
            pending = 0
    mirror_lower(cov)
    cov.diagonal(dim1=1, dim2=2).copy_(relu_square_mean(norm, bias) - mean.square())
    return cov


def relu_cross_moments(
    w: torch.Tensor, b: torch.Tensor | None, target: ReluSum
) -> tuple[torch.Tensor, torch.Tensor]:
    """(E phi, Cov(phi, f)), each (R, P), of the ReLU random features of
    :func:`relu_feature_covariance` and a sum-of-ReLUs target, exactly. Costs O(R P terms)."""
    norm, unit, bias, mean = _units(w, b)
    direction, coef, shift = target.direction, target.coef, target.shift
    if direction.shape != (w.shape[-1],):
        raise ValueError(f"need w* ({w.shape[-1]},), got {tuple(direction.shape)}")
    direction = direction.to(w.device, torch.float64)
    target_norm = direction.norm().expand(1)
    rho = (unit @ (direction / target_norm)).unsqueeze(-1)  # (R, P, 1)
    coef, shift = coef.to(w.device), shift.to(w.device)
    cross = torch.zeros_like(mean)
    for start in range(0, coef.numel(), POPULATION_TERMS):
        c, t = coef[start : start + POPULATION_TERMS], shift[start : start + POPULATION_TERMS]
        product = relu_product_mean(norm.unsqueeze(-1), bias.unsqueeze(-1), target_norm, t, rho)
        cross += (product - mean.unsqueeze(-1) * relu_mean(target_norm, t)) @ c
    return mean, cross


def relu_population_moments(
    w: torch.Tensor, b: torch.Tensor | None, target: ReluSum
) -> PopulationMoments:
    """The exact population moments of ReLU random features with first layers w: (R, P, d) and
    hidden biases b: (R, P) or None, against a sum-of-ReLUs target: the population Gram matrix
    (:func:`relu_feature_covariance`) and :func:`relu_cross_moments`, with no samples."""
    mean, cross = relu_cross_moments(w, b, target)
    return PopulationMoments(mean, relu_feature_covariance(w, b), cross)


def population_error(moments: PopulationMoments, variance: float) -> torch.Tensor:
    """Exact normalised population error of the best output layer (and constant) on features
    of these moments, for a target of this variance: (R,) in [0, 1].
    min_{a, c} E[(f - a.phi - c)^2] / Var f = (Var f - q^T C^+ q) / Var f, with C = Cov(phi)
    and q = Cov(phi, f) (C^+ as in :func:`ridge.solve_psd`; the moments are left as they are)."""
    explained = (moments.cross * solve_psd(moments.cov, moments.cross)[0]).sum(-1)
    return ((variance - explained) / variance).clamp(0.0, 1.0)


def relu_rf_population_error(
    w: torch.Tensor, b: torch.Tensor | None, target: ReluSum
) -> torch.Tensor:
    """:func:`population_error` of ReLU random features relu(<w_j, x> + b_j) for a sum-of-ReLUs
    target under x ~ N(0, I_d): (R,) float64."""
    return population_error(relu_population_moments(w, b, target), target.variance)


def exact_variance(target: Target, inputs: str) -> float | None:
    """Var f under the named inputs where it is known in closed form (a zigzag's by
    :func:`zigzag_moments`, to ~1e-15), else None."""
    if inputs not in target.exact_under:
        return None
    if isinstance(target, Zigzag):
        return zigzag_moments(target.norm, target.a)[1]
    return target.variance


def degree_energies(target: Target, max_degree: int) -> tuple[torch.Tensor, float] | None:
    """(energy per Hermite degree 0..max_degree, variance) of a target under its inputs, or
    None where unknown. A ReLU neuron or zigzag depends on x only through <w*, x>/|w*| ~ N(0, 1),
    so its best degree-l polynomial in x is its best degree-l polynomial in that projection."""
    if isinstance(target, ReluNeuron):
        energy = relu_hermite_coefficients(target.norm, target.bias, max_degree).square()
        return energy, target.variance
    if isinstance(target, Zigzag):
        energy = zigzag_energies(target.norm, target.a, max_degree)
        return torch.tensor(energy, dtype=torch.float64), zigzag_moments(target.norm, target.a)[1]
    energy = torch.zeros(max_degree + 1, dtype=torch.float64)
    if isinstance(target, HermitePolynomial):
        for monomial, coef in zip(target.monomials, target.coef.double().cpu(), strict=True):
            if len(monomial) <= max_degree:
                energy[len(monomial)] += coef**2
        return energy, target.variance
    if isinstance(target, Parity):
        if target.k <= max_degree:
            energy[target.k] = 1.0
        return energy, target.variance
    return None


def reference_errors(
    cfg: DictConfig,
    target: Target,
    model: TwoLayerNet | LinearizedNet,
    moments: PopulationMoments | None = None,
    rf_exact: bool = True,
) -> dict[str, float | list[float]]:
    """What theory predicts for this run, normalised by the target's population variance:
    ``best_constant`` (1.0), ``best_degree_l`` (the best polynomial of degree <= l) and, for
    ReLU random features on a ReLU neuron or a zigzag under Gaussian inputs, with or without
    biases, ``rf_population_error`` (the exact population error of the best output layer for
    this draw of features; a list over replicas when R > 1). That one comes from ``moments``
    when the run has them already (``optimizer.population=true``), and is otherwise left out
    above POPULATION_MAX_ENTRIES = replicas * width^2 (and always with ``rf_exact=False``,
    for a run that computes it itself). Empty where the target's closed forms
    do not hold for the inputs."""
    if cfg.input.name not in target.exact_under:
        return {}
    top = max(REPORTED_DEGREES, getattr(target, "degree", 0), getattr(target, "k", 0))
    known = degree_energies(target, top)
    if known is None:
        return {}
    errors: dict[str, float | list[float]] = {
        f"best_degree_{degree}" if degree else "best_constant": error
        for degree, error in enumerate(residual_errors(*known, top))
    }
    if not rf_exact:
        return errors
    fits = exact_moments_apply(cfg) and cfg.replicas * cfg.width**2 <= POPULATION_MAX_ENTRIES
    if moments is None and not fits:
        return errors  # without building the a + 1 ReLUs of a zigzag (6 d^2 + 2 by default)
    relu = relu_sum(target)
    if moments is None:
        moments = relu_population_moments(model.w, model.b, relu)
    exact = population_error(moments, relu.variance).tolist()
    errors["rf_population_error"] = exact[0] if len(exact) == 1 else exact
    return errors
