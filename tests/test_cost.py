"""Tests of graphprune.cost: analytic costs, latency tables, op overheads, model composition."""

from __future__ import annotations

import json
import math
import warnings

import numpy as np
import pytest
import torch
import torch.nn as nn
from torch.utils.flop_counter import FlopCounterMode

from graphprune import cost
from graphprune.cost import (
    LatencyTable,
    LatencyTableMismatch,
    LayerSig,
    activation_bytes,
    estimate_model_latency,
    flops,
    macs,
    measure_latency,
    model_cost_items,
    output_spatial,
    params,
    sig_from_module,
)

# ----------------------------------------------------------------------------------------------
# Analytic costs
# ----------------------------------------------------------------------------------------------


def test_conv_macs_by_hand():
    # 3x3 conv, stride 2, pad 1, 56x56 -> 28x28, 64 -> 128, batch 2
    sig = LayerSig("conv2d", (3, 3), (2, 2), (1, 1), spatial=(56, 56), batch=2, bias=True)
    assert output_spatial(sig) == (28, 28)
    assert macs(sig, 64, 128) == 2 * 28 * 28 * 128 * 64 * 9
    assert flops(sig, 64, 128) == 2 * macs(sig, 64, 128)
    assert params(sig, 64, 128) == 128 * 64 * 9 + 128


def test_dilated_and_unpadded_output_size():
    sig = LayerSig("conv2d", (3, 5), (1, 2), (0, 1), (2, 1), spatial=(20, 21))
    # H: (20 - 2*2 - 1)//1 + 1 = 16 ; W: (21 + 2 - 4 - 1)//2 + 1 = 10
    assert output_spatial(sig) == (16, 10)
    assert macs(sig, 4, 6) == 16 * 10 * 6 * 4 * 15


def test_depthwise_and_grouped_by_hand():
    dw = LayerSig("conv2d", (3, 3), padding=(1, 1), groups="depthwise", spatial=(14, 14))
    assert macs(dw, 32, 32) == 14 * 14 * 32 * 9
    assert params(dw, 32, 32) == 32 * 9 + 32
    assert macs(dw, 32, 64) == 14 * 14 * 64 * 9  # channel multiplier 2
    g = LayerSig("conv2d", (3, 3), padding=(1, 1), groups="g=4", spatial=(14, 14), bias=False)
    assert macs(g, 64, 128) == 14 * 14 * 128 * 16 * 9
    assert params(g, 64, 128) == 128 * 16 * 9
    with pytest.raises(ValueError):
        macs(g, 62, 128)


def test_linear_and_matmul_by_hand():
    lin = LayerSig("linear", spatial=(197,), batch=4)
    assert macs(lin, 768, 3072) == 4 * 197 * 768 * 3072
    assert params(lin, 768, 3072) == 768 * 3072 + 3072
    mm = LayerSig("matmul", spatial=(197,), batch=48)
    assert macs(mm, 64, 197) == 48 * 197 * 64 * 197
    assert params(mm, 64, 197) == 0
    assert activation_bytes(lin, 768, 3072) == 4 * 197 * 3072 * 4


def test_sig_normalisation_and_validation():
    a = LayerSig("conv2d", kernel=(3,), spatial=(8, 8), groups=1)
    b = LayerSig("conv2d", kernel=[3, 3], stride=(1, 1), padding=(0, 0), spatial=[8, 8])
    assert a == b and hash(a) == hash(b)
    assert LayerSig("conv2d", kernel=(1,), spatial=(4, 4), groups="g=1").groups == "1"
    assert LayerSig.from_dict(json.loads(json.dumps(a.to_dict()))) == a
    for bad in (
        dict(op="conv9d"),
        dict(op="conv2d", spatial=(8, 8)),  # no kernel
        dict(op="conv2d", kernel=(3, 3), spatial=(8,)),
        dict(op="linear", kernel=(3,)),
        dict(op="conv2d", kernel=(3, 3), spatial=(8, 8), groups="two"),
    ):
        with pytest.raises(ValueError):
            LayerSig(**bad)


