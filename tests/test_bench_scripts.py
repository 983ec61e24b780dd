"""Benchmark scripts that cannot measure here still run end to end (their smoke modes)."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))


def test_semi24_gpu_smoke_runs_and_prints_no_numbers(capsys):
    """The 2:4 GPU benchmark on the CPU: every step runs (its own checks included: each sparse
    form equals its masked dense one, im2col equals the conv), and it prints no timing."""
    import semi24_gpu

    semi24_gpu.main(["--smoke"])
    out = capsys.readouterr().out
    assert "SMOKE RUN" in out and out.count("\n|---|") == 3
    rows = [ln for ln in out.splitlines() if ln.startswith("| ") and "ms" not in ln]
    assert len(rows) >= 6 and all(ln.rstrip(" |").endswith("–") for ln in rows)
    assert "| ResNet-50 | 1 | 0 / " in out


def test_semi24_gpu_end_to_end_table_on_the_kernel_path(semi24_cpu, capsys):
    """The end-to-end table's own code on the 2:4 kernel path (fp16, torch's compressed tensor
    with its product done densely on the CPU: tests/semi24_cpu.py): ViT and ResNet-50 (whose
    BatchNorms used to make this raise) sparsify, put layers on the kernels and run."""
    import semi24_gpu
    import torch

    semi24_gpu.e2e_table([1], "cpu", torch.float16, rounds=1, smoke=True)
    rows = [ln.split(" | ") for ln in capsys.readouterr().out.splitlines()
            if ln.startswith("| ViT") or ln.startswith("| ResNet")]
    assert len(rows) == 2
    for row in rows:
        on_kernels, masked = (int(v) for v in row[2].split(" / "))
        assert on_kernels > 0, row
