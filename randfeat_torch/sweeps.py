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
import dataclasses
import difflib
import pickle
import re
import shlex
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

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
from omegaconf import BooleanNode, DictConfig, OmegaConf
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


class OverrideError(ConfigError):
    """An override that is not KEY=VALUE (``width``, ``~width``): the override as typed."""

    def __init__(self, override: str, allowed: str) -> None:
        super().__init__(override, "", allowed)
        self.args = (f"invalid config: {override or repr(override)} ({allowed})",)


def group_options(group: str) -> list[str]:
    """The options of one of our config groups (its YAML files)."""
    return sorted(p.stem for p in (CONFIG_DIR / group).glob("*.yaml"))


def options_with_key(group: str, key: str) -> list[str]:
    """The options of a config group whose YAML file sets ``key`` at its top level."""
    return [
        o for o in group_options(group) if key in OmegaConf.load(CONFIG_DIR / group / f"{o}.yaml")
    ]


def no_such_key(key: str, value: str, schema: Any) -> str:
    """Why ``key`` (dotted, without ``+``) is refused: the options of its config group that have
    it, the nearest key of its ``schema`` (a dataclass), or where new keys go."""
    parent, _, leaf = key.rpartition(".")
    if parent in GROUPS and (owners := options_with_key(parent, leaf)):
        picks = " or ".join(f"{parent}={o}" for o in owners)
        example = f"{parent}={owners[0]} {key}={value}"
        return f"no such key in this {parent}; it belongs to {picks}: choose it too, as {example}"
    names = [f.name for f in dataclasses.fields(schema)] if dataclasses.is_dataclass(schema) else []
    nearest = difflib.get_close_matches(leaf, names, n=1)
    if nearest:
        return f"no such key; the nearest is {'.'.join(filter(None, [parent, nearest[0]]))}"
    if key.startswith("hydra."):
        return "no such key in Hydra's config, whose keys python train.py --cfg hydra shows"
    return f"no such key; new variables go under vars, as +vars.{leaf}={value}"


def grammar_error(overrides: list[str]) -> ConfigError | None:
    """The first override that Hydra's override grammar cannot read on its own, as one
    sentence naming its key and value (None where each can be read)."""
    parser = OverridesParser.create()
    for override in overrides:
        key, eq, value = override.partition("=")
        if not key.strip("+~ "):
            return OverrideError(override, "no key: an override is KEY=VALUE")
        if not eq and not key.startswith("~"):
            return OverrideError(override, f"no value: write {key}=VALUE, or ~{key} to delete it")
        try:
            parser.parse_overrides([override])
        except OverrideParseException as error:
            lines = [
                line
                for line in str(error).splitlines()
                if line.strip() and not line.startswith(("Error parsing override", "See http"))
            ]
            detail = re.sub(r" expecting .*", "", lines[0] if lines else str(error))
            sweep = re.match(r"\w+ while evaluating '(.*?)': (.*)", detail)
            if sweep:
                return ConfigError(key, value, f"{sweep[1]} cannot be expanded: {sweep[2]}")
            if detail.startswith("LexerNoViableAltException"):
                detail = "a character it cannot read"
            return ConfigError(
                key,
                value,
                f"Hydra's override grammar cannot read the value: {detail}; quote a value that "
                "holds spaces or any of = , ( ) [ ] { }",
            )
    return None


def named_in(reason: str, overrides: list[str]) -> str | None:
    """The last of ``overrides`` that ``reason`` quotes whole, else whose value it quotes, else
    whose key it names."""
    split = [(o, *o.partition("=")[::2]) for o in reversed(overrides)]
    for override, _, value in split:
        if f"'{override}'" in reason or ("INTERVAL_SWEEP" in reason and "interval(" in value):
            return override
    for override, _, value in split:
        if value and f"'{value}'" in reason:
            return override
    for override, key, _ in split:
        if re.search(rf"(?<![\w.]){re.escape(key.lstrip('+~'))}(?!\w|\.\w)", reason):
            return override
    return None


