"""A malformed command line, Hydra's own overrides and flags included, is refused before Hydra
creates anything: exit status 2 and one sentence on stderr that names the key and the value,
no traceback, no folder. The valid forms next to each one still run."""

from __future__ import annotations

import os
import sys

import hydra
import pytest
from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf

from randfeat_torch import device
from randfeat_torch.cli import CheckRunDir, FixSweepDir, precheck, run
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

RIDGE = ["model=frozen", "optimizer=ridge", "n_train=100"]
# The malformed lines of scripts/cli_corpus.py that no other test refuses (test_config.py's bad
# values and test_device.py's sizes are there): each one's sentence, or the part that says why.
CORPUS = [
    # keys that nothing reads
    (["model.widht=5"], "model.widht=5 (no such key; the nearest is model.width)"),
    (["Width=5"], "Width=5 (no such key; the nearest is width)"),
    (["optimizer.learning_rate=0.1"], "optimizer.learning_rate=0.1 (no such key; new variables"),
    (["target=polynomial", "target.degre=3"], "target.degre=3 (no such key; the nearest is target"),
    (
        ["target.degree=3"],
        "target.degree=3 (no such key in this target; it belongs to target=polynomial: choose it "
        "too, as target=polynomial target.degree=3)",
    ),
    (["vars.ratio=2"], "vars.ratio=2 (no such key; new variables go under vars, as +vars.ratio=2)"),
    (["model.kernel=ntk"], "model.kernel=ntk (no such key in this model; it belongs to model=kern"),
    (
        ["-m", "optimizer.betas=[0.9,0.99]", "d=4,8"],
        "optimizer.betas=[0.9,0.99] (no such key in this optimizer; it belongs to optimizer=adam:",
    ),
    (["d.x=1"], "d.x=1 (no such key: d holds a value, not keys; set it as d=VALUE)"),
    (["vars=3"], "vars=3 (holds keys, not a value: set one of them, as +vars.NAME=3)"),
    # top-level values: types and ranges
    (["width=0"], "width=0 (must be an integer >= 1)"),
    (["width=1.5"], "width=1.5 (Value '1.5' of type 'float' could not be converted to Integer)"),
    (["width=abc"], "width=abc (Value 'abc' of type 'str' could not be converted to Integer)"),
    (["width=8", "width=abc"], "width=abc (Value 'abc' of type 'str' could not be converted to"),
    (["width="], "width='' (Value '' of type 'str' could not be converted to Integer)"),
    (["width=null"], "width=null (cannot be null; allowed: a value of its type, which --cfg job"),
    (["width=true"], "width=true (Value 'True' of type 'bool' could not be converted to Integer)"),
    (["width=[8,16]"], "width=[8,16] (Value '[8, 16]' of type 'list' could not be converted to"),
    (["width={a:1}"], "width={a:1} (Value '{'a': 1}' of type 'dict' could not be converted to"),
    (["width=1e3"], "width=1e3 (Value '1000.0' of type 'float' could not be converted to Integer)"),
    (["width=0x10"], "width=0x10 (Value '0x10' of type 'str' could not be converted to Integer)"),
    (["d=abc"], "d=abc (Value 'abc' of type 'str' could not be converted to Integer)"),
    (["d=-1"], "d=-1 (must be an integer >= 1)"),
    (["seed=-1"], "seed=-1 (must be an integer >= 0)"),
    (["seed=1e100"], "seed=1e100 (Value '1e+100' of type 'float' could not be converted to"),
    (["data_seed=-1"], "data_seed=-1 (must be an integer >= 0)"),
    (["steps=nan"], "steps=nan (Value 'nan' of type 'float' could not be converted to Integer)"),
    (["steps=inf"], "steps=inf (Value 'inf' of type 'float' could not be converted to Integer)"),
    (["n_test=0"], "n_test=0 (must be an integer >= 2 so that the test targets have a variance)"),
    (["n_train=0"], "n_train=0 (must be an integer >= 1)"),
    (["n_train=abc"], "n_train=abc (Value 'abc' of type 'str' could not be converted to Integer)"),
    (["checkpoint_every=0"], "checkpoint_every=0 (must be an integer >= 1)"),
    (["checkpoint_every_s=0"], "checkpoint_every_s=0.0 (must be a finite number > 0)"),
    (["checkpoint_every_s=nan"], "checkpoint_every_s=nan (must be a finite number > 0)"),
    (["threads=0"], "threads=0 (must be an integer >= 1)"),
    (["threads=100000"], "threads=100000 (must be in 1..1024: torch starts that many threads,"),
    (["resume=maybe"], "resume=maybe (Value 'maybe' is not a valid bool (type str))"),
    (["compile=2"], "compile=2 (must be a boolean; allowed: true, false)"),  # OmegaConf: true
    (["resume=2"], "resume=2 (must be a boolean; allowed: true, false)"),
    (["-m", "compile=0,2"], "compile=2 (must be a boolean; allowed: true, false)"),
    (["device=CPU"], "device=CPU (allowed: auto, cpu, cuda)"),
    (["device=cuda:0"], "device=cuda:0 (allowed: auto, cpu, cuda)"),
    (["loss=MSE"], "loss=MSE (allowed: mse, hinge, logistic)"),
    (["replica_data=other"], "replica_data=other (allowed: shared, independent)"),
    (["steps_to_error=abc"], "steps_to_error=abc (must be a list, written in brackets:"),
    # the groups' values
    (["optimizer.lr=-1"], "optimizer.lr=-1 (must be a finite number > 0)"),
    (["optimizer.lr=inf"], "optimizer.lr=inf (must be a finite number > 0)"),
    (["optimizer.lr=1e400"], "optimizer.lr=inf (must be a finite number > 0)"),
    (["optimizer.lr=abc"], "optimizer.lr=abc (must be a finite number > 0)"),
    (["optimizer.lr=[0.1,0.2]"], "optimizer.lr=[0.1, 0.2] (a list needs one rate per replica: 1"),
    (["optimizer.lr=[]"], "optimizer.lr=[] (a list needs one rate per replica: 1 number)"),
    (["optimizer.warmup_steps=-1"], "optimizer.warmup_steps=-1 (must be an integer >= 0)"),
    (["optimizer.grad_clamp=0"], "optimizer.grad_clamp=0.0 (must be a finite number > 0)"),
    (["optimizer.grad_precision=-1"], "optimizer.grad_precision=-1 (must be a finite number > 0)"),
    (["optimizer.stochastic_rounding=true"], "(needs optimizer.grad_precision to be set)"),
    (["optimizer.schedule=linear"], "optimizer.schedule=linear (allowed: constant, cosine)"),
    (
        ["optimizer.momentum=0", "optimizer.nesterov=true"],
        "optimizer.nesterov=True (needs optimizer.momentum > 0)",
    ),
    (["optimizer=adam", "optimizer.betas=[0.9,1.0]"], "optimizer.betas[1]=1.0 (must be in [0, 1))"),
    (["optimizer=adam", "optimizer.betas=[0.9]"], "optimizer.betas=[0.9] (must be two numbers)"),
    (["optimizer=adam", "optimizer.eps=0"], "optimizer.eps=0.0 (must be a finite number > 0)"),
    (["optimizer=ridge"], "optimizer=ridge (fits only a model that is linear in its trained"),
    ([*RIDGE, "optimizer.penalty=abc"], "penalty=abc (must be a number >= 0, a list of"),
    ([*RIDGE, "optimizer.penalty=[]"], "penalty=[] (a penalty path needs at least one"),
    (
        [*RIDGE, "optimizer.chunk_size=0"],
        "optimizer.chunk_size=0 (must be an integer >= 1)",
    ),
    (["model.init=uniform"], "model.init=uniform (allowed: gaussian, sphere)"),
    (["model.output_init=ones"], "model.output_init=ones (allowed: gaussian, zero)"),
    (["model.bias=maybe"], "model.bias=maybe (Value 'maybe' is not a valid bool (type str))"),
    (["model.lazy_scale=nan"], "model.lazy_scale=nan (must be a finite number > 0)"),
    (["model.width=5"], "model.width=5 (must equal width=1024; set width instead)"),
    (["model.replicas=3"], "model.replicas=3 (must equal replicas; set that)"),
    (["model=kernel"], "optimizer=sgd (model=kernel is fitted in closed form: use optimizer=ridge"),
    (["fit=rf_kernel", "model.activation=tanh"], "model.activation=tanh (model=kernel needs a"),
    (["target=polynomial", "target.degree=171"], "target.degree=171 (must be in 1..7 for d=32"),
    (["target=polynomial", "target.terms=0"], "target.terms=0 (must be an integer >= 1)"),
    (["target=polynomial", "d=2", "target.terms=9"], "target.terms=9 (must be <= 3, the number of"),
    (
        ["target=polynomial", "d=2000", "target.terms=100000000"],
        "target.terms=100000000 (must be <= 2001000, the number of distinct monomials of degree 2",
    ),
    (["target.norm=inf"], "target.norm=inf (must be a finite number > 0)"),
    (["target.norm=1e200"], "target.norm=1e+200 (must be a finite number in (0, 1e15]: the labels"),
    (["target.bias=nan"], "target.bias=nan (must be a finite number in [-1e15, 1e15]: the labels"),
    (["target.bias=1e400"], "target.bias=inf (must be a finite number in [-1e15, 1e15]"),
    (["target.bias=-1e300"], "target.bias=-1e+300 (must be a finite number in [-1e15, 1e15]"),
    (["target=zigzag", "target.a=2"], "target.a=2 (must be an odd integer >= 1, so that psi_a"),
    (["target=parity", "target.k=0"], "target.k=0 (must be an integer >= 1)"),
    (["target=parity", "target.k=40"], "target.k=40 (must be <= d=32)"),
    (["target.seed=-1"], "target.seed=-1 (must be an integer >= 0)"),
    (["input.name=cube"], "input.name=cube (allowed: gaussian, sphere, hypercube)"),
    (["fit=rf_population", "n_train=100"], "n_train=100 (optimizer.population=true draws no"),
    # the groups' options: a name of one of the group's files, not a path nor null
    (["target=nope"], "target=nope (allowed: parity, parity_k2, polynomial, relu_neuron,"),
    (["optimizer=nope"], "optimizer=nope (allowed: adam, ridge, sgd)"),
    (["fit=nope"], "fit=nope (allowed: nn_bsgd_nearest, nn_bsgd_stochastic, nn_sgd,"),
    (["experiment=nope"], "experiment=nope (allowed: bsgd_precision, bsgd_precision_small,"),
    (["input=nope"], "input=nope (allowed: gaussian, hypercube, sphere)"),
    (["model=Frozen"], "model=Frozen (allowed: frozen, kernel, linearized, trainable)"),
    (["model=null"], "model=null (a config group takes one of its options, not null; allowed:"),
    (["fit=null"], "fit=null (a config group takes one of its options, not null; allowed:"),
    (["target=../model/frozen"], "target=../model/frozen (allowed: parity, parity_k2,"),
    (["experiment=/etc/passwd"], "experiment=/etc/passwd (allowed: bsgd_precision,"),
    (["-m", "model=frozen,../x"], "model=../x (allowed: frozen, kernel, linearized, trainable)"),
    # overrides that are not KEY=VALUE, or whose value Hydra's grammar cannot read
    ([""], "invalid config: '' (no key: an override is KEY=VALUE)"),
    (["width", "=", "3"], "width (no value: write width=VALUE, or ~width to delete it)"),
    (["width=[1,2"], "width=[1,2 (Hydra's override grammar cannot read the value: no viable"),
    (["width='3"], "width='3 (Hydra's override grammar cannot read the value: a character it"),
    (['width="3'], "width=\"3 (Hydra's override grammar cannot read the value: a character it"),
    (["width=(3"], "width=(3 (Hydra's override grammar cannot read the value: extraneous input"),
    (["width=3)"], "width=3) (Hydra's override grammar cannot read the value: extraneous input"),
    (["d=4 width=8"], "d='4 width=8' (Hydra's override grammar cannot read the value: mismatched"),
    (["width={"], "width={ (Hydra's override grammar cannot read the value: no viable"),
    (["width=1,,2"], "width=1,,2 (Hydra's override grammar cannot read the value: extraneous"),
    (["model=frozen,"], "model=frozen, (Hydra's override grammar cannot read the value:"),
    (["width=${width}"], "width=${width} (Recursive interpolation detected)"),
    (["width=${nope}"], "width=${nope} (Interpolation key 'nope' not found)"),
    (["width=${oc.env:RANDFEAT_UNSET}"], "(\"Environment variable 'RANDFEAT_UNSET' not found\")"),
    (["width=${oc.env:PATH}"], "width=${oc.env:PATH} (While dereferencing interpolation"),
    # Hydra's own overrides and flags
    (["hydra/sweeper=nope"], "hydra/sweeper=nope (allowed: basic, optuna)"),
    (["hydra.mode=SOMETIMES"], "hydra.mode=SOMETIMES (allowed: RUN, MULTIRUN)"),
    (
        ["-m", "d=4,8", "hydra/launcher=joblib", "hydra.launcher.n_jobs=abc"],
        "hydra.launcher.n_jobs=abc (Value 'abc' of type 'str' could not be converted to Integer)",
    ),
    (
        ["-m", "d=4,8", "hydra.sweep.subdir=same"],
        "hydra.sweep.subdir=same (the 2 jobs of this sweep would share one folder, where each",
    ),
    (["--config-name"], "argument --config-name/-cn: expected one argument (write --config-name"),
    (["--config-name="], "--config-name='' (allowed: train)"),
    (["-cn", "nope"], "--config-name=nope (allowed: train)"),
    (["--info", "nope"], "argument --info/-i: invalid choice: 'nope' (choose from 'all',"),
    (["--nope"], "unrecognized arguments: --nope (the flags, such as -m, go before or after"),
    (["--multirun=true"], "ignored explicit argument 'true' (the flag takes no value: write"),
    (["--config-path", "nope"], "--config-path=nope (no such folder: "),
    (["--config-path", "/"], "--config-path=/ (/ holds no train.yaml)"),
    (["--config-dir", "/nonexistent"], "--config-dir=/nonexistent (no such folder)"),
    (["--experimental-rerun", "nope.pickle"], "--experimental-rerun=nope.pickle (no such file;"),
    (["--cfg", "job", "-m"], "--multirun --cfg (only one of --run, --multirun, --cfg, --info,"),
    (["-r", "-m", "d=4,8"], "--run --multirun (only one of --run, --multirun, --cfg, --info,"),
    (["--resolve"], "--resolve (only with --cfg, as --cfg job --resolve)"),
    (["--cfg", "job", "--package", "nope"], "--package=nope (no such key in --cfg job; allowed:"),
    # sweeps
    (["-m", "width=range(1,5,0)"], "width=range(1,5,0) (cannot be expanded: range() arg 3 must"),
    (["-m", "width=range(1.5,3)"], "width=1.5 (Value '1.5' of type 'float' could not be"),
    (["-m", "width=choice()"], "width=choice() (choice() cannot be expanded: empty choice is not"),
    (["-m", "experiment=parity_small", "width=-1"], "width=-1 (must be an integer >= 1)"),
    (["-m", "experiment=parity_small,nope"], "experiment=nope (allowed: bsgd_precision,"),
    (["-m", "d=4,6,0"], "d=0 (must be an integer >= 1)"),
    (["-m", "seed=range(-2,2)"], "seed=-2 (must be an integer >= 0)"),
    (["-m", "model=frozen,nope"], "model=nope (allowed: frozen, kernel, linearized, trainable)"),
    (["-m", "width=8,16", "hydra/sweeper=nope"], "hydra/sweeper=nope (allowed: basic, optuna)"),
    # calc
    (["width=${calc:2**0.5}"], "Value '1.4142135623730951' of type 'float' could not be"),
    (["width=${calc:-3}"], "width=-3 (must be an integer >= 1)"),
    (["width=${calc:}"], "width=${calc:} (calc: no expression; write one after the colon"),
    (["width=${calc:abc}"], "width=${calc:abc} (calc: abc is not plain arithmetic: numbers,"),
    (["width='${calc:\"__import__(1)\"}'"], "(calc: __import__(1) is not plain arithmetic"),
]


