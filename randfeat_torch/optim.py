"""Optimizers and learning-rate schedules for the parameters that are not frozen."""

from __future__ import annotations

import math

import torch
from omegaconf import DictConfig
from torch import nn


def build_optimizer(
    cfg: DictConfig, model: nn.Module, steps: int
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """The optimizer named by ``cfg.name`` over the trainable parameters, and its schedule."""
    params = [p for p in model.parameters() if p.requires_grad]
    if cfg.name == "sgd":
        optimizer: torch.optim.Optimizer = torch.optim.SGD(
            params,
            lr=cfg.lr,
            momentum=cfg.momentum,
            nesterov=cfg.nesterov,
            weight_decay=cfg.weight_decay,
        )
    else:
        optimizer = torch.optim.Adam(
            params,
            lr=cfg.lr,
            betas=tuple(cfg.betas),
            eps=cfg.eps,
            weight_decay=cfg.weight_decay,
        )
    factor = schedule_factor(cfg.schedule, cfg.warmup_steps, steps)
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


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
    """Finite-precision gradients (the bSGD model of Karchmer & Malach, ICML 2025): clip each
    coordinate to [-grad_clip, grad_clip], then round it to a multiple of grad_precision, to the
    nearest or (``stochastic_rounding``) up or down at random with the unbiased probabilities."""

    def __init__(self, cfg: DictConfig, gen: torch.Generator) -> None:
        self.clip, self.precision = cfg.grad_clip, cfg.grad_precision
        self.stochastic, self.gen = cfg.stochastic_rounding, gen

    @property
    def active(self) -> bool:
        return self.clip is not None or self.precision is not None

    @torch.no_grad()
    def apply(self, params: list[torch.Tensor]) -> None:
        """Transform every ``p.grad`` in place."""
        for p in params:
            g = p.grad
            if self.clip is not None:
                g.clamp_(-self.clip, self.clip)
            if self.precision is not None:
                g.div_(self.precision)
                if self.stochastic:
                    g.add_(torch.rand(g.shape, generator=self.gen, device=g.device)).floor_()
                else:
                    g.round_()
                g.mul_(self.precision)
