"""Readable reports: the sparsity summary names every layer and why a layer stayed dense; the
report stays a JSON-ready dict."""

from __future__ import annotations

import json

import torch
import torch.nn as nn

import graphprune as gp

torch.set_num_threads(1)


def test_sparsity_summary_lists_layers_and_reasons():
    model = nn.Sequential(nn.Conv2d(8, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 10, 1)).eval()
    x = torch.randn(2, 8, 6, 6)
    fast = gp.sparsify(model, x, pattern="1x16", sparsity=0.5, check_speed=False)
    rep = fast.graphprune_report
    text = rep.summary()
    assert "0 " in text and "2 " in text  # both layers (module names "0" and "2") are listed
    assert "C_out=10 is not a multiple of N=16" in text  # the dense layer says why
    assert "1 of 2 layers sparsified" in text and "check: sparse vs masked dense oracle: verified" in text
    assert json.loads(json.dumps(rep))["sparsified"] == 1
