"""TF Model Garden's ResNet + FPN (the deepmac_maskrcnn R50/R101 rows) as a Detectron2 backbone.

Detectron2's ResNet-FPN cannot load the reference's weights and compute what it
computes: the Model Garden's ResNet (``official/vision/modeling/backbones/resnet.py``)
pads its strided convs and max pool as TF's 'SAME' (the extra pixel after, not
before), puts the stride of a bottleneck on its 3x3 conv, and its FPN
(``official/vision/modeling/decoders/fpn.py``) ends every level with BatchNorm and
makes the levels above the backbone's (P6) with a strided 3x3 conv of P5 before its
norm, where Detectron2 max-pools P5. This port builds the same layers, in the order
the reference creates its variables, so ``deepmac_d2.tf_port`` converts its
checkpoints; ``make parity`` (case ``resnet50_fpn``) compares the two.

Outputs ``p{min_level}``..``p{max_level}`` (the reference: p2..p6, strides 4..64),
``num_filters`` channels each.
"""
import math

import torch
import torch.nn.functional as F
from torch import nn

from detectron2.layers import FrozenBatchNorm2d
from detectron2.modeling import BACKBONE_REGISTRY, Backbone

from ..modeling.hourglass import norm_layer
from .layers import Conv2dSame, ConvNorm, ResidualUnit, check_input_size, max_pool_same

__all__ = ["TFResNet", "TFFPN", "TFResNetFPN", "build_tf_resnet_fpn_backbone", "RESNET_BLOCKS"]

# The reference's RESNET_SPECS for its bottleneck depths: blocks per group (widths
# 64, 128, 256, 512, each block's output 4x that).
RESNET_BLOCKS = {
    50: (3, 4, 6, 3),
    101: (3, 4, 23, 3),
    152: (3, 8, 36, 3),
    200: (3, 24, 36, 3),
    270: (4, 29, 53, 4),
    350: (4, 36, 72, 4),
    420: (4, 44, 87, 4),
}
# Its norm_activation in the MaskRCNN experiments (R50/R101 rows): Keras momentum
# 0.997 (PyTorch 0.003), eps 1e-4, synchronised BatchNorm.
BN_MOMENTUM = 0.003
BN_EPS = 1e-4


def bottleneck(in_channels, filters, stride, projection, norm):
    """The reference's ``nn_blocks.BottleneckBlock``: 1x1, 3x3 (carries the stride,
    'SAME'), 1x1 to 4x, plus a 1x1 projection shortcut with the same stride (no
    padding: it takes the even positions, as Keras' 'valid')."""
    shortcut = ConvNorm(in_channels, 4 * filters, 1, stride, relu=False, norm=norm) if projection else None
    branch = nn.Sequential(
        ConvNorm(in_channels, filters, 1, norm=norm),
        ConvNorm(filters, filters, 3, stride, norm=norm),
        ConvNorm(filters, 4 * filters, 1, relu=False, norm=norm),
    )
    return ResidualUnit(shortcut, branch, 0.0)


