"""Closed-form fit of a model that is linear in its trained parameters (frozen or linearized net).

Minimises (1/n) sum_i (y_i - <phi(x_i), beta> - c)^2 + lambda |beta|^2 over beta and the
unpenalised output bias c, for every replica at once, in float64. The n training samples are
drawn and turned into features chunk by chunk, accumulated into the P x P Gram matrix, and
never held together: memory is O(R P^2), whatever n is.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

CHUNK_ELEMENTS = 2**22  # features held at once (float64: 32 MiB)
GRAM_BLOCK = 256  # rows of the Gram matrix per matmul; only blocks on or below the diagonal


@dataclass
class RidgeFit:
    """The fitted beta: (R, P) and c: (R,), the training MSE (R,), and lambda used (R,)."""

    beta: torch.Tensor
    c: torch.Tensor
    train_mse: torch.Tensor
    penalty: torch.Tensor
    fallback: bool


def gram_blocks(size: int) -> list[tuple[int, int]]:
    """The (start, stop) rows of each GRAM_BLOCK-row block of a size x size Gram matrix."""
    return [(start, min(size, start + GRAM_BLOCK)) for start in range(0, size, GRAM_BLOCK)]


class GramAccumulator:
    """Running sums for centred least squares over chunks of (features, targets)."""

    def __init__(self, replicas: int, features: int, device: torch.device) -> None:
        kw = dict(dtype=torch.float64, device=device)
        self.n = 0
        self.gram = torch.zeros(replicas, features, features, **kw)  # sum phi phi^T
        self.phi_y = torch.zeros(replicas, features, **kw)  # sum phi y
        self.phi_sum = torch.zeros(replicas, features, **kw)
        self.y_sum = torch.zeros(replicas, **kw)
        self.y_sq = torch.zeros(replicas, **kw)

    def add(self, phi: torch.Tensor, y: torch.Tensor) -> None:
        """phi: (R, m, P), y: (m,) shared by the replicas or (R, m) one sample per replica."""
        phi = phi.double()
        y = y.double().expand(phi.shape[0], phi.shape[1])
        self.n += y.shape[1]
        # The Gram matrix is symmetric: accumulate its lower block triangle only (about
        # (1 + 1/blocks) / 2 of the flops), and mirror it once in solve().
        for start, stop in gram_blocks(phi.shape[2]):
            self.gram[:, start:stop, :stop].baddbmm_(
                phi[:, :, start:stop].transpose(1, 2), phi[:, :, :stop]
            )
        self.phi_y += torch.einsum("rmp,rm->rp", phi, y)
        self.phi_sum += phi.sum(dim=1)
        self.y_sum += y.sum(dim=1)
        self.y_sq += y.square().sum(dim=1)

    def solve(self, relative_penalty: float) -> RidgeFit:
        """Centre, add lambda and solve (see :func:`solve_centred`). Works in place on the Gram
        matrix, so that the solve holds two P x P matrices per replica (the system and its
        factor); the accumulator is spent afterwards."""
        n = self.n
        mirror_lower(self.gram)
        mu = self.phi_sum / n  # (R, P)
        y_mean = self.y_sum / n
        cov = self.gram.div_(n).baddbmm_(mu.unsqueeze(2), mu.unsqueeze(1), alpha=-1)  # Cov phi
        q = self.phi_y / n - mu * y_mean.unsqueeze(-1)  # Cov(phi, y)
        y_var = self.y_sq / n - y_mean.square()
        return solve_centred(cov, q, mu, y_mean, y_var, relative_penalty)


def mirror_lower(gram: torch.Tensor) -> torch.Tensor:
    """Copy the lower triangle of (R, P, P) Gram matrices onto the upper, in place, block by
    block, so that they are exactly symmetric."""
    for start, stop in gram_blocks(gram.shape[-1]):
        gram[:, :start, start:stop] = gram[:, start:stop, :start].transpose(1, 2)
        block = gram[:, start:stop, start:stop]
        block.copy_(block.tril() + block.tril(-1).transpose(1, 2))
    return gram


def solve_centred(
    cov: torch.Tensor,
    q: torch.Tensor,
    mu: torch.Tensor,
    y_mean: torch.Tensor,
    y_var: torch.Tensor,
    relative_penalty: float,
) -> RidgeFit:
    """Ridge from centred moments, of a sample or of the population: cov = Cov(phi): (R, P, P)
    (overwritten), q = Cov(phi, y): (R, P), mu = E phi: (R, P), y_mean and y_var: (R,) or ().
    Adds lambda = relative_penalty * trace(cov) / P and solves (cov + lambda) beta = q; c makes
    the mean right. The returned MSE is Var y - 2 <beta, q> + beta^T cov beta, on the same
    distribution as the moments."""
    diagonal = cov.diagonal(dim1=1, dim2=2)
    penalty = relative_penalty * diagonal.sum(-1) / cov.shape[-1]
    diagonal.add_(penalty.unsqueeze(-1))
    beta, fallback = solve_psd(cov, q)
    quadratic = torch.einsum("rp,rpq,rq->r", beta, cov, beta) - penalty * beta.square().sum(-1)
    mse = y_var - 2 * (beta * q).sum(-1) + quadratic
    c = y_mean - (mu * beta).sum(-1)
    return RidgeFit(beta, c, mse.clamp_min(0), penalty, fallback)


def solve_psd(system: torch.Tensor, rhs: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """Solve system @ x = rhs for symmetric PSD systems (R, P, P), rhs (R, P), in their dtype.

    Cholesky when every replica's factor exists with all pivots^2 above P * 1e-13 * the largest
    diagonal entry; otherwise the eigen-decomposition pseudo-inverse, dropping directions with
    eigenvalues below P * 1e-13 * the largest: the minimum-norm least-squares solution, still
    correct for rank-deficient features, where a plain Cholesky (or lstsq's default rcond in
    float32) would silently go wrong. Returns (x, fell_back).
    """
    rcond = system.shape[-1] * 1e-13
    factor, info = torch.linalg.cholesky_ex(system)
    pivots = factor.diagonal(dim1=-2, dim2=-1).square().amin(dim=-1)
    scale = system.diagonal(dim1=-2, dim2=-1).amax(dim=-1)
    if bool(((info == 0) & (pivots > rcond * scale)).all()):
        # Two triangular solves: 10x faster than cholesky_solve for one right-hand side here.
        half = torch.linalg.solve_triangular(factor, rhs.unsqueeze(-1), upper=False)
        return torch.linalg.solve_triangular(factor.mT, half, upper=True).squeeze(-1), False
    eigenvalues, vectors = torch.linalg.eigh(system)
    kept = torch.where(eigenvalues > rcond * eigenvalues[:, -1:], eigenvalues, torch.inf)
    coords = (vectors.transpose(1, 2) @ rhs.unsqueeze(-1)).squeeze(-1) / kept
    return (vectors @ coords.unsqueeze(-1)).squeeze(-1), True


def fit_ridge(
    features: Callable[[torch.Tensor], torch.Tensor],
    draw: Callable[[int], tuple[torch.Tensor, torch.Tensor]],
    n: int,
    replicas: int,
    num_features: int,
    relative_penalty: float,
    device: torch.device,
    chunk_size: int | None = None,
) -> RidgeFit:
    """Ridge on n samples from ``draw(m) -> (x, y)``, x: (m, d) and y: (m,) shared by the
    replicas, or (R, m, d) and (R, m) one sample per replica, in chunks of ``chunk_size``
    (default: about CHUNK_ELEMENTS features per chunk); ``features(x) -> (R, m, P)``."""
    chunk = chunk_size or max(1, CHUNK_ELEMENTS // (replicas * num_features))
    sums = GramAccumulator(replicas, num_features, device)
    with torch.no_grad():
        for start in range(0, n, chunk):
            x, y = draw(min(chunk, n - start))
            sums.add(features(x), y)
    return sums.solve(relative_penalty)
