"""Mask heads (Hourglass network, DeepMaskHead) and the partially supervised ROIHeads."""
from .hourglass import HourglassNetwork
from .mask_head import CONVNET_VARIANTS, DeepMaskHead
from .roi_heads import DeepMaskROIHeads

__all__ = ["CONVNET_VARIANTS", "DeepMaskHead", "DeepMaskROIHeads", "HourglassNetwork"]
