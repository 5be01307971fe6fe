"""A pure-PyTorch ``detectron2._C`` for Detectron2 installs without compiled ops.

Loaded as the package ``detectron2._C`` itself (see ``../c_fallback.py``), while
Detectron2 is still importing: only relative imports and torch / torchvision /
numpy here. The names are those Detectron2 v0.6 calls on ``_C``, with its
argument order; ``nms_rotated`` is also registered as
``torch.ops.detectron2.nms_rotated``, which is how ``layers/nms.py`` calls it.
Results match the compiled ops; speed does not (deformable convolution runs
torchvision's kernels, the rest is vectorised PyTorch / numpy).
"""
import torch

from .coco_eval import (
    COCOevalAccumulate,
    COCOevalEvaluateImages,
    ImageEvaluation,
    InstanceAnnotation,
)
from .deform_conv import (
    deform_conv_backward_filter,
    deform_conv_backward_input,
    deform_conv_forward,
    modulated_deform_conv_backward,
    modulated_deform_conv_forward,
)
from .roi_align_rotated import roi_align_rotated_backward, roi_align_rotated_forward
from .rotated_boxes import box_iou_rotated
from .rotated_nms import nms_rotated

IS_DEEPMAC_FALLBACK = True

__all__ = [
    "COCOevalAccumulate",
    "COCOevalEvaluateImages",
    "ImageEvaluation",
    "InstanceAnnotation",
    "box_iou_rotated",
    "deform_conv_backward_filter",
    "deform_conv_backward_input",
    "deform_conv_forward",
    "get_compiler_version",
    "get_cuda_version",
    "has_cuda",
    "modulated_deform_conv_backward",
    "modulated_deform_conv_forward",
    "nms_rotated",
    "roi_align_rotated_backward",
    "roi_align_rotated_forward",
]


def get_compiler_version():
    return "none (deepmac_d2 pure-PyTorch fallback)"


def get_cuda_version():
    return torch.version.cuda or "none"


def has_cuda():
    return False
