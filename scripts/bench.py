"""Speed of randfeat_torch, as ratios against baselines measured in the same process.

``python scripts/bench.py [--quick] [--device cpu|cuda] [--out bench.json]``

Every figure is a ratio against a baseline timed in this process, interleaved with it
(baseline, ours, baseline, ours, ...), median of the repeats, so that a noisy or shared machine
moves both sides alike:

- single model: the project's trainer vs a plain hand-written PyTorch loop (nn.Sequential,
  torch.optim.SGD, a fresh Gaussian batch each step), d=64, width=1024, batch=256, SGD, for the
  trainable and the frozen model: steps/s ratio;
- replicas: R=16 replicas at d=32, width=256, batch=128 vs 16 runs of the plain loop one after
  another: model-steps/s ratio;
- large shapes: d=256, width=4096, batch=1024, trainable: achieved FLOP/s of the training step
  as a fraction of the fp32 matmul peak measured here (a large square matmul);
- closed form vs SGD: frozen net, d=64, width=2048, unit ReLU neuron: time for ridge to fit
  the exact population moments (``optimizer.population=true``) vs time for SGD, at its best
  rate, to come within 10% of ridge's test error; measured beside it, with no target, ridge
  on n_train=40000 samples against the same SGD run;
- width path: frozen net, d=16, width=2048, ReLU neuron, absolute penalty: the seconds of the
  ridge fit with ``optimizer.width_path=true`` (the best error at every width 1..2048) over
  those of the plain fit at width 2048, on the exact population moments (the factor is never
  kept between runs here) and on n_train=20000 samples; the test evaluation at the solved
  widths is outside both fits' time, as the plain fit's evaluation is;
- penalty path (measured, no target): K = 11 penalties at P = 2048 (quick: 512) random
  features, ridge at every penalty as ``optimizer.penalty=[...]`` fits it (``penalty_path``:
  one Cholesky per penalty, the eigenvalues once for the degrees of freedom) vs one full
  eigendecomposition that gives every penalty in O(P^2): the ratio is the decomposition's
  seconds over ours (above 1: ours is faster);
- laziness: the seconds of a whole run (default shape, d=32, width=1024, eval_every=200,
  1000 steps) over those of the same run less the laziness measures at its evaluations;
- start-up: ``python train.py steps=1`` end to end vs ``python -c "import torch"``;
- sweep overhead: the seconds per job that ``python train.py -m`` of 64 tiny jobs (quick: 8;
  steps=200, widths 64 and 256) spends beyond its jobs' training steps, with the start-up
  cancelled by a sweep of one job run interleaved with it (see :func:`sweep_overhead`): a
  figure in seconds, not a ratio;
- kernel fit (measured, no target): kernel ridge (``fit=rf_kernel``, d=16) on n_train=20000
  samples (quick: 2000) over ridge on the same samples' random features of width 2048 (quick:
  512): the fits' seconds, one of each (20000^2 float64 is 3.2 GB), with the kernel matrix's
  share and the process's peak resident memory after it;
- compile (measured, no target): the gradient step compiled as ``compile=true`` compiles it vs
  eager, d=64, width=1024, batch=256, and the seconds the compilation took;
- ridge vs scikit-learn (with the optional ``[compare]`` extra): scikit-learn's seconds for
  ``Ridge(solver="cholesky")`` on the features in memory over ours for the sampled fit (frozen,
  no hidden bias, d=64, width=2048, n_train=65536), with the features' products in float64
  (the default) and in float32 (``optimizer.gram_products=float32``): one figure each, the
  three fits timed in turn (see :func:`ridge_vs_sklearn`).

On CUDA every time is taken with CUDA events (see :class:`randfeat_torch.device.Stopwatch`).
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import nn

from randfeat_torch.data import TestSet, training_data
from randfeat_torch.device import Stopwatch
from randfeat_torch.kernels import KERNEL_FITS
from randfeat_torch.models import TwoLayerNet, build_model
from randfeat_torch.paths import CONFIG_DIR, register_resolvers
from randfeat_torch.ridge import (
    CHUNK_ELEMENTS,
    penalty_path,
    relative_lambda,
    sampled_moments,
    solve_centred,
)
from randfeat_torch.solvers import POPULATION_FACTORS, float32_fit, ridge_moments
from randfeat_torch.targets import build_target
from randfeat_torch.trainer import compile_step, train

ROOT = CONFIG_DIR.parent
# figures whose target is a ceiling
AT_MOST = ("startup", "width_path", "width_path_sampled", "laziness", "sweep_overhead")
TARGETS = {
    "single_trainable": 2.0,
    "single_frozen": 1.6,
    "replicas": 10.0,
    "large_fraction_of_peak": 0.80,
    "closed_form": 20.0,
    "closed_form_sampled": None,  # ridge on n_train samples: measured, no target
    "width_path": 1.3,  # path seconds / plain seconds: at most
    "width_path_sampled": 1.3,
    "penalty_path": None,  # one eigendecomposition / a Cholesky per penalty: measured
    "laziness": 1.05,  # run seconds with the laziness measures / without: at most
    "startup": 2.0,
    "sweep_overhead": 0.05,  # seconds per job beyond its training steps: at most
    "compile": None,  # measured to decide where compile=true pays; no target
    "kernel_fit": None,  # kernel ridge seconds / random-features ridge seconds: measured
    "ridge_vs_sklearn": 1.5,  # scikit-learn's seconds / ours, sampled ridge (with [compare])
    "ridge_vs_sklearn_float32": 1.5,  # the same with optimizer.gram_products=float32
}


def plain_loop(
    d: int, width: int, batch: int, steps: int, frozen: bool, device: torch.device
) -> float:
    """What a researcher writes by hand; returns steps/s (after one warm-up step)."""
    gen = torch.Generator(device=device).manual_seed(0)
    w_star = torch.randn(d, device=device, generator=gen)
    w_star /= w_star.norm()
    net = nn.Sequential(nn.Linear(d, width), nn.ReLU(), nn.Linear(width, 1)).to(device)
    if frozen:
        net[0].requires_grad_(False)
    opt = torch.optim.SGD([p for p in net.parameters() if p.requires_grad], lr=0.01, momentum=0.9)

    def step() -> None:
        x = torch.randn(batch, d, device=device, generator=gen)
        y = torch.relu(x @ w_star)
        loss = (net(x).squeeze(-1) - y).square().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    step()
    clock = Stopwatch(device)
    start = clock.mark()
    for _ in range(steps):
        step()
    return steps / clock.since(start)


class Trainer:
    """The project's trainer on a composed config; ``steps_per_s`` times the step loop."""

    def __init__(self, device: str) -> None:
        self.device = device
        register_resolvers()
        self.tmp = Path(tempfile.mkdtemp(prefix="randfeat-bench-"))
        self.runs = 0

    def run(self, *overrides: str):
        with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
            cfg = compose("train", [f"device={self.device}", "progress=false", *overrides])
        self.runs += 1
        return train(cfg, self.tmp / f"run{self.runs}")

    def steps_per_s(self, d: int, width: int, batch: int, steps: int, *extra: str) -> float:
        shape = [f"d={d}", f"width={width}", f"batch_size={batch}", f"steps={steps}"]
        result = self.run(*shape, f"eval_every={steps}", "n_test=2", *extra)
        return result.steps_per_s


