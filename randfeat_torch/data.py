"""The data of a run, on its device: inputs from the configured distribution labelled by the
target, the fixed held-out test set, and the training minibatches.

Each comes from its own named random stream of an explicit generator (:func:`make_generator`):
the test set from the target's seed, so that every model of a sweep is scored on the same
points; the training data from ``data_seed`` (default ``seed``). The host reads device values
only at evaluations.
"""

from __future__ import annotations

import torch
from omegaconf import DictConfig

from randfeat_torch.config import ConfigError, DataError
from randfeat_torch.kernels import KernelModel
from randfeat_torch.models import LinearizedNet, TwoLayerNet
from randfeat_torch.targets import Target, make_generator, replica_seed, sample_inputs
from randfeat_torch.theory import exact_variance

TEST_STREAM, TRAIN_STREAM = 2, 3
EVAL_ELEMENTS = 2**24  # hidden activations held at once while evaluating

Model = TwoLayerNet | LinearizedNet | KernelModel


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

    def generator_states(self) -> list[torch.Tensor]:
        """The streams' states, for :meth:`set_generator_states` to draw the same again."""
        return [gen.get_state() for gen in self.gens]

    def set_generator_states(self, states: list[torch.Tensor]) -> None:
        """Put the streams back where :meth:`generator_states` found them."""
        for gen, state in zip(self.gens, states, strict=True):
            gen.set_state(state)

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
            raise DataError(
                f"target={target.name} is constant on the {cfg.n_test} test inputs: there is "
                "no variance to normalise the error by; choose another target or input"
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
    def evaluate(
        self, model: Model, fitted: torch.Tensor, kind: str = "train"
    ) -> dict[str, torch.Tensor]:
        """Test MSE and normalised test error per replica, each (R,), in bounded memory, and
        the objective the model was fitted on, ``fitted`` (R,), under a name for its ``kind``:

        - ``train``: the optimizer loop's mean training loss (of ``loss``) since the last
          evaluation, ``train_loss``; for the squared loss also ``train_error`` (normalised by
          the same test variance), for +-1 losses the test 0-1 error of sign(f) instead;
        - ``fit``: the training MSE of a ridge fit on samples, ``fit_mse`` and ``fit_error``;
        - ``population``: the population MSE of a fit on the exact moments,
          ``population_mse`` and ``population_error``."""
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
        }
        if kind == "train":
            metrics["train_loss"] = fitted
            if self.loss == "mse":
                metrics["train_error"] = fitted / self.variance
        else:
            metrics[f"{kind}_mse"] = fitted
            metrics[f"{kind}_error"] = fitted / self.variance
        if self.loss != "mse":
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

    def state_dict(self) -> dict:
        """Where a finite pass stands (online batches depend on the generators alone)."""
        return {} if self.online else {"pos": self.pos, "order": self.order}

    def load_state_dict(self, state: dict) -> None:
        """From :meth:`state_dict` as loaded (onto the CPU): the order goes back to the device."""
        if not self.online:
            order = state["order"]
            self.pos = state["pos"]
            self.order = None if order is None else order.to(self.data.device)
