"""Where a run's outputs go, and the resolvers that the configs use.

The folder of a run, of a sweep and of a sweep's job is derived from overrides (``folder``),
never from their order nor from a job number, so that rerunning a command finds its runs: a
job's folder is named by its own sorted overrides, a sweep's by its fixed overrides and the
keys it sweeps (:func:`sweep_name`), so that a sweep reordered or given one more value finds
the jobs it already ran. ``calc`` does arithmetic in configs. :func:`register_resolvers` puts
them in OmegaConf; the entry points (``cli``, ``api``, the tests) call it before composing,
and importing any other module registers nothing.
"""

from __future__ import annotations

import ast
import datetime
import hashlib
import math
import operator
import os
from pathlib import Path
from typing import Any

from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import OmegaConf

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"


# calc's numbers stay within a float's range, so that no expression takes long or much memory.
CALC_LIMIT = 2**1024


def calc(expression: str = "") -> int | float:
    """Arithmetic for configs, e.g. ``a: ${calc:6*${d}**2+1}``: numbers, + - * / // % ** and
    parentheses only (nothing is executed). A whole-number result is an int (a width, say).
    Every number on the way stays below 2**1024 (about 1.8e308) in magnitude, or ValueError."""
    if not str(expression).strip():  # ${calc:}
        raise ValueError("calc: no expression; write one after the colon, as ${calc:2*${d}}")
    shown = str(expression) if len(str(expression)) <= 80 else f"{str(expression)[:60]}..."
    too_large = ValueError(f"calc: {shown} is too large: its numbers must stay below 1.8e308")
    not_arithmetic = ValueError(
        f"calc: {shown} is not plain arithmetic: numbers, + - * / // % ** and parentheses"
    )

    def power(base: int | float, exponent: int | float) -> int | float:
        if base != 0 and abs(base) != 1 and exponent * math.log2(abs(base)) >= 1024:
            raise too_large  # before computing it: 9**9**9 alone would take a gigabyte
        return base**exponent

    operators = {
        ast.Add: operator.add,
        ast.Sub: operator.sub,
        ast.Mult: operator.mul,
        ast.Div: operator.truediv,
        ast.FloorDiv: operator.floordiv,
        ast.Mod: operator.mod,
        ast.Pow: power,
        ast.USub: operator.neg,
        ast.UAdd: operator.pos,
    }

    def checked(value: Any) -> int | float:
        if isinstance(value, complex):
            raise ValueError(f"calc: {shown} is not a real number")
        if not (isinstance(value, int) or math.isfinite(value)) or abs(value) >= CALC_LIMIT:
            raise too_large
        return value

    def evaluate(node: ast.AST) -> int | float:
        if isinstance(node, ast.Constant) and type(node.value) in (int, float):
            return checked(node.value)
        if isinstance(node, ast.BinOp) and type(node.op) in operators:
            left, right = evaluate(node.left), evaluate(node.right)
            try:
                return checked(operators[type(node.op)](left, right))
            except ZeroDivisionError:
                raise ValueError(f"calc: {shown} divides by zero") from None
            except OverflowError:
                raise too_large from None
        if isinstance(node, ast.UnaryOp) and type(node.op) in operators:
            return operators[type(node.op)](evaluate(node.operand))
        raise not_arithmetic

    try:
        value = evaluate(ast.parse(str(expression), mode="eval").body)
    except (SyntaxError, RecursionError, MemoryError):
        raise not_arithmetic from None
    return int(value) if isinstance(value, float) and value.is_integer() else value


# Keys that change no result, left out of every folder name (train.yaml's override_dirname too).
COSMETIC_KEYS = ("aggregate", "progress", "resume")


def sweep_name(overrides: list[str]) -> str:
    """What names a sweep: its fixed overrides, sorted, then ``sweep=`` and the keys it sweeps,
    sorted, whatever their values (``width=16,8 steps=2 d=6,4`` -> ``steps=2,sweep=d+width``),
    so that a sweep reordered or extended keeps its folder. Cosmetic keys are left out."""
    parsed = [
        o
        for o in OverridesParser.create().parse_overrides(list(overrides))
        if o.key_or_group not in COSMETIC_KEYS and not o.key_or_group.startswith("hydra.")
    ]
    fixed = sorted(o.input_line for o in parsed if not o.is_sweep_override())
    swept = sorted({o.key_or_group for o in parsed if o.is_sweep_override()})
    return ",".join([*fixed, *([f"sweep={'+'.join(swept)}"] if swept else [])])


def folder_name(overrides: Any, resume: bool = True) -> str:
    """A folder name derived from overrides (``default`` without any), safe for the file
    system, hashed past 120 bytes: a job's sorted ``override_dirname``, or a sweep's
    command line (``hydra.overrides.task``, a list: named by :func:`sweep_name`). A rerun
    finds its folder; with ``resume=false`` a timestamp is appended, so that a fresh start
    never writes over an earlier run."""
    if not isinstance(overrides, str):
        overrides = sweep_name(overrides)
    name = "".join(c if c.isalnum() or c in "=,.-_+[]" else "_" for c in overrides) or "default"
    if len(name.encode()) > 120:  # bytes, the file system's measure (255 at most)
        short = name.encode()[:100].decode(errors="ignore")
        name = f"{short}_{hashlib.sha1(name.encode()).hexdigest()[:10]}"
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
