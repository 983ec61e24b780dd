"""Latency-table benchmark: measurement time and prediction error on a ResNet-50.

For each batch size: collect the conv / linear signatures of a ResNet-50 (224×224), measure a
:class:`graphprune.cost.LatencyTable` for them, then

1. time the measurement;
2. measure held-out ``(c_in, c_out)`` points (random multiples of ``round_to`` off the measured
   grid) directly and compare with the table's prediction, with and without the separable
   staircase correction; repeat some stored points to get the noise floor;
3. compare predicted and measured end-to-end latency of the dense model and of slimmed variants
   (layers + op overheads + per-module-call constant).

Prints Markdown; ``--write PATH`` also saves it. Usage::

    python benchmarks/latency_table.py --batch 1 8 --heldout 12
"""

from __future__ import annotations

import argparse
import platform
import random
import sys
import time

import numpy as np
import torch
import torch.nn as nn

from graphprune.cost import (
    LatencyTable,
    LoadProbe,
    estimate_model_latency,
    measure_latency,
    measure_layer_points,
    measure_watched,
    model_cost_items,
)

# ----------------------------------------------------------------------------------------------
# A ResNet-50 with arbitrary widths (torchvision layout, stride on the 3×3 conv)
# ----------------------------------------------------------------------------------------------


