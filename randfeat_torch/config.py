"""Config schemas (Hydra structured configs) and the value checks that guard every run.

The YAML files under ``configs/`` extend the dataclasses below, so Hydra checks types when it
composes; :func:`validate` then checks values and combinations before any work is done and
raises :class:`ConfigError` with one sentence naming the key, the value and what is allowed.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import II, MISSING, DictConfig, ListConfig


class Choice(str, enum.Enum):
    """One of a closed set of string values of a config field: OmegaConf refuses any other
    while composing, listing these. A member is a str equal to its name (enum.StrEnum is
    Python 3.11+), printed and formatted as that string."""

    def __str__(self) -> str:
        return str(self.value)

    def __format__(self, spec: str) -> str:
        return format(str(self.value), spec)


def _choices(name: str, values: str) -> type[Choice]:
    """The :class:`Choice` named ``name`` of the space-separated ``values``."""
    return Choice(name, [(v, v) for v in values.split()], module=__name__)


Regime = _choices("Regime", "trainable frozen linearized kernel")  # the model group's options
Kernel = _choices("Kernel", "rf ntk")  # model=kernel: the limit of random features or of NT
Activation = _choices("Activation", "relu gelu tanh softplus quadratic")
Parameterization = _choices("Parameterization", "standard ntk mean_field")
FirstLayerInit = _choices("FirstLayerInit", "gaussian sphere")
OutputInit = _choices("OutputInit", "gaussian zero")
Schedule = _choices("Schedule", "constant cosine")
Device = _choices("Device", "auto cpu cuda")
ReplicaData = _choices("ReplicaData", "shared independent")
ReplicaInit = _choices("ReplicaInit", "independent shared")
Loss = _choices("Loss", "mse hinge logistic")
Backward = _choices("Backward", "analytic autograd")
InputName = _choices("InputName", "gaussian sphere hypercube")
PenaltyScale = _choices("PenaltyScale", "relative absolute")
GramProducts = _choices("GramProducts", "float64 float32")
LrScaling = _choices("LrScaling", "parameterization uniform")
TARGETS = ("relu_neuron", "polynomial", "zigzag", "parity")
OPTIMIZERS = ("sgd", "adam", "ridge")
# The config groups a run picks one option of, in the order tables show them.
GROUPS = ("experiment", "fit", "model", "optimizer", "target", "input")
RELU_SUM_TARGETS = ("relu_neuron", "zigzag")  # targets whose Gaussian moments theory has exactly


class UserError(Exception):
    """A problem the user can fix, whose message is one sentence for them: the command line
    prints it and exits with status 2 (a job of a sweep records it and the sweep goes on)."""


class ConfigError(UserError, ValueError):
    """A config value that is not allowed: the key, the value and what is allowed."""

    def __init__(self, key: str, value: Any, allowed: str) -> None:
        self.key, self.value, self.allowed = key, value, allowed
        super().__init__(f"invalid config: {key}={_show(value)} ({allowed})")


class CheckpointError(UserError):
    """A checkpoint that cannot be resumed (corrupt, another format, another config)."""

    def __init__(self, path: Any, reason: str) -> None:
        self.path = path
        super().__init__(
            f"cannot resume from {path}: it {reason}; resume=false starts fresh in a new folder"
        )


class OutputError(UserError):
    """A run folder that cannot be created or written."""

    def __init__(self, path: Any, reason: str, cause: str = "") -> None:
        self.path, self.reason, self.cause = path, reason, cause
        because = f" ({cause})" if cause else ""
        super().__init__(f"cannot write the outputs of this run in {path}: it {reason}{because}")


class DataError(UserError):
    """Data that the run cannot use, such as a target constant on the test set."""


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
class ZigzagConfig(TargetConfig):
    """psi_a(<w*, x>): a triangle wave of period 4 between -1 and 1 on [-a, a], flat outside."""

    name: str = "zigzag"
    norm: float = II("d")
    a: int = 1


@dataclass
class ParityConfig(TargetConfig):
    """prod_{i in S} x_i for a random set S of k coordinates."""

    name: str = "parity"
    k: int = 3


@dataclass
class InputConfig:
    """The input distribution: gaussian N(0, I_d), sphere of radius sqrt(d), or {-1, +1}^d."""

    name: InputName = InputName.gaussian


@dataclass
class ModelConfig:
    """The two-layer net f(x) = m * sum_j a_j act(<w_j, x> + b_j) + c, with R replicas;
    ``name`` (the option of the model group) trains both layers (trainable), only the output
    layer (frozen: random features), or the linearization at init (linearized)."""

    name: Regime = MISSING
    d: int = II("d")
    width: int = II("width")
    replicas: int = II("replicas")
    activation: Activation = Activation.relu
    bias: bool = True
    init: FirstLayerInit = FirstLayerInit.gaussian
    parameterization: Parameterization = Parameterization.ntk
    output_init: OutputInit = OutputInit.gaussian
    lazy_scale: float | None = None  # alpha: train alpha (f - f_0) on the loss / alpha^2


@dataclass
class KernelModelConfig(ModelConfig):
    """model=kernel: kernel ridge with the kernel the net's features average to over its random
    first layer (width -> infinity), of random features (rf) or of the NT model (ntk)."""

    name: Regime = Regime.kernel
    kernel: Kernel = Kernel.rf


@dataclass
class OptimizerConfig:
    """Fields every optimizer has: the learning rate and its schedule."""

    name: str = MISSING
    lr: Any = MISSING  # a number, or one per replica (a list of R numbers)
    weight_decay: float = 0.0
    schedule: Schedule = Schedule.constant
    warmup_steps: int = 0
    lr_scaling: LrScaling = LrScaling.parameterization  # per-group rates (optim.lr_multipliers)
    grad_clamp: float | None = None  # clamp each gradient coordinate to [-v, v]
    grad_precision: Any = None  # a number, or one per replica (a list of R numbers, 0: exact)
    stochastic_rounding: bool = False


@dataclass
class SGDConfig(OptimizerConfig):
    name: str = "sgd"
    lr: Any = 0.2
    momentum: float = 0.9
    nesterov: bool = False


@dataclass
class AdamConfig(OptimizerConfig):
    name: str = "adam"
    lr: Any = 0.03
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8


@dataclass
class RidgeConfig:
    """Closed-form least squares for the output layer of a frozen or linearized model."""

    name: str = "ridge"
    penalty: Any = 1e-8  # a number; a list (the penalty path; the first is the fit); or "gcv"
    penalty_scale: PenaltyScale = (
        PenaltyScale.relative
    )  # times the features' mean variance; absolute
    gcv_penalties: list[float] = field(
        default_factory=lambda: [10.0**k for k in range(-8, 3)]
    )  # the path that penalty=gcv picks from
    chunk_size: int | None = None
    gram_products: GramProducts = GramProducts.float64  # float32: faster, checked (ridge.yaml)
    population: bool = False  # fit the exact population moments (no samples); see theory
    width_path: bool = False  # the error at every prefix width from one factorisation


@dataclass
class TrainConfig:
    """The headline knobs; the groups read them by interpolation."""

    d: int = 32
    width: int = 1024
    seed: int = 0
    data_seed: int | None = None
    replicas: int = 1
    replica_data: ReplicaData = ReplicaData.shared
    # independent: replica r starts from replica_seed(seed, r); shared: every replica from
    # seed, for a comparison paired on the init (one precision or rate per replica)
    replica_init: ReplicaInit = ReplicaInit.independent
    steps: int = 2000
    batch_size: int = 256
    n_train: int | None = None
    n_test: int = 10_000
    eval_every: int = 200
    checkpoint_every: int | None = None  # steps; None: by checkpoint_every_s
    checkpoint_every_s: float | None = 60.0  # seconds; None: only on SIGTERM / SIGINT
    resume: bool = True
    loss: Loss = Loss.mse
    steps_to_error: list[float] = field(default_factory=lambda: [0.5, 0.1, 0.01])
    lazy_probe: int = 256
    # plumbing: how the run is computed, not what
    device: Device = Device.auto
    threads: int | None = None
    backward: Backward = Backward.analytic
    compile: bool = False
    progress: bool = True
    aggregate: bool = False
    vars: dict[str, Any] = field(default_factory=dict)
    input: Any = MISSING
    target: Any = MISSING
    model: Any = MISSING
    optimizer: Any = MISSING


# The schema of each config group's options: (group, schema name, dataclass).
SCHEMAS = (
    ("target", "relu_neuron", ReluNeuronConfig),
    ("target", "polynomial", PolynomialConfig),
    ("target", "zigzag", ZigzagConfig),
    ("target", "parity", ParityConfig),
    ("input", "input", InputConfig),
    ("optimizer", "ridge", RidgeConfig),
    ("model", "two_layer", ModelConfig),
    ("model", "kernel", KernelModelConfig),
    ("optimizer", "sgd", SGDConfig),
    ("optimizer", "adam", AdamConfig),
)


def register_configs() -> None:
    """Put the schemas in Hydra's ConfigStore (under ``schema/``, out of the option lists)."""
    cs = ConfigStore.instance()
    cs.store(name="train_schema", node=TrainConfig)
    for group, name, node in SCHEMAS:
        cs.store(group=f"schema/{group}", name=name, node=node)


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
        node = node[int(part)] if isinstance(node, ListConfig) else node[part]
    return node


