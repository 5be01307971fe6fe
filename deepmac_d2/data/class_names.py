"""Class subsets of the config given by class name, turned into the json's category ids.

``MODEL.ROI_MASK_HEAD.ALLOWED_CLASS_IDS`` and ``DATASETS.EVAL_CLASS_SUBSETS`` take
dataset category ids and the COCO presets (:mod:`.class_splits`); with one's own json,
the class names are what one knows (``"seen:cat,dog"``). ``setup()`` replaces each name
by its id, looked up in the categories of the dataset the key is about (the first of
``DATASETS.TRAIN`` for the mask head, the first of ``DATASETS.TEST`` for evaluation), so
the model, the evaluator and the config saved in ``OUTPUT_DIR`` all see ids. A config
without names is left alone and loads nothing.
"""
import difflib
from typing import Dict, List

from detectron2.data import DatasetCatalog, MetadataCatalog

from .class_splits import CLASS_SPLIT_PRESETS

__all__ = ["resolve_class_names"]


def _is_name(item) -> bool:
    return isinstance(item, str) and not item.strip().isdigit() and item.strip().lower() not in CLASS_SPLIT_PRESETS


def _ids_by_name(dataset_name: str, where: str) -> Dict[str, int]:
    """Class name -> dataset category id of a registered dataset (loading it if its
    metadata only comes with loading, as for datasets registered in code)."""
    if dataset_name not in DatasetCatalog.list():
        raise KeyError(f"{where}: dataset {dataset_name!r}, where its class names are looked up, is not registered")
    meta = MetadataCatalog.get(dataset_name)
    if not hasattr(meta, "thing_dataset_id_to_contiguous_id"):
        DatasetCatalog.get(dataset_name)
    contiguous_to_id = {c: i for i, c in meta.thing_dataset_id_to_contiguous_id.items()}
    ids: Dict[str, int] = {}
    for index, name in enumerate(meta.thing_classes):
        if name in ids:
            raise ValueError(
                f"{where}: dataset {dataset_name!r} has two classes named {name!r} "
                f"(ids {ids[name]} and {contiguous_to_id[index]}); give category ids instead"
            )
        ids[name] = contiguous_to_id[index]
    return ids


def _to_ids(items: List, dataset_name: str, where: str) -> List:
    """``items`` with each class name replaced by its category id (ids and presets kept)."""
    if not any(_is_name(i) for i in items):
        return list(items)
    ids = _ids_by_name(dataset_name, where)
    out = []
    for item in items:
        if not _is_name(item):
            out.append(item)
            continue
        name = item.strip()
        if name not in ids:
            close = difflib.get_close_matches(name, list(ids), n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            meta = MetadataCatalog.get(dataset_name)
            raise ValueError(
                f"{where}: dataset {dataset_name!r} ({meta.get('json_file', 'registered in code')}) "
                f"has no class {name!r}; its classes are {sorted(ids)}.{hint}"
            )
        out.append(ids[name])
    return out


def _first(names, key: str, where: str) -> str:
    if not names:
        raise ValueError(f"{where}: class names need {key} to look them up; give category ids instead")
    return names[0]


def resolve_class_names(cfg) -> None:
    """Replace the class names in ``ALLOWED_CLASS_IDS`` and ``EVAL_CLASS_SUBSETS`` of the
    (unfrozen) ``cfg`` by category ids, in place.

    Raises ValueError naming the key, the entry and the dataset for a name that the
    dataset's json lacks, with its class names and the closest one.
    """
    key = "MODEL.ROI_MASK_HEAD.ALLOWED_CLASS_IDS"
    allowed = list(cfg.MODEL.ROI_MASK_HEAD.ALLOWED_CLASS_IDS)
    if any(_is_name(i) for i in allowed):
        cfg.MODEL.ROI_MASK_HEAD.ALLOWED_CLASS_IDS = _to_ids(
            allowed, _first(cfg.DATASETS.TRAIN, "DATASETS.TRAIN", key), key
        )
    subsets = []
    for spec in cfg.DATASETS.EVAL_CLASS_SUBSETS:
        name, sep, items = spec.partition(":")
        items = [s.strip() for s in items.split(",") if s.strip()]
        if sep and any(_is_name(i) for i in items):
            where = f"DATASETS.EVAL_CLASS_SUBSETS entry {spec!r}"
            ids = _to_ids(items, _first(cfg.DATASETS.TEST, "DATASETS.TEST", where), where)
            spec = f"{name}:{','.join(str(i) for i in ids)}"
        subsets.append(spec)
    cfg.DATASETS.EVAL_CLASS_SUBSETS = subsets
