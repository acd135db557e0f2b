"""Closed-form fits of the output layer (``optimizer=ridge``): on samples, on the exact
population moments, along the width path or the penalty path; and what they add to the record.

The linear algebra lives in :mod:`randfeat_torch.ridge`, the exact moments in
:mod:`randfeat_torch.theory`; this module chooses among them for one run.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from omegaconf import DictConfig, OmegaConf

from randfeat_torch.config import ConfigError, penalty_list
from randfeat_torch.data import Data, Model, TestSet
from randfeat_torch.device import Stopwatch
from randfeat_torch.kernels import KernelModel, fit_kernel
from randfeat_torch.models import TwoLayerNet, ridge_feature_count
from randfeat_torch.record import RunRecord
from randfeat_torch.ridge import (
    FLOAT32_TOLERANCE,
    CentredMoments,
    NotPositiveDefinite,
    PenaltyPath,
    RidgeFit,
    WidthPath,
    factorise,
    path_widths,
    penalty_path,
    relative_lambda,
    sampled_moments,
    solve_centred,
    width_path,
)
from randfeat_torch.targets import Target
from randfeat_torch.theory import (
    PopulationMoments,
    ReluSum,
    relu_cross_moments,
    relu_feature_covariance,
    relu_population_moments,
    relu_sum,
)


@dataclass
class ExactMoments:
    """For ``optimizer.population``: the target as a sum of ReLUs, the exact population moments
    of the features, computed once (the theory section reads them too), and the seconds they
    took, which count as part of the fit."""

    target: ReluSum
    moments: PopulationMoments
    seconds: float


def exact_moments(cfg: DictConfig, target: Target, model: Model) -> ExactMoments | None:
    """The :class:`ExactMoments` of a run fitted with ``optimizer.population``, else None.
    With the width path, without the covariance: :data:`POPULATION_FACTORS` gives its factor."""
    if cfg.optimizer.name != "ridge" or not cfg.optimizer.population:
        return None
    clock = Stopwatch(model.w.device)
    start = clock.mark()
    relu = relu_sum(target)
    if cfg.optimizer.width_path:
        mean, cross = relu_cross_moments(model.w, model.b, relu)
        moments = PopulationMoments(mean, None, cross)
    else:
        moments = relu_population_moments(model.w, model.b, relu)
    return ExactMoments(relu, moments, clock.since(start))


class FactorCache:
    """The Cholesky factor of the last population fit with the width path, kept for the next job
    in this process: a sweep over targets on one draw of features (the same d, seed and width,
    as consecutive jobs of rf_wall are) computes the population Gram matrix and factorises it
    once. Keyed by the first layer's values, the multiplier and the penalty; one entry."""

    def __init__(self) -> None:
        self.key: str | None = None
        self.factor: torch.Tensor | None = None
        self.features: str | None = None  # what in the config makes the features and penalty

    def keep_for(self, cfg: DictConfig) -> None:
        """Free the factor unless this job's features and penalty could be the same (called
        before a job's checks, whose memory check must not count a factor it will not use)."""
        if cfg.optimizer.name != "ridge":  # uses no factor: free it, and skip the comparison
            self.key = self.factor = self.features = None
            return
        groups = [
            OmegaConf.to_container(cfg[k], resolve=True, enum_to_str=True)
            for k in ("model", "optimizer")
        ]
        features = json.dumps([*groups, cfg.seed, cfg.device], sort_keys=True, default=str)
        if features != self.features:
            self.key = self.factor = None
        self.features = features

    def get(
        self, model: TwoLayerNet, penalty: torch.Tensor, make: Callable[[], torch.Tensor]
    ) -> tuple[torch.Tensor, bool]:
        """(the factor, whether it was kept from an earlier job); ``make()`` computes it."""
        digest = hashlib.sha256()
        for tensor in (model.w, model.b, penalty):
            if tensor is not None:
                digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
        digest.update(repr((model.multiplier, str(penalty.device))).encode())
        key = digest.hexdigest()
        if key == self.key and self.factor is not None:
            return self.factor, True
        self.key = self.factor = None  # free the old factor before making the next one
        self.factor, self.key = make(), key
        return self.factor, False


POPULATION_FACTORS = FactorCache()


def ridge_moments(
    cfg: DictConfig,
    model: Model,
    data: Data,
    exact: ExactMoments | None,
    products: torch.dtype = torch.float64,
) -> CentredMoments:
    """The centred moments of the ridge features m * phi (m: the output multiplier): exact
    (``optimizer.population``, from ``exact``, whose tensors are taken over) or of n_train
    fresh samples, streamed in chunks, their products in ``products``."""
    if exact is None:
        return sampled_moments(
            model.ridge_features,
            data.draw,
            n=cfg.n_train,
            replicas=cfg.replicas,
            num_features=ridge_feature_count(cfg.model),
            device=data.device,
            chunk_size=cfg.optimizer.chunk_size,
            products=products,
        )
    m = model.multiplier
    kw = dict(dtype=torch.float64, device=exact.moments.mean.device)
    cov = exact.moments.cov
    return CentredMoments(
        None if cov is None else cov.mul_(m * m),  # the theory section has read them already
        exact.moments.cross * m,
        exact.moments.mean * m,
        torch.tensor(exact.target.mean, **kw),
        torch.tensor(exact.target.variance, **kw),
    )


