"""Sanity tests of the architecture zoo: graphprune.zoo, graphprune.hf_zoo and examples/models.py.

Every small zoo model runs, is finite, has the expected output shape, is deterministic and really
depends on its input; full-size parameter counts match torchvision exactly (built on the meta
device); every Hugging Face model runs, fails plain ``torch.fx.symbolic_trace`` the documented way
and exports with ``torch.export.export(strict=False)``.
"""

from __future__ import annotations

import importlib.util
import pathlib
import warnings

import pytest
import torch
from torch import nn

from graphprune import zoo

try:
    from graphprune import hf_zoo
except ImportError:  # pragma: no cover - graphprune.hf_zoo itself guards the transformers import
    hf_zoo = None

HAS_TRANSFORMERS = importlib.util.find_spec("transformers") is not None
ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module", autouse=True)
def _single_thread():
    # Tiny models: intra-op threading only adds overhead, and on a busy 2-core machine spinning
    # OpenMP workers make a 5 ms forward take seconds.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# --------------------------------------------------------------------------------------------------
# graphprune.zoo: small variants
# --------------------------------------------------------------------------------------------------

EXPECTED_ZOO = {
    "resnet18",
    "resnet50",
    "resnext",
    "densenet",
    "mobilenet_v2",
    "mobilenet_v3",
    "efficientnet",
    "shufflenet_v2",
    "squeezenet",
    "inception",
    "convnext",
    "regnet",
    "regnet_x",
    "unet",
    "unet_bilinear",
    "vgg",
    "alexnet",
    "vit",
    "vit_separate_qkv",
    "vit_mha",
    "swin",
    "mlp",
    "lstm",
    "custom_op",
}

OUTPUT_SHAPE = {"unet": (2, 2, 32, 32), "unet_bilinear": (2, 2, 32, 32)}  # default: (2, 10)


def test_registries():
    assert set(zoo.ZOO) == EXPECTED_ZOO
    assert set(zoo.FULL) == {"resnet50", "resnet18", "densenet121", "mobilenet_v2", "vit_b16"}
    assert set(zoo.NEGATIVE) <= set(zoo.ZOO)
    for name in zoo.__all__:
        assert hasattr(zoo, name), name


@pytest.mark.parametrize("name", sorted(zoo.ZOO))
def test_zoo_model_runs(name):
    rng_before = torch.random.get_rng_state()
    model, inputs = zoo.ZOO[name]()
    assert torch.equal(torch.random.get_rng_state(), rng_before), "factory touched the global RNG"
    assert isinstance(model, nn.Module) and isinstance(inputs, tuple)
    assert not any(m.training for m in model.modules()), "factory must return an eval model"
    expected_shape = OUTPUT_SHAPE.get(name, (2, 10))
    expected_input = (2, 64) if name == "mlp" else (2, 3, 32, 32)
    assert tuple(inputs[0].shape) == expected_input
    with torch.no_grad():
        out = model(*inputs)
        # deterministic: a second build gives the same weights, inputs and outputs
        model2, inputs2 = zoo.ZOO[name]()
        out2 = model2(*inputs2)
    assert tuple(out.shape) == expected_shape
    assert torch.isfinite(out).all()
    assert torch.equal(inputs[0], inputs2[0])
    torch.testing.assert_close(out2, out, rtol=1e-5, atol=1e-5)
    # outputs are O(1) and depend on the input (BN statistics calibrated, not degenerate)
    assert 1e-2 < out.std().item() < 1e2
    assert (out[0] - out[1]).abs().max().item() > 1e-2
    # the factory's cheap example_inputs() matches
    assert torch.equal(zoo.ZOO[name].example_inputs()[0], inputs[0])


@pytest.mark.parametrize("name", sorted(zoo.ZOO))
def test_zoo_model_fx_traceable(name):
    """All hand-written zoo models are plain-fx traceable (the HF ones are not; see below)."""
    model, inputs = zoo.ZOO[name]()
    gm = torch.fx.symbolic_trace(model)
    with torch.no_grad():
        torch.testing.assert_close(gm(*inputs), model(*inputs), rtol=1e-5, atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(zoo.ZOO))
