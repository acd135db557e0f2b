"""Hydra entry point: compose the config, train, print one summary line, map errors to exit codes.

``train.py`` at the top level and the ``randfeat-train`` console script both call :func:`run`.
A bad config value exits with status 2 and one sentence on stderr, before any work is done.

torch, and our modules that import it, are imported where a run needs them rather than here:
a command line that :func:`precheck` refuses is then refused in about 0.5 s rather than 3
(``import torch`` alone takes 1-2 s).
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import re
import shutil
import subprocess
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

import hydra
from hydra import compose
from hydra._internal.utils import get_args_parser
from hydra.core.hydra_config import HydraConfig
from hydra.core.utils import JobReturn, JobStatus
from hydra.errors import CompactHydraException
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from randfeat_torch.config import ConfigError, OutputError, UserError
from randfeat_torch.paths import CONFIG_DIR, SWEEP_DIR_VARIABLE, register_resolvers
from randfeat_torch.sweeps import (
    BASIC_SWEEPER,
    check_composed,
    check_jobs,
    compose_job,
    hydra_configs,
    one_sentence,
    rerun_hint,
    search_jobs,
    sweep_jobs,
    sweeper_of,
)

if TYPE_CHECKING:
    from randfeat_torch.trainer import RunResult


def load_config(overrides: list[str]) -> DictConfig:
    """Compose train.yaml with ``overrides`` through Hydra's compose API and validate it: a
    config that can run, or a :class:`ConfigError` whose one sentence names the key, the
    value and what is allowed (Hydra's and OmegaConf's own errors translated)."""
    cfg = compose_job(overrides)
    with one_sentence(overrides):
        check_composed(cfg, overrides)
    return cfg


def group_choices(choices: Mapping[str, Any]) -> dict[str, str]:
    """Our config groups' picks among Hydra's runtime choices (not Hydra's own groups
    ``hydra/...`` nor the schemas ``schema/...``), for the record."""
    return {k: v for k, v in choices.items() if v and "/" not in k and "@" not in k}


def command_line(argv: list[str]) -> argparse.Namespace:
    """``argv`` read by Hydra's own parser of its command line; what it refuses raises
    :class:`UserError` with argparse's sentence (not its usage text) and what to write."""
    parser = get_args_parser()

    def refuse(message: str) -> NoReturn:
        flag = re.match(r"argument (-[\w-]+)", message)
        if message.startswith("unrecognized arguments"):
            message += " (the flags, such as -m, go before or after all the overrides)"
        elif flag and "expected one argument" in message:
            message += f" (write {flag[1]} VALUE)"
        elif flag and "ignored explicit argument" in message:
            message += f" (the flag takes no value: write {flag[1]} alone)"
        raise UserError(f"invalid command line: {message}")

    parser.error = refuse  # type: ignore[method-assign]
    return parser.parse_args(argv)


# Hydra runs one of these commands, and refuses two with a traceback.
COMMANDS = {
    "run": "--run",
    "multirun": "--multirun",
    "cfg": "--cfg",
    "info": "--info",
    "shell_completion": "--shell-completion",
}


def check_flags(args: argparse.Namespace, app_dir: Path) -> None:
    """Refuse Hydra's flags that Hydra itself would refuse with a traceback or a few lines:
    two commands, ``--resolve`` alone, a config name other than ``train``, a config folder or a
    rerun file that is not there."""
    given = [flag for dest, flag in COMMANDS.items() if getattr(args, dest) not in (None, False)]
    if len(given) > 1:
        raise UserError(
            f"invalid command line: {' '.join(given)} (only one of "
            f"{', '.join(COMMANDS.values())} at a time)"
        )
    if args.resolve and args.cfg is None:
        raise UserError("invalid command line: --resolve (only with --cfg, as --cfg job --resolve)")
    name = args.config_name
    if name is not None and not args.config_path and name.removesuffix(".yaml") != "train":
        raise ConfigError("--config-name", name, "allowed: train")
    if args.config_path and not args.config_path.startswith("pkg://"):
        folder = app_dir / args.config_path  # as Hydra reads it: relative to train.py's folder
        config = f"{(name or 'train').removesuffix('.yaml')}.yaml"
        if not (folder / config).is_file():
            where = (
                f"no such folder: {folder}"
                if not folder.is_dir()
                else f"{folder} holds no {config}"
            )
            raise ConfigError("--config-path", args.config_path, where)
    if args.config_dir and not Path(args.config_dir).is_dir():
        raise ConfigError("--config-dir", args.config_dir, "no such folder")
    if args.experimental_rerun:
        check_rerun(Path(args.experimental_rerun))


