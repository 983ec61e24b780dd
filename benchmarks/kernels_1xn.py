"""Benchmark the 1xN block-sparse conv kernel against dense ``F.conv2d`` on ResNet-50 layers.

For every layer, thread count (1 and 2), N and sparsity, prints the sparse time, the speedup over
the faster dense baseline (NCHW input as users have it, or channels_last input and weight), and
the effective GFLOP/s of the sparse kernel (kept FLOPs / time). Timings: warm-up, then the median
of repeats, with ``torch.set_num_threads``. Inputs are NCHW (the sparse op returns NCHW).

    python benchmarks/kernels_1xn.py            # full sweep (batch 1 and 8), ~10 minutes
    python benchmarks/kernels_1xn.py --quick    # N=16 only, batch 1, a few layers
    python benchmarks/kernels_1xn.py --write benchmarks/RESULTS_kernels.md
    python benchmarks/kernels_1xn.py --threads 1 --json t1.json   # then --merge t1.json t2.json
    python benchmarks/kernels_1xn.py --ns 16 --batches 8 --threads 2 --json b8t2.json
    python benchmarks/kernels_1xn.py --ns 16 --sparsities 0.5 0.75 --warm --runs 5  # the bars

With ``--runs K`` the whole sweep runs K times and every number is the median over the runs (the
bar table adds each cell's range): on the shared VM a cell near its bar flips between single
runs, and the batch-8 cells of the 56x56 layers move by up to 30% with the memory system's state.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import statistics
import subprocess
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from graphprune.kernels import onexn
from graphprune.kernels.masks import mask_1xn

__all__ = ["LAYERS", "Layer", "Row", "bar_table", "bench_layer", "main", "write_report"]


@dataclass(frozen=True)
class Layer:
    """A conv layer shape: in/out channels, kernel, input size, stride."""

    cin: int
    cout: int
    k: int
    hw: int
    stride: int = 1

    @property
    def name(self) -> str:
        s = f"/s{self.stride}" if self.stride != 1 else ""
        return f"{self.cin}->{self.cout} {self.k}x{self.k}@{self.hw}{s}"

    def flops(self, batch: int) -> float:
        ho = (self.hw + 2 * (self.k // 2) - self.k) // self.stride + 1
        return 2.0 * batch * self.cin * self.cout * self.k * self.k * ho * ho


LAYERS = [
    Layer(64, 64, 3, 56),
    Layer(256, 64, 1, 56),
    Layer(64, 256, 1, 56),
    Layer(128, 128, 3, 28),
    Layer(512, 128, 1, 28),
    Layer(256, 256, 3, 14),
    Layer(1024, 256, 1, 14),
    Layer(512, 512, 3, 7),
    Layer(2048, 512, 1, 7),
]


@dataclass(frozen=True)
class Row:
    """One measurement."""

    layer: str
    batch: int
    threads: int
    n: int
    sparsity: float
    sparse_ms: float
    dense_nchw_ms: float
    dense_cl_ms: float
    gflops: float
    speedup: float  # median over rounds of (faster dense time / sparse time) in that round

    @property
    def dense_ms(self) -> float:
        return min(self.dense_nchw_ms, self.dense_cl_ms)


def bench_layer(
    layer: Layer, batch: int, threads: int, ns, sparsities, repeats: int, warm: bool = False,
    shuffle: bool = True,
) -> list[Row]:
    """Time one layer dense (NCHW and channels_last) and at every (N, sparsity), interleaved."""
    torch.manual_seed(0)
    torch.set_num_threads(threads)
    conv = nn.Conv2d(layer.cin, layer.cout, layer.k, layer.stride, layer.k // 2)
    x = torch.randn(batch, layer.cin, layer.hw, layer.hw)
    w, b = conv.weight.detach(), conv.bias.detach()
    xc = x.contiguous(memory_format=torch.channels_last)
    wc = w.contiguous(memory_format=torch.channels_last)
    args = (conv.stride, conv.padding)
    cases = [(n, sp) for n in ns for sp in sparsities]
    mods = [onexn.Conv2d1xN.from_dense(conv, mask_1xn(w, n, sp), n) for n, sp in cases]
    fns = [lambda: F.conv2d(x, w, b, *args), lambda: F.conv2d(xc, wc, b, *args)]
    fns += [lambda m=m: m(x) for m in mods]
    rounds = onexn.time_rounds(fns, repeats=repeats, warm=warm, shuffle=shuffle)
    t_nchw, t_cl = statistics.median(rounds[0]), statistics.median(rounds[1])
    dense = rounds[0] if t_nchw <= t_cl else rounds[1]
    rows = []
    for (n, sp), m, ts in zip(cases, mods, rounds[2:]):
        t = statistics.median(ts)
        ratio = statistics.median(d / s for d, s in zip(dense, ts))
        gf = layer.flops(batch) * (m.kept / layer.cin) / t / 1e6
        rows.append(Row(layer.name, batch, threads, n, sp, t, t_nchw, t_cl, gf, ratio))
    return rows


def _cpu_busy(interval: float = 0.5) -> float:
    """Fraction of all CPUs busy over ``interval`` seconds (from /proc/stat; 0.0 if unknown)."""
    import time

    def snap():
        with open("/proc/stat") as f:
            vals = [int(v) for v in f.readline().split()[1:]]
        return sum(vals), vals[3] + vals[4]  # total, idle + iowait

    try:
        t0, i0 = snap()
        time.sleep(interval)
        t1, i1 = snap()
    except OSError:
        return 0.0
    return 1.0 - (i1 - i0) / max(1, t1 - t0)


def wait_quiet(max_wait: float, busy: float = 0.15) -> bool:
    """Wait up to ``max_wait`` s until other processes use < ``busy`` of the CPUs."""
    import time

    end = time.monotonic() + max_wait
    while True:
        if _cpu_busy() < busy:
            return True
        if time.monotonic() > end:
            return False


def machine_info() -> str:
    """CPU model, core count, torch version and kernel ISA."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
        model = next((ln.split(":", 1)[1].strip() for ln in out.splitlines()
                      if ln.startswith("Model name")), platform.processor())  # fmt: skip
    except OSError:
        model = platform.processor()
    import os

    return (
        f"- CPU: {model}, {os.cpu_count()} logical CPUs\n"
        f"- torch {torch.__version__}, kernel ISA: {onexn.isa()}\n"
        f"- dense baseline: the faster of F.conv2d on NCHW input and on channels_last "
        f"input+weight (oneDNN), same thread count"
    )