THREADS_MAX = 1024  # torch.set_num_threads: 30000 fail to start here, 100000 crash


def validate(cfg: DictConfig) -> None:
    """Check values and combinations; raise :class:`ConfigError` on the first bad one."""
    ridge = cfg.optimizer.name == "ridge"
    if cfg.model.name == "kernel":
        _validate_kernel(cfg)
    for key in ("d", "width", "replicas", "steps", "batch_size", "eval_every"):
        _int_at_least(cfg, key, 1)
    _int_at_least(cfg, "n_test", 2, " so that the test targets have a variance")
    _int_at_least(cfg, "seed", 0)
    if cfg.data_seed is not None:
        _int_at_least(cfg, "data_seed", 0)
    if cfg.n_train is not None:
        _int_at_least(cfg, "n_train", 1)
        if cfg.n_train < cfg.batch_size and not ridge:
            raise ConfigError(
                "n_train",
                cfg.n_train,
                f"must be >= batch_size={cfg.batch_size}, or null for online",
            )
    if cfg.checkpoint_every is not None:
        _int_at_least(cfg, "checkpoint_every", 1)
    if cfg.checkpoint_every_s is not None:
        _positive(cfg, "checkpoint_every_s")
    for i in range(len(cfg.steps_to_error)):
        _positive(cfg, f"steps_to_error.{i}")
    _int_at_least(cfg, "lazy_probe", 0, " (0: no laziness measures)")
    if cfg.threads is not None:
        _int_at_least(cfg, "threads", 1)
        if cfg.threads > THREADS_MAX:
            raise ConfigError(
                "threads",
                cfg.threads,
                f"must be in 1..{THREADS_MAX}: torch starts that many threads, and past some "
                "thousands a machine cannot: 30000 failed to start here, 100000 crashed",
            )
    for key, top in (("target.d", "d"), ("model.d", "d"), ("model.width", "width")):
        if _get(cfg, key) != cfg[top]:
            raise ConfigError(
                key, _get(cfg, key), f"must equal {top}={cfg[top]}; set {top} instead"
            )
    if cfg.model.replicas != cfg.replicas:
        raise ConfigError("model.replicas", cfg.model.replicas, "must equal replicas; set that")
    _validate_target(cfg)
    _validate_model(cfg)
    _validate_optimizer(cfg)
    _validate_replica_init(cfg)  # after the per-replica lists' own checks