def check_rerun(path: Path) -> None:
    """``--experimental-rerun FILE``: the config a run pickled (Hydra's ``PickleJobInfoCallback``
    writes ``.hydra/config.pickle``), which Hydra then runs again, ignoring the overrides."""
    allowed = "allowed: the .hydra/config.pickle of a run made with Hydra's PickleJobInfoCallback"
    if not path.is_file():
        raise ConfigError("--experimental-rerun", str(path), f"no such file; {allowed}")
    try:
        with path.open("rb") as saved:
            config = pickle.load(saved)  # as Hydra loads it next
    except Exception as error:
        why = f"{type(error).__name__}: {error}".splitlines()[0]
        raise ConfigError(
            "--experimental-rerun", str(path), f"not a pickle ({why}); {allowed}"
        ) from None
    if not isinstance(config, DictConfig) or "hydra" not in config:
        raise ConfigError("--experimental-rerun", str(path), f"not a run's config; {allowed}")


def check_package(overrides: list[str], shown: str, package: str) -> None:
    """``--cfg job --package KEY``: Hydra prints the node at KEY, and exits 1 without one."""
    if package == "_global_":
        return
    with one_sentence(overrides), hydra_configs():
        cfg = compose("train", overrides, return_hydra_config=True)
        keys = {"job": [k for k in cfg if k != "hydra"], "hydra": ["hydra"]}.get(shown, list(cfg))
        found = package.split(".")[0] in keys and OmegaConf.select(cfg, package) is not None
    if not found:
        allowed = f"allowed: {', '.join(keys)} or a key inside one, or _global_ for all"
        raise ConfigError("--package", package, f"no such key in --cfg {shown}; {allowed}")


def last_override(overrides: list[str], key: str) -> tuple[str, str] | None:
    """The key as typed (``+`` included) and the value of the last override of ``key``, the
    one Hydra applies; None without one."""
    for override in reversed(overrides):
        typed, _, value = override.partition("=")
        if typed.lstrip("+") == key:
            return typed, value
    return None


def run_mode(overrides: list[str], multirun: bool) -> bool:
    """Whether Hydra runs a multirun: ``hydra.mode=MULTIRUN`` or ``RUN`` decides over -m."""
    mode = (last_override(overrides, "hydra.mode") or ("", ""))[1].upper()
    return mode == "MULTIRUN" if mode in ("RUN", "MULTIRUN") else multirun


def precheck(argv: list[str], app_dir: Path = CONFIG_DIR.parent) -> None:
    """Check a command line before Hydra creates anything. A multirun: every job its sweeper
    will launch (:func:`randfeat_torch.sweeps.sweep_jobs`; for a sweeper that picks its own
    jobs, each value of its search space), values only, as the machine that runs a job checks
    the machine in the job. A single run: its values, and this machine, which runs it. A bad
    flag, value, type, key, option or override (Hydra's own included): one sentence on stderr
    and exit status 2. ``--cfg`` and ``--info`` have their overrides composed, not checked;
    ``--config-path`` and ``--config-dir`` bring configs that only Hydra composes (their folders
    are checked; ``app_dir``: where a relative ``--config-path`` starts, train.py's folder)."""
    try:
        args = command_line(argv)
        if args.help or args.hydra_help or args.shell_completion:
            return
        check_flags(args, app_dir)
        if args.experimental_rerun or args.config_path or args.config_dir:
            return
        overrides, multirun = args.overrides, run_mode(args.overrides, args.multirun)
        if args.cfg and args.package:
            check_package(overrides, args.cfg, args.package)
        elif args.cfg or args.info:
            sweeper_of(overrides)  # composes the config it shows
        elif not multirun:
            cfg = load_config(overrides)  # its values first: a bad one is refused without torch
            from randfeat_torch.device import check_machine

            check_machine(cfg)
        elif sweeper_of(overrides) == BASIC_SWEEPER:
            jobs = sweep_jobs(overrides)
            check_subdir(overrides, len(jobs))
            check_jobs(jobs)
        else:
            check_jobs(search_jobs(overrides))
    except UserError as error:
        print(error, file=sys.stderr)
        sys.exit(2)


