"""COCO-format datasets named in the config, registered without code.

Detectron2 expects a user with their own json to write a few lines that call
``register_coco_instances``, i.e. to copy train_net.py. ``DATASETS.COCO_FILES``
(train_net.py's ``--dataset``, repeatable, appends to it) lists the datasets as
``"NAME=JSON:IMAGE_DIR"`` strings instead, so the config saved in ``OUTPUT_DIR`` names
its data and re-registers it for ``--eval-only`` and tools/predict.py.

Each json is read once at registration, for two reasons: a file that is missing or not
COCO fails here, naming the file and the entry, rather than inside pycocotools after the
model is built; and the metadata that ``load_coco_json`` would only set once the json
is loaded (``thing_classes``, ``thing_dataset_id_to_contiguous_id``, by Detectron2's own
rule: categories sorted by id) is known up front, for the evaluator, the Visualizer,
class names in the config and the ``NUM_CLASSES`` check.
"""
import json
import os
from typing import List, Tuple

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import register_coco_instances
from detectron2.utils.file_io import PathManager

__all__ = ["check_num_classes", "parse_coco_file", "read_coco_categories", "register_coco_files"]

KEY = "DATASETS.COCO_FILES"
_WHERE = f"{KEY} (or --dataset)"


def parse_coco_file(spec: str) -> Tuple[str, str, str]:
    """Split ``"NAME=JSON:IMAGE_DIR"`` into its three parts.

    The json path ends at the first ":" after the name, so the json path may not hold a
    ":" (the image folder may). Relative paths are relative to the working directory,
    as Detectron2 reads them.
    """
    name, eq, paths = str(spec).partition("=")
    json_file, colon, image_root = paths.partition(":")
    name, json_file, image_root = name.strip(), json_file.strip(), image_root.strip()
    if not (eq and colon and name and json_file and image_root):
        raise ValueError(
            f"{_WHERE} entry {spec!r} is not NAME=JSON:IMAGE_DIR, "
            "e.g. my_train=data/train.json:data/images"
        )
    return name, json_file, image_root


def read_coco_categories(json_file: str, where: str = "") -> List[dict]:
    """The ``categories`` of a COCO instances json, after checking that it is one.

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: it is not JSON, or lacks COCO's ``images`` / ``annotations`` /
            ``categories`` lists, or a category lacks its ``id`` or ``name``.
    """
    prefix = f"{where}: " if where else ""
    if not PathManager.isfile(json_file):
        raise FileNotFoundError(f"{prefix}annotation file {json_file} does not exist")
    try:
        with PathManager.open(json_file) as f:
            coco = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{prefix}{json_file} is not a JSON file ({e})") from None
    missing = [k for k in ("images", "annotations", "categories")
               if not isinstance(coco, dict) or not isinstance(coco.get(k), list)]
    if missing:
        raise ValueError(
            f"{prefix}{json_file} is not a COCO instances json: it has no {', '.join(missing)} "
            "list(s) (see https://cocodataset.org/#format-data, 'Object Detection')"
        )
    categories = coco["categories"]
    bad = [c for c in categories if not isinstance(c, dict) or "id" not in c or "name" not in c]
    if not categories or bad:
        raise ValueError(
            f"{prefix}{json_file}: 'categories' must be a non-empty list of "
            f"{{'id': ..., 'name': ...}}; found {bad[0] if bad else 'none'}"
        )
    return categories


def register_coco_files(cfg) -> List[str]:
    """Register every ``DATASETS.COCO_FILES`` entry with ``register_coco_instances``.

    Returns the names. An entry naming an already registered dataset is accepted only if
    that dataset is this json and folder (setup may run twice in one process, an entry may
    come from the saved config and from --dataset); anything else, a builtin such as
    ``coco_2017_train`` included, is an error rather than a silent replacement.
    """
    files = {}
    for spec in cfg.DATASETS.COCO_FILES:
        name, json_file, image_root = parse_coco_file(spec)
        where = f"{_WHERE} entry {spec!r}"
        if name in files:
            if files[name] == (json_file, image_root):
                continue  # the saved config's entry given again with --dataset
            raise ValueError(f"{where}: dataset {name!r} is given twice in {KEY}, with other files")
        files[name] = (json_file, image_root)
        if name in DatasetCatalog.list():
            meta = MetadataCatalog.get(name)
            if (meta.get("json_file", None), meta.get("image_root", None)) == (json_file, image_root):
                continue
            raise ValueError(
                f"{where}: a dataset named {name!r} is already registered "
                f"(json_file={meta.get('json_file', None)}); choose another NAME"
            )
        categories = read_coco_categories(json_file, where)
        if not PathManager.isdir(image_root):
            raise FileNotFoundError(f"{where}: image folder {image_root} does not exist")
        by_id = sorted(categories, key=lambda c: c["id"])
        register_coco_instances(name, {
            "thing_classes": [c["name"] for c in by_id],
            "thing_dataset_id_to_contiguous_id": {c["id"]: i for i, c in enumerate(by_id)},
        }, json_file, image_root)
    return list(files)


def check_num_classes(cfg, dataset_names) -> None:
    """ValueError if ``MODEL.ROI_HEADS.NUM_CLASSES`` is not the class count of one of
    ``dataset_names`` (those of ``cfg.DATASETS.TRAIN`` / ``TEST`` only): too few classes
    fail deep in the box loss, too many train dead logits without a word."""
    for name in dataset_names:
        if name not in list(cfg.DATASETS.TRAIN) + list(cfg.DATASETS.TEST):
            continue
        count = len(MetadataCatalog.get(name).thing_classes)
        if cfg.MODEL.ROI_HEADS.NUM_CLASSES != count:
            raise ValueError(
                f"MODEL.ROI_HEADS.NUM_CLASSES is {cfg.MODEL.ROI_HEADS.NUM_CLASSES}, but dataset "
                f"{name!r} ({MetadataCatalog.get(name).json_file}) has {count} categories: "
                f"set MODEL.ROI_HEADS.NUM_CLASSES {count}"
            )
