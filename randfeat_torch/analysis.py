"""Sweep analysis: run records -> one tidy table, a summary, plots, and TensorBoard images.

Reads only ``metrics.json`` records (whichever launcher wrote them); never trains and never
parses logs or folder names. A partial sweep is fine: failed, diverged, unfinished, unreadable
and missing runs are listed in the summary and left out of the plots.
"""

from __future__ import annotations

import itertools
import json
import math
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib
import matplotlib.ticker

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from omegaconf import OmegaConf

from randfeat_torch.config import GROUPS, PER_REPLICA_OPTIMIZER_KEYS
from randfeat_torch.record import METRICS, NOT_IN_FINGERPRINT, RECORD_NAME, with_added_keys
from randfeat_torch.stats import fit_growth, mean_interval, width_to_reach
from randfeat_torch.sweeps import expand
from randfeat_torch.targets import replica_seed

TABLE_NAME, SUMMARY_NAME, TENSORBOARD_DIR = "results.csv", "summary.txt", "aggregate"
WIDTH_NEEDED_NAME, GROWTH_NAME = "width_needed.csv", "width_growth.csv"
THRESHOLDS = (0.5, 0.3, 0.1)  # errors at which the width needed is read off the width paths
SEED_KEYS = ("seed", "data_seed")  # what a sweep over seeds changes; the rest names the network
THEORY_LINES = {"theory.best_degree_1": "best linear", "theory.best_degree_2": "best quadratic"}


@dataclass
class Records:
    """What the records of a sweep hold: ``table`` (one row per run and replica), ``problems``
    (one row per run that is not usable, and per duplicated network), and the width paths:
    ``paths`` (one row per run, replica and recorded width) and ``solved`` (one row per run,
    replica and solved width, with the test error and the output-weight norms)."""

    table: pd.DataFrame
    problems: pd.DataFrame
    paths: pd.DataFrame
    solved: pd.DataFrame


@dataclass
class Aggregate:
    """The table (one row per run and replica), the runs that are not usable, the width paths,
    the width needed and its growth laws (empty without width paths), and outputs."""

    table: pd.DataFrame
    problems: pd.DataFrame
    swept: list[str]
    summary: str
    figures: dict[str, Path]
    paths: pd.DataFrame
    needed: pd.DataFrame
    growth: pd.DataFrame


def _flatten(config: dict[str, Any]) -> dict[str, Any]:
    """A record's nested config as dotted keys (pandas' json_normalize), lists as tuples so
    that the columns can be grouped by."""
    flat = pd.json_normalize(config).iloc[0].to_dict()
    return {k: tuple(v) if isinstance(v, list) else v for k, v in flat.items()}


def _replica_value(value: Any, r: int) -> float:
    """One replica's number from a scalar or a per-replica list; None (non-finite) -> NaN."""
    if isinstance(value, list):
        value = value[r] if r < len(value) else None
    return float("nan") if value is None else float(value)


def _job_dirs(root: Path) -> list[Path]:
    """Folders of runs: those holding a record, or Hydra's ``.hydra`` of a job that started."""
    dirs = {p.parent for p in root.rglob(RECORD_NAME)}
    dirs |= {p.parent for p in root.rglob(".hydra") if p.is_dir()}
    return sorted(dirs)


def expected_jobs(root: Path) -> int | None:
    """Number of jobs the sweep asked for: its command line in Hydra's ``multirun.yaml``,
    expanded as the sweeper expanded it (None if absent, or if it no longer expands)."""
    path = root / "multirun.yaml"
    if not path.exists():
        return None
    cfg = OmegaConf.load(path)
    params = [f"{k}={v}" for k, v in (cfg.hydra.sweeper.get("params") or {}).items()]
    try:
        return len(expand(params, list(cfg.hydra.overrides.task)))
    except Exception:  # a sweep that the basic sweeper would not expand (Optuna, say)
        return None


PER_REPLICA_LISTS = tuple(f"optimizer.{k}" for k in PER_REPLICA_OPTIMIZER_KEYS)
PER_REPLICA_KEYS = ("replicas", "model.replicas", *PER_REPLICA_LISTS)  # replaced by each replica's


def _network_key(
    config: dict[str, Any], choices: dict[str, Any], r: int, seed: int, own: Any
) -> str:
    """What makes replica r's network and its fit, in the curve it belongs to: the flat config
    without the seeds, the replica count and the keys that do not change results, the group
    choices (two targets may coincide at one d under two names: rf_wall's relu_neuron_hard and
    relu_neuron_kink2 at d = 16), with the replica's own seed, the seed of the data it trained
    on (none for a population fit) and its own values of the PER_REPLICA_LISTS (``own``)."""
    skip = (*SEED_KEYS, *NOT_IN_FINGERPRINT, *PER_REPLICA_KEYS)
    kept = {k: v for k, v in config.items() if k not in skip}
    data = config.get("data_seed")
    data = config.get("seed", 0) if data is None else data
    if config.get("replica_data") == "independent":
        data = replica_seed(data, r)
    if config.get("optimizer.population"):
        data = None
    return json.dumps([kept, choices, seed, data, own], sort_keys=True, default=str)


def _path_rows(path: dict[str, Any], r: int, row: dict[str, Any]) -> tuple[list, list]:
    """Rows of one replica's width path: (recorded widths, solved widths)."""
    pick = (lambda v: v[r]) if isinstance(path["error"][0], list) else (lambda v: v)
    base = {k: row[k] for k in ("run", "replica", "replica_seed", "d")}
    base["kind"] = path.get("kind")
    curve = [
        {**base, "width": w, "error": e}
        for w, e in zip(path["widths"], pick(path["error"]), strict=True)
    ]
    solved = path["solved"]
    names = [k for k in solved if k != "widths"]
    columns = [pick(solved[k]) for k in names]
    points = [
        {**base, "width": w, **dict(zip(names, values, strict=True))}
        for w, *values in zip(solved["widths"], *columns, strict=True)
    ]
    return curve, points


def read_records(root: Path) -> Records:
    """Every record under ``root`` (see :class:`Records`). A network that two finished runs
    trained (the same config and replica seed, as overlapping seed sweeps give) counts once:
    later copies are listed in ``problems`` as ``duplicate`` and left out of the table."""
    rows, problems, curves, points = [], [], [], []
    seen: dict[str, str] = {}
    job_dirs = _job_dirs(root)
    for job_dir in job_dirs:
        run = str(job_dir.relative_to(root))
        path = job_dir / RECORD_NAME
        try:
            record = json.loads(path.read_text())
        except FileNotFoundError:
            problems.append({"run": run, "status": "missing", "error": "the job left no record"})
            continue
        except (OSError, ValueError) as error:
            problems.append({"run": run, "status": "unreadable", "error": str(error)})
            continue
        status = record.get("status", "unknown")
        if status != "ok":
            problems.append({"run": run, "status": status, "error": record.get("error", "")})
        config = _flatten(with_added_keys(record.get("config") or {}))
        choices = record.get("choices") or {}
        metrics = record.get("metrics") or {}
        theory = record.get("theory") or {}
        replicas = int(config.get("replicas", 1))
        # Records before replica_seeds was written used seed + r.
        seeds = record.get("replica_seeds") or [config.get("seed", 0) + r for r in range(replicas)]
        for r in range(replicas):
            own = {
                k: v[r] if isinstance(v, tuple) else v
                for k in PER_REPLICA_LISTS
                if (v := config.get(k)) is not None
            }
            key = _network_key(config, choices, r, seeds[r], own)
            if status == "ok" and key in seen:
                problems.append(
                    {
                        "run": run,
                        "status": "duplicate",
                        "error": f"replica {r} (seed {seeds[r]}) is the network of {seen[key]}",
                    }
                )
                continue
            if status == "ok":
                seen[key] = f"{run} replica {r}"
            row = {"run": run, "replica": r, "status": status, **config}
            row.update({g: choices.get(g, config.get(f"{g}.name")) for g in GROUPS})
            row["replica_seed"] = seeds[r]
            row.update(own)  # one rate (or precision) per replica: this replica's
            row.update({m: _replica_value(metrics.get(m), r) for m in METRICS})
            for threshold, steps in (record.get("steps_to_error") or {}).items():
                row[f"steps_to_error.{threshold}"] = _replica_value(steps, r)
            row.update({f"theory.{k}": _replica_value(v, r) for k, v in theory.items()})
            row["wall_time_s"] = record.get("wall_time_s")
            rows.append(row)
            if status == "ok" and record.get("width_path"):
                curve, solved = _path_rows(record["width_path"], r, row)
                curves += curve
                points += solved
    expected = expected_jobs(root)
    if expected is not None and expected > len(job_dirs):
        never = expected - len(job_dirs)
        problems.append(
            {"run": "-", "status": "missing", "error": f"{never} of {expected} jobs never started"}
        )
    return Records(
        pd.DataFrame(rows),
        pd.DataFrame(problems, columns=["run", "status", "error"]),
        pd.DataFrame(curves),
        pd.DataFrame(points),
    )


