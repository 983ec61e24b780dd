"""Architecture zoo: hand-written, real-world-style models for every pruning test and benchmark.

The models are written the way torchvision, timm and the reference repositories write them (in-place
residual adds, ``torch.cat`` over feature lists, ``x.chunk`` channel splits, ``view``/``transpose``
channel shuffles, fused ``qkv`` projections reshaped into heads, windowed attention with relative
position bias tables indexed by buffers, layer-scale parameters multiplied directly, ...), because
the point is to exercise a pruner against the code people actually ship.

Two registries:

* :data:`ZOO` -- ``name -> factory() -> (small model in eval mode, example inputs)``. Small
  widths/depths, 32x32 images (batch 2; ``mlp`` takes (2, 64)), forwards of a few milliseconds.
* :data:`FULL` -- the full-size 224x224 variants (``resnet50``, ``resnet18``, ``densenet121``,
  ``mobilenet_v2``, ``vit_b16``) with batch-1 inputs and 1000 classes.

Factories are deterministic and leave the global RNG alone; each also has ``.example_inputs()``
(the inputs without building the model) and ``.input_shape``. Weights go through
:func:`randomize_weights` (He conv / fan-in Linear init, random biases) and :func:`randomize_bn`
(BN statistics calibrated on the example batch then perturbed, random norm affines and layer
scales), so outputs are O(1), input-dependent, and numerical equivalence tests are meaningful.

Full-size parameter counts match torchvision: ``resnet50()`` 25,557,032, ``resnet18()`` 11,689,512,
``densenet121()`` 7,978,856, ``mobilenet_v2()`` 3,504,872, ``vit_b16()`` 86,567,656.

:data:`NEGATIVE` lists ``lstm`` (an ``nn.LSTM``) and ``custom_op`` (the ``torch.library`` op
``graphprune_zoo::channel_mix``, which mixes neighbouring channels): they contain operators no
pruner can know and exist for negative tests. Every ZOO model traces with plain
``torch.fx.symbolic_trace`` and exports with ``torch.export.export(strict=False)``.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Callable, Sequence
from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    # registries and helpers
    "ZOO",
    "FULL",
    "NEGATIVE",
    "randomize_bn",
    "randomize_weights",
    "count_params",
    # ResNet family
    "BasicBlock",
    "Bottleneck",
    "ResNet",
    "resnet18",
    "resnet50",
    "resnext",
    # DenseNet
    "DenseNet",
    "densenet121",
    "densenet_tiny",
    # mobile networks
    "MobileNetV2",
    "mobilenet_v2",
    "MobileNetV3",
    "mobilenet_v3",
    "EfficientNet",
    "efficientnet",
    "ShuffleNetV2",
    "shufflenet_v2",
    "channel_shuffle",
    "SqueezeNet",
    "squeezenet",
    # multi-branch / modern CNNs
    "GoogLeNet",
    "inception",
    "ConvNeXt",
    "convnext",
    "RegNet",
    "regnet",
    "UNet",
    "unet",
    "VGG",
    "vgg",
    "AlexNet",
    "alexnet",
    # transformers
    "VisionTransformer",
    "vit",
    "vit_b16",
    "vit_mha",
    "SwinTransformer",
    "swin",
    "window_partition",
    "window_reverse",
    # plain / negative-test models
    "MLP",
    "mlp",
    "LSTMModel",
    "lstm_model",
    "CustomOpModel",
    "custom_op_model",
    # building blocks (for isinstance checks in tests and rules)
    "ConvNormAct",
    "SqueezeExcitation",
    "StochasticDepth",
    "conv1x1",
    "conv3x3",
    "InvertedResidual",
    "SEGate",
    "MBv3Block",
    "MBConv",
    "ShuffleUnit",
    "Fire",
    "BasicConv2d",
    "Inception",
    "LayerNorm",
    "ConvNeXtBlock",
    "BottleneckTransform",
    "ResBottleneckBlock",
    "DoubleConv",
    "Down",
    "Up",
    "make_layers",
    "PatchEmbed",
    "Attention",
    "SeparateQKVAttention",
    "MHAWrapper",
    "Mlp",
    "Block",
    "WindowAttention",
    "SwinTransformerBlock",
    "PatchMerging",
    "BasicLayer",
    "SwinPatchEmbed",
]

Factory = Callable[[], tuple[nn.Module, tuple[Tensor, ...]]]


# --------------------------------------------------------------------------------------------------
# shared helpers
# --------------------------------------------------------------------------------------------------


def _make_divisible(v: float, divisor: int = 8, min_value: int | None = None) -> int:
    """Round ``v`` to a multiple of ``divisor`` without going down by more than 10% (MobileNet)."""
    if min_value is None:
        min_value = divisor
    new_v = max(min_value, int(v + divisor / 2) // divisor * divisor)
    if new_v < 0.9 * v:
        new_v += divisor
    return new_v


def _ch(c: int, width: float) -> int:
    """Scale a channel count by a width multiplier (at least 1)."""
    return max(1, int(round(c * width)))


def count_params(model: nn.Module) -> int:
    """Number of parameters of ``model`` (works on the meta device)."""
    return sum(p.numel() for p in model.parameters())


class ConvNormAct(nn.Sequential):
    """Conv2d -> BatchNorm2d -> activation, torchvision's ``Conv2dNormActivation``."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 3,
        stride: int = 1,
        groups: int = 1,
        norm_layer: Callable[..., nn.Module] | None = nn.BatchNorm2d,
        activation_layer: Callable[..., nn.Module] | None = nn.ReLU,
        dilation: int = 1,
        inplace: bool | None = True,
        bias: bool | None = None,
    ) -> None:
        padding = (kernel_size - 1) // 2 * dilation
        if bias is None:
            bias = norm_layer is None
        layers: list[nn.Module] = [
            nn.Conv2d(
                in_channels,
                out_channels,
                kernel_size,
                stride,
                padding,
                dilation=dilation,
                groups=groups,
                bias=bias,
            )
        ]
        if norm_layer is not None:
            layers.append(norm_layer(out_channels))
        if activation_layer is not None:
            params = {} if inplace is None else {"inplace": inplace}
            layers.append(activation_layer(**params))
        super().__init__(*layers)
        self.out_channels = out_channels


class SqueezeExcitation(nn.Module):
    """torchvision's squeeze-and-excitation: returns ``scale * input``."""

    def __init__(
        self,
        input_channels: int,
        squeeze_channels: int,
        activation: Callable[..., nn.Module] = nn.ReLU,
        scale_activation: Callable[..., nn.Module] = nn.Sigmoid,
    ) -> None:
        super().__init__()
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Conv2d(input_channels, squeeze_channels, 1)
        self.fc2 = nn.Conv2d(squeeze_channels, input_channels, 1)
        self.activation = activation()
        self.scale_activation = scale_activation()

    def _scale(self, input: Tensor) -> Tensor:
        scale = self.avgpool(input)
        scale = self.fc1(scale)
        scale = self.activation(scale)
        scale = self.fc2(scale)
        return self.scale_activation(scale)

    def forward(self, input: Tensor) -> Tensor:
        scale = self._scale(input)
        return scale * input


class StochasticDepth(nn.Module):
    """Row-wise stochastic depth; the identity in eval mode."""

    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = p

    def forward(self, input: Tensor) -> Tensor:
        if not self.training or self.p == 0.0:
            return input
        survival_rate = 1.0 - self.p
        size = [input.shape[0]] + [1] * (input.ndim - 1)
        noise = torch.empty(size, dtype=input.dtype, device=input.device)
        noise = noise.bernoulli_(survival_rate)
        if survival_rate > 0.0:
            noise.div_(survival_rate)
        return input * noise


def _init_cnn(model: nn.Module) -> None:
    """torchvision-style init: kaiming-normal convs, unit BN, small-normal linears."""
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0, 0.01)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


# --------------------------------------------------------------------------------------------------
# ResNet / ResNeXt (torchvision)
# --------------------------------------------------------------------------------------------------


def conv3x3(in_planes: int, out_planes: int, stride: int = 1, groups: int = 1) -> nn.Conv2d:
    """3x3 convolution with padding."""
    return nn.Conv2d(
        in_planes, out_planes, kernel_size=3, stride=stride, padding=1, groups=groups, bias=False
    )


def conv1x1(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    """1x1 convolution."""
    return nn.Conv2d(in_planes, out_planes, kernel_size=1, stride=stride, bias=False)


class BasicBlock(nn.Module):
    """ResNet basic block: two 3x3 convs and an in-place residual add."""

    expansion: int = 1

    def __init__(
        self,
        inplanes: int,
        planes: int,
        stride: int = 1,
        downsample: nn.Module | None = None,
        groups: int = 1,
        base_width: int = 64,
    ) -> None:
        super().__init__()
        if groups != 1 or base_width != 64:
            raise ValueError("BasicBlock only supports groups=1 and base_width=64")
        self.conv1 = conv3x3(inplanes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x: Tensor) -> Tensor:
        identity = x

        out = self.conv1(x)
        out = self.bn1(out)
        out = self.relu(out)

        out = self.conv2(out)
        out = self.bn2(out)

        if self.downsample is not None:
            identity = self.downsample(x)

        out += identity
        out = self.relu(out)

        return out


class Bottleneck(nn.Module):
    """ResNet-v1.5 bottleneck (stride on the 3x3), optionally grouped (ResNeXt)."""

    expansion: int = 4

    def __init__(
        self,
        inplanes: int,
        planes: int,
        stride: int = 1,
        downsample: nn.Module | None = None,
        groups: int = 1,
        base_width: int = 64,
    ) -> None:
        super().__init__()
        width = int(planes * (base_width / 64.0)) * groups
        self.conv1 = conv1x1(inplanes, width)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = conv3x3(width, width, stride, groups)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = conv1x1(width, planes * self.expansion)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x: Tensor) -> Tensor:
        identity = x

        out = self.conv1(x)
        out = self.bn1(out)
        out = self.relu(out)

        out = self.conv2(out)
        out = self.bn2(out)
        out = self.relu(out)

        out = self.conv3(out)
        out = self.bn3(out)

        if self.downsample is not None:
            identity = self.downsample(x)

        out += identity
        out = self.relu(out)

        return out


class ResNet(nn.Module):
    """torchvision ResNet/ResNeXt with a width multiplier on every stage."""

    def __init__(
        self,
        block: type[BasicBlock | Bottleneck],
        layers: Sequence[int],
        num_classes: int = 1000,
        width: float = 1.0,
        groups: int = 1,
        width_per_group: int = 64,
        in_chans: int = 3,
        zero_init_residual: bool = False,
    ) -> None:
        super().__init__()
        self.inplanes = _ch(64, width)
        self.groups = groups
        self.base_width = width_per_group
        self.conv1 = nn.Conv2d(
            in_chans, self.inplanes, kernel_size=7, stride=2, padding=3, bias=False
        )
        self.bn1 = nn.BatchNorm2d(self.inplanes)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = self._make_layer(block, _ch(64, width), layers[0])
        self.layer2 = self._make_layer(block, _ch(128, width), layers[1], stride=2)
        self.layer3 = self._make_layer(block, _ch(256, width), layers[2], stride=2)
        self.layer4 = self._make_layer(block, _ch(512, width), layers[3], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(_ch(512, width) * block.expansion, num_classes)

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)
        if zero_init_residual:
            for m in self.modules():
                if isinstance(m, Bottleneck):
                    nn.init.constant_(m.bn3.weight, 0)
                elif isinstance(m, BasicBlock):
                    nn.init.constant_(m.bn2.weight, 0)

    def _make_layer(
        self, block: type[BasicBlock | Bottleneck], planes: int, blocks: int, stride: int = 1
    ) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(
                conv1x1(self.inplanes, planes * block.expansion, stride),
                nn.BatchNorm2d(planes * block.expansion),
            )

        layers = [block(self.inplanes, planes, stride, downsample, self.groups, self.base_width)]
        self.inplanes = planes * block.expansion
        for _ in range(1, blocks):
            layers.append(
                block(self.inplanes, planes, groups=self.groups, base_width=self.base_width)
            )

        return nn.Sequential(*layers)

    def _forward_impl(self, x: Tensor) -> Tensor:
        x = self.conv1(x)
        x = self.bn1(x)
        x = self.relu(x)
        x = self.maxpool(x)

        x = self.layer1(x)
        x = self.layer2(x)
        x = self.layer3(x)
        x = self.layer4(x)

        x = self.avgpool(x)
        x = torch.flatten(x, 1)
        x = self.fc(x)

        return x

    def forward(self, x: Tensor) -> Tensor:
        return self._forward_impl(x)


