"""Every config option composes and builds; bad values are refused with one sentence."""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
import torch
from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf

from randfeat_torch import cli, data
from randfeat_torch.cli import CONFIG_DIR, load_config
from randfeat_torch.config import GROUPS, ConfigError, validate
from randfeat_torch.models import build_model
from randfeat_torch.optim import build_optimizer
from randfeat_torch.sweeps import hydra_configs
from randfeat_torch.targets import build_target
from randfeat_torch.trainer import train
from tests.conftest import COMPOSE, SMALL, compose_train
from tests.test_presets import PRESETS

CPU = torch.device("cpu")

GROUP_OPTIONS = [
    (group, path.stem)
    for group in ("input", "target", "model", "optimizer")
    for path in sorted((CONFIG_DIR / group).glob("*.yaml"))
]
FITS = sorted(path.stem for path in (CONFIG_DIR / "fit").glob("*.yaml"))


def test_the_tests_compose_every_option_that_hydra_offers():
    """The parametrized tests below (and test_presets for the experiments) cover the options
    of every group as Hydra lists them, the ConfigStore's included: a new group, or an option
    that the globs miss, fails here."""
    with hydra_configs():
        loader = GlobalHydra.instance().hydra.config_loader
        offered = {(g, o) for g in GROUPS for o in loader.get_group_options(g)}
    covered = {*GROUP_OPTIONS, *(("fit", o) for o in FITS), *(("experiment", p) for p in PRESETS)}
    assert offered == covered


def assert_error_on_fresh_samples(cfg, result, n: int = 20_000) -> None:
    """The recorded test error is the returned model's on the target: its normalised MSE on
    n fresh samples agrees within 5 standard errors of the difference of the two means."""
    device = torch.device(cfg.device)
    target = build_target(cfg.target, device)
    variance = data.TestSet(cfg, target, device).variance.double()
    x, y = data.Data(cfg, target, device, cfg.target.seed + 1, data.TEST_STREAM).draw(n)
    with torch.no_grad():
        squares = (result.model(x) - y).double().square() / variance  # (R, n)
    sigma = squares.std(1) * math.sqrt(1 / cfg.n_test + 1 / n)
    recorded = result.metrics["test_error"].double().to(device)
    assert ((recorded - squares.mean(1)).abs() <= 5 * sigma).all(), (recorded, squares.mean(1))


NEEDS = {
    "optimizer/ridge": ["model=frozen", "n_train=64"],
    "model/kernel": ["optimizer=ridge", "n_train=64"],
}


@pytest.mark.parametrize(("group", "option"), GROUP_OPTIONS)
def test_every_yaml_composes_and_trains(make_cfg, tmp_path, group, option):
    cfg = make_cfg(f"{group}={option}", *NEEDS.get(f"{group}/{option}", []))
    validate(cfg)
    assert option.startswith(cfg[group].name)  # relu_neuron_hard is a relu_neuron
    result = train(cfg, tmp_path)
    assert result.status == "ok"
    assert result.model(torch.randn(5, cfg.d)).shape == (cfg.replicas, 5)
    assert_error_on_fresh_samples(cfg, result)


# Enough samples for the ridge fits to be near their optimum (64 and 640 features).
FIT_NEEDS = {"rf_ridge": ["n_train=1000"], "nt_ridge": ["n_train=3000"]}
FIT_NEEDS |= {"rf_kernel": ["n_train=1000"], "nt_kernel": ["n_train=1000"]}


@pytest.mark.parametrize("option", FITS)
def test_every_fit_composes_and_trains(make_cfg, tmp_path, option):
    cfg = make_cfg(f"fit={option}", *FIT_NEEDS.get(option, []))
    validate(cfg)
    regime = {"nn": "trainable", "rf": "frozen", "nt": "linearized"}[option[:2]]
    assert cfg.model.name == ("kernel" if option.endswith("_kernel") else regime)
    result = train(cfg, tmp_path)
    assert result.status == "ok"
    assert_error_on_fresh_samples(cfg, result)
    if option == "rf_population":  # no samples: its fit is the exact population optimum
        assert cfg.optimizer.population and cfg.n_train is None
        error = float(result.metrics["population_mse"][0]) / (0.5 - 1 / (2 * math.pi))  # / Var f
        assert error == pytest.approx(result.theory["rf_population_error"], rel=1e-4)
    if option == "rf_ridge":  # 1000 samples, 512 test points: near the optimum, 0.075 (0.094)
        assert result.test_error == pytest.approx(result.theory["rf_population_error"], abs=0.03)
    if option == "nt_ridge":  # the tangent features beat the RF optimum (measured 0.049)
        assert result.test_error < 0.08
    if option.endswith("_kernel"):  # width -> infinity on 1000 samples: 0.013 and 0.014
        assert result.test_error < result.theory["best_degree_2"] < 0.075  # (RF at width 64)


