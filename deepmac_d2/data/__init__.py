"""Class splits (VOC / non-VOC), dataset registration, the embedded synthetic dataset."""
from . import synthetic  # noqa: F401,E402  (registers synthetic_train / synthetic_val)
from .coco_files import register_coco_files  # noqa: F401
from .dataset_check import check_dataset_files  # noqa: F401
from .dataset_mapper import InstanceMaskDatasetMapper, check_mapper_dependencies  # noqa: F401
