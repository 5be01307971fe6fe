"""The synthetic dataset, checked against pycocotools and Detectron2's own loaders."""
import importlib.util
import json
import os

import numpy as np
import pycocotools.mask as mask_util
import pytest
from pycocotools.coco import COCO

import deepmac_d2  # noqa: F401  (registers the datasets)
from deepmac_d2.data import synthetic
from deepmac_d2.data.synthetic import (
    CLASS_NAMES,
    NOVEL_CLASSES,
    SEEN_CLASSES,
    SyntheticConfig,
    prepare_synthetic,
    register_synthetic,
)
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import load_coco_json

NUM_TRAIN, NUM_VAL = 40, 8


def _read(root, *parts):
    with open(os.path.join(root, *parts), "rb") as f:
        return f.read()


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("synthetic"))
    assert prepare_synthetic(out, seed=3, num_train=NUM_TRAIN, num_val=NUM_VAL)
    return out


@pytest.fixture(scope="module")
def train(root):
    with open(os.path.join(root, "annotations", "train.json")) as f:
        return json.load(f)


def test_same_seed_same_bytes_other_seed_differs(tmp_path):
    a, b, c = (str(tmp_path / n) for n in "abc")
    for out, seed in ((a, 7), (b, 7), (c, 8)):
        prepare_synthetic(out, seed=seed, num_train=4, num_val=2)
    for split, n in (("train", 4), ("val", 2)):
        assert _read(a, "annotations", f"{split}.json") == _read(b, "annotations", f"{split}.json")
        assert _read(a, "annotations", f"{split}.json") != _read(c, "annotations", f"{split}.json")
        for i in range(n):
            assert _read(a, split, f"{i:06d}.png") == _read(b, split, f"{i:06d}.png")
            assert _read(a, split, f"{i:06d}.png") != _read(c, split, f"{i:06d}.png")


def test_loads_in_pycocotools_and_detectron2(root, train):
    coco = COCO(os.path.join(root, "annotations", "train.json"))
    assert len(coco.getImgIds()) == NUM_TRAIN
    assert sorted(coco.getCatIds()) == list(range(1, len(CLASS_NAMES) + 1))
    dicts = load_coco_json(os.path.join(root, "annotations", "train.json"), os.path.join(root, "train"))
    assert len(dicts) == NUM_TRAIN
    assert sum(len(d["annotations"]) for d in dicts) == len(train["annotations"])
    assert all(os.path.isfile(d["file_name"]) for d in dicts)


def test_box_and_area_match_the_decoded_mask(train):
    for ann in train["annotations"]:
        rle = ann["segmentation"]
        m = mask_util.decode(rle)
        ys, xs = np.nonzero(m)
        assert ann["bbox"] == [xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1]
        assert np.array_equal(ann["bbox"], mask_util.toBbox(rle))
        assert ann["area"] == m.sum() == mask_util.area(rle)
        assert ann["iscrowd"] == 0


def test_masks_in_an_image_are_disjoint_and_images_match_json(root, train):
    size = SyntheticConfig().image_size
    cover = {img["id"]: np.zeros((size, size), dtype=int) for img in train["images"]}
    for ann in train["annotations"]:
        cover[ann["image_id"]] += mask_util.decode(ann["segmentation"])
    assert max(c.max() for c in cover.values()) == 1
    assert all(img["height"] == img["width"] == size for img in train["images"])


def test_every_class_appears_and_masks_are_not_boxes(train):
    assert {a["category_id"] for a in train["annotations"]} == set(range(1, len(CLASS_NAMES) + 1))
    # Shapes with holes, bites and spikes: a box-filling mask head must fall short.
    fill = [a["area"] / (a["bbox"][2] * a["bbox"][3]) for a in train["annotations"]]
    assert np.mean(fill) < 0.75


