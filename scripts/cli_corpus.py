"""An adversarial corpus of command lines for ``python train.py``, run as a new user runs them.

``python scripts/cli_corpus.py [--jobs N] [--timeout S] [--only TEXT ...] [--train PATH]``

Each malformed line runs as a real subprocess ``python train.py <args>`` in a fresh temporary
working directory and is measured against the clean refusal: exit status 2, exactly one line on
stderr that names the key and the value (``names``) and says in parentheses what is allowed, no
traceback, and nothing created in the working directory. Each valid line must exit 0 (and print
its ``[ok]`` summary when it trains). Prints one row per line, then the score
``N of M refused cleanly; K valid lines ran``.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TRAIN = ROOT / "train.py"
# A run that takes a second: the valid lines add these.
TINY = ["d=4", "width=8", "steps=1", "eval_every=1", "batch_size=4", "n_test=100"]
POLY = ["target=polynomial"]
RIDGE = ["model=frozen", "optimizer=ridge", "n_train=100"]
ADAM = ["optimizer=adam"]
LONG = "x" * 300  # a value past the file system's 255 bytes for a folder name


@dataclass
class Case:
    """One command line: its words after ``train.py``, what a refusal must name (default: the
    last ``KEY=VALUE`` word, whole), and the environment it runs in beyond the user's."""

    args: list[str]
    names: tuple[str, ...] = ()
    env: dict[str, str] = field(default_factory=dict)
    trains: bool = True  # a valid line: it prints an [ok] summary

    def culprit(self) -> tuple[str, ...]:
        if self.names:
            return self.names
        overrides = [a for a in self.args if not a.startswith("-")]
        return (overrides[-1],) if overrides else (self.args[-1],)


def c(*args: str, names: tuple[str, ...] = (), **env: str) -> Case:
    return Case(list(args), names, dict(env))


# A 1 GiB (or 4 GiB) Slurm allocation: what the machine check reads besides MemAvailable, so
# that a size impossible on a small node is impossible here too.
SLURM_1G, SLURM_4G = {"SLURM_MEM_PER_NODE": "1024"}, {"SLURM_MEM_PER_NODE": "4096"}

