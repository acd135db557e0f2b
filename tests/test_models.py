"""The two-layer net: replica shapes and seeds, freezing, parameterizations."""

from __future__ import annotations

import math

import pytest
import torch

from randfeat_torch.models import ACTIVATION_FUNCTIONS, LinearizedNet, TwoLayerNet
from randfeat_torch.targets import replica_seed

EPS32 = torch.finfo(torch.float32).eps


def forward_rounding(net: TwoLayerNet, x: torch.Tensor) -> torch.Tensor:
    """How far two float32 evaluations of ``net`` at x: (n, d) may part, whatever order each
    sums in: (d + width + 2) eps32 times the sizes of the terms of both sums, the first layer's
    carried through |act'| (Higham's gamma_n bound): (R, n)."""
    with torch.no_grad():
        pre = torch.matmul(x, net.w.transpose(1, 2))  # (R, n, width)
        sizes = torch.matmul(x.abs(), net.w.abs().transpose(1, 2))
        if net.b is not None:
            pre, sizes = pre + net.b.unsqueeze(1), sizes + net.b.abs().unsqueeze(1)
        terms = net.act(pre).abs() + net.act_derivative(pre).abs() * sizes
        size = net.multiplier * (terms * net.a.abs().unsqueeze(1)).sum(-1) + net.c.abs()[:, None]
    return (net.d + net.width + 2) * EPS32 * size


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
    assert (many(x)[2] - one(x)[0]).abs().le(forward_rounding(one, x)[0]).all()
    # a seed per replica: replica r is the single net of its seed; a list of another length
    # is refused, not cycled or cut
    listed = TwoLayerNet(d=4, width=6, replicas=2, seed=[replica_seed(10, 2), 10])
    assert torch.equal(listed.w[0], one.w[0]) and torch.equal(listed.w[1], many.w[0])
    with pytest.raises(ValueError, match="2 seeds for 3 replicas"):
        TwoLayerNet(d=4, width=6, replicas=3, seed=[1, 2])


def test_forward_is_the_formula():
    net = TwoLayerNet(d=3, width=5, parameterization="mean_field", activation="tanh", seed=2)
    with torch.no_grad():
        net.c.fill_(0.3)
    x = torch.randn(4, 3)
    hidden = torch.tanh(x @ net.w[0].T + net.b[0])
    formula = hidden @ net.a[0] / 5 + 0.3
    assert (net(x)[0] - formula).abs().le(forward_rounding(net, x)[0]).all()


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
    assert (lin(x) - net(x)).abs().le(forward_rounding(net, x)).all()
    net(x).square().sum().backward()
    lin(x).square().sum().backward()
    pairs = [(lin.a, net.a), (lin.dw, net.w), (lin.c, net.c)] + ([(lin.db, net.b)] if bias else [])
    for mine, theirs in pairs:
        assert torch.allclose(mine.grad, theirs.grad, atol=1e-5, rtol=1e-4)


def sum_rounding(phi: torch.Tensor, beta: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """How far two float32 evaluations of <phi, beta> + c may part, whatever order each sums in:
    (P + 1) eps32 times the sum of the terms' sizes (Higham's gamma_n), (R, n)."""
    size = (phi.abs() @ beta.abs().unsqueeze(-1)).squeeze(-1) + c.abs().unsqueeze(1)
    return (phi.shape[-1] + 1) * torch.finfo(torch.float32).eps * size


@pytest.mark.parametrize("parameterization", ["standard", "ntk"])  # output multiplier 1, 1/sqrt(5)
def test_linearized_net_is_linear_in_its_ridge_features(parameterization):
    lin = LinearizedNet(TwoLayerNet(d=3, width=5, replicas=2, parameterization=parameterization))
    gen = torch.Generator().manual_seed(2)
    beta = torch.randn(2, 5 * (3 + 2), generator=gen)
    c = torch.randn(2, generator=gen)
    lin.load_ridge_solution(beta, c)
    x = torch.randn(7, 3, generator=gen)
    expected = (lin.ridge_features(x) @ beta.unsqueeze(-1)).squeeze(-1) + c.unsqueeze(1)
    assert (lin(x) - expected).abs().le(sum_rounding(lin.ridge_features(x), beta, c)).all()
    # Loading sets (a, dw, db) to beta's blocks, and the features are the gradient of f_lin in
    # them, in that order: autograd's at each input, a product of at most four float32 factors
    # either way (within 4 eps32 relative).
    assert torch.equal(torch.cat([lin.a, lin.dw.flatten(1), lin.db], dim=1), beta)
    for i in range(len(x)):
        grads = torch.autograd.grad(lin(x[i : i + 1]).sum(), [lin.a, lin.dw, lin.db])
        jacobian = torch.cat([g.flatten(1) for g in grads], dim=1)  # (R, width (d + 2))
        assert torch.allclose(jacobian, lin.ridge_features(x[i : i + 1])[:, 0], rtol=4e-7, atol=0)


def test_frozen_net_is_linear_in_its_ridge_features():
    net = TwoLayerNet(d=3, width=5, replicas=2, freeze_first_layer=True, parameterization="ntk")
    beta, c = torch.randn(2, 5), torch.randn(2)
    net.load_ridge_solution(beta, c)
    x = torch.randn(7, 3)
    expected = (net.ridge_features(x) @ beta.unsqueeze(-1)).squeeze(-1) + c.unsqueeze(1)
    assert (net(x) - expected).abs().le(sum_rounding(net.ridge_features(x), beta, c)).all()


@pytest.mark.parametrize("activation", sorted(ACTIVATION_FUNCTIONS))
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shared", [True, False])
def test_ridge_features_computed_in_place_are_the_features_times_the_multiplier(
    activation, bias, shared
):
    net = TwoLayerNet(3, 5, replicas=2, freeze_first_layer=True, activation=activation, bias=bias)
    x = torch.randn(7, 3) if shared else torch.randn(2, 7, 3)
    before = x.clone()
    with torch.no_grad():
        phi, expected = net.ridge_features(x), net.features(x) * net.multiplier
    assert torch.equal(phi, expected) and torch.equal(x, before)


@pytest.mark.parametrize("frozen", [True, False])
@pytest.mark.parametrize("activation", ["relu", "tanh"])
def test_ridge_features_backpropagate_as_the_features_times_the_multiplier_do(frozen, activation):
    """Under autograd (to the inputs of a frozen net, or to a trainable net's first layer)
    nothing is overwritten that the backward needs."""
    net = TwoLayerNet(3, 5, replicas=2, freeze_first_layer=frozen, activation=activation)
    grads = []
    for features in (net.ridge_features, lambda x: net.features(x) * net.multiplier):
        net.zero_grad()
        x = torch.randn(7, 3, generator=torch.Generator().manual_seed(0), requires_grad=True)
        features(x).square().sum().backward()
        grads.append([x.grad] + ([] if frozen else [net.w.grad.clone(), net.b.grad.clone()]))
    for ours, reference in zip(*grads, strict=True):
        assert torch.equal(ours, reference)
