"""What the jobs of a sweep share is computed once per process: the composition of each pick of
config groups (every job made from it equals Hydra's own composition of the job), the git
state, and the reference errors of a zigzag target."""

from __future__ import annotations

import json
import pickle
import subprocess

import pytest
import torch
from hydra import initialize_config_dir
from hydra._internal.config_loader_impl import ConfigLoaderImpl
from hydra.core.global_hydra import GlobalHydra
from hydra.types import RunMode
from omegaconf import OmegaConf

from randfeat_torch import record, sweeps, theory
from randfeat_torch.multirun import ComposingLoader
from randfeat_torch.paths import CONFIG_DIR, SWEEP_DIR_VARIABLE, register_resolvers
from randfeat_torch.record import RECORD_NAME
from randfeat_torch.targets import build_target, zigzag
from randfeat_torch.trainer import train
from tests.test_folders import TINY, train_py

JOBS = [
    ["d=4", "width=8"],
    ["width=16", "d=6", "model=frozen"],  # another pick of groups
    ["model=frozen", "optimizer=ridge", "optimizer.penalty=[0.1,1.0]", "progress=false"],
    ["target=zigzag", "target.a=3", "resume=false"],
    ["experiment=parity_small", "seed=2"],  # a preset: its values, then the job's
    ["+vars.x=1"],  # only Hydra composes these
    ["~lazy_probe"],
    ["vars.x=1"],  # refused, in Hydra's words
    ["d=abc"],
    ["model=nope"],
    ["d=4", "width=8", "d=6"],  # a key given twice: the last value wins
]


def composed(loader, master, job):
    """The job's config as YAML (with Hydra's), or its error as 'Type: message'."""
    try:
        cfg = loader.load_sweep_config(master, job)
    except Exception as error:
        return f"{type(error).__name__}: {error}"
    return OmegaConf.to_yaml(cfg) + f"struct={OmegaConf.is_struct(cfg)}"


@pytest.mark.parametrize("pickles", [True, False])
def test_every_job_composed_from_its_pick_equals_hydras_composition(pickles, monkeypatch):
    if not pickles:  # as in a joblib worker, where Hydra's plugin classes were imported anew

        def refuse(cfg):
            raise pickle.PicklingError("not the same object")

        monkeypatch.setattr(sweeps.pickle, "dumps", refuse)
    register_resolvers()
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
            hydra = GlobalHydra.instance().hydra
            masters = [
                hydra.compose_config(
                    "train", ["hydra.sweep.dir=sweep", "d=4,6", *extra], run_mode=RunMode.MULTIRUN
                )
                for extra in ([], ["hydra.job.chdir=true"])
            ]
            master = masters[0]
            fast = ComposingLoader.of(hydra.config_loader)
            for job in JOBS:
                expected = composed(hydra.config_loader, master, job)
                assert composed(fast, master, job) == expected, job
                assert composed(fast, master, job) == expected, job  # from the kept pick
            assert "\nd: 6\n" in composed(fast, master, JOBS[-1])
            assert len(fast.picks) == 5  # the picks of the jobs it made itself
            assert all(isinstance(pick, bytes) == pickles for pick in fast.picks.values())
            # a master with other hydra overrides gets its own hydra node, not the kept one
            assert composed(fast, masters[1], ["d=4"]) == composed(
                hydra.config_loader, masters[1], ["d=4"]
            )
            first = fast.load_sweep_config(master, ["d=4"])
            first.d, first.width, first.hydra.job.num = 5, 999, 7  # as a launcher sets a job's
            second = fast.load_sweep_config(master, ["d=6"])  # fields: the next is not touched
            assert second is not first and fast.load_sweep_config(master, ["d=4"]).d == 4
            assert OmegaConf.to_yaml(second) == OmegaConf.to_yaml(
                hydra.config_loader.load_sweep_config(master, ["d=6"])
            )
    finally:
        GlobalHydra.instance().clear()


def test_a_multirun_composes_each_pick_of_groups_once(
    tmp_path, monkeypatch, capsys, hydra_restore_singletons
):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv(SWEEP_DIR_VARIABLE, "")
    calls = []
    load = ConfigLoaderImpl.load_sweep_config

    def counted(self, master_config, sweep_overrides):
        calls.append(list(sweep_overrides))
        return load(self, master_config, sweep_overrides)

    monkeypatch.setattr(ConfigLoaderImpl, "load_sweep_config", counted)
    train_py(monkeypatch, "-m", *TINY, "d=4,6", "width=8,16", "model=trainable,frozen")
    assert capsys.readouterr().out.count(": ok") == 8
    # Hydra's own loader: each job twice (its sweeper checks it, its launcher composes it)
    assert calls == [["model=trainable"], ["model=frozen"]]
    runs = sorted((tmp_path / "outputs" / "multirun").glob("*/*/.hydra/overrides.yaml"))
    assert len(runs) == 8
    for path in runs:  # what Hydra derives from the job's overrides is the job's
        overrides = OmegaConf.load(path)
        assert path.parent.parent.name == ",".join(sorted(overrides))


def test_the_git_state_is_asked_of_git_once_per_process(make_cfg, tmp_path, monkeypatch):
    record.git_state.cache_clear()
    calls = []
    run = subprocess.run

    def counted(command, *args, **kwargs):
        calls.append(command[:2])
        return run(command, *args, **kwargs)

    monkeypatch.setattr(subprocess, "run", counted)
    for seed in (0, 1):
        train(make_cfg("steps=2", "eval_every=2", f"seed={seed}"), tmp_path / f"run{seed}")
    assert calls == [["git", "rev-parse"], ["git", "status"]]
    states = [json.loads((tmp_path / f"run{s}" / RECORD_NAME).read_text())["git"] for s in (0, 1)]
    assert states[0] == states[1] and "commit" in states[0]


def test_a_zigzags_reference_errors_are_computed_once_for_a_sweep(run, make_cfg, monkeypatch):
    theory.zigzag_energies.cache_clear()
    calls = []
    quadrature = theory.hermite_coefficients_1d

    def counted(*args, **kwargs):
        calls.append(args[1])
        return quadrature(*args, **kwargs)

    monkeypatch.setattr(theory, "hermite_coefficients_1d", counted)
    base = ("target=zigzag", "steps=2", "eval_every=2")
    first = run(*base, "seed=0")
    second = run(*base, "seed=1", "width=32")
    assert len(calls) == 1
    assert first.theory == second.theory and "best_degree_4" in first.theory
    # another zigzag (its a, its norm) has numbers of its own, those it would have alone
    others = {extra: run(*base, extra).theory for extra in ("target.a=3", "target.norm=2.5")}
    assert len(calls) == 3
    theory.zigzag_energies.cache_clear()
    for extra, numbers in others.items():
        assert numbers != first.theory and run(*base, extra).theory == numbers
    target = build_target(make_cfg("target=zigzag").target, torch.device("cpu"))
    direct = quadrature(lambda z: zigzag(target.norm * z, target.a), calls[0]).square()
    assert torch.equal(theory.degree_energies(target, calls[0])[0], direct)  # bit for bit
