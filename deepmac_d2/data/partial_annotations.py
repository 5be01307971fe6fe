"""Make a partially supervised COCO json from a full one: every box kept, some masks removed.

The paper's setting keeps masks for a class subset (VOC -> non-VOC); users' data also lacks
masks instance by instance (nobody outlined them). Both are simulated here on a json with
masks everywhere, so one dataset gives the fully and the partially supervised run:

* ``masks_for``: the category ids whose instances keep their masks; every other class
  becomes box-only (the real form of the class split, where ALLOWED_CLASS_IDS only
  emulates it on full data);
* ``drop_mask_fraction``: of each class's remaining masks, this fraction is removed
  too, chosen by a seeded generator.

A removed mask is a deleted ``segmentation`` key (Detectron2's ``load_coco_json`` and
pycocotools read such an annotation as box-only); the annotation, its ``bbox``, ``area``
and everything else stay. Crowd annotations are left alone: they never train a mask, and
evaluation reads their masks. Used by ``tools/make_partial_annotations.py`` and by the
synthetic dataset's ``train_partial.json``.
"""
import copy
import dataclasses
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
from detectron2.data.datasets.builtin_meta import COCO_CATEGORIES
from tabulate import tabulate

from .class_splits import CLASS_SPLIT_PRESETS
from .mask_coverage import annotation_has_mask

__all__ = ["PartialSummary", "format_summary", "make_partial_annotations", "parse_masks_for"]


def _coco_name_mismatches(ids, names: Mapping[int, str]) -> List[str]:
    """The json categories among ``ids`` whose name is not COCO's for that id."""
    coco = {c["id"]: c["name"] for c in COCO_CATEGORIES if c.get("isthing")}
    return [
        f"{i} is {names[i]!r} (COCO: {coco[i]!r})"
        for i in sorted(ids)
        if i in coco and i in names and names[i].strip().lower() != coco[i]
    ]


def parse_masks_for(
    spec: str,
    categories: Sequence[dict],
    presets: Optional[Mapping[str, Sequence[int]]] = None,
    option: str = "--masks-for",
) -> List[int]:
    """Parse ``--masks-for`` (``"voc"``, ``"nonvoc"``, ``"1,2,3"``, class names ``"cat,dog"``
    or a mix like ``"voc,11"``) into sorted category ids of the json whose ``categories``
    are given.

    An id given by number must be in the json. A preset counts with those of its ids the
    json has (a COCO subset may hold only some VOC classes), at least one; the COCO presets
    also check that the json's names for them are COCO's, since on another dataset the same
    numbers mean other classes. ``presets`` replace the COCO ones, e.g. a dataset's own
    split (then names are not checked); ``option`` is the name errors give the spec.
    """
    names = {int(c["id"]): str(c.get("name", "")) for c in categories}
    known = sorted(names)
    coco_presets = presets is None
    presets = CLASS_SPLIT_PRESETS if presets is None else presets
    items = [s.strip() for s in str(spec).split(",") if s.strip()]
    if not items:
        raise ValueError(f"{option} {spec!r} names no class; give {'|'.join(presets)} or ids")
    ids = set()
    for item in items:
        if item.isdigit():
            ids.add(int(item))
            continue
        if item.lower() not in presets:
            by_name = [i for i in known if names[i] == item]
            if not by_name:
                raise ValueError(
                    f"{option}: {item!r} is neither a category id, a class name of the json "
                    f"({', '.join(sorted(names.values()))}) nor a preset ({', '.join(sorted(presets))})"
                )
            ids.update(by_name)
            continue
        found = set(int(i) for i in presets[item.lower()]) & set(known)
        if not found:
            raise ValueError(
                f"{option}: none of preset {item!r}'s category ids "
                f"{sorted(presets[item.lower()])} is in the json; its category ids are {known}"
            )
        wrong = _coco_name_mismatches(found, names) if coco_presets else []
        if wrong:
            raise ValueError(
                f"{option}: preset {item!r} names COCO classes, but in this json category "
                f"{'; '.join(wrong[:3])}{' ...' if len(wrong) > 3 else ''}: give its category ids instead"
            )
        ids.update(found)
    missing = sorted(ids - set(known))
    if missing:
        raise ValueError(
            f"{option} {spec!r}: category id(s) {missing} are not in the json; "
            f"its category ids are {known}"
        )
    return sorted(ids)


