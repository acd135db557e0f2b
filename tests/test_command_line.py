"""A malformed command line, Hydra's own overrides and flags included, is refused before Hydra
creates anything: exit status 2 and one sentence on stderr that names the key and the value,
no traceback, no folder. The valid forms next to each one still run."""

from __future__ import annotations

import sys

import hydra
import pytest
from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf

from randfeat_torch.cli import FixSweepDir, precheck, run
from randfeat_torch.paths import CONFIG_DIR, SWEEP_DIR_VARIABLE, calc, folder_name
from randfeat_torch.record import read_record
from tests.conftest import TEST_DEVICE

REFUSED = [
    # Hydra's own overrides and flags
    (["hydra.job.chdir=maybe"], "hydra.job.chdir=maybe (Value 'maybe' is not a valid bool"),
    (["hydra.run.dir=[[["], "hydra.run.dir=[[[ (Hydra's override grammar cannot read the value"),
    (["hydra/launcher=nope"], "hydra/launcher=nope (allowed: basic, joblib, local_parallel,"),
    (["hydra.foo=1"], "hydra.foo=1 (no such key in Hydra's config"),
    (["--config-name", "nope"], "--config-name=nope (allowed: train)"),
    (["--cfg", "nope"], "argument --cfg/-c: invalid choice: 'nope' (choose from"),
    (["d=4", "-m", "width=8,16"], "unrecognized arguments: width=8,16 (the flags, such as -m, go"),
    # keys that nothing reads: added, typed wrong, deleted
    (["+foo=1"], "+foo=1 (no such key; new variables go under vars, as +vars.foo=1)"),
    (["++foo=1"], "++foo=1 (no such key; new variables go under vars, as +vars.foo=1)"),
    (["+model.widht=5"], "+model.widht=5 (no such key; the nearest is model.width)"),
    (["-m", "+model.widht=5,6"], "+model.widht=5 (no such key; the nearest is model.width)"),
    (["+hydra.foo=1"], "+hydra.foo=1 (no such key in Hydra's config"),
    (["widht=5"], "widht=5 (no such key; the nearest is width)"),
    (["~width"], "~width (the schema needs width: set it, as width=VALUE)"),
    (["~foo"], "~foo (there is no key foo to delete)"),
    (["+width=3"], "+width=3 (the key has a value already, so set it without the +: width=3)"),
    (["+experiment=parity_small"], "+experiment=parity_small (the group is in the defaults list"),
    # overrides that are not KEY=VALUE, or whose value Hydra cannot read or expand
    (["width==3"], "width==3 (Hydra's override grammar cannot read the value: extraneous input"),
    (["width"], "width (no value: write width=VALUE, or ~width to delete it)"),
    (["=3"], "=3 (no key: an override is KEY=VALUE)"),
    (["width=choice()"], "width=choice() (choice() cannot be expanded: empty choice is not legal)"),
    (["model=${model}"], "model=${model} (allowed: frozen,"),
    (["d=4,8"], "d=4,8 (a sweep needs -m)"),
    (["-m", "optimizer.lr=interval(0.1,0.2)"], "optimizer.lr=interval(0.1,0.2) (the basic sweeper"),
    (["-m", "model=glob(nope*)"], "model=glob(nope*) (matches no option; allowed: frozen,"),
    (["-m", "width=range(5,1)"], "width=range(5,1) (gives no values)"),
    # calc: bounded before it computes, whatever the expression
    (["target.bias=${calc:9**9**9}"], "target.bias=${calc:9**9**9} (calc: 9**9**9 is too large"),
    (["target.bias=${calc:1e200**2}"], "(calc: 1e200**2 is too large: its numbers must stay below"),
    (["target.bias='${calc:\"(2**64)**64/3\"}'"], "(calc: (2**64)**64/3 is too large"),
    (["target.bias=${calc:1/0}"], "target.bias=${calc:1/0} (calc: 1/0 divides by zero)"),
    (["target.bias='${calc:(1+${d})*2}'"], "quote an expression with parentheses inside its"),
]


@pytest.mark.parametrize(("argv", "sentence"), REFUSED, ids=[" ".join(a) for a, _ in REFUSED])
def test_a_malformed_command_line_is_refused_with_one_sentence(
    tmp_path, monkeypatch, capsys, argv, sentence
):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as refused:
        precheck(argv)
    err = capsys.readouterr().err.strip()
    assert refused.value.code == 2
    assert err.startswith(("invalid config: ", "invalid command line: ")) and sentence in err
    assert "\n" not in err and "Traceback" not in err
    assert list(tmp_path.iterdir()) == []  # no outputs/, no run dir


