"""Detectron2's DatasetMapper, made to skip instances that lost their mask.

Detectron2's ``load_coco_json`` drops an annotation whose polygons are all
invalid, but keeps one whose ``segmentation`` is empty (``[]``) without the
key; with masks on, ``annotations_to_instances`` then fails with a bare
``KeyError: 'segmentation'``, naming neither the image nor the annotation.
Skipping it with a warning is what Detectron2 does for the invalid polygons.
"""
import logging

from detectron2.data import DatasetMapper

logger = logging.getLogger(__name__)


class InstanceMaskDatasetMapper(DatasetMapper):
    """A DatasetMapper that drops (with a warning) annotations without a segmentation."""

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
