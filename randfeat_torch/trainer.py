"""The training loop, and the choice between the loop and a closed-form fit.

:func:`train` takes a config (validated here, in the job, with the checks of this machine),
builds the target, the data, the model and the record, and either runs :class:`Loop` (the
optimizer loop, ``optimizer=sgd|adam``) or a solver of :mod:`randfeat_torch.solvers`
(``optimizer=ridge``). The loss is summed over replicas, so each replica gets exactly the
gradient of its own loss; the error reported everywhere is the normalised test error, test MSE
/ variance of the test targets (1.0 = predicting the mean).
"""

from __future__ import annotations

import contextlib
import dataclasses
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, ListConfig, OmegaConf
from tqdm.auto import tqdm

from randfeat_torch.config import CheckpointError, validate
from randfeat_torch.data import Batches, Data, Model, TestSet, training_data
from randfeat_torch.device import Stopwatch, check_machine, resolve_device
from randfeat_torch.diagnostics import Laziness
from randfeat_torch.models import LOSSES, TwoLayerNet, build_model
from randfeat_torch.optim import (
    PARAMETER_GROUPS,
    GradientPrecision,
    PerReplicaRates,
    build_optimizer,
)
from randfeat_torch.record import (
    CHECKPOINT_NAME,
    RunLock,
    RunLocked,
    RunRecord,
    hparams_of,
    load_checkpoint,
    mark_failed,
    mark_interrupted,
)
from randfeat_torch.solvers import (
    POPULATION_FACTORS,
    ExactMoments,
    exact_moments,
    fit_by_ridge,
    output_weight_norms,
)
from randfeat_torch.targets import build_target, make_generator, replica_seed
from randfeat_torch.theory import reference_errors

ROUNDING_STREAM = 4  # the stochastic rounding of finite-precision gradients (see data.py)


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


class Interrupted(BaseException):
    """SIGTERM or SIGINT outside the optimizer loop's steps (set-up, a closed-form fit): the
    run stops at once. A BaseException, so that no handler of errors on the way catches it."""

    def __init__(self, signum: int) -> None:
        self.signum = signum
        super().__init__(f"interrupted by {signal.Signals(signum).name}")