def swept_keys(table: pd.DataFrame) -> list[str]:
    """Config keys that take more than one value across the runs (seeds aside)."""
    skip = {"run", "replica", "status", "replica_seed", "wall_time_s", *METRICS}
    keys = []
    for column in table.columns:
        # The groups' copies of the knobs, and their names (the group columns say it better).
        copied = column.endswith((".d", ".width", ".replicas", ".name"))
        if column in skip or column.startswith(("theory.", "steps_to_error.")) or copied:
            continue
        if table[column].astype(str).nunique() > 1:
            keys.append(column)
    return keys


def _label(table: pd.DataFrame) -> pd.Series:
    """What distinguishes the compared methods: the fit (or else the model and optimizer), then
    the target and input, those of them that vary across the runs."""
    varies = {g: table[g].astype(str).nunique() > 1 for g in GROUPS}
    method = ["fit"] if varies["fit"] else [g for g in ("model", "optimizer") if varies[g]]
    parts = method + [g for g in ("target", "input") if varies[g]]
    if not parts:
        return table["model"].fillna("?").astype(str)
    # a group a record does not name (one written before it kept its choices) shows as "?"
    return table[parts].fillna("?").astype(str).agg(" / ".join, axis=1)


def _stats(frame: pd.DataFrame, keys: list[str], column: str = "test_error") -> pd.DataFrame:
    """Mean and 95% Student-t interval of ``column`` over seeds and replicas (independent
    networks) at each point, and the count; NaN bounds where a point has one value."""
    rows = []
    for point, group in frame.groupby(keys, sort=True):
        mean, low, high = mean_interval(group[column].to_numpy(float))
        values = point if isinstance(point, tuple) else (point,)
        rows.append(
            {**dict(zip(keys, values, strict=True)), "mean": mean, "low": low, "high": high}
            | {"count": len(group)}
        )
    return pd.DataFrame(rows, columns=[*keys, "mean", "low", "high", "count"])


def _panels(n: int, title: str) -> tuple[plt.Figure, list[plt.Axes]]:
    fig, axes = plt.subplots(
        1, n, figsize=(4.2 * n, 3.6), squeeze=False, sharey=True, layout="constrained"
    )
    fig.suptitle(title)
    for ax in axes[0]:
        ax.set_yscale("log")  # every panel plot here: errors and widths span decades
    return fig, list(axes[0])


def _theory_lines(ax: plt.Axes, frame: pd.DataFrame) -> None:
    """Horizontal lines at the best linear / quadratic errors, one per distinct value, named
    when there are few enough to read; where both are one value (a parity: 1 and 1), one line
    carries both names."""
    lines: dict[float, list[str]] = {}
    for column, name in THEORY_LINES.items():
        if column not in frame:
            continue
        values = np.unique(frame[column].dropna().round(6))
        values = values[values > 0]  # log axes: a zero residual has no line
        for value in values:
            if float(value) not in lines:
                ax.axhline(value, color="gray", ls="--" if column.endswith("_1") else ":", lw=0.9)
            lines.setdefault(float(value), []).append(name if len(values) <= 2 else "")
    for value, names in lines.items():
        if all(names):
            ax.annotate(
                f"{' = '.join(names)} {value:.3g}",
                (0.02, value),
                xycoords=("axes fraction", "data"),
                fontsize=6,
                color="gray",
                va="bottom",
            )


def _plain_ticks(ax: plt.Axes, values: list[float]) -> None:
    """Ticks at the swept values, written plainly, on a log axis."""
    ax.set_xticks(values, [f"{v:g}" for v in values])
    ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())


def _line_with_band(
    ax: plt.Axes,
    frame: pd.DataFrame,
    x: str,
    color: str,
    label: str,
    column: str = "test_error",
    style: str = "o-",
) -> None:
    """The mean of ``column`` against ``x``, and its 95% interval over seeds and replicas as
    a band (none where a point has one value)."""
    s = _stats(frame, [x], column)
    ax.plot(s[x], s["mean"], style, color=color, label=label)
    # A log axis cannot show a band reaching zero or below: cut it at a tenth of the mean.
    low = np.maximum(s["low"], s["mean"] / 10) if ax.get_yscale() == "log" else s["low"]
    ax.fill_between(s[x], low, s["high"], color=color, alpha=0.2)


def _exact_rf_points(ax: plt.Axes, frame: pd.DataFrame, x: str, color: str) -> None:
    """The exact RF population error (mean over seeds and replicas) against ``x``, as crosses,
    where the runs have it."""
    exact = frame.get("theory.rf_population_error")
    if exact is not None and exact.notna().any():
        exact = frame.groupby(x)["theory.rf_population_error"].mean()
        ax.plot(exact.index, exact.values, "x", color=color, ms=8, label="exact RF")


# The width -> infinity limit drawn in each panel of plot_error_vs_width (model=kernel runs):
# random features tend to the RF kernel, the NT model (and the lazy net) to the tangent kernel.
KERNEL_LIMITS = {"frozen": "rf", "linearized": "ntk", "trainable": "ntk"}
KERNEL_STYLES = {"rf": "--", "ntk": "-."}