def check_subdir(overrides: list[str], jobs: int) -> None:
    """A ``hydra.sweep.subdir`` the same for every job puts them all in one folder, where each
    job finds the record of the one before and skips: refused for a sweep of several jobs."""
    subdir = last_override(overrides, "hydra.sweep.subdir")
    if subdir and jobs > 1 and "${" not in subdir[1]:
        raise ConfigError(
            *subdir,
            f"the {jobs} jobs of this sweep would share one folder, where each finds the record "
            "of the one before and skips; allowed: a name that differs by job, as "
            "${hydra.job.num} or ${hydra.job.override_dirname}",
        )


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
        f"record and TensorBoard logs in {result.run_dir}" + float32_refit_note(cfg, result.run_dir)
    )


def float32_refit_note(cfg: DictConfig, run_dir: Path) -> str:
    """For a ridge fit with ``optimizer.gram_products=float32`` that was refitted in float64
    (its record says so), a sentence that says it; else nothing."""
    record = run_dir / "metrics.json"
    float32 = cfg.optimizer.name == "ridge" and cfg.optimizer.gram_products == "float32"
    if not float32 or not record.exists():
        return ""
    check = json.loads(record.read_text()).get("ridge", {}).get("float32_products")
    if not check or not check["refit_in_float64"]:
        return ""
    estimates = ", ".join("none" if e is None else f"{e:.2g}" for e in check["estimated_error"])
    return (
        f"; the float32 products' estimated error of beta ({estimates}) was above "
        f"{check['tolerance']:g}, so the fit was done again in float64"
    )


class CheckRunDir(Callback):
    """Refuses a single run's output dir that cannot be written, before Hydra creates it, or
    that another process runs in, before Hydra rewrites its ``.hydra/`` (``hydra.callbacks``;
    the values were checked by :func:`precheck`)."""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        from randfeat_torch.record import check_unlocked

        refuse_in_callback(check_output_dir, config, "hydra.run.dir")
        refuse_in_callback(check_unlocked, Path(config.hydra.run.dir))  # before .hydra/ is saved


