"""A multirun's jobs composed as Hydra composes them, each distinct pick of config groups once.

Hydra composes every job of a sweep from the YAML files twice (its sweeper checks that the
job composes, then its launcher composes it again), about 65 ms each on a quiet core here and,
before this module, most of what a tiny job cost. :class:`ComposingLoader` is Hydra's own
config loader that composes a pick of groups (``model=frozen optimizer=ridge``) once, with
Hydra, and makes each job of that pick from a copy of it (unpickled: about 1 ms, a tenth
of a deepcopy): its values set in order, as Hydra sets the command line's values on the
composed config, and the fields that Hydra derives from a job's overrides
(``hydra.overrides.task``, ``hydra.job.override_dirname``) set as Hydra sets them. A job it
cannot make that way (``+key``, ``~key``, ``hydra.*``, a package, a value the config refuses)
is composed by Hydra whole, so that its errors stay Hydra's. The tests check that every job it
makes equals Hydra's composition of it.

:class:`ComposeJobsOnce` (``hydra.callbacks.compose`` in train.yaml) puts it in place when a
multirun starts, in the process that launches the jobs, whichever launcher runs them.
"""

from __future__ import annotations

from typing import Any

from hydra._internal.config_loader_impl import ConfigLoaderImpl, get_overrides_dirname
from hydra.core.global_hydra import GlobalHydra
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import Override
from hydra.errors import OverrideParseException
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from randfeat_torch.sweeps import copy_of, kept


class ComposingLoader(ConfigLoaderImpl):
    """Hydra's config loader whose :meth:`load_sweep_config` composes each pick of config
    groups once per process (see the module docstring); the picks are not pickled along to a
    launcher's worker processes, which compose their own."""

    @classmethod
    def of(cls, loader: ConfigLoaderImpl) -> ComposingLoader:
        """A loader with the state of Hydra's ``loader`` (its search path and repository)."""
        composing = cls.__new__(cls)
        composing.__dict__.update(loader.__dict__)
        composing.picks, composing.parsed = {}, {}
        return composing

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "picks": {}, "parsed": {}}

    def parse(self, overrides: list[str]) -> list[Override] | None:
        """The overrides as Hydra parses them, each distinct one once (a sweep repeats them);
        None where one does not parse."""
        for text in overrides:
            if text not in self.parsed:
                try:
                    self.parsed[text] = OverridesParser.create().parse_overrides([text])[0]
                except OverrideParseException:
                    self.parsed[text] = None
        parsed = [self.parsed[text] for text in overrides]
        return None if None in parsed else parsed

    def split(self, parsed: list[Override]) -> tuple[tuple[str, ...], list[Override]] | None:
        """A job's group choices and its value overrides, in order; None where it holds
        anything else, which only Hydra's whole composition sets right."""
        groups, values = [], []
        for o in parsed:
            if o.package is not None or o.is_sweep_override() or o.is_hydra_override():
                return None
            if o.is_add() or o.is_force_add() or o.is_delete():
                return None
            if self.repository.group_exists(o.key_or_group):
                groups.append(o.input_line)
            elif "/" in o.key_or_group:
                return None
            else:
                values.append(o)
        return tuple(groups), values

    def load_sweep_config(self, master_config: DictConfig, sweep_overrides: list[str]) -> Any:
        parsed = self.parse(sweep_overrides)
        split = None if parsed is None else self.split(parsed)
        if split is None:
            return super().load_sweep_config(master_config, sweep_overrides)
        groups, values = split
        key = (tuple(master_config.hydra.overrides.hydra), groups)
        if key not in self.picks:
            self.picks[key] = kept(super().load_sweep_config(master_config, list(groups)))
        cfg = copy_of(self.picks[key])
        try:
            for o in values:
                OmegaConf.update(cfg, o.key_or_group, o.value(), merge=True)
        except OmegaConfBaseException:  # Hydra says why, in its words
            return super().load_sweep_config(master_config, sweep_overrides)
        cfg.hydra.overrides.task = [o.input_line for o in parsed]
        dirname = cfg.hydra.job.config.override_dirname
        cfg.hydra.job.override_dirname = get_overrides_dirname(
            overrides=parsed,
            kv_sep=dirname.kv_sep,
            item_sep=dirname.item_sep,
            exclude_keys=dirname.exclude_keys,
        )
        OmegaConf.copy_cache(from_config=master_config, to_config=cfg)
        return cfg


class ComposeJobsOnce(Callback):
    """When a multirun starts, gives Hydra a :class:`ComposingLoader` in place of its loader
    (before Hydra makes its sweeper, which takes the loader from there)."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        hydra = GlobalHydra.instance().hydra
        if hydra is not None and type(hydra.config_loader) is ConfigLoaderImpl:
            hydra.config_loader = ComposingLoader.of(hydra.config_loader)
