"""The run record: ``metrics.json`` (written atomically) and the TensorBoard event file.

This module is the one place that writes a run's outputs. Analysis reads ``metrics.json``
only; the TensorBoard file is for looking at curves.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import functools
import json
import math
import os
import platform
import subprocess
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import torch
from omegaconf import DictConfig
from tensorboard.summary.writer import event_file_writer
from torch.utils.tensorboard import SummaryWriter
from torch.utils.tensorboard.summary import hparams

from randfeat_torch.config import SCHEMAS, CheckpointError, UserError, base_lr

RECORD_NAME = "metrics.json"
CHECKPOINT_NAME = "checkpoint.pt"
LOCK_NAME = ".lock"
TMP_SUFFIX = ".tmp"  # atomic writes in flight: .metrics.json.XXXX.tmp, .checkpoint.pt.XXXX.tmp
CHECKPOINT_VERSION = 2  # 2: the loop's resumable objects by name (trainer.Loop.resumable)
# Keys that do not change what a run computes: a checkpoint stays valid across them.
NOT_IN_FINGERPRINT = (
    "progress",
    "aggregate",
    "checkpoint_every",
    "checkpoint_every_s",
    "resume",
    "threads",
)
LAZINESS = (  # randfeat_torch.diagnostics
    "w_movement",
    "b_movement",
    "a_movement",
    "linearization_distance",
    "kernel_distance",
)
METRICS = (
    "test_error",
    "test_mse",
    "train_loss",
    "train_error",
    "fit_mse",
    "fit_error",
    "population_mse",
    "population_error",
    "test_error_sample",
    "test_zero_one",
    *LAZINESS,
)
TAGS = {
    "train_loss": "train/loss",
    "train_error": "train/error",
    "fit_mse": "fit/mse",
    "fit_error": "fit/error",
    "population_mse": "population/mse",
    "population_error": "population/error",
    "test_error": "test/error",
    "test_error_sample": "test/error_by_sample_variance",
    "test_mse": "test/mse",
    "test_zero_one": "test/zero_one_error",
    **{name: f"lazy/{name}" for name in LAZINESS},
}
# TensorBoard's custom-scalars tab: the normalised errors and theory's on one chart.
LAYOUT = {
    "errors": {
        "normalised error (train, test, theory)": [
            "Multiline",
            ["train/error.*", "fit/error.*", "population/error.*", "test/error.*", "theory/.*"],
        ],
        "mean squared error": [
            "Multiline",
            ["train/loss.*", "fit/mse.*", "population/mse.*", "test/mse.*"],
        ],
    }
}


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


FILE_MODE = 0o666 & ~_umask()  # what open() would give: collaborators read the records


def atomic_write(
    path: Path, write: Callable[[IO[Any]], None], binary: bool = False, durable: bool = True
) -> None:
    """Write ``path`` through a temporary file in the same folder, then renamed over it: a
    reader sees the old file or the new one, never half of one. ``durable``: synced to the
    disk before the rename (several milliseconds here), so that a crash of the machine, not
    only of the process, keeps the new file whole. The file gets the mode that the umask gives
    any new file (a temporary file alone would be private)."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=TMP_SUFFIX)
    os.fchmod(fd, FILE_MODE)
    try:
        with os.fdopen(fd, "wb" if binary else "w") as f:
            write(f)
            f.flush()
            if durable:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as error:
        Path(tmp).unlink(missing_ok=True)
        cause = _os_error_in(error) if isinstance(error, Exception) else None
        if cause is not None and cause is not error:  # torch.save wraps ENOSPC in a RuntimeError
            raise cause from error
        raise


def _os_error_in(error: BaseException | None) -> OSError | None:
    """The OSError that ``error`` is, or that it was raised from or while handling."""
    seen = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, OSError):
            return error
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return None


def atomic_write_json(path: Path, data: dict[str, Any], durable: bool = True) -> None:
    """Write ``data`` as strict JSON to ``path`` atomically (see :func:`atomic_write`)."""
    atomic_write(path, lambda f: json.dump(data, f, indent=2, allow_nan=False), durable=durable)


