"""Config schemas (Hydra structured configs) and the value checks that guard every run.

The YAML files under ``configs/`` extend the dataclasses below, so Hydra checks types when it
composes; :func:`validate` then checks values and combinations before any work is done and
raises :class:`ConfigError` with one sentence naming the key, the value and what is allowed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from hydra.core.config_store import ConfigStore
from omegaconf import II, MISSING, DictConfig

ACTIVATIONS = ("relu", "gelu", "tanh", "softplus", "quadratic")
PARAMETERIZATIONS = ("standard", "ntk", "mean_field")
FIRST_LAYER_INITS = ("gaussian", "sphere")
OUTPUT_INITS = ("gaussian", "zero")
SCHEDULES = ("constant", "cosine")
DEVICES = ("auto", "cpu", "cuda")


class ConfigError(ValueError):
    """A config value that is not allowed; the message is one sentence for the user."""

    def __init__(self, key: str, value: Any, allowed: str) -> None:
        self.key, self.value, self.allowed = key, value, allowed
        super().__init__(f"invalid config: {key}={_show(value)} ({allowed})")


def _show(value: Any) -> str:
    if isinstance(value, str):
        return repr(value) if value == "" or " " in value else value
    return str(value)


@dataclass
class TargetConfig:
    """Common fields of every target: its input dimension and its own seed."""

    name: str = MISSING
    d: int = II("d")
    seed: int = 0


@dataclass
class ReluNeuronConfig(TargetConfig):
    """f(x) = max(0, <w*, x> + bias) with ||w*|| = norm, x ~ N(0, I_d)."""

    name: str = "relu_neuron"
    norm: float = 1.0
    bias: float = 0.0


@dataclass
class PolynomialConfig(TargetConfig):
    """A random unit-variance polynomial in the orthonormal Hermite basis of N(0, I_d)."""

    name: str = "polynomial"
    degree: int = 2
    terms: int = 16
    include_lower: bool = False


@dataclass
class ModelConfig:
    """The two-layer net f(x) = m * sum_j a_j act(<w_j, x> + b_j) + c, with R replicas."""

    name: str = MISSING
    d: int = II("d")
    width: int = II("width")
    replicas: int = II("replicas")
    freeze_first_layer: bool = MISSING
    activation: str = "relu"
    bias: bool = True
    init: str = "gaussian"
    parameterization: str = "ntk"
    output_init: str = "gaussian"


@dataclass
class OptimizerConfig:
    """Fields every optimizer has: the learning rate and its schedule."""

    name: str = MISSING
    lr: float = MISSING
    weight_decay: float = 0.0
    schedule: str = "constant"
    warmup_steps: int = 0


@dataclass
class SGDConfig(OptimizerConfig):
    name: str = "sgd"
    lr: float = 0.2
    momentum: float = 0.9
    nesterov: bool = False


@dataclass
class AdamConfig(OptimizerConfig):
    name: str = "adam"
    lr: float = 1e-3
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8


@dataclass
class TrainConfig:
    """The headline knobs; the groups read them by interpolation."""

    d: int = 32
    width: int = 1024
    seed: int = 0
    replicas: int = 1
    steps: int = 2000
    batch_size: int = 256
    n_train: int | None = None
    n_test: int = 10_000
    eval_every: int = 200
    device: str = "auto"
    progress: bool = True
    target: Any = MISSING
    model: Any = MISSING
    optimizer: Any = MISSING


def register_configs() -> None:
    """Put the schemas in Hydra's ConfigStore (under ``schema/``, out of the option lists)."""
    cs = ConfigStore.instance()
    cs.store(name="train_schema", node=TrainConfig)
    for group, name, node in (
        ("target", "relu_neuron", ReluNeuronConfig),
        ("target", "polynomial", PolynomialConfig),
        ("model", "two_layer", ModelConfig),
        ("optimizer", "sgd", SGDConfig),
        ("optimizer", "adam", AdamConfig),
    ):
        cs.store(group=f"schema/{group}", name=name, node=node)


def count_monomials(d: int, degree: int, include_lower: bool) -> int:
    """Distinct monomials in d variables of degree exactly ``degree`` (or 1..degree)."""
    degrees = range(1, degree + 1) if include_lower else [degree]
    return sum(math.comb(d + k - 1, k) for k in degrees)


def _int_at_least(cfg: DictConfig, key: str, low: int, why: str = "") -> None:
    value = _get(cfg, key)
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ConfigError(key, value, f"must be an integer >= {low}{why}")


