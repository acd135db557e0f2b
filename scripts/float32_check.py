"""How well ``optimizer.gram_products=float32`` estimates its own effect on beta.

``python scripts/float32_check.py``

For frozen ReLU nets on a ReLU-neuron target, over d, width, hidden bias and penalty, it fits
ridge on the same samples three ways: float64 products (the reference), float32 products, and
float64 products of features computed in float64 (what the float32 features' own rounding
does). It prints each one's relative change of beta against the reference, and the float32
fit's estimate (:func:`randfeat_torch.ridge.rounding_error`) over its real change. About a
minute on 2 cores.
"""

from __future__ import annotations

import torch

from randfeat_torch.models import TwoLayerNet
from randfeat_torch.ridge import FLOAT32_TOLERANCE, fit_ridge

CPU = torch.device("cpu")
# (d, width, n_train, hidden bias)
PROBLEMS = [
    (6, 545, 10_000, True),
    (16, 512, 20_000, True),
    (16, 512, 20_000, False),
    (32, 1024, 50_000, True),
    (64, 2048, 65_536, False),
]
PENALTIES = (1e-8, 1e-4, 1e-2)  # relative


def draws(d: int, seed: int):
    """A fresh draw() of (x, relu(<w*, x>)) from the same seed each call."""
    w_star = torch.randn(d, generator=torch.Generator().manual_seed(9))
    w_star /= w_star.norm()
    gen = torch.Generator().manual_seed(seed)

    def draw(m: int) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.randn(m, d, generator=gen)
        return x, torch.relu(x @ w_star)

    return draw


def float64_features(net: TwoLayerNet):
    """The net's ridge features computed in float64 from its (float32) first layer."""
    w, b = net.w.double(), None if net.b is None else net.b.double()

    def features(x: torch.Tensor) -> torch.Tensor:
        pre = torch.einsum("nd,rwd->rnw", x.double(), w)
        return torch.relu(pre if b is None else pre + b.unsqueeze(1)) * net.multiplier

    return features


def main() -> None:
    print(
        f"{'d':>3} {'width':>5} {'n':>6} {'bias':>5} {'penalty':>8}  {'float32':>9} "
        f"{'estimate':>9} {'est/real':>8} {'refit':>5}  {'f64 features':>12}"
    )
    for d, width, n, bias in PROBLEMS:
        net = TwoLayerNet(d=d, width=width, freeze_first_layer=True, seed=0, bias=bias)
        features64 = float64_features(net)
        for penalty in PENALTIES:
            fits = [
                fit_ridge(features, draws(d, 1), n, 1, width, penalty, CPU, products=products)
                for features, products in (
                    (net.ridge_features, torch.float64),
                    (net.ridge_features, torch.float32),
                    (features64, torch.float64),
                )
            ]
            reference = fits[0].beta
            change = [float((f.beta - reference).norm() / reference.norm()) for f in fits[1:]]
            estimate = float(fits[1].rounding_error[0])
            print(
                f"{d:>3} {width:>5} {n:>6} {bias!s:>5} {penalty:>8.0e}  {change[0]:>9.2e} "
                f"{estimate:>9.2e} {estimate / change[0]:>8.2f} "
                f"{'yes' if estimate > FLOAT32_TOLERANCE else 'no':>5}  {change[1]:>12.2e}"
            )


if __name__ == "__main__":
    main()
