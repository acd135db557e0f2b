"""Every command that README.md and docs/*.md show still runs: each ``python train.py ...``
(and ``randfeat-train ...``) line, in a code block or inline code, passes the command line's own
check (:func:`randfeat_torch.cli.precheck`: every job of a sweep composed and validated, nothing
trained), or is refused with the sentence the docs print; each ``make`` target and script
exists; each relative link and image points to a file (and a heading, for ``#anchor``)."""

from __future__ import annotations

import ast
import re
import shlex
from dataclasses import dataclass
from pathlib import Path

import pytest

from randfeat_torch import api, cli, device
from randfeat_torch.cli import load_config
from randfeat_torch.paths import CONFIG_DIR, SWEEP_DIR_VARIABLE, sweep_name
from randfeat_torch.sweeps import hydra_configs, is_hydra_override, primary_config
from tests.conftest import ROOT

DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```([^\n]*)\n(.*?)^```", re.M | re.S)
INLINE = re.compile(r"`((?:[^`\n]|\n(?![ \t]*\n))+)`")  # may wrap within a paragraph
LINK = re.compile(r"\]\(([^)\s]+)\)")
# A template, not a command: `...`, or a placeholder in capitals (experiment=NAME, KEY=v1,v2).
TEMPLATE = re.compile(r"\.\.\.|\b[A-Z][A-Z_]{2,}\b")
SHELL = re.compile(r"python\S* \S+\.py|randfeat-train|\bmake [a-z]")  # a shell command
VALUE_FLAGS = ("-c", "--cfg", "-p", "--package", "-i", "--info")  # Hydra flags with a value


@dataclass
class Command:
    where: str  # file:line
    argv: list[str]  # the words after ``train.py`` (or ``randfeat-train``), as a shell splits
    refused: str | None = None  # the docs say it is refused: their sentence, or "" for any


def snippets(text: str) -> list[tuple[int, str, str | None]]:
    """(line, command text, expected output) of each line of each code block (a trailing ``\\``
    continues it; ``$ `` prompts are dropped, the next line is their output), and of each
    inline code span ("" as expected output where the prose goes on ``is refused``)."""
    found = []
    for block in FENCE.finditer(text):
        if block[1] == "python":
            continue  # see python_blocks
        first = text.count("\n", 0, block.start(2)) + 1
        lines = block[2].split("\n")
        i = 0
        while i < len(lines):
            start, line = i, lines[i]
            while line.endswith("\\") and i + 1 < len(lines):
                i += 1
                line = line[:-1] + " " + lines[i]
            i += 1
            output = None
            if line.startswith("$ "):
                line = line[2:]
                if i < len(lines) and not lines[i].startswith("$ "):
                    output = lines[i]
            found.append((first + start, line, output))
    prose = FENCE.sub(lambda m: "\n" * m.group(0).count("\n"), text)
    for span in INLINE.finditer(prose):
        refused = "" if prose[span.end() :].lstrip().startswith("is refused") else None
        found.append((prose.count("\n", 0, span.start()) + 1, " ".join(span[1].split()), refused))
    return found


def words(text: str) -> list[str]:
    """``text`` split as the shell splits it (a ``\\$`` in double quotes is a ``$``)."""
    return [w.replace("\\$", "$") for w in shlex.split(text, comments=True)]


def doc_commands() -> tuple[list[Command], list[tuple[str, str]], list[tuple[str, str]]]:
    """The docs' train.py commands, their ``make`` targets and their ``python <script>.py``
    scripts (with where each is)."""
    commands, targets, scripts = [], [], []
    for doc in DOCS:
        for line, text, output in snippets(doc.read_text()):
            where = f"{doc.relative_to(ROOT)}:{line}"
            if not SHELL.search(text):
                continue  # YAML, Python, a key or a value
            split = words(text)
            for i, word in enumerate(split):
                if word in ("train.py", "randfeat-train") and (i == 0 or "python" in split[i - 1]):
                    commands.append(Command(where, split[i + 1 :], output))
                    break
                if word == "make" and i + 1 < len(split) and re.fullmatch(r"[a-z-]+", split[i + 1]):
                    targets.append((where, split[i + 1]))
                if "python" in word and i + 1 < len(split) and split[i + 1].endswith(".py"):
                    scripts.append((where, split[i + 1]))
    return commands, targets, scripts


def distinct(commands: list[Command]) -> list[Command]:
    """One of each command that is not a template, with every place it is shown."""
    found: dict[tuple, Command] = {}
    for c in commands:
        if not TEMPLATE.search(" ".join(c.argv)):
            key = (*c.argv, c.refused)
            if key in found:
                found[key].where += f", {c.where}"
            else:
                found[key] = Command(c.where, c.argv, c.refused)
    return list(found.values())


COMMANDS, TARGETS, SCRIPTS = doc_commands()
RUNNABLE = distinct(COMMANDS)


def precheck_argv(argv: list[str]) -> list[str]:
    """The command line without Hydra's flags that print instead of running (``--cfg job``),
    which :func:`cli.precheck` would pass without a check."""
    kept, skip = [], False
    for i, arg in enumerate(argv):
        if skip:
            skip = False
        elif arg.startswith(VALUE_FLAGS) and arg not in ("-m", "--multirun"):
            skip = "=" not in arg and i + 1 < len(argv) and "=" not in argv[i + 1]
        else:
            kept.append(arg)
    return kept


def test_the_docs_show_commands_of_every_kind():
    templates = [c for c in COMMANDS if TEMPLATE.search(" ".join(c.argv))]
    assert len(RUNNABLE) >= 25 and len(templates) <= 5  # a template is not checked: a few
    assert any("-m" in c.argv for c in RUNNABLE) and any(c.refused for c in RUNNABLE)
    assert any(c.refused == "" for c in RUNNABLE)  # refused in the prose
    assert {"train", "test", "help", "aggregate"} <= {target for _, target in TARGETS}