@pytest.mark.parametrize("regime", ["trainable", "frozen", "linearized"])
def test_the_optimizer_gets_the_parameters_of_the_regime(make_cfg, regime):
    cfg = make_cfg(f"model={regime}")
    optimizer, _ = build_optimizer(cfg.optimizer, build_model(cfg.model, 0, CPU), cfg.steps)
    trained = sum(p.numel() for g in optimizer.param_groups for p in g["params"])
    first_layer = cfg.width * cfg.d + cfg.width
    assert trained == cfg.width + 1 + (0 if regime == "frozen" else first_layer)


@pytest.mark.parametrize(
    "overrides",
    [
        [],
        ["model=frozen", "optimizer=ridge", "n_train=64", "width=7"],
        ["target.degree=2", "target=polynomial", "width=${d}"],  # a value before its group
        ["optimizer.lr=[0.05,0.2]", "replicas=2", "steps_to_error=[2,0.5]", "n_train=null"],
        ["fit=rf_population", "d=13"],
        ["experiment=gd_vs_rf_small", "seed=3"],
        ["+vars.ratio=2", "seed=${vars.ratio}"],  # Hydra composes it whole
    ],
)
def test_the_fixture_composes_what_hydra_composes(overrides):
    """make_cfg sets the values on a copy of each pick of groups composed once: the same
    config as Hydra's (values, interpolations, struct flag), and no copy shares a node."""
    cached, hydra = COMPOSE([*SMALL, *overrides]), compose_train([*SMALL, *overrides])
    assert OmegaConf.to_yaml(cached) == OmegaConf.to_yaml(hydra)
    assert OmegaConf.to_yaml(cached, resolve=True) == OmegaConf.to_yaml(hydra, resolve=True)
    assert OmegaConf.is_struct(cached) and OmegaConf.is_struct(hydra)
    cached.model.width = 3
    assert COMPOSE([*SMALL, *overrides]).model.width == hydra.model.width


@pytest.mark.parametrize("override", ["loss=huber", "nosuchkey=1", "model=nosuch"])
def test_the_fixture_refuses_what_hydra_refuses_with_hydras_error(override):
    with pytest.raises(Exception) as hydra:
        compose_train([*SMALL, override])
    with pytest.raises(type(hydra.value), match=re.escape(str(hydra.value))):
        COMPOSE([*SMALL, override])


