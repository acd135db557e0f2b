"""How lazy the training is: how far the parameters moved from their init, how far the net is
from its first-order Taylor expansion at init, and how far its tangent kernel turned.

Measured at evaluations only, on a fixed probe subset of the test inputs (``lazy_probe``), for
every model trained by an optimizer (all three measures are 0 for a frozen first layer and, up
to rounding, for the linearized model):

- ``w_movement``, ``b_movement``, ``a_movement``: ||theta_t - theta_0||_F / ||theta_0||_F for
  the first layer's weights and biases and the output weights (null where theta_0 = 0).
- ``linearization_distance``: mean over the probe of (f_t - f_lin,t)^2 / Var f*, where
  f_lin,t(x) = f_0(x) + <grad f_0(x), theta_t - theta_0> is the Taylor expansion at init taken
  at the same theta_t (with a lazy scale alpha both are alpha (. - f_0)).
- ``kernel_distance``: 1 - <K_0, K_t>_F / (||K_0||_F ||K_t||_F) for the tangent kernel on the
  probe, each group weighted by its learning-rate multiplier (the kernel that drives the
  training, the same at init under every parameterization at its own scaling; see
  :func:`randfeat_torch.optim.lr_multipliers`). Computed as ||K_0/|K_0| - K_t/|K_t|||^2 / 2,
  which keeps its digits when the kernel barely turns.
"""

from __future__ import annotations

import torch

from randfeat_torch.models import LinearizedNet, TwoLayerNet


def _first_layer(model: TwoLayerNet | LinearizedNet) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The current first layer (w, b): for the linearized model w0 + dw and b0 + db."""
    if isinstance(model, LinearizedNet):
        b = None if model.db is None else model.b0 + model.db
        return model.w0 + model.dw, b
    return model.w, model.b


def _pre_activations(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    """x: (P, d), w: (R, width, d), b: (R, width) -> (R, P, width)."""
    pre = torch.matmul(x, w.transpose(1, 2))
    return pre if b is None else pre + b.unsqueeze(1)


class Laziness:
    """The laziness measures of one model against its init (taken when this is built)."""

    def __init__(
        self,
        model: TwoLayerNet | LinearizedNet,
        x: torch.Tensor,
        variance: torch.Tensor,
        multipliers: dict[str, float],
    ) -> None:
        """``x``: the probe inputs (P, d); ``variance``: the error normaliser;
        ``multipliers``: each group's learning-rate multiplier (keys a, w, b, c)."""
        self.x, self.variance, self.multipliers = x, variance, multipliers
        self.first_layer_trained = isinstance(model, LinearizedNet) or not model.frozen
        w, b = _first_layer(model)
        self.w0 = w.detach().clone()
        self.b0 = None if b is None else b.detach().clone()
        self.a0 = model.a.detach().clone()
        self.c0 = model.c.detach().clone()
        self.gram = x @ x.t() + (0.0 if b is None else 1.0)  # <x, x'> (+ 1 for the bias)
        self.kernel0 = self.unit_kernel(model)

    @torch.no_grad()
    def unit_kernel(self, model: TwoLayerNet | LinearizedNet) -> torch.Tensor:
        """The rate-weighted tangent kernel on the probe, divided by its Frobenius norm:
        (R, P, P). The linearized model's tangent features are those of the net at init."""
        w, b, a = (*_first_layer(model), model.a)
        if isinstance(model, LinearizedNet):
            w, b, a = self.w0, self.b0, self.a0
        pre = _pre_activations(self.x, w, b)
        hidden = model.act(pre)
        mu, m2 = self.multipliers, model.multiplier**2
        kernel = torch.bmm(hidden, hidden.transpose(1, 2)).mul_(mu["a"] * m2).add_(mu["c"])
        if self.first_layer_trained:
            slope = model.act_derivative(pre).mul_(a.unsqueeze(1))
            first = torch.bmm(slope, slope.transpose(1, 2)).mul_(self.gram)
            kernel.add_(first, alpha=mu["w"] * m2)
        norm = torch.linalg.matrix_norm(kernel).view(-1, 1, 1)
        return kernel.div_(norm)

    @torch.no_grad()
    def measure(self, model: TwoLayerNet | LinearizedNet) -> dict[str, torch.Tensor]:
        """The five measures (see the module), each (R,)."""
        w, b = _first_layer(model)

        def movement(now: torch.Tensor | None, init: torch.Tensor | None) -> torch.Tensor:
            if now is None:
                return torch.full_like(self.c0, torch.nan)
            dims = tuple(range(1, now.dim()))
            moved = torch.linalg.vector_norm(now - init, dim=dims)
            return moved / torch.linalg.vector_norm(init, dim=dims)

        # The Taylor expansion at init, at the current parameters (w, b, a, c).
        pre0 = _pre_activations(self.x, self.w0, self.b0)
        moved = _pre_activations(self.x, w - self.w0, None if b is None else b - self.b0)
        taylor = model.act(pre0).mul_(model.a.unsqueeze(1))
        taylor.add_(model.act_derivative(pre0).mul_(self.a0.unsqueeze(1)).mul_(moved))
        linear = taylor.sum(-1).mul_(model.multiplier).add_(model.c.unsqueeze(1))
        net = model.net(self.x) if isinstance(model, TwoLayerNet) else model(self.x)
        scale = getattr(model, "lazy_scale", None) or 1.0
        distance = (net - linear).square().mean(dim=1).mul_(scale**2) / self.variance

        kernel = self.unit_kernel(model)
        turned = (kernel - self.kernel0).square().sum(dim=(1, 2)).mul_(0.5)
        return {
            "w_movement": movement(w, self.w0),
            "b_movement": movement(b, self.b0),
            "a_movement": movement(model.a, self.a0),
            "linearization_distance": distance,
            "kernel_distance": turned,
        }
