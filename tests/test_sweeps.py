"""The jobs of a command line: exactly those Hydra's sweeper launches, each checked before
anything is created; a sweeper that picks its own jobs (Optuna) works and is checked too."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import yaml

from randfeat_torch.cli import precheck
from randfeat_torch.config import ConfigError
from randfeat_torch.sweeps import check_jobs, search_jobs, sweep_jobs
from tests.conftest import ROOT, SMALL


def test_a_preset_sweep_is_its_params_with_the_command_line_winning_key_by_key():
    jobs = sweep_jobs(["experiment=lazy_scale_small"])
    assert sorted(o for job in jobs for o in job if o.startswith("model.lazy_scale=")) == [
        "model.lazy_scale=0.3",
        "model.lazy_scale=3",
        "model.lazy_scale=30",
    ]
    assert all("width=256" in job and "experiment=lazy_scale_small" in job for job in jobs)
    narrowed = sweep_jobs(["experiment=lazy_scale_small", "model.lazy_scale=1,2"])
    assert [[o for o in job if o.startswith("model.lazy_scale=")] for job in narrowed] == [
        ["model.lazy_scale=1"],
        ["model.lazy_scale=2"],
    ]


def test_a_glob_over_options_and_a_range_expand_as_hydra_expands_them():
    jobs = sweep_jobs(["model=glob(*)", "seed=range(0,3)", "hydra.sweep.dir=x"])
    assert len(jobs) == 12 and all(not o.startswith("hydra.") for job in jobs for o in job)
    assert {o for job in jobs for o in job if o.startswith("model=")} == {
        "model=frozen",
        "model=kernel",
        "model=linearized",
        "model=trainable",
    }


def test_every_job_is_checked_not_only_the_first_hundreds(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    jobs = sweep_jobs(["d=8,0", "width=range(1,301)"])
    assert len(jobs) == 600 and jobs[300][0] == "d=0"  # the first bad job is the 301st
    with pytest.raises(SystemExit) as done:
        precheck(["-m", *SMALL, "d=8,0", "width=range(1,301)"])
    assert done.value.code == 2
    assert capsys.readouterr().err.strip() == "invalid config: d=0 (must be an integer >= 1)"
    assert list(tmp_path.iterdir()) == []  # nothing created


def test_a_bad_value_that_only_a_preset_sweep_brings_is_refused():
    # lazy_scale_small sweeps model.lazy_scale; the linearized model refuses any lazy scale.
    with pytest.raises(ConfigError, match=r"model.lazy_scale=0.3 \(needs model=trainable"):
        check_jobs(
            [[*job, "model=linearized"] for job in sweep_jobs(["experiment=lazy_scale_small"])]
        )


def test_a_job_whose_override_interpolates_into_a_typed_key_is_refused_before_the_sweep():
    check_jobs([["d=4"], ["d=4", "width=${d}"]])  # an interpolation that types: fine
    with pytest.raises(ConfigError, match=r"^invalid config: loss=\$\{d\} \(.*expected one of"):
        check_jobs([["d=4"], ["d=4", "loss=${d}"]])


def test_machine_checks_wait_for_the_job_of_a_sweep(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    precheck(["-m", *SMALL, "device=cuda", "d=4,8"])  # a GPU node may run these: no refusal
    with pytest.raises(SystemExit) as done:  # a single run runs here, and is refused here
        precheck([*SMALL, "device=cuda"])
    assert done.value.code == 2


def test_a_search_space_is_checked_at_its_ends():
    jobs = search_jobs(["optimizer.lr=interval(0.01,0.5)", "width=choice(8,16)", "d=4"])
    assert jobs == [
        ["optimizer.lr=0.01", "width=8", "d=4"],
        ["optimizer.lr=0.5", "width=8", "d=4"],
        ["optimizer.lr=0.01", "width=16", "d=4"],
    ]
    with pytest.raises(ConfigError, match=r"optimizer.lr=-1.0 \(must be a finite number > 0\)"):
        check_jobs(search_jobs([*SMALL, "optimizer.lr=interval(-1,0.5)"]))


@pytest.mark.slow
def test_an_optuna_search_runs_its_trials_and_minimises_the_test_error(tmp_path):
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")
    sweep = tmp_path / "search"
    done = subprocess.run(
        [
            sys.executable,
            str(ROOT / "train.py"),
            "-m",
            *SMALL,
            "d=4",
            "width=16",
            "hydra/sweeper=optuna",
            "hydra.sweeper.n_trials=3",
            "hydra.sweeper.sampler.seed=1",
            "optimizer.lr=interval(0.01,0.5)",
            f"hydra.sweep.dir={sweep}",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    assert done.returncode == 0, done.stderr[-2000:]
    records = [json.loads(p.read_text()) for p in sweep.glob("*/metrics.json")]
    assert len(records) == 3 and all(r["status"] == "ok" for r in records)
    rates = [r["config"]["optimizer"]["lr"] for r in records]
    assert len(set(rates)) == 3 and all(0.01 <= lr <= 0.5 for lr in rates)
    best = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    assert best["best_value"] == pytest.approx(min(r["metrics"]["test_error"] for r in records))
    bad = subprocess.run(
        [
            sys.executable,
            str(ROOT / "train.py"),
            "-m",
            "hydra/sweeper=optuna",
            "optimizer.lr=interval(-1,0.5)",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    assert bad.returncode == 2
    assert bad.stderr.strip() == "invalid config: optimizer.lr=-1.0 (must be a finite number > 0)"
