"""The width path: the error at every prefix width from one factorisation equals separate fits
of the first P units, for population and sampled moments; its record, cache and refusals."""

from __future__ import annotations

import json

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from randfeat_torch import solvers
from randfeat_torch.cli import load_config
from randfeat_torch.config import ConfigError
from randfeat_torch.models import TwoLayerNet
from randfeat_torch.ridge import (
    CentredMoments,
    NotPositiveDefinite,
    factorise,
    path_widths,
    sampled_moments,
    solve_centred,
    width_path,
)
from randfeat_torch.solvers import ridge_moments
from randfeat_torch.targets import build_target, random_direction
from randfeat_torch.theory import relu_neuron_sum, relu_population_moments
from tests.conftest import SMALL

EPS64 = torch.finfo(torch.float64).eps
PENALTY_U = 1e-5  # lambda on |u|^2: keeps cond(Cov + lambda) near 1e6 at these widths
PATH = [
    "model=frozen",
    "optimizer=ridge",
    "optimizer.width_path=true",
    "optimizer.penalty_scale=absolute",
]


@pytest.fixture(autouse=True)
def fresh_factor_cache():
    """No factor kept from another test: each test sees the cache as a new process does."""
    solvers.POPULATION_FACTORS.key = solvers.POPULATION_FACTORS.factor = None
    yield
    solvers.POPULATION_FACTORS.key = solvers.POPULATION_FACTORS.factor = None


def frozen_net(width: int, parameterization: str = "ntk", d: int = 6) -> TwoLayerNet:
    return TwoLayerNet(
        d=d,
        width=width,
        replicas=2,
        freeze_first_layer=True,
        parameterization=parameterization,
        seed=3,
    )


def prefix(net: TwoLayerNet, width: int) -> TwoLayerNet:
    """A width-``width`` net of the same parameterization holding the first units of ``net``."""
    kind = {1.0: "standard"}.get(net.multiplier, "ntk")
    small = frozen_net(width, kind, net.d)
    with torch.no_grad():
        small.w.copy_(net.w[:, :width])
        small.b.copy_(net.b[:, :width])
    return small


def population(net: TwoLayerNet):
    """The centred population moments of net's ridge features for a hard-ish ReLU neuron."""
    target = relu_neuron_sum(random_direction(net.d, 0, torch.device("cpu")).double() * 3, -2.0)
    m = net.multiplier
    moments = relu_population_moments(net.w, net.b, target)
    cov, cross, mean = moments.cov * m * m, moments.cross * m, moments.mean * m
    y = torch.tensor(target.mean, dtype=torch.float64), torch.tensor(target.variance)
    return CentredMoments(cov, cross, mean, *y)


def tolerance(cov: torch.Tensor, penalty: torch.Tensor) -> float:
    """Cholesky and triangular solves are backward stable: the explained variance agrees to
    about cond(cov + lambda) * eps relative; a factor 10 for the sums on top."""
    system = cov + penalty.view(-1, 1, 1) * torch.eye(cov.shape[-1], dtype=cov.dtype)
    return 10 * float(torch.linalg.cond(system).max()) * EPS64


def separate_objective(moments, penalty: torch.Tensor):
    """A plain ridge fit: its MSE, its objective MSE + lambda |beta|^2 and beta."""
    fit = solve_centred(moments, penalty)
    return fit.train_mse, fit.train_mse + penalty * fit.beta.square().sum(-1), fit.beta


