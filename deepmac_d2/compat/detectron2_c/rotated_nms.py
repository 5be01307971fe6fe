"""Non-maximum suppression of rotated boxes, registered as ``torch.ops.detectron2.nms_rotated``.

Detectron2 v0.6 calls this op through the dispatcher (``layers/nms.py``), not
as an attribute of ``_C``, so importing this module registers it. Boxes are
visited by decreasing score (a stable sort, so ties keep their input order) and
a box is suppressed when its IoU with a kept one exceeds the threshold, as in
Detectron2's CUDA kernel and torchvision's ``nms`` (Detectron2's CPU kernel
also suppresses at equality). Returns int64 indices in decreasing score order.
"""
import numpy as np
import torch

from .rotated_boxes import box_iou_rotated


def nms_rotated(boxes, scores, iou_threshold):
    if boxes.numel() == 0:
        return torch.empty(0, dtype=torch.int64, device=boxes.device)
    order = scores.sort(descending=True, stable=True).indices
    ordered = boxes[order]
    overlaps = (box_iou_rotated(ordered, ordered) > iou_threshold).cpu().numpy()
    suppressed = np.zeros(len(order), dtype=bool)
    keep = []
    for i in range(len(order)):
        if not suppressed[i]:
            keep.append(i)
            suppressed |= overlaps[i]
    return order[torch.as_tensor(keep, dtype=torch.int64, device=order.device)]


def _op_is_registered():
    try:
        torch.ops.detectron2.nms_rotated
    except (AttributeError, RuntimeError):
        return False
    return True


if not _op_is_registered():
    # A FRAGMENT, so that the stand-in can coexist with other ops in the namespace.
    _LIBRARY = torch.library.Library("detectron2", "FRAGMENT")
    _LIBRARY.define("nms_rotated(Tensor boxes, Tensor scores, float iou_threshold) -> Tensor")
    _LIBRARY.impl("nms_rotated", nms_rotated, "CompositeExplicitAutograd")
