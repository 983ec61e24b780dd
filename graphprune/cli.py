"""graphprune command line: demo | analyze | prune | sparsify | bench | table measure.

MODEL is `file.py:factory`, `module:factory` (the factory is called with no arguments and returns
a module, or `(module, example_inputs)`) or a program saved by `gp.save` (`slim.pt2`).
`--input 8,3,224,224` gives the shape of one random input (repeat it for several inputs; append
`:int64[:HIGH]` for integer inputs such as token ids in [0, HIGH)); it may be left out when the
factory returns inputs, its module has `example_inputs(name)`, or MODEL is a `.pt2`.
The `prune` flags map one-to-one onto `gp.PruneConfig` fields.

Exit codes: 0 ok, 2 usage, 3 bad input (missing file or factory, wrong input shape, bad table),
4 plan error (infeasible target, empty layer), 1 internal error (a failed verification or a bug;
one line on stderr, `GRAPHPRUNE_DEBUG=1` shows the traceback).
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import os
import sys
import time
import warnings
from pathlib import Path

__all__ = ["main", "build_parser", "load_model", "load_spec", "make_inputs", "layer_rows",
           "plot_layers", "bench", "InputError"]

EXIT_OK, EXIT_INTERNAL, EXIT_USAGE, EXIT_INPUT, EXIT_PRUNE = 0, 1, 2, 3, 4


class InputError(Exception):
    """Bad input from the user: missing file or factory, wrong shape, unreadable table."""


class UsageError(Exception):
    """A flag combination that cannot work (exit code 2)."""


# ---- models and inputs ------------------------------------------------------------------------


def _import_source(src: str):
    if src.endswith(".py"):
        path = Path(src)
        if not path.exists():
            raise InputError(f"no such file: {src}")
        spec = importlib.util.spec_from_file_location(path.stem, path)
        mod = importlib.util.module_from_spec(spec)
        sys.path.insert(0, str(path.parent.resolve()))
        try:
            spec.loader.exec_module(mod)
        except Exception as e:  # noqa: BLE001 - the user's file fails to import
            raise InputError(f"{src} fails to import: {type(e).__name__}: {e}") from e
        return mod
    try:
        return importlib.import_module(src)
    except ImportError as e:
        raise InputError(f"cannot import module {src!r}: {e}") from e


def _from_pt2(path: str):
    """A saved program as a plain fx.GraphModule (re-traceable, eval()-able) + its inputs."""
    import torch
    import torch.fx as fx

    import graphprune as gp

    p = Path(path)
    if not p.exists():
        raise InputError(f"no such file: {path}")
    try:
        m = gp.load(p)
    except gp.GraphpruneError as e:
        raise InputError(str(e)) from e
    gm = fx.GraphModule(m, m.graph, p.stem)
    for node in [n for n in gm.graph.nodes if n.op == "call_module" and n.target == "_guards_fn"]:
        gm.graph.erase_node(node)
    gm.delete_all_unused_submodules()
    gm.recompile()
    for attr in ("graphprune_meta", "graphprune_plan"):
        if hasattr(m, attr):
            setattr(gm, attr, getattr(m, attr))
    shapes = m.graphprune_meta.get("input_shapes")
    inputs = tuple(torch.randn(*s) for s in shapes) if shapes else None
    return gm, inputs


def load_spec(spec: str):
    """MODEL -> (module in eval mode, default example inputs or None)."""
    if spec.endswith(".pt2"):
        return _from_pt2(spec)
    if ":" not in spec:
        raise InputError(f"MODEL must be file.py:factory, module:factory or file.pt2, got {spec!r}")
    src, name = spec.rsplit(":", 1)
    mod = _import_source(src)
    factory = getattr(mod, name, None)
    if not callable(factory):
        raise InputError(f"{src} has no factory {name!r}")
    try:
        out = factory()
    except Exception as e:  # noqa: BLE001
        raise InputError(f"{spec}() failed: {type(e).__name__}: {e}") from e
    inputs = None
    if isinstance(out, tuple) and len(out) == 2:
        out, inputs = out
    elif callable(getattr(mod, "example_inputs", None)):
        try:
            inputs = mod.example_inputs(name)
        except Exception:  # noqa: BLE001 - no default inputs for this name
            inputs = None
    if not hasattr(out, "forward"):
        raise InputError(f"{spec}() returned {type(out).__name__}, not a torch module")
    if hasattr(out, "eval"):
        out.eval()
    return out, inputs


def load_model(spec: str):
    """MODEL -> nn.Module (kept for scripts that used the earlier CLI helper)."""
    return load_spec(spec)[0]


def _one_input(s: str):
    import torch

    shape_s, _, rest = s.partition(":")
    try:
        shape = tuple(int(v) for v in shape_s.split(","))
    except ValueError:
        raise UsageError(f"--input must be comma-separated ints like 1,3,224,224, got {s!r}") from None
    if not rest:
        return torch.randn(*shape)
    dtype_s, _, high = rest.partition(":")
    dtype = getattr(torch, dtype_s, None)
    if not isinstance(dtype, torch.dtype):
        raise UsageError(f"--input {s!r}: unknown dtype {dtype_s!r}")
    if dtype.is_floating_point:
        return torch.randn(*shape, dtype=dtype)
    return torch.randint(0, int(high or 2), shape, dtype=dtype)


def make_inputs(specs, default=None) -> tuple:
    """`--input` values -> a tuple of random tensors (or the model's default inputs)."""
    import torch

    if specs:
        torch.manual_seed(0)
        return tuple(_one_input(s) for s in specs)
    if default is None:
        raise UsageError("--input is required for this model (e.g. --input 1,3,224,224)")
    return tuple(default) if isinstance(default, (tuple, list)) else (default,)


def _run_once(model, inputs) -> None:
    """Run the model on the inputs once: a failure here is bad input (wrong shape or dtype)."""
    import torch

    try:
        with torch.no_grad():
            model(*inputs)
    except Exception as e:  # noqa: BLE001
        shapes = ", ".join(str(list(x.shape)) for x in inputs if hasattr(x, "shape"))
        msg = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise InputError(f"the model fails on inputs of shape {shapes}: {msg}") from e


def _load(spec: str, input_specs):
    model, default = load_spec(spec)
    inputs = make_inputs(input_specs, default)
    _run_once(model, inputs)
    return model, inputs


_DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}


