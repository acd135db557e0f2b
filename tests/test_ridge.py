"""The closed-form fit: exact in-span recovery, SGD and theory agreement, streaming, rank."""

from __future__ import annotations

import json
import math

import pytest
import torch

from randfeat_torch import cli, solvers
from randfeat_torch.config import ConfigError
from randfeat_torch.models import TwoLayerNet
from randfeat_torch.ridge import (
    FLOAT32_RUN,
    FLOAT32_TOLERANCE,
    GRAM_BLOCK,
    GramAccumulator,
    fit_ridge,
    relative_lambda,
    solve_centred,
)

CPU = torch.device("cpu")
EPS32, EPS64 = torch.finfo(torch.float32).eps, torch.finfo(torch.float64).eps


def in_span_problem(width: int = 12, d: int = 5, seed: int = 0):
    """A frozen net and a draw() whose targets are exactly in the span of its features."""
    net = TwoLayerNet(d=d, width=width, freeze_first_layer=True, seed=seed)
    gen = torch.Generator().manual_seed(seed + 100)
    beta = torch.randn(1, width, generator=gen)
    c = torch.tensor([0.7])

    def draw(m: int) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.randn(m, d, generator=gen)
        return x, (net.ridge_features(x) @ beta.unsqueeze(-1)).squeeze(-1)[0] + c

    return net, draw, beta, c


def test_ridge_recovers_a_target_in_the_span_of_the_features():
    net, draw, beta, c = in_span_problem()
    fit = fit_ridge(net.ridge_features, draw, 2000, 1, net.width, 0.0, CPU)
    assert torch.allclose(fit.beta.float(), beta, atol=1e-4)
    assert float(fit.c) == pytest.approx(float(c), abs=1e-4)
    assert float(fit.train_mse) < 1e-10
    net.load_ridge_solution(fit.beta.float(), fit.c.float())
    x, y = draw(500)
    assert float((net(x).detach()[0] - y).square().mean() / y.var()) < 1e-8


def test_streaming_uses_bounded_chunks_and_gives_the_same_fit():
    net = TwoLayerNet(d=5, width=12, freeze_first_layer=True, seed=3)
    gen = torch.Generator().manual_seed(0)
    x_all = torch.randn(10_000, 5, generator=gen)
    y_all = torch.relu(x_all[:, 0]) + 0.3 * torch.randn(10_000, generator=gen)

    def fit(chunk_size: int) -> tuple[object, list[int]]:
        sizes: list[int] = []

        def draw(m: int) -> tuple[torch.Tensor, torch.Tensor]:
            start = sum(sizes)
            sizes.append(m)
            return x_all[start : start + m], y_all[start : start + m]

        return fit_ridge(net.ridge_features, draw, 10_000, 1, 12, 1e-6, CPU, chunk_size), sizes

    chunked, sizes = fit(97)
    assert max(sizes) == 97 and sum(sizes) == 10_000 and len(sizes) == 104
    whole, sizes = fit(10_000)
    assert sizes == [10_000]
    # The features are float32 products, which a BLAS may round differently for 97 rows than
    # for 10,000 (another kernel, FMA or not): each by up to eps32 relative, which moves beta
    # by up to cond(cov + lambda) times that (the float64 sums add only cond * n * eps64).
    phi = net.ridge_features(x_all).double()[0]
    system = torch.cov(phi.T, correction=0) + whole.penalty * torch.eye(12, dtype=torch.float64)
    tol = float(torch.linalg.cond(system)) * EPS32  # about 7e-5
    assert torch.allclose(chunked.beta, whole.beta, rtol=0, atol=tol * whole.beta.abs().max())
    assert torch.allclose(chunked.train_mse, whole.train_mse, rtol=tol)