def table(rows: list[Row]) -> str:
    """Markdown table of all rows."""
    head = (
        "| layer | batch | thr | N | sparsity | sparse ms | dense ms (nchw / cl) | speedup "
        "| sparse GFLOP/s |\n|---|---|---|---|---|---|---|---|---|\n"
    )
    body = "".join(
        f"| {r.layer} | {r.batch} | {r.threads} | {r.n} | {r.sparsity:.3f} | {r.sparse_ms:.3f} "
        f"| {r.dense_nchw_ms:.3f} / {r.dense_cl_ms:.3f} | {r.speedup:.2f}x | {r.gflops:.0f} |\n"
        for r in rows
    )
    return head + body


def summary(rows: list[Row]) -> str:
    """Min / median speedup per (N, sparsity, kernel size, threads) against the bars."""
    out = [
        "| N | sparsity | kernel | thr | min speedup | median | bar |",
        "|---|---|---|---|---|---|---|",
    ]
    keys = sorted({(r.n, r.sparsity, r.layer.split()[1][:3], r.threads, r.batch) for r in rows})
    for n, sp, k, thr, b in keys:
        sel = sorted(r.speedup for r in rows
                     if (r.n, r.sparsity, r.layer.split()[1][:3], r.threads, r.batch)
                     == (n, sp, k, thr, b))  # fmt: skip
        bar = ""
        if n == 16 and sp == 0.75:
            bar = "3.0x" if k == "1x1" else "2.5x"
        elif n == 16 and sp == 0.5:
            bar = "1.6x"
        out.append(f"| {n} | {sp} | {k} (b{b}) | {thr} | {sel[0]:.2f}x | "
                   f"{sel[len(sel) // 2]:.2f}x | {bar} |")  # fmt: skip
    return "\n".join(out) + "\n"


def _print_row(r: Row) -> None:
    print(f"{r.layer:22s} b{r.batch} t{r.threads} N={r.n:2d} s={r.sparsity:.3f} "
          f"sparse {r.sparse_ms:7.3f} ms  dense {r.dense_ms:7.3f} ms  "
          f"{r.speedup:5.2f}x  {r.gflops:5.0f} GFLOP/s", flush=True)  # fmt: skip


def combine_runs(runs: list[list[Row]]) -> tuple[list[Row], dict[tuple, tuple[float, float]]]:
    """Rows of K runs of the same sweep -> one row per case with the median of every number over
    the runs, and each case's (min, max) speedup."""
    by_key: dict[tuple, list[Row]] = {}
    for rows in runs:
        for r in rows:
            by_key.setdefault(_key(r), []).append(r)
    out, ranges = [], {}
    for key, rs in by_key.items():
        nums = {f.name: statistics.median(getattr(r, f.name) for r in rs)
                for f in dataclasses.fields(Row) if f.type in (float, "float")}  # fmt: skip
        out.append(dataclasses.replace(rs[0], **nums))
        ranges[key] = (min(r.speedup for r in rs), max(r.speedup for r in rs))
    return out, ranges