def _set_norms_and_init(module, bn_momentum, bn_eps):
    """The reference's BatchNorm settings, and Keras' default VarianceScaling for every
    conv (truncated normal, fan-in, scale 1; biases 0)."""
    for m in module.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.momentum, m.eps = bn_momentum, bn_eps
        elif isinstance(m, FrozenBatchNorm2d):
            m.eps = bn_eps
        elif isinstance(m, nn.Conv2d):
            std = math.sqrt(1.0 / m.weight[0].numel()) / 0.87962566103423978
            nn.init.trunc_normal_(m.weight, std=std, a=-2 * std, b=2 * std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


class TFResNet(Backbone):
    """The reference's ResNet (``model_id`` = depth, stem 'v0', no SE, no ResNet-D
    shortcut, depth multiplier 1: what its deepmac_maskrcnn experiments use): 7x7
    stride-2 conv, BN, ReLU, 3x3 stride-2 max pool, four groups of bottlenecks whose
    first block projects (and, after the first group, halves). Outputs res2..res5.

    Args:
        depth: a key of :data:`RESNET_BLOCKS`.
        norm: Detectron2 norm name ("SyncBN" as the reference; plain BN in one process).
        freeze_at: Detectron2's MODEL.BACKBONE.FREEZE_AT: 1 freezes the stem, k > 1 also
            res2..res{k} (FrozenBatchNorm, no gradient); 0 trains all, as the reference.
    """

    def __init__(self, depth=50, norm="SyncBN", bn_momentum=BN_MOMENTUM, bn_eps=BN_EPS,
                 freeze_at=0, in_channels=3):
        super().__init__()
        if depth not in RESNET_BLOCKS:
            raise ValueError(
                f"MODEL.RESNETS.DEPTH={depth!r}: the TF ResNet-FPN backbone builds the reference's "
                f"bottleneck ResNets, depth {', '.join(map(str, RESNET_BLOCKS))} (its R50/R101 rows: 50, 101)"
            )
        self.stem = ConvNorm(in_channels, 64, 7, stride=2, norm=norm)
        self.groups = nn.ModuleList()
        channels = 64
        for i, (filters, repeats) in enumerate(zip((64, 128, 256, 512), RESNET_BLOCKS[depth])):
            blocks = [bottleneck(channels, filters, 1 if i == 0 else 2, True, norm)]
            blocks += [bottleneck(4 * filters, filters, 1, False, norm) for _ in range(repeats - 1)]
            self.groups.append(nn.Sequential(*blocks))
            channels = 4 * filters
        self._out_features = [f"res{level}" for level in range(2, 6)]
        self._out_feature_channels = {f"res{i + 2}": 256 * 2 ** i for i in range(4)}
        self._out_feature_strides = {f"res{level}": 2 ** level for level in range(2, 6)}
        _set_norms_and_init(self, bn_momentum, bn_eps)
        for module in [self.stem, *self.groups][:freeze_at]:
            for p in module.parameters():
                p.requires_grad_(False)
            FrozenBatchNorm2d.convert_frozen_batchnorm(module)

    def forward(self, x):
        x = max_pool_same(self.stem(x))
        outputs = {}
        for name, group in zip(self._out_features, self.groups):
            x = outputs[name] = group(x)
        return outputs


class _Conv2dSameBias(Conv2dSame):
    """:class:`Conv2dSame` with a bias, as the FPN's Keras convs have."""

    def __init__(self, in_channels, out_channels, kernel_size, stride):
        super().__init__(in_channels, out_channels, kernel_size, stride)
        self.bias = nn.Parameter(torch.zeros(out_channels))


class TFFPN(nn.Module):
    """The reference's FPN (fusion 'sum', plain convs with biases): 1x1 laterals at
    levels min..top (top = the highest input level within ``max_level``), nearest x2
    top-down sums, a 3x3 conv per level, stride-2 3x3 convs for the levels above top
    (the first on the top level's output, the next ones after a ReLU), then a
    BatchNorm on every level. Creates (and calls) its layers in the reference's order:
    laterals, post-hoc convs, coarser convs, norms.

    Args:
        in_channels: ``{level: channels}`` of the backbone's outputs.
        norm: the norm after each level ("" for none; the reference always has one).
    """

    def __init__(self, in_channels, min_level=2, max_level=6, num_filters=256, norm="SyncBN",
                 bn_momentum=BN_MOMENTUM, bn_eps=BN_EPS):
        super().__init__()
        self.min_level, self.max_level = min_level, max_level
        self.top = min(max(in_channels), max_level)
        inner = range(min_level, self.top + 1)
        self.lateral = nn.ModuleDict({str(k): nn.Conv2d(in_channels[k], num_filters, 1) for k in inner})
        self.post_hoc = nn.ModuleDict({str(k): nn.Conv2d(num_filters, num_filters, 3, padding=1) for k in inner})
        self.coarser = nn.ModuleDict({str(k): _Conv2dSameBias(num_filters, num_filters, 3, 2)
                                      for k in range(self.top + 1, max_level + 1)})
        self.norms = nn.ModuleDict({
            str(k): norm_layer(norm, num_filters, bn_eps, bn_momentum, biased_variance=True) or nn.Identity()
            for k in range(min_level, max_level + 1)
        })
        _set_norms_and_init(self, bn_momentum, bn_eps)

    def forward(self, features):
        """``{level: tensor}`` in, ``{level: tensor}`` out (levels min..max)."""
        inner = range(self.min_level, self.top + 1)
        lateral = {k: self.lateral[str(k)](features[k]) for k in inner}
        feats = {self.top: lateral[self.top]}
        for k in reversed(inner[:-1]):
            feats[k] = F.interpolate(feats[k + 1], scale_factor=2, mode="nearest") + lateral[k]
        for k in inner:
            feats[k] = self.post_hoc[str(k)](feats[k])
        for k in range(self.top + 1, self.max_level + 1):
            x = feats[k - 1] if k == self.top + 1 else F.relu(feats[k - 1])
            feats[k] = self.coarser[str(k)](x)
        return {k: self.norms[str(k)](feats[k]) for k in range(self.min_level, self.max_level + 1)}


class TFResNetFPN(Backbone):
    """:class:`TFResNet` + :class:`TFFPN`, outputs ``p{min_level}``..``p{max_level}``.

    Args: ``depth``, ``norm``, ``freeze_at`` as :class:`TFResNet`'s; ``min_level``,
    ``max_level``, ``num_filters``, ``fpn_norm`` as :class:`TFFPN`'s (levels, width,
    norm); ``bn_momentum`` (PyTorch's: 1 - Keras') and ``bn_eps`` for both.

    ``bottom_up`` and ``fpn`` are the reference's ``backbone`` and ``decoder``, the two
    components its checkpoints store them under. Inputs must be multiples of
    2^top (32 with the ResNet's levels 2..5), where the top-down sums nest exactly;
    :attr:`size_divisibility` is 2^max_level, the reference's padding (its parser pads
    images to multiples of 2^max_level).
    """

    def __init__(self, depth=50, min_level=2, max_level=6, num_filters=256, norm="SyncBN",
                 fpn_norm="SyncBN", bn_momentum=BN_MOMENTUM, bn_eps=BN_EPS, freeze_at=0, in_channels=3):
        super().__init__()
        if not 2 <= min_level <= 5 or max_level < min_level:
            raise ValueError(
                f"MODEL.FPN.MIN_LEVEL={min_level}, MAX_LEVEL={max_level}: the ResNet outputs levels "
                "2..5; pick 2 <= MIN_LEVEL <= 5 and MAX_LEVEL >= MIN_LEVEL (the reference: 2 and 6)"
            )
        self.bottom_up = TFResNet(depth, norm, bn_momentum, bn_eps, freeze_at, in_channels)
        shapes = self.bottom_up.output_shape()
        self.fpn = TFFPN({int(n[3:]): s.channels for n, s in shapes.items()}, min_level, max_level,
                         num_filters, fpn_norm, bn_momentum, bn_eps)
        levels = range(min_level, max_level + 1)
        self._out_features = [f"p{k}" for k in levels]
        self._out_feature_channels = {f"p{k}": num_filters for k in levels}
        self._out_feature_strides = {f"p{k}": 2 ** k for k in levels}

    @property
    def size_divisibility(self):
        return 2 ** self.fpn.max_level

    def forward(self, x):
        check_input_size(x, 2 ** self.fpn.top,
                         "the TF ResNet-FPN backbone (MODEL.BACKBONE.NAME 'build_tf_resnet_fpn_backbone')",
                         f"its top-down path doubles level {self.fpn.top} back to level {self.fpn.min_level}")
        features = {int(n[3:]): v for n, v in self.bottom_up(x).items()}
        return {f"p{k}": v for k, v in self.fpn(features).items()}


# Detectron2 ResNet keys that would change the network, with the value the reference's
# ResNet has; STRIDE_IN_1X1 is ignored (the reference strides the 3x3 conv, whatever
# Detectron2's default says), as are OUT_FEATURES and FPN.IN_FEATURES (levels: MIN/MAX_LEVEL).
_FIXED_RESNET_KEYS = {"NUM_GROUPS": 1, "WIDTH_PER_GROUP": 64, "STEM_OUT_CHANNELS": 64,
                      "RES2_OUT_CHANNELS": 256, "RES5_DILATION": 1}


@BACKBONE_REGISTRY.register()
def build_tf_resnet_fpn_backbone(cfg, input_shape):
    """The reference's ResNet-FPN from MODEL.RESNETS (DEPTH, NORM, BN_MOMENTUM, BN_EPS),
    MODEL.FPN (OUT_CHANNELS, NORM, FUSE_TYPE "sum", MIN_LEVEL, MAX_LEVEL) and
    MODEL.BACKBONE.FREEZE_AT (see deepmac_d2/config.py)."""
    resnets, fpn = cfg.MODEL.RESNETS, cfg.MODEL.FPN
    if fpn.FUSE_TYPE != "sum":
        raise ValueError(f"MODEL.FPN.FUSE_TYPE={fpn.FUSE_TYPE!r}: the TF ResNet-FPN backbone sums, "
                         "as the reference's fusion_type 'sum'; set it to 'sum'")
    for key, value in _FIXED_RESNET_KEYS.items():
        if resnets[key] != value:
            raise ValueError(f"MODEL.RESNETS.{key}={resnets[key]!r}: the TF ResNet-FPN backbone builds "
                             f"the reference's plain ResNet only; set it to {value!r}")
    if any(resnets.DEFORM_ON_PER_STAGE):
        raise ValueError("MODEL.RESNETS.DEFORM_ON_PER_STAGE: the TF ResNet-FPN backbone has no "
                         "deformable convs; set it to [False, False, False, False]")
    return TFResNetFPN(
        depth=resnets.DEPTH, min_level=fpn.MIN_LEVEL, max_level=fpn.MAX_LEVEL,
        num_filters=fpn.OUT_CHANNELS, norm=resnets.NORM, fpn_norm=fpn.NORM,
        bn_momentum=resnets.BN_MOMENTUM, bn_eps=resnets.BN_EPS,
        freeze_at=cfg.MODEL.BACKBONE.FREEZE_AT, in_channels=input_shape.channels,
    )
