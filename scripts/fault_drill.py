"""Fault drill: the faults of docs/troubleshooting.md done for real, to ``python train.py``
subprocesses in temporary folders, each checked against the outcome it must have:

1. a record ``status: ok`` without a usable test error (or not a JSON object) is trained
   again; a checkpoint of the wrong structure is refused with one sentence, nothing changed;
2. a second process in a run folder names the holder, exits non-zero and writes nothing;
   the first finishes with its record and TensorBoard intact (no step twice);
3. kill -9 before (and after) the first checkpoint, then a rerun: no TensorBoard step twice;
   SIGTERM in start-up leaves ``interrupted`` (with ``interrupted_by``), never ``running``;
4. twenty kill -9 at random moments: the rerun removes every stale ``.tmp`` file and ends
   as the run never killed;
5. every file and folder gets the mode the umask gives (022, 002, 077);
6. SIGTERM during a ridge fit: ``interrupted``, said on stderr, exit 128 + 15;
7. a resumed run on a full tmpfs (full, or with room for the record only): one sentence,
   the record stays ``interrupted`` and the checkpoint as it was;
8. SIGTERM or SIGINT at a chosen step and during an evaluation: the resumed run's record,
   TensorBoard series and model tensors equal an uninterrupted run's, bit for bit.

    python scripts/fault_drill.py [FAULT ...]     # all faults, or some of 1..8

Prints one line per check: the fault, what was observed (exit codes, record status, messages,
counts) and PASS or FAIL; exit status 1 if any check failed. Tiny runs (d=8, width=16, one
torch thread), about ten minutes on 2 cores. Fault 7 mounts a 2 MiB tmpfs, so it needs root
(SKIP otherwise). Not part of the test suite (slow): tests/test_faults.py holds the fast
regression tests of what this drill found.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

ROOT = Path(__file__).resolve().parents[1]
logging.getLogger("tensorboard").setLevel(logging.ERROR)  # its notes on purged steps
BASE = ["d=8", "width=16", "steps=2000", "n_test=200", "progress=false", "threads=1"]
RESULTS: list[bool] = []
# The api run of fault 8: trains in a folder, saves the trained model's tensors there.
API_RUN = """
import sys, torch
from randfeat_torch import run
result = run(*sys.argv[2:], run_dir=sys.argv[1])
torch.save(result.model.state_dict(), sys.argv[1] + "/model_tensors.pt")
"""


def report(fault: str, observed: str, ok: bool | None) -> None:
    """One line: the fault, what was observed, and PASS, FAIL or (``ok`` None) SKIP."""
    if ok is not None:
        RESULTS.append(ok)
    verdict = "SKIP" if ok is None else "PASS" if ok else "FAIL"
    print(f"{fault}: {observed} -> {verdict}", flush=True)


def command(run_dir: Path, overrides: list[str]) -> list[str]:
    return [sys.executable, "train.py", *BASE, *overrides, f"hydra.run.dir={run_dir}"]


def start(run_dir: Path, *overrides: str, umask: int | None = None) -> subprocess.Popen:
    """``python train.py`` in ``run_dir``, its output kept for :func:`finish`."""
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    return subprocess.Popen(
        command(run_dir, list(overrides)),
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=None if umask is None else (lambda: os.umask(umask)),
    )


def finish(process: subprocess.Popen, timeout: float = 300) -> tuple[int, str, str]:
    out, err = process.communicate(timeout=timeout)
    return process.returncode, out, err


def train(run_dir: Path, *overrides: str, umask: int | None = None) -> tuple[int, str, str]:
    return finish(start(run_dir, *overrides, umask=umask))


def record(run_dir: Path) -> dict | None:
    """The run record, or None where there is none or it is not a JSON object."""
    try:
        content = json.loads((run_dir / "metrics.json").read_text())
    except (OSError, ValueError):
        return None
    return content if isinstance(content, dict) else None


def wait_for(condition: Callable[[], bool], process: subprocess.Popen, timeout: float = 120):
    """Poll ``condition`` until it holds; False if ``process`` ended first or time ran out."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if condition():
            return True
        if process.poll() is not None:
            return condition()
        time.sleep(0.02)
    return False


