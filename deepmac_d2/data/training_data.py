"""The training set as the mask head will see it: every box kept, masks counted per class.

Detectron2's ``load_coco_json`` keeps an annotation whose ``segmentation`` is missing or
``[]`` (the mapper makes it a box-only instance), but drops one whose polygons are all
degenerate, box included, with only a warning. For partially supervised data that box
is wanted: those annotations are read back from the json (only when Detectron2 reported
dropping some, so COCO-sized jsons are not parsed twice) and returned as box-only. Then
one table says, per class, how many instances have a mask and how many only a box, and
training stops before it starts if the mask head would learn from nothing.
"""
import json
import logging
import os
import re
from contextlib import contextmanager

from detectron2.data import MetadataCatalog, get_detection_dataset_dicts
from detectron2.structures import BoxMode
from detectron2.utils.file_io import PathManager

from .class_splits import allowed_contiguous_class_ids
from .mask_coverage import annotation_has_mask, check_masks_present, log_mask_coverage, valid_polygons

__all__ = ["training_dataset_dicts"]

logger = logging.getLogger("detectron2.deepmac_d2")
_DROPPED = re.compile(r"Filtered out (\d+) instances without valid segmentation")


@contextmanager
def _count_dropped_masks():
    """Collect the numbers of Detectron2's 'Filtered out N instances without valid
    segmentation' warnings (one per json loaded) while the datasets load."""
    found = []

    class Catch(logging.Filter):
        def filter(self, record):
            m = _DROPPED.search(record.getMessage())
            if m:
                found.append(int(m.group(1)))
            return True

    coco_logger = logging.getLogger("detectron2.data.datasets.coco")
    catch = Catch()
    coco_logger.addFilter(catch)
    try:
        yield found
    finally:
        coco_logger.removeFilter(catch)


def _restore_degenerate_polygon_boxes(dataset_dicts, dataset_names):
    """Append, as box-only, the annotations ``load_coco_json`` dropped for their polygons."""
    by_file = {d["file_name"]: d for d in dataset_dicts}
    restored = 0
    for name in dataset_names:
        meta = MetadataCatalog.get(name)
        json_file, image_root = meta.get("json_file", None), meta.get("image_root", None)
        id_map = meta.get("thing_dataset_id_to_contiguous_id", None)
        if json_file is None or image_root is None or id_map is None:
            continue
        with PathManager.open(json_file) as f:
            coco = json.load(f)
        files = {img["id"]: os.path.join(image_root, img["file_name"]) for img in coco["images"]}
        for ann in coco["annotations"]:
            segm = ann.get("segmentation")
            if not isinstance(segm, list) or not segm or valid_polygons(segm):
                continue
            record = by_file.get(files.get(ann["image_id"]))
            if record is None:  # its image left the training set (no other annotation)
                continue
            record["annotations"].append({
                "bbox": ann["bbox"], "bbox_mode": BoxMode.XYWH_ABS, "iscrowd": ann.get("iscrowd", 0),
                "category_id": id_map[ann["category_id"]],
            })
            restored += 1
    return restored


def _drop_annotations_without_box_or_mask(dataset_dicts):
    """Remove the annotations that can train nothing: an empty box and no mask."""
    dropped = 0
    for record in dataset_dicts:
        kept = []
        for ann in record["annotations"]:
            x0, y0, x1, y1 = BoxMode.convert(list(ann["bbox"]), ann["bbox_mode"], BoxMode.XYXY_ABS)
            if x1 > x0 and y1 > y0 or annotation_has_mask(ann):
                kept.append(ann)
        dropped += len(record["annotations"]) - len(kept)
        record["annotations"] = kept
    return dropped


def training_dataset_dicts(cfg):
    """``cfg.DATASETS.TRAIN`` loaded as Detectron2's train loader loads it, with box-only
    annotations kept, the mask coverage logged and checked (ValueError if no mask trains)."""
    names = list(cfg.DATASETS.TRAIN)
    with _count_dropped_masks() as dropped:
        dicts = get_detection_dataset_dicts(
            names,
            filter_empty=cfg.DATALOADER.FILTER_EMPTY_ANNOTATIONS,
            min_keypoints=cfg.MODEL.ROI_KEYPOINT_HEAD.MIN_KEYPOINTS_PER_IMAGE if cfg.MODEL.KEYPOINT_ON else 0,
            proposal_files=cfg.DATASETS.PROPOSAL_FILES_TRAIN if cfg.MODEL.LOAD_PROPOSALS else None,
        )
    if sum(dropped):
        restored = _restore_degenerate_polygon_boxes(dicts, names)
        logger.info(
            f"Kept {restored} of the {sum(dropped)} annotation(s) Detectron2 dropped for having no valid "
            "polygon as box-only instances (the rest were in images without another annotation)."
        )
    dropped = _drop_annotations_without_box_or_mask(dicts)
    if dropped:
        logger.warning(f"Dropped {dropped} annotation(s) with neither a valid box nor a mask.")
    if cfg.MODEL.MASK_ON:
        coverage = log_mask_coverage(dicts, MetadataCatalog.get(names[0]).thing_classes, log=logger)
        check_masks_present(coverage, True, names, allowed_contiguous_class_ids(cfg))
    return dicts
