"""Mask heads (Hourglass network, DeepMaskHead), the partially supervised ROIHeads, SpineNet,
the reference's ResNet-FPN, and the BatchNorm folding for inference."""
from .fusion import fuse_for_inference
from .hourglass import HourglassNetwork
from .mask_head import CONVNET_VARIANTS, DeepMaskHead
from .roi_heads import DeepMaskROIHeads
from .spinenet import SpineNet, build_spinenet_backbone
from .tf_heads import TFConvFCHead, TFFastRCNNOutputLayers, TFRPNHead
from .tf_resnet_fpn import TFResNetFPN, build_tf_resnet_fpn_backbone

__all__ = [
    "CONVNET_VARIANTS",
    "DeepMaskHead",
    "DeepMaskROIHeads",
    "HourglassNetwork",
    "SpineNet",
    "TFConvFCHead",
    "TFFastRCNNOutputLayers",
    "TFRPNHead",
    "TFResNetFPN",
    "build_spinenet_backbone",
    "build_tf_resnet_fpn_backbone",
    "fuse_for_inference",
]
