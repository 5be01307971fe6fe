"""SpineNet (Du et al., CVPR 2020, arXiv 1912.05027) as a Detectron2 backbone.

A scale-permuted backbone found by architecture search: after a ResNet-like stem,
16 blocks at levels 2..7 in a learnt order, each fed by two earlier blocks that are
resampled to its level and width. It is the backbone of DeepMAC's best rows
(SpineNet-143 + Hourglass-52), which Detectron2 lacks. This is a port of TF Model
Garden's ``official/vision/modeling/backbones/spinenet.py``: same blocks, widths,
padding, BatchNorm settings and stochastic depth, hence the same parameters and, with
converted weights, the same outputs (``make parity`` checks both against the reference).

Outputs ``p3``..``p7`` (strides 8..128, ``endpoints_num_filters`` channels each) for
the default levels; there is no FPN: SpineNet's own cross-scale connections are its
decoder (the reference's ``identity`` decoder).
"""
import math

import torch.nn.functional as F
from torch import nn

from detectron2.layers import ShapeSpec
from detectron2.modeling import BACKBONE_REGISTRY, Backbone

from .layers import BN_EPS, BN_MOMENTUM, ConvNorm, ResidualUnit, check_input_size, max_pool_same

__all__ = ["SpineNet", "build_spinenet_backbone", "SCALING_MAP", "BLOCK_SPECS"]

# The reference's scaling map: model id -> (endpoints_num_filters, filter_size_scale,
# resample_alpha, block_repeats).
SCALING_MAP = {
    "49S": (128, 0.65, 0.5, 1),
    "49": (256, 1.0, 0.5, 1),
    "96": (256, 1.0, 0.5, 2),
    "143": (256, 1.0, 1.0, 3),
    "143L": (256, 1.3, 1.0, 3),
    "190": (512, 1.3, 1.0, 4),
}

# Block widths by level, before filter_size_scale (bottlenecks output 4x this).
FILTER_SIZE_MAP = {2: 64, 3: 128, 4: 256, 5: 256, 6: 256, 7: 256}

# The searched architecture: (level, block kind, the two parent block ids, is output).
# Ids 0 and 1 are the stem's two level-2 bottleneck groups; block i here is id i + 2.
BLOCK_SPECS = [
    (2, "bottleneck", (0, 1), False),
    (4, "residual", (0, 1), False),
    (3, "bottleneck", (2, 3), False),
    (4, "bottleneck", (2, 4), False),
    (6, "residual", (3, 5), False),
    (4, "bottleneck", (3, 5), False),
    (5, "residual", (6, 7), False),
    (7, "residual", (6, 8), False),
    (5, "bottleneck", (8, 9), False),
    (5, "bottleneck", (8, 10), False),
    (4, "bottleneck", (5, 10), True),
    (3, "bottleneck", (4, 10), True),
    (5, "bottleneck", (7, 12), True),
    (7, "bottleneck", (5, 14), True),
    (6, "bottleneck", (12, 14), True),
    (2, "bottleneck", (2, 13), True),
]

def bottleneck_block(in_channels, filters, projection, drop_rate, norm):
    """1x1, 3x3, 1x1 (x4) convs; the reference's ``nn_blocks.BottleneckBlock``."""
    shortcut = ConvNorm(in_channels, 4 * filters, 1, relu=False, norm=norm) if projection else None
    branch = nn.Sequential(
        ConvNorm(in_channels, filters, 1, norm=norm),
        ConvNorm(filters, filters, 3, norm=norm),
        ConvNorm(filters, 4 * filters, 1, relu=False, norm=norm),
    )
    return ResidualUnit(shortcut, branch, drop_rate)


def residual_block(in_channels, filters, projection, drop_rate, norm):
    """Two 3x3 convs; the reference's ``nn_blocks.ResidualBlock``."""
    shortcut = ConvNorm(in_channels, filters, 1, relu=False, norm=norm) if projection else None
    branch = nn.Sequential(
        ConvNorm(in_channels, filters, 3, norm=norm),
        ConvNorm(filters, filters, 3, relu=False, norm=norm),
    )
    return ResidualUnit(shortcut, branch, drop_rate)


_BLOCK_FNS = {"bottleneck": (bottleneck_block, 4), "residual": (residual_block, 1)}


def block_group(in_channels, filters, kind, repeats, drop_rate, norm):
    """``repeats`` blocks at one level; only the first may project (width change)."""
    make, expansion = _BLOCK_FNS[kind]
    blocks = []
    for i in range(repeats):
        projection = i == 0 and in_channels != filters * expansion
        blocks.append(make(in_channels, filters, projection, drop_rate, norm))
        in_channels = filters * expansion
    return nn.Sequential(*blocks)


