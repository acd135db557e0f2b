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