MODULES = [
    (nn.Conv2d(16, 32, 3, stride=2, padding=1), (2, 16, 15, 17)),
    (nn.Conv2d(16, 32, 3, padding=2, dilation=2, bias=False), (1, 16, 12, 12)),
    (nn.Conv2d(32, 32, 3, padding=1, groups=32), (1, 32, 10, 10)),  # depthwise
    (nn.Conv2d(16, 48, 5, padding=2, groups=16), (1, 16, 9, 9)),  # depthwise x3
    (nn.Conv2d(32, 64, 3, groups=4), (3, 32, 11, 11)),  # grouped
    (nn.Conv2d(8, 8, 3, padding="same"), (1, 8, 7, 7)),
    (nn.Conv1d(12, 24, 5, stride=2, padding=1), (2, 12, 40)),
    (nn.Conv3d(4, 8, 3, padding=1), (1, 4, 5, 6, 7)),
    (nn.ConvTranspose2d(8, 12, 3, stride=2, padding=1, groups=4), (2, 8, 5, 5)),
    (nn.Linear(64, 10), (5, 64)),
    (nn.Linear(64, 96, bias=False), (2, 7, 9, 64)),
]


@pytest.mark.parametrize("module,shape", MODULES, ids=lambda v: type(v).__name__)
def test_costs_match_real_modules(module, shape):
    """params == the module's parameter count; flops == torch's FlopCounterMode; the output
    spatial size matches the module's output."""
    sig, ci, co = sig_from_module(module, shape)
    assert params(sig, ci, co) == sum(p.numel() for p in module.parameters())
    x = torch.randn(shape)
    with FlopCounterMode(display=False) as fc:
        y = module(x)
    assert flops(sig, ci, co) == fc.get_total_flops()
    if sig.op.startswith("conv"):
        assert tuple(y.shape[2:]) == output_spatial(sig)
    assert activation_bytes(sig, ci, co) == y.numel() * y.element_size()


def test_layer_op_runs_every_supported_op():
    for module, shape in MODULES:
        sig, ci, co = sig_from_module(module, shape)
        fn, args = cost.layer_op(sig, ci, co)
        out = fn(*args)
        assert out.shape[-1] == co or out.shape[1] == co
    mm = LayerSig("matmul", spatial=(10,), batch=3)
    fn, args = cost.layer_op(mm, 8, 12)
    assert fn(*args).shape == (3, 10, 12)


# ----------------------------------------------------------------------------------------------
# Latency tables (a deterministic fake timer keeps these fast and exact)
# ----------------------------------------------------------------------------------------------


class FakeTimer:
    """Latency = 0.01 + MACs/1e7 ms, with a +20% staircase on counts that are not multiples of 16;
    counts calls."""

    def __init__(self):
        self.calls = []

    def __call__(self, sig, ci, co):
        self.calls.append((sig, ci, co))
        stair = (1.2 if ci % 16 else 1.0) * (1.2 if co % 16 else 1.0)
        return 0.01 + stair * macs(sig, ci, co) / 1e7


SIG = LayerSig("conv2d", (3, 3), padding=(1, 1), spatial=(8, 8), bias=False)


def fake_table(sigs=((SIG, 32, 48),), **kw):
    timer = FakeTimer()
    kw.setdefault("overheads", False)
    table = LatencyTable.measure(list(sigs), progress=False, timer=timer, **kw)
    return table, timer


def test_full_grid_exact_at_grid_points():
    table, timer = fake_table(strategy="full")
    assert len(timer.calls) == 4 * 6
    for _, ci, co in list(timer.calls):
        assert table.lookup(SIG, ci, co) == pytest.approx(timer(SIG, ci, co), rel=1e-12)


def test_interpolation_monotone_between_grid_points():
    table, timer = fake_table(strategy="full")
    for ci0, ci1 in [(8, 16), (16, 24), (24, 32)]:
        for co in (8, 20, 48):
            lo, hi = sorted((table.lookup(SIG, ci0, co), table.lookup(SIG, ci1, co)))
            vals = [table.lookup(SIG, c, co) for c in range(ci0, ci1 + 1)]
            assert all(lo - 1e-12 <= v <= hi + 1e-12 for v in vals)
            assert np.all(np.diff(vals) >= -1e-12) or np.all(np.diff(vals) <= 1e-12)
    # bilinear: midpoint of a cell is the mean of its corners
    corners = [table.lookup(SIG, a, b) for a in (8, 16) for b in (8, 16)]
    assert table.lookup(SIG, 12, 12) == pytest.approx(sum(corners) / 4)