class Resample(nn.Module):
    """Brings a parent block to a target level and width (the reference's
    ``_resample_with_alpha``): 1x1 conv to alpha x the parent's block width (a
    bottleneck's width is a quarter of its output), then a stride-2 3x3 conv and max
    pools down, or nearest upsampling up, then a 1x1 conv (no ReLU) to ``out_channels``."""

    def __init__(self, in_channels, in_level, in_kind, out_channels, out_level, alpha, norm):
        super().__init__()
        mid = int(in_channels / _BLOCK_FNS[in_kind][1] * alpha)
        self.reduce = ConvNorm(in_channels, mid, 1, norm=norm)
        self.down = ConvNorm(mid, mid, 3, stride=2, norm=norm) if in_level < out_level else None
        self.num_pools = max(out_level - in_level - 1, 0)
        self.up = 2 ** max(in_level - out_level, 0)
        self.expand = ConvNorm(mid, out_channels, 1, relu=False, norm=norm)

    def forward(self, x):
        x = self.reduce(x)
        if self.down is not None:
            x = self.down(x)
            for _ in range(self.num_pools):
                x = max_pool_same(x)
        elif self.up > 1:
            x = F.interpolate(x, scale_factor=self.up, mode="nearest")
        return self.expand(x)


class ScalePermutedBlock(nn.Module):
    """One of the 16 searched blocks: resample both parents, add them (and, for an
    output block, every earlier block of the same shape that nothing consumed), ReLU,
    then a block group."""

    def __init__(self, resample0, resample1, group, parents, extra_parents):
        super().__init__()
        self.resample0 = resample0
        self.resample1 = resample1
        self.group = group
        self.parents = parents
        self.extra_parents = extra_parents

    def forward(self, features):
        x = self.resample0(features[self.parents[0]]) + self.resample1(features[self.parents[1]])
        for j in self.extra_parents:
            x += features[j]
        return self.group(F.relu_(x))


