"""The width-infinity limits of random features and of the NT model: kernel ridge regression.

``model=kernel`` (``model.kernel=rf`` or ``ntk``) fits f(x) = c + sum_i alpha_i k(x, x_i) on the
n_train samples, for the kernel that the configured net's features average to over its random
first layer. Per hidden unit j, with the output multiplier m taken out (u = m a, the effective
output weights that the ridge penalty is on), the features are psi_j(x) = act(p_j(x)) for
random features and [act(p_j), a0_j act'(p_j) x, a0_j act'(p_j)] for the NT model
(:meth:`LinearizedNet.ridge_features` / m), p_j(x) = <w_j, x> + b_j. The kernel is
k(x, x') = E[<psi_j(x), psi_j(x')>] over (w_j, b_j, a0_j), so that (1/N) sum_j psi_j psi_j^T
-> K as the width N grows:

  rf:  k = E[act(p) act(p')]
  ntk: k = E[act(p) act(p')] + E[a0^2] E[act'(p) act'(p')] (<x, x'> + [bias])

Under ``init=gaussian`` (w ~ N(0, I/d), b ~ N(0, 1) with ``bias``) p and p' are jointly
Gaussian with variances q = |x|^2/d + [bias], q', and covariance s = <x, x'>/d + [bias]; with
cos(theta) = s / sqrt(q q') (the angle of the augmented inputs (x / sqrt(d), 1)):

  relu:       E[act act'] = sqrt(q q') (sin theta + (pi - theta) cos theta) / 2 pi
              E[1{p > 0} 1{p' > 0}] = (pi - theta) / 2 pi
              (the arc-cosine kernels of degree 1 and 0, Cho & Saul 2009, halved: theirs have
              weight 2 on a standard Gaussian)
  quadratic:  E[p^2 p'^2] = q q' + 2 s^2 (Isserlis), E[2p 2p'] = 4 s

Under ``init=sphere`` (w uniform on the unit sphere, no bias) the ReLU terms are homogeneous of
degree 2 and 0 in w and E|w|^2 = 1, so they are the Gaussian ones; the quadratic's degree-4
term is E[(w.x)^2 (w.x')^2] = (|x|^2 |x'|^2 + 2 <x, x'>^2) / (d (d + 2)). ``validate`` refuses
what has no closed form here (gelu, tanh, softplus; the sphere with a bias) and the NT kernel
where its first-layer part does not survive the limit (``parameterization=standard``:
a0 ~ N(0, 1/width); ``output_init=zero``: a0 = 0), each with one sentence.

The fit is ridge's own in the dual: with K_c = H K H (H the centring), y_c = y - mean y, it
solves (K_c + n lambda I) alpha = y_c, and c = mean y - mean_i (K alpha)_i: exactly the
centred ridge of :mod:`randfeat_torch.ridge` on features whose inner products are K, with the
unpenalised output bias. Ridge on N units with penalty lambda_u |u|^2 is this with
K_N = (1/N) sum_j psi_j psi_j^T and lambda = lambda_u / N: the kernel fit at lambda is the limit
of the ridge fits at lambda_u = N lambda (absolute), or at a relative penalty P times the
kernel's (P = ridge_feature_count), as N grows; at a fixed ridge penalty, the limit is the
kernel fit at lambda = 0 (the minimum-norm interpolant). The kernel's relative penalty is
lambda = ``penalty`` * trace(K_c) / n, the features' mean variance of the limit.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from randfeat_torch.config import ConfigError, penalty_list
from randfeat_torch.ridge import PIVOT_RCOND, PenaltyPath, RidgeFit, cholesky_solve

if TYPE_CHECKING:
    from randfeat_torch.data import Data

KERNEL_BLOCK_ELEMENTS = 2**22  # kernel entries computed at once (float64: 32 MiB a buffer)
CLOSED_FORMS = ("relu", "quadratic")  # the activations whose kernels are written out here


@dataclass(frozen=True)
class KernelSpec:
    """What a kernel depends on: ``kind`` (rf | ntk), the activation, the hidden bias, the
    first layer's init (gaussian | sphere), d, and E[a0^2] (the NT part's weight)."""

    kind: str
    activation: str
    bias: bool
    init: str
    d: int
    a0_variance: float = 1.0


def kernel_spec(model: DictConfig) -> KernelSpec:
    """The :class:`KernelSpec` of a ``model=kernel`` config (validated)."""
    return KernelSpec(
        str(model.kernel), str(model.activation), bool(model.bias), str(model.init), model.d
    )


def _variances(spec: KernelSpec, x: torch.Tensor) -> torch.Tensor:
    """Var p(x) = |x|^2 / d + [bias]: (n,)."""
    return x.square().sum(1).div_(spec.d).add_(1.0 if spec.bias else 0.0)


def _kernel_block(
    spec: KernelSpec,
    x1: torch.Tensor,
    x2: torch.Tensor,
    q2: torch.Tensor,
    out: torch.Tensor,
    work: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
) -> torch.Tensor:
    """k(x1_i, x2_j) into ``out``: (m, n), from x1: (m, d), x2: (n, d) and Var p(x2) = q2: (n,),
    float64, in place in ``out`` and the three (m, n) buffers of ``work`` (fresh buffers would
    cost more in page faults than the arithmetic)."""
    if spec.activation not in CLOSED_FORMS or (spec.init == "sphere" and spec.bias):
        raise ValueError(f"no closed-form kernel for {spec}")
    bias = 1.0 if spec.bias else 0.0
    cov, scale, rho = work
    inner = torch.mm(x1, x2.T, out=out)  # <x, x'>
    torch.div(inner, spec.d, out=cov).add_(bias)  # Cov(p, p')
    torch.outer(_variances(spec, x1), q2, out=scale)  # Var p Var p'
    ntk = spec.kind == "ntk"
    if spec.activation == "quadratic":
        scale.addcmul_(cov, cov, value=2.0)  # E[p^2 p'^2]
        if spec.init == "sphere":
            scale.mul_(spec.d / (spec.d + 2.0))
        if ntk:  # + E[2p 2p'] (<x, x'> + bias)
            scale.addcmul_(cov, inner.add_(bias), value=4.0 * spec.a0_variance)
        return out.copy_(scale)
    scale.sqrt_()  # sqrt(q q'): 0 only where p = 0 surely (then cov = 0 too)
    torch.div(cov, scale, out=rho).nan_to_num_(nan=0.0).clamp_(-1.0, 1.0)  # cos theta
    if ntk:  # the weight of (pi - theta): cov + E[a0^2] (<x, x'> + bias)
        cov.add_(inner.add_(bias), alpha=spec.a0_variance)
    sin = torch.mul(rho, rho, out=out).neg_().add_(1.0).clamp_min_(0.0).sqrt_()
    scale.mul_(sin)
    rho.acos_().neg_().add_(math.pi)  # pi - theta
    # (sqrt(q q') sin theta + (pi - theta) weight) / 2 pi
    return torch.addcmul(scale, rho, cov, out=out).div_(2.0 * math.pi)


def _diagonal(spec: KernelSpec, x: torch.Tensor) -> torch.Tensor:
    """k(x_i, x_i) exactly (theta = 0, where acos loses half the digits): (n,)."""
    bias = 1.0 if spec.bias else 0.0
    sq = x.square().sum(1)
    q = sq / spec.d + bias
    if spec.activation == "quadratic":
        rf = 3 * q.square() * (spec.d / (spec.d + 2.0) if spec.init == "sphere" else 1.0)
        return rf + 4.0 * spec.a0_variance * q * (sq + bias) if spec.kind == "ntk" else rf
    weight = q + spec.a0_variance * (sq + bias) if spec.kind == "ntk" else q
    return weight / 2


def kernel_matrix(
    spec: KernelSpec,
    x1: torch.Tensor,
    x2: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """K_ij = k(x1_i, x2_j) in float64: x1 (m, d), x2 (n, d) -> (m, n), in row blocks of about
    KERNEL_BLOCK_ELEMENTS entries (into ``out`` when given). Without x2, the Gram matrix of x1,
    its diagonal exact."""
    x1 = x1.double()
    x2 = x1 if x2 is None else x2.double()
    m, n = x1.shape[0], x2.shape[0]
    out = torch.empty(m, n, dtype=torch.float64, device=x1.device) if out is None else out
    rows = min(m, max(1, KERNEL_BLOCK_ELEMENTS // max(1, n)))
    work = tuple(torch.empty(rows, n, dtype=torch.float64, device=x1.device) for _ in range(3))
    q2 = _variances(spec, x2)
    for start in range(0, m, rows):
        stop = min(m, start + rows)
        part = tuple(buffer[: stop - start] for buffer in work)
        _kernel_block(spec, x1[start:stop], x2, q2, out[start:stop], part)
    if x2 is x1:
        out.diagonal().copy_(_diagonal(spec, x1))
    return out


class KernelModel(nn.Module):
    """f_r(x) = c_r + sum_i a_ri k(x, x_i) over its training inputs x_i: R replicas sharing
    one set of inputs (1, n, d) or each with its own (R, n, d). Before a fit it holds none and
    predicts c = 0. Its dual weights ``a`` (R, n) play the output layer's part (``width``: n,
    ``multiplier``: 1) in the record's norms and in :meth:`ridge_features`."""

    multiplier = 1.0

    def __init__(self, spec: KernelSpec, replicas: int, device: torch.device | str = "cpu"):
        super().__init__()
        self.spec, self.replicas, self.d = spec, replicas, spec.d
        kw = dict(dtype=torch.float64, device=torch.device(device))
        self.register_buffer("x", torch.zeros(1, 0, spec.d, **kw))
        self.register_buffer("a", torch.zeros(replicas, 0, **kw))
        self.register_buffer("c", torch.zeros(replicas, **kw))

    @property
    def width(self) -> int:
        """Terms of the dual expansion (at least 1, so that evaluation chunks are sized)."""
        return max(1, self.x.shape[1])

    def set_inputs(self, x: torch.Tensor) -> None:
        """The training inputs: (n, d) shared by the replicas or (R, n, d); weights reset."""
        self.x = (x.unsqueeze(0) if x.dim() == 2 else x).double()
        self.a = self.x.new_zeros(self.replicas, self.x.shape[1])

    def ridge_features(self, x: torch.Tensor) -> torch.Tensor:
        """k(x, x_i) for the training inputs: x (m, d) -> (R, m, n) float64 (a view of one
        matrix when the replicas share their inputs)."""
        if self.x.shape[0] == 1:
            k = kernel_matrix(self.spec, x, self.x[0])
            return k.unsqueeze(0).expand(self.replicas, *k.shape)
        return torch.stack([kernel_matrix(self.spec, x, x_r) for x_r in self.x])

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (m, d) -> predictions (R, m), float32, computed in float64 in row chunks."""
        rows = max(1, KERNEL_BLOCK_ELEMENTS // self.width)
        out = self.c.unsqueeze(1).repeat(1, x.shape[0])
        for start in range(0, x.shape[0], rows):
            part = x[start : start + rows]
            if self.x.shape[0] == 1:  # shared inputs: one kernel matrix for every replica
                out[:, start : start + rows] += (
                    kernel_matrix(self.spec, part, self.x[0]) @ self.a.T
                ).T
            else:
                for r, x_r in enumerate(self.x):
                    out[r, start : start + rows] += kernel_matrix(self.spec, part, x_r) @ self.a[r]
        return out.float()

    def load_ridge_solution(self, beta: torch.Tensor, c: torch.Tensor) -> None:
        """Set the dual weights a from beta: (R, n) and c: (R,), in float64."""
        self.a = beta.detach().double().clone()
        self.c = c.detach().double().clone()


@dataclass
class DualFit:
    """Kernel ridge at K penalties on one set of samples: ``alpha`` (n, K), ``c`` (K,), the
    training MSE (K,), lambda (K,) in (K_c + n lambda I) alpha = y_c, the degrees of freedom
    1 + sum_i e_i / (e_i + n lambda) (K,) or None, whether the eigen fallback was taken, and
    the seconds spent on the kernel matrix and on the solves."""

    alpha: torch.Tensor
    c: torch.Tensor
    mse: torch.Tensor
    penalty: torch.Tensor
    df: torch.Tensor | None
    fallback: bool
    matrix_s: float
    solve_s: float


def _seconds(device: torch.device) -> float:
    """perf_counter once the device's queued work is done."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def centre_(gram: torch.Tensor) -> torch.Tensor:
    """H K H in place (H = I - 11^T / n), using K's symmetry: returns K's row means (n,)."""
    means = gram.mean(1)
    gram.sub_(means.unsqueeze(1)).sub_(means.unsqueeze(0)).add_(means.mean())
    return means


