"""gp.save / gp.load: torch.export programs with a dynamic batch, the Plan beside them, exact
round trips, and reloading in a fresh process that never sees the model's class."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn as nn

import graphprune as gp
from graphprune.zoo import ZOO

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def slim():
    model, (x,) = ZOO["resnet18"]()
    return gp.prune(model, x, target=gp.Uniform(0.5)), x


def test_round_trip_is_exact_and_keeps_the_plan(slim, tmp_path):
    model, x = slim
    path = gp.save(model, tmp_path / "slim.pt2", x)
    assert path.exists() and gp.saving.plan_path(path).exists()
    loaded = gp.load(path)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    assert loaded.graphprune_plan == model.graphprune_plan
    meta = loaded.graphprune_meta
    assert meta["dynamic_batch"] is True and meta["input_shapes"] == [list(x.shape)]
    assert json.loads(gp.saving.plan_path(path).read_text())["keep"]


def test_dynamic_batch(slim, tmp_path):
    model, x = slim
    loaded = gp.load(gp.save(model, tmp_path / "m.pt2", x[:1]))  # a batch of 1 still gives a Dim
    for b in (1, 3, 7):
        xb = torch.randn(b, *x.shape[1:])
        with torch.no_grad():
            assert torch.allclose(loaded(xb), model(xb), rtol=1e-5, atol=1e-6)


def test_reload_in_a_fresh_process_without_the_model_class(tmp_path):
    model, (x,) = ZOO["mobilenet_v2"]()
    fast = gp.sparsify(gp.prune(model, x, target=gp.Uniform(0.25)), x, pattern="1x8",
                       sparsity=0.5, check_speed=False)
    path = gp.save(fast, tmp_path / "fast.pt2", x)
    xin = torch.randn(3, *x.shape[1:])
    torch.save(xin, tmp_path / "x.pt")
    code = textwrap.dedent(f"""
        import sys, torch
        torch.set_num_threads(1)
        import graphprune as gp
        m = gp.load({str(path)!r})
        torch.save(m(torch.load({str(tmp_path / 'x.pt')!r})), {str(tmp_path / 'y.pt')!r})
        assert "graphprune.zoo" not in sys.modules
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=180, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    with torch.no_grad():
        # same numbers up to float reduction order (the parent may run other thread settings)
        torch.testing.assert_close(torch.load(tmp_path / "y.pt"), fast(xin), rtol=1e-5, atol=1e-6)


class _Baked(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(12, 4)

    def forward(self, x):
        return self.lin(x.reshape(2, 12))  # the batch size is baked in


def test_static_fallback_warns(tmp_path):
    m = _Baked().eval()
    x = torch.randn(2, 3, 4)
    with pytest.warns(UserWarning, match="static shapes"):
        path = gp.save(m, tmp_path / "b.pt2", x)
    loaded = gp.load(path)
    assert loaded.graphprune_meta["dynamic_batch"] is False
    with torch.no_grad():
        assert torch.equal(loaded(x), m(x))


def test_load_errors_name_the_problem(tmp_path):
    with pytest.raises(gp.GraphpruneError, match="no such file"):
        gp.load(tmp_path / "missing.pt2")
    bad = tmp_path / "bad.pt2"
    bad.write_text("not a program")
    with pytest.raises(gp.GraphpruneError, match="not a torch.export program"):
        gp.load(bad)
