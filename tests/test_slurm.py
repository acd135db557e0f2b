"""Sweeps on a real Slurm scheduler: ``scripts/slurm_local.sh`` starts a one-node cluster on this
machine for the session (installing slurm-wlm where it is missing) and stops it afterwards.

Through ``hydra/launcher=slurm`` a sweep writes the records of the basic launcher, its jobs
running the checkout's code; a job preempted (``scontrol requeue``, USR2, SIGTERM) or past its
time limit is requeued and ends bit-identical to an uninterrupted run; a job that cannot finish
ends the sweep with one summary and exit status 1, and the same command finishes it;
``device=cuda`` is checked on the node that runs the job, not at submission."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from tests.conftest import ROOT, SMALL

pytestmark = pytest.mark.slow

SCRIPT = ROOT / "scripts" / "slurm_local.sh"
SLURM = [
    "hydra/launcher=slurm",
    "hydra.launcher.partition=local",  # the local cluster's one partition
    "hydra.launcher.cpus_per_task=1",
    "hydra.launcher.mem_gb=1",
]
LONG = [*SMALL, "threads=1", "steps=3000", "eval_every=100"]  # seconds: time to interrupt it


@pytest.fixture(scope="session")
def slurm() -> Iterator[dict[str, str]]:
    """The environment of a running local cluster (its SLURM_CONF): started for the session,
    and stopped after it, unless it was up already. Skipped where Slurm cannot be installed."""
    was_up = subprocess.run(["bash", SCRIPT, "status"], capture_output=True).returncode == 0
    start = subprocess.run(["bash", SCRIPT, "start"], capture_output=True, text=True, timeout=900)
    if start.returncode == 3:
        pytest.skip(f"no local Slurm cluster: {start.stderr.strip().splitlines()[-1]}")
    assert start.returncode == 0, start.stderr[-3000:]
    conf = re.search(r"^export SLURM_CONF=(.+)$", start.stdout, re.M)[1]
    yield {**os.environ, "SLURM_CONF": conf, "PYTHONUNBUFFERED": "1"}
    if not was_up:
        stop = subprocess.run(["bash", SCRIPT, "stop"], capture_output=True, text=True)
        assert stop.returncode == 0, stop.stderr


def sweep_command(sweep: Path, *overrides: str) -> list[str]:
    return [sys.executable, str(ROOT / "train.py"), "-m", *overrides, f"hydra.sweep.dir={sweep}"]


def run_sweep(sweep: Path, *overrides: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    command = sweep_command(sweep, *overrides)
    return subprocess.run(
        command, cwd=sweep.parent, env=env, capture_output=True, text=True, timeout=300
    )


def records(sweep: Path) -> dict[str, dict]:
    """Each job's record, by its folder's name."""
    return {p.parent.name: json.loads(p.read_text()) for p in sweep.glob("*/metrics.json")}


def slurm_job(run_dir: Path) -> str:
    """The Slurm job id of the job that ran in ``run_dir`` (Hydra's job id under submitit)."""
    return str(OmegaConf.load(run_dir / ".hydra" / "hydra.yaml").hydra.job.id)


def job_log(sweep: Path, job: str) -> str:
    """What the job wrote, over all its runs (submitit's logs, appended to)."""
    return "".join(p.read_text() for p in sorted((sweep / ".submitit" / job).glob("*_log.*")))


def slurm_command(env: dict[str, str], *command: str) -> str:
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=60).stdout


def start_requeued_jobs(env: dict[str, str], held: dict[str, float]) -> None:
    """Slurm holds a requeued job for two minutes before it may start again (``BeginTime``, on
    any cluster); the tests start them after two seconds, with a time limit of 10 minutes: under
    a limit of one minute, Slurm's USR2 (``signal_delay_s`` = 120 s before it) would reach every
    rerun at its first check of time limits, and interrupt it again. Not at once: the node
    refuses a job's credential issued in the second its earlier run's was revoked (the rerun
    then fails, "Job credential revoked"), which is what the hold is for. ``held``: since when
    each held job was seen held, kept between calls."""
    listed = slurm_command(env, "squeue", "-h", "-t", "PD", "-o", "%i %r")
    waiting = {job for job, reason in map(str.split, listed.splitlines()) if reason == "BeginTime"}
    for job in set(held) - waiting:  # released, or ran again: a later hold starts anew
        del held[job]
    for job in waiting:
        if time.time() - held.setdefault(job, time.time()) >= 2:
            slurm_command(
                env, "scontrol", "update", f"JobId={job}", "StartTime=now", "TimeLimit=10"
            )


def running_jobs(sweep: Path) -> dict[int, Path]:
    """The run folders, by seed, of the jobs whose first run is past its first evaluation. A
    rerun is left out: on a slow machine the time limit may interrupt a first run before that,
    and a rerun stopped by the test would wait out its own limit of 10 minutes."""
    found = {}
    for name, record in records(sweep).items():
        first = record["resumed_from_step"] is None
        if record["status"] == "running" and record["steps_done"] >= 100 and first:
            found[record["config"]["seed"]] = sweep / name
    return found


