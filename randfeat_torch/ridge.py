"""Closed-form fit of a model that is linear in its trained parameters (frozen or linearized net).

Minimises (1/n) sum_i (y_i - <phi(x_i), beta> - c)^2 + lambda |beta|^2 over beta and the
unpenalised output bias c, for every replica at once, in float64. The n training samples are
drawn and turned into features chunk by chunk, accumulated into the P x P Gram matrix, and
never held together: memory is O(R P^2), whatever n is.

:func:`width_path` gives the best error at every prefix width P <= N from one factorisation:
the Cholesky factor of the leading P x P block of a positive definite matrix is the leading
block of the whole factor.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch

CHUNK_ELEMENTS = 2**22  # features held at once (float64: 32 MiB)
GRAM_BLOCK = 256  # rows of the Gram matrix per matmul; only blocks on or below the diagonal
# float32 products (``optimizer.gram_products=float32``): BLAS sums the products of runs of
# FLOAT32_RUN samples (whatever the chunks) in float32, and each run is added into the float64
# sums.
FLOAT32_RUN = 2048
# The largest estimated relative error of beta (2-norm) that a float32-products fit may have:
# above it the fit is done again with float64 products (see :func:`rounding_error`).
FLOAT32_TOLERANCE = 1e-4


class NotPositiveDefinite(ValueError):
    """The penalised system has no Cholesky factor, which :func:`width_path` needs."""


@dataclass
class CentredMoments:
    """What ridge needs of a distribution of (phi, y), sample or population, float64:
    cov = Cov(phi): (R, P, P) (None where a Cholesky factor of it is at hand already),
    q = Cov(phi, y): (R, P), mu = E phi: (R, P), and the mean and variance of y: (R,) or ()."""

    cov: torch.Tensor | None
    q: torch.Tensor
    mu: torch.Tensor
    y_mean: torch.Tensor
    y_var: torch.Tensor
    rounding: RoundingProbe | None = None  # float32 products: the first run's exact rounding


@dataclass
class RoundingProbe:
    """What float32 products round in a run (see :class:`GramAccumulator`): the exact (float64)
    sums of the first run's products minus those its float32 products give, ``gram``:
    (R, P, P) (float32, its lower block triangle, as the Gram matrix is kept), ``phi_sum`` and
    ``phi_y``: (R, P); ``runs``, how many runs the sums hold (the first, exact, included), and
    ``n`` the samples in them."""

    gram: torch.Tensor
    phi_sum: torch.Tensor
    phi_y: torch.Tensor
    runs: int = 0
    n: int = 0


@dataclass
class RidgeFit:
    """The fitted beta: (R, P) and c: (R,), the training MSE (R,), and lambda used (R,); with
    float32 products the estimated relative error of beta from their rounding (R,) (see
    :func:`rounding_error`; inf for every replica where some replica's system had no trusted
    Cholesky factor)."""

    beta: torch.Tensor
    c: torch.Tensor
    train_mse: torch.Tensor
    penalty: torch.Tensor
    fallback: bool
    rounding_error: torch.Tensor | None = None


def gram_blocks(size: int) -> list[tuple[int, int]]:
    """The (start, stop) rows of each GRAM_BLOCK-row block of a size x size Gram matrix."""
    return [(start, min(size, start + GRAM_BLOCK)) for start in range(0, size, GRAM_BLOCK)]


class GramAccumulator:
    """Running sums for centred least squares over chunks of (features, targets), in float64.

    ``products``: the dtype the features' products are computed and summed in by BLAS. float64
    (the default) rounds only as float64 does. float32 runs at about twice the float64 rate on
    CPUs, and many times it on GPUs with slow float64: the products of each run of FLOAT32_RUN
    samples (the last may be shorter; a run spans chunks) are summed in float32, into a float32
    buffer, and the run added into the float64 sums. The first run goes into the sums in
    float64 instead, and its float32 sums into the moments' ``rounding``: what float32 lost on
    it, exactly, for :func:`rounding_error`. Holds R P^2 float32 values for the run and as many
    for the rounding, on top of the float64 Gram matrix."""

    def __init__(
        self,
        replicas: int,
        features: int,
        device: torch.device,
        products: torch.dtype = torch.float64,
    ) -> None:
        kw = dict(dtype=torch.float64, device=device)
        self.products, self.runs, self.in_run = products, 0, 0
        self.run: torch.Tensor | None = None  # float32 products: this run's Gram sums
        self.probe: RoundingProbe | None = None
        self.n = 0
        self.gram = torch.zeros(replicas, features, features, **kw)  # sum phi phi^T
        self.phi_y = torch.zeros(replicas, features, **kw)  # sum phi y
        self.phi_sum = torch.zeros(replicas, features, **kw)
        self.y_sum = torch.zeros(replicas, **kw)
        self.y_sq = torch.zeros(replicas, **kw)

    def add(self, phi: torch.Tensor, y: torch.Tensor) -> None:
        """phi: (R, m, P), y: (m,) shared by the replicas or (R, m) one sample per replica."""
        if self.products != torch.float64:
            y = y.expand(phi.shape[0], phi.shape[1])
            start = 0
            while start < phi.shape[1]:
                stop = start + FLOAT32_RUN - self.in_run
                self._add_to_run(phi[:, start:stop], y[:, start:stop])
                start = stop
                if self.in_run == FLOAT32_RUN:
                    self._end_run()
            return
        phi = phi.double()
        y = y.double().expand(phi.shape[0], phi.shape[1])
        self.n += y.shape[1]
        # The Gram matrix is symmetric: accumulate its lower block triangle only (about
        # (1 + 1/blocks) / 2 of the flops), and mirror it once in solve().
        for start, stop in gram_blocks(phi.shape[2]):
            self.gram[:, start:stop, :stop].baddbmm_(
                phi[:, :, start:stop].transpose(1, 2), phi[:, :, :stop]
            )
        # y as the left factor, (1, m) @ (m, P): bmm with a one- or two-column right factor
        # runs 5-15 times slower on CPU (its batched matrix-vector path; measured).
        self.phi_y += torch.bmm(y.unsqueeze(1), phi).squeeze(1)
        self.phi_sum += phi.sum(dim=1)
        self.y_sum += y.sum(dim=1)
        self.y_sq += y.square().sum(dim=1)

    def _add_to_run(self, phi: torch.Tensor, y: torch.Tensor) -> None:
        """Samples of the current run (phi: (R, m, P), y: (R, m)) in float32 products; in the
        first run, also exactly into the float64 sums (which no other run reaches before it
        ends)."""
        first, blocks = self.runs == 0, gram_blocks(phi.shape[2])
        if self.run is None:
            self.run = torch.empty(self.gram.shape, dtype=self.products, device=phi.device)
        exact = phi.double() if first else None
        phi, y64 = phi.to(self.products), y.double()
        beta = 0 if self.in_run == 0 else 1  # a new run overwrites the last one's sums
        for start, stop in blocks:
            rows, cols = phi[:, :, start:stop].transpose(1, 2), phi[:, :, :stop]
            self.run[:, start:stop, :stop].baddbmm_(rows, cols, beta=beta)
            if first:
                rows, cols = exact[:, :, start:stop].transpose(1, 2), exact[:, :, :stop]
                self.gram[:, start:stop, :stop].baddbmm_(rows, cols)
        ones_y = torch.stack([torch.ones_like(y64), y64], dim=1)  # (R, 2, m): the left factor
        sums = torch.bmm(ones_y.to(phi.dtype), phi).double()  # (R, 2, P)
        if first:
            if self.probe is None:
                zeros = torch.zeros_like(self.phi_sum)
                self.probe = RoundingProbe(torch.empty_like(self.run), zeros, zeros.clone())
            exact_sums = torch.bmm(ones_y, exact)
            self.probe.phi_sum += exact_sums[:, 0] - sums[:, 0]
            self.probe.phi_y += exact_sums[:, 1] - sums[:, 1]
            sums = exact_sums
        self.phi_sum += sums[:, 0]
        self.phi_y += sums[:, 1]
        self.n += y64.shape[1]
        self.in_run += y64.shape[1]
        self.y_sum += y64.sum(dim=1)
        self.y_sq += y64.square().sum(dim=1)

    def _end_run(self) -> None:
        """Add the run's float32 sums into the float64 ones; after the first run, which is in
        them exactly already, keep what float32 lost on it in the probe instead."""
        if self.in_run == 0:
            return
        for start, stop in gram_blocks(self.gram.shape[-1]):
            block, ran = self.gram[:, start:stop, :stop], self.run[:, start:stop, :stop]
            if self.runs == 0:
                torch.sub(block, ran, out=self.probe.gram[:, start:stop, :stop])
            else:
                block += ran
        self.runs += 1
        self.in_run = 0

    def moments(self) -> CentredMoments:
        """The centred sample moments. Works in place on the Gram matrix, so that a solve holds
        two P x P matrices per replica (the system and its factor); the accumulator is spent
        afterwards."""
        if self.products != torch.float64:
            self._end_run()
            self.run = None  # the accumulator is spent: free the run's buffer for the solve
        n = self.n
        mirror_lower(self.gram)
        mu = self.phi_sum / n  # (R, P)
        y_mean = self.y_sum / n
        cov = self.gram.div_(n).baddbmm_(mu.unsqueeze(2), mu.unsqueeze(1), alpha=-1)  # Cov phi
        q = self.phi_y / n - mu * y_mean.unsqueeze(-1)  # Cov(phi, y)
        var = self.y_sq / n - y_mean.square()
        if self.probe is not None:
            self.probe.runs, self.probe.n = self.runs, n
        return CentredMoments(cov, q, mu, y_mean, var, self.probe)


def mirror_lower(gram: torch.Tensor) -> torch.Tensor:
    """Copy the lower triangle of (R, P, P) Gram matrices onto the upper, in place, block by
    block, so that they are exactly symmetric."""
    for start, stop in gram_blocks(gram.shape[-1]):
        gram[:, :start, start:stop] = gram[:, start:stop, :start].transpose(1, 2)
        block = gram[:, start:stop, start:stop]
        block.copy_(block.tril() + block.tril(-1).transpose(1, 2))
    return gram


def relative_lambda(cov: torch.Tensor, relative_penalty: float) -> torch.Tensor:
    """lambda = relative_penalty * trace(cov) / P per replica: (R,) (it depends on the width)."""
    return relative_penalty * cov.diagonal(dim1=1, dim2=2).sum(-1) / cov.shape[-1]


def solve_centred(moments: CentredMoments, penalty: torch.Tensor) -> RidgeFit:
    """Ridge from centred moments (``moments.cov`` is overwritten) with lambda = ``penalty``:
    (R,). Solves (cov + lambda) beta = q; c makes the mean right. The returned MSE is
    Var y - 2 <beta, q> + beta^T cov beta, on the same distribution as the moments."""
    cov, q = moments.cov, moments.q
    cov.diagonal(dim1=1, dim2=2).add_(penalty.unsqueeze(-1))
    beta, fallback, factor = solve_psd(cov, q)
    quadratic = torch.einsum("rp,rpq,rq->r", beta, cov, beta) - penalty * beta.square().sum(-1)
    mse = moments.y_var - 2 * (beta * q).sum(-1) + quadratic
    c = moments.y_mean - (moments.mu * beta).sum(-1)
    fit = RidgeFit(beta, c, mse.clamp_min(0), penalty, fallback)
    if moments.rounding is not None:
        fit.rounding_error = rounding_error(moments, factor, beta)
    return fit


def rounding_error(
    moments: CentredMoments, factor: torch.Tensor | None, beta: torch.Tensor
) -> torch.Tensor:
    """The estimated relative error of beta, |d beta| / |beta| (R,), that float32 products
    caused, from the exact rounding of their first run (``moments.rounding``).

    To first order, sums perturbed by dG, d(sum phi) and d(sum phi y) move the solution of
    (cov + lambda) beta = q by (cov + lambda)^{-1} (dq - dcov beta), with dcov = dG / n -
    (dmu mu^T + mu dmu^T), dmu = d(sum phi) / n, dq = d(sum phi y) / n - dmu E y (the sums
    of y are float64). The first run is in the sums exactly; the estimate takes each of the
    others to move beta as much as the first one's rounding would, so runs - 1 times that
    (independent roundings add up to about sqrt(runs - 1) times). That is an assumption about
    the runs, not a bound. Left out: a relative penalty's lambda, computed from the rounded
    trace of cov, moves too, by |tr dcov| / tr cov (1e-8 or so, far below the tolerance).
    ``factor``: the lower Cholesky factor of cov + lambda (all replicas'); None (some replica's
    is not trusted) gives inf for every replica."""
    probe = moments.rounding
    if factor is None:
        return torch.full_like(beta[:, 0], torch.inf)
    n = probe.n
    mirror_lower(probe.gram)
    d_mu = probe.phi_sum / n
    d_cov_beta = (
        torch.bmm(probe.gram, beta.to(probe.gram.dtype).unsqueeze(-1)).squeeze(-1).double() / n
        - d_mu * (moments.mu * beta).sum(-1, keepdim=True)
        - moments.mu * (d_mu * beta).sum(-1, keepdim=True)
    )
    d_q = probe.phi_y / n - d_mu * moments.y_mean.unsqueeze(-1)
    d_beta = cholesky_solve(factor, d_q - d_cov_beta)
    return (probe.runs - 1) * d_beta.norm(dim=-1) / beta.norm(dim=-1)


PIVOT_RCOND = 1e-13  # times P times the largest diagonal entry: the smallest pivot^2 trusted


def cholesky_factor(system: torch.Tensor) -> torch.Tensor | None:
    """The lower Cholesky factor of symmetric (R, P, P) systems, or None unless every replica's
    exists with all pivots^2 above P * PIVOT_RCOND * its largest diagonal entry."""
    factor, info = torch.linalg.cholesky_ex(system)
    pivots = factor.diagonal(dim1=-2, dim2=-1).square().amin(dim=-1)
    scale = system.diagonal(dim1=-2, dim2=-1).amax(dim=-1)
    trusted = (info == 0) & (pivots > system.shape[-1] * PIVOT_RCOND * scale)
    return factor if bool(trusted.all()) else None


def cholesky_solve(factor: torch.Tensor, rhs: torch.Tensor) -> torch.Tensor:
    """x with L L^T x = rhs: factor L (..., P, P) lower, rhs (..., P)."""
    # Two triangular solves: 10x faster than torch.cholesky_solve for one right-hand side here.
    half = torch.linalg.solve_triangular(factor, rhs.unsqueeze(-1), upper=False)
    return torch.linalg.solve_triangular(factor.mT, half, upper=True).squeeze(-1)


def solve_psd(
    system: torch.Tensor, rhs: torch.Tensor
) -> tuple[torch.Tensor, bool, torch.Tensor | None]:
    """Solve system @ x = rhs for symmetric PSD systems (R, P, P), rhs (R, P), in their dtype.

    Cholesky when every replica's factor exists with all pivots^2 above P * 1e-13 * the largest
    diagonal entry; otherwise the eigen-decomposition pseudo-inverse, dropping directions with
    eigenvalues below P * 1e-13 * the largest: the minimum-norm least-squares solution, still
    correct for rank-deficient features, where a plain Cholesky (or lstsq's default rcond in
    float32) would silently go wrong. Returns (x, fell_back, the Cholesky factor or None).
    """
    factor = cholesky_factor(system)
    if factor is not None:
        return cholesky_solve(factor, rhs), False, factor
    rcond = system.shape[-1] * PIVOT_RCOND
    eigenvalues, vectors = torch.linalg.eigh(system)
    kept = torch.where(eigenvalues > rcond * eigenvalues[:, -1:], eigenvalues, torch.inf)
    coords = (vectors.transpose(1, 2) @ rhs.unsqueeze(-1)).squeeze(-1) / kept
    return (vectors @ coords.unsqueeze(-1)).squeeze(-1), True, None


def sampled_moments(
    features: Callable[[torch.Tensor], torch.Tensor],
    draw: Callable[[int], tuple[torch.Tensor, torch.Tensor]],
    n: int,
    replicas: int,
    num_features: int,
    device: torch.device,
    chunk_size: int | None = None,
    products: torch.dtype = torch.float64,
) -> CentredMoments:
    """The centred moments of n samples from ``draw(m) -> (x, y)``, x: (m, d) and y: (m,) shared
    by the replicas, or (R, m, d) and (R, m) one sample per replica, in chunks of
    ``chunk_size`` (default: about CHUNK_ELEMENTS features per chunk); ``features(x) ->
    (R, m, P)``; their products in ``products`` (see :class:`GramAccumulator`)."""
    chunk = chunk_size or max(1, CHUNK_ELEMENTS // (replicas * num_features))
    sums = GramAccumulator(replicas, num_features, device, products)
    with torch.no_grad():
        for start in range(0, n, chunk):
            x, y = draw(min(chunk, n - start))
            sums.add(features(x), y)
    return sums.moments()


def fit_ridge(
    features: Callable[[torch.Tensor], torch.Tensor],
    draw: Callable[[int], tuple[torch.Tensor, torch.Tensor]],
    n: int,
    replicas: int,
    num_features: int,
    relative_penalty: float,
    device: torch.device,
    chunk_size: int | None = None,
    products: torch.dtype = torch.float64,
) -> RidgeFit:
    """Ridge on n samples (see :func:`sampled_moments`) with the penalty relative to the
    features' mean variance (:func:`relative_lambda`)."""
    moments = sampled_moments(
        features, draw, n, replicas, num_features, device, chunk_size, products
    )
    return solve_centred(moments, relative_lambda(moments.cov, relative_penalty))


