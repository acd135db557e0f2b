"""The two-layer net: replica shapes and seeds, freezing, parameterizations."""

from __future__ import annotations

import math

import pytest
import torch

from randfeat_torch.models import LinearizedNet, TwoLayerNet
from randfeat_torch.targets import replica_seed


def test_shapes_with_replicas():
    net = TwoLayerNet(d=5, width=7, replicas=3)
    assert net.w.shape == (3, 7, 5) and net.b.shape == (3, 7)
    assert net.a.shape == (3, 7) and net.c.shape == (3,)
    assert net(torch.randn(11, 5)).shape == (3, 11)
    assert net(torch.randn(3, 11, 5)).shape == (3, 11)


def test_replica_r_is_the_single_net_with_its_replica_seed():
    many = TwoLayerNet(d=4, width=6, replicas=3, seed=10)
    one = TwoLayerNet(d=4, width=6, replicas=1, seed=replica_seed(10, 2))
    assert torch.equal(many.w[2], one.w[0]) and torch.equal(many.a[2], one.a[0])
    assert not torch.equal(many.w[0], many.w[1])
    x = torch.randn(9, 4)
    assert torch.allclose(many(x)[2], one(x)[0])


def test_forward_is_the_formula():
    net = TwoLayerNet(d=3, width=5, parameterization="mean_field", activation="tanh", seed=2)
    with torch.no_grad():
        net.c.fill_(0.3)
    x = torch.randn(4, 3)
    hidden = torch.tanh(x @ net.w[0].T + net.b[0])
    assert torch.allclose(net(x)[0], hidden @ net.a[0] / 5 + 0.3, atol=1e-6)


def test_frozen_first_layer_gets_no_gradient():
    net = TwoLayerNet(d=3, width=5, freeze_first_layer=True)
    net(torch.randn(8, 3)).sum().backward()
    assert net.w.grad is None and net.b.grad is None
    assert net.a.grad is not None and net.c.grad is not None


@pytest.mark.parametrize("activation", ["relu", "gelu", "tanh", "softplus", "quadratic"])
@pytest.mark.parametrize("parameterization", ["standard", "ntk", "mean_field"])
@pytest.mark.parametrize(("frozen", "bias"), [(False, True), (False, False), (True, True)])
@pytest.mark.parametrize(("replicas", "shared"), [(1, True), (3, True), (3, False)])
def test_analytic_gradient_equals_autograd(
    activation, parameterization, frozen, bias, replicas, shared
):
    torch.manual_seed(0)
    net = TwoLayerNet(5, 7, replicas, frozen, activation, bias, parameterization=parameterization)
    net = net.double()
    batch = (11,) if shared else (replicas, 11)
    x, y = torch.randn(*batch, 5, dtype=torch.float64), torch.randn(*batch, dtype=torch.float64)
    loss = (net(x) - y).square().mean(dim=1)
    loss.sum().backward()
    expected = {name: p.grad for name, p in net.named_parameters() if p.grad is not None}
    net.zero_grad(set_to_none=True)
    analytic_loss, *grads = net.loss_gradients(x, y)
    net.set_gradients(grads)
    got = {name: p.grad for name, p in net.named_parameters() if p.grad is not None}
    assert got.keys() == expected.keys() == ({"a", "c"} if frozen else {"a", "c", "w", *"b" * bias})
    assert torch.allclose(analytic_loss, loss.detach(), rtol=1e-12)
    for name, grad in expected.items():
        assert torch.allclose(got[name], grad, rtol=1e-10, atol=1e-13), name


def test_no_hidden_bias():
    net = TwoLayerNet(d=3, width=5, bias=False)
    assert net.b is None
    assert torch.allclose(net(torch.zeros(2, 3)), torch.zeros(1, 2))


@pytest.mark.parametrize(
    ("parameterization", "multiplier", "a_std"),
    [("standard", 1.0, 1 / math.sqrt(4096)), ("ntk", 1 / 64, 1.0), ("mean_field", 1 / 4096, 1.0)],
)
def test_parameterizations(parameterization, multiplier, a_std):
    net = TwoLayerNet(d=16, width=4096, parameterization=parameterization)
    assert net.multiplier == pytest.approx(multiplier)
    assert float(net.a.detach().std()) == pytest.approx(a_std, rel=0.05)
    assert float(net.w.detach().pow(2).sum(-1).mean()) == pytest.approx(1.0, rel=0.05)  # E|w|^2 = 1


def test_sphere_init_and_zero_output_init():
    net = TwoLayerNet(d=6, width=10, init="sphere", output_init="zero")
    assert torch.allclose(net.w.norm(dim=-1), torch.ones(1, 10))
    assert torch.equal(net.a, torch.zeros(1, 10))


@pytest.mark.parametrize("activation", ["relu", "gelu", "tanh", "softplus", "quadratic"])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("parameterization", ["standard", "ntk", "mean_field"])
def test_linearized_net_equals_the_net_and_its_gradient_at_init(activation, bias, parameterization):
    net = TwoLayerNet(
        d=4,
        width=9,
        replicas=2,
        activation=activation,
        bias=bias,
        parameterization=parameterization,
        seed=3,
    )
    lin = LinearizedNet(net)
    x = torch.randn(13, 4, generator=torch.Generator().manual_seed(1))
    assert torch.allclose(lin(x), net(x), atol=1e-6)
    net(x).square().sum().backward()
    lin(x).square().sum().backward()
    pairs = [(lin.a, net.a), (lin.dw, net.w), (lin.c, net.c)] + ([(lin.db, net.b)] if bias else [])
    for mine, theirs in pairs:
        assert torch.allclose(mine.grad, theirs.grad, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("parameterization", ["standard", "ntk"])  # output multiplier 1, 1/sqrt(5)
def test_linearized_net_is_linear_in_its_ridge_features(parameterization):
    lin = LinearizedNet(TwoLayerNet(d=3, width=5, replicas=2, parameterization=parameterization))
    gen = torch.Generator().manual_seed(2)
    beta = torch.randn(2, 5 * (3 + 2), generator=gen)
    c = torch.randn(2, generator=gen)
    lin.load_ridge_solution(beta, c)
    x = torch.randn(7, 3, generator=gen)
    expected = (lin.ridge_features(x) @ beta.unsqueeze(-1)).squeeze(-1) + c.unsqueeze(1)
    assert torch.allclose(lin(x), expected, atol=1e-5)
    # Far from init the linearization and the net part ways (it is a different model).
    assert lin.dw.abs().sum() > 0


def test_frozen_net_is_linear_in_its_ridge_features():
    net = TwoLayerNet(d=3, width=5, replicas=2, freeze_first_layer=True, parameterization="ntk")
    beta, c = torch.randn(2, 5), torch.randn(2)
    net.load_ridge_solution(beta, c)
    x = torch.randn(7, 3)
    expected = (net.ridge_features(x) @ beta.unsqueeze(-1)).squeeze(-1) + c.unsqueeze(1)
    assert torch.allclose(net(x), expected, atol=1e-5)
