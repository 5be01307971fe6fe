"""Masks for given boxes: BoxMaskPredictor, the predict_box_masks tool, the given-box mask IoU.

A tiny Mask R-CNN with random weights checks shapes and plumbing; a mask head whose
logits are a large constant makes the expected masks known (the box rectangles), so
the metric can be checked against areas read straight from the dataset's json.
"""
import importlib.util
import json
import os
import uuid

import numpy as np
import pycocotools.mask as mask_util
import pytest
import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import get_cfg
from detectron2.modeling import build_model
from detectron2.structures import Boxes, Instances
from PIL import Image

from deepmac_d2 import add_deepmac_config
from deepmac_d2.box_masks import BoxMaskPredictor
from deepmac_d2.data.synthetic import SyntheticConfig, prepare_synthetic, register_synthetic
from deepmac_d2.evaluation import given_box_iou
from deepmac_d2.evaluation import given_box_mask_iou, mask_iou

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NUM_CLASSES = 80  # voc_r50.yaml: COCO's classes
# Side of the constant head's ROI masks: finer than any test box, so bilinear pasting
# reproduces the box exactly (at the head's own 28, the corners of a box much wider than
# 28 px fall below 0.5).
MASK = 160
SURE = 50.0  # a logit whose sigmoid is 1.0 in float32


def tiny_cfg():
    cfg = get_cfg()
    add_deepmac_config(cfg)
    cfg.merge_from_file(os.path.join(REPO, "configs", "voc_r50.yaml"))
    cfg.merge_from_list([
        "MODEL.DEVICE", "cpu",
        "MODEL.WEIGHTS", "",
        "MODEL.RESNETS.DEPTH", 18,
        "MODEL.RESNETS.RES2_OUT_CHANNELS", 64,
        "MODEL.RESNETS.NORM", "BN",  # random FrozenBN statistics make activations explode
        "MODEL.FPN.OUT_CHANNELS", 32,
        "MODEL.ROI_BOX_HEAD.FC_DIM", 32,
        "MODEL.ROI_MASK_HEAD.CONV_DIM", 8,
        "MODEL.ROI_MASK_HEAD.ALLOWED_CLASS_IDS", [],  # no training dataset to map ids through
        # 100x150 test images become 96x144: boxes really are rescaled on the way in and out.
        "INPUT.MIN_SIZE_TEST", 96,
        "INPUT.MAX_SIZE_TEST", 160,
        "DATALOADER.NUM_WORKERS", 0,
    ])
    return cfg


@pytest.fixture(scope="module")
def cfg():
    return tiny_cfg()


@pytest.fixture(scope="module")
def model(cfg):
    torch.manual_seed(0)
    return build_model(cfg).eval()


@pytest.fixture(scope="module")
def image():
    return np.random.default_rng(0).integers(0, 256, (100, 150, 3), dtype=np.uint8)


def constant_mask_head(monkeypatch, model, logits_for_channel):
    """Make the mask head output ``logits_for_channel`` (C values) everywhere in each ROI."""
    channel_logits = torch.tensor(logits_for_channel, dtype=torch.float32)[None, :, None, None]
    monkeypatch.setattr(
        model.roi_heads.mask_head, "layers",
        lambda x: channel_logits.expand(len(x), -1, MASK, MASK).clone(),
    )


def rectangles(boxes, height, width):
    masks = np.zeros((len(boxes), height, width), dtype=bool)
    for m, (x0, y0, x1, y1) in zip(masks, np.asarray(boxes, dtype=int)):
        m[max(y0, 0) : y1, max(x0, 0) : x1] = True
    return masks


def test_mask_iou_hand_computed():
    pred = torch.zeros(4, 4, 4, dtype=torch.bool)
    gt = torch.zeros(4, 4, 4, dtype=torch.bool)
    pred[0, :2, :] = True  # top two rows: 8 px
    gt[0, :, :2] = True  # left two columns: 8 px, 4 shared, union 12
    pred[1, 1:3, 1:3] = gt[1, 1:3, 1:3] = True  # identical
    pred[2, 0, 0] = gt[2, 3, 3] = True  # disjoint
    # 3: both empty
    iou = mask_iou(pred, gt)
    assert iou.tolist() == pytest.approx([4 / 12, 1.0, 0.0, 1.0])
    with pytest.raises(ValueError, match="shapes differ"):
        mask_iou(pred, gt[:, :3])


