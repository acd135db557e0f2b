"""The training loop: one function from a validated config to a finished run record.

Data never leaves the device: inputs are drawn there (online: a fresh batch each step;
finite: ``n_train`` samples once, then shuffled minibatches), the held-out test set is drawn
once from the target's seed, and the host reads device values only at evaluations.
The loss is the mean squared error, summed over replicas (so each replica gets exactly the
gradient of its own loss); the error reported everywhere is the normalised test error,
test MSE / variance of the test targets (1.0 = predicting the mean).
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm

from randfeat_torch.config import ConfigError, validate
from randfeat_torch.models import TwoLayerNet, build_model
from randfeat_torch.optim import build_optimizer
from randfeat_torch.record import RunRecord
from randfeat_torch.targets import Target, build_target, gaussian_inputs, make_generator

TEST_STREAM, TRAIN_STREAM = 2, 3
EVAL_ELEMENTS = 2**24  # hidden activations held at once while evaluating


@dataclass
class RunResult:
    """What a finished run reports: status, final metrics (tensors of shape (R,)), timing."""

    status: str
    metrics: dict[str, torch.Tensor]
    steps_done: int
    wall_time_s: float
    steps_per_s: float
    device: str
    run_dir: Path
    model: TwoLayerNet

    @property
    def test_error(self) -> float:
        """Mean over replicas of the final normalised test error."""
        return float(self.metrics["test_error"].double().mean())


def resolve_device(name: str) -> torch.device:
    """``auto`` picks CUDA when present (``validate`` refuses ``cuda`` without it)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


