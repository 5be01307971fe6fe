"""DeepMAC's mask head (Birodkar et al., arXiv 2104.00613) as a Detectron2 ROI mask head.

The paper's finding is that the mask head's architecture, not a new loss, decides
how well masks generalise to classes that had no mask in training: a deep
hourglass head beats Mask R-CNN's 4-conv head by a wide margin on unseen classes.
The head follows the TF Model Garden ``DeepMaskHead`` (widths, norms, init, so
the parameter counts equal the reference's); Detectron2's ``mask_rcnn_loss`` and
``mask_rcnn_inference`` do the rest, unchanged, through ``BaseMaskRCNNHead``.
"""
import torch
from torch import nn
from torch.nn import functional as F
from torchvision.ops import roi_align

from detectron2.config import configurable
from detectron2.layers import ShapeSpec
from detectron2.modeling.roi_heads.mask_head import (
    ROI_MASK_HEAD_REGISTRY,
    BaseMaskRCNNHead,
    mask_rcnn_loss,
)
from detectron2.structures import BitMasks, Instances, PolygonMasks

from . import hourglass
from .hourglass import norm_layer

__all__ = ["DeepMaskHead", "CONVNET_VARIANTS", "SoftBitMasks"]

# The head's own BatchNorms (default variant's convs, deconv), by default: Keras
# momentum 0.99 (PyTorch's momentum weighs the new batch: 0.01) and eps 1e-3, the
# reference's SpineNet rows; its R50/R101 rows use 0.997 / 1e-4 (set in the configs).
HEAD_BN_EPS = 1e-3
HEAD_BN_MOMENTUM = 0.01

# Hourglass builders by the reference's `convnet_variant` name. The reference
# offers hourglass20/52/100; 10 and 32 complete the paper's depth study.
_HOURGLASSES = {
    "hourglass10": hourglass.hourglass10,
    "hourglass20": hourglass.hourglass20,
    "hourglass32": hourglass.hourglass32,
    "hourglass52": hourglass.hourglass52,
    "hourglass100": hourglass.hourglass100,
}
CONVNET_VARIANTS = ("default",) + tuple(_HOURGLASSES)


class _LastHourglassOutput(nn.Module):
    """The reference's heads keep only the last hourglass's output."""

    def __init__(self, network):
        super().__init__()
        self.network = network

    def forward(self, x):
        return self.network(x)[-1]


def _default_convnet(in_channels, num_filters, num_convs, norm, bn_eps, bn_momentum):
    """Mask R-CNN's stack of 3x3 convs, with the reference's conv bias and head BN."""
    layers = []
    for _ in range(num_convs):
        layers.append(nn.Conv2d(in_channels, num_filters, 3, padding=1))
        norm_module = norm_layer(norm, num_filters, bn_eps, bn_momentum)
        if norm_module is not None:
            layers.append(norm_module)
        layers.append(nn.ReLU(inplace=True))
        in_channels = num_filters
    return nn.Sequential(*layers), in_channels


def build_convnet(
    variant, in_channels, num_filters, num_convs, norm,
    bn_eps=HEAD_BN_EPS, bn_momentum=HEAD_BN_MOMENTUM,
):
    """The network between the ROI features and the upsampling; returns it and its width.

    The hourglass variants ignore ``num_convs`` (their depth is in their name) and the
    head's BatchNorm settings (the hourglass has its own, see hourglass.py).
    """
    if variant == "default":
        return _default_convnet(in_channels, num_filters, num_convs, norm, bn_eps, bn_momentum)
    if variant not in _HOURGLASSES:
        raise ValueError(
            f"Unknown mask-head convnet variant {variant!r} "
            f"(MODEL.ROI_MASK_HEAD.CONVNET_VARIANT); valid: {', '.join(CONVNET_VARIANTS)}"
        )
    network = _HOURGLASSES[variant](in_channels, num_filters, norm=norm)
    return _LastHourglassOutput(network), network.out_channels