def test_the_gram_blocks_below_the_diagonal_give_the_dense_solution():
    """Widths past GRAM_BLOCK, uneven blocks, two replicas: the same beta as the dense normal
    equations built from every feature at once."""
    width = 2 * GRAM_BLOCK + 77
    net = TwoLayerNet(d=6, width=width, replicas=2, freeze_first_layer=True, seed=1)
    gen = torch.Generator().manual_seed(5)
    x, y = torch.randn(3000, 6, generator=gen), torch.randn(3000, generator=gen)
    fit = fit_ridge(net.ridge_features, lambda m: (x, y), 3000, 2, width, 1e-3, CPU)
    with torch.no_grad():
        phi = net.ridge_features(x).double()  # (2, n, width)
    mu, y = phi.mean(dim=1, keepdim=True), y.double()
    cov = phi.transpose(1, 2) @ phi / 3000 - mu.transpose(1, 2) @ mu
    penalty = 1e-3 * cov.diagonal(dim1=1, dim2=2).mean(-1)
    system = cov + penalty.view(2, 1, 1) * torch.eye(width, dtype=torch.float64)
    beta = torch.linalg.solve(system, (phi - mu).transpose(1, 2) @ (y - y.mean()) / 3000)
    # The same float32 features; float64 sums of n = 3000 products in another order (blocks):
    # cov moves by up to n eps64 relative, beta by cond(system) times that (about 3e-8).
    tol = 3000 * float(torch.linalg.cond(system).max()) * EPS64
    assert torch.allclose(fit.beta, beta, rtol=0, atol=tol * beta.abs().max())
    residual = ((phi - mu) @ beta.unsqueeze(-1)).squeeze(-1) - (y - y.mean())
    assert torch.allclose(fit.train_mse, residual.square().mean(dim=1), rtol=1e-8)


def test_rank_deficient_features_fall_back_to_the_minimum_norm_solution():
    net = TwoLayerNet(d=4, width=6, freeze_first_layer=True, seed=1)
    with torch.no_grad():  # duplicate features: the Gram matrix is singular
        net.w[0, 3:] = net.w[0, :3]
        net.b[0, 3:] = net.b[0, :3]
    gen = torch.Generator().manual_seed(5)

    def draw(m: int) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.randn(m, 4, generator=gen)
        return x, torch.sin(x.sum(1))

    fit = fit_ridge(net.ridge_features, draw, 5000, 1, 6, 0.0, CPU)
    assert fit.fallback
    assert torch.allclose(fit.beta[0, :3], fit.beta[0, 3:], atol=1e-8)  # minimum norm splits
    gen.manual_seed(5)
    half = TwoLayerNet(d=4, width=3, freeze_first_layer=True, seed=1)
    with torch.no_grad():
        half.w.copy_(net.w[:, :3])
        half.b.copy_(net.b[:, :3])
    reduced = fit_ridge(half.ridge_features, draw, 5000, 1, 3, 0.0, CPU)
    # The two nets' float32 features differ by their rounding (eps32 relative, see below):
    # beta by up to cond(Cov phi) times that (cond about 60 here).
    phi = half.ridge_features(torch.randn(5000, 4, generator=gen.manual_seed(5))).double()[0]
    tol = float(torch.linalg.cond(torch.cov(phi.T, correction=0))) * EPS32
    assert torch.allclose(
        fit.beta[0, :3] * 2 * net.multiplier / half.multiplier, reduced.beta[0], rtol=tol
    )
    # The features are float32, scaled by each net's own multiplier before rounding: the two
    # Gram matrices differ by float32 rounding (2^-24 relative per feature), which moves the
    # MSEs by about that much relative, whatever float64 does afterwards.
    float32_rounding = 2.0**-24
    assert float(fit.train_mse) == pytest.approx(
        float(reduced.train_mse), rel=10 * float32_rounding
    )


def test_more_features_than_samples_interpolates(run):
    result = run("model=frozen", "optimizer=ridge", "n_train=40", "width=64", "optimizer.penalty=0")
    assert result.status == "ok"
    assert float(result.metrics["fit_mse"][0]) < 1e-8
    assert "train_loss" not in result.metrics  # no optimizer loop ran