# The optimizer keys that may hold one value per replica (a list of R values).
PER_REPLICA_OPTIMIZER_KEYS = ("lr", "grad_precision")


def _validate_replica_init(cfg: DictConfig) -> None:
    """Replicas from one init must differ in something else, or they are one network R times."""
    if cfg.replica_init != "shared" or cfg.replicas == 1:
        return
    opt = cfg.optimizer
    if cfg.replica_data == "independent" and not opt.get("population", False):
        return  # each replica its own data
    lists = [list(v) for k in PER_REPLICA_OPTIMIZER_KEYS if isinstance(v := opt.get(k), ListConfig)]
    if not lists:
        raise ConfigError(
            "replica_init",
            "shared",
            "starts every replica from one init, so they need something else of their own: "
            "a list in optimizer.lr or optimizer.grad_precision (one value per replica), or "
            "replica_data=independent",
        )
    own = [tuple(values) for values in zip(*lists, strict=True)]
    if len(set(own)) < len(own):
        twice = next(v for v in own if own.count(v) > 1)
        raise ConfigError(
            "replica_init",
            "shared",
            f"starts every replica from one init, and two replicas have the same values "
            f"{list(twice)} in the per-replica lists: they would be one network twice",
        )


# A ReLU neuron's labels reach about 6 norm + |bias| on 10^4 Gaussian inputs; in float32 their
# squares, and the batches' sums of them, overflow past 1e19 (norm=1e20 diverges at step 1).
LABEL_SCALE_MAX = 1e15


