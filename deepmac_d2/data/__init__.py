"""The data side: COCO class splits (VOC / non-VOC) and class-id specs, COCO-format
datasets registered from files, the training dicts with box-only instances kept, the
dataset mapper, and the embedded synthetic dataset.

Imports Detectron2, pycocotools and the scientific stack only: the bottom of the
package, which every other subpackage may import and which imports none of them.
"""
from . import synthetic  # noqa: F401,E402  (registers synthetic_train / synthetic_val)
from .coco_files import register_coco_files  # noqa: F401
from .dataset_check import check_dataset_files  # noqa: F401
from .dataset_mapper import InstanceMaskDatasetMapper, check_mapper_dependencies  # noqa: F401