class FixSweepDir(Callback):
    """Fixes the sweep folder, derived from the sweep's overrides, for all of its jobs, and
    refuses one that cannot be written, or a Slurm launcher without a cluster, before Hydra
    creates it."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        os.environ.pop(SWEEP_DIR_VARIABLE, None)
        os.environ[SWEEP_DIR_VARIABLE] = str(config.hydra.sweep.dir)
        refuse_in_callback(check_slurm, config)
        refuse_in_callback(check_output_dir, config, "hydra.sweep.dir")


def refuse_in_callback(check: Callable[..., None], *args: Any) -> None:
    """Run a check where Hydra calls our callbacks: its refusal is one sentence and exit 2."""
    try:
        check(*args)
    except UserError as error:
        print(error, file=sys.stderr)
        sys.exit(2)


def check_output_dir(config: DictConfig, key: str) -> None:
    """The folder at ``key`` (``hydra.run.dir``, ``hydra.sweep.dir``) can be written, and is not
    empty (which would write the run's files among the working directory's). One that the
    command line set is refused naming the key; a derived one, naming the folder."""
    folder = str(OmegaConf.select(config, key))
    hydra_overrides = OmegaConf.select(config, "hydra.overrides.hydra", default=None) or []
    typed = any(o.lstrip("+").startswith(f"{key}=") for o in hydra_overrides)
    if not folder.strip():
        raise ConfigError(
            key,
            folder,
            "an empty folder puts the run's files among the working directory's; allowed: a "
            f"folder, as {key}=outputs/mine, or {key}=. to mean this one",
        )
    try:
        check_writable(Path(folder))
    except OutputError as error:
        if not typed:
            raise
        why = f"the folder {error.reason}" + (f": {error.cause}" if error.cause else "")
        raise ConfigError(key, folder, f"{why}; allowed: a folder that can be written") from None


def check_slurm(config: DictConfig) -> None:
    """A Slurm launcher needs a cluster that answers here (``sinfo``), else it fails in
    submitit's first ``sbatch``, after the sweep folder was made, with a traceback."""
    launcher = str(OmegaConf.select(config, "hydra.launcher._target_", default=""))
    if "SlurmLauncher" not in launcher:
        return
    choice = OmegaConf.select(config, "hydra.runtime.choices", default={}).get("hydra/launcher")
    try:
        answer = subprocess.run(
            ["sinfo", "--noheader", "--format=%P"], capture_output=True, text=True, timeout=60
        )
        lines = (answer.stderr or answer.stdout).strip().splitlines() or ["sinfo failed"]
        why = None if answer.returncode == 0 else re.sub(r"^sinfo: \w+: ", "", lines[-1])
    except FileNotFoundError:
        why = None if shutil.which("sbatch") else "sbatch is not on this machine's PATH"
    except subprocess.TimeoutExpired:
        why = "sinfo had no answer in 60 s"
    if why:
        raise ConfigError(
            "hydra/launcher",
            choice or launcher,
            f"no Slurm cluster answers here: {why}; allowed: another hydra/launcher, or this "
            "command where sinfo answers, on a login node or with the SLURM_CONF that "
            "scripts/slurm_local.sh start prints",
        )


def check_writable(run_dir: Path) -> None:
    """Refuse an output dir that cannot be created or written, before any work (creating it
    is what Hydra does next anyway), and then remove the folders made on the way."""
    missing = [p for p in (run_dir, *run_dir.parents) if not os.path.exists(p)]
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        ok = os.access(run_dir, os.W_OK | os.X_OK)
        reason, cause = "is not writable", ""
    except OSError as error:
        ok, reason, cause = False, "cannot be created", error.strerror or str(error)
    if not ok:
        for folder in missing:  # leave nothing behind: the folders made here, deepest first
            if os.path.isdir(folder):
                folder.rmdir()
        raise OutputError(run_dir, reason, cause)


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
            import torch

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


# Launchers whose sweeper ends by raising the first failed job's exception (Hydra's basic and
# joblib launchers); the Slurm launcher prints its own summary of the jobs that did not finish.
RAISING_LAUNCHERS = (
    "hydra._internal.core_plugins.basic_launcher.BasicLauncher",
    "hydra_plugins.hydra_joblib_launcher.joblib_launcher.JoblibLauncher",
)


def sweep_records(sweep_dir: str | Path) -> dict[str, dict]:
    """The records of a sweep's jobs by folder name, in order ({} for one unreadable)."""
    from randfeat_torch.record import RECORD_NAME, read_record

    runs = sorted(Path(sweep_dir).glob(f"*/{RECORD_NAME}"))
    return {p.parent.name: read_record(p.parent) or {} for p in runs}


class JobsFailed(CompactHydraException):
    """What a sweep ends with when some of its jobs failed: Hydra's sweeper raises the first
    failed job's exception once every job has run, and prints only the message of a compact
    exception, without a traceback. The message is read from the sweep's records when it is
    printed, so that it names every job that did not finish and why."""

    def __init__(self, sweep_dir: str, first: str = "") -> None:
        super().__init__(sweep_dir, first)  # the arguments: it pickles back from a worker
        self.sweep_dir, self.first = sweep_dir, first

    def __str__(self) -> str:
        records = sweep_records(self.sweep_dir)
        unfinished = {name: r for name, r in records.items() if r.get("status") != "ok"}
        if not unfinished:  # a job that refused to run over a finished record
            return f"every job's record says ok, but jobs failed; the first: {self.first}"
        lines = [f"{len(unfinished)} of {len(records)} jobs did not finish:"]
        lines += [
            f"  {name}: {r.get('status')} ({r.get('error')})" for name, r in unfinished.items()
        ]
        return "\n".join(lines + rerun_hint())


