"""The training loop: what theory says each model can learn, seeding, replicas, divergence."""

from __future__ import annotations

import io
import itertools
import json
import subprocess
import sys

import pytest
import torch
from omegaconf import OmegaConf

from randfeat_torch import optim
from randfeat_torch.config import DataError
from randfeat_torch.models import build_model
from randfeat_torch.optim import GradientPrecision, build_optimizer
from randfeat_torch.targets import replica_seed

EPS32 = torch.finfo(torch.float32).eps
LEARN = ["d=8", "width=256", "steps=1500", "batch_size=128", "eval_every=500", "n_test=4000"]


def test_trained_net_learns_a_unit_relu_neuron_and_beats_random_features(run):
    trained = run(*LEARN, "model=trainable")
    frozen = run(*LEARN, "model=frozen")
    assert trained.status == frozen.status == "ok"
    assert trained.test_error < 0.02
    assert trained.test_error < 0.5 * frozen.test_error
    assert frozen.test_error < 0.3  # below the best linear predictor's 0.27 + slack: it learned


def test_frozen_net_keeps_its_first_layer_and_learns_a_linear_target(run, make_cfg):
    overrides = [*LEARN, "model=frozen", "target=polynomial", "target.degree=1", "target.terms=8"]
    cfg = make_cfg(*overrides)
    init = build_model(cfg.model, cfg.seed, torch.device(cfg.device))
    result = run(*overrides)
    assert torch.equal(result.model.w, init.w) and torch.equal(result.model.b, init.b)
    assert not torch.equal(result.model.a, init.a)
    assert result.test_error < 0.1


def test_same_seed_gives_identical_metrics_and_other_seeds_differ(run):
    first, second = run("seed=3"), run("seed=3")
    other = run("seed=4")
    for name in ("test_error", "test_mse", "train_loss"):
        assert torch.equal(first.metrics[name], second.metrics[name])
    assert not torch.equal(first.metrics["test_error"], other.metrics["test_error"])


def test_two_replicas_give_two_errors_and_their_own_record(run, tmp_path):
    result = run("replicas=2")
    errors = result.metrics["test_error"]
    assert errors.shape == (2,) and errors[0] != errors[1]
    record = json.loads((result.run_dir / "metrics.json").read_text())
    assert len(record["metrics"]["test_error"]) == 2
    assert record["metrics"]["test_error"] == pytest.approx(errors.tolist())


def test_replica_r_matches_the_single_run_at_init_seed(run):
    """At init (one step of negligible size), replica r of seed s is the single net of its
    replica seed."""
    many = run("replicas=3", "seed=5", "steps=1", "eval_every=1", "optimizer.lr=1e-12")
    seed = replica_seed(5, 2)
    one = run("replicas=1", f"seed={seed}", "steps=1", "eval_every=1", "optimizer.lr=1e-12")
    # Batched and single float32 forwards may round apart by (d + width) eps32 per output, and
    # the float32 sums of the 512 squares by 512 eps32: within 1e-4 relative (another seed's
    # net is O(1) away).
    assert many.metrics["test_mse"][2] == pytest.approx(float(one.metrics["test_mse"][0]), rel=1e-4)


def test_finite_training_set_and_full_batch_gradient_descent(run):
    finite = run(*LEARN, "n_train=512", "model=trainable")
    full = run(*LEARN, "n_train=128", "batch_size=128", "steps=300", "eval_every=100")
    assert finite.status == full.status == "ok"
    assert finite.test_error < 0.1
    # Both fit their training points far better than fresh ones: the steps reuse them (fresh
    # batches every step would give a train loss near the test MSE).
    for run_ in (finite, full):
        assert float(run_.metrics["train_loss"][0]) < 0.2 * float(run_.metrics["test_mse"][0])


FUSED = {  # torch.optim's arguments, and ours
    "sgd": ({"momentum": 0.0}, {"momentum": 0.0, "nesterov": False}),
    "sgd momentum": ({"momentum": 0.9}, {"momentum": 0.9, "nesterov": False}),
    "sgd nesterov": ({"momentum": 0.9, "nesterov": True}, {"momentum": 0.9, "nesterov": True}),
    "adam": ({"betas": (0.8, 0.95), "eps": 1e-6}, {"beta1": 0.8, "beta2": 0.95, "eps": 1e-6}),
}