def _place(model, inputs: tuple, device: str | None, dtype: str | None):
    """The model and its inputs on `device` / in `dtype` (floating inputs only), checked to run
    there (2:4 runs on the Sparse Tensor Cores only on CUDA in fp16 / bf16)."""
    import torch
    from torch.utils._pytree import tree_map

    if not device and not dtype:
        return model, inputs
    if device and device.startswith("cuda") and not torch.cuda.is_available():
        raise InputError(f"--device {device}: no CUDA device here (torch.cuda.is_available() "
                         "is False)")
    dt = getattr(torch, _DTYPES[dtype]) if dtype else None
    try:
        dev = torch.device(device) if device else None
    except RuntimeError as e:
        raise InputError(f"--device {device}: {e}") from e

    def move(x):
        if not isinstance(x, torch.Tensor):
            return x
        return x.to(dev, dt if dt is not None and torch.is_floating_point(x) else None)

    model = model.to(device=dev, dtype=dt)
    inputs = tree_map(move, inputs)
    _run_once(model, inputs)
    return model, inputs


def _set_threads(n) -> None:
    if n:
        import torch

        torch.set_num_threads(int(n))


def _out(args, human: str, data: dict) -> None:
    print(json.dumps(data, default=str) if getattr(args, "json", False) else human)


def _note(args, text: str) -> None:
    """Side output (stage graphs, file notes): stderr when stdout carries JSON."""
    print(text, file=sys.stderr if getattr(args, "json", False) else sys.stdout)


# ---- demo / analyze ---------------------------------------------------------------------------


def _cmd_demo(args) -> int:
    from .demo import run_demo

    run_demo(epochs=args.epochs, finetune=args.finetune)
    return EXIT_OK


def _cmd_analyze(args) -> int:
    import graphprune as gp

    model, x = _load(args.model, args.input)
    a = gp.analyze(model, x, method=args.trace)
    groups = [{"id": g.id, "size": g.size, "prunable": g.prunable, "reason": g.reason,
               "members": list(g.members)} for g in a.groups]
    _out(args, a.summary(), {"model": args.model, "traced_with": a.traced.kind, "groups": groups})
    return EXIT_OK