@ROI_MASK_HEAD_REGISTRY.register()
class DeepMaskHead(BaseMaskRCNNHead):
    """A convnet (Mask R-CNN's 4 convs or an hourglass), then a transposed conv that
    upsamples by ``upsample_factor`` + norm + ReLU, then 1x1 mask logits.

    Outputs one channel (class-agnostic, the paper's setting: a mask for classes
    never seen with masks) or one per class, which Detectron2's loss and inference
    pick by each ROI's class (the reference's gather).
    """

    @configurable
    def __init__(
        self,
        input_shape: ShapeSpec,
        *,
        num_classes,
        convnet_variant="default",
        num_filters=256,
        num_convs=4,
        upsample_factor=2,
        norm="BN",
        bn_momentum=HEAD_BN_MOMENTUM,
        bn_eps=HEAD_BN_EPS,
        soft_targets=False,
        **kwargs,
    ):
        """
        Args:
            input_shape: shape of the ROI features.
            num_classes: 1 for class-agnostic masks, else the number of classes.
            convnet_variant: "default" or "hourglass10/20/32/52/100".
            num_filters: width of the default convs / hourglass base width ``n``
                (the hourglass outputs ``2n`` channels); the deconv outputs ``num_filters``.
            num_convs: number of 3x3 convs of the default variant.
            upsample_factor: kernel and stride of the transposed conv.
            norm: Detectron2 norm name ("BN", "SyncBN", "FrozenBN", "GN", "") or callable,
                for the convnet and the deconv; the reference uses BatchNorm.
            bn_momentum, bn_eps: of the head's own BatchNorms (default convs, deconv),
                PyTorch's momentum (1 - Keras'); the hourglass keeps its own.
            soft_targets: train on the reference's soft mask targets (see
                :class:`SoftBitMasks`) instead of Detectron2's binarised ones.
            kwargs: ``loss_weight``, ``vis_period`` of :class:`BaseMaskRCNNHead`.
        """
        super().__init__(**kwargs)
        self.soft_targets = soft_targets
        self.convnet, width = build_convnet(
            convnet_variant, input_shape.channels, num_filters, num_convs, norm, bn_eps, bn_momentum
        )
        self.deconv = nn.ConvTranspose2d(width, num_filters, upsample_factor, upsample_factor)
        self.deconv_norm = norm_layer(norm, num_filters, bn_eps, bn_momentum) or nn.Identity()
        self.predictor = nn.Conv2d(num_filters, num_classes, 1)

        # The reference's VarianceScaling(2, fan_out, normal) with zero biases on the
        # head's own convs; the hourglass keeps its glorot-uniform kernels.
        head_convs = [self.deconv, self.predictor]
        if convnet_variant == "default":
            head_convs += [m for m in self.convnet if isinstance(m, nn.Conv2d)]
        for layer in head_convs:
            nn.init.kaiming_normal_(layer.weight, mode="fan_out", nonlinearity="relu")
            nn.init.zeros_(layer.bias)

    @classmethod
    def from_config(cls, cfg, input_shape):
        ret = super().from_config(cfg, input_shape)
        head = cfg.MODEL.ROI_MASK_HEAD
        ret.update(
            input_shape=input_shape,
            num_classes=1 if head.CLS_AGNOSTIC_MASK else cfg.MODEL.ROI_HEADS.NUM_CLASSES,
            convnet_variant=head.CONVNET_VARIANT,
            num_filters=head.CONV_DIM,
            num_convs=head.NUM_CONV,
            upsample_factor=head.UPSAMPLE_FACTOR,
            norm=head.NORM,
            bn_momentum=head.BN_MOMENTUM,
            bn_eps=head.BN_EPS,
            soft_targets=head.SOFT_TARGETS,
        )
        return ret

    # The deconv's norm, for fuse_for_inference (fusion.py) to fold into it.
    conv_norm_pairs = (("deconv", "deconv_norm"),)

    # DeepMaskROIHeads hands this head every candidate ROI in training, with a
    # ``trains_mask`` field saying which ones the loss takes (see its _forward_mask).
    takes_untrained_rois = True

    def forward(self, x, instances):
        """Detectron2's head forward; in training, every ROI goes through the network (its
        BatchNorms normalise over all of them, as the reference's over all its boxes) and
        :meth:`loss` takes the ones marked ``trains_mask``."""
        if not self.training:
            return super().forward(x, instances)
        return {"loss_mask": self.loss(self.layers(x), instances)}

    def loss(self, logits, instances):
        """Detectron2's mask loss (on the reference's soft targets if so configured), over
        the ROIs marked ``trains_mask`` if ``instances`` carry the field, else over all.
        DeepMaskROIHeads also calls it on logits it computed itself (with weak losses)."""
        if instances and instances[0].has("trains_mask"):
            logits = logits[torch.cat([i.trains_mask for i in instances])]
            instances = [i[i.trains_mask] for i in instances]
        if self.soft_targets:
            instances = [_with_soft_masks(i) for i in instances]
        return mask_rcnn_loss(logits, instances, self.vis_period) * self.loss_weight

    def layers(self, x):
        # A lone training ROI: BatchNorm cannot take batch statistics from the one
        # value per channel at an hourglass's 1x1 bottleneck (crop 32, 5 levels).
        # The reference never meets this: it pads every image to 100 boxes, and the
        # padding goes through the head. We pad with the ROI's mirror image (an exact
        # copy would do for the statistics, but its gradients cancel at that BatchNorm).
        if self.training and x.shape[0] == 1:
            return self.layers(torch.cat([x, x.flip(-1)]))[:1]
        x = self.convnet(x)
        return self.predictor(F.relu(self.deconv_norm(self.deconv(x))))


