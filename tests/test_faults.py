"""Faults that must neither lose nor confuse: broken records and checkpoints, two processes in
one run dir, kills before the first checkpoint or mid-write, signals outside the loop, and a
full disk. Each keeps what was written and says what happened."""

from __future__ import annotations

import errno
import json
import os
import platform
import signal
import subprocess
import sys
import threading

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from randfeat_torch import data, trainer
from randfeat_torch import record as record_module
from randfeat_torch.config import CheckpointError
from randfeat_torch.record import (
    CHECKPOINT_NAME,
    FILE_MODE,
    RECORD_NAME,
    RunLock,
    RunLocked,
    finished_error,
    read_record,
)
from randfeat_torch.trainer import Interrupted, train
from tests.conftest import ROOT, SMALL
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
        {"status": "ok", "metrics": [0.1]},  # crashed the skip: a list has no .get
        {"status": "ok", "metrics": {"test_error": True}},  # a bool is no error
        {"status": "ok", "metrics": {"test_error": float("nan")}},  # JSON's NaN, read back
        {"status": "ok", "metrics": {"test_error": "0.1"}},
        [{"status": "ok"}],  # a record that is not a JSON object
        "ok",
        None,
    ):
        assert finished_error(broken) is None, broken


@pytest.mark.parametrize("content", ['[{"status": "ok"}]', '"ok"', "3", "null"])
def test_a_record_that_is_not_a_json_object_is_no_record(tmp_path, content):
    """The skip reads it with .get: a list crashed the next run instead of training it."""
    (tmp_path / RECORD_NAME).write_text(content)
    assert read_record(tmp_path) is None


def _instead(saved):
    return lambda state: saved


def _without(key, part=None):
    def change(state):
        del (state if part is None else state[part])[key]
        return state

    return change


def _with(part=None, **fields):
    def change(state):
        (state if part is None else state[part]).update(fields)
        return state

    return change


def _with_momentum(buffer, index=0):
    def change(state):
        state["optimizer"]["state"][index] = {"momentum_buffer": buffer}
        return state

    return change


def _without_momentum(index):
    def change(state):
        del state["optimizer"]["state"][index]
        return state

    return change


def _with_rate(lr):
    def change(state):
        state["optimizer"]["param_groups"][0]["lr"] = lr
        return state

    return change


NOT_A_CHECKPOINT = "is not a checkpoint of a run"
NOT_THIS_STATE = "does not hold this run's state"
DAMAGED = {  # what becomes of a real checkpoint, and the refusal it gets
    "a dict of the wrong keys": (_instead({"foo": 1, "bar": torch.zeros(3)}), NOT_A_CHECKPOINT),
    "a tensor": (_instead(torch.zeros(4)), NOT_A_CHECKPOINT),
    "'config' not a dict": (_with(config="x"), NOT_A_CHECKPOINT),
    "no 'progress'": (_without("progress"), NOT_THIS_STATE),
    "'progress' a number": (_with(progress=5), NOT_THIS_STATE),
    "a field of progress missing": (_without("best", "progress"), NOT_THIS_STATE),
    "an unknown field of progress": (_with("progress", speed=1.0), NOT_THIS_STATE),
    "the step a string": (_with("progress", step="5"), NOT_THIS_STATE),
    "the step negative": (_with("progress", step=-3), NOT_THIS_STATE),
    "the step past the run's steps": (_with("progress", step=10**6), NOT_THIS_STATE),
    "the step the last": (_with("progress", step=20), NOT_THIS_STATE),
    "the best error of another shape": (_with("progress", best=torch.zeros(3)), NOT_THIS_STATE),
    "the optimizer's state a string": (_with(optimizer="x"), NOT_THIS_STATE),
    "a momentum buffer of another shape": (_with_momentum(torch.zeros(3)), NOT_THIS_STATE),
    "a momentum buffer that is no tensor": (_with_momentum([0.0]), NOT_THIS_STATE),
    "the optimizer's state for a parameter it does not have": (
        _with_momentum(torch.zeros(1), index=-1),
        NOT_THIS_STATE,
    ),
    "the optimizer's state for some parameters only": (_without_momentum(1), NOT_THIS_STATE),
    "the schedule's step a string": (_with("scheduler", last_epoch="5"), NOT_THIS_STATE),
    "the schedule's step negative": (_with("scheduler", last_epoch=-3), NOT_THIS_STATE),
    "a learning rate that is no number": (_with_rate("0.5"), NOT_THIS_STATE),
    "a learning rate that is NaN": (_with_rate(float("nan")), NOT_THIS_STATE),
}