def _check_room_for_eigh(n: int, penalty: float, device: torch.device) -> None:
    """Refuse, with the numbers, the eigendecomposition fallback of a positive penalty whose
    Cholesky factor failed where its KERNEL_MATRICES_EIGH n x n matrices do not fit (the
    machine check counted them only for penalty 0)."""
    from randfeat_torch.device import free_memory  # device imports this module

    need = KERNEL_MATRICES_EIGH * 8 * n**2
    free, where = free_memory(device.type)
    if need > free:
        raise ConfigError(
            "optimizer.penalty",
            penalty,
            f"the kernel system has no trusted Cholesky factor at this penalty, and its "
            f"eigendecomposition needs about {need / 2**30:.3g} GiB more, beyond the "
            f"{free / 2**30:.3g} GiB {where}; use a larger penalty or a smaller n_train",
        )


def _solve_shifted(
    system: torch.Tensor,
    rhs: torch.Tensor,
    shift: float,
    centred: Callable[[torch.Tensor], torch.Tensor],
    penalty: float,
) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """(alpha, training MSE, fell back) for (K_c + shift I) alpha = rhs, ``system`` holding
    K_c and overwritten by the factor. Cholesky in place when every pivot^2 is above
    n * PIVOT_RCOND * the largest diagonal entry (as :func:`ridge.cholesky_factor`); then the
    residual rhs - K_c alpha is shift * alpha. Otherwise (shift 0 among them: K_c is singular
    along the constant) the eigendecomposition of ``centred(system)`` (K_c again, into the
    buffer), dropping eigenvalues of K_c + shift below n * PIVOT_RCOND of the largest, as
    :func:`ridge.solve_psd` does: the minimum-norm solution. ``penalty``: the configured value
    that gave ``shift``, for the message where the fallback does not fit in memory."""
    n = system.shape[0]
    if shift > 0:
        system.diagonal().add_(shift)
        scale = float(system.diagonal().max())
        info = torch.empty((), dtype=torch.int32, device=system.device)
        # In the column-major view LAPACK factorises in place; a row-major one is copied first.
        factor = system.mT
        torch.linalg.cholesky_ex(factor, out=(factor, info))
        pivots = float(factor.diagonal().square().min())
        if int(info) == 0 and pivots > n * PIVOT_RCOND * scale:
            alpha = cholesky_solve(factor, rhs)
            return alpha, (shift * alpha).square().mean(), False
        centred(system)  # the failed factor overwrote K_c
        _check_room_for_eigh(n, penalty, system.device)
    e, vectors = torch.linalg.eigh(system)
    shifted = e + shift
    kept = shifted > n * PIVOT_RCOND * shifted[-1]
    z = vectors.T @ rhs
    coef = torch.where(kept, z / torch.where(kept, shifted, 1.0), 0.0)
    alpha = vectors @ coef
    return alpha, (z - e * coef).square().mean(), True


