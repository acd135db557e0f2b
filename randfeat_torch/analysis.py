"""Sweep analysis: run records -> one tidy table, a summary, plots, and TensorBoard images.

Reads only ``metrics.json`` records (whichever launcher wrote them); never trains and never
parses logs or folder names. A partial sweep is fine: failed, diverged, unfinished, unreadable
and missing runs are listed in the summary and left out of the plots.
"""

from __future__ import annotations

import json
import math
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
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import OmegaConf

from randfeat_torch.record import METRICS, RECORD_NAME

GROUPS = ("experiment", "fit", "model", "optimizer", "target", "input")
TABLE_NAME, SUMMARY_NAME, TENSORBOARD_DIR = "results.csv", "summary.txt", "aggregate"
THEORY_LINES = {"theory.best_degree_1": "best linear", "theory.best_degree_2": "best quadratic"}


@dataclass
class Aggregate:
    """The table (one row per run and replica), the runs that are not usable, and outputs."""

    table: pd.DataFrame
    problems: pd.DataFrame
    swept: list[str]
    summary: str
    figures: dict[str, Path]


def _flatten(node: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in node.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{name}."))
        else:
            flat[name] = tuple(value) if isinstance(value, list) else value
    return flat


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
    """Number of jobs the sweep asked for, from Hydra's ``multirun.yaml`` (None if absent)."""
    path = root / "multirun.yaml"
    if not path.exists():
        return None
    cfg = OmegaConf.load(path)
    overrides = list(cfg.hydra.overrides.task)
    overrides += [f"{k}={v}" for k, v in (cfg.hydra.sweeper.get("params") or {}).items()]
    count = 1
    for override in OverridesParser.create().parse_overrides(overrides):
        if override.is_sweep_override():
            count *= len(list(override.sweep_string_iterator()))
    return count


def read_records(root: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(table: one row per run and replica, problems: one row per run that is not ``ok``)."""
    rows, problems = [], []
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
        config = _flatten(record.get("config") or {})
        choices = record.get("choices") or {}
        metrics = record.get("metrics") or {}
        theory = record.get("theory") or {}
        for r in range(int(config.get("replicas", 1))):
            row = {"run": run, "replica": r, "status": status, **config}
            row.update({g: choices.get(g, config.get(f"{g}.name")) for g in GROUPS})
            row["replica_seed"] = config.get("seed", 0) + r
            if isinstance(config.get("optimizer.lr"), tuple):  # one rate per replica
                row["optimizer.lr"] = config["optimizer.lr"][r]
            row.update({m: _replica_value(metrics.get(m), r) for m in METRICS})
            row.update({f"theory.{k}": _replica_value(v, r) for k, v in theory.items()})
            row["wall_time_s"] = record.get("wall_time_s")
            rows.append(row)
    expected = expected_jobs(root)
    if expected is not None and expected > len(job_dirs):
        never = expected - len(job_dirs)
        problems.append(
            {"run": "-", "status": "missing", "error": f"{never} of {expected} jobs never started"}
        )
    return pd.DataFrame(rows), pd.DataFrame(problems, columns=["run", "status", "error"])


def swept_keys(table: pd.DataFrame) -> list[str]:
    """Config keys that take more than one value across the runs (seeds aside)."""
    skip = {"run", "replica", "status", "replica_seed", "wall_time_s", *METRICS}
    keys = []
    for column in table.columns:
        # The groups' copies of the knobs, and their names (the group columns say it better).
        copied = column.endswith((".d", ".width", ".replicas", ".name"))
        if column in skip or column.startswith("theory.") or copied:
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
        return table["model"].astype(str)
    return table[parts].astype(str).agg(" / ".join, axis=1)


def _stats(frame: pd.DataFrame, keys: list[str]) -> pd.DataFrame:
    """Mean, min and max of the test error over seeds and replicas at each point."""
    grouped = frame.groupby(keys, sort=True)["test_error"]
    return grouped.agg(["mean", "min", "max", "count"]).reset_index()


def width_to_reach(widths: np.ndarray, errors: np.ndarray, eps: float) -> float:
    """The width at which the error first falls to eps, interpolated in log-log; NaN if never."""
    order = np.argsort(widths)
    widths, errors = widths[order], errors[order]
    if errors[0] <= eps:
        return float(widths[0])
    for i in range(1, len(widths)):
        if errors[i] <= eps:
            t = (math.log(eps) - math.log(errors[i - 1])) / (
                math.log(errors[i]) - math.log(errors[i - 1])
            )
            return float(
                math.exp(math.log(widths[i - 1]) + t * math.log(widths[i] / widths[i - 1]))
            )
    return float("nan")


def _panels(n: int, title: str) -> tuple[plt.Figure, list[plt.Axes]]:
    fig, axes = plt.subplots(
        1, n, figsize=(4.2 * n, 3.6), squeeze=False, sharey=True, layout="constrained"
    )
    fig.suptitle(title)
    return fig, list(axes[0])


def _theory_lines(ax: plt.Axes, frame: pd.DataFrame) -> None:
    """Horizontal lines at the best linear / quadratic errors, one per distinct value, named
    when there are few enough to read."""
    for column, name in THEORY_LINES.items():
        if column not in frame:
            continue
        values = np.unique(frame[column].dropna().round(6))
        values = values[values > 0]  # log axes: a zero residual has no line
        for value in values:
            ax.axhline(value, color="gray", ls="--" if column.endswith("_1") else ":", lw=0.9)
            if len(values) <= 2:
                ax.annotate(
                    f"{name} {value:.3g}",
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


def _line_with_band(ax: plt.Axes, frame: pd.DataFrame, x: str, color: str, label: str) -> None:
    """The mean test error against ``x``, and its min-max band over seeds and replicas."""
    s = _stats(frame, [x])
    ax.plot(s[x], s["mean"], "o-", color=color, label=label)
    ax.fill_between(s[x], s["min"], s["max"], color=color, alpha=0.2)


def _exact_rf_points(ax: plt.Axes, frame: pd.DataFrame, x: str, color: str) -> None:
    """The exact RF population error (mean over seeds and replicas) against ``x``, as crosses,
    where the runs have it."""
    exact = frame.get("theory.rf_population_error")
    if exact is not None and exact.notna().any():
        exact = frame.groupby(x)["theory.rf_population_error"].mean()
        ax.plot(exact.index, exact.values, "x", color=color, ms=8, label="exact RF")


def plot_error_vs_width(ok: pd.DataFrame) -> plt.Figure | None:
    """Normalised test error vs width (log-log): a panel per method, a line per d, the band
    over seeds and replicas, theory overlays (best linear / quadratic lines, exact RF points)."""
    if ok["width"].nunique() < 2:
        return None
    labels = sorted(ok["label"].unique())
    fig, axes = _panels(len(labels), "test error vs width")
    for ax, label in zip(axes, labels, strict=True):
        frame = ok[ok["label"] == label]
        for i, (d, by_d) in enumerate(frame.groupby("d")):
            _line_with_band(ax, by_d, "width", f"C{i}", f"d={d}")
            _exact_rf_points(ax, by_d, "width", f"C{i}")
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
    """Per method and d, the width at which the mean error reaches eps (NaN if never)."""
    rows = []
    for (label, d), frame in ok.groupby(["label", "d"]):
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


def summarise(
    table: pd.DataFrame, problems: pd.DataFrame, swept: list[str], needed: pd.DataFrame, eps: float
) -> str:
    """A short text report: counts by status, the unusable runs, the mean error per point."""
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
        own = [k for k in swept if k not in GROUPS and k.split(".")[0] not in GROUPS]
        keys = list(dict.fromkeys(k for k in ["label", "d", "width", *own] if k in ok))
        stats = ok.groupby(keys, dropna=False)["test_error"].agg(["mean", "std", "count"])
        lines.append("mean normalised test error (std over seeds and replicas):")
        lines.append(stats.to_string(float_format=lambda v: f"{v:.4g}"))
    if not needed.empty:
        lines.append(f"width needed for test error <= {eps:g} (NaN: not reached in the sweep):")
        lines.append(needed.to_string(index=False, float_format=lambda v: f"{v:.4g}"))
    return "\n".join(lines) + "\n"


def aggregate(root: Path | str, eps: float = 0.1, out: Path | str | None = None) -> Aggregate:
    """Read every record under ``root``; write results.csv, summary.txt and the PNG plots to
    ``out`` (default: ``root``), and the plots as images to the TensorBoard run
    ``root/aggregate``."""
    root = Path(root)
    out = Path(out) if out is not None else root
    out.mkdir(parents=True, exist_ok=True)
    table, problems = read_records(root)
    swept = swept_keys(table) if not table.empty else []
    figures: dict[str, Path] = {}
    needed = pd.DataFrame(columns=["label", "d", "width_needed"])
    if not table.empty:
        table["label"] = _label(table)
        columns = ["run", "replica", "status", "label", *GROUPS, *swept, "d", "width"]
        columns += ["replica_seed", *METRICS]
        columns += [*sorted(c for c in table.columns if c.startswith("theory.")), "wall_time_s"]
        table = table[list(dict.fromkeys(c for c in columns if c in table))]
        table.to_csv(out / TABLE_NAME, index=False)
        ok = table[(table["status"] == "ok") & np.isfinite(table["test_error"])]
        if not ok.empty:
            needed = width_needed(ok, eps) if ok["width"].nunique() > 1 else needed
            plots = {
                "error_vs_width": plot_error_vs_width(ok),
                "error_vs_d": plot_error_vs_d(ok),
                "width_needed": plot_width_needed(needed, eps),
            }
            figures = _save_figures({k: v for k, v in plots.items() if v is not None}, out, root)
    summary = summarise(table, problems, swept, needed, eps)
    (out / SUMMARY_NAME).write_text(summary)
    return Aggregate(table, problems, swept, summary, figures)


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
