"""training_dataset_dicts: every box kept (also those Detectron2's loader drops for their
degenerate polygons), the mask coverage logged, and training refused without any mask."""
import json
import logging
import os

import pytest
from detectron2.config import get_cfg
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import register_coco_instances

import deepmac_d2
from deepmac_d2.data.training_data import training_dataset_dicts

from coco_fixture import make_coco2017


@pytest.fixture(scope="module")
def coco_train_json(tmp_path_factory):
    root = make_coco2017(str(tmp_path_factory.mktemp("d2_datasets")))
    with open(os.path.join(root, "coco", "annotations", "instances_train2017.json")) as f:
        return root, json.load(f)


def register(name, root, coco):
    path = os.path.join(root, f"{name}.json")
    with open(path, "w") as f:
        json.dump(coco, f)
    if name in DatasetCatalog.list():
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)
    register_coco_instances(name, {}, path, os.path.join(root, "coco", "train2017"))


def config(name, **head):
    cfg = get_cfg()
    deepmac_d2.add_deepmac_config(cfg)
    cfg.MODEL.MASK_ON = True
    cfg.DATASETS.TRAIN = (name,)
    for k, v in head.items():
        setattr(cfg.MODEL.ROI_MASK_HEAD, k, v)
    return cfg


def instances_by_image(dicts):
    return {os.path.basename(d["file_name"]): d["annotations"] for d in dicts}


def test_degenerate_polygons_become_box_only_and_the_table_counts_them(coco_train_json, caplog):
    root, coco = coco_train_json
    coco = json.loads(json.dumps(coco))
    non_crowd = [a for a in coco["annotations"] if not a["iscrowd"]]
    degenerate = non_crowd[0], non_crowd[3]  # first annotation of its image, and another one
    for a in degenerate:
        a["segmentation"] = [[1.0, 2.0, 3.0, 4.0]]  # two points: Detectron2 drops the annotation
    del non_crowd[5]["segmentation"]  # no key: kept by Detectron2 too, box-only here
    register("deepmac_test_degenerate", root, coco)
    with caplog.at_level(logging.INFO, logger="detectron2"):
        dicts = training_dataset_dicts(config("deepmac_test_degenerate"))
    files = {img["id"]: img["file_name"] for img in coco["images"]}
    by_image = instances_by_image(dicts)
    for a in degenerate:
        restored = [x for x in by_image[files[a["image_id"]]] if x["bbox"] == a["bbox"]]
        assert len(restored) == 1 and "segmentation" not in restored[0]
    total = len(non_crowd)
    assert sum(1 for d in dicts for a in d["annotations"] if not a.get("iscrowd")) == total
    assert "Kept 2 of the 2 annotation(s)" in caplog.text
    assert f"{total - 3} instance(s) with a mask train the mask head, 3 box-only instance(s)" in caplog.text


def test_no_mask_at_all_stops_before_training(coco_train_json):
    root, coco = coco_train_json
    coco = json.loads(json.dumps(coco))
    for a in coco["annotations"]:
        if not a["iscrowd"]:
            a.pop("segmentation")
    register("deepmac_test_nomask", root, coco)
    with pytest.raises(ValueError, match=r"MODEL.MASK_ON is True but no instance of DATASETS.TRAIN \('deepmac_test_nomask',\)"):
        training_dataset_dicts(config("deepmac_test_nomask"))


def test_no_allowed_class_with_a_mask_stops_before_training(coco_train_json):
    root, coco = coco_train_json
    register("deepmac_test_allowed", root, coco)
    with pytest.raises(ValueError, match="ALLOWED_CLASS_IDS"):
        training_dataset_dicts(config("deepmac_test_allowed", ALLOWED_CLASS_IDS=[90]))  # toothbrush: none drawn


def test_annotation_without_box_or_mask_is_dropped_and_counted(coco_train_json, caplog):
    root, coco = coco_train_json
    coco = json.loads(json.dumps(coco))
    a = next(a for a in coco["annotations"] if not a["iscrowd"])
    a["bbox"] = [10.0, 10.0, 0.0, 5.0]
    del a["segmentation"]
    b = [x for x in coco["annotations"] if not x["iscrowd"]][2]
    b["bbox"] = [10.0, 10.0, 0.0, 0.0]  # an empty box with a mask: kept (the mask gives the box)
    register("deepmac_test_nobox", root, coco)
    with caplog.at_level(logging.INFO, logger="detectron2"):
        dicts = training_dataset_dicts(config("deepmac_test_nobox"))
    assert "Dropped 1 annotation(s) with neither a valid box nor a mask" in caplog.text
    n = sum(1 for d in dicts for x in d["annotations"] if not x.get("iscrowd"))
    assert n == sum(1 for x in coco["annotations"] if not x["iscrowd"]) - 1
