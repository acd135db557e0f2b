"""Random overrides thrown at the app in-process (Hydra's compose API): the answer is a config
that can run, or one sentence naming the key, the value and what is allowed; nothing else."""

from __future__ import annotations

import math

import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from omegaconf import DictConfig, ListConfig

from randfeat_torch.cli import load_config
from randfeat_torch.config import ConfigError

KEYS = [
    "d",
    "width",
    "seed",
    "data_seed",
    "replicas",
    "replica_data",
    "replica_init",
    "steps",
    "batch_size",
    "n_train",
    "n_test",
    "eval_every",
    "checkpoint_every",
    "device",
    "threads",
    "progress",
    "optimizer.lr",
    "optimizer.momentum",
    "optimizer.weight_decay",
    "optimizer.schedule",
    "optimizer.warmup_steps",
    "optimizer.grad_clamp",
    "optimizer.grad_precision",
    "model.activation",
    "model.parameterization",
    "model.init",
    "model.bias",
    "target.norm",
    "target.bias",
    "target.seed",
    "model",
    "target",
    "optimizer",
    "input",
    "fit",
    "foo",
    "model.nope",
    "vars.x",
]
NUMBERS = st.one_of(
    st.integers(min_value=-(10**15), max_value=10**15),
    st.sampled_from([0, 1, -1, 2, 10**30]),
    st.floats(allow_nan=True, allow_infinity=True).map(lambda x: repr(x).lower()),
)
WORDS = st.one_of(
    st.sampled_from(
        [
            "",
            "abc",
            "relu",
            "frozen",
            "ridge",
            "polynomial",
            "null",
            "true",
            "[1,2]",
            "[0.1,-1]",
            "cuda",
            "cpu",
            "shared",
            "independent",
            "nan",
            "inf",
            "${d}",
            "${oops}",
            "sphere",
            "{}",
        ]
    ),
    st.text(alphabet="abcxyz019_.-[]{},", max_size=8),
)
OVERRIDE = st.tuples(st.sampled_from(KEYS), st.one_of(NUMBERS, WORDS)).map(
    lambda kv: f"{kv[0]}={kv[1]}"
)


@settings(
    max_examples=150, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow]
)
@given(st.lists(OVERRIDE, min_size=1, max_size=3))
@example(["replicas=2", "replica_init=shared"])  # one network twice: refused
@example(["replicas=2", "replica_init=shared", "replica_data=independent"])
@example(["replicas=2", "replica_init=shared", "optimizer.lr=[0.1,0.1]"])  # the same rate twice
def test_random_overrides_give_a_valid_config_or_one_sentence(overrides):
    try:
        cfg = load_config(["n_test=100", *overrides])
    except ConfigError as error:
        text = str(error)
        assert text.startswith("invalid config: ") and "\n" not in text
        assert error.key and "=" in text
    else:
        assert_runnable(cfg)


def positive(value: float) -> bool:
    return math.isfinite(value) and value > 0


def assert_runnable(cfg: DictConfig) -> None:
    """What a config that validates promises, restated here rather than read from validate."""
    for key in ("d", "width", "replicas", "steps", "batch_size", "eval_every"):
        assert cfg[key] >= 1, key
    assert cfg.n_test >= 2 and cfg.seed >= 0 and cfg.target.seed >= 0
    for key, low in (("data_seed", 0), ("n_train", 1), ("checkpoint_every", 1), ("threads", 1)):
        assert cfg[key] is None or cfg[key] >= low, key
    assert cfg.replica_data in ("shared", "independent")
    assert cfg.replica_init in ("independent", "shared")
    if cfg.replica_init == "shared" and cfg.replicas > 1:  # one init: something else apart
        lists = [cfg.optimizer.get(k) for k in ("lr", "grad_precision")]
        each = [list(v) if isinstance(v, ListConfig) else [v] * cfg.replicas for v in lists]
        values = list(zip(*each, strict=True))  # each replica's rate and precision
        assert cfg.replica_data == "independent" or len(set(values)) == len(values)
        assert not cfg.optimizer.get("population", False)
    assert cfg.device in ("auto", "cpu") or torch.cuda.is_available()
    assert (cfg.target.d, cfg.model.d) == (cfg.d, cfg.d)
    assert (cfg.model.width, cfg.model.replicas) == (cfg.width, cfg.replicas)
    assert cfg.model.activation in ("relu", "gelu", "tanh", "softplus", "quadratic")
    assert cfg.model.parameterization in ("standard", "ntk", "mean_field")
    assert cfg.model.init in ("gaussian", "sphere")
    if cfg.target.name in ("relu_neuron", "zigzag"):
        assert positive(cfg.target.norm)
    if cfg.target.name == "relu_neuron":
        assert math.isfinite(cfg.target.bias)
    opt = cfg.optimizer
    if opt.name == "ridge":
        return
    if cfg.n_train is not None:
        assert cfg.n_train >= cfg.batch_size
    rates = list(opt.lr) if isinstance(opt.lr, ListConfig) else [opt.lr]
    assert len(rates) in (1, cfg.replicas) and all(positive(r) for r in rates)
    assert math.isfinite(opt.weight_decay) and opt.weight_decay >= 0
    assert opt.schedule in ("constant", "cosine")
    assert opt.warmup_steps == 0 or 0 < opt.warmup_steps < cfg.steps
    assert all(v is None or positive(v) for v in (opt.grad_clamp, opt.grad_precision))
    if opt.name == "sgd":
        assert 0 <= opt.momentum < 1
