"""The machine checks of a job: the memory it can take, and sizes that do not fit refused with
the number, through the command line (exit status 2)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from randfeat_torch import cli, device
from randfeat_torch.cli import load_config
from randfeat_torch.config import ConfigError
from randfeat_torch.kernels import KERNEL_MATRICES_EIGH, dual_ridge, kernel_spec
from tests.conftest import SMALL

GIB = 2**30


@pytest.mark.parametrize(
    ("overrides", "free_gib", "message"),
    [
        # The input batch itself (30.5 GiB) was not counted: the old estimate said 30.6 GiB.
        (
            ["d=4096", "batch_size=2000000", "width=1024"],
            40,
            "batch_size=2000000 (this run needs about 61.2 GiB, more than the 40 GiB available "
            "here; batch_size <= 1306",
        ),
        # The Hermite values of the 60 coordinates, (degree + 1) x n_test x 60 (the old
        # estimate: 0.23 GiB; the old evaluation held 37,820 x 3 x n_test factors at once).
        (
            [
                "target=polynomial",
                "d=60",
                "target.degree=3",
                "target.terms=37820",
                "n_test=1000000",
            ],
            1,
            "n_test=1000000 (this run needs about 2.1",
        ),
        # The training batch and the laziness probe, 256 x d each (the old estimate: 7.45 GiB).
        (
            ["target=parity", "d=200000", "width=1", "n_test=10000", "batch_size=256"],
            7.5,
            "d=200000 (this run needs about 7.65 GiB, more than the 7.5 GiB available here; d <= ",
        ),
        # The a + 1 = 6 d^2 + 2 ReLUs of the zigzag for theory's exact moments (old: 0.009 GiB).
        (
            ["target=zigzag", "model=frozen", "d=3000"],
            1,
            "target.a=54000001 (this run needs about 1.6",
        ),
        (
            ["target=polynomial", "d=2000", "target.terms=1000000"],
            0.25,
            "target.terms=1000000 (this run needs about 0.3",
        ),
    ],
)
def test_sizes_that_do_not_fit_exit_2_naming_the_key_and_what_fits(
    monkeypatch, capsys, overrides, free_gib, message
):
    monkeypatch.setattr(device, "free_memory", lambda name: (int(free_gib * GIB), "available here"))
    with pytest.raises(SystemExit) as exit_info:
        cli.precheck([*SMALL, *overrides])
    assert exit_info.value.code == 2
    text = capsys.readouterr().err.strip()
    assert text.startswith(f"invalid config: {message}") and "\n" not in text
    assert "would fit)" in text or "no value of it alone fits)" in text


def write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


@pytest.mark.parametrize(
    ("cgroup", "slurm_mib", "expected_gib", "where"),
    [
        (False, None, 8.0, "available here"),  # MemAvailable, not the 1 GiB MemFree
        (True, None, 2.0, "left by this job's cgroup"),  # 4 GiB max - (3 GiB - 1 GiB cache)
        (True, 1024, 1.0, "left of this Slurm job's memory"),  # less what this process holds
    ],
)
def test_free_memory_is_the_least_of_meminfo_cgroup_and_slurm(
    monkeypatch, tmp_path, cgroup, slurm_mib, expected_gib, where
):
    write(
        tmp_path / "meminfo",
        f"MemTotal: {16 * 2**20} kB\nMemFree: {2**20} kB\nMemAvailable: {8 * 2**20} kB\n",
    )
    root = tmp_path / "cgroup"
    write(root / "memory.max", "max\n")  # the root: no limit
    if cgroup:
        write(root / "job_1" / "memory.max", f"{4 * GIB}\n")
        write(root / "job_1" / "memory.current", f"{3 * GIB}\n")
        write(root / "job_1" / "memory.stat", f"anon {2 * GIB}\ninactive_file {GIB}\n")
        write(root / "job_1" / "step_0" / "memory.max", "max\n")
    write(tmp_path / "self_cgroup", "0::/job_1/step_0\n" if cgroup else "0::/\n")
    monkeypatch.setattr(device, "MEMINFO", tmp_path / "meminfo")
    monkeypatch.setattr(device, "CGROUP_ROOT", root)
    monkeypatch.setattr(device, "OWN_CGROUP", tmp_path / "self_cgroup")
    for name in ("SLURM_MEM_PER_NODE", "SLURM_MEM_PER_CPU"):
        monkeypatch.delenv(name, raising=False)
    if slurm_mib is not None:
        monkeypatch.setenv("SLURM_MEM_PER_NODE", str(slurm_mib))
    free, said = device.free_memory("cpu")
    assert said == where
    if slurm_mib is None:
        assert free == expected_gib * GIB
    else:  # the limit less this process's resident memory (a few hundred MiB with torch)
        assert 0.2 * GIB < expected_gib * GIB - free < 0.99 * GIB


def test_free_memory_without_meminfo_falls_back_to_free_pages(monkeypatch, tmp_path):
    monkeypatch.setattr(device, "MEMINFO", tmp_path / "absent")
    monkeypatch.setattr(device, "OWN_CGROUP", tmp_path / "absent")
    monkeypatch.setattr(device, "CGROUP_ROOT", tmp_path)
    monkeypatch.delenv("SLURM_MEM_PER_NODE", raising=False)
    monkeypatch.delenv("SLURM_MEM_PER_CPU", raising=False)
    free, said = device.free_memory("cpu")
    assert said == "available here" and free > 0


@pytest.mark.parametrize(
    ("penalty", "matrices"),
    [("1e-6", 1), ("[1e-6,1e-3]", 2), ("gcv", 2), ("0", 4), ("[0,1e-3]", 5)],
)
def test_a_kernel_fit_that_does_not_fit_names_n_train_and_the_largest_that_does(
    monkeypatch, capsys, penalty, matrices
):
    """Half of the free memory bounds the fit's float64 n_train x n_train matrices: the largest
    n_train it names passes the check and one more sample does not."""
    free = 4 * GIB
    monkeypatch.setattr(device, "free_memory", lambda name: (free, "available here"))
    largest = math.isqrt(free // 2 // (8 * matrices))
    line = [*SMALL, "fit=nt_kernel", "d=4", f"optimizer.penalty={penalty}"]
    cli.precheck([*line, f"n_train={largest}"])  # fits: no exit
    with pytest.raises(SystemExit) as exit_info:
        cli.precheck([*line, f"n_train={largest + 1}"])
    assert exit_info.value.code == 2
    text = capsys.readouterr().err.strip()
    assert "\n" not in text
    assert text.startswith(f"invalid config: n_train={largest + 1} (kernel ridge on ")
    assert f"its {matrices} float64 n_train x n_train matrices" in text
    assert f"n_train <= {largest} would fit" in text


def test_a_failed_factor_whose_eigendecomposition_does_not_fit_names_the_penalty(monkeypatch):
    """A positive penalty too small for a trusted Cholesky factor falls back to the
    eigendecomposition, which the machine check did not count: where it does not fit, the run
    is refused with the penalty and the numbers, before LAPACK allocates it."""
    spec = kernel_spec(load_config([*SMALL, "fit=rf_kernel", "d=3", "n_train=50"]).model)
    x = torch.randn(50, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    x[25:] = x[:25]  # repeated inputs: K_c is singular, so a 1e-300 shift has no trusted factor
    need = KERNEL_MATRICES_EIGH * 8 * 50**2  # bytes: its float64 n x n matrices
    monkeypatch.setattr(device, "free_memory", lambda name: (need - 1, "available here"))
    with pytest.raises(ConfigError, match=r"^invalid config: optimizer\.penalty=1e-300 \(the "):
        dual_ridge(spec, x, x[:, 0], [1e-300], relative=True, degrees=False)
    monkeypatch.setattr(device, "free_memory", lambda name: (need, "available here"))
    fit = dual_ridge(spec, x, x[:, 0], [1e-300], relative=True, degrees=False)
    assert fit.fallback


def test_float32_products_count_their_rounding_check_in_the_ridge_memory_check(monkeypatch, capsys):
    """3 Gram-sized float64 matrices at width 4096 (0.375 GiB) fit in half of 0.8 GiB; float32
    products hold a run's sums and the first run's rounding too, 2 R P^2 float32 (4 in all:
    0.5 GiB)."""
    monkeypatch.setattr(device, "free_memory", lambda name: (int(0.8 * GIB), "available here"))
    common = [*SMALL, "model=frozen", "optimizer=ridge", "n_train=100", "width=4096"]
    cli.precheck(common)
    with pytest.raises(SystemExit) as refused:
        cli.precheck([*common, "optimizer.gram_products=float32"])
    assert refused.value.code == 2
    err = capsys.readouterr().err
    assert (
        "invalid config: width=4096 (ridge on 4096 features x 1 replica needs about 0.5 GiB" in err
    )
