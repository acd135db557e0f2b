"""Learning rates per parameterization, the laziness measures, the lazy scale, the losses for +-1
targets and the steps to an error threshold."""

from __future__ import annotations

import json

import pytest
import torch

from randfeat_torch import data
from randfeat_torch.config import ConfigError
from randfeat_torch.diagnostics import Laziness
from randfeat_torch.models import LOSSES, LinearizedNet, TwoLayerNet, build_model
from randfeat_torch.optim import lr_multipliers

PLAIN_SGD = ["optimizer.momentum=0", "optimizer.lr=0.2", "d=16", "steps=300", "eval_every=100"]


def record_of(result) -> dict:
    return json.loads((result.run_dir / "metrics.json").read_text())


@pytest.mark.parametrize("parameterization", ["standard", "ntk", "mean_field"])
def test_each_parameterization_trains_at_its_own_scaling_at_every_width(run, parameterization):
    """One base rate, the multipliers of lr_multipliers: stable and learning at widths 256 to
    8192 (the unit ReLU neuron; at lr 0.2 the error falls from about 1 to below 0.1)."""
    for width in (256, 8192):
        result = run(*PLAIN_SGD, f"width={width}", f"model.parameterization={parameterization}")
        assert result.status == "ok", width
        assert result.test_error < 0.1, width
        rates = record_of(result)["learning_rates"]
        expected = lr_multipliers("sgd", parameterization, width, "parameterization")
        assert rates == {k: pytest.approx(0.2 * v) for k, v in expected.items()}


def test_one_rate_for_every_group_fails_where_the_scaling_trains(run):
    """The measurement behind the multipliers: mean field at one rate barely moves (the output
    bias caps the rate whatever the width), and standard at a large width diverges."""
    uniform = ["optimizer.lr_scaling=uniform", "width=2048"]
    mean_field = run(*PLAIN_SGD, *uniform, "model.parameterization=mean_field")
    assert mean_field.status == "ok" and mean_field.test_error > 0.5
    standard = run(*PLAIN_SGD, *uniform, "model.parameterization=standard")
    assert standard.status == "diverged"


def test_standard_at_its_scaling_trains_the_same_function_as_ntk(run):
    """standard with a's rate / width is ntk with a rescaled by sqrt(width): the same function
    at every step, up to float32 rounding carried through 300 contracting steps."""
    ntk = run(*PLAIN_SGD, "width=512", "model.parameterization=ntk")
    standard = run(*PLAIN_SGD, "width=512", "model.parameterization=standard")
    assert standard.test_error == pytest.approx(ntk.test_error, rel=1e-3)


def laziness_of(model, variance=1.0, probe=32, d=None):
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(probe, d or model.d, generator=gen, dtype=torch.float64)
    mu = lr_multipliers("sgd", model.parameterization, model.width, "parameterization")
    return Laziness(model, x, torch.tensor(variance, dtype=torch.float64), mu)


def perturb(model, scale=0.1):
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * scale)


def test_at_init_every_measure_is_zero():
    net = TwoLayerNet(d=4, width=50, replicas=2, seed=1).double()
    measures = laziness_of(net).measure(net)
    for name, value in measures.items():
        assert torch.all(value.abs() < 1e-12), name  # the kernel with itself: distance 0


def taylor_distance(net: TwoLayerNet, init: dict, x: torch.Tensor) -> torch.Tensor:
    """mean over x of (f - f_lin)^2, f_lin the first-order Taylor expansion at the parameters
    ``init``, by autograd's jvp: (R,)."""
    names = list(init)
    now = tuple(net.get_parameter(name).detach() for name in names)

    def f(*params: torch.Tensor) -> torch.Tensor:
        return torch.func.functional_call(net, dict(zip(names, params, strict=True)), (x,))

    step = tuple(p - init[name] for name, p in zip(names, now, strict=True))
    f0, df = torch.autograd.functional.jvp(f, tuple(init.values()), step)
    return (f(*now) - f0 - df).square().mean(dim=1)


