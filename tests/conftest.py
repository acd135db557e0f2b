"""Fixtures: compose the real configs/train.yaml through Hydra's compose API, shrunk for tests."""

from __future__ import annotations

import copy
import os
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import Override
from hydra.errors import OverrideParseException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from randfeat_torch.config import GROUPS
from randfeat_torch.paths import CONFIG_DIR, register_resolvers
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


def split_overrides(overrides: Sequence[str]) -> tuple[tuple[str, ...], list[Override]] | None:
    """The group choices (``model=frozen``) and the value overrides (``d=8``, ``model.width=7``)
    of a command line, or None where it holds anything else (``+``, ``~``, a sweep, a package,
    ``hydra.*``, a group of the ConfigStore): those go to Hydra whole."""
    groups, values = [], []
    for o in OverridesParser.create().parse_overrides(list(overrides)):
        key = o.key_or_group
        if o.package is not None or o.is_sweep_override() or o.is_hydra_override():
            return None
        if o.is_add() or o.is_force_add() or o.is_delete() or "/" in key or key == "schema":
            return None
        if key in GROUPS:
            groups.append(o.input_line)
        else:
            values.append(o)
    return tuple(groups), values


COMPOSED: dict[tuple[str, ...], DictConfig] = {}  # group choices -> Hydra's config, per session


def compose_cached(overrides: Sequence[str]) -> DictConfig:
    """What ``compose_train(overrides)`` returns, about 60x cheaper on a repeated choice of
    groups: Hydra composes each choice of groups once per session (it reads every YAML of the
    defaults tree again on every compose: about 65 ms), and the value overrides are set on a
    deep copy of it as Hydra sets them, in order, after composing. A value that Hydra would
    refuse goes to Hydra, for Hydra's own error."""
    try:
        split = split_overrides(overrides)
    except OverrideParseException:  # for Hydra's own error
        split = None
    if split is None:
        return compose_train(overrides)
    groups, values = split
    if groups not in COMPOSED:
        COMPOSED[groups] = compose_train(groups)
    cfg = copy.deepcopy(COMPOSED[groups])
    try:
        for o in values:
            OmegaConf.update(cfg, o.key_or_group, o.value(), merge=True)
    except OmegaConfBaseException:
        return compose_train(overrides)
    return cfg


@pytest.fixture
def make_cfg() -> Iterator[Callable[..., DictConfig]]:
    """compose(*overrides): train.yaml with the SMALL sizes, then the given overrides (see
    :func:`compose_cached`); GlobalHydra is cleared afterwards."""
    register_resolvers()

    def make(*overrides: str) -> DictConfig:
        return compose_cached([*SMALL, *overrides])

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
