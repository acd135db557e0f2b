"""Where a run's outputs go, and the resolvers that the configs use.

The folder of a run or a sweep is derived from its overrides (``folder``), so that rerunning a
command finds its run; ``calc`` does arithmetic in configs. :func:`register_resolvers` puts
them in OmegaConf; the entry points (``cli``, ``api``, the tests) call it before composing,
and importing any other module registers nothing.
"""

from __future__ import annotations

import ast
import datetime
import hashlib
import operator
import os
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"


def calc(expression: str) -> int | float:
    """Arithmetic for configs, e.g. ``a: ${calc:6*${d}**2+1}``: numbers, + - * / // % ** and
    parentheses only (nothing is executed). A whole-number result is an int (a width, say)."""
    operators = {
        ast.Add: operator.add,
        ast.Sub: operator.sub,
        ast.Mult: operator.mul,
        ast.Div: operator.truediv,
        ast.FloorDiv: operator.floordiv,
        ast.Mod: operator.mod,
        ast.Pow: operator.pow,
        ast.USub: operator.neg,
        ast.UAdd: operator.pos,
    }

    def evaluate(node: ast.AST) -> int | float:
        if isinstance(node, ast.Constant) and type(node.value) in (int, float):
            return node.value
        if isinstance(node, ast.BinOp) and type(node.op) in operators:
            left, right = evaluate(node.left), evaluate(node.right)
            if isinstance(node.op, ast.Pow) and abs(right) > 64:
                raise ValueError(f"calc: exponent {right} in {expression!r} is too large")
            return operators[type(node.op)](left, right)
        if isinstance(node, ast.UnaryOp) and type(node.op) in operators:
            return operators[type(node.op)](evaluate(node.operand))
        raise ValueError(f"calc: {expression!r} is not plain arithmetic")

    value = evaluate(ast.parse(str(expression), mode="eval").body)
    return int(value) if isinstance(value, float) and value.is_integer() else value


def folder_name(overrides: Any, resume: bool = True) -> str:
    """A folder name derived from the overrides (``default`` without any), safe for the file
    system: a rerun of the same command finds its folder. With ``resume=false`` a timestamp
    is appended, so that a fresh start never writes over an earlier run."""
    if not isinstance(overrides, str):  # hydra.overrides.task: a list of KEY=VALUE strings
        # the keys that the job folders leave out too (train.yaml: override_dirname)
        cosmetic = ("aggregate=", "progress=", "resume=", "hydra.")
        overrides = ",".join(o for o in overrides if not o.startswith(cosmetic))
    name = "".join(c if c.isalnum() or c in "=,.-_+[]" else "_" for c in overrides) or "default"
    if len(name) > 120:
        name = f"{name[:100]}_{hashlib.sha1(name.encode()).hexdigest()[:10]}"
    if not resume:
        name += datetime.datetime.now().strftime("_%Y-%m-%d_%H-%M-%S")
    return name


SWEEP_DIR_VARIABLE = "RANDFEAT_SWEEP_DIR"


def sweep_dir(derived: str) -> str:
    """The sweep folder fixed when the multirun started (see ``cli.FixSweepDir``): Hydra
    resolves ``hydra.sweep.dir`` again for every job, with that job's overrides."""
    return os.environ.get(SWEEP_DIR_VARIABLE) or derived


def register_resolvers() -> None:
    """Register ``calc``, ``folder`` and ``sweep_dir`` with OmegaConf (again is harmless)."""
    OmegaConf.register_new_resolver("calc", calc, replace=True)
    OmegaConf.register_new_resolver("folder", folder_name, replace=True)
    OmegaConf.register_new_resolver("sweep_dir", sweep_dir, replace=True)