def test_split_is_disjoint_balanced_and_covers_all_classes():
    assert not set(SEEN_CLASSES) & set(NOVEL_CLASSES)
    assert sorted(SEEN_CLASSES + NOVEL_CLASSES) == list(range(1, len(CLASS_NAMES) + 1))
    assert abs(len(SEEN_CLASSES) - len(NOVEL_CLASSES)) <= 1
    assert len(CLASS_NAMES) >= 12


def test_import_registers_lazily_with_split_metadata():
    for name in ("synthetic_train", "synthetic_val"):
        assert name in DatasetCatalog.list()
        meta = MetadataCatalog.get(name)
        assert meta.evaluator_type == "coco"
        assert meta.thing_classes == CLASS_NAMES
        assert meta.seen_class_ids == SEEN_CLASSES and meta.novel_class_ids == NOVEL_CLASSES
        assert meta.json_file.endswith(os.path.join("annotations", name.split("_")[-1] + ".json"))


def test_registered_dataset_loads(root):
    register_synthetic(root, name_prefix="synthetic_test")
    dicts = DatasetCatalog.get("synthetic_test_val")
    assert len(dicts) == NUM_VAL
    contiguous = MetadataCatalog.get("synthetic_test_val").thing_dataset_id_to_contiguous_id
    assert contiguous == {i + 1: i for i in range(len(CLASS_NAMES))}


def test_missing_json_names_path_and_command(tmp_path):
    root = str(tmp_path / "nothing_here")
    register_synthetic(root, name_prefix="synthetic_missing")
    with pytest.raises(FileNotFoundError) as err:
        DatasetCatalog.get("synthetic_missing_train")
    assert os.path.join(root, "annotations", "train.json") in str(err.value)
    assert f"prepare_synthetic.py --out {root}" in str(err.value)


def test_prepare_skips_same_params_and_redoes_changed_or_interrupted(tmp_path):
    out = str(tmp_path)
    assert prepare_synthetic(out, seed=1, num_train=2, num_val=1)
    assert not prepare_synthetic(out, seed=1, num_train=2, num_val=1)
    assert prepare_synthetic(out, seed=1, num_train=2, num_val=1, cfg=SyntheticConfig(clutter=0.0))
    os.remove(os.path.join(out, synthetic.PARAMS_FILE))  # as if killed before the end
    assert prepare_synthetic(out, seed=1, num_train=2, num_val=1, cfg=SyntheticConfig(clutter=0.0))
    assert sorted(os.listdir(os.path.join(out, "train"))) == ["000000.png", "000001.png"]


def test_knobs_are_validated_and_take_effect(tmp_path):
    with pytest.raises(ValueError):
        SyntheticConfig(num_classes=0)
    with pytest.raises(ValueError):
        SyntheticConfig(size_range=(0.5, 0.2))
    cfg = SyntheticConfig(num_classes=4, objects_per_image=(1, 1), textures=False)
    prepare_synthetic(str(tmp_path), num_train=10, num_val=1, cfg=cfg)
    with open(tmp_path / "annotations" / "train.json") as f:
        anns = json.load(f)["annotations"]
    assert len(anns) == 10 and {a["category_id"] for a in anns} <= {1, 2, 3, 4}


def test_cli_writes_dataset_and_preview(tmp_path):
    path = os.path.join(os.path.dirname(__file__), "..", "datasets", "prepare_synthetic.py")
    spec = importlib.util.spec_from_file_location("prepare_synthetic", path)
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    out = str(tmp_path)
    cli.main(["--out", out, "--num-train", "2", "--num-val", "2", "--image-size", "96", "--preview-images", "2"])
    with open(os.path.join(out, synthetic.PARAMS_FILE)) as f:
        assert json.load(f)["image_size"] == 96
    assert os.path.isfile(os.path.join(out, "preview.png"))


