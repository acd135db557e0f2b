"""Statistics of sweeps on samples whose answers are known: intervals, width to reach, growth laws;
and the aggregator's width-needed table, growth fits and duplicate networks on synthetic records."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from randfeat_torch.analysis import aggregate, growth_table, width_needed_table
from randfeat_torch.record import atomic_write_json
from randfeat_torch.stats import fit_growth, mean_interval, width_to_reach


def test_the_interval_of_a_known_sample():
    # mean 3, sd sqrt(2.5), n 5: half width t(0.975, 4) sd / sqrt 5, t(0.975, 4) = 2.776445105
    mean, low, high = mean_interval(np.array([1.0, 2.0, 3.0, 4.0, 5.0]))
    half = 2.776445105 * math.sqrt(2.5) / math.sqrt(5)
    assert (mean, low, high) == pytest.approx((3.0, 3.0 - half, 3.0 + half), rel=1e-9)
    assert math.isnan(mean_interval(np.array([2.0]))[1])
    assert mean_interval(np.array([2.0, math.nan, 4.0]))[0] == 3.0


def test_the_interval_covers_the_mean_at_its_level():
    # 2000 samples of 3 normal draws: the 95% t interval holds the true mean 95% of the time,
    # within the binomial sampling error (sd sqrt(0.95 * 0.05 / 2000) = 0.0049; 4 sd).
    rng = np.random.default_rng(0)
    covered = [
        low <= 1.0 <= high for _, low, high in map(mean_interval, rng.normal(1.0, 2.0, (2000, 3)))
    ]
    assert np.mean(covered) == pytest.approx(0.95, abs=4 * 0.0049)


def test_width_to_reach_is_exact_on_a_power_law():
    widths = np.unique(np.round(np.geomspace(1, 4096, 40)))
    errors = 0.9 * (widths / widths[0]) ** -0.5  # log error is linear in log width
    for eps in (0.5, 0.1, 0.03):
        assert width_to_reach(widths, errors, eps) == pytest.approx((0.9 / eps) ** 2, rel=1e-9)
    assert width_to_reach(widths, errors, 0.95) == 1.0  # reached at the first width
    assert math.isnan(width_to_reach(widths, errors, 0.001))  # not reached by 4096


def test_growth_fits_tell_exponential_from_polynomial():
    d = np.array([4.0, 6.0, 8.0, 10.0, 12.0])
    exponential = fit_growth(d, np.exp(1.0 + 0.7 * d), "exponential")
    polynomial = fit_growth(d, np.exp(1.0 + 0.7 * d), "polynomial")
    assert exponential.slope == pytest.approx(0.7) and exponential.rss < 1e-20
    # log y = 1 + 0.7 d is not linear in log d: the least-squares residual of that line, by
    # lstsq (float64, cond 13, residuals 0.3 against values 8: good to 1e-13 relative).
    design = np.stack([np.ones_like(d), np.log(d)], axis=1)
    rss = np.linalg.lstsq(design, 1.0 + 0.7 * d, rcond=None)[1][0]
    assert polynomial.rss == pytest.approx(rss, rel=1e-9)
    k = fit_growth(d, 3 * d**2.5, "polynomial")
    # Exact data: the interval shrinks to the slope itself, which float64 rounding of log y
    # (about 1e-16 relative) moves by 1e-14 at most through this small, well-posed fit.
    assert k.slope == pytest.approx(2.5, abs=1e-12)
    assert k.slope_low - 1e-12 <= 2.5 <= k.slope_high + 1e-12
    assert fit_growth(d[:2], np.exp(d[:2]), "exponential") is None  # two d fit any law


def test_the_slope_interval_holds_the_true_rate_at_its_level():
    rng = np.random.default_rng(1)
    d = np.repeat(np.arange(4.0, 21.0, 2.0), 3)
    covered = []
    for _ in range(400):
        width = np.exp(0.5 + 0.3 * d + rng.normal(0, 0.2, d.size))
        fit = fit_growth(d, width, "exponential")
        covered.append(fit.slope_low <= 0.3 <= fit.slope_high)
    assert np.mean(covered) == pytest.approx(0.95, abs=4 * math.sqrt(0.95 * 0.05 / 400))


def write_path_run(root: Path, name: str, d: int, seed: int, slope: float, n_max: int = 1024):
    """A record with a width path whose error is min(1, (w / w0)^-0.5), w0 = exp(slope * d)."""
    job = root / name
    (job / ".hydra").mkdir(parents=True)
    widths = [int(w) for w in np.unique(np.round(np.geomspace(1, n_max, 30)))]
    w0 = math.exp(slope * d) * (1 + 0.1 * seed)
    error = [min(1.0, (w / w0) ** -0.5) for w in widths]
    config = {"d": d, "width": n_max, "seed": seed, "replicas": 1, "target": {"name": "t"}}
    record = {
        "status": "ok",
        "config": config | {"vars": {"slope": slope}},
        "choices": {"target": f"slope{slope}", "fit": "rf_wall"},
        "metrics": {"test_error": error[-1], "train_error": error[-1]},
        "replica_seeds": [seed],
        "width_path": {
            "kind": "population",
            "widths": widths,
            "error": error,
            "solved": {"widths": [n_max], "error": [error[-1]], "width_times_u_max_abs": [1.0]},
        },
    }
    atomic_write_json(job / "metrics.json", record)


def test_the_width_needed_table_and_the_growth_laws_from_paths(tmp_path):
    root = tmp_path / "wall"
    n = 0
    for slope in (0.2, 0.5):
        for d in (4, 6, 8, 10, 12):
            for seed in range(3):
                write_path_run(root, f"{n}", d, seed, slope)
                n += 1
    result = aggregate(root)
    needed = result.needed.set_index(["label", "d", "threshold"])
    # error 0.5 at w = 4 w0; the seeds scale w0 by 1, 1.1, 1.2.
    row = needed.loc[("slope0.2", 4, 0.5)]
    assert row["median"] == pytest.approx(4 * math.exp(0.8) * 1.1, rel=1e-6)
    assert row["status"] == "reached" and row["ci95_low"] < row["geo_mean"] < row["ci95_high"]
    # At slope 0.5, error 0.1 needs 100 exp(0.5 d) > 1024 from d = 6 on: explicit, kept rows.
    missing = needed.loc[("slope0.5", 12, 0.1)]
    assert missing["width_per_seed"] == ">1024;>1024;>1024" and math.isnan(missing["median"])
    assert missing["status"] == "not reached by N_max=1024 in 3 seeds"
    assert len(result.needed) == 2 * 5 * 3
    growth = result.growth.set_index(["label", "threshold", "law"])
    fast = growth.loc[("slope0.5", 0.5, "exponential")]
    assert fast["slope"] == pytest.approx(0.5, abs=0.01) and fast["better"] == "exponential"
    assert growth.loc[("slope0.2", 0.5, "exponential")]["slope"] == pytest.approx(0.2, abs=0.01)
    assert (tmp_path / "wall" / "width_needed.csv").exists()
    assert {"width_needed", "width_path", "error_vs_weight_norm"} <= set(result.figures)
    assert "exponential fits better" in result.summary


def test_growth_fits_leave_out_d_not_reached_by_every_seed():
    per_seed = seed_widths_frame({4: [10, 11, 12], 6: [20, 22, 24], 8: [40, 44, 48], 10: [80, 88]})
    growth = growth_table(per_seed)
    assert set(growth["d_not_reached"]) == {1} and set(growth["d_max"]) == {8}
    table = width_needed_table(per_seed).set_index("d")
    assert table.loc[10, "width_per_seed"] == "80;88;>100"
    assert table.loc[10, "median"] == 88  # two of three seeds reached: the median did
    assert math.isnan(table.loc[10, "geo_mean"])
    # Where lambda |u|^2 is more than 5% of the threshold, the row says so.
    assert table.loc[4, "status"] == "reached; the penalty is 20% of the threshold"
    assert table.loc[6, "status"] == "reached"


def seed_widths_frame(widths_by_d: dict[int, list[float]]):
    """The per-seed table of seed_widths for widths given directly (NaN: not reached by 100)."""
    rows = []
    for d, widths in widths_by_d.items():
        for seed in range(3):
            width = widths[seed] if seed < len(widths) else math.nan
            rows.append(
                {"label": "m", "d": d, "threshold": 0.1, "replica_seed": seed}
                | {"width_needed": width, "n_max": 100, "penalty_share": 0.2 if d == 4 else 0.0}
            )
    return pd.DataFrame(rows)


def test_overlapping_seed_sweeps_are_flagged_and_counted_once(tmp_path):
    root = tmp_path / "sweep"
    # Each replica draws its own data: replica r's network and data both come from its seed.
    config = {"d": 4, "width": 8, "target": {"name": "t"}, "replica_data": "independent"}
    for name, seed, seeds, errors, extra in (
        ("a", 0, [0, 2**20], [0.1, 0.2], {}),
        ("b", 2**20, [2**20, 2**21], [0.2, 0.3], {}),  # replica 0 is a's replica 1
        ("c", 0, [0], [0.4], {"data_seed": 5}),  # a's network on other data: not a duplicate
    ):
        job = root / name
        (job / ".hydra").mkdir(parents=True)
        record = {
            "status": "ok",
            "config": config | {"seed": seed, "replicas": len(seeds)} | extra,
            "metrics": {"test_error": errors if len(errors) > 1 else errors[0]},
            "replica_seeds": seeds,
        }
        atomic_write_json(job / "metrics.json", record)
    result = aggregate(root)
    assert sorted(result.table["replica_seed"]) == [0, 0, 2**20, 2**21]
    duplicate = result.problems[result.problems["status"] == "duplicate"]
    assert (
        list(duplicate["run"]) == ["b"] and "network of a replica 1" in duplicate["error"].iloc[0]
    )