@pytest.mark.parametrize("kind", FUSED)
def test_the_fused_update_is_torch_optims_to_the_bit_and_resumes_from_its_state(kind):
    """FusedUpdate calls torch.optim's fused kernels itself: the same parameters, states and
    rates after 6 scheduled steps over two groups, and the same after a restore of either's
    state (a checkpoint written by torch.optim resumes too)."""
    name = kind.split()[0]
    theirs_kwargs, ours_kwargs = FUSED[kind]
    gen = torch.Generator().manual_seed(0)
    init = [torch.randn(shape, generator=gen) for shape in [(2, 5, 3), (2, 5), (2, 1)]]
    grads = [[torch.randn(p.shape, generator=gen) for p in init] for _ in range(12)]
    factor = optim.schedule_factor("cosine", 2, 12)

    def groups(params):
        return [{"params": params[:2], "lr": 0.3}, {"params": params[2:], "lr": 0.05}]

    def make_theirs():
        params = [p.clone() for p in init]
        cls = torch.optim.SGD if name == "sgd" else torch.optim.Adam
        opt = cls(groups(params), lr=0.3, weight_decay=0.01, fused=True, **theirs_kwargs)
        return params, opt, torch.optim.lr_scheduler.LambdaLR(opt, factor)

    def make_ours():
        params = [p.clone() for p in init]
        marked = [g | {"initial_lr": g.pop("lr")} for g in groups(params)]
        opt = optim.FusedUpdate(name, marked, weight_decay=0.01, **ours_kwargs)
        return params, opt, optim.Schedule(opt, factor)

    def steps(params, opt, sched, first, last):
        for g in grads[first:last]:
            for p, grad in zip(params, g, strict=True):
                p.grad = grad.clone()
            opt.step()
            sched.step()

    def state_of(opt):
        return {i: dict(s) for i, s in opt.state_dict()["state"].items()}

    theirs, ours = make_theirs(), make_ours()
    for run_ in (theirs, ours):
        steps(*run_, 0, 6)
    assert all(torch.equal(a, b) for a, b in zip(theirs[0], ours[0], strict=True))
    assert any(not torch.equal(a, b) for a, b in zip(init, ours[0], strict=True))
    theirs_state, ours_state = state_of(theirs[1]), state_of(ours[1])
    assert theirs_state.keys() == ours_state.keys() == ({0, 1, 2} if kind != "sgd" else set())
    for i, values in ours_state.items():
        assert values.keys() == theirs_state[i].keys()
        assert all(torch.equal(v, theirs_state[i][key]) for key, v in values.items())
    assert [g["lr"] for g in ours[1].param_groups] == [g["lr"] for g in theirs[1].param_groups]

    uninterrupted = make_ours()
    steps(*uninterrupted, 0, 12)
    for source in (ours, theirs):  # a checkpoint at step 6 of either, resumed by ours
        params, opt, sched = make_ours()
        with torch.no_grad():
            for p, saved in zip(params, source[0], strict=True):
                p.copy_(saved)
        opt.load_state_dict(_through_a_file(source[1].state_dict()))
        sched.load_state_dict(_through_a_file(source[2].state_dict()))
        steps(params, opt, sched, 6, 12)
        assert all(torch.equal(a, b) for a, b in zip(params, uninterrupted[0], strict=True))


def _through_a_file(state):
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=False)


