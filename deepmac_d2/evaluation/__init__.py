"""COCO evaluation restricted to class subsets; mask IoU for given ground-truth boxes."""
from .given_box_iou import given_box_mask_iou, mask_iou
from .subset_evaluation import SubsetCOCOEvaluator, build_subset_evaluator, subset_coco_metrics

__all__ = [
    "SubsetCOCOEvaluator",
    "build_subset_evaluator",
    "given_box_mask_iou",
    "mask_iou",
    "subset_coco_metrics",
]