def _key(r: Row) -> tuple:
    return (r.layer, r.batch, r.threads, r.n, r.sparsity)


def _bar(layer: str, sparsity: float) -> float:
    """The issue's per-layer bar: 1.6x at 50%; at 75% 3x on 1x1 layers and 2.5x on 3x3."""
    return 1.6 if sparsity == 0.5 else 3.0 if " 1x1" in layer else 2.5


def bars_met(rows: list[Row], n: int = 16) -> tuple[int, int]:
    """(cells meeting their bar, cells) among the 1xN rows at 50% and 75%."""
    cells = [r for r in rows if r.n == n and r.sparsity in (0.5, 0.75)]
    return sum(r.speedup >= _bar(r.layer, r.sparsity) for r in cells), len(cells)


def bar_table(rows: list[Row], n: int = 16, ranges: dict | None = None) -> str:
    """Per layer, the 1xN speedups the bars are about (1x1: 3x at 75%; 3x3: 2.5x; 1.6x at 50%);
    with ``ranges`` (from combine_runs) each cell also shows the range over the runs."""
    keys = sorted({(r.batch, r.threads) for r in rows if r.n == n})
    head = "| layer | " + " | ".join(f"b{b} t{t} 50% | b{b} t{t} 75%" for b, t in keys)
    out = [head + " |", "|---" * (1 + 2 * len(keys)) + "|"]
    for layer in dict.fromkeys(r.layer for r in rows):
        cells = []
        for b, t in keys:
            for sp in (0.5, 0.75):
                r = next((r for r in rows if _key(r) == (layer, b, t, n, sp)), None)
                if r is None:
                    cells.append("")
                    continue
                cell = f"{r.speedup:.2f}x {'ok' if r.speedup >= _bar(layer, sp) else 'MISS'}"
                if ranges and _key(r) in ranges:
                    lo, hi = ranges[_key(r)]
                    cell += f" ({lo:.2f}-{hi:.2f})"
                cells.append(cell)
        out.append(f"| {layer} | " + " | ".join(cells) + " |")
    met, total = bars_met(rows, n)
    return "\n".join(out) + f"\n\nBars met: {met} of {total} cells.\n"


NOTES = """## How it was measured

- Every round times dense NCHW, dense channels_last and each sparse module once, in a new
  seeded random order per round (`--no-shuffle`: fixed order; then the case right after dense
  channels_last ran up to 1.6x slower, even with `--warm`); 11 rounds after 3 warm-up rounds
  (`--repeats`). Times are medians; a speedup is the median over
  rounds of (faster dense time / sparse time) in the same round, which cancels slow load changes.
- The machine is a 2-vCPU VM shared with other sessions (and, judging by dense times that drift
  by up to 40% between runs, with other VMs). The run waited for the CPUs to be idle before each
  layer (`--wait-quiet`); repeated runs still differ by 10-20% per layer, more at batch 8.
- Cache state matters at batch 8 (the input of a 56x56 layer is 6-26 MB): in plain rounds the
  first sparse case runs right after dense channels_last, which read its own copy of the input,
  so it finds its input colder than the others do. `--warm` runs every function once, untimed,
  right before each timed call (every case then finds its input in L3, as a layer does right
  after the previous layer wrote it). Tables here are plain rounds unless a heading says
  otherwise; with `--warm` an earlier build gave a similar picture (not reported).
- Input is NCHW float32 (what users have); the sparse op reads it in place (1x1) or packs it
  into zero-padded planes (padding/stride; per block of rows inside the kernel when the batch
  is big), and returns NCHW.
- GFLOP/s counts only the kept (non-zero) multiply-adds, of a direct convolution.
- 3x3 stride-1 layers with at most 16x16 outputs in at least 32 tiles of 2x2 and at least 96
  kept input channels per group (14x14 at 50%, 7x7 at batch 8) run by Winograd
  F(2x2, 3x3) (`GP_1XN_WINO`, see `graphprune/kernels/onexn.py`): 16 multiplies per 2x2 outputs
  instead of 36, so their speedups are not bounded by dense time x (1 - sparsity), and their
  GFLOP/s (direct-conv FLOPs / time) can exceed what the kernel executes. Dense `F.conv2d`
  (oneDNN) runs direct convolution here.
"""


