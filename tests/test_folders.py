"""Output folders are named by settings, never by order or job number: a sweep reordered finds
every job it ran, a sweep given one more value trains only the new jobs, resume=false starts a
fresh folder, and every job of every preset gets a folder of its own."""

from __future__ import annotations

import sys
from pathlib import Path

import hydra
import pytest
from hydra import compose
from hydra._internal.config_loader_impl import get_overrides_dirname
from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf

from randfeat_torch.cli import precheck, run
from randfeat_torch.paths import (
    CONFIG_DIR,
    SWEEP_DIR_VARIABLE,
    folder_name,
    register_resolvers,
    sweep_name,
)
from randfeat_torch.sweeps import hydra_configs, sweep_jobs
from tests.conftest import TEST_DEVICE
from tests.test_presets import PRESETS

# Tiny jobs (a few hundredths of a second each); d and width are what the sweeps below sweep.
TINY = ["steps=2", "eval_every=2", "batch_size=8", "n_test=64", "lazy_probe=0"]
TINY.append(f"device={TEST_DEVICE}")


def test_a_sweep_is_named_by_its_fixed_overrides_and_the_keys_it_sweeps():
    name = sweep_name(["d=4,6", "width=8,16", "steps=2", "resume=false", "progress=false"])
    assert name == "steps=2,sweep=d+width"
    assert sweep_name(["width=16,8", "steps=2", "d=range(4,10,2)"]) == name
    assert sweep_name(["model=glob(*)", "+experiment=parity_small"]) == (
        "+experiment=parity_small,sweep=model"
    )
    assert sweep_name(["d=4", "width=8,16"]) != sweep_name(["d=6", "width=8,16"])
    assert folder_name([]) == "default" and folder_name(["optimizer.lr=[0.1,0.2]"]) == (
        "optimizer.lr=[0.1,0.2]"
    )
    long = folder_name([f"vars.v{i}=1,2" for i in range(40)])
    assert len(long) == 111 and long != folder_name([f"vars.v{i}=1,2" for i in range(41)])
    assert folder_name("d=4", resume=False).startswith("d=4_20")


def train_py(monkeypatch: pytest.MonkeyPatch, *args: str) -> None:
    """``python train.py <args>`` in this process: the checks, then Hydra's main (as the
    ``randfeat-train`` script calls it)."""
    register_resolvers()
    precheck(list(args))
    monkeypatch.setattr(sys, "argv", ["train.py", *args])
    GlobalHydra.instance().clear()
    try:
        hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="train")(run)()
    finally:
        GlobalHydra.instance().clear()


def job_name(*overrides: str) -> str:
    return ",".join(sorted([*TINY, *overrides]))


def test_a_sweep_reordered_or_extended_trains_only_the_jobs_it_has_not_run(
    tmp_path, monkeypatch, capsys, hydra_restore_singletons
):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv(SWEEP_DIR_VARIABLE, "")  # the sweep sets it: undone after the test
    root = tmp_path / "outputs" / "multirun"
    train_py(monkeypatch, "-m", *TINY, "d=4,6", "width=8,16")
    out = capsys.readouterr().out
    assert out.count("[ok]") == 4 and "[skip]" not in out
    (sweep,) = root.iterdir()
    assert sweep.name == ",".join(sorted(TINY)) + ",sweep=d+width"
    records = {p.parent.name: p.read_text() for p in sweep.glob("*/metrics.json")}
    assert sorted(records) == sorted(
        job_name(f"d={d}", f"width={w}") for d in (4, 6) for w in (8, 16)
    )

    # Reordered (keys and values): the same folder, every job skipped, no record rewritten.
    train_py(monkeypatch, "-m", "width=16,8", *reversed(TINY), "d=6,4")
    out = capsys.readouterr().out
    assert out.count("[skip]") == 4 and "[ok]" not in out
    assert list(root.iterdir()) == [sweep]
    assert {p.parent.name: p.read_text() for p in sweep.glob("*/metrics.json")} == records

    # One more value of d: only its two jobs are trained.
    train_py(monkeypatch, "-m", *TINY, "d=4,6,8", "width=8,16")
    out = capsys.readouterr().out
    assert out.count("[skip]") == 4 and out.count("[ok]") == 2
    assert "[ok] trainable on relu_neuron: d=8 width=8 " in out
    now = {p.parent.name: p.read_text() for p in sweep.glob("*/metrics.json")}
    assert list(root.iterdir()) == [sweep] and len(now) == 6
    assert {k: now[k] for k in records} == records

    # resume=false: a fresh, timestamped sweep folder, everything trained again.
    train_py(monkeypatch, "-m", *TINY, "d=4", "width=8,16", "resume=false")
    out = capsys.readouterr().out
    assert out.count("[ok]") == 2 and "[skip]" not in out
    (fresh,) = set(root.iterdir()) - {sweep}
    assert fresh.name.startswith(f"{','.join(sorted([*TINY, 'd=4']))},sweep=width_20")
    assert len(list(fresh.glob("*/metrics.json"))) == 2


def test_every_job_of_every_preset_has_a_folder_of_its_own():
    jobs = {preset: sweep_jobs([f"experiment={preset}"]) for preset in PRESETS}
    sweeps = set()
    with hydra_configs() as parser:
        for preset in PRESETS:
            register_resolvers()
            cfg = compose("train", [f"experiment={preset}"], return_hydra_config=True)
            # the job folder of train.yaml: a preset does not replace it
            assert OmegaConf.to_container(cfg.hydra.sweep)["subdir"] == (
                "${folder:${hydra.job.override_dirname}}"
            )
            sweeps.add(cfg.hydra.sweep.dir)
            settings = cfg.hydra.job.config.override_dirname
            names = {
                folder_name(get_overrides_dirname(parser.parse_overrides(job), **settings))
                for job in jobs[preset]
            }
            assert len(names) == len(jobs[preset]), preset
    assert len(sweeps) == len(PRESETS)
    assert Path(cfg.hydra.sweep.dir).parts[:2] == ("outputs", "experiments")