def test_a_run_never_imports_the_compiler():
    """torch.optim imports torch._dynamo (1.0-1.3 s of start-up) when an optimizer is built;
    a run of either optimizer, checkpoint included, needs none of it."""
    code = (
        "import sys, tempfile; from randfeat_torch.api import run\n"
        "for opt in ('sgd', 'adam'):\n"
        "    run(f'optimizer={opt}', 'steps=4', 'eval_every=2', 'checkpoint_every=2', 'd=4',"
        " 'width=8', 'n_test=64', run_dir=tempfile.mkdtemp())\n"
        "print(sorted(m for m in sys.modules if m.startswith('torch._dynamo')))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_cosine_schedule_ends_at_zero_lr(make_cfg, optimizer):
    cfg = make_cfg(
        f"optimizer={optimizer}", "optimizer.schedule=cosine", "optimizer.warmup_steps=5"
    )
    model = build_model(cfg.model, 0, torch.device("cpu"))
    opt, sched = build_optimizer(cfg.optimizer, model, cfg.steps)
    lrs = []  # each group's rate over its own (the base rate times its multiplier)
    for _ in range(cfg.steps):
        lrs.append([g["lr"] / g["initial_lr"] for g in opt.param_groups])
        opt.step()
        sched.step()
    lrs = [factors[0] for factors in lrs if len(set(factors)) == 1]  # every group alike
    assert len(lrs) == cfg.steps
    assert opt.param_groups[0]["lr"] == pytest.approx(0, abs=1e-12)  # where the schedule ends
    assert lrs[0] == pytest.approx(1 / 5)
    assert lrs[4] == pytest.approx(1)
    assert lrs[-1] < 0.02
    assert all(a >= b for a, b in itertools.pairwise(lrs[4:]))


def test_divergence_stops_the_run_with_status_diverged(run):
    result = run("steps=400", "eval_every=50", "optimizer.lr=100")
    assert result.status == "diverged"
    assert result.steps_done == 50
    record = json.loads((result.run_dir / "metrics.json").read_text())
    assert record["status"] == "diverged" and record["diverged_replicas"] == [0]
    assert record["metrics"]["test_error"] is None  # NaN is written as null: strict JSON


def test_a_constant_target_is_refused(run):
    with pytest.raises(DataError, match="is constant on the 512 test inputs"):
        run("target.bias=-100")


def test_grad_precision_quantises_every_applied_update(run, make_cfg):
    overrides = ["optimizer.momentum=0", "optimizer.grad_precision=0.01", "optimizer.lr=0.1"]
    overrides += ["steps=7", "eval_every=7"]
    cfg = make_cfg(*overrides)
    init = build_model(cfg.model, cfg.seed, torch.device(cfg.device))
    result = run(*overrides)
    for name in ("w", "b", "a", "c"):
        moved = (getattr(result.model, name) - getattr(init, name)).detach().double()
        units = moved / (0.1 * 0.01)
        # Each of the 7 float32 additions of an update rounds by up to eps32 / 2 of the value.
        size = float(getattr(init, name).detach().abs().max() + moved.abs().max())
        assert torch.allclose(units, units.round(), atol=7 * EPS32 / 2 * size / 1e-3), name
        assert units.abs().max() > 0.5, name


def test_grad_clamp_then_round_to_nearest():
    cfg = OmegaConf.create(
        {"grad_clamp": 0.25, "grad_precision": 0.1, "stochastic_rounding": False}
    )
    p = torch.zeros(5, requires_grad=True)
    p.grad = torch.tensor([5.0, -5.0, 0.03, 0.07, -0.14])
    GradientPrecision(cfg, torch.Generator()).apply([p])
    assert torch.allclose(p.grad, torch.tensor([0.2, -0.2, 0.0, 0.1, -0.1]))


def test_stochastic_rounding_is_unbiased():
    cfg = OmegaConf.create({"grad_clamp": None, "grad_precision": 0.1, "stochastic_rounding": True})
    p = torch.zeros(200_000, requires_grad=True)
    p.grad = torch.full_like(p, 0.03)
    GradientPrecision(cfg, torch.Generator().manual_seed(0)).apply([p])
    assert p.grad.unique().tolist() == [0.0, pytest.approx(0.1)]
    assert float(p.grad.mean()) == pytest.approx(0.03, rel=0.02)


@pytest.mark.parametrize("model", ["frozen", "linearized"])
def test_linearized_and_frozen_models_train_by_sgd(run, model):
    result = run(*LEARN, f"model={model}")
    assert result.status == "ok" and result.test_error < 0.3
    if model == "linearized":  # the first layer's tangent directions trained too
        w0, dw = result.model.w0, result.model.dw.detach()
        moved = float(((w0 + dw) - w0).double().norm() / w0.double().norm())  # as it measures
        recorded = json.loads((result.run_dir / "metrics.json").read_text())["metrics"]
        # Two float32 norms of width * d = 2048 squares: within 2048 eps32 relative.
        assert moved > 0 and recorded["w_movement"] == pytest.approx(moved, rel=2048 * EPS32)


def test_parity_runs_on_the_hypercube(run):
    result = run("target=parity", "target.k=2", "steps=40", "eval_every=20")
    assert result.status == "ok"
    record = json.loads((result.run_dir / "metrics.json").read_text())
    assert record["config"]["input"]["name"] == "hypercube"  # the parity's own input
    assert result.model(torch.ones(1, 8)).shape == (1, 1)


@pytest.mark.parametrize("model", ["trainable", "frozen"])
@pytest.mark.parametrize(  # SGD sees the gradient's scale, which Adam divides out
    "optimizer", [["optimizer=sgd"], ["optimizer=adam", "optimizer.lr=0.01"]]
)
def test_analytic_backward_trains_like_autograd(run, model, optimizer):
    """The hand-written gradient and autograd differ only by float rounding, step after step."""
    overrides = [f"model={model}", "replicas=2", *optimizer]
    analytic = run(*overrides, "backward=analytic")
    reference = run(*overrides, "backward=autograd")
    for name in ("a", "c", "w", "b"):
        assert torch.allclose(
            getattr(analytic.model, name), getattr(reference.model, name), rtol=1e-4, atol=1e-5
        ), name
    assert analytic.test_error == pytest.approx(reference.test_error, rel=1e-3)


@pytest.mark.parametrize("backward", ["analytic", "autograd"])
def test_compiled_step_trains_like_the_eager_step(run, monkeypatch, backward):
    compiled_functions, calls = [], []

    def compile_and_count(function, **options):
        compiled_functions.append(function)
        compiled = compile_torch(function, **options)

        def counted(*args):
            calls.append(1)
            return compiled(*args)

        return counted

    compile_torch = torch.compile
    overrides = ["model=trainable", "steps=10", "eval_every=10", f"backward={backward}"]
    eager = run(*overrides)
    assert not compiled_functions
    monkeypatch.setattr(torch, "compile", compile_and_count)
    compiled = run(*overrides, "compile=true")
    assert len(compiled_functions) == 1 and len(calls) == 10  # every step ran compiled
    assert torch.allclose(compiled.model.w, eager.model.w, rtol=1e-4, atol=1e-5)
    assert compiled.test_error == pytest.approx(eager.test_error, rel=1e-3)