def path_widths(width: int, ratio: float, dense_below: int = 0) -> list[int]:
    """Widths 1..width: every one up to ``dense_below``, then a geometric grid of this
    ``ratio`` (rounded, without repeats), and ``width`` itself."""
    widths = set(range(1, min(width, dense_below) + 1)) | {width}
    k = 0
    while (w := round(ratio**k)) <= width:
        widths.add(max(1, w))
        k += 1
    return sorted(widths)


SOLVED_RATIO = math.sqrt(2.0)  # the widths at which the width path solves back for beta


@dataclass
class WidthPath:
    """Ridge at every prefix width of one draw of features (see :func:`width_path`).

    ``objective``: (R, N), min over beta, c of MSE + lambda |beta|^2 with the first P features,
    P = 1..N. At the ``widths`` (ratio sqrt 2, and N): the solutions ``beta``: (R, N, G)
    (zero past P), ``c`` and the MSE without the penalty: (R, G)."""

    objective: torch.Tensor
    widths: list[int]
    beta: torch.Tensor
    c: torch.Tensor
    mse: torch.Tensor
    penalty: torch.Tensor

    def fit(self) -> RidgeFit:
        """The fit with all N features."""
        return RidgeFit(self.beta[..., -1], self.c[:, -1], self.mse[:, -1], self.penalty, False)


