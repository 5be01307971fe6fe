"""Mask IoU when the ground-truth boxes are given: the mask head alone, without detection.

Mask AP mixes the detector's recall, scores and localisation with the mask head's
quality. Giving the head every ground-truth box (as DeepMAC's released models are used)
and scoring each predicted mask against its instance's ground truth isolates the head,
which is what a partially supervised comparison of heads on novel classes needs.
"""
import itertools
from typing import Dict, Iterable, List, Mapping, Optional, Sequence

import torch
from detectron2.data import (
    DatasetCatalog,
    DatasetMapper,
    MetadataCatalog,
    build_detection_test_loader,
    detection_utils,
)
from detectron2.evaluation import inference_context

from ..box_masks import masks_at_given_boxes

__all__ = ["GivenBoxMapper", "given_box_mask_iou", "mask_iou"]


def mask_iou(pred_masks: torch.Tensor, gt_masks: torch.Tensor) -> torch.Tensor:
    """IoU of each predicted mask with the ground-truth mask at the same index.

    Args:
        pred_masks, gt_masks: N x H x W, boolean (or 0/1).

    Returns:
        N float64 IoUs; a pair of empty masks counts as identical (IoU 1).
    """
    if pred_masks.shape != gt_masks.shape:
        raise ValueError(
            f"mask shapes differ: {tuple(pred_masks.shape)} vs {tuple(gt_masks.shape)}"
        )
    pred = pred_masks.bool().flatten(1)
    gt = gt_masks.bool().flatten(1)
    intersection = (pred & gt).sum(1).double()
    union = (pred | gt).sum(1).double()
    return torch.where(union > 0, intersection / union.clamp(min=1), torch.ones_like(union))


class GivenBoxMapper:
    """Detectron2's test-time DatasetMapper, plus the ground truth at the original size.

    The test mapper drops annotations; this one keeps them as ``instances`` of the
    original image size (boxes, contiguous classes, bit masks), since the masks are
    compared where COCO evaluation compares them: at the size of the image on disk.
    Crowd regions are left out (they are not instances), and so are instances with an
    empty box or mask, which have no shape to predict.
    """

    def __init__(self, cfg):
        self.image_mapper = DatasetMapper(cfg, is_train=False)

    def __call__(self, dataset_dict: dict) -> dict:
        mapped = self.image_mapper(dataset_dict)  # deep-copies; dataset_dict keeps its annotations
        annotations = [a for a in dataset_dict["annotations"] if not a.get("iscrowd", 0)]
        if any("segmentation" not in a for a in annotations):
            raise ValueError(
                f"{dataset_dict['file_name']}: an annotation has no 'segmentation' (mask)"
            )
        size = (dataset_dict["height"], dataset_dict["width"])
        gt = detection_utils.annotations_to_instances(annotations, size, mask_format="bitmask")
        gt.gt_boxes.clip(size)
        mapped["instances"] = gt[gt.gt_boxes.nonempty() & gt.gt_masks.tensor.flatten(1).any(1)]
        return mapped


def _batches(items: Iterable, size: int) -> Iterable[List]:
    iterator = iter(items)
    while batch := list(itertools.islice(iterator, size)):
        yield batch


def given_box_mask_iou(
    cfg,
    model,
    dataset_name: str,
    class_subsets: Optional[Mapping[str, Sequence[int]]] = None,
    batch_size: int = 4,
) -> Dict:
    """Mean mask IoU of a model's masks for every ground-truth box of a dataset.

    Each non-crowd instance's box and class go to the mask branch
    (:func:`~deepmac_d2.box_masks.masks_at_given_boxes`), and the mask is compared with
    the instance's mask at the original image size. Means are over instances.

    Args:
        cfg: the model's config (test-time resize, input format, data loader workers).
        model: a GeneralizedRCNN with a mask head; run in eval mode, its mode restored after.
        dataset_name: a registered dataset whose dicts have boxes and masks.
        class_subsets: name -> dataset category ids (as in the json, like
            ``seen_class_ids`` / ``novel_class_ids`` of the synthetic dataset's metadata).
        batch_size: images per forward pass (Detectron2 v0.6's test loader yields one).

    Returns:
        ``{"mIoU": overall mean, "num_instances": n, "per_category": {dataset id: mean},
        "per_subset": {name: mean}}``; a subset or category without instances has NaN.
    """
    meta = MetadataCatalog.get(dataset_name)
    # Images without a non-crowd instance have nothing to score: skip their forward pass.
    dataset = [
        d for d in DatasetCatalog.get(dataset_name)
        if any(not a.get("iscrowd", 0) for a in d.get("annotations", []))
    ]
    id_map = meta.get("thing_dataset_id_to_contiguous_id", None)
    # Without an id map the dataset's category ids are its contiguous ids.
    to_dataset_id = {v: k for k, v in id_map.items()} if id_map else None
    loader = build_detection_test_loader(
        dataset, mapper=GivenBoxMapper(cfg), num_workers=cfg.DATALOADER.NUM_WORKERS
    )
    ious, classes = [], []
    with inference_context(model):
        for batch in _batches(itertools.chain.from_iterable(loader), batch_size):
            gts = [x.pop("instances") for x in batch]
            predictions = masks_at_given_boxes(
                model, batch, [g.gt_boxes.tensor for g in gts], [g.gt_classes for g in gts]
            )
            for pred, gt in zip(predictions, gts):
                ious.append(mask_iou(pred.pred_masks.cpu(), gt.gt_masks.tensor))
                classes.append(gt.gt_classes)
    ious = torch.cat(ious) if ious else torch.zeros(0, dtype=torch.float64)
    classes = torch.cat(classes).tolist() if classes else []
    category_ids = torch.tensor(
        [to_dataset_id[c] if to_dataset_id else c for c in classes], dtype=torch.int64
    )

    def mean(selected: torch.Tensor) -> float:
        return float(ious[selected].mean()) if selected.any() else float("nan")

    per_category = {int(c): mean(category_ids == c) for c in sorted(set(category_ids.tolist()))}
    per_subset = {
        name: mean(torch.isin(category_ids, torch.tensor(list(ids), dtype=torch.int64)))
        for name, ids in (class_subsets or {}).items()
    }
    return {
        "mIoU": mean(torch.ones(len(ious), dtype=torch.bool)),
        "num_instances": len(ious),
        "per_category": per_category,
        "per_subset": per_subset,
    }
