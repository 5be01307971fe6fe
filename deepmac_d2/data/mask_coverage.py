"""Which instances of a dataset have a mask: the predicate, the per-class table, the check.

In the partially supervised setting every instance has a box but only some have a
mask, either because their class has none (the paper's VOC / non-VOC splits) or because
nobody outlined that instance. Detectron2 has no notion of a box-only instance: its
``load_coco_json`` keeps an annotation whose ``segmentation`` is missing or ``[]`` and
its mapper then fails on it. Here "has a mask" is decided once, by
:func:`annotation_has_mask`, for the mapper and for the table a user reads at
data-loading time (:func:`log_mask_coverage`), which says what the mask head will
learn from.
"""
import dataclasses
import itertools
import logging
from typing import Iterable, List, Optional, Sequence

import numpy as np
from tabulate import tabulate
from termcolor import colored

__all__ = [
    "MaskCoverage",
    "annotation_has_mask",
    "check_masks_present",
    "count_mask_coverage",
    "log_mask_coverage",
    "valid_polygons",
]

logger = logging.getLogger(__name__)


def valid_polygons(segmentation) -> list:
    """The polygons of a COCO polygon list that describe an area: an even number of
    coordinates, at least three points (Detectron2's ``load_coco_json`` rule)."""
    return [p for p in segmentation if len(p) % 2 == 0 and len(p) >= 6]


def annotation_has_mask(anno: dict) -> bool:
    """Whether a Detectron2 annotation dict carries a usable instance mask.

    True for a COCO RLE dict with ``counts`` (compressed or not), a polygon list with at
    least one valid polygon (:func:`valid_polygons`), or a 2-D binary mask array (the
    bitmask form Detectron2's ``annotations_to_instances`` accepts). False for a missing
    key, ``None``, ``[]``, ``{}`` or a list of degenerate polygons: such an instance is
    box-only, it trains RPN and the box head but not the mask head.
    """
    segm = anno.get("segmentation", None)
    if segm is None:
        return False
    if isinstance(segm, dict):
        counts = segm.get("counts", None)
        return counts is not None and len(counts) > 0
    if isinstance(segm, np.ndarray):
        return segm.ndim == 2
    if isinstance(segm, (list, tuple)):
        return len(valid_polygons(segm)) > 0
    raise TypeError(
        f"Annotation {anno.get('id', '')!r}: unsupported 'segmentation' of type "
        f"{type(segm).__name__}; expected polygons (list of lists), a COCO RLE dict, "
        "or a 2-D numpy mask"
    )


@dataclasses.dataclass
class MaskCoverage:
    """Per-class counts of non-crowd instances with a mask and box-only (without)."""

    class_names: List[str]
    with_mask: List[int]
    box_only: List[int]

    @property
    def total_with_mask(self) -> int:
        return sum(self.with_mask)

    @property
    def total_box_only(self) -> int:
        return sum(self.box_only)


def count_mask_coverage(dataset_dicts: Iterable[dict], class_names: Sequence[str]) -> MaskCoverage:
    """Count, per contiguous class id, the instances with and without a mask.

    ``dataset_dicts`` are as ``DatasetCatalog.get`` returns them (contiguous
    ``category_id``). Crowd annotations are left out, as training leaves them out
    (Detectron2's mapper drops them; its class histogram does not count them).
    """
    n = len(class_names)
    with_mask, box_only = [0] * n, [0] * n
    for record in dataset_dicts:
        for anno in record.get("annotations", ()):
            if anno.get("iscrowd", 0):
                continue
            c = anno["category_id"]
            if not 0 <= c < n:
                raise ValueError(
                    f"{record.get('file_name', record.get('image_id'))}: category_id {c} is "
                    f"outside [0, {n}) for {n} class names; dataset dicts must carry "
                    "contiguous ids (as DatasetCatalog.get returns them)"
                )
            if annotation_has_mask(anno):
                with_mask[c] += 1
            else:
                box_only[c] += 1
    return MaskCoverage(list(class_names), with_mask, box_only)


