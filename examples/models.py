"""Model factories for the ``graphprune`` CLI and demos.

Every factory takes no required arguments and returns an ``nn.Module`` in eval mode with
deterministic weights (BatchNorm statistics and norm affines randomised, see
:func:`graphprune.zoo.randomize_bn`); :func:`example_input` gives the matching input tensor.

* ``resnet50``, ``resnet18``, ``densenet121``, ``mobilenet_v2``, ``vit`` (ViT-B/16) --
  the full-size ImageNet models (224x224, batch 1), as in :data:`graphprune.zoo.FULL`.
* ``<name>_small`` for every :data:`graphprune.zoo.ZOO` entry (e.g. ``resnet50_small``,
  ``vit_small``, ``swin_small``) -- the fast 32x32 test variants (batch 2).

Usage: ``model = models.resnet50(); y = model(models.example_input("resnet50"))``.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor, nn

from graphprune.zoo import FULL, ZOO

__all__ = [
    "MODELS",
    "available",
    "example_input",
    "example_inputs",
    "resnet50",
    "resnet18",
    "densenet121",
    "mobilenet_v2",
    "vit",
    "vit_b16",
]

# CLI name -> zoo factory returning (model, (input,)).
_REGISTRY: dict[str, Callable[[], tuple[nn.Module, tuple[Tensor, ...]]]] = {
    **FULL,
    "vit": FULL["vit_b16"],
    **{f"{name}_small": factory for name, factory in ZOO.items()},
}


def _model(name: str) -> nn.Module:
    model, _ = _REGISTRY[name]()
    return model.eval()


def resnet50() -> nn.Module:
    """ResNet-50, 224x224 ImageNet (25,557,032 parameters)."""
    return _model("resnet50")


def resnet18() -> nn.Module:
    """ResNet-18, 224x224 ImageNet (11,689,512 parameters)."""
    return _model("resnet18")


def densenet121() -> nn.Module:
    """DenseNet-121, 224x224 ImageNet (7,978,856 parameters)."""
    return _model("densenet121")


def mobilenet_v2() -> nn.Module:
    """MobileNetV2 1.0x, 224x224 ImageNet (3,504,872 parameters)."""
    return _model("mobilenet_v2")


def vit() -> nn.Module:
    """ViT-B/16, 224x224 ImageNet (86,567,656 parameters)."""
    return _model("vit")


def vit_b16() -> nn.Module:
    """ViT-B/16 (alias of :func:`vit`)."""
    return _model("vit_b16")


def _small_factory(name: str) -> Callable[[], nn.Module]:
    zoo_name = name[: -len("_small")]

    def factory() -> nn.Module:
        return _model(name)

    factory.__name__ = factory.__qualname__ = name
    factory.__doc__ = f"Small 32x32 ``{zoo_name}`` from graphprune.zoo.ZOO (fast tests/demos)."
    return factory


for _name in _REGISTRY:
    if _name.endswith("_small"):
        globals()[_name] = _small_factory(_name)
        __all__.append(_name)

MODELS: dict[str, Callable[[], nn.Module]] = {name: globals()[name] for name in _REGISTRY}
"""Every factory in this file by name."""


def available() -> list[str]:
    """Names accepted by :func:`example_input` (and callable as factories of this module)."""
    return list(MODELS)


def example_inputs(name: str) -> tuple[Tensor, ...]:
    """The example input tuple for model ``name`` (deterministic)."""
    if name not in _REGISTRY:
        raise KeyError(f"unknown model {name!r}; available: {', '.join(available())}")
    return _REGISTRY[name].example_inputs()


def example_input(name: str) -> Tensor:
    """The example input tensor for model ``name`` (all models here take a single tensor)."""
    (x,) = example_inputs(name)
    return x