def read_record(run_dir: Path) -> dict[str, Any] | None:
    """The run record in ``run_dir``, or None if there is none, it cannot be read or it is not
    a JSON object."""
    try:
        record = json.loads((Path(run_dir) / RECORD_NAME).read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def finished_error(record: dict[str, Any] | None) -> float | None:
    """The mean final test error of a record that says the run finished (``ok`` with a finite
    test error for every replica), else None: such a run is skipped on a rerun, any other is
    trained (again)."""
    if not isinstance(record, dict) or record.get("status") != "ok":
        return None
    metrics = record.get("metrics")
    errors = metrics.get("test_error") if isinstance(metrics, dict) else None
    values = errors if isinstance(errors, list) else [errors]
    if not values or not all(_is_number(v) for v in values):
        return None
    return sum(values) / len(values)


class StaleRecord(UserError):
    """A finished record in the run folder that another config wrote."""

    def __init__(self, run_dir: Path, difference: str) -> None:
        super().__init__(
            f"cannot run in {run_dir}: its finished record was written for {difference}; "
            "resume=false trains it again there (replacing that record), or choose another "
            "folder (hydra.run.dir or hydra.sweep.dir)"
        )


class RunLocked(UserError):
    """Another process holds the run folder."""

    def __init__(self, run_dir: Path, holder: str) -> None:
        super().__init__(
            f"cannot run in {run_dir}: another process ({holder}) is running there; wait for "
            "it to end, or use another folder"
        )


def lock_holder(fd: int) -> str:
    """Who holds a run folder's lock, as its holder wrote it in the lock file (pid and host)."""
    return os.pread(fd, 200, 0).decode(errors="replace").strip() or "unknown"


class RunLock:
    """One process at a time in a run folder: an exclusive ``flock`` on its ``.lock`` file,
    which names the holder (pid and host) and is released when the process ends, however it
    ends. Taking it also removes what atomic writes of a process killed mid-write left."""

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = Path(run_dir)
        self.fd: int | None = None

    def __enter__(self) -> RunLock:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.run_dir / LOCK_NAME, os.O_RDWR | os.O_CREAT, FILE_MODE)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = lock_holder(fd)
            os.close(fd)
            raise RunLocked(self.run_dir, holder) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {platform.node()}".encode(), 0)
        self.fd = fd
        for stale in self.run_dir.glob(f".*{TMP_SUFFIX}"):
            stale.unlink(missing_ok=True)
        return self

    def __exit__(self, *exc: object) -> None:
        if self.fd is not None:
            os.close(self.fd)  # releases the lock
            self.fd = None


def check_unlocked(run_dir: Path) -> None:
    """Raise :class:`RunLocked` where another process holds ``run_dir`` (a shared ``flock``
    probe of its lock file, released at once), creating nothing: Hydra can then be stopped
    before it rewrites the folder's ``.hydra/``."""
    try:
        fd = os.open(Path(run_dir) / LOCK_NAME, os.O_RDONLY)
    except OSError:  # no lock file (no run there yet), or a folder we cannot read
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        raise RunLocked(Path(run_dir), lock_holder(fd)) from None
    finally:
        os.close(fd)  # releases the probe


def mark_failed(
    run_dir: Path, config: dict[str, Any], error: BaseException, about: dict | None = None
) -> None:
    """A run that raised before its record was opened leaves one saying ``failed``, with the
    error and what names the job's networks (``about``: the config groups picked and the
    replicas' seeds, so that the aggregator can list it as the run would have been); a record
    already there (written by the run, or by an earlier run) is left as it is."""
    if (Path(run_dir) / RECORD_NAME).exists():
        return
    Path(run_dir).mkdir(parents=True, exist_ok=True)
    record = {"status": "failed", "error": f"{type(error).__name__}: {error}", "config": config}
    atomic_write_json(Path(run_dir) / RECORD_NAME, {"choices": {}} | record | (about or {}))


def mark_interrupted(
    run_dir: Path, config: dict[str, Any], signal_name: str, about: dict | None = None
) -> None:
    """A run stopped by a signal before its loop (set-up): the record says ``interrupted``,
    with ``interrupted_by``, where there was none or where one said ``running`` (left by this
    run, or by a process killed before); any other is left as it is, and so is a folder that
    another process holds. A new record also keeps ``about``, as :func:`mark_failed` does.
    Best effort: a write that fails leaves the record as it was."""
    try:
        with RunLock(run_dir):
            record = read_record(run_dir)
            if record is not None and record.get("status") != "running":
                return
            stopped = {"status": "interrupted", "interrupted_by": signal_name}
            if record is None:
                record = {"choices": {}, **stopped, "config": config} | (about or {})
            else:
                record = record | stopped
            atomic_write_json(Path(run_dir) / RECORD_NAME, record)
    except (RunLocked, OSError):
        return  # another process runs there, or the disk refuses the record