def test_lookup_grid_vectorised_and_range_checks():
    table, _ = fake_table(strategy="full")
    m = table.lookup_grid(SIG, [8, 20, 32], [8, 48])
    assert m.shape == (3, 2)
    assert m[1, 1] == pytest.approx(table.lookup(SIG, 20, 48))
    assert table.lookup(SIG, 4, 8) == table.lookup(SIG, 8, 8)  # below the grid: clamped
    with pytest.raises(ValueError):
        table.lookup(SIG, 40, 8)
    with pytest.raises(KeyError):
        table.lookup(LayerSig("linear"), 8, 8)


def test_separable_exact_on_measured_points_and_close_elsewhere():
    sig = LayerSig("conv2d", (1, 1), spatial=(7, 7), bias=False)
    table, timer = fake_table([(sig, 512, 256)], strategy="separable", coarse=5)
    d = table.describe(sig)
    assert d["mode"] == "separable"
    assert d["points"] == len(timer.calls) < (512 // 8) * (256 // 8) / 4
    for _, ci, co in list(timer.calls):
        assert table.lookup(sig, ci, co) == pytest.approx(timer(sig, ci, co), rel=1e-9)
    # the fake latency is separable up to its constant: held-out error stays small
    rng = np.random.default_rng(0)
    errs = []
    for ci, co in zip(rng.integers(1, 64, 50) * 8, rng.integers(1, 32, 50) * 8):
        truth = timer(sig, int(ci), int(co))
        errs.append(abs(table.lookup(sig, int(ci), int(co)) - truth) / truth)
    assert max(errs) < 0.1
    coarse_only = table.lookup_grid(sig, [200], [200], correct=False)[0, 0]
    assert coarse_only != table.lookup(sig, 200, 200)


def test_auto_strategy_picks_full_for_small_tables():
    table, _ = fake_table()
    assert table.describe(SIG)["mode"] == "full"
    sig = LayerSig("conv2d", (1, 1), spatial=(7, 7), bias=False)
    table, _ = fake_table([(sig, 512, 512)])
    assert table.describe(sig)["mode"] == "separable"


def test_depthwise_and_grouped_axes():
    dw = LayerSig("conv2d", (3, 3), padding=(1, 1), groups="depthwise", spatial=(8, 8))
    grp = LayerSig("conv2d", (3, 3), padding=(1, 1), groups="g=8", spatial=(8, 8))
    table, timer = fake_table([(dw, 32, 64), (grp, 64, 64)], round_to=8)
    dw_calls = [(ci, co) for s, ci, co in timer.calls if s == dw]
    assert dw_calls and all(co == 2 * ci for ci, co in dw_calls)
    assert table.lookup(dw, 16, 32) == pytest.approx(timer(dw, 16, 32))
    assert all(ci % 8 == 0 and co % 8 == 0 for s, ci, co in timer.calls if s == grp)


def test_identical_signatures_measured_once():
    twin = LayerSig("conv2d", kernel=(3,), padding=(1,), spatial=(8, 8), bias=False)  # == SIG
    _, once = fake_table([(SIG, 32, 48)])
    _, twice = fake_table([(SIG, 32, 48), (twin, 32, 48), (SIG, 16, 16)])
    assert len(twice.calls) == len(once.calls)
    assert len(set(twice.calls)) == len(twice.calls)
    # union of ranges: (48, 16) and (16, 48) give a 48 x 48 table
    table, _ = fake_table([(SIG, 48, 16), (SIG, 16, 48)])
    assert table.describe(SIG)["c_in_max"] == 48 and table.describe(SIG)["c_out_max"] == 48


def test_add_measures_only_missing():
    table, timer = fake_table()
    other = LayerSig("linear", spatial=(4,))
    timer2 = FakeTimer()
    assert table.add([(SIG, 32, 48), (other, 16, 16)], progress=False, timer=timer2) == 1
    assert {s for s, _, _ in timer2.calls} == {other}


def test_save_load_roundtrip(tmp_path):
    sig2 = LayerSig("conv2d", (1, 1), spatial=(7, 7), bias=False)
    table, _ = fake_table([(SIG, 32, 48), (sig2, 256, 128)])
    table.overheads = {"relu": {"bytes": [0.0, 100.0], "ms": [0.001, 0.002]}}
    path = tmp_path / "t.json"
    table.save(path)
    data = json.loads(path.read_text())
    assert list(data)[:2] == ["format", "key"]
    assert set(data["key"]) == {"device", "torch", "threads", "dtype"}
    loaded = LatencyTable.load(path, expect=None)
    assert loaded.key == table.key and set(loaded.sigs) == set(table.sigs)
    for sig in table.sigs:
        ci = np.arange(1, table.describe(sig)["c_in_max"] + 1)
        co = np.arange(1, table.describe(sig)["c_out_max"] + 1)
        assert np.array_equal(loaded.lookup_grid(sig, ci, co), table.lookup_grid(sig, ci, co))
    assert loaded.overhead("relu", 50) == table.overhead("relu", 50) == pytest.approx(0.0015)


def test_key_mismatch_detected(tmp_path):
    table, _ = fake_table()
    path = tmp_path / "t.json"
    table.save(path)
    LatencyTable.load(path)  # same machine, same threads: fine
    data = json.loads(path.read_text())
    data["key"]["device"] = "NVIDIA TITAN V"
    data["key"]["threads"] = 64
    path.write_text(json.dumps(data))
    with pytest.raises(LatencyTableMismatch, match="device.*TITAN V"):
        LatencyTable.load(path)
    with pytest.warns(UserWarning, match="threads"):
        LatencyTable.load(path, on_mismatch="warn")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        LatencyTable.load(path, expect=None)
    with pytest.raises(LatencyTableMismatch):
        table.check_key({"dtype": "float16"})


def test_mixed_dtype_or_device_rejected():
    half = LayerSig("linear", dtype="float16")
    with pytest.raises(ValueError, match="dtype"):
        fake_table([(SIG, 8, 8), (half, 8, 8)])


def test_cache_dir_and_cached_table(tmp_path, monkeypatch):
    monkeypatch.setenv("GRAPHPRUNE_CACHE", str(tmp_path / "env"))
    assert cost.cache_dir() == tmp_path / "env"
    monkeypatch.setattr(cost, "CACHE_DIR", tmp_path / "opt")
    assert cost.cache_dir() == tmp_path / "opt"
    timer = FakeTimer()
    kw = dict(progress=False, timer=timer, overheads=False)
    t1 = LatencyTable.cached([(SIG, 16, 16)], **kw)
    n1 = len(timer.calls)
    files = list((tmp_path / "opt").glob("*.json"))
    assert len(files) == 1 and n1 > 0
    t2 = LatencyTable.cached([(SIG, 16, 16)], **kw)  # all cached: no new calls
    assert len(timer.calls) == n1 and t2.lookup(SIG, 16, 16) == t1.lookup(SIG, 16, 16)
    LatencyTable.cached([(SIG, 16, 16), (SIG, 24, 16)], **kw)  # range grows: re-measured
    assert len(timer.calls) > n1
    assert LatencyTable.load(files[0]).describe(SIG)["c_in_max"] == 24


# ----------------------------------------------------------------------------------------------
# Real measurements (tiny)
# ----------------------------------------------------------------------------------------------


def test_measure_latency_fixed_threads_and_restores():
    before = torch.get_num_threads()
    seen = []

    def fn(x):
        seen.append((torch.get_num_threads(), torch.is_inference_mode_enabled()))
        return x * 2

    med, iqr = measure_latency(fn, torch.ones(4), warmup=1, repeats=5, threads=1)
    assert med > 0 and iqr >= 0
    assert set(seen) == {(1, True)}
    assert torch.get_num_threads() == before


def test_real_tiny_table_and_overheads():
    sig = LayerSig("conv2d", (3, 3), padding=(1, 1), spatial=(8, 8))
    table = LatencyTable.measure(
        [(sig, 16, 16)],
        progress=False,
        repeats=3,
        warmup=1,
        overheads=False,
        threads=1,
        watch_load=False,
    )
    assert table.key["threads"] == 1 and table.key["torch"] == torch.__version__
    assert 0 < table.lookup(sig, 8, 8) < 100
    table.measure_overheads(max_numel=2**11, repeats=3, warmup=1, progress=False, watch_load=False)
    assert set(cost.OVERHEAD_KINDS) <= set(table.overheads)
    top = table.overheads["relu"]["bytes"][-1]
    small, edge, large = (table.overhead("relu", b) for b in (1024, top, 1e9))
    assert small >= 0 and large >= edge  # extrapolation above the measured sizes never drops


def test_overhead_extrapolation_ignores_a_noisy_tail():
    table = LatencyTable({"device": "cpu"})
    table.overheads["relu"] = {"bytes": [1e3, 1e4, 1e5], "ms": [0.01, 0.10, 0.05]}
    assert table.overhead("relu", 1e9) >= 0.05  # two-point slope would go negative
    table.overheads["relu"] = {"bytes": [1e3, 1e4, 1e5], "ms": [0.01, 0.1, 1.0]}
    assert table.overhead("relu", 1e6) == pytest.approx(10.0, rel=0.05)


def test_estimate_model_latency_composes_layers_and_overheads():
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 4),
    ).eval()
    x = torch.randn(1, 3, 8, 8)
    items = model_cost_items(model, x)
    assert [it.kind for it in items] == [
        "layer",
        "batch_norm",
        "relu",
        "avg_pool2d",
        "free",
        "layer",
    ]
    assert items[1].nbytes == 8 * 64 * 4
    sigs = [(it.sig, it.c_in, it.c_out) for it in items if it.kind == "layer"]
    table, timer = fake_table(sigs)
    table.overheads = {k: {"bytes": [0.0, 1e6], "ms": [0.0, 1.0]} for k in cost.OVERHEAD_KINDS}
    table.overheads["module_call"] = {"bytes": [0.0], "ms": [0.5]}
    total, items = estimate_model_latency(model, x, table)
    layers = timer(items[0].sig, 3, 8) + timer(items[-1].sig, 8, 4)
    ovh = 3 * (8 * 64 * 4) / 1e6  # bn, relu and pool each read 8x8x8 floats
    assert total == pytest.approx(layers + ovh + 7 * 0.5)  # 7 module calls incl. the Sequential
    assert math.isfinite(total)