@pytest.mark.parametrize("parameterization", ["ntk", "standard"])
def test_population_path_equals_separate_fits_of_the_first_units(parameterization):
    net = frozen_net(96, parameterization)
    full = population(net)
    penalty = torch.full((2,), PENALTY_U * net.multiplier**2, dtype=torch.float64)
    tol = tolerance(full.cov, penalty)
    assert tol < 1e-8  # the 1e-8 is what these numerics give
    path = width_path(factorise(full.cov.clone(), penalty), full, penalty)
    assert path.widths == path_widths(96, 2**0.5) and path.widths[-1] == 96
    for width in (1, 5, 32, 45, 96):
        small = prefix(net, width)
        alone = population(small)
        lam = torch.full((2,), PENALTY_U * small.multiplier**2, dtype=torch.float64)
        mse, objective, beta = separate_objective(alone, lam)
        variance = float(full.y_var)
        assert torch.allclose(path.objective[:, width - 1], objective, atol=tol * variance, rtol=0)
        if width in path.widths:
            g = path.widths.index(width)
            assert torch.allclose(path.mse[:, g], mse, atol=tol * variance, rtol=0)
            # The same effective output weights u = m * beta, whatever the multiplier.
            u_path = path.beta[:, :width, g] * net.multiplier
            u_alone = beta * small.multiplier
            assert torch.allclose(u_path, u_alone, rtol=1e-5, atol=1e-8 * u_alone.abs().max())
            assert torch.all(path.beta[:, width:, g] == 0)


def test_sampled_path_equals_separate_fits_on_the_same_samples():
    # standard: the multiplier is 1 at every width, so prefix features are the same floats.
    net = frozen_net(80, "standard")
    w_star = random_direction(6, 1, torch.device("cpu"))

    def samples(seed: int):
        gen = torch.Generator().manual_seed(seed)

        def draw(m: int):
            x = torch.randn(m, 6, generator=gen)
            return x, torch.relu(x @ w_star * 2 - 1)

        return draw

    full = sampled_moments(net.ridge_features, samples(0), 4000, 2, 80, torch.device("cpu"))
    penalty = torch.full((2,), PENALTY_U, dtype=torch.float64)
    tol = tolerance(full.cov, penalty)
    path = width_path(factorise(full.cov.clone(), penalty), full, penalty)
    for width in (3, 23, 64, 80):
        small = prefix(net, width)
        alone = sampled_moments(small.ridge_features, samples(0), 4000, 2, width, net.w.device)
        mse, objective, _ = separate_objective(alone, penalty)
        scale = float(full.y_var.max())
        assert torch.allclose(path.objective[:, width - 1], objective, atol=tol * scale, rtol=0)
        g = path.widths.index(width)
        assert torch.allclose(path.mse[:, g], mse, atol=tol * scale, rtol=0)


def test_the_error_falls_with_width_and_matches_the_run_at_full_width(run):
    result = run(*PATH, "optimizer.population=true", "width=128", "replicas=2", "n_test=4000")
    record = json.loads((result.run_dir / "metrics.json").read_text())
    path = record["width_path"]
    assert path["kind"] == "population" and path["normaliser"] == "exact target variance"
    assert path["widths"][:64] == list(range(1, 65)) and path["widths"][-1] == 128
    solved = path["solved"]
    assert solved["widths"] == path_widths(128, 2**0.5)
    for r in range(2):
        errors = path["error"][r]
        assert errors[-1] < 0.5 * errors[0]
        # The width-N point is the run's own fit: float32 population MSE, float64 path.
        train = record["metrics"]["population_error"][r]
        assert solved["error"][r][-1] == pytest.approx(train, rel=1e-5)
        # Test error at N from the float64 prefix evaluation and from the float32 model.
        assert solved["test_error"][r][-1] == pytest.approx(
            record["metrics"]["test_error"][r], rel=1e-4
        )
        # Every run records its output weights u = m * a: the width-N fit's, in float32.
        final = record["output_weights"]["u_max_abs"][r]
        assert final == pytest.approx(solved["u_max_abs"][r][-1], rel=1e-6)
        norms = zip(solved["u_max_abs"][r], solved["u_l2"][r], solved["u_l1"][r], strict=True)
        for max_abs, l2, l1 in norms:
            assert max_abs <= l2 + 1e-12 <= l1 + 2e-12
        for width, max_abs, product in zip(
            solved["widths"],
            solved["u_max_abs"][r],
            solved["width_times_u_max_abs"][r],
            strict=True,
        ):
            assert product == pytest.approx(width * max_abs)
    assert "rf_population_error" not in record["theory"]  # the path holds it, at every width
    events = EventAccumulator(str(result.run_dir))
    events.Reload()
    steps = [e.step for e in events.Scalars("width_path/error/replica_0")]
    assert steps == path["widths"]


