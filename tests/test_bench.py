"""The benchmark script produces every figure (the targets are for quiet machines, not CI)."""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys

import pytest

from tests.conftest import ROOT

pytestmark = pytest.mark.slow

# Each figure's ratio, as the two numbers of the figure it divides (ours first).
RATIO_OF = {
    "single_trainable": ("ours", "baseline"),
    "single_frozen": ("ours", "baseline"),
    "replicas": ("ours", "baseline"),
    "compile": ("ours", "baseline"),
    "large_fraction_of_peak": ("achieved_flops", "peak_flops"),
    "closed_form": ("sgd_s", "fit_s"),
    "closed_form_sampled": ("sgd_s", "fit_s"),
    "width_path": ("path_s", "plain_s"),
    "width_path_sampled": ("path_s", "plain_s"),
    "penalty_path": ("eigh_s", "path_s"),
    "kernel_fit": ("kernel_s", "ridge_s"),
    "startup": ("train_py_s", "import_torch_s"),
    "ridge_vs_sklearn": ("sklearn_s", "ours_s"),
    "ridge_vs_sklearn_float32": ("sklearn_s", "ours_s"),
}


def test_bench_quick_produces_every_figure(tmp_path):
    out = tmp_path / "bench.json"
    done = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "bench.py"), "--quick", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    bench = json.loads(out.read_text())
    figures = bench["figures"]
    # scikit-learn's row only where the optional [compare] extra is installed
    sklearn = {"ridge_vs_sklearn", "ridge_vs_sklearn_float32"}
    without = set() if importlib.util.find_spec("sklearn") else sklearn
    assert (
        set(figures) | without
        == set(bench["targets"])
        == {
            "single_trainable",
            "single_frozen",
            "replicas",
            "large_fraction_of_peak",
            "closed_form",
            "closed_form_sampled",
            "width_path",
            "width_path_sampled",
            "penalty_path",
            "laziness",
            "startup",
            "compile",
            "kernel_fit",
            "sweep_overhead",
            "ridge_vs_sklearn",
            "ridge_vs_sklearn_float32",
        }
    )
    for name, figure in figures.items():
        assert math.isfinite(figure["ratio"]), name
        assert name in done.stdout
        if name in RATIO_OF:  # the ratio of the two medians it reports (one float division)
            top, bottom = RATIO_OF[name]
            assert figure["ratio"] == pytest.approx(figure[top] / figure[bottom], rel=1e-12), name
    # A whole run over the same run less its laziness measures (the median of those ratios).
    assert figures["laziness"]["ratio"] >= 1 and figures["laziness"]["laziness_s"] > 0
    assert (
        figures["large_fraction_of_peak"]["peak_flops"]
        > figures["large_fraction_of_peak"]["achieved_flops"]
        > 0
    )
    assert bench["info"]["device"] == "cpu"


def test_bench_refuses_cuda_without_cuda(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    done = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "bench.py"), "--device", "cuda"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )
    assert done.returncode == 2 and "CUDA is not available" in done.stderr