def test_zoo_model_exports(name):
    model, inputs = zoo.ZOO[name]()
    ep = torch.export.export(model, inputs, strict=False)
    with torch.no_grad():
        torch.testing.assert_close(ep.module()(*inputs), model(*inputs), rtol=1e-5, atol=1e-5)


def test_randomize_bn_is_nontrivial_and_deterministic():
    model, _ = zoo.ZOO["resnet18"]()
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert bns
    for bn in bns:
        assert bn.running_mean.abs().max() > 0
        assert not torch.allclose(bn.running_var, torch.ones_like(bn.running_var))
        assert not torch.allclose(bn.weight, torch.ones_like(bn.weight))
        assert bn.bias.abs().max() > 0
    # without calibration input: purely random statistics, deterministic in the seed
    a, b = zoo.resnet18(width=0.25), zoo.resnet18(width=0.25)
    zoo.randomize_bn(a, seed=3)
    zoo.randomize_bn(b, seed=3)
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert ka == kb
        if "running" in ka or "bn" in ka:
            assert torch.equal(va, vb), ka


def test_layer_scale_and_embeddings_randomised():
    model, _ = zoo.ZOO["convnext"]()
    gammas = [m.gamma for m in model.modules() if isinstance(m, zoo.ConvNeXtBlock)]
    assert gammas and all(g.min() >= 0.2 and g.std() > 0 for g in gammas)
    vit, _ = zoo.ZOO["vit"]()
    assert vit.cls_token.abs().max() > 1e-2 and vit.pos_embed.std() > 1e-2


def test_negative_models_contain_unknown_ops():
    lstm, _ = zoo.ZOO["lstm"]()
    assert any(isinstance(m, nn.LSTM) for m in lstm.modules())
    model, inputs = zoo.ZOO["custom_op"]()
    gm = torch.fx.symbolic_trace(model)
    targets = {str(n.target) for n in gm.graph.nodes if n.op == "call_function"}
    assert any("channel_mix" in t for t in targets), targets


def test_realistic_patterns_present():
    swin, _ = zoo.ZOO["swin"]()
    blocks = [m for m in swin.modules() if isinstance(m, zoo.SwinTransformerBlock)]
    assert any(b.shift_size > 0 and b.attn_mask is not None for b in blocks)
    assert any(b.shift_size == 0 for b in blocks)
    assert all(hasattr(b.attn, "relative_position_index") for b in blocks)
    resnext, _ = zoo.ZOO["resnext"]()
    assert any(isinstance(m, nn.Conv2d) and 1 < m.groups < m.in_channels for m in resnext.modules())
    mbv2, _ = zoo.ZOO["mobilenet_v2"]()
    assert any(isinstance(m, nn.Conv2d) and m.groups == m.in_channels > 1 for m in mbv2.modules())


# --------------------------------------------------------------------------------------------------
# graphprune.zoo: full-size variants (meta device: no memory, no compute)
# --------------------------------------------------------------------------------------------------

TORCHVISION_PARAMS = [
    ("resnet50", zoo.resnet50, 25_557_032),
    ("densenet121", zoo.densenet121, 7_978_856),
    ("resnet18", zoo.resnet18, 11_689_512),
    ("mobilenet_v2", zoo.mobilenet_v2, 3_504_872),
    ("vit_b16", zoo.vit_b16, 86_567_656),
    ("resnext50_32x4d", zoo.resnext, 25_028_904),
    ("efficientnet_b0", zoo.efficientnet, 5_288_548),
    ("mobilenet_v3_small", zoo.mobilenet_v3, 2_542_856),
    ("shufflenet_v2_x1_0", zoo.shufflenet_v2, 2_278_604),
    ("squeezenet1_1", zoo.squeezenet, 1_235_496),
    ("convnext_tiny", zoo.convnext, 28_589_128),
    ("regnet_y_400mf", zoo.regnet, 4_344_144),
    ("swin_t", zoo.swin, 28_288_354),
    ("vgg16_bn", zoo.vgg, 138_365_992),
]


@pytest.mark.parametrize(
    "name,ctor,expected", TORCHVISION_PARAMS, ids=[t[0] for t in TORCHVISION_PARAMS]
)
def test_full_size_param_counts(name, ctor, expected):
    with torch.device("meta"):
        model = ctor()
    assert zoo.count_params(model) == expected