def _validate_target(cfg: DictConfig) -> None:
    target = cfg.target
    _one_of(cfg, "target.name", TARGETS)
    _int_at_least(cfg, "target.seed", 0)
    if target.name in ("relu_neuron", "zigzag"):
        _positive(cfg, "target.norm")
    if target.name == "relu_neuron":
        top = f"{LABEL_SCALE_MAX:.0e}".replace("e+", "e")
        for key, low, shown in (("target.norm", 0, "(0"), ("target.bias", -LABEL_SCALE_MAX, "[-")):
            value = _get(cfg, key)
            if not (math.isfinite(value) and low <= value <= LABEL_SCALE_MAX):
                raise ConfigError(
                    key,
                    value,
                    f"must be a finite number in {shown}{top if low else ''}, {top}]: the labels "
                    "are float32, whose squares overflow past 3.4e38",
                )
    if target.name == "zigzag" and (target.a < 1 or target.a % 2 == 0):
        raise ConfigError(
            "target.a", target.a, "must be an odd integer >= 1, so that psi_a is flat for |z| > a"
        )
    if target.name == "parity":
        _int_at_least(cfg, "target.k", 1)
        if target.k > cfg.d:
            raise ConfigError("target.k", target.k, f"must be <= d={cfg.d}")
    if target.name == "polynomial":
        _validate_polynomial(cfg)


# The polynomial target's unit variance must be visible in the test set: n points estimate
# E f^2 with a relative standard error sqrt((E f^4 - 1) / n), and E f^4 >= E m^4 >= 3^k for the
# monomials m of degree k. Measured at d=32, n_test=10^4 (20 test sets): the mean of f^2 is
# 0.94-1.11 at degree 4, 0.86-1.29 at 6, median 0.85 at 8, 0.48 at 15, 2e-6 at 60.
POLYNOMIAL_VARIANCE_ERROR = 0.5  # the largest relative error allowed
POLYNOMIAL_MAX_TERMS = 10**6  # drawn term by term on the host: ~20 s per million terms


def _validate_polynomial(cfg: DictConfig) -> None:
    from randfeat_torch.targets import (  # targets imports this module
        count_monomials,
        lightest_monomial_fourth_moment,
    )

    target = cfg.target
    _int_at_least(cfg, "target.degree", 1, ": a degree-0 polynomial is constant")
    _int_at_least(cfg, "target.terms", 1)
    seen = POLYNOMIAL_VARIANCE_ERROR**2 * cfg.n_test
    top = 1
    while lightest_monomial_fourth_moment(cfg.d, top + 1) - 1 <= seen:
        top += 1
    if target.degree > top:
        raise ConfigError(
            "target.degree",
            target.degree,
            f"must be in 1..{top} for d={cfg.d} and n_test={cfg.n_test}: n test points measure "
            "the unit variance of a degree-k polynomial only to a relative error of about "
            "sqrt((E m^4 - 1) / n), E m^4 >= 3^k the fourth moment of its monomials, which "
            f"passes {POLYNOMIAL_VARIANCE_ERROR} past degree {top}; a larger n_test allows more",
        )
    available = count_monomials(cfg.d, target.degree, target.include_lower)
    if target.terms > available:
        raise ConfigError(
            "target.terms",
            target.terms,
            f"must be <= {available}, the number of distinct monomials of degree "
            f"{'1..' if target.include_lower else ''}{target.degree} in d={cfg.d}",
        )
    if target.terms > POLYNOMIAL_MAX_TERMS:
        raise ConfigError(
            "target.terms",
            target.terms,
            f"must be <= {POLYNOMIAL_MAX_TERMS}: the polynomial is drawn term by term on the "
            "host (about 20 s per million terms) and each label costs terms x degree products",
        )