def resnet18(
    num_classes: int = 1000, width: float = 1.0, layers: Sequence[int] = (2, 2, 2, 2)
) -> ResNet:
    """ResNet-18 (basic blocks [2, 2, 2, 2]); 11,689,512 parameters at full size."""
    return ResNet(BasicBlock, layers, num_classes=num_classes, width=width)


def resnet50(
    num_classes: int = 1000, width: float = 1.0, layers: Sequence[int] = (3, 4, 6, 3)
) -> ResNet:
    """ResNet-50 (bottlenecks [3, 4, 6, 3]); 25,557,032 parameters at full size."""
    return ResNet(Bottleneck, layers, num_classes=num_classes, width=width)


def resnext(
    num_classes: int = 1000,
    width: float = 1.0,
    layers: Sequence[int] = (3, 4, 6, 3),
    groups: int = 32,
    width_per_group: int = 4,
) -> ResNet:
    """ResNeXt (grouped 3x3 bottlenecks); ResNeXt-50 32x4d at the defaults."""
    return ResNet(
        Bottleneck,
        layers,
        num_classes=num_classes,
        width=width,
        groups=groups,
        width_per_group=width_per_group,
    )


# --------------------------------------------------------------------------------------------------
# DenseNet (torchvision)
# --------------------------------------------------------------------------------------------------


class _DenseLayer(nn.Module):
    """BN-ReLU-conv1x1-BN-ReLU-conv3x3 over the concatenation of all previous features."""

    def __init__(
        self, num_input_features: int, growth_rate: int, bn_size: int, drop_rate: float = 0.0
    ) -> None:
        super().__init__()
        self.norm1 = nn.BatchNorm2d(num_input_features)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(
            num_input_features, bn_size * growth_rate, kernel_size=1, stride=1, bias=False
        )
        self.norm2 = nn.BatchNorm2d(bn_size * growth_rate)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(
            bn_size * growth_rate, growth_rate, kernel_size=3, stride=1, padding=1, bias=False
        )
        self.drop_rate = float(drop_rate)

    def bn_function(self, inputs: list[Tensor]) -> Tensor:
        concated_features = torch.cat(inputs, 1)
        bottleneck_output = self.conv1(self.relu1(self.norm1(concated_features)))
        return bottleneck_output

    def forward(self, input: list[Tensor]) -> Tensor:
        prev_features = input
        bottleneck_output = self.bn_function(prev_features)
        new_features = self.conv2(self.relu2(self.norm2(bottleneck_output)))
        if self.drop_rate > 0:
            new_features = F.dropout(new_features, p=self.drop_rate, training=self.training)
        return new_features


class _DenseBlock(nn.ModuleDict):
    """A dense block: every layer sees ``torch.cat`` of the block input and all earlier outputs."""

    def __init__(
        self,
        num_layers: int,
        num_input_features: int,
        bn_size: int,
        growth_rate: int,
        drop_rate: float = 0.0,
    ) -> None:
        super().__init__()
        for i in range(num_layers):
            layer = _DenseLayer(
                num_input_features + i * growth_rate,
                growth_rate=growth_rate,
                bn_size=bn_size,
                drop_rate=drop_rate,
            )
            self.add_module(f"denselayer{i + 1}", layer)

    def forward(self, init_features: Tensor) -> Tensor:
        features = [init_features]
        for _name, layer in self.items():
            new_features = layer(features)
            features.append(new_features)
        return torch.cat(features, 1)


class _Transition(nn.Sequential):
    """BN-ReLU-conv1x1-avgpool between dense blocks (halves the channels)."""

    def __init__(self, num_input_features: int, num_output_features: int) -> None:
        super().__init__()
        self.norm = nn.BatchNorm2d(num_input_features)
        self.relu = nn.ReLU(inplace=True)
        self.conv = nn.Conv2d(
            num_input_features, num_output_features, kernel_size=1, stride=1, bias=False
        )
        self.pool = nn.AvgPool2d(kernel_size=2, stride=2)


class DenseNet(nn.Module):
    """torchvision DenseNet-BC."""

    def __init__(
        self,
        growth_rate: int = 32,
        block_config: Sequence[int] = (6, 12, 24, 16),
        num_init_features: int = 64,
        bn_size: int = 4,
        drop_rate: float = 0.0,
        num_classes: int = 1000,
    ) -> None:
        super().__init__()
        self.features = nn.Sequential(
            OrderedDict(
                [
                    (
                        "conv0",
                        nn.Conv2d(
                            3, num_init_features, kernel_size=7, stride=2, padding=3, bias=False
                        ),
                    ),
                    ("norm0", nn.BatchNorm2d(num_init_features)),
                    ("relu0", nn.ReLU(inplace=True)),
                    ("pool0", nn.MaxPool2d(kernel_size=3, stride=2, padding=1)),
                ]
            )
        )

        num_features = num_init_features
        for i, num_layers in enumerate(block_config):
            block = _DenseBlock(
                num_layers=num_layers,
                num_input_features=num_features,
                bn_size=bn_size,
                growth_rate=growth_rate,
                drop_rate=drop_rate,
            )
            self.features.add_module(f"denseblock{i + 1}", block)
            num_features = num_features + num_layers * growth_rate
            if i != len(block_config) - 1:
                trans = _Transition(num_features, num_features // 2)
                self.features.add_module(f"transition{i + 1}", trans)
                num_features = num_features // 2

        self.features.add_module("norm5", nn.BatchNorm2d(num_features))
        self.classifier = nn.Linear(num_features, num_classes)

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)
            elif isinstance(m, nn.Linear):
                nn.init.constant_(m.bias, 0)

    def forward(self, x: Tensor) -> Tensor:
        features = self.features(x)
        out = F.relu(features, inplace=True)
        out = F.adaptive_avg_pool2d(out, (1, 1))
        out = torch.flatten(out, 1)
        out = self.classifier(out)
        return out


def densenet121(num_classes: int = 1000) -> DenseNet:
    """DenseNet-121 (growth 32, blocks [6, 12, 24, 16]); 7,978,856 parameters."""
    return DenseNet(32, (6, 12, 24, 16), 64, num_classes=num_classes)


def densenet_tiny(num_classes: int = 10) -> DenseNet:
    """A tiny DenseNet-BC (growth 8, blocks [2, 3, 2]) with the full DenseNet topology."""
    return DenseNet(8, (2, 3, 2), 16, bn_size=2, num_classes=num_classes)


# --------------------------------------------------------------------------------------------------
# MobileNetV2 (torchvision)
# --------------------------------------------------------------------------------------------------


class InvertedResidual(nn.Module):
    """MobileNetV2 block: 1x1 expand, 3x3 depthwise, 1x1 linear projection, ReLU6."""

    def __init__(self, inp: int, oup: int, stride: int, expand_ratio: int) -> None:
        super().__init__()
        self.stride = stride
        hidden_dim = int(round(inp * expand_ratio))
        self.use_res_connect = self.stride == 1 and inp == oup

        layers: list[nn.Module] = []
        if expand_ratio != 1:
            # pw
            layers.append(ConvNormAct(inp, hidden_dim, kernel_size=1, activation_layer=nn.ReLU6))
        layers.extend(
            [
                # dw
                ConvNormAct(
                    hidden_dim,
                    hidden_dim,
                    stride=stride,
                    groups=hidden_dim,
                    activation_layer=nn.ReLU6,
                ),
                # pw-linear
                nn.Conv2d(hidden_dim, oup, 1, 1, 0, bias=False),
                nn.BatchNorm2d(oup),
            ]
        )
        self.conv = nn.Sequential(*layers)
        self.out_channels = oup

    def forward(self, x: Tensor) -> Tensor:
        if self.use_res_connect:
            return x + self.conv(x)
        else:
            return self.conv(x)


class MobileNetV2(nn.Module):
    """torchvision MobileNetV2."""

    def __init__(
        self,
        num_classes: int = 1000,
        width_mult: float = 1.0,
        inverted_residual_setting: Sequence[Sequence[int]] | None = None,
        round_nearest: int = 8,
        dropout: float = 0.2,
    ) -> None:
        super().__init__()
        input_channel = 32
        last_channel = 1280
        if inverted_residual_setting is None:
            inverted_residual_setting = [
                # t, c, n, s
                [1, 16, 1, 1],
                [6, 24, 2, 2],
                [6, 32, 3, 2],
                [6, 64, 4, 2],
                [6, 96, 3, 1],
                [6, 160, 3, 2],
                [6, 320, 1, 1],
            ]

        input_channel = _make_divisible(input_channel * width_mult, round_nearest)
        self.last_channel = _make_divisible(last_channel * max(1.0, width_mult), round_nearest)
        features: list[nn.Module] = [
            ConvNormAct(3, input_channel, stride=2, activation_layer=nn.ReLU6)
        ]
        for t, c, n, s in inverted_residual_setting:
            output_channel = _make_divisible(c * width_mult, round_nearest)
            for i in range(n):
                stride = s if i == 0 else 1
                features.append(InvertedResidual(input_channel, output_channel, stride, t))
                input_channel = output_channel
        features.append(
            ConvNormAct(input_channel, self.last_channel, kernel_size=1, activation_layer=nn.ReLU6)
        )
        self.features = nn.Sequential(*features)

        self.classifier = nn.Sequential(
            nn.Dropout(p=dropout),
            nn.Linear(self.last_channel, num_classes),
        )

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> Tensor:
        x = self.features(x)
        x = nn.functional.adaptive_avg_pool2d(x, (1, 1))
        x = torch.flatten(x, 1)
        x = self.classifier(x)
        return x


def mobilenet_v2(
    num_classes: int = 1000,
    width_mult: float = 1.0,
    inverted_residual_setting: Sequence[Sequence[int]] | None = None,
) -> MobileNetV2:
    """MobileNetV2 (inverted residuals, depthwise 3x3, ReLU6); 3,504,872 parameters at 1.0x."""
    return MobileNetV2(num_classes, width_mult, inverted_residual_setting)


# --------------------------------------------------------------------------------------------------
# MobileNetV3 (torchvision layout, SE gate applied as ``x * se(x)``)
# --------------------------------------------------------------------------------------------------


class SEGate(nn.Module):
    """Squeeze-excite that returns the hardsigmoid *gate*; the caller multiplies ``x * se(x)``."""

    def __init__(self, channels: int, squeeze_channels: int) -> None:
        super().__init__()
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Conv2d(channels, squeeze_channels, 1)
        self.relu = nn.ReLU(inplace=True)
        self.fc2 = nn.Conv2d(squeeze_channels, channels, 1)
        self.gate = nn.Hardsigmoid(inplace=True)

    def forward(self, x: Tensor) -> Tensor:
        s = self.avgpool(x)
        s = self.relu(self.fc1(s))
        return self.gate(self.fc2(s))


