"""TF Model Garden's RPN head and box head as Detectron2 heads, for the reference's checkpoints.

The Model Garden's ``RPNHead`` (``official/vision/modeling/heads/dense_prediction_heads.py``)
differs from Detectron2's ``StandardRPNHead`` in three ways a converted checkpoint
depends on: its shared 3x3 conv is followed by a BatchNorm of its own per level (then
ReLU); its anchors' aspect ratios are width / height where Detectron2's are height /
width, so the same ratio list orders the anchors of a location the other way round; and
its box deltas are (dy, dx, dh, dw) where Detectron2's are (dx, dy, dw, dh). This head
builds the reference's layers (so its variables load as they are) and hands Detectron2
its outputs in Detectron2's order. The anchors themselves match with Detectron2's
``MODEL.ANCHOR_GENERATOR.OFFSET 0.5`` (the reference centres them in their cells) and
the same sizes (the reference's ``anchor_size`` x stride x 2^(i / num_scales)).

Its ``DetectionHead`` (``official/vision/modeling/heads/instance_heads.py``): 3x3 convs
with biases, each followed by BatchNorm and ReLU, flattened in (height, width, channel)
order, FCs each followed by BatchNorm and ReLU, then a classifier whose class 0 is the
background (Detectron2's is the last) and class-specific (dy, dx, dh, dw) deltas for
every class, the background's too (Detectron2 has none for it). ``TFConvFCHead`` and
``TFFastRCNNOutputLayers`` build those layers as they are and reorder the outputs.
Both sides weight the box deltas (10, 10, 5, 5) in their own coordinate order.
"""
import math
from typing import List

import torch
import torch.nn.functional as F
from torch import nn

from detectron2.config import configurable
from detectron2.layers import ShapeSpec
from detectron2.modeling.anchor_generator import build_anchor_generator
from detectron2.modeling.proposal_generator.rpn import RPN_HEAD_REGISTRY
from detectron2.modeling.roi_heads.box_head import ROI_BOX_HEAD_REGISTRY
from detectron2.modeling.roi_heads.fast_rcnn import FastRCNNOutputLayers

from ..modeling.hourglass import norm_layer

__all__ = ["TFRPNHead", "TFConvFCHead", "TFFastRCNNOutputLayers", "reference_anchor_order"]

# (dy, dx, dh, dw) -> (dx, dy, dw, dh), either way.
SWAP_XY = [1, 0, 3, 2]


def reference_anchor_order(aspect_ratios, num_sizes):
    """For each of Detectron2's anchors at a location (sizes outer, ratios inner), the
    index of the same anchor among the reference's (scales outer, ratios inner): a
    Detectron2 ratio r (height / width) is the reference's 1 / r (width / height), from
    the same list (the Model Garden's default 0.5, 1, 2 is closed under 1 / r)."""
    order = []
    for size in range(num_sizes):
        for r in aspect_ratios:
            twin = [j for j, q in enumerate(aspect_ratios) if abs(q * r - 1) < 1e-6]
            if not twin:
                raise ValueError(
                    f"MODEL.ANCHOR_GENERATOR.ASPECT_RATIOS {list(aspect_ratios)}: the TF RPN head "
                    f"needs 1 / r in the list for each r (here {r}), e.g. [0.5, 1.0, 2.0] as the "
                    "reference: its ratios are width / height, Detectron2's height / width"
                )
            order.append(size * len(aspect_ratios) + twin[0])
    return order