@pytest.mark.parametrize(
    ("argv", "sentence"), REFUSED + CORPUS, ids=[" ".join(a) for a, _ in REFUSED + CORPUS]
)
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


GIB = 2**30


@pytest.mark.parametrize(
    ("argv", "sentence"),
    [
        (["fit=rf_kernel", "n_train=200000"], "n_train=200000 (kernel ridge on 200000 samples"),
        (
            [*RIDGE, "width=100000"],
            "width=100000 (ridge on 100000 features x 1 replica needs about 224 GiB for its "
            "float64 Gram matrices, more than half of the 16 GiB available here; use a smaller",
        ),
        (["width=99999999999"], "width=99999999999 (this run needs about 1.03e+06 GiB, more than"),
        (["replicas=100000000"], "replicas=100000000 (this run needs about 1.15e+06 GiB"),
        (["n_test=1000000000000"], "n_test=1000000000000 (this run needs about 1.3e+05 GiB"),
        (["d=100000000000000000000"], "d=100000000000000000000 (this run needs about 6.11e+15"),
        (
            ["target=parity", "d=200000", "n_test=100000"],
            "d=200000 (this run needs about 79.5 GiB, more than the 16 GiB available here; d <= ",
        ),
    ],
)
def test_impossible_sizes_are_refused_naming_the_key(tmp_path, monkeypatch, capsys, argv, sentence):
    """The corpus's sizes that no machine of 16 GiB holds (test_device.py has the others)."""
    monkeypatch.setattr(device, "free_memory", lambda name: (16 * GIB, "available here"))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as refused:
        precheck(argv)
    err = capsys.readouterr().err.strip()
    assert refused.value.code == 2 and err.startswith(f"invalid config: {sentence}")
    assert "\n" not in err and list(tmp_path.iterdir()) == []


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
    ["hydra.mode=MULTIRUN", "model=frozen,trainable"],  # a sweep without -m, as Hydra runs it
    ["compile=0", "resume=yes", "progress=1"],  # booleans in OmegaConf's words
    ["threads=1024", "target.norm=1e15", "target.bias=-1e15"],  # the bounds themselves
    ["--cfg", "job", "--package", "model"],
    ["-m", "model=frozen.yaml", "target=zigzag.yaml,parity"],  # Hydra reads the file names too
    ["--cfg", "hydra", "--package", "hydra.run"],
    ["--config-path", "configs"],  # the folder of train.yaml, relative to train.py's
    ["-m", "d=4,8", "hydra.sweep.subdir=${hydra.job.num}"],
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