def test_ridge_matches_the_long_run_optimum_of_full_batch_gradient_descent(run):
    common = ["model=frozen", "d=4", "width=16", "n_train=256", "n_test=2000"]
    ridge = run(*common, "optimizer=ridge", "optimizer.penalty=0")
    gd = run(*common, "batch_size=256", "steps=4000", "eval_every=100", "optimizer.lr=0.5")
    assert gd.test_error == pytest.approx(ridge.test_error, rel=1e-3)
    assert float(gd.metrics["train_loss"][0]) == pytest.approx(
        float(ridge.metrics["fit_mse"][0]), rel=1e-3
    )


def test_ridge_agrees_with_the_exact_population_error(run):
    result = run(
        "model=frozen",
        "model.bias=false",
        "optimizer=ridge",
        "d=8",
        "width=32",
        "n_train=200000",
        "n_test=200000",
    )
    exact = result.theory["rf_population_error"]
    assert 0.03 < exact < 0.27  # between the best quadratic and the best linear residuals
    assert result.test_error == pytest.approx(exact, abs=0.01, rel=0.05)


def test_ridge_fits_every_replica(run):
    result = run("model=frozen", "optimizer=ridge", "n_train=2000", "replicas=3")
    errors = result.metrics["test_error"]
    assert errors.shape == (3,) and len(set(errors.tolist())) == 3
    assert bool((errors < 0.3).all())


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["optimizer=ridge", "n_train=100"], "optimizer=ridge (fits only a model that is linear"),
        (["optimizer=ridge", "model=frozen"], "n_train=None (optimizer=ridge needs a finite"),
        (
            ["optimizer=ridge", "model=frozen", "n_train=10", "optimizer.penalty=-1"],
            "optimizer.penalty=-1",
        ),
        (
            ["optimizer=ridge", "model=linearized", "n_train=10", "width=4096", "d=512"],
            "GiB for its float64 Gram matrices",
        ),
        (
            ["optimizer=ridge", "optimizer.population=true", "model=linearized"],
            "model.name=linearized (optimizer.population=true fits the exact Gaussian",
        ),
        (
            [
                "optimizer=ridge",
                "optimizer.population=true",
                "model=frozen",
                "model.activation=tanh",
            ],
            "model.activation=tanh (optimizer.population=true",
        ),
        (
            ["optimizer=ridge", "optimizer.population=true", "model=frozen", "input=sphere"],
            "only for input.name=gaussian",
        ),
        (
            ["optimizer=ridge", "optimizer.population=true", "model=frozen", "target=polynomial"],
            "only for target.name=relu_neuron or zigzag",
        ),
        (
            ["optimizer=ridge", "optimizer.population=true", "model=frozen", "n_train=1000"],
            "n_train=1000 (optimizer.population=true draws no training samples",
        ),
    ],
)
def test_ridge_refuses_what_it_cannot_fit(run, overrides, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        run(*overrides)


def test_population_ridge_fits_the_exact_output_layer(run):
    # No samples: the fit's MSE is the exact population error, and held-out samples agree.
    population = run(
        "model=frozen",
        "optimizer=ridge",
        "optimizer.population=true",
        "optimizer.penalty=0",
        "d=8",
        "width=64",
        "n_test=200000",
    )
    exact = population.theory["rf_population_error"]
    variance = 0.5 - 1 / (2 * math.pi)  # the unit ReLU neuron's
    assert 0.02 < exact < 0.3
    assert float(population.metrics["population_mse"][0]) / variance == pytest.approx(
        exact, rel=1e-5
    )
    assert population.metrics["population_error"][0] == pytest.approx(exact, rel=1e-5)
    assert population.test_error == pytest.approx(exact, rel=0.03)
    # Ridge on 2000 samples pays for them (about P / n = 3% more), on the same test set.
    sampled = run(
        "model=frozen", "optimizer=ridge", "d=8", "width=64", "n_train=2000", "n_test=200000"
    )
    assert population.test_error * 1.01 < sampled.test_error < population.test_error * 1.1


def test_population_ridge_on_the_hard_neuron_and_replicas(run):
    result = run(
        "model=frozen",
        "optimizer=ridge",
        "optimizer.population=true",
        "target=relu_neuron_hard",
        "d=6",
        "width=48",
        "replicas=2",
        "n_test=200000",
    )
    exact = result.theory["rf_population_error"]
    errors = result.metrics["test_error"].tolist()
    assert len(exact) == 2 and exact[0] != pytest.approx(exact[1], rel=1e-3)
    for measured, predicted in zip(errors, exact, strict=True):
        assert measured == pytest.approx(predicted, rel=0.05)


def test_a_population_run_computes_its_moments_once(run, monkeypatch):
    from randfeat_torch import solvers, theory

    calls = []
    original = theory.relu_population_moments

    def counted(*args):
        calls.append(args)
        return original(*args)

    monkeypatch.setattr(theory, "relu_population_moments", counted)
    monkeypatch.setattr(solvers, "relu_population_moments", counted)
    result = run("model=frozen", "optimizer=ridge", "optimizer.population=true", "width=64")
    assert len(calls) == 1  # the theory section reads the fit's moments
    assert 0 < result.theory["rf_population_error"] < 1
    sampled = run("model=frozen", "optimizer=ridge", "n_train=500", "width=64")
    assert len(calls) == 2 and "rf_population_error" in sampled.theory  # theory's own


def float32_problem(n: int, seed: int = 2, replicas: int = 2):
    """The features of a net past two Gram blocks (uneven) for two replicas, and a noisy ReLU
    target: (phi, y)."""
    width = 2 * GRAM_BLOCK + 33
    net = TwoLayerNet(d=6, width=width, replicas=replicas, freeze_first_layer=True, seed=seed)
    gen = torch.Generator().manual_seed(seed + 5)
    x = torch.randn(n, 6, generator=gen)
    y = torch.relu(x[:, 0]) + 0.1 * torch.randn(n, generator=gen)
    with torch.no_grad():
        return net.ridge_features(x), y


def accumulate(
    phi: torch.Tensor, y: torch.Tensor, products: torch.dtype, chunk: int | None = None, copies=1
) -> GramAccumulator:
    """The sums of (phi, y) added in chunks of ``chunk`` samples (default: one), ``copies``
    times over (each copy the same tensors, so that BLAS rounds each alike)."""
    sums = GramAccumulator(phi.shape[0], phi.shape[2], CPU, products)
    step = chunk or phi.shape[1]
    for _ in range(copies):
        for start in range(0, phi.shape[1], step):
            sums.add(phi[:, start : start + step], y[start : start + step])
    return sums


def lower_blocks(width: int) -> torch.Tensor:
    """The entries the Gram matrices hold before mirroring: those of the blocks on or below
    the diagonal, compared here on the lower triangle."""
    return torch.ones(width, width).tril().bool()


def test_float32_products_sum_runs_of_float32_run_samples_whatever_the_chunks():
    n = 2 * FLOAT32_RUN + 1808
    phi, y = float32_problem(n)
    exact = accumulate(phi, y, torch.float64).moments()
    lower = lower_blocks(phi.shape[2])
    p = phi.double().abs()
    u = 2.0**-24
    gamma = FLOAT32_RUN * u / (1 - FLOAT32_RUN * u)
    # Higham's bound for a float32 sum of k products of float32 numbers (exact in float64):
    # |error| <= gamma_k sum |phi_a| |phi_b|, gamma_k = k u / (1 - k u), u = 2^-24, k the run.
    # Centred: cov = G / n - mu mu^T, with mu's error up to gamma_k mean |phi| (float64 adds
    # the runs, and the rest, to n eps64 of the same magnitudes).
    mean_abs, mu = p.mean(1), exact.mu
    bound = (gamma + n * EPS64) * (
        p.transpose(1, 2) @ p / n
        + mean_abs.unsqueeze(2) * mu.abs().unsqueeze(1)
        + mu.abs().unsqueeze(2) * mean_abs.unsqueeze(1)
    )
    for chunk in (None, 97, 4000):
        rounded = accumulate(phi, y, torch.float32, chunk)
        moments = rounded.moments()  # ends the last run
        assert (rounded.runs, rounded.n, moments.rounding.runs) == (3, n, 3), chunk
        error = moments.cov - exact.cov
        assert bool((error.abs() <= bound)[:, lower].all()), chunk
        assert bool((error != 0).any()), chunk  # the products really were float32 sums


def test_the_first_run_is_exact_and_the_probe_holds_what_float32_loses_on_it():
    phi, y = float32_problem(FLOAT32_RUN)
    lower = lower_blocks(phi.shape[2])
    p = phi.double().abs()
    scale = (p.transpose(1, 2) @ p)[:, lower]
    # One run: in the sums exactly (float64 sums of the same products, in another order for
    # the first moments: up to k eps64 of the magnitudes).
    exact, one = accumulate(phi, y, torch.float64), accumulate(phi, y, torch.float32)
    assert torch.equal(one.gram[:, lower], exact.gram[:, lower])
    weights = {"phi_sum": p.sum(1), "phi_y": (p * y.double().abs()[:, None]).sum(1)}
    for name, weight in weights.items():
        slack = FLOAT32_RUN * EPS64 * weight
        assert bool(((getattr(one, name) - getattr(exact, name)).abs() <= slack).all()), name
    assert one.moments().rounding.runs == 1
    # Three copies of the run: the second and third round as the first would, so their float32
    # sums lose twice the probe on top of the exact sums.
    exact, three = (accumulate(phi, y, dtype, copies=3) for dtype in (torch.float64, torch.float32))
    lost = (exact.gram - three.gram)[:, lower] / 2
    slack = 3 * FLOAT32_RUN * EPS64 * scale + EPS32 * lost.abs()  # float64 sums; float32 probe
    assert bool(((three.probe.gram[:, lower] - lost).abs() <= slack).all())
    assert bool((lost != 0).any())
    for name, weight in weights.items():
        lost = (getattr(exact, name) - getattr(three, name)) / 2
        slack = 3 * FLOAT32_RUN * EPS64 * weight
        assert bool(((getattr(three.probe, name) - lost).abs() <= slack).all()), name


def fit_both(phi: torch.Tensor, y: torch.Tensor, penalty: float, copies: int = 1):
    """The float64 and the float32-products fits of (phi, y), relative penalty ``penalty``,
    and beta's relative change between them (R,)."""
    fits = {}
    for products in (torch.float64, torch.float32):
        moments = accumulate(phi, y, products, copies=copies).moments()
        fits[products] = solve_centred(moments, relative_lambda(moments.cov, penalty))
    exact, rounded = fits[torch.float64], fits[torch.float32]
    return exact, rounded, (rounded.beta - exact.beta).norm(dim=-1) / exact.beta.norm(dim=-1)


def test_the_rounding_estimate_is_zero_for_one_run_and_above_the_error_of_many():
    """A well-conditioned problem (penalty 1e-2, where first-order perturbation theory holds):
    one run is exact; for six, the estimate takes five times the first run's rounding, above
    what the five others' roundings add up to (independent roundings: about sqrt(5) times)."""
    phi, y = float32_problem(FLOAT32_RUN, seed=4)
    exact, rounded, actual = fit_both(phi, y, 1e-2)
    assert exact.rounding_error is None and bool((rounded.rounding_error == 0).all())
    # The same float64 sums but the first moments' order: cov moves by up to k eps64, beta
    # by the condition number times that.
    system = torch.linalg.cond(torch.cov(phi[0].double().T, correction=0))
    assert bool((actual <= float(system) * FLOAT32_RUN * EPS64).all())
    phi, y = float32_problem(6 * FLOAT32_RUN, seed=4)
    _, rounded, actual = fit_both(phi, y, 1e-2)
    estimate = rounded.rounding_error
    assert bool((actual > 0).all()) and bool((estimate < 1e-2).all())
    assert bool((actual <= estimate).all()), (estimate, actual)


def test_identical_runs_reach_the_estimate_of_the_runs_times_the_first():
    """Five copies of one run: the four after the first round exactly as the first would, so
    their errors add up to four times its rounding: the estimate's assumption holds with
    equality, and the estimate is first-order exact (second-order terms: about the estimate
    squared, relative)."""
    phi, y = float32_problem(FLOAT32_RUN, seed=4)
    _, rounded, actual = fit_both(phi, y, 1e-2, copies=5)
    assert bool((rounded.rounding_error > 0).all())
    assert torch.allclose(rounded.rounding_error, actual, rtol=0.01), (
        rounded.rounding_error,
        actual,
    )


def test_a_float32_products_run_keeps_its_fit_only_below_the_tolerance(run):
    """Well conditioned (no hidden bias): the float32 fit is kept, and its output layer is as
    close to the float64 run's as the estimate says (plus loading beta into float32 weights).
    Ill conditioned (d=4, width=128, hidden bias, penalty 1e-8): the estimate is far above the
    tolerance, and the run is the float64 run, bit for bit, from the same samples drawn again."""
    float32 = "optimizer.gram_products=float32"
    for case, kept in (
        (["model.bias=false", "d=8", "width=64"], True),
        (["d=4", "width=128"], False),
    ):
        common = ["model=frozen", "optimizer=ridge", "n_train=20000", *case]
        exact, rounded = run(*common), run(*common, float32)
        record = json.loads((rounded.run_dir / "metrics.json").read_text())["ridge"]
        check = record["float32_products"]
        assert check["tolerance"] == FLOAT32_TOLERANCE
        assert check["refit_in_float64"] is not kept
        (estimate,) = check["estimated_error"]
        a, a_exact = rounded.model.a.detach(), exact.model.a.detach()
        if kept:
            assert estimate <= FLOAT32_TOLERANCE
            distance = float((a - a_exact).norm() / a_exact.norm())
            assert 0 < distance <= estimate + 2 * EPS32
        else:
            assert estimate > 100 * FLOAT32_TOLERANCE
            assert torch.equal(a, a_exact)
            assert torch.equal(rounded.metrics["test_error"], exact.metrics["test_error"])
            assert (
                record["lambda"]
                == json.loads((exact.run_dir / "metrics.json").read_text())["ridge"]["lambda"]
            )


def test_a_system_without_a_trusted_factor_has_no_estimate_and_is_refitted(run, make_cfg):
    """Width 64 > n_train = 40 at penalty 0: singular, no trusted Cholesky factor; the
    estimate is infinite (null in the strict JSON record), the run is the float64 run, and its
    summary line says so."""
    common = ["model=frozen", "optimizer=ridge", "n_train=40", "optimizer.penalty=0"]
    float32 = [*common, "optimizer.gram_products=float32"]
    exact, rounded = run(*common), run(*float32)
    line = cli.summary_line(make_cfg(*float32), rounded)
    assert line.endswith(
        "; the float32 products' estimated error of beta (none) was above 0.0001, so the fit "
        "was done again in float64"
    )
    assert cli.summary_line(make_cfg(*common), exact).endswith(str(exact.run_dir))
    record = json.loads((rounded.run_dir / "metrics.json").read_text())["ridge"]
    assert record["eigen_fallback"] is True
    assert record["float32_products"]["estimated_error"] == [None]
    assert record["float32_products"]["refit_in_float64"] is True
    assert torch.equal(rounded.model.a.detach(), exact.model.a.detach())


@pytest.mark.parametrize(
    ("errors", "refit"),
    [
        ([FLOAT32_TOLERANCE, FLOAT32_TOLERANCE], False),  # at the tolerance: kept
        ([0.0, 2 * FLOAT32_TOLERANCE], True),  # any replica above it: refitted
        ([2 * FLOAT32_TOLERANCE, 0.0], True),
    ],
)
def test_the_refit_is_decided_from_every_replicas_estimate(run, monkeypatch, errors, refit):
    def with_errors(moments, penalty):
        fit = solve_centred(moments, penalty)
        if fit.rounding_error is not None:
            fit.rounding_error = torch.tensor(errors, dtype=torch.float64)
        return fit

    monkeypatch.setattr(solvers, "solve_centred", with_errors)
    result = run(
        "model=frozen",
        "optimizer=ridge",
        "n_train=500",
        "replicas=2",
        "optimizer.gram_products=float32",
    )
    record = json.loads((result.run_dir / "metrics.json").read_text())["ridge"]
    assert record["float32_products"]["estimated_error"] == errors
    assert record["float32_products"]["refit_in_float64"] is refit
