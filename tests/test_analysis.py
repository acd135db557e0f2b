"""The sweep aggregator on a synthetic sweep: table, problems, plots, TensorBoard images."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from omegaconf import OmegaConf
from scipy import stats
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from randfeat_torch.analysis import (
    aggregate,
    expected_jobs,
    in_number_order,
    laziness_rows,
    movement_table,
    read_records,
    scale_table,
    summarise_precision,
    threshold_table,
    width_to_reach,
)
from randfeat_torch.record import atomic_write_json
from randfeat_torch.stats import mean_interval
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


def test_a_failed_record_that_names_no_group_is_listed_and_labelled_unknown(sweep):
    path = sweep / "8_failed" / "metrics.json"
    record = json.loads(path.read_text())
    del record["choices"], record["config"]["model"]  # as a failed record once was written
    atomic_write_json(path, record)
    result = aggregate(sweep)
    table = pd.read_csv(sweep / "results.csv")
    assert (table.loc[table["run"] == "8_failed", "label"] == "?").all()
    assert set(table.loc[table["status"] == "ok", "label"]) == {"frozen", "trainable"}
    assert "RuntimeError: boom" in result.summary


def test_a_record_written_before_a_key_was_added_reads_as_its_old_value(sweep):
    # the fixture's records have no replica_init, as records written before the key; one says it
    path = next(
        p for p in sorted(sweep.glob("*/metrics.json")) if '"status": "ok"' in p.read_text()
    )
    record = json.loads(path.read_text())
    assert "replica_init" not in record["config"]
    record["config"]["replica_init"] = "shared"
    atomic_write_json(path, record)
    table = read_records(sweep).table
    named = table["run"] == path.parent.name
    assert (table.loc[named, "replica_init"] == "shared").all()
    assert (table.loc[~named, "replica_init"] == "independent").all()


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
    missed = threshold_table(rows)
    assert math.isnan(missed.set_index("d").loc[12, "threshold_precision"])
    # its exact net crossed 0.1 at step 700 and ended above it: the summary counts it as a seed
    # that did not reach, not as one more seed behind the min and max
    twice = pd.concat([missed, missed.assign(seed=1, threshold_precision=1e-1)])
    summary = summarise_precision(twice)[1].splitlines()
    assert summary[0].split()[-2:] == ["seeds", "reached"]
    cells = {line.split()[-7]: line.split()[-6:] for line in summary[2:]}
    assert cells["8"] == ["0.01", "0.1", "0.01", "300", "2", "2"]
    assert cells["12"] == ["0.1", "0.1", "0.5", "700", "2", "1"]


def test_the_movement_power_is_fitted_to_the_mean_at_each_width():
    widths = [64, 256, 1024, 4096]
    offsets = [1.0, 1.3, 0.8, 1.1]  # the law's misfit at each width, shared by its seeds
    rows = pd.DataFrame(
        {
            "target": "t",
            "series": "trainable ntk",
            "model": "trainable",
            "width": widths * 3,
            "w_movement": [
                s * o * w**-0.5 for s in (3, 5, 4) for w, o in zip(widths, offsets, strict=True)
            ],
        }
    )
    slope = movement_table(rows).iloc[0]
    # by hand: the log geometric mean at width w is log(60) / 3 + log(offset) - log(w) / 2
    fit = stats.linregress(np.log(widths), np.log(offsets) - 0.5 * np.log(widths))
    half = stats.t.ppf(0.975, len(widths) - 2) * fit.stderr
    assert slope["slope"] == pytest.approx(fit.slope, rel=1e-12)
    assert slope["slope_high"] - slope["slope"] == pytest.approx(half, rel=1e-9)
    assert slope["slope"] - slope["slope_low"] == pytest.approx(half, rel=1e-9)
    assert slope["widths"] == 4 and slope["runs_per_width"] == 3
    # pooling the 12 runs as independent points (10 degrees of freedom) gives a narrower one
    pooled = stats.linregress(np.log(rows["width"]), np.log(rows["w_movement"]))
    assert stats.t.ppf(0.975, 10) * pooled.stderr < half
    assert movement_table(rows[rows["width"] <= 256]).empty  # two widths fit any power


def test_a_sweep_over_d_gets_a_movement_power_per_d():
    widths = [64, 256, 1024]
    rows = pd.DataFrame(
        {
            "target": "t",
            "model": "trainable",
            "d": [4] * 3 + [16] * 3,
            "width": widths * 2,
            "w_movement": [w**-0.5 for w in widths] + [10 * w**-0.25 for w in widths],
        }
    )
    slopes = movement_table(laziness_rows(rows)).set_index("series")["slope"]
    assert slopes.index.tolist() == ["trainable d=4", "trainable d=16"]  # d in number order
    assert slopes["trainable d=4"] == pytest.approx(-0.5, abs=1e-12)
    assert slopes["trainable d=16"] == pytest.approx(-0.25, abs=1e-12)


def test_the_lazy_scale_power_is_paired_over_networks_between_neighbouring_scales():
    alphas, own = [1.0, 10.0, 100.0], [-1.0, -0.9, -0.8]  # each network its own power
    rows = pd.DataFrame(
        [
            {
                "target": "t",
                "model": "trainable",
                "d": 4,
                "width": 64,
                "replica": 0,
                "replica_seed": r,
                "data_seed": None,  # the default: the run's seed
                "model.lazy_scale": alpha,
                "w_movement": 10.0**r * alpha**k,  # far apart in size: unpaired would blur k
                "linearization_distance": 0.0 if alpha == 100 else alpha**-2,
                "kernel_distance": math.nan if alpha == 1 else alpha**-2,  # not measured at 1
            }
            for r, k in enumerate(own)
            for alpha in alphas
        ]
    )
    table = scale_table(rows)
    moved = table[table["measure"] == "w_movement"]
    assert moved[["alpha", "alpha_next"]].values.tolist() == [[1, 10], [10, 100]]
    expected = mean_interval(np.array(own))
    for _, row in moved.iterrows():
        assert (row["k"], row["k_low"], row["k_high"]) == pytest.approx(expected, abs=1e-9)
        assert row["networks"] == 3
    # a zero distance has no power: only the neighbours 1 and 10 are fitted
    distance = table[table["measure"] == "linearization_distance"]
    assert distance["alpha"].tolist() == [1.0] and distance["k"].tolist() == pytest.approx([-2])
    kernel = table[table["measure"] == "kernel_distance"]
    assert kernel["alpha"].tolist() == [10.0] and kernel["k"].tolist() == pytest.approx([-2])
    assert scale_table(rows[rows["model.lazy_scale"] == 1.0]).empty  # one scale: no power
    # the rows in any order: the neighbours are the sorted scales; two scales: one power
    backwards = scale_table(rows.iloc[::-1]).query("measure == 'w_movement'")
    assert backwards[["alpha", "alpha_next"]].values.tolist() == [[1, 10], [10, 100]]
    two = scale_table(rows[rows["model.lazy_scale"] < 100]).query("measure == 'w_movement'")
    assert two[["alpha", "alpha_next"]].values.tolist() == [[1, 10]]
    # a network missing a measure at one scale is left out of that pair, and not counted
    gap = rows.copy()
    gap.loc[(gap["replica_seed"] == 0) & (gap["model.lazy_scale"] == 10), "w_movement"] = math.nan
    pairs = scale_table(gap).query("measure == 'w_movement'").set_index("alpha")
    assert pairs["networks"].tolist() == [2, 2]
    assert pairs["k"].tolist() == pytest.approx([-0.85, -0.85])
    # two data streams of one init are two networks, each with its own power
    streams = rows[rows["replica_seed"] < 2].assign(data_seed=rows["replica_seed"], replica_seed=5)
    moved = scale_table(streams).query("measure == 'w_movement'")
    assert moved["networks"].tolist() == [2, 2] and moved["k"].tolist() == pytest.approx(
        [-0.95] * 2
    )

    # Another parameterization of the same seeds is its own point, not the same networks; and
    # replicas of one init (replica_init=shared) are each their own network.
    other = rows.assign(**{"model.parameterization": "mean_field", "w_movement": 1.0})
    both = pd.concat([rows.assign(**{"model.parameterization": "ntk"}), other])
    both = both.assign(replica=both["replica_seed"], replica_seed=0)
    moved = scale_table(both).query("measure == 'w_movement'")
    by_scaling = moved.set_index(["model.parameterization", "alpha"])
    assert by_scaling.loc[("mean_field", 1.0), "k"] == pytest.approx(0, abs=1e-12)
    assert by_scaling.loc[("ntk", 1.0), "k"] == pytest.approx(-0.9)
    assert (moved["networks"] == 3).all()


def test_series_names_sort_by_their_numbers():
    names = ["trainable alpha=0.5", "trainable alpha=10", "trainable alpha=0.25", "frozen"]
    assert in_number_order(names) == [
        "frozen",
        "trainable alpha=0.25",
        "trainable alpha=0.5",
        "trainable alpha=10",
    ]
    assert in_number_order(["nn d=16", "nn d=4", "nn d=8", "nn"]) == [
        "nn",
        "nn d=4",
        "nn d=8",
        "nn d=16",
    ]
    assert in_number_order(["a alpha=1e-05", "a alpha=0.001"]) == ["a alpha=1e-05", "a alpha=0.001"]


def test_theory_lines_that_coincide_are_drawn_and_named_once():
    import matplotlib.pyplot as plt

    from randfeat_torch.analysis import _theory_lines

    def names(linear, quadratic):
        fig, ax = plt.subplots()
        frame = pd.DataFrame({"theory.best_degree_1": linear, "theory.best_degree_2": quadratic})
        _theory_lines(ax, frame)
        texts, lines = sorted(t.get_text() for t in ax.texts), len(ax.lines)
        plt.close(fig)
        return texts, lines

    assert names([1.0], [1.0]) == (["best linear = best quadratic 1"], 1)  # a parity
    assert names([0.2665], [0.0331]) == (["best linear 0.267", "best quadratic 0.0331"], 2)