def split_kernels(ok: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(the runs of finite models, the model=kernel runs): a kernel does not read the width."""
    kernel = ok["model"].astype(str) == "kernel" if "model" in ok else pd.Series(False, ok.index)
    return ok[~kernel], ok[kernel]


def _kernel_lines(ax: plt.Axes, kernels: pd.DataFrame, models: set, d: int, color: str) -> None:
    """The mean test error of the kernel fits at this d that the panel's models tend to, as
    horizontal lines (RF kernel dashed, tangent kernel dash-dotted)."""
    if "model.kernel" not in kernels:  # no kernel runs in this sweep
        return
    for kind in sorted({KERNEL_LIMITS[m] for m in models if m in KERNEL_LIMITS}):
        runs = kernels[(kernels["d"] == d) & (kernels["model.kernel"].astype(str) == kind)]
        if not runs.empty:
            value = runs["test_error"].mean()
            label = f"{kind} kernel, d={d}"
            ax.axhline(value, color=color, ls=KERNEL_STYLES[kind], lw=0.9, label=label)


def plot_error_vs_width(ok: pd.DataFrame) -> plt.Figure | None:
    """Normalised test error vs width (log-log): a panel per method, a line per d, the band
    over seeds and replicas, theory overlays (best linear / quadratic lines, exact RF points),
    and the kernel each method tends to as width -> infinity where the sweep fitted it."""
    ok, kernels = split_kernels(ok)
    if ok["width"].nunique() < 2:
        return None
    labels = sorted(ok["label"].unique())
    fig, axes = _panels(len(labels), "test error vs width")
    for ax, label in zip(axes, labels, strict=True):
        frame = ok[ok["label"] == label]
        models = set(frame["model"].astype(str))
        for i, (d, by_d) in enumerate(frame.groupby("d")):
            _line_with_band(ax, by_d, "width", f"C{i}", f"d={d}")
            _exact_rf_points(ax, by_d, "width", f"C{i}")
            _kernel_lines(ax, kernels, models, d, f"C{i}")
        ax.set_xscale("log")
        ax.set_yscale("log")
        _plain_ticks(ax, sorted(frame["width"].unique()))
        _theory_lines(ax, frame)
        ax.set_title(label, fontsize=9)
        ax.set_xlabel("width")
        ax.legend(fontsize=6)
    axes[0].set_ylabel("normalised test error")
    return fig


def plot_error_vs_d(ok: pd.DataFrame) -> plt.Figure | None:
    """Normalised test error vs d: a panel per width (those with two d or more), a line per
    method, side by side, with exact RF points where the runs have them."""
    widths = [w for w, frame in ok.groupby("width") if frame["d"].nunique() > 1]
    if not widths:
        return None
    fig, axes = _panels(len(widths), "test error vs d")
    for ax, width in zip(axes, widths, strict=True):
        frame = ok[ok["width"] == width]
        for i, (label, by_label) in enumerate(frame.groupby("label")):
            _line_with_band(ax, by_label, "d", f"C{i}", label)
            _exact_rf_points(ax, by_label, "d", f"C{i}")
        ax.set_yscale("log")
        _theory_lines(ax, frame)
        ax.set_title(f"width={width}", fontsize=9)
        ax.set_xlabel("d")
        ax.legend(fontsize=6)
    axes[0].set_ylabel("normalised test error")
    return fig


def width_needed(ok: pd.DataFrame, eps: float) -> pd.DataFrame:
    """Per method and d, the width at which the mean error reaches eps (NaN if never); the
    kernels, which have no width, are left out."""
    rows = []
    for (label, d), frame in split_kernels(ok)[0].groupby(["label", "d"]):
        s = _stats(frame, ["width"])
        reached = width_to_reach(s["width"].to_numpy(float), s["mean"].to_numpy(float), eps)
        rows.append({"label": label, "d": d, "width_needed": reached})
    return pd.DataFrame(rows, columns=["label", "d", "width_needed"])


def plot_width_needed(needed: pd.DataFrame, eps: float) -> plt.Figure | None:
    """Width needed to reach eps vs d (log-log), with reference curves d, d^2, d^3, exp(d)."""
    reached = needed.dropna()
    if reached.empty or reached["d"].nunique() < 2:
        return None
    fig, axes = _panels(1, f"width needed for test error <= {eps:g}")
    ax = axes[0]
    for i, (label, frame) in enumerate(reached.groupby("label")):
        ax.plot(frame["d"], frame["width_needed"], "o-", color=f"C{i}", label=label)
    d = np.linspace(reached["d"].min(), reached["d"].max(), 50)
    d0, w0 = reached["d"].min(), reached.loc[reached["d"].idxmin(), "width_needed"]
    references = {"d": lambda x: x, "d^2": lambda x: x**2, "d^3": lambda x: x**3, "exp(d)": np.exp}
    for (name, curve), style in zip(references.items(), ("-", "--", "-.", ":"), strict=True):
        ax.plot(d, curve(d) * w0 / curve(d0), style, lw=0.8, color="gray", label=f"~ {name}")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_ylim(reached["width_needed"].min() / 2, reached["width_needed"].max() * 4)
    _plain_ticks(ax, sorted(reached["d"].unique()))
    ax.set_xlabel("d")
    ax.set_ylabel("width")
    ax.legend(fontsize=6)
    return fig


def seed_widths(
    paths: pd.DataFrame, solved: pd.DataFrame, thresholds: tuple[float, ...] = THRESHOLDS
) -> pd.DataFrame:
    """The width needed per seed: one row per run, replica and threshold, read off that
    network's width path by :func:`~randfeat_torch.stats.width_to_reach` (NaN: not reached by
    its largest width, ``n_max``). The path is the penalised objective (MSE + lambda |u|^2) /
    Var f; ``penalty_share`` is lambda |u|^2 / Var f at the first solved width at or past the
    crossing (the largest where not reached), over the threshold: how much of the threshold is
    the penalty rather than the error."""
    rows = []
    for (run, replica), curve in paths.groupby(["run", "replica"], sort=True):
        curve = curve[np.isfinite(curve["error"].to_numpy(float))]
        widths, errors = curve["width"].to_numpy(float), curve["error"].to_numpy(float)
        points = solved[(solved["run"] == run) & (solved["replica"] == replica)]
        points = points.merge(curve[["width", "error"]], on="width", suffixes=("", "_objective"))
        first = curve.iloc[0]
        for eps in thresholds:
            needed = width_to_reach(widths, errors, eps)
            past = points[points["width"] >= (needed if np.isfinite(needed) else widths.max())]
            share = math.nan
            if not past.empty:
                at = past.iloc[0]
                share = (at["error_objective"] - at["error"]) / eps
            rows.append(
                {"label": first["label"], "d": first["d"], "threshold": eps}
                | {"replica_seed": first["replica_seed"], "width_needed": needed}
                | {"n_max": widths.max(), "penalty_share": share}
            )
    return pd.DataFrame(rows)


def width_needed_table(per_seed: pd.DataFrame) -> pd.DataFrame:
    """One row per (label, d, threshold): the width needed by each seed (``>N`` where it was
    not reached by N = n_max), the median over seeds (a seed that did not reach counts as
    above every width; NaN when the median is such a seed), and, when every seed reached, the
    geometric mean with its 95% Student-t interval over seeds (on log width)."""
    rows = []
    for (label, d, eps), group in per_seed.groupby(["label", "d", "threshold"], sort=True):
        widths, n_max = group["width_needed"].to_numpy(float), int(group["n_max"].max())
        reached = np.isfinite(widths)
        median = float(np.median(np.where(reached, widths, np.inf)))
        mean, low, high = mean_interval(np.log(widths)) if reached.all() else (math.nan,) * 3
        missed = int((~reached).sum())
        status = "reached" if not missed else f"not reached by N_max={n_max} in {missed} seeds"
        shown = [f"{w:.4g}" if ok else f">{n_max}" for w, ok in zip(widths, reached, strict=True)]
        share = float(group["penalty_share"].max())
        if share > PENALTY_SHARE_FLAG:
            status += f"; the penalty is {share:.0%} of the threshold"
        rows.append(
            {"label": label, "d": d, "threshold": eps, "seeds": len(widths)}
            | {"reached": int(reached.sum()), "width_per_seed": ";".join(shown)}
            | {"median": median if math.isfinite(median) else math.nan}
            | {"geo_mean": math.exp(mean), "ci95_low": math.exp(low), "ci95_high": math.exp(high)}
            | {"n_max": n_max, "penalty_share": share, "status": status}
        )
    return pd.DataFrame(rows)


GROWTH_LAWS = ("exponential", "polynomial")  # log N = a + b d; log N = a + k log d
PENALTY_SHARE_FLAG = 0.05  # a width needed whose penalty is more of the threshold is flagged


def growth_table(per_seed: pd.DataFrame) -> pd.DataFrame:
    """The two growth laws fitted to the width needed against d, per (label, threshold): one
    row per law, fitted to the geometric mean over seeds at each d where every seed reached the
    threshold (the others are counted in ``d_not_reached``), so that the slope's interval has
    (number of d - 2) degrees of freedom: seeds at one d share the law's misfit, and pooling
    them would make it too narrow. The interval holds only if the law is right; ``better``
    names the law of the smaller residual sum of squares in log width (both have two
    parameters)."""
    rows = []
    for (label, eps), group in per_seed.groupby(["label", "threshold"], sort=True):
        complete = group.groupby("d")["width_needed"].transform(lambda w: np.isfinite(w).all())
        used = group[complete.astype(bool)]
        log_mean = np.log(used["width_needed"]).groupby(used["d"]).mean()
        d, width = log_mean.index.to_numpy(float), np.exp(log_mean.to_numpy())
        fits = [fit_growth(d, width, law) for law in GROWTH_LAWS]
        if any(fit is None for fit in fits):
            continue
        better = min(fits, key=lambda fit: fit.rss).law
        for fit in fits:
            rows.append(
                {"label": label, "threshold": eps, "law": fit.law, "slope": fit.slope}
                | {"slope_low": fit.slope_low, "slope_high": fit.slope_high}
                | {"intercept": fit.intercept, "rss": fit.rss, "rms_log_width": fit.rms}
                | {"points": fit.points, "d_min": used["d"].min(), "d_max": used["d"].max()}
                | {"d_not_reached": int(group.loc[~complete.astype(bool), "d"].nunique())}
                | {"better": better}
            )
    return pd.DataFrame(rows)


def plot_width_needed_vs_d(needed: pd.DataFrame, growth: pd.DataFrame) -> plt.Figure | None:
    """log width needed against d (log-linear), a panel per threshold, a line per method: the
    geometric mean over seeds with its 95% interval as error bars (the median where some seeds
    did not reach), a triangle at N_max where the median seed did not reach, and the two fitted
    laws (solid: exponential, dashed: polynomial)."""
    if needed.empty or needed["d"].nunique() < 2:
        return None
    thresholds = sorted(needed["threshold"].unique(), reverse=True)
    fig, axes = _panels(len(thresholds), "width needed against d (95% interval over seeds)")
    for ax, eps in zip(axes, thresholds, strict=True):
        for i, (label, frame) in enumerate(needed[needed["threshold"] == eps].groupby("label")):
            color = f"C{i}"
            reached = frame[frame["median"].notna()]
            # The geometric mean and its interval where every seed reached, else the median.
            centre = reached["geo_mean"].fillna(reached["median"])
            below = (centre - reached["ci95_low"]).clip(lower=0).fillna(0)
            above = (reached["ci95_high"] - centre).clip(lower=0).fillna(0)
            ax.errorbar(
                reached["d"],
                centre,
                yerr=[below, above],
                fmt="o",
                color=color,
                ms=4,
                capsize=2,
                label=label,
            )
            missing = frame[frame["median"].isna()]  # shifted a little so that none hides another
            ax.plot(missing["d"] + 0.12 * i, missing["n_max"], "^", color=color, mfc="none", ms=6)
            if growth.empty:
                continue
            fits = growth[(growth["label"] == label) & (growth["threshold"] == eps)]
            for fit in fits.itertuples():
                d = np.linspace(fit.d_min, fit.d_max, 50)
                x = d if fit.law == "exponential" else np.log(d)
                style = "-" if fit.law == "exponential" else "--"
                ax.plot(d, np.exp(fit.intercept + fit.slope * x), style, color=color, lw=0.8)
        ax.set_title(f"error <= {eps:g} (triangles: not reached by N_max)", fontsize=8)
        ax.set_xlabel("d")
        ax.legend(fontsize=6)
    axes[0].set_ylabel("width needed (solid: exp fit, dashed: poly fit)")
    return fig


def plot_width_path(paths: pd.DataFrame) -> plt.Figure:
    """The error at every width from the width paths (log-log): a panel per method, a line
    per d, the band over seeds."""
    labels = sorted(paths["label"].unique())
    fig, axes = _panels(len(labels), "error at every width (width path)")
    for ax, label in zip(axes, labels, strict=True):
        frame = paths[paths["label"] == label]
        for i, (d, by_d) in enumerate(frame.groupby("d")):
            _line_with_band(ax, by_d, "width", f"C{i % 10}", f"d={d}", "error", "-")
        ax.set_xscale("log")
        ax.set_title(label, fontsize=8)
        ax.set_xlabel("width")
        ax.legend(fontsize=5, ncol=2)
    axes[0].set_ylabel(f"normalised {paths['kind'].iloc[0]} error")
    return fig


NET_VS_RF_WIDTHS = (256, 1024, 4096, 16384)  # random-features widths drawn beside the net


def best_rates(trained: pd.DataFrame) -> pd.DataFrame:
    """The rows of the best learning rate of each method at each (target, d): the rate of the
    lowest mean test error over seeds (every rate where the runs have none)."""
    if "optimizer.lr" not in trained or trained["optimizer.lr"].nunique() < 2:
        return trained
    keys = ["fit", "target", "d"]
    means = trained.groupby([*keys, "optimizer.lr"])["test_error"].mean().reset_index()
    best = means.loc[means.groupby(keys)["test_error"].idxmin(), [*keys, "optimizer.lr"]]
    return trained.merge(best, on=[*keys, "optimizer.lr"])


def trained_table(ok: pd.DataFrame, paths: pd.DataFrame) -> pd.DataFrame:
    """The trained methods of a sweep with width paths (the runs without one) at their best
    rate: mean test error and 95% interval over seeds per (fit, target, d)."""
    trained = best_rates(ok[~ok["run"].isin(paths["run"])])
    if trained.empty:
        return pd.DataFrame()
    keys = [k for k in ("fit", "target", "d", "width", "optimizer.lr") if k in trained]
    return _stats(trained, keys)


def plot_net_vs_rf(ok: pd.DataFrame, paths: pd.DataFrame) -> plt.Figure | None:
    """Error against d per target: each trained method of the sweep (runs without a width path,
    test error, at its best rate) beside random features at a few widths (the error of the
    width paths), mean and 95% interval over seeds."""
    trained = best_rates(ok[~ok["run"].isin(paths["run"])])
    if trained.empty:
        return None
    targets = sorted(ok["target"].astype(str).unique())
    fig, axes = _panels(len(targets), "trained net against random features")
    for ax, target in zip(axes, targets, strict=True):
        rf = paths[paths["target"].astype(str) == target]
        shown = [w for w in NET_VS_RF_WIDTHS if not rf.empty and w <= rf["width"].max()]
        for i, width in enumerate(shown):
            nearest = rf["width"].iloc[int((rf["width"] - width).abs().argmin())]
            at = rf[rf["width"] == nearest]
            _line_with_band(ax, at, "d", f"C{i}", f"RF width {nearest}", "error")
        methods = trained[trained["target"].astype(str) == target].groupby("fit")
        for j, (method, frame) in enumerate(methods):
            width = "/".join(str(w) for w in sorted(frame["width"].unique()))
            color = f"C{len(NET_VS_RF_WIDTHS) + j}"
            _line_with_band(ax, frame, "d", color, f"{method} (width {width}, best rate)")
        ax.set_title(target, fontsize=8)
        ax.set_xlabel("d")
        ax.legend(fontsize=5)
    axes[0].set_ylabel("normalised error")
    return fig


def plot_error_vs_weight_norm(solved: pd.DataFrame) -> plt.Figure:
    """The error against width * max |u| (the quantity the bound of Yehudai & Shamir is on),
    log-log, at the solved widths of the width paths: a panel per method, a line per d."""
    labels = sorted(solved["label"].unique())
    fig, axes = _panels(len(labels), "error against width x max |u| (output weights)")
    for ax, label in zip(axes, labels, strict=True):
        frame = solved[solved["label"] == label]
        for i, (d, by_d) in enumerate(frame.groupby("d")):
            mean = by_d.groupby("width")[["width_times_u_max_abs", "error"]].mean()
            ax.plot(mean.iloc[:, 0], mean.iloc[:, 1], ".-", color=f"C{i % 10}", label=f"d={d}")
        ax.set_xscale("log")
        ax.set_title(label, fontsize=8)
        ax.set_xlabel("width x max |u|")
        ax.legend(fontsize=5, ncol=2)
    axes[0].set_ylabel("normalised error")
    return fig


LAZINESS_NAME = "laziness.csv"
MOVED_FIRST_LAYER = ("trainable", "linearized")  # models whose first layer trains


def _series(frame: pd.DataFrame) -> pd.Series:
    """The name of a trained model's curve: the model, its parameterization and lazy scale."""
    name = frame["model"].astype(str)
    if "model.parameterization" in frame:
        name = name + " " + frame["model.parameterization"].astype(str)
    if "model.lazy_scale" in frame:
        alpha = frame["model.lazy_scale"]
        name = name + alpha.map(lambda a: "" if pd.isna(a) else f" alpha={a:g}")
    return name


