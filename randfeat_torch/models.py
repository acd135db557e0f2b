"""The two-layer network, held as R independent replicas, with its first layer trainable or frozen.

f_r(x) = m * sum_j a_rj act(<w_rj, x> + b_rj) + c_r,   r = 0..R-1, j = 0..width-1

Random features and the fully trained net are this one class: ``freeze_first_layer`` turns off
gradients for ``w`` and ``b`` (they stay at their random init), leaving ``a`` and ``c``.
The third regime, :class:`LinearizedNet`, is this net's first-order Taylor expansion at init.

Parameterizations (the output multiplier m and the init of a):
  standard    m = 1              a ~ N(0, 1/width)
  ntk         m = 1/sqrt(width)  a ~ N(0, 1)
  mean_field  m = 1/width        a ~ N(0, 1)
The first layer is the same in all three: w ~ N(0, I/d) (``init=gaussian``) or uniform on the
unit sphere (``init=sphere``), hidden bias b ~ N(0, 1) when ``bias`` is on, c = 0.
With a lazy scale alpha (Chizat, Oyallon & Bach, 2019) the model is alpha (f - f_0), f_0 the
net at its init, trained on the loss / alpha^2.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from torch import nn

from randfeat_torch.kernels import KernelModel, kernel_spec
from randfeat_torch.targets import make_generator, replica_seed

ACTIVATION_FUNCTIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "relu": torch.relu,
    "gelu": F.gelu,
    "tanh": torch.tanh,
    "softplus": F.softplus,
    "quadratic": torch.square,
}
ACTIVATION_DERIVATIVES: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "relu": lambda z: (z > 0).to(z.dtype),
    "gelu": lambda z: torch.special.ndtr(z) + z * torch.exp(-0.5 * z * z) / math.sqrt(2 * math.pi),
    "tanh": lambda z: 1 - torch.tanh(z).square(),
    "softplus": torch.sigmoid,
    "quadratic": lambda z: 2 * z,
}
# Per-sample losses l(p, y) of a prediction p, and their derivatives dl/dp; hinge and logistic
# are for +-1 targets.
LOSSES: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "mse": lambda p, y: (p - y).square(),
    "hinge": lambda p, y: torch.relu(1 - y * p),
    # log(1 + exp(-y p)), stable, and with the exact derivative (softplus is linear past 20)
    "logistic": lambda p, y: torch.logaddexp(torch.zeros_like(p), -y * p),
}
LOSS_DERIVATIVES: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "mse": lambda p, y: 2 * (p - y),
    "hinge": lambda p, y: -y * (y * p < 1).to(p.dtype),
    "logistic": lambda p, y: -y * torch.sigmoid(-y * p),
}
OUTPUT_MULTIPLIERS: dict[str, Callable[[int], float]] = {
    "standard": lambda width: 1.0,
    "ntk": lambda width: 1.0 / math.sqrt(width),
    "mean_field": lambda width: 1.0 / width,
}


class TwoLayerNet(nn.Module):
    """R replicas of a two-layer net; parameters w: (R, width, d), b: (R, width),
    a: (R, width), c: (R,). Replica r is initialised from ``replica_seed(seed, r)`` (see
    :func:`randfeat_torch.targets.replica_seed`), or from ``seed[r]`` where ``seed`` is a list
    of R seeds."""

    def __init__(
        self,
        d: int,
        width: int,
        replicas: int = 1,
        freeze_first_layer: bool = False,
        activation: str = "relu",
        bias: bool = True,
        init: str = "gaussian",
        parameterization: str = "ntk",
        output_init: str = "gaussian",
        seed: int | Sequence[int] = 0,
        device: torch.device | str = "cpu",
        lazy_scale: float | None = None,
    ) -> None:
        super().__init__()
        device = torch.device(device)
        self.d, self.width, self.replicas = d, width, replicas
        self.frozen = freeze_first_layer
        self.parameterization = parameterization
        self.act = ACTIVATION_FUNCTIONS[activation]
        self.act_derivative = ACTIVATION_DERIVATIVES[activation]
        self.multiplier = OUTPUT_MULTIPLIERS[parameterization](width)
        a_std = 1.0 / math.sqrt(width) if parameterization == "standard" else 1.0

        if isinstance(seed, numbers.Integral):
            seeds = [replica_seed(int(seed), r) for r in range(replicas)]
        elif len(seed) == replicas:
            seeds = list(seed)
        else:
            raise ValueError(f"seed: {len(seed)} seeds for {replicas} replicas")
        w, b, a = [], [], []
        for r in range(replicas):
            gen = make_generator(device, seeds[r], stream=1)
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
        # Chizat, Oyallon & Bach's lazy scale alpha: the model is alpha (f_theta - f_theta0),
        # trained on the loss / alpha^2; theta0 is kept as buffers (saved with the state).
        self.lazy_scale = lazy_scale
        if lazy_scale is not None:
            for name in ("w", "b", "a", "c"):
                param = getattr(self, name)
                self.register_buffer(f"{name}0", None if param is None else param.detach().clone())

    def _pre_activations(
        self, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None
    ) -> torch.Tensor:
        """<w, x> + b. x: (n, d) shared by all replicas -> (n, R, width), one matmul over all
        R * width units, contiguous so that the backward stays contiguous; x: (R, n, d) ->
        (R, n, width)."""
        if x.dim() == 2:
            w_t = w.reshape(-1, self.d).t()
            pre = x @ w_t if b is None else torch.addmm(b.reshape(-1), x, w_t)
            return pre.view(x.shape[0], self.replicas, self.width)
        pre = torch.bmm(x, w.transpose(1, 2))
        return pre if b is None else pre + b.unsqueeze(1)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Hidden activations act(<w, x> + b). x: (n, d) shared or (R, n, d) -> (R, n, width)."""
        hidden = self.act(self._pre_activations(x, self.w, self.b))
        return hidden.transpose(0, 1) if x.dim() == 2 else hidden

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (n, d) shared by all replicas, or (R, n, d) -> predictions (R, n): the net, or
        with a lazy scale alpha (f(x) - f_0(x)) * alpha."""
        out = self.net(x)
        if self.lazy_scale is None:
            return out
        return (out - self.net_at_init(x)).mul_(self.lazy_scale)

    def net(self, x: torch.Tensor) -> torch.Tensor:
        """f(x) at the current parameters, without the lazy scale: (R, n)."""
        return self._output(x, self.w, self.b, self.a, self.c)

    @torch.no_grad()
    def net_at_init(self, x: torch.Tensor) -> torch.Tensor:
        """f_0(x): the net at its init (kept only with a lazy scale), computed as :meth:`net`
        is, so that the lazy model is exactly 0 at init: (R, n)."""
        return self._output(x, self.w0, self.b0, self.a0, self.c0)

    def _output(
        self,
        x: torch.Tensor,
        w: torch.Tensor,
        b: torch.Tensor | None,
        a: torch.Tensor,
        c: torch.Tensor,
    ) -> torch.Tensor:
        if x.dim() == 3:
            h = self.act(self._pre_activations(x, w, b))
            # a as the left factor, (1, width) @ (width, n): see loss_gradients' grad_a
            out = torch.baddbmm(
                c.view(-1, 1, 1), a.unsqueeze(1), h.transpose(1, 2), alpha=self.multiplier
            )
            return out.squeeze(1)
        h = self.act(self._pre_activations(x, w, b))  # (n, R, width)
        if self.replicas == 1:  # a plain matmul: its backward is a matmul too
            out = torch.addmm(c, h.view(x.shape[0], self.width), a.t(), alpha=self.multiplier)
            return out.t()
        return torch.add(c, (h * a).sum(-1), alpha=self.multiplier).t()

    @torch.no_grad()
    def loss_gradients(
        self, x: torch.Tensor, y: torch.Tensor, loss: str = "mse"
    ) -> tuple[torch.Tensor, ...]:
        """Each replica's loss, mean_i l(f_r(x_i), y_i) (l of :data:`LOSSES`), and the exact
        gradient of the training objective (what autograd's backward of their sum gives, without
        the autograd graph): x: (n, d) and y: (n,) shared, or (R, n, d) and (R, n) per replica
        -> (loss (R,), grad_c, grad_a, grad_w, grad_b), the last two None for a frozen first
        layer, grad_b None without bias. With a lazy scale alpha the prediction is
        p = alpha (f - f_0) and the objective mean_i l(p_i, y_i) / alpha^2.

        The backward of the two layers is written out so that it runs in place where autograd
        would allocate anew: with e = l'(p) / (n alpha) (alpha = 1 without a lazy scale),
        grad_c = sum_i e, grad_a = m sum_i e act(pre), grad_w = m a sum_i e act'(pre) x_i and
        grad_b = m a sum_i e act'(pre)."""
        # Units by samples, (R, width, n): the layout in which BLAS runs these matmuls fastest
        # (n is the short side), and every replica's block is contiguous.
        shared = x.dim() == 2
        n, R = x.shape[-2], self.replicas
        # The bias is added after the matmul: addmm would broadcast it first, slowly.
        if shared:
            pre = (self.w.view(-1, self.d) @ x.t()).view(R, self.width, n)
        else:
            pre = torch.bmm(self.w, x.transpose(1, 2))
        if self.b is not None:
            pre += self.b.unsqueeze(-1)
        relu = self.act is torch.relu
        hidden = pre.relu_() if relu else self.act(pre)
        out = torch.baddbmm(  # f: (R, 1, n) = c + m a (1, width) @ act (width, n)
            self.c.view(-1, 1, 1), self.a.unsqueeze(1), hidden, alpha=self.multiplier
        )
        prediction, scale = out.view(R, n), 1.0
        if self.lazy_scale is not None:
            scale = self.lazy_scale
            prediction = (prediction - self.net_at_init(x)).mul_(scale)
        losses = LOSSES[loss](prediction, y).mean(dim=1)
        e = LOSS_DERIVATIVES[loss](prediction, y).mul_(1.0 / (n * scale))  # d objective / d f
        grad_c = e.sum(dim=1)
        # e as the left factor, (1, n) @ (n, width): bmm with a one-column right factor runs
        # 5-10 times slower on CPU for R > 1 (its batched matrix-vector path).
        grad_a = torch.bmm(e.unsqueeze(1), hidden.transpose(1, 2)).view(R, self.width)
        grad_a.mul_(self.multiplier)
        if self.frozen:
            return losses, grad_c, grad_a, None, None
        # act'(pre_ji) e_i, in the activations' buffer; the factor m a_j of the gradient at
        # unit j is applied after the sums over i, to (width, d) only. For ReLU it is e_i where
        # act > 0, else 0: relu's own backward kernel, in one pass (sign_ and mul_ take two).
        if relu:
            e_rows = e.unsqueeze(1).expand_as(hidden)
            slope = torch.ops.aten.threshold_backward.grad_input(
                e_rows, hidden, 0, grad_input=hidden
            )
        else:
            slope = self.act_derivative(pre).mul_(e.unsqueeze(1))
        scale = self.a * self.multiplier  # (R, width)
        grad_w = (slope.view(-1, n) @ x).view_as(self.w) if shared else torch.bmm(slope, x)
        grad_w.mul_(scale.unsqueeze(-1))
        grad_b = None if self.b is None else slope.sum(dim=-1).mul_(scale)
        return losses, grad_c, grad_a, grad_w, grad_b

    def set_gradients(self, grads: tuple[torch.Tensor | None, ...]) -> None:
        """Put the gradients of :meth:`loss_gradients` (after the loss) into ``.grad``."""
        for param, grad in zip((self.c, self.a, self.w, self.b), grads, strict=True):
            if grad is not None:
                param.grad = grad

    def ridge_features(self, x: torch.Tensor) -> torch.Tensor:
        """Features phi with f(x) = <phi(x), a> + c when the first layer is fixed: (R, n, width).
        The values of ``features(x) * multiplier``, computed in the pre-activations' buffer
        where autograd is off (backward would need the activations that it overwrites)."""
        if torch.is_grad_enabled():
            return self.features(x) * self.multiplier
        pre = self._pre_activations(x, self.w, self.b)
        hidden = (pre.relu_() if self.act is torch.relu else self.act(pre)).mul_(self.multiplier)
        return hidden.transpose(0, 1) if x.dim() == 2 else hidden

    def load_ridge_solution(self, beta: torch.Tensor, c: torch.Tensor) -> None:
        """Set the output layer from a fitted beta: (R, width) and c: (R,)."""
        with torch.no_grad():
            self.a.copy_(beta)
            self.c.copy_(c)