def hydra_node(**node) -> OmegaConf:
    """The part of a run's config that the output-dir callbacks read."""
    return OmegaConf.create({"hydra": {"overrides": {"hydra": []}, **node}})


def refusal(callback, config, capsys) -> str:
    with pytest.raises(SystemExit) as refused:
        callback(config)
    assert refused.value.code == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err
    return err


def test_an_empty_output_dir_is_refused_naming_the_key(tmp_path, monkeypatch, capsys):
    """hydra.run.dir='' would put the run's files among the working directory's."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv(SWEEP_DIR_VARIABLE, "")  # the callback sets it: undone after the test
    run_dir = hydra_node(run={"dir": ""}, overrides={"hydra": ["hydra.run.dir=''"]})
    assert refusal(CheckRunDir().on_run_start, run_dir, capsys) == (
        "invalid config: hydra.run.dir='' (an empty folder puts the run's files among the working "
        "directory's; allowed: a folder, as hydra.run.dir=outputs/mine, or hydra.run.dir=. to "
        "mean this one)"
    )
    sweep = hydra_node(sweep={"dir": ""}, overrides={"hydra": ["hydra.sweep.dir=''"]})
    assert refusal(FixSweepDir().on_multirun_start, sweep, capsys).startswith(
        "invalid config: hydra.sweep.dir='' (an empty folder puts"
    )
    assert list(tmp_path.iterdir()) == []


def test_an_output_dir_set_on_the_command_line_is_refused_naming_the_key(
    tmp_path, monkeypatch, capsys
):
    """A folder name past 255 bytes: the key, the folder and the file system's reason, and no
    folder left behind; derived from the overrides, it is named by its folder alone."""
    run_dir = tmp_path / "a" / ("x" * 300)
    typed = hydra_node(run={"dir": str(run_dir)}, overrides={"hydra": [f"hydra.run.dir={run_dir}"]})
    assert refusal(CheckRunDir().on_run_start, typed, capsys) == (
        f"invalid config: hydra.run.dir={run_dir} (the folder cannot be created: File name too "
        "long; allowed: a folder that can be written)"
    )
    derived = hydra_node(run={"dir": str(run_dir)})
    assert refusal(CheckRunDir().on_run_start, derived, capsys) == (
        f"cannot write the outputs of this run in {run_dir}: it cannot be created (File name too "
        "long)"
    )
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("cluster", [False, True])
def test_a_slurm_sweep_without_a_cluster_is_refused_before_its_folder(
    tmp_path, monkeypatch, capsys, cluster
):
    """sinfo answers, or the sweep is refused with its reason, before the sweep folder exists
    (submitit's first sbatch would fail after it, with a traceback)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fail = 'echo "sinfo: fatal: Could not establish a configuration source" >&2; exit 1'
    (bin_dir / "sinfo").write_text(f"#!/bin/sh\n{'echo debug' if cluster else fail}\n")
    (bin_dir / "sinfo").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    monkeypatch.setenv(SWEEP_DIR_VARIABLE, "")
    sweep = tmp_path / "sweep"
    config = hydra_node(
        sweep={"dir": str(sweep)},
        launcher={"_target_": "hydra_plugins.randfeat_slurm.SlurmLauncher"},
        runtime={"choices": {"hydra/launcher": "slurm"}},
    )
    if cluster:
        FixSweepDir().on_multirun_start(config)
        assert sweep.is_dir()
        return
    assert refusal(FixSweepDir().on_multirun_start, config, capsys) == (
        "invalid config: hydra/launcher=slurm (no Slurm cluster answers here: Could not establish "
        "a configuration source; allowed: another hydra/launcher, or this command where sinfo "
        "answers, on a login node or with the SLURM_CONF that scripts/slurm_local.sh start prints)"
    )
    assert not sweep.exists()