NUMBER = re.compile(r"(\d+(?:\.\d+)?(?:e[-+]?\d+)?)")


def in_number_order(names: Iterable[str]) -> list[str]:
    """Series names sorted with their numbers read as numbers: "d=4" before "d=16", and
    "alpha=0.25" before "alpha=0.5" (a plain sort puts them the other way)."""

    def key(name: str) -> list[tuple[int, float | str]]:
        parts = NUMBER.split(name)  # text, number, text, ...: the numbers at the odd places
        return [(1, float(part)) if i % 2 else (0, part) for i, part in enumerate(parts)]

    return sorted(names, key=key)


def laziness_rows(ok: pd.DataFrame) -> pd.DataFrame:
    """The runs with laziness measures (trained by an optimizer), each named by its series (with
    its d where the runs have several)."""
    if "w_movement" not in ok or not ok["w_movement"].notna().any():
        return pd.DataFrame()
    lazy = ok[ok["w_movement"].notna()].copy()
    lazy["series"] = _series(lazy)
    if "d" in lazy and lazy["d"].nunique() > 1:  # a power per d: the movement depends on it
        lazy["series"] += lazy["d"].map(lambda d: f" d={d}")
    return lazy


def movement_table(lazy: pd.DataFrame) -> pd.DataFrame:
    """The power law of the first layer's movement in the width, w_movement ~ width^k, per
    target and series of a model whose first layer trains: k by least squares on the log of the
    geometric mean over seeds and replicas at each width, its 95% interval, the widths fitted,
    the fewest runs at one width and the width range. The NTK scaling predicts k = -1/2, mean
    field k = 0. As in :func:`growth_table` the interval has (widths - 2) degrees of freedom:
    the runs at one width share the law's misfit there (and, with ``replica_data=shared``, their
    samples), so pooling them as independent points would make it too narrow. It holds only if
    the law is right."""
    rows = []
    moved = lazy[lazy["model"].astype(str).isin(MOVED_FIRST_LAYER) & (lazy["w_movement"] > 0)]
    for (target, series), frame in moved.groupby(["target", "series"], sort=True):
        by_width = np.log(frame["w_movement"].astype(float)).groupby(frame["width"])
        log_mean = by_width.mean()
        # the power law is the polynomial law of fit_growth, with the width as its x
        fit = fit_growth(log_mean.index.to_numpy(float), np.exp(log_mean), "polynomial")
        if fit is None:
            continue
        rows.append(
            {
                "target": target,
                "series": series,
                "slope": fit.slope,
                "slope_low": fit.slope_low,
                "slope_high": fit.slope_high,
                "widths": fit.points,
                "runs_per_width": int(by_width.size().min()),
                "width_min": frame["width"].min(),
                "width_max": frame["width"].max(),
            }
        )
    order = in_number_order({row["series"] for row in rows})
    rows.sort(key=lambda row: (str(row["target"]), order.index(row["series"])))
    return pd.DataFrame(rows)


