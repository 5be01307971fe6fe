"""A pure-PyTorch ``detectron2._C`` for Detectron2 installs without compiled ops."""
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


def get_compiler_version():
    return "none (deepmac_d2 pure-PyTorch fallback)"


def get_cuda_version():
    return torch.version.cuda or "none"


def has_cuda():
    return False