@RPN_HEAD_REGISTRY.register()
class TFRPNHead(nn.Module):
    """The reference's RPN head: ``num_convs`` 3x3 convs (with bias) shared by all levels,
    each followed by a BatchNorm per level and ReLU, then 1x1 objectness and box convs.

    Creates and calls its layers in the reference's variable order: the convs and the
    first level's norms, the two predictors, then the next levels' norms.

    Args:
        in_channels, conv_dims: input and conv widths (the reference: 256 each).
        num_levels: feature levels (one set of norms each).
        anchor_order: :func:`reference_anchor_order` of the anchor generator.
        norm, bn_momentum, bn_eps: the BatchNorms (PyTorch momentum: 1 - Keras').
    """

    @configurable
    def __init__(self, *, in_channels: int, num_levels: int, anchor_order: List[int], num_convs: int = 1,
                 conv_dims: int = 256, norm: str = "SyncBN", bn_momentum: float = 0.003, bn_eps: float = 1e-4):
        super().__init__()
        self.anchor_order = list(anchor_order)
        num_anchors = len(self.anchor_order)
        self.convs = nn.ModuleList(
            nn.Conv2d(in_channels if i == 0 else conv_dims, conv_dims, 3, padding=1) for i in range(num_convs))
        self.norms = nn.ModuleList(
            nn.ModuleList(norm_layer(norm, conv_dims, bn_eps, bn_momentum, biased_variance=True) or nn.Identity()
                          for _ in range(num_convs))
            for _ in range(num_levels))
        self.objectness_logits = nn.Conv2d(conv_dims, num_anchors, 1)
        self.anchor_deltas = nn.Conv2d(conv_dims, 4 * num_anchors, 1)
        # The reference's initialisers: N(0, 0.01) convs, N(0, 1e-5) predictors, zero biases.
        for conv, std in [*((c, 0.01) for c in self.convs), (self.objectness_logits, 1e-5),
                          (self.anchor_deltas, 1e-5)]:
            nn.init.normal_(conv.weight, std=std)
            nn.init.zeros_(conv.bias)

    @classmethod
    def from_config(cls, cfg, input_shape):
        channels = {s.channels for s in input_shape}
        if len(channels) != 1:
            raise ValueError(f"the TF RPN head shares its convs across levels: every level needs the "
                             f"same channels, got {sorted(channels)}")
        anchors = build_anchor_generator(cfg, input_shape)
        sizes = {len(s) for s in cfg.MODEL.ANCHOR_GENERATOR.SIZES}
        ratios = cfg.MODEL.ANCHOR_GENERATOR.ASPECT_RATIOS
        if len(sizes) != 1 or len(ratios) != 1 or len(set(anchors.num_anchors)) != 1:
            raise ValueError("MODEL.ANCHOR_GENERATOR: the TF RPN head needs the same anchors at every "
                             "level (one list of ratios, as many sizes per level), as the reference")
        in_channels, conv_dims, rpn = channels.pop(), cfg.MODEL.RPN.CONV_DIMS, cfg.MODEL.RPN
        if len(set(conv_dims)) != 1:
            raise ValueError(f"MODEL.RPN.CONV_DIMS {list(conv_dims)}: the TF RPN head's convs share one width")
        return {
            "in_channels": in_channels,
            "num_levels": len(input_shape),
            "anchor_order": reference_anchor_order(ratios[0], sizes.pop()),
            "num_convs": len(conv_dims),
            "conv_dims": in_channels if conv_dims[0] == -1 else conv_dims[0],
            "norm": rpn.NORM,
            "bn_momentum": rpn.BN_MOMENTUM,
            "bn_eps": rpn.BN_EPS,
        }

    def forward(self, features):
        """Detectron2's interface: per level, objectness (N, A, H, W) and deltas (N, 4A, H, W)
        in Detectron2's anchor order and (dx, dy, dw, dh)."""
        logits, deltas = [], []
        for x, norms in zip(features, self.norms):
            for conv, norm in zip(self.convs, norms):
                x = F.relu(norm(conv(x)))
            logits.append(self.objectness_logits(x)[:, self.anchor_order])
            d = self.anchor_deltas(x)
            n, _, h, w = d.shape
            d = d.view(n, -1, 4, h, w)[:, self.anchor_order][:, :, SWAP_XY]
            deltas.append(d.reshape(n, -1, h, w))
        return logits, deltas


def _variance_scaling_fan_out(weight, scale, uniform):
    """Keras' VarianceScaling(scale, mode='fan_out'), normal (untruncated) or uniform."""
    fan_out = weight.shape[0] * weight[0, 0].numel() if weight.dim() == 4 else weight.shape[0]
    if uniform:
        limit = math.sqrt(3.0 * scale / fan_out)
        nn.init.uniform_(weight, -limit, limit)
    else:
        nn.init.normal_(weight, std=math.sqrt(scale / fan_out))


