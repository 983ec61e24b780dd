"""The CLI end to end on a small model in a temp dir: prune / sparsify / bench / table / analyze,
saved programs as MODEL, JSON output, and bad input (exit code != 0, one line on stderr)."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import graphprune as gp
from graphprune.cli import CONFIG_FLAGS, main

torch.set_num_threads(1)

TINY = textwrap.dedent("""
    import torch.nn as nn

    def small():
        return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                             nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(),
                             nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 16))

    def wide():  # convs dominate its latency, so a latency target has room below the fixed ops
        return nn.Sequential(nn.Conv2d(3, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(),
                             nn.Conv2d(64, 128, 3, padding=1), nn.ReLU(),
                             nn.Conv2d(128, 128, 3, padding=1), nn.ReLU(),
                             nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(128, 16))

    def pointwise():  # 1x1 convs and a linear, dims multiples of 64 (what the 2:4 kernels take)
        return nn.Sequential(nn.Conv2d(64, 128, 1), nn.BatchNorm2d(128), nn.ReLU(),
                             nn.Conv2d(128, 64, 1), nn.ReLU(),
                             nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 64))
""")
SHAPE = "2,3,16,16"
WIDE = "2,3,32,32"


@pytest.fixture()
def work(tmp_path, monkeypatch):
    (tmp_path / "tiny.py").write_text(TINY)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_prune_json_out_plot_and_print_after(work, capsys):
    code, out, err = run(capsys, "prune", "tiny.py:small", "--input", SHAPE, "--flops", "0.5",
                         "--round-to", "2", "--out", "slim.pt2", "--plot", "p.png",
                         "--print-after", "trace", "--json")
    assert code == 0, err
    info = json.loads(out)
    assert info["after"]["macs"] <= 0.5 * info["before"]["macs"] + 1
    assert info["after"]["params"] < info["before"]["params"]
    assert "fp64" in info["verify"]
    assert (work / "slim.pt2").exists() and (work / "p.png").stat().st_size > 1000
    assert gp.Plan.from_json((work / "slim.pt2.plan.json").read_text()).keep
    assert "graph after trace" in err  # side output goes to stderr under --json
    assert info["layers"][0]["c_out"] == 16


def test_saved_program_as_model_sparsify_bench_analyze(work, capsys):
    assert run(capsys, "prune", "tiny.py:small", "--input", SHAPE, "--uniform", "0.5",
               "--out", "slim.pt2")[0] == 0
    code, out, err = run(capsys, "sparsify", "slim.pt2", "--pattern", "1x8", "--sparsity", "0.5",
                         "--no-check-speed", "--out", "fast.pt2", "--json")
    assert code == 0, err
    rep = json.loads(out)
    assert rep["sparsified"] >= 1 and "verify" in rep
    fast = gp.load(work / "fast.pt2")
    assert fast(torch.randn(5, 3, 16, 16)).shape == (5, 16)  # dynamic batch survives
    code, out, err = run(capsys, "bench", "tiny.py:small", "slim.pt2", "fast.pt2", "--input",
                         "4,3,16,16", "--repeats", "3", "--warmup", "1", "--threads", "1", "--json")
    assert code == 0, err
    b = json.loads(out)
    assert b["threads"] == 1 and b["repeats"] == 3 and len(b["models"]) == 3
    assert [m["model"] for m in b["models"]] == ["tiny.py:small", "slim.pt2", "fast.pt2"]
    assert all(m["median_ms"] > 0 for m in b["models"]) and len(b["speedups"]) == 2
    assert len(b["output_rel_diffs"]) == 2 and all(d > 0 for d in b["output_rel_diffs"])
    code, out, err = run(capsys, "analyze", "slim.pt2", "--json")
    assert code == 0, err
    assert json.loads(out)["groups"]


def test_table_measure_then_latency_target(work, capsys):
    code, out, err = run(capsys, "table", "measure", "tiny.py:wide", "--input", WIDE,
                         "--out", "cpu.json", "--threads", "1", "--repeats", "3",
                         "--no-overheads", "--no-watch-load", "--json")
    assert code == 0, err
    info = json.loads(out)
    assert info["signatures"] >= 2 and (work / "cpu.json").exists()
    assert info["context"] == "fitted on the model"
    code, out, err = run(capsys, "prune", "tiny.py:wide", "--input", WIDE, "--latency", "0.8",
                         "--table", "cpu.json", "--threads", "1", "--json")
    assert code == 0, err
    info = json.loads(out)
    assert all("ms_after" in r for r in info["layers"])
    assert info["plan_meta"]["predicted_cost"] <= info["plan_meta"]["budget"] * (1 + 1e-9)
    # a table measured under another thread count is refused with a reason
    code, _, err = run(capsys, "prune", "tiny.py:wide", "--input", WIDE, "--latency", "0.9",
                       "--table", "cpu.json", "--threads", "2")
    assert code == 3 and "threads" in err


@pytest.mark.parametrize("argv, code, needle", [
    (["prune", "tiny.py:nope", "--input", SHAPE], 3, "no factory 'nope'"),
    (["prune", "missing.py:small", "--input", SHAPE], 3, "no such file"),
    (["prune", "tiny.py:small", "--input", "2,5,16,16"], 3, "fails on inputs of shape"),
    (["prune", "tiny.py:small", "--input", SHAPE, "--flops", "0.001"], 4, "cannot be met"),
    (["prune", "tiny.py:small", "--input", "2,x"], 2, "comma-separated"),
    (["prune", "tiny.py:small"], 2, "--input is required"),
    (["prune", "tiny.py:small", "--input", SHAPE, "--table", "t.json"], 2, "--latency"),
    (["sparsify", "tiny.py:small", "--input", SHAPE, "--pattern", "3:7"], 3, "unknown sparsity"),
    (["bench", "tiny.py:small", "nothere.pt2", "--input", SHAPE], 3, "no such file"),
])
def test_bad_input_exit_codes_and_one_line(work, capsys, argv, code, needle):
    got, out, err = run(capsys, *argv)
    assert got == code
    assert needle in err
    assert len(err.strip().splitlines()) == 1 and err.startswith("graphprune: error: ")


def test_console_script_exit_code(work):
    exe = os.path.join(os.path.dirname(sys.executable), "graphprune")
    cmd = [exe] if os.path.exists(exe) else [sys.executable, "-m", "graphprune.cli"]
    r = subprocess.run(cmd + ["prune", "tiny.py:small", "--input", "2,5,16,16"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 3
    assert len(r.stderr.strip().splitlines()) == 1 and "fails on inputs" in r.stderr
    r = subprocess.run(cmd + ["prune"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2


def test_flags_map_onto_prune_config():
    fields = {f.name for f in dataclasses.fields(gp.PruneConfig)}
    not_cli = {"data", "loss_fn", "extra"}  # Python objects: the API only
    assert set(CONFIG_FLAGS) | {"target", "verify"} == fields - not_cli
    flags = [flag for flag, _, _ in CONFIG_FLAGS.values()]
    assert len(flags) == len(set(flags))


def test_sparsify_fusion_flags(work, capsys):
    """`sparsify` fuses by default (the first conv absorbs its BN and ReLU), `--no-fuse` keeps
    them apart, `--keep-first-last` leaves the first conv and the last linear dense."""
    args = ["sparsify", "tiny.py:small", "--input", SHAPE, "--pattern", "1x8", "--sparsity", "0.5",
            "--no-check-speed", "--json"]
    code, out, err = run(capsys, *args)
    assert code == 0, err
    layers = {r["layer"]: r for r in json.loads(out)["layers"]}
    assert layers["0"]["fused"] == "bn+relu" and layers["3"]["fused"] == "relu"
    code, out, err = run(capsys, *args, "--no-fuse")
    assert code == 0, err
    assert not json.loads(out)["fused"]
    code, out, err = run(capsys, *args, "--keep-first-last")
    assert code == 0, err
    layers = {r["layer"]: r for r in json.loads(out)["layers"]}
    assert layers["0"]["pattern"] == layers["7"]["pattern"] == "dense"
    assert layers["3"]["pattern"] == "1x8"


def test_sparsify_24_in_half_precision_on_a_device(work, capsys, semi24_cpu):
    """`--dtype fp16` (and `--device`) put the model where the 2:4 kernels run: here the CPU
    stand-in of tests/semi24_cpu.py; both 1x1 convs and the linear go onto the kernel path, the
    first after its BatchNorm folds in; a device that is not there is bad input (exit 3)."""
    args = ["sparsify", "tiny.py:pointwise", "--input", "2,64,8,8", "--pattern", "2:4", "--json"]
    code, out, err = run(capsys, *args, "--dtype", "fp16", "--device", "cpu")
    assert code == 0, err
    rep = json.loads(out)
    held = {r["layer"]: r["held_as"] for r in rep["layers"]}
    assert set(held) == {"0", "3", "7"} and all(
        h.startswith("to_sparse_semi_structured") for h in held.values()), held
    assert rep["fused"] == 1 and "max rel err fp16" in rep["verify"]
    code, out, err = run(capsys, *args)  # fp32: masked dense, the report says why
    assert code == 0, err
    assert all("needs fp16/bf16" in r["held_as"] for r in json.loads(out)["layers"])
    if not torch.cuda.is_available():
        code, out, err = run(capsys, *args, "--device", "cuda")
        assert code == 3 and "no CUDA device" in err and len(err.strip().splitlines()) == 1, err