def _lazy_panels(
    lazy: pd.DataFrame, columns: dict[str, str], title: str, ylabel: str, x: str = "width"
) -> plt.Figure:
    """A panel per target: ``columns`` (name: style) against ``x`` (log-log), a color per
    series, mean and 95% interval over seeds and replicas; zeros are left out (log axis)."""
    targets = sorted(lazy["target"].astype(str).unique())
    fig, axes = _panels(len(targets), title)
    series = in_number_order(lazy["series"].unique())
    for ax, target in zip(axes, targets, strict=True):
        frame = lazy[lazy["target"].astype(str) == target]
        for i, name in enumerate(series):
            by_series = frame[frame["series"] == name]
            for column, style in columns.items():
                shown = by_series[by_series[column] > 0]
                if shown[x].nunique() < 1:
                    continue
                label = name if len(columns) == 1 else f"{name}: {column}"
                _line_with_band(ax, shown, x, f"C{i % 10}", label, column, style)
        ax.set_xscale("log")
        _plain_ticks(ax, sorted(frame[x].dropna().unique()))
        ax.set_title(target, fontsize=8)
        ax.set_xlabel(x)
        ax.legend(fontsize=5)
    axes[0].set_ylabel(ylabel)
    return fig


def plot_movement_vs_width(lazy: pd.DataFrame, slopes: pd.DataFrame) -> plt.Figure | None:
    """||W_t - W_0|| / ||W_0|| against width for the models whose first layer trains, with
    the fitted power (NTK predicts width^(-1/2), mean field O(1))."""
    moved = lazy[lazy["model"].astype(str).isin(MOVED_FIRST_LAYER)].copy()
    if moved.empty or moved["width"].nunique() < 2:
        return None
    powers = {(r.target, r.series): r for r in slopes.itertuples()}

    def name(row: pd.Series) -> str:
        fit = powers.get((row["target"], row["series"]))
        return row["series"] if fit is None else f"{row['series']} (k = {fit.slope:.2f})"

    moved["series"] = moved.apply(name, axis=1)
    title = "first-layer movement (fit: width^k)"
    return _lazy_panels(moved, {"w_movement": "o-"}, title, "relative movement")


def plot_distances_vs_width(lazy: pd.DataFrame) -> plt.Figure | None:
    """The kernel distance (solid) and the distance to the linearization (dashed) against
    width, for the trained nets (0 for the linearized model and random features)."""
    nets = lazy[lazy["model"].astype(str) == "trainable"]
    if nets.empty or nets["width"].nunique() < 2:
        return None
    columns = {"kernel_distance": "o-", "linearization_distance": "s--"}
    title = "kernel (solid), linearization (dashed)"
    return _lazy_panels(nets, columns, title, "distance")