class MBv3Block(nn.Module):
    """MobileNetV3 bneck: expand, depthwise, optional SE (``x * se(x)``), project, residual."""

    def __init__(
        self,
        in_c: int,
        kernel: int,
        expanded_c: int,
        out_c: int,
        use_se: bool,
        activation: str,
        stride: int,
    ) -> None:
        super().__init__()
        self.use_res_connect = stride == 1 and in_c == out_c
        act = nn.Hardswish if activation == "HS" else nn.ReLU
        self.expand = (
            ConvNormAct(in_c, expanded_c, 1, activation_layer=act) if expanded_c != in_c else None
        )
        self.dw = ConvNormAct(
            expanded_c, expanded_c, kernel, stride, groups=expanded_c, activation_layer=act
        )
        self.se = SEGate(expanded_c, _make_divisible(expanded_c // 4, 8)) if use_se else None
        self.project = ConvNormAct(expanded_c, out_c, 1, activation_layer=None)
        self.out_channels = out_c

    def forward(self, x: Tensor) -> Tensor:
        out = x
        if self.expand is not None:
            out = self.expand(out)
        out = self.dw(out)
        if self.se is not None:
            out = out * self.se(out)
        out = self.project(out)
        if self.use_res_connect:
            out = out + x
        return out


_MBV3_SMALL = [
    # in, kernel, expanded, out, use_se, activation, stride
    (16, 3, 16, 16, True, "RE", 2),
    (16, 3, 72, 24, False, "RE", 2),
    (24, 3, 88, 24, False, "RE", 1),
    (24, 5, 96, 40, True, "HS", 2),
    (40, 5, 240, 40, True, "HS", 1),
    (40, 5, 240, 40, True, "HS", 1),
    (40, 5, 120, 48, True, "HS", 1),
    (48, 5, 144, 48, True, "HS", 1),
    (48, 5, 288, 96, True, "HS", 2),
    (96, 5, 576, 96, True, "HS", 1),
    (96, 5, 576, 96, True, "HS", 1),
]


class MobileNetV3(nn.Module):
    """MobileNetV3-Small (hardswish, SE with hardsigmoid gates)."""

    def __init__(
        self,
        num_classes: int = 1000,
        width_mult: float = 1.0,
        setting: Sequence[tuple] = tuple(_MBV3_SMALL),
        last_channel: int = 1024,
        dropout: float = 0.2,
    ) -> None:
        super().__init__()

        def adjust(c: int) -> int:
            return _make_divisible(c * width_mult, 8)

        first = adjust(setting[0][0])
        layers: list[nn.Module] = [
            ConvNormAct(3, first, 3, stride=2, activation_layer=nn.Hardswish)
        ]
        for in_c, k, exp_c, out_c, use_se, act, stride in setting:
            layers.append(
                MBv3Block(adjust(in_c), k, adjust(exp_c), adjust(out_c), use_se, act, stride)
            )
        last_in = adjust(setting[-1][3])
        lastconv_out = 6 * last_in
        layers.append(ConvNormAct(last_in, lastconv_out, 1, activation_layer=nn.Hardswish))
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        last_channel = adjust(last_channel)
        self.classifier = nn.Sequential(
            nn.Linear(lastconv_out, last_channel),
            nn.Hardswish(inplace=True),
            nn.Dropout(p=dropout, inplace=True),
            nn.Linear(last_channel, num_classes),
        )
        _init_cnn(self)

    def forward(self, x: Tensor) -> Tensor:
        x = self.features(x)
        x = self.avgpool(x)
        x = torch.flatten(x, 1)
        x = self.classifier(x)
        return x


def mobilenet_v3(num_classes: int = 1000, width_mult: float = 1.0) -> MobileNetV3:
    """MobileNetV3-Small (SE ``x * se(x)`` with hardsigmoid, hardswish)."""
    return MobileNetV3(num_classes, width_mult)


# --------------------------------------------------------------------------------------------------
# EfficientNet (torchvision MBConv)
# --------------------------------------------------------------------------------------------------


class MBConv(nn.Module):
    """EfficientNet MBConv: expand, depthwise, SE (SiLU/sigmoid), project, stochastic depth."""

    def __init__(
        self,
        input_channels: int,
        out_channels: int,
        expand_ratio: float,
        kernel: int,
        stride: int,
        stochastic_depth_prob: float,
        norm_layer: Callable[..., nn.Module] = nn.BatchNorm2d,
    ) -> None:
        super().__init__()
        self.use_res_connect = stride == 1 and input_channels == out_channels

        layers: list[nn.Module] = []
        activation_layer = nn.SiLU

        # expand
        expanded_channels = _make_divisible(input_channels * expand_ratio, 8)
        if expanded_channels != input_channels:
            layers.append(
                ConvNormAct(
                    input_channels,
                    expanded_channels,
                    kernel_size=1,
                    norm_layer=norm_layer,
                    activation_layer=activation_layer,
                )
            )

        # depthwise
        layers.append(
            ConvNormAct(
                expanded_channels,
                expanded_channels,
                kernel_size=kernel,
                stride=stride,
                groups=expanded_channels,
                norm_layer=norm_layer,
                activation_layer=activation_layer,
            )
        )

        # squeeze and excitation
        squeeze_channels = max(1, input_channels // 4)
        layers.append(
            SqueezeExcitation(
                expanded_channels, squeeze_channels, activation=partial(nn.SiLU, inplace=True)
            )
        )

        # project
        layers.append(
            ConvNormAct(
                expanded_channels,
                out_channels,
                kernel_size=1,
                norm_layer=norm_layer,
                activation_layer=None,
            )
        )

        self.block = nn.Sequential(*layers)
        self.stochastic_depth = StochasticDepth(stochastic_depth_prob)
        self.out_channels = out_channels

    def forward(self, input: Tensor) -> Tensor:
        result = self.block(input)
        if self.use_res_connect:
            result = self.stochastic_depth(result)
            result += input
        return result


_EFFNET_B0 = [
    # expand_ratio, kernel, stride, in, out, layers
    (1, 3, 1, 32, 16, 1),
    (6, 3, 2, 16, 24, 2),
    (6, 5, 2, 24, 40, 2),
    (6, 3, 2, 40, 80, 3),
    (6, 5, 1, 80, 112, 3),
    (6, 5, 2, 112, 192, 4),
    (6, 3, 1, 192, 320, 1),
]


class EfficientNet(nn.Module):
    """torchvision EfficientNet (B0 stage table, width/depth multipliers)."""

    def __init__(
        self,
        width_mult: float = 1.0,
        depth_mult: float = 1.0,
        num_classes: int = 1000,
        dropout: float = 0.2,
        stochastic_depth_prob: float = 0.2,
    ) -> None:
        super().__init__()
        norm_layer = nn.BatchNorm2d

        def adjust_channels(c: int) -> int:
            return _make_divisible(c * width_mult, 8)

        def adjust_depth(n: int) -> int:
            return int(math.ceil(n * depth_mult))

        layers: list[nn.Module] = []
        firstconv_output_channels = adjust_channels(_EFFNET_B0[0][3])
        layers.append(
            ConvNormAct(
                3,
                firstconv_output_channels,
                kernel_size=3,
                stride=2,
                norm_layer=norm_layer,
                activation_layer=nn.SiLU,
            )
        )

        total_stage_blocks = sum(adjust_depth(cfg[5]) for cfg in _EFFNET_B0)
        stage_block_id = 0
        for expand_ratio, kernel, stride, in_c, out_c, n in _EFFNET_B0:
            stage: list[nn.Module] = []
            for i in range(adjust_depth(n)):
                sd_prob = stochastic_depth_prob * float(stage_block_id) / total_stage_blocks
                stage.append(
                    MBConv(
                        adjust_channels(in_c) if i == 0 else adjust_channels(out_c),
                        adjust_channels(out_c),
                        expand_ratio,
                        kernel,
                        stride if i == 0 else 1,
                        sd_prob,
                        norm_layer,
                    )
                )
                stage_block_id += 1
            layers.append(nn.Sequential(*stage))

        lastconv_input_channels = adjust_channels(_EFFNET_B0[-1][4])
        lastconv_output_channels = 4 * lastconv_input_channels
        layers.append(
            ConvNormAct(
                lastconv_input_channels,
                lastconv_output_channels,
                kernel_size=1,
                norm_layer=norm_layer,
                activation_layer=nn.SiLU,
            )
        )

        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(
            nn.Dropout(p=dropout, inplace=True),
            nn.Linear(lastconv_output_channels, num_classes),
        )

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                init_range = 1.0 / math.sqrt(m.out_features)
                nn.init.uniform_(m.weight, -init_range, init_range)
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> Tensor:
        x = self.features(x)
        x = self.avgpool(x)
        x = torch.flatten(x, 1)
        x = self.classifier(x)
        return x


def efficientnet(
    num_classes: int = 1000, width_mult: float = 1.0, depth_mult: float = 1.0
) -> EfficientNet:
    """EfficientNet (MBConv + SE + SiLU); B0 at the defaults (5,288,548 parameters)."""
    return EfficientNet(width_mult, depth_mult, num_classes)


# --------------------------------------------------------------------------------------------------
# ShuffleNetV2 (torchvision)
# --------------------------------------------------------------------------------------------------


def channel_shuffle(x: Tensor, groups: int) -> Tensor:
    """ShuffleNet channel shuffle via view/transpose/contiguous/view."""
    batchsize, num_channels, height, width = x.size()
    channels_per_group = num_channels // groups

    # reshape
    x = x.view(batchsize, groups, channels_per_group, height, width)

    x = torch.transpose(x, 1, 2).contiguous()

    # flatten
    x = x.view(batchsize, -1, height, width)

    return x


class ShuffleUnit(nn.Module):
    """ShuffleNetV2 unit: ``x.chunk(2, dim=1)`` split (stride 1) or two branches (stride 2)."""

    def __init__(self, inp: int, oup: int, stride: int) -> None:
        super().__init__()
        if not (1 <= stride <= 3):
            raise ValueError("illegal stride value")
        self.stride = stride

        branch_features = oup // 2
        if (self.stride == 1) and (inp != branch_features << 1):
            raise ValueError(
                f"Invalid combination of stride {stride}, inp {inp} and oup {oup} values."
            )

        if self.stride > 1:
            self.branch1 = nn.Sequential(
                self.depthwise_conv(inp, inp, kernel_size=3, stride=self.stride, padding=1),
                nn.BatchNorm2d(inp),
                nn.Conv2d(inp, branch_features, kernel_size=1, stride=1, padding=0, bias=False),
                nn.BatchNorm2d(branch_features),
                nn.ReLU(inplace=True),
            )
        else:
            self.branch1 = nn.Sequential()

        self.branch2 = nn.Sequential(
            nn.Conv2d(
                inp if (self.stride > 1) else branch_features,
                branch_features,
                kernel_size=1,
                stride=1,
                padding=0,
                bias=False,
            ),
            nn.BatchNorm2d(branch_features),
            nn.ReLU(inplace=True),
            self.depthwise_conv(
                branch_features, branch_features, kernel_size=3, stride=self.stride, padding=1
            ),
            nn.BatchNorm2d(branch_features),
            nn.Conv2d(
                branch_features, branch_features, kernel_size=1, stride=1, padding=0, bias=False
            ),
            nn.BatchNorm2d(branch_features),
            nn.ReLU(inplace=True),
        )

    @staticmethod
    def depthwise_conv(
        i: int, o: int, kernel_size: int, stride: int = 1, padding: int = 0, bias: bool = False
    ) -> nn.Conv2d:
        return nn.Conv2d(i, o, kernel_size, stride, padding, bias=bias, groups=i)

    def forward(self, x: Tensor) -> Tensor:
        if self.stride == 1:
            x1, x2 = x.chunk(2, dim=1)
            out = torch.cat((x1, self.branch2(x2)), dim=1)
        else:
            out = torch.cat((self.branch1(x), self.branch2(x)), dim=1)

        out = channel_shuffle(out, 2)

        return out


class ShuffleNetV2(nn.Module):
    """torchvision ShuffleNetV2."""

    def __init__(
        self,
        stages_repeats: Sequence[int] = (4, 8, 4),
        stages_out_channels: Sequence[int] = (24, 116, 232, 464, 1024),
        num_classes: int = 1000,
    ) -> None:
        super().__init__()
        if len(stages_repeats) != 3:
            raise ValueError("expected stages_repeats as list of 3 positive ints")
        if len(stages_out_channels) != 5:
            raise ValueError("expected stages_out_channels as list of 5 positive ints")
        self._stage_out_channels = stages_out_channels

        input_channels = 3
        output_channels = self._stage_out_channels[0]
        self.conv1 = nn.Sequential(
            nn.Conv2d(input_channels, output_channels, 3, 2, 1, bias=False),
            nn.BatchNorm2d(output_channels),
            nn.ReLU(inplace=True),
        )
        input_channels = output_channels

        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)

        stage_names = [f"stage{i}" for i in [2, 3, 4]]
        for name, repeats, output_channels in zip(
            stage_names, stages_repeats, self._stage_out_channels[1:]
        ):
            seq = [ShuffleUnit(input_channels, output_channels, 2)]
            for _ in range(repeats - 1):
                seq.append(ShuffleUnit(output_channels, output_channels, 1))
            setattr(self, name, nn.Sequential(*seq))
            input_channels = output_channels

        output_channels = self._stage_out_channels[-1]
        self.conv5 = nn.Sequential(
            nn.Conv2d(input_channels, output_channels, 1, 1, 0, bias=False),
            nn.BatchNorm2d(output_channels),
            nn.ReLU(inplace=True),
        )

        self.fc = nn.Linear(output_channels, num_classes)

    def _forward_impl(self, x: Tensor) -> Tensor:
        x = self.conv1(x)
        x = self.maxpool(x)
        x = self.stage2(x)
        x = self.stage3(x)
        x = self.stage4(x)
        x = self.conv5(x)
        x = x.mean([2, 3])  # globalpool
        x = self.fc(x)
        return x

    def forward(self, x: Tensor) -> Tensor:
        return self._forward_impl(x)


def shufflenet_v2(
    num_classes: int = 1000,
    stages_repeats: Sequence[int] = (4, 8, 4),
    stages_out_channels: Sequence[int] = (24, 116, 232, 464, 1024),
) -> ShuffleNetV2:
    """ShuffleNetV2 (chunk split + channel shuffle); x1.0 at the defaults."""
    return ShuffleNetV2(stages_repeats, stages_out_channels, num_classes)


# --------------------------------------------------------------------------------------------------
# SqueezeNet 1.1 (torchvision)
# --------------------------------------------------------------------------------------------------


class Fire(nn.Module):
    """SqueezeNet fire module: squeeze 1x1, then ``torch.cat`` of expand1x1 and expand3x3."""

    def __init__(
        self, inplanes: int, squeeze_planes: int, expand1x1_planes: int, expand3x3_planes: int
    ) -> None:
        super().__init__()
        self.inplanes = inplanes
        self.squeeze = nn.Conv2d(inplanes, squeeze_planes, kernel_size=1)
        self.squeeze_activation = nn.ReLU(inplace=True)
        self.expand1x1 = nn.Conv2d(squeeze_planes, expand1x1_planes, kernel_size=1)
        self.expand1x1_activation = nn.ReLU(inplace=True)
        self.expand3x3 = nn.Conv2d(squeeze_planes, expand3x3_planes, kernel_size=3, padding=1)
        self.expand3x3_activation = nn.ReLU(inplace=True)

    def forward(self, x: Tensor) -> Tensor:
        x = self.squeeze_activation(self.squeeze(x))
        return torch.cat(
            [
                self.expand1x1_activation(self.expand1x1(x)),
                self.expand3x3_activation(self.expand3x3(x)),
            ],
            1,
        )


class SqueezeNet(nn.Module):
    """torchvision SqueezeNet 1.1 with a width multiplier."""

    def __init__(self, num_classes: int = 1000, width: float = 1.0, dropout: float = 0.5) -> None:
        super().__init__()
        self.num_classes = num_classes

        def w(c: int) -> int:
            return _ch(c, width)

        self.features = nn.Sequential(
            nn.Conv2d(3, w(64), kernel_size=3, stride=2),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(kernel_size=3, stride=2, ceil_mode=True),
            Fire(w(64), w(16), w(64), w(64)),
            Fire(2 * w(64), w(16), w(64), w(64)),
            nn.MaxPool2d(kernel_size=3, stride=2, ceil_mode=True),
            Fire(2 * w(64), w(32), w(128), w(128)),
            Fire(2 * w(128), w(32), w(128), w(128)),
            nn.MaxPool2d(kernel_size=3, stride=2, ceil_mode=True),
            Fire(2 * w(128), w(48), w(192), w(192)),
            Fire(2 * w(192), w(48), w(192), w(192)),
            Fire(2 * w(192), w(64), w(256), w(256)),
            Fire(2 * w(256), w(64), w(256), w(256)),
        )
        # Final convolution is initialized differently from the rest
        final_conv = nn.Conv2d(2 * w(256), self.num_classes, kernel_size=1)
        self.classifier = nn.Sequential(
            nn.Dropout(p=dropout), final_conv, nn.ReLU(inplace=True), nn.AdaptiveAvgPool2d((1, 1))
        )

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                if m is final_conv:
                    nn.init.normal_(m.weight, mean=0.0, std=0.01)
                else:
                    nn.init.kaiming_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.constant_(m.bias, 0)

    def forward(self, x: Tensor) -> Tensor:
        x = self.features(x)
        x = self.classifier(x)
        return torch.flatten(x, 1)


def squeezenet(num_classes: int = 1000, width: float = 1.0) -> SqueezeNet:
    """SqueezeNet 1.1 (fire modules); 1,235,496 parameters at full width."""
    return SqueezeNet(num_classes, width)


# --------------------------------------------------------------------------------------------------
# GoogLeNet / Inception-v1
# --------------------------------------------------------------------------------------------------


class BasicConv2d(nn.Module):
    """Conv (no bias) -> BN(eps=1e-3) -> ReLU, as in torchvision's Inception code."""

    def __init__(self, in_channels: int, out_channels: int, **kwargs: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, bias=False, **kwargs)
        self.bn = nn.BatchNorm2d(out_channels, eps=0.001)

    def forward(self, x: Tensor) -> Tensor:
        x = self.conv(x)
        x = self.bn(x)
        return F.relu(x, inplace=True)


class Inception(nn.Module):
    """Four-branch inception block (1x1 | 1x1-3x3 | 1x1-5x5 | maxpool-1x1) joined by cat."""

    def __init__(
        self,
        in_channels: int,
        ch1x1: int,
        ch3x3red: int,
        ch3x3: int,
        ch5x5red: int,
        ch5x5: int,
        pool_proj: int,
    ) -> None:
        super().__init__()
        self.branch1 = BasicConv2d(in_channels, ch1x1, kernel_size=1)
        self.branch2 = nn.Sequential(
            BasicConv2d(in_channels, ch3x3red, kernel_size=1),
            BasicConv2d(ch3x3red, ch3x3, kernel_size=3, padding=1),
        )
        self.branch3 = nn.Sequential(
            BasicConv2d(in_channels, ch5x5red, kernel_size=1),
            BasicConv2d(ch5x5red, ch5x5, kernel_size=5, padding=2),
        )
        self.branch4 = nn.Sequential(
            nn.MaxPool2d(kernel_size=3, stride=1, padding=1, ceil_mode=True),
            BasicConv2d(in_channels, pool_proj, kernel_size=1),
        )
        self.out_channels = ch1x1 + ch3x3 + ch5x5 + pool_proj

    def _forward(self, x: Tensor) -> list[Tensor]:
        branch1 = self.branch1(x)
        branch2 = self.branch2(x)
        branch3 = self.branch3(x)
        branch4 = self.branch4(x)

        outputs = [branch1, branch2, branch3, branch4]
        return outputs

    def forward(self, x: Tensor) -> Tensor:
        outputs = self._forward(x)
        return torch.cat(outputs, 1)


_GOOGLENET_CFG: list[tuple[int, ...] | str] = [
    (64, 96, 128, 16, 32, 32),  # 3a
    (128, 128, 192, 32, 96, 64),  # 3b
    "M",
    (192, 96, 208, 16, 48, 64),  # 4a
    (160, 112, 224, 24, 64, 64),  # 4b
    (128, 128, 256, 24, 64, 64),  # 4c
    (112, 144, 288, 32, 64, 64),  # 4d
    (256, 160, 320, 32, 128, 128),  # 4e
    "M",
    (256, 160, 320, 32, 128, 128),  # 5a
    (384, 192, 384, 48, 128, 128),  # 5b
]


class GoogLeNet(nn.Module):
    """GoogLeNet-style network: stem, then inception blocks ('M' = stride-2 maxpool)."""

    def __init__(
        self,
        num_classes: int = 1000,
        width: float = 1.0,
        cfg: Sequence[tuple[int, ...] | str] = tuple(_GOOGLENET_CFG),
        dropout: float = 0.2,
    ) -> None:
        super().__init__()
        c64, c192 = _ch(64, width), _ch(192, width)
        self.conv1 = BasicConv2d(3, c64, kernel_size=7, stride=2, padding=3)
        self.maxpool1 = nn.MaxPool2d(3, stride=2, ceil_mode=True)
        self.conv2 = BasicConv2d(c64, c64, kernel_size=1)
        self.conv3 = BasicConv2d(c64, c192, kernel_size=3, padding=1)
        self.maxpool2 = nn.MaxPool2d(3, stride=2, ceil_mode=True)

        blocks: list[nn.Module] = []
        in_ch = c192
        for item in cfg:
            if item == "M":
                blocks.append(nn.MaxPool2d(3, stride=2, ceil_mode=True))
            else:
                block = Inception(in_ch, *(_ch(c, width) for c in item))
                blocks.append(block)
                in_ch = block.out_channels
        self.inception = nn.Sequential(*blocks)

        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.dropout = nn.Dropout(p=dropout)
        self.fc = nn.Linear(in_ch, num_classes)
        _init_cnn(self)

    def forward(self, x: Tensor) -> Tensor:
        x = self.conv1(x)
        x = self.maxpool1(x)
        x = self.conv2(x)
        x = self.conv3(x)
        x = self.maxpool2(x)
        x = self.inception(x)
        x = self.avgpool(x)
        x = torch.flatten(x, 1)
        x = self.dropout(x)
        x = self.fc(x)
        return x


def inception(
    num_classes: int = 1000,
    width: float = 1.0,
    cfg: Sequence[tuple[int, ...] | str] = tuple(_GOOGLENET_CFG),
) -> GoogLeNet:
    """GoogLeNet / Inception-v1 (multi-branch concat blocks)."""
    return GoogLeNet(num_classes, width, cfg)


# --------------------------------------------------------------------------------------------------
# ConvNeXt (official facebookresearch code)
# --------------------------------------------------------------------------------------------------


class LayerNorm(nn.Module):
    """LayerNorm for channels_last (F.layer_norm) or channels_first (manual mean/pow/sqrt)."""

    def __init__(
        self, normalized_shape: int, eps: float = 1e-6, data_format: str = "channels_last"
    ) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(normalized_shape))
        self.bias = nn.Parameter(torch.zeros(normalized_shape))
        self.eps = eps
        self.data_format = data_format
        if self.data_format not in ["channels_last", "channels_first"]:
            raise NotImplementedError
        self.normalized_shape = (normalized_shape,)

    def forward(self, x: Tensor) -> Tensor:
        if self.data_format == "channels_last":
            return F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        else:
            u = x.mean(1, keepdim=True)
            s = (x - u).pow(2).mean(1, keepdim=True)
            x = (x - u) / torch.sqrt(s + self.eps)
            x = self.weight[:, None, None] * x + self.bias[:, None, None]
            return x


class ConvNeXtBlock(nn.Module):
    """ConvNeXt block: dw7x7, permute, LayerNorm, Linear-GELU-Linear, ``gamma * x``, permute."""

    def __init__(self, dim: int, drop_path: float = 0.0, layer_scale_init_value: float = 1e-6):
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, kernel_size=7, padding=3, groups=dim)  # depthwise conv
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.pwconv1 = nn.Linear(
            dim, 4 * dim
        )  # pointwise/1x1 convs, implemented with linear layers
        self.act = nn.GELU()
        self.pwconv2 = nn.Linear(4 * dim, dim)
        self.gamma = (
            nn.Parameter(layer_scale_init_value * torch.ones(dim), requires_grad=True)
            if layer_scale_init_value > 0
            else None
        )
        self.drop_path = StochasticDepth(drop_path) if drop_path > 0.0 else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        input = x
        x = self.dwconv(x)
        x = x.permute(0, 2, 3, 1)  # (N, C, H, W) -> (N, H, W, C)
        x = self.norm(x)
        x = self.pwconv1(x)
        x = self.act(x)
        x = self.pwconv2(x)
        if self.gamma is not None:
            x = self.gamma * x
        x = x.permute(0, 3, 1, 2)  # (N, H, W, C) -> (N, C, H, W)

        x = input + self.drop_path(x)
        return x


