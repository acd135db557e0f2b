"""Statistics for sweeps: intervals over seeds, the width at which a curve reaches an error, and
the two growth laws (exponential and polynomial in d) fitted side by side.

Pure functions of numbers (numpy arrays); :mod:`randfeat_torch.analysis` applies them to the
run records.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import stats

CONFIDENCE = 0.95


def mean_interval(values: np.ndarray, confidence: float = CONFIDENCE) -> tuple[float, float, float]:
    """(mean, low, high): the Student-t interval for the mean of independent draws (seeds).
    NaN bounds for fewer than two finite values; NaN values are left out."""
    values = np.asarray(values, dtype=float)
    values = values[np.isfinite(values)]
    if values.size == 0:
        return math.nan, math.nan, math.nan
    mean = float(values.mean())
    if values.size < 2:
        return mean, math.nan, math.nan
    half = stats.t.ppf(0.5 + confidence / 2, values.size - 1) * stats.sem(values)
    return mean, mean - float(half), mean + float(half)


def width_to_reach(widths: np.ndarray, errors: np.ndarray, eps: float) -> float:
    """The smallest width at which the error falls to eps, interpolated linearly in log width
    against log error between the two grid points around the first crossing; NaN if the curve
    never gets there (not reached by its largest width)."""
    order = np.argsort(widths)
    widths, errors = np.asarray(widths, float)[order], np.asarray(errors, float)[order]
    below = np.flatnonzero(errors <= eps)
    if below.size == 0:
        return math.nan
    i = int(below[0])
    if i == 0:
        return float(widths[0])
    (w0, w1), (e0, e1) = widths[i - 1 : i + 1], errors[i - 1 : i + 1]
    if e1 <= 0:  # a zero error has no logarithm: interpolate the error itself
        t = (e0 - eps) / (e0 - e1)
    else:
        t = (math.log(e0) - math.log(eps)) / (math.log(e0) - math.log(e1))
    return float(math.exp(math.log(w0) + t * math.log(w1 / w0)))


@dataclass
class GrowthFit:
    """log N = intercept + slope * x by least squares over the points, with x = d (exponential
    law, slope = b) or x = log d (polynomial law, slope = k); the slope's 95% interval, the
    residual sum of squares in log N and its root mean square."""

    law: str
    intercept: float
    slope: float
    slope_low: float
    slope_high: float
    rss: float
    rms: float
    points: int


def fit_growth(d: np.ndarray, width: np.ndarray, law: str) -> GrowthFit | None:
    """The :class:`GrowthFit` of ``law`` (``exponential`` or ``polynomial``) to widths at d, or
    None with fewer than three distinct d (two points fit either law exactly)."""
    d, width = np.asarray(d, float), np.asarray(width, float)
    keep = np.isfinite(width) & (width > 0)
    d, width = d[keep], width[keep]
    if np.unique(d).size < 3:
        return None
    x = d if law == "exponential" else np.log(d)
    fit = stats.linregress(x, np.log(width))
    residuals = np.log(width) - (fit.intercept + fit.slope * x)
    rss = float(np.sum(residuals**2))
    half = stats.t.ppf(0.5 + CONFIDENCE / 2, d.size - 2) * fit.stderr
    return GrowthFit(
        law,
        float(fit.intercept),
        float(fit.slope),
        float(fit.slope - half),
        float(fit.slope + half),
        rss,
        math.sqrt(rss / d.size),
        int(d.size),
    )
