"""COCO class splits of the partially supervised setting, and the parsing of class-id specs.

The paper trains masks on the 20 PASCAL VOC classes of COCO and evaluates mask AP on
the other 60 ("non-VOC"), and the reverse. Ids here are COCO *dataset* ids (as in the
json's ``category_id``), like the reference's ``allowed_mask_class_ids``; Detectron2's
contiguous ids are derived from them through the dataset's metadata where needed.
"""
from typing import Dict, List, Optional, Sequence, Tuple, Union

from detectron2.data import DatasetCatalog, MetadataCatalog

# The 80 thing categories of COCO 2014/2017: ids 1..90 with the 10 ids COCO never used.
COCO_THING_IDS = tuple(
    i for i in range(1, 91) if i not in (12, 26, 29, 30, 45, 66, 68, 69, 71, 83)
)

# The 20 PASCAL VOC classes as COCO ids (the reference's list, from TF Model Garden's
# official/vision/detection/utils/class_utils.py): person, bicycle, car, motorcycle,
# airplane, bus, train, boat, bird, cat, dog, horse, sheep, cow, bottle, chair, couch,
# potted plant, dining table, tv.
VOC_CLASS_IDS = (1, 2, 3, 4, 5, 6, 7, 9, 16, 17, 18, 19, 20, 21, 44, 62, 63, 64, 67, 72)

# The 60 COCO classes that are not in VOC: the novel classes of the VOC -> non-VOC experiment.
NONVOC_CLASS_IDS = tuple(i for i in COCO_THING_IDS if i not in VOC_CLASS_IDS)

CLASS_SPLIT_PRESETS: Dict[str, Tuple[int, ...]] = {
    "voc": VOC_CLASS_IDS,
    "nonvoc": NONVOC_CLASS_IDS,
}


def resolve_class_ids(spec: Sequence[Union[int, str]]) -> List[int]:
    """Expand a list of dataset category ids and preset names into sorted unique ids.

    A config list such as ``[1, 2, 3]``, ``["voc"]`` or ``["voc", 11]`` is accepted: the
    presets exist so a config can name the paper's splits instead of listing 60 ids.
    Strings of digits (``"3"``, as a command-line override may give) count as ids.
    """
    ids = set()
    for item in spec:
        if isinstance(item, str) and not item.strip().isdigit():
            name = item.strip().lower()
            if name not in CLASS_SPLIT_PRESETS:
                raise ValueError(
                    f"Unknown class split preset {item!r}; presets are "
                    f"{sorted(CLASS_SPLIT_PRESETS)}, or give dataset category ids."
                )
            ids.update(CLASS_SPLIT_PRESETS[name])
        else:
            ids.add(int(item))
    return sorted(ids)


def parse_class_subset(spec: str) -> Tuple[str, List[int]]:
    """Parse one ``DATASETS.EVAL_CLASS_SUBSETS`` entry into ``(name, dataset ids)``.

    An entry is a preset name (``"nonvoc"``) or ``"name:id1,id2,..."`` (``"seen:1,2,3"``);
    the name keys the results (``"segm/nonvoc"``), so it must be non-empty and free of "/".
    """
    name, sep, ids = spec.partition(":")
    name = name.strip()
    if not name or "/" in name:
        raise ValueError(f"Bad class subset {spec!r}: expected 'preset' or 'name:id1,id2,...'")
    if not sep:
        return name, resolve_class_ids([name])
    items = [s for s in ids.replace(" ", "").split(",") if s]
    if not items:
        raise ValueError(f"Class subset {spec!r} lists no category ids")
    return name, resolve_class_ids(items)


def allowed_contiguous_class_ids(cfg) -> Optional[List[int]]:
    """Map ``MODEL.ROI_MASK_HEAD.ALLOWED_CLASS_IDS`` (dataset ids) to contiguous class ids.

    The config names classes by their json ``category_id`` (the reference's
    ``allowed_mask_class_ids`` are COCO ids), but the model only ever sees Detectron2's
    contiguous ids, so the training dataset's ``thing_dataset_id_to_contiguous_id``
    translates them. Returns None when the key is empty (every class has masks).
    """
    key = "MODEL.ROI_MASK_HEAD.ALLOWED_CLASS_IDS"
    spec = cfg.MODEL.ROI_MASK_HEAD.ALLOWED_CLASS_IDS
    if not spec:
        return None
    ids = resolve_class_ids(spec)
    if not cfg.DATASETS.TRAIN:
        raise ValueError(f"{key} needs DATASETS.TRAIN to map its dataset ids to class indices")
    # Detectron2 requires all training datasets to share their classes; the first one decides.
    name = cfg.DATASETS.TRAIN[0]
    meta = MetadataCatalog.get(name)
    if not hasattr(meta, "thing_dataset_id_to_contiguous_id"):
        # register_coco_instances records the id map only once the json is loaded
        # (the builtin COCO splits have it up front).
        DatasetCatalog.get(name)
    id_map = meta.get("thing_dataset_id_to_contiguous_id", None)
    if id_map is None:
        raise ValueError(
            f"{key}: dataset {name!r} has no 'thing_dataset_id_to_contiguous_id' metadata, "
            "so its category ids cannot be mapped to class indices"
        )
    missing = [i for i in ids if i not in id_map]
    if missing:
        raise ValueError(
            f"{key}: category id(s) {missing} are not in dataset {name!r}; "
            f"its category ids are {sorted(id_map)}"
        )
    return sorted(id_map[i] for i in ids)
