"""Fixtures: compose the real configs/train.yaml through Hydra's compose API, shrunk for tests."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import DictConfig

from randfeat_torch.paths import CONFIG_DIR, register_resolvers
from randfeat_torch.sweeps import Composer
from randfeat_torch.trainer import RunResult, train

ROOT = CONFIG_DIR.parent
# The device of the runs that the tests train: cpu, or cuda on a GPU machine
# (RANDFEAT_TEST_DEVICE=cuda, as scripts/gpu_check.sh sets it); the suite never needs a GPU.
TEST_DEVICE = os.environ.get("RANDFEAT_TEST_DEVICE", "cpu")
SMALL = [
    "d=8",
    "width=64",
    "steps=20",
    "eval_every=10",
    "batch_size=32",
    "n_test=512",
    f"device={TEST_DEVICE}",
]


def compose_train(overrides: Sequence[str]) -> DictConfig:
    """train.yaml composed by Hydra's compose API with ``overrides``; GlobalHydra is cleared
    first (``cli.load_config`` and ``hydra.main`` leave it in either state) and after."""
    register_resolvers()
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
            return compose(config_name="train", overrides=list(overrides))
    finally:
        GlobalHydra.instance().clear()


COMPOSE = Composer(compose_train)  # each pick of config groups composed once per session


@pytest.fixture
def make_cfg() -> Iterator[Callable[..., DictConfig]]:
    """compose(*overrides): train.yaml with the SMALL sizes, then the given overrides (see
    :class:`randfeat_torch.sweeps.Composer`); GlobalHydra is cleared afterwards."""
    register_resolvers()

    def make(*overrides: str) -> DictConfig:
        return COMPOSE([*SMALL, *overrides])

    yield make
    GlobalHydra.instance().clear()


@pytest.fixture
def run(make_cfg: Callable[..., DictConfig], tmp_path: Path) -> Callable[..., RunResult]:
    """run(*overrides): train a composed config with its record under tmp_path."""
    count = 0

    def run_with(*overrides: str) -> RunResult:
        nonlocal count
        count += 1
        return train(make_cfg(*overrides), tmp_path / f"run{count}")

    return run_with
