"""Fail at set-up, with the fix in the message, when a config's dataset files are missing.

Detectron2 registers ``coco_2017_train`` / ``coco_2017_val`` under
``$DETECTRON2_DATASETS`` (default ``./datasets``, read once, when ``detectron2.data`` is
imported) and only opens the files when the data loader is built; a missing COCO then
surfaces deep inside pycocotools, after the model is built, without saying where
Detectron2 looked or why. This check runs first and names both.
"""
import os
from typing import Iterable, Optional

from detectron2.data import DatasetCatalog, MetadataCatalog

__all__ = ["check_dataset_files"]


def _detectron2_datasets_root() -> str:
    """The root Detectron2's builtin registrations use (same rule as detectron2.data.datasets)."""
    return os.path.abspath(os.path.expanduser(os.getenv("DETECTRON2_DATASETS", "datasets")))


def check_dataset_files(cfg, dataset_names: Optional[Iterable[str]] = None) -> None:
    """Check that the annotation json and image folder of each dataset exist.

    Args:
        cfg: the config; its ``DATASETS.TRAIN`` and ``DATASETS.TEST`` are checked unless
            ``dataset_names`` is given.
        dataset_names: the datasets to check instead.

    Raises:
        KeyError: a dataset is not registered.
        FileNotFoundError: naming the dataset, the missing path and, for datasets under
            Detectron2's datasets root, the ``DETECTRON2_DATASETS`` variable.

    Datasets whose metadata has no ``json_file`` / ``image_root`` (in-memory ones) and
    remote paths (``://``) are not checked.
    """
    if dataset_names is None:
        dataset_names = list(cfg.DATASETS.TRAIN) + list(cfg.DATASETS.TEST)
    registered = set(DatasetCatalog.list())
    root = _detectron2_datasets_root()
    for name in dataset_names:
        if name not in registered:
            raise KeyError(
                f"Dataset {name!r} is not registered; `import deepmac_d2` registers the "
                "plugin's datasets, Detectron2 registers its builtin ones (coco_2017_train, ...)"
            )
        meta = MetadataCatalog.get(name)
        for field in ("json_file", "image_root"):
            path = meta.get(field, None)
            if path is None or "://" in path or os.path.exists(path):
                continue
            message = f"Dataset {name!r}: its {field} {path} does not exist."
            if os.path.abspath(path).startswith(root + os.sep):
                message += (
                    " Detectron2 looks for its datasets under $DETECTRON2_DATASETS (now "
                    f"{os.getenv('DETECTRON2_DATASETS', 'unset, so ./datasets')}, read when "
                    "detectron2.data is first imported): set DETECTRON2_DATASETS to the folder "
                    "that holds coco/ (see datasets/README.md for the layout and download)."
                )
            else:
                message += " See datasets/README.md for how to get or generate it."
            raise FileNotFoundError(message)
