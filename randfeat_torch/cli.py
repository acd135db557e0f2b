"""Hydra entry point: compose the config, train, print one summary line, map errors to exit codes.

``train.py`` at the top level and the ``randfeat-train`` console script both call :func:`run`.
A bad config value exits with status 2 and one sentence on stderr, before any work is done.
"""

from __future__ import annotations

import itertools
import os
import re
import sys
from pathlib import Path
from typing import Any

import hydra
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.utils import JobReturn
from hydra.errors import ConfigCompositionException, MissingConfigException, OverrideParseException
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from randfeat_torch.config import GROUPS, SWEEP_DIR_VARIABLE, ConfigError, validate
from randfeat_torch.record import RECORD_NAME, mark_failed, read_record
from randfeat_torch.trainer import RunResult, train

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"


def load_config(overrides: list[str]) -> DictConfig:
    """Compose train.yaml with ``overrides`` through Hydra's compose API and validate it: a
    config that can run, or a :class:`ConfigError` whose one sentence names the key, the
    value and what is allowed (Hydra's and OmegaConf's own errors translated)."""
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
            cfg = compose("train", overrides)
        validate(cfg)
        return cfg
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
        choices = re.fullmatch(r"Invalid value '.*', expected one of \[(.*)\]", reason)
        if choices:  # a field typed by one of config's closed sets of values
            reason = f"allowed: {choices.group(1)}"
        raise ConfigError(key, value, reason) from None
    except (OverrideParseException, ValueError, TypeError) as error:  # "=3", "model=[1,2]"
        if isinstance(error, ConfigError):
            raise
        for override in overrides:
            key, _, value = override.partition("=")
            if key.lstrip("+~") in GROUPS and not value.replace("_", "").isalnum():
                raise ConfigError(key, value, "must name one option of the group") from None
        bad = next((o for o in overrides if "=" not in o or o.startswith("=")), " ".join(overrides))
        raise ConfigError("override", bad, "is not Hydra's KEY=VALUE syntax") from None
    finally:
        GlobalHydra.instance().clear()


MAX_PRECHECKED_JOBS = 256


def precheck(argv: list[str]) -> None:
    """Validate a command line before Hydra creates anything: every job of a sweep (its first
    MAX_PRECHECKED_JOBS), through :func:`load_config`. A bad value, a wrong type, an unknown
    key or option, a malformed override: one sentence on stderr and exit status 2."""
    if any(a.startswith(("-c", "--cfg", "-h", "--help", "--info", "-i", "--shell")) for a in argv):
        return
    overrides = [
        a for a in argv if not a.startswith("-") and not a.startswith(("hydra.", "hydra/"))
    ]
    parser = OverridesParser.create()
    axes = []
    for text in overrides:
        try:
            override = parser.parse_overrides([text])[0]
            if override.is_sweep_override():
                key = override.get_key_element()
                axes.append([f"{key}={v}" for v in override.sweep_string_iterator()])
            else:
                axes.append([text])
        except Exception:  # globs and the like: Hydra's sweeper expands them
            axes.append([text])
    try:
        for job in itertools.islice(itertools.product(*axes), MAX_PRECHECKED_JOBS):
            load_config(list(job))
    except ConfigError as error:
        print(error, file=sys.stderr)
        sys.exit(2)


def summary_line(cfg: DictConfig, result: RunResult) -> str:
    """One readable line: model, target, d, width, final error, time, where the outputs are."""
    errors = result.metrics["test_error"].tolist()
    error = (
        f"{errors[0]:.4g}"
        if len(errors) == 1
        else "[" + ", ".join(f"{e:.4g}" for e in errors) + "]"
    )
    return (
        f"[{result.status}] {cfg.model.name} on {cfg.target.name}: d={cfg.d} width={cfg.width} "
        f"-> test error {error} after {result.steps_done} steps, {result.wall_time_s:.1f} s "
        f"({result.steps_per_s:.0f} steps/s, {result.device}); "
        f"record and TensorBoard logs in {result.run_dir}"
    )


class ValidateConfig(Callback):
    """Checks a single run's values before Hydra creates its output dir (``hydra.callbacks``)."""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        try:
            validate(config)
            check_writable(Path(config.hydra.run.dir))
        except ConfigError as error:
            print(error, file=sys.stderr)
            sys.exit(2)