def plot_lazy_errors(lazy: pd.DataFrame) -> plt.Figure | None:
    """The test error against width of every trained model: the net under each
    parameterization beside its linearization (NT) and random features (RF) of the same width
    and training."""
    if lazy["width"].nunique() < 2 or lazy["model"].nunique() < 2:
        return None
    title = "test error: net, NT and RF"
    return _lazy_panels(lazy, {"test_error": "o-"}, title, "normalised test error")


def plot_lazy_scale(lazy: pd.DataFrame) -> plt.Figure | None:
    """Movement, distance to the linearization, kernel distance and test error against the
    lazy scale alpha (Chizat, Oyallon & Bach: alpha -> infinity is the lazy limit)."""
    if "model.lazy_scale" not in lazy or lazy["model.lazy_scale"].nunique() < 2:
        return None
    scaled = lazy[lazy["model.lazy_scale"].notna()].copy()
    scaled["series"] = scaled["model"].astype(str)
    columns = {
        "w_movement": "o-",
        "linearization_distance": "s--",
        "kernel_distance": "^:",
        "test_error": "x-",
    }
    scaled = scaled.rename(columns={"model.lazy_scale": "lazy_scale"})
    return _lazy_panels(
        scaled, columns, "laziness against the lazy scale alpha", "value", "lazy_scale"
    )


SCALE_NAME = "lazy_scale.csv"
SCALE_KEY = "model.lazy_scale"
SCALE_MEASURES = ("w_movement", "linearization_distance", "kernel_distance")


def scale_table(lazy: pd.DataFrame) -> pd.DataFrame:
    """The local power of each laziness measure in the lazy scale alpha, between neighbouring
    alphas of the grid: k = log(m(alpha') / m(alpha)) / log(alpha' / alpha) for each network
    (one seed and replica, the same init at every alpha, so that the two are paired), and the
    mean and 95% t interval over the networks, per target, model, d, width and any other key
    that the sweep varies (a parameterization, a rate). The lazy limit
    alpha -> infinity predicts k -> -1 for the movement; a mean squared distance that shrinks
    like the square of the movement has k -> -2. Zero measures are left out (no power)."""
    if SCALE_KEY not in lazy or lazy[SCALE_KEY].nunique() < 2:
        return pd.DataFrame()
    scaled = lazy[lazy[SCALE_KEY].notna()].copy()
    keys = ["target", "model", "d", "width"]
    not_a_point = {*keys, SCALE_KEY, *SEED_KEYS, "label", "series"}
    keys += [k for k in swept_keys(scaled) if k not in not_a_point]
    # map(str), not astype(str): pandas 3 keeps a missing data_seed (None) as NaN there
    network = scaled["replica"].map(str) + "/" + scaled["replica_seed"].map(str)
    if "data_seed" in scaled:
        network += "/" + scaled["data_seed"].map(str)
    scaled["network"] = network
    scaled["alpha"] = scaled[SCALE_KEY].astype(float)
    rows = []
    for point, frame in scaled.groupby(keys, sort=True, dropna=False):
        alphas = np.sort(frame["alpha"].unique())
        for measure in (m for m in SCALE_MEASURES if m in frame):
            values = frame.pivot_table(index="network", columns="alpha", values=measure)
            values = values.reindex(columns=alphas)  # a scale with no value is a NaN column
            for low, high in itertools.pairwise(alphas):
                pair = values[[low, high]].dropna()
                pair = pair[(pair > 0).all(axis=1)]
                if pair.empty:
                    continue
                powers = np.log(pair[high] / pair[low]).to_numpy() / math.log(high / low)
                mean, k_low, k_high = mean_interval(powers)
                rows.append(
                    dict(zip(keys, point, strict=True))
                    | {"measure": measure, "alpha": low, "alpha_next": high}
                    | {"k": mean, "k_low": k_low, "k_high": k_high, "networks": len(powers)}
                )
    return pd.DataFrame(rows)


def summarise_scale(powers: pd.DataFrame) -> list[str]:
    """Summary lines of the local powers of the laziness measures in the lazy scale."""
    if powers.empty:
        return []
    return [
        "laziness measure ~ alpha^k between neighbouring lazy scales (mean over networks, 95% "
        "interval; the lazy limit predicts k -> -1 for the movement):",
        powers.to_string(index=False, float_format=lambda v: f"{v:.4g}"),
    ]


def summarise_laziness(slopes: pd.DataFrame) -> list[str]:
    """Summary lines of the fitted powers of the first layer's movement."""
    if slopes.empty:
        return []
    lines = [
        "first-layer movement ~ width^k (least squares on the log geometric mean over seeds "
        "at each width, 95% interval with widths - 2 degrees of freedom; NTK predicts "
        "k = -0.5, mean field k = 0):"
    ]
    lines.append(slopes.to_string(index=False, float_format=lambda v: f"{v:.3g}"))
    return lines


PRECISION_NAME = "precision.csv"
PRECISION_GOAL = 0.1  # the error the threshold precision is read at
PRECISION_KEY = "optimizer.grad_precision"


def precision_rows(ok: pd.DataFrame) -> pd.DataFrame:
    """The runs trained with a grid of gradient precisions (one per replica; 0: exact), with
    their rounding (``nearest`` or ``stochastic``)."""
    if PRECISION_KEY not in ok or not ok[PRECISION_KEY].notna().any():
        return pd.DataFrame()
    rows = ok[ok[PRECISION_KEY].notna()].copy()
    stochastic = rows.get("optimizer.stochastic_rounding", pd.Series(False, index=rows.index))
    rows["rounding"] = np.where(stochastic.fillna(False).astype(bool), "stochastic", "nearest")
    rows[PRECISION_KEY] = rows[PRECISION_KEY].astype(float)
    if "seed" not in rows:
        rows["seed"] = 0
    return rows


def threshold_table(rows: pd.DataFrame, goal: float = PRECISION_GOAL) -> pd.DataFrame:
    """Per target, rounding, d and seed: the largest precision c at which the net's final test
    error is at or below ``goal`` (0: only the exact gradient got there; NaN: not even that),
    the coarsest c of the grid, and the first evaluated step at which the exact net's error was
    at or below ``goal`` (a net may cross it and end above it: then its steps are a number and
    its threshold NaN)."""
    steps = f"steps_to_error.{goal:g}"
    out = []
    for (target, rounding, d, seed), frame in rows.groupby(
        ["target", "rounding", "d", "seed"], sort=True
    ):
        reached = frame[frame["test_error"] <= goal][PRECISION_KEY]
        exact = frame[frame[PRECISION_KEY] == 0]
        out.append(
            {
                "target": target,
                "rounding": rounding,
                "d": d,
                "seed": seed,
                "threshold_precision": reached.max() if not reached.empty else math.nan,
                "coarsest": frame[PRECISION_KEY].max(),
                "exact_error": exact["test_error"].mean() if not exact.empty else math.nan,
                "exact_steps": exact[steps].mean()
                if steps in exact and not exact.empty
                else math.nan,
            }
        )
    return pd.DataFrame(out)


def _references(ok: pd.DataFrame) -> pd.DataFrame:
    """The optimum of random features and the NT model (the ridge runs) per target and d:
    mean test error over seeds."""
    ridge = ok[ok.get("optimizer", pd.Series("", index=ok.index)).astype(str) == "ridge"]
    if ridge.empty:
        return pd.DataFrame(columns=["target", "d", "model", "test_error"])
    return ridge.groupby(["target", "d", "model"])["test_error"].mean().reset_index()