def test_a_slurm_sweep_writes_the_records_of_the_basic_launcher_with_the_checkouts_code(
    slurm, tmp_path
):
    # A stale randfeat_torch on PYTHONPATH, as another install would be: the jobs, started by
    # submitit's `python -m submitit.core._submit`, must import the checkout's code instead.
    stale = tmp_path / "stale" / "randfeat_torch"
    stale.mkdir(parents=True)
    (stale / "__init__.py").write_text("raise ImportError('a stale randfeat_torch')\n")
    env = {**slurm, "PYTHONPATH": str(stale.parent)}
    overrides = [*SMALL, "threads=1", "d=4,6"]
    on_slurm = run_sweep(tmp_path / "slurm", *overrides, *SLURM, env=env)
    assert on_slurm.returncode == 0, on_slurm.stderr[-3000:]
    basic = run_sweep(tmp_path / "basic", *overrides, env=env)
    assert basic.returncode == 0, basic.stderr[-3000:]

    jobs, expected = records(tmp_path / "slurm"), records(tmp_path / "basic")
    assert len(jobs) == 2 and jobs.keys() == expected.keys()
    for name, record in jobs.items():
        assert record["status"] == "ok"
        assert record["config"] == expected[name]["config"]
        assert record["metrics"] == expected[name]["metrics"]
        job = slurm_job(tmp_path / "slurm" / name)
        assert slurm_command(slurm, "sacct", "-n", "-X", "-P", "-o", "State", "-j", job) == (
            "COMPLETED\n"
        )


@dataclass
class Interrupted:
    """A job of the interrupted sweeps: its record, its log, its Slurm history and the record
    of the same job run uninterrupted."""

    driver: subprocess.CompletedProcess
    record: dict
    log: str
    history: str  # sacct's states of each of its runs
    reference: dict


# How each job is interrupted after its first checkpoint, by seed, and what its log then says.
CASES = {
    # Slurm sends SIGTERM and requeues the job itself.
    "scontrol requeue": (0, ["scontrol", "requeue"], "SIGTERM while Slurm ends this job"),
    # submitit's preemption signal, and a preempting cluster's: the job requeues itself.
    "scancel --signal=USR2": (1, ["scancel", "--signal=USR2"], "SIGUSR2 on "),
    "scancel --signal=TERM": (2, ["scancel", "--signal=TERM"], "SIGTERM on "),
    # hydra.launcher.timeout_min=1: Slurm sends USR2 signal_delay_s (30 s) before the time
    # limit at its next check of time limits (every 30 s). Until then the job is stopped, not
    # finished; Slurm's SIGCONT before its signal wakes it. Submitit counts a time-out.
    "time limit": (3, ["scancel", "--signal=STOP"], "SIGUSR2 on "),
}