def interleaved(baseline: Callable[[], float], ours: Callable[[], float], repeats: int) -> dict:
    """Median rates of both sides, timed alternately, and their ratio (ours / baseline)."""
    base_rates, our_rates = [], []
    for _ in range(repeats):
        base_rates.append(baseline())
        our_rates.append(ours())
    base, mine = statistics.median(base_rates), statistics.median(our_rates)
    return {"baseline": base, "ours": mine, "ratio": mine / base}


def matmul_peak(device: torch.device, n: int, repeats: int) -> float:
    """fp32 FLOP/s of an n x n x n matmul, the median of ``repeats`` (after a warm-up)."""
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    torch.mm(a, b)
    clock = Stopwatch(device)
    rates = []
    for _ in range(repeats):
        start = clock.mark()
        torch.mm(a, b)
        rates.append(2 * n**3 / clock.since(start))
    return statistics.median(rates)


def compiled_vs_eager(device: torch.device, steps: int, repeats: int) -> dict:
    """Gradient steps/s of the two-layer net (d=64, width=1024, batch=256) compiled as the
    trainer's ``compile=true`` does vs eager, the seconds the first compiled call took, and the
    steps after which compiling pays."""
    net = TwoLayerNet(64, 1024, device=device)
    x, y = torch.randn(256, 64, device=device), torch.randn(256, device=device)
    clock = Stopwatch(device)
    start = clock.mark()
    compiled = compile_step(net.loss_gradients, device)
    compiled(x, y)
    compile_s = clock.since(start)

    def rate(gradients: Callable) -> float:
        start = clock.mark()
        for _ in range(steps):
            gradients(x, y)
        return steps / clock.since(start)

    figure = interleaved(lambda: rate(net.loss_gradients), lambda: rate(compiled), repeats)
    saved_per_step = 1 / figure["baseline"] - 1 / figure["ours"]
    # the steps after which compiling has paid for itself (None: it never does)
    break_even = round(compile_s / saved_per_step) if saved_per_step > 0 else None
    return {**figure, "compile_s": compile_s, "break_even_steps": break_even}