class Bottleneck(nn.Module):
    """1×1 -> 3×3 -> 1×1 bottleneck with explicit widths."""

    def __init__(self, c_in: int, w1: int, w2: int, c_out: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, w1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(w1)
        self.conv2 = nn.Conv2d(w1, w2, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(w2)
        self.conv3 = nn.Conv2d(w2, c_out, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(c_out)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or c_in != c_out:
            self.downsample = nn.Sequential(
                nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out)
            )

    def forward(self, x):
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity
        return self.relu(out)


BLOCKS = (3, 4, 6, 3)
STAGE_OUT = (256, 512, 1024, 2048)
STAGE_MID = (64, 128, 256, 512)


def dense_widths() -> dict:
    """Widths of the dense ResNet-50: stem, stage outputs, per-block (w1, w2)."""
    return {
        "stem": 64,
        "out": list(STAGE_OUT),
        "mid": [[(m, m)] * n for m, n in zip(STAGE_MID, BLOCKS)],
    }


class ResNet50(nn.Module):
    """ResNet-50 for 224×224 inputs with the widths of :func:`dense_widths` (or slimmed)."""

    def __init__(self, widths: dict | None = None, num_classes: int = 1000):
        super().__init__()
        w = widths or dense_widths()
        self.conv1 = nn.Conv2d(3, w["stem"], 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(w["stem"])
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        layers, c = [], w["stem"]
        for s, (out, mids) in enumerate(zip(w["out"], w["mid"])):
            blocks = []
            for b, (w1, w2) in enumerate(mids):
                blocks.append(Bottleneck(c, w1, w2, out, 2 if (b == 0 and s > 0) else 1))
                c = out
            layers.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3, self.layer4 = layers
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(c, num_classes)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def slim_widths(rng: random.Random, lo: float, hi: float, step: int = 8) -> dict:
    """Random kept fractions in [lo, hi] per channel group, rounded to multiples of ``step``."""

    def keep(c):
        return max(step, int(round(c * rng.uniform(lo, hi) / step)) * step)

    return {
        "stem": keep(64),
        "out": [keep(c) for c in STAGE_OUT],
        "mid": [[(keep(m), keep(m)) for _ in range(n)] for m, n in zip(STAGE_MID, BLOCKS)],
    }


# ----------------------------------------------------------------------------------------------
# Load on the machine (other processes spoil timings: the box may be shared)
# ----------------------------------------------------------------------------------------------


class LoadMonitor:
    """Share of the machine's CPUs used by *other* processes while a block runs."""

    def __enter__(self):
        self.probe = LoadProbe()
        return self

    def __exit__(self, *exc):
        self.other = self.probe.share()
        return False


def wait_quiet(limit_s: float) -> float:
    """Wait (up to ``limit_s``) until other processes go quiet; returns their last CPU share."""
    return LoadProbe().wait_quiet(limit_s, step_s=3.0)


# ----------------------------------------------------------------------------------------------
# Measurements
# ----------------------------------------------------------------------------------------------


def collect_sigs(model: nn.Module, x: torch.Tensor) -> list:
    """``[(sig, c_in, c_out), ...]`` of the model's conv / linear layers."""
    return [(it.sig, it.c_in, it.c_out) for it in model_cost_items(model, x) if it.kind == "layer"]


def heldout_points(table: LatencyTable, sig, n: int, rng: random.Random) -> list[tuple[int, int]]:
    """Random grid-aligned points that were not measured (off the coarse grid and both rows)."""
    t = table.tables[sig]
    if t.mode != "separable":
        return []
    fin, fout = t.fine_in[:-1], t.fine_out[:-1]
    cin, cout = set(t.coarse_in), set(t.coarse_out)
    pts = set()
    for _ in range(50 * n):
        if len(pts) >= n:
            break
        p = (rng.choice(fin), rng.choice(fout))
        if not (p[0] in cin and p[1] in cout):
            pts.add(p)
    return sorted(pts)


def rel_errors(pred: list[float], meas: list[float]) -> np.ndarray:
    return np.abs(np.asarray(pred) - np.asarray(meas)) / np.asarray(meas)


def fmt_err(e: np.ndarray) -> str:
    if len(e) == 0:
        return "-"
    return (
        f"{100 * np.median(e):.1f}% / {100 * np.mean(e):.1f}% / {100 * np.percentile(e, 90):.1f}%"
    )


def table_errors(table: LatencyTable, n: int, rng: random.Random, lines: list) -> dict:
    """Held-out prediction error per signature; returns pooled error arrays."""
    lines += [
        "| signature | c_in×c_out max | mode | points | s | re-measured (load / spike) | held-out"
        " | err corrected (med/mean/p90) | err coarse-only | noise (re-measure) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    pooled = {"corr": [], "coarse": [], "noise": []}
    for sig in table.sigs:
        d = table.describe(sig)
        pts = heldout_points(table, sig, n, rng)
        t = table.tables[sig]
        again = [(t.fine_in[-1], c) for c in rng.sample(t.fine_out, min(4, len(t.fine_out)))]
        direct = measure_layer_points(sig, pts + again)  # one shuffled batch, table protocol
        meas = [direct[p] for p in pts]
        corr = [table.lookup(sig, ci, co) for ci, co in pts]
        coarse = [float(table.lookup_grid(sig, [ci], [co], correct=False)[0, 0]) for ci, co in pts]
        noise = rel_errors([table.lookup(sig, *p) for p in again], [direct[p] for p in again])
        e_corr, e_coarse = rel_errors(corr, meas), rel_errors(coarse, meas)
        pooled["corr"] += list(e_corr)
        pooled["coarse"] += list(e_coarse)
        pooled["noise"] += list(noise)
        lines.append(
            f"| {sig.short()} | {d['c_in_max']}×{d['c_out_max']} | {d['mode']} | {d['points']} | "
            f"{d['seconds']:.1f} | {d['loaded']} / {d['remeasured']} | {len(pts)} | "
            f"{fmt_err(e_corr)} | {fmt_err(e_coarse)} | "
            f"{fmt_err(noise)} |"
        )
    pooled = {k: np.asarray(v) for k, v in pooled.items()}
    lines += [
        "",
        f"Pooled held-out error (median / mean / p90): corrected **{fmt_err(pooled['corr'])}**, "
        f"coarse grid only {fmt_err(pooled['coarse'])}; re-measuring stored points "
        f"{fmt_err(pooled['noise'])} (noise floor).",
        "",
    ]
    return pooled


def measure_models(models: dict, x: torch.Tensor, rounds: int = 3) -> dict[str, tuple]:
    """Median over ``rounds`` interleaved rounds (each the median of 20 runs, re-measured under
    load) of each model's latency, with the spread (max - min) of the rounds."""
    points = [(name, r) for r in range(rounds) for name in models]

    def one(p):
        return measure_latency(models[p[0]], (x,), warmup=5, repeats=20)[0]

    values, _ = measure_watched(points, one, LoadProbe(), chunk_s=0)
    out = {}
    for name in models:
        v = [values[(name, r)] for r in range(rounds)]
        out[name] = (float(np.median(v)), max(v) - min(v))
    return out


CALIBRATIONS = {
    "additive, fit on dense": (["dense"], "additive"),
    "scale + per-op, fit on dense & uniform 0.50": (["dense", "uniform 0.50"], "both"),
}


def end_to_end(table: LatencyTable, batch: int, variants: int, lines: list) -> dict:
    """Predicted vs measured latency of the dense ResNet-50 and slimmed variants, raw and with
    each calibration of :data:`CALIBRATIONS` (errors reported on the models not fitted on)."""
    rng = random.Random(1)
    configs = [("dense", None)]
    configs += [(f"uniform {f:.2f}", slim_widths(random.Random(0), f, f)) for f in (0.75, 0.5)]
    configs += [(f"random [0.25,1] #{i}", slim_widths(rng, 0.25, 1.0)) for i in range(variants)]
    x = torch.randn(batch, 3, 224, 224)
    models = {name: ResNet50(widths).eval() for name, widths in configs}
    measured = measure_models(models, x)
    raw = {n: estimate_model_latency(m, x, table, calibrated=False) for n, m in models.items()}
    preds, fits = {}, {}
    for label, (names, fit) in CALIBRATIONS.items():
        pairs = [(models[n], x) for n in names]
        fits[label] = table.calibrate(pairs, fit=fit, measured_ms=[measured[n][0] for n in names])
        preds[label] = {n: estimate_model_latency(m, x, table)[0] for n, m in models.items()}
    lines += ["Calibrations (`LatencyTable.calibrate`):", ""]
    for label, cal in fits.items():
        lines.append(
            f"- {label}: scale {cal['scale']:.3f}, per-op {1e3 * cal['per_op_ms']:.1f} µs "
            f"× {cal['fitted_on'][0]['ops']} ops"
        )
    head = " | ".join(f"{k} | error" for k in CALIBRATIONS)
    lines += [
        "",
        f"| model | GMACs | measured ms (spread) | layers | raw prediction | error | {head} |",
        "|---" * (6 + 2 * len(CALIBRATIONS)) + "|",
    ]
    errs = {k: [] for k in ["raw", *CALIBRATIONS]}
    for name in models:
        meas, spread = measured[name]
        total, items = raw[name]
        layers = sum(it.ms for it in items if it.kind == "layer")
        gmacs = sum(_macs(it) for it in items) / 1e9
        cells = [f"{total:.2f} | {100 * (total / meas - 1):+.1f}%"]
        errs["raw"].append(abs(total / meas - 1))
        for label, (names, _) in CALIBRATIONS.items():
            p = preds[label][name]
            mark = " (fit)" if name in names else ""
            cells.append(f"{p:.2f} | {100 * (p / meas - 1):+.1f}%{mark}")
            if not mark:
                errs[label].append(abs(p / meas - 1))
        lines.append(
            f"| {name} | {gmacs:.2f} | {meas:.2f} ({spread:.2f}) | {layers:.2f} | "
            + " | ".join(cells)
            + " |"
        )
    lines += ["", "Max / mean |error| on the models not fitted on:", ""]
    for k, e in errs.items():
        lines.append(f"- {k}: **{100 * max(e):.1f}%** / {100 * np.mean(e):.1f}%")
    lines.append("")
    return errs


_ATEN = {
    "layer": ("aten::conv2d", "aten::linear"),
    "batch_norm": ("aten::batch_norm",),
    "relu_": ("aten::relu_",),
    "add": ("aten::add", "aten::add_"),
    "max_pool2d": ("aten::max_pool2d",),
    "avg_pool2d": ("aten::adaptive_avg_pool2d",),
}


def breakdown(table: LatencyTable, batch: int, lines: list) -> None:
    """Predicted vs profiled (torch.profiler, CPU time incl. children) ms per op kind of the
    dense model: where the composition errs."""
    from torch.profiler import ProfilerActivity, profile

    model, x = ResNet50().eval(), torch.randn(batch, 3, 224, 224)
    _, items = estimate_model_latency(model, x, table)
    with torch.inference_mode():
        for _ in range(3):
            model(x)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(5):
                model(x)
    ev = {e.key: e.cpu_time_total / 5e3 for e in prof.key_averages()}
    lines += ["| op kind | predicted ms | profiled ms |", "|---|---|---|"]
    for kind, names in _ATEN.items():
        pred = sum(it.ms for it in items if it.kind == kind)
        lines.append(f"| {kind} | {pred:.2f} | {sum(ev.get(n, 0.0) for n in names):.2f} |")
    lines.append("")


def _macs(item) -> int:
    from graphprune.cost import macs

    return macs(item.sig, item.c_in, item.c_out) if item.kind == "layer" else 0


def machine_info() -> list[str]:
    from graphprune.cost import device_name

    return [
        f"- device: `{device_name('cpu')}`; {platform.platform()}",
        f"- torch {torch.__version__}, threads {torch.get_num_threads()}, python "
        f"{sys.version.split()[0]}",
    ]


def measure_section(sigs: list, batch: int, args, lines: list) -> LatencyTable:
    """Measure the table (timed), then its held-out prediction error."""
    load0 = wait_quiet(args.wait_quiet)
    with LoadMonitor() as mon:
        t0 = time.perf_counter()
        table = LatencyTable.measure(
            sigs,
            round_to=args.round_to,
            progress=not args.quiet,
            coarse=args.coarse,
            overheads=False,
        )
        t_table = time.perf_counter() - t0
        t0 = time.perf_counter()
        max_numel = max(2**20, batch * 64 * 112 * 112)
        table.measure_overheads(max_numel=max_numel, progress=not args.quiet)
        t_ovh = time.perf_counter() - t0
    points = sum(table.describe(s)["points"] for s in table.sigs)
    again = sum(table.describe(s)["remeasured"] for s in table.sigs)
    lines += [
        f"Measurement: **{t_table:.0f} s** for {points} points (layer tables; {again} spikes "
        f"re-measured), {t_ovh:.0f} s for op overheads. Other processes used "
        f"{100 * mon.other:.0f}% of the CPUs meanwhile ({100 * load0:.0f}% just before).",
        "",
    ]
    with LoadMonitor() as mon:
        table_errors(table, args.heldout, random.Random(batch), lines)
    lines += [
        f"(other processes' CPU share during the held-out checks: {100 * mon.other:.0f}%)",
        "",
    ]
    return table


def run_batch(batch: int, args, lines: list) -> None:
    x = torch.randn(batch, 3, 224, 224)
    sigs = collect_sigs(ResNet50().eval(), x)
    distinct = {s for s, _, _ in sigs}
    lines += [
        f"## ResNet-50, 224×224, batch {batch}",
        "",
        f"{len(sigs)} conv/linear layers, {len(distinct)} distinct signatures.",
        "",
    ]
    if args.load:
        path = f"{args.load}-b{batch}.json"
        table = LatencyTable.load(path)
        lines += [f"Table loaded from `{path}` (measured earlier; see above).", ""]
    else:
        table = measure_section(sigs, batch, args, lines)
    wait_quiet(args.wait_quiet)
    with LoadMonitor() as mon:
        end_to_end(table, batch, args.variants, lines)
        breakdown(table, batch, lines)
    if args.save:
        table.save(f"{args.save}-b{batch}.json")
    lines += [
        f"(other processes' CPU share during the end-to-end runs: {100 * mon.other:.0f}%)",
        "",
    ]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batch", type=int, nargs="+", default=[1])
    p.add_argument("--heldout", type=int, default=12, help="held-out points per signature")
    p.add_argument("--variants", type=int, default=4, help="random slimmed models")
    p.add_argument("--round-to", type=int, default=8)
    p.add_argument("--coarse", type=int, default=9)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--save", default=None, help="save tables as PREFIX-b<batch>.json")
    p.add_argument("--load", default=None, help="load PREFIX-b<batch>.json instead of measuring")
    p.add_argument("--write", default=None, help="also write the Markdown to this file")
    p.add_argument("--quiet", action="store_true")
    p.add_argument(
        "--wait-quiet",
        type=float,
        default=0.0,
        help="wait up to this many seconds for other processes to go quiet before timing",
    )
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    lines = ["# Latency tables: ResNet-50", "", *machine_info(), ""]
    print("\n".join(lines), flush=True)
    for b in args.batch:
        start = len(lines)
        run_batch(b, args, lines)
        print("\n".join(lines[start:]), flush=True)
    if args.write:
        with open(args.write, "w") as f:
            f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