def plot_error_vs_precision(rows: pd.DataFrame, ok: pd.DataFrame) -> plt.Figure | None:
    """Final test error against the precision c (log; exact drawn a decade left of the finest
    c), a panel per target and rounding, a line per d, with the RF (dashed) and NT (dotted)
    optimum of the same width and d as reference lines."""
    if rows[PRECISION_KEY].nunique() < 2:
        return None
    panels = sorted(rows.groupby(["target", "rounding"]).groups)
    fig, axes = _panels(len(panels), "test error against gradient precision c")
    finest = rows.loc[rows[PRECISION_KEY] > 0, PRECISION_KEY].min()
    exact_at = finest / 10
    references = _references(ok)
    for ax, (target, rounding) in zip(axes, panels, strict=True):
        frame = rows[(rows["target"] == target) & (rows["rounding"] == rounding)].copy()
        frame["c"] = frame[PRECISION_KEY].where(frame[PRECISION_KEY] > 0, exact_at)
        for i, (d, by_d) in enumerate(frame.groupby("d")):
            color = f"C{i % 10}"
            _line_with_band(ax, by_d, "c", color, f"d={d}")
            ref = references[(references["target"] == target) & (references["d"] == d)]
            for model, style in (("frozen", "--"), ("linearized", ":")):
                value = ref.loc[ref["model"] == model, "test_error"]
                if not value.empty and value.iloc[0] > 0:
                    ax.axhline(value.iloc[0], color=color, ls=style, lw=0.9)
        ax.set_xscale("log")
        grid = sorted(frame["c"].unique())
        ax.set_xticks(grid, ["0" if c == exact_at else f"{c:g}" for c in grid], fontsize=6)
        ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
        ax.set_title(f"{target}, {rounding} (RF --, NT :)", fontsize=8)
        ax.set_xlabel("precision c")
        ax.legend(fontsize=5)
    axes[0].set_ylabel("normalised test error")
    return fig


def _per_d(ax: plt.Axes, table: pd.DataFrame, column: str, label: str, color: str) -> None:
    """Every seed's value against d (dots) and the geometric mean over seeds (line)."""
    finite = table[np.isfinite(table[column]) & (table[column] > 0)]
    ax.plot(finite["d"], finite[column], ".", color=color, alpha=0.5)
    mean = finite.groupby("d")[column].apply(lambda v: float(np.exp(np.log(v).mean())))
    ax.plot(mean.index, mean.values, "o-", color=color, label=label)


def plot_threshold_precision(thresholds: pd.DataFrame) -> plt.Figure | None:
    """The largest precision c at which the net still reaches the goal error, against d: a
    panel per target, a line per rounding (seeds as dots; a seed whose exact net missed, or
    that reached only at c = 0, is left out)."""
    if thresholds["d"].nunique() < 2:
        return None
    targets = sorted(thresholds["target"].unique())
    fig, axes = _panels(len(targets), f"largest precision c reaching error {PRECISION_GOAL:g}")
    for ax, target in zip(axes, targets, strict=True):
        frame = thresholds[thresholds["target"] == target]
        for i, (rounding, by_rounding) in enumerate(frame.groupby("rounding")):
            _per_d(ax, by_rounding, "threshold_precision", rounding, f"C{i}")
        coarsest = frame["coarsest"].max()
        ax.axhline(coarsest, color="gray", ls=":", lw=0.9)
        ax.set_title(f"{target} (grid top {coarsest:g}: dotted)", fontsize=8)
        ax.set_xlabel("d")
        ax.legend(fontsize=5)
    axes[0].set_ylabel("threshold precision c")
    return fig


def plot_steps_to_error(thresholds: pd.DataFrame) -> plt.Figure | None:
    """Steps the exact-precision net took to reach the goal error, against d: a panel per
    target (resolution eval_every; seeds that never got there are left out)."""
    if thresholds["d"].nunique() < 2 or not np.isfinite(thresholds["exact_steps"]).any():
        return None
    targets = sorted(thresholds["target"].unique())
    fig, axes = _panels(len(targets), f"steps to error {PRECISION_GOAL:g}, exact gradients")
    for ax, target in zip(axes, targets, strict=True):
        frame = thresholds[thresholds["target"] == target]
        _per_d(ax, frame, "exact_steps", "exact precision", "C0")
        ax.set_title(target, fontsize=8)
        ax.set_xlabel("d")
        ax.legend(fontsize=5)
    axes[0].set_ylabel("steps")
    return fig


def summarise_precision(thresholds: pd.DataFrame) -> list[str]:
    """Summary lines: the threshold precision and the exact net's steps, per point, with the
    number of seeds whose final error reached the goal at some precision (the min and max are
    over those)."""
    if thresholds.empty:
        return []
    table = thresholds.groupby(["target", "rounding", "d"]).agg(
        threshold_precision_min=("threshold_precision", "min"),
        threshold_precision_max=("threshold_precision", "max"),
        exact_error=("exact_error", "mean"),
        exact_steps=("exact_steps", "mean"),
        seeds=("seed", "count"),
        reached=("threshold_precision", "count"),
    )
    return [
        f"largest gradient precision c whose net ends at test error {PRECISION_GOAL:g} or below"
        " (min and max over the seeds that reached it, their number in 'reached'; NaN: none, not"
        f" even the exact net), the exact net's final error, and its first step at or below"
        f" {PRECISION_GOAL:g} (mean over seeds; a net may cross it and end above):",
        table.to_string(float_format=lambda v: f"{v:.3g}"),
    ]


def summarise_growth(
    needed: pd.DataFrame, growth: pd.DataFrame, trained: pd.DataFrame
) -> list[str]:
    """Summary lines of the width needed, of the two growth laws and of the trained methods."""
    if needed.empty:
        return []
    lines = []
    if not trained.empty:
        lines.append("trained methods at their best rate: test error, 95% interval over seeds:")
        lines.append(trained.to_string(index=False, float_format=lambda v: f"{v:.4g}"))
    lines += ["width needed (from the width paths): per seed, median, 95% interval over seeds:"]
    shown = needed.drop(columns=["n_max", "geo_mean", "seeds"])
    lines.append(shown.to_string(index=False, float_format=lambda v: f"{v:.4g}"))
    if growth.empty:
        lines.append("growth laws: too few d reached a threshold to fit (three points needed)")
        return lines
    lines.append(
        "growth of the width needed with d (least squares on the log of the geometric mean over"
        " seeds at each d; 95% intervals hold if the law does):"
    )
    for (label, eps), fits in growth.groupby(["label", "threshold"], sort=True):
        parts = []
        for fit in fits.itertuples():
            law = "log N = a + b d" if fit.law == "exponential" else "log N = a + k log d"
            name = "b" if fit.law == "exponential" else "k"
            parts.append(
                f"{law}: {name} = {fit.slope:.3g} [{fit.slope_low:.3g}, {fit.slope_high:.3g}], "
                f"rms residual {fit.rms_log_width:.3g}"
            )
        first = fits.iloc[0]
        lines.append(
            f"  {label}, error <= {eps:g}, d = {first.d_min:g}..{first.d_max:g} "
            f"({first.d_not_reached} d not reached by every seed, left out): "
            + "; ".join(parts)
            + f"; {first.better} fits better"
        )
    return lines


