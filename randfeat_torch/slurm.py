"""Sweeps on Slurm (``hydra/launcher=slurm``): what Hydra's submitit launcher leaves out. The
launcher is ``hydra_plugins/randfeat_slurm.py`` (Hydra takes launchers only from that package);
it calls the two halves here.

In the job (:func:`requeue_on_stop`): SIGTERM, which a preempting cluster and ``scontrol requeue``
send, and USR2, which Slurm sends ``signal_delay_s`` before the time limit, both stop the run at
the step in flight with a checkpoint (:func:`randfeat_torch.cli.run` exits with 128 + the signal);
then submitit's own USR2 handler requeues the job, and the requeued job resumes from the
checkpoint. Submitit counts a stop as a time-out when the job ran past 80 % of its time (or
within 10 minutes of it), and gives up after ``max_num_timeout`` time-outs; preemptions do not
count.

On the submitting host (:func:`launch`): the jobs run this process's Python on the code this
process imports, however the project was installed, and every job is waited for. Jobs that did
not finish (cancelled, timed out too often, failed) end the sweep with one summary, what went
wrong and the command that resumes them, and exit status 1, instead of submitit's traceback of
the first one.
"""

from __future__ import annotations

import logging
import shlex
import signal
import subprocess
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import submitit
from hydra.core.singleton import Singleton
from hydra.core.utils import JobReturn, JobStatus
from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf
from omegaconf import OmegaConf
from submitit.core.utils import FailedJobError, UncompletedJobError

import randfeat_torch
from randfeat_torch.record import read_record
from randfeat_torch.sweeps import rerun_hint

log = logging.getLogger(__name__)

# The folder that holds the randfeat_torch this process runs: first on the jobs' PYTHONPATH.
SOURCE = Path(randfeat_torch.__file__).resolve().parent.parent


def job_setup(setup: Sequence[str] | None) -> list[str]:
    """The job script's set-up lines: :data:`SOURCE` first on PYTHONPATH, so that the job
    imports the code (and this launcher) that submitted it, then the preset's own lines."""
    path = shlex.quote(str(SOURCE))
    return [f"export PYTHONPATH={path}${{PYTHONPATH:+:$PYTHONPATH}}", *(setup or [])]


def preemption_signal() -> signal.Signals:
    """The signal submitit requeues on (USR2 unless SUBMITIT_PREEMPT_SIGNAL says otherwise)."""
    return signal.Signals[f"SIG{submitit.JobEnvironment.USR_SIG}"]


def job_state() -> str:
    """This job's state as Slurm has it: RUNNING while it runs, COMPLETING once Slurm ends it
    (a cancel, a requeue), "" where squeue does not answer."""
    job = submitit.JobEnvironment().job_id
    try:
        done = subprocess.run(
            ["squeue", "-h", "-j", job, "-o", "%T"], capture_output=True, text=True, timeout=30
        )
    except (OSError, subprocess.SubprocessError):
        return ""
    return done.stdout.strip()


@contextmanager
def requeue_on_stop() -> Iterator[None]:
    """Around a submitit job's work: SIGTERM and the preemption signal stop a run in progress
    with a checkpoint, as SIGTERM does anywhere (the run's own handler; the preemption signal is
    passed to it), and at once outside a run; then submitit requeues the job, unless Slurm is
    ending it already (``scancel``: the job ends cancelled, its checkpoint kept)."""
    usr = preemption_signal()
    submitit_requeue = signal.getsignal(usr)  # dumps this call again, `scontrol requeue`, exits

    def requeue(signum: int) -> None:
        for s in (signal.SIGTERM, usr):  # requeueing the job sends it SIGTERM
            signal.signal(s, signal.SIG_IGN)
        name, state = signal.Signals(signum).name, job_state()
        if state not in ("RUNNING", ""):  # `scancel`, or Slurm's own requeue: let it end
            log.warning(f"{name} while Slurm ends this job ({state}): not requeued here")
            sys.exit(128 + signum)
        try:
            submitit_requeue(signum, None)  # exits, or raises UncompletedJobError: no more tries
        except subprocess.CalledProcessError:  # refused: Slurm is ending the job itself
            log.warning(f"{name}: scontrol requeue refused (Slurm is ending this job itself)")
            sys.exit(128 + signum)

    def forward(signum: int, frame: object) -> None:
        handler = signal.getsignal(signal.SIGTERM)  # a run's, or `requeue` outside a run
        if callable(handler):
            handler(signum, frame)

    signal.signal(signal.SIGTERM, lambda signum, frame: requeue(signum))
    signal.signal(usr, forward)
    try:
        yield
    except SystemExit as stop:
        if stop.code in (128 + signal.SIGTERM, 128 + usr):  # cli.run: checkpointed on it
            requeue(stop.code - 128)
        raise
    # The job's work is done: a stop signal now (a time limit near) must neither requeue it nor
    # kill it while submitit writes its result.
    for s in (signal.SIGTERM, usr):
        signal.signal(s, signal.SIG_IGN)


