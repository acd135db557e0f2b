"""The notebook API: run() trains what the command line trains, in the command line's folder,
skips a finished run, refuses bad values and sweeps; load_sweep() reads records into a table."""

from __future__ import annotations

import json

import pytest

import randfeat_torch
from randfeat_torch import api
from randfeat_torch.cli import load_config
from randfeat_torch.config import ConfigError
from randfeat_torch.record import RECORD_NAME
from randfeat_torch.trainer import train
from tests.conftest import SMALL

# SMALL's values as keywords, some typed (a float, a list, a bool), and the same as overrides.
VALUES = {
    **dict(o.split("=", 1) for o in SMALL),
    "width": 32,
    "model": "frozen",
    "optimizer.lr": 0.5,
    "steps_to_error": [2.0, 0.5],
    "progress": False,
}
OVERRIDES = [
    *SMALL,
    "width=32",
    "model=frozen",
    "optimizer.lr=0.5",
    "steps_to_error=[2.0,0.5]",
    "progress=false",
]


def record(run_dir):
    return json.loads((run_dir / RECORD_NAME).read_text())


def test_overrides_and_keywords_train_what_compose_and_train_give(tmp_path):
    direct = train(load_config(OVERRIDES), tmp_path / "direct")
    by_overrides = api.run(*OVERRIDES, run_dir=tmp_path / "overrides")
    by_keywords = randfeat_torch.run(run_dir=tmp_path / "keywords", **VALUES)
    config = record(tmp_path / "direct")["config"]
    assert config["width"] == 32 and config["optimizer"]["lr"] == 0.5
    assert config["steps_to_error"] == [2.0, 0.5] and config["progress"] is False
    for result in (by_overrides, by_keywords):
        assert record(result.run_dir)["config"] == config
        assert record(result.run_dir)["choices"]["model"] == "frozen"
        assert result.test_error == direct.test_error  # bit-identical on the same device
        assert result.model is not None


def test_default_folder_is_the_command_lines_and_a_finished_run_is_read_back(
    tmp_path, monkeypatch, capsys
):
    monkeypatch.chdir(tmp_path)
    first = api.run(*SMALL, "model=frozen")
    # python train.py <overrides>: outputs/runs/<the overrides, sorted>, under the working dir
    assert first.run_dir == tmp_path / "outputs" / "runs" / ",".join(
        sorted([*SMALL, "model=frozen"])
    )
    written = (first.run_dir / RECORD_NAME).read_text()
    again = api.run("model=frozen", *SMALL)  # reordered: the same run
    assert "[skip]" in capsys.readouterr().out
    assert (first.run_dir / RECORD_NAME).read_text() == written  # not trained again
    assert again.model is None and again.run_dir == first.run_dir
    assert again.status == "ok" and again.steps_done == first.steps_done == 20
    assert again.test_error == first.test_error
    assert again.metrics.keys() == first.metrics.keys()
    fresh = api.run("model=frozen", *SMALL, resume=False)  # a new folder, trained again
    assert fresh.run_dir.name.startswith(first.run_dir.name + "_") and fresh.model is not None
    assert fresh.test_error == first.test_error


@pytest.mark.parametrize(
    ("overrides", "values", "sentence"),
    [
        ((), {"width": -5}, "invalid config: width=-5 (must be an integer >= 1)"),
        (("width=-5",), {}, "invalid config: width=-5 (must be an integer >= 1)"),
        ((), {"model": "nope"}, "invalid config: model=nope (allowed: frozen, kernel, linearized"),
        ((), {"foo": 1}, "invalid config: foo=1 (no such key; new variables go under vars"),
    ],
)
def test_a_bad_value_raises_one_sentence_naming_the_key(tmp_path, overrides, values, sentence):
    with pytest.raises(ConfigError) as refused:
        api.run(*SMALL, *overrides, run_dir=tmp_path / "run", **values)
    assert str(refused.value).startswith(sentence)
    assert not (tmp_path / "run").exists()  # refused before anything is written


@pytest.mark.parametrize(
    ("overrides", "values", "key"),
    [(("d=4,8",), {}, "d"), ((), {"d": "4,8"}, "d"), (("width=range(8,32,8)",), {}, "width")],
)
def test_a_sweep_is_refused_with_the_way_to_run_one(tmp_path, overrides, values, key):
    with pytest.raises(ConfigError) as refused:
        api.run(*SMALL, *overrides, run_dir=tmp_path / "run", **values)
    assert refused.value.key == key
    assert str(refused.value).endswith("python train.py -m, or call run() in a Python loop)")
    assert not (tmp_path / "run").exists()


def test_load_sweep_gives_one_row_per_run(tmp_path):
    runs = {
        "a": api.run(*SMALL, width=16, run_dir=tmp_path / "sweep" / "a"),
        "b": api.run(*SMALL, "model=frozen", run_dir=tmp_path / "sweep" / "b"),
    }
    table = randfeat_torch.load_sweep(tmp_path / "sweep").set_index("run")
    assert sorted(table.index) == ["a", "b"]
    assert {"status", "d", "width", "model", "optimizer.lr", "test_error"} <= set(table.columns)
    assert table.loc["a", "width"] == 16 and table.loc["b", "width"] == 64
    assert table.loc["a", "model"] == "trainable" and table.loc["b", "model"] == "frozen"
    assert (table["status"] == "ok").all() and (table["d"] == 8).all()
    for name, result in runs.items():
        assert table.loc[name, "test_error"] == result.test_error
    with pytest.raises(FileNotFoundError, match="no folder at"):
        api.load_sweep(tmp_path / "nowhere")


def test_an_interrupted_run_stops_a_loop_of_runs(tmp_path, monkeypatch):
    # the loop checkpointed and returned "interrupted" (SIGINT: the notebook's stop button)
    def interrupted(cfg, run_dir, choices):
        return api.RunResult("interrupted", {}, {}, 7, 0.1, 70.0, "cpu", run_dir, None, 2)

    monkeypatch.setattr(api, "train", interrupted)
    with pytest.raises(KeyboardInterrupt, match=r"interrupted at step 7: .* the same call resumes"):
        api.run(*SMALL, run_dir=tmp_path / "run")
