"""Tiny Hugging Face ``transformers`` models built from configs (random weights, no downloads).

Every factory in :data:`HF_ZOO` returns ``(model.eval(), inputs)`` where ``inputs`` is a tuple
``(pixel_values,)`` for vision models (batch 2, 32x32; MobileViT 64x64) or a dict
``{"input_ids", "attention_mask"}`` (int64, batch 2, seq 16, second row padded) for BERT; use
:func:`split_inputs` / :func:`call` to run them and :func:`primary_output` to get ``logits`` /
``last_hidden_state``. Models are tiny (hidden sizes 16-64, 1-2 layers/stages), forwards take
milliseconds. Weights are re-drawn like :data:`graphprune.zoo.ZOO` (He/fan-in Linear init, random
biases, BN statistics calibrated then perturbed, random norm affines) so numerical checks bite.
A model class missing from the installed ``transformers`` is skipped; see :data:`HF_SKIPPED`.

Findings with torch 2.13.0 / transformers 5.23.0 (checked by ``tests/test_zoo.py``): plain
``torch.fx.symbolic_trace(model)`` fails on every one of them (``transformers.utils.fx``, HF's own
tracer, no longer exists in v5), while ``torch.export.export(model, args, kwargs, strict=False)``
succeeds and its module reproduces the eager output exactly (Swin: ~2e-7).

============  ==========================================  =======  ===============================
name          class (attention)                           params   ``fx.symbolic_trace`` raises
============  ==========================================  =======  ===============================
resnet        ResNetForImageClassification                 15,418  TraceError [1]
resnet_model  ResNetModel                                  21,584  TraceError [1]
convnext      ConvNextForImageClassification               16,346  TraceError [2]
mobilenet_v2  MobileNetV2ForImageClassification           250,922  TypeError [3]
regnet        RegNetForImageClassification                  7,890  TraceError [1]
efficientnet  EfficientNetForImageClassification          126,822  TraceError [4]
vit           ViTForImageClassification (eager)            24,234  TraceError [2]
vit_sdpa      ViTForImageClassification (sdpa)             24,234  TraceError [2]
swin          SwinForImageClassification                   22,270  TraceError [2]
mobilevit     MobileViTForImageClassification             395,810  TraceError [4]
bert          BertForSequenceClassification (eager)        24,515  ValueError [5]
bert_model    BertModel (sdpa)                             50,176  TypeError [6]
============  ==========================================  =======  ===============================

torch.export.export(strict=False) succeeds for all twelve. Causes of the fx failures:
[1] data-dependent ``if num_channels != self.num_channels`` in the embeddings;
[2] "Proxy object cannot be iterated": the output-capturing decorator unpacks ``**kwargs``;
[3] ``int(features.shape[-2])`` in ``apply_tf_padding`` (TF "SAME" padding);
[4] ``if output_hidden_states`` on a traced value in the encoder;
[5] "code: co_varnames is too small": fx cannot patch a forward taking ``**kwargs``;
[6] "'Proxy' object does not support item assignment" in the kwargs-checking wrapper.

``TraceError`` is ``torch.fx.proxy.TraceError``. :data:`FX_TRACE_FAILURE` records the expected
exception type per model.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from graphprune.zoo import randomize_bn, randomize_weights

__all__ = [
    "HF_ZOO",
    "HF_SKIPPED",
    "FX_TRACE_FAILURE",
    "HFInputs",
    "split_inputs",
    "call",
    "primary_output",
    "hf_resnet",
    "hf_resnet_model",
    "hf_convnext",
    "hf_mobilenet_v2",
    "hf_regnet",
    "hf_efficientnet",
    "hf_vit",
    "hf_vit_sdpa",
    "hf_swin",
    "hf_mobilevit",
    "hf_bert",
    "hf_bert_model",
]

HFInputs = tuple[Tensor, ...] | dict[str, Tensor]
HFFactory = Callable[[], tuple[nn.Module, HFInputs]]

try:  # transformers is a test extra, not a runtime dependency of graphprune
    import transformers as _tf
except ImportError:  # pragma: no cover - exercised only without the test extra
    _tf = None


def split_inputs(inputs: HFInputs) -> tuple[tuple[Tensor, ...], dict[str, Tensor]]:
    """``(args, kwargs)`` for ``model(*args, **kwargs)`` / ``torch.export.export``."""
    if isinstance(inputs, Mapping):
        return (), dict(inputs)
    return tuple(inputs), {}


def call(model: nn.Module, inputs: HFInputs) -> Any:
    """Run ``model`` on example inputs from :data:`HF_ZOO` (tuple or dict)."""
    args, kwargs = split_inputs(inputs)
    return model(*args, **kwargs)


def primary_output(output: Any) -> Tensor:
    """The main tensor of a model output: ``logits``, else ``last_hidden_state``, else the first."""
    if isinstance(output, Tensor):
        return output
    for key in ("logits", "last_hidden_state"):
        value = getattr(output, key, None)
        if isinstance(value, Tensor):
            return value
    if isinstance(output, Mapping):
        return next(v for v in output.values() if isinstance(v, Tensor))
    return next(v for v in output if isinstance(v, Tensor))


def _images(batch: int = 2, size: int = 32, seed: int = 0) -> tuple[Tensor, ...]:
    """Deterministic ``(pixel_values,)``."""
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, 3, size, size, generator=g),)


def _tokens(batch: int = 2, seq: int = 16, vocab: int = 128, seed: int = 0) -> dict[str, Tensor]:
    """Deterministic BERT inputs: int64 ``input_ids`` and ``attention_mask`` (row 1 padded)."""
    g = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(1, vocab, (batch, seq), generator=g, dtype=torch.int64)
    attention_mask = torch.ones(batch, seq, dtype=torch.int64)
    attention_mask[1, seq - 4 :] = 0  # one padded sequence, so the mask matters
    return {"input_ids": input_ids, "attention_mask": attention_mask}


def _build(
    model_cls: str, config_cls: str, inputs: HFInputs, seed: int = 0, **config: Any
) -> tuple[nn.Module, HFInputs]:
    """``transformers.<model_cls>(<config_cls>(**config))``, deterministic, weights randomised.

    HF initialises Linear weights with std 0.02 and zero biases, which makes tiny models' outputs
    nearly input-independent; like :data:`graphprune.zoo.ZOO`, the weights are re-drawn with
    :func:`~graphprune.zoo.randomize_weights` and the norms with
    :func:`~graphprune.zoo.randomize_bn` (BN statistics calibrated on the example images).
    """
    assert _tf is not None
    attn = config.pop("attn_implementation", None)
    cfg = getattr(_tf, config_cls)(**config)
    if attn is not None:
        cfg._attn_implementation = attn
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = getattr(_tf, model_cls)(cfg)
        model.eval()
        randomize_weights(model, seed)
        calibration = None
        if isinstance(inputs, tuple):
            (x,) = inputs
            calibration = torch.cat([x, torch.randn(16 - x.shape[0], *x.shape[1:])])
        randomize_bn(model, seed, calibration_input=calibration)
    return model.eval(), inputs


# --------------------------------------------------------------------------------------------------
# factories
# --------------------------------------------------------------------------------------------------


def hf_resnet() -> tuple[nn.Module, HFInputs]:
    """``ResNetForImageClassification``: bottleneck stages [32, 64] x [1, 2], 32x32 input."""
    return _build(
        "ResNetForImageClassification",
        "ResNetConfig",
        _images(),
        embedding_size=16,
        hidden_sizes=[32, 64],
        depths=[1, 2],
        layer_type="bottleneck",
        num_labels=10,
    )


def hf_resnet_model() -> tuple[nn.Module, HFInputs]:
    """``ResNetModel`` (backbone + pooler, no head): basic blocks [16, 32] x [1, 1]."""
    return _build(
        "ResNetModel",
        "ResNetConfig",
        _images(),
        embedding_size=16,
        hidden_sizes=[16, 32],
        depths=[1, 1],
        layer_type="basic",
    )


def hf_convnext() -> tuple[nn.Module, HFInputs]:
    """``ConvNextForImageClassification``: 2 stages [16, 32] x [1, 1]."""
    return _build(
        "ConvNextForImageClassification",
        "ConvNextConfig",
        _images(),
        num_stages=2,
        hidden_sizes=[16, 32],
        depths=[1, 1],
        image_size=32,
        layer_scale_init_value=0.5,
        num_labels=10,
    )


def hf_mobilenet_v2() -> tuple[nn.Module, HFInputs]:
    """``MobileNetV2ForImageClassification`` at depth multiplier 0.25 (TF 'SAME' padding)."""
    return _build(
        "MobileNetV2ForImageClassification",
        "MobileNetV2Config",
        _images(),
        depth_multiplier=0.25,
        image_size=32,
        num_labels=10,
    )


def hf_regnet() -> tuple[nn.Module, HFInputs]:
    """``RegNetForImageClassification`` (Y: grouped conv + SE): [16, 32] x [1, 1], group width 8."""
    return _build(
        "RegNetForImageClassification",
        "RegNetConfig",
        _images(),
        embedding_size=16,
        hidden_sizes=[16, 32],
        depths=[1, 1],
        groups_width=8,
        layer_type="y",
        num_labels=10,
    )


def hf_efficientnet() -> tuple[nn.Module, HFInputs]:
    """``EfficientNetForImageClassification`` with width 0.25 and one block per stage."""
    return _build(
        "EfficientNetForImageClassification",
        "EfficientNetConfig",
        _images(),
        image_size=32,
        width_coefficient=0.25,
        depth_coefficient=0.25,
        hidden_dim=320,
        num_labels=10,
    )


def hf_vit() -> tuple[nn.Module, HFInputs]:
    """``ViTForImageClassification`` (eager attention): dim 32, 2 layers, 2 heads, patch 8."""
    return _build(
        "ViTForImageClassification",
        "ViTConfig",
        _images(),
        image_size=32,
        patch_size=8,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        num_labels=10,
        attn_implementation="eager",
    )


def hf_vit_sdpa() -> tuple[nn.Module, HFInputs]:
    """``ViTForImageClassification`` with ``scaled_dot_product_attention`` (the HF default)."""
    return _build(
        "ViTForImageClassification",
        "ViTConfig",
        _images(),
        image_size=32,
        patch_size=8,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        num_labels=10,
        attn_implementation="sdpa",
    )


def hf_swin() -> tuple[nn.Module, HFInputs]:
    """``SwinForImageClassification``: embed 16, depths [2, 1], heads [1, 2], window 4."""
    return _build(
        "SwinForImageClassification",
        "SwinConfig",
        _images(),
        image_size=32,
        patch_size=2,
        embed_dim=16,
        depths=[2, 1],
        num_heads=[1, 2],
        window_size=4,
        drop_path_rate=0.0,
        num_labels=10,
    )


def hf_mobilevit() -> tuple[nn.Module, HFInputs]:
    """``MobileViTForImageClassification``: hidden [32, 48, 64], narrow neck, 64x64 input."""
    return _build(
        "MobileViTForImageClassification",
        "MobileViTConfig",
        _images(size=64),
        image_size=64,
        hidden_sizes=[32, 48, 64],
        neck_hidden_sizes=[8, 16, 24, 32, 40, 48, 96],
        num_attention_heads=2,
        num_labels=10,
    )


def hf_bert() -> tuple[nn.Module, HFInputs]:
    """``BertForSequenceClassification`` (eager attention): dim 32, 2 layers, 2 heads, seq 16."""
    return _build(
        "BertForSequenceClassification",
        "BertConfig",
        _tokens(),
        vocab_size=128,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
        num_labels=3,
        attn_implementation="eager",
    )


def hf_bert_model() -> tuple[nn.Module, HFInputs]:
    """``BertModel`` (encoder + pooler, SDPA attention): dim 64, 1 layer, 4 heads, seq 16."""
    return _build(
        "BertModel",
        "BertConfig",
        _tokens(),
        vocab_size=128,
        hidden_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        intermediate_size=128,
        max_position_embeddings=64,
        attn_implementation="sdpa",
    )


_CANDIDATES: dict[str, tuple[str, HFFactory]] = {
    "resnet": ("ResNetForImageClassification", hf_resnet),
    "resnet_model": ("ResNetModel", hf_resnet_model),
    "convnext": ("ConvNextForImageClassification", hf_convnext),
    "mobilenet_v2": ("MobileNetV2ForImageClassification", hf_mobilenet_v2),
    "regnet": ("RegNetForImageClassification", hf_regnet),
    "efficientnet": ("EfficientNetForImageClassification", hf_efficientnet),
    "vit": ("ViTForImageClassification", hf_vit),
    "vit_sdpa": ("ViTForImageClassification", hf_vit_sdpa),
    "swin": ("SwinForImageClassification", hf_swin),
    "mobilevit": ("MobileViTForImageClassification", hf_mobilevit),
    "bert": ("BertForSequenceClassification", hf_bert),
    "bert_model": ("BertModel", hf_bert_model),
}


def _available(class_name: str) -> bool:
    """Whether the installed ``transformers`` exports ``class_name``."""
    if _tf is None:
        return False
    try:
        return getattr(_tf, class_name, None) is not None
    except Exception:  # lazy import of a model module can fail on a missing optional dependency
        return False


HF_ZOO: dict[str, HFFactory] = {
    name: factory for name, (cls, factory) in _CANDIDATES.items() if _available(cls)
}
"""``name -> () -> (model.eval(), inputs)``; inputs: a tuple (vision) or a dict (BERT)."""

HF_SKIPPED: dict[str, str] = {
    name: (
        "transformers is not installed"
        if _tf is None
        else f"transformers {_tf.__version__} has no {cls}"
    )
    for name, (cls, _factory) in _CANDIDATES.items()
    if name not in HF_ZOO
}
"""Models left out because the installed ``transformers`` lacks them (name -> reason)."""

FX_TRACE_FAILURE: dict[str, str] = {
    "resnet": "TraceError",
    "resnet_model": "TraceError",
    "convnext": "TraceError",
    "mobilenet_v2": "TypeError",
    "regnet": "TraceError",
    "efficientnet": "TraceError",
    "vit": "TraceError",
    "vit_sdpa": "TraceError",
    "swin": "TraceError",
    "mobilevit": "TraceError",
    "bert": "ValueError",
    "bert_model": "TypeError",
}
"""Exception class ``torch.fx.symbolic_trace`` raises per model (torch 2.13, transformers 5.23)."""