@ROI_BOX_HEAD_REGISTRY.register()
class TFConvFCHead(nn.Module):
    """The reference's box head without its predictors: ``num_conv`` x (3x3 conv with
    bias, norm, ReLU), flattened as (height, width, channel), ``num_fc`` x (FC, norm,
    ReLU). Use with ``TFFastRCNNOutputLayers`` (DeepMaskROIHeads pairs them).

    Args:
        input_shape: the pooled ROI features.
        conv_dim, num_conv, fc_dim, num_fc: the reference's num_filters, num_convs,
            fc_dims, num_fcs (256, 4, 1024, 1).
        norm, bn_momentum, bn_eps: every norm (PyTorch momentum: 1 - Keras').
    """

    @configurable
    def __init__(self, input_shape: ShapeSpec, *, conv_dim: int = 256, num_conv: int = 4, fc_dim: int = 1024,
                 num_fc: int = 1, norm: str = "SyncBN", bn_momentum: float = 0.003, bn_eps: float = 1e-4):
        super().__init__()
        channels = input_shape.channels
        self.convs = nn.ModuleList()
        for _ in range(num_conv):
            conv = nn.Conv2d(channels, conv_dim, 3, padding=1)
            _variance_scaling_fan_out(conv.weight, 2.0, uniform=False)
            nn.init.zeros_(conv.bias)
            self.convs.append(nn.Sequential(conv, norm_layer(norm, conv_dim, bn_eps, bn_momentum, True) or nn.Identity()))
            channels = conv_dim
        size = channels * (input_shape.height or 1) * (input_shape.width or 1)
        self.fcs = nn.ModuleList()
        for _ in range(num_fc):
            fc = nn.Linear(size, fc_dim)
            _variance_scaling_fan_out(fc.weight, 1 / 3.0, uniform=True)
            nn.init.zeros_(fc.bias)
            # A 2d norm on (N, C, 1, 1): the reference's BatchNorm over its ROIs.
            self.fcs.append(nn.Sequential(fc, norm_layer(norm, fc_dim, bn_eps, bn_momentum, True) or nn.Identity()))
            size = fc_dim
        self._output_size = size

    @classmethod
    def from_config(cls, cfg, input_shape):
        head = cfg.MODEL.ROI_BOX_HEAD
        return {"input_shape": input_shape, "conv_dim": head.CONV_DIM, "num_conv": head.NUM_CONV,
                "fc_dim": head.FC_DIM, "num_fc": head.NUM_FC, "norm": head.NORM,
                "bn_momentum": head.BN_MOMENTUM, "bn_eps": head.BN_EPS}

    def forward(self, x):
        for conv, norm in self.convs:
            x = F.relu(norm(conv(x)))
        x = x.permute(0, 2, 3, 1).flatten(1)  # the reference's NHWC flattening
        for fc, norm in self.fcs:
            x = F.relu(norm(fc(x)[:, :, None, None]).flatten(1))
        return x

    @property
    def output_shape(self):
        return ShapeSpec(channels=self._output_size)

    @property
    def box_predictor_class(self):
        """The reference's predictor layout for this head's features, which
        DeepMaskROIHeads builds in place of Detectron2's."""
        return TFFastRCNNOutputLayers


class TFFastRCNNOutputLayers(FastRCNNOutputLayers):
    """Detectron2's box predictor (losses, inference) on the reference's two Dense layers:
    ``cls_score`` has the background first and ``bbox_pred`` (dy, dx, dh, dw) deltas for
    all K + 1 classes; :meth:`forward` returns Detectron2's layout (background last,
    (dx, dy, dw, dh) for the K classes)."""

    @configurable
    def __init__(self, input_shape, **kwargs):
        super().__init__(input_shape, **kwargs)
        if self.bbox_pred.out_features != 4 * self.num_classes:
            raise ValueError("MODEL.ROI_BOX_HEAD.CLS_AGNOSTIC_BBOX_REG True: the reference's box head "
                             "regresses per class; set it to False")
        size = self.cls_score.in_features
        self.cls_score = nn.Linear(size, self.num_classes + 1)
        self.bbox_pred = nn.Linear(size, 4 * (self.num_classes + 1))
        nn.init.normal_(self.cls_score.weight, std=0.01)
        nn.init.normal_(self.bbox_pred.weight, std=0.001)
        for layer in (self.cls_score, self.bbox_pred):
            nn.init.zeros_(layer.bias)
        self.register_buffer("_class_order", torch.tensor([*range(1, self.num_classes + 1), 0]), persistent=False)

    def forward(self, x):
        x = x.flatten(1)
        scores = self.cls_score(x)[:, self._class_order]
        deltas = self.bbox_pred(x).view(len(x), self.num_classes + 1, 4)[:, 1:, SWAP_XY]
        return scores, deltas.reshape(len(x), -1)