@pytest.mark.parametrize("damage", DAMAGED)
def test_a_checkpoint_of_the_wrong_structure_is_refused_and_nothing_is_touched(
    make_cfg, tmp_path, damage
):
    """Before: a damaged progress raised AttributeError (a traceback), or trained on from a
    step that was no step (a string failed the run; a step past the end finished it with no
    metrics and deleted the checkpoint)."""
    cfg = make_cfg(*RUN)
    train_until_sigterm(cfg, tmp_path, 5)
    path = tmp_path / CHECKPOINT_NAME
    change, refusal = DAMAGED[damage]
    torch.save(change(torch.load(path, weights_only=False)), path)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.name != ".lock"}
    with pytest.raises(CheckpointError, match=refusal) as refused:
        train(cfg, tmp_path)
    assert "\n" not in str(refused.value)
    after = {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.name != ".lock"}
    assert after == before
    assert json.loads(after[RECORD_NAME])["status"] == "interrupted"


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


WHERE = {  # a function the run calls, and the module or class the run finds it in
    "set-up": ("build_model", trainer),
    "set-up, over the record of a run killed before": ("build_model", trainer),
    "the initial evaluation": ("evaluate", data.TestSet),
    "a ridge fit": ("fit_by_ridge", trainer),
}


@pytest.mark.parametrize("where", WHERE)
def test_sigterm_outside_the_loop_stops_the_run_and_says_so(make_cfg, tmp_path, monkeypatch, where):
    """Before: a signal in the initial evaluation, after the record's first write, left it
    saying ``running``, and so did one in set-up over the record of a run killed before."""
    cfg = make_cfg("model=frozen", "optimizer=ridge", "n_train=200")
    if "killed" in where:
        killed = {"status": "running", "config": {"d": 8}, "steps_done": 0}
        (tmp_path / RECORD_NAME).write_text(json.dumps(killed))
    name, owner = WHERE[where]
    original = getattr(owner, name)

    def signalled(*args, **kwargs):
        signal.raise_signal(signal.SIGTERM)
        return original(*args, **kwargs)

    monkeypatch.setattr(owner, name, signalled)
    with pytest.raises(Interrupted) as stop:
        train(cfg, tmp_path)
    assert stop.value.signum == signal.SIGTERM
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handlers are put back
    record = json.loads((tmp_path / RECORD_NAME).read_text())
    assert record["status"] == "interrupted" and record["interrupted_by"] == "SIGTERM"
    assert record["config"]  # this run's where it had no record, else the killed run's
    if where == "set-up":  # a record of its own names the networks it would have trained
        assert record["replica_seeds"] == [cfg.seed] and record["choices"] == {}


def test_an_error_in_the_initial_evaluation_leaves_a_failed_record(make_cfg, tmp_path, monkeypatch):
    """Before, the record written as ``running`` just before it stayed so."""
    cfg = make_cfg(*RUN)

    def broken(*args, **kwargs):
        raise ValueError("the test set broke")

    monkeypatch.setattr(data.TestSet, "evaluate", broken)
    with pytest.raises(ValueError, match="the test set broke"):
        train(cfg, tmp_path)
    record = json.loads((tmp_path / RECORD_NAME).read_text())
    assert record["status"] == "failed" and "the test set broke" in record["error"]


def test_sigterm_in_set_up_leaves_a_finished_or_failed_record_as_it_is(
    make_cfg, tmp_path, monkeypatch
):
    cfg = make_cfg(*RUN)
    (tmp_path / RECORD_NAME).write_text(json.dumps({"status": "failed", "error": "ValueError"}))
    before = (tmp_path / RECORD_NAME).read_text()
    monkeypatch.setattr(trainer, "build_model", lambda *a, **k: signal.raise_signal(signal.SIGTERM))
    with pytest.raises(Interrupted):
        train(cfg, tmp_path)
    assert (tmp_path / RECORD_NAME).read_text() == before


def test_a_signal_during_the_last_evaluation_lets_the_run_finish(make_cfg, tmp_path, monkeypatch):
    """Before: the loop checkpointed the last step and stopped; the rerun resumed with no step
    left, wrote ``ok`` with no metrics and crashed on its summary, and the run after trained
    it all again."""
    cfg = make_cfg(*RUN)
    evaluate = trainer.Loop._evaluate

    def evaluate_then_signal(self, steps_per_s):
        metrics = evaluate(self, steps_per_s)
        if self.progress.step == cfg.steps:
            signal.raise_signal(signal.SIGTERM)
        return metrics

    monkeypatch.setattr(trainer.Loop, "_evaluate", evaluate_then_signal)
    result = train(cfg, tmp_path)
    assert result.status == "ok" and result.steps_done == cfg.steps
    assert finished_error(json.loads((tmp_path / RECORD_NAME).read_text())) is not None
    assert not (tmp_path / CHECKPOINT_NAME).exists()


def no_space(path=None) -> OSError:
    return OSError(errno.ENOSPC, "No space left on device", str(path))