def launch(launcher: Any, job_overrides: Sequence[Sequence[str]], first: int) -> list[JobReturn]:
    """Submit the jobs as one Slurm array, as Hydra's submitit launcher does (the same
    parameters), with :func:`job_setup`; wait for all of them; return their results, or print
    :func:`summary` and exit with status 1 if some did not finish."""
    params = dict(launcher.params)
    params["setup"] = job_setup(params.get("setup"))
    executor = submitit.AutoExecutor(
        folder=params.pop("submitit_folder"),
        cluster="slurm",
        slurm_max_num_timeout=params.pop("max_num_timeout"),
    )
    shared = set(OmegaConf.structured(BaseQueueConf).keys())
    executor.update_parameters(**{k if k in shared else f"slurm_{k}": v for k, v in params.items()})
    sweep_dir = Path(str(launcher.config.hydra.sweep.dir))
    sweep_dir.mkdir(parents=True, exist_ok=True)
    log.info(f"Submitit 'slurm' sweep output dir : {sweep_dir}")
    nums = range(first, first + len(job_overrides))
    for num, overrides in zip(nums, job_overrides, strict=True):
        log.info(f"\t#{num} : {' '.join(overrides)}")
    state = Singleton.get_state()
    jobs = executor.map_array(
        launcher,
        [list(o) for o in job_overrides],
        ["hydra.sweep.dir"] * len(nums),
        list(nums),
        [f"job_id_for_{n}" for n in nums],
        [state] * len(nums),
    )
    results, unfinished = [], []
    for num, overrides, job in zip(nums, job_overrides, jobs, strict=True):
        try:
            result = job.results()[0]
        except Exception as error:
            unfinished.append((num, overrides, job, why_unfinished(job, error)))
            continue
        if result.status == JobStatus.FAILED:
            error = result._return_value
            unfinished.append((num, overrides, job, f"{type(error).__name__}: {error}"))
        results.append(result)
    if unfinished:
        print(summary(launcher, len(jobs), unfinished), file=sys.stderr, flush=True)
        sys.exit(1)
    return results


def why_unfinished(job: submitit.SlurmJob, error: Exception) -> str:
    """One line: the exception the job ended with, or the Slurm state it ended in without a
    result (cancelled, killed at its time limit, out of memory, a node that failed)."""
    if not isinstance(error, (FailedJobError, UncompletedJobError)):  # unpickling its result
        return f"it raised, but its exception cannot be read here ({type(error).__name__})"
    if isinstance(error, FailedJobError):  # the job's traceback, between two dashed lines
        trace = str(error).split("-" * 22)[1]
        last = [line for line in trace.splitlines() if line.strip()][-1]  # "module.Error: why"
        name, _, message = last.partition(": ")
        return f"{name.rpartition('.')[2]}: {message}" if message else last
    return f"ended without a result (Slurm state {job.state})"


def summary(launcher: Any, total: int, unfinished: list[tuple]) -> str:
    """Which jobs did not finish, why, where their run and log are, and the command that
    finishes them (the same command: finished jobs are skipped, interrupted ones resume)."""
    lines = [f"{len(unfinished)} of {total} jobs did not finish:"]
    for num, overrides, job, why in unfinished:
        config = launcher.hydra_context.config_loader.load_sweep_config(
            launcher.config, list(overrides)
        )
        run_dir = Path(config.hydra.sweep.dir) / str(config.hydra.sweep.subdir)
        record = read_record(run_dir)
        state = "no record"
        if record:
            step = record.get("steps_done")
            state = f"its record says {record.get('status')}" + (
                f" at step {step}" if step is not None else ""
            )
            if record.get("error"):
                state += f" ({record['error']})"
        lines += [
            f"  #{num} {' '.join(overrides) or '(defaults)'} (Slurm job {job.job_id}): {why}",
            f"      {state} in {run_dir}; log: {job.paths.stderr}",
        ]
    return "\n".join(lines + rerun_hint())
