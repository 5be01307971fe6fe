"""Mask heads (Hourglass network, DeepMaskHead), the partially supervised ROIHeads, SpineNet."""
from .hourglass import HourglassNetwork
from .mask_head import CONVNET_VARIANTS, DeepMaskHead
from .roi_heads import DeepMaskROIHeads
from .spinenet import SpineNet, build_spinenet_backbone

__all__ = [
    "CONVNET_VARIANTS",
    "DeepMaskHead",
    "DeepMaskROIHeads",
    "HourglassNetwork",
    "SpineNet",
    "build_spinenet_backbone",
]
