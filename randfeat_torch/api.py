"""Train and read runs from Python, say in a notebook: ``run(model="frozen", d=64)``.

:func:`run` composes the config ``python train.py model=frozen d=64`` composes
(:func:`randfeat_torch.cli.load_config`), trains it in the folder that command would use and
skips it the same way when its record says it finished. :func:`load_sweep` reads a sweep
folder's records into the aggregator's table (:func:`randfeat_torch.analysis.read_records`).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from hydra import compose
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import DictConfig

from randfeat_torch.cli import check_writable, group_choices, load_config
from randfeat_torch.config import ConfigError
from randfeat_torch.record import finished_error, read_record
from randfeat_torch.sweeps import hydra_configs, is_hydra_override, one_sentence
from randfeat_torch.trainer import RunResult, train

if TYPE_CHECKING:
    import pandas as pd


def hydra_value(value: Any) -> str:
    """A Python value in Hydra's override syntax: ``true``/``false``, ``null``, ``[a,b]``,
    ``{k:v}``; strings as written (``"4,8"`` is a sweep, as on the command line)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(hydra_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ",".join(f"{k}:{hydra_value(v)}" for k, v in value.items()) + "}"
    return str(value)


def overrides_of(overrides: tuple[str, ...], values: dict[str, Any]) -> list[str]:
    """The command line of ``run(*overrides, **values)``: the overrides, then ``key=value``
    for each keyword. A sweep (``d=4,8``, ``range(...)``) raises :class:`ConfigError`."""
    line = [*overrides, *(f"{k}={hydra_value(v)}" for k, v in values.items())]
    with one_sentence(line):
        parsed = OverridesParser.create().parse_overrides(line)
    for override in parsed:
        if override.is_sweep_override():
            raise ConfigError(
                override.key_or_group,
                override.input_line.partition("=")[2],
                "a sweep, and run() trains one job: sweep with python train.py -m, "
                "or call run() in a Python loop",
            )
    return line


def cli_folder(overrides: list[str]) -> tuple[Path, dict[str, str]]:
    """The folder ``python train.py <overrides>`` writes to (train.yaml's ``hydra.run.dir``,
    relative to the working directory, ``hydra.run.dir=...`` included), and its group picks."""
    with one_sentence(overrides), hydra_configs():
        hydra = compose("train", overrides, return_hydra_config=True).hydra
        return Path(hydra.run.dir).absolute(), group_choices(hydra.runtime.choices)


def stored_result(record: dict[str, Any], run_dir: Path) -> RunResult:
    """A finished run's result read back from its record. Its ``model`` is None: a finished run
    keeps no weights (its checkpoint is removed once it is done)."""

    def per_replica(value: float | list[float | None] | None) -> torch.Tensor:
        values = value if isinstance(value, list) else [value]
        return torch.tensor([math.nan if v is None else v for v in values], dtype=torch.float64)

    metrics = record.get("metrics") or {}
    return RunResult(
        status=record["status"],
        metrics={k: per_replica(v) for k, v in metrics.items()},
        theory=record.get("theory") or {},
        steps_done=record.get("steps_done", 0),
        wall_time_s=record.get("wall_time_s", math.nan),
        steps_per_s=record.get("steps_per_s", math.nan),
        device=record.get("device", ""),
        run_dir=run_dir,
        model=None,
    )


def run(*overrides: str, run_dir: Path | str | None = None, **values: Any) -> RunResult:
    """Train one run: ``run("model=frozen", "d=64")`` or ``run(model="frozen", d=64)`` (nested
    keys: ``**{"optimizer.lr": 0.1}``) trains what ``python train.py model=frozen d=64`` trains.

    ``run_dir`` defaults to the command line's folder (``outputs/runs/<overrides>`` under the
    working directory). As there, a run whose record says ``ok`` is not trained again: its
    result is read back from the record, with ``model=None`` and a ``[skip]`` line
    (``resume=False`` trains it again, by default in a new folder); a checkpoint is resumed.
    A bad value or a sweep raises :class:`ConfigError` before anything is written. An
    interrupt (Ctrl-C, the notebook's stop button) checkpoints and raises KeyboardInterrupt;
    the same call resumes."""
    line = overrides_of(overrides, values)
    cfg: DictConfig = load_config([o for o in line if not is_hydra_override(o)])
    folder, choices = cli_folder(line)
    run_dir = Path(run_dir) if run_dir is not None else folder
    done = read_record(run_dir) if cfg.resume else None
    if done and (error := finished_error(done)) is not None:
        print(
            f"[skip] {run_dir} is finished (status ok, test error {error:.4g}); "
            "resume=False trains it again",
            flush=True,
        )
        return stored_result(done, run_dir)
    check_writable(run_dir)
    result = train(cfg, run_dir, choices)
    if result.status == "interrupted":
        raise KeyboardInterrupt(
            f"interrupted at step {result.steps_done}: checkpoint and record are in "
            f"{result.run_dir}; the same call resumes"
        )
    return result


def load_sweep(path: Path | str) -> pd.DataFrame:
    """The records under ``path`` (a sweep folder, or any folder of runs) as one table: a row
    per run and replica, with ``run`` (its folder), ``status``, every config key (``d``,
    ``optimizer.lr``), the group picks (``model``, ``target``), the metrics (``test_error``),
    ``steps_to_error.*`` and ``theory.*``: the rows of the aggregator's results.csv."""
    from randfeat_torch.analysis import read_records  # pandas and matplotlib: only here

    root = Path(path)
    if not root.is_dir():
        raise FileNotFoundError(f"load_sweep: no folder at {root}")
    return read_records(root).table
