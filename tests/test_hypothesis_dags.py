"""Property test: random DAGs of conv/bn/act/add/cat/split/grouped/depthwise/linear/flatten
always prune to a model that equals its oracle."""

from __future__ import annotations

import os

import torch
import torch.nn as nn
import torch.nn.functional as F
from conftest import check_prune
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

N_EXAMPLES = int(os.environ.get("GRAPHPRUNE_DAG_EXAMPLES", "200"))


class RandomNet(nn.Module):
    """Interprets a list of ops over a growing list of [N, C, 4, 4] tensors."""

    def __init__(self, prog, chans):
        super().__init__()
        self.prog = prog
        self.mods = nn.ModuleDict()
        for i, (op, ins, p) in enumerate(prog):
            cin = chans[ins[0]]
            if op == "conv":
                self.mods[str(i)] = nn.Conv2d(cin, p["out"], p["k"], padding=p["k"] // 2)
            elif op == "gconv":
                self.mods[str(i)] = nn.Conv2d(cin, p["out"], 3, padding=1, groups=p["g"])
            elif op == "dw":
                self.mods[str(i)] = nn.Conv2d(cin, cin * p["m"], 3, padding=1, groups=cin)
            elif op == "bn":
                bn = nn.BatchNorm2d(cin)
                bn.running_mean.uniform_(-1, 1)
                bn.running_var.uniform_(0.5, 2)
                bn.weight.data.uniform_(0.5, 1.5)
                bn.bias.data.uniform_(-1, 1)
                self.mods[str(i)] = bn
        self.stem = nn.Conv2d(3, chans[1], 1)
        self.head = nn.Linear(chans[-1] * 16, 3)

    def forward(self, x):
        ts = [x, self.stem(x)]
        for i, (op, ins, p) in enumerate(self.prog):
            a = ts[ins[0]]
            if op in ("conv", "gconv", "dw", "bn"):
                y = self.mods[str(i)](a)
            elif op == "relu":
                y = F.relu(a)
            elif op == "gelu":
                y = F.gelu(a)
            elif op == "add":
                y = a + ts[ins[1]]
            elif op == "mul":
                y = a * torch.sigmoid(ts[ins[1]].mean((2, 3), keepdim=True))
            elif op == "cat":
                y = torch.cat([a, ts[ins[1]]], dim=1)
            elif op == "split":
                y = torch.split(a, [p["k"], a.shape[1] - p["k"]], dim=1)[p["j"]]
            elif op == "chunk":
                y = a.chunk(2, dim=1)[p["j"]]
            ts.append(y)
        return self.head(torch.flatten(ts[-1], 1))


@st.composite
def programs(draw):
    c0 = draw(st.integers(2, 8))
    chans = [3, c0]
    prog = []
    for _ in range(draw(st.integers(1, 7))):
        i = draw(st.integers(1, len(chans) - 1))
        c = chans[i]
        same = [j for j in range(1, len(chans)) if chans[j] == c and j != i]
        ops = ["conv", "bn", "relu", "gelu", "cat", "dw", "conv"]
        if same:
            ops += ["add", "add", "mul"]
        if c >= 4:
            ops += ["split"]
        if c % 2 == 0 and c >= 4:
            ops += ["chunk"]
        g = [g for g in (2, 4) if c % g == 0 and c // g >= 2]
        if g:
            ops += ["gconv"]
        op = draw(st.sampled_from(ops))
        p, ins = {}, [i]
        if op == "conv":
            p = {"out": draw(st.integers(2, 12)), "k": draw(st.sampled_from([1, 3]))}
            out = p["out"]
        elif op == "gconv":
            gg = draw(st.sampled_from(g))
            p = {"g": gg, "out": gg * draw(st.integers(1, 3))}
            out = p["out"]
        elif op == "dw":
            p = {"m": draw(st.sampled_from([1, 1, 2]))}
            out = c * p["m"]
        elif op in ("add", "mul"):
            ins.append(draw(st.sampled_from(same)))
            out = c
        elif op == "cat":
            ins.append(draw(st.integers(1, len(chans) - 1)))
            out = c + chans[ins[1]]
        elif op == "split":
            k = draw(st.integers(1, c - 1))
            j = draw(st.integers(0, 1))
            p = {"k": k, "j": j}
            out = k if j == 0 else c - k
        elif op == "chunk":
            p = {"j": draw(st.integers(0, 1))}
            out = c // 2
        else:
            out = c
        prog.append((op, tuple(ins), p))
        chans.append(out)
    return prog, chans


@settings(max_examples=N_EXAMPLES, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(programs(), st.sampled_from([0.25, 0.5, 0.75]))
def test_random_dag_verifies(prog_chans, ratio):
    prog, chans = prog_chans
    torch.manual_seed(len(prog))
    m = RandomNet(prog, chans).eval()
    check_prune(m, (torch.randn(2, 3, 4, 4),), ratio=ratio, method="fx", expect_pruned=False)