def dual_ridge(
    spec: KernelSpec,
    x: torch.Tensor,
    y: torch.Tensor,
    penalties: list[float],
    relative: bool,
    degrees: bool,
) -> DualFit:
    """Kernel ridge on x: (n, d), y: (n,) at each penalty (``relative``: times trace(K_c) / n),
    in float64, with the n x n kernel matrix built once and centred in place. One penalty: it
    is factorised in place (n^2 floats in all). Several: a Cholesky of a copy per penalty, the
    last in place (2 n^2), and with ``degrees`` the eigenvalues of K_c once for the degrees of
    freedom of every penalty (one full eigendecomposition would give every penalty from one
    factorisation, but costs some 10 to 70 Choleskys on a CPU: measured in docs/usage.md)."""
    n = x.shape[0]
    start = _seconds(x.device)
    y = y.double()
    y_mean = y.mean()
    y_c = y - y_mean
    gram = kernel_matrix(spec, x)
    means = centre_(gram)
    built = _seconds(x.device)
    scale = float(gram.diagonal().mean()) if relative else 1.0
    lam = torch.tensor(penalties, dtype=torch.float64, device=gram.device) * scale

    def centred(out: torch.Tensor) -> torch.Tensor:
        kernel_matrix(spec, x, out=out)
        centre_(out)
        return out

    df = None
    if degrees:
        e = torch.linalg.eigvalsh(gram)
        e = torch.where(e > n * PIVOT_RCOND * e[-1], e, 0.0).unsqueeze(-1)
        shift = n * lam
        kept = shift + e > 0
        df = 1 + torch.where(kept, e / torch.where(kept, shift + e, 1.0), 0.0).sum(0)
    alphas, mses, fallback = [], [], False
    work = torch.empty_like(gram) if len(penalties) > 1 else None
    for k in range(len(penalties)):
        if k == len(penalties) - 1:
            system, work = gram, None  # the last penalty factorises K_c itself
        else:
            system = work.copy_(gram)
        alpha, mse, fell = _solve_shifted(system, y_c, n * float(lam[k]), centred, penalties[k])
        alphas.append(alpha)
        mses.append(mse)
        fallback |= fell
    del gram, system
    alpha = torch.stack(alphas, -1)
    c = y_mean - means @ alpha
    solved = _seconds(x.device)
    return DualFit(alpha, c, torch.stack(mses), lam, df, fallback, built - start, solved - built)