class ConvNeXt(nn.Module):
    """Official ConvNeXt: patchify stem, 4 stages, channels-first LayerNorm downsamplers."""

    def __init__(
        self,
        in_chans: int = 3,
        num_classes: int = 1000,
        depths: Sequence[int] = (3, 3, 9, 3),
        dims: Sequence[int] = (96, 192, 384, 768),
        drop_path_rate: float = 0.0,
        layer_scale_init_value: float = 1e-6,
        head_init_scale: float = 1.0,
    ) -> None:
        super().__init__()

        self.downsample_layers = nn.ModuleList()  # stem and 3 intermediate downsampling conv layers
        stem = nn.Sequential(
            nn.Conv2d(in_chans, dims[0], kernel_size=4, stride=4),
            LayerNorm(dims[0], eps=1e-6, data_format="channels_first"),
        )
        self.downsample_layers.append(stem)
        for i in range(3):
            downsample_layer = nn.Sequential(
                LayerNorm(dims[i], eps=1e-6, data_format="channels_first"),
                nn.Conv2d(dims[i], dims[i + 1], kernel_size=2, stride=2),
            )
            self.downsample_layers.append(downsample_layer)

        self.stages = (
            nn.ModuleList()
        )  # 4 feature resolution stages, each consisting of multiple blocks
        dp_rates = [x.item() for x in torch.linspace(0, drop_path_rate, sum(depths), device="cpu")]
        cur = 0
        for i in range(4):
            stage = nn.Sequential(
                *[
                    ConvNeXtBlock(
                        dim=dims[i],
                        drop_path=dp_rates[cur + j],
                        layer_scale_init_value=layer_scale_init_value,
                    )
                    for j in range(depths[i])
                ]
            )
            self.stages.append(stage)
            cur += depths[i]

        self.norm = nn.LayerNorm(dims[-1], eps=1e-6)  # final norm layer
        self.head = nn.Linear(dims[-1], num_classes)

        self.apply(self._init_weights)
        with torch.no_grad():
            self.head.weight.mul_(head_init_scale)
            self.head.bias.mul_(head_init_scale)

    def _init_weights(self, m: nn.Module) -> None:
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            nn.init.trunc_normal_(m.weight, std=0.02)
            nn.init.constant_(m.bias, 0)

    def forward_features(self, x: Tensor) -> Tensor:
        for i in range(4):
            x = self.downsample_layers[i](x)
            x = self.stages[i](x)
        return self.norm(x.mean([-2, -1]))  # global average pooling, (N, C, H, W) -> (N, C)

    def forward(self, x: Tensor) -> Tensor:
        x = self.forward_features(x)
        x = self.head(x)
        return x


