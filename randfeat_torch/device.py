"""The machine a job runs on: its device, a clock for work on it, and the checks that only the
machine running the job can make (CUDA present, enough free memory).

These checks run in the job (:func:`check_machine`, called by ``trainer.train``), never while a
sweep is checked on the host that submits it: a login node without a GPU may submit
``device=cuda`` jobs to a GPU partition.
"""

from __future__ import annotations

import math
import os
import time
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig

from randfeat_torch.config import ConfigError, exact_moments_apply
from randfeat_torch.data import EVAL_ELEMENTS
from randfeat_torch.kernels import kernel_matrices, kernel_memory_bytes
from randfeat_torch.models import ridge_feature_count
from randfeat_torch.targets import target_memory_bytes

RIDGE_MEMORY_FRACTION = 0.5  # of the free memory that the ridge Gram matrices may take
MEMINFO = Path("/proc/meminfo")
CGROUP_ROOT, OWN_CGROUP = Path("/sys/fs/cgroup"), Path("/proc/self/cgroup")


def resolve_device(name: str) -> torch.device:
    """``auto`` picks CUDA when present (:func:`check_machine` refuses ``cuda`` without it)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


class Stopwatch:
    """Seconds of work on a device: CUDA events on CUDA (timed on the GPU's own timeline, read
    only when asked, which waits for the work queued so far), ``perf_counter`` on the CPU."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"

    def mark(self) -> float | torch.cuda.Event:
        if not self.cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def since(self, mark: float | torch.cuda.Event) -> float:
        """Seconds from ``mark`` to now."""
        if not self.cuda:
            return time.perf_counter() - mark
        end = self.mark()
        end.synchronize()
        return mark.elapsed_time(end) / 1000


def _meminfo_available() -> int | None:
    """MemAvailable of /proc/meminfo (free memory and what the kernel can reclaim from its page
    cache), in bytes; None where the kernel does not report it."""
    try:
        with MEMINFO.open() as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _read_int(path: Path) -> int | None:
    try:
        return int(path.read_text().split()[0])
    except (OSError, ValueError, IndexError):  # absent, unreadable, or "max" (no limit)
        return None


def _cgroup_room() -> int | None:
    """What the memory cgroups (v2) of this process still allow, the least along its path from
    /sys/fs/cgroup: memory.max less what is charged and not reclaimable (memory.current less the
    inactive file cache of memory.stat); None where no cgroup sets a limit."""
    root = CGROUP_ROOT
    try:
        own = next(
            line.split("::", 1)[1].strip()
            for line in OWN_CGROUP.read_text().splitlines()
            if line.startswith("0::")
        )
    except (OSError, StopIteration):
        own = "/"
    folder, rooms = root / own.lstrip("/"), []
    for group in (folder, *folder.parents):
        limit = _read_int(group / "memory.max")
        if limit is not None:
            used = _read_int(group / "memory.current") or 0
            try:
                stat = dict(
                    line.split() for line in (group / "memory.stat").read_text().splitlines()
                )
                used -= int(stat.get("inactive_file", 0))
            except (OSError, ValueError):
                pass
            rooms.append(limit - max(used, 0))
        if group == root:
            break
    return min(rooms) if rooms else None


def _slurm_room() -> int | None:
    """The memory Slurm gave this job on this node (SLURM_MEM_PER_NODE, or SLURM_MEM_PER_CPU
    times the CPUs, in MiB) less what this process holds now; None outside Slurm."""
    per_node, per_cpu = os.environ.get("SLURM_MEM_PER_NODE"), os.environ.get("SLURM_MEM_PER_CPU")
    cpus = os.environ.get("SLURM_CPUS_ON_NODE") or os.environ.get("SLURM_CPUS_PER_TASK") or "1"
    try:
        limit = int(per_node) if per_node else int(per_cpu) * int(cpus) if per_cpu else None
    except ValueError:
        return None
    if not limit:  # unset, or 0 (all of the node's memory)
        return None
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])  # resident pages
    except (OSError, ValueError, IndexError):
        pages = 0
    return limit * 2**20 - pages * os.sysconf("SC_PAGE_SIZE")


def free_memory(device: str) -> tuple[int, str]:
    """The memory (bytes) the run's tensors can take where they live, and what limits it: the
    GPU's free memory, else the host's MemAvailable (free pages where absent), the room left by
    the job's cgroup limit and by its Slurm allocation, whichever is least."""
    if device == "cuda" or (device == "auto" and torch.cuda.is_available()):
        return torch.cuda.mem_get_info()[0], "free on the GPU"
    page = os.sysconf("SC_PAGE_SIZE")
    available = _meminfo_available()
    if available is None:
        try:
            available = os.sysconf("SC_AVPHYS_PAGES") * page
        except (ValueError, OSError):  # macOS has no count of free pages
            available = os.sysconf("SC_PHYS_PAGES") * page
    limits = [(available, "available here")]
    for room, what in (
        (_cgroup_room(), "left by this job's cgroup"),
        (_slurm_room(), "left of this Slurm job's memory"),
    ):
        if room is not None:
            limits.append((room, what))
    return min(limits)


def free_memory_bytes(device: str) -> int:
    """Bytes the run's tensors can take where they live (see :func:`free_memory`)."""
    return free_memory(device)[0]