def factorise(cov: torch.Tensor, penalty: torch.Tensor) -> torch.Tensor:
    """The lower Cholesky factor of cov + lambda: (R, P, P), lambda = ``penalty`` (R,) (cov is
    overwritten). Raises :class:`NotPositiveDefinite` where the factor is not trusted (see
    :func:`cholesky_factor`): lambda is too small for this system."""
    cov.diagonal(dim1=1, dim2=2).add_(penalty.unsqueeze(-1))
    factor = cholesky_factor(cov)
    if factor is None:
        raise NotPositiveDefinite("cov + lambda has no trusted Cholesky factor")
    return factor


def width_path(factor: torch.Tensor, moments: CentredMoments, penalty: torch.Tensor) -> WidthPath:
    """Ridge with lambda = ``penalty`` (R,), the same at every width, for the first P features,
    every P <= N, from the one Cholesky factor L of cov + lambda (:func:`factorise`; the
    moments' cov is not read).

    With z = L^{-1} q, the leading P entries of z are L_P^{-1} q_P, so the penalised objective
    at width P is Var y - sum_{i <= P} z_i^2 (a cumulative sum); beta_P = L_P^{-T} z_P, one
    triangular solve per width at which it is wanted (about 2 N^2 flops for all of them)."""
    z = torch.linalg.solve_triangular(factor, moments.q.unsqueeze(-1), upper=False).squeeze(-1)
    objective = (moments.y_var.unsqueeze(-1) - z.square().cumsum(-1)).clamp_min(0)
    widths = path_widths(z.shape[-1], SOLVED_RATIO)
    beta = z.new_zeros(*z.shape, len(widths))
    for g, p in enumerate(widths):
        top = factor[:, :p, :p].mT
        beta[:, :p, g] = torch.linalg.solve_triangular(top, z[:, :p, None], upper=True)[..., 0]
    columns = torch.tensor(widths, device=z.device) - 1
    mse = objective[:, columns] - penalty.unsqueeze(-1) * beta.square().sum(1)
    c = moments.y_mean.unsqueeze(-1) - torch.einsum("rp,rpg->rg", moments.mu, beta)
    return WidthPath(objective, widths, beta, c, mse.clamp_min(0), penalty)


