"""Evaluation: Detectron2's COCOEvaluator restricted to class subsets, and mask IoU of
the masks predicted for given ground-truth boxes.

May import ``data`` (class splits) and ``box_masks`` (the given-box predictor).
"""
from .given_box_iou import given_box_mask_iou, mask_iou
from .subset_evaluation import SubsetCOCOEvaluator, build_subset_evaluator, subset_coco_metrics

__all__ = [
    "SubsetCOCOEvaluator",
    "build_subset_evaluator",
    "given_box_mask_iou",
    "mask_iou",
    "subset_coco_metrics",
]
