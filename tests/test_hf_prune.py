"""Hugging Face transformers models (built from configs, random weights): they fail
symbolic_trace, go through torch.export, prune, keep their ModelOutput and verify."""

from __future__ import annotations

import pytest
from conftest import check_prune

import graphprune as gp
from graphprune.hf_zoo import HF_ZOO


@pytest.mark.parametrize("name", sorted(HF_ZOO))
def test_hf_prunes_and_verifies(name):
    m, x = HF_ZOO[name]()
    a, p, slim = check_prune(m, x, ratio=0.5)
    assert a.traced.kind == "export"
    assert a.traced.errors and "symbolic_trace failed" in a.traced.errors[0]
    out_ref = m(**x) if isinstance(x, dict) else m(*x)
    out = slim(**x) if isinstance(x, dict) else slim(*x)
    assert type(out) is type(out_ref)
    pinned = [g for g in a.groups if not g.prunable]
    assert all("graph output" in g.reason for g in pinned), [g.reason for g in pinned]


def test_bert_hidden_stream_pinned_by_output():
    """BertModel returns last_hidden_state: the residual stream reaches the output."""
    m, x = HF_ZOO["bert_model"]()
    a = gp.analyze(m, x)
    emb = next(g for g in a.groups if any("word_embeddings.weight[1]" in s for s in g.members))
    assert not emb.prunable and "graph output" in emb.reason