@pytest.mark.parametrize("name", sorted(zoo.FULL))
def test_full_size_forward_shapes_on_meta(name):
    ctor = {"vit_b16": zoo.vit_b16}.get(name, getattr(zoo, name))
    with torch.device("meta"):
        model = ctor().eval()
        out = model(torch.empty(zoo.FULL[name].input_shape))
    assert tuple(out.shape) == (1, 1000)
    assert zoo.FULL[name].input_shape == (1, 3, 224, 224)


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(zoo.FULL))
def test_full_size_factories_run(name):
    model, inputs = zoo.FULL[name]()
    with torch.no_grad():
        out = model(*inputs)
    assert tuple(out.shape) == (1, 1000) and torch.isfinite(out).all()


# --------------------------------------------------------------------------------------------------
# examples/models.py
# --------------------------------------------------------------------------------------------------


def _load_examples():
    spec = importlib.util.spec_from_file_location(
        "graphprune_example_models", ROOT / "examples" / "models.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_examples_models():
    models = _load_examples()
    for name in ("resnet50", "resnet18", "densenet121", "mobilenet_v2", "vit"):
        assert callable(getattr(models, name))
        assert tuple(models.example_input(name).shape) == (1, 3, 224, 224)
    for name in zoo.ZOO:
        assert callable(getattr(models, f"{name}_small"))
    model = models.resnet18()
    assert not model.training and zoo.count_params(model) == 11_689_512
    small = models.vit_small()
    with torch.no_grad():
        out = small(models.example_input("vit_small"))
    assert tuple(out.shape) == (2, 10)
    with pytest.raises(KeyError):
        models.example_input("no_such_model")


# --------------------------------------------------------------------------------------------------
# graphprune.hf_zoo (tiny transformers models built from configs)
# --------------------------------------------------------------------------------------------------

needs_hf = pytest.mark.skipif(
    hf_zoo is None or not HAS_TRANSFORMERS, reason="transformers is not installed"
)
HF_NAMES = sorted(hf_zoo.HF_ZOO) if hf_zoo is not None else []
HF_OUTPUT_SHAPE = {
    "resnet_model": (2, 32, 4, 4),
    "bert": (2, 3),
    "bert_model": (2, 16, 64),
}  # default: logits (2, 10)


@needs_hf
def test_hf_registry():
    expected = {
        "resnet",
        "resnet_model",
        "convnext",
        "mobilenet_v2",
        "regnet",
        "efficientnet",
        "vit",
        "vit_sdpa",
        "swin",
        "mobilevit",
        "bert",
        "bert_model",
    }
    assert set(hf_zoo.HF_ZOO) | set(hf_zoo.HF_SKIPPED) == expected
    assert set(hf_zoo.FX_TRACE_FAILURE) == expected


@needs_hf
@pytest.mark.timeout(60)
@pytest.mark.parametrize("name", HF_NAMES)
def test_hf_model_runs_and_fx_fails(name):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model, inputs = hf_zoo.HF_ZOO[name]()
        assert not any(m.training for m in model.modules())
        with torch.no_grad():
            out = hf_zoo.primary_output(hf_zoo.call(model, inputs))
        assert tuple(out.shape) == HF_OUTPUT_SHAPE.get(name, (2, 10))
        assert torch.isfinite(out).all()
        assert (out[0] - out[1]).abs().max().item() > 1e-3
        if name.startswith("bert"):
            assert inputs["input_ids"].dtype == torch.int64
            assert inputs["attention_mask"].dtype == torch.int64
        with pytest.raises(Exception) as info:
            torch.fx.symbolic_trace(model)
    assert type(info.value).__name__ == hf_zoo.FX_TRACE_FAILURE[name]


@needs_hf
@pytest.mark.timeout(60)
@pytest.mark.parametrize("name", HF_NAMES)
def test_hf_model_exports_non_strict(name):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model, inputs = hf_zoo.HF_ZOO[name]()
        args, kwargs = hf_zoo.split_inputs(inputs)
        ep = torch.export.export(model, args, kwargs, strict=False)
        with torch.no_grad():
            expected = hf_zoo.primary_output(model(*args, **kwargs))
            got = hf_zoo.primary_output(ep.module()(*args, **kwargs))
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
