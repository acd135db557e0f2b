"""The experiment presets: every job of every sweep composes and validates; the small variants
of rf_staircase and gd_vs_rf reproduce their claims end to end. The parallel launcher preset
gives each worker its share of the cores."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
from omegaconf import OmegaConf
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams import plugin_data_pb2

from randfeat_torch.cli import ThreadsPerWorker
from randfeat_torch.paths import CONFIG_DIR
from randfeat_torch.sweeps import check_jobs, sweep_jobs
from tests.conftest import ROOT

PRESETS = sorted(p.stem for p in (CONFIG_DIR / "experiment").glob("*.yaml"))
FULL = [p for p in PRESETS if not p.endswith("_small")]


def preset_jobs(preset: str) -> list[list[str]]:
    """The override lists of every job of ``python train.py -m experiment=<preset>``."""
    return sweep_jobs([f"experiment={preset}"])


def test_every_preset_has_a_small_variant_and_a_sweep():
    assert set(FULL) == {
        "rf_staircase",
        "gd_vs_rf",
        "poly_threshold",
        "rf_hardness",
        "parity",
        "rf_vs_nt_vs_nn",
        "rf_wall",
        "lazy_vs_active",
        "lazy_scale",
        "bsgd_precision",
    }
    # a preset built on another replaces the axes it fixes (Hydra merges sweeper.params by key)
    for preset, width in (("lazy_scale", "width=1024"), ("lazy_scale_small", "width=256")):
        assert {o for job in preset_jobs(preset) for o in job if o.startswith("width=")} == {width}
    for preset in FULL:
        assert f"{preset}_small" in PRESETS
        assert len(preset_jobs(preset)) >= len(preset_jobs(f"{preset}_small")) >= 2


@pytest.mark.parametrize("preset", PRESETS)
def test_every_job_of_every_preset_composes_and_validates(preset):
    jobs = preset_jobs(preset)
    assert jobs and all(f"experiment={preset}" in job for job in jobs)
    check_jobs([[*job, "device=cpu"] for job in jobs])


def run_preset(preset: str, tmp_path: Path, plots: list[str]) -> pd.DataFrame:
    sweep = tmp_path / preset
    done = subprocess.run(
        [
            sys.executable,
            str(ROOT / "train.py"),
            "-m",
            f"experiment={preset}",
            f"hydra.sweep.dir={sweep}",
            "aggregate=true",
        ],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=tmp_path,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "runs with a record" in done.stdout  # the aggregate callback ran at the end
    for name in ["results.csv", "summary.txt", *(f"{p}.png" for p in plots)]:
        assert (sweep / name).exists(), name
    return pd.read_csv(sweep / "results.csv")


@pytest.mark.slow
def test_rf_wall_small_measures_the_wall(tmp_path):
    table = run_preset(
        "rf_wall_small",
        tmp_path,
        ["width_needed", "width_path", "net_vs_rf", "error_vs_weight_norm"],
    )
    assert (table["status"] == "ok").all()
    sweep = tmp_path / "rf_wall_small"
    needed = pd.read_csv(sweep / "width_needed.csv")
    # Every (target, d, threshold) has its row, reached or not: 2 targets x 3 d x 3 thresholds.
    assert len(needed) == 18 and needed["status"].notna().all()
    growth = pd.read_csv(sweep / "width_growth.csv").set_index(["label", "threshold", "law"])
    rate = {
        target: growth.loc[(f"rf_wall / {target}", 0.3, "exponential"), "slope"]
        for target in ("relu_neuron_hard", "relu_neuron")
    }
    # The kink moving out with d: the width needed grows faster than for the unit neuron.
    assert rate["relu_neuron_hard"] > 2 * rate["relu_neuron"] > 0
    # The trained net (width 256, best rate) stays far below random features at N_max = 2048.
    net = table[table["fit"] == "nn_wall"]
    best = (
        net.groupby(["target", "d", "optimizer.lr"])["test_error"]
        .mean()
        .groupby(level=[0, 1])
        .min()
    )
    # Random features not at 0.1 by N_max (error above 0.1 at every width), the net below half.
    hard = needed[(needed["label"] == "rf_wall / relu_neuron_hard") & (needed["d"] == 12)]
    assert hard.set_index("threshold").loc[0.1, "reached"] == 0
    assert best.loc[("relu_neuron_hard", 12)] < 0.05
    seeds: dict[tuple, list[int]] = {}
    for path in sweep.glob("*/metrics.json"):
        record = json.loads(path.read_text())
        point = (record["choices"]["fit"], record["choices"]["target"], record["config"]["d"])
        seeds.setdefault(point, []).extend(record["replica_seeds"])
    for point, found in seeds.items():  # the seed sweep trained disjoint networks
        assert len(found) == len(set(found)) == (9 if point[0] == "nn_wall" else 3), point


@pytest.mark.slow
def test_lazy_vs_active_small_the_ntk_net_moves_less_as_it_widens(tmp_path):
    plots = ["movement_vs_width", "distances_vs_width", "lazy_errors"]
    table = run_preset("lazy_vs_active_small", tmp_path, plots)
    assert (table["status"] == "ok").all() and len(table) == 3 * 2 * 2 * 2
    mean = table.groupby(["model", "model.parameterization", "width"]).mean(numeric_only=True)
    ntk, mean_field = mean.loc[("trainable", "ntk")], mean.loc[("trainable", "mean_field")]
    # NTK scaling: movement ~ width^(-1/2), a quarter from 64 to 1024; half is the bar.
    assert ntk.loc[1024, "w_movement"] < 0.5 * ntk.loc[64, "w_movement"]
    assert ntk.loc[1024, "kernel_distance"] < 0.1 * ntk.loc[64, "kernel_distance"]
    # Mean field keeps moving at every width: feature learning.
    assert mean_field.loc[1024, "w_movement"] > 3 * ntk.loc[1024, "w_movement"]
    assert (table.loc[table["model"] == "frozen", "w_movement"] == 0).all()
    linearized = table[table["model"] == "linearized"]
    assert (linearized["linearization_distance"] < 1e-8).all()
    assert (linearized["kernel_distance"] == 0).all()


@pytest.mark.slow
def test_lazy_scale_small_the_movement_tends_to_one_over_alpha(tmp_path):
    table = run_preset("lazy_scale_small", tmp_path, ["lazy_scale"])
    assert (table["status"] == "ok").all() and len(table) == 3 * 2  # three scales, 2 replicas
    powers = pd.read_csv(tmp_path / "lazy_scale_small" / "lazy_scale.csv")
    moved = powers[powers["measure"] == "w_movement"].set_index("alpha")
    assert moved["alpha_next"].tolist() == [3, 30] and (moved["networks"] == 2).all()
    # The lazy limit: the first layer moves like 1/alpha as alpha grows, and not before.
    low, high = moved.loc[0.3, "k"], moved.loc[3, "k"]
    assert -1 < low < 0 and abs(high + 1) < abs(low + 1)
    assert (
        "laziness measure ~ alpha^k" in (tmp_path / "lazy_scale_small" / "summary.txt").read_text()
    )


@pytest.mark.slow
def test_bsgd_precision_small_exact_gradients_beat_the_coarsest(tmp_path):
    plots = ["error_vs_precision", "threshold_precision", "steps_to_error"]
    table = run_preset("bsgd_precision_small", tmp_path, plots)
    assert (table["status"] == "ok").all()
    nets = table[table["fit"] == "nn_bsgd_nearest"]
    assert len(nets) == 2 * 7  # two d, seven precisions
    assert (nets["replica_seed"] == 0).all()  # seed 0: the precisions on its one init
    error = nets.groupby(["target", "d", "optimizer.grad_precision"])["test_error"].mean()
    for d in (6, 10):
        exact, coarsest = error[("parity_k2", d, 0.0)], error[("parity_k2", d, 1.0)]
        assert exact < 0.1 < 0.5 < coarsest, d  # rounding to 1 stops learning altogether
    thresholds = pd.read_csv(tmp_path / "bsgd_precision_small" / "precision.csv")
    assert len(thresholds) == 2 and (thresholds["threshold_precision"] < 1).all()
    # the ridge references are there for every d
    assert len(table[table["optimizer"] == "ridge"].groupby(["fit", "d"])) == 4


@pytest.mark.slow
def test_rf_staircase_small_reproduces_the_staircase(tmp_path):
    table = run_preset("rf_staircase_small", tmp_path, ["error_vs_width", "width_needed"])
    assert (table["status"] == "ok").all() and len(table) == 2 * 3 * 2
    mean = table.groupby(["d", "vars.ratio"])["test_error"].mean()
    best_linear = table["theory.best_degree_1"].iloc[0]
    best_quadratic = table["theory.best_degree_2"].iloc[0]
    for d in (10, 16):
        assert mean[d, 0.25] > mean[d, 1.0] > mean[d, 4.0]  # the staircase goes down with width
        assert mean[d, 0.25] < best_linear * 1.2  # at width << d^2: about the best linear
        assert mean[d, 4.0] < best_quadratic * 1.2  # at width >> d^2: the best quadratic or below
    # Every replica's measured error is its exact population error, up to sampling.
    gap = (table["test_error"] - table["theory.rf_population_error"]).abs()
    assert (gap < 0.01 + 0.1 * table["theory.rf_population_error"]).all(), gap.max()


@pytest.mark.slow
def test_gd_vs_rf_small_gradient_descent_wins_as_d_grows(tmp_path):
    table = run_preset("gd_vs_rf_small", tmp_path, ["error_vs_d"])
    assert (table["status"] == "ok").all()
    mean = table.groupby(["fit", "d"])["test_error"].mean()
    assert mean["nn_sgd", 4] < 0.05 and mean["nn_sgd", 16] < 0.05
    assert mean["rf_ridge", 16] > 2 * mean["rf_ridge", 4]  # RF of fixed width falls behind
    assert mean["rf_ridge", 16] > 2 * mean["nn_sgd", 16]

    # TensorBoard's hparams plugin sees every run with its knobs and final error.
    sweep = tmp_path / "gd_vs_rf_small"
    for run in table["run"].unique():
        events = EventAccumulator(str(sweep / run))
        events.Reload()
        content = events.PluginTagToContent("hparams")["_hparams_/session_start_info"]
        hparams = plugin_data_pb2.HParamsPluginData.FromString(content).session_start_info.hparams
        assert {"d", "width", "model", "target"} <= set(hparams)
        record = json.loads((sweep / run / "metrics.json").read_text())
        assert hparams["d"].number_value == record["config"]["d"]
        assert "hparams/test_error" in events.Tags()["scalars"]


JOBLIB = "hydra_plugins.hydra_joblib_launcher.joblib_launcher.JoblibLauncher"
BASIC = "hydra._internal.core_plugins.basic_launcher.BasicLauncher"


@pytest.mark.parametrize(
    ("target", "n_jobs", "threads", "expected"),
    [
        (JOBLIB, 2, None, 4),  # local_parallel on 8 cores: 8 // 2 threads each
        (JOBLIB, 3, None, 2),
        (JOBLIB, -1, None, 1),  # joblib's -1: a worker per core
        (JOBLIB, 2, 3, None),  # threads set: the trainer sets them (None: not set here)
        (BASIC, None, None, None),  # one job at a time
    ],
)
def test_parallel_workers_share_the_cores(monkeypatch, target, n_jobs, threads, expected):
    monkeypatch.setattr(os, "cpu_count", lambda: 8)  # not this machine's count: no coincidences
    asked = []  # what the callback sets, recorded instead of done (the suite's threads stay)
    monkeypatch.setattr(torch, "set_num_threads", asked.append)
    config = OmegaConf.create(
        {"threads": threads, "hydra": {"launcher": {"_target_": target, "n_jobs": n_jobs}}}
    )
    ThreadsPerWorker().on_job_start(config)
    assert asked == ([] if expected is None else [expected])