@contextmanager
def interrupts_raise() -> Iterator[None]:
    """While inside, SIGTERM and SIGINT raise :class:`Interrupted` (in the main thread; the
    loop's steps replace this by a flag acted on at the end of a step)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: object) -> None:
        raise Interrupted(signum)

    previous = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for s, old in previous.items():
            signal.signal(s, old)


def train(
    cfg: DictConfig,
    run_dir: Path | str,
    choices: dict[str, str] | None = None,
    clock: Callable[[], float] = time.monotonic,
) -> RunResult:
    """Train the configured model on the configured target; write the record in ``run_dir``.

    ``choices``: the config-group options picked (Hydra's runtime choices), for the record.
    ``clock``: the seconds that the checkpoint policy counts (:class:`CheckpointPolicy`).
    With ``resume`` and a checkpoint in ``run_dir``, the run continues from it and ends with
    the metrics an uninterrupted run would have (bit-identical on CPU). SIGTERM or SIGINT
    during the loop: a checkpoint, status ``interrupted``, and a result saying which signal;
    during set-up or a closed-form fit: :class:`Interrupted`, and a record saying
    ``interrupted`` where there was none or one said ``running`` (:func:`mark_interrupted`).
    One process at a time may run in ``run_dir`` (:class:`RunLock`).

    A run that raises leaves a record with status ``failed`` and the error (this is the one
    place that records failures; one that fails before it starts, say on a value the data
    refuse, leaves such a record only where there is none yet: an earlier run's stays). A
    write that fails (a full disk) raises its OSError and leaves the checkpoint, and the
    record in its last good state: a resumed run's as it was (:meth:`RunRecord.fall_back`)."""
    run_dir = Path(run_dir)
    try:
        with interrupts_raise():
            return _train(cfg, run_dir, choices, clock)
    except Interrupted as stop:
        name = signal.Signals(stop.signum).name
        mark_interrupted(run_dir, _config_of(cfg), name, _about(cfg, choices))
        raise
    except (OSError, RunLocked, CheckpointError):
        raise  # nothing to add to the record: it keeps its last good state
    except Exception as error:
        mark_failed(run_dir, _config_of(cfg), error, _about(cfg, choices))
        raise


def init_seeds(cfg: DictConfig) -> list[int]:
    """Each replica's init seed: ``replica_seed(seed, r)``, or the run's seed for every replica
    with ``replica_init=shared``."""
    if cfg.replica_init == "shared":
        return [cfg.seed] * cfg.replicas
    return [replica_seed(cfg.seed, r) for r in range(cfg.replicas)]


def _about(cfg: DictConfig, choices: dict[str, str] | None) -> dict:
    """What names a run's networks in a record it could not open itself: the config groups
    picked and, where the seed and the replica count are valid (at most the 4096 replicas that
    keep seeds apart, :func:`replica_seed`), the replicas' seeds."""
    about: dict[str, Any] = {"choices": choices or {}}
    with contextlib.suppress(Exception):  # an interpolation that cannot resolve: no seeds
        seed, replicas = cfg.seed, cfg.replicas
        if isinstance(seed, int) and isinstance(replicas, int) and 0 < replicas <= 4096:
            about["replica_seeds"] = init_seeds(cfg)
    return about


def _config_of(cfg: DictConfig) -> dict:
    """The resolved config for a record; one whose interpolation cannot resolve, as written."""
    try:
        return OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)
    except Exception:
        return OmegaConf.to_container(cfg, enum_to_str=True)


def _train(
    cfg: DictConfig, run_dir: Path, choices: dict[str, str] | None, clock: Callable[[], float]
) -> RunResult:
    start = time.perf_counter()
    POPULATION_FACTORS.keep_for(cfg)
    validate(cfg)
    ridge = cfg.optimizer.name == "ridge"
    check_machine(cfg)
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    device = resolve_device(cfg.device)
    target = build_target(cfg.target, device)
    test_set = TestSet(cfg, target, device)
    model = build_model(cfg.model, init_seeds(cfg), device)
    data = training_data(cfg, target, device)
    exact = exact_moments(cfg, target, model)
    # A population width path holds the exact errors itself, at every width.
    rf_exact = not (ridge and cfg.optimizer.width_path and cfg.optimizer.population)
    theory = reference_errors(cfg, target, model, exact and exact.moments, rf_exact)
    config = OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)
    with RunLock(run_dir):
        checkpoint = load_checkpoint(run_dir, config) if cfg.resume else None
        loop = None if ridge else Loop(cfg, model, data, test_set, start, clock)
        if loop is not None and checkpoint is not None:
            loop.restore(checkpoint, run_dir / CHECKPOINT_NAME)  # before anything is written
        record = RunRecord(run_dir, config, hparams_of(cfg), checkpoint)
        return _fit(cfg, record, loop, model, data, test_set, exact, theory, choices, start)


def _fit(
    cfg: DictConfig,
    record: RunRecord,
    loop: Loop | None,
    model: Model,
    data: Data,
    test_set: TestSet,
    exact: ExactMoments | None,
    theory: dict[str, object],
    choices: dict[str, str] | None,
    start: float,
) -> RunResult:
    """Fit with the loop or, without one, by ridge, and close the record. From the record's
    first write on, a signal leaves it ``interrupted`` and an error ``failed``."""
    device = data.device
    interrupted_by = None
    try:
        record.write(
            "running",
            **({"learning_rates": loop.learning_rates} if loop else {}),
            device=str(device),
            torch_threads=torch.get_num_threads(),
            replica_seeds=init_seeds(cfg),
            normaliser=test_set.normaliser,
            theory=theory,
            choices=choices or {},
        )
        if record.resumed_from is None:
            record.log_theory(0, theory)
            kind = "train" if loop else "population" if cfg.optimizer.population else "fit"
            nothing = torch.full((cfg.replicas,), torch.nan, device=device)  # nothing fitted
            clock = Stopwatch(device)
            mark = clock.mark()
            initial = test_set.evaluate(model, nothing, kind)
            record.log_eval(0, initial)
            if loop is not None:
                loop.evaluation_s += clock.since(mark)
        if loop is None:
            status, metrics, steps_done, steps_per_s = fit_by_ridge(
                cfg, model, data, test_set, record, exact
            )
        else:
            status, metrics, steps_done, steps_per_s = loop.run(record)
            interrupted_by = loop.signal
    except (KeyboardInterrupt, Interrupted) as error:
        signum = getattr(error, "signum", signal.SIGINT)
        record.write(
            "interrupted",
            interrupted_by=signal.Signals(signum).name,
            wall_time_s=time.perf_counter() - start,
        )
        record.close(None, 0)
        raise
    except OSError as error:
        _write_failed(record, error)
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
        try:
            record.log_theory(steps_done, theory)
            record.write(
                status,
                metrics=metrics,
                steps_done=steps_done,
                wall_time_s=wall_time,
                steps_per_s=steps_per_s,
                output_weights=output_weight_norms(model),
            )
        except OSError as error:
            _write_failed(record, error)
            raise
        # Finished: nothing to resume. Removed once the record says so, never before.
        (record.run_dir / CHECKPOINT_NAME).unlink(missing_ok=True)
        record.close(metrics, steps_done)
    return RunResult(
        status,
        metrics,
        theory,
        steps_done,
        wall_time,
        steps_per_s,
        str(device),
        record.run_dir,
        model,
        interrupted_by,
    )