class TestSet:
    """A fixed held-out sample (x: (n_test, d), y: (n_test,)) drawn from the target's seed,
    so that every model of a sweep is scored on the same points."""

    def __init__(self, target: Target, n_test: int, seed: int, device: torch.device):
        """Draw the sample; a target that is constant on it is refused (no error to normalise)."""
        gen = make_generator(device, seed, TEST_STREAM)
        self.x = gaussian_inputs(n_test, target.d, gen, device)
        self.y = target(self.x)
        self.variance = self.y.var(correction=0)
        if not float(self.variance) > 0:
            raise ConfigError(
                "target",
                target.name,
                f"is constant on the {n_test} test inputs, so the normalised error is undefined",
            )

    @torch.no_grad()
    def evaluate(self, model: TwoLayerNet) -> dict[str, torch.Tensor]:
        """Test MSE and normalised test error per replica, each (R,), in bounded memory."""
        n = self.x.shape[0]
        chunk = max(1, EVAL_ELEMENTS // (model.replicas * model.width))
        sse = torch.zeros(model.replicas, device=self.x.device)
        for i in range(0, n, chunk):
            sse += (model(self.x[i : i + chunk]) - self.y[i : i + chunk]).square().sum(dim=1)
        mse = sse / n
        return {"test_mse": mse, "test_error": mse / self.variance}


class Batches:
    """Training minibatches on the device: online draws, or shuffled passes over n_train."""

    def __init__(self, cfg: DictConfig, target: Target, device: torch.device):
        self.gen = make_generator(device, cfg.seed, TRAIN_STREAM)
        self.target, self.batch_size, self.device = target, cfg.batch_size, device
        self.online = cfg.n_train is None
        if self.online:
            self.x = torch.empty(cfg.batch_size, cfg.d, device=device)
        else:
            self.x = gaussian_inputs(cfg.n_train, cfg.d, self.gen, device)
            self.y = target(self.x)
            self.order = torch.empty(0, dtype=torch.long, device=device)
            self.pos = 0

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        """x: (batch, d), y: (batch,)."""
        if self.online:
            gaussian_inputs(self.batch_size, self.x.shape[1], self.gen, self.device, out=self.x)
            return self.x, self.target(self.x)
        n = self.x.shape[0]
        if n == self.batch_size:  # full-batch gradient descent
            return self.x, self.y
        if self.pos + self.batch_size > self.order.numel():
            self.order = torch.randperm(n, generator=self.gen, device=self.device)
            self.pos = 0
        idx = self.order[self.pos : self.pos + self.batch_size]
        self.pos += self.batch_size
        return self.x[idx], self.y[idx]


def hparams_of(cfg: DictConfig) -> dict[str, object]:
    """The knobs shown as columns in TensorBoard's hparams dashboard."""
    return {
        "model": cfg.model.name,
        "target": cfg.target.name,
        "optimizer": cfg.optimizer.name,
        "d": cfg.d,
        "width": cfg.width,
        "replicas": cfg.replicas,
        "seed": cfg.seed,
        "target_seed": cfg.target.seed,
        "lr": cfg.optimizer.lr,
        "steps": cfg.steps,
        "batch_size": cfg.batch_size,
        "n_train": cfg.n_train,
        "activation": cfg.model.activation,
        "parameterization": cfg.model.parameterization,
    }


def train(cfg: DictConfig, run_dir: Path | str) -> RunResult:
    """Train the configured model on the configured target; write the record in ``run_dir``."""
    start = time.perf_counter()
    validate(cfg)
    device = resolve_device(cfg.device)
    target = build_target(cfg.target, device)
    test_set = TestSet(target, cfg.n_test, cfg.target.seed, device)
    model = build_model(cfg.model, cfg.seed, device)
    optimizer, scheduler = build_optimizer(cfg.optimizer, model, cfg.steps)
    batches = Batches(cfg, target, device)

    record = RunRecord(Path(run_dir), OmegaConf.to_container(cfg, resolve=True), hparams_of(cfg))
    record.write("running", device=str(device))
    progress = tqdm(
        total=cfg.steps,
        desc=f"{cfg.model.name} d={cfg.d} width={cfg.width}",
        disable=not (cfg.progress and sys.stderr.isatty()),
        dynamic_ncols=True,
    )
    loss_sum = torch.zeros(cfg.replicas, device=device)
    steps_in_sum, step, status = 0, 0, "ok"
    metrics = {**test_set.evaluate(model), "train_loss": torch.full_like(loss_sum, float("nan"))}
    record.log_eval(0, metrics)
    loop_start = time.perf_counter()
    try:
        for step in range(1, cfg.steps + 1):
            x, y = batches.next()
            per_replica = (model(x) - y).square().mean(dim=1)  # (R,)
            optimizer.zero_grad(set_to_none=True)
            per_replica.sum().backward()
            optimizer.step()
            scheduler.step()
            loss_sum += per_replica.detach()
            steps_in_sum += 1
            progress.update()

            if step % cfg.eval_every == 0 or step == cfg.steps:
                metrics = {**test_set.evaluate(model), "train_loss": loss_sum / steps_in_sum}
                loss_sum.zero_()
                steps_in_sum = 0
                record.log_eval(step, metrics)
                finite = torch.isfinite(metrics["train_loss"]) & torch.isfinite(
                    metrics["test_error"]
                )
                progress.set_postfix(test_error=f"{float(metrics['test_error'].mean()):.4g}")
                elapsed = time.perf_counter() - loop_start
                fields = dict(
                    metrics=metrics,
                    steps_done=step,
                    wall_time_s=time.perf_counter() - start,
                    steps_per_s=step / elapsed,
                )
                if not bool(finite.all()):
                    status = "diverged"
                    diverged = (~finite).nonzero().flatten().tolist()
                    record.write("running", diverged_replicas=diverged, **fields)
                    if not bool(finite.any()):
                        break
                else:
                    record.write("running", **fields)
    except KeyboardInterrupt:
        record.write("interrupted", steps_done=step, wall_time_s=time.perf_counter() - start)
        record.close(None, step)
        raise
    except Exception as error:
        record.write(
            "failed",
            error=f"{type(error).__name__}: {error}",
            steps_done=step,
            wall_time_s=time.perf_counter() - start,
        )
        record.close(None, step)
        raise
    finally:
        progress.close()

    loop_time = time.perf_counter() - loop_start
    wall_time = time.perf_counter() - start
    record.write(
        status,
        metrics=metrics,
        steps_done=step,
        wall_time_s=wall_time,
        steps_per_s=step / loop_time,
    )
    record.close(metrics, step)
    return RunResult(
        status, metrics, step, wall_time, step / loop_time, str(device), Path(run_dir), model
    )