class SoftBitMasks(BitMasks):
    """Full-image masks whose ``crop_and_resize`` gives the reference's soft targets.

    The reference's input parser crops each full mask to its box at 112 x 112
    (bilinear), and the model resizes that crop to the mask size (bilinear); the
    values stay in [0, 1], never re-binarised. Detectron2's ``BitMasks`` thresholds
    its ROIAlign at 0.5. Detectron2's ``mask_rcnn_loss`` takes float targets as they
    are (it thresholds only for its accuracy metrics), so this class is all it needs.
    """

    CROP_SIZE = 112  # the reference parser's mask crop

    def crop_and_resize(self, boxes: torch.Tensor, mask_size: int) -> torch.Tensor:
        if len(boxes) == 0:
            return torch.empty(0, mask_size, mask_size, device=boxes.device)
        masks = self.tensor.to(device=boxes.device, dtype=torch.float32)[:, None]
        rois = torch.cat([torch.arange(len(boxes), device=boxes.device)[:, None].float(), boxes], 1)
        # One bilinear sample per output pixel (sampling_ratio 1), pixel centres at +0.5.
        crops = roi_align(masks, rois.to(masks.dtype), self.CROP_SIZE, 1.0, 1, aligned=True)
        return F.interpolate(crops, size=(mask_size, mask_size), mode="bilinear",
                             align_corners=False)[:, 0]


def _with_soft_masks(instances: Instances) -> Instances:
    """A shallow copy of ``instances`` whose ``gt_masks`` are :class:`SoftBitMasks`
    (polygons rasterised at the image size first)."""
    out = Instances(instances.image_size)
    for name, value in instances.get_fields().items():
        out.set(name, value)
    if out.has("gt_masks"):
        masks = out.gt_masks
        if isinstance(masks, PolygonMasks):
            masks = BitMasks.from_polygon_masks(masks, *instances.image_size)
        out.gt_masks = SoftBitMasks(masks.tensor)
    return out