REFUSED = [
    # unknown keys and typos
    c("+foo=1"),
    c("++foo=1"),
    c("+model.widht=5"),
    c("widht=5"),
    c("model.widht=5"),
    c("Width=5"),
    c("optimizer.learning_rate=0.1"),
    c(*POLY, "target.degre=3"),
    c("target.degree=3"),  # the default target (a ReLU neuron) has no degree
    c("vars.ratio=2"),  # a new variable without the +
    c("~width"),
    c("~foo"),
    c("+width=3"),
    c("+experiment=parity_small"),
    c("hydra.foo=1"),
    c("+hydra.foo=1"),
    c("d.x=1"),
    c("vars=3"),
    c("model.kernel=ntk"),  # a key of model=kernel only
    c("width=8", "width=abc"),
    # top-level keys: types and ranges
    c("width=-5"),
    c("width=0"),
    c("width=1.5"),
    c("width=abc"),
    c("width="),
    c("width=null"),
    c("width=true"),
    c("width=[8,16]"),
    c("width={a:1}"),
    c("width=1e3"),
    c("width=0x10"),
    c("d=abc"),
    c("d=0"),
    c("d=-1"),
    c("seed=-1"),
    c("seed=1e100"),
    c("data_seed=-1"),
    c("steps=nan"),
    c("steps=inf"),
    c("steps=0"),
    c("batch_size=0"),
    c("replicas=0"),
    c("n_test=1"),
    c("n_test=0"),
    c("n_train=0"),
    c("n_train=10"),
    c("n_train=abc"),
    c("eval_every=0"),
    c("checkpoint_every=0"),
    c("checkpoint_every_s=0"),
    c("checkpoint_every_s=nan"),
    c("lazy_probe=-1"),
    c("threads=0"),
    c("resume=maybe"),
    c("compile=2"),
    c("resume=2"),
    c("threads=100000"),
    c("device=CPU"),
    c("loss=MSE"),
    c("loss=huber"),
    c("device=tpu"),
    c("device=cuda"),
    c("device=cuda:0"),
    c("backward=fast"),
    c("replica_data=other"),
    c("replica_init=other"),
    c("replicas=3", "replica_init=shared"),
    c("steps_to_error=[0.1,-1]", names=("steps_to_error.1=-1",)),
    c("steps_to_error=abc"),
    # group keys: types and ranges
    c("optimizer.lr=-1"),
    c("optimizer.lr=inf"),
    c("optimizer.lr=0"),
    c("optimizer.lr=nan"),
    c("optimizer.lr=abc"),
    c("optimizer.lr=1e400", names=("optimizer.lr=",)),
    c("optimizer.lr=[0.1,0.2]", names=("optimizer.lr=[0.1, 0.2]",)),
    c("optimizer.lr=[]"),
    c("optimizer.momentum=1.5"),
    c("optimizer.weight_decay=-1"),
    c("optimizer.warmup_steps=-1"),
    c("optimizer.warmup_steps=5000"),
    c("optimizer.grad_clamp=0"),
    c("optimizer.grad_precision=-1"),
    c("optimizer.stochastic_rounding=true", names=("optimizer.stochastic_rounding=",)),
    c("optimizer.schedule=linear"),
    c("optimizer.momentum=0", "optimizer.nesterov=true", names=("optimizer.nesterov",)),
    c(*ADAM, "optimizer.betas=[0.9,1.0]", names=("optimizer.betas", "1.0")),
    c(*ADAM, "optimizer.betas=[0.9]"),
    c(*ADAM, "optimizer.eps=0"),
    c("optimizer=ridge", names=("optimizer", "ridge")),
    c("model=frozen", "optimizer=ridge", names=("n_train",)),
    c(*RIDGE, "optimizer.penalty=-1"),
    c(*RIDGE, "optimizer.penalty=abc"),
    c(*RIDGE, "optimizer.penalty=[]"),
    c(*RIDGE, "optimizer.chunk_size=0"),
    c("model.activation=swish"),
    c("model.parameterization=mup"),
    c("model.init=uniform"),
    c("model.output_init=ones"),
    c("model.bias=maybe"),
    c("model.lazy_scale=-2"),
    c("model.lazy_scale=nan"),
    c("model.width=5"),
    c("model.replicas=3"),
    c("model=kernel", names=("optimizer", "sgd")),
    c("fit=rf_kernel", "n_train=100", "model.activation=tanh"),
    c(*POLY, "target.degree=171"),
    c(*POLY, "target.degree=60"),
    c(*POLY, "target.degree=0"),
    c(*POLY, "target.terms=0"),
    c(*POLY, "d=2", "target.terms=9"),
    c(*POLY, "d=2000", "target.terms=100000000"),
    c("target.norm=-1"),
    c("target.norm=inf"),
    c("target.bias=nan"),
    c("target.bias=1e400", names=("target.bias=",)),
    c("target.norm=1e200", names=("target.norm=",)),
    c("target.bias=-1e300", names=("target.bias=",)),
    c("target=zigzag", "target.a=2"),
    c("target=parity", "target.k=0"),
    c("target=parity", "target.k=40"),
    c("target.seed=-1"),
    c("target.d=5"),
    c("input.name=cube"),
    c("target=nope"),
    c("model=nope"),
    c("optimizer=nope"),
    c("fit=nope"),
    c("experiment=nope"),
    c("input=nope"),
    c("model=Frozen"),
    c("model=null"),
    c("fit=null"),
    c("target=../model/frozen"),
    c("experiment=/etc/passwd"),
    c("fit=rf_population", "n_train=100", names=("n_train", "100")),
    # malformed overrides
    c("width==3"),
    c("width"),
    c("=3"),
    c(""),
    c("width", "=", "3", names=("width",)),
    c("width=[1,2"),
    c("width='3"),
    c('width="3'),
    c("width=(3"),
    c("width=3)"),
    c("d=4 width=8", names=("d='4 width=8'",)),  # one word with a space
    c("width={"),
    c("width=1,,2"),
    c("model=frozen,"),
    c("width=choice()"),
    c("model=${model}"),
    c("width=${width}"),
    c("width=${nope}"),
    c("width=${oc.env:RANDFEAT_NO_SUCH_VARIABLE}"),
    c("width=${oc.env:HOME}"),
    # Hydra's own overrides and flags
    c("hydra.job.chdir=maybe"),
    c("hydra.run.dir=[[["),
    c("hydra/launcher=nope"),
    c("hydra/sweeper=nope"),
    c("hydra.mode=SOMETIMES"),
    c("hydra.run.dir=''", names=("hydra.run.dir",)),
    c(f"hydra.run.dir=outputs/{LONG}", names=("hydra.run.dir", "File name too long")),
    c("hydra.run.dir=/proc/nope", names=("hydra.run.dir=/proc/nope",)),
    c("-m", "d=4,8", "hydra.sweep.dir=''", names=("hydra.sweep.dir",)),
    c("-m", "d=4,8", "hydra.sweep.subdir=same"),
    c("-m", "d=4,8", "hydra/launcher=slurm", names=("hydra/launcher=slurm",)),
    c("-m", "d=4,8", "hydra/launcher=joblib", "hydra.launcher.n_jobs=abc"),
    c("--config-name", "nope", names=("--config-name", "nope")),
    c("--config-name", names=("--config-name",)),
    c("--config-name=", names=("--config-name",)),
    c("-cn", "nope", names=("--config-name", "nope")),
    c("--cfg", "nope", names=("--cfg", "nope")),
    c("--info", "nope", names=("--info", "nope")),
    c("--nope", names=("--nope",)),
    c("--multirun=true", names=("--multirun",)),
    c("--config-path", "nope", names=("--config-path", "nope")),
    c("--config-path", "/tmp", names=("--config-path", "/tmp")),
    c("--config-dir", "/nonexistent", names=("--config-dir", "/nonexistent")),
    c("--experimental-rerun", "nope.pickle", names=("--experimental-rerun", "nope.pickle")),
    c("--experimental-rerun", "/etc/hostname", names=("--experimental-rerun", "/etc/hostname")),
    c("--cfg", "job", "-m", names=("--cfg", "--multirun")),
    c("-r", "-m", "d=4,8", names=("--run", "--multirun")),
    c("--resolve", names=("--resolve",)),
    c("--cfg", "job", "--package", "nope", names=("--package", "nope")),
    # multirun
    c("d=4,8"),
    c("d=4", "-m", "width=8,16", names=("width=8,16",)),
    c("-m", "model=glob(nope*)"),
    c("-m", "width=range(5,1)"),
    c("-m", "width=range(1,5,0)"),
    c("-m", "width=range(1.5,3)", names=("width=1.5",)),
    c("-m", "optimizer.lr=interval(0.1,0.2)"),
    c("-m", "width=choice()"),
    c("-m", "experiment=parity_small", "width=-1"),
    c("-m", "experiment=parity_small,nope", names=("experiment", "nope")),
    c("-m", "d=4,6,0", names=("d=0",)),
    c("-m", "seed=range(-2,2)", names=("seed=-2",)),
    c("-m", "model=frozen,nope", names=("model", "nope")),
    c("-m", "width=8,16", "hydra/sweeper=nope"),
    c("-m", "+model.widht=5,6", names=("+model.widht=5",)),
    c("-m", "compile=0,2", names=("compile=2",)),
    c("-m", "model=frozen,../x", names=("model=../x",)),
    # calc
    c("target.bias=${calc:9**9**9}"),
    c("target.bias=${calc:1e200**2}"),
    c("target.bias='${calc:\"(2**64)**64/3\"}'", names=("target.bias=", "too large")),
    c("target.bias=${calc:1/0}"),
    c("target.bias='${calc:(1+${d})*2}'", names=("target.bias=",)),
    c("width=${calc:2**0.5}"),
    c("width=${calc:-3}", names=("width=-3",)),
    c("width=${calc:}"),
    c("width=${calc:abc}"),
    c("width='${calc:\"__import__(1)\"}'", names=("width=", "not plain arithmetic")),
    # impossible sizes (here, or on a small Slurm allocation)
    c("d=4096", "batch_size=2000000", "width=1024", names=("batch_size=2000000",)),
    c(*POLY, "d=60", "target.degree=3", "target.terms=37820", "n_test=1000000", **SLURM_1G),
    c("target=parity", "d=200000", **SLURM_4G),
    c("target=parity", "d=200000", "n_test=100000", names=("=200000",)),
    c("fit=rf_kernel", "n_train=200000"),
    c(*RIDGE, "width=100000"),
    c("width=99999999999"),
    c("replicas=100000000"),
    c("n_test=1000000000000"),
    c("d=100000000000000000000"),
]

