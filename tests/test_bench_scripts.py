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