def write_report(path: str, rows: list[Row], ranges: dict | None = None) -> None:
    """Markdown report: machine, per-layer bars (with ``ranges``: each cell's range over the
    runs), summary, every measurement."""
    with open(path, "w") as f:
        f.write("# 1xN sparse conv kernel vs dense F.conv2d (ResNet-50 layers)\n\n")
        f.write(machine_info() + "\n\n" + NOTES)
        f.write("\n## 1x16 against the bars (speedup over the faster dense baseline)\n\n")
        f.write(bar_table(rows, ranges=ranges))
        f.write("\n## Summary over layers (min / median speedup)\n\n" + summary(rows))
        f.write("\n## All measurements\n\n" + table(rows))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="reduced sweep")
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--batches", type=int, nargs="+", default=None, help="default 1 8 (quick: 1)")
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--ns", type=int, nargs="+", default=None, help="default 4 8 16 32 (quick: 16)")
    ap.add_argument(
        "--sparsities", type=float, nargs="+", default=None,
        help="default 0.5 0.75 0.875 (quick: 0.5 0.75)",
    )  # fmt: skip
    ap.add_argument(
        "--wait-quiet", type=float, default=0.0,
        help="before each layer wait up to this many seconds for the machine to be idle",
    )  # fmt: skip
    ap.add_argument(
        "--quiet-busy", type=float, default=None,
        help="'idle' means all CPUs busy below this fraction (default: 0.1, or 0.55 for 1 thread)",
    )  # fmt: skip
    ap.add_argument(
        "--no-shuffle", dest="shuffle", action="store_false",
        help="time the functions in the same order every round (default: seeded random order)",
    )  # fmt: skip
    ap.add_argument(
        "--warm", action="store_true",
        help="run each function once, untimed, right before each of its timed calls",
    )  # fmt: skip
    ap.add_argument(
        "--malloc", choices=["pinned", "default"], default="pinned",
        help="pinned (default): fix glibc's malloc thresholds first (cost.pin_malloc), so a "
             "25 MB output does not page-fault on some calls and not on others",
    )  # fmt: skip
    ap.add_argument("--runs", type=int, default=1,
                    help="repeat the whole sweep this many times; report medians over the runs")
    ap.add_argument("--json", default=None, help="also save the rows as JSON to this path")
    ap.add_argument("--merge", nargs="+", default=None, help="report from saved JSON files only")
    ap.add_argument("--write", default=None, help="write a markdown report to this path")
    a = ap.parse_args(argv)
    if a.merge:
        rows = []
        for path in a.merge:
            with open(path) as f:
                rows += [Row(**d) for d in json.load(f)]
        print(summary(rows))
        if a.write:
            write_report(a.write, rows)
        return
    if not onexn.available():
        raise SystemExit("the 1xN C++ kernel is not available; nothing to benchmark")
    if a.malloc == "pinned":
        from graphprune.cost import pin_malloc

        print(f"# malloc pinned: {pin_malloc()}")
    ns = a.ns or ((16,) if a.quick else (4, 8, 16, 32))
    sps = a.sparsities or ((0.5, 0.75) if a.quick else (0.5, 0.75, 0.875))
    layers = LAYERS[::2] if a.quick else LAYERS
    batches = a.batches or ((1,) if a.quick else (1, 8))
    old = torch.get_num_threads()
    runs: list[list[Row]] = []
    for run in range(a.runs):
        if a.runs > 1:
            print(f"# run {run + 1} of {a.runs}", flush=True)
        rows: list[Row] = []
        for batch in batches:
            for threads in a.threads:
                for layer in layers:
                    limit = a.quiet_busy or (0.55 if threads == 1 else 0.1)
                    if a.wait_quiet and not wait_quiet(a.wait_quiet, limit):
                        print(f"warning: machine busy while timing {layer.name}", flush=True)
                    new = bench_layer(layer, batch, threads, ns, sps, a.repeats, a.warm, a.shuffle)
                    for r in new:
                        _print_row(r)
                    rows += new
        runs.append(rows)
    torch.set_num_threads(old)
    rows, ranges = combine_runs(runs)
    if a.runs > 1:
        print(f"\n# medians over {a.runs} runs (bar cells: median, range over the runs)\n")
        print(bar_table(rows, ranges=ranges))
        print(f"Bars met in each run: {', '.join(str(bars_met(r)[0]) for r in runs)}\n")
    print(summary(rows))
    if a.json:
        with open(a.json, "w") as f:
            json.dump([dataclasses.asdict(r) for r in rows], f)
    if a.write:
        write_report(a.write, rows, ranges if a.runs > 1 else None)


if __name__ == "__main__":
    main()
