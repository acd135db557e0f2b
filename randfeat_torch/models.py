"""The two-layer network, held as R independent replicas, with its first layer trainable or frozen.

f_r(x) = m * sum_j a_rj act(<w_rj, x> + b_rj) + c_r,   r = 0..R-1, j = 0..width-1

Random features and the fully trained net are this one class: ``freeze_first_layer`` turns off
gradients for ``w`` and ``b`` (they stay at their random init), leaving ``a`` and ``c``.

Parameterizations (the output multiplier m and the init of a):
  standard    m = 1              a ~ N(0, 1/width)
  ntk         m = 1/sqrt(width)  a ~ N(0, 1)
  mean_field  m = 1/width        a ~ N(0, 1)
The first layer is the same in all three: w ~ N(0, I/d) (``init=gaussian``) or uniform on the
unit sphere (``init=sphere``), hidden bias b ~ N(0, 1) when ``bias`` is on, c = 0.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from torch import nn

from randfeat_torch.targets import make_generator

ACTIVATION_FUNCTIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "relu": torch.relu,
    "gelu": F.gelu,
    "tanh": torch.tanh,
    "softplus": F.softplus,
    "quadratic": torch.square,
}
OUTPUT_MULTIPLIERS: dict[str, Callable[[int], float]] = {
    "standard": lambda width: 1.0,
    "ntk": lambda width: 1.0 / math.sqrt(width),
    "mean_field": lambda width: 1.0 / width,
}


class TwoLayerNet(nn.Module):
    """R replicas of a two-layer net; parameters w: (R, width, d), b: (R, width),
    a: (R, width), c: (R,). Replica r is initialised from seed ``seed + r``."""

    def __init__(
        self,
        d: int,
        width: int,
        replicas: int = 1,
        freeze_first_layer: bool = False,
        activation: str = "relu",
        bias: bool = True,
        init: str = "gaussian",
        parameterization: str = "standard",
        output_init: str = "gaussian",
        seed: int = 0,
        device: torch.device | str = "cpu",
    ) -> None:
        super().__init__()
        device = torch.device(device)
        self.d, self.width, self.replicas = d, width, replicas
        self.frozen = freeze_first_layer
        self.act = ACTIVATION_FUNCTIONS[activation]
        self.multiplier = OUTPUT_MULTIPLIERS[parameterization](width)
        a_std = 1.0 / math.sqrt(width) if parameterization == "standard" else 1.0

        w, b, a = [], [], []
        for r in range(replicas):
            gen = make_generator(device, seed + r, stream=1)
            w_r = torch.randn(width, d, generator=gen, device=device)
            w_r = w_r / w_r.norm(dim=1, keepdim=True) if init == "sphere" else w_r / math.sqrt(d)
            w.append(w_r)
            b.append(torch.randn(width, generator=gen, device=device))
            a.append(torch.randn(width, generator=gen, device=device) * a_std)
        self.w = nn.Parameter(torch.stack(w), requires_grad=not self.frozen)
        self.b = nn.Parameter(torch.stack(b), requires_grad=not self.frozen) if bias else None
        a_init = torch.stack(a) if output_init == "gaussian" else torch.zeros(replicas, width)
        self.a = nn.Parameter(a_init.to(device))
        self.c = nn.Parameter(torch.zeros(replicas, device=device))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Hidden activations act(<w, x> + b). x: (n, d) shared or (R, n, d) -> (R, n, width)."""
        pre = torch.matmul(x, self.w.transpose(1, 2))
        if self.b is not None:
            pre = pre + self.b.unsqueeze(1)
        return self.act(pre)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (n, d) shared by all replicas, or (R, n, d) -> predictions (R, n)."""
        h = self.features(x)
        out = torch.baddbmm(self.c.view(-1, 1, 1), h, self.a.unsqueeze(-1), alpha=self.multiplier)
        return out.squeeze(-1)


def build_model(cfg: DictConfig, seed: int, device: torch.device) -> TwoLayerNet:
    """The two-layer net described by the ``model`` config group."""
    return TwoLayerNet(
        d=cfg.d,
        width=cfg.width,
        replicas=cfg.replicas,
        freeze_first_layer=cfg.freeze_first_layer,
        activation=cfg.activation,
        bias=cfg.bias,
        init=cfg.init,
        parameterization=cfg.parameterization,
        output_init=cfg.output_init,
        seed=seed,
        device=device,
    )