def test_groups_read_the_top_level_knobs(make_cfg):
    cfg = make_cfg("d=13", "width=7", "replicas=3")
    assert (cfg.target.d, cfg.model.d, cfg.model.width, cfg.model.replicas) == (13, 13, 7, 3)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("width=-5", "invalid config: width=-5 (must be an integer >= 1)"),
        ("d=0", "invalid config: d=0 (must be an integer >= 1)"),
        ("backward=fast", "invalid config: backward=fast (allowed: analytic, autograd)"),
        ("steps=0", "invalid config: steps=0 (must be an integer >= 1)"),
        ("batch_size=0", "invalid config: batch_size=0 (must be an integer >= 1)"),
        ("replicas=0", "invalid config: replicas=0 (must be an integer >= 1)"),
        ("eval_every=0", "invalid config: eval_every=0 (must be an integer >= 1)"),
        ("optimizer.weight_decay=-1", "optimizer.weight_decay=-1.0 (must be a finite number >= 0)"),
        ("n_test=1", "invalid config: n_test=1 (must be an integer >= 2"),
        ("optimizer.lr=0", "invalid config: optimizer.lr=0 (must be a finite number > 0)"),
        ("optimizer.lr=nan", "invalid config: optimizer.lr=nan (must be a finite number > 0)"),
        ("optimizer.momentum=1.5", "invalid config: optimizer.momentum=1.5 (must be in [0, 1))"),
        ("n_train=10", "invalid config: n_train=10 (must be >= batch_size=32"),
        ("target=polynomial target.degree=0", "invalid config: target.degree=0"),
        ("target=polynomial target.degree=-1", "invalid config: target.degree=-1"),
        ("target=polynomial target.degree=60", "target.degree=60 (must be in 1..4 for d=8 and "),
        (
            "target=polynomial d=1 target.terms=1 target.degree=4",
            "degree=4 (must be in 1..3 for d=1",
        ),
        (
            "target=polynomial d=2000 target.terms=1000001",
            "target.terms=1000001 (must be <= 1000000",
        ),
        ("target.norm=-1", "invalid config: target.norm=-1.0 (must be a finite number > 0)"),
        ("model.activation=swish", "invalid config: model.activation=swish (allowed: relu, gelu"),
        ("model.parameterization=mup", "model.parameterization=mup (allowed: standard, ntk"),
        ("device=tpu", "invalid config: device=tpu (allowed: auto, cpu, cuda)"),
        ("target.d=5", "invalid config: target.d=5 (must equal d=8"),
        ("optimizer.warmup_steps=20", "optimizer.warmup_steps=20 (must be < steps=20)"),
        ("optimizer.lr_scaling=mup", "optimizer.lr_scaling=mup (allowed: parameterization, "),
        ("loss=huber", "invalid config: loss=huber (allowed: mse, hinge, logistic)"),
        ("model.lazy_scale=-2", "model.lazy_scale=-2.0 (must be a finite number > 0)"),
        ("model=linearized model.lazy_scale=10", "model.lazy_scale=10.0 (needs model=trainable"),
        (
            "model=frozen optimizer=ridge n_train=100 model.lazy_scale=10",
            "model.lazy_scale=10.0 (optimizer=ridge fits the model's optimum",
        ),
        ("model=frozen optimizer=ridge n_train=100 loss=hinge", "loss=hinge (optimizer=ridge"),
        ("lazy_probe=-1", "lazy_probe=-1 (must be an integer >= 0 (0: no laziness measures))"),
        ("steps_to_error=[0.1,-1]", "steps_to_error.1=-1.0 (must be a finite number > 0)"),
        (
            "model=frozen optimizer=ridge n_train=100 optimizer.gram_products=float16",
            "optimizer.gram_products=float16 (allowed: float64, float32)",
        ),
        (
            "model=frozen optimizer=ridge optimizer.population=true "
            "optimizer.gram_products=float32",
            "gram_products=float32 (is checked for one fit of one penalty on sampled features, "
            "but optimizer.population=true draws no samples; allowed there: float64)",
        ),
        (
            "model=kernel optimizer=ridge n_train=100 optimizer.gram_products=float32",
            "but model=kernel has a closed-form kernel in float64, no features; allowed there",
        ),
        (
            "model=frozen optimizer=ridge n_train=100 optimizer.gram_products=float32 "
            "optimizer.width_path=true optimizer.penalty_scale=absolute",
            "but optimizer.width_path=true solves at every width; allowed there: float64",
        ),
        (
            "model=frozen optimizer=ridge n_train=100 optimizer.gram_products=float32 "
            "optimizer.penalty=[0.1,1]",
            "but optimizer.penalty=[0.1, 1] fits a path of penalties; allowed there: float64",
        ),
        (
            "model=frozen optimizer=ridge n_train=100 optimizer.gram_products=float32 "
            "optimizer.penalty=gcv",
            "but optimizer.penalty=gcv fits a path of penalties; allowed there: float64",
        ),
    ],
)
def test_bad_values_are_refused_with_one_sentence(override, message):
    with pytest.raises(ConfigError) as info:  # by the typed schema while composing, or after
        load_config([*SMALL, *override.split()])
    text = str(info.value)
    assert text.startswith("invalid config: ")
    assert message in text
    assert "\n" not in text


@pytest.mark.parametrize(("n_test", "top"), [(512, 4), (10_000, 7), (1_000_000, 10)])
def test_polynomial_degree_is_bounded_by_what_the_test_set_can_see(n_test, top, capsys):
    """Up to degree top the test set measures the unit variance to within 1/2: relative standard
    error sqrt((E m^4 - 1) / n_test), E m^4 = 3^k for k <= d = 8, then a coordinate repeats:
    15^2 3^6 = 164025 at k = 10, 15^3 3^5 = 820125 at k = 11; past it, no."""
    sizes = [*SMALL, f"n_test={n_test}", "target=polynomial"]
    assert load_config([*sizes, f"target.degree={top}"]).target.degree == top
    with pytest.raises(SystemExit) as exit_info:  # through the command line
        cli.precheck([*sizes, f"target.degree={top + 1}"])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.startswith(
        f"invalid config: target.degree={top + 1} (must be in 1..{top} for d=8 and "
        f"n_test={n_test}: n test points measure the unit variance"
    )


def test_too_many_polynomial_terms_are_refused(run, tmp_path: Path):
    with pytest.raises(ConfigError, match=r"target.terms=20 \(must be <= 3, the number"):
        run("d=2", "target=polynomial", "target.degree=2", "target.terms=20")


def test_cuda_without_cuda_is_refused(run):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(ConfigError, match="invalid config: device=cuda"):
        run("device=cuda")


@pytest.mark.parametrize("key", ["loss", "device", "optimizer.schedule", "model.activation"])
def test_an_interpolation_of_the_wrong_type_is_refused_before_the_run(key):
    """Before, OmegaConf typed it only when read: the run failed with Hydra's error."""
    with pytest.raises(ConfigError, match=rf"^invalid config: {re.escape(key)}=\$\{{d\}} \("):
        load_config([f"{key}=${{d}}"])