def _write_failed(record: RunRecord, error: OSError) -> None:
    """A write that failed (a full disk): the record falls back to its last good state
    (:meth:`RunRecord.fall_back`), the checkpoint stays, and the writer is closed if it can be."""
    record.fall_back(error)
    with contextlib.suppress(OSError):  # the disk may refuse TensorBoard's last flush too
        record.close(None, 0)


def steps_to_error_record(thresholds: list[float], reached: torch.Tensor) -> dict[str, object]:
    """The record's ``steps_to_error``: per threshold (a key such as "0.1") the first evaluated
    step whose test error was at or below it, null if none; a list over replicas when R > 1."""
    rows = [[None if s < 0 else s for s in row] for row in reached.t().tolist()]
    return {
        f"{t:g}": row[0] if len(row) == 1 else row for t, row in zip(thresholds, rows, strict=True)
    }


@dataclass
class Progress:
    """The loop's own counters, per replica where they are tensors (R,)."""

    loss_sum: torch.Tensor  # training losses since the last evaluation (on the device)
    best: torch.Tensor  # lowest test error seen
    reached: torch.Tensor  # (R, T): the first evaluated step at or below each threshold, or -1
    step: int = 0
    status: str = "ok"
    steps_in_sum: int = 0

    def state_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    def load_state_dict(self, state: dict) -> None:
        """From :meth:`state_dict` as loaded (onto the CPU). A state of other fields, types or
        shapes raises ValueError before any field is set."""
        names = [f.name for f in dataclasses.fields(self)]
        if not isinstance(state, dict) or sorted(state) != sorted(names):
            held = sorted(map(str, state)) if isinstance(state, dict) else type(state).__name__
            raise ValueError(f"progress holds {held}, not the fields {sorted(names)}")
        for name in names:
            now, saved = getattr(self, name), state[name]
            if isinstance(now, torch.Tensor):
                same = (
                    isinstance(saved, torch.Tensor)
                    and saved.shape == now.shape
                    and saved.dtype == now.dtype
                )
                expected = f"a {now.dtype} tensor of shape {tuple(now.shape)}"
            else:
                same, expected = type(saved) is type(now), f"of type {type(now).__name__}"
            if not same:
                raise ValueError(f"progress.{name} is not {expected}")
        for name in names:
            now, saved = getattr(self, name), state[name]
            setattr(self, name, saved.to(now.device) if isinstance(now, torch.Tensor) else saved)


class Streams:
    """The random generators that the remaining steps draw from, as one resumable object."""

    def __init__(self, generators: list[torch.Generator]) -> None:
        self.generators = generators

    def state_dict(self) -> list[torch.Tensor]:
        return [g.get_state() for g in self.generators]

    def load_state_dict(self, states: list[torch.Tensor]) -> None:
        for g, saved in zip(self.generators, states, strict=True):
            g.set_state(saved)


