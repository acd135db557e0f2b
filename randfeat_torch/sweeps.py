"""The jobs of a command line, as Hydra's sweeper will launch them, and their checks.

:func:`sweep_jobs` expands a multirun with Hydra's own :class:`BasicSweeper` split, after a
preset's own ``hydra.sweeper.params`` (the command line overriding them key by key), so the
jobs checked are exactly the jobs launched. :func:`check_jobs` composes each distinct pick of
config groups once and sets every job's values on a copy, as Hydra composes a job, then runs
the value checks of :func:`randfeat_torch.config.validate`. Checks of the machine (CUDA, free
memory) are not made here: they run in the job, on the machine that runs it.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from hydra import compose, initialize_config_dir
from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.global_hydra import GlobalHydra
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import Override
from hydra.errors import (
    ConfigCompositionException,
    HydraException,
    MissingConfigException,
    OverrideParseException,
)
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from randfeat_torch.config import GROUPS, ConfigError, validate
from randfeat_torch.paths import CONFIG_DIR, register_resolvers

BASIC_SWEEPER = "hydra._internal.core_plugins.basic_sweeper.BasicSweeper"


def is_hydra_override(text: str) -> bool:
    """Overrides of Hydra's own config (``hydra.run.dir=...``, ``hydra/launcher=...``)."""
    return text.lstrip("+~").startswith(("hydra.", "hydra/"))


@contextmanager
def hydra_configs() -> Iterator[OverridesParser]:
    """Hydra initialised on ``configs/`` (cleared on exit), and a parser of overrides that knows
    the config groups (for ``glob`` sweeps over options)."""
    register_resolvers()
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
            loader = GlobalHydra.instance().hydra.config_loader
            yield OverridesParser.create(config_loader=loader)
    finally:
        GlobalHydra.instance().clear()


@contextmanager
def one_sentence(overrides: list[str]) -> Iterator[None]:
    """Hydra's and OmegaConf's errors about ``overrides`` as a :class:`ConfigError` whose one
    sentence names the key, the value and what is allowed."""
    try:
        yield
    except ConfigError:
        raise
    except MissingConfigException as error:
        group, _, option = (error.missing_cfg_file or "?/?").rpartition("/")
        raise ConfigError(group, option, f"allowed: {', '.join(error.options or [])}") from None
    except (ConfigCompositionException, OmegaConfBaseException) as error:
        cause = error.__cause__ if isinstance(error.__cause__, OmegaConfBaseException) else error
        key = getattr(cause, "full_key", None) or "config"
        value = next(  # the last override of the key is the one Hydra applied
            (
                o.partition("=")[2]
                for o in reversed(overrides)
                if o.lstrip("+~").startswith(f"{key}=")
            ),
            "?",
        )
        reason = str(getattr(cause, "msg", None) or cause).splitlines()[0]
        if reason.startswith("Invalid value '") and "expected one of [" in reason:
            reason = "allowed: " + reason.partition("expected one of [")[2].rstrip("]")
        raise ConfigError(key, value, reason) from None
    except (OverrideParseException, ValueError, TypeError):  # "=3", "model=[1,2]"
        for override in overrides:
            key, _, value = override.partition("=")
            if key.lstrip("+~") in GROUPS and not value.replace("_", "").isalnum():
                raise ConfigError(key, value, "must name one option of the group") from None
        bad = next((o for o in overrides if "=" not in o or o.startswith("=")), " ".join(overrides))
        raise ConfigError("override", bad, "is not Hydra's KEY=VALUE syntax") from None
    except HydraException as error:  # e.g. a sweep type the basic sweeper cannot expand
        reason = str(error).splitlines()[0]
        raise ConfigError("override", " ".join(overrides), reason) from None


def compose_job(overrides: list[str]) -> DictConfig:
    """train.yaml composed with one job's ``overrides``, as the job composes it (not validated);
    bad overrides raise :class:`ConfigError`."""
    with one_sentence(overrides), hydra_configs():
        return compose("train", overrides)


def sweep_jobs(overrides: list[str]) -> list[list[str]]:
    """The override lists of the jobs ``python train.py -m <overrides>`` launches, in Hydra's
    order: the preset's ``hydra.sweeper.params`` first, then the command line, split by the
    basic sweeper. Hydra's own overrides (``hydra.*``) are left out of the jobs."""
    task = [o for o in overrides if not is_hydra_override(o)]
    with one_sentence(overrides), hydra_configs() as parser:
        return expand(sweeper_params(parser, overrides), task, parser)


