"""Detectron2's DatasetMapper with the reference's scale jitter, for data in which any
instance may lack a mask.

The reference scales each image to fit a square (1024) times a random factor in
[0.8, 1.25], then crops or pads it to that square. Detectron2 has both transforms
(ResizeScale, FixedSizeCrop) but its yaml path builds only ResizeShortestEdge;
``INPUT.SCALE_JITTER`` switches to them. Two Detectron2 details make that path
version- and format-dependent, and the mapper pins both down:

* Detectron2 main's FixedSizeCrop pads segmentations with 255 (its ``seg_pad_value``,
  meant for semantic segmentation's ignore label; v0.6 has no such argument and pads
  with 0). An instance bitmask padded with 255 reads as foreground along the padded
  border, and the boxes recomputed from the masks stretch to it, so instance masks are
  always padded with 0 here.
* Cropping polygons goes through shapely, which neither Detectron2 nor fvcore declares:
  :func:`check_mapper_dependencies` names it when the config is set up, not at the first
  batch.

Partially supervised data (boxes for every instance, masks for some) arrives as COCO
annotations without a usable ``segmentation``. Detectron2 either fails on them (a bare
``KeyError: 'segmentation'``), or, when the image's first annotation has no mask, silently
trains without any mask for that image (its issue #1656). This mapper keeps every
instance with a valid box: box-only instances get an empty placeholder mask, their box is
transformed as a box, and ``Instances.gt_has_mask`` says which instances have a real mask
(the ROI heads train the mask head on those only).
"""
import importlib.util
import inspect

import numpy as np
import torch
from detectron2.data import DatasetMapper
from detectron2.data import detection_utils as utils
from detectron2.data import transforms as T

from .mask_coverage import annotation_has_mask, valid_polygons

__all__ = ["InstanceMaskDatasetMapper", "check_mapper_dependencies"]


def check_mapper_dependencies(cfg):
    """Raise ImportError, naming the package and its install command, if the train
    mapper of ``cfg`` needs a package that is not installed."""
    crops_polygons = cfg.INPUT.SCALE_JITTER and cfg.MODEL.MASK_ON and cfg.INPUT.MASK_FORMAT == "polygon"
    if crops_polygons and importlib.util.find_spec("shapely") is None:
        raise ImportError(
            "INPUT.SCALE_JITTER with polygon masks (INPUT.MASK_FORMAT 'polygon') crops polygons "
            "with Detectron2's CropTransform, which needs the package 'shapely' (not declared by "
            "Detectron2). Install it: `pip install shapely` (make setup does), or set "
            "INPUT.MASK_FORMAT bitmask."
        )


def fixed_size_crop(size):
    """FixedSizeCrop to ``size`` x ``size``, padding instance masks with 0 on every version."""
    kwargs = {}
    if "seg_pad_value" in inspect.signature(T.FixedSizeCrop.__init__).parameters:
        kwargs["seg_pad_value"] = 0  # Detectron2 main: default 255
    return T.FixedSizeCrop((size, size), **kwargs)


class InstanceMaskDatasetMapper(DatasetMapper):
    """A DatasetMapper that keeps box-only instances (``gt_has_mask`` False) and trains
    with the reference's scale jitter when ``INPUT.SCALE_JITTER`` is set."""

    @classmethod
    def from_config(cls, cfg, is_train=True):
        ret = super().from_config(cfg, is_train)
        if is_train and cfg.INPUT.SCALE_JITTER:
            check_mapper_dependencies(cfg)
            lo, hi = cfg.INPUT.SCALE_JITTER
            size = cfg.INPUT.FIXED_SIZE
            # Detectron2's augmentations, with ResizeShortestEdge swapped out (its flip stays).
            flips = [a for a in ret["augmentations"] if isinstance(a, T.RandomFlip)]
            ret["augmentations"] = [T.ResizeScale(lo, hi, size, size), fixed_size_crop(size)] + flips
            # A crop cuts instances: take their boxes from the cropped masks.
            ret["recompute_boxes"] = cfg.MODEL.MASK_ON
        return ret

    def _transform_annotations(self, dataset_dict, transforms, image_shape):
        annos = [a for a in dataset_dict.pop("annotations") if a.get("iscrowd", 0) == 0]
        has_mask = [self.use_instance_mask and annotation_has_mask(a) for a in annos]
        for anno, masked in zip(annos, has_mask):
            if not self.use_keypoint:
                anno.pop("keypoints", None)
            if not masked:  # masks off, or this instance has none
                anno.pop("segmentation", None)
            elif isinstance(anno["segmentation"], list):  # Detectron2 fails on a degenerate polygon
                anno["segmentation"] = valid_polygons(anno["segmentation"])
        annos = [
            utils.transform_instance_annotations(
                a, transforms, image_shape, keypoint_hflip_indices=self.keypoint_hflip_indices
            )
            for a in annos
        ]
        if self.use_instance_mask:
            for anno, masked in zip(annos, has_mask):
                if not masked:  # an empty mask of the mask format: no polygon, or all zeros
                    anno["segmentation"] = (
                        [] if self.instance_mask_format == "polygon" else np.zeros(image_shape, np.uint8)
                    )
        instances = utils.annotations_to_instances(annos, image_shape, mask_format=self.instance_mask_format)
        if not self.use_instance_mask or not annos:
            dataset_dict["instances"] = utils.filter_empty_instances(instances)
            return
        has_mask = torch.tensor(has_mask, dtype=torch.bool)
        if self.recompute_boxes and has_mask.any():
            # Only a mask can give the tight box of a cropped instance; a box-only
            # instance keeps its box, clipped to the crop.
            mask_boxes = instances.gt_masks.get_bounding_boxes().tensor
            instances.gt_boxes.tensor[has_mask] = mask_boxes[has_mask]
        instances.gt_has_mask = has_mask
        # Detectron2 drops instances whose box is empty, and masked instances whose
        # mask the crop emptied; a box-only instance's mask is empty by design.
        keep = instances.gt_boxes.nonempty(threshold=1e-5) & (instances.gt_masks.nonempty() | ~has_mask)
        dataset_dict["instances"] = instances[keep]