class CheckpointPolicy:
    """When the loop writes a checkpoint between steps, besides the one that SIGTERM or SIGINT
    always gets: every ``every_steps`` steps where that is set (``checkpoint_every``), else at
    the end of the first step at least ``every_s`` seconds of ``clock`` after the last
    checkpoint or the start of the loop (``checkpoint_every_s``; None: never). Never after the
    last step, since a finished run keeps none. A checkpoint of a small model costs a few
    milliseconds, and a run's set-up more than a periodic one saves, so by default a run
    shorter than ``every_s`` writes none: a kill that no handler sees (SIGKILL, a lost node)
    costs at most ``every_s`` seconds of steps, plus the set-up."""

    def __init__(
        self, every_steps: int | None, every_s: float | None, clock: Callable[[], float]
    ) -> None:
        self.every_steps, self.every_s, self.clock = every_steps, every_s, clock
        self.last = clock()

    def due(self, step: int) -> bool:
        """Whether to write a checkpoint after ``step``."""
        if self.every_steps is not None:
            return step % self.every_steps == 0
        return self.every_s is not None and self.clock() - self.last >= self.every_s

    def saved(self) -> None:
        """A checkpoint was written now: the next one is due ``every_s`` from here."""
        self.last = self.clock()


class Loop:
    """The optimizer loop: ``steps`` minibatch steps, evaluating every ``eval_every``, with a
    checkpoint as :class:`CheckpointPolicy` says and on SIGTERM or SIGINT, after which it
    stops with status ``interrupted`` (a signal at the last step lets the run finish).

    Everything the remaining steps depend on is in :attr:`resumable`, objects with
    ``state_dict`` / ``load_state_dict``: a checkpoint is their states, and restoring one
    loads each of them back, so that saving and restoring cannot drift apart."""

    def __init__(
        self,
        cfg: DictConfig,
        model: Model,
        data: Data,
        test_set: TestSet,
        start: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.cfg, self.model, self.data, self.test_set = cfg, model, data, test_set
        self.start, self.clock = start, clock
        self.record: RunRecord | None = None  # given to run()
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
        self.laziness_s = 0.0  # seconds spent on the laziness measures in this process
        self.evaluation_s = 0.0  # ... on evaluations (step 0's, the laziness measures too)
        self.thresholds = [float(t) for t in cfg.steps_to_error]
        self.gradient_step = gradient_step(cfg, model, self.params)
        rounding = make_generator(data.device, cfg.seed, ROUNDING_STREAM)
        self.precision = GradientPrecision(cfg.optimizer, rounding)
        lr = cfg.optimizer.lr
        self.rates = PerReplicaRates(lr, self.params) if isinstance(lr, ListConfig) else None
        self.progress = Progress(
            loss_sum=torch.zeros(cfg.replicas, device=data.device),
            best=torch.full((cfg.replicas,), torch.inf),
            reached=torch.full((cfg.replicas, len(self.thresholds)), -1, dtype=torch.long),
        )
        self.resumable = {
            "progress": self.progress,
            "model": model,
            "optimizer": self.optimizer,
            "scheduler": self.scheduler,
            "generators": Streams([*data.gens, self.precision.gen]),
            "batches": self.batches,
        }
        self.all_diverged = False
        self.signal: int | None = None

    def state(self) -> dict:
        """The checkpoint's content: the state of every resumable object."""
        return {name: part.state_dict() for name, part in self.resumable.items()}

    def restore(self, state: dict, path: Path) -> None:
        """Load a checkpoint's :meth:`state` back (as loaded from ``path``, onto the CPU); one
        that does not hold this loop's state raises :class:`CheckpointError`."""
        try:
            for name, part in self.resumable.items():
                part.load_state_dict(state[name])
        except (KeyError, TypeError, ValueError, IndexError, AttributeError, RuntimeError) as error:
            lines = str(error).splitlines() or [""]
            reason = f"{type(error).__name__}: {lines[0][:200]}"
            raise CheckpointError(path, f"does not hold this run's state ({reason})") from None
        if not 0 <= self.progress.step < self.cfg.steps:  # the loop checkpoints no last step
            reason = f"step {self.progress.step}, in a run of {self.cfg.steps} steps"
            raise CheckpointError(path, f"does not hold this run's state ({reason})")

    def _on_signal(self, signum: int, frame: object) -> None:
        self.signal = signum  # acted on at the end of the step (after an evaluation in flight)

    def run(self, record: RunRecord) -> tuple[str, dict[str, torch.Tensor], int, float]:
        """The remaining steps, logged to ``record`` (restore a checkpoint first). Returns the
        status, final metrics, steps done and steps per second of this call's steps (set-up,
        evaluation and saving left out; 0 when interrupted)."""
        self.record = record
        handlers = {s: signal.signal(s, self._on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
        try:
            return self._steps()
        finally:
            for s, handler in handlers.items():
                signal.signal(s, handler)

    def _steps(self) -> tuple[str, dict[str, torch.Tensor], int, float]:
        cfg, optimizer, progress = self.cfg, self.optimizer, self.progress
        gradient_step = self.gradient_step
        scheduled = cfg.optimizer.schedule != "constant" or cfg.optimizer.warmup_steps > 0
        steps, eval_every = cfg.steps, cfg.eval_every  # plain ints: no config look-up per step
        policy = CheckpointPolicy(cfg.checkpoint_every, cfg.checkpoint_every_s, self.clock)
        bar = tqdm(
            total=steps,
            initial=progress.step,
            desc=f"{cfg.model.name} d={cfg.d} width={cfg.width}",
            disable=not (cfg.progress and sys.stderr.isatty()),
            dynamic_ncols=True,
        )
        metrics: dict[str, torch.Tensor] = {}
        clock, first_step = Stopwatch(self.data.device), progress.step
        step_time, segment = 0.0, clock.mark()  # the steps' time: evaluation and saving left out
        with bar:
            for step in range(progress.step + 1, steps + 1):
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
                progress.loss_sum += per_replica
                progress.steps_in_sum += 1
                progress.step = step
                bar.update()

                # A signal at the last step finishes the run: it needs only its final record.
                last = step == steps
                evaluate = step % eval_every == 0 or last
                save = not last and (self.signal is not None or policy.due(step))
                if not (evaluate or save):
                    continue
                step_time += clock.since(segment)
                if evaluate:
                    metrics = self._evaluate((step - first_step) / max(1e-9, step_time))
                    bar.set_postfix(test_error=f"{float(metrics['test_error'].mean()):.4g}")
                stop = self.signal is not None and not last  # one during the evaluation too
                if save or stop:
                    self.record.checkpoint(self.state())
                    policy.saved()
                if stop:
                    name = signal.Signals(self.signal).name
                    self.record.write("interrupted", steps_done=step, interrupted_by=name)
                    return "interrupted", metrics, step, 0.0
                segment = clock.mark()
                if evaluate and self.all_diverged:
                    break
        step_time += clock.since(segment)
        done = progress.step
        return progress.status, metrics, done, (done - first_step) / max(1e-9, step_time)

    def _evaluate(self, steps_per_s: float) -> dict[str, torch.Tensor]:
        """Test metrics, TensorBoard, the record; marks divergence (NaN or Inf). At the last
        step the record is written by the run's final write, which follows."""
        progress, clock = self.progress, Stopwatch(self.data.device)
        start = clock.mark()
        metrics = self.test_set.evaluate(self.model, progress.loss_sum / progress.steps_in_sum)
        if self.laziness is not None:
            mark = clock.mark()
            metrics |= self.laziness.measure(self.model)
            self.laziness_s += clock.since(mark)
        progress.loss_sum.zero_()
        progress.steps_in_sum = 0
        self.record.log_eval(progress.step, metrics)
        self.evaluation_s += clock.since(start)
        finite = torch.isfinite(metrics["train_loss"]) & torch.isfinite(metrics["test_error"])
        error = metrics["test_error"].detach().cpu()
        progress.best = torch.fmin(progress.best, error)
        below = torch.tensor(self.thresholds).unsqueeze(0) >= error.unsqueeze(1)  # (R, T)
        progress.reached = torch.where(
            (progress.reached < 0) & below, progress.step, progress.reached
        )
        fields = dict(
            metrics=metrics,
            best_test_error=[v if v < float("inf") else None for v in progress.best.tolist()],
            steps_to_error=steps_to_error_record(self.thresholds, progress.reached),
            laziness_s=self.laziness_s,
            evaluation_s=self.evaluation_s,
            steps_done=progress.step,
            wall_time_s=time.perf_counter() - self.start,
            steps_per_s=steps_per_s,
        )
        if not bool(finite.all()):
            progress.status = "diverged"
            fields["diverged_replicas"] = (~finite).nonzero().flatten().tolist()
        if progress.step == self.cfg.steps:
            self.record.update(**fields)
        else:
            self.record.write("running", **fields)
        self.all_diverged = not bool(finite.any())
        return metrics