def expand(
    params: list[str], task: list[str], parser: OverridesParser | None = None
) -> list[list[str]]:
    """The basic sweeper's jobs for its ``params`` and the command line's ``task`` overrides
    (``parser``: one that knows the config groups, for ``glob``; else a plain one)."""
    parser = parser or OverridesParser.create()
    batches = BasicSweeper.split_arguments(parser.parse_overrides([*params, *task]), None)
    return [job for batch in batches for job in batch]


def sampled_values(override: Override) -> list[str]:
    """Values that stand for a sweep of a sweeper that chooses its own jobs (Optuna): each
    choice or range value, the two ends of an interval."""
    key = override.get_key_element()
    if override.is_interval_sweep():
        sweep = override.value()
        return [f"{key}={sweep.start}", f"{key}={sweep.end}"]
    if override.is_sweep_override():
        return [f"{key}={v}" for v in override.sweep_string_iterator()]
    return [f"{key}={override.get_value_element_as_str()}"]


def search_jobs(overrides: list[str]) -> list[list[str]]:
    """For a sweeper that picks its own jobs (``hydra/sweeper=optuna``): jobs that stand for its
    search space, each value of each axis with the other axes at their first value (the
    jobs it then picks are checked in the job)."""
    task = [o for o in overrides if not is_hydra_override(o)]
    with one_sentence(overrides), hydra_configs() as parser:
        params = sweeper_params(parser, overrides)
        axes = {}
        for override in parser.parse_overrides([*params, *task]):
            axes[override.get_key_element()] = sampled_values(override)
    first = [values[0] for values in axes.values()]
    jobs = [first]
    for i, values in enumerate(axes.values()):
        jobs += [[*first[:i], value, *first[i + 1 :]] for value in values[1:]]
    return jobs


def primary_config(parser: OverridesParser, overrides: list[str]) -> DictConfig:
    """The config a multirun starts from, Hydra's included: composed without the sweep
    overrides, as Hydra composes it before its sweeper expands them."""
    fixed = [o.input_line for o in parser.parse_overrides(overrides) if not o.is_sweep_override()]
    return compose("train", fixed, return_hydra_config=True)


def sweeper_params(parser: OverridesParser, overrides: list[str]) -> list[str]:
    """The sweeper's own ``hydra.sweeper.params`` (a preset's sweep) as overrides."""
    params = primary_config(parser, overrides).hydra.sweeper.get("params") or {}
    return [f"{k}={v}" for k, v in params.items()]


def sweeper_of(overrides: list[str]) -> str:
    """The ``_target_`` of the sweeper a multirun with these overrides uses."""
    with one_sentence(overrides), hydra_configs() as parser:
        return str(primary_config(parser, overrides).hydra.sweeper.get("_target_", BASIC_SWEEPER))


def split_overrides(overrides: list[str]) -> tuple[tuple[str, ...], list[Override]] | None:
    """The group choices (``model=frozen``) and the value overrides (``d=8``) of a job, or None
    where it holds anything else (``+``, ``~``, a sweep, a package, ``hydra.*``): a job that
    only Hydra composes right."""
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


class Composer:
    """Composes jobs as Hydra composes them, each distinct pick of config groups once (Hydra
    reads every YAML of the defaults tree on each compose, about 65 ms here): a job's values
    are set, in order, on a deep copy of its pick, as Hydra sets them after composing. A job
    that only Hydra composes right, or a value it would refuse, goes to ``compose`` whole
    (default :func:`compose_job`, whose errors are one sentence)."""

    def __init__(self, compose: Callable[[list[str]], DictConfig] = compose_job) -> None:
        self.compose = compose
        self.picks: dict[tuple[str, ...], DictConfig] = {}

    def __call__(self, overrides: list[str]) -> DictConfig:
        try:
            split = split_overrides(overrides)
        except OverrideParseException:
            split = None
        if split is None:
            return self.compose(list(overrides))
        groups, values = split
        if groups not in self.picks:
            self.picks[groups] = self.compose(list(groups))
        cfg = copy.deepcopy(self.picks[groups])
        try:
            for o in values:
                OmegaConf.update(cfg, o.key_or_group, o.value(), merge=True)
        except OmegaConfBaseException:
            return self.compose(list(overrides))
        return cfg


def check_jobs(jobs: list[list[str]]) -> None:
    """Compose (:class:`Composer`) and validate every job; the first bad one raises
    :class:`ConfigError`."""
    compose = Composer()
    for job in jobs:
        with one_sentence(job):
            validate(compose(job))