def _training_sample(data: Data, n: int, chunk: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """n samples of the training stream, drawn in chunks of ``chunk`` (all at once if None), as
    ridge draws them with that ``optimizer.chunk_size``: the same samples."""
    chunk = chunk or n
    parts = [data.draw(min(chunk, n - start)) for start in range(0, n, chunk)]
    axis = 0 if data.replicas is None else 1
    return torch.cat([p[0] for p in parts], axis), torch.cat([p[1] for p in parts], axis)


class KernelFits:
    """The last kernel fit of this process, for the next job: a sweep over width (which the
    kernel does not read, as in rf_vs_nt_vs_nn) fits each kernel once. Keyed by the resolved
    config less the width; one entry (the inputs and weights, not the n x n matrix)."""

    def __init__(self) -> None:
        self.key: str | None = None
        self.value: tuple | None = None

    @staticmethod
    def key_of(cfg: DictConfig) -> str:
        config = OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)
        config.pop("width", None)
        config["model"].pop("width", None)
        return json.dumps(config, sort_keys=True, default=str)


KERNEL_FITS = KernelFits()


def fit_kernel(
    cfg: DictConfig, model: KernelModel, data: Data
) -> tuple[RidgeFit | PenaltyPath, dict[str, object]]:
    """Kernel ridge on n_train samples of the training stream for every replica (once for
    replicas that share their samples), at ``optimizer.penalty``: a :class:`RidgeFit` for one
    penalty, a :class:`PenaltyPath` (beta: the dual weights (R, n, K)) for a list or gcv.
    ``model`` gets the training inputs. Returns the fit and the record's ``kernel`` section."""
    key = KERNEL_FITS.key_of(cfg)
    if key == KERNEL_FITS.key and KERNEL_FITS.value is not None:
        x, fitted, info = KERNEL_FITS.value
        model.set_inputs(x)
        return fitted, {**info, "fit_reused": True}
    KERNEL_FITS.key = KERNEL_FITS.value = None
    x, y = _training_sample(data, cfg.n_train, cfg.optimizer.chunk_size)
    model.set_inputs(x)
    penalties = penalty_list(cfg)
    values = [float(cfg.optimizer.penalty)] if penalties is None else penalties
    relative = cfg.optimizer.penalty_scale == "relative"
    groups = [(x, y)] if x.dim() == 2 else list(zip(x, y, strict=True))
    fits = [
        dual_ridge(model.spec, xg, yg, values, relative, penalties is not None) for xg, yg in groups
    ]
    R = cfg.replicas

    def stacked(name: str) -> torch.Tensor:
        parts = torch.stack([getattr(f, name) for f in fits])
        return parts.expand(R, *parts.shape[1:]) if len(fits) == 1 else parts

    fallback = any(f.fallback for f in fits)
    if penalties is None:
        fitted = RidgeFit(
            stacked("alpha")[..., 0],
            stacked("c")[:, 0],
            stacked("mse")[:, 0],
            stacked("penalty")[:, 0],
            fallback,
        )
    else:
        fitted = PenaltyPath(
            stacked("penalty"),
            stacked("alpha"),
            stacked("c"),
            stacked("mse"),
            stacked("df"),
            fallback,
        )
    info = {
        "kernel": model.spec.kind,
        "n_train": cfg.n_train,
        "matrix_gib": 8 * cfg.n_train**2 / 2**30,
        "matrix_s": sum(f.matrix_s for f in fits),
        "solve_s": sum(f.solve_s for f in fits),
        "fit_reused": False,
    }
    KERNEL_FITS.key, KERNEL_FITS.value = key, (model.x, fitted, info)
    return fitted, info


