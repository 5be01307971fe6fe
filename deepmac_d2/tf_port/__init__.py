"""Ports of the TF Model Garden reference's networks, and the loading of its weights.

SpineNet, the ResNet-FPN of its R50/R101 rows and its RPN and box heads, written to
keep the reference's parameters, padding and call order, so that its checkpoints load
(``convert``, ``checkpoint``) and ``make parity`` compares them layer for layer. They
are registered in Detectron2's registries on ``import deepmac_d2``, for configs that
name them. May import ``deepmac_d2.modeling`` (the norm helpers); the core never
imports this package.
"""
from . import heads, resnet_fpn, spinenet  # noqa: F401  (registration)
from .convert import ConversionError, layers_in_call_order, load_reference_weights
from .heads import TFConvFCHead, TFFastRCNNOutputLayers, TFRPNHead
from .resnet_fpn import TFResNetFPN, build_tf_resnet_fpn_backbone
from .spinenet import SpineNet, build_spinenet_backbone

__all__ = [
    "ConversionError", "SpineNet", "TFConvFCHead", "TFFastRCNNOutputLayers", "TFRPNHead", "TFResNetFPN",
    "build_spinenet_backbone", "build_tf_resnet_fpn_backbone", "layers_in_call_order", "load_reference_weights",
]