@dataclasses.dataclass
class PartialSummary:
    """Per category id: annotations (non-crowd), masks in the input, masks removed."""

    names: Dict[int, str]
    boxes: Dict[int, int]
    masks_in: Dict[int, int]
    removed: Dict[int, int]
    crowd: int

    def masks_out(self, cid: int) -> int:
        return self.masks_in[cid] - self.removed[cid]


def make_partial_annotations(
    coco: dict,
    masks_for: Optional[Sequence[int]] = None,
    drop_mask_fraction: float = 0.0,
    seed: int = 0,
) -> Tuple[dict, PartialSummary]:
    """Return a copy of the COCO dict ``coco`` with masks removed, and what was done.

    Args:
        coco: a COCO instances dict (``images``, ``annotations``, ``categories``).
        masks_for: category ids that keep their masks (see :func:`parse_masks_for`);
            None keeps every class's.
        drop_mask_fraction: in [0, 1]: of each class's masks that are kept by
            ``masks_for``, remove round(fraction x count) (Python's round: halves to
            even, 2.5 -> 2), chosen by ``seed``.
        seed: the generator's seed; same input and arguments, same output.
    """
    if not 0.0 <= drop_mask_fraction <= 1.0:
        raise ValueError(f"--drop-mask-fraction must be in [0, 1], got {drop_mask_fraction}")
    names = {int(c["id"]): c.get("name", str(c["id"])) for c in coco["categories"]}
    if masks_for is not None:
        unknown = sorted(set(int(c) for c in masks_for) - set(names))
        if unknown:
            raise ValueError(
                f"masks_for: category id(s) {unknown} are not in the json; "
                f"its category ids are {sorted(names)}"
            )
        keep_classes = set(int(c) for c in masks_for)
    else:
        keep_classes = set(names)
    out = {k: v for k, v in coco.items() if k != "annotations"}
    annotations = copy.deepcopy(coco["annotations"])
    out["annotations"] = annotations

    summary = PartialSummary(names, dict.fromkeys(names, 0), dict.fromkeys(names, 0), dict.fromkeys(names, 0), 0)
    kept_masks: Dict[int, List[int]] = {c: [] for c in names}  # per class: annotation indices
    for index, anno in enumerate(annotations):
        cid = int(anno["category_id"])
        if cid not in names:
            raise ValueError(
                f"annotation {anno.get('id', index)!r} has category_id {cid}, which is not in "
                f"the json's categories {sorted(names)}"
            )
        if anno.get("iscrowd", 0):
            summary.crowd += 1
            continue
        summary.boxes[cid] += 1
        if not annotation_has_mask(anno):
            # Already box-only: drop a leftover [] / degenerate polygon so every box-only
            # annotation of the output has the same form.
            anno.pop("segmentation", None)
            continue
        summary.masks_in[cid] += 1
        if cid in keep_classes:
            kept_masks[cid].append(index)
        else:
            del anno["segmentation"]
            summary.removed[cid] += 1

    rng = np.random.default_rng(seed)
    for cid in sorted(kept_masks):  # a fixed order: the draws do not depend on dict order
        candidates = kept_masks[cid]
        count = int(round(drop_mask_fraction * len(candidates)))
        for i in rng.choice(len(candidates), size=count, replace=False) if count else ():
            del annotations[candidates[i]]["segmentation"]
        summary.removed[cid] += count

    out["info"] = dict(
        coco.get("info") or {},
        partial_annotations={
            "masks_for": None if masks_for is None else sorted(keep_classes),
            "drop_mask_fraction": drop_mask_fraction,
            "seed": seed,
        },
    )
    return out, summary


def format_summary(summary: PartialSummary) -> str:
    """One row per category: its boxes, masks in the input, masks removed, masks left;
    then the totals."""
    rows = [
        [cid, name, summary.boxes[cid], summary.masks_in[cid], summary.removed[cid], summary.masks_out(cid)]
        for cid, name in sorted(summary.names.items())
    ]
    rows.append(["", "total"] + [sum(r[i] for r in rows) for i in range(2, 6)])
    table = tabulate(
        rows,
        headers=["id", "category", "#boxes", "#masks in", "#removed", "#masks out"],
        tablefmt="pipe",
        numalign="left",
        stralign="center",
    )
    if summary.crowd:
        table += f"\n{summary.crowd} crowd annotation(s) left unchanged (not counted above)."
    return table