# ---- prune ------------------------------------------------------------------------------------

# PruneConfig field -> (flag, type, help); the CLI builds the same dataclass the API does
CONFIG_FLAGS = {
    "importance": ("--importance", str, "l1 | l2 | bn_scale | random (data-driven criteria need "
                   "the Python API)"),
    "reduce": ("--reduce", str, "how member scores combine per channel: sum | mean | max"),
    "round_to": ("--round-to", int, "kept channel counts are multiples of this"),
    "min_channels": ("--min-channels", int, "every group keeps at least this many channels"),
    "min_fraction": ("--min-fraction", float, "cost targets keep at least this fraction of a group"),
    "ignore": ("--ignore", str, "module name whose channels are kept (repeatable)"),
    "leaf_modules": ("--leaf", str, "module name kept opaque when tracing (repeatable)"),
    "trace": ("--trace", str, "auto | fx | export"),
    "verify_trials": ("--verify-trials", int, "random inputs the verification uses"),
    "seed": ("--seed", int, "seed of the verification inputs and random importance"),
    "time_limit": ("--time-limit", float, "solver time limit in seconds"),
}
_REPEATED = {"ignore", "leaf_modules"}


def _add_config_flags(p: argparse.ArgumentParser) -> None:
    from .config import PruneConfig

    defaults = PruneConfig()
    for name, (flag, typ, hlp) in CONFIG_FLAGS.items():
        if name in _REPEATED:
            p.add_argument(flag, dest=name, type=typ, action="append", default=[], help=hlp)
        else:
            p.add_argument(flag, dest=name, type=typ, default=getattr(defaults, name),
                           help=f"{hlp} (default {getattr(defaults, name)})")
    p.add_argument("--no-verify", dest="verify", action="store_false",
                   help="skip the numerical check against the masked oracle")
    t = p.add_mutually_exclusive_group()
    t.add_argument("--uniform", type=float, help="remove this fraction of every prunable group "
                   "(default 0.3 when no target is given)")
    t.add_argument("--flops", type=float, help="keep at most this fraction of the FLOPs")
    t.add_argument("--params", type=float, help="keep at most this fraction of the parameters")
    t.add_argument("--latency", type=float, help="keep at most this fraction of the measured "
                   "latency (table from --table, else measured now)")
    p.add_argument("--table", help="latency table JSON (graphprune table measure)")
    p.add_argument("--threads", type=int, help="torch threads (latency tables are per count)")


def config_from_args(args, target):
    """The PruneConfig the flags describe (one flag per field)."""
    from .config import PruneConfig

    kw = {name: getattr(args, name) for name in CONFIG_FLAGS}
    return PruneConfig(target=target, verify=args.verify, **kw)


def _measure_table(a, round_to: int, progress: bool = True, **options):
    """A latency table for every conv/linear signature of an analysed model."""
    from .allocate import cost_layers
    from .cost import LatencyTable

    reqs: dict = {}
    for L in cost_layers(a):
        ci, co = reqs.get(L.sig, (0, 0))
        reqs[L.sig] = (max(ci, L.c_in), max(co, L.c_out))
    if not reqs:
        raise InputError("the model has no conv/linear layer to measure")
    return LatencyTable.measure(reqs, round_to=max(round_to, 1), progress=progress, **options)


def _load_table(path: str):
    from .cost import LatencyTable

    if not Path(path).exists():
        raise InputError(f"no such latency table: {path}")
    try:
        return LatencyTable.load(path)
    except (ValueError, KeyError, json.JSONDecodeError) as e:
        raise InputError(f"latency table {path}: {str(e).splitlines()[0]}") from e


def _target(args, a):
    import graphprune as gp

    if args.table and args.latency is None:
        raise UsageError("--table goes with --latency")
    if args.flops is not None:
        return gp.Flops(args.flops), None
    if args.params is not None:
        return gp.Params(args.params), None
    if args.latency is not None:
        # measured now on a grid of step >= 8 (as gp.Latency without a table does): finer
        # counts are interpolated; `graphprune table measure --round-to` chooses the step
        table = _load_table(args.table) if args.table else _measure_table(
            a, max(args.round_to, 8), progress=not args.json)
        return gp.Latency(args.latency, table=table), table
    return gp.Uniform(0.3 if args.uniform is None else args.uniform), None