def test_a_full_disk_on_resume_keeps_the_interrupted_record(make_cfg, tmp_path, monkeypatch):
    """And TensorBoard does not meet the full disk first: before, its writer thread did,
    which printed a traceback and left an empty event file."""
    cfg = make_cfg(*RUN)
    train_until_sigterm(cfg, tmp_path, 5)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.name != ".lock"}

    def full(path, data, durable=True):
        raise no_space(path)

    monkeypatch.setattr(record_module, "atomic_write_json", full)
    with pytest.raises(OSError, match="No space left"):
        train(cfg, tmp_path)
    after = {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.name != ".lock"}
    assert after == before  # no new event file either
    assert json.loads(after[RECORD_NAME])["status"] == "interrupted"
    assert CHECKPOINT_NAME in after  # still resumable once there is room


def torch_save_on_a_full_disk(obj, f, *args, **kwargs):
    """What torch.save does where the disk is full: the OSError, wrapped in a RuntimeError."""
    try:
        f.write(b"PK")
        raise no_space()
    except OSError:
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos") from None


@pytest.mark.parametrize("resumed", [True, False])
def test_room_for_the_record_but_not_the_checkpoint(make_cfg, tmp_path, monkeypatch, resumed):
    """Before: torch.save's RuntimeError marked the run ``failed`` (over ``interrupted``), and
    had it been an OSError, the record would have said ``running`` for good. Now the OSError
    is raised, a resumed run's record is the interrupted one again (in step with its
    checkpoint), and a fresh run's says ``failed`` with the error."""
    cfg = make_cfg(*RUN, "checkpoint_every=12")
    if resumed:
        train_until_sigterm(cfg, tmp_path, 5)
    before = {p.name: p.read_bytes() for p in tmp_path.glob("*.*")}
    monkeypatch.setattr(record_module.torch, "save", torch_save_on_a_full_disk)
    with pytest.raises(OSError, match="No space left"):
        train(cfg, tmp_path)
    if resumed:
        assert (tmp_path / RECORD_NAME).read_bytes() == before[RECORD_NAME]
        assert (tmp_path / CHECKPOINT_NAME).read_bytes() == before[CHECKPOINT_NAME]
    else:
        record = json.loads((tmp_path / RECORD_NAME).read_text())
        assert record["status"] == "failed" and "No space left" in record["error"]
    assert not list(tmp_path.glob(".*.tmp"))


def test_a_final_record_that_cannot_be_written_keeps_the_checkpoint(
    make_cfg, tmp_path, monkeypatch
):
    """Before, the checkpoint was deleted first, and a full disk at the final write lost it."""
    cfg = make_cfg(*RUN)
    train_until_sigterm(cfg, tmp_path, 5)
    checkpoint = (tmp_path / CHECKPOINT_NAME).read_bytes()
    write = record_module.atomic_write_json

    def full_at_the_end(path, data, durable=True):
        if data["status"] == "ok":
            raise no_space(path)
        write(path, data, durable)

    monkeypatch.setattr(record_module, "atomic_write_json", full_at_the_end)
    with pytest.raises(OSError, match="No space left"):
        train(cfg, tmp_path)
    assert (tmp_path / CHECKPOINT_NAME).read_bytes() == checkpoint
    assert json.loads((tmp_path / RECORD_NAME).read_text())["status"] == "interrupted"


def test_a_full_disk_under_tensorboard_is_one_oserror_and_no_traceback(tmp_path, monkeypatch):
    """TensorBoard's writer thread keeps the failed write for the next flush, which raises it;
    the thread's own traceback was printed too (by threading.excepthook)."""
    printed = []
    monkeypatch.setattr(threading, "excepthook", printed.append)
    run = record_module.RunRecord(tmp_path, {}, {"d": 8})
    events = run.writer.file_writer.event_writer._async_writer

    def full(data):
        raise no_space()

    monkeypatch.setattr(events._writer, "write", full)
    with pytest.raises(OSError, match="No space left"):
        run.log_eval(0, {"test_error": torch.tensor([0.5])})
    events._worker.join(timeout=10)
    assert not printed


def test_a_second_command_in_a_held_run_dir_leaves_hydras_files_alone(tmp_path):
    """The command line refuses a folder another process holds before Hydra saves the run's
    ``.hydra/`` there (which it would rewrite, mtimes and all, before our code runs)."""
    command = [sys.executable, str(ROOT / "train.py"), *SMALL, f"hydra.run.dir={tmp_path}"]
    first = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert first.returncode == 0, first.stderr[-2000:]
    saved = {p: p.stat().st_mtime_ns for p in (tmp_path / ".hydra").iterdir()}
    with RunLock(tmp_path):  # a lock of its own open file: as another process holds it
        second = subprocess.run([*command, "resume=false"], capture_output=True, text=True)
    assert second.returncode == 2
    assert second.stderr.strip() == (
        f"cannot run in {tmp_path}: another process (pid {os.getpid()} on {platform.node()}) "
        "is running there; wait for it to end, or use another folder"
    )
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / ".hydra").iterdir()} == saved
