"""The core of the plugin: DeepMAC's mask heads (the Hourglass network, DeepMaskHead), the
partially supervised ROIHeads, the weak mask losses for box-only instances, and the
BatchNorm folding for inference.

Imports Detectron2, PyTorch, kornia and ``deepmac_d2.data`` (class splits) only; the TF reference
ports in ``deepmac_d2.tf_port`` build on this package, never the other way round.
"""
from .fusion import fuse_for_inference
from .hourglass import HourglassNetwork
from .mask_head import CONVNET_VARIANTS, DeepMaskHead
from .roi_heads import DeepMaskROIHeads

__all__ = ["CONVNET_VARIANTS", "DeepMaskHead", "DeepMaskROIHeads", "HourglassNetwork", "fuse_for_inference"]
