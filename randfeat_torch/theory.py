"""Closed-form and numerical predictions under z ~ N(0, 1) and x ~ N(0, I_d), in float64.

- ``relu_hermite_coefficients``: exact Hermite coefficients of relu(norm z + bias).
- ``hermite_coefficients_1d`` and ``moments_1d``: the same, and the mean and variance, of any
  1D function by quadrature against the Gaussian density.
- ``residual_errors``: the normalised error of the best polynomial of each degree, from the
  energy per Hermite degree.
- ``relu_rf_population_error``: the exact population error of the best output layer on
  bias-free ReLU random features, for a bias-free ReLU neuron.
- ``reference_errors``: the numbers of a run's ``theory`` section, where they apply.

Hermite coefficients are taken in the orthonormal basis h_k = He_k / sqrt(k!) (as in
``randfeat_torch.targets.hermite_orthonormal``): c_k = E[f(z) h_k(z)], so that
sum_k c_k^2 = E f^2 and sum_{k>=1} c_k^2 = Var f.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from omegaconf import DictConfig

from randfeat_torch.models import LinearizedNet, TwoLayerNet
from randfeat_torch.ridge import solve_psd
from randfeat_torch.targets import HermitePolynomial, Parity, ReluNeuron, Target, Zigzag, zigzag

REPORTED_DEGREES = 4  # best_degree_1 .. best_degree_L, L = max(this, the target's own degree)

INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)


def _hermite_sums(x: torch.Tensor, weights: torch.Tensor, degree: int) -> torch.Tensor:
    """sum_i weights_i h_k(x_i) for k = 0..degree: x, weights (n,) -> (degree + 1,).

    The orthonormal recurrence h_{k+1} = (x h_k - sqrt(k) h_{k-1}) / sqrt(k + 1), run on
    weights * h_k in two buffers updated in place, never forms He_k or k!, so it neither
    overflows nor holds more than two copies of a long grid.
    """
    previous, current = torch.zeros_like(x), weights * torch.ones_like(x)
    sums = [current.sum()]
    for k in range(degree):
        previous.mul_(-math.sqrt(k)).addcmul_(x, current).div_(math.sqrt(k + 1))
        previous, current = current, previous
        sums.append(current.sum())
    return torch.stack(sums)


def relu_hermite_coefficients(norm: float, bias: float, max_degree: int) -> torch.Tensor:
    """c_k = E[relu(norm z + bias) h_k(z)], z ~ N(0, 1), exactly: float64, (max_degree + 1,).

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
    if norm <= 0:
        raise ValueError(f"norm must be > 0, got {norm}")
    if max_degree < 0:
        raise ValueError(f"max_degree must be >= 0, got {max_degree}")
    t = torch.tensor(-bias / norm, dtype=torch.float64)
    pdf = INV_SQRT_2PI * torch.exp(-0.5 * t * t)
    tail = 0.5 * torch.erfc(t / math.sqrt(2.0))
    coef = torch.empty(max_degree + 1, dtype=torch.float64)
    coef[0] = norm * pdf + bias * tail
    if max_degree >= 1:
        coef[1] = norm * tail
    if max_degree >= 2:
        k = torch.arange(2, max_degree + 1, dtype=torch.float64)
        coef[2:] = _hermite_sums(t.view(1), norm * pdf, max_degree - 2) / torch.sqrt(k * (k - 1))
    return coef


