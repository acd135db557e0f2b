"""Many seeds in one pass: replica r of a run equals the single run with its replica seed."""

from __future__ import annotations

import json

import pytest
import torch
from omegaconf import OmegaConf

from randfeat_torch.analysis import read_records
from randfeat_torch.cli import load_config
from randfeat_torch.config import ConfigError, DataError
from randfeat_torch.models import TwoLayerNet
from randfeat_torch.targets import replica_seed
from randfeat_torch.trainer import _about, train
from tests.conftest import SMALL

BASE = ["steps=60", "eval_every=30", "replicas=3", "seed=5"]


def close(batched: torch.Tensor, single: torch.Tensor) -> bool:
    return torch.allclose(batched, single, rtol=2e-4, atol=1e-6)


@pytest.mark.parametrize(
    "fit",
    [
        ["optimizer=sgd"],
        ["optimizer=adam", "optimizer.lr=0.01"],
        ["model=frozen", "optimizer=ridge", "n_train=3000"],
        ["model=linearized", "optimizer=sgd", "n_train=256"],
    ],
)
@pytest.mark.parametrize("sampling", ["shared", "independent"])
def test_replica_r_equals_the_single_run_with_its_replica_seed(run, fit, sampling):
    batched = run(*BASE, *fit, f"replica_data={sampling}")
    for r in range(3):
        # Shared minibatches come from the run's seed: the single run names it as data_seed.
        data = ["data_seed=5"] if sampling == "shared" else []
        single = run(*BASE, *fit, "replicas=1", f"seed={replica_seed(5, r)}", *data)
        fitted = "fit_mse" if "optimizer=ridge" in fit else "train_loss"
        for name in ("test_error", fitted):
            assert close(batched.metrics[name][r], single.metrics[name][0]), (name, r)
    assert len(set(batched.metrics["test_error"].tolist())) == 3


def test_a_sweep_over_seed_with_replicas_trains_disjoint_networks():
    # seed + r would make replica 1 of seed=0 the same network as replica 0 of seed=1.
    nets = [TwoLayerNet(d=4, width=8, replicas=3, seed=seed) for seed in range(3)]
    first_layers = [w for net in nets for w in net.w.detach()]
    assert len(first_layers) == 9
    for i, w in enumerate(first_layers):
        assert not any(torch.equal(w, other) for other in first_layers[i + 1 :])


def test_the_record_names_each_replicas_seed(run):
    result = run("replicas=3", "seed=7", "steps=2", "eval_every=1")
    record = json.loads((result.run_dir / "metrics.json").read_text())
    assert record["replica_seeds"] == [7, 7 + 2**20, 7 + 2**21]


def test_a_run_that_fails_in_set_up_still_names_each_replicas_seed(make_cfg, tmp_path):
    """Before, a failed record had no seeds, and the aggregator listed seed + r for it."""
    cfg = make_cfg("replicas=3", "seed=7", "target.bias=-100")  # a constant target: refused
    with pytest.raises(DataError):
        train(cfg, tmp_path / "run", choices={"model": "trainable"})
    record = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert record["status"] == "failed" and record["choices"] == {"model": "trainable"}
    assert record["replica_seeds"] == [7, 7 + 2**20, 7 + 2**21]
    rows = read_records(tmp_path).table
    assert rows["replica_seed"].tolist() == record["replica_seeds"]
    # replica_init=shared: every replica starts from the seed's own init, and the record says so
    one_init = make_cfg(
        "replicas=3",
        "seed=7",
        "target.bias=-100",
        "replica_init=shared",
        "replica_data=independent",
    )
    with pytest.raises(DataError):
        train(one_init, tmp_path / "shared")
    record = json.loads((tmp_path / "shared" / "metrics.json").read_text())
    assert record["status"] == "failed" and record["replica_seeds"] == [7, 7, 7]


def test_a_seed_that_cannot_resolve_leaves_the_seeds_out_not_the_record():
    broken = OmegaConf.create({"seed": "${nowhere}", "replicas": 2, "replica_init": "independent"})
    assert _about(broken, {"model": "frozen"}) == {"choices": {"model": "frozen"}}
    plain = OmegaConf.create({"seed": 3, "replicas": 2, "replica_init": "independent"})
    assert _about(plain, None) == {"choices": {}, "replica_seeds": [3, 3 + 2**20]}