def test_one_mask_per_box_at_the_original_size(cfg, model, image):
    predictor = BoxMaskPredictor(cfg, model=model)
    boxes = [[10, 10, 60, 80], [30.5, 5.2, 140.7, 99.9], [100, 40, 150, 100]]
    out = predictor(image, boxes)
    assert out.masks.shape == out.probabilities.shape == (3, 100, 150)
    assert out.masks.dtype == bool and out.probabilities.dtype == np.float32
    assert 0 <= out.probabilities.min() and out.probabilities.max() <= 1
    # Masks never leave their box (bilinear pasting lets probabilities spill into the
    # pixels at its border, but below 0.5).
    outside = ~rectangles([[10, 10, 60, 80], [30, 5, 141, 100], [100, 40, 150, 100]], 100, 150)
    assert not (out.masks & outside).any() and (out.probabilities[outside] < 0.5).all()


def test_constant_head_gives_the_box_rectangles(cfg, model, image, monkeypatch):
    constant_mask_head(monkeypatch, model, [SURE])
    boxes = np.array([[10, 10, 60, 80], [0, 50, 150, 100], [37, 3, 41, 9]], dtype=np.float32)
    out = BoxMaskPredictor(cfg, model=model)(image, boxes)
    expected = rectangles(boxes, 100, 150)
    assert np.array_equal(out.masks, expected)
    assert mask_iou(torch.from_numpy(out.masks), torch.from_numpy(expected)).tolist() == [1.0] * 3
    # Boxes reaching past the image are clipped to it.
    clipped = BoxMaskPredictor(cfg, model=model)(image, [[-20, 90, 170, 130]])
    assert np.array_equal(clipped.masks, rectangles([[0, 90, 150, 100]], 100, 150))


def test_per_class_head_uses_each_boxs_class(model, image, monkeypatch):
    logits = [-SURE] * NUM_CLASSES
    logits[3] = SURE
    constant_mask_head(monkeypatch, model, logits)
    predictor = BoxMaskPredictor(model, class_agnostic=False, augmentations=[])
    out = predictor(image, [[10, 10, 60, 80], [10, 10, 60, 80]], class_ids=[3, 5])
    assert np.array_equal(out.masks[0], rectangles([[10, 10, 60, 80]], 100, 150)[0])
    assert not out.masks[1].any()
    with pytest.raises(ValueError, match="one mask per class.*pass class_ids"):
        predictor(image, [[10, 10, 60, 80]])


def test_no_boxes_and_boxes_outside_the_image(cfg, model, image):
    predictor = BoxMaskPredictor(cfg, model=model)
    for empty in ([], np.zeros((0, 4)), torch.zeros(0, 4)):
        out = predictor(image, empty)
        assert out.masks.shape == out.probabilities.shape == (0, 100, 150)
    out = predictor(image, [[200, 10, 260, 50], [10, 10, 60, 80]])
    assert out.masks.shape == (2, 100, 150) and not out.masks[0].any()


@pytest.mark.parametrize(
    "image_arg,boxes,class_ids,error,message",
    [
        (np.zeros((100, 150), np.uint8), [[0, 0, 5, 5]], None, ValueError, r"H x W x 3.*100, 150"),
        (np.zeros((100, 150, 3), np.float32), [[0, 0, 5, 5]], None, TypeError, "uint8.*float32"),
        (None, [[0, 0, 5]], None, ValueError, r"shape \(N, 4\).*\(1, 3\)"),
        (None, [["a", "b", "c", "d"]], None, TypeError, "numbers"),
        (None, [[0, 0, 5, 5], [20, 20, 5, 5]], None, ValueError, r"box 1 .*x1 < x0.*not XYWH"),
        (None, [[0, 0, float("nan"), 5]], None, ValueError, r"finite.*\[0\]"),
        (None, [[0, 0, 5, 5]], [1, 2], ValueError, "2 class id.*1 box"),
        (None, [[0, 0, 5, 5]], [NUM_CLASSES], ValueError, rf"\[{NUM_CLASSES}\] are outside"),
        (None, [[0, 0, 5, 5]], [0.5], TypeError, "integers"),
    ],
)
def test_bad_input_says_what_is_wrong(
    cfg, model, image, image_arg, boxes, class_ids, error, message
):
    predictor = BoxMaskPredictor(cfg, model=model)
    with pytest.raises(error, match=message):
        predictor(image if image_arg is None else image_arg, boxes, class_ids)


def load_tool():
    path = os.path.join(REPO, "tools", "predict_box_masks.py")
    spec = importlib.util.spec_from_file_location("predict_box_masks", path)
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    return tool


