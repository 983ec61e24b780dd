"""Command line: `graphprune demo | analyze | prune` (flags map onto PruneConfig)."""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import sys
import warnings
from pathlib import Path

__all__ = ["main", "load_model"]

EXIT_OK, EXIT_USAGE, EXIT_INPUT, EXIT_PRUNE = 0, 2, 3, 4


def load_model(spec: str):
    """`file.py:factory` or `module:factory` -> nn.Module (factory called with no args)."""
    if ":" not in spec:
        raise ValueError(f"MODEL must be file.py:factory or module:factory, got {spec!r}")
    src, name = spec.rsplit(":", 1)
    if src.endswith(".py"):
        path = Path(src)
        if not path.exists():
            raise ValueError(f"no such file: {src}")
        s = importlib.util.spec_from_file_location(path.stem, path)
        mod = importlib.util.module_from_spec(s)
        sys.path.insert(0, str(path.parent.resolve()))
        s.loader.exec_module(mod)
    else:
        mod = importlib.import_module(src)
    if not hasattr(mod, name):
        raise ValueError(f"{src} has no factory {name!r}")
    model = getattr(mod, name)()
    return model.eval() if hasattr(model, "eval") else model


def _shape(s: str):
    try:
        return tuple(int(v) for v in s.split(","))
    except ValueError:
        raise ValueError(f"--input must be comma-separated ints like 1,3,224,224, got {s!r}") from None


def _inputs(args):
    import torch

    return tuple(torch.randn(*_shape(s)) for s in args.input)


def _cmd_demo(args) -> int:
    from .demo import run_demo

    run_demo(epochs=args.epochs, finetune=args.finetune)
    return EXIT_OK


def _cmd_analyze(args) -> int:
    import graphprune as gp

    a = gp.analyze(load_model(args.model), _inputs(args), method=args.trace)
    if args.json:
        print(json.dumps([{"id": g.id, "size": g.size, "prunable": g.prunable,
                           "reason": g.reason, "members": list(g.members)} for g in a.groups]))
    else:
        print(a.summary())
    return EXIT_OK


def _cmd_prune(args) -> int:
    import torch

    import graphprune as gp

    model = load_model(args.model)
    x = _inputs(args)
    target = gp.Uniform(args.uniform)
    a = gp.analyze(model, x, method=args.trace)
    plan = gp.plan(a, target, args.importance, round_to=args.round_to)
    slim = gp.apply(a, plan, verify=not args.no_verify)
    before, after = gp.stats(model, x), gp.stats(slim, x)
    info = {"before": before, "after": after, **slim.graphprune_report}
    if args.out:
        torch.save({"plan": plan.to_json()}, args.out + ".plan") if args.out.endswith(".pt") else None
        Path(args.out).with_suffix(".plan.json").write_text(plan.to_json())
    print(json.dumps(info) if args.json else "\n".join(f"{k}: {v}" for k, v in info.items()))
    return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="graphprune", description=__doc__)
    sub = p.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("demo", help="train, prune and check a ResNet on sklearn digits")
    d.add_argument("--epochs", type=int, default=4)
    d.add_argument("--finetune", type=int, default=2)
    for name in ("analyze", "prune"):
        s = sub.add_parser(name)
        s.add_argument("model", help="file.py:factory or module:factory")
        s.add_argument("--input", action="append", required=True, help="shape, e.g. 1,3,224,224")
        s.add_argument("--trace", default="auto", choices=["auto", "fx", "export"])
        s.add_argument("--json", action="store_true")
        if name == "prune":
            s.add_argument("--uniform", type=float, default=0.3)
            s.add_argument("--importance", default="l1")
            s.add_argument("--round-to", type=int, default=1)
            s.add_argument("--no-verify", action="store_true")
            s.add_argument("--out")
    return p


def main(argv=None) -> int:
    warnings.filterwarnings("ignore", category=FutureWarning)
    args = build_parser().parse_args(argv)
    from .errors import GraphpruneError, PlanError

    try:
        return {"demo": _cmd_demo, "analyze": _cmd_analyze, "prune": _cmd_prune}[args.cmd](args)
    except PlanError as e:
        print(f"graphprune: error: {e}", file=sys.stderr)
        return EXIT_PRUNE
    except (GraphpruneError, ValueError) as e:
        print(f"graphprune: error: {str(e).splitlines()[0]}", file=sys.stderr)
        return EXIT_INPUT


if __name__ == "__main__":
    raise SystemExit(main())