def rephrase(reason: str, key: str, value: str) -> str:
    """Hydra's and OmegaConf's reason, as the part of one sentence that says what is allowed."""
    reason = re.sub(r"^\w+ raised while resolving interpolation: ", "", reason)
    bare = key.lstrip("+~")
    if reason.startswith("Invalid value '") and "expected one of [" in reason:
        return "allowed: " + reason.partition("expected one of [")[2].rstrip("]")
    if bare in GROUPS and not re.fullmatch(r"[\w.-]*", value):
        return f"allowed: {', '.join(group_options(bare))}"
    if reason.startswith("Invalid value assigned: ") and "is not a ListConfig" in reason:
        return f"must be a list, written in brackets: {bare}=[a,b]"
    if reason.startswith("Cannot assign ") and " to Dict[" in reason:
        return f"holds keys, not a value: set one of them, as +{bare}.NAME={value}"
    if re.fullmatch(r"field '[\w.]+' is not Optional", reason):
        return "cannot be null; allowed: a value of its type, which --cfg job shows"
    if reason.startswith("Could not append to config"):
        return f"the key has a value already, so set it without the +: {bare}={value}"
    if reason.startswith("Multiple values for"):
        return f"the group is in the defaults list, so pick it without the +: {bare}={value}"
    if reason.startswith("Could not delete from config"):
        return f"there is no key {bare} to delete"
    if reason.startswith("Ambiguous value for argument"):
        return "a sweep needs -m"
    if "BasicSweeper does not support sweep type" in reason:
        return (
            "the basic sweeper cannot sweep an interval: give a list or a range, or search it "
            "with hydra/sweeper=optuna"
        )
    if reason.startswith("token recognition error at: '('"):
        return (
            f"{reason}; quote an expression with parentheses inside its resolver, as "
            "${calc:'(1+${d})*2'}"
        )
    return reason


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
    except OverrideParseException:
        raise (
            grammar_error(overrides)
            or ConfigError("override", " ".join(overrides), "is not KEY=VALUE")
        ) from None
    except (ConfigCompositionException, OmegaConfBaseException, HydraException) as error:
        cause = error.__cause__ if isinstance(error.__cause__, OmegaConfBaseException) else error
        reason = str(getattr(cause, "msg", None) or cause).splitlines()[0]
        key = getattr(cause, "full_key", None)
        if reason.startswith("Key '") and getattr(cause, "object_type", None) is not None:
            value = next(
                (o.partition("=")[2] for o in reversed(overrides) if o.startswith(f"{key}=")), "?"
            )
            raise ConfigError(key, value, no_such_key(key, value, cause.object_type)) from None
        below = next((o for o in overrides if key and o.lstrip("+").startswith(f"{key}.")), None)
        if (
            below
            and "of type 'dict'" in reason
            and not any(o.lstrip("+").startswith(f"{key}=") for o in overrides)
        ):  # d.x=1: OmegaConf tried to put {x: 1} in d
            typed, _, value = below.partition("=")
            raise ConfigError(
                typed, value, f"no such key: {key} holds a value, not keys; set it as {key}=VALUE"
            ) from None
        # the last override of the key is the one Hydra applied
        line = next(
            (o for o in reversed(overrides) if key and o.lstrip("+~").startswith(f"{key}=")),
            None,
        ) or named_in(reason, overrides)
        key, eq, value = line.partition("=") if line else (key or "config", "=", "?")
        if not eq:
            raise OverrideError(key, rephrase(reason, key, value)) from None
        raise ConfigError(key, value, rephrase(reason, key, value)) from None
    except (ValueError, TypeError):  # "=3", "model=[1,2]": not KEY=VALUE, or not an option
        error = grammar_error(overrides)
        if error:
            raise error from None
        for override in overrides:
            key, _, value = override.partition("=")
            if key.lstrip("+~") in GROUPS and not value.replace("_", "").isalnum():
                raise ConfigError(key, value, rephrase("", key, value)) from None
        raise ConfigError("override", " ".join(overrides), "is not KEY=VALUE") from None


