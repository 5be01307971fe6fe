"""check_dataset_files: a missing dataset file is reported with its path and the fix."""
import os

import pytest
from detectron2.config import get_cfg
from detectron2.data import DatasetCatalog, MetadataCatalog

from deepmac_d2.data import check_dataset_files


def test_missing_builtin_coco_names_path_and_variable():
    # tests/conftest.py points DETECTRON2_DATASETS at a folder that does not exist.
    cfg = get_cfg()
    cfg.DATASETS.TRAIN = ("coco_2017_train",)
    cfg.DATASETS.TEST = ("coco_2017_val",)
    with pytest.raises(FileNotFoundError) as err:
        check_dataset_files(cfg)
    message = str(err.value)
    expected = os.path.join(
        os.environ["DETECTRON2_DATASETS"], "coco", "annotations", "instances_train2017.json"
    )
    assert expected in message
    assert "DETECTRON2_DATASETS" in message and "coco_2017_train" in message


def test_present_files_pass_and_other_roots_are_not_blamed_on_detectron2(tmp_path):
    name = "deepmac_test_dataset_check"
    json_file, image_root = tmp_path / "instances.json", tmp_path / "images"
    json_file.write_text("{}")
    image_root.mkdir()
    if name not in DatasetCatalog.list():
        DatasetCatalog.register(name, list)
    MetadataCatalog.get(name).set(json_file=str(json_file), image_root=str(image_root))
    cfg = get_cfg()
    cfg.DATASETS.TRAIN, cfg.DATASETS.TEST = (name,), ()
    check_dataset_files(cfg)

    image_root.rmdir()
    with pytest.raises(FileNotFoundError) as err:
        check_dataset_files(cfg)
    assert str(image_root) in str(err.value) and "DETECTRON2_DATASETS" not in str(err.value)


def test_unregistered_dataset():
    with pytest.raises(KeyError, match="no_such_dataset"):
        check_dataset_files(get_cfg(), ["no_such_dataset"])