def summarise(
    table: pd.DataFrame,
    problems: pd.DataFrame,
    swept: list[str],
    needed: pd.DataFrame,
    eps: float,
    growth_lines: list[str],
) -> str:
    """A short text report: counts by status, the unusable runs, the mean error per point with
    its 95% interval, the width needed."""
    runs = table.drop_duplicates("run") if not table.empty else table
    counts = runs["status"].value_counts().to_dict() if not runs.empty else {}
    lines = [f"runs with a record: {len(runs)}; by status: {counts or 'none'}"]
    lines.append(f"swept keys: {', '.join(swept) or 'none'}")
    if not problems.empty:
        lines.append(f"left out of the plots ({len(problems)}):")
        lines += [f"  {p.status:<11} {p.run}  {p.error}".rstrip() for p in problems.itertuples()]
    ok = table[table["status"] == "ok"] if not table.empty else table
    if not ok.empty:
        # The label, d, width and the free sweep variables; keys inside a group follow its pick.
        # A key inside a group is the sweep's own when it varies at one label, d and width (a
        # swept model.parameterization), not only with those (optimizer.name with the fit,
        # target.norm with d).
        point = [k for k in ("label", "d", "width") if k in ok]
        own = [
            k
            for k in swept
            if k not in GROUPS
            and (k.split(".")[0] not in GROUPS or ok.groupby(point)[k].nunique().max() > 1)
        ]
        own = [k for k in own if k not in (*SEED_KEYS, "replicas", "optimizer.lr")]
        rates = ["optimizer.lr"] if "optimizer.lr" in swept else []
        keys = list(dict.fromkeys(k for k in ["label", "d", "width", *own, *rates] if k in ok))
        # a key that some arms lack (a precision grid beside ridge runs) reads "-" there
        stats = _stats(ok.fillna({k: "-" for k in [*own, *rates]}), keys).set_index(keys)
        lines.append(
            "mean normalised test error, 95% interval [low, high] over seeds and replicas:"
        )
        lines.append(stats.to_string(float_format=lambda v: f"{v:.4g}"))
    if not needed.empty:
        lines.append(f"width needed for test error <= {eps:g} (NaN: not reached in the sweep):")
        lines.append(needed.to_string(index=False, float_format=lambda v: f"{v:.4g}"))
    return "\n".join([*lines, *growth_lines]) + "\n"


def aggregate(root: Path | str, eps: float = 0.1, out: Path | str | None = None) -> Aggregate:
    """Read every record under ``root``; write results.csv, summary.txt and the PNG plots to
    ``out`` (default: ``root``), and the plots as images to the TensorBoard run
    ``root/aggregate``. Where runs have width paths, also width_needed.csv (at the
    THRESHOLDS) and width_growth.csv (the two growth laws), and their plots; the width needed
    then comes from the paths instead of the swept widths."""
    root = Path(root)
    out = Path(out) if out is not None else root
    out.mkdir(parents=True, exist_ok=True)
    records = read_records(root)
    table, problems = records.table, records.problems
    swept = swept_keys(table) if not table.empty else []
    figures: dict[str, Path] = {}
    needed = pd.DataFrame(columns=["label", "d", "width_needed"])
    paths, path_needed, growth = pd.DataFrame(), pd.DataFrame(), pd.DataFrame()
    trained, lazy, slopes = pd.DataFrame(), pd.DataFrame(), pd.DataFrame()
    thresholds, powers = pd.DataFrame(), pd.DataFrame()
    if not table.empty:
        table["label"] = _label(table)
        columns = ["run", "replica", "status", "label", *GROUPS, *swept, "d", "width"]
        columns += ["replica_seed", *METRICS]
        columns += sorted(c for c in table.columns if c.startswith("steps_to_error."))
        columns += [*sorted(c for c in table.columns if c.startswith("theory.")), "wall_time_s"]
        table = table[list(dict.fromkeys(c for c in columns if c in table))]
        table.to_csv(out / TABLE_NAME, index=False)
        ok = table[(table["status"] == "ok") & np.isfinite(table["test_error"])]
        plots: dict[str, plt.Figure | None] = {}
        if not records.paths.empty:
            names = table[["run", "replica", "label", "target"]]
            paths = records.paths.merge(names, on=["run", "replica"])
            solved = records.solved.merge(names, on=["run", "replica"])
            per_seed = seed_widths(paths, solved)
            path_needed, growth = width_needed_table(per_seed), growth_table(per_seed)
            trained = trained_table(ok, paths)
            path_needed.to_csv(out / WIDTH_NEEDED_NAME, index=False)
            growth.to_csv(out / GROWTH_NAME, index=False)
            plots |= {
                "width_needed": plot_width_needed_vs_d(path_needed, growth),
                "width_path": plot_width_path(paths),
                "net_vs_rf": plot_net_vs_rf(ok, paths),
                "error_vs_weight_norm": plot_error_vs_weight_norm(solved),
            }
        elif not ok.empty and ok["width"].nunique() > 1:
            needed = width_needed(ok, eps)
            plots["width_needed"] = plot_width_needed(needed, eps)
        if not ok.empty:
            plots |= {"error_vs_width": plot_error_vs_width(ok), "error_vs_d": plot_error_vs_d(ok)}
            # every config key, not only the swept ones: a precision grid in one rounding
            everything = records.table.loc[ok.index].assign(label=ok["label"])
            lazy = laziness_rows(everything)
            rows = precision_rows(everything)
            if not rows.empty:
                thresholds = threshold_table(rows)
                thresholds.to_csv(out / PRECISION_NAME, index=False)
                plots |= {
                    "error_vs_precision": plot_error_vs_precision(rows, everything),
                    "threshold_precision": plot_threshold_precision(thresholds),
                    "steps_to_error": plot_steps_to_error(thresholds),
                }
        if not lazy.empty:
            slopes = movement_table(lazy)
            if not slopes.empty:
                slopes.to_csv(out / LAZINESS_NAME, index=False)
            powers = scale_table(lazy)
            if not powers.empty:
                powers.to_csv(out / SCALE_NAME, index=False)
            plots |= {
                "movement_vs_width": plot_movement_vs_width(lazy, slopes),
                "distances_vs_width": plot_distances_vs_width(lazy),
                "lazy_errors": plot_lazy_errors(lazy),
                "lazy_scale": plot_lazy_scale(lazy),
            }
        figures = _save_figures({k: v for k, v in plots.items() if v is not None}, out, root)
    extra = summarise_growth(path_needed, growth, trained) + summarise_laziness(slopes)
    extra += summarise_scale(powers)
    extra += summarise_precision(thresholds)
    summary = summarise(table, problems, swept, needed, eps, extra)
    (out / SUMMARY_NAME).write_text(summary)
    return Aggregate(table, problems, swept, summary, figures, paths, path_needed, growth)


def _save_figures(figs: dict[str, plt.Figure], out: Path, root: Path) -> dict[str, Path]:
    """PNG next to the table, and the same figure as an image in TensorBoard."""
    from torch.utils.tensorboard import SummaryWriter

    paths = {}
    with SummaryWriter(log_dir=str(root / TENSORBOARD_DIR)) as writer:
        for name, fig in figs.items():
            paths[name] = out / f"{name}.png"
            fig.savefig(paths[name], dpi=110)
            writer.add_figure(f"aggregate/{name}", fig, close=True)
    return paths


def newest_sweep(base: Path | str = "outputs") -> Path | None:
    """The most recently written sweep folder (one holding Hydra's multirun.yaml) under base."""
    sweeps: Iterable[Path] = Path(base).rglob("multirun.yaml")
    newest = max(sweeps, key=lambda p: p.stat().st_mtime, default=None)
    return None if newest is None else newest.parent
