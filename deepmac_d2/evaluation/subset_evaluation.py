"""COCO AP on named class subsets, next to Detectron2's all-class COCO AP.

The paper's headline number is mask AP over the classes that had no mask in training
(the 60 non-VOC classes when masks come from VOC), i.e. COCOeval with ``params.catIds``
set to those classes. Rather than evaluating once per subset, the subset metrics are
read off the all-class evaluation: with ``useCats`` COCOeval matches, accumulates and
caps detections per category, so a subset's slice of ``eval["precision"]`` is exactly
what a COCOeval restricted to that subset would accumulate, and the metrics below are
the averages ``COCOeval.summarize`` takes over it.
"""
import logging
from collections import OrderedDict
from typing import Dict, List, Mapping, Optional, Sequence

import numpy as np
from detectron2.evaluation import COCOEvaluator
from detectron2.utils.logger import create_small_table

from ..data.class_splits import parse_class_subset

__all__ = ["SubsetCOCOEvaluator", "build_subset_evaluator", "subset_coco_metrics"]

logger = logging.getLogger(__name__)

# The index of the detections-per-image limit that COCOeval.summarize uses for AP
# (maxDets = [1, 10, 100] in COCO: the 100).
_AP_MAX_DETS_INDEX = 2


def subset_coco_metrics(coco_eval, cat_ids: Sequence[int]) -> Dict[str, float]:
    """AP, AP50, AP75, APs, APm, APl (in %) of an accumulated bbox/segm COCOeval over ``cat_ids``.

    Categories without ground truth have precision -1 and, as in COCOeval, do not count;
    a metric with nothing to average is NaN (Detectron2's convention for COCOeval's -1).
    """
    p = coco_eval.params
    cat_index = [list(p.catIds).index(c) for c in cat_ids]
    # precision: [iou threshold, recall threshold, category, area range, max dets];
    # indexed in two steps, as one step would move the two indexed axes to the front.
    precision = coco_eval.eval["precision"][..., _AP_MAX_DETS_INDEX][:, :, cat_index]
    area = {label: i for i, label in enumerate(p.areaRngLbl)}

    def mean(s):
        s = s[s > -1]
        return float(np.mean(s) * 100) if s.size else float("nan")

    return {
        "AP": mean(precision[..., area["all"]]),
        "AP50": mean(precision[np.isclose(p.iouThrs, 0.5)][..., area["all"]]),
        "AP75": mean(precision[np.isclose(p.iouThrs, 0.75)][..., area["all"]]),
        "APs": mean(precision[..., area["small"]]),
        "APm": mean(precision[..., area["medium"]]),
        "APl": mean(precision[..., area["large"]]),
    }


class SubsetCOCOEvaluator(COCOEvaluator):
    """Detectron2's COCOEvaluator, plus bbox/segm AP over named subsets of the categories.

    Results keep Detectron2's format, one flat dict of floats per key, the subsets keyed
    ``"<task>/<subset>"`` after their task::

        {"bbox": {...}, "bbox/nonvoc": {"AP": ..., ..., "APl": ...}, "segm": {...}, ...}

    so ``verify_results`` (``TEST.EXPECTED_RESULTS`` entries like
    ``["segm/nonvoc", "AP", 33.1, 0.5]``), ``print_csv_format``, metrics.json and
    tensorboard (``segm/nonvoc/AP``) see them. The all-class results include
    Detectron2's per-category AP (``AP-<class name>``, also logged as a table).
    """

    def __init__(
        self,
        dataset_name: str,
        class_subsets: Optional[Mapping[str, Sequence[int]]] = None,
        **kwargs,
    ):
        """
        Args:
            dataset_name: a dataset Detectron2's COCOEvaluator can evaluate.
            class_subsets: subset name -> dataset category ids (the json's ``category_id``).
            kwargs: the other arguments of :class:`COCOEvaluator` (``output_dir``,
                ``distributed``, ``use_fast_impl``, ...).
        """
        super().__init__(dataset_name, **kwargs)
        self._class_subsets = OrderedDict(
            (name, sorted(int(i) for i in ids)) for name, ids in (class_subsets or {}).items()
        )
        valid = set(self._coco_api.getCatIds())
        for name, ids in self._class_subsets.items():
            if not ids:
                raise ValueError(f"Class subset {name!r} has no category ids")
            missing = [i for i in ids if i not in valid]
            if missing:
                raise ValueError(
                    f"Class subset {name!r} has category id(s) {missing} that dataset "
                    f"{dataset_name!r} does not have; its category ids are {sorted(valid)}"
                )
        self._subset_results = OrderedDict()

    def evaluate(self, img_ids=None):
        self._subset_results = OrderedDict()
        results = super().evaluate(img_ids)
        if not results:  # not the main process, or nothing to evaluate
            return results
        ordered = OrderedDict()
        for task, res in results.items():
            ordered[task] = res
            for key, subset_res in self._subset_results.items():
                if key.split("/", 1)[0] == task:
                    ordered[key] = subset_res
        return ordered

    def _derive_coco_results(self, coco_eval, iou_type, class_names=None):
        results = super()._derive_coco_results(coco_eval, iou_type, class_names)
        if iou_type not in ("bbox", "segm"):
            return results
        for name, ids in self._class_subsets.items():
            if coco_eval is None:  # no predictions at all
                res = {m: float("nan") for m in ("AP", "AP50", "AP75", "APs", "APm", "APl")}
            else:
                res = subset_coco_metrics(coco_eval, ids)
            self._subset_results[f"{iou_type}/{name}"] = res
            logger.info(
                f"Evaluation results for {iou_type} on class subset {name!r} "
                f"({len(ids)} categories): \n" + create_small_table(res)
            )
        return results


def class_subsets_from_config(cfg) -> "OrderedDict[str, List[int]]":
    """``DATASETS.EVAL_CLASS_SUBSETS`` as an ordered {name: dataset ids}; names must be unique."""
    subsets = OrderedDict()
    for spec in cfg.DATASETS.EVAL_CLASS_SUBSETS:
        name, ids = parse_class_subset(spec)
        if name in subsets:
            raise ValueError(f"DATASETS.EVAL_CLASS_SUBSETS names subset {name!r} twice")
        subsets[name] = ids
    return subsets


def build_subset_evaluator(cfg, dataset_name: str, output_dir: Optional[str] = None, **kwargs):
    """The evaluator train_net.py uses: COCO AP on all classes and on the config's subsets.

    ``kwargs`` go to :class:`COCOEvaluator` (e.g. ``use_fast_impl``).
    """
    return SubsetCOCOEvaluator(
        dataset_name, class_subsets=class_subsets_from_config(cfg), output_dir=output_dir, **kwargs
    )
