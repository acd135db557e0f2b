"""Faults that must neither lose nor confuse: broken records and checkpoints, two processes in
one run dir, kills before the first checkpoint or mid-write, signals outside the loop, and a
full disk. Each keeps what was written and says what happened."""

from __future__ import annotations

import errno
import json
import os
import signal

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from randfeat_torch import record as record_module
from randfeat_torch import trainer
from randfeat_torch.config import CheckpointError
from randfeat_torch.record import (
    CHECKPOINT_NAME,
    FILE_MODE,
    RECORD_NAME,
    RunLock,
    RunLocked,
    finished_error,
)
from randfeat_torch.trainer import Interrupted, train
from tests.test_resume import train_until_sigterm

RUN = ("steps=20", "eval_every=10")


def test_only_a_record_with_a_test_error_counts_as_finished():
    assert finished_error({"status": "ok", "metrics": {"test_error": 0.25}}) == 0.25
    assert finished_error({"status": "ok", "metrics": {"test_error": [0.1, 0.3]}}) == 0.2
    for broken in (
        {"status": "ok"},
        {"status": "ok", "metrics": None},
        {"status": "ok", "metrics": {}},
        {"status": "ok", "metrics": {"test_error": None}},
        {"status": "ok", "metrics": {"test_error": []}},
        {"status": "ok", "metrics": {"test_error": [0.1, None]}},
        {"status": "interrupted", "metrics": {"test_error": 0.2}},
        None,
    ):
        assert finished_error(broken) is None, broken


def test_a_checkpoint_of_the_wrong_structure_is_refused_and_nothing_is_touched(make_cfg, tmp_path):
    cfg = make_cfg(*RUN)
    train_until_sigterm(cfg, tmp_path, 5)
    path = tmp_path / CHECKPOINT_NAME
    state = torch.load(path, weights_only=False)
    del state["progress"]
    torch.save(state, path)
    damaged, record = path.read_bytes(), (tmp_path / RECORD_NAME).read_text()
    with pytest.raises(CheckpointError, match="does not hold this run's state"):
        train(cfg, tmp_path)
    assert path.read_bytes() == damaged
    assert (tmp_path / RECORD_NAME).read_text() == record
    assert json.loads(record)["status"] == "interrupted"


def test_a_second_process_in_a_run_dir_is_refused_and_writes_nothing(make_cfg, tmp_path):
    cfg = make_cfg(*RUN)
    train(cfg, tmp_path)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()}
    holder = rf"another process \(pid {os.getpid()} on "
    with RunLock(tmp_path), pytest.raises(RunLocked, match=holder):  # as another process would
        train(make_cfg(*RUN, "resume=false"), tmp_path)
    after = {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()}
    assert after.keys() == before.keys()
    assert all(after[k] == v for k, v in before.items() if k != ".lock")


def steps_logged(run_dir) -> list[int]:
    events = EventAccumulator(str(run_dir))
    events.Reload()
    return [e.step for e in events.Scalars("test/error")]


def test_a_run_killed_before_its_first_checkpoint_leaves_no_duplicated_steps(make_cfg, tmp_path):
    cfg = make_cfg(*RUN)
    killed = record_module.RunRecord(tmp_path, {}, {"d": 8})  # logged step 0, then was killed
    killed.log_eval(0, {"test_error": torch.tensor([0.9])})
    killed.writer.flush()
    assert steps_logged(tmp_path) == [0]
    train(cfg, tmp_path)
    assert steps_logged(tmp_path) == [0, 10, 20]


def test_what_a_kill_mid_write_left_is_removed_and_records_are_readable(make_cfg, tmp_path):
    for name in (".metrics.json.abc123.tmp", ".checkpoint.pt.xyz.tmp"):
        (tmp_path / name).write_text("half a file")
    train(make_cfg(*RUN), tmp_path)
    assert not list(tmp_path.glob(".*.tmp"))
    umask = os.umask(0)
    os.umask(umask)
    assert 0o666 & ~umask == FILE_MODE
    assert (tmp_path / RECORD_NAME).stat().st_mode & 0o777 == FILE_MODE


@pytest.mark.parametrize("where", ["set-up", "ridge fit"])
def test_sigterm_outside_the_loop_stops_the_run_and_says_so(make_cfg, tmp_path, monkeypatch, where):
    cfg = make_cfg("model=frozen", "optimizer=ridge", "n_train=200")
    name = "build_model" if where == "set-up" else "fit_by_ridge"
    original = getattr(trainer, name)

    def signalled(*args, **kwargs):
        signal.raise_signal(signal.SIGTERM)
        return original(*args, **kwargs)

    monkeypatch.setattr(trainer, name, signalled)
    with pytest.raises(Interrupted) as stop:
        train(cfg, tmp_path)
    assert stop.value.signum == signal.SIGTERM
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handlers are put back
    if where == "set-up":  # before the record: nothing written
        assert not (tmp_path / RECORD_NAME).exists()
    else:
        record = json.loads((tmp_path / RECORD_NAME).read_text())
        assert record["status"] == "interrupted" and record["interrupted_by"] == "SIGTERM"


def test_a_full_disk_on_resume_keeps_the_interrupted_record(make_cfg, tmp_path, monkeypatch):
    cfg = make_cfg(*RUN)
    train_until_sigterm(cfg, tmp_path, 5)
    before = (tmp_path / RECORD_NAME).read_text()

    def full(path, data, durable=True):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(record_module, "atomic_write_json", full)
    with pytest.raises(OSError, match="No space left"):
        train(cfg, tmp_path)
    assert (tmp_path / RECORD_NAME).read_text() == before
    assert json.loads(before)["status"] == "interrupted"
    assert (tmp_path / CHECKPOINT_NAME).exists()  # still resumable once there is room