@functools.cache
def git_state() -> dict[str, Any]:
    """The commit of the checkout this package runs from, and whether it has local changes:
    asked of git once per process (the code a process runs is the code it imported), so that
    the jobs of a sweep do not each start two git processes. Callers get a copy."""
    here = Path(__file__).resolve().parent
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5
        )
        status = subprocess.run(
            ["git", "status", "--porcelain"], cwd=here, capture_output=True, text=True, timeout=5
        )
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}
    if commit.returncode != 0:
        return {"commit": None, "dirty": None}
    return {"commit": commit.stdout.strip(), "dirty": bool(status.stdout.strip())}


def _per_replica(values: torch.Tensor) -> float | list[float | None] | None:
    """One number for one replica, a list for several; NaN and Inf become null (strict JSON)."""
    floats = [v if math.isfinite(v) else None for v in values.detach().cpu().tolist()]
    return floats[0] if len(floats) == 1 else floats


# Config keys added after records were first compared, with the value that every run had
# before: a saved config without one is read as holding it. A top-level key is named as it is
# (``replica_init``), a field of a group's option as ``group.field`` (``optimizer.momentum``).
# A key the config gains must be named here, or the records and checkpoints written before it
# are refused as another config's (tests/test_resume.py checks the config's keys against the
# keys it had when records were first compared).
ADDED_KEYS: dict[str, Any] = {"replica_init": "independent"}


def _option_has(group: str, saved: dict[str, Any], field: str) -> bool:
    """Whether the option that wrote a saved group config has ``field``. Its schema is the one
    of the group whose fields hold every saved key and whose own ``name`` is the saved name
    (model=kernel's), else the smallest such (a frozen model's, not model=kernel's, which
    extends it)."""
    fitting = []
    for g, _, node in SCHEMAS:
        fields = {f.name: f for f in dataclasses.fields(node)}
        if g == group and set(saved) <= set(fields):
            named = str(getattr(fields["name"].default, "value", fields["name"].default))
            fitting.append((named != saved.get("name"), len(fields), set(fields)))
    return bool(fitting) and field in min(fitting, key=lambda fit: fit[:2])[2]


def with_added_keys(config: dict[str, Any]) -> dict[str, Any]:
    """A saved config as this version names it: each key of :data:`ADDED_KEYS` that it lacks,
    with its old value, where the saved config's option has that key."""
    filled = dict(config)
    for key, old in ADDED_KEYS.items():
        group, _, field = key.rpartition(".")
        if not group:
            filled.setdefault(field, old)
            continue
        saved = filled.get(group)
        if isinstance(saved, dict) and field not in saved and _option_has(group, saved, field):
            filled[group] = {**saved, field: old}
    return filled


def _fingerprint(config: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in config.items() if k not in NOT_IN_FINGERPRINT}


def config_difference(saved: dict[str, Any], config: dict[str, Any]) -> str | None:
    """Where a saved config (a checkpoint's or a record's) differs from this run's, as
    'key=saved (this run: value)', the first key in order; None where they are the same run
    (the keys of :data:`NOT_IN_FINGERPRINT` left out)."""
    return _first_difference(_fingerprint(with_added_keys(saved)), _fingerprint(config))


def _first_difference(saved: Any, now: Any, key: str = "") -> str | None:
    """The first key whose value differs, as 'key=saved (now: value)'."""
    if isinstance(saved, dict) and isinstance(now, dict):
        for k in sorted(set(saved) | set(now)):
            found = _first_difference(saved.get(k), now.get(k), f"{key}.{k}" if key else k)
            if found:
                return found
        return None
    return None if saved == now else f"{key}={saved} (this run: {now})"


def save_checkpoint(run_dir: Path, config: dict[str, Any], state: dict[str, Any]) -> None:
    """Write ``checkpoint.pt`` atomically (temp file + rename) with the run's config."""
    checkpoint = {"version": CHECKPOINT_VERSION, "config": _fingerprint(config), **state}
    atomic_write(Path(run_dir) / CHECKPOINT_NAME, lambda f: torch.save(checkpoint, f), binary=True)


def load_checkpoint(run_dir: Path, config: dict[str, Any]) -> dict[str, Any] | None:
    """The checkpoint in ``run_dir`` if there is one; a corrupt one, or one written for another
    config, is refused (and left as it is)."""
    path = Path(run_dir) / CHECKPOINT_NAME
    if not path.exists():
        return None
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as error:  # unpickling raises many types on a damaged file
        raise CheckpointError(path, f"is corrupt or truncated ({type(error).__name__})") from None
    if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get("config"), dict):
        held = (
            f"a dict of the keys {', '.join(sorted(map(str, checkpoint)))[:200]}"
            if isinstance(checkpoint, dict)
            else f"a {type(checkpoint).__name__}"
        )
        raise CheckpointError(path, f"is not a checkpoint of a run but {held}")
    saved = checkpoint["config"]
    if checkpoint.get("version") != CHECKPOINT_VERSION:
        version = checkpoint.get("version")
        raise CheckpointError(
            path, f"has format {version}, this version reads {CHECKPOINT_VERSION}"
        )
    difference = config_difference(saved, config)
    if difference:
        raise CheckpointError(path, f"was written for {difference}")
    return checkpoint