class FixSweepDir(Callback):
    """Fixes the sweep folder, derived from the sweep's overrides, for all of its jobs."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        os.environ.pop(SWEEP_DIR_VARIABLE, None)
        os.environ[SWEEP_DIR_VARIABLE] = str(config.hydra.sweep.dir)


def check_writable(run_dir: Path) -> None:
    """Refuse an output dir that cannot be created or written, before any work (creating it
    is what Hydra does next anyway)."""
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        ok = os.access(run_dir, os.W_OK | os.X_OK)
        reason = "is not writable"
    except OSError as error:
        ok, reason = False, f"cannot be created ({error.strerror})"
    if not ok:
        raise ConfigError("hydra.run.dir", str(run_dir), reason)


class ThreadsPerWorker(Callback):
    """Under a launcher that runs jobs in parallel worker processes on one machine (the joblib
    preset ``local_parallel``), give each job cores / workers torch threads unless ``threads``
    is set, so that workers do not fight over the cores."""

    def on_job_start(self, config: DictConfig, **kwargs: Any) -> None:
        launcher = config.hydra.launcher
        if config.get("threads") is None and "joblib" in str(launcher.get("_target_", "")):
            cores = os.cpu_count() or 1
            workers = launcher.get("n_jobs") or 1
            if workers < 0:  # joblib: -1 is every core
                workers = cores
            torch.set_num_threads(max(1, cores // workers))


class AggregateOnMultirunEnd(Callback):
    """With ``aggregate=true``, runs scripts/aggregate.py's analysis on the sweep dir when a
    multirun ends. Hydra skips ``on_multirun_end`` when a job raised: then run it by hand."""

    def __init__(self, enabled: bool = False) -> None:
        self.enabled = enabled

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        if self.enabled:
            from randfeat_torch.analysis import aggregate  # pandas and matplotlib: only here

            print(aggregate(Path(config.hydra.sweep.dir)).summary, end="", flush=True)


class ReportJobs(Callback):
    """Prints every failed job as it ends, and every job's status when the multirun ends:
    Hydra's basic launcher goes on after a failed job but reports only the first failure."""

    def on_job_end(self, config: DictConfig, job_return: JobReturn, **kwargs: Any) -> None:
        if config.hydra.mode != RunMode.MULTIRUN:
            return
        try:
            job_return.return_value  # noqa: B018 (raises the job's exception, if it failed)
        except Exception as error:
            job = f"job {config.hydra.job.num} ({config.hydra.job.override_dirname or 'defaults'})"
            print(f"[{job}: failed: {type(error).__name__}: {error}]", file=sys.stderr, flush=True)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        """From the records, so that it holds whichever launcher ran the jobs."""
        runs = sorted(Path(config.hydra.sweep.dir).glob(f"*/{RECORD_NAME}"))
        lines = [f"{p.parent.name}: {(read_record(p.parent) or {}).get('status')}" for p in runs]
        print(f"{len(lines)} jobs:", *lines, sep="\n  ", flush=True)


def run(cfg: DictConfig) -> float:
    """Train in Hydra's output dir; return the final test error (mean over replicas).
    A run whose record says ``ok`` is not trained again (``resume=false`` to force it); a job
    that raises still leaves a record with ``status: failed`` and the error."""
    runtime = HydraConfig.get().runtime
    run_dir = Path(runtime.output_dir)
    done = read_record(run_dir) if cfg.resume else None
    if done and done.get("status") == "ok":
        errors = done["metrics"]["test_error"]
        error = sum(errors) / len(errors) if isinstance(errors, list) else errors
        print(
            f"[skip] {run_dir} is finished (status ok, test error {error:.4g}); "
            "resume=false trains it again",
            flush=True,
        )
        return error
    # Our groups' picks (not Hydra's own groups "hydra/..." nor the schemas "schema/...").
    choices = {k: v for k, v in runtime.choices.items() if v and "/" not in k and "@" not in k}
    multirun = HydraConfig.get().mode == RunMode.MULTIRUN
    try:
        result = train(cfg, run_dir, choices)
    except Exception as error:
        if isinstance(error, ConfigError) and not multirun:
            print(error, file=sys.stderr)
            sys.exit(2)
        if isinstance(error, OSError):  # disk full, folder gone or unwritable: say so
            print(f"cannot write the outputs of this run in {run_dir}: {error}", file=sys.stderr)
            if not multirun:
                sys.exit(1)
        else:  # in a sweep, one bad job must not stop the others: record it and go on
            mark_failed(run_dir, OmegaConf.to_container(cfg, resolve=True), error)
        raise
    if result.status == "interrupted":
        print(
            f"interrupted at step {result.steps_done}: checkpoint and record are in "
            f"{result.run_dir}; run the same command again to resume",
            file=sys.stderr,
        )
        sys.exit(128 + (result.interrupted_by or 0))
    print(summary_line(cfg, result), flush=True)
    return result.test_error


def main() -> None:
    """The ``randfeat-train`` console script: same arguments as ``python train.py``."""
    if not (CONFIG_DIR / "train.yaml").is_file():
        sys.exit(f"randfeat-train: no configs at {CONFIG_DIR}; install with 'pip install -e .'")
    precheck(sys.argv[1:])
    hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="train")(run)()