def _validate_model(cfg: DictConfig) -> None:
    if cfg.model.lazy_scale is not None:
        _positive(cfg, "model.lazy_scale")
        if cfg.model.name == "linearized":
            raise ConfigError(
                "model.lazy_scale",
                cfg.model.lazy_scale,
                "needs model=trainable or model=frozen: the linearized model is its own "
                "linearization at every scale; leave it null",
            )


# The closed forms of randfeat_torch.kernels: activations, and the inits without a hidden bias.
KERNEL_ACTIVATIONS = ("relu", "quadratic")
KERNEL_NTK_PARAMETERIZATIONS = ("ntk", "mean_field")  # a0 ~ N(0, 1): E a0^2 = 1


def _validate_kernel(cfg: DictConfig) -> None:
    """model=kernel: a closed-form kernel (randfeat_torch.kernels), fitted by ridge on samples."""
    model = cfg.model
    if cfg.optimizer.name != "ridge":
        raise ConfigError(
            "optimizer",
            cfg.optimizer.name,
            "model=kernel is fitted in closed form: use optimizer=ridge (fit=rf_kernel or "
            "fit=nt_kernel)",
        )
    if cfg.optimizer.population:
        raise ConfigError(
            "optimizer.population",
            True,
            "model=kernel fits kernel ridge on n_train samples; allowed: false",
        )
    if model.activation not in KERNEL_ACTIVATIONS:
        raise ConfigError(
            "model.activation",
            model.activation,
            "model=kernel needs a closed-form kernel; allowed: " + ", ".join(KERNEL_ACTIVATIONS),
        )
    if model.init == "sphere" and model.bias:
        raise ConfigError(
            "model.bias",
            True,
            "model=kernel with model.init=sphere: <w, x> + b is not Gaussian for w uniform on "
            "the sphere, and its kernel has no closed form here; allowed: model.bias=false, or "
            "model.init=gaussian",
        )
    if model.kernel == "ntk" and model.parameterization not in KERNEL_NTK_PARAMETERIZATIONS:
        raise ConfigError(
            "model.parameterization",
            model.parameterization,
            "model.kernel=ntk: under standard, a0 ~ N(0, 1/width) leaves the first layer's part "
            "of the tangent kernel 1/width of the rest, so the limit is model.kernel=rf; "
            "allowed: " + ", ".join(KERNEL_NTK_PARAMETERIZATIONS),
        )
    if model.kernel == "ntk" and model.output_init != "gaussian":
        raise ConfigError(
            "model.output_init",
            model.output_init,
            "model.kernel=ntk: with a0 = 0 the tangent features of the first layer vanish and "
            "the kernel is model.kernel=rf; allowed: gaussian",
        )


