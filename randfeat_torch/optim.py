"""Optimizers and learning-rate schedules for the parameters that are not frozen."""

from __future__ import annotations

import math
import operator
from collections.abc import Callable

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


def build_optimizer(cfg: DictConfig, model: nn.Module, steps: int) -> tuple[FusedUpdate, Schedule]:
    """The optimizer named by ``cfg.name`` over the trainable parameters, one group per rate
    multiplier of :func:`lr_multipliers` (at ``lr`` x it; the group holds its ``multiplier`` and
    its parameters' ``names``), and its schedule. With one lr per
    replica the optimizer runs at the first; :class:`PerReplicaRates` rescales."""
    lr = base_lr(cfg.lr)
    multipliers = lr_multipliers(cfg.name, model.parameterization, model.width, cfg.lr_scaling)
    # One optimizer group per multiplier (one group under ntk with SGD: one fused kernel).
    groups: dict[float, dict] = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            multiplier = multipliers[PARAMETER_GROUPS[name]]
            group = groups.setdefault(
                multiplier,
                {
                    "params": [],
                    "initial_lr": lr * multiplier,
                    "multiplier": multiplier,
                    "names": [],
                },
            )
            group["params"].append(p)
            group["names"].append(name)
    if cfg.name == "sgd":
        hyper = {"momentum": float(cfg.momentum), "nesterov": bool(cfg.nesterov)}
    else:
        hyper = {"beta1": float(cfg.betas[0]), "beta2": float(cfg.betas[1]), "eps": float(cfg.eps)}
    optimizer = FusedUpdate(cfg.name, list(groups.values()), cfg.weight_decay, **hyper)
    return optimizer, Schedule(optimizer, schedule_factor(cfg.schedule, cfg.warmup_steps, steps))


