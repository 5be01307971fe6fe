"""The TF Model Garden's convolution building blocks, for our ports of its backbones
(SpineNet; the ResNet + FPN of the R50/R101 rows).

TF pads a strided conv or max pool 'SAME': the extra pixel goes after, where PyTorch's
symmetric padding would put one before and shift every output by half a pixel. The
reference's conv / BatchNorm / ReLU triple and its residual unit (projection shortcut,
stochastic depth) keep its parameters and call order, which the weight converter
(``deepmac_d2.tf_port``) and ``make parity`` rely on.
"""
import math

import torch.nn.functional as F
from torch import nn
from torchvision.ops import stochastic_depth

from ..modeling.hourglass import conv_norm_relu

__all__ = ["check_input_size", "same_padding", "Conv2dSame", "max_pool_same", "ConvNorm", "ResidualUnit"]

# The reference's synchronised BatchNorm in SpineNet (Keras momentum 0.99, PyTorch's
# 0.01; eps 1e-3); the ResNet rows set theirs on the built modules.
BN_MOMENTUM = 0.01
BN_EPS = 1e-3


def check_input_size(x, divisor, backbone, why):
    """A backbone whose levels must halve exactly: N x C x H x W with H and W multiples
    of ``divisor``, else an error naming ``backbone``, the sizes that work and ``why``."""
    if x.dim() != 4 or x.shape[-2] % divisor or x.shape[-1] % divisor:
        raise ValueError(
            f"{backbone} takes N x C x H x W inputs with H and W multiples of {divisor} ({why}); "
            f"got {tuple(x.shape)}. Detectron2's models pad to backbone.size_divisibility "
            "themselves; pad direct inputs likewise."
        )


def same_padding(size, kernel, stride):
    """TF's 'SAME' padding (before, after) along one axis: with stride 2 on an even
    size the extra pixel goes after, where PyTorch's symmetric padding would put one
    before and shift every output by half a pixel."""
    total = max((math.ceil(size / stride) - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


class Conv2dSame(nn.Conv2d):
    """A bias-free conv with TF's 'SAME' padding (symmetric for stride 1, odd kernels)."""

    def __init__(self, in_channels, out_channels, kernel_size, stride=1):
        super().__init__(in_channels, out_channels, kernel_size, stride, bias=False)

    def forward(self, x):
        x, padding = self.pad_same(x)
        return F.conv2d(x, self.weight, self.bias, self.stride, padding)

    def pad_same(self, x):
        """``x`` padded where TF's 'SAME' padding is asymmetric, and the (symmetric)
        padding left to the conv, which pads itself without F.pad's copy."""
        (kh, kw), (sh, sw) = self.kernel_size, self.stride
        top, bottom = same_padding(x.shape[-2], kh, sh)
        left, right = same_padding(x.shape[-1], kw, sw)
        if top == bottom and left == right:
            return x, (top, left)
        return F.pad(x, (left, right, top, bottom)), (0, 0)


def max_pool_same(x):
    """3x3 stride-2 max pool with TF's 'SAME' padding (padding never wins the max).

    TF pads (before, after) = (0, 1) on even sizes, (1, 1) on odd ones: PyTorch's own
    padding by ``before`` on both sides, with ``ceil_mode``, gives the same windows (one
    reaching past the end keeps the values inside), without a padded copy of ``x``.
    """
    top, _ = same_padding(x.shape[-2], 3, 2)
    left, _ = same_padding(x.shape[-1], 3, 2)
    return F.max_pool2d(x, 3, 2, padding=(top, left), ceil_mode=True)


class ConvNorm(nn.Sequential):
    """Conv (no bias, TF's 'SAME' padding) + norm (+ ReLU): the reference's
    conv/BN/activation triple."""

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, relu=True, norm="BN"):
        conv = Conv2dSame(in_channels, out_channels, kernel_size, stride)
        super().__init__(*conv_norm_relu(conv, norm, BN_EPS, BN_MOMENTUM, relu))


class ResidualUnit(nn.Module):
    """Shared body of the reference's residual blocks (SpineNet's bottleneck and residual
    blocks, the ResNet's bottleneck): a projection shortcut where the input width
    differs, stochastic depth on the residual branch, add, ReLU."""

    def __init__(self, shortcut, branch, drop_rate):
        super().__init__()
        # Registered first: the reference creates (and calls) the projection first,
        # which the weight converter's order relies on.
        self.shortcut = shortcut
        self.branch = branch
        self.drop_rate = drop_rate

    def forward(self, x):
        shortcut = self.shortcut(x) if self.shortcut is not None else x
        # Per-sample drop of the residual branch, scaled by 1 / keep-rate; identity in eval.
        y = stochastic_depth(self.branch(x), self.drop_rate, "row", self.training)
        return F.relu_(y + shortcut)