def _validate_optimizer(cfg: DictConfig) -> None:
    opt = cfg.optimizer
    _one_of(cfg, "optimizer.name", OPTIMIZERS)
    if opt.name == "ridge":
        _validate_ridge(cfg)
        return
    _validate_lr(cfg)
    _positive(cfg, "optimizer.weight_decay", allow_zero=True)
    _int_at_least(cfg, "optimizer.warmup_steps", 0)
    if opt.warmup_steps >= cfg.steps and opt.warmup_steps > 0:
        raise ConfigError(
            "optimizer.warmup_steps", opt.warmup_steps, f"must be < steps={cfg.steps}"
        )
    if opt.grad_clamp is not None:
        _positive(cfg, "optimizer.grad_clamp")
    if isinstance(opt.grad_precision, ListConfig):
        if len(opt.grad_precision) != cfg.replicas:
            raise ConfigError(
                "optimizer.grad_precision",
                list(opt.grad_precision),
                f"a list needs one precision per replica: {cfg.replicas} "
                f"number{'s' * (cfg.replicas > 1)} (0: exact)",
            )
        for i in range(cfg.replicas):
            _positive(cfg, f"optimizer.grad_precision.{i}", allow_zero=True)
    elif opt.grad_precision is not None:
        _positive(cfg, "optimizer.grad_precision")
    if opt.stochastic_rounding and opt.grad_precision is None:
        raise ConfigError(
            "optimizer.stochastic_rounding", True, "needs optimizer.grad_precision to be set"
        )
    if opt.name == "sgd":
        if not (0 <= opt.momentum < 1):
            raise ConfigError("optimizer.momentum", opt.momentum, "must be in [0, 1)")
        if opt.nesterov and opt.momentum == 0:
            raise ConfigError("optimizer.nesterov", True, "needs optimizer.momentum > 0")
    else:
        for i, beta in enumerate(opt.betas):
            if not (0 <= beta < 1):
                raise ConfigError(f"optimizer.betas[{i}]", beta, "must be in [0, 1)")
        if len(opt.betas) != 2:
            raise ConfigError("optimizer.betas", list(opt.betas), "must be two numbers")
        _positive(cfg, "optimizer.eps")


def _validate_lr(cfg: DictConfig) -> None:
    lr = cfg.optimizer.lr
    if not isinstance(lr, ListConfig):
        _positive(cfg, "optimizer.lr")
        return
    if len(lr) != cfg.replicas:
        raise ConfigError(
            "optimizer.lr",
            list(lr),
            f"a list needs one rate per replica: {cfg.replicas} number{'s' * (cfg.replicas > 1)}",
        )
    for i in range(len(lr)):
        _positive(cfg, f"optimizer.lr.{i}")


def _validate_ridge(cfg: DictConfig) -> None:
    if cfg.loss != "mse":
        raise ConfigError(
            "loss", cfg.loss, "optimizer=ridge minimises the squared loss: use loss=mse or sgd/adam"
        )
    if cfg.model.lazy_scale is not None:
        raise ConfigError(
            "model.lazy_scale",
            cfg.model.lazy_scale,
            "optimizer=ridge fits the model's optimum, which no scale changes: leave it null",
        )
    if cfg.model.name == "trainable":
        raise ConfigError(
            "optimizer",
            "ridge",
            "fits only a model that is linear in its trained parameters: model=frozen or "
            "model=linearized, not model=trainable",
        )
    if cfg.optimizer.gram_products == "float32":
        _validate_float32_products(cfg)
    if cfg.optimizer.population:
        _validate_population(cfg)
    elif cfg.n_train is None:
        raise ConfigError(
            "n_train",
            None,
            "optimizer=ridge needs a finite training set: set n_train=N, or fit the exact "
            "population with optimizer.population=true",
        )
    _validate_penalty(cfg)
    if cfg.optimizer.width_path:
        _validate_width_path(cfg)
    if cfg.optimizer.chunk_size is not None:
        _int_at_least(cfg, "optimizer.chunk_size", 1)


def base_lr(lr: float | ListConfig) -> float:
    """The rate the optimizer itself runs at: the lr, or the first of a per-replica list."""
    return float(lr[0]) if isinstance(lr, ListConfig) else float(lr)


def penalty_list(cfg: DictConfig) -> list[float] | None:
    """The penalties of a penalty path (a list, or the gcv grid), or None for one penalty."""
    penalty = cfg.optimizer.penalty
    if penalty == "gcv":
        return list(cfg.optimizer.gcv_penalties)
    return list(penalty) if isinstance(penalty, ListConfig) else None


