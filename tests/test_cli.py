"""End to end through ``python train.py`` in a subprocess: record, TensorBoard, sweeps, errors."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.custom_scalar import layout_pb2
from tensorboard.plugins.hparams import plugin_data_pb2
from tensorboard.util.tensor_util import make_ndarray

from randfeat_torch.sweeps import sweep_jobs
from tests.conftest import ROOT, SMALL, TEST_DEVICE

pytestmark = pytest.mark.slow


def app(
    *args: str, cwd: Path, script: list[str] | None = None, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    command = script or [sys.executable, str(ROOT / "train.py")]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.run(
        [*command, *args], cwd=cwd, capture_output=True, text=True, timeout=300, env=env
    )


def test_a_run_writes_its_record_and_tensorboard_scalars(tmp_path):
    run_dir = tmp_path / "run"
    done = app(*SMALL, "replicas=1", f"hydra.run.dir={run_dir}", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "[ok] trainable on relu_neuron: d=8 width=64 -> test error" in done.stdout
    assert str(run_dir) in done.stdout

    record = json.loads((run_dir / "metrics.json").read_text())
    assert record["status"] == "ok"
    assert record["config"]["d"] == 8 and record["config"]["model"]["name"] == "trainable"
    assert set(record["metrics"]) == {
        "test_error",
        "test_mse",
        "train_loss",
        "train_error",
        "test_error_sample",
        "w_movement",
        "b_movement",
        "a_movement",
        "linearization_distance",
        "kernel_distance",
    }
    # The headline is normalised by the neuron's exact variance (1/2 - 1/(2 pi) at unit norm),
    # the other by the test sample's; both come from the same test MSE.
    metrics = record["metrics"]
    assert record["normaliser"] == "exact target variance"
    exact_variance = 0.5 - 1 / (2 * math.pi)
    assert metrics["test_error"] == pytest.approx(metrics["test_mse"] / exact_variance, rel=1e-6)
    assert metrics["test_error_sample"] != pytest.approx(metrics["test_error"], rel=1e-6)
    assert record["theory"]["best_degree_1"] == pytest.approx(0.2665, abs=1e-4)
    assert record["choices"]["model"] == "trainable"
    # The rate is over the steps' own time, a part of the run's wall time.
    assert record["steps_done"] == 20
    assert record["steps_per_s"] >= record["steps_done"] / record["wall_time_s"]
    assert record["device"] == TEST_DEVICE
    assert record["versions"]["torch"] and record["versions"]["python"]
    assert "commit" in record["git"]

    assert [p.name for p in run_dir.iterdir() if p.is_dir()] == [".hydra"]  # no stray subfolder
    events = EventAccumulator(str(run_dir))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"train/loss", "train/error", "test/error", "test/mse", "hparams/test_error"} <= tags
    assert {"theory/best_degree_1", "theory/best_constant"} <= tags
    assert [e.step for e in events.Scalars("test/error")] == [0, 10, 20]
    assert events.Scalars("test/error")[-1].value == pytest.approx(record["metrics"]["test_error"])
    assert events.Scalars("test/error")[-1].value < events.Scalars("test/error")[0].value  # learns

    layout_event = events.Tensors("custom_scalars__config__")[0]
    layout = layout_pb2.Layout.FromString(make_ndarray(layout_event.tensor_proto).item())
    error_chart = layout.category[0].chart[0].multiline
    assert list(error_chart.tag) == [
        "train/error.*",
        "fit/error.*",
        "population/error.*",
        "test/error.*",
        "theory/.*",
    ]

    hparams = events.PluginTagToContent("hparams")
    start = plugin_data_pb2.HParamsPluginData.FromString(hparams["_hparams_/session_start_info"])
    assert start.session_start_info.hparams["width"].number_value == 64
    assert start.session_start_info.hparams["model"].string_value == "trainable"


def test_replicas_get_one_tensorboard_series_each(tmp_path):
    run_dir = tmp_path / "run"
    done = app(*SMALL, "replicas=2", f"hydra.run.dir={run_dir}", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    events = EventAccumulator(str(run_dir))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"test/error/replica_0", "test/error/replica_1", "train/loss/replica_1"} <= tags


def test_a_two_by_two_multirun_leaves_four_records(tmp_path):
    sweep = tmp_path / "sweep"
    done = app(
        "-m", *SMALL, "model=frozen,trainable", "d=4,8", f"hydra.sweep.dir={sweep}", cwd=tmp_path
    )
    assert done.returncode == 0, done.stderr
    records = sorted(sweep.glob("*/metrics.json"))
    assert len(records) == 4 and len({r.parent for r in records}) == 4
    seen = set()
    for path in records:
        record = json.loads(path.read_text())
        assert record["status"] == "ok"
        seen.add((record["config"]["model"]["name"], record["config"]["d"]))
    assert seen == {("frozen", 4), ("frozen", 8), ("trainable", 4), ("trainable", 8)}
    # the jobs the command line is checked on are the jobs Hydra's sweeper launched
    launched = [set(yaml.safe_load(p.read_text())) for p in sweep.glob("*/.hydra/overrides.yaml")]
    expected = sweep_jobs([*SMALL, "model=frozen,trainable", "d=4,8"])
    assert sorted(map(sorted, launched)) == sorted(map(sorted, expected))


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("width=-5", "invalid config: width=-5 (must be an integer >= 1)"),
        ("d=0", "invalid config: d=0 (must be an integer >= 1)"),
        ("optimizer.lr=0", "invalid config: optimizer.lr=0 (must be a finite number > 0)"),
        ("model=nope", "invalid config: model=nope (allowed: frozen, kernel, linearized, trainabl"),
        ("width=abc", "invalid config: width=abc (Value 'abc' of type 'str' could not be con"),
        ("foo=1", "invalid config: foo=1 (no such key; new variables go under vars, as +vars"),
        ("width=[", "invalid config: width=[ (Hydra's override grammar cannot read the value"),
    ],
)
def test_bad_input_exits_2_with_one_sentence_and_writes_nothing(tmp_path, override, message):
    run_dir = tmp_path / "run"
    done = app(override, f"hydra.run.dir={run_dir}", cwd=tmp_path)
    assert done.returncode == 2
    assert done.stderr.strip().startswith(message) and "\n" not in done.stderr.strip()
    assert "Traceback" not in done.stderr + done.stdout
    assert not run_dir.exists() and not (tmp_path / "outputs").exists()


@pytest.mark.parametrize("argv", [["width=-5"], ["model=nope"], ["-m", "d=4,0"]])
def test_a_refused_command_line_never_imports_torch(tmp_path, argv):
    """The command line is checked before torch is imported (1-2 s): a typo costs 0.5 s."""
    code = (
        "import runpy, sys\n"
        f"sys.argv = [{str(ROOT / 'train.py')!r}, *{argv!r}]\n"
        "try:\n"
        "    runpy.run_path(sys.argv[0], run_name='__main__')\n"
        "except SystemExit as stop:\n"
        "    print(stop.code, 'torch' in sys.modules)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300
    )
    assert done.stdout.split() == ["2", "False"], done.stderr
    assert done.stderr.strip().startswith("invalid config: ")


def test_every_job_of_a_sweep_is_checked_before_any_runs(tmp_path):
    done = app("-m", *SMALL, "d=4,6,0", f"hydra.sweep.dir={tmp_path / 'sweep'}", cwd=tmp_path)
    assert done.returncode == 2
    assert done.stderr.strip() == "invalid config: d=0 (must be an integer >= 1)"
    assert not (tmp_path / "sweep").exists()


def test_console_script_behaves_like_train_py(tmp_path):
    script = Path(sys.executable).parent / "randfeat-train"
    if not script.exists():
        pytest.skip("randfeat-train is not installed in this environment")
    run_dir = tmp_path / "run"
    done = app(
        *SMALL, "model=frozen", f"hydra.run.dir={run_dir}", cwd=tmp_path, script=[str(script)]
    )
    assert done.returncode == 0, done.stderr
    assert json.loads((run_dir / "metrics.json").read_text())["config"]["model"]["name"] == "frozen"


def test_a_failing_job_leaves_a_failed_record_and_the_sweep_goes_on(tmp_path):
    sweep = tmp_path / "sweep"
    # A constant target is only found when the test set is drawn, inside the job.
    args = ["-m", *SMALL, "target.bias=-100,0", "d=4,6", f"hydra.sweep.dir={sweep}"]
    done = app(*args, cwd=tmp_path)
    assert done.returncode != 0  # Hydra's basic launcher: exit 1 after a failed job
    records = {p.parent.name: json.loads(p.read_text()) for p in sweep.glob("*/metrics.json")}
    assert len(records) == 4
    statuses = sorted(
        (r["config"]["target"]["bias"], r["config"]["d"], r["status"]) for r in records.values()
    )
    assert statuses == [(-100, 4, "failed"), (-100, 6, "failed"), (0, 4, "ok"), (0, 6, "ok")]
    failed = [r for r in records.values() if r["status"] == "failed"]
    assert all("is constant on the 512 test inputs" in r["error"] for r in failed)
    assert all(r["choices"]["target"] == "relu_neuron" for r in failed)  # the aggregator's labels
    # Every failure is listed as it happens, not only the first, and again when the sweep ends,
    # without Hydra's traceback of the first one.
    assert done.stderr.count("failed: DataError: target=relu_neuron is constant") == 2
    assert "Traceback" not in done.stderr
    summary = done.stderr[done.stderr.index("2 of 4 jobs did not finish:") :].splitlines()
    unfinished = sorted(name for name, r in records.items() if r["status"] == "failed")
    assert [line.split(":")[0].strip() for line in summary[1:3]] == unfinished
    assert all("(DataError: target=relu_neuron is constant" in line for line in summary[1:3])
    assert summary[3].startswith("Run the same command again") and "hydra.sweep.dir=" in summary[4]

    again = app(*args, cwd=tmp_path)
    assert again.stdout.count("[skip]") == 2  # the finished jobs are not trained again
    assert again.stderr.count("failed: DataError") == 2  # the failed ones are retried


def test_folders_come_from_the_overrides_and_a_rerun_finds_its_runs(tmp_path):
    args = [*SMALL, "steps=4", "eval_every=2"]
    first = app(*args, cwd=tmp_path)
    run_dir = tmp_path / "outputs" / "runs" / ",".join(sorted(args))
    assert first.returncode == 0 and (run_dir / "metrics.json").exists(), first.stderr
    again = app(*args, cwd=tmp_path)
    assert again.returncode == 0 and f"[skip] {run_dir} is finished" in again.stdout
    fresh = app(*args, "resume=false", cwd=tmp_path)
    assert fresh.returncode == 0 and "[skip]" not in fresh.stdout
    assert len(list((tmp_path / "outputs" / "runs").iterdir())) == 2  # a new folder, none lost

    sweep_args = ["-m", *args, "d=4,6"]
    assert app(*sweep_args, cwd=tmp_path).returncode == 0
    sweeps = list((tmp_path / "outputs" / "multirun").iterdir())
    assert len(sweeps) == 1 and len(list(sweeps[0].glob("*/metrics.json"))) == 2
    assert app(*sweep_args, cwd=tmp_path).stdout.count("[skip]") == 2
    # progress and aggregate change no result: the same sweep folder, nothing trained again
    assert app(*sweep_args, "progress=false", cwd=tmp_path).stdout.count("[skip]") == 2
    assert len(list((tmp_path / "outputs" / "multirun").iterdir())) == 1


def test_a_finished_record_of_another_config_is_refused_not_skipped_nor_replaced(tmp_path):
    """Before, a rerun skipped any job whose record said ok, even one that a config edited in
    a yaml file since (the same folder name) would have trained otherwise."""
    run_dir = tmp_path / "run"
    assert app(*SMALL, f"hydra.run.dir={run_dir}", cwd=tmp_path).returncode == 0
    record = json.loads((run_dir / "metrics.json").read_text())
    del record["config"]["replica_init"]  # as a record written before the key was added
    (run_dir / "metrics.json").write_text(json.dumps(record))
    again = app(*SMALL, f"hydra.run.dir={run_dir}", cwd=tmp_path)
    assert again.returncode == 0 and f"[skip] {run_dir} is finished" in again.stdout

    record["config"]["steps"] = 99  # as if the yaml had said steps: 99 then
    (run_dir / "metrics.json").write_text(json.dumps(record))
    refused = app(*SMALL, f"hydra.run.dir={run_dir}", cwd=tmp_path)
    assert refused.returncode == 2 and "Traceback" not in refused.stderr
    assert refused.stderr.strip() == (
        f"cannot run in {run_dir}: its finished record was written for steps=99 (this run: "
        "20); resume=false trains it again there (replacing that record), or choose another "
        "folder (hydra.run.dir or hydra.sweep.dir)"
    )
    assert json.loads((run_dir / "metrics.json").read_text()) == record  # left as it was

    sweep = tmp_path / "sweep"
    args = ["-m", *SMALL, "d=4,6", f"hydra.sweep.dir={sweep}"]
    assert app(*args, cwd=tmp_path).returncode == 0
    path = next(sweep.glob("*/metrics.json"))
    stale = json.loads(path.read_text())
    stale["config"]["steps"] = 99
    path.write_text(json.dumps(stale))
    rerun = app(*args, cwd=tmp_path)
    assert rerun.returncode == 1 and "Traceback" not in rerun.stderr
    assert rerun.stdout.count("[skip]") == 1
    assert "every job's record says ok, but jobs failed; the first: StaleRecord: cannot run" in (
        rerun.stderr
    )
    assert json.loads(path.read_text()) == stale
    assert app(*args, "resume=false", cwd=tmp_path).returncode == 0  # trains both again


def test_an_output_dir_that_cannot_be_written_is_refused(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    done = app(*SMALL, f"hydra.run.dir={blocker / 'run'}", cwd=tmp_path)
    assert done.returncode == 2
    assert done.stderr.strip() == (
        f"invalid config: hydra.run.dir={blocker / 'run'} (the folder cannot be created: Not a "
        "directory; allowed: a folder that can be written)"
    )
    assert "Traceback" not in done.stderr and blocker.read_text() == "not a folder"


def test_a_four_job_sweep_through_the_joblib_launcher(tmp_path):
    pytest.importorskip("hydra_plugins.hydra_joblib_launcher")
    sweep = tmp_path / "sweep"
    # Thread counts asked for in the environment: joblib then leaves the workers' alone, and
    # the preset's callback must share the cores itself.
    cores = str(os.cpu_count() or 1)
    done = app(
        "-m",
        *SMALL,
        "hydra/launcher=local_parallel",
        "d=4,6",
        "width=16,32",
        f"hydra.sweep.dir={sweep}",
        cwd=tmp_path,
        env={"OMP_NUM_THREADS": cores, "MKL_NUM_THREADS": cores},
    )
    assert done.returncode == 0, done.stderr[-2000:]
    records = [json.loads(p.read_text()) for p in sweep.glob("*/metrics.json")]
    assert sorted((r["config"]["d"], r["config"]["width"]) for r in records) == [
        (4, 16),
        (4, 32),
        (6, 16),
        (6, 32),
    ]
    # 2 workers on this machine's cores: cores // 2 torch threads each.
    threads = max(1, (os.cpu_count() or 1) // 2)
    assert all(r["status"] == "ok" and r["torch_threads"] == threads for r in records)
    assert "4 jobs:" in done.stdout  # the statuses, read from the records the workers wrote


def test_submitit_jobs_killed_with_sigterm_are_finished_by_a_rerun(tmp_path):
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    sweep = tmp_path / "sweep"
    args = [
        "-m",
        *SMALL,
        "hydra/launcher=slurm_local",
        "threads=1",
        "steps=3000",
        "eval_every=100",
        "d=4,6",
        f"hydra.sweep.dir={sweep}",
    ]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    launcher = subprocess.Popen(
        [sys.executable, str(ROOT / "train.py"), *args],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline, victim = time.time() + 120, None
    while time.time() < deadline and victim is None:
        for record in sweep.glob("*/metrics.json"):
            if json.loads(record.read_text()).get("steps_done", 0) >= 100:
                victim = record.parent
                break
        time.sleep(0.05)
    assert victim is not None, "no job got to its first evaluation"
    jobs = [int(p.name) for p in (sweep / ".submitit").iterdir() if p.name.isdigit()]
    assert jobs
    for pid in jobs:  # the local executor's job ids are the workers' process ids
        os.kill(pid, signal.SIGTERM)
    launcher.communicate(timeout=120)
    assert launcher.returncode != 0  # the sweep reports the killed jobs
    killed = [json.loads(p.read_text()) for p in sweep.glob("*/metrics.json")]
    assert any(r["status"] == "interrupted" for r in killed)

    again = app(*args, cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-2000:]
    final = [json.loads(p.read_text()) for p in sweep.glob("*/metrics.json")]
    assert len(final) == 2 and all(r["status"] == "ok" for r in final)
    assert any((r.get("resumed_from_step") or 0) > 0 for r in final)