def convnext(
    num_classes: int = 1000,
    depths: Sequence[int] = (3, 3, 9, 3),
    dims: Sequence[int] = (96, 192, 384, 768),
    layer_scale_init_value: float = 1e-6,
) -> ConvNeXt:
    """ConvNeXt (dw7x7, channels-last LN + Linear MLP, layer scale); ConvNeXt-T at the defaults."""
    return ConvNeXt(
        num_classes=num_classes,
        depths=depths,
        dims=dims,
        layer_scale_init_value=layer_scale_init_value,
    )


# --------------------------------------------------------------------------------------------------
# RegNet (torchvision layout)
# --------------------------------------------------------------------------------------------------


class BottleneckTransform(nn.Sequential):
    """RegNet bottleneck: 1x1, grouped 3x3 (fixed group width), optional SE, 1x1."""

    def __init__(
        self,
        width_in: int,
        width_out: int,
        stride: int,
        group_width: int,
        bottleneck_multiplier: float,
        se_ratio: float | None,
    ) -> None:
        layers: OrderedDict[str, nn.Module] = OrderedDict()
        w_b = int(round(width_out * bottleneck_multiplier))
        g = w_b // group_width

        layers["a"] = ConvNormAct(width_in, w_b, kernel_size=1, stride=1)
        layers["b"] = ConvNormAct(w_b, w_b, kernel_size=3, stride=stride, groups=g)

        if se_ratio:
            # The SE reduction ratio is defined with respect to the
            # beginning of the block
            width_se_out = int(round(se_ratio * width_in))
            layers["se"] = SqueezeExcitation(
                input_channels=w_b, squeeze_channels=width_se_out, activation=nn.ReLU
            )

        layers["c"] = ConvNormAct(w_b, width_out, kernel_size=1, stride=1, activation_layer=None)
        super().__init__(layers)


class ResBottleneckBlock(nn.Module):
    """RegNet residual bottleneck block: ``relu(proj(x) + f(x))``."""

    def __init__(
        self,
        width_in: int,
        width_out: int,
        stride: int,
        group_width: int = 1,
        bottleneck_multiplier: float = 1.0,
        se_ratio: float | None = None,
    ) -> None:
        super().__init__()

        # Use skip connection with projection if shape changes
        self.proj = None
        should_proj = (width_in != width_out) or (stride != 1)
        if should_proj:
            self.proj = ConvNormAct(
                width_in, width_out, kernel_size=1, stride=stride, activation_layer=None
            )
        self.f = BottleneckTransform(
            width_in, width_out, stride, group_width, bottleneck_multiplier, se_ratio
        )
        self.activation = nn.ReLU(inplace=True)

    def forward(self, x: Tensor) -> Tensor:
        if self.proj is not None:
            x = self.proj(x) + self.f(x)
        else:
            x = x + self.f(x)
        return self.activation(x)


class RegNet(nn.Module):
    """RegNet-X/Y (explicit per-stage depths and widths)."""

    def __init__(
        self,
        depths: Sequence[int] = (1, 3, 6, 6),
        widths: Sequence[int] = (48, 104, 208, 440),
        group_width: int = 8,
        se_ratio: float | None = 0.25,
        stem_width: int = 32,
        bottleneck_multiplier: float = 1.0,
        num_classes: int = 1000,
    ) -> None:
        super().__init__()
        self.stem = ConvNormAct(3, stem_width, kernel_size=3, stride=2)

        current_width = stem_width
        blocks = []
        for i, (depth, width_out) in enumerate(zip(depths, widths)):
            stage = nn.Sequential(
                OrderedDict(
                    (
                        f"block{i + 1}-{j}",
                        ResBottleneckBlock(
                            current_width if j == 0 else width_out,
                            width_out,
                            2 if j == 0 else 1,
                            group_width,
                            bottleneck_multiplier,
                            se_ratio,
                        ),
                    )
                    for j in range(depth)
                )
            )
            blocks.append((f"block{i + 1}", stage))
            current_width = width_out

        self.trunk_output = nn.Sequential(OrderedDict(blocks))

        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(in_features=current_width, out_features=num_classes)

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                # Note that there is no bias due to BN
                fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
                nn.init.normal_(m.weight, mean=0.0, std=math.sqrt(2.0 / fan_out))
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, mean=0.0, std=0.01)
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> Tensor:
        x = self.stem(x)
        x = self.trunk_output(x)

        x = self.avgpool(x)
        x = x.flatten(start_dim=1)
        x = self.fc(x)

        return x


def regnet(
    num_classes: int = 1000,
    depths: Sequence[int] = (1, 3, 6, 6),
    widths: Sequence[int] = (48, 104, 208, 440),
    group_width: int = 8,
    se_ratio: float | None = 0.25,
    stem_width: int = 32,
) -> RegNet:
    """RegNet (grouped conv with fixed group width, optional SE); RegNetY-400MF at the defaults."""
    return RegNet(depths, widths, group_width, se_ratio, stem_width, num_classes=num_classes)


# --------------------------------------------------------------------------------------------------
# U-Net (milesial/Pytorch-UNet)
# --------------------------------------------------------------------------------------------------


