"""Random overrides thrown at the app in-process (Hydra's compose API): the answer is a config
that can run, or one sentence naming the key, the value and what is allowed; nothing else."""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from randfeat_torch.cli import load_config
from randfeat_torch.config import ConfigError

KEYS = [
    "d",
    "width",
    "seed",
    "data_seed",
    "replicas",
    "replica_data",
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
    "optimizer.grad_clip",
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
    max_examples=250, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow]
)
@given(st.lists(OVERRIDE, min_size=1, max_size=3))
def test_random_overrides_give_a_valid_config_or_one_sentence(overrides):
    try:
        cfg = load_config(["n_test=100", *overrides])
    except ConfigError as error:
        text = str(error)
        assert text.startswith("invalid config: ") and "\n" not in text
        assert error.key and "=" in text
    else:
        assert cfg.d >= 1 and cfg.width >= 1 and cfg.steps >= 1
