"""Checkpoints: an interrupted run resumed from its checkpoint ends bit-identical to an
uninterrupted one; corrupt and mismatched checkpoints are refused and left as they are."""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
import signal
import subprocess
import sys
import time
from types import SimpleNamespace

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.summary.writer import event_file_writer

from randfeat_torch.config import SCHEMAS, CheckpointError, TrainConfig
from randfeat_torch.data import Batches
from randfeat_torch.record import (
    ADDED_KEYS,
    CHECKPOINT_NAME,
    NOT_IN_FINGERPRINT,
    config_difference,
    with_added_keys,
)
from randfeat_torch.trainer import train
from tests.conftest import ROOT, SMALL

CASES = {
    "online sgd": ["steps=30", "eval_every=10"],
    "finite adam cosine": [
        "steps=30",
        "eval_every=10",
        "n_train=80",
        "optimizer=adam",
        "optimizer.schedule=cosine",
        "optimizer.warmup_steps=3",
    ],
    "replicas, rates, rounding": [
        "steps=30",
        "eval_every=10",
        "replicas=2",
        "replica_data=independent",
        "optimizer.lr=[0.05,0.2]",
        "optimizer.momentum=0",
        "optimizer.grad_precision=0.001",
        "optimizer.stochastic_rounding=true",
        "checkpoint_every=4",
    ],
    "a lazy scale and the logistic loss on a parity": [
        "steps=30",
        "eval_every=10",
        "model.lazy_scale=4",
        "loss=logistic",
        "input=hypercube",
        "target=parity",
        "target.k=2",
        "steps_to_error=[2,0.5]",  # 2: reached at the first evaluation
    ],
    "a rate too high, whose best error is not its last": [
        "steps=30",
        "eval_every=10",
        "optimizer.lr=1.0",
    ],
    "finite, a pass order per replica": [
        "steps=30",
        "eval_every=10",
        "n_train=40",
        "replicas=2",
        "replica_data=independent",
    ],
}


def train_again(cfg, run_dir, **options):
    """``train`` in a run dir that has event files, its own named for a later wall-clock second,
    as a real resume (a new process, seconds later) names them: TensorBoard reads a run's event
    files in name order, a name starts with the second its writer was made (``time.time()`` in
    tensorboard's event_file_writer), and in one process the counters after it sort as text
    (".12" before ".9"). That clock reads at least one second past the newest file's."""
    newest = max(int(p.name.split(".")[3]) for p in run_dir.glob("events.out.tfevents.*"))

    def clock() -> float:
        return max(time.time(), newest + 1.0)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(event_file_writer, "time", SimpleNamespace(time=clock))
        return train(cfg, run_dir, **options)


def train_until_sigterm(cfg, run_dir, step: int, **options):
    """``train`` with a real SIGTERM raised in this process while the loop draws the batch of
    ``step`` (the loop acts on it at the end of that step, as on a signal from outside)."""
    calls = itertools.count(1)
    draw = Batches.next

    def next_batch(self):
        if next(calls) == step:
            signal.raise_signal(signal.SIGTERM)
        return draw(self)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(Batches, "next", next_batch)
        return train(cfg, run_dir, **options)


def steps_logged(run_dir) -> list[int]:
    events = EventAccumulator(str(run_dir))
    events.Reload()
    return [e.step for e in events.Scalars("test/error")]


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("stop_at", [7, 10, 13])  # mid-way, during an evaluation, after one
def test_a_resumed_run_equals_an_uninterrupted_one(make_cfg, tmp_path, case, stop_at):
    cfg = make_cfg(*CASES[case])
    whole = train(cfg, tmp_path / "whole")

    run_dir = tmp_path / "cut"
    cut = train_until_sigterm(cfg, run_dir, stop_at)
    assert cut.status == "interrupted" and cut.steps_done == stop_at
    record = json.loads((run_dir / "metrics.json").read_text())
    assert record["status"] == "interrupted" and record["interrupted_by"] == "SIGTERM"
    assert (run_dir / CHECKPOINT_NAME).exists()

    resumed = train_again(cfg, run_dir)
    assert resumed.status == "ok" and resumed.steps_done == 30
    assert resumed.metrics.keys() == whole.metrics.keys()  # the laziness measures too
    for name, value in whole.metrics.items():
        assert torch.equal(resumed.metrics[name], value), name
    for mine, theirs in zip(resumed.model.parameters(), whole.model.parameters(), strict=True):
        assert torch.equal(mine, theirs)
    final = json.loads((run_dir / "metrics.json").read_text())
    assert final["resumed_from_step"] == stop_at
    if "optimizer.lr=1.0" in CASES[case]:  # so the best error must come from the checkpoint
        assert final["best_test_error"][0] < final["metrics"]["test_error"]
    uninterrupted = json.loads((tmp_path / "whole" / "metrics.json").read_text())
    for key in ("best_test_error", "steps_to_error"):
        assert final[key] == uninterrupted[key], key
    if "target=parity" in CASES[case]:  # reached before every cut: it must come from the state
        assert uninterrupted["steps_to_error"]["2"] == 10
    assert not (run_dir / CHECKPOINT_NAME).exists()  # a finished run leaves none behind
    if "replicas=2" not in CASES[case]:
        assert steps_logged(run_dir) == steps_logged(tmp_path / "whole") == [0, 10, 20, 30]


