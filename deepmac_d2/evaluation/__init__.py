"""COCO evaluation restricted to class subsets."""
from .subset_evaluation import SubsetCOCOEvaluator, build_subset_evaluator, subset_coco_metrics

__all__ = ["SubsetCOCOEvaluator", "build_subset_evaluator", "subset_coco_metrics"]