def test_movement_matches_a_direct_computation_and_is_zero_for_a_frozen_first_layer():
    net = TwoLayerNet(d=4, width=50, replicas=2, seed=1).double()
    w0, b0, a0 = net.w.detach().clone(), net.b.detach().clone(), net.a.detach().clone()
    init = {name: p.detach().clone() for name, p in net.named_parameters()}
    laziness = laziness_of(net)
    perturb(net)
    measures = laziness.measure(net)
    for r in range(2):
        direct = (net.w[r].detach() - w0[r]).norm() / w0[r].norm()
        assert float(measures["w_movement"][r]) == pytest.approx(float(direct), rel=1e-12)
        direct = (net.b[r].detach() - b0[r]).norm() / b0[r].norm()
        assert float(measures["b_movement"][r]) == pytest.approx(float(direct), rel=1e-12)
        direct = (net.a[r].detach() - a0[r]).norm() / a0[r].norm()
        assert float(measures["a_movement"][r]) == pytest.approx(float(direct), rel=1e-12)
    assert torch.all(measures["kernel_distance"] > 1e-6)
    # The remainder f - f_lin (about 3e-2 here) of O(1) outputs, each a float64 sum of 50 units:
    # its square is good to 2 * 50 * eps64 / 3e-2 relative (1e-12; measured 2e-15).
    expected = taylor_distance(net, init, laziness.x)
    assert torch.allclose(measures["linearization_distance"], expected, rtol=1e-9, atol=0)

    frozen = TwoLayerNet(d=4, width=50, replicas=2, freeze_first_layer=True, seed=1).double()
    a0 = frozen.a.detach().clone()
    laziness = laziness_of(frozen)
    perturb(frozen)
    measures = laziness.measure(frozen)
    assert torch.all(measures["w_movement"] == 0) and torch.all(measures["b_movement"] == 0)
    direct = (frozen.a - a0).norm(dim=1) / a0.norm(dim=1)
    assert torch.allclose(measures["a_movement"], direct, rtol=1e-12, atol=0)
    # f is linear in (a, c): it is its own linearization, and its tangent kernel never turns.
    assert torch.all(measures["linearization_distance"] < 1e-25)
    assert torch.all(measures["kernel_distance"] < 1e-25)


def test_linearization_distance_is_the_second_order_remainder():
    """For a smooth activation the distance to the Taylor expansion shrinks like the square of
    the step: halving every parameter change divides the mean squared remainder by about 16."""
    distances = []
    for scale in (1e-2, 5e-3):
        net = TwoLayerNet(d=4, width=50, activation="tanh", seed=1).double()
        laziness = laziness_of(net)
        perturb(net, scale)
        distances.append(float(laziness.measure(net)["linearization_distance"][0]))
    assert distances[0] / distances[1] == pytest.approx(16, rel=0.05)


def test_the_linearized_model_is_at_distance_zero_from_its_linearization():
    lin = LinearizedNet(TwoLayerNet(d=4, width=50, replicas=2, seed=1).double())
    laziness = laziness_of(lin)
    perturb(lin, 0.3)
    measures = laziness.measure(lin)
    direct = lin.dw.flatten(1).norm(dim=1) / lin.w0.flatten(1).norm(dim=1)
    assert torch.allclose(measures["w_movement"], direct, rtol=1e-12, atol=0)
    assert torch.all(measures["linearization_distance"] < 1e-25)
    assert torch.all(measures["kernel_distance"] == 0)


def test_a_trained_net_records_its_laziness(run, make_cfg):
    def movement(result, name: str, *overrides: str) -> float:
        """|theta - theta_0| / |theta_0| of the final model, against its init rebuilt."""
        cfg = make_cfg("width=256", *overrides)
        init = getattr(build_model(cfg.model, cfg.seed, torch.device(cfg.device)), name).detach()
        now = getattr(result.model, name).detach()
        return float((now - init).double().norm() / init.double().norm())

    result = run("width=256", "model.parameterization=ntk")
    metrics = record_of(result)["metrics"]
    # float32 norms of width * d = 2048 squares in the run: within 2048 eps32 relative.
    rel = 2048 * torch.finfo(torch.float32).eps
    moved = movement(result, "w", "model.parameterization=ntk")
    assert moved > 0 and metrics["w_movement"] == pytest.approx(moved, rel=rel)
    for name in ("linearization_distance", "kernel_distance"):
        assert metrics[name] > 0, name
    frozen = run("width=256", "model=frozen")
    metrics = record_of(frozen)["metrics"]
    assert metrics["w_movement"] == 0
    moved = movement(frozen, "a", "model=frozen")
    assert moved > 0 and metrics["a_movement"] == pytest.approx(moved, rel=rel)


@pytest.mark.parametrize("loss", ["mse", "hinge", "logistic"])
@pytest.mark.parametrize("lazy_scale", [None, 0.3, 40.0])
@pytest.mark.parametrize("activation", ["relu", "tanh"])
@pytest.mark.parametrize(
    ("frozen", "replicas", "shared"), [(False, 1, True), (False, 3, False), (True, 3, False)]
)
def test_written_out_gradient_equals_autograd_for_every_loss_and_lazy_scale(
    loss, lazy_scale, activation, frozen, replicas, shared
):
    torch.manual_seed(0)
    net = TwoLayerNet(5, 7, replicas, frozen, activation, lazy_scale=lazy_scale, seed=3).double()
    perturb(net)  # away from init, where the lazy model is 0
    batch = (11,) if shared else (replicas, 11)
    x = torch.randn(*batch, 5, dtype=torch.float64)
    y = torch.randn(*batch, dtype=torch.float64).sign()
    value = LOSSES[loss](net(x), y).mean(dim=1)
    (value.sum() / (lazy_scale or 1.0) ** 2).backward()
    expected = {name: p.grad for name, p in net.named_parameters() if p.grad is not None}
    net.zero_grad(set_to_none=True)
    got_loss, *grads = net.loss_gradients(x, y, loss)
    net.set_gradients(grads)
    assert torch.allclose(got_loss, value.detach(), rtol=1e-12)
    for name, grad in expected.items():
        assert torch.allclose(net.get_parameter(name).grad, grad, rtol=1e-10, atol=1e-13), name