VALID = [
    Case(TINY),
    Case(["--config-name", "train", *TINY]),
    Case(["model=frozen", *TINY]),
    Case(["model=frozen.yaml", *TINY]),  # Hydra reads the file name too
    Case([*ADAM, "optimizer.lr=0.01", *TINY]),
    Case(["fit=rf_ridge", "n_train=50", *TINY]),
    Case([*POLY, "target.degree=2", "target.terms=3", *TINY]),
    Case(["+vars.ratio=2", "width='${calc:${vars.ratio}*4}'", *TINY[:1], *TINY[2:]]),
    Case(["target.bias='${calc:\"-(${d}+1)/2\"}'", *TINY]),
    Case(["++width=8", *TINY[:1], *TINY[2:]]),
    Case(["hydra.mode=MULTIRUN", "model=frozen,trainable", *TINY]),  # a sweep without -m
    Case(["compile=0", "resume=yes", *TINY]),  # booleans in OmegaConf's words
    Case(["-m", "model=frozen,trainable", *TINY]),
    Case(["-m", f"+vars.label={LONG},short", *TINY]),  # a folder name past 255 bytes
    Case(["--help"], trains=False),
    Case(["--cfg", "job", "width=8"], trains=False),
]


@dataclass
class Outcome:
    case: Case
    rc: int | None
    stdout: str
    stderr: str
    created: list[str]

    def faults(self, valid: bool) -> list[str]:
        """What keeps this outcome from being clean (a refusal) or a run (a valid line)."""
        text = self.stdout + self.stderr
        faults = ["timeout"] if self.rc is None else []
        if "Traceback" in text:
            faults.append("traceback")
        if valid:
            if self.rc not in (0, None):
                faults.append(f"exit {self.rc}")
            if self.case.trains and "[ok]" not in self.stdout:
                faults.append("no [ok] line")
            return faults
        lines = self.stderr.strip().splitlines()
        if self.rc not in (2, None):
            faults.append(f"exit {self.rc}")
        if len(lines) != 1:
            faults.append(f"{len(lines)} stderr lines")
        line = lines[-1] if lines else ""
        missing = [n for n in self.case.culprit() if n not in line]
        if missing:
            faults.append(f"does not name {' '.join(missing)}")
        if not re.search(r"\(.+\)", line):
            faults.append("no reason in parentheses")
        if self.created:
            faults.append(f"created {', '.join(self.created)}")
        return faults