VALID = [
    ["--config-name", "train"],
    ["--config-name=train.yaml"],
    ["-cn", "train"],
    ["+vars.ratio=2", "width='${calc:${vars.ratio}*4}'"],
    ["++width=8"],
    ["+hydra.job.env_set.FOO=1"],
    ["target.bias='${calc:\"-(${d}+1)/2\"}'"],
    ["--cfg", "job"],
    ["-m", "model=frozen,trainable", "d=4,8"],
]


@pytest.mark.parametrize("argv", VALID, ids=[" ".join(a) for a in VALID])
def test_the_valid_forms_pass(tmp_path, monkeypatch, argv):
    monkeypatch.chdir(tmp_path)
    precheck(argv)
    assert list(tmp_path.iterdir()) == []


def test_config_name_with_a_space_runs_like_the_default(
    tmp_path, monkeypatch, hydra_restore_singletons
):
    tiny = ["d=4", "width=8", "steps=1", "eval_every=1", "batch_size=4", "n_test=16"]
    tiny.append(f"device={TEST_DEVICE}")
    argv = ["--config-name", "train", *tiny, "lazy_probe=0", f"hydra.run.dir={tmp_path / 'run'}"]
    precheck(argv)
    monkeypatch.setattr(sys, "argv", ["train.py", *argv])
    GlobalHydra.instance().clear()
    try:
        hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="train")(run)()
    finally:
        GlobalHydra.instance().clear()
    record = read_record(tmp_path / "run")
    assert record["status"] == "ok" and record["config"]["model"]["name"] == "trainable"


@pytest.mark.parametrize(
    ("expression", "value"),
    [("6*4**2+1", 97), ("-4**1.5/2", -4), ("2**-1000", 2.0**-1000), ("(1+3)*2", 8)],
)
def test_calc_computes_plain_arithmetic(expression, value):
    assert calc(expression) == value


@pytest.mark.parametrize(
    ("expression", "reason"),
    [
        ("9**9**9", "is too large"),  # refused before computing: no gigabyte, no 38 s
        ("((((10**64)**64)**64)**64)", "is too large"),
        ("(2**64)**64/3", "is too large"),  # a float division that overflows
        ("1e308*10", "is too large"),  # inf
        ("0.5**-2000", "is too large"),
        ("(-8)**0.5", "is not a real number"),
        ("0**-1", "divides by zero"),
        ("7%0", "divides by zero"),
        ("__import__('os')", "is not plain arithmetic"),
        ("1+" * 100_000 + "1", "is not plain arithmetic"),  # too deep to parse
    ],
)
def test_calc_refuses_with_one_sentence_naming_the_expression(expression, reason):
    with pytest.raises(ValueError, match=reason) as refused:
        calc(expression)
    assert str(refused.value).startswith(f"calc: {expression[:60]}")
    assert len(str(refused.value)) < 200


def test_folder_names_stay_under_the_file_systems_255_bytes():
    long_ascii = folder_name(f"+vars.label={'x' * 300}")
    wide = folder_name(f"+vars.label='{'日' * 100}'")  # 3 bytes a character
    other = folder_name(f"+vars.label='{'日' * 99}月'")
    for name in (long_ascii, wide, other):
        assert len(name.encode()) <= 120 and len(folder_name(name, resume=False).encode()) < 255
    assert wide != other  # the hash of the whole name tells them apart
    assert folder_name("d=4,width=8") == "d=4,width=8"  # a short name is kept whole


def test_a_sweep_folder_that_cannot_be_created_is_refused_and_nothing_is_left(
    tmp_path, monkeypatch, capsys
):
    monkeypatch.setenv(SWEEP_DIR_VARIABLE, "")  # the callback sets it: undone after the test
    sweep = tmp_path / "a" / "b" / ("x" * 300)
    with pytest.raises(SystemExit) as refused:
        FixSweepDir().on_multirun_start(OmegaConf.create({"hydra": {"sweep": {"dir": str(sweep)}}}))
    assert refused.value.code == 2
    assert capsys.readouterr().err.strip().endswith("it cannot be created (File name too long)")
    assert list(tmp_path.iterdir()) == []  # a/ and a/b/ made on the way are removed
