"""The penalty path: ridge at every penalty equals an independent least-squares fit; GCV equals
its definition through the hat matrix; the record; refusals."""

from __future__ import annotations

import json

import pytest
import torch

from randfeat_torch.config import ConfigError
from randfeat_torch.models import TwoLayerNet
from randfeat_torch.ridge import penalty_path, sampled_moments
from randfeat_torch.targets import random_direction

EPS64 = torch.finfo(torch.float64).eps
PENALTIES = [1e-6, 1e-4, 1e-2, 1.0]


def problem(n: int = 600, width: int = 24, d: int = 5):
    """A frozen net, and n fixed samples of a noisy ReLU neuron (x: (n, d), y: (n,))."""
    net = TwoLayerNet(d=d, width=width, replicas=2, freeze_first_layer=True, seed=4)
    gen = torch.Generator().manual_seed(9)
    x = torch.randn(n, d, generator=gen)
    w_star = random_direction(d, 2, torch.device("cpu"))
    y = torch.relu(x @ w_star - 0.5) + 0.1 * torch.randn(n, generator=gen)
    return net, x, y


def moments_of(net: TwoLayerNet, x: torch.Tensor, y: torch.Tensor):
    return sampled_moments(net.ridge_features, lambda m: (x, y), len(y), 2, net.width, x.device)


def test_every_penalty_equals_least_squares_on_the_augmented_features():
    # Ridge is least squares on [Phi_c; sqrt(n lambda) I] against [y_c; 0] (Phi_c, y_c:
    # centred): solved here by QR (lstsq), independently of the Gram matrix the path uses.
    net, x, y = problem()
    n = len(y)
    lam = torch.tensor(PENALTIES, dtype=torch.float64).expand(2, -1).contiguous()
    path = penalty_path(moments_of(net, x, y), lam)
    phi = net.ridge_features(x).double()
    centred, yc = phi - phi.mean(1, keepdim=True), y.double() - y.double().mean()
    for r in range(2):
        for k, value in enumerate(PENALTIES):
            rows = torch.cat([centred[r], (n * value) ** 0.5 * torch.eye(net.width).double()])
            beta = torch.linalg.lstsq(rows, torch.cat([yc, torch.zeros(net.width).double()]))[0]
            mse = (yc - centred[r] @ beta).square().mean()
            # Both solves are backward stable: they agree to cond(Phi_c^T Phi_c / n + lambda) eps
            # times a constant that grows with the P = width unknowns (Cholesky's O(P) bound).
            system = centred[r].T @ centred[r] / n + value * torch.eye(net.width).double()
            tol = net.width * float(torch.linalg.cond(system)) * EPS64
            assert torch.allclose(path.beta[r, :, k], beta, rtol=0, atol=tol * beta.abs().max())
            assert float(path.mse[r, k]) == pytest.approx(float(mse), abs=tol * float(y.var()))
            c = y.double().mean() - phi[r].mean(0) @ path.beta[r, :, k]
            assert float(path.c[r, k]) == pytest.approx(float(c), abs=1e-12)


def test_gcv_is_its_definition_through_the_hat_matrix():
    net, x, y = problem(n=300, width=12)
    lam = torch.tensor(PENALTIES, dtype=torch.float64).expand(2, -1).contiguous()
    path = penalty_path(moments_of(net, x, y), lam)
    n = len(y)
    phi = net.ridge_features(x).double()  # (R, n, P)
    centred = phi - phi.mean(1, keepdim=True)
    yd = y.double()
    for r in range(2):
        for k, value in enumerate(PENALTIES):
            # H = 11^T / n + Phi_c (Phi_c^T Phi_c + n lambda)^-1 Phi_c^T: fitted = H y.
            inner = centred[r].T @ centred[r] + n * value * torch.eye(net.width).double()
            hat = centred[r] @ torch.linalg.solve(inner, centred[r].T) + 1.0 / n
            residual = yd - hat @ yd
            gcv = (residual.square().mean()) / (1 - torch.trace(hat) / n) ** 2
            assert float(path.df[r, k]) == pytest.approx(float(torch.trace(hat)), rel=1e-9)
            assert float(path.gcv(n)[r, k]) == pytest.approx(float(gcv), rel=1e-8)


