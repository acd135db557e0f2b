"""The machine a job runs on: its device, a clock for work on it, and the checks that only the
machine running the job can make (CUDA present, enough free memory).

These checks run in the job (:func:`check_machine`, called by ``trainer.train``), never while a
sweep is checked on the host that submits it: a login node without a GPU may submit
``device=cuda`` jobs to a GPU partition.
"""

from __future__ import annotations

import os
import time
from typing import Any

import torch
from omegaconf import DictConfig

from randfeat_torch.config import ConfigError
from randfeat_torch.models import ridge_feature_count

RIDGE_MEMORY_FRACTION = 0.5  # of the free memory that the ridge Gram matrices may take


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


def free_memory_bytes(device: str) -> int:
    """Free memory where the run's tensors live: the GPU's, else the host's available RAM."""
    if device == "cuda" or (device == "auto" and torch.cuda.is_available()):
        return torch.cuda.mem_get_info()[0]
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def _memory_bytes(v: dict[str, Any]) -> int:
    """float32 parameters with gradients and two optimizer states, a batch of activations,
    the test set and a held training set."""
    model = 4 * v["replicas"] * v["width"] * (v["d"] + 2 + v["batch_size"])
    return 4 * (model + v["n_test"] * (v["d"] + 1) + v["n_train"] * (v["d"] + 1) * v["copies"])


def check_machine(cfg: DictConfig) -> None:
    """Refuse a validated config that this machine cannot run: ``device=cuda`` without CUDA,
    sizes that do not fit in free memory (naming the key that matters most), and the Gram
    matrices of ``optimizer=ridge`` larger than half the free memory."""
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device", "cuda", "CUDA is not available here; allowed: auto, cpu")
    free = free_memory_bytes(cfg.device)
    held = cfg.n_train if cfg.n_train is not None and cfg.optimizer.name != "ridge" else 0
    values = {k: cfg[k] for k in ("d", "width", "replicas", "batch_size", "n_test")}
    values |= {"n_train": held, "copies": cfg.replicas if cfg.replica_data == "independent" else 1}
    need = _memory_bytes(values)
    if need > free:
        smallest = {"d": 1, "width": 1, "replicas": 1, "batch_size": 1, "n_test": 2, "n_train": 0}
        key = min(smallest, key=lambda k: _memory_bytes({**values, k: smallest[k]}))
        raise ConfigError(
            key,
            cfg[key],
            f"this run needs about {need / 2**30:.3g} GiB, more than the {free / 2**30:.3g} GiB "
            "free here",
        )
    if cfg.optimizer.name != "ridge":
        return
    ridge_features = ridge_feature_count(cfg.model)
    need = 3 * cfg.replicas * ridge_features**2 * 8  # float64 Gram, its factor, and headroom
    if need > RIDGE_MEMORY_FRACTION * free:
        raise ConfigError(
            "width",
            cfg.width,
            f"ridge on {ridge_features} features x {cfg.replicas} replicas needs about "
            f"{need / 2**30:.1f} GiB for its float64 Gram matrices, more than half of the "
            f"{free / 2**30:.1f} GiB free here; use a smaller width, d or replicas",
        )
