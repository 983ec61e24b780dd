"""Save a pruned model as a torch.export program (.pt2) with a dynamic batch dimension and the
Plan beside it, then reload it in a fresh Python process that never imports the model's class.

    python examples/save_and_reload.py
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path

import torch

import graphprune as gp
from graphprune.zoo import ZOO

RELOAD = """
import sys, torch
import graphprune as gp  # registers graphprune's custom ops; the model's class is not needed
m = gp.load(sys.argv[1])
x = torch.load(sys.argv[2])
torch.save(m(x), sys.argv[3])
print("reloaded:", m.graphprune_meta["model"], "dynamic batch:", m.graphprune_meta["dynamic_batch"],
      "plan groups:", len(m.graphprune_plan.keep))
"""


def main() -> None:
    torch.set_num_threads(1)
    model, (x,) = ZOO["mobilenet_v2"]()
    slim = gp.prune(model, x, target=gp.Flops(0.5), round_to=4)
    out = Path(tempfile.mkdtemp())
    path = gp.save(slim, out / "slim.pt2", x)
    print("wrote", path, "and", gp.saving.plan_path(path).name)
    x7 = torch.randn(7, *x.shape[1:])  # another batch size than the example's
    torch.save(x7, out / "x.pt")
    env_cmd = [sys.executable, "-c", "import torch; torch.set_num_threads(1)\n" + RELOAD,
               str(path), str(out / "x.pt"), str(out / "y.pt")]
    print(subprocess.run(env_cmd, check=True, capture_output=True, text=True).stdout.strip())
    with torch.no_grad():
        same = torch.equal(torch.load(out / "y.pt"), slim(x7))
    print("fresh-process output equals the pruned model's:", same)


if __name__ == "__main__":
    main()