@dataclass
class PenaltyPath:
    """Ridge at each of K penalties (see :func:`penalty_path`): ``penalty``: (R, K) lambda on
    beta, ``beta``: (R, P, K), ``c`` and ``mse`` (the MSE on the moments' distribution): (R, K),
    and ``df``: (R, K) the degrees of freedom of the fitted values, 1 + sum_i e_i / (e_i +
    lambda) over the eigenvalues e_i of cov (the 1: the unpenalised constant); ``fallback``:
    whether any fit took the eigen fallback of :func:`solve_psd`."""

    penalty: torch.Tensor
    beta: torch.Tensor
    c: torch.Tensor
    mse: torch.Tensor
    df: torch.Tensor
    fallback: bool

    def gcv(self, n: int) -> torch.Tensor:
        """Generalised cross-validation on n samples: mse / (1 - df / n)^2, (R, K) (Golub, Heath
        and Wahba 1979); infinite where df >= n."""
        left = (1 - self.df / n).clamp_min(0)
        return torch.where(left > 0, self.mse / left.square(), torch.inf)

    def fit(self, k: torch.Tensor) -> RidgeFit:
        """The fit at penalty index k: (R,) one index per replica."""
        rows = torch.arange(self.beta.shape[0], device=k.device)
        return RidgeFit(
            self.beta[rows, :, k],
            self.c[rows, k],
            self.mse[rows, k],
            self.penalty[rows, k],
            self.fallback,
        )