KERNEL_MATRICES_CHOLESKY = 1  # one positive penalty: K_c, factorised in place
KERNEL_MATRICES_PATH = 2  # several penalties: K_c and a working copy (eigvalsh copies K_c once)
KERNEL_MATRICES_EIGH = 3  # the eigendecomposition: its vectors and LAPACK's 2 n^2 workspace


def kernel_matrices(cfg: DictConfig) -> int:
    """How many float64 n_train x n_train matrices a kernel fit holds at its peak: K_c, a copy
    for a penalty path, and where a penalty is 0 the eigendecomposition's vectors and workspace
    (measured at n_train=6000 in peak RSS less the process's own: 1.05, 1.8 and 3.8 for one
    positive penalty, a path of three and penalty 0)."""
    penalties = penalty_list(cfg)
    values = [float(cfg.optimizer.penalty)] if penalties is None else penalties
    count = KERNEL_MATRICES_CHOLESKY if len(values) == 1 else KERNEL_MATRICES_PATH
    return count + (KERNEL_MATRICES_EIGH if min(values) <= 0 else 0)


def kernel_memory_bytes(cfg: DictConfig, n_train: int | None = None) -> int:
    """The bytes of a kernel fit's float64 n x n matrices (:func:`kernel_matrices`), n =
    ``n_train`` or the config's."""
    n = cfg.n_train if n_train is None else n_train
    return kernel_matrices(cfg) * 8 * n**2