def test_isolated_spikes_are_remeasured():
    """A burst of machine load on one point (10x) is caught by its neighbours and re-measured."""
    fake = FakeTimer()
    hit = {(16, 24): 2}  # the first two measurements of this point are slow

    def timer(sig, ci, co):
        slow = hit.get((ci, co), 0)
        hit[(ci, co)] = max(slow - 1, 0)
        return fake(sig, ci, co) * (10 if slow else 1)

    table = LatencyTable.measure([(SIG, 32, 48)], progress=False, timer=timer, overheads=False)
    assert table.lookup(SIG, 16, 24) == pytest.approx(fake(SIG, 16, 24))
    assert table.describe(SIG)["remeasured"] == 2


def test_scalar_lookup_matches_vectorised():
    sep = LayerSig("conv2d", (1, 1), spatial=(7, 7), bias=False)
    dw = LayerSig("conv2d", (3, 3), padding=(1, 1), groups="depthwise", spatial=(8, 8))
    table, _ = fake_table([(SIG, 32, 48), (sep, 256, 512), (dw, 64, 64)])
    rng = np.random.default_rng(1)
    for sig in (SIG, sep, dw):
        d = table.describe(sig)
        for ci, co in zip(
            rng.integers(1, d["c_in_max"] + 1, 40), rng.integers(1, d["c_out_max"] + 1, 40)
        ):
            if sig == dw:
                co = ci
            ref = table.lookup_grid(sig, [ci], [co])[0, 0]
            assert table.lookup(sig, int(ci), int(co)) == pytest.approx(ref, rel=1e-12)
            assert table.lookup(sig, int(ci), int(co)) == pytest.approx(ref, rel=1e-12)  # memo


