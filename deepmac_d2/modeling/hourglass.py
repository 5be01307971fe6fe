"""The Hourglass network (Newell et al., arXiv 1603.06937), as DeepMAC's mask heads use it.

A PyTorch port of the TF Object Detection API's ``hourglass_network.py``, the
network behind the reference's ``hourglass*`` mask-head variants: same blocks,
widths, depths, padding, BatchNorm settings and initialisation, hence the same
parameter counts (checked against the reference in the tests).

One deliberate difference: the reference requires every level's input to be
even (its decoder add fails otherwise, e.g. on 14x14 crops for hourglass52);
here the decoder's upsampled map is cut to the encoder shortcut's size, so any
input size works, and even sizes give exactly the reference's computation.
"""
import torch
import torch.nn.functional as F
from torch import nn

from detectron2.layers import FrozenBatchNorm2d, get_norm
from detectron2.utils import comm

__all__ = [
    "KerasBatchNorm2d",
    "norm_layer",
    "conv_norm_relu",
    "ConvBlock",
    "ResidualBlock",
    "InputBlock",
    "EncoderDecoderBlock",
    "HourglassNetwork",
    "hourglass10",
    "hourglass20",
    "hourglass32",
    "hourglass52",
    "hourglass100",
    "hourglass104",
    "hourglass20_uniform_size",
    "hourglass20_no_shortcut",
]

# The reference's hourglass BatchNorm: eps 1e-5 and Keras momentum 0.1, i.e. the
# moving average keeps 10% of its old value (PyTorch's momentum is the weight
# of the new batch, so 0.9). The reference's hourglass BN is Keras'
# SyncBatchNormalization: norm "SyncBN" here (see norm_layer for one process).
BN_EPS = 1e-5
BN_MOMENTUM = 0.9


class KerasBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm whose running variance averages the *biased* batch variance.

    Keras' non-fused BatchNormalization (and SyncBatchNormalization, which the
    reference's hourglass and SpineNet use) moves its variance towards the batch's
    biased variance; PyTorch's BatchNorm uses the unbiased one, n / (n - 1) larger.
    Over n = N x H x W values the gap is negligible, except where n is small:
    Hourglass-52's 1x1 bottleneck has n = number of ROIs, and with 2 ROIs PyTorch's
    running variance would be twice the reference's. The normalisation itself
    (batch statistics in training, running ones in eval) is PyTorch's, unchanged.
    """

    def forward(self, x):
        if not (self.training and self.track_running_stats) or self.momentum is None or x.numel() == 0:
            # An empty batch (no ROI trains the mask head) has no statistics: PyTorch's
            # BatchNorm leaves the running ones alone, the update below would divide by 0.
            return super().forward(x)
        self._check_input_dim(x)
        # PyTorch's update, on copies (autograd keeps them for the backward pass).
        mean, var = self.running_mean.clone(), self.running_var.clone()
        y = F.batch_norm(x, mean, var, self.weight, self.bias, True, self.momentum, self.eps)
        n = x.numel() // x.shape[1]
        with torch.no_grad():
            # PyTorch set var = (1 - m) old + m v n/(n-1), with v the biased variance;
            # the reference's (1 - m) old + m v is var - (var - (1 - m) old) / n.
            self.running_var.copy_(var - (var - (1 - self.momentum) * self.running_var) / n)
            self.running_mean.copy_(mean)
            self.num_batches_tracked.add_(1)
        return y


def norm_layer(norm, channels, eps, momentum, biased_variance=False):
    """Detectron2's ``get_norm``, with the reference's eps and momentum for the BatchNorm kinds.

    ``biased_variance``: "BN" becomes :class:`KerasBatchNorm2d` (the reference's
    non-fused and synchronised BatchNorms). "SyncBN" in a single process is plain
    BatchNorm (the same computation): torch's SyncBatchNorm refuses CPU input once a
    process group exists, and one process has nothing to synchronise with.
    Other kinds (GN) keep their own defaults; ``""`` gives None (no normalisation).
    """
    if norm == "SyncBN" and comm.get_world_size() == 1:
        norm = "BN"
    if norm == "BN" and biased_variance:
        layer = KerasBatchNorm2d(channels)
    else:
        layer = get_norm(norm, channels)
    if isinstance(layer, nn.modules.batchnorm._BatchNorm):
        layer.eps, layer.momentum = eps, momentum
    elif isinstance(layer, FrozenBatchNorm2d):
        layer.eps = eps
    return layer


def conv_norm_relu(conv, norm, eps, momentum, relu=True):
    """``[conv, norm, ReLU]``, the references' conv / synchronised BN / activation triple:
    the norm from :func:`norm_layer` with the biased moving variance; none for norm "",
    no ReLU without ``relu``."""
    layers = [conv]
    norm_module = norm_layer(norm, conv.out_channels, eps, momentum, biased_variance=True)
    if norm_module is not None:
        layers.append(norm_module)
    if relu:
        layers.append(nn.ReLU(inplace=True))
    return layers


class ConvBlock(nn.Sequential):
    """Conv (no bias: the norm's shift replaces it) + norm + optional ReLU.

    Kernels larger than 1 are padded by ``k // 2`` on every side, as the reference
    (explicit symmetric zero padding, then a 'valid' conv); a 1x1 kernel has no
    padding, so with stride 2 it takes the even positions.
    """

    def __init__(self, in_channels, out_channels, kernel_size=3, stride=1, relu=True, norm="BN"):
        conv = nn.Conv2d(
            in_channels, out_channels, kernel_size, stride, padding=kernel_size // 2, bias=False
        )
        super().__init__(*conv_norm_relu(conv, norm, BN_EPS, BN_MOMENTUM, relu))


class ResidualBlock(nn.Module):
    """Two 3x3 conv blocks (the first carries the stride) plus a shortcut, then ReLU.

    The shortcut is a 1x1 conv block only where the identity cannot be added (stride
    2 or a change of width), which is where the reference builders put one.
    """

    def __init__(self, in_channels, out_channels, stride=1, norm="BN"):
        super().__init__()
        self.conv1 = ConvBlock(in_channels, out_channels, 3, stride, norm=norm)
        self.conv2 = ConvBlock(out_channels, out_channels, 3, relu=False, norm=norm)
        if stride != 1 or in_channels != out_channels:
            self.skip = ConvBlock(in_channels, out_channels, 1, stride, relu=False, norm=norm)
        else:
            self.skip = nn.Identity()

    def forward(self, x):
        # conv1, conv2, then skip: the reference's call order, which the weight
        # converter pairs layers by.
        return F.relu_(self.conv2(self.conv1(x)) + self.skip(x))


def residual_stack(in_channels, out_channels, num_blocks, stride=1, mid_channels=None, norm="BN"):
    """``num_blocks`` residual blocks; only the first is strided, only the last outputs
    ``out_channels`` (the others ``mid_channels``, default ``out_channels``), as the reference's
    ``_make_repeated_residual_blocks``."""
    widths = [mid_channels or out_channels] * (num_blocks - 1) + [out_channels]
    blocks = []
    for i, width in enumerate(widths):
        blocks.append(ResidualBlock(in_channels, width, stride if i == 0 else 1, norm))
        in_channels = width
    return nn.Sequential(*blocks)


class InputBlock(nn.Sequential):
    """Conv block then residual block before the first hourglass.

    With ``downsample`` (CenterNet's backbone), a 7x7 stride-2 conv and a stride-2
    residual block reduce the input 4x; without it (the mask heads, whose 14x14 to
    32x32 crops have no resolution to spare) a 3x3 conv and a stride-1 residual block.
    """

    def __init__(self, in_channels, mid_channels, out_channels, downsample, norm="BN"):
        kernel, stride = (7, 2) if downsample else (3, 1)
        super().__init__(
            ConvBlock(in_channels, mid_channels, kernel, stride, norm=norm),
            ResidualBlock(mid_channels, out_channels, stride, norm),
        )


class EncoderDecoderBlock(nn.Module):
    """One hourglass level, recursive over ``channels`` / ``blocks``.

    ``encoder2`` (first block strided) feeds the inner level (or, at the bottom, a
    plain residual stack); ``decoder`` brings it back to ``channels[0]``, it is
    upsampled (nearest) and added to ``encoder1``, the same-resolution shortcut.
    """

    def __init__(self, channels, blocks, stagewise_downsample=True, shortcut=True, norm="BN"):
        super().__init__()
        outer, inner = channels[0], channels[1]
        self.stride = 2 if stagewise_downsample else 1
        self.encoder1 = residual_stack(outer, outer, blocks[0], norm=norm) if shortcut else None
        self.encoder2 = residual_stack(outer, inner, blocks[0], self.stride, norm=norm)
        if len(channels) > 2:
            self.inner = EncoderDecoderBlock(
                channels[1:], blocks[1:], stagewise_downsample, shortcut, norm
            )
        else:
            self.inner = residual_stack(inner, inner, blocks[1], norm=norm)
        self.decoder = residual_stack(inner, outer, blocks[0], mid_channels=inner, norm=norm)

    def forward(self, x):
        # The shortcut first, as the reference calls it (the weight converter pairs
        # layers in call order).
        shortcut = self.encoder1(x) if self.encoder1 is not None else None
        y = self.decoder(self.inner(self.encoder2(x)))
        if self.stride != 1:
            # Nearest x2, then drop the extra row/column an odd-sized input leaves.
            y = F.interpolate(y, scale_factor=self.stride, mode="nearest")
            y = y[..., : x.shape[-2], : x.shape[-1]]
        return y if shortcut is None else shortcut + y


class HourglassNetwork(nn.Module):
    """Input block, then ``num_hourglasses`` stacked encoder-decoders.

    Between two hourglasses, the reference merges the previous input and output
    through 1x1 conv blocks (no ReLU), a ReLU and a residual block. ``forward``
    returns the output of every hourglass (for intermediate supervision); the mask
    heads keep the last.

    Args:
        in_channels: channels of the input (ROI features for the mask heads).
        input_channels: width of the input block's conv (the reference's
            ``input_channel_dims``; the builders' ``num_channels``).
        channels, blocks: width and residual-block count per level; the last entry
            is the bottleneck, so there are ``len(channels) - 1`` downsamplings.
        num_hourglasses: how many hourglasses are stacked.
        initial_downsample: reduce the input 4x first (see :class:`InputBlock`).
        stagewise_downsample: halve the resolution at each level (off: every level
            keeps the input size).
        shortcut: add the encoder shortcut in the decoder (off: a plain encoder-decoder).
        norm: Detectron2 norm name ("BN", "SyncBN", "FrozenBN", "GN", "") or callable.
    """

    def __init__(
        self,
        in_channels,
        input_channels,
        channels,
        blocks,
        num_hourglasses=1,
        initial_downsample=True,
        stagewise_downsample=True,
        shortcut=True,
        norm="BN",
    ):
        super().__init__()
        if len(channels) != len(blocks) or len(channels) < 2:
            raise ValueError(
                f"channels {channels} and blocks {blocks} need the same length, at least 2"
            )
        width = channels[0]
        self.out_channels = width
        self.input_block = InputBlock(in_channels, input_channels, width, initial_downsample, norm)
        self.hourglasses = nn.ModuleList(
            EncoderDecoderBlock(channels, blocks, stagewise_downsample, shortcut, norm)
            for _ in range(num_hourglasses)
        )
        self.output_convs = nn.ModuleList(
            ConvBlock(width, width, 3, norm=norm) for _ in range(num_hourglasses)
        )
        self.inter_input_convs = nn.ModuleList(
            ConvBlock(width, width, 1, relu=False, norm=norm) for _ in range(num_hourglasses - 1)
        )
        self.inter_output_convs = nn.ModuleList(
            ConvBlock(width, width, 1, relu=False, norm=norm) for _ in range(num_hourglasses - 1)
        )
        self.inter_residuals = nn.ModuleList(
            ResidualBlock(width, width, norm=norm) for _ in range(num_hourglasses - 1)
        )
        # Keras' default kernel initialiser, which the reference leaves in place.
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.xavier_uniform_(module.weight)

    def forward(self, x):
        x = self.input_block(x)
        outputs = []
        for i, (hourglass, output_conv) in enumerate(zip(self.hourglasses, self.output_convs)):
            out = output_conv(hourglass(x))
            outputs.append(out)
            if i < len(self.inter_residuals):
                merged = F.relu_(self.inter_input_convs[i](x) + self.inter_output_convs[i](out))
                x = self.inter_residuals[i](merged)
        return outputs


def _single(blocks, widths, in_channels, num_channels, initial_downsample=False, **kwargs):
    """One hourglass whose level widths are multiples of ``num_channels``, as the mask heads'.

    The reference's builders default to ``initial_downsample=True`` (CenterNet) and
    its mask head passes False; here False is the default, since the mask heads are
    what these builders serve. ``kwargs``: the other :class:`HourglassNetwork`
    options (``norm``, ``stagewise_downsample``, ``shortcut``).
    """
    return HourglassNetwork(
        in_channels,
        num_channels,
        [w * num_channels for w in widths],
        blocks,
        initial_downsample=initial_downsample,
        **kwargs,
    )


def hourglass10(in_channels, num_channels, **kwargs):
    """One level: the smallest hourglass of the paper's depth study."""
    return _single([1, 1], [2, 2], in_channels, num_channels, **kwargs)


def hourglass20(in_channels, num_channels, **kwargs):
    return _single([1, 2, 2], [2, 2, 3], in_channels, num_channels, **kwargs)


def hourglass32(in_channels, num_channels, **kwargs):
    return _single([2, 2, 2, 2], [2, 2, 3, 3], in_channels, num_channels, **kwargs)


def hourglass52(in_channels, num_channels, **kwargs):
    """Five levels: the paper's default deep mask head."""
    return _single([2, 2, 2, 2, 2, 4], [2, 2, 3, 3, 3, 4], in_channels, num_channels, **kwargs)


def hourglass100(in_channels, num_channels, **kwargs):
    """Hourglass-52's levels with twice the residual blocks."""
    return _single([4, 4, 4, 4, 4, 8], [2, 2, 3, 3, 3, 4], in_channels, num_channels, **kwargs)


def hourglass20_uniform_size(in_channels, num_channels, **kwargs):
    """Hourglass-20 without any downsampling (the reference's ablation of the hourglass shape)."""
    return _single(
        [1, 2, 2], [2, 2, 3], in_channels, num_channels, stagewise_downsample=False, **kwargs
    )


def hourglass20_no_shortcut(in_channels, num_channels, **kwargs):
    """Hourglass-20 without encoder-decoder shortcuts (the reference's ablation of the skips)."""
    return _single([1, 2, 2], [2, 2, 3], in_channels, num_channels, shortcut=False, **kwargs)


def hourglass104(in_channels=3, norm="BN"):
    """CenterNet's Hourglass-104 backbone (Zhou et al., arXiv 1904.07850): two stacked
    hourglasses after a 4x input downsampling."""
    return HourglassNetwork(
        in_channels,
        128,
        [256, 256, 384, 384, 384, 512],
        [2, 2, 2, 2, 2, 4],
        num_hourglasses=2,
        norm=norm,
    )