def _validate_penalty(cfg: DictConfig) -> None:
    """A number >= 0, a non-empty list of them (the penalty path), or gcv (sampled fits)."""
    penalty = cfg.optimizer.penalty
    if isinstance(penalty, str) and penalty != "gcv":
        raise ConfigError(
            "optimizer.penalty", penalty, "must be a number >= 0, a list of them, or gcv"
        )
    if penalty == "gcv" and cfg.optimizer.population:
        raise ConfigError(
            "optimizer.penalty",
            "gcv",
            "cross-validates over samples, but optimizer.population=true fits the population "
            "(no estimation error to trade against: the smallest penalty is best there)",
        )
    if penalty == "gcv":
        key, values = "optimizer.gcv_penalties", cfg.optimizer.gcv_penalties
    elif isinstance(penalty, ListConfig):
        key, values = "optimizer.penalty", penalty
    else:
        _positive(cfg, "optimizer.penalty", allow_zero=True)
        return
    if len(values) == 0:
        raise ConfigError(key, [], "a penalty path needs at least one penalty")
    for i in range(len(values)):
        _positive(cfg, f"{key}.{i}", allow_zero=True)
    if cfg.optimizer.width_path:
        raise ConfigError(
            "optimizer.penalty",
            penalty if penalty == "gcv" else list(penalty),
            "optimizer.width_path=true takes one penalty (a number), not a path",
        )


def _validate_width_path(cfg: DictConfig) -> None:
    """The width path reads the first P units of a frozen net as a width-P net, with one penalty
    for every width: a positive absolute one, so that each prefix system is positive definite."""
    if cfg.model.name != "frozen":
        raise ConfigError(
            "model.name",
            cfg.model.name,
            "optimizer.width_path=true needs model=frozen: the first P features of a "
            f"{cfg.model.name} model are not a model of width P",
        )
    if cfg.optimizer.penalty_scale != "absolute":
        raise ConfigError(
            "optimizer.penalty_scale",
            cfg.optimizer.penalty_scale,
            "optimizer.width_path=true needs one penalty for every width, but a relative "
            "penalty depends on the width it is taken at: set optimizer.penalty_scale=absolute",
        )
    if not cfg.optimizer.penalty > 0:
        raise ConfigError(
            "optimizer.penalty",
            cfg.optimizer.penalty,
            "optimizer.width_path=true needs a penalty > 0, so that the system is positive "
            "definite at every width (1e-8 is a good start)",
        )


# What the exact Gaussian moments of random features hold for (theory.relu_population_moments):
# ReLU features of a frozen net, a target that is a sum of ReLUs, Gaussian inputs.
EXACT_MOMENTS_NEED = {
    "model.name": ("frozen",),
    "model.activation": ("relu",),
    "input.name": ("gaussian",),
    "target.name": RELU_SUM_TARGETS,
}


def exact_moments_apply(cfg: DictConfig) -> bool:
    """Whether the exact population moments of the features hold for this config."""
    return all(_get(cfg, key) in allowed for key, allowed in EXACT_MOMENTS_NEED.items())


def _validate_float32_products(cfg: DictConfig) -> None:
    """optimizer.gram_products=float32: a plain fit of one penalty on sampled features, the
    one whose rounding error solvers.float32_fit estimates."""
    opt = cfg.optimizer
    if opt.population:
        key, value, why = "optimizer.population", "true", "draws no samples"
    elif cfg.model.name == "kernel":
        key, value, why = "model", "kernel", "has a closed-form kernel in float64, no features"
    elif opt.width_path:
        key, value, why = "optimizer.width_path", "true", "solves at every width"
    elif penalty_list(cfg) is not None:
        key, value, why = "optimizer.penalty", opt.penalty, "fits a path of penalties"
    else:
        return
    raise ConfigError(
        "optimizer.gram_products",
        "float32",
        f"is checked for one fit of one penalty on sampled features, but {key}={value} {why}; "
        "allowed there: float64",
    )


def _validate_population(cfg: DictConfig) -> None:
    """optimizer.population=true needs what theory has in closed form: ReLU random features
    (a frozen net) on a ReLU neuron or a zigzag, under Gaussian inputs, and no training set."""
    for key, allowed in EXACT_MOMENTS_NEED.items():
        value = _get(cfg, key)
        if value not in allowed:
            raise ConfigError(
                key,
                value,
                "optimizer.population=true fits the exact Gaussian moments of ReLU random "
                f"features, which hold only for {key}={' or '.join(allowed)}",
            )
    if cfg.n_train is not None:
        raise ConfigError(
            "n_train",
            cfg.n_train,
            "optimizer.population=true draws no training samples: leave n_train unset (null)",
        )


register_configs()