def test_a_sampled_path_is_recorded_on_the_train_samples(run):
    result = run(*PATH, "n_train=3000", "width=48", "optimizer.penalty=1e-6")
    path = json.loads((result.run_dir / "metrics.json").read_text())["width_path"]
    assert path["kind"] == "train" and path["widths"][-1] == 48
    assert path["solved"]["error"][-1] == pytest.approx(
        float(result.metrics["fit_error"][0]), rel=1e-5
    )


def test_consecutive_targets_on_the_same_features_factorise_once(run, monkeypatch):
    calls = []
    original = solvers.relu_feature_covariance

    def counted(*args):
        calls.append(1)
        return original(*args)

    monkeypatch.setattr(solvers, "relu_feature_covariance", counted)
    common = [*PATH, "optimizer.population=true", "width=96"]
    first = run(*common, "target=relu_neuron_hard")
    second = run(*common, "target=relu_neuron")
    other_seed = run(*common, "target=relu_neuron", "seed=1")
    assert len(calls) == 2  # the second run reused the first's factor; another seed did not
    records = [json.loads((r.run_dir / "metrics.json").read_text()) for r in (first, second)]
    assert [r["ridge"]["factor_reused"] for r in records] == [False, True]
    solvers.POPULATION_FACTORS.key = None  # the same run with a fresh factor
    fresh = run(*common, "target=relu_neuron")
    again = json.loads((fresh.run_dir / "metrics.json").read_text())
    assert again["ridge"]["factor_reused"] is False
    assert again["width_path"]["error"] == records[1]["width_path"]["error"]
    assert other_seed.metrics["test_error"][0] != second.metrics["test_error"][0]


def test_a_penalty_too_small_for_the_factor_is_refused():
    cov = torch.ones(1, 4, 4, dtype=torch.float64)  # rank one: identical features
    with pytest.raises(NotPositiveDefinite):
        factorise(cov, torch.tensor([1e-300], dtype=torch.float64))


def test_the_trainer_reads_moments_for_the_width_path(make_cfg):
    cfg = make_cfg(*PATH, "optimizer.population=true", "width=16", "replicas=2")
    net = frozen_net(16, d=8)
    exact = solvers.exact_moments(cfg, build_target(cfg.target, net.w.device), net)
    assert exact.moments.cov is None  # the factor comes from the cache, not from here
    moments = ridge_moments(cfg, net, None, exact)
    assert moments.cov is None and moments.q.shape == (2, 16)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            ["model=linearized", "optimizer=ridge", "n_train=100", "optimizer.width_path=true"],
            "model.name=linearized (optimizer.width_path=true needs model=frozen",
        ),
        (
            ["model=frozen", "optimizer=ridge", "n_train=100", "optimizer.width_path=true"],
            "optimizer.penalty_scale=relative (optimizer.width_path=true needs one penalty for "
            "every width",
        ),
        (
            [*PATH, "n_train=100", "optimizer.penalty=0"],
            "optimizer.penalty=0 (optimizer.width_path=true needs a penalty > 0",
        ),
        (
            ["model=trainable", "optimizer=ridge", "optimizer.width_path=true"],
            "optimizer=ridge (fits only a model that is linear",
        ),
        (
            ["model=frozen", "optimizer=ridge", "n_train=100", "optimizer.penalty_scale=total"],
            "optimizer.penalty_scale=total (allowed: relative, absolute)",
        ),
    ],
)
def test_bad_width_path_settings_are_refused(overrides, message):
    with pytest.raises(ConfigError) as error:  # before anything runs
        load_config([*SMALL, *overrides])
    assert message in str(error.value)
