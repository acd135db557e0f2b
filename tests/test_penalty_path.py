"""The penalty path: ridge at every penalty from one eigendecomposition equals separate fits;
GCV equals its definition through the hat matrix; the record; refusals."""

from __future__ import annotations

import json

import pytest
import torch

from randfeat_torch.config import ConfigError
from randfeat_torch.models import TwoLayerNet
from randfeat_torch.ridge import penalty_path, sampled_moments, solve_centred
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


def test_the_path_equals_a_separate_fit_at_every_penalty():
    net, x, y = problem()
    lam = torch.tensor(PENALTIES, dtype=torch.float64).expand(2, -1).contiguous()
    path = penalty_path(moments_of(net, x, y), lam)
    for k, value in enumerate(PENALTIES):
        alone = solve_centred(moments_of(net, x, y), torch.full((2,), value, dtype=torch.float64))
        cov = moments_of(net, x, y).cov
        system = cov + value * torch.eye(net.width, dtype=torch.float64)
        # Backward-stable solves on both sides: agreement to cond(cov + lambda) * eps.
        tol = 10 * float(torch.linalg.cond(system).max()) * EPS64
        assert torch.allclose(path.mse[:, k], alone.train_mse, rtol=0, atol=tol * float(y.var()))
        scale = alone.beta.abs().max()
        assert torch.allclose(path.beta[..., k], alone.beta, rtol=0, atol=tol * scale)
        assert torch.allclose(path.c[:, k], alone.c, rtol=0, atol=tol * (1 + alone.c.abs().max()))


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