def test_the_lazy_model_is_zero_at_init_and_scaled_around_it():
    net = TwoLayerNet(4, 9, lazy_scale=5.0, seed=2)
    x = torch.randn(6, 4)
    assert torch.all(net(x) == 0)
    perturb(net)
    assert torch.allclose(net(x), 5.0 * (net.net(x) - net.net_at_init(x)))


def test_a_large_lazy_scale_keeps_the_net_near_its_linearization(run):
    """Chizat, Oyallon & Bach: alpha -> infinity is the lazy (linearized) limit."""
    common = ["width=128", "steps=200", "eval_every=200", "optimizer.momentum=0"]
    active = record_of(run(*common, "model.lazy_scale=0.5"))["metrics"]
    lazy = record_of(run(*common, "model.lazy_scale=50"))["metrics"]
    assert lazy["w_movement"] < 0.1 * active["w_movement"]
    assert lazy["linearization_distance"] < 0.01 * active["linearization_distance"]


@pytest.mark.parametrize("loss", ["hinge", "logistic"])
def test_classification_losses_learn_a_parity_and_report_the_zero_one_error(run, loss):
    parity = ["input=hypercube", "target=parity", "target.k=2", "d=6", "width=256"]
    result = run(*parity, f"loss={loss}", "steps=600", "eval_every=200", "optimizer.lr=0.05")
    metrics = record_of(result)["metrics"]
    assert result.status == "ok"
    assert metrics["test_zero_one"] < 0.05  # chance is 0.5
    assert "train_error" not in metrics


def test_a_classification_loss_refuses_a_target_that_is_not_plus_or_minus_one(run):
    with pytest.raises(ConfigError, match=r"loss=hinge \(is a loss for \+-1 labels"):
        run("loss=hinge")


def test_steps_to_error_on_a_scripted_error_curve(run, monkeypatch):
    errors = iter([0.8, 0.4, 0.45, 0.05, 0.009, 0.3])  # at steps 10, 20, ..., 60
    evaluate = data.TestSet.evaluate

    def scripted(self, model, fitted, kind="train"):
        metrics = evaluate(self, model, fitted, kind)
        if torch.isfinite(fitted).all():  # the evaluations of the loop, not the initial one
            metrics["test_error"] = torch.full_like(metrics["test_error"], next(errors))
        return metrics

    monkeypatch.setattr(data.TestSet, "evaluate", scripted)
    result = run("steps=60", "eval_every=10", "steps_to_error=[0.5,0.1,0.01,0.001]")
    assert record_of(result)["steps_to_error"] == {"0.5": 20, "0.1": 40, "0.01": 50, "0.001": None}


@pytest.mark.parametrize("parameterization", ["ntk", "mean_field"])
@pytest.mark.parametrize(
    ("activation", "bias", "frozen"),
    [("tanh", True, False), ("relu", False, False), ("tanh", True, True)],
)
def test_the_kernel_is_the_rate_weighted_tangent_kernel_of_autograd(
    parameterization, activation, bias, frozen
):
    """K(x, x') = sum over trained groups g of mu_g <df(x)/dtheta_g, df(x')/dtheta_g>, built
    from autograd's gradients at each probe point; the kernel distance is its cosine distance."""
    net = TwoLayerNet(3, 20, 1, frozen, activation, bias, parameterization=parameterization, seed=4)
    net = net.double()
    laziness = laziness_of(net, probe=6)
    perturb(net, 0.3)
    mu = laziness.multipliers
    trained = {name: p for name, p in net.named_parameters() if p.requires_grad}
    rows = []
    for x in laziness.x:
        grads = torch.autograd.grad(net(x.unsqueeze(0)).sum(), list(trained.values()))
        scaled = [mu[name] ** 0.5 * g.flatten() for name, g in zip(trained, grads, strict=True)]
        rows.append(torch.cat(scaled))
    jacobian = torch.stack(rows)
    kernel = jacobian @ jacobian.T
    unit = kernel / kernel.norm()
    assert torch.allclose(laziness.unit_kernel(net)[0], unit, rtol=1e-10, atol=1e-13)
    expected = 1 - (unit * laziness.kernel0[0]).sum()
    got = laziness.measure(net)["kernel_distance"][0]
    assert float(got) == pytest.approx(float(expected), rel=1e-8, abs=1e-14)


def test_the_distance_to_the_linearization_scales_with_the_square_of_the_lazy_scale():
    plain = TwoLayerNet(4, 30, activation="tanh", seed=1).double()
    scaled = TwoLayerNet(4, 30, activation="tanh", seed=1, lazy_scale=3.0).double()
    distances = []
    for net in (plain, scaled):
        laziness = laziness_of(net)
        perturb(net, 0.2)
        distances.append(float(laziness.measure(net)["linearization_distance"][0]))
    assert distances[1] == pytest.approx(9 * distances[0], rel=1e-10)