def at_step(run_dir: Path, step: int) -> Callable[[], bool]:
    def reached() -> bool:
        r = record(run_dir)
        return bool(r) and r.get("status") == "running" and (r.get("steps_done") or 0) >= step

    return reached


def test_error(r: dict) -> object:
    """A record's final test error, None where it has none."""
    metrics = r.get("metrics")
    return metrics.get("test_error") if isinstance(metrics, dict) else None


def status(run_dir: Path) -> str | None:
    return (record(run_dir) or {}).get("status")


def stopped_by_sigterm(rc: int, r: dict) -> bool:
    """Exit 128 + 15 and a record that says ``interrupted`` by SIGTERM."""
    return (
        rc == 128 + signal.SIGTERM
        and r.get("status") == "interrupted"
        and r.get("interrupted_by") == "SIGTERM"
    )


def last_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1][:160] if lines else ""


def scalars(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar series of the run's event files, as TensorBoard reads them (purges
    applied): tag -> [(step, value)]."""
    events = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    events.Reload()
    return {
        tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]
    }


def duplicated_steps(run_dir: Path) -> int:
    """How many (tag, step) pairs appear more than once."""
    return sum(len(s) - len({step for step, _ in s}) for s in scalars(run_dir).values())


def files(run_dir: Path) -> dict[str, bytes]:
    """The run's own files (Hydra's ``.hydra/``, ``train.log`` and the lock left out)."""
    return {
        str(p.relative_to(run_dir)): p.read_bytes()
        for p in sorted(run_dir.rglob("*"))
        if p.is_file() and ".hydra" not in p.parts and p.name not in ("train.log", ".lock")
    }


def interrupted_run(run_dir: Path, *overrides: str, step: int = 500) -> tuple[int, dict]:
    """A run stopped by SIGTERM at or after ``step``: (exit code, record)."""
    process = start(run_dir, "eval_every=100", *overrides)
    wait_for(at_step(run_dir, step), process)
    process.send_signal(signal.SIGTERM)
    rc, _, _ = finish(process)
    return rc, record(run_dir) or {}


def same_series(a: list[tuple[int, float]] | None, b: list[tuple[int, float]] | None) -> bool:
    """Equal steps and bit-equal values (NaN, logged before anything is fitted, equals NaN)."""
    if a is None or b is None or len(a) != len(b):
        return False
    nan = [(math.isnan(v), math.isnan(w)) for (_, v), (_, w) in zip(a, b, strict=True)]
    steps_equal = [s for s, _ in a] == [t for t, _ in b]
    return steps_equal and all(
        v == w or nans == (True, True) for (_, v), (_, w), nans in zip(a, b, nan, strict=True)
    )


def same_results(a: dict, b: dict) -> list[str]:
    """The record fields that differ between two finished runs (what the model computes)."""
    keys = ("status", "metrics", "best_test_error", "steps_to_error", "output_weights")
    return [k for k in keys if a.get(k) != b.get(k)]


def fault_1(tmp: Path) -> None:
    broken = {
        "no metrics": {"status": "ok"},
        "metrics null": {"status": "ok", "metrics": None},
        "test_error null": {"status": "ok", "metrics": {"test_error": None}},
        "test_error []": {"status": "ok", "metrics": {"test_error": []}},
        "test_error [0.1, null]": {"status": "ok", "metrics": {"test_error": [0.1, None]}},
        "metrics a list": {"status": "ok", "metrics": [0.1]},
        "test_error a string": {"status": "ok", "metrics": {"test_error": "0.1"}},
        "test_error true": {"status": "ok", "metrics": {"test_error": True}},
        "a list, not a record": [{"status": "ok"}],
        "a string, not a record": "ok",
    }
    for name, content in broken.items():
        run_dir = tmp / f"1a-{len(name)}-{abs(hash(name))}"
        run_dir.mkdir(parents=True)
        (run_dir / "metrics.json").write_text(json.dumps(content))
        rc, out, err = train(run_dir, "steps=200", "eval_every=100")
        after = record(run_dir) or {}
        error = test_error(after)
        trained = rc == 0 and after.get("status") == "ok" and isinstance(error, float)
        said = "[rerun]" in out
        report(
            f"1a record 'ok' with {name}",
            f"rc={rc}, '[rerun]' printed={said}, then status={after.get('status')} "
            f"test_error={error}" + ("" if rc == 0 else f", stderr: {last_line(err)}"),
            trained and "[skip]" not in out and "Traceback" not in err,
        )

    source = tmp / "1b-source"
    interrupted_run(source)
    real = torch.load(source / "checkpoint.pt", weights_only=False)

    def edited(change: Callable[[dict], object]) -> Callable[[Path], None]:
        def write(path: Path) -> None:
            state = torch.load(source / "checkpoint.pt", weights_only=False)
            result = change(state)
            torch.save(state if result is None else result, path)

        return write

    def drop(state: dict, key: str) -> None:
        del state[key]

    def progress_field(state: dict, key: str, value: object) -> None:
        state["progress"][key] = value

    whole = (source / "checkpoint.pt").read_bytes()
    damaged = {
        "a dict of the wrong keys": edited(lambda s: {"foo": 1, "bar": torch.zeros(3)}),
        "a list": edited(lambda s: [1, 2, 3]),
        "a tensor": edited(lambda s: torch.zeros(4)),
        "random bytes": lambda p: p.write_bytes(os.urandom(4096)),
        "an empty file": lambda p: p.write_bytes(b""),
        "truncated to half": lambda p: p.write_bytes(whole[: len(whole) // 2]),
        "no 'progress'": edited(lambda s: drop(s, "progress")),
        "no 'model'": edited(lambda s: drop(s, "model")),
        "'progress' a number": edited(lambda s: s.update(progress=5)),
        "'progress' an empty dict": edited(lambda s: s.update(progress={})),
        "step a string": edited(lambda s: progress_field(s, "step", "12")),
        "step a float": edited(lambda s: progress_field(s, "step", 12.5)),
        "step beyond steps": edited(lambda s: progress_field(s, "step", 10**6)),
        "negative step": edited(lambda s: progress_field(s, "step", -7)),
        "best of the wrong shape": edited(lambda s: progress_field(s, "best", torch.zeros(3))),
        "an unknown progress field": edited(lambda s: progress_field(s, "speed", 1.0)),
        "'config' a string": edited(lambda s: s.update(config="x")),
        "no 'version'": edited(lambda s: drop(s, "version")),
        "model w of the wrong shape": edited(lambda s: s["model"].update(w=torch.zeros(1))),
        "generators a number": edited(lambda s: s.update(generators=3)),
        "optimizer state a string": edited(lambda s: s.update(optimizer="x")),
    }
    assert real["progress"]["step"] >= 500
    for name, damage in damaged.items():
        run_dir = tmp / f"1b-{len(name)}-{abs(hash(name))}"
        shutil.copytree(source, run_dir)
        damage(run_dir / "checkpoint.pt")
        before = files(run_dir)
        rc, out, err = train(run_dir, "eval_every=100")
        after = files(run_dir)
        lines = err.strip().splitlines()
        one = len(lines) == 1 and lines[0].startswith("cannot resume from")
        kept = after == before
        report(
            f"1b checkpoint {name}",
            f"rc={rc}, stderr {len(lines)} line(s): {last_line(err)!r}, files unchanged={kept}, "
            f"status={status(run_dir)}",
            rc == 2 and one and kept and status(run_dir) == "interrupted",
        )


def fault_2(tmp: Path) -> None:
    run_dir = tmp / "2"
    overrides = ["steps=30000", "eval_every=1000"]  # about 100 s: the second starts in it
    first = start(run_dir, *overrides)
    wait_for(at_step(run_dir, 1000), first)
    hydra = run_dir / ".hydra"
    hydra_before = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in hydra.iterdir()}
    names_before = set(files(run_dir))
    rc2, out2, err2 = train(run_dir, *overrides)
    names_after = set(files(run_dir))
    hydra_after = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in hydra.iterdir()}
    first_running = first.poll() is None
    rc1, _, _ = finish(first)
    r = record(run_dir) or {}
    steps = [s for s, _ in scalars(run_dir)["test/error"]]
    dupes = duplicated_steps(run_dir)
    report(
        "2 second process in the run dir",
        f"second: rc={rc2} stderr {last_line(err2)!r}, new files="
        f"{sorted(names_after - names_before)}; first still running then={first_running}, "
        f"later rc={rc1} status={r.get('status')} steps_done={r.get('steps_done')}, "
        f"test/error steps {len(steps)} (expected 31), duplicated steps={dupes}",
        rc2 == 2
        and "another process (pid" in err2
        and not out2.strip()
        and names_after <= names_before
        and first_running
        and rc1 == 0
        and r.get("status") == "ok"
        and steps == list(range(0, 30001, 1000))
        and dupes == 0,
    )
    rewritten = [k for k in hydra_before if hydra_after[k][0] != hydra_before[k][0]]
    changed = [k for k in hydra_before if hydra_after[k][1] != hydra_before[k][1]]
    report(
        "2 second process leaves Hydra's .hydra/ alone",
        f"rewritten by the second process: {rewritten}, of which with other content: {changed}",
        not rewritten,
    )


def fault_3(tmp: Path) -> None:
    for name, overrides, resumed in (
        ("before the first checkpoint", [], None),
        ("after a checkpoint (checkpoint_every=300)", ["checkpoint_every=300"], 600),
    ):
        run_dir = tmp / f"3a-{resumed}"
        process = start(run_dir, "eval_every=100", *overrides)
        wait_for(at_step(run_dir, 700), process)
        process.kill()
        finish(process)
        killed_at = (record(run_dir) or {}).get("steps_done")
        rc, _, err = train(run_dir, "eval_every=100", *overrides)
        r = record(run_dir) or {}
        steps = [s for s, _ in scalars(run_dir)["test/error"]]
        dupes = duplicated_steps(run_dir)
        report(
            f"3a kill -9 {name}, rerun",
            f"killed at record step {killed_at}; rerun rc={rc} status={r.get('status')} "
            f"resumed_from_step={r.get('resumed_from_step')}, duplicated (tag, step) pairs="
            f"{dupes}, test/error steps {steps[:3]}..{steps[-1:]} ({len(steps)})",
            rc == 0
            and r.get("status") == "ok"
            and r.get("resumed_from_step") == resumed
            and dupes == 0
            and steps == list(range(0, 2001, 100)),
        )

    # SIGTERM in start-up: once the record says running at step 0, during the initial
    # evaluation (a big test set makes it last), then at random moments of the set-up.
    slow = ["n_test=1000000", "lazy_probe=2000"]
    for where, prior in (("a fresh run", None), ("a resumed run", "interrupted")):
        run_dir = tmp / f"3b-{where.replace(' ', '-')}"
        if prior:
            interrupted_run(run_dir, *slow, step=200)
        process = start(run_dir, "eval_every=100", *slow)

        def started(run_dir=run_dir, process=process) -> bool:
            r = record(run_dir) or {}
            return r.get("status") == "running" and r.get("metrics") is None

        wait_for(started, process)
        process.send_signal(signal.SIGTERM)
        rc, _, err = finish(process)
        r = record(run_dir) or {}
        report(
            f"3b SIGTERM at the record's first write of {where}",
            f"rc={rc}, status={r.get('status')}, interrupted_by={r.get('interrupted_by')}, "
            f"stderr: {last_line(err)!r}",
            stopped_by_sigterm(rc, r) and "interrupted" in err,
        )
    rng = random.Random(3)
    seen = []
    for trial in range(8):
        run_dir = tmp / f"3b-random-{trial}"
        run_dir.mkdir(parents=True)
        (run_dir / "metrics.json").write_text(json.dumps({"status": "running", "config": {}}))
        process = start(run_dir, "eval_every=100", *slow)
        time.sleep(rng.uniform(1.0, 9.0))
        process.send_signal(signal.SIGTERM)
        rc, _, err = finish(process)
        seen.append((rc, status(run_dir)))
    handled = [s for s in seen if s[0] == 128 + signal.SIGTERM]
    early = [s for s in seen if s[0] == -signal.SIGTERM]
    report(
        "3b SIGTERM at random moments of start-up, over a kill -9's 'running' record",
        f"(rc, status) per trial: {seen}; handled (rc 143): {len(handled)}, of which still "
        f"'running': {sum(s[1] == 'running' for s in handled)}; killed by Python's default "
        f"handler before train() (imports, Hydra): {len(early)}",
        all(s[1] == "interrupted" for s in handled),
    )


def fault_4(tmp: Path) -> None:
    run_dir = tmp / "4"
    overrides = ["steps=40000", "eval_every=10", "checkpoint_every=10"]  # outlasts 20 kills
    rng = random.Random(4)
    left_per_kill, killed_at = [], []
    path = run_dir / "metrics.json"
    for _ in range(20):
        written = path.stat().st_mtime_ns if path.exists() else 0
        process = start(run_dir, *overrides)
        # this process's record (not the one the last kill left), then a random moment
        wait_for(lambda w=written: path.exists() and path.stat().st_mtime_ns != w, process)
        time.sleep(rng.uniform(0.0, 1.5))
        process.kill()
        finish(process)
        left_per_kill.append(len(list(run_dir.glob(".*.tmp"))))
        killed_at.append((record(run_dir) or {}).get("steps_done"))
    rc, _, _ = train(run_dir, *overrides)
    left = sorted(p.name for p in run_dir.glob("*.tmp")) + sorted(
        p.name for p in run_dir.glob(".*.tmp")
    )
    r = record(run_dir) or {}
    dupes = duplicated_steps(run_dir)
    train(tmp / "4-reference", *overrides)
    differ = same_results(r, record(tmp / "4-reference") or {})
    report(
        "4 20 kill -9 at random moments, then a rerun",
        f"record's step at each kill {killed_at}, .tmp left after each {left_per_kill} (sum "
        f"{sum(left_per_kill)}); after the rerun: "
        f"rc={rc} status={r.get('status')} steps_done={r.get('steps_done')}, .tmp files "
        f"{len(left)}, duplicated steps={dupes}, differs from an unkilled run in {differ}",
        rc == 0 and not left and r.get("status") == "ok" and dupes == 0 and not differ,
    )


def modes(run_dir: Path) -> dict[str, str]:
    return {
        str(p.relative_to(run_dir)) + ("/" if p.is_dir() else ""): oct(p.stat().st_mode & 0o777)
        for p in sorted([run_dir, *run_dir.rglob("*")])
    }


def fault_5(tmp: Path) -> None:
    for umask in (0o022, 0o002, 0o077):
        run_dir = tmp / f"5-{umask:03o}"
        process = start(run_dir, "eval_every=100", umask=umask)
        wait_for(at_step(run_dir, 300), process)
        process.send_signal(signal.SIGTERM)
        finish(process)
        stopped = modes(run_dir)  # with checkpoint.pt
        rc, _, _ = train(run_dir, "eval_every=100", umask=umask)
        finished = modes(run_dir)
        file_mode, dir_mode = oct(0o666 & ~umask), oct(0o777 & ~umask)
        wrong = {
            k: v
            for k, v in {**stopped, **finished}.items()
            if v != (dir_mode if k.endswith("/") else file_mode)
        }
        report(
            f"5 modes under umask {umask:03o}",
            f"{len(stopped)} paths when stopped (checkpoint.pt {stopped.get('checkpoint.pt')}), "
            f"{len(finished)} when finished (metrics.json {finished.get('metrics.json')}); "
            f"expected files {file_mode}, folders {dir_mode}; others: {wrong or 'none'}",
            rc == 0 and "checkpoint.pt" in stopped and not wrong,
        )


def fault_6(tmp: Path) -> None:
    run_dir = tmp / "6"
    ridge = ["model=frozen", "optimizer=ridge", "width=1024", "n_train=300000"]
    process = start(run_dir, *ridge)
    wait_for(lambda: status(run_dir) == "running", process)
    time.sleep(1.5)
    sent = time.monotonic()
    process.send_signal(signal.SIGTERM)
    rc, _, err = finish(process)
    latency = time.monotonic() - sent
    r = record(run_dir) or {}
    report(
        "6 SIGTERM during a ridge fit (n_train=300000, width=1024)",
        f"rc={rc} after {latency:.2f} s, status={r.get('status')} "
        f"interrupted_by={r.get('interrupted_by')}, stderr: {last_line(err)!r}",
        stopped_by_sigterm(rc, r) and "interrupted by SIGTERM" in err,
    )


def fill(folder: Path, leave: int) -> None:
    """Fill the file system of ``folder`` until at most ``leave`` bytes are free."""
    free = shutil.disk_usage(folder).free
    if free > leave:
        with open(folder / "filler", "ab") as f:
            try:
                f.write(b"\0" * (free - leave))
                f.flush()
            except OSError:
                pass


def fault_7(tmp: Path) -> None:
    if os.geteuid() != 0:
        report("7 full disk", "mounting a tmpfs needs root", None)
        return
    mount = tmp / "full"
    mount.mkdir()
    big = ["width=2048"]  # a checkpoint of about 200 KB, a record of 4 KB
    cases = (
        ("a full disk", 0, []),
        ("room for the record, not the checkpoint", 96 * 1024, ["checkpoint_every=1000"]),
    )
    for name, leave, overrides in cases:
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount)], check=True)
        try:
            run_dir = mount / "run"
            interrupted_run(run_dir, *big, step=500)
            before = (run_dir / "metrics.json").read_bytes()
            checkpoint = (run_dir / "checkpoint.pt").read_bytes()
            fill(mount, leave)
            free = shutil.disk_usage(mount).free
            rc, _, err = train(run_dir, "eval_every=100", *big, *overrides)
            r = record(run_dir) or {}
            kept = (run_dir / "metrics.json").read_bytes() == before
            kept_checkpoint = (run_dir / "checkpoint.pt").read_bytes() == checkpoint
            left = len(list(run_dir.glob(".*.tmp")))
            (mount / "filler").unlink()
            rc2, _, _ = train(run_dir, "eval_every=100", *big, *overrides)
            r2 = record(run_dir) or {}
        finally:
            subprocess.run(["umount", str(mount)], check=True)
        report(
            f"7 resumed run, {name} ({free} bytes free)",
            f"rc={rc} stderr: {last_line(err)!r}; record status={r.get('status')} "
            f"(unchanged={kept}), checkpoint unchanged={kept_checkpoint}, .tmp left={left}; "
            f"with room again: rc={rc2} status={r2.get('status')} "
            f"resumed_from_step={r2.get('resumed_from_step')}",
            rc == 1
            and "No space left on device" in err
            and str(run_dir) in err
            and len(err.strip().splitlines()) == 1
            and r.get("status") == "interrupted"
            and kept
            and kept_checkpoint
            and left == 0
            and rc2 == 0
            and r2.get("status") == "ok",
        )


def fault_8(tmp: Path) -> None:
    overrides = ["eval_every=100"]
    train(tmp / "8-reference", *overrides)
    reference = record(tmp / "8-reference") or {}
    reference_curves = scalars(tmp / "8-reference")
    for name, sig in (("SIGTERM", signal.SIGTERM), ("SIGINT", signal.SIGINT)):
        run_dir = tmp / f"8-{name}"
        process = start(run_dir, *overrides)
        wait_for(at_step(run_dir, 1000), process)
        process.send_signal(sig)
        rc, _, _ = finish(process)
        cut = record(run_dir) or {}
        kept = (run_dir / "checkpoint.pt").exists()
        rc2, _, _ = train(run_dir, *overrides)
        r = record(run_dir) or {}
        differ = same_results(r, reference)
        curves = scalars(run_dir)
        curve_differ = [
            t
            for t in reference_curves
            if t.startswith(("test/", "train/", "lazy/"))
            if not same_series(curves.get(t), reference_curves[t])
        ]
        report(
            f"8 {name} at a chosen step (after step 1000)",
            f"rc={rc} status={cut.get('status')} at step {cut.get('steps_done')}, checkpoint="
            f"{kept}; resumed rc={rc2} from {r.get('resumed_from_step')}: test_error "
            f"{test_error(r)!r} vs "
            f"{test_error(reference)!r}, differing fields "
            f"{differ}, differing TensorBoard series {curve_differ}",
            rc == 128 + sig
            and cut.get("status") == "interrupted"
            and kept
            and rc2 == 0
            and not differ
            and not curve_differ,
        )

    # During an evaluation: a big laziness probe makes evaluations most of the time, so a
    # signal lands in one; it then stops at that evaluation's step (a multiple of eval_every).
    slow = ["eval_every=50", "n_test=20000", "lazy_probe=3000", "steps=600"]
    train(tmp / "8-eval-reference", *slow)
    reference = record(tmp / "8-eval-reference") or {}
    for name, sig in (("SIGTERM", signal.SIGTERM), ("SIGINT", signal.SIGINT)):
        for attempt in range(4):
            run_dir = tmp / f"8-eval-{name}-{attempt}"
            process = start(run_dir, *slow)
            wait_for(at_step(run_dir, 100), process)
            time.sleep(random.Random(attempt).uniform(0.05, 0.3))
            process.send_signal(sig)
            rc, _, _ = finish(process)
            cut = record(run_dir) or {}
            if (cut.get("steps_done") or 1) % 50 == 0:
                break
        rc2, _, _ = train(run_dir, *slow)
        r = record(run_dir) or {}
        differ = same_results(r, reference)
        report(
            f"8 {name} during an evaluation",
            f"rc={rc} status={cut.get('status')} at step {cut.get('steps_done')} (attempt "
            f"{attempt + 1}); resumed rc={rc2} from {r.get('resumed_from_step')}: test_error "
            f"{test_error(r)!r} vs "
            f"{test_error(reference)!r}, differing fields {differ}",
            rc == 128 + sig
            and cut.get("steps_done", 1) % 50 == 0
            and r.get("resumed_from_step") == cut.get("steps_done")
            and rc2 == 0
            and not differ,
        )

    # The trained model's tensors, through randfeat_torch.run in a subprocess (a finished
    # run keeps no checkpoint): interrupted by SIGTERM, resumed, against one never stopped.
    def api(run_dir: Path) -> subprocess.Popen:
        return subprocess.Popen(
            [sys.executable, "-c", API_RUN, str(run_dir), *BASE, "eval_every=100"],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )

    finish(api(tmp / "8-api-reference"))
    run_dir = tmp / "8-api"
    process = api(run_dir)
    wait_for(at_step(run_dir, 700), process)
    process.send_signal(signal.SIGTERM)
    rc, _, _ = finish(process)
    step = (record(run_dir) or {}).get("steps_done")
    checkpoint = torch.load(run_dir / "checkpoint.pt", weights_only=False)
    rc2, _, _ = finish(api(run_dir))
    mine = torch.load(run_dir / "model_tensors.pt")
    theirs = torch.load(tmp / "8-api-reference" / "model_tensors.pt")
    equal = mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)
    report(
        "8 SIGTERM, then resumed: the model's tensors (randfeat_torch.run in a subprocess)",
        f"rc={rc} at step {step} (checkpoint step {checkpoint['progress']['step']}), resumed "
        f"rc={rc2}; tensors {sorted(mine)} bit-identical to the uninterrupted run's={equal}",
        rc2 == 0 and checkpoint["progress"]["step"] >= 700 and equal,
    )


FAULTS = {str(i): f for i, f in enumerate([fault_1, fault_2, fault_3, fault_4, fault_5], 1)}
FAULTS |= {"6": fault_6, "7": fault_7, "8": fault_8}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("faults", nargs="*", help=f"some of {', '.join(FAULTS)}; all if none")
    chosen = parser.parse_args(argv).faults or list(FAULTS)
    if unknown := [name for name in chosen if name not in FAULTS]:
        parser.error(f"no fault {unknown[0]!r} (allowed: {', '.join(FAULTS)})")
    with tempfile.TemporaryDirectory(prefix="fault_drill_") as folder:
        for name in chosen:
            FAULTS[name](Path(folder))
    print(f"{sum(RESULTS)} of {len(RESULTS)} checks passed", flush=True)
    return 0 if all(RESULTS) else 1


if __name__ == "__main__":
    sys.exit(main())
