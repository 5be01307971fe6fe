"""Detectron2's DatasetMapper with the reference's scale jitter, made to skip
instances that lost their mask.

The reference scales each image to fit a square (1024) times a random factor
in [0.8, 1.25], then crops or pads it to that square. Detectron2 has both
transforms (ResizeScale, FixedSizeCrop) but its yaml path builds only
ResizeShortestEdge; ``INPUT.SCALE_JITTER`` switches to them.

Detectron2's ``load_coco_json`` drops an annotation whose polygons are all
invalid, but keeps one whose ``segmentation`` is empty (``[]``) without the
key; with masks on, ``annotations_to_instances`` then fails with a bare
``KeyError: 'segmentation'``, naming neither the image nor the annotation.
Skipping it with a warning is what Detectron2 does for the invalid polygons.
"""
import logging

from detectron2.data import DatasetMapper
from detectron2.data import transforms as T

logger = logging.getLogger(__name__)


class InstanceMaskDatasetMapper(DatasetMapper):
    """A DatasetMapper that drops (with a warning) annotations without a segmentation,
    and trains with the reference's scale jitter when ``INPUT.SCALE_JITTER`` is set."""

    @classmethod
    def from_config(cls, cfg, is_train=True):
        ret = super().from_config(cfg, is_train)
        if is_train and cfg.INPUT.SCALE_JITTER:
            lo, hi = cfg.INPUT.SCALE_JITTER
            size = cfg.INPUT.FIXED_SIZE
            # Detectron2's augmentations, with ResizeShortestEdge swapped out (its flip stays).
            flips = [a for a in ret["augmentations"] if isinstance(a, T.RandomFlip)]
            ret["augmentations"] = [T.ResizeScale(lo, hi, size, size), T.FixedSizeCrop((size, size))] + flips
            # A crop cuts instances: take their boxes from the cropped masks.
            ret["recompute_boxes"] = cfg.MODEL.MASK_ON
        return ret

    def __call__(self, dataset_dict):
        annos = dataset_dict.get("annotations")
        if self.use_instance_mask and annos:
            kept = [a for a in annos if a.get("segmentation")]
            if len(kept) < len(annos):
                logger.warning(
                    "%s: skipped %d annotation(s) of category %s without a valid segmentation",
                    dataset_dict.get("file_name"), len(annos) - len(kept),
                    sorted({a["category_id"] for a in annos if not a.get("segmentation")}),
                )
                dataset_dict = dict(dataset_dict, annotations=kept)
        return super().__call__(dataset_dict)