def test_events_logged_after_the_checkpoint_are_purged_on_resume(make_cfg, tmp_path):
    """A run killed hard after logging past its last checkpoint: the resumed run logs those
    steps again, and TensorBoard keeps each step once."""
    cfg = make_cfg("steps=30", "eval_every=5", "checkpoint_every=10")
    run_dir = tmp_path / "run"
    train_until_sigterm(cfg, run_dir, 20)
    saved = (run_dir / CHECKPOINT_NAME).read_bytes()
    train_again(cfg, run_dir)  # on to step 30, logging 25 and 30, as the killed run did
    (run_dir / CHECKPOINT_NAME).write_bytes(saved)  # ... before it could finish
    resumed = train_again(cfg, run_dir)
    assert resumed.status == "ok"
    assert steps_logged(run_dir) == [0, 5, 10, 15, 20, 25, 30]


def test_a_corrupt_checkpoint_is_refused_and_left_alone(make_cfg, tmp_path):
    cfg = make_cfg("steps=20", "eval_every=10")
    train_until_sigterm(cfg, tmp_path, 5)
    path = tmp_path / CHECKPOINT_NAME
    path.write_bytes(path.read_bytes()[:100])  # truncated
    damaged = path.read_bytes()
    record = (tmp_path / "metrics.json").read_text()
    with pytest.raises(CheckpointError, match="is corrupt or truncated"):
        train(cfg, tmp_path)
    assert path.read_bytes() == damaged
    assert (tmp_path / "metrics.json").read_text() == record  # still says interrupted


def test_a_checkpoint_of_another_config_is_refused(make_cfg, tmp_path):
    train_until_sigterm(make_cfg("steps=20", "eval_every=10"), tmp_path, 5)
    before = (tmp_path / CHECKPOINT_NAME).read_bytes()
    with pytest.raises(CheckpointError, match=r"was written for model.width=64 \(this run: 32\)"):
        train(make_cfg("steps=20", "eval_every=10", "width=32"), tmp_path)
    assert (tmp_path / CHECKPOINT_NAME).read_bytes() == before
    fresh = train(make_cfg("steps=20", "eval_every=10", "width=32", "resume=false"), tmp_path)
    assert fresh.status == "ok"


# The config's keys when records and checkpoints were first compared with a run's config
# (record.config_difference): the top-level keys, and group.field for the fields of each
# group's options. A key added since is read in older records as record.ADDED_KEYS says.
COMPARED_KEYS = {
    *("d", "width", "seed", "data_seed", "replicas", "replica_data", "steps", "batch_size"),
    *("n_train", "n_test", "eval_every", "checkpoint_every", "checkpoint_every_s", "resume"),
    *("loss", "steps_to_error", "lazy_probe", "device", "threads", "backward", "compile"),
    *("progress", "aggregate", "input.name", "target.a", "target.bias", "target.d"),
    *("target.degree", "target.include_lower", "target.k", "target.name", "target.norm"),
    *("target.seed", "target.terms", "model.activation", "model.bias", "model.d"),
    *("model.init", "model.kernel", "model.lazy_scale", "model.name", "model.output_init"),
    *("model.parameterization", "model.replicas", "model.width", "optimizer.betas"),
    *("optimizer.chunk_size", "optimizer.eps", "optimizer.gcv_penalties"),
    *("optimizer.grad_clamp", "optimizer.grad_precision", "optimizer.gram_products"),
    *("optimizer.lr", "optimizer.lr_scaling", "optimizer.momentum", "optimizer.name"),
    *("optimizer.nesterov", "optimizer.penalty", "optimizer.penalty_scale"),
    *("optimizer.population", "optimizer.schedule", "optimizer.stochastic_rounding"),
    *("optimizer.warmup_steps", "optimizer.weight_decay", "optimizer.width_path"),
}