def test_partial_train_json_has_every_box_and_only_seen_masks(root, train):
    summary = synthetic.write_partial_train(root, SEEN_CLASSES)
    with open(os.path.join(root, "annotations", synthetic.PARTIAL_TRAIN_FILE)) as f:
        partial = json.load(f)
    assert partial["images"] == train["images"] and partial["categories"] == train["categories"]
    assert len(partial["annotations"]) == len(train["annotations"])
    for full, part in zip(train["annotations"], partial["annotations"]):
        assert {k: v for k, v in full.items() if k != "segmentation"} == {
            k: v for k, v in part.items() if k != "segmentation"
        }
        assert ("segmentation" in part) == (full["category_id"] in SEEN_CLASSES)
    novel = [a for a in train["annotations"] if a["category_id"] in NOVEL_CLASSES]
    assert novel and sum(summary.removed.values()) == len(novel)

    # Through Detectron2's loader and the registered name: box-only novel instances, kept.
    from deepmac_d2.data.mask_coverage import count_mask_coverage

    register_synthetic(root, name_prefix="synthetic_partial_test")
    dicts = DatasetCatalog.get("synthetic_partial_test_train_partial")
    assert sum(len(d["annotations"]) for d in dicts) == len(train["annotations"])
    cov = count_mask_coverage(dicts, CLASS_NAMES)
    for cid in NOVEL_CLASSES:
        assert cov.with_mask[cid - 1] == 0
    assert cov.total_box_only == len(novel)
    assert cov.total_with_mask == len(train["annotations"]) - len(novel)


def test_partial_json_is_derived_and_default_output_unchanged(tmp_path):
    out = str(tmp_path)
    assert prepare_synthetic(out, seed=1, num_train=3, num_val=1)
    assert sorted(os.listdir(os.path.join(out, "annotations"))) == ["train.json", "val.json"]
    with open(os.path.join(out, synthetic.PARAMS_FILE)) as f:
        params = json.load(f)
    # Asking for the partial json later regenerates nothing and leaves params.json alone.
    assert not prepare_synthetic(out, seed=1, num_train=3, num_val=1, partial_masks_for=[1])
    partial = os.path.join(out, "annotations", synthetic.PARTIAL_TRAIN_FILE)
    with open(partial) as f:
        assert {a["category_id"] for a in json.load(f)["annotations"] if "segmentation" in a} <= {1}
    with open(os.path.join(out, synthetic.PARAMS_FILE)) as f:
        assert json.load(f) == params
    # New images remove the partial json of the old ones.
    assert prepare_synthetic(out, seed=2, num_train=3, num_val=1)
    assert not os.path.exists(partial)


def test_missing_partial_json_names_the_flag(tmp_path):
    root = str(tmp_path / "nothing_here")
    register_synthetic(root, name_prefix="synthetic_missing_partial")
    with pytest.raises(FileNotFoundError, match="--partial-masks-for seen"):
        DatasetCatalog.get("synthetic_missing_partial_train_partial")


def test_cli_partial_masks_for(tmp_path, capsys):
    path = os.path.join(os.path.dirname(__file__), "..", "datasets", "prepare_synthetic.py")
    spec = importlib.util.spec_from_file_location("prepare_synthetic", path)
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    out = str(tmp_path)
    base = ["--out", out, "--num-train", "4", "--num-val", "1", "--preview-images", "0"]
    cli.main(base + ["--partial-masks-for", "novel", "--partial-drop-mask-fraction", "0.5"])
    with open(os.path.join(out, "annotations", synthetic.PARTIAL_TRAIN_FILE)) as f:
        partial = json.load(f)["annotations"]
    with open(os.path.join(out, "annotations", "train.json")) as f:
        full = json.load(f)["annotations"]
    masked = [a for a in partial if "segmentation" in a]
    assert {a["category_id"] for a in masked} <= set(NOVEL_CLASSES)
    per_class = {c: sum(a["category_id"] == c for a in full) for c in NOVEL_CLASSES}
    assert len(masked) == sum(c - int(round(0.5 * c)) for c in per_class.values())
    err = capsys.readouterr().err
    assert "#removed" in err and "total" in err
    with pytest.raises(SystemExit):
        cli.main(base + ["--partial-masks-for", "99"])
    assert "--partial-masks-for '99': category id(s) [99] are not in the json" in capsys.readouterr().err