def ridge_penalty(
    cfg: DictConfig, model: Model, moments: CentredMoments, value: float
) -> torch.Tensor:
    """lambda on |a|^2 per replica (R,), for the penalty lambda_u |u|^2 on u = m * a of this
    ``value``: lambda_u = value (absolute) or value * trace(Cov phi) / P (relative)."""
    if cfg.optimizer.penalty_scale == "relative":
        return relative_lambda(moments.cov, value)
    lam = value * model.multiplier**2
    return torch.full((cfg.replicas,), lam, dtype=torch.float64, device=moments.q.device)


def fit_by_ridge(
    cfg: DictConfig,
    model: Model,
    data: Data,
    test_set: TestSet,
    record: RunRecord,
    exact: ExactMoments | None,
) -> tuple[str, dict[str, torch.Tensor], int, float]:
    """The closed-form output layer (one 'step'): on n_train fresh samples, or with ``exact``
    (``optimizer.population``) on the exact population moments of the features, whose
    objective is then the population MSE (``population_mse``, else ``fit_mse``); with
    ``optimizer.width_path`` at every prefix width too (the record's ``width_path``). Returns
    the status, final metrics, steps done and
    the rate: 1 / the seconds the fit took (the moments' included; a population factor kept
    from the previous job, see :class:`FactorCache`, costs nothing here)."""
    clock = Stopwatch(data.device)
    fit_start = clock.mark()
    path, reused, penalties = None, False, penalty_list(cfg)
    kernel = isinstance(model, KernelModel)  # the width-infinity limit, in the dual
    float32 = cfg.optimizer.gram_products == "float32"
    rounding: dict[str, object] | None = None
    moments = None if kernel or float32 else ridge_moments(cfg, model, data, exact)
    if kernel:
        fitted, kernel_record = fit_kernel(cfg, model, data)
    if float32:  # a plain fit (config.py), checked against its estimated rounding error
        solution, rounding = float32_fit(cfg, model, data)
    elif penalties is not None:
        if kernel:
            path = fitted
        else:
            lam = torch.stack([ridge_penalty(cfg, model, moments, p) for p in penalties], -1)
            path = penalty_path(moments, lam)
        gcv = path.gcv(cfg.n_train) if cfg.optimizer.penalty == "gcv" else None
        pick = torch.zeros(cfg.replicas, dtype=torch.long) if gcv is None else gcv.argmin(-1)
        solution = path.fit(pick.to(path.penalty.device))
    elif kernel:
        solution = fitted
    elif cfg.optimizer.width_path:
        penalty = ridge_penalty(cfg, model, moments, cfg.optimizer.penalty)
        try:
            if exact is None:
                factor = factorise(moments.cov, penalty)
            else:
                m = model.multiplier
                factor, reused = POPULATION_FACTORS.get(
                    model,
                    penalty,
                    lambda: factorise(
                        relu_feature_covariance(model.w, model.b).mul_(m * m), penalty
                    ),
                )
            path = width_path(factor, moments, penalty)
        except NotPositiveDefinite:
            raise ConfigError(
                "optimizer.penalty",
                cfg.optimizer.penalty,
                "is too small for the width path: cov + penalty has no trusted Cholesky "
                "factor at this width; raise it",
            ) from None
        solution = path.fit()
    else:
        solution = solve_centred(moments, ridge_penalty(cfg, model, moments, cfg.optimizer.penalty))
    model.load_ridge_solution(solution.beta, solution.c)  # in the model's dtype
    fit_time = clock.since(fit_start) + (exact.seconds if exact else 0.0)
    kind = "fit" if exact is None else "population"
    metrics = test_set.evaluate(model, solution.train_mse.float(), kind)
    record.log_eval(1, metrics)
    finite = torch.isfinite(metrics["test_error"])
    fields: dict[str, object] = {
        "ridge": {
            "lambda": solution.penalty.tolist(),
            "eigen_fallback": solution.fallback,
            "population": bool(cfg.optimizer.population),
            "factor_reused": reused,
        }
    }
    if rounding is not None:
        fields["ridge"]["float32_products"] = rounding
    if kernel:
        fields["kernel"] = kernel_record
    if penalties is not None:
        fields["penalty_path"] = penalty_record(path, penalties, model, test_set, gcv, pick)
        record.log_penalty_path(fields["penalty_path"])
    elif path is not None:
        fields["width_path"] = path_record(path, model, test_set, exact is not None)
        record.log_width_path(fields["width_path"])
    record.write("running", **fields)
    status = "ok" if bool(finite.all()) else "diverged"
    return status, metrics, 1, 1 / fit_time