class ReportJobs(Callback):
    """Prints every failed job as it ends, and every job's status when the multirun ends:
    Hydra's basic launcher goes on after a failed job but reports only the first failure,
    with its traceback; here the sweep ends with :class:`JobsFailed` instead."""

    def on_job_end(self, config: DictConfig, job_return: JobReturn, **kwargs: Any) -> None:
        if config.hydra.mode != RunMode.MULTIRUN or job_return.status != JobStatus.FAILED:
            return
        error = job_return._return_value  # (return_value would print Hydra's own line first)
        job = f"job {config.hydra.job.num} ({config.hydra.job.override_dirname or 'defaults'})"
        failure = f"{type(error).__name__}: {error}"
        print(f"[{job}: failed: {failure}]", file=sys.stderr, flush=True)
        if config.hydra.launcher.get("_target_") in RAISING_LAUNCHERS:
            job_return.return_value = JobsFailed(str(config.hydra.sweep.dir), failure)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        """From the records, so that it holds whichever launcher ran the jobs."""
        records = sweep_records(config.hydra.sweep.dir)
        lines = [f"{name}: {record.get('status')}" for name, record in records.items()]
        print(f"{len(lines)} jobs:", *lines, sep="\n  ", flush=True)


def run(cfg: DictConfig) -> float:
    """Train in Hydra's output dir; return the final test error (mean over replicas).
    A run whose record says ``ok`` is not trained again (``resume=false`` to force it), unless
    that record was written for another config: then the run refuses (:class:`StaleRecord`)
    and leaves it; a job that raises still leaves a record with ``status: failed`` and the
    error."""
    from randfeat_torch.record import StaleRecord, config_difference, finished_error, read_record
    from randfeat_torch.trainer import Interrupted, train

    runtime = HydraConfig.get().runtime
    run_dir = Path(runtime.output_dir)
    multirun = HydraConfig.get().mode == RunMode.MULTIRUN
    done = read_record(run_dir) if cfg.resume else None
    error = finished_error(done)
    if done and done.get("status") == "ok" and error is None:
        print(f"[rerun] {run_dir}: its record says ok but holds no test error", flush=True)
    if error is not None:
        now = OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)
        difference = config_difference(done.get("config") or {}, now)
        if difference is None:
            print(
                f"[skip] {run_dir} is finished (status ok, test error {error:.4g}); "
                "resume=false trains it again",
                flush=True,
            )
            return error
        stale = StaleRecord(run_dir, difference)
        if multirun:
            raise stale  # the sweep goes on and lists it (see ReportJobs)
        print(stale, file=sys.stderr)
        sys.exit(2)
    choices = group_choices(runtime.choices)
    try:
        result = train(cfg, run_dir, choices)  # a failure leaves a record saying so
    except Interrupted as stop:  # during set-up or a closed-form fit: nothing to resume from
        print(
            f"{stop} before any checkpoint (the record in {run_dir}, if there is one, says "
            "interrupted); run the same command again to start it over",
            file=sys.stderr,
        )
        sys.exit(128 + stop.signum)
    except Exception as error:
        if isinstance(error, UserError) and not multirun:
            print(error, file=sys.stderr)
            sys.exit(2)
        if isinstance(error, OSError):  # disk full, folder gone or unwritable: say so
            print(f"cannot write the outputs of this run in {run_dir}: {error}", file=sys.stderr)
            if not multirun:
                sys.exit(1)
        raise  # in a sweep, one bad job must not stop the others (see ReportJobs)
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
    register_resolvers()
    precheck(sys.argv[1:], Path(__file__).parent)  # a relative --config-path starts here
    hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="train")(run)()