def hparams_of(cfg: DictConfig) -> dict[str, object]:
    """The knobs shown as columns in TensorBoard's hparams dashboard (of a rate per replica,
    the first)."""
    return {
        "model": cfg.model.name,
        "target": cfg.target.name,
        "input": cfg.input.name,
        "optimizer": cfg.optimizer.name,
        "d": cfg.d,
        "width": cfg.width,
        "replicas": cfg.replicas,
        "seed": cfg.seed,
        "target_seed": cfg.target.seed,
        "lr": base_lr(cfg.optimizer.lr) if "lr" in cfg.optimizer else None,
        "steps": cfg.steps,
        "batch_size": cfg.batch_size,
        "n_train": cfg.n_train,
        "activation": cfg.model.activation,
        "parameterization": cfg.model.parameterization,
        "lazy_scale": cfg.model.lazy_scale,
        "loss": cfg.loss,
    }


def _quiet_writer_threads() -> None:
    """TensorBoard's writer thread keeps a write that failed (a full disk) for the main thread,
    which raises it at the next flush, and also lets it end the thread, whose traceback Python
    prints: that print is dropped, so that the run's one sentence says what happened."""
    hook = threading.excepthook
    if getattr(hook, "quiet_tensorboard", False):
        return

    def quiet(args: threading.ExceptHookArgs) -> None:
        writer_thread = type(args.thread).__module__ == event_file_writer.__name__
        if not (writer_thread and isinstance(args.exc_value, OSError)):
            hook(args)

    quiet.quiet_tensorboard = True  # type: ignore[attr-defined]
    threading.excepthook = quiet