def compose_job(overrides: list[str]) -> DictConfig:
    """train.yaml composed with one job's ``overrides``, as the job composes it (not validated);
    bad overrides raise :class:`ConfigError`."""
    with one_sentence(overrides), hydra_configs():
        parsed = OverridesParser.create().parse_overrides(list(overrides))
        check_groups(parsed)
        cfg = compose("train", overrides)
        if any(is_hydra_override(o) and o.startswith(("+", "~")) for o in overrides):
            check_keys(compose("train", overrides, return_hydra_config=True), overrides)
    check_keys(cfg, overrides)
    for override in parsed:
        check_boolean(cfg, override)
    return cfg


def check_groups(overrides: list[Override]) -> None:
    """An option of one of our config groups is the name of one of its YAML files (``.yaml``
    may follow, as Hydra reads it): not a path, which Hydra would read from another group's
    folder (``target=../model/frozen``), nor null."""
    for o in overrides:
        key = o.key_or_group
        if key not in GROUPS or o.package is not None or o.is_delete() or o.is_sweep_override():
            continue
        value, options = o.value(), group_options(key)
        if value is None or (isinstance(value, str) and value.removesuffix(".yaml") not in options):
            why = "a config group takes one of its options, not null; " if value is None else ""
            typed, _, shown = o.input_line.partition("=")
            raise ConfigError(typed, shown, f"{why}allowed: {', '.join(options)}")


# What OmegaConf reads as a boolean, beside any integer (so that compile=2 would be true).
BOOLEAN_WORDS = ("true", "false", "yes", "no", "on", "off", "y", "n", "0", "1")


def check_boolean(cfg: DictConfig, override: Override) -> None:
    """A boolean key is set to true or false (OmegaConf's words for them, or 0 and 1): OmegaConf
    reads any other integer as true, so that ``resume=2`` would pass for a typo."""
    if override.is_sweep_override() or override.is_delete() or override.package is not None:
        return
    node: Any = cfg
    for part in override.key_or_group.split("."):
        if not isinstance(node, DictConfig) or part not in node:
            return
        node = node._get_node(part)
    value = override.value()
    if not isinstance(node, BooleanNode) or isinstance(value, bool):
        return
    if str(value).lower() not in BOOLEAN_WORDS and not str(value).startswith("${"):
        typed, _, shown = override.input_line.partition("=")
        raise ConfigError(typed, shown, "must be a boolean; allowed: true, false")


def check_keys(cfg: DictConfig, overrides: list[str]) -> None:
    """Refuse an override that adds a key no schema has (``+model.widht=5``, a typo that would
    run the default) or deletes one the schema has (``~width``). Free dicts (``vars``, Hydra's
    ``env_set``) take any key; Hydra's keys are checked where ``cfg`` holds them."""
    for o in OverridesParser.create().parse_overrides(list(overrides)):
        key = o.key_or_group
        if not (o.is_add() or o.is_force_add() or o.is_delete()) or o.package is not None:
            continue
        if "/" in key or key in GROUPS or (key.startswith("hydra.") and "hydra" not in cfg):
            continue  # a config group (+experiment=, ~hydra/launcher), or Hydra's not composed
        typed, _, value = o.input_line.partition("=")
        parts = key.split(".")
        start = 1 if parts[0] == "hydra" else 0  # Hydra's own node, beside the schema's keys
        node: Any = cfg.hydra if start else cfg
        for i in range(start, len(parts)):
            schema = OmegaConf.get_type(node) if isinstance(node, DictConfig) else None
            if not dataclasses.is_dataclass(schema):
                break  # a free dict (vars) or a list: any key
            if parts[i] not in {f.name for f in dataclasses.fields(schema)}:
                if o.is_delete():
                    break  # Hydra refuses to delete a key that is not there
                where = ".".join(parts[: i + 1])
                raise ConfigError(typed, value, no_such_key(where, value, schema))
            if i == len(parts) - 1 and o.is_delete():
                raise OverrideError(o.input_line, f"the schema needs {key}: set it, as {key}=VALUE")
            node = node.get(parts[i])


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
    overrides = parser.parse_overrides([*params, *task])
    for o in overrides:
        if not o.is_sweep_override() or o.is_interval_sweep():
            continue
        key, value = o.get_key_element(), o.input_line.partition("=")[2]
        try:
            values = list(o.sweep_string_iterator())
        except ValueError as error:  # range(1,5,0)
            raise ConfigError(key, value, f"cannot be expanded: {error}") from None
        if not values:
            why = f"matches no option; allowed: {', '.join(group_options(key))}"
            raise ConfigError(key, value, why if key in GROUPS else "gives no values")
    batches = BasicSweeper.split_arguments(overrides, None)
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
    kept = [o for o in parser.parse_overrides(overrides) if not o.is_sweep_override()]
    check_groups(kept)
    fixed = [o.input_line for o in kept]
    cfg = compose("train", fixed, return_hydra_config=True)
    check_keys(cfg, fixed)
    return cfg


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