def test_command_prints_areas_and_writes_a_picture(cfg, model, image, tmp_path, capsys):
    config_file, image_file = tmp_path / "cfg.yaml", tmp_path / "in.png"
    output = tmp_path / "out.png"
    config_file.write_text(cfg.dump())
    DetectionCheckpointer(model, save_dir=str(tmp_path)).save("model")
    Image.fromarray(image).save(image_file)
    tool = load_tool()
    args = ["--config-file", str(config_file), "--weights", str(tmp_path / "model.pth"),
            "--image", str(image_file), "--boxes", "10,10,60,80; 200,0,210,10", "--classes", "0,14"]
    result = tool.main(args + ["--output", str(output), "INPUT.MIN_SIZE_TEST", "64"])
    printed = capsys.readouterr().out
    assert "box 0 class 0 (person) [10, 10, 60, 80]: mask area" in printed
    assert "box 1 class 14 (bird) [150, 0, 150, 10]: mask area 0 px" in printed
    assert f"mask area {int(result.masks[0].sum())} px" in printed
    with Image.open(output) as picture:
        assert picture.size == (150, 100)
    with pytest.raises(SystemExit, match="item 1 .* has 3 numbers, expected 4"):
        tool.main(args[:-4] + ["--boxes", "1,2,3,4;1,2,3"])


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("synthetic"))
    prepare_synthetic(root, num_train=2, num_val=4, cfg=SyntheticConfig(image_size=100))
    prefix = f"box_masks_{uuid.uuid4().hex[:8]}"
    register_synthetic(root, name_prefix=prefix)
    with open(os.path.join(root, "annotations", "val.json")) as f:
        return f"{prefix}_val", json.load(f)


def expected_means(coco, iou_of_annotation, subsets):
    """Instance means of ``iou_of_annotation`` computed from the json alone."""
    ious = {a["id"]: iou_of_annotation(a) for a in coco["annotations"]}
    by_category = {}
    for a in coco["annotations"]:
        by_category.setdefault(a["category_id"], []).append(ious[a["id"]])

    def mean(category_ids):
        values = [v for c in category_ids for v in by_category.get(c, [])]
        return float(np.mean(values)) if values else float("nan")

    return {
        "mIoU": float(np.mean(list(ious.values()))),
        "num_instances": len(ious),
        "per_category": {c: mean([c]) for c in sorted(by_category)},
        "per_subset": {name: mean(ids) for name, ids in subsets.items()},
    }


def assert_results_equal(got, expected):
    assert got["num_instances"] == expected["num_instances"]
    assert got["mIoU"] == pytest.approx(expected["mIoU"], abs=1e-9)
    assert got["per_category"] == pytest.approx(expected["per_category"], abs=1e-9)
    assert got["per_subset"] == pytest.approx(expected["per_subset"], abs=1e-9, nan_ok=True)


def subsets_of(dataset_name):
    from detectron2.data import MetadataCatalog

    meta = MetadataCatalog.get(dataset_name)
    return {"seen": meta.seen_class_ids, "novel": meta.novel_class_ids}


def test_given_box_iou_of_a_perfect_model_is_one(cfg, model, synthetic, monkeypatch):
    name, coco = synthetic
    images = {im["file_name"]: im for im in coco["images"]}

    def ground_truth_masks(model, batched_inputs, boxes, classes):
        """A perfect mask branch: each box's json mask (checked to be that box's)."""
        results = []
        for x, b in zip(batched_inputs, boxes):
            im = images[os.path.basename(x["file_name"])]
            anns = [a for a in coco["annotations"] if a["image_id"] == im["id"]]
            anns.sort(key=lambda a: a["id"])
            xywh = torch.tensor([a["bbox"] for a in anns], dtype=torch.float32)
            assert torch.equal(b, torch.cat([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], 1))
            out = Instances((x["height"], x["width"]), pred_boxes=Boxes(b))
            out.pred_masks = torch.stack([torch.from_numpy(mask_util.decode({
                "size": a["segmentation"]["size"], "counts": a["segmentation"]["counts"].encode()
            })).bool() for a in anns])
            results.append(out)
        return results

    monkeypatch.setattr(given_box_iou, "masks_at_given_boxes", ground_truth_masks)
    subsets = subsets_of(name)
    got = given_box_mask_iou(cfg, model, name, class_subsets=subsets, batch_size=3)
    assert_results_equal(got, expected_means(coco, lambda a: 1.0, subsets))
    assert got["mIoU"] == 1.0


def test_given_box_iou_of_box_shaped_masks(cfg, model, synthetic, monkeypatch):
    """A constant head fills each box, so its IoU with an instance is mask area / box area."""
    name, coco = synthetic
    constant_mask_head(monkeypatch, model, [SURE])
    model.train()
    subsets = subsets_of(name)
    got = given_box_mask_iou(cfg, model, name, class_subsets=subsets, batch_size=3)
    assert model.training  # the caller's mode is restored
    model.eval()
    expected = expected_means(coco, lambda a: a["area"] / (a["bbox"][2] * a["bbox"][3]), subsets)
    assert_results_equal(got, expected)
    assert 0 < got["mIoU"] < 1