class DoubleConv(nn.Module):
    """(convolution => [BN] => ReLU) * 2"""

    def __init__(self, in_channels: int, out_channels: int, mid_channels: int | None = None):
        super().__init__()
        if not mid_channels:
            mid_channels = out_channels
        self.double_conv = nn.Sequential(
            nn.Conv2d(in_channels, mid_channels, kernel_size=3, padding=1, bias=False),
            nn.BatchNorm2d(mid_channels),
            nn.ReLU(inplace=True),
            nn.Conv2d(mid_channels, out_channels, kernel_size=3, padding=1, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.double_conv(x)


class Down(nn.Module):
    """Downscaling with maxpool then double conv."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.maxpool_conv = nn.Sequential(nn.MaxPool2d(2), DoubleConv(in_channels, out_channels))

    def forward(self, x: Tensor) -> Tensor:
        return self.maxpool_conv(x)


class Up(nn.Module):
    """Upscaling (ConvTranspose2d, or bilinear interpolate + conv) then cat with the skip."""

    def __init__(self, in_channels: int, out_channels: int, bilinear: bool = True) -> None:
        super().__init__()
        # if bilinear, use the normal convolutions to reduce the number of channels
        if bilinear:
            self.up = nn.Upsample(scale_factor=2, mode="bilinear", align_corners=True)
            self.conv = DoubleConv(in_channels, out_channels, in_channels // 2)
        else:
            self.up = nn.ConvTranspose2d(in_channels, in_channels // 2, kernel_size=2, stride=2)
            self.conv = DoubleConv(in_channels, out_channels)

    def forward(self, x1: Tensor, x2: Tensor) -> Tensor:
        x1 = self.up(x1)
        # input is CHW
        diffY = x2.size()[2] - x1.size()[2]
        diffX = x2.size()[3] - x1.size()[3]

        x1 = F.pad(x1, [diffX // 2, diffX - diffX // 2, diffY // 2, diffY - diffY // 2])
        x = torch.cat([x2, x1], dim=1)
        return self.conv(x)


class UNet(nn.Module):
    """U-Net: 4 downsampling stages, 4 upsampling stages with skip concatenations."""

    def __init__(
        self, n_channels: int = 3, n_classes: int = 2, base: int = 64, bilinear: bool = False
    ) -> None:
        super().__init__()
        self.n_channels = n_channels
        self.n_classes = n_classes
        self.bilinear = bilinear

        factor = 2 if bilinear else 1
        self.inc = DoubleConv(n_channels, base)
        self.down1 = Down(base, base * 2)
        self.down2 = Down(base * 2, base * 4)
        self.down3 = Down(base * 4, base * 8)
        self.down4 = Down(base * 8, base * 16 // factor)
        self.up1 = Up(base * 16, base * 8 // factor, bilinear)
        self.up2 = Up(base * 8, base * 4 // factor, bilinear)
        self.up3 = Up(base * 4, base * 2 // factor, bilinear)
        self.up4 = Up(base * 2, base, bilinear)
        self.outc = nn.Conv2d(base, n_classes, kernel_size=1)

    def forward(self, x: Tensor) -> Tensor:
        x1 = self.inc(x)
        x2 = self.down1(x1)
        x3 = self.down2(x2)
        x4 = self.down3(x3)
        x5 = self.down4(x4)
        x = self.up1(x5, x4)
        x = self.up2(x, x3)
        x = self.up3(x, x2)
        x = self.up4(x, x1)
        logits = self.outc(x)
        return logits


def unet(n_classes: int = 2, base: int = 64, bilinear: bool = False) -> UNet:
    """U-Net (skip concats; ConvTranspose2d or bilinear-upsample decoders)."""
    return UNet(3, n_classes, base, bilinear)


# --------------------------------------------------------------------------------------------------
# VGG and AlexNet
# --------------------------------------------------------------------------------------------------

_VGG_CFGS: dict[str, list[int | str]] = {
    "A": [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    "D": [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"],
    "S": [64, "M", 128, "M", 256, 256, "M", 512, 512, "M"],
}


class VGG(nn.Module):
    """torchvision VGG: conv features, adaptive avgpool to ``pool x pool``, flatten, 3 Linears."""

    def __init__(
        self,
        features: nn.Module,
        feat_channels: int,
        num_classes: int = 1000,
        pool: int = 7,
        hidden: int = 4096,
        dropout: float = 0.5,
    ) -> None:
        super().__init__()
        self.features = features
        self.avgpool = nn.AdaptiveAvgPool2d((pool, pool))
        self.classifier = nn.Sequential(
            nn.Linear(feat_channels * pool * pool, hidden),
            nn.ReLU(True),
            nn.Dropout(p=dropout),
            nn.Linear(hidden, hidden),
            nn.ReLU(True),
            nn.Dropout(p=dropout),
            nn.Linear(hidden, num_classes),
        )
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                if m.bias is not None:
                    nn.init.constant_(m.bias, 0)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.constant_(m.bias, 0)

    def forward(self, x: Tensor) -> Tensor:
        x = self.features(x)
        x = self.avgpool(x)
        x = torch.flatten(x, 1)
        x = self.classifier(x)
        return x


def make_layers(
    cfg: Sequence[int | str], batch_norm: bool = False, width: float = 1.0
) -> tuple[nn.Sequential, int]:
    """VGG feature extractor from a config list; returns (Sequential, out_channels)."""
    layers: list[nn.Module] = []
    in_channels = 3
    for v in cfg:
        if v == "M":
            layers += [nn.MaxPool2d(kernel_size=2, stride=2)]
        else:
            v = _ch(int(v), width)
            conv2d = nn.Conv2d(in_channels, v, kernel_size=3, padding=1)
            if batch_norm:
                layers += [conv2d, nn.BatchNorm2d(v), nn.ReLU(inplace=True)]
            else:
                layers += [conv2d, nn.ReLU(inplace=True)]
            in_channels = v
    return nn.Sequential(*layers), in_channels


def vgg(
    cfg: str = "D",
    num_classes: int = 1000,
    width: float = 1.0,
    batch_norm: bool = True,
    pool: int = 7,
    hidden: int = 4096,
) -> VGG:
    """VGG (flatten of C x pool x pool features into Linear); VGG-16-BN at the defaults."""
    features, out_c = make_layers(_VGG_CFGS[cfg], batch_norm, width)
    return VGG(features, out_c, num_classes, pool, hidden)


class AlexNet(nn.Module):
    """AlexNet adapted to 32x32 inputs (3x3 convs, 4 maxpools, flatten of 256 x 2 x 2)."""

    def __init__(self, num_classes: int = 10, width: float = 1.0, hidden: int = 4096) -> None:
        super().__init__()
        c1, c2, c3, c4 = (_ch(c, width) for c in (64, 192, 384, 256))
        self.features = nn.Sequential(
            nn.Conv2d(3, c1, kernel_size=3, stride=2, padding=1),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(kernel_size=2),
            nn.Conv2d(c1, c2, kernel_size=3, padding=1),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(kernel_size=2),
            nn.Conv2d(c2, c3, kernel_size=3, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(c3, c4, kernel_size=3, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(c4, c4, kernel_size=3, padding=1),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(kernel_size=2),
        )
        self.classifier = nn.Sequential(
            nn.Dropout(),
            nn.Linear(c4 * 2 * 2, hidden),
            nn.ReLU(inplace=True),
            nn.Dropout(),
            nn.Linear(hidden, hidden),
            nn.ReLU(inplace=True),
            nn.Linear(hidden, num_classes),
        )

    def forward(self, x: Tensor) -> Tensor:
        x = self.features(x)
        x = x.view(x.size(0), -1)
        x = self.classifier(x)
        return x


def alexnet(num_classes: int = 10, width: float = 1.0, hidden: int = 4096) -> AlexNet:
    """AlexNet for 32x32 inputs (``x.view(x.size(0), -1)`` into Linear)."""
    return AlexNet(num_classes, width, hidden)


# --------------------------------------------------------------------------------------------------
# Vision Transformer (timm layout)
# --------------------------------------------------------------------------------------------------


class PatchEmbed(nn.Module):
    """Image to patch embedding: strided conv, then ``flatten(2).transpose(1, 2)``."""

    def __init__(
        self, img_size: int = 224, patch_size: int = 16, in_chans: int = 3, embed_dim: int = 768
    ):
        super().__init__()
        self.img_size = (img_size, img_size)
        self.patch_size = (patch_size, patch_size)
        self.grid_size = (img_size // patch_size, img_size // patch_size)
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: Tensor) -> Tensor:
        x = self.proj(x)
        x = x.flatten(2).transpose(1, 2)  # BCHW -> BNC
        return x


class Attention(nn.Module):
    """timm self-attention: fused qkv, ``reshape(B, N, 3, H, D).permute(2, 0, 3, 1, 4)``."""

    def __init__(self, dim: int, num_heads: int = 8, qkv_bias: bool = True) -> None:
        super().__init__()
        assert dim % num_heads == 0, "dim should be divisible by num_heads"
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim**-0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q = q * self.scale
        attn = q @ k.transpose(-2, -1)
        attn = attn.softmax(dim=-1)
        x = attn @ v
        x = x.transpose(1, 2).reshape(B, N, C)
        x = self.proj(x)
        return x


class SeparateQKVAttention(nn.Module):
    """Multi-head self-attention with separate q/k/v Linears and view/transpose head split."""

    def __init__(self, dim: int, num_heads: int = 8, qkv_bias: bool = True) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.q = nn.Linear(dim, dim, bias=qkv_bias)
        self.k = nn.Linear(dim, dim, bias=qkv_bias)
        self.v = nn.Linear(dim, dim, bias=qkv_bias)
        self.out = nn.Linear(dim, dim)

    def _split(self, x: Tensor) -> Tensor:
        B, N, _ = x.shape
        return x.view(B, N, self.num_heads, self.head_dim).transpose(1, 2)

    def forward(self, x: Tensor) -> Tensor:
        B, N, _ = x.shape
        q = self._split(self.q(x))
        k = self._split(self.k(x))
        v = self._split(self.v(x))
        scores = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(self.head_dim)
        probs = F.softmax(scores, dim=-1)
        ctx = torch.matmul(probs, v)
        ctx = ctx.transpose(1, 2).reshape(B, N, self.num_heads * self.head_dim)
        return self.out(ctx)


class MHAWrapper(nn.Module):
    """Self-attention through ``nn.MultiheadAttention(batch_first=True)``."""

    def __init__(self, dim: int, num_heads: int = 8, qkv_bias: bool = True) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(dim, num_heads, bias=qkv_bias, batch_first=True)

    def forward(self, x: Tensor) -> Tensor:
        return self.attn(x, x, x, need_weights=False)[0]


class Mlp(nn.Module):
    """Transformer MLP: Linear -> GELU -> Linear."""

    def __init__(self, in_features: int, hidden_features: int, drop: float = 0.0) -> None:
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.act = nn.GELU()
        self.drop1 = nn.Dropout(drop)
        self.fc2 = nn.Linear(hidden_features, in_features)
        self.drop2 = nn.Dropout(drop)

    def forward(self, x: Tensor) -> Tensor:
        x = self.fc1(x)
        x = self.act(x)
        x = self.drop1(x)
        x = self.fc2(x)
        x = self.drop2(x)
        return x


_ATTENTION = {"fused": Attention, "separate": SeparateQKVAttention, "mha": MHAWrapper}


class Block(nn.Module):
    """Pre-norm transformer block: ``x + attn(norm1(x))``, ``x + mlp(norm2(x))``."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        attn: str = "fused",
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = _ATTENTION[attn](dim, num_heads=num_heads, qkv_bias=qkv_bias)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(in_features=dim, hidden_features=int(dim * mlp_ratio))

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.norm1(x))
        x = x + self.mlp(self.norm2(x))
        return x


class VisionTransformer(nn.Module):
    """ViT: conv patch embed, cls token (cat), learned pos embed (add), blocks, ``x[:, 0]`` head."""

    def __init__(
        self,
        img_size: int = 224,
        patch_size: int = 16,
        in_chans: int = 3,
        num_classes: int = 1000,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        attn: str = "fused",
    ) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.num_features = self.embed_dim = embed_dim

        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim)
        num_patches = self.patch_embed.num_patches

        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, embed_dim))
        self.pos_drop = nn.Dropout(p=0.0)

        self.blocks = nn.Sequential(
            *[
                Block(embed_dim, num_heads, mlp_ratio, qkv_bias=qkv_bias, attn=attn)
                for _ in range(depth)
            ]
        )
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        self.head = nn.Linear(embed_dim, num_classes)

        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.cls_token, std=1e-6)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.MultiheadAttention):
            nn.init.trunc_normal_(m.in_proj_weight, std=0.02)

    def forward_features(self, x: Tensor) -> Tensor:
        x = self.patch_embed(x)
        x = torch.cat((self.cls_token.expand(x.shape[0], -1, -1), x), dim=1)
        x = self.pos_drop(x + self.pos_embed)
        x = self.blocks(x)
        x = self.norm(x)
        return x

    def forward_head(self, x: Tensor) -> Tensor:
        x = x[:, 0]
        return self.head(x)

    def forward(self, x: Tensor) -> Tensor:
        x = self.forward_features(x)
        x = self.forward_head(x)
        return x


def vit(
    img_size: int = 224,
    patch_size: int = 16,
    num_classes: int = 1000,
    embed_dim: int = 768,
    depth: int = 12,
    num_heads: int = 12,
    mlp_ratio: float = 4.0,
    attn: str = "fused",
) -> VisionTransformer:
    """Vision Transformer (``attn``: 'fused' qkv like timm, 'separate' q/k/v, or 'mha')."""
    return VisionTransformer(
        img_size=img_size,
        patch_size=patch_size,
        num_classes=num_classes,
        embed_dim=embed_dim,
        depth=depth,
        num_heads=num_heads,
        mlp_ratio=mlp_ratio,
        attn=attn,
    )


def vit_b16(num_classes: int = 1000) -> VisionTransformer:
    """ViT-B/16 at 224x224 (depth 12, dim 768, 12 heads); 86,567,656 parameters."""
    return vit(num_classes=num_classes)


def vit_mha(
    img_size: int = 224,
    patch_size: int = 16,
    num_classes: int = 1000,
    embed_dim: int = 768,
    depth: int = 12,
    num_heads: int = 12,
) -> VisionTransformer:
    """Vision Transformer whose attention is ``nn.MultiheadAttention(batch_first=True)``."""
    return vit(img_size, patch_size, num_classes, embed_dim, depth, num_heads, attn="mha")


# --------------------------------------------------------------------------------------------------
# Swin Transformer (microsoft/Swin-Transformer, with timm's traceable window_reverse)
# --------------------------------------------------------------------------------------------------


