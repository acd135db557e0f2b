"""Optimizers and learning-rate schedules for the parameters that are not frozen."""

from __future__ import annotations

import math

import torch
from omegaconf import DictConfig, ListConfig
from torch import nn

from randfeat_torch.config import base_lr

# The parameter groups of the two-layer net and of its linearization (dw = w - w0, db = b - b0).
PARAMETER_GROUPS = {"a": "a", "c": "c", "w": "w", "b": "b", "dw": "w", "db": "b"}


def lr_multipliers(
    optimizer: str, parameterization: str, width: int, scaling: str
) -> dict[str, float]:
    """Each parameter group's learning rate as a multiple of ``optimizer.lr``.

    ``scaling=uniform``: 1 for every group. ``scaling=parameterization``: the multiples that
    make every group's share of one step's change in f independent of the width N, so that one
    base rate trains each parameterization at every width (as in the mean-field and
    maximal-update papers). SGD: each group's share of the tangent kernel,
    sum_j |df/dtheta_j|^2, is O(1) (then all three parameterizations have the same tangent
    kernel at init); Adam, whose update is about lr per coordinate: sum_j |df/dtheta_j| is.

                     SGD: a      w, b    c        Adam: a     w, b     c
        standard         1/N     1       1              1/N   1/sqrt N  1
        ntk              1       1       1          1/sqrt N  1/sqrt N  1
        mean_field       N       N       1              1     1         1
    """
    if scaling == "uniform":
        return dict.fromkeys("awbc", 1.0)
    root = math.sqrt(width)
    table = {
        ("sgd", "standard"): (1 / width, 1.0),
        ("sgd", "ntk"): (1.0, 1.0),
        ("sgd", "mean_field"): (float(width), float(width)),
        ("adam", "standard"): (1 / width, 1 / root),
        ("adam", "ntk"): (1 / root, 1 / root),
        ("adam", "mean_field"): (1.0, 1.0),
    }
    a, first_layer = table[optimizer, parameterization]
    return {"a": a, "w": first_layer, "b": first_layer, "c": 1.0}


def build_optimizer(
    cfg: DictConfig, model: nn.Module, steps: int
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """The optimizer named by ``cfg.name`` over the trainable parameters, one group per rate
    multiplier of :func:`lr_multipliers` (at ``lr`` x it; the group holds its ``multiplier`` and
    its parameters' ``names``), and its schedule. With one lr per
    replica the optimizer runs at the first; :class:`PerReplicaRates` rescales. Both run fused:
    one kernel updates every parameter and its state."""
    lr = base_lr(cfg.lr)
    multipliers = lr_multipliers(cfg.name, model.parameterization, model.width, cfg.lr_scaling)
    # One optimizer group per multiplier (one group under ntk with SGD: one fused kernel).
    groups: dict[float, dict] = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            multiplier = multipliers[PARAMETER_GROUPS[name]]
            group = groups.setdefault(
                multiplier,
                {"params": [], "lr": lr * multiplier, "multiplier": multiplier, "names": []},
            )
            group["params"].append(p)
            group["names"].append(name)
    params = list(groups.values())
    if cfg.name == "sgd":
        optimizer: torch.optim.Optimizer = torch.optim.SGD(
            params,
            lr=lr,
            momentum=cfg.momentum,
            nesterov=cfg.nesterov,
            weight_decay=cfg.weight_decay,
            fused=True,
        )
    else:
        optimizer = torch.optim.Adam(
            params,
            lr=lr,
            betas=tuple(cfg.betas),
            eps=cfg.eps,
            weight_decay=cfg.weight_decay,
            fused=True,
        )
    factor = schedule_factor(cfg.schedule, cfg.warmup_steps, steps)
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


class PerReplicaRates:
    """One learning rate per replica (``optimizer.lr`` as a list of R numbers), for lr sweeps in
    one pass. The optimizer steps at lr[0]; each replica's update is then rescaled by
    lr[r] / lr[0]. SGD's momentum and Adam's moments do not depend on the rate, so this is the
    update that rate would have made, schedules included."""

    def __init__(self, lr: ListConfig, params: list[torch.Tensor]) -> None:
        ratios = torch.tensor([float(v) / float(lr[0]) for v in lr], device=params[0].device)
        self.params = params
        self.ratios = [ratios.view(-1, *[1] * (p.dim() - 1)) for p in params]
        self.before = [torch.empty_like(p) for p in params]

    @torch.no_grad()
    def remember(self) -> None:
        """Copy the parameters before the optimizer step."""
        for saved, p in zip(self.before, self.params, strict=True):
            saved.copy_(p)

    @torch.no_grad()
    def rescale(self) -> None:
        """p = before + ratio * (p - before), replica by replica."""
        for saved, p, ratio in zip(self.before, self.params, self.ratios, strict=True):
            p.sub_(saved).mul_(ratio).add_(saved)


def schedule_factor(schedule: str, warmup_steps: int, steps: int):
    """Multiplier of the base lr at a step: linear warm-up, then constant or cosine to zero."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        if schedule == "constant":
            return 1.0
        progress = (step - warmup_steps) / max(1, steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


class GradientPrecision:
    """Finite-precision gradients (the bSGD model of Karchmer & Malach, ICML 2025): clamp each
    coordinate to [-grad_clamp, grad_clamp] (not a clip of the norm), then round it to a
    multiple of grad_precision, to the nearest or (``stochastic_rounding``) up or down at
    random with the unbiased probabilities.
    ``grad_precision`` as a list gives each replica its own precision (0: exact), so that one
    pass trains a grid of precisions side by side."""

    def __init__(self, cfg: DictConfig, gen: torch.Generator) -> None:
        self.clamp, self.precision = cfg.grad_clamp, cfg.grad_precision
        self.stochastic, self.gen = cfg.stochastic_rounding, gen
        self.per_replica: list[torch.Tensor] | None = None
        if isinstance(self.precision, ListConfig):
            self.precision = torch.tensor([float(c) for c in self.precision])

    @property
    def active(self) -> bool:
        return self.clamp is not None or self.precision is not None

    @torch.no_grad()
    def apply(self, params: list[torch.Tensor]) -> None:
        """Transform every ``p.grad`` in place."""
        if isinstance(self.precision, torch.Tensor) and self.per_replica is None:
            # (R, 1, ...) per parameter: the step to round to, 1 where a replica is exact (whose
            # gradient is then put back as it was), and which replicas round
            c = self.precision.to(params[0].device)
            shapes = [(-1, *[1] * (p.dim() - 1)) for p in params]
            self.per_replica = [torch.where(c > 0, c, 1.0).view(shape) for shape in shapes]
            self.rounds = [(c > 0).view(shape) for shape in shapes]
        for i, p in enumerate(params):
            g = p.grad
            if self.clamp is not None:
                g.clamp_(-self.clamp, self.clamp)
            if self.precision is None:
                continue
            step = self.precision if self.per_replica is None else self.per_replica[i]
            exact = None if self.per_replica is None else g.clone()
            g.div_(step)
            if self.stochastic:
                g.add_(torch.rand(g.shape, generator=self.gen, device=g.device)).floor_()
            else:
                g.round_()
            g.mul_(step)
            if exact is not None:
                torch.where(self.rounds[i], g, exact, out=g)