class ScriptedProbe:
    """A LoadProbe whose shares follow a script (then 0)."""

    def __init__(self, shares):
        self.shares, self.waits = list(shares), 0

    def start(self):
        pass

    def share(self):
        return self.shares.pop(0) if self.shares else 0.0

    def wait_quiet(self, limit_s, threshold=None):
        self.waits += 1
        return 0.0


def test_points_timed_under_load_are_remeasured():
    calls = []

    def measure(p):
        calls.append(p)
        return 10.0 if len(calls) == 1 else 1.0  # the first chunk ran under load

    probe = ScriptedProbe([0.9, 0.0, 0.0])
    values, loaded = cost.measure_watched([1, 2, 3, 4, 5, 6], measure, probe, chunk_s=0)
    assert loaded == 0 and probe.waits == 1
    assert values == {p: 1.0 for p in range(1, 7)}
    assert sorted(calls) == [1, 1, 2, 3, 4, 5, 6]  # chunk_s=0: one point per chunk
    # persistent load: gives up after `rounds` and reports the count
    values, loaded = cost.measure_watched([1, 2], lambda p: 1.0, ScriptedProbe([1.0] * 9))
    assert loaded == 2


def test_load_probe_reads_this_machine():
    probe = cost.LoadProbe()
    sum(i * i for i in range(100_000))
    assert 0.0 <= probe.share() <= 1.0