def window_partition(x: Tensor, window_size: int) -> Tensor:
    """(B, H, W, C) -> (num_windows*B, window_size, window_size, C)."""
    B, H, W, C = x.shape
    x = x.view(B, H // window_size, window_size, W // window_size, window_size, C)
    windows = x.permute(0, 1, 3, 2, 4, 5).contiguous().view(-1, window_size, window_size, C)
    return windows


def window_reverse(windows: Tensor, window_size: int, H: int, W: int) -> Tensor:
    """(num_windows*B, window_size, window_size, C) -> (B, H, W, C)."""
    C = windows.shape[-1]
    x = windows.view(-1, H // window_size, W // window_size, window_size, window_size, C)
    x = x.permute(0, 1, 3, 2, 4, 5).contiguous().view(-1, H, W, C)
    return x


class WindowAttention(nn.Module):
    """Window multi-head self-attention with a relative position bias table indexed by a buffer."""

    def __init__(self, dim: int, window_size: int, num_heads: int, qkv_bias: bool = True) -> None:
        super().__init__()
        self.dim = dim
        self.window_size = (window_size, window_size)  # Wh, Ww
        self.num_heads = num_heads
        head_dim = dim // num_heads
        self.scale = head_dim**-0.5

        # define a parameter table of relative position bias
        self.relative_position_bias_table = nn.Parameter(
            torch.zeros((2 * window_size - 1) * (2 * window_size - 1), num_heads)
        )  # 2*Wh-1 * 2*Ww-1, nH

        # get pair-wise relative position index for each token inside the window
        coords_h = torch.arange(self.window_size[0])
        coords_w = torch.arange(self.window_size[1])
        coords = torch.stack(torch.meshgrid([coords_h, coords_w], indexing="ij"))  # 2, Wh, Ww
        coords_flatten = torch.flatten(coords, 1)  # 2, Wh*Ww
        relative_coords = coords_flatten[:, :, None] - coords_flatten[:, None, :]  # 2, Wh*Ww, Wh*Ww
        relative_coords = relative_coords.permute(1, 2, 0).contiguous()  # Wh*Ww, Wh*Ww, 2
        relative_coords[:, :, 0] += self.window_size[0] - 1  # shift to start from 0
        relative_coords[:, :, 1] += self.window_size[1] - 1
        relative_coords[:, :, 0] *= 2 * self.window_size[1] - 1
        relative_position_index = relative_coords.sum(-1)  # Wh*Ww, Wh*Ww
        self.register_buffer("relative_position_index", relative_position_index)

        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        nn.init.trunc_normal_(self.relative_position_bias_table, std=0.02)
        self.softmax = nn.Softmax(dim=-1)

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        B_, N, C = x.shape
        qkv = (
            self.qkv(x)
            .reshape(B_, N, 3, self.num_heads, C // self.num_heads)
            .permute(2, 0, 3, 1, 4)
        )
        q, k, v = qkv[0], qkv[1], qkv[2]

        q = q * self.scale
        attn = q @ k.transpose(-2, -1)

        relative_position_bias = self.relative_position_bias_table[
            self.relative_position_index.view(-1)
        ].view(
            self.window_size[0] * self.window_size[1], self.window_size[0] * self.window_size[1], -1
        )  # Wh*Ww,Wh*Ww,nH
        relative_position_bias = relative_position_bias.permute(2, 0, 1).contiguous()
        attn = attn + relative_position_bias.unsqueeze(0)

        if mask is not None:
            nW = mask.shape[0]
            attn = attn.view(B_ // nW, nW, self.num_heads, N, N) + mask.unsqueeze(1).unsqueeze(0)
            attn = attn.view(-1, self.num_heads, N, N)
        attn = self.softmax(attn)

        x = (attn @ v).transpose(1, 2).reshape(B_, N, C)
        x = self.proj(x)
        return x


class SwinTransformerBlock(nn.Module):
    """Swin block: LN, (shifted) window attention, window reverse, residual, LN + MLP."""

    def __init__(
        self,
        dim: int,
        input_resolution: tuple[int, int],
        num_heads: int,
        window_size: int = 7,
        shift_size: int = 0,
        mlp_ratio: float = 4.0,
    ) -> None:
        super().__init__()
        self.dim = dim
        self.input_resolution = input_resolution
        self.num_heads = num_heads
        self.window_size = window_size
        self.shift_size = shift_size
        if min(self.input_resolution) <= self.window_size:
            # if window size is larger than input resolution, we don't partition windows
            self.shift_size = 0
            self.window_size = min(self.input_resolution)
        assert 0 <= self.shift_size < self.window_size, "shift_size must in 0-window_size"

        self.norm1 = nn.LayerNorm(dim)
        self.attn = WindowAttention(dim, window_size=self.window_size, num_heads=num_heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(in_features=dim, hidden_features=int(dim * mlp_ratio))

        if self.shift_size > 0:
            # calculate attention mask for SW-MSA
            H, W = self.input_resolution
            img_mask = torch.zeros((1, H, W, 1))  # 1 H W 1
            h_slices = (
                slice(0, -self.window_size),
                slice(-self.window_size, -self.shift_size),
                slice(-self.shift_size, None),
            )
            w_slices = (
                slice(0, -self.window_size),
                slice(-self.window_size, -self.shift_size),
                slice(-self.shift_size, None),
            )
            cnt = 0
            for h in h_slices:
                for w in w_slices:
                    img_mask[:, h, w, :] = cnt
                    cnt += 1

            mask_windows = window_partition(img_mask, self.window_size)  # nW, ws, ws, 1
            mask_windows = mask_windows.view(-1, self.window_size * self.window_size)
            attn_mask = mask_windows.unsqueeze(1) - mask_windows.unsqueeze(2)
            attn_mask = attn_mask.masked_fill(attn_mask != 0, (-100.0)).masked_fill(
                attn_mask == 0, 0.0
            )
        else:
            attn_mask = None

        self.register_buffer("attn_mask", attn_mask)

    def forward(self, x: Tensor) -> Tensor:
        H, W = self.input_resolution
        B, L, C = x.shape

        shortcut = x
        x = self.norm1(x)
        x = x.view(B, H, W, C)

        # cyclic shift
        if self.shift_size > 0:
            shifted_x = torch.roll(x, shifts=(-self.shift_size, -self.shift_size), dims=(1, 2))
        else:
            shifted_x = x

        # partition windows
        x_windows = window_partition(shifted_x, self.window_size)  # nW*B, ws, ws, C
        x_windows = x_windows.view(-1, self.window_size * self.window_size, C)  # nW*B, ws*ws, C

        # W-MSA/SW-MSA
        attn_windows = self.attn(x_windows, mask=self.attn_mask)  # nW*B, ws*ws, C

        # merge windows
        attn_windows = attn_windows.view(-1, self.window_size, self.window_size, C)
        shifted_x = window_reverse(attn_windows, self.window_size, H, W)  # B H' W' C

        # reverse cyclic shift
        if self.shift_size > 0:
            x = torch.roll(shifted_x, shifts=(self.shift_size, self.shift_size), dims=(1, 2))
        else:
            x = shifted_x
        x = x.view(B, H * W, C)

        # FFN
        x = shortcut + x
        x = x + self.mlp(self.norm2(x))

        return x


class PatchMerging(nn.Module):
    """Patch merging: cat of 4 strided slices on the channel dim, LayerNorm, Linear(4C -> 2C)."""

    def __init__(self, input_resolution: tuple[int, int], dim: int) -> None:
        super().__init__()
        self.input_resolution = input_resolution
        self.dim = dim
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)
        self.norm = nn.LayerNorm(4 * dim)

    def forward(self, x: Tensor) -> Tensor:
        H, W = self.input_resolution
        B, L, C = x.shape
        assert H % 2 == 0 and W % 2 == 0, f"x size ({H}*{W}) are not even."

        x = x.view(B, H, W, C)

        x0 = x[:, 0::2, 0::2, :]  # B H/2 W/2 C
        x1 = x[:, 1::2, 0::2, :]  # B H/2 W/2 C
        x2 = x[:, 0::2, 1::2, :]  # B H/2 W/2 C
        x3 = x[:, 1::2, 1::2, :]  # B H/2 W/2 C
        x = torch.cat([x0, x1, x2, x3], -1)  # B H/2 W/2 4*C
        x = x.view(B, -1, 4 * C)  # B H/2*W/2 4*C

        x = self.norm(x)
        x = self.reduction(x)

        return x


class BasicLayer(nn.Module):
    """One Swin stage: alternating W-MSA / SW-MSA blocks, then optional patch merging."""

    def __init__(
        self,
        dim: int,
        input_resolution: tuple[int, int],
        depth: int,
        num_heads: int,
        window_size: int,
        mlp_ratio: float = 4.0,
        downsample: bool = False,
        shift: bool = True,
    ) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(
            [
                SwinTransformerBlock(
                    dim=dim,
                    input_resolution=input_resolution,
                    num_heads=num_heads,
                    window_size=window_size,
                    shift_size=0 if (i % 2 == 0 or not shift) else window_size // 2,
                    mlp_ratio=mlp_ratio,
                )
                for i in range(depth)
            ]
        )
        self.downsample = PatchMerging(input_resolution, dim=dim) if downsample else None

    def forward(self, x: Tensor) -> Tensor:
        for blk in self.blocks:
            x = blk(x)
        if self.downsample is not None:
            x = self.downsample(x)
        return x


class SwinPatchEmbed(nn.Module):
    """Swin patch embedding: strided conv, flatten to tokens, LayerNorm."""

    def __init__(self, img_size: int, patch_size: int, in_chans: int, embed_dim: int) -> None:
        super().__init__()
        self.patches_resolution = (img_size // patch_size, img_size // patch_size)
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)
        self.norm = nn.LayerNorm(embed_dim)

    def forward(self, x: Tensor) -> Tensor:
        x = self.proj(x).flatten(2).transpose(1, 2)  # B Ph*Pw C
        x = self.norm(x)
        return x


class SwinTransformer(nn.Module):
    """Swin Transformer (windowed attention, shifted windows, patch merging, mean-pool head)."""

    def __init__(
        self,
        img_size: int = 224,
        patch_size: int = 4,
        in_chans: int = 3,
        num_classes: int = 1000,
        embed_dim: int = 96,
        depths: Sequence[int] = (2, 2, 6, 2),
        num_heads: Sequence[int] = (3, 6, 12, 24),
        window_size: int = 7,
        mlp_ratio: float = 4.0,
        shift: bool = True,
    ) -> None:
        super().__init__()
        self.num_layers = len(depths)
        self.patch_embed = SwinPatchEmbed(img_size, patch_size, in_chans, embed_dim)
        res = self.patch_embed.patches_resolution
        self.layers = nn.ModuleList()
        for i_layer in range(self.num_layers):
            layer = BasicLayer(
                dim=int(embed_dim * 2**i_layer),
                input_resolution=(res[0] // (2**i_layer), res[1] // (2**i_layer)),
                depth=depths[i_layer],
                num_heads=num_heads[i_layer],
                window_size=window_size,
                mlp_ratio=mlp_ratio,
                downsample=i_layer < self.num_layers - 1,
                shift=shift,
            )
            self.layers.append(layer)
        self.num_features = int(embed_dim * 2 ** (self.num_layers - 1))
        self.norm = nn.LayerNorm(self.num_features)
        self.avgpool = nn.AdaptiveAvgPool1d(1)
        self.head = nn.Linear(self.num_features, num_classes)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.constant_(m.bias, 0)
        elif isinstance(m, nn.LayerNorm):
            nn.init.constant_(m.bias, 0)
            nn.init.constant_(m.weight, 1.0)

    def forward_features(self, x: Tensor) -> Tensor:
        x = self.patch_embed(x)
        for layer in self.layers:
            x = layer(x)
        x = self.norm(x)  # B L C
        x = self.avgpool(x.transpose(1, 2))  # B C 1
        x = torch.flatten(x, 1)
        return x

    def forward(self, x: Tensor) -> Tensor:
        x = self.forward_features(x)
        x = self.head(x)
        return x


def swin(
    img_size: int = 224,
    patch_size: int = 4,
    num_classes: int = 1000,
    embed_dim: int = 96,
    depths: Sequence[int] = (2, 2, 6, 2),
    num_heads: Sequence[int] = (3, 6, 12, 24),
    window_size: int = 7,
    shift: bool = True,
) -> SwinTransformer:
    """Swin Transformer (window partition/reverse, relative position bias); Swin-T at defaults."""
    return SwinTransformer(
        img_size=img_size,
        patch_size=patch_size,
        num_classes=num_classes,
        embed_dim=embed_dim,
        depths=depths,
        num_heads=num_heads,
        window_size=window_size,
        shift=shift,
    )


# --------------------------------------------------------------------------------------------------
# MLP and negative-test models (ops a pruner cannot know)
# --------------------------------------------------------------------------------------------------


class MLP(nn.Module):
    """A plain MLP: Linear -> ReLU stacks and a Linear head."""

    def __init__(
        self, in_features: int = 64, hidden: Sequence[int] = (128, 128), num_classes: int = 10
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        prev = in_features
        for h in hidden:
            layers += [nn.Linear(prev, h), nn.ReLU(inplace=True)]
            prev = h
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(prev, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.body(x))


def mlp(in_features: int = 64, hidden: Sequence[int] = (128, 128), num_classes: int = 10) -> MLP:
    """A plain MLP."""
    return MLP(in_features, hidden, num_classes)


class LSTMModel(nn.Module):
    """Conv stem -> tokens -> ``nn.LSTM`` -> Linear: contains an op a pruner cannot rewrite."""

    def __init__(self, channels: int = 16, hidden: int = 32, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(3, channels, 3, stride=2, padding=1, bias=False),
            nn.BatchNorm2d(channels),
            nn.ReLU(inplace=True),
            nn.Conv2d(channels, channels, 3, stride=2, padding=1, bias=False),
            nn.BatchNorm2d(channels),
            nn.ReLU(inplace=True),
        )
        self.lstm = nn.LSTM(channels, hidden, num_layers=1, batch_first=True)
        self.fc = nn.Linear(hidden, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.stem(x)
        x = x.flatten(2).transpose(1, 2)  # B, HW, C
        out, _ = self.lstm(x)
        return self.fc(out[:, -1])


def lstm_model(channels: int = 16, hidden: int = 32, num_classes: int = 10) -> LSTMModel:
    """Conv + nn.LSTM model (negative test: op unknown to the pruner)."""
    return LSTMModel(channels, hidden, num_classes)


_CHANNEL_MIX = None


def _channel_mix_op():
    """The ``graphprune_zoo::channel_mix`` custom op, registered on first use."""
    global _CHANNEL_MIX
    if _CHANNEL_MIX is not None:
        return _CHANNEL_MIX
    try:
        _CHANNEL_MIX = torch.ops.graphprune_zoo.channel_mix  # already registered (module reload)
        return _CHANNEL_MIX
    except (AttributeError, RuntimeError):
        pass

    @torch.library.custom_op("graphprune_zoo::channel_mix", mutates_args=())
    def channel_mix(x: Tensor, w: Tensor) -> Tensor:
        """``out[:, c] = w[c] * x[:, c] + x[:, (c + 1) % C]`` -- couples neighbouring channels."""
        return x * w.view(1, -1, 1, 1) + torch.roll(x, shifts=-1, dims=1)

    @channel_mix.register_fake
    def _(x: Tensor, w: Tensor) -> Tensor:
        return torch.empty_like(x)

    _CHANNEL_MIX = channel_mix
    return _CHANNEL_MIX


class CustomOpModel(nn.Module):
    """Conv, opaque ``torch.library`` channel-mixing custom op, conv, head (negative test)."""

    def __init__(self, channels: int = 16, num_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, channels, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.mix_weight = nn.Parameter(torch.rand(channels) + 0.5)
        self.conv2 = nn.Conv2d(channels, channels, 3, stride=2, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.fc = nn.Linear(channels, num_classes)
        _channel_mix_op()  # make sure torch.ops.graphprune_zoo.channel_mix is registered

    def forward(self, x: Tensor) -> Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = torch.ops.graphprune_zoo.channel_mix(x, self.mix_weight)
        x = F.relu(self.bn2(self.conv2(x)))
        x = F.adaptive_avg_pool2d(x, 1).flatten(1)
        return self.fc(x)


def custom_op_model(channels: int = 16, num_classes: int = 10) -> CustomOpModel:
    """Model with a channel-mixing custom op (negative test: op unknown to the pruner)."""
    return CustomOpModel(channels, num_classes)


# --------------------------------------------------------------------------------------------------
# randomisation and registries
# --------------------------------------------------------------------------------------------------


_LAYER_SCALE_PARAMS = ("gamma", "layer_scale_parameter")  # ConvNeXt (official / HF)


def randomize_bn(
    model: nn.Module,
    seed: int = 0,
    calibration_input: Tensor | tuple[Tensor, ...] | None = None,
) -> nn.Module:
    """Give every norm layer non-trivial statistics/affines so numerical tests are meaningful.

    Affines: weights ``~ U(0.5, 1.5)``, biases ``~ N(0, 0.1^2)`` for BatchNorm, LayerNorm,
    GroupNorm and the ConvNeXt channels-first :class:`LayerNorm`; layer-scale parameters
    (``gamma``, HF's ``layer_scale_parameter``) ``~ U(0.2, 1.0)``.

    BatchNorm running statistics: with ``calibration_input`` (one eval-mode forward; a pre-hook
    fits each BN, in order, to the per-channel mean/variance of the input it actually receives)
    they are the real statistics, then perturbed (``mean += N(0, 0.1^2) * std``,
    ``var *= U(0.7, 1.3)``) so they are not exact -- this keeps activations O(1) and
    input-dependent through deep depthwise stacks. Without it (or on the meta
    device): ``running_mean ~ N(0, 0.1^2)``, ``running_var ~ U(0.5, 1.5)``.

    Deterministic in ``seed``; leaves the global RNG untouched. Returns ``model``.
    """
    g = torch.Generator().manual_seed(seed)

    def draw(t: Tensor, kind: str, lo: float = 0.5, hi: float = 1.5) -> Tensor:
        if kind == "normal":
            v = torch.randn(t.shape, generator=g) * 0.1
        else:
            v = torch.rand(t.shape, generator=g) * (hi - lo) + lo
        return v.to(device=t.device, dtype=t.dtype)

    def fill(t: Tensor | None, kind: str, lo: float = 0.5, hi: float = 1.5) -> None:
        if t is not None:
            t.copy_(draw(t, kind, lo, hi))

    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                if m.affine:
                    fill(m.weight, "uniform")
                    fill(m.bias, "normal")
            elif isinstance(m, (nn.LayerNorm, nn.GroupNorm, LayerNorm)):
                fill(getattr(m, "weight", None), "uniform")
                fill(getattr(m, "bias", None), "normal")
            for name in _LAYER_SCALE_PARAMS:
                p = m._parameters.get(name)
                if p is not None:
                    fill(p, "uniform", 0.2, 1.0)

        tracked = [m for m in bns if m.running_mean is not None and m.running_var is not None]
        on_meta = any(p.is_meta for p in model.parameters())
        if calibration_input is not None and tracked and not on_meta:
            args = (
                calibration_input if isinstance(calibration_input, tuple) else (calibration_input,)
            )
            done: set[nn.Module] = set()

            def calibrate(mod: nn.Module, inputs: tuple[Tensor, ...]) -> None:
                # Runs in eval mode just before the BN: upstream BNs are already calibrated (and
                # perturbed), so each layer is fitted to the activations it will really see.
                if mod in done:
                    return
                done.add(mod)
                x = inputs[0].detach().float()
                dims = [0, *range(2, x.ndim)]
                var = x.var(dims, unbiased=False)
                mean = x.mean(dims) + draw(mod.running_mean, "normal").float() * var.sqrt()
                mod.running_mean.copy_(mean)
                mod.running_var.copy_(var * draw(mod.running_var, "uniform", 0.7, 1.3).float())

            modes = {m: m.training for m in model.modules()}
            handles = [m.register_forward_pre_hook(calibrate) for m in tracked]
            model.eval()
            try:
                model(*args)
            finally:
                for h in handles:
                    h.remove()
                for m, mode in modes.items():
                    m.training = mode
            for m in tracked:  # BNs the forward never reached
                if m not in done:
                    fill(m.running_mean, "normal")
                    fill(m.running_var, "uniform")
        else:
            for m in tracked:
                fill(m.running_mean, "normal")
                fill(m.running_var, "uniform")
    return model


_EMBEDDING_PARAMS = ("cls_token", "pos_embed", "relative_position_bias_table")


def randomize_weights(model: nn.Module, seed: int = 0) -> nn.Module:
    """Re-draw weights so every signal path is O(1) and every bias matters.

    Conv weights ``~ N(0, 2/fan_in)`` (He), Linear weights ``~ N(0, 1/fan_in)``, every
    conv/linear/``nn.MultiheadAttention`` bias ``~ N(0, 0.1^2)``, and ``cls_token``/``pos_embed``/
    relative position bias tables ``~ N(0, 0.1^2)``. torchvision's ``N(0, 0.01^2)`` classifier
    init, PyTorch's default conv init on BN-free nets and all-zero biases otherwise make outputs
    tiny or input-independent, and let a pruner that mishandles biases pass numerical checks.
    Deterministic in ``seed``; leaves the global RNG untouched. Returns ``model``.
    """
    g = torch.Generator().manual_seed(seed + 1)

    def put(t: Tensor | None, std: float) -> None:
        if t is not None:
            v = torch.randn(t.shape, generator=g) * std
            t.copy_(v.to(device=t.device, dtype=t.dtype))

    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
                fan_in = m.weight[0].numel()
                put(m.weight, math.sqrt(2.0 / fan_in))
                put(m.bias, 0.1)
            elif isinstance(m, nn.ConvTranspose2d):
                fan_in = m.weight.shape[0] * m.weight[0, 0].numel() // m.groups
                put(m.weight, math.sqrt(2.0 / max(1, fan_in)))
                put(m.bias, 0.1)
            elif isinstance(m, nn.Linear):
                put(m.weight, 1.0 / math.sqrt(m.in_features))
                put(m.bias, 0.1)
            elif isinstance(m, nn.MultiheadAttention):
                put(m.in_proj_bias, 0.1)
            for name in _EMBEDDING_PARAMS:
                p = m._parameters.get(name)
                if p is not None:
                    put(p, 0.1)
    return model


def _factory(
    ctor: Callable[[], nn.Module],
    input_shape: Sequence[int] = (2, 3, 32, 32),
    seed: int = 0,
    calibration_batch: int = 16,
) -> Factory:
    """Wrap a constructor into a deterministic ``() -> (model.eval(), (input,))`` factory.

    The model gets :func:`randomize_weights` and :func:`randomize_bn` applied (BN statistics
    calibrated on the example batch plus fresh samples, so the example stays in-distribution).
    The factory also carries ``.example_inputs()`` (the same inputs, without building the model)
    and ``.input_shape``.
    """

    def example_inputs() -> tuple[Tensor, ...]:
        g = torch.Generator().manual_seed(seed + 12345)
        return (torch.randn(*input_shape, generator=g),)

    def make() -> tuple[nn.Module, tuple[Tensor, ...]]:
        inputs = example_inputs()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = ctor()
            randomize_weights(model, seed)
            x = inputs[0]
            extra = max(calibration_batch - x.shape[0], 2)
            calib = torch.cat([x, torch.randn(extra, *input_shape[1:])])
            randomize_bn(model, seed, calibration_input=calib)
        return model.eval(), inputs

    base = ctor.func if isinstance(ctor, partial) else ctor
    make.__name__ = getattr(base, "__name__", "make")
    make.__doc__ = base.__doc__
    make.example_inputs = example_inputs  # type: ignore[attr-defined]
    make.input_shape = tuple(input_shape)  # type: ignore[attr-defined]
    return make


ZOO: dict[str, Factory] = {
    "resnet18": _factory(partial(resnet18, num_classes=10, width=0.25)),
    "resnet50": _factory(partial(resnet50, num_classes=10, width=0.25, layers=(2, 2, 2, 2))),
    "resnext": _factory(
        partial(
            resnext, num_classes=10, width=0.25, layers=(1, 2, 1, 1), groups=4, width_per_group=16
        )
    ),
    "densenet": _factory(partial(densenet_tiny, num_classes=10)),
    "mobilenet_v2": _factory(
        partial(
            mobilenet_v2,
            num_classes=10,
            width_mult=0.25,
            inverted_residual_setting=[
                [1, 16, 1, 1],
                [6, 24, 2, 2],
                [6, 32, 2, 2],
                [6, 64, 2, 2],
                [6, 96, 1, 1],
                [6, 160, 2, 2],
                [6, 320, 1, 1],
            ],
        )
    ),
    "mobilenet_v3": _factory(partial(mobilenet_v3, num_classes=10, width_mult=0.5)),
    "efficientnet": _factory(
        partial(efficientnet, num_classes=10, width_mult=0.25, depth_mult=0.34)
    ),
    "shufflenet_v2": _factory(
        partial(
            shufflenet_v2,
            num_classes=10,
            stages_repeats=(2, 3, 2),
            stages_out_channels=(16, 32, 64, 128, 256),
        )
    ),
    "squeezenet": _factory(partial(squeezenet, num_classes=10, width=0.25)),
    "inception": _factory(
        partial(
            inception,
            num_classes=10,
            width=0.25,
            cfg=(
                (32, 24, 32, 8, 16, 16),
                (32, 32, 48, 8, 24, 16),
                "M",
                (48, 24, 48, 8, 16, 16),
            ),
        )
    ),
    "convnext": _factory(
        partial(convnext, num_classes=10, depths=(1, 1, 2, 1), dims=(16, 32, 64, 128))
    ),
    "regnet": _factory(
        partial(
            regnet,
            num_classes=10,
            depths=(1, 1, 2, 1),
            widths=(16, 32, 48, 64),
            group_width=8,
            se_ratio=0.25,
            stem_width=16,
        )
    ),
    "regnet_x": _factory(
        partial(
            regnet,
            num_classes=10,
            depths=(1, 2, 1, 1),
            widths=(16, 32, 64, 96),
            group_width=16,
            se_ratio=None,
            stem_width=16,
        )
    ),
    "unet": _factory(partial(unet, n_classes=2, base=8, bilinear=False)),
    "unet_bilinear": _factory(partial(unet, n_classes=2, base=8, bilinear=True)),
    "vgg": _factory(
        partial(vgg, cfg="S", num_classes=10, width=0.25, batch_norm=True, pool=2, hidden=128)
    ),
    "alexnet": _factory(partial(alexnet, num_classes=10, width=0.25, hidden=128)),
    "vit": _factory(
        partial(vit, img_size=32, patch_size=4, num_classes=10, embed_dim=64, depth=2, num_heads=4)
    ),
    "vit_separate_qkv": _factory(
        partial(
            vit,
            img_size=32,
            patch_size=4,
            num_classes=10,
            embed_dim=64,
            depth=2,
            num_heads=4,
            attn="separate",
        )
    ),
    "vit_mha": _factory(
        partial(
            vit_mha, img_size=32, patch_size=4, num_classes=10, embed_dim=64, depth=2, num_heads=4
        )
    ),
    "swin": _factory(
        partial(
            swin,
            img_size=32,
            patch_size=2,
            num_classes=10,
            embed_dim=32,
            depths=(2, 2, 2),
            num_heads=(2, 4, 8),
            window_size=4,
        )
    ),
    "mlp": _factory(partial(mlp, 64, (128, 128), 10), input_shape=(2, 64)),
    "lstm": _factory(partial(lstm_model, 16, 32, 10)),
    "custom_op": _factory(partial(custom_op_model, 16, 10)),
}
"""Small test variants: ``name -> () -> (model.eval(), (input,))`` at 32x32 (``mlp``: (2, 64))."""

_FULL_SHAPE = (1, 3, 224, 224)

FULL: dict[str, Factory] = {
    "resnet50": _factory(resnet50, input_shape=_FULL_SHAPE, calibration_batch=4),
    "resnet18": _factory(resnet18, input_shape=_FULL_SHAPE, calibration_batch=4),
    "densenet121": _factory(densenet121, input_shape=_FULL_SHAPE, calibration_batch=4),
    "mobilenet_v2": _factory(mobilenet_v2, input_shape=_FULL_SHAPE, calibration_batch=4),
    "vit_b16": _factory(vit_b16, input_shape=_FULL_SHAPE, calibration_batch=4),
}
"""Full-size ImageNet variants at 224x224, batch 1, 1000 classes."""

# Names whose models contain ops no pruner can be expected to understand (negative tests).
NEGATIVE = ("lstm", "custom_op")