SGD_RATES = (0.2, 0.4, 0.8)  # SGD gets its best rate of these (the default is 0.2)
SGD_BUDGET = 50  # SGD gets this many times the population fit's time


def first_within(events: EventAccumulator, replica: int, goal: float) -> int | None:
    """The first evaluated step at which this replica's test error is <= goal, or None."""
    reached = [e.step for e in events.Scalars(f"test/error/replica_{replica}") if e.value <= goal]
    return reached[0] if reached else None


def closed_form_vs_sgd(ours: Trainer, quick: bool, repeats: int) -> dict[str, dict]:
    """Seconds each closed-form fit takes vs seconds SGD takes to come within 10% of its test
    error, all without set-up and evaluation, on the same held-out samples. The fits: ridge on
    the exact population moments (``optimizer.population=true``, the target figure) and ridge
    on n_train samples (no target). Each fit is timed ``repeats`` times, interleaved with a
    100-step SGD probe (medians). SGD then runs once, at each rate of SGD_RATES at once
    (replicas with one rate each, on the same batches), and is timed at the first rate to get
    there, at the probe's speed of a single run; its budget is SGD_BUDGET times the population
    fit (and at least the sampled fit), and where no rate gets there the ratio is a lower
    bound."""
    common = ["model=frozen", "d=64", "width=512" if quick else "width=2048", "n_test=5000"]
    fits = {
        "closed_form": ["optimizer=ridge", "optimizer.population=true"],
        "closed_form_sampled": ["optimizer=ridge", f"n_train={4000 if quick else 40000}"],
    }
    errors, timing = {}, {}

    def probe_rate() -> float:
        return ours.run(*common, "steps=100", "eval_every=100").steps_per_s

    for name, overrides in fits.items():

        def fit_rate(overrides: list[str] = overrides, name: str = name) -> float:
            result = ours.run(*common, *overrides)
            errors[name] = result.test_error  # the same every time: fixed seeds
            return result.steps_per_s  # the fit is one "step"

        timing[name] = interleaved(probe_rate, fit_rate, repeats)
    fit_s = {name: 1 / t["ours"] for name, t in timing.items()}
    sgd_rate = statistics.median(t["baseline"] for t in timing.values())
    budget_s = max(SGD_BUDGET * fit_s["closed_form"], fit_s["closed_form_sampled"])
    steps = max(100, int(budget_s * sgd_rate) // 100 * 100)
    rates = ",".join(map(str, SGD_RATES))
    sgd = ours.run(
        *common,
        f"steps={steps}",
        "eval_every=100",
        f"replicas={len(SGD_RATES)}",
        f"optimizer.lr=[{rates}]",
    )
    events = EventAccumulator(str(sgd.run_dir))
    events.Reload()
    figures = {}
    for name in fits:
        goal = 1.1 * errors[name]
        first = {lr: first_within(events, r, goal) for r, lr in enumerate(SGD_RATES)}
        reached = {lr: step for lr, step in first.items() if step is not None}
        best_lr = min(reached, key=reached.get) if reached else None
        sgd_steps = reached[best_lr] if reached else steps
        sgd_s = sgd_steps / sgd_rate
        figures[name] = {
            "fit_error": errors[name],
            "fit_s": fit_s[name],
            "sgd_steps_per_s": sgd_rate,
            "sgd_best_lr": best_lr,
            "sgd_steps_to_goal": sgd_steps,
            "sgd_steps_to_goal_by_lr": {str(lr): step for lr, step in first.items()},
            "sgd_s": sgd_s,
            "sgd_errors_at_budget": sgd.metrics["test_error"].tolist(),
            "lower_bound": not reached,
            "ratio": sgd_s / fit_s[name],
        }
    return figures


def ridge_vs_sklearn(quick: bool, repeats: int) -> dict[str, dict]:
    """The sampled ridge fit (``optimizer=ridge``, frozen, no hidden bias, d=64, width=2048,
    n_train=65536; quick: width=512, n_train=8192) against scikit-learn's
    ``Ridge(solver="cholesky")`` on the same samples' features held in memory (float32), with
    the same penalty (alpha = n lambda): seconds of each, timed in turn, medians, and their
    test errors. Ours is timed with the features' products in float64 (the default) and in
    float32 (``optimizer.gram_products=float32``, its rounding check and any refit in float64
    included), one figure each. Ours streams in bounded memory and its seconds include drawing
    the samples and their features; scikit-learn's are the fit alone. Empty without
    scikit-learn (``pip install -e .[compare]``)."""
    try:
        from sklearn.linear_model import Ridge
    except ImportError:
        return {}
    register_resolvers()
    n, width = (8192, 512) if quick else (65536, 2048)
    overrides = ["model=frozen", "model.bias=false", "optimizer=ridge", "d=64", "device=cpu"]
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose("train", [*overrides, f"width={width}", f"n_train={n}"])
    device = torch.device("cpu")
    target = build_target(cfg.target, device)
    model, test_set = build_model(cfg.model, cfg.seed, device), TestSet(cfg, target, device)
    errors: dict[str, float] = {}
    checks: dict[str, object] = {}
    lam: list[float] = []

    def test_error(beta: torch.Tensor, c: float) -> float:
        f = model.ridge_features(test_set.x)[0].double() @ beta.double() + c
        return float((f - test_set.y.double()).square().mean() / test_set.variance)

    def ours(products: str) -> float:
        data = training_data(cfg, target, device)  # the same seed, the same samples each time
        clock = time.perf_counter()
        if products == "float32":
            fit, checks[products] = float32_fit(cfg, model, data)
        else:
            moments = ridge_moments(cfg, model, data, None)
            fit = solve_centred(moments, relative_lambda(moments.cov, cfg.optimizer.penalty))
        seconds = time.perf_counter() - clock
        errors[products] = test_error(fit.beta[0], float(fit.c[0]))
        if products == "float64":
            lam[:] = [float(fit.penalty[0])]
        return seconds

    data = training_data(cfg, target, device)
    chunk = max(1, CHUNK_ELEMENTS // width)
    features, targets = torch.empty(n, width), torch.empty(n)
    with torch.no_grad():
        for start in range(0, n, chunk):
            x, y = data.draw(min(chunk, n - start))
            features[start : start + len(y)] = model.ridge_features(x)[0]
            targets[start : start + len(y)] = y
    features_np, targets_np = features.numpy(), targets.numpy()

    def sklearn() -> float:
        alpha = n * lam[0]  # sklearn: |y - X b - c|^2 + alpha |b|^2
        clock = time.perf_counter()
        fitted = Ridge(alpha=alpha, solver="cholesky").fit(features_np, targets_np)
        seconds = time.perf_counter() - clock
        errors["sklearn"] = test_error(torch.from_numpy(fitted.coef_), float(fitted.intercept_))
        return seconds

    ours("float64")  # the penalty, for scikit-learn's alpha
    seconds: dict[str, list[float]] = {"sklearn": [], "float64": [], "float32": []}
    for _ in range(repeats):  # in turn, so that a slow spell of the machine hits all three
        seconds["sklearn"].append(sklearn())
        for products in ("float64", "float32"):
            seconds[products].append(ours(products))
    median = {k: statistics.median(v) for k, v in seconds.items()}
    figures = {}
    for name, products in (
        ("ridge_vs_sklearn", "float64"),
        ("ridge_vs_sklearn_float32", "float32"),
    ):
        figures[name] = {
            "sklearn_s": median["sklearn"],
            "ours_s": median[products],
            "ratio": median["sklearn"] / median[products],
            "error": errors[products],
            "sklearn_error": errors["sklearn"],
            "shape": {"d": 64, "width": width, "n_train": n},
        }
    figures["ridge_vs_sklearn_float32"]["check"] = checks["float32"]
    return figures


def width_path_cost(ours: Trainer, quick: bool, repeats: int) -> dict[str, dict]:
    """Seconds of the ridge fit with the width path over those of the plain fit, population and
    sampled (see the module docstring)."""
    width = 512 if quick else 2048
    common = ["model=frozen", "optimizer=ridge", "optimizer.penalty_scale=absolute"]
    common += ["d=16", f"width={width}", "n_test=100", "target=relu_neuron_hard"]
    kinds = {
        "width_path": ["optimizer.population=true"],
        "width_path_sampled": [f"n_train={5000 if quick else 20000}"],
    }
    figures = {}
    for name, extra in kinds.items():

        def fit_seconds(path: bool, extra: list[str] = extra) -> float:
            POPULATION_FACTORS.key = None  # a factor kept from the last run would cost nothing
            run = ours.run(*common, *extra, f"optimizer.width_path={str(path).lower()}")
            return 1 / run.steps_per_s

        fig = interleaved(lambda: fit_seconds(False), lambda: fit_seconds(True), repeats)
        figures[name] = {"plain_s": fig["baseline"], "path_s": fig["ours"], "ratio": fig["ratio"]}
        figures[name]["width"] = width
    return figures


def penalty_path_vs_eigh(quick: bool, repeats: int) -> dict:
    """Seconds of one eigendecomposition with every penalty from it, over those of
    ``penalty_path`` (a Cholesky per penalty)."""
    width, penalties = (512 if quick else 2048), [10.0**k for k in range(-8, 3)]
    net = TwoLayerNet(d=16, width=width, freeze_first_layer=True, seed=0)
    gen = torch.Generator().manual_seed(0)

    def draw(m: int) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.randn(m, 16, generator=gen)
        return x, torch.relu(x[:, 0])

    moments = sampled_moments(net.ridge_features, draw, 4 * width, 1, width, torch.device("cpu"))
    lam = torch.tensor([penalties], dtype=torch.float64)

    def seconds(work: Callable[[], object]) -> float:
        start = time.perf_counter()
        work()
        return time.perf_counter() - start

    def eigh_all() -> None:
        e, vectors = torch.linalg.eigh(moments.cov)
        s = vectors.mT @ moments.q.unsqueeze(-1)
        vectors @ (s / (e.unsqueeze(-1) + lam.unsqueeze(1)))  # beta at every penalty

    fig = interleaved(
        lambda: 1 / seconds(eigh_all),
        lambda: 1 / seconds(lambda: penalty_path(moments, lam)),
        repeats,
    )
    return {"eigh_s": 1 / fig["baseline"], "path_s": 1 / fig["ours"], "ratio": fig["ratio"]} | {
        "width": width,
        "penalties": len(penalties),
    }


def kernel_fit_cost(ours: Trainer, quick: bool) -> dict:
    """Seconds of the kernel fit at n_train samples over those of the ridge fit on the same
    samples' random features (see the module docstring)."""
    n, width = (2000, 512) if quick else (20000, 2048)
    common = ["optimizer=ridge", "d=16", f"n_train={n}", "n_test=1000", "target=polynomial"]
    ridge = ours.run("model=frozen", f"width={width}", *common)
    KERNEL_FITS.key = None  # a fit kept from an earlier run would cost nothing
    kernel = ours.run("fit=rf_kernel", *common)
    record = json.loads((kernel.run_dir / "metrics.json").read_text())["kernel"]
    ridge_s, kernel_s = 1 / ridge.steps_per_s, 1 / kernel.steps_per_s
    return {
        "kernel_s": kernel_s,
        "matrix_s": record["matrix_s"],
        "ridge_s": ridge_s,
        "ratio": kernel_s / ridge_s,
        "max_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
        "errors": {"kernel": kernel.test_error, "ridge": ridge.test_error},
        "shape": {"d": 16, "n_train": n, "width": width},
    }


def laziness_overhead(ours: Trainer, quick: bool, repeats: int) -> dict:
    """A whole run's seconds over the same run's seconds less those of the laziness measures
    (the record's ``laziness_s``, timed around them), at the default shape and ``eval_every``:
    the median over ``repeats`` runs. Timed inside one run, so that the machine's noise, which
    moves two separate runs by more than 5%, cancels."""
    steps = 200 if quick else 1000
    ratios, seconds = [], []
    for _ in range(repeats):
        result = ours.run("model=trainable", f"steps={steps}", "n_test=2000")
        lazy = json.loads((result.run_dir / "metrics.json").read_text())["laziness_s"]
        ratios.append(result.wall_time_s / (result.wall_time_s - lazy))
        seconds.append(lazy)
    return {"laziness_s": statistics.median(seconds), "ratio": statistics.median(ratios)}


def startup_seconds(command: list[str], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        subprocess.run(command, check=True, capture_output=True, cwd=ROOT)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def sweep_overhead(ours: Trainer, quick: bool, repeats: int) -> dict:
    """Seconds per job that a multirun of n tiny jobs spends beyond its jobs' training steps:
    ``python train.py -m steps=200 width=64,256 seed=range(n/2)`` as a user types it (with
    ``threads=1``, so that the jobs' own time is steadier on a shared machine), and the same
    sweep of one job, interleaved, ``repeats`` times. Per pair, (wall_n - wall_1 - (steps_n -
    steps_1)) / (n - 1), where steps_k is the sum over the sweep's jobs of their training
    steps' seconds (steps_done / steps_per_s in each record): what Python's and torch's
    start-up and the sweep's fixed costs take cancels, and what stays is each job's
    composition, Hydra's job bookkeeping, the run's set-up, evaluations, record and TensorBoard
    files. The median of the pairs; ``beyond_evaluations_s`` the same less the evaluations too
    (the records' evaluation_s: two of n_test=10000 points here), ``in_run_s`` the median job's
    share inside ``train`` (its record's wall_time_s less its steps)."""
    jobs = 8 if quick else 64
    sweeps = 0

    def sweep(n: int) -> tuple[float, float, float, list[float]]:
        nonlocal sweeps
        sweeps += 1
        folder = ours.tmp / f"sweep{sweeps}"
        grid = ["width=64,256", f"seed=range({n // 2})"] if n > 1 else ["width=64", "seed=0"]
        command = [sys.executable, "train.py", "-m", "steps=200", "threads=1", *grid]
        start = time.perf_counter()
        subprocess.run(
            [*command, f"hydra.sweep.dir={folder}"], check=True, capture_output=True, cwd=ROOT
        )
        wall = time.perf_counter() - start
        records = [json.loads(p.read_text()) for p in folder.glob("*/metrics.json")]
        assert len(records) == n and all(r["status"] == "ok" for r in records), folder
        steps = [r["steps_done"] / r["steps_per_s"] for r in records]
        in_run = [r["wall_time_s"] - s for r, s in zip(records, steps, strict=True)]
        return wall, sum(steps), sum(r["evaluation_s"] for r in records), in_run

    overheads, beyond, walls, singles, in_run = [], [], [], [], []
    for _ in range(repeats):
        single, single_steps, single_evaluations, _ = sweep(1)
        wall, steps, evaluations, inside = sweep(jobs)
        overheads.append((wall - single - (steps - single_steps)) / (jobs - 1))
        beyond.append(overheads[-1] - (evaluations - single_evaluations) / (jobs - 1))
        walls.append(wall)
        singles.append(single)
        in_run += inside
    return {
        "ratio": statistics.median(overheads),  # seconds per job: at most the target
        "beyond_evaluations_s": statistics.median(beyond),
        "jobs": jobs,
        "sweep_s": statistics.median(walls),
        "one_job_sweep_s": statistics.median(singles),
        "in_run_s": statistics.median(in_run),
        "overheads_s": overheads,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a short run that checks every figure")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--out", type=Path, default=Path("bench.json"))
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("bench: --device cuda, but CUDA is not available here", file=sys.stderr)
        return 2
    device = torch.device(args.device)
    quick, cuda = args.quick, device.type == "cuda"
    repeats = 3 if quick else 7
    steps = 30 if quick else 1000 if cuda else 300  # a GPU step takes well under a millisecond
    ours = Trainer(args.device)
    figures: dict[str, dict] = {}

    for regime in ("trainable", "frozen"):
        figures[f"single_{regime}"] = interleaved(
            lambda regime=regime: plain_loop(64, 1024, 256, steps, regime == "frozen", device),
            lambda regime=regime: ours.steps_per_s(
                64, 1024, 256, steps, f"model={regime}", "optimizer.lr=0.01"
            ),
            repeats,
        )

    replicas = 16
    figures["replicas"] = interleaved(
        lambda: (
            replicas
            / sum(1 / plain_loop(32, 256, 128, steps, False, device) for _ in range(replicas))
        ),
        lambda: (
            replicas
            * ours.steps_per_s(32, 256, 128, steps, f"replicas={replicas}", "optimizer.lr=0.01")
        ),
        repeats,
    )

    d, width, batch = (64, 1024, 256) if quick else (256, 4096, 1024)
    flops_per_step = 4 * batch * d * width + 6 * batch * width  # no gradient for the input x
    peak_size = 1024 if quick else 8192 if cuda else 2048  # a GPU needs a larger one to fill
    large = interleaved(
        lambda: matmul_peak(device, peak_size, 3),
        lambda: (
            flops_per_step
            * ours.steps_per_s(d, width, batch, max(5, steps // 6), "optimizer.lr=0.001")
        ),
        repeats,
    )
    figures["large_fraction_of_peak"] = {
        "peak_flops": large["baseline"],
        "achieved_flops": large["ours"],
        "ratio": large["ratio"],
        "shape": {"d": d, "width": width, "batch": batch},
    }

    figures.update(closed_form_vs_sgd(ours, quick, 2 if quick else 5))

    figures["compile"] = compiled_vs_eager(device, steps, repeats)
    figures.update(width_path_cost(ours, quick, 1 if quick else 5))
    figures["penalty_path"] = penalty_path_vs_eigh(quick, 1 if quick else 3)
    figures["laziness"] = laziness_overhead(ours, quick, 2 if quick else 5)
    figures["kernel_fit"] = kernel_fit_cost(ours, quick)
    figures.update(ridge_vs_sklearn(quick, 2 if quick else 5))

    startups = 1 if quick else repeats  # a quick run checks the row, not the figure
    bare = startup_seconds([sys.executable, "-c", "import torch"], startups)
    app = startup_seconds(
        [
            sys.executable,
            "train.py",
            "steps=1",
            "n_test=100",
            "width=16",
            "device=cpu",
            "resume=false",  # the same folder each time: train again, do not skip
            f"hydra.run.dir={ours.tmp / 'startup'}",
        ],
        startups,
    )
    figures["startup"] = {"import_torch_s": bare, "train_py_s": app, "ratio": app / bare}
    figures["sweep_overhead"] = sweep_overhead(ours, quick, 1 if quick else 3)

    lines = [f"{'figure':<24}{'ratio':>8}{'target':>10}  detail"]
    for name, fig in figures.items():
        target = TARGETS[name]
        sign = "<=" if name in AT_MOST else ">="
        if target is None:
            verdict, goal = "measured", ""
        else:
            met = fig["ratio"] <= target if name in AT_MOST else fig["ratio"] >= target
            verdict, goal = "met" if met else "MISSED", f"{sign}{target:g}"
        detail = {k: v for k, v in fig.items() if k != "ratio"}
        detail = ", ".join(
            f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in detail.items()
        )
        lines.append(f"{name:<24}{fig['ratio']:>8.3g}{goal:>10}  {verdict}; {detail}")
    print("\n".join(lines))
    info = {
        "device": torch.cuda.get_device_name() if cuda else "cpu",
        "threads": torch.get_num_threads(),
        "float32_matmul_precision": torch.get_float32_matmul_precision(),  # "highest": no TF32
        "torch": torch.__version__,
        "quick": quick,
    }
    args.out.write_text(
        json.dumps({"info": info, "figures": figures, "targets": TARGETS}, indent=2)
    )
    print(f"wrote {args.out} ({info})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
