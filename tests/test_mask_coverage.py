"""Mask coverage: which annotations count as having a mask, the per-class table, the check."""
import logging

import numpy as np
import pytest
from pycocotools import mask as mask_util

from deepmac_d2.data.mask_coverage import (
    annotation_has_mask,
    check_masks_present,
    count_mask_coverage,
    log_mask_coverage,
)

SQUARE = [10.0, 10.0, 20.0, 10.0, 20.0, 20.0, 10.0, 20.0]  # a valid polygon: 4 points


def rle(compressed=True):
    m = np.zeros((8, 8), np.uint8)
    m[2:5, 3:6] = 1
    r = mask_util.encode(np.asfortranarray(m))
    if not compressed:  # the uncompressed COCO form: counts as a list of run lengths
        return {"size": [8, 8], "counts": [19, 3, 5, 3, 5, 3, 26]}
    return r


@pytest.mark.parametrize(
    "segm,expected",
    [
        (rle(), True),
        (dict(rle(), counts=rle()["counts"].decode()), True),  # str counts, as in a json
        (rle(compressed=False), True),
        ([SQUARE], True),
        ([[1.0, 2.0, 3.0], SQUARE], True),  # one invalid polygon beside a valid one
        ([np.array(SQUARE)], True),
        (np.zeros((8, 8), np.uint8), True),  # Detectron2's 2-D bitmask form
        ([], False),
        (None, False),
        ({}, False),
        ([[1.0, 2.0, 3.0, 4.0]], False),  # two points: no area
        ([[1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0]], False),  # odd length
        ([[]], False),
    ],
)
def test_annotation_has_mask(segm, expected):
    assert annotation_has_mask({"segmentation": segm}) is expected


def test_missing_segmentation_key_is_box_only():
    assert annotation_has_mask({"bbox": [0, 0, 4, 4], "category_id": 0}) is False


def test_unknown_segmentation_type_is_named():
    with pytest.raises(TypeError, match="'segmentation' of type str"):
        annotation_has_mask({"id": 7, "segmentation": "abc"})


def dataset():
    """Three classes; a crowd annotation, an image without annotations, every box-only form."""
    a = lambda c, segm=..., crowd=0: dict(  # noqa: E731
        {"category_id": c, "iscrowd": crowd, "bbox": [0, 0, 4, 4]},
        **({} if segm is ... else {"segmentation": segm}),
    )
    return [
        {"file_name": "0.png", "annotations": [a(0, [SQUARE]), a(0), a(1, rle()), a(2, [])]},
        {"file_name": "1.png", "annotations": [a(0, rle()), a(2, [[1.0, 2.0]]), a(2, rle(), crowd=1)]},
        {"file_name": "2.png", "annotations": []},
        {"file_name": "3.png", "annotations": [a(1, None), a(2, [SQUARE])]},
    ]


def test_counts_per_class_exclude_crowd():
    cov = count_mask_coverage(dataset(), ["a", "b", "c"])
    # By hand: class 0 masked in 0.png (polygon) and 1.png (RLE), box-only once in 0.png;
    # class 1 masked once (RLE), box-only once (None); class 2 masked once (3.png),
    # box-only twice ([] and a degenerate polygon); its crowd RLE is not counted.
    assert cov.with_mask == [2, 1, 1]
    assert cov.box_only == [1, 1, 2]
    assert (cov.total_with_mask, cov.total_box_only) == (4, 4)


def test_non_contiguous_category_id_is_named():
    with pytest.raises(ValueError, match=r"7\.png: category_id 5 is outside \[0, 3\)"):
        count_mask_coverage([{"file_name": "7.png", "annotations": [{"category_id": 5}]}], "abc")


def test_logged_table(caplog):
    names = ["a", "b", "c", "a_very_long_class_name"]
    records = dataset() + [{"annotations": [{"category_id": 3, "iscrowd": 0}]}]
    log = logging.getLogger("deepmac_test_mask_coverage")
    with caplog.at_level(logging.INFO, logger=log.name):
        cov = log_mask_coverage(records, names, log=log)
    assert cov.box_only == [1, 1, 2, 1]
    (message,) = [r.getMessage() for r in caplog.records]
    assert "4 instance(s) with a mask" in message and "5 box-only" in message
    lines = [line for line in message.splitlines() if line.startswith(("|", "\x1b[36m|"))]
    # A header, the separator, two rows of up to three classes, the total on its own row
    # (as in Detectron2's class histogram).
    assert len(lines) == 5
    assert lines[0].count("#with mask") == 3 and lines[0].count("#box only") == 3
    cells = lambda line: [c.strip() for c in line.split("|")[1:-1]]  # noqa: E731
    assert cells(lines[2]) == ["a", "2", "1", "b", "1", "1", "c", "1", "2"]
    assert cells(lines[3]) == ["a_very_long..", "0", "1"] + [""] * 6
    assert cells(lines[4].replace("\x1b[0m", "")) == ["total", "4", "5"] + [""] * 6


def test_check_masks_present():
    cov = count_mask_coverage(dataset(), ["a", "b", "c"])
    check_masks_present(cov, mask_on=True)
    check_masks_present(cov, mask_on=True, allowed_classes=[2])

    none = count_mask_coverage([{"annotations": [{"category_id": 0, "bbox": [0, 0, 1, 1]}]}], ["a"])
    check_masks_present(none, mask_on=False)  # a box-only detector is fine
    with pytest.raises(ValueError) as err:
        check_masks_present(none, mask_on=True, dataset_names=["mine_train"])
    for part in ("MODEL.MASK_ON", "('mine_train',)", "no instance", "1 non-crowd instance(s)"):
        assert part in str(err.value)

    masks_only_for_a = count_mask_coverage(
        [{"annotations": [{"category_id": 0, "segmentation": [SQUARE]}, {"category_id": 1}]}], "ab"
    )
    with pytest.raises(ValueError) as err:
        check_masks_present(masks_only_for_a, mask_on=True, allowed_classes=[1])
    for part in ("MODEL.ROI_MASK_HEAD.ALLOWED_CLASS_IDS", "['b']", "['a']"):
        assert part in str(err.value)