def layer_rows(a, plan, table=None) -> list[dict]:
    """Per conv/linear layer: channels and cost (MACs; latency when a table is given) before and
    after the plan, from the same cost model the solver uses."""
    from . import cost as C
    from .allocate import cost_layers

    targets = {n.name: str(n.target) for n in a.graph.graph.nodes if n.op == "call_module"}
    rows = []
    for L in cost_layers(a):
        ci = L.in_const + sum(m * plan.kept(g) for g, m in L.in_terms)
        co = L.c_out if L.out_group is None else plan.kept(L.out_group) * L.out_mult
        row = {"layer": targets.get(L.node, L.node), "c_in": L.c_in, "c_out": L.c_out,
               "c_in_after": int(ci), "c_out_after": int(co),
               "macs": C.macs(L.sig, L.c_in, L.c_out), "macs_after": C.macs(L.sig, ci, co)}
        if table is not None:
            try:
                row["ms"] = table.lookup(L.sig, L.c_in, L.c_out)
                row["ms_after"] = table.lookup(L.sig, ci, co)
            except KeyError:
                pass
        rows.append(row)
    return rows


def plot_layers(rows: list[dict], path: str, title: str = "") -> str:
    """PNG: output channels kept per layer, and per-layer latency (or MACs) before/after."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    timed = rows and all("ms" in r for r in rows)
    key, label = ("ms", "latency (ms, table)") if timed else ("macs", "MACs")
    x = range(len(rows))
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(max(6, 0.35 * len(rows) + 2), 7), sharex=True)
    ax1.bar(x, [r["c_out"] for r in rows], color="#c8d6e5", label="original")
    ax1.bar(x, [r["c_out_after"] for r in rows], color="#2e86de", label="kept")
    ax1.set_ylabel("output channels")
    ax1.legend()
    ax1.set_title(title or "channels kept per layer")
    w = 0.4
    ax2.bar([i - w / 2 for i in x], [r[key] for r in rows], w, color="#c8d6e5", label="before")
    ax2.bar([i + w / 2 for i in x], [r[key + "_after"] for r in rows], w, color="#ee5253",
            label="after")
    ax2.set_ylabel(label)
    ax2.legend()
    ax2.set_xticks(list(x))
    ax2.set_xticklabels([r["layer"] for r in rows], rotation=90, fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _stats_table(before: dict, after: dict, extra_rows=()) -> str:
    from rich.table import Table

    from .report import render

    t = Table(title="before / after")
    for c in ("", "original", "pruned", "ratio"):
        t.add_column(c)
    for k in ("params", "macs"):
        o, p = before[k], after[k]
        t.add_row(k if k != "macs" else "MACs", f"{o:,}", f"{p:,}", f"{o / p:.2f}x" if p else "-")
    for name, o, p in extra_rows:
        t.add_row(name, f"{o:.3f}", f"{p:.3f}", f"{o / p:.2f}x" if p else "-")
    return render(t)


def _cmd_prune(args) -> int:
    import graphprune as gp

    _set_threads(args.threads)
    t0 = time.perf_counter()
    model, x = _load(args.model, args.input)
    cfg = config_from_args(args, None)
    a = gp.analyze(model, x, leaf_modules=cfg.leaf_modules, method=cfg.trace)
    if args.print_after == "trace":
        _note(args, f"# graph after trace ({a.traced.kind})\n{a.graph.code}")
    target, table = _target(args, a)
    cfg = cfg.update(target=target)
    plan = gp.plan(a, target, cfg.importance, config=cfg)
    slim = gp.apply(a, plan, verify=cfg.verify, trials=cfg.verify_trials, seed=cfg.seed)
    if args.print_after == "slim":
        _note(args, f"# graph after slim\n{slim.code}")
    before, after = gp.stats(model, x), gp.stats(slim, x)
    rows = layer_rows(a, plan, table)
    info = {"model": args.model, "target": repr(target), "before": before, "after": after,
            "groups_pruned": sum(1 for g, k in plan.keep.items() if len(k) < plan.sizes[g]),
            "plan_meta": dict(plan.meta), "verify": slim.graphprune_report.get("verify"),
            "layers": rows}
    if args.out:
        info["out"] = str(gp.save(slim, args.out, x))
        info["plan_json"] = str(gp.saving.plan_path(args.out))
    if args.plot:
        info["plot"] = plot_layers(rows, args.plot, f"{args.model}: {target!r}")
    info["seconds"] = round(time.perf_counter() - t0, 2)
    extra = []
    if table is not None and rows and all("ms" in r for r in rows):
        extra.append(("latency ms (table, conv/linear)", sum(r["ms"] for r in rows),
                      sum(r["ms_after"] for r in rows)))
    human = _stats_table(before, after, extra) + f"groups pruned: {info['groups_pruned']}, " \
        f"target {target!r}\ncheck: {info['verify'] or 'not verified (--no-verify)'}"
    for k in ("out", "plan_json", "plot"):
        if k in info:
            human += f"\nwrote {info[k]}"
    _out(args, human, info)
    return EXIT_OK


# ---- sparsify ---------------------------------------------------------------------------------


def _cmd_sparsify(args) -> int:
    import graphprune as gp

    _set_threads(args.threads)
    model, x = _load(args.model, args.input)
    if args.model.endswith(".pt2"):  # export graphs call aten conv/linear: make them modules
        from .backend import modulize

        model = modulize(model)
    model, x = _place(model, x, args.device, args.dtype)
    fast = gp.sparsify(model, x, pattern=args.pattern, sparsity=args.sparsity,
                       check_speed=args.check_speed, threads=args.threads,
                       skip=tuple(args.skip), verify=args.verify, fuse=args.fuse,
                       keep_first_last=args.keep_first_last)
    rep = dict(fast.graphprune_report)
    if args.out:
        rep["out"] = str(gp.save(fast, args.out, x))
    human = fast.graphprune_report.summary().rstrip()
    if not rep.get("verify"):
        human += "\ncheck: nothing to verify"
    if args.out:
        human += f"\nwrote {rep['out']}"
    _out(args, human, rep)
    return EXIT_OK


# ---- bench ------------------------------------------------------------------------------------


def bench(models: list, inputs: tuple, warmup: int = 5, repeats: int = 30,
          threads: int | None = None) -> list[dict]:
    """Time models side by side: after `warmup` calls each, `repeats` rounds that time one call
    of every model in turn (so load changes hit all alike); median and IQR in ms."""
    import statistics

    from .cost import num_threads
    from .kernels.onexn import time_rounds

    with num_threads(threads):
        samples = time_rounds([lambda m=m: m(*inputs) for m in models], max(1, warmup),
                              max(1, repeats))
    out = []
    for s in samples:
        q = statistics.quantiles(s, n=4) if len(s) >= 2 else [s[0], s[0], s[0]]
        out.append({"median_ms": statistics.median(s), "iqr_ms": q[2] - q[0], "samples": len(s)})
    return out


def _cmd_bench(args) -> int:
    import torch
    from rich.table import Table

    from .report import count_params, render
    from .verify import max_rel_error

    threads = args.threads or torch.get_num_threads()
    if args.malloc == "pinned":
        from .cost import pin_malloc

        pin_malloc()  # else big activations page-fault on some calls (see cost.pin_malloc)
    model_a, x = _load(args.model_a, args.input)
    others = [load_spec(spec)[0] for spec in args.others]
    diffs = []
    for m in others:
        _run_once(m, x)
        if args.check:
            with torch.no_grad():
                diffs.append(max_rel_error(m(*x), model_a(*x)))
    models = [model_a, *others]
    res = bench(models, x, args.warmup, args.repeats, threads)
    names = [args.model_a, *args.others]
    for r, n, m in zip(res, names, models):
        r["model"], r["params"] = n, count_params(m)
    speedups = [res[0]["median_ms"] / r["median_ms"] if r["median_ms"] else None for r in res[1:]]
    diff = max(diffs) if diffs else None
    info = {"models": res, "speedup": speedups[0], "speedups": speedups, "threads": threads,
            "warmup": args.warmup, "repeats": args.repeats,
            "inputs": [list(t.shape) for t in x], "output_rel_diff": diff,
            "output_rel_diffs": diffs}
    t = Table(title=f"bench: {threads} thread(s), {args.warmup} warm-up calls, median of "
              f"{args.repeats} interleaved calls, inputs {info['inputs']}")
    for c in ("model", "params", "median ms", "IQR ms", "speedup"):
        t.add_column(c)
    for r in res:
        t.add_row(r["model"], f"{r['params']:,}", f"{r['median_ms']:.3f}", f"{r['iqr_ms']:.3f}",
                  f"{res[0]['median_ms'] / r['median_ms']:.2f}x")
    human = render(t) + (f"outputs: max relative difference {diff:.2e} (vs the first model)"
                         if diff is not None else "")
    _out(args, human, info)
    return EXIT_OK


# ---- table measure ----------------------------------------------------------------------------


def _cmd_table(args) -> int:
    import graphprune as gp

    _set_threads(args.threads)
    model, x = _load(args.model, args.input)
    a = gp.analyze(model, x)
    opts = {"repeats": args.repeats, "warmup": args.warmup, "overheads": not args.no_overheads}
    if args.no_watch_load:
        opts["watch_load"] = False
    from .cost import pin_malloc

    pin_malloc()  # reproducible timings (see cost.pin_malloc); deploy with the same setting
    t0 = time.perf_counter()
    table = _measure_table(a, args.round_to, progress=not args.json, **opts)
    context = "skipped (--no-context)"
    if args.context:
        try:  # in-model factors measured once on this (dense) model
            table.calibrate_context(model, x)
            context = "fitted on the model"
        except Exception as e:  # noqa: BLE001 - the table is still usable without it
            context = f"not fitted ({type(e).__name__}: {str(e).splitlines()[0][:120]})"
    table.save(args.out)
    info = {"out": args.out, "signatures": len(table), "key": table.key, "context": context,
            "seconds": round(time.perf_counter() - t0, 2)}
    human = f"measured {len(table)} layer signatures in {info['seconds']}s " \
        f"({table.key}); in-model context {context}; wrote {args.out}"
    _out(args, human, info)
    return EXIT_OK


# ---- parser -----------------------------------------------------------------------------------


def _model_args(s: argparse.ArgumentParser, name: str = "model") -> None:
    s.add_argument(name, help="file.py:factory, module:factory or saved.pt2")
    s.add_argument("--input", action="append", default=[],
                   help="input shape, e.g. 1,3,224,224 (repeat for several inputs; "
                   "SHAPE:int64:HIGH for integer ids)")
    s.add_argument("--json", action="store_true", help="machine-readable output on stdout")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="graphprune", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("demo", help="train, prune and check a ResNet on sklearn digits")
    d.add_argument("--epochs", type=int, default=4)
    d.add_argument("--finetune", type=int, default=2)

    s = sub.add_parser("analyze", help="channel groups of a model")
    _model_args(s)
    s.add_argument("--trace", default="auto", choices=["auto", "fx", "export"])

    s = sub.add_parser("prune", help="prune to a target, verify, save")
    _model_args(s)
    _add_config_flags(s)
    s.add_argument("--out", help="write the slimmed model (torch.export .pt2) and its plan")
    s.add_argument("--plot", nargs="?", const="prune.png",
                   help="PNG of channels kept and per-layer cost before/after")
    s.add_argument("--print-after", choices=["trace", "slim"], help="show the graph code")

    s = sub.add_parser("sparsify", help="1xN (CPU kernels) or 2:4 sparsity")
    _model_args(s)
    s.add_argument("--pattern", default="1x16", help="1xN (e.g. 1x16) or 2:4")
    s.add_argument("--sparsity", type=float, default=0.75, help="1xN: fraction removed")
    s.add_argument("--no-check-speed", dest="check_speed", action="store_false",
                   help="sparsify layers even where the kernel is slower than dense")
    s.add_argument("--skip", action="append", default=[], help="layer left dense (repeatable)")
    s.add_argument("--keep-first-last", action="store_true",
                   help="leave the first and the last conv/linear dense")
    s.add_argument("--no-fuse", dest="fuse", action="store_false",
                   help="keep BatchNorm / add / ReLU as separate ops (no folding, no epilogues)")
    s.add_argument("--no-verify", dest="verify", action="store_false")
    s.add_argument("--threads", type=int)
    s.add_argument("--device", help="run there, e.g. cuda (2:4 kernels: CUDA with fp16/bf16)")
    s.add_argument("--dtype", choices=sorted(_DTYPES), help="cast the model and its float inputs")
    s.add_argument("--out", help="write the result (torch.export .pt2)")

    s = sub.add_parser("bench", help="time models side by side (the first is the baseline)")
    s.add_argument("model_a", help="file.py:factory, module:factory or saved.pt2")
    s.add_argument("others", nargs="+", metavar="model_b",
                   help="models to compare with it (e.g. slim.pt2 fast.pt2)")
    s.add_argument("--input", action="append", default=[], help="input shape (as above)")
    s.add_argument("--repeats", type=int, default=30)
    s.add_argument("--warmup", type=int, default=5)
    s.add_argument("--threads", type=int, help="default: torch's current count")
    s.add_argument("--malloc", choices=["pinned", "default"], default="pinned",
                   help="pinned: fix glibc's malloc thresholds first, as `table measure` does")
    s.add_argument("--no-check", dest="check", action="store_false",
                   help="do not compare the outputs")
    s.add_argument("--json", action="store_true")

    t = sub.add_parser("table", help="latency tables")
    tsub = t.add_subparsers(dest="table_cmd", required=True)
    s = tsub.add_parser("measure", help="measure a latency table for a model's layers")
    _model_args(s)
    s.add_argument("--out", required=True, help="table JSON to write")
    s.add_argument("--round-to", type=int, default=8, help="grid step of channel counts")
    s.add_argument("--threads", type=int)
    s.add_argument("--repeats", type=int, default=7)
    s.add_argument("--warmup", type=int, default=2)
    s.add_argument("--no-overheads", action="store_true",
                   help="skip the elementwise/norm overhead curves")
    s.add_argument("--no-context", dest="context", action="store_false",
                   help="skip the in-model calibration (node timings of the model itself)")
    s.add_argument("--no-watch-load", action="store_true",
                   help="do not re-measure points timed while the CPUs were busy")
    return p


_COMMANDS = {"demo": _cmd_demo, "analyze": _cmd_analyze, "prune": _cmd_prune,
             "sparsify": _cmd_sparsify, "bench": _cmd_bench, "table": _cmd_table}


def _trace_line(msg: str) -> str:
    """'could not trace M: <why the last tracer failed>' from a multi-line TraceError."""
    lines = [ln.strip() for ln in msg.strip().splitlines()]
    tries = [ln[2:] for ln in lines if ln.startswith("- ")]
    return f"{lines[0]} {tries[-1]}" if tries else lines[0]


def _fail(code: int, msg: str) -> int:
    print(f"graphprune: error: {(msg.strip().splitlines() or ['?'])[0]}", file=sys.stderr)
    return code


def main(argv=None) -> int:
    warnings.filterwarnings("ignore", category=FutureWarning)
    args = build_parser().parse_args(argv)
    from .errors import GraphpruneError, PlanError, TraceError, VerificationError

    try:
        return _COMMANDS[args.cmd](args)
    except BrokenPipeError:  # `graphprune ... | head`: the reader left, not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_OK
    except UsageError as e:
        return _fail(EXIT_USAGE, str(e))
    except PlanError as e:
        return _fail(EXIT_PRUNE, str(e))
    except TraceError as e:
        return _fail(EXIT_INPUT, _trace_line(str(e)))
    except VerificationError as e:
        return _fail(EXIT_INTERNAL, str(e))
    except (InputError, GraphpruneError, ValueError) as e:
        return _fail(EXIT_INPUT, str(e))
    except Exception as e:  # noqa: BLE001 - one line, the traceback on request
        if os.environ.get("GRAPHPRUNE_DEBUG") == "1":
            raise
        return _fail(EXIT_INTERNAL, f"{type(e).__name__}: {e} (GRAPHPRUNE_DEBUG=1 for the "
                     f"traceback)")


if __name__ == "__main__":
    raise SystemExit(main())