class _SECat(nn.Module):
    def forward(self, x):
        s = torch.sigmoid(x.mean((2, 3), keepdim=True))
        y = s * x
        return torch.cat([y, x], 1).relu_()


def test_cost_items_kinds_and_bytes():
    x = torch.randn(2, 4, 5, 5)
    items = {it.name: it for it in model_cost_items(_SECat(), x)}
    nb = x.numel() * 4
    assert items["mean"].kind == "avg_pool2d" and items["mean"].nbytes == nb
    assert items["sigmoid"].kind == "sigmoid" and items["sigmoid"].nbytes == 2 * 4 * 4
    assert items["mul"].kind == "mul_bcast" and items["mul"].nbytes == nb
    assert items["cat"].kind == "cat" and items["cat"].nbytes == 2 * nb
    assert items["relu_"].kind == "relu_" and items["relu_"].nbytes == 2 * nb


def test_calibrate_fits_per_op_constant(tmp_path):
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 1)).eval()
    x = torch.randn(1, 3, 8, 8)
    sigs = [(it.sig, it.c_in, it.c_out) for it in model_cost_items(model, x) if it.kind == "layer"]
    table, _ = fake_table(sigs)
    table.overheads = {k: {"bytes": [0.0, 1e6], "ms": [0.0, 1e-3]} for k in cost.OVERHEAD_KINDS}
    raw, _ = estimate_model_latency(model, x, table)
    cal = table.calibrate(model, x, repeats=3, warmup=1)
    (row,) = cal["fitted_on"]
    assert row["ops"] == 3 and row["predicted_ms"] == pytest.approx(raw)
    fitted, _ = estimate_model_latency(model, x, table)
    assert fitted == pytest.approx(row["measured_ms"])
    assert estimate_model_latency(model, x, table, calibrated=False)[0] == pytest.approx(raw)
    table.save(tmp_path / "t.json")
    assert LatencyTable.load(tmp_path / "t.json", expect=None).calibration == cal


def test_calibration_fits():
    rows = [
        {"measured_ms": 1.1 * p + 0.02 * n, "predicted_ms": p, "ops": n}
        for p, n in [(40.0, 170), (15.0, 170), (25.0, 120)]
    ]
    assert cost._fit_calibration(rows, "both") == pytest.approx((1.1, 0.02))
    scale, per_op = cost._fit_calibration(rows[:1], "additive")
    assert scale == 1.0 and 40.0 + per_op * 170 == pytest.approx(rows[0]["measured_ms"])
    scale, per_op = cost._fit_calibration(rows[:1], "scale")
    assert per_op == 0.0 and scale * 40.0 == pytest.approx(rows[0]["measured_ms"])
    with pytest.raises(ValueError):
        cost._fit_calibration(rows[:1], "both")


# ----------------------------------------------------------------------------------------------
# In-model context fit
# ----------------------------------------------------------------------------------------------