def test_independent_replicas_see_different_data(run):
    shared = run(*BASE, "model=frozen", "optimizer=ridge", "n_train=3000", "model.bias=false")
    independent = run(
        *BASE,
        "model=frozen",
        "optimizer=ridge",
        "n_train=3000",
        "model.bias=false",
        "replica_data=independent",
    )
    # Same features (same init seeds), other samples: other fits.
    assert not torch.equal(shared.metrics["fit_mse"], independent.metrics["fit_mse"])
    assert shared.theory == independent.theory


@pytest.mark.parametrize("optimizer", [["optimizer=sgd"], ["optimizer=adam"]])
def test_one_learning_rate_per_replica_equals_separate_runs(run, optimizer):
    batched = run(
        *BASE, *optimizer, "replicas=2", "optimizer.lr=[0.05,0.3]", "optimizer.schedule=cosine"
    )
    for r, lr in enumerate([0.05, 0.3]):
        single = run(
            *BASE,
            *optimizer,
            "replicas=1",
            f"seed={replica_seed(5, r)}",
            "data_seed=5",
            f"optimizer.lr={lr}",
            "optimizer.schedule=cosine",
        )
        assert close(batched.metrics["test_error"][r], single.metrics["test_error"][0]), r


def test_one_gradient_precision_per_replica_equals_separate_runs(run):
    """Replica 0 exact (precision 0), replica 1 rounded to nearest multiples of 0.01."""
    plain = [*BASE, "optimizer.momentum=0"]
    batched = run(*plain, "replicas=2", "optimizer.grad_precision=[0,0.01]")
    for r, precision in enumerate(["null", "0.01"]):
        single = run(
            *plain,
            "replicas=1",
            f"seed={replica_seed(5, r)}",
            "data_seed=5",
            f"optimizer.grad_precision={precision}",
        )
        assert close(batched.metrics["test_error"][r], single.metrics["test_error"][0]), r


def test_a_shared_init_compares_the_precisions_on_one_network(run):
    plain = [*BASE, "optimizer.momentum=0"]
    batched = run(*plain, "replicas=2", "replica_init=shared", "optimizer.grad_precision=[0,0.01]")
    record = json.loads((batched.run_dir / "metrics.json").read_text())
    assert record["replica_seeds"] == [5, 5]
    for r, precision in enumerate(["null", "0.01"]):
        single = run(*plain, "replicas=1", f"optimizer.grad_precision={precision}")
        assert close(batched.metrics["test_error"][r], single.metrics["test_error"][0]), r
    # one init, and yet two networks by the end: the precision alone set them apart
    assert batched.metrics["test_error"][0] != batched.metrics["test_error"][1]


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            ["replicas=2", "replica_init=shared"],
            "replica_init=shared (starts every replica from one init, so they need",
        ),
        (
            # a population fit draws no data: independent data would not tell them apart
            [
                *["replicas=2", "replica_init=shared", "replica_data=independent"],
                *["model=frozen", "optimizer=ridge", "optimizer.population=true"],
            ],
            "replica_init=shared (starts every replica from one init",
        ),
        (["replica_init=mixed"], "replica_init=mixed (allowed: independent, shared)"),
        (["replica_data=${d}"], "Invalid value '8', expected one of [shared, independent])"),
        (
            ["replicas=2", "replica_init=shared", "optimizer.grad_precision=[0.1,0.1]"],
            "two replicas have the same values [0.1] in the per-replica lists",
        ),
        (
            ["replicas=2", "optimizer.grad_precision=[0.1]"],
            "a list needs one precision per replica: 2 numbers (0: exact)",
        ),
        (
            ["replicas=2", "optimizer.grad_precision=[0.1,-1]"],
            "optimizer.grad_precision.1=-1 (must be a finite number >= 0)",
        ),
        (["replicas=2", "optimizer.lr=[0.1,0.2,0.3]"], "a list needs one rate per replica: 2"),
        (
            ["replicas=2", "optimizer.lr=[0.1,-1]"],
            "optimizer.lr.1=-1 (must be a finite number > 0)",
        ),
        (["replica_data=mixed"], "replica_data=mixed (allowed: shared, independent)"),
        (["optimizer.lr=abc"], "optimizer.lr=abc (must be a finite number > 0)"),
    ],
)
def test_bad_replica_settings_are_refused(overrides, message):
    with pytest.raises(
        ConfigError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")
    ):
        load_config([*SMALL, *overrides])  # before anything runs