class RunRecord:
    """Writes one run's TensorBoard scalars, hparams entry and ``metrics.json``."""

    def __init__(
        self,
        run_dir: Path,
        config: dict[str, Any],
        hparam_dict: dict[str, Any],
        checkpoint: dict[str, Any] | None = None,
    ):
        """With a ``checkpoint``, TensorBoard drops what was logged after its step, so that
        the resumed series continue without duplicated steps. The event file is opened at the
        first scalar, after the record's first write, so that a full disk refuses the record
        (one sentence) before TensorBoard's writer thread meets it."""
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.path = self.run_dir / RECORD_NAME
        self.hparam_dict = hparam_dict
        resumed = None if checkpoint is None else checkpoint["progress"]["step"]
        self.resumed_from = resumed
        # A fresh start over event files of a run killed before its first checkpoint drops them.
        earlier = any(self.run_dir.glob("events.out.tfevents.*"))
        self.purge_step = resumed + 1 if resumed is not None else 0 if earlier else None
        self._writer: SummaryWriter | None = None
        # What a failed write falls back to (see fall_back): an interrupted run's record.
        before = read_record(self.run_dir)
        self.before = before if before and before.get("status") == "interrupted" else None
        self.written = False  # whether this run has written its record yet
        self.record: dict[str, Any] = {
            "status": "running",
            "config": config,
            "metrics": None,
            "wall_time_s": None,
            "steps_per_s": None,
            "steps_done": 0,
            "device": None,
            "versions": {"python": platform.python_version(), "torch": torch.__version__},
            "git": dict(git_state()),
            "host": platform.node(),
            "resumed_from_step": resumed,
        }

    @property
    def writer(self) -> SummaryWriter:
        """The run's TensorBoard writer, opened at its first use."""
        if self._writer is None:
            _quiet_writer_threads()
            self._writer = SummaryWriter(log_dir=str(self.run_dir), purge_step=self.purge_step)
            if self.resumed_from is None:
                self._writer.add_custom_scalars(LAYOUT)
        return self._writer

    def log_eval(self, step: int, metrics: dict[str, torch.Tensor]) -> None:
        """Scalars at ``step``: one series per replica (suffix ``/replica_r``) when R > 1."""
        for name, values in metrics.items():
            values = values.detach().cpu().tolist()
            if len(values) == 1:
                self.writer.add_scalar(TAGS[name], values[0], step)
            else:
                for r, value in enumerate(values):
                    self.writer.add_scalar(f"{TAGS[name]}/replica_{r}", value, step)
        self.writer.flush()

    def _log_curves(self, series: list[tuple[str, list[int], list]]) -> None:
        """(tag, steps, values per replica or one list) as scalars; nulls are left out."""
        for tag, steps, values in series:
            per_replica = values if isinstance(values[0], list) else [values]
            for r, curve in enumerate(per_replica):
                name = f"{tag}/replica_{r}" if len(per_replica) > 1 else tag
                for step, value in zip(steps, curve, strict=True):
                    if value is not None and math.isfinite(value):
                        self.writer.add_scalar(name, value, step)
        self.writer.flush()

    def log_width_path(self, path: dict[str, Any]) -> None:
        """The record's ``width_path`` as curves against width (the step axis is the width):
        ``width_path/error`` at every recorded width, ``width_path/test_error`` and
        ``width_path/width_times_u_max_abs`` at the solved ones (``/replica_r`` when R > 1)."""
        solved = path["solved"]
        self._log_curves(
            [
                ("width_path/error", path["widths"], path["error"]),
                ("width_path/test_error", solved["widths"], solved["test_error"]),
                (
                    "width_path/width_times_u_max_abs",
                    solved["widths"],
                    solved["width_times_u_max_abs"],
                ),
            ]
        )

    def log_penalty_path(self, path: dict[str, Any]) -> None:
        """The record's ``penalty_path`` against the penalty's index k in the list (TensorBoard
        steps are integers): ``penalty_path/log10_penalty`` gives the penalty at each k."""
        steps = list(range(len(path["penalties"])))
        logs = [math.log10(p) if p > 0 else None for p in path["penalties"]]
        names = [
            "error",
            "test_error",
            "width_times_u_max_abs",
            *(["gcv"] if "gcv" in path else []),
        ]
        self._log_curves(
            [("penalty_path/log10_penalty", steps, logs)]
            + [(f"penalty_path/{name}", steps, path[name]) for name in names]
        )

    def checkpoint(self, state: dict[str, Any]) -> None:
        """Write ``checkpoint.pt`` for this run (see :func:`save_checkpoint`)."""
        save_checkpoint(self.run_dir, self.record["config"], state)

    def log_theory(self, step: int, theory: dict[str, Any]) -> None:
        """The theory's reference errors as ``theory/<name>`` (``/replica_r`` when per replica),
        logged at the first and last step so that they draw as lines beside the measured ones."""
        for name, value in theory.items():
            values = value if isinstance(value, list) else [value]
            for r, v in enumerate(values):
                if isinstance(v, (int, float)):
                    suffix = f"/replica_{r}" if isinstance(value, list) else ""
                    self.writer.add_scalar(f"theory/{name}{suffix}", v, step)
        self.writer.flush()

    def update(self, **fields: Any) -> None:
        """Set ``fields`` in the record, to be written by the next :meth:`write`."""
        for key, value in fields.items():
            if key == "metrics" and value is not None:
                value = {name: _per_replica(v) for name, v in value.items()}
            self.record[key] = value

    def write(self, status: str, **fields: Any) -> None:
        """Update the record with ``status`` and ``fields`` and write it atomically; synced to
        the disk unless it says ``running`` (a run that a crash of the machine stops has
        nothing to keep from its running record but what its checkpoint keeps)."""
        self.record["status"] = status
        self.update(**fields)
        atomic_write_json(self.path, self.record, durable=status != "running")
        self.written = True

    def fall_back(self, error: OSError) -> None:
        """After a write that failed (a full disk), a resumed run's record goes back to the one
        it resumed from (``interrupted``, in step with the checkpoint, which stays); any other
        says ``failed``, with the error. Best effort: where that too cannot be written, the
        last record written stays."""
        if not self.written:
            return  # the record is still the one from before this run
        failed = {**self.record, "status": "failed", "error": f"{type(error).__name__}: {error}"}
        with contextlib.suppress(OSError):
            atomic_write_json(self.path, self.before or failed)

    def close(self, final: dict[str, torch.Tensor] | None, step: int) -> None:
        """Write the hparams entry (mean over replicas of the final metrics) and close."""
        if final is None and self._writer is None:
            return  # nothing was logged
        if final is not None:
            metric_dict = {}
            for name in (m for m in METRICS if m in final):
                mean = float(final[name].double().mean())
                metric_dict[f"hparams/{name}"] = mean if math.isfinite(mean) else float("nan")
            for summary in hparams(self.hparam_dict, metric_dict):
                self.writer.file_writer.add_summary(summary)
            for tag, value in metric_dict.items():
                self.writer.add_scalar(tag, value, step)
        self.writer.close()