def _gaussian_trapezoid(lo: float, hi: float, points: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Nodes (points,) and trapezoid weights times the N(0, 1) density on [lo, hi], float64."""
    if not (lo < hi and points >= 2):
        raise ValueError(f"need lo < hi and points >= 2, got lo={lo}, hi={hi}, points={points}")
    nodes = torch.linspace(lo, hi, points, dtype=torch.float64)
    weights = (hi - lo) / (points - 1) * INV_SQRT_2PI * torch.exp(-0.5 * nodes * nodes)
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


def _relu_kernel_unit(cos: torch.Tensor) -> torch.Tensor:
    """E[relu(u.x) relu(v.x)] for unit u, v with u.v = cos: (sin t + (pi - t) cos t) / 2 pi."""
    cos = cos.clamp(-1.0, 1.0)
    sin = torch.sqrt((1.0 - cos) * (1.0 + cos))
    return (sin + (math.pi - torch.acos(cos)) * cos) / (2.0 * math.pi)


def relu_rf_population_error(w: torch.Tensor, w_star: torch.Tensor) -> torch.Tensor:
    """Exact normalised population error of random features relu(<w_j, x>) (no hidden bias)
    plus a constant, with the best output layer, on f(x) = relu(<w*, x>), x ~ N(0, I_d).

    w: (R, width, d) first layers of R replicas, w_star: (d,) -> (R,) float64 in [0, 1]:
    min_{a, c} E[(f - a.phi - c)^2] / Var f = (Var f - q^T C^+ q) / Var f, with C = Cov(phi)
    and q = Cov(phi, f) from the arc-cosine kernel (C^+ as in :func:`ridge.solve_psd`).
    ReLU is positively homogeneous, so rescaling a feature leaves its span unchanged: rows and
    w* are normalised to unit length (E relu = 1/sqrt(2 pi), Var f = 1/2 - 1/(2 pi)), which
    also keeps C well scaled.
    """
    if w.dim() != 3 or w_star.shape != (w.shape[-1],):
        raise ValueError(
            f"need w (R, width, d) and w_star (d,), got {tuple(w.shape)}, {tuple(w_star.shape)}"
        )
    w, w_star = w.to(torch.float64), w_star.to(w.device, torch.float64)
    norms = w.norm(dim=-1, keepdim=True)
    if not (bool((norms > 0).all()) and float(w_star.norm()) > 0):
        raise ValueError("every row of w and w_star must be nonzero")
    u, u_star = w / norms, w_star / w_star.norm()
    mean_sq = 1.0 / (2.0 * math.pi)  # (E relu(u.x))^2 = E relu(u.x) E f for unit vectors
    cov = _relu_kernel_unit(u @ u.transpose(1, 2)) - mean_sq
    cross = _relu_kernel_unit(u @ u_star) - mean_sq
    variance = 0.5 - mean_sq
    explained = (cross * solve_psd(cov, cross)[0]).sum(-1)
    return ((variance - explained) / variance).clamp(0.0, 1.0)


def degree_energies(target: Target, max_degree: int) -> tuple[torch.Tensor, float] | None:
    """(energy per Hermite degree 0..max_degree, variance) of a target under its inputs, or
    None where unknown. A ReLU neuron or zigzag depends on x only through <w*, x>/|w*| ~ N(0, 1),
    so its best degree-l polynomial in x is its best degree-l polynomial in that projection."""
    if isinstance(target, ReluNeuron):
        energy = relu_hermite_coefficients(target.norm, target.bias, max_degree).square()
        return energy, target.variance
    if isinstance(target, Zigzag):

        def psi(z: torch.Tensor) -> torch.Tensor:
            return zigzag(target.norm * z, target.a)

        return hermite_coefficients_1d(psi, max_degree).square(), moments_1d(psi)[1]
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
    cfg: DictConfig, target: Target, model: TwoLayerNet | LinearizedNet
) -> dict[str, float | list[float]]:
    """What theory predicts for this run, normalised by the target's population variance:
    ``best_constant`` (1.0), ``best_degree_l`` (the best polynomial of degree <= l) and, for
    bias-free ReLU random features on a bias-free ReLU neuron, ``rf_population_error`` (the
    exact population error of the best output layer for this draw of features; a list over
    replicas when R > 1). Empty where the target's closed forms do not hold for the inputs."""
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
    if (
        isinstance(target, ReluNeuron)
        and target.bias == 0
        and cfg.input.name == "gaussian"
        and isinstance(model, TwoLayerNet)
        and model.frozen
        and model.b is None
        and cfg.model.activation == "relu"
    ):
        exact = relu_rf_population_error(model.w.detach(), target.w).tolist()
        errors["rf_population_error"] = exact[0] if len(exact) == 1 else exact
    return errors