class LinearizedNet(nn.Module):
    """The first-order Taylor expansion of :class:`TwoLayerNet` at its init (w0, b0, a0):

    f_lin(x) = m * sum_j [a_j act(p_j) + a0_j act'(p_j) (<w_j - w0_j, x> + b_j - b0_j)] + c,
    p_j = <w0_j, x> + b0_j. It equals the net at init and has the net's gradient there;
    trained parameters are a, dw = w - w0, db = b - b0 and c (shapes as in TwoLayerNet).
    """

    def __init__(self, net: TwoLayerNet) -> None:
        super().__init__()
        self.d, self.width, self.replicas = net.d, net.width, net.replicas
        self.act, self.act_derivative = net.act, net.act_derivative
        self.multiplier, self.parameterization = net.multiplier, net.parameterization
        self.register_buffer("w0", net.w.detach().clone())
        self.register_buffer("b0", None if net.b is None else net.b.detach().clone())
        self.register_buffer("a0", net.a.detach().clone())
        self.a = nn.Parameter(net.a.detach().clone())
        self.dw = nn.Parameter(torch.zeros_like(self.w0))
        self.db = None if net.b is None else nn.Parameter(torch.zeros_like(self.b0))
        self.c = nn.Parameter(net.c.detach().clone())

    def _init_terms(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """act(p) and a0 * act'(p) at the init pre-activations p: each (R, n, width)."""
        pre = torch.matmul(x, self.w0.transpose(1, 2))
        if self.b0 is not None:
            pre = pre + self.b0.unsqueeze(1)
        return self.act(pre), self.act_derivative(pre) * self.a0.unsqueeze(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (n, d) or (R, n, d) -> predictions (R, n)."""
        h, slope = self._init_terms(x)
        moved = torch.matmul(x, self.dw.transpose(1, 2))
        if self.db is not None:
            moved = moved + self.db.unsqueeze(1)
        out = (h * self.a.unsqueeze(1) + slope * moved).sum(-1)
        return out * self.multiplier + self.c.unsqueeze(1)

    def ridge_features(self, x: torch.Tensor) -> torch.Tensor:
        """The tangent features [m act(p), m a0 act'(p) x, m a0 act'(p)]: (R, n, width(d+2))
        (width(d+1) without hidden bias), in the order of :meth:`load_ridge_solution`."""
        h, slope = self._init_terms(x)
        n = h.shape[1]
        x = x.expand(self.replicas, n, self.d) if x.dim() == 2 else x
        blocks = [h, (slope.unsqueeze(-1) * x.unsqueeze(2)).reshape(self.replicas, n, -1)]
        if self.db is not None:
            blocks.append(slope)
        return torch.cat(blocks, dim=-1) * self.multiplier

    def load_ridge_solution(self, beta: torch.Tensor, c: torch.Tensor) -> None:
        """Set (a, dw, db) from beta: (R, P) in the order of :meth:`ridge_features`, and c."""
        width, d = self.width, self.d
        with torch.no_grad():
            self.a.copy_(beta[:, :width])
            self.dw.copy_(beta[:, width : width * (d + 1)].reshape(-1, width, d))
            if self.db is not None:
                self.db.copy_(beta[:, width * (d + 1) :])
            self.c.copy_(c)


def build_model(
    cfg: DictConfig, seed: int | Sequence[int], device: torch.device
) -> TwoLayerNet | LinearizedNet | KernelModel:
    """The model of the ``model`` config group: the net (trainable or frozen), its
    linearization at init, or the kernel of their width-infinity limit (``kernel``).
    ``seed``: the run's seed, or each replica's (:class:`TwoLayerNet`)."""
    if cfg.name == "kernel":
        return KernelModel(kernel_spec(cfg), cfg.replicas, device)
    net = TwoLayerNet(
        d=cfg.d,
        width=cfg.width,
        replicas=cfg.replicas,
        freeze_first_layer=cfg.name != "trainable",
        activation=cfg.activation,
        bias=cfg.bias,
        init=cfg.init,
        parameterization=cfg.parameterization,
        output_init=cfg.output_init,
        seed=seed,
        device=device,
        lazy_scale=cfg.lazy_scale,
    )
    return LinearizedNet(net) if cfg.name == "linearized" else net


def ridge_feature_count(cfg: DictConfig) -> int:
    """Number of features P that ridge fits for the ``model`` config group (the constant
    output bias is solved apart): the width, or the linearized model's width * (d + 1 + bias)."""
    if cfg.name == "linearized":
        return cfg.width * (cfg.d + 1 + int(cfg.bias))
    return cfg.width