class SpineNet(Backbone):
    """SpineNet-49/96/143/190 (and 49S, 143L): stem, 16 scale-permuted blocks, one
    1x1 conv + norm + ReLU endpoint per output level.

    Args:
        model_id: key of :data:`SCALING_MAP` ("49", "96", "143", "190", "49S", "143L"; an
            int is read as its string).
        min_level, max_level: output levels (2..7); outputs are named ``p{level}``.
        stochastic_depth_rate: the reference's ``init_stochastic_depth_rate``; block
            i of 16 drops its residual branches with rate x (i + 1) / 16 (stem: never).
        norm: Detectron2 norm name; "SyncBN" as the reference, plain BatchNorm in a
            single process (see :func:`deepmac_d2.modeling.hourglass.norm_layer`).
        bn_momentum, bn_eps: of every BatchNorm (PyTorch's momentum: 1 - Keras').
        in_channels: input channels (3).
    """

    def __init__(
        self, model_id="49", min_level=3, max_level=7, stochastic_depth_rate=0.0,
        norm="SyncBN", bn_momentum=BN_MOMENTUM, bn_eps=BN_EPS, in_channels=3,
    ):
        super().__init__()
        model_id = str(model_id)
        if model_id not in SCALING_MAP:
            raise ValueError(
                f"MODEL.SPINENET.MODEL_ID={model_id!r} is not a SpineNet; "
                f"valid: {', '.join(SCALING_MAP)}"
            )
        output_levels = {level for level, _, _, is_output in BLOCK_SPECS if is_output}
        if not (min(output_levels) <= min_level <= max_level <= max(output_levels)):
            raise ValueError(
                f"MODEL.SPINENET.MIN_LEVEL={min_level}, MAX_LEVEL={max_level}: SpineNet "
                f"outputs levels {min(output_levels)}..{max(output_levels)}; "
                "pick MIN_LEVEL <= MAX_LEVEL within them (the reference: 3 and 7)"
            )
        endpoint_width, scale, alpha, repeats = SCALING_MAP[model_id]
        self.model_id = model_id

        def width(level, kind):
            return int(FILTER_SIZE_MAP[level] * scale) * _BLOCK_FNS[kind][1]

        self.stem = nn.Sequential(ConvNorm(in_channels, 64, 7, stride=2, norm=norm))
        stem_filters = int(FILTER_SIZE_MAP[2] * scale)
        self.stem_groups = nn.ModuleList()
        channels = 64
        for _ in range(2):
            self.stem_groups.append(
                block_group(channels, stem_filters, "bottleneck", repeats, 0.0, norm)
            )
            channels = width(2, "bottleneck")

        # The reference's graph, block by block: each block's level, width, parents and
        # whether anything consumes it (an output block also takes every earlier
        # unconsumed block of its shape).
        levels, widths, kinds = [2, 2], [channels, channels], ["bottleneck"] * 2
        consumed = [0, 0]
        graph = []
        for level, kind, parents, is_output in BLOCK_SPECS:
            out_width = width(level, kind)
            for p in parents:
                consumed[p] += 1
            extra = []
            if is_output:
                for j in range(len(levels)):
                    if consumed[j] == 0 and levels[j] == level and widths[j] == out_width:
                        extra.append(j)
                        consumed[j] += 1
            graph.append((level, kind, parents, extra, is_output))
            levels.append(level)
            widths.append(out_width)
            kinds.append(kind)
            consumed.append(0)
        endpoint_block = {level: i + 2 for i, (level, *_, out) in enumerate(graph) if out}
        self._out_levels = list(range(min_level, max_level + 1))

        # Blocks that feed no used endpoint are left out, as in the reference (a Keras
        # functional model keeps only the layers between its inputs and outputs).
        needed = {endpoint_block[level] for level in self._out_levels}
        for i in range(len(graph) + 1, 1, -1):
            if i in needed:
                _, _, parents, extra, _ = graph[i - 2]
                needed.update(parents, extra)

        self.blocks = nn.ModuleDict()
        num_blocks = len(graph)
        for i, (level, kind, parents, extra, _) in enumerate(graph):
            if i + 2 not in needed:
                continue
            filters = int(FILTER_SIZE_MAP[level] * scale)
            self.blocks[str(i + 2)] = ScalePermutedBlock(
                *(Resample(widths[p], levels[p], kinds[p], widths[i + 2], level, alpha, norm)
                  for p in parents),
                block_group(widths[i + 2], filters, kind, repeats,
                            stochastic_depth_rate * (i + 1) / num_blocks, norm),
                parents,
                extra,
            )
        self._endpoint_block = endpoint_block
        self.endpoints = nn.ModuleDict(
            (f"p{level}", ConvNorm(widths[endpoint_block[level]], endpoint_width, 1, norm=norm))
            for level in self._out_levels
        )
        self._out_features = [f"p{level}" for level in self._out_levels]
        self._out_feature_channels = {name: endpoint_width for name in self._out_features}
        self._out_feature_strides = {f"p{level}": 2 ** level for level in self._out_levels}
        self._max_block_level = max(levels)

        # Keras' default VarianceScaling: truncated normal, fan-in, scale 1; BN 1 / 0.
        for module in self.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.momentum, module.eps = bn_momentum, bn_eps
            if isinstance(module, nn.Conv2d):
                fan_in = module.weight[0].numel()
                std = math.sqrt(1.0 / fan_in) / 0.87962566103423978
                nn.init.trunc_normal_(module.weight, std=std, a=-2 * std, b=2 * std)

    @property
    def size_divisibility(self):
        # Every block's resampling assumes exact halvings up to level 7.
        return 2 ** self._max_block_level

    def forward(self, x):
        d = self.size_divisibility
        check_input_size(x, d, "SpineNet (MODEL.BACKBONE.NAME 'build_spinenet_backbone')",
                         "its level-7 blocks halve the input 7 times: e.g. 640, 1024 or 1280")
        x = max_pool_same(self.stem(x))
        features = []
        for group in self.stem_groups:
            x = group(x)
            features.append(x)
        for i in range(2, 2 + len(BLOCK_SPECS)):
            block = self.blocks[str(i)] if str(i) in self.blocks else None
            features.append(block(features) if block is not None else None)
        return {
            f"p{level}": self.endpoints[f"p{level}"](features[self._endpoint_block[level]])
            for level in self._out_levels
        }

    def output_shape(self):
        return {
            name: ShapeSpec(
                channels=self._out_feature_channels[name], stride=self._out_feature_strides[name]
            )
            for name in self._out_features
        }


@BACKBONE_REGISTRY.register()
def build_spinenet_backbone(cfg, input_shape):
    """SpineNet from ``cfg.MODEL.SPINENET`` (see deepmac_d2/config.py)."""
    spine = cfg.MODEL.SPINENET
    return SpineNet(
        model_id=str(spine.MODEL_ID),
        min_level=spine.MIN_LEVEL,
        max_level=spine.MAX_LEVEL,
        stochastic_depth_rate=spine.STOCHASTIC_DEPTH_RATE,
        norm=spine.NORM,
        bn_momentum=spine.BN_MOMENTUM,
        bn_eps=spine.BN_EPS,
        in_channels=input_shape.channels,
    )