def test_every_key_the_config_gained_since_records_were_compared_has_its_old_value():
    groups = {"input", "target", "model", "optimizer", "vars"}
    top = {f.name for f in dataclasses.fields(TrainConfig)} - groups
    now = top | {f"{g}.{f.name}" for g, _, node in SCHEMAS for f in dataclasses.fields(node)}
    gained = now - COMPARED_KEYS - set(NOT_IN_FINGERPRINT)
    assert gained <= set(ADDED_KEYS), (
        f"keys added to the config: {sorted(gained - set(ADDED_KEYS))}; name the value every "
        "run had before each in record.ADDED_KEYS, or older records are refused"
    )
    assert set(ADDED_KEYS) <= now
    assert not COMPARED_KEYS - now, (
        f"keys removed from the config: {sorted(COMPARED_KEYS - now)}; the records that hold "
        "them are refused as another config's"
    )


def test_a_saved_config_reads_a_field_added_since_where_its_option_has_that_field(monkeypatch):
    monkeypatch.setattr(
        "randfeat_torch.record.ADDED_KEYS",
        {"replica_init": "independent", "optimizer.gram_products": "float64", "model.kernel": "rf"},
    )
    ridge = {"name": "ridge", "penalty": 1e-8, "gram_products": "float64"}
    sgd = {"name": "sgd", "lr": 0.2, "momentum": 0.9}
    kernel = {"name": "kernel", "width": 64, "kernel": "rf"}
    frozen = {"name": "frozen", "width": 64}
    now = {"seed": 0, "replica_init": "independent", "optimizer": ridge, "model": kernel}
    old = {"seed": 0, "optimizer": {**ridge}, "model": {**kernel}}
    del old["optimizer"]["gram_products"], old["model"]["kernel"]
    assert with_added_keys(old) == now
    assert config_difference(old, now) is None
    faster = {**now, "optimizer": {**ridge, "gram_products": "float32"}}
    assert config_difference(old, faster) == "optimizer.gram_products=float64 (this run: float32)"
    # sgd has no gram_products, a frozen model no kernel: nothing is added to them
    plain = {"seed": 0, "optimizer": sgd, "model": frozen}
    assert with_added_keys(plain) == {**plain, "replica_init": "independent"}
    assert config_difference(plain, {**plain, "replica_init": "independent"}) is None
    assert config_difference(plain, {**plain, "replica_init": "shared"}) == (
        "replica_init=independent (this run: shared)"
    )
    # a saved value is never replaced by the old one
    saved = {**plain, "replica_init": "shared"}
    assert with_added_keys(saved) == saved
    assert config_difference(saved, {**plain, "replica_init": "independent"}) == (
        "replica_init=shared (this run: independent)"
    )


@pytest.mark.slow
def test_sigterm_checkpoints_and_the_same_command_resumes(tmp_path):
    run_dir = tmp_path / "run"
    command = [
        sys.executable,
        str(ROOT / "train.py"),
        *SMALL,
        "steps=3000",
        "eval_every=100",
        f"hydra.run.dir={run_dir}",
    ]
    whole = subprocess.run(
        [*command[:-1], f"hydra.run.dir={tmp_path / 'whole'}"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert whole.returncode == 0, whole.stderr
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    record = run_dir / "metrics.json"
    deadline = time.time() + 120
    while time.time() < deadline:
        if record.exists() and json.loads(record.read_text()).get("steps_done", 0) >= 100:
            break
        time.sleep(0.05)
    os.kill(process.pid, signal.SIGTERM)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 128 + signal.SIGTERM, err
    assert "interrupted at step" in err
    assert json.loads(record.read_text())["status"] == "interrupted"

    again = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr
    final = json.loads(record.read_text())
    reference = json.loads((tmp_path / "whole" / "metrics.json").read_text())
    assert final["status"] == "ok" and final["resumed_from_step"] > 0
    assert final["metrics"] == reference["metrics"]