def format_mask_coverage(coverage: MaskCoverage) -> str:
    """The table of :func:`log_mask_coverage`, laid out like Detectron2's class histogram
    (three classes per row, names shortened past 13 characters, a total cell)."""
    per_class = 3
    cols = 3 * min(per_class, len(coverage.class_names))

    def short_name(x):
        return x[:11] + ".." if len(x) > 13 else x

    data = list(
        itertools.chain(
            *[
                [short_name(name), w, b]
                for name, w, b in zip(coverage.class_names, coverage.with_mask, coverage.box_only)
            ]
        )
    )
    if len(data) % cols:
        data.extend([None] * (cols - len(data) % cols))
    if len(coverage.class_names) > 1:
        data.extend(["total", coverage.total_with_mask, coverage.total_box_only])
    rows = itertools.zip_longest(*[data[i::cols] for i in range(cols)])
    return tabulate(
        rows,
        headers=["category", "#with mask", "#box only"] * (cols // 3),
        tablefmt="pipe",
        numalign="left",
        stralign="center",
    )


def log_mask_coverage(
    dataset_dicts: Iterable[dict],
    class_names: Sequence[str],
    log: Optional[logging.Logger] = None,
) -> MaskCoverage:
    """Log one table of instances with a mask / box-only per class, and return the counts.

    Args:
        dataset_dicts: Detectron2 dataset dicts (contiguous ``category_id``).
        class_names: the dataset's ``thing_classes``.
        log: where to log (default: this module's logger). Detectron2's ``default_setup``
            gives handlers to the ``detectron2`` logger only; pass that one (or a logger
            from ``setup_logger``) for the table to reach the terminal and log file.
    """
    coverage = count_mask_coverage(dataset_dicts, class_names)
    (log or logger).info(
        f"Mask coverage of {len(coverage.class_names)} categories: "
        f"{coverage.total_with_mask} instance(s) with a mask train the mask head, "
        f"{coverage.total_box_only} box-only instance(s) train RPN and the box head only "
        "(crowd annotations excluded):\n" + colored(format_mask_coverage(coverage), "cyan")
    )
    return coverage


def check_masks_present(
    coverage: MaskCoverage,
    mask_on: bool,
    dataset_names: Sequence[str] = (),
    allowed_classes: Optional[Sequence[int]] = None,
) -> None:
    """Stop before training when the mask head would have no instance to learn from.

    Args:
        coverage: the training data's counts (:func:`count_mask_coverage`).
        mask_on: ``MODEL.MASK_ON``; without it nothing is checked.
        dataset_names: ``DATASETS.TRAIN``, named in the error.
        allowed_classes: contiguous class ids of ``MODEL.ROI_MASK_HEAD.ALLOWED_CLASS_IDS``
            (None: every class); the masks of other classes do not train the head either.

    Raises:
        ValueError: no instance has a mask (or none of an allowed class), with the fix.
    """
    if not mask_on:
        return
    where = f"DATASETS.TRAIN {tuple(dataset_names)}" if dataset_names else "the training data"
    total = coverage.total_with_mask + coverage.total_box_only
    if coverage.total_with_mask == 0:
        raise ValueError(
            f"MODEL.MASK_ON is True but no instance of {where} has a mask "
            f"({total} non-crowd instance(s), all box-only: no valid 'segmentation'), so the "
            "mask head has nothing to learn from. Give masks to some instances (e.g. "
            "tools/make_partial_annotations.py --masks-for ...), or set MODEL.MASK_ON False "
            "to train a detector without masks."
        )
    if allowed_classes is None:
        return
    allowed = sorted(set(int(c) for c in allowed_classes))
    if sum(coverage.with_mask[c] for c in allowed if 0 <= c < len(coverage.with_mask)) == 0:
        masked = [name for name, w in zip(coverage.class_names, coverage.with_mask) if w]
        raise ValueError(
            f"MODEL.MASK_ON is True but no instance of {where} whose class is in "
            f"MODEL.ROI_MASK_HEAD.ALLOWED_CLASS_IDS (classes "
            f"{[coverage.class_names[c] for c in allowed if 0 <= c < len(coverage.class_names)]}) "
            f"has a mask, so the mask head has nothing to learn from. The classes with masks "
            f"are {masked}: allow some of them, or empty ALLOWED_CLASS_IDS to allow all."
        )
