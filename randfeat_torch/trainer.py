"""The training loop: one function from a validated config to a finished run record.

Data never leaves the device: inputs are drawn there (online: a fresh batch each step;
finite: ``n_train`` samples once, then shuffled minibatches), the held-out test set is drawn
once from the target's seed, and the host reads device values only at evaluations.
The loss is the mean squared error, summed over replicas (so each replica gets exactly the
gradient of its own loss); the error reported everywhere is the normalised test error,
test MSE / variance of the test targets (1.0 = predicting the mean).
``optimizer=ridge`` replaces the loop by the closed-form fit of :mod:`randfeat_torch.ridge`
(with ``optimizer.population``: on the exact moments of :mod:`randfeat_torch.theory`).
"""

from __future__ import annotations

import hashlib
import json
import math
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import DictConfig, ListConfig, OmegaConf
from tqdm.auto import tqdm

from randfeat_torch.config import ConfigError, penalty_list, ridge_feature_count, validate
from randfeat_torch.diagnostics import Laziness
from randfeat_torch.models import LOSSES, LinearizedNet, TwoLayerNet, build_model
from randfeat_torch.optim import (
    PARAMETER_GROUPS,
    GradientPrecision,
    PerReplicaRates,
    base_lr,
    build_optimizer,
)
from randfeat_torch.record import CHECKPOINT_NAME, RunRecord, load_checkpoint
from randfeat_torch.ridge import (
    CentredMoments,
    NotPositiveDefinite,
    PenaltyPath,
    WidthPath,
    factorise,
    path_widths,
    penalty_path,
    relative_lambda,
    sampled_moments,
    solve_centred,
    width_path,
)
from randfeat_torch.targets import (
    Target,
    build_target,
    make_generator,
    replica_seed,
    sample_inputs,
)
from randfeat_torch.theory import (
    PopulationMoments,
    ReluSum,
    exact_variance,
    reference_errors,
    relu_cross_moments,
    relu_feature_covariance,
    relu_population_moments,
    relu_sum,
)

TEST_STREAM, TRAIN_STREAM, ROUNDING_STREAM = 2, 3, 4
EVAL_ELEMENTS = 2**24  # hidden activations held at once while evaluating

Model = TwoLayerNet | LinearizedNet


@dataclass
class RunResult:
    """What a finished run reports: status, final metrics (tensors of shape (R,)), timing."""

    status: str
    metrics: dict[str, torch.Tensor]
    theory: dict[str, object]
    steps_done: int
    wall_time_s: float
    steps_per_s: float
    device: str
    run_dir: Path
    model: Model
    interrupted_by: int | None = None  # the signal that stopped the run, if one did

    @property
    def test_error(self) -> float:
        """Mean over replicas of the final normalised test error."""
        return float(self.metrics["test_error"].double().mean())


def resolve_device(name: str) -> torch.device:
    """``auto`` picks CUDA when present (``validate`` refuses ``cuda`` without it)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


class Stopwatch:
    """Seconds of work on a device: CUDA events on CUDA (timed on the GPU's own timeline, read
    only when asked, which waits for the work queued so far), ``perf_counter`` on the CPU."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"

    def mark(self) -> float | torch.cuda.Event:
        if not self.cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def since(self, mark: float | torch.cuda.Event) -> float:
        """Seconds from ``mark`` to now."""
        if not self.cuda:
            return time.perf_counter() - mark
        end = self.mark()
        end.synchronize()
        return mark.elapsed_time(end) / 1000


