"""The sweep aggregator on a synthetic sweep: table, problems, plots, TensorBoard images."""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd
import pytest
from omegaconf import OmegaConf
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from randfeat_torch.analysis import (
    aggregate,
    expected_jobs,
    movement_table,
    threshold_table,
    width_to_reach,
)
from randfeat_torch.record import atomic_write_json
from scripts.aggregate import main as aggregate_main


def write_run(root: Path, name: str, status: str = "ok", **fields) -> Path:
    """A job folder as Hydra leaves it, with a record unless status is None."""
    job = root / name
    (job / ".hydra").mkdir(parents=True)
    if status is None:
        return job
    model, d, width = fields.get("model", "frozen"), fields.get("d", 4), fields.get("width", 8)
    errors = fields.get("errors", [0.5, 0.3])
    record = {
        "status": status,
        "config": {
            "d": d,
            "width": width,
            "seed": 0,
            "replicas": 2,
            "model": {"name": model, "d": d, "width": width},
            "target": {"name": "relu_neuron"},
        },
        "choices": {"model": model, "target": "relu_neuron", "optimizer": "sgd"},
        "metrics": None
        if errors is None
        else {
            "test_error": errors,
            "test_mse": errors,
            "train_loss": errors,
            "train_error": errors,
        },
        "theory": {"best_degree_1": 0.2665, "best_degree_2": 0.0331},
        "wall_time_s": 1.0,
    }
    if status == "failed":
        record["error"] = "RuntimeError: boom"
    atomic_write_json(job / "metrics.json", record)
    return job


@pytest.fixture
def sweep(tmp_path: Path) -> Path:
    """2 models x 2 d x 2 widths, 2 replicas each, plus one run of every kind of trouble."""
    root = tmp_path / "sweep"
    n = 0
    for model in ("frozen", "trainable"):
        for d in (4, 8):
            for width in (16, 64):
                scale = (1.0 if model == "frozen" else 0.1) * d / width
                write_run(root, f"{n}", model=model, d=d, width=width, errors=[scale, 2 * scale])
                n += 1
    write_run(root, "8_failed", status="failed", errors=None)
    write_run(root, "9_diverged", status="diverged", errors=[None, None])
    write_run(root, "10_missing", status=None)
    bad = write_run(root, "11_unreadable", status=None)
    (bad / "metrics.json").write_text("{ not json")
    OmegaConf.save(
        {
            "hydra": {
                "overrides": {"task": ["model=frozen,trainable", "d=4,8"]},
                "sweeper": {"params": {"width": "16,64,256,1024"}},
            }
        },
        root / "multirun.yaml",
    )
    return root


def test_aggregate_builds_the_table_and_lists_every_problem(sweep):
    result = aggregate(sweep)
    table = pd.read_csv(sweep / "results.csv")
    ok = table[table["status"] == "ok"]
    assert len(ok) == 16 and set(ok["replica"]) == {0, 1}
    assert sorted(result.swept) == ["d", "model", "width"]
    row = ok[
        (ok["model"] == "trainable") & (ok["d"] == 8) & (ok["width"] == 16) & (ok["replica"] == 1)
    ]
    assert row["test_error"].item() == pytest.approx(2 * 0.1 * 8 / 16)
    assert row["theory.best_degree_1"].item() == pytest.approx(0.2665)
    assert set(table["status"]) == {"ok", "failed", "diverged"}
    assert math.isnan(table[table["status"] == "diverged"]["test_error"].iloc[0])

    problems = {p.run: p.status for p in result.problems.itertuples()}
    assert problems["8_failed"] == "failed" and problems["9_diverged"] == "diverged"
    assert problems["10_missing"] == "missing" and problems["11_unreadable"] == "unreadable"
    assert "4 of 16 jobs never started" in result.summary
    assert "RuntimeError: boom" in (sweep / "summary.txt").read_text()


def test_aggregate_writes_every_plot_and_logs_them_to_tensorboard(sweep):
    result = aggregate(sweep, eps=0.2)
    assert set(result.figures) == {"error_vs_width", "error_vs_d", "width_needed"}
    for path in result.figures.values():
        assert path.exists() and path.stat().st_size > 10_000
    events = EventAccumulator(str(sweep / "aggregate"))
    events.Reload()
    assert set(events.Tags()["images"]) == {
        "aggregate/error_vs_width",
        "aggregate/error_vs_d",
        "aggregate/width_needed",
    }


def test_width_needed_interpolates_in_log_log():
    widths = [10.0, 100.0, 1000.0]
    assert width_to_reach(
        pd.Series(widths).to_numpy(), pd.Series([1.0, 0.1, 0.01]).to_numpy(), 0.1
    ) == pytest.approx(100)
    assert width_to_reach(
        pd.Series(widths).to_numpy(), pd.Series([1.0, 0.1, 0.01]).to_numpy(), 0.0316
    ) == pytest.approx(316.2, rel=1e-3)
    assert math.isnan(
        width_to_reach(pd.Series(widths).to_numpy(), pd.Series([1.0, 0.5, 0.4]).to_numpy(), 0.1)
    )


def test_expected_jobs_counts_task_overrides_and_sweeper_params(sweep):
    assert expected_jobs(sweep) == 2 * 2 * 4
    assert expected_jobs(sweep / "0") is None


def test_the_script_refuses_a_folder_that_is_not_there(tmp_path, capsys):
    assert aggregate_main([str(tmp_path / "nowhere")]) == 2
    assert "no sweep folder" in capsys.readouterr().err
    assert aggregate_main([str(tmp_path)]) == 1  # a folder with no runs: says so, exit 1
    assert "runs with a record: 0" in capsys.readouterr().out


def test_threshold_precision_is_the_coarsest_grid_point_that_reaches_the_goal():
    rows = pd.DataFrame(
        {
            "target": "parity",
            "rounding": "nearest",
            "d": [8] * 4 + [12] * 4,
            "seed": 0,
            "optimizer.grad_precision": [0.0, 1e-3, 1e-2, 1e-1] * 2,
            # d=8: 1e-2 reaches 0.1 but 1e-1 does not; d=12: only the exact net gets there
            "test_error": [0.01, 0.05, 0.09, 0.6, 0.02, 0.2, 0.4, 0.9],
            "steps_to_error.0.1": [300.0, 400.0, 900.0, None, 700.0, None, None, None],
        }
    )
    table = threshold_table(rows).set_index("d")
    assert table.loc[8, "threshold_precision"] == 1e-2
    assert table.loc[12, "threshold_precision"] == 0.0
    assert table.loc[8, "exact_steps"] == 300 and table.loc[12, "exact_steps"] == 700
    assert (table["coarsest"] == 1e-1).all()
    rows.loc[rows["d"] == 12, "test_error"] = 0.5  # not even exact: NaN, never 0
    assert math.isnan(threshold_table(rows).set_index("d").loc[12, "threshold_precision"])


def test_the_movement_power_law_is_fitted_over_every_seed():
    widths = [64, 256, 1024, 4096]
    rows = pd.DataFrame(
        {
            "target": "t",
            "series": "trainable ntk",
            "model": "trainable",
            "width": widths * 2,
            "w_movement": [3 * w**-0.5 for w in widths] + [5 * w**-0.5 for w in widths],
        }
    )
    slope = movement_table(rows).iloc[0]
    assert slope["slope"] == pytest.approx(-0.5, abs=1e-12)
    assert slope["slope_low"] < -0.5 < slope["slope_high"]  # the seeds' offsets widen it
    assert slope["points"] == 8