@pytest.fixture(scope="module")
def interrupted(slurm, tmp_path_factory) -> dict[str, Interrupted]:
    """Two sweeps on Slurm, one with a time limit of a minute, whose jobs are interrupted as
    :data:`CASES` says, and the same jobs through the basic launcher."""
    root = tmp_path_factory.mktemp("interrupted")
    preempted, timed_out, reference = root / "preempted", root / "timed_out", root / "reference"
    commands = {
        preempted: sweep_command(preempted, *LONG, *SLURM, "seed=0,1,2"),
        timed_out: sweep_command(
            timed_out,
            *LONG,
            *SLURM,
            "seed=3",
            "hydra.launcher.timeout_min=1",
            # USR2 30 s before the limit of 60: at a check of time limits 30 to 60 s after the
            # start, once the job's handlers are in place (with the preset's 120 s, at the first
            # check, which may come while the job still starts and has none)
            "hydra.launcher.signal_delay_s=30",
        ),
        reference: sweep_command(reference, *LONG, "seed=0,1,2,3"),
    }
    drivers = {
        sweep: subprocess.Popen(
            command, cwd=root, env=slurm, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for sweep, command in commands.items()
    }
    sweep_of = {seed: timed_out if seed == 3 else preempted for seed, _, _ in CASES.values()}
    action = {seed: command for seed, command, _ in CASES.values()}
    done: dict[int, str] = {}  # the Slurm job of each seed interrupted
    held: dict[str, float] = {}  # the requeued jobs Slurm holds, since when
    deadline = time.time() + 300
    while any(d.poll() is None for d in drivers.values()) and time.time() < deadline:
        for sweep in (preempted, timed_out):
            for seed, run_dir in running_jobs(sweep).items():
                if seed not in done:
                    done[seed] = slurm_job(run_dir)
                    slurm_command(slurm, *action[seed], done[seed])
        start_requeued_jobs(slurm, held)
        time.sleep(0.2)
    outputs = {}
    for sweep, driver in drivers.items():
        if driver.poll() is None:
            driver.kill()
        stdout, stderr = driver.communicate()
        outputs[sweep] = subprocess.CompletedProcess(driver.args, driver.returncode, stdout, stderr)
    found = {}
    for case, (seed, _, _) in CASES.items():
        sweep = sweep_of[seed]
        folders = {r["config"]["seed"]: sweep / n for n, r in records(sweep).items()}
        job = done.get(seed) or (slurm_job(folders[seed]) if seed in folders else "none")
        by_seed = {r["config"]["seed"]: r for r in records(sweep).values()}
        found[case] = Interrupted(
            driver=outputs[sweep],
            record=by_seed.get(seed, {}),
            log=job_log(sweep, job),
            history=slurm_command(slurm, "sacct", "-D", "-n", "-X", "-P", "-o", "State", "-j", job),
            reference={r["config"]["seed"]: r for r in records(reference).values()}[seed],
        )
    assert outputs[reference].returncode == 0, outputs[reference].stderr[-3000:]
    return found


@pytest.mark.parametrize("case", list(CASES))
def test_an_interrupted_job_is_requeued_and_ends_bit_identical_to_an_uninterrupted_one(
    interrupted, case
):
    job, said = interrupted[case], CASES[case][2]
    seen = f"{job.driver.stderr[-2000:]}\nSlurm states: {job.history!r}\nlog: {job.log[-2000:]}"
    assert job.driver.returncode == 0, seen
    assert job.record["status"] == "ok"
    # The run checkpointed on the signal, at the step in flight, and the requeued job resumed
    # from that checkpoint.
    assert said in job.log, job.log[-3000:]
    stopped = [int(s) for s in re.findall(r"interrupted at step (\d+)", job.log)]
    assert stopped and job.record["resumed_from_step"] == stopped[-1]
    assert job.history.splitlines()[0] == "REQUEUED" and job.history.endswith("COMPLETED\n")
    if "on " in said:  # submitit requeued it
        timed_out = "this job is timed-out" in job.log  # counted against max_num_timeout
        assert timed_out == (case == "time limit")
    assert job.record["metrics"] == job.reference["metrics"]
    assert job.record["steps_to_error"] == job.reference["steps_to_error"]


def test_a_job_that_cannot_finish_ends_the_sweep_with_one_summary_and_the_command_finishes_it(
    slurm, tmp_path
):
    sweep = tmp_path / "sweep"
    command = sweep_command(sweep, *LONG, *SLURM, "seed=0,1")
    driver = subprocess.Popen(
        command, cwd=tmp_path, env=slurm, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    deadline, cancelled = time.time() + 120, None
    while cancelled is None and time.time() < deadline and driver.poll() is None:
        if 1 in (running := running_jobs(sweep)):
            cancelled = running[1]
            slurm_command(slurm, "scancel", slurm_job(cancelled))  # a cancel is not requeued
        time.sleep(0.1)
    _, stderr = driver.communicate(timeout=180)
    assert cancelled is not None, stderr[-3000:]
    assert driver.returncode == 1
    assert "Traceback" not in stderr, stderr[-3000:]
    summary = stderr[stderr.index("1 of 2 jobs did not finish:") :]
    assert "seed=1" in summary and "Slurm state CANCELLED" in summary
    assert "its record says interrupted at step" in summary
    assert shlex.join(command) in summary  # the command that finishes it
    finished = {r["config"]["seed"]: p for p, r in records(sweep).items()}[0]
    written = (sweep / finished / "metrics.json").stat().st_mtime_ns

    again = subprocess.run(
        command, cwd=tmp_path, env=slurm, capture_output=True, text=True, timeout=300
    )
    assert again.returncode == 0, again.stderr[-3000:]
    final = {r["config"]["seed"]: r for r in records(sweep).values()}
    assert final[0]["status"] == "ok" and final[1]["status"] == "ok"
    assert (sweep / finished / "metrics.json").stat().st_mtime_ns == written  # skipped
    assert final[1]["resumed_from_step"] > 0


def test_cuda_is_checked_on_the_node_that_runs_the_job_not_at_submission(slurm, tmp_path):
    """``device=cuda`` submitted from a host without a GPU reaches the scheduler; on a node
    without one the job refuses it with one sentence, in its record and in the summary."""
    if torch.cuda.is_available():
        pytest.skip("this node has a GPU: the job would run")
    sweep = tmp_path / "sweep"
    done = run_sweep(sweep, *SMALL, "threads=1", "device=cuda", "d=4", *SLURM, env=slurm)
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr[-3000:]
    refusal = "invalid config: device=cuda (CUDA is not available here; allowed: auto, cpu)"
    summary = done.stderr[done.stderr.index("1 of 1 jobs did not finish:") :]
    assert f"ConfigError: {refusal}" in summary  # the job ran on the node, and said why there
    (record,) = records(sweep).values()
    assert record["status"] == "failed" and record["error"] == f"ConfigError: {refusal}"