class _Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(16, 16, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(16)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(16, 4)

    def forward(self, x):
        y = self.relu(self.bn1(self.conv1(x)))
        y = self.relu(self.bn2(self.conv2(y)) + y)
        return self.fc(torch.flatten(self.pool(y), 1))


def _ctx_table(model, x):
    sigs = [(it.sig, it.c_in, it.c_out) for it in model_cost_items(model, x) if it.kind == "layer"]
    table, _ = fake_table(sigs)
    table.overheads = {k: {"bytes": [0.0, 1e6], "ms": [0.0, 1e-2]} for k in cost.OVERHEAD_KINDS}
    table.overheads["module_call"] = {"bytes": [0.0], "ms": [0.0]}
    return table


def test_affine_fit_recovers_scale_and_offset():
    pairs = [(p, 1.5 * p + 0.2) for p in (1.0, 2.0, 5.0, 9.0)]
    assert cost._affine_fit(pairs) == pytest.approx((1.5, 0.2))
    # one size only: the mean offset, scale 1
    assert cost._affine_fit([(2.0, 2.5), (2.0, 2.7)]) == pytest.approx((1.0, 0.6))
    # clamped: no negative per-op cost, no absurd scale
    scale, per_op = cost._affine_fit([(p, 10 * p - 5) for p in (1.0, 2.0, 4.0)])
    assert scale == 3.0 and per_op >= 0.0
    assert cost._affine_fit([(1.0, 0.5), (1.0, 0.7)])[1] == 0.0


def test_context_applies_to_lookups_estimate_and_round_trips(tmp_path):
    model, x = _Block().eval(), torch.randn(2, 3, 8, 8)
    table = _ctx_table(model, x)
    raw, items = estimate_model_latency(model, x, table)
    sig = next(it.sig for it in items if it.kind == "layer")
    assert table.layer_scale(sig) == 1.0 and table.op_ms("batch_norm", 1e5) == pytest.approx(1e-3)
    table.context = {"layers": {sig: 1.25}, "layer_default": 1.1,
                     "ops": {"batch_norm": (2.0, 0.05)}}
    assert table.layer_ms(sig, 3, 16) == pytest.approx(1.25 * table.lookup(sig, 3, 16))
    other = next(it.sig for it in items if it.kind == "layer" and it.sig != sig)
    assert table.layer_scale(other) == 1.1  # signatures not fitted: the overall factor
    assert table.op_ms("batch_norm", 1e5) == pytest.approx(2e-3 + 0.05)
    assert table.op_ms("relu_", 1e5) == pytest.approx(1e-3)  # kinds not fitted: as measured
    assert np.allclose(table.op_ms("batch_norm", np.array([1e5, 2e5])), [0.052, 0.054])
    total, items2 = estimate_model_latency(model, x, table)
    expect = sum(table.layer_ms(it.sig, it.c_in, it.c_out) if it.kind == "layer" else
                 float(table.op_ms(it.kind, it.nbytes)) if it.kind in table.overheads else 0.0
                 for it in items2)
    assert total == pytest.approx(expect) and total > raw
    table.save(tmp_path / "t.json")
    back = LatencyTable.load(tmp_path / "t.json", expect=None)
    assert back.context["layers"] == {sig: 1.25}
    assert back.context["ops"] == {"batch_norm": (2.0, 0.05)}
    assert estimate_model_latency(model, x, back)[0] == pytest.approx(total)


def test_node_times_cover_every_cost_item():
    model, x = _Block().eval(), torch.randn(1, 3, 8, 8)
    times, interp = cost.node_times(model, x, repeats=2, warmup=1)
    names = {it.name for it in model_cost_items(model, x)}
    assert names == set(times) and all(v >= 0.0 for v in times.values())
    assert interp >= 0.0


def test_calibrate_context_fits_layers_per_signature_and_ops_per_kind():
    model, x = _Block().eval(), torch.randn(2, 3, 8, 8)
    table = _ctx_table(model, x)
    ctx = table.calibrate_context(model, x, repeats=2, warmup=1)
    items = model_cost_items(model, x)
    assert set(ctx["layers"]) == {it.sig for it in items if it.kind == "layer"}
    assert all(0.5 <= v <= 2.0 for v in ctx["layers"].values())
    kinds = {it.kind for it in items if it.kind not in ("layer", "free", "unknown")}
    assert set(ctx["ops"]) == kinds  # batch_norm, relu_, add, avg_pool2d
    assert all(0.5 <= a <= 3.0 and b >= 0.0 for a, b in ctx["ops"].values())
    assert ctx["fitted_on"]["ops_ms"]["batch_norm"][2] == 2  # two BN nodes


def test_node_kind():
    gm = torch.fx.symbolic_trace(_Block())
    kinds = {n.name: cost.node_kind(gm, n) for n in gm.graph.nodes}
    assert kinds["conv1"] == "layer" and kinds["fc"] == "layer"
    assert kinds["bn1"] == "batch_norm" and kinds["relu"] == "relu_" and kinds["add"] == "add"
    assert kinds["flatten"] == "free" and kinds["x"] is None and kinds["output"] is None


def test_pin_malloc_in_a_subprocess():
    import platform
    import subprocess
    import sys

    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        pytest.skip("glibc only")
    code = "from graphprune.cost import pin_malloc; print(pin_malloc())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "True"
