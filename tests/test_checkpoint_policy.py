"""The checkpoint policy: periodic checkpoints by the clock (``checkpoint_every_s``, default a
minute) or by steps (``checkpoint_every``), none in a run shorter than that, one on SIGTERM
whatever the policy; a run resumed from either kind ends bit-identical to an uninterrupted one.
The clock is the one that ``train(..., clock=...)`` is given: one second per step here."""

from __future__ import annotations

import json
import signal

import pytest
import torch

from randfeat_torch.cli import load_config
from randfeat_torch.config import ConfigError
from randfeat_torch.data import Batches
from randfeat_torch.record import CHECKPOINT_NAME, RunRecord
from randfeat_torch.trainer import Loop, train
from tests.test_resume import train_again, train_until_sigterm

RUN = ("steps=30", "eval_every=10")


class StepClock:
    """A clock that reads one second more at each step the loop draws a batch for (and a
    second before the first), whatever the machine's speed."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.now = 1e6  # as time.monotonic() reads on a machine up for days, not 0
        draw = Batches.next

        def next_batch(batches: Batches):
            self.now += 1.0
            return draw(batches)

        monkeypatch.setattr(Batches, "next", next_batch)

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def saved_at(monkeypatch) -> list[int]:
    """The steps at which the loop writes checkpoint.pt, as it writes them."""
    steps: list[int] = []
    write = RunRecord.checkpoint

    def checkpoint(self, state):
        steps.append(state["progress"]["step"])
        write(self, state)

    monkeypatch.setattr(RunRecord, "checkpoint", checkpoint)
    return steps


def assert_equal_runs(mine, theirs) -> None:
    assert mine.status == theirs.status == "ok" and mine.steps_done == theirs.steps_done
    assert mine.metrics.keys() == theirs.metrics.keys()
    for name, value in theirs.metrics.items():
        assert torch.equal(mine.metrics[name], value), name
    for a, b in zip(mine.model.parameters(), theirs.model.parameters(), strict=True):
        assert torch.equal(a, b)


def test_by_default_a_run_shorter_than_a_minute_writes_no_checkpoint(
    make_cfg, tmp_path, monkeypatch, saved_at
):
    cfg = make_cfg(*RUN)
    assert cfg.checkpoint_every is None and cfg.checkpoint_every_s == 60
    result = train(cfg, tmp_path, clock=StepClock(monkeypatch))  # 30 "seconds"
    assert result.status == "ok" and saved_at == []
    assert not (tmp_path / CHECKPOINT_NAME).exists()


def test_sigterm_checkpoints_a_short_run_which_resumes_bit_identical(
    make_cfg, tmp_path, monkeypatch, saved_at
):
    cfg = make_cfg(*RUN)
    whole = train(cfg, tmp_path / "whole", clock=StepClock(monkeypatch))
    cut = train_until_sigterm(cfg, tmp_path / "cut", 13, clock=StepClock(monkeypatch))
    assert cut.status == "interrupted" and saved_at == [13]  # the signal's, and no other
    assert json.loads((tmp_path / "cut" / "metrics.json").read_text())["status"] == "interrupted"
    resumed = train_again(cfg, tmp_path / "cut", clock=StepClock(monkeypatch))
    assert resumed.steps_done == 30 and saved_at == [13]
    assert_equal_runs(resumed, whole)
    assert not (tmp_path / "cut" / CHECKPOINT_NAME).exists()


def test_sigterm_during_an_evaluation_checkpoints_that_step(
    make_cfg, tmp_path, monkeypatch, saved_at
):
    """A signal that arrives while the loop evaluates step 20 (as on a cluster, at any time):
    the loop stops after that evaluation with a checkpoint of step 20, and the rerun resumes
    from it bit-identical, instead of starting again from step 0."""
    cfg = make_cfg(*RUN)
    whole = train(cfg, tmp_path / "whole", clock=StepClock(monkeypatch))
    evaluate, calls = Loop._evaluate, []

    def evaluate_then_signal(self, steps_per_s):
        calls.append(steps_per_s)
        metrics = evaluate(self, steps_per_s)
        if len(calls) == 2:  # the loop evaluates steps 10, then 20 (step 0 before the loop)
            signal.raise_signal(signal.SIGTERM)
        return metrics

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(Loop, "_evaluate", evaluate_then_signal)
        cut = train(cfg, tmp_path / "cut", clock=StepClock(monkeypatch))
    assert cut.status == "interrupted" and cut.steps_done == 20 and saved_at == [20]
    resumed = train_again(cfg, tmp_path / "cut", clock=StepClock(monkeypatch))
    record = json.loads((tmp_path / "cut" / "metrics.json").read_text())
    assert record["resumed_from_step"] == 20
    assert_equal_runs(resumed, whole)


def test_the_clock_policy_checkpoints_every_so_many_seconds_and_never_at_the_end(
    make_cfg, tmp_path, monkeypatch, saved_at
):
    clock = StepClock(monkeypatch)
    train(make_cfg(*RUN, "checkpoint_every_s=8"), tmp_path / "a", clock=clock)
    assert saved_at == [8, 16, 24]  # 8 s after the start, then 8 s after each checkpoint
    saved_at.clear()
    train(make_cfg(*RUN, "checkpoint_every_s=null"), tmp_path / "b", clock=clock)
    assert saved_at == []  # only a signal writes one
    steps = make_cfg(*RUN, "checkpoint_every=10", "checkpoint_every_s=1")
    train(steps, tmp_path / "c", clock=clock)
    assert saved_at == [10, 20]  # steps, where set, and not after the last step


def test_a_run_killed_after_a_checkpoint_by_the_clock_resumes_bit_identical(
    make_cfg, tmp_path, monkeypatch, saved_at
):
    """A kill that no handler sees (SIGKILL) after the checkpoint at step 16: the rerun starts
    from that checkpoint and ends as the run that was never killed."""
    cfg = make_cfg(*RUN, "checkpoint_every_s=8")
    run_dir = tmp_path / "run"
    kept = {}
    write = RunRecord.checkpoint

    def checkpoint(self, state):
        write(self, state)
        kept[state["progress"]["step"]] = (run_dir / CHECKPOINT_NAME).read_bytes()

    monkeypatch.setattr(RunRecord, "checkpoint", checkpoint)
    whole = train(cfg, run_dir, clock=StepClock(monkeypatch))
    assert sorted(kept) == [8, 16, 24] and not (run_dir / CHECKPOINT_NAME).exists()
    (run_dir / CHECKPOINT_NAME).write_bytes(kept[16])  # as the kill after step 16 left it
    resumed = train_again(cfg, run_dir, clock=StepClock(monkeypatch))
    assert json.loads((run_dir / "metrics.json").read_text())["resumed_from_step"] == 16
    assert_equal_runs(resumed, whole)


@pytest.mark.parametrize("value", ["0", "-1", "inf"])
def test_a_period_that_is_not_a_positive_number_of_seconds_is_refused(value):
    shown = str(float(value))  # the schema's float
    sentence = rf"checkpoint_every_s={shown} \(must be a finite number > 0\)"
    with pytest.raises(ConfigError, match=sentence):
        load_config([f"checkpoint_every_s={value}"])


def test_a_run_resumes_under_another_checkpoint_period(make_cfg, tmp_path, monkeypatch):
    # The period is how often to write, not what is computed: a run cut at step 13 and
    # resumed with other periods ends as the uninterrupted run does
    whole = train(make_cfg(*RUN), tmp_path / "whole", clock=StepClock(monkeypatch))
    cut = tmp_path / "cut"
    train_until_sigterm(make_cfg(*RUN), cut, 13, clock=StepClock(monkeypatch))
    other = make_cfg(*RUN, "checkpoint_every_s=5", "checkpoint_every=7")
    resumed = train_again(other, cut, clock=StepClock(monkeypatch))
    assert json.loads((cut / "metrics.json").read_text())["resumed_from_step"] == 13
    assert_equal_runs(resumed, whole)
