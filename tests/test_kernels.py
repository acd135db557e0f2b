"""model=kernel: the closed-form kernels equal the mean of the net's own features over random
first layers; the dual fit is ridge's; ridge on many features converges to it, within a bound
derived below; the record; refusals."""

from __future__ import annotations

import itertools
import json
import math

import pytest
import torch

from randfeat_torch import kernels
from randfeat_torch.cli import load_config
from randfeat_torch.config import ConfigError
from randfeat_torch.kernels import KERNEL_FITS, KernelSpec, dual_ridge, kernel_matrix
from randfeat_torch.models import LinearizedNet, TwoLayerNet
from randfeat_torch.ridge import PIVOT_RCOND, cholesky_factor
from tests.conftest import SMALL

# (activation, init, bias, parameterization): every closed form of kernels.py
CLOSED_FORMS = [
    ("relu", "gaussian", True, "ntk"),
    ("relu", "gaussian", False, "mean_field"),
    ("relu", "sphere", False, "ntk"),
    ("quadratic", "gaussian", True, "ntk"),
    ("quadratic", "gaussian", False, "mean_field"),
    ("quadratic", "sphere", False, "ntk"),
]


def unit_terms(net: TwoLayerNet, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per hidden unit j, <psi_j(x_i), psi_j(x_k)>: (n, n, width) for the random features and
    for the tangent features, psi = the models' own ridge features / m (float64)."""
    n, width, d = x.shape[0], net.width, net.d
    phi = LinearizedNet(net).ridge_features(x)[0].double() / net.multiplier
    h, slope_x = phi[:, :width], phi[:, width : width * (d + 1)].reshape(n, width, d)
    rf = h.unsqueeze(1) * h.unsqueeze(0)
    ntk = rf + torch.einsum("ijk,ljk->ilj", slope_x, slope_x)
    if net.b is not None:
        slope = phi[:, width * (d + 1) :]
        ntk += slope.unsqueeze(1) * slope.unsqueeze(0)
    return {"rf": rf, "ntk": ntk}


@pytest.mark.parametrize(("activation", "init", "bias", "parameterization"), CLOSED_FORMS)
def test_the_kernel_is_the_mean_of_the_nets_features_over_its_random_first_layer(
    activation, init, bias, parameterization
):
    # Monte Carlo over 2^15 units of the project's own net (its init, its tangent features):
    # every entry within 5 standard errors, estimated from the units' own spread (under a
    # wrong constant, a missing bias term or d / (d + 2), the gap is hundreds of them).
    d, n, width = 5, 7, 2**15
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(n, d, generator=gen) * torch.linspace(0.3, 2.0, n).unsqueeze(1)
    net = TwoLayerNet(
        d, width, activation=activation, bias=bias, init=init,
        parameterization=parameterization, seed=1,
    )  # fmt: skip
    for kind, terms in unit_terms(net, x).items():
        exact = kernel_matrix(KernelSpec(kind, activation, bias, init, d), x)
        mean, error = terms.mean(-1), terms.std(-1) / math.sqrt(width)
        assert ((mean - exact).abs() <= 5 * error + 1e-6 * exact.abs()).all(), kind
        assert torch.equal(exact, exact.T) or torch.allclose(exact, exact.T, rtol=1e-14)


def test_a_matrix_in_row_blocks_equals_the_matrix_in_one_block(monkeypatch):
    # Blocks start at n_train > 2048 (2^22 entries); here 40 inputs in blocks of 7 rows. Off the
    # diagonal the same entries are computed from dot products of d = 3 terms, which BLAS may
    # round differently by a few ulps at another shape: 1e-12 is far above that and far below
    # what a block with the wrong rows gives (order 1).
    spec = KernelSpec("ntk", "relu", True, "gaussian", 3)
    x, _ = noisy_neuron(40, 3, 0)
    other, _ = noisy_neuron(11, 3, 1)
    whole, cross = kernel_matrix(spec, x), kernel_matrix(spec, x, other)
    monkeypatch.setattr(kernels, "KERNEL_BLOCK_ELEMENTS", 7 * 40)
    assert torch.allclose(kernel_matrix(spec, x), whole, rtol=1e-12, atol=0)
    assert torch.allclose(kernel_matrix(spec, x, other), cross, rtol=1e-12, atol=0)


@pytest.mark.parametrize("bias", [False, True])
def test_the_gram_diagonal_is_exact(bias):
    # At theta = 0 acos loses half the digits (1e-8 here), which the Monte Carlo test cannot
    # see. For ReLU, u = w.x + b ~ N(0, q) with q = |x|^2 / d + [bias]: E relu(u)^2 = q / 2, and
    # the tangent part adds E[a0^2] P(u > 0) (|x|^2 + [bias]), E[a0^2] = 1. A few flops: 16 eps.
    d = 5
    x, _ = noisy_neuron(200, d, 2)
    x = x.double()
    sq = x.square().sum(1)
    q = sq / d + bias
    for kind, exact in [("rf", q / 2), ("ntk", q / 2 + (sq + bias) / 2)]:
        diagonal = kernel_matrix(KernelSpec(kind, "relu", bias, "gaussian", d), x).diagonal()
        assert torch.allclose(diagonal, exact, rtol=16 * torch.finfo(torch.float64).eps, atol=0)


def test_a_spec_without_a_closed_form_is_refused_by_the_kernel_itself():
    # What the config check refuses, the function refuses too, for code that calls it directly
    x = torch.randn(4, 3, dtype=torch.float64)
    for spec in [
        KernelSpec("rf", "relu", True, "sphere", 3),
        KernelSpec("rf", "tanh", False, "gaussian", 3),
    ]:
        with pytest.raises(ValueError, match="no closed-form kernel"):
            kernel_matrix(spec, x)


def noisy_neuron(n: int, d: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=gen)
    y = torch.relu(x[:, 0] - 0.3) + 0.1 * torch.randn(n, generator=gen)
    return x, y


def centred(gram: torch.Tensor) -> torch.Tensor:
    """H K H with H = I - 1 1^T / n, written out (not the module's in-place centring)."""
    projector = torch.eye(len(gram), dtype=torch.float64) - 1.0 / len(gram)
    return projector @ gram @ projector


def test_the_dual_fit_is_centred_ridge_solved_independently():
    # Against a dense solve of (K_c + n lambda) alpha = y_c at every penalty of a path, the
    # eigen fallback at penalty 0 (the minimum-norm interpolant: K_c alpha = y_c), the degrees
    # of freedom as the trace of the hat matrix, and the relative penalty's scale.
    spec = KernelSpec("ntk", "relu", True, "gaussian", 3)
    x, y = noisy_neuron(150, 3, 0)
    n, penalties = len(y), [1e-4, 1e-2, 1.0, 0.0]
    fit = dual_ridge(spec, x, y, penalties, relative=True, degrees=True)
    gram = kernel_matrix(spec, x)
    centred_gram = centred(gram)
    assert float(fit.penalty[1]) == pytest.approx(1e-2 * float(centred_gram.trace()) / n, rel=1e-12)
    y_c = y.double() - y.double().mean()
    eye = torch.eye(n, dtype=torch.float64)
    for k, lam in enumerate(fit.penalty.tolist()):
        alpha = torch.linalg.lstsq(centred_gram + n * lam * eye, y_c, rcond=None).solution
        if lam == 0:
            alpha = torch.linalg.pinv(centred_gram, hermitian=True, rtol=1e-11) @ y_c
        assert torch.allclose(fit.alpha[:, k], alpha, rtol=1e-6, atol=1e-7 * alpha.abs().max())
        fitted = y.double().mean() + centred_gram @ fit.alpha[:, k]
        assert float(fit.mse[k]) == pytest.approx(float((y - fitted).square().mean()), abs=1e-10)
        # c makes f(x_i) = c + sum_j alpha_j k(x_i, x_j) the centred fit
        assert torch.allclose(fit.c[k] + gram @ fit.alpha[:, k], fitted, atol=1e-9)
        if lam > 0:
            hat = centred_gram @ torch.linalg.inv(centred_gram + n * lam * eye)
            assert float(fit.df[k]) == pytest.approx(1 + float(hat.trace()), rel=1e-8)
    assert fit.fallback and float(fit.mse[-1]) < 1e-12  # penalty 0 interpolates
    single = dual_ridge(spec, x, y, penalties[1:2], relative=True, degrees=False)
    assert torch.allclose(single.alpha[:, 0], fit.alpha[:, 1], rtol=1e-10, atol=1e-12)


def test_a_rank_deficient_kernel_at_penalty_zero_gives_the_minimum_norm_fit():
    # The quadratic RF kernel in d = 3, E[p^2 p'^2] = q q' + 2 s^2, is a function of x x^T: rank
    # at most 6 (the products of pairs of coordinates). Its other 54 eigenvalues are rounding
    # noise (1e-15 of the largest), which the fit must drop (below n * PIVOT_RCOND of the
    # largest), as the pseudo-inverse does.
    spec = KernelSpec("rf", "quadratic", False, "gaussian", 3)
    x, y = noisy_neuron(60, 3, 1)
    fit = dual_ridge(spec, x, y, [0.0], relative=False, degrees=False)
    gram = centred(kernel_matrix(spec, x))
    pinv = torch.linalg.pinv(gram, hermitian=True, rtol=len(y) * PIVOT_RCOND)
    expected = pinv @ (y.double() - y.double().mean())
    assert fit.fallback
    assert torch.allclose(fit.alpha[:, 0], expected, rtol=1e-6, atol=1e-7 * expected.abs().max())


def test_the_cholesky_factor_is_trusted_where_ridges_rule_trusts_it():
    # Shifts from 1e-10 to 1e-16.5 of the largest diagonal entry span the band where the
    # smallest pivot^2 crosses n * PIVOT_RCOND * that entry: the fit falls back to the
    # eigendecomposition exactly where ridge.cholesky_factor would not trust the factor.
    spec = KernelSpec("ntk", "relu", True, "gaussian", 3)
    x, y = noisy_neuron(150, 3, 0)
    n, gram = len(y), centred(kernel_matrix(spec, x))
    scale = float(gram.diagonal().max())
    verdicts = []
    for k in range(20, 34):
        shift = 10 ** (-k / 2) * scale
        fit = dual_ridge(spec, x, y, [shift / n], relative=False, degrees=False)
        system = gram + shift * torch.eye(n, dtype=torch.float64)
        verdicts.append((fit.fallback, cholesky_factor(system.unsqueeze(0)) is None))
    assert all(ours == ridges for ours, ridges in verdicts), verdicts
    assert {ours for ours, _ in verdicts} == {False, True}  # the band was crossed


def test_the_eigen_fallback_at_a_positive_penalty_reports_the_training_error(monkeypatch):
    # A factor trusted only above 1e-3 forces the fallback at penalty 1e-4: its training error
    # is that of the predictions it gives (two float64 computations of one mean: 1e-9).
    monkeypatch.setattr(kernels, "PIVOT_RCOND", 1e-3)
    spec = KernelSpec("ntk", "relu", True, "gaussian", 3)
    x, y = noisy_neuron(150, 3, 0)
    fit = dual_ridge(spec, x, y, [1e-4], relative=True, degrees=False)
    assert fit.fallback
    fitted = fit.c[0] + kernel_matrix(spec, x) @ fit.alpha[:, 0]
    assert float(fit.mse[0]) == pytest.approx(float((y - fitted).square().mean()), rel=1e-9)


# a polynomial target: a ReLU neuron would have theory compute the exact RF moments
RIDGE = ["optimizer=ridge", "optimizer.penalty_scale=absolute", "n_test=2000"]
RIDGE += ["target=polynomial", "target.terms=4"]


def kernel_and_ridge(run, kernel: str, widths: list[int], lam: float, *extra: str):
    """The kernel fit at absolute penalty lambda, and ridge at each width N at lambda * N: the
    same n_train samples (one chunk each), the same test set."""
    model = {"rf": "frozen", "ntk": "linearized"}[kernel]
    fitted = run(
        "model=kernel", f"model.kernel={kernel}", *RIDGE, f"optimizer.penalty={lam}", *extra
    )
    ridges = {
        width: run(
            f"model={model}", f"width={width}", *RIDGE, f"optimizer.penalty={lam * width}", *extra
        )
        for width in widths
    }
    return fitted, ridges


def test_random_features_approach_the_kernel_fit_as_the_width_grows(run):
    # Same 400 samples, same test set: the ridge fit's predictions approach the kernel's like
    # N^(-1/2) (the fluctuation of (1/N) sum_j psi_j psi_j^T about K): x8 from 64 to 4096.
    widths = [64, 256, 1024, 4096]
    fitted, ridges = kernel_and_ridge(run, "rf", widths, 1e-3, "d=4", "n_train=400")
    x = torch.randn(3000, 4, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        kernel = fitted.model(x).double()
        gaps = [
            float((r.model(x).double() - kernel).square().mean().sqrt()) for r in ridges.values()
        ]
    errors = [abs(r.test_error - fitted.test_error) for r in ridges.values()]
    assert all(b < a for a, b in itertools.pairwise(gaps)), gaps
    assert gaps[-1] < gaps[0] / 4, gaps
    assert errors[-1] < 0.1 * fitted.test_error + 1e-3, (errors, fitted.test_error)


def training_bound(fitted, ridge) -> tuple[float, float]:
    """|yhat_N - yhat| and its bound |H (K_N - K) alpha| on the training inputs (see below)."""
    x = fitted.model.x[0]
    alpha = fitted.model.a[0]
    psi = ridge.model.ridge_features(x.float())[0].double() / ridge.model.multiplier
    sampled = psi @ psi.T / ridge.model.width  # K_N = (1/N) sum_j psi_j psi_j^T
    exact = kernel_matrix(fitted.model.spec, x)
    gap = (sampled - exact) @ alpha
    bound = float((gap - gap.mean()).norm())
    with torch.no_grad():
        difference = ridge.model(x.float()).double() - fitted.model(x.float()).double()
    return float(difference.norm()), bound


@pytest.mark.parametrize(
    ("kernel", "width", "d", "chunk"),
    [("rf", 2048, 4, None), ("ntk", 512, 3, None), ("rf", 2048, 3, 50)],
)
def test_ridge_on_n_features_is_within_the_derived_bound_of_the_kernel_fit(
    run, kernel, width, d, chunk
):
    # Ridge on N units at penalty lambda_u = N lambda is, in the dual, (K_Nc + n lambda) a_N = y_c
    # with K_N = (1/N) sum_j psi_j psi_j^T; the kernel fit is (K_c + n lambda) a = y_c. On the
    # training inputs yhat = mean y + K_c a = y - n lambda a (and the same for N), so
    # yhat_N - yhat = n lambda (K_Nc + n lambda)^-1 H (K_N - K) a, and as K_Nc is PSD:
    #     |yhat_N - yhat| <= |H (K_N - K) a|,
    # a bound computed from the features themselves (float32 predictions: 1e-5 slack). A
    # penalty large enough to matter on the training set (n lambda = 15) makes it sharp: ridge
    # at lambda_u = lambda (the convention without the width) is far outside it.
    # With optimizer.chunk_size (50 samples of d = 3: not a multiple of the 16 values torch
    # draws at once), both fits must draw the training set in the same chunks.
    lam, n = 0.05, 300
    shape = [f"d={d}", f"n_train={n}", f"optimizer.chunk_size={chunk or 'null'}"]
    fitted, ridges = kernel_and_ridge(run, kernel, [width], lam, *shape)
    difference, bound = training_bound(fitted, ridges[width])
    assert 0 < difference <= bound + 1e-5 * math.sqrt(n), (difference, bound)
    wrong = run(
        f"model={'frozen' if kernel == 'rf' else 'linearized'}", f"width={width}", *RIDGE,
        f"optimizer.penalty={lam}", *shape,
    )  # fmt: skip
    assert training_bound(fitted, wrong)[0] > 4 * bound


def test_a_kernel_run_records_the_fit_a_penalty_path_and_gcv(run, tmp_path):
    KERNEL_FITS.key = None
    base = ["fit=nt_kernel", "n_train=300", "d=4"]
    result = run(*base, "optimizer.penalty=[1e-6,1e-3,1e-1,0]")
    record = json.loads((result.run_dir / "metrics.json").read_text())
    path = record["penalty_path"]
    assert record["status"] == "ok" and record["kernel"]["kernel"] == "ntk"
    assert path["test_error"][0] == pytest.approx(record["metrics"]["test_error"], rel=1e-5)
    assert path["error"][-1] < 1e-10 and record["ridge"]["eigen_fallback"]  # 0: interpolates
    assert path["df"][0] > path["df"][2] > 1  # fewer degrees of freedom at a larger penalty
    picked = run(*base, "optimizer.penalty=gcv")
    record = json.loads((picked.run_dir / "metrics.json").read_text())
    scores = record["penalty_path"]["gcv"]
    assert record["penalty_path"]["picked"] == [
        record["penalty_path"]["penalties"][scores.index(min(scores))]
    ]
    # the fit does not read the width: the next job at another width reuses it
    again = run(*base, "optimizer.penalty=gcv", "width=7")
    record = json.loads((again.run_dir / "metrics.json").read_text())
    assert record["kernel"]["fit_reused"]
    assert again.test_error == picked.test_error


def test_replicas_share_one_fit_or_fit_their_own_samples(run):
    shared = run("fit=rf_kernel", "n_train=200", "replicas=2")
    assert torch.equal(shared.model.a[0], shared.model.a[1])
    own = run("fit=rf_kernel", "n_train=200", "replicas=2", "replica_data=independent")
    assert own.model.x.shape[0] == 2 and not torch.equal(own.model.a[0], own.model.a[1])
    assert torch.equal(own.model.a[0], shared.model.a[0])  # replica 0's data is the shared data
    # each replica predicts from its own inputs (float32 predictions: 1e-6), and its penalty
    # path's errors are its own (another penalty: a fit of its own, not the cached one)
    own = run(
        "fit=rf_kernel", "n_train=200", "replicas=2", "replica_data=independent",
        "optimizer.penalty=[1e-3,1e-1]",
    )  # fmt: skip
    model = own.model
    x = torch.randn(50, model.d, generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        predictions = model(x).double()
    for r in range(2):
        expected = model.c[r] + kernel_matrix(model.spec, x, model.x[r]) @ model.a[r]
        assert torch.allclose(predictions[r], expected, rtol=1e-6, atol=1e-6 * expected.abs().max())
    record = json.loads((own.run_dir / "metrics.json").read_text())
    first = [errors[0] for errors in record["penalty_path"]["test_error"]]
    assert first == pytest.approx(record["metrics"]["test_error"], rel=1e-5)


def test_a_kernel_fit_is_reused_only_by_a_job_that_differs_in_width(run):
    # A seed sweep in one process must not reuse seed 0's samples and fit
    KERNEL_FITS.key = None
    base = ["fit=rf_kernel", "n_train=200"]
    first, second = run(*base, "seed=0"), run(*base, "seed=1")
    assert not torch.equal(first.model.x, second.model.x)
    again = run(*base, "seed=1", "width=7")
    records = [json.loads((r.run_dir / "metrics.json").read_text()) for r in (second, again)]
    assert [record["kernel"]["fit_reused"] for record in records] == [False, True]
    assert torch.equal(again.model.x, second.model.x)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("model.kernel=nngp", "model.kernel=nngp (allowed: rf, ntk)"),
        ("model.activation=tanh", "model.activation=tanh (model=kernel needs a closed-form"),
        ("model.init=sphere", "model.bias=True (model=kernel with model.init=sphere"),
        (
            "model.kernel=ntk model.parameterization=standard",
            "model.parameterization=standard (model.kernel=ntk: under standard",
        ),
        ("model.kernel=ntk model.output_init=zero", "model.output_init=zero (model.kernel=ntk"),
        ("optimizer=sgd", "optimizer=sgd (model=kernel is fitted in closed form"),
        ("optimizer.population=true n_train=null", "optimizer.population=True (model=kernel"),
        ("n_train=null", "n_train=None (optimizer=ridge needs a finite training set"),
        ("optimizer.width_path=true", "model.name=kernel (optimizer.width_path=true needs"),
    ],
)
def test_bad_kernel_choices_are_refused_with_one_sentence(override, message):
    with pytest.raises(ConfigError) as info:
        load_config([*SMALL, "fit=rf_kernel", "n_train=100", *override.split()])
    assert message in str(info.value) and "\n" not in str(info.value)
