"""make_partial_annotations: its output checked against its input, annotation by annotation."""
import importlib.util
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import pycocotools.mask as mask_util
from detectron2.data.datasets.builtin_meta import COCO_CATEGORIES
from pycocotools.coco import COCO

from deepmac_d2.data.partial_annotations import (
    format_summary,
    make_partial_annotations,
    parse_masks_for,
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOOL = os.path.join(ROOT, "tools", "make_partial_annotations.py")

# COCO ids: person (1) and car (3) are VOC classes; fire hydrant (11), stop sign (13) are not.
CATEGORIES = [{"id": 1, "name": "person"}, {"id": 3, "name": "car"}, {"id": 11, "name": "fire hydrant"},
              {"id": 13, "name": "stop sign"}]
COUNTS = {1: 20, 3: 10, 11: 6, 13: 4}  # instances with a mask per class


def rle(i):
    m = np.zeros((32, 32), np.uint8)
    m[i % 20 : i % 20 + 8, 2:12] = 1
    r = mask_util.encode(np.asfortranarray(m))
    return {"size": [32, 32], "counts": r["counts"].decode("ascii")}


def coco_fixture():
    """Polygons and RLE alternating; plus, per class, one box-only annotation of each
    existing form (no key, [] and a degenerate polygon), and a crowd annotation."""
    annotations = []

    def add(cid, **extra):
        i = len(annotations)
        annotations.append(dict({"id": 100 + i, "image_id": 1 + i % 3, "category_id": cid,
                                 "bbox": [i, 2, 10, 8], "area": 80.0 + i, "iscrowd": 0}, **extra))

    for cid, n in COUNTS.items():
        for k in range(n):
            segm = [[2.0, 2.0, 12.0, 2.0, 12.0, 10.0]] if k % 2 else rle(k)
            add(cid, segmentation=segm)
        add(cid)
        add(cid, segmentation=[])
        add(cid, segmentation=[[1.0, 2.0, 3.0, 4.0]])
    add(1, segmentation=rle(0), iscrowd=1)
    return {
        "info": {"description": "fixture"},
        "images": [{"id": i, "file_name": f"{i}.png", "height": 32, "width": 32} for i in (1, 2, 3)],
        "annotations": annotations,
        "categories": CATEGORIES,
    }


def check_only_masks_changed(before, after):
    """Every annotation is there, in order, equal but for a missing segmentation."""
    assert [a["id"] for a in after["annotations"]] == [a["id"] for a in before["annotations"]]
    for a, b in zip(before["annotations"], after["annotations"]):
        assert {k: v for k, v in a.items() if k != "segmentation"} == {
            k: v for k, v in b.items() if k != "segmentation"
        }
        if "segmentation" in b:
            assert b["segmentation"] == a["segmentation"]
    for key in ("images", "categories"):
        assert after[key] == before[key]


def has_segm(coco):
    return {a["id"] for a in coco["annotations"] if "segmentation" in a}


def masked(coco, cids):
    """Ids of non-crowd annotations of classes ``cids`` with a real mask, by hand."""
    good = lambda s: isinstance(s, dict) or any(len(p) >= 6 for p in s)  # noqa: E731
    return {a["id"] for a in coco["annotations"]
            if a["category_id"] in cids and not a["iscrowd"] and a.get("segmentation") and good(a["segmentation"])}


def crowd(coco):
    return {a["id"] for a in coco["annotations"] if a["iscrowd"]}


def test_masks_for_voc_keeps_every_box_and_only_voc_masks():
    coco = coco_fixture()
    frozen = json.dumps(coco)
    out, summary = make_partial_annotations(coco, parse_masks_for("voc", CATEGORIES))
    assert json.dumps(coco) == frozen  # the input is not modified
    check_only_masks_changed(coco, out)
    assert has_segm(out) == masked(coco, {1, 3}) | crowd(coco)
    assert summary.boxes == {1: 23, 3: 13, 11: 9, 13: 7}
    assert summary.masks_in == COUNTS
    assert summary.removed == {1: 0, 3: 0, 11: 6, 13: 4}
    assert summary.crowd == 1
    assert out["info"]["partial_annotations"]["masks_for"] == [1, 3]


@pytest.mark.parametrize("fraction,removed", [(0.5, {1: 10, 3: 5}), (0.25, {1: 5, 3: 2}), (1.0, {1: 20, 3: 10})])
def test_drop_fraction_per_class(fraction, removed):
    coco = coco_fixture()
    out, summary = make_partial_annotations(coco, [1, 3], drop_mask_fraction=fraction, seed=4)
    check_only_masks_changed(coco, out)
    for cid, n in removed.items():  # round(fraction x masks) of each kept class
        assert len(masked(coco, {cid}) - has_segm(out)) == n
        assert summary.removed[cid] == n
    assert not masked(out, {11, 13})
    assert crowd(coco) <= has_segm(out)


def test_same_seed_same_output_other_seed_differs():
    coco = coco_fixture()
    a, _ = make_partial_annotations(coco, None, drop_mask_fraction=0.5, seed=1)
    b, _ = make_partial_annotations(coco_fixture(), None, drop_mask_fraction=0.5, seed=1)
    c, _ = make_partial_annotations(coco, None, drop_mask_fraction=0.5, seed=2)
    assert json.dumps(a) == json.dumps(b)
    assert has_segm(a) != has_segm(c) and len(has_segm(a)) == len(has_segm(c))
    # Every class keeps masks_for=None: half of each class's masks is gone.
    assert len(masked(coco, {11}) - has_segm(a)) == 3


def test_masks_for_parsing_and_bad_ids():
    # A preset counts with the ids the json has; a number must be there.
    assert parse_masks_for("voc,11", CATEGORIES) == [1, 3, 11]
    coco80 = [{"id": c["id"], "name": c["name"]} for c in COCO_CATEGORIES if c["isthing"]]
    assert parse_masks_for("nonvoc", coco80)[:4] == [8, 10, 11, 13] and len(parse_masks_for("nonvoc", coco80)) == 60
    with pytest.raises(ValueError, match=r"none of preset 'voc'.*its category ids are \[11, 13\]"):
        parse_masks_for("voc", CATEGORIES[2:])
    # The COCO presets on another dataset's ids 1, 2, ...: refused, naming the clash.
    shapes = [{"id": 1, "name": "ellipse"}, {"id": 2, "name": "hexagon"}, {"id": 8, "name": "arrow"}]
    with pytest.raises(ValueError, match=r"1 is 'ellipse' \(COCO: 'person'\); 2 is 'hexagon'"):
        parse_masks_for("voc", shapes)
    assert parse_masks_for("1,8", shapes) == [1, 8]
    assert parse_masks_for(" 13, 1 ", CATEGORIES) == [1, 13]
    with pytest.raises(ValueError) as err:
        parse_masks_for("1,5,7", CATEGORIES)
    assert "[5, 7]" in str(err.value) and "[1, 3, 11, 13]" in str(err.value)
    with pytest.raises(ValueError, match=r"'seen' is neither a category id, a class name of the json "
                       r"\(.+\) nor a preset \(nonvoc, voc\)"):
        parse_masks_for("seen", CATEGORIES)
    # Class names, alone or mixed with ids: the json's own.
    assert parse_masks_for("arrow,ellipse", shapes) == [1, 8]
    assert parse_masks_for("hexagon, 8", shapes) == [2, 8]
    assert parse_masks_for("seen", shapes, presets={"seen": [2]}) == [2]
    with pytest.raises(ValueError, match="must be in"):
        make_partial_annotations(coco_fixture(), None, drop_mask_fraction=1.5)


def test_summary_table():
    _, summary = make_partial_annotations(coco_fixture(), [1, 3], drop_mask_fraction=0.5)
    lines = format_summary(summary).splitlines()
    cells = [[c.strip() for c in line.split("|")[1:-1]] for line in lines if line.startswith("|")]
    assert cells[0] == ["id", "category", "#boxes", "#masks in", "#removed", "#masks out"]
    assert cells[2] == ["1", "person", "23", "20", "10", "10"]
    assert cells[4] == ["11", "fire hydrant", "9", "6", "6", "0"]
    assert cells[-1] == ["", "total", "52", "40", "25", "15"]
    assert lines[-1] == "1 crowd annotation(s) left unchanged (not counted above)."


def load_tool():
    spec = importlib.util.spec_from_file_location("make_partial_annotations", TOOL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_tool_as_a_subprocess(tmp_path):
    src, dst = str(tmp_path / "in.json"), str(tmp_path / "out.json")
    coco = coco_fixture()
    with open(src, "w") as f:
        json.dump(coco, f)

    args = ["--masks-for", "nonvoc", "--drop-mask-fraction", "0.5", "--seed", "3"]
    proc = subprocess.run([sys.executable, TOOL, src, dst, *args], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    with open(dst) as f:
        out = json.load(f)
    check_only_masks_changed(coco, out)
    kept = has_segm(out) - crowd(coco)
    assert kept <= masked(coco, {11, 13}) and len(kept) == 3 + 2
    rows = {c[1]: c for c in ([x.strip() for x in line.split("|")[1:-1]] for line in proc.stdout.splitlines()
                               if line.startswith("|"))}
    assert rows["stop sign"] == ["13", "stop sign", "7", "4", "2", "2"]
    assert rows["person"] == ["1", "person", "23", "20", "20", "0"]
    assert f"wrote {dst}" in proc.stdout
    # pycocotools reads the box-only annotations as annotations: nothing lost.
    assert len(COCO(dst).getAnnIds()) == len(coco["annotations"])

    # The same arguments again (in this process: a second interpreter start costs seconds).
    tool = load_tool()
    again = str(tmp_path / "again.json")
    tool.main([src, again, *args])
    with open(dst, "rb") as a, open(again, "rb") as b:
        assert a.read() == b.read()


def test_tool_errors(tmp_path, capsys):
    tool = load_tool()
    src = str(tmp_path / "in.json")
    with open(src, "w") as f:
        json.dump(coco_fixture(), f)
    with pytest.raises(SystemExit) as err:
        tool.main([src, str(tmp_path / "bad.json"), "--masks-for", "1,99"])
    assert not os.path.exists(tmp_path / "bad.json")
    assert "[99]" in str(err.value.code) and "its category ids are [1, 3, 11, 13]" in str(err.value.code)
    with pytest.raises(SystemExit) as err:
        tool.main([src, str(tmp_path / "x.json")])
    assert err.value.code == 2 and "nothing to remove" in capsys.readouterr().err