def _memory_bytes(cfg: DictConfig, v: dict[str, Any]) -> int:
    """About the bytes a run holds at its peak, for the sizes ``v``: float32 parameters with
    gradients and two optimizer states and a batch of activations (4 copies each), the input
    batch, the test set and a held training set, the laziness probe, a block of evaluation,
    what the target takes to label the largest block of inputs it is given, and the a + 1
    ReLUs of a zigzag where theory's exact moments take them."""
    R, W, d, copies = v["replicas"], v["width"], v["d"], v["copies"]
    probe = min(cfg.lazy_probe, v["n_test"])
    floats = (
        4 * R * W * (d + 2 + v["batch_size"])
        + (v["n_test"] + (v["n_train"] + v["batch_size"]) * copies) * (d + 1)
        + (2 * R * W * d + 6 * R * probe * W + 4 * R * probe**2 if probe else 0)
        + 3 * min(EVAL_ELEMENTS, R * W * v["n_test"])
    )
    rows = max(v["n_test"], max(v["n_train"], v["batch_size"]) * copies)
    total = 4 * floats + target_memory_bytes(cfg.target, rows, d, v.get("target.terms"))
    if cfg.target.name == "zigzag" and exact_moments_apply(cfg):  # theory's a + 1 ReLUs
        total += 4 * 8 * (v.get("target.a", cfg.target.a) + 1)
    return total


def _largest_fitting(
    cfg: DictConfig, values: dict[str, Any], key: str, low: int, free: int
) -> int | None:
    """The largest value of ``key`` (the others as they are) whose run fits in ``free`` bytes,
    None where even ``low`` does not."""
    if _memory_bytes(cfg, {**values, key: low}) > free:
        return None
    high = values[key]  # does not fit
    while high - low > 1:
        mid = (low + high) // 2
        low, high = (mid, high) if _memory_bytes(cfg, {**values, key: mid}) <= free else (low, mid)
    return low


def check_machine(cfg: DictConfig) -> None:
    """Refuse a validated config that this machine cannot run: ``device=cuda`` without CUDA,
    sizes that do not fit in free memory (naming the key that matters most), and the Gram
    matrices of ``optimizer=ridge`` larger than half the free memory."""
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device", "cuda", "CUDA is not available here; allowed: auto, cpu")
    free, where = free_memory(cfg.device)
    held = cfg.n_train if cfg.n_train is not None and cfg.optimizer.name != "ridge" else 0
    values = {k: cfg[k] for k in ("d", "width", "replicas", "batch_size", "n_test")}
    values |= {"n_train": held, "copies": cfg.replicas if cfg.replica_data == "independent" else 1}
    smallest = {"d": 1, "width": 1, "replicas": 1, "batch_size": 1, "n_test": 2}
    if held:
        smallest["n_train"] = cfg.batch_size
    if cfg.target.name == "polynomial":
        values["target.terms"], smallest["target.terms"] = cfg.target.terms, 1
    if cfg.target.name == "zigzag" and exact_moments_apply(cfg):
        values["target.a"], smallest["target.a"] = cfg.target.a, 1
    need = _memory_bytes(cfg, values)
    if need > free:
        key = min(smallest, key=lambda k: _memory_bytes(cfg, {**values, k: smallest[k]}))
        largest = _largest_fitting(cfg, values, key, smallest[key], free)
        fits = (
            f"{key} <= {largest} would fit" if largest is not None else "no value of it alone fits"
        )
        raise ConfigError(
            key,
            values[key],
            f"this run needs about {need / 2**30:.3g} GiB, more than the "
            f"{free / 2**30:.3g} GiB {where}; {fits}",
        )
    if cfg.optimizer.name != "ridge":
        return
    if cfg.model.name == "kernel":  # n_train x n_train float64 matrices (kernels.py)
        need, room = kernel_memory_bytes(cfg), RIDGE_MEMORY_FRACTION * free
        if need > room:
            matrices = kernel_matrices(cfg)
            largest = math.isqrt(int(room // (8 * matrices)))
            raise ConfigError(
                "n_train",
                cfg.n_train,
                f"kernel ridge on {cfg.n_train} samples needs about {need / 2**30:.3g} GiB for "
                f"its {matrices} float64 n_train x n_train matrices, more than half of the "
                f"{free / 2**30:.3g} GiB {where}; n_train <= {largest} would fit"
                + ("" if matrices == 1 else "; one positive penalty holds 1 matrix"),
            )
        return
    ridge_features = ridge_feature_count(cfg.model)
    # float64 Gram, its factor, and headroom; float32 products add a run and its rounding
    grams = 4 if cfg.optimizer.get("gram_products") == "float32" else 3
    need = grams * cfg.replicas * ridge_features**2 * 8
    if need > RIDGE_MEMORY_FRACTION * free:
        raise ConfigError(
            "width",
            cfg.width,
            f"ridge on {ridge_features} features x {cfg.replicas} "
            f"replica{'s' * (cfg.replicas > 1)} needs about {need / 2**30:.3g} GiB for its "
            f"float64 Gram matrices, more than half of the {free / 2**30:.3g} GiB {where}; use "
            "a smaller width, d or replicas",
        )