def kept(cfg: DictConfig) -> bytes | DictConfig:
    """A pick as kept: pickled, since unpickling copies it in a tenth of a deepcopy's time; as
    it is where it does not pickle (in a launcher's worker process, where Hydra has imported
    its plugins' config classes anew, pickle no longer finds them by name)."""
    try:
        return pickle.dumps(cfg)
    except (pickle.PicklingError, TypeError, AttributeError):
        return cfg


def copy_of(pick: bytes | DictConfig) -> DictConfig:
    """A fresh copy of a pick as :func:`kept` keeps it."""
    return pickle.loads(pick) if isinstance(pick, bytes) else copy.deepcopy(pick)


class Composer:
    """Composes jobs as Hydra composes them, each distinct pick of config groups once (Hydra
    reads every YAML of the defaults tree on each compose, about 65 ms here): a job's values
    are set, in order, on a copy of its pick (:func:`copy_of`), as Hydra sets them after
    composing. A job that only Hydra composes right, or a value it would refuse, goes to
    ``compose`` whole (default :func:`compose_job`, whose errors are one sentence)."""

    def __init__(self, compose: Callable[[list[str]], DictConfig] = compose_job) -> None:
        self.compose = compose
        self.picks: dict[tuple[str, ...], bytes | DictConfig] = {}

    def __call__(self, overrides: list[str]) -> DictConfig:
        try:
            split = split_overrides(overrides)
        except OverrideParseException:
            split = None
        if split is None:
            return self.compose(list(overrides))
        groups, values = split
        if groups not in self.picks:
            self.picks[groups] = kept(self.compose(list(groups)))
        cfg = copy_of(self.picks[groups])
        try:
            for o in values:
                check_boolean(cfg, o)
                OmegaConf.update(cfg, o.key_or_group, o.value(), merge=True)
        except OmegaConfBaseException:
            return self.compose(list(overrides))
        return cfg


def check_composed(cfg: DictConfig, overrides: list[str]) -> None:
    """:func:`validate` a config composed with ``overrides``; where one of them interpolates
    (``loss=${d}``), resolve the whole config first: OmegaConf checks an interpolation's type
    only when it is read, so a bad one would pass here and fail in the run. (The configs'
    own interpolations are tested; resolving every config would cost a sweep's check a third
    more.)"""
    if any("${" in o for o in overrides):
        OmegaConf.to_container(cfg, resolve=True)
    validate(cfg)


def check_jobs(jobs: list[list[str]]) -> None:
    """Compose (:class:`Composer`) and validate every job; the first bad one raises
    :class:`ConfigError`."""
    compose = Composer()
    for job in jobs:
        with one_sentence(job):
            check_composed(compose(job), job)


def rerun_hint() -> list[str]:
    """The end of a summary of the jobs that did not finish: the command that finishes them."""
    command = [sys.executable, *sys.argv] if sys.argv[0].endswith(".py") else sys.argv
    return [
        "Run the same command again to finish them, once what failed is fixed (finished jobs "
        "are skipped, interrupted ones resume from their checkpoints):",
        f"  {shlex.join(command)}",
    ]