def penalty_path(moments: CentredMoments, penalties: torch.Tensor) -> PenaltyPath:
    """Ridge at every penalty (R, K): one :func:`solve_centred` (a Cholesky factorisation, the
    eigen fallback where singular) per penalty, and the degrees of freedom from the eigenvalues
    of cov, computed once (no eigenvectors). Against one full eigendecomposition, which gives
    every penalty in O(P^2), it measured 0.79x to 1.6x as fast for 11 penalties at P = 2048
    (``scripts/bench.py``, ``penalty_path``): neither wins by much there. Eigenvalues below
    P * PIVOT_RCOND of the largest count as zero, as the fallback drops them."""
    fits = [
        solve_centred(replace(moments, cov=moments.cov.clone()), penalties[:, k])
        for k in range(penalties.shape[1])
    ]
    e = torch.linalg.eigvalsh(moments.cov).unsqueeze(-1)  # (R, P, 1)
    e = torch.where(e > e.shape[1] * PIVOT_RCOND * e.amax(1, keepdim=True), e, 0.0)
    lam = penalties.unsqueeze(1)
    kept = (e + lam) > 0
    df = 1 + torch.where(kept, e / torch.where(kept, e + lam, 1.0), 0.0).sum(1)
    return PenaltyPath(
        penalties,
        torch.stack([f.beta for f in fits], -1),
        torch.stack([f.c.expand(penalties.shape[0]) for f in fits], -1),
        torch.stack([f.train_mse for f in fits], -1),
        df,
        any(f.fallback for f in fits),
    )