class Data:
    """Inputs from the configured distribution, labelled by the target, on the device.

    ``replicas=None``: one stream shared by every replica, x: (n, d), y: (n,). An int R: an
    independent stream per replica, seeded ``replica_seed(seed, r)``, x: (R, n, d), y: (R, n)."""

    def __init__(
        self,
        cfg: DictConfig,
        target: Target,
        device: torch.device,
        seed: int,
        stream: int,
        replicas: int | None = None,
    ):
        self.kind, self.d, self.target, self.device = cfg.input.name, cfg.d, target, device
        self.replicas = replicas
        seeds = [seed] if replicas is None else [replica_seed(seed, r) for r in range(replicas)]
        self.gens = [make_generator(device, s, stream) for s in seeds]

    def draw(self, n: int, out: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """n fresh samples per stream (in place into ``out`` if given)."""
        if self.replicas is None:
            x = sample_inputs(self.kind, n, self.d, self.gens[0], self.device, out=out)
            return x, self.target(x)
        x = torch.empty(self.replicas, n, self.d, device=self.device) if out is None else out
        for x_r, gen in zip(x, self.gens, strict=True):
            sample_inputs(self.kind, n, self.d, gen, self.device, out=x_r)
        return x, self.target(x.view(-1, self.d)).view(self.replicas, n)

    def shuffle(self, n: int) -> torch.Tensor:
        """A fresh permutation of range(n) per stream: (n,) shared, (R, n) independent."""
        orders = [torch.randperm(n, generator=g, device=self.device) for g in self.gens]
        return orders[0] if self.replicas is None else torch.stack(orders)


def training_data(cfg: DictConfig, target: Target, device: torch.device) -> Data:
    """The training stream: seeded by ``data_seed`` (default ``seed``), shared by the replicas
    or one per replica (``replica_data``)."""
    seed = cfg.seed if cfg.data_seed is None else cfg.data_seed
    replicas = cfg.replicas if cfg.replica_data == "independent" else None
    return Data(cfg, target, device, seed, TRAIN_STREAM, replicas)


class TestSet:
    """A fixed held-out sample drawn from the target's seed, so that every model of a sweep is
    scored on the same points."""

    def __init__(self, cfg: DictConfig, target: Target, device: torch.device):
        """Draw the sample; a target that is constant on it is refused (no error to normalise).
        Errors are normalised by the target's exact variance where it is known (then a measured
        error and theory's share one scale), else by the test sample's; ``normaliser`` says
        which, and ``test_error_sample`` is always by the test sample's variance."""
        self.x, self.y = Data(cfg, target, device, cfg.target.seed, TEST_STREAM).draw(cfg.n_test)
        self.sample_variance = self.y.var(correction=0)
        exact = exact_variance(target, cfg.input.name)
        self.normaliser = "test-sample variance" if exact is None else "exact target variance"
        self.variance = (
            self.sample_variance if exact is None else torch.tensor(exact, device=device)
        )
        if not float(self.sample_variance) > 0:
            raise ConfigError(
                "target",
                target.name,
                f"is constant on the {cfg.n_test} test inputs: no variance to normalise by",
            )
        self.loss = cfg.loss
        if self.loss != "mse" and not bool((self.y.abs() == 1).all()):
            raise ConfigError(
                "loss",
                self.loss,
                f"is a loss for +-1 labels, but target={target.name} on input={cfg.input.name} "
                "takes other values: use loss=mse, or a parity on input=hypercube",
            )

    @torch.no_grad()
    def evaluate(self, model: Model, train_loss: torch.Tensor) -> dict[str, torch.Tensor]:
        """Test MSE and normalised test error per replica, each (R,), in bounded memory, with
        the train loss (R,) (of ``loss``) and, for the squared loss, its normalised value (by
        the same test variance); for +-1 losses the test 0-1 error of sign(f) instead."""
        n = self.x.shape[0]
        chunk = max(1, EVAL_ELEMENTS // (model.replicas * model.width))
        sse = torch.zeros(model.replicas, device=self.x.device)
        wrong = torch.zeros_like(sse)
        for i in range(0, n, chunk):
            f, y = model(self.x[i : i + chunk]), self.y[i : i + chunk]
            sse += (f - y).square().sum(dim=1)
            if self.loss != "mse":
                wrong += (torch.sign(f) != y).sum(dim=1)
        mse = sse / n
        metrics = {
            "test_mse": mse,
            "test_error": mse / self.variance,
            "test_error_sample": mse / self.sample_variance,
            "train_loss": train_loss,
        }
        if self.loss == "mse":
            metrics["train_error"] = train_loss / self.variance
        else:
            metrics["test_zero_one"] = wrong / n
        return metrics

    @torch.no_grad()
    def evaluate_output_layers(
        self, model: Model, beta: torch.Tensor, c: torch.Tensor
    ) -> torch.Tensor:
        """Test MSE of G output layers beta: (R, P, G) and c: (R, G) on the model's ridge
        features (a width path's columns use a prefix of the units, zero past it), in float64:
        (R, G)."""
        n = self.x.shape[0]
        chunk = max(1, EVAL_ELEMENTS // (model.replicas * beta.shape[1]))
        sse = torch.zeros_like(c)
        for i in range(0, n, chunk):
            phi = model.ridge_features(self.x[i : i + chunk]).double()  # (R, m, P)
            out = torch.baddbmm(c.unsqueeze(1), phi, beta)  # (R, m, G)
            sse += (out - self.y[i : i + chunk, None].double()).square().sum(1)
        return sse / n


class Batches:
    """Training minibatches on the device: online draws, or shuffled passes over n_train."""

    def __init__(self, cfg: DictConfig, data: Data):
        self.data, self.batch_size = data, cfg.batch_size
        self.online = cfg.n_train is None
        if self.online:
            self.x, _ = data.draw(cfg.batch_size)  # the buffer that every step refills
        else:
            self.x, self.y = data.draw(cfg.n_train)
            self.n = cfg.n_train
            self.order: torch.Tensor | None = None
            self.pos = self.n  # a fresh permutation at the first step

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        """x: (batch, d) and y: (batch,), or (R, batch, d) and (R, batch) per replica."""
        if self.online:
            return self.data.draw(self.batch_size, out=self.x)
        if self.n == self.batch_size:  # full-batch gradient descent
            return self.x, self.y
        if self.pos + self.batch_size > self.n:
            self.order = self.data.shuffle(self.n)
            self.pos = 0
        idx = self.order[..., self.pos : self.pos + self.batch_size]
        self.pos += self.batch_size
        if idx.dim() == 1:
            return self.x[idx], self.y[idx]
        return torch.take_along_dim(self.x, idx.unsqueeze(-1), 1), self.y.gather(1, idx)

    def state(self) -> dict:
        """Where a finite pass stands (online batches depend on the generators alone)."""
        return {} if self.online else {"pos": self.pos, "order": self.order}

    def restore(self, state: dict) -> None:
        """From :meth:`state` as loaded (onto the CPU): the order goes back to the device."""
        if not self.online:
            order = state["order"]
            self.pos = state["pos"]
            self.order = None if order is None else order.to(self.data.device)


def compile_step(function: Callable, device: torch.device) -> Callable:
    """torch.compile for a training step of fixed shapes. On CUDA in the ``reduce-overhead``
    mode, which records the step once and replays it as a CUDA graph; each call starts a new
    step, so the outputs of the last one (the gradients) may be overwritten."""
    if device.type != "cuda":
        return torch.compile(function, dynamic=False)
    graphed = torch.compile(function, mode="reduce-overhead", dynamic=False)

    def replay(*args: torch.Tensor) -> object:
        torch.compiler.cudagraph_mark_step_begin()
        return graphed(*args)

    return replay


def gradient_step(
    cfg: DictConfig, model: Model, params: list[torch.Tensor]
) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """``step(x, y)``: each replica's loss (R,) (``cfg.loss``), the gradient of its training
    objective (see :meth:`TwoLayerNet.loss_gradients`) left in ``.grad`` of the trained
    ``params``.

    ``backward=analytic`` uses the two-layer net's hand-written gradient (the linearized model
    has none and takes autograd); ``compile=true`` hands the step to :func:`compile_step`."""
    device = next(model.parameters()).device
    wrap = (lambda f: compile_step(f, device)) if cfg.compile else (lambda f: f)
    loss_name = cfg.loss
    if cfg.backward == "analytic" and isinstance(model, TwoLayerNet):
        gradients = wrap(lambda x, y: model.loss_gradients(x, y, loss_name))

        def analytic(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            loss, *grads = gradients(x, y)
            model.set_gradients(grads)
            return loss

        return analytic

    per_sample = LOSSES[loss_name]
    scale = getattr(model, "lazy_scale", None) or 1.0
    loss_of = wrap(lambda x, y: per_sample(model(x), y).mean(dim=1))

    def autograd(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        for p in params:
            p.grad = None
        loss = loss_of(x, y)
        (loss.sum() / scale**2).backward()
        return loss.detach()

    return autograd


def hparams_of(cfg: DictConfig) -> dict[str, object]:
    """The knobs shown as columns in TensorBoard's hparams dashboard."""
    return {
        "model": cfg.model.name,
        "target": cfg.target.name,
        "input": cfg.input.name,
        "optimizer": cfg.optimizer.name,
        "d": cfg.d,
        "width": cfg.width,
        "replicas": cfg.replicas,
        "seed": cfg.seed,
        "target_seed": cfg.target.seed,
        "lr": base_lr(cfg.optimizer.lr) if "lr" in cfg.optimizer else None,
        "steps": cfg.steps,
        "batch_size": cfg.batch_size,
        "n_train": cfg.n_train,
        "activation": cfg.model.activation,
        "parameterization": cfg.model.parameterization,
        "lazy_scale": cfg.model.lazy_scale,
        "loss": cfg.loss,
    }


def train(
    cfg: DictConfig,
    run_dir: Path | str,
    choices: dict[str, str] | None = None,
    stop_at: int | None = None,
) -> RunResult:
    """Train the configured model on the configured target; write the record in ``run_dir``.

    ``choices``: the config-group options picked (Hydra's runtime choices), for the record.
    With ``resume`` and a checkpoint in ``run_dir``, the run continues from it and ends with
    the metrics an uninterrupted run would have (bit-identical on CPU). ``stop_at``: behave as
    if SIGTERM arrived during that step (checkpoint, status ``interrupted``), for tests."""
    start = time.perf_counter()
    POPULATION_FACTORS.keep_for(cfg)
    validate(cfg)
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    device = resolve_device(cfg.device)
    target = build_target(cfg.target, device)
    test_set = TestSet(cfg, target, device)
    model = build_model(cfg.model, cfg.seed, device)
    data = training_data(cfg, target, device)
    exact = exact_moments(cfg, target, model)
    # A population width path holds the exact errors itself, at every width.
    ridge = cfg.optimizer.name == "ridge"
    rf_exact = not (ridge and cfg.optimizer.width_path and cfg.optimizer.population)
    theory = reference_errors(cfg, target, model, exact and exact.moments, rf_exact)
    config = OmegaConf.to_container(cfg, resolve=True)
    checkpoint = load_checkpoint(Path(run_dir), config) if cfg.resume else None

    record = RunRecord(Path(run_dir), config, hparams_of(cfg), checkpoint)
    record.write(
        "running",
        device=str(device),
        torch_threads=torch.get_num_threads(),
        replica_seeds=[replica_seed(cfg.seed, r) for r in range(cfg.replicas)],
        normaliser=test_set.normaliser,
        theory=theory,
        choices=choices or {},
    )
    if checkpoint is None:
        record.log_theory(0, theory)
        initial = test_set.evaluate(model, torch.full((cfg.replicas,), torch.nan, device=device))
        record.log_eval(0, initial)
    interrupted_by = None
    try:
        if cfg.optimizer.name == "ridge":
            status, metrics, steps_done, steps_per_s = fit_by_ridge(
                cfg, model, data, test_set, record, exact
            )
        else:
            loop = Loop(cfg, model, data, test_set, record, start, stop_at)
            status, metrics, steps_done, steps_per_s = loop.run(checkpoint)
            interrupted_by = loop.signal
    except KeyboardInterrupt:
        record.write("interrupted", wall_time_s=time.perf_counter() - start)
        record.close(None, 0)
        raise
    except Exception as error:
        record.write(
            "failed",
            error=f"{type(error).__name__}: {error}",
            wall_time_s=time.perf_counter() - start,
        )
        record.close(None, 0)
        raise
    wall_time = time.perf_counter() - start
    if status == "interrupted":
        record.close(None, steps_done)
    else:
        (Path(run_dir) / CHECKPOINT_NAME).unlink(missing_ok=True)  # finished: nothing to resume
        record.log_theory(steps_done, theory)
        record.write(
            status,
            metrics=metrics,
            steps_done=steps_done,
            wall_time_s=wall_time,
            steps_per_s=steps_per_s,
            output_weights=output_weight_norms(model),
        )
        record.close(metrics, steps_done)
    return RunResult(
        status,
        metrics,
        theory,
        steps_done,
        wall_time,
        steps_per_s,
        str(device),
        Path(run_dir),
        model,
        interrupted_by,
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
        groups = [OmegaConf.to_container(cfg[k], resolve=True) for k in ("model", "optimizer")]
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
    cfg: DictConfig, model: Model, data: Data, exact: ExactMoments | None
) -> CentredMoments:
    """The centred moments of the ridge features m * phi (m: the output multiplier): exact
    (``optimizer.population``, from ``exact``, whose tensors are taken over) or of n_train
    fresh samples, streamed in chunks."""
    if exact is None:
        return sampled_moments(
            model.ridge_features,
            data.draw,
            n=cfg.n_train,
            replicas=cfg.replicas,
            num_features=ridge_feature_count(cfg),
            device=data.device,
            chunk_size=cfg.optimizer.chunk_size,
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
    'train_loss' is then the population MSE; with ``optimizer.width_path`` at every prefix
    width too (the record's ``width_path``). Returns the status, final metrics, steps done and
    the rate: 1 / the seconds the fit took (the moments' included; a population factor kept
    from the previous job, see :class:`FactorCache`, costs nothing here)."""
    clock = Stopwatch(data.device)
    fit_start = clock.mark()
    moments = ridge_moments(cfg, model, data, exact)
    path, reused, penalties = None, False, penalty_list(cfg)
    if penalties is not None:
        lam = torch.stack([ridge_penalty(cfg, model, moments, p) for p in penalties], -1)
        path = penalty_path(moments, lam)
        gcv = path.gcv(cfg.n_train) if cfg.optimizer.penalty == "gcv" else None
        pick = torch.zeros(cfg.replicas, dtype=torch.long) if gcv is None else gcv.argmin(-1)
        solution = path.fit(pick.to(lam.device))
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
    model.load_ridge_solution(solution.beta.float(), solution.c.float())
    fit_time = clock.since(fit_start) + (exact.seconds if exact else 0.0)
    metrics = test_set.evaluate(model, solution.train_mse.float())
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
    if penalties is not None:
        fields["penalty_path"] = penalty_record(path, penalties, model, test_set, gcv, pick)
        record.log_penalty_path(fields["penalty_path"])
    elif path is not None:
        fields["width_path"] = path_record(path, model, test_set, exact is not None)
        record.log_width_path(fields["width_path"])
    record.write("running", **fields)
    status = "ok" if bool(finite.all()) else "diverged"
    return status, metrics, 1, 1 / fit_time


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
    model: TwoLayerNet | LinearizedNet,
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


def steps_to_error_record(thresholds: list[float], reached: torch.Tensor) -> dict[str, object]:
    """The record's ``steps_to_error``: per threshold (a key such as "0.1") the first evaluated
    step whose test error was at or below it, null if none; a list over replicas when R > 1."""
    rows = [[None if s < 0 else s for s in row] for row in reached.t().tolist()]
    return {
        f"{t:g}": row[0] if len(row) == 1 else row for t, row in zip(thresholds, rows, strict=True)
    }


class Loop:
    """The optimizer loop: ``steps`` minibatch steps, evaluating every ``eval_every``, with a
    checkpoint every ``checkpoint_every`` steps (default: at every evaluation) and on SIGTERM
    or SIGINT, after which it stops with status ``interrupted``."""

    def __init__(
        self,
        cfg: DictConfig,
        model: Model,
        data: Data,
        test_set: TestSet,
        record: RunRecord,
        start: float,
        stop_at: int | None = None,
    ) -> None:
        self.cfg, self.model, self.data, self.test_set, self.record = (
            cfg,
            model,
            data,
            test_set,
            record,
        )
        self.start, self.stop_at = start, stop_at
        self.batches = Batches(cfg, data)
        self.optimizer, self.scheduler = build_optimizer(cfg.optimizer, model, cfg.steps)
        self.params = [p for group in self.optimizer.param_groups for p in group["params"]]
        # each group's rate: optimizer.lr (the first, with one per replica) x its multiplier
        self.learning_rates = {  # before the schedule: a warm-up scales them all alike
            name: g["initial_lr"] for g in self.optimizer.param_groups for name in g["names"]
        }
        multipliers = {  # the rates the optimizer runs at weight the laziness kernel
            PARAMETER_GROUPS[name]: g["multiplier"]
            for g in self.optimizer.param_groups
            for name in g["names"]
        }
        probe = test_set.x[: cfg.lazy_probe]  # the first lazy_probe test inputs (all if fewer)
        self.laziness = (
            Laziness(model, probe, test_set.variance, multipliers) if cfg.lazy_probe else None
        )
        self.thresholds = [float(t) for t in cfg.steps_to_error]
        # the first evaluated step at or below each threshold, per replica (-1: not yet)
        self.reached = torch.full((cfg.replicas, len(self.thresholds)), -1, dtype=torch.long)
        self.laziness_s = 0.0  # seconds spent on the laziness measures in this process
        self.gradient_step = gradient_step(cfg, model, self.params)
        rounding = make_generator(data.device, cfg.seed, ROUNDING_STREAM)
        self.precision = GradientPrecision(cfg.optimizer, rounding)
        lr = cfg.optimizer.lr
        self.rates = PerReplicaRates(lr, self.params) if isinstance(lr, ListConfig) else None
        self.loss_sum = torch.zeros(cfg.replicas, device=data.device)
        self.steps_in_sum, self.step, self.status = 0, 0, "ok"
        self.all_diverged = False
        self.best = torch.full((cfg.replicas,), torch.inf)  # lowest test error seen, per replica
        self.signal: int | None = None

    def state(self) -> dict:
        """Everything the remaining steps depend on."""
        generators = [*self.data.gens, self.precision.gen]
        return {
            "step": self.step,
            "status": self.status,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "generators": [g.get_state() for g in generators],
            "batches": self.batches.state(),
            "loss_sum": self.loss_sum,
            "steps_in_sum": self.steps_in_sum,
            "best_test_error": self.best,
            "steps_to_error": self.reached,
        }

    def restore(self, state: dict) -> None:
        self.step, self.status = state["step"], state["status"]
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        for g, saved in zip(
            [*self.data.gens, self.precision.gen], state["generators"], strict=True
        ):
            g.set_state(saved)
        self.batches.restore(state["batches"])
        self.loss_sum.copy_(state["loss_sum"])
        self.steps_in_sum = state["steps_in_sum"]
        self.best = state["best_test_error"]
        self.reached = state["steps_to_error"]

    def _on_signal(self, signum: int, frame: object) -> None:
        self.signal = signum  # acted on at the end of the step (after an evaluation in flight)

    def run(self, checkpoint: dict | None) -> tuple[str, dict[str, torch.Tensor], int, float]:
        """Returns the status, final metrics, steps done and steps per second of this call's steps
        (set-up, evaluation and saving left out; 0 when interrupted)."""
        if checkpoint is not None:
            self.restore(checkpoint)
        self.record.write("running", learning_rates=self.learning_rates)
        handlers = {s: signal.signal(s, self._on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
        try:
            return self._steps()
        finally:
            for s, handler in handlers.items():
                signal.signal(s, handler)

    def _steps(self) -> tuple[str, dict[str, torch.Tensor], int, float]:
        cfg, optimizer = self.cfg, self.optimizer
        gradient_step = self.gradient_step
        scheduled = cfg.optimizer.schedule != "constant" or cfg.optimizer.warmup_steps > 0
        steps, eval_every = cfg.steps, cfg.eval_every  # plain ints: no config look-up per step
        checkpoint_every = cfg.checkpoint_every or eval_every
        progress = tqdm(
            total=steps,
            initial=self.step,
            desc=f"{cfg.model.name} d={cfg.d} width={cfg.width}",
            disable=not (cfg.progress and sys.stderr.isatty()),
            dynamic_ncols=True,
        )
        metrics: dict[str, torch.Tensor] = {}
        clock, first_step = Stopwatch(self.data.device), self.step
        step_time, segment = 0.0, clock.mark()  # the steps' time: evaluation and saving left out
        with progress:
            for step in range(self.step + 1, steps + 1):
                per_replica = gradient_step(*self.batches.next())  # (R,), grads in .grad
                if self.precision.active:
                    self.precision.apply(self.params)
                if self.rates:
                    self.rates.remember()
                optimizer.step()
                if self.rates:
                    self.rates.rescale()
                if scheduled:
                    self.scheduler.step()
                self.loss_sum += per_replica
                self.steps_in_sum += 1
                self.step = step
                progress.update()
                if step == self.stop_at:
                    self.signal = signal.SIGTERM

                evaluate = step % eval_every == 0 or step == steps
                save = self.signal is not None or (step % checkpoint_every == 0 and step != steps)
                if not (evaluate or save):
                    continue
                step_time += clock.since(segment)
                if evaluate:
                    metrics = self._evaluate((step - first_step) / max(1e-9, step_time))
                    progress.set_postfix(test_error=f"{float(metrics['test_error'].mean()):.4g}")
                if save:
                    self.record.checkpoint(self.state())
                if self.signal is not None:
                    name = signal.Signals(self.signal).name
                    self.record.write("interrupted", steps_done=step, interrupted_by=name)
                    return "interrupted", metrics, step, 0.0
                segment = clock.mark()
                if evaluate and self.all_diverged:
                    break
        step_time += clock.since(segment)
        return self.status, metrics, self.step, (self.step - first_step) / max(1e-9, step_time)

    def _evaluate(self, steps_per_s: float) -> dict[str, torch.Tensor]:
        """Test metrics, TensorBoard, the record; marks divergence (NaN or Inf)."""
        metrics = self.test_set.evaluate(self.model, self.loss_sum / self.steps_in_sum)
        if self.laziness is not None:
            clock = Stopwatch(self.data.device)
            mark = clock.mark()
            metrics |= self.laziness.measure(self.model)
            self.laziness_s += clock.since(mark)
        self.loss_sum.zero_()
        self.steps_in_sum = 0
        self.record.log_eval(self.step, metrics)
        finite = torch.isfinite(metrics["train_loss"]) & torch.isfinite(metrics["test_error"])
        error = metrics["test_error"].detach().cpu()
        self.best = torch.fmin(self.best, error)
        below = torch.tensor(self.thresholds).unsqueeze(0) >= error.unsqueeze(1)  # (R, T)
        self.reached = torch.where((self.reached < 0) & below, self.step, self.reached)
        fields = dict(
            metrics=metrics,
            best_test_error=[v if v < float("inf") else None for v in self.best.tolist()],
            steps_to_error=steps_to_error_record(self.thresholds, self.reached),
            laziness_s=self.laziness_s,
            steps_done=self.step,
            wall_time_s=time.perf_counter() - self.start,
            steps_per_s=steps_per_s,
        )
        if not bool(finite.all()):
            self.status = "diverged"
            fields["diverged_replicas"] = (~finite).nonzero().flatten().tolist()
        self.record.write("running", **fields)
        self.all_diverged = not bool(finite.any())
        return metrics