@pytest.mark.parametrize("command", RUNNABLE, ids=[c.where for c in RUNNABLE])
def test_every_documented_command_passes_the_command_lines_check(command, monkeypatch, capsys):
    # The machine (CUDA, free memory) is the business of the machine that runs the job.
    monkeypatch.setattr(device, "check_machine", lambda cfg: None)
    monkeypatch.delenv(SWEEP_DIR_VARIABLE, raising=False)
    shown = f"{command.where}: python train.py {shlex.join(command.argv)}"
    preset = re.fullmatch(r"-m experiment=(\w+)", " ".join(command.argv))
    if preset:  # tests/test_presets.py composes and validates every job of every preset
        assert (CONFIG_DIR / "experiment" / f"{preset[1]}.yaml").is_file(), f"{shown}: no preset"
        return
    try:
        cli.precheck(precheck_argv(command.argv))
    except SystemExit as refused:  # status 2 and one sentence on stderr
        assert refused.code == 2, shown
        sentence = capsys.readouterr().err.strip()
        assert command.refused is not None, f"{shown} is refused: {sentence}"
        assert sentence.startswith("invalid config: ") and sentence.endswith(command.refused)
    else:
        assert command.refused is None, f"{shown} passes the check, but the docs say it fails"


def python_calls(name: str) -> list[tuple[str, list, dict]]:
    """Calls of ``name`` (``run``, ``load_sweep``) in the docs' Python code blocks whose
    arguments are literals: (where, positional arguments, keyword arguments)."""
    calls = []
    for doc in DOCS:
        text = doc.read_text()
        for block in FENCE.finditer(text):
            if block[1] != "python":
                continue
            first = text.count("\n", 0, block.start(2)) + 1
            for node in ast.walk(ast.parse(block[2])):
                if not (isinstance(node, ast.Call) and ast.unparse(node.func) == name):
                    continue
                try:
                    args = [ast.literal_eval(a) for a in node.args]
                    values = {}
                    for k in node.keywords:  # name=value, or **{"a.b": value}
                        value = ast.literal_eval(k.value)
                        values.update({k.arg: value} if k.arg else value)
                except ValueError:
                    continue  # computed (d=d in a loop)
                calls.append((f"{doc.relative_to(ROOT)}:{first + node.lineno - 1}", args, values))
    return calls


RUN_CALLS = python_calls("run")


def test_the_docs_show_run_and_load_sweep():
    assert len(RUN_CALLS) >= 3 and python_calls("load_sweep")


@pytest.mark.parametrize(("where", "args", "values"), RUN_CALLS, ids=[w for w, *_ in RUN_CALLS])
def test_every_documented_run_call_composes_and_validates(where, args, values):
    load_config(api.overrides_of(tuple(args), values))  # a bad value or a sweep: ConfigError


def task_of(argv: list[str]) -> list[str]:
    """Hydra's ``hydra.overrides.task`` of a command line: its overrides but Hydra's own."""
    return [a for a in argv if not a.startswith("-") and not is_hydra_override(a)]


def sweep_dir(argv: list[str]) -> Path:
    """The folder ``python train.py -m <argv>`` writes its sweep to (relative, as the docs):
    ``hydra.sweep.dir`` of the config Hydra starts a multirun from, whose ``overrides.task``
    holds the whole command line."""
    with hydra_configs() as parser:
        cfg = primary_config(parser, [a for a in argv if not a.startswith("-")])
        cfg.hydra.overrides.task = task_of(argv)
        return Path(cfg.hydra.sweep.dir)


def test_every_documented_sweep_folder_is_the_folder_a_documented_sweep_writes(monkeypatch):
    monkeypatch.delenv(SWEEP_DIR_VARIABLE, raising=False)
    shown = [(where, Path(args[0])) for where, args, _ in python_calls("load_sweep")]
    for doc in DOCS:
        for line, text, _ in snippets(doc.read_text()):
            if "aggregate.py outputs/" in text and not TEMPLATE.search(text):
                folder = next(w for w in words(text) if w.startswith("outputs/"))
                shown.append((f"{doc.relative_to(ROOT)}:{line}", Path(folder)))
    assert len(shown) >= 3
    sweeps = [c.argv for c in RUNNABLE if "-m" in c.argv]
    for where, folder in shown:
        # the sweeps named as the folder is (paths.sweep_name), then their whole folder
        named = [a for a in sweeps if sweep_name(task_of(a)) == folder.name]
        assert folder in [sweep_dir(a) for a in named], (
            f"{where}: no documented sweep writes {folder}"
        )


def test_every_documented_make_target_and_script_exists():
    makefile = (ROOT / "Makefile").read_text()
    defined = set(re.findall(r"^([a-z][a-z-]*):", makefile, re.M))
    for where, target in TARGETS:
        assert target in defined, f"{where}: make {target} is not a target of the Makefile"
    for where, script in SCRIPTS:
        assert (ROOT / script).is_file(), f"{where}: {script} does not exist"


def anchor(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces as hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_every_relative_link_and_image_points_to_a_file():
    for doc in DOCS:
        for link in LINK.findall(doc.read_text()):
            if re.match(r"[a-z]+:", link):
                continue  # https:, mailto:
            path, _, fragment = link.partition("#")
            target = (doc.parent / path).resolve() if path else doc
            assert target.is_file(), f"{doc.relative_to(ROOT)}: {link} points to no file"
            if fragment:
                headings = re.findall(r"^#+ (.+)$", FENCE.sub("", target.read_text()), re.M)
                assert fragment in {anchor(h) for h in headings}, f"{doc.name}: {link}"