def test_penalty_zero_gives_the_minimum_norm_solution():
    net, x, y = problem()
    with torch.no_grad():  # duplicate units: a singular covariance
        net.w[:, 12:] = net.w[:, :12]
        net.b[:, 12:] = net.b[:, :12]
    path = penalty_path(moments_of(net, x, y), torch.zeros(2, 1, dtype=torch.float64))
    assert path.fallback  # the singular system took the eigen fallback, and says so
    beta = path.beta[..., 0]
    assert torch.isfinite(beta).all()
    assert torch.allclose(beta[:, :12], beta[:, 12:], atol=1e-8 * beta.abs().max())


def test_the_record_holds_the_path_and_the_first_penalty_is_the_fit(run):
    common = ["model=frozen", "optimizer=ridge", "n_train=2000", "replicas=2"]
    result = run(*common, "optimizer.penalty=[1e-3,1e-6,10]")
    single = run(*common, "optimizer.penalty=1e-3")
    record = json.loads((result.run_dir / "metrics.json").read_text())
    path = record["penalty_path"]
    assert path["penalties"] == [1e-3, 1e-6, 10] and path["picked"] == [1e-3, 1e-3]
    assert "gcv" not in path
    for r in range(2):
        assert path["test_error"][r][0] == pytest.approx(
            float(single.metrics["test_error"][r]), 1e-4
        )
        # More shrinkage: a fit no better on its own samples, and smaller output weights.
        assert path["error"][r][2] > path["error"][r][0] >= path["error"][r][1] - 1e-9
        assert path["u_l2"][r][2] < path["u_l2"][r][0] < path["u_l2"][r][1] + 1e-9
        assert path["df"][r][2] < path["df"][r][0] <= 1 + 64


def test_a_population_fit_takes_a_penalty_path(run):
    result = run(
        "model=frozen", "optimizer=ridge", "optimizer.population=true", "optimizer.penalty=[1e-8,1]"
    )
    path = json.loads((result.run_dir / "metrics.json").read_text())["penalty_path"]
    # On the population the error only rises with the penalty; the first is the run's fit.
    assert path["error"][0] < path["error"][1]
    assert path["error"][0] == pytest.approx(float(result.metrics["population_error"][0]), rel=1e-5)


def test_gcv_picks_the_penalty_of_the_lowest_score(run):
    result = run(
        "model=frozen",
        "optimizer=ridge",
        "n_train=300",
        "width=128",
        "optimizer.penalty=gcv",
        "optimizer.gcv_penalties=[1e-9,1e-3,1e-1,10]",
    )
    path = json.loads((result.run_dir / "metrics.json").read_text())["penalty_path"]
    best = min(range(4), key=lambda k: path["gcv"][k])
    assert path["picked"] == [path["penalties"][best]]
    # 128 features on 300 samples: the smallest penalty overfits, GCV sees it.
    assert path["picked"] != [1e-9] and path["gcv"][0] > path["gcv"][best]
    assert float(result.metrics["test_error"][0]) == pytest.approx(path["test_error"][best], 1e-4)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            ["optimizer.population=true", "optimizer.penalty=gcv"],
            "optimizer.penalty=gcv (cross-validates over samples",
        ),
        (["n_train=100", "optimizer.penalty=ridge"], "must be a number >= 0, a list of them"),
        (["n_train=100", "optimizer.penalty=[]"], "a penalty path needs at least one penalty"),
        (["n_train=100", "optimizer.penalty=[1,-2]"], "optimizer.penalty.1=-2"),
        (
            [
                "n_train=100",
                "optimizer.penalty=[1,2]",
                "optimizer.width_path=true",
                "optimizer.penalty_scale=absolute",
            ],
            "optimizer.width_path=true takes one penalty",
        ),
    ],
)
def test_bad_penalty_paths_are_refused(run, overrides, message):
    with pytest.raises(ConfigError) as error:
        run("model=frozen", "optimizer=ridge", *overrides)
    assert message in str(error.value)