def run_case(case: Case, timeout: float, train: Path = TRAIN) -> Outcome:
    """Run ``python train.py <args>`` in a fresh temporary working directory."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HYDRA_", "SLURM_"))}
    env |= case.env
    with tempfile.TemporaryDirectory(prefix="cli_corpus_") as cwd:
        process = subprocess.Popen(
            [sys.executable, str(train), *case.args],
            cwd=cwd,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        try:
            stdout, stderr = process.communicate(timeout=timeout)
            rc: int | None = process.returncode
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, 9)  # the process group this call started
            stdout, stderr = process.communicate()
            rc = None
        return Outcome(case, rc, stdout, stderr, sorted(os.listdir(cwd)))


def shown(args: list[str], width: int = 60) -> str:
    text = " ".join(repr(a) if a == "" or " " in a else a for a in args) or "(nothing)"
    return text if len(text) <= width else text[: width - 3] + "..."


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=2, help="cases run at once")
    parser.add_argument("--timeout", type=float, default=60, help="seconds per case")
    parser.add_argument("--only", nargs="*", default=[], help="only lines holding one of these")
    parser.add_argument("--train", type=Path, default=TRAIN, help="another checkout's train.py")
    args = parser.parse_args()
    cases = [(False, c) for c in REFUSED] + [(True, c) for c in VALID]
    if args.only:
        cases = [(v, c) for v, c in cases if any(o in " ".join(c.args) for o in args.only)]
    with ThreadPoolExecutor(args.jobs) as pool:
        outcomes = list(pool.map(lambda vc: run_case(vc[1], args.timeout, args.train), cases))
    clean = ran = 0
    for (valid, case), outcome in zip(cases, outcomes, strict=True):
        faults = outcome.faults(valid)
        clean += not valid and not faults
        ran += valid and not faults
        verdict = ("ran" if valid else "clean") if not faults else "; ".join(faults)
        last = (outcome.stderr.strip().splitlines() or [""])[-1]
        said = outcome.stdout.strip().splitlines()[-1:] if valid else [last]
        print(
            f"{'valid' if valid else 'bad'}\t{shown(case.args)}\t{verdict}\t{''.join(said)[:240]}"
        )
    refused = sum(not v for v, _ in cases)
    print(
        f"{clean} of {refused} refused cleanly; {ran} valid lines ran (of {len(cases) - refused})"
    )


if __name__ == "__main__":
    main()