def _positive(cfg: DictConfig, key: str, allow_zero: bool = False) -> None:
    value = _get(cfg, key)
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and (value >= 0 if allow_zero else value > 0)
    if not ok:
        raise ConfigError(key, value, f"must be a finite number {'>= 0' if allow_zero else '> 0'}")


def _one_of(cfg: DictConfig, key: str, allowed: tuple[str, ...]) -> None:
    value = _get(cfg, key)
    if value not in allowed:
        raise ConfigError(key, value, f"allowed: {', '.join(allowed)}")


def _get(cfg: DictConfig, key: str) -> Any:
    node: Any = cfg
    for part in key.split("."):
        node = node[part]
    return node


def validate(cfg: DictConfig) -> None:
    """Check values and combinations; raise :class:`ConfigError` on the first bad one."""
    for key in ("d", "width", "replicas", "steps", "batch_size", "eval_every"):
        _int_at_least(cfg, key, 1)
    _int_at_least(cfg, "n_test", 2, " so that the test targets have a variance")
    _int_at_least(cfg, "seed", 0)
    if cfg.n_train is not None:
        _int_at_least(cfg, "n_train", 1)
        if cfg.n_train < cfg.batch_size:
            raise ConfigError(
                "n_train",
                cfg.n_train,
                f"must be >= batch_size={cfg.batch_size}, or null for online",
            )
    _one_of(cfg, "device", DEVICES)
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device", "cuda", "CUDA is not available here; allowed: auto, cpu")
    for key, top in (("target.d", "d"), ("model.d", "d"), ("model.width", "width")):
        if _get(cfg, key) != cfg[top]:
            raise ConfigError(
                key, _get(cfg, key), f"must equal {top}={cfg[top]}; set {top} instead"
            )
    if cfg.model.replicas != cfg.replicas:
        raise ConfigError("model.replicas", cfg.model.replicas, "must equal replicas; set that")

    target = cfg.target
    _int_at_least(cfg, "target.seed", 0)
    if target.name == "relu_neuron":
        _positive(cfg, "target.norm")
        if not math.isfinite(target.bias):
            raise ConfigError("target.bias", target.bias, "must be a finite number")
    elif target.name == "polynomial":
        _int_at_least(cfg, "target.degree", 1, ": a degree-0 polynomial is constant")
        _int_at_least(cfg, "target.terms", 1)
        available = count_monomials(cfg.d, target.degree, target.include_lower)
        if target.terms > available:
            raise ConfigError(
                "target.terms",
                target.terms,
                f"must be <= {available}, the number of distinct monomials of degree "
                f"{'1..' if target.include_lower else ''}{target.degree} in d={cfg.d}",
            )
    else:
        raise ConfigError("target.name", target.name, "allowed: relu_neuron, polynomial")

    _one_of(cfg, "model.activation", ACTIVATIONS)
    _one_of(cfg, "model.init", FIRST_LAYER_INITS)
    _one_of(cfg, "model.parameterization", PARAMETERIZATIONS)
    _one_of(cfg, "model.output_init", OUTPUT_INITS)

    _one_of(cfg, "optimizer.name", ("sgd", "adam"))
    _positive(cfg, "optimizer.lr")
    _positive(cfg, "optimizer.weight_decay", allow_zero=True)
    _one_of(cfg, "optimizer.schedule", SCHEDULES)
    _int_at_least(cfg, "optimizer.warmup_steps", 0)
    if cfg.optimizer.warmup_steps >= cfg.steps and cfg.optimizer.warmup_steps > 0:
        raise ConfigError(
            "optimizer.warmup_steps",
            cfg.optimizer.warmup_steps,
            f"must be < steps={cfg.steps}",
        )
    if cfg.optimizer.name == "sgd":
        momentum = cfg.optimizer.momentum
        if not (0 <= momentum < 1):
            raise ConfigError("optimizer.momentum", momentum, "must be in [0, 1)")
        if cfg.optimizer.nesterov and momentum == 0:
            raise ConfigError("optimizer.nesterov", True, "needs optimizer.momentum > 0")
    else:
        for i, beta in enumerate(cfg.optimizer.betas):
            if not (0 <= beta < 1):
                raise ConfigError(f"optimizer.betas[{i}]", beta, "must be in [0, 1)")
        if len(cfg.optimizer.betas) != 2:
            raise ConfigError("optimizer.betas", list(cfg.optimizer.betas), "must be two numbers")
        _positive(cfg, "optimizer.eps")


register_configs()