class FusedUpdate:
    """SGD (momentum, Nesterov, weight decay) or Adam (L2 weight decay): the update of
    ``torch.optim.SGD`` / ``torch.optim.Adam`` with ``fused=True``, by the same kernels
    (``torch._fused_sgd_``, ``torch._fused_adam_``: one call updates every parameter of a group
    and its state), called here directly. It equals torch.optim's to the bit (tested), and its
    :meth:`state_dict` has torch.optim's layout.

    Why not torch.optim itself: building one of its optimizers imports ``torch._dynamo``
    (1.0-1.3 s of every process's start-up, for a compiler the step does not use), and its
    ``step`` costs 40-80 us of Python around the kernel, a sixth of a small frozen step.

    ``param_groups``: dicts of ``params``, ``initial_lr`` and ``lr`` (this step's rate, which
    :class:`Schedule` sets), and whatever else the caller keeps there (``multiplier``, ``names``).
    Parameters whose ``.grad`` is None are left alone, as torch.optim does."""

    def __init__(self, name: str, param_groups: list[dict], weight_decay: float, **hyper) -> None:
        if name not in ("sgd", "adam"):
            raise ValueError(f"no fused update for optimizer {name!r} (allowed: sgd, adam)")
        self.name, self.weight_decay, self.hyper = name, float(weight_decay), hyper
        self.param_groups = param_groups
        for group in param_groups:
            group.setdefault("lr", group["initial_lr"])
        self.params = [p for group in param_groups for p in group["params"]]
        self.state: dict[torch.Tensor, dict[str, torch.Tensor]] = {}

    @torch.no_grad()
    def step(self) -> None:
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if params:
                grads = [p.grad for p in params]
                if self.name == "sgd":
                    self._sgd(params, grads, group["lr"])
                else:
                    self._adam(params, grads, group["lr"])

    def _sgd(self, params: list[torch.Tensor], grads: list[torch.Tensor], lr: float) -> None:
        momentum = self.hyper["momentum"]
        buffers = (
            [] if momentum == 0 else [self.state.get(p, {}).get("momentum_buffer") for p in params]
        )
        first = momentum != 0 and all(b is None for b in buffers)
        if first:  # the kernel sets the buffers to the gradients
            buffers = [torch.empty_like(g) for g in grads]
            for p, buffer in zip(params, buffers, strict=True):
                self.state[p] = {"momentum_buffer": buffer}
        torch._fused_sgd_(
            params,
            grads,
            buffers,
            weight_decay=self.weight_decay,
            momentum=momentum,
            lr=lr,
            dampening=0.0,
            nesterov=self.hyper["nesterov"],
            maximize=False,
            is_first_step=first,
            grad_scale=None,
            found_inf=None,
        )

    def _adam(self, params: list[torch.Tensor], grads: list[torch.Tensor], lr: float) -> None:
        for p in params:
            if p not in self.state:
                self.state[p] = {
                    "step": torch.zeros((), dtype=torch.float32, device=p.device),
                    "exp_avg": torch.zeros_like(p),
                    "exp_avg_sq": torch.zeros_like(p),
                }
        states = [self.state[p] for p in params]
        steps = [s["step"] for s in states]
        torch._foreach_add_(steps, 1)
        torch._fused_adam_(
            params,
            grads,
            [s["exp_avg"] for s in states],
            [s["exp_avg_sq"] for s in states],
            [],
            steps,
            amsgrad=False,
            lr=lr,
            beta1=self.hyper["beta1"],
            beta2=self.hyper["beta2"],
            weight_decay=self.weight_decay,
            eps=self.hyper["eps"],
            maximize=False,
            grad_scale=None,
            found_inf=None,
        )

    def state_dict(self) -> dict:
        """torch.optim's layout: ``state`` by the parameter's index over all groups, and each
        group's rates and the indices of its parameters."""
        index = {p: i for i, p in enumerate(self.params)}
        groups, first = [], 0
        for group in self.param_groups:
            kept = {key: value for key, value in group.items() if key != "params"}
            groups.append(kept | {"params": list(range(first, first + len(group["params"])))})
            first += len(group["params"])
        return {"state": {index[p]: dict(s) for p, s in self.state.items()}, "param_groups": groups}

    def load_state_dict(self, state: dict) -> None:
        """From :meth:`state_dict` (or torch.optim's, as loaded onto the CPU); the tensors go to
        their parameters' device. Raises ValueError where it does not hold these parameters'
        state (other groups, sizes, keys, shapes, or some parameters only)."""
        saved_groups = state["param_groups"]
        sizes = [len(g["params"]) for g in self.param_groups]
        if [len(g["params"]) for g in saved_groups] != sizes:
            raise ValueError(f"its parameter groups do not hold {sizes} parameters")
        keys = {"sgd": {"momentum_buffer"}, "adam": {"step", "exp_avg", "exp_avg_sq"}}[self.name]
        restored = {}
        for i, saved in state["state"].items():
            if not 0 <= operator.index(i) < len(self.params):
                raise ValueError(f"it holds the state of parameter {i} of {len(self.params)}")
            p = self.params[i]
            if set(saved) != keys or not all(isinstance(t, torch.Tensor) for t in saved.values()):
                raise ValueError(f"parameter {i}'s state is not {sorted(keys)} as tensors")
            restored[p] = {}
            for key, value in saved.items():
                shape = () if key == "step" else p.shape
                if value.shape != shape:
                    raise ValueError(f"parameter {i}'s {key} has shape {tuple(value.shape)}")
                dtype = torch.float32 if key == "step" else p.dtype
                restored[p][key] = value.to(device=p.device, dtype=dtype)
        if restored and len(restored) != len(self.params):  # every parameter steps together
            raise ValueError(
                f"it holds the state of {len(restored)} of {len(self.params)} parameters"
            )
        rates = [(_rate(saved["lr"]), _rate(saved["initial_lr"])) for saved in saved_groups]
        for group, (lr, initial) in zip(self.param_groups, rates, strict=True):
            group["lr"], group["initial_lr"] = lr, initial
        self.state = restored


def _rate(value: object) -> float:
    """A learning rate from a checkpoint: a finite number >= 0, else ValueError."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not value >= 0:
        raise ValueError(f"its learning rate {value!r} is not a number >= 0")
    if not math.isfinite(value):
        raise ValueError(f"its learning rate {value!r} is not finite")
    return float(value)


class Schedule:
    """Each group's rate at a step: its ``initial_lr`` times ``factor(step)``, as
    ``torch.optim.lr_scheduler.LambdaLR`` sets it (its state's ``last_epoch`` is the step)."""

    def __init__(self, optimizer: FusedUpdate, factor: Callable[[int], float]) -> None:
        self.optimizer, self.factor, self.last_epoch = optimizer, factor, 0
        self._set()

    def step(self) -> None:
        self.last_epoch += 1
        self._set()

    def _set(self) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = group["initial_lr"] * self.factor(self.last_epoch)

    def state_dict(self) -> dict:
        return {"last_epoch": self.last_epoch}

    def load_state_dict(self, state: dict) -> None:
        """The step; this step's rates come back with the optimizer's state."""
        step = state["last_epoch"]
        if isinstance(step, bool) or operator.index(step) < 0:
            raise ValueError(f"its step {step!r} is not a whole number >= 0")
        self.last_epoch = step


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