def float32_fit(cfg: DictConfig, model: Model, data: Data) -> tuple[RidgeFit, dict[str, object]]:
    """The plain sampled fit with float32 products (``optimizer.gram_products=float32``), and
    what the record says of it: each replica's estimated relative error of beta from their
    rounding (:func:`randfeat_torch.ridge.rounding_error`), and whether it was above
    FLOAT32_TOLERANCE for any replica, in which case the same samples, drawn again, are
    fitted with float64 products and that fit is returned."""

    def fit(products: torch.dtype) -> RidgeFit:
        moments = ridge_moments(cfg, model, data, None, products)
        return solve_centred(moments, ridge_penalty(cfg, model, moments, cfg.optimizer.penalty))

    states = data.generator_states()
    solution = fit(torch.float32)  # its Gram matrix is freed on return
    error = solution.rounding_error
    refit = not bool((error <= FLOAT32_TOLERANCE).all())
    if refit:
        data.set_generator_states(states)
        solution = fit(torch.float64)
    record = {
        "estimated_error": [e if math.isfinite(e) else None for e in error.tolist()],
        "tolerance": FLOAT32_TOLERANCE,
        "refit_in_float64": refit,
    }
    return solution, record


PATH_RECORD_RATIO = 2 ** (1 / 16)  # the record keeps the path at every width to 64, then this
PATH_RECORD_DENSE = 64


def _per_replica_rows(values: torch.Tensor) -> list:
    """(R, K) -> a list of K numbers for R = 1, else R lists (strict JSON: no NaN or Inf)."""
    rows = [
        [v if math.isfinite(v) else None for v in row]
        for row in values.detach().cpu().double().tolist()
    ]
    return rows[0] if len(rows) == 1 else rows


def weight_norms(u: torch.Tensor, widths: torch.Tensor) -> dict[str, list]:
    """Norms of effective output weights u: (R, P, K), one column per fit, each of this width."""
    max_u = u.abs().amax(1)
    return {
        "u_max_abs": _per_replica_rows(max_u),
        "u_l1": _per_replica_rows(u.abs().sum(1)),
        "u_l2": _per_replica_rows(u.square().sum(1).sqrt()),
        "width_times_u_max_abs": _per_replica_rows(max_u * widths),
    }


def output_weight_norms(model: Model) -> dict[str, object]:
    """The norms of the effective output weights u = m * a of the final model (see
    :func:`weight_norms`; one number per replica, a list when R > 1)."""
    u = (model.a.detach().double() * model.multiplier).unsqueeze(-1)  # (R, width, 1)
    width = torch.tensor([float(model.width)], dtype=torch.float64, device=u.device)
    norms = weight_norms(u, width)
    return {k: v[0] if model.replicas == 1 else [row[0] for row in v] for k, v in norms.items()}


def penalty_record(
    path: PenaltyPath,
    penalties: list[float],
    model: Model,
    test_set: TestSet,
    gcv: torch.Tensor | None,
    pick: torch.Tensor,
) -> dict[str, object]:
    """The record's ``penalty_path``: per penalty (as configured, on |u|^2) the normalised
    error on the fit's distribution, the test error, the degrees of freedom and the norms of
    u = m * beta; with ``penalty=gcv`` the GCV score and each replica's pick."""
    variance = test_set.variance.double()
    test_mse = test_set.evaluate_output_layers(model, path.beta, path.c)
    width = torch.tensor(float(model.width), dtype=torch.float64, device=path.beta.device)
    record: dict[str, object] = {
        "penalties": penalties,
        "error": _per_replica_rows(path.mse / variance),
        "test_error": _per_replica_rows(test_mse / variance),
        "df": _per_replica_rows(path.df),
        **weight_norms(path.beta * model.multiplier, width),
        "picked": [penalties[int(k)] for k in pick.tolist()],
    }
    if gcv is not None:
        record["gcv"] = _per_replica_rows(gcv / variance)
    return record


def path_record(
    path: WidthPath, model: TwoLayerNet, test_set: TestSet, exact: bool
) -> dict[str, object]:
    """The record's ``width_path``: the normalised error at the widths of a fine grid (every
    width to 64, then ratio 2^(1/16)); at the solved widths (ratio sqrt 2, and N) the error
    without the penalty, the test error, and the norms of the effective output weights
    u = m * beta. Lists over replicas (one list when R = 1)."""
    widths = path_widths(model.width, PATH_RECORD_RATIO, PATH_RECORD_DENSE)
    columns = torch.tensor(widths, device=path.objective.device) - 1
    u = path.beta * model.multiplier  # (R, N, G)
    variance = test_set.variance.double()
    solved = torch.tensor(path.widths, dtype=torch.float64, device=u.device)
    test_mse = test_set.evaluate_output_layers(model, path.beta, path.c)
    rows = _per_replica_rows

    return {
        "kind": "population" if exact else "train",
        "normaliser": test_set.normaliser,
        "penalty_u": float(path.penalty[0]) / model.multiplier**2,
        "widths": widths,
        "error": rows(path.objective[:, columns] / variance),
        "solved": {
            "widths": path.widths,
            "error": rows(path.mse / variance),
            "test_error": rows(test_mse / variance),
            **weight_norms(u, solved),
        },
    }
