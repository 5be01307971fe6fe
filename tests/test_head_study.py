"""The head study's statistics and its frozen-detector evaluation, against hand computations.

Student's t quantiles against the printed tables; the nested-design interval and the
paired differences worked by hand; ``evaluate_mask_head`` with a stand-in mask head whose
masks are known, so that its mask AP and IoU at GT boxes have exact expected values;
``train_mask_head`` on cached random features: the loss falls and only the head moves.
The study end to end (detectors as subprocesses, tables, plots) runs in the slow test.
"""
import copy
import json
import math
import os
import runpy
import subprocess
import sys

import numpy as np
import pytest
import torch
from detectron2.config import get_cfg
from detectron2.data import MetadataCatalog
from detectron2.layers import ShapeSpec
from detectron2.modeling import build_roi_heads
from detectron2.structures import BitMasks, Boxes, Instances

from deepmac_d2 import add_deepmac_config
from deepmac_d2.data.synthetic import SyntheticConfig, prepare_synthetic, register_synthetic
from harness.frozen_detector import (
    FrozenImages,
    evaluate_mask_head,
    frozen_feature_bytes,
    image_subset,
    precise_mask_head_bn,
    train_mask_head,
)
from harness.grid import mean_ci95, t_quantile
from deepmac_d2.modeling.hourglass import KerasBatchNorm2d

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "benchmarks", "head_study.py")


@pytest.mark.parametrize("df,expected", [(1, 12.706), (2, 4.303), (4, 2.776), (8, 2.306), (30, 2.042)])
def test_t_quantile_matches_the_printed_table(df, expected):
    assert t_quantile(0.975, df) == pytest.approx(expected, abs=1e-3)


def test_t_quantile_rejects_what_it_cannot_compute():
    with pytest.raises(ValueError, match="p=0.3"):
        t_quantile(0.3, 4)
    with pytest.raises(ValueError, match="df=0"):
        t_quantile(0.975, 0)


def test_nested_interval_by_hand():
    # Unit means 2, 5, 7: mean 14/3; sample sd sqrt(((-8/3)^2 + (1/3)^2 + (7/3)^2) / 2)
    # = sqrt(19/3); half width t(0.975, 2) * sd / sqrt(3) = 4.303 * 1.4530.
    mean, (low, high) = mean_ci95([[1.0, 3.0], [5.0, 5.0], [6.0, 8.0]])
    half = 4.302653 * math.sqrt(19 / 3) / math.sqrt(3)
    assert mean == pytest.approx(14 / 3)
    assert (low, high) == pytest.approx((14 / 3 - half, 14 / 3 + half), abs=1e-4)
    one_unit = mean_ci95([[1.0, 2.0, 3.0]])
    assert one_unit[0] == 2.0 and all(math.isnan(b) for b in one_unit[1])


def test_loss_tail_by_hand():
    """20 steps: the last tenth is steps 18-19, the tenth before 16-17; means over runs."""
    loss_tail = runpy.run_path(SCRIPT, run_name="head_study")["loss_tail"]
    a = [1.0] * 16 + [0.5, 0.7, 0.2, 0.4]
    b = [2.0] * 16 + [0.9, 0.9, 0.6, 0.6]
    tail = loss_tail([a, b])
    assert tail["last"] == pytest.approx((0.2 + 0.4 + 0.6 + 0.6) / 4)
    assert tail["drop"] == pytest.approx((0.5 + 0.7 + 0.9 + 0.9) / 4 - tail["last"])


def test_paired_differences_by_hand():
    script = runpy.run_path(SCRIPT, run_name="head_study")
    args = script["parse_args"](["--heads", "default,hourglass10", "--modes", "gt_boxes,proposals",
                                 "--det-seeds", "2", "--head-seeds", "2", "--data-root", "unused"])
    rows = []
    for d in range(2):
        for h in range(2):
            for head, mode, value in (("default", "gt_boxes", 10 + d), ("default", "proposals", 8),
                                      ("hourglass10", "gt_boxes", 13 + d + h),
                                      ("hourglass10", "proposals", 5 - h)):
                rows.append({"spec": {"head": head, "mode": mode, "det_seed": d, "head_seed": h},
                             "iou": float(value)})
    diffs = {x["claim"]: x for x in script["paired_differences"](rows, "iou", args)}
    deeper = diffs["hourglass10 - default, GT boxes"]
    # hourglass10 - default per (detector, head seed): 3 + h, i.e. [[3, 4], [3, 4]]:
    # equal unit means (3.5), so the interval has zero width.
    assert deeper["values"] == [[3.0, 4.0], [3.0, 4.0]]
    assert deeper["mean"] == 3.5 and deeper["ci"] == pytest.approx((3.5, 3.5))
    # default: GT boxes - proposals = 2 + d: unit means 2, 3.
    default = diffs["default: GT boxes - proposals"]
    half = 12.7062 * math.sqrt(0.5) / math.sqrt(2)
    assert default["mean"] == 2.5
    assert default["ci"] == pytest.approx((2.5 - half, 2.5 + half), abs=1e-3)
    assert set(diffs) == {"hourglass10 - default, GT boxes", "default: GT boxes - proposals",
                          "hourglass10: GT boxes - proposals"}


class _KnownMasks(torch.nn.Module):
    """A stand-in for the ROI heads in ``evaluate_mask_head``: ``forward_with_given_boxes``
    gives each box the mask ``fill(box)``, at the input size, as a mask head's
    28x28 probabilities would be pasted."""

    def __init__(self, fill):
        super().__init__()
        self.fill = fill

    def forward_with_given_boxes(self, features, instances):
        for inst in instances:
            h, w = inst.image_size
            masks = [self.fill(b, h, w) for b in inst.pred_boxes.tensor]
            inst.pred_masks = torch.stack(masks)[:, None] if masks else torch.zeros(0, 1, 28, 28)
        return instances


class _GroundTruthMasks(_KnownMasks):
    """Each given box gets its own ground-truth mask back, already at the image size
    (use with ``monkeypatch`` replacing detector_postprocess by the identity)."""

    def __init__(self, targets):
        super().__init__(None)
        self.lookup = {tuple(box.tolist()): mask for t in targets
                       for box, mask in zip(t.gt_boxes.tensor, t.gt_masks.tensor)}

    def forward_with_given_boxes(self, features, instances):
        for inst in instances:
            inst.pred_masks = torch.stack([self.lookup[tuple(b.tolist())] for b in inst.pred_boxes.tensor])
        return instances


def _box_mask(box, h, w):
    return torch.ones(28, 28)  # the whole box: pasted, the box itself


@pytest.fixture(scope="module")
def tiny_val(tmp_path_factory):
    """Two synthetic validation images, registered; their ground truth at the original
    size, as GivenBoxMapper gives it, with the detections set to the GT boxes."""
    root = str(tmp_path_factory.mktemp("hs_data"))
    prepare_synthetic(root, num_train=1, num_val=2, cfg=SyntheticConfig(image_size=64))
    register_synthetic(root, name_prefix="hs_test")
    cfg = get_cfg()
    add_deepmac_config(cfg)
    cfg.merge_from_list(["INPUT.MIN_SIZE_TEST", "64", "INPUT.MAX_SIZE_TEST", "64",
                         "INPUT.MASK_FORMAT", "bitmask"])
    from detectron2.data import DatasetCatalog
    from deepmac_d2.evaluation.given_box_iou import GivenBoxMapper
    mapper = GivenBoxMapper(cfg)
    mapped = [mapper(d) for d in DatasetCatalog.get("hs_test_val")]
    targets = [m["instances"] for m in mapped]
    images = FrozenImages(
        features=[{"p2": torch.zeros(1, 16, 16)} for _ in mapped],
        image_sizes=[(64, 64)] * len(mapped), original_sizes=[(64, 64)] * len(mapped),
        image_ids=[m["image_id"] for m in mapped], targets=targets,
        proposals=[Instances((64, 64)) for _ in mapped],
        detections=[Instances((64, 64), pred_boxes=Boxes(t.gt_boxes.tensor.clone()),
                              pred_classes=t.gt_classes.clone(), scores=torch.ones(len(t)))
                    for t in targets],
    )
    return images, targets


def test_evaluation_of_masks_that_fill_their_boxes(tiny_val):
    images, targets = tiny_val
    meta = MetadataCatalog.get("hs_test_val")
    seen, novel = list(meta.seen_class_ids), list(meta.novel_class_ids)
    scores = evaluate_mask_head(_KnownMasks(_box_mask), images, "hs_test_val",
                                {"seen": seen, "novel": novel})
    # A mask that fills its box: IoU with the GT mask = mask area / box area (pixels
    # whose centre lies in the box; the boxes of the synthetic shapes are integral).
    gt_masks = torch.cat([t.gt_masks.tensor for t in targets]).double()
    classes = torch.cat([t.gt_classes for t in targets])
    boxes = torch.cat([t.gt_boxes.tensor for t in targets])
    box_area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    iou = gt_masks.flatten(1).sum(1) / box_area.double()
    to_contiguous = meta.thing_dataset_id_to_contiguous_id
    for name, ids in (("seen", seen), ("novel", novel)):
        keep = torch.isin(classes, torch.tensor([to_contiguous[i] for i in ids]))
        assert scores[name]["IoU_at_GT"] == pytest.approx(float(iou[keep].mean()), abs=1e-6)
        assert 0 < scores[name]["IoU_at_GT"] < 1
        assert 0 <= scores[name]["AP"] < 100  # boxes for masks: not every threshold met


def test_evaluation_of_the_ground_truth_masks_is_perfect(tiny_val, monkeypatch):
    images, targets = tiny_val
    meta = MetadataCatalog.get("hs_test_val")
    # The masks are at the input (= original) size already: nothing to paste.
    monkeypatch.setattr("harness.frozen_detector.detector_postprocess", lambda inst, h, w: inst)
    scores = evaluate_mask_head(_GroundTruthMasks(targets), images, "hs_test_val",
                                {"seen": list(meta.seen_class_ids), "novel": list(meta.novel_class_ids)})
    for name in ("seen", "novel"):
        assert scores[name]["IoU_at_GT"] == pytest.approx(1.0)
        assert scores[name]["AP"] == pytest.approx(100.0)


def test_evaluation_on_some_of_the_images_scores_only_those(tiny_val, monkeypatch):
    """A cache of some validation images (--max-val-images): the others' ground truth
    is not counted as missed. Detections of the first image only, masks = its GT."""
    images, targets = tiny_val
    meta = MetadataCatalog.get("hs_test_val")
    first = FrozenImages(*(getattr(images, f)[:1] for f in (
        "features", "image_sizes", "original_sizes", "image_ids", "targets", "proposals",
        "detections")))
    monkeypatch.setattr("harness.frozen_detector.detector_postprocess", lambda inst, h, w: inst)
    to_dataset = {v: k for k, v in meta.thing_dataset_id_to_contiguous_id.items()}
    present = sorted({to_dataset[int(c)] for c in targets[0].gt_classes})
    scores = evaluate_mask_head(_GroundTruthMasks(targets[:1]), first, "hs_test_val", {"present": present})
    assert scores["present"]["AP"] == pytest.approx(100.0)


def test_feature_cache_size_by_hand_and_the_study_stops_before_training(monkeypatch):
    """frozen_feature_bytes for R50-FPN at 1024 on a 480 x 640 image: resized to
    768 x 1024 (MAX_SIZE_TEST), p2..p6 at strides 4..64, 256 channels, float16, two
    views; and the study's check names the --max-train-images that fits."""
    from argparse import Namespace
    from detectron2.modeling import build_backbone
    from deepmac_d2.engine import load_config
    cfg = load_config(Namespace(config_file=os.path.join(ROOT, "configs", "voc_r50_hg52.yaml"),
                                opts=["MODEL.WEIGHTS", ""]))
    backbone = build_backbone(cfg)
    pixels = sum((768 // s) * (1024 // s) for s in (4, 8, 16, 32, 64))
    per_image = 256 * pixels * 2 * 2
    dicts = [{"height": 480, "width": 640}] * 10
    assert frozen_feature_bytes(cfg, backbone, dicts, views=2) == 10 * per_image
    assert frozen_feature_bytes(cfg, backbone, dicts[:3], views=1) == 3 * per_image // 2

    chosen = image_subset([{"i": i} for i in range(10)], 4)
    assert chosen == image_subset([{"i": i} for i in range(10)], 4) and len(chosen) == 4
    assert [d["i"] for d in chosen] == sorted(d["i"] for d in chosen)
    assert len(image_subset(dicts, None)) == len(image_subset(dicts, 99)) == 10

    from detectron2.data import DatasetCatalog
    check = runpy.run_path(SCRIPT, run_name="head_study")["check_cache_fits"]
    monkeypatch.setattr(DatasetCatalog, "get", {
        cfg.DATASETS.TRAIN[0]: [{"height": 480, "width": 640}] * 100,
        cfg.DATASETS.TEST[0]: [{"height": 480, "width": 640}] * 10}.__getitem__)
    # Needed: 100 training images + 10 validation images (one view: half an image each).
    check(cfg, {}, available_bytes=2 * 105 * per_image)  # at most half of what is available
    with pytest.raises(SystemExit, match=r"--max-train-images 45$"):  # (50 - 5) images fit
        check(cfg, {}, available_bytes=2 * 50 * per_image)
    check(cfg, {"train": 45}, available_bytes=2 * 50 * per_image)


def test_evaluation_without_detections_names_the_fix(tiny_val):
    images, _ = tiny_val
    empty = FrozenImages(images.features, images.image_sizes, images.original_sizes,
                         images.image_ids, images.targets, images.proposals,
                         [Instances((64, 64), pred_boxes=Boxes(torch.zeros(0, 4)),
                                    pred_classes=torch.zeros(0, dtype=torch.long),
                                    scores=torch.zeros(0)) for _ in images.features])
    with pytest.raises(ValueError, match="SCORE_THRESH_TEST"):
        evaluate_mask_head(_KnownMasks(_box_mask), empty, "hs_test_val", {"seen": [1]})


def _rectangle_heads_and_images(variant="default"):
    """ROI heads with a small DeepMaskHead, and 4 cached images whose one instance's mask
    is a rectangle drawn in feature channel 0 (+1 in, -1 out): learnable from the features."""
    cfg = get_cfg()
    add_deepmac_config(cfg)
    cfg.merge_from_list([
        "MODEL.MASK_ON", "True", "MODEL.ROI_HEADS.NAME", "DeepMaskROIHeads",
        "MODEL.ROI_HEADS.NUM_CLASSES", "2", "MODEL.ROI_HEADS.IN_FEATURES", "['p2']",
        "MODEL.ROI_MASK_HEAD.NAME", "DeepMaskHead", "MODEL.ROI_MASK_HEAD.CONVNET_VARIANT", variant,
        "MODEL.ROI_MASK_HEAD.CONV_DIM", "8", "MODEL.ROI_MASK_HEAD.POOLER_RESOLUTION", "8",
        "MODEL.ROI_MASK_HEAD.USE_GT_BOXES", "True", "MODEL.ROI_BOX_HEAD.NAME", "FastRCNNConvFCHead",
        "MODEL.ROI_BOX_HEAD.NUM_FC", "1", "MODEL.ROI_BOX_HEAD.FC_DIM", "16",
        "MODEL.ROI_BOX_HEAD.POOLER_RESOLUTION", "4",
    ])
    torch.manual_seed(0)
    roi_heads = build_roi_heads(cfg, {"p2": ShapeSpec(channels=4, stride=4)})
    features, targets, proposals = [], [], []
    g = torch.Generator().manual_seed(0)
    for i in range(4):
        y0, x0 = torch.randint(0, 8, (2,), generator=g).tolist()
        inside = torch.zeros(16, 16, dtype=torch.bool)
        inside[y0:y0 + 8, x0:x0 + 8] = True
        f = 0.1 * torch.randn(4, 16, 16, generator=g)
        f[0] = inside.float() * 2 - 1
        mask = inside.repeat_interleave(4, 0).repeat_interleave(4, 1)
        features.append({"p2": f.half()})
        t = Instances((64, 64), gt_boxes=Boxes(torch.tensor([[0.0, 0.0, 64.0, 64.0]])),
                      gt_classes=torch.tensor([i % 2]), gt_masks=BitMasks(mask[None]),
                      gt_has_mask=torch.tensor([True]))
        targets.append(t)
        proposals.append(Instances((64, 64), proposal_boxes=Boxes(torch.tensor([[0.0, 0, 64, 64]])),
                                   objectness_logits=torch.zeros(1)))
    images = FrozenImages(features, [(64, 64)] * 4, [(64, 64)] * 4, list(range(4)),
                          targets, proposals)
    return cfg, roi_heads, images


def test_head_training_on_cached_features_lowers_the_loss_and_moves_only_the_head():
    cfg, roi_heads, images = _rectangle_heads_and_images()
    box_before = [p.clone() for p in roi_heads.box_predictor.parameters()]
    losses = train_mask_head(roi_heads, images, iterations=60, ims_per_batch=2, base_lr=0.05,
                             warmup_iters=5, generator=torch.Generator().manual_seed(0))
    assert len(losses) == 60 and all(math.isfinite(x) for x in losses)
    assert np.mean(losses[-10:]) < 0.5 * np.mean(losses[:5])
    assert all(torch.equal(a, b) for a, b in zip(box_before, roi_heads.box_predictor.parameters()))
    # Seeded: the same generator repeats the run.
    _, again, _ = _rectangle_heads_and_images()
    assert train_mask_head(again, images, iterations=60, ims_per_batch=2, base_lr=0.05,
                           warmup_iters=5, generator=torch.Generator().manual_seed(0)) == losses


@pytest.mark.parametrize("variant", ["default", "hourglass10"])
def test_precise_bn_gives_the_statistics_of_the_training_data(variant):
    # Every batch holds all 4 images, so the population statistics are that batch's:
    # after recomputing them, the head in eval mode computes what it computes in train
    # mode (batch statistics), although its running statistics were made wrong first.
    _, roi_heads, images = _rectangle_heads_and_images(variant)
    head = roi_heads.mask_head
    bns = [m for m in head.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    classes = [type(m) for m in head.modules()]
    assert (KerasBatchNorm2d in classes) == (variant != "default")
    for bn in bns:
        bn.running_mean.fill_(5.0)
        bn.running_var.fill_(0.01)
    features, _ = images.batch(range(4))
    pooled = roi_heads.mask_pooler([features["p2"]], [t.gt_boxes for t in images.targets])
    with torch.no_grad():
        train_mode = copy.deepcopy(head).train().layers(pooled)
        stale = head.eval().layers(pooled)
    assert (stale - train_mode).abs().max() > 1.0
    precise_mask_head_bn(roi_heads, images, num_batches=3, ims_per_batch=4,
                         generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        recomputed = head.eval().layers(pooled)
    assert torch.allclose(recomputed, train_mode, atol=1e-4, rtol=1e-4)
    # The hourglass's KerasBatchNorm2d layers (swapped for PyTorch's while measured) are back.
    assert [type(m) for m in head.modules()] == classes


@pytest.mark.slow
def test_study_end_to_end_on_tiny_data(tmp_path):
    data = tmp_path / "data"
    prepare_synthetic(str(data), num_train=2, num_val=2, cfg=SyntheticConfig(image_size=64))
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, SCRIPT, "--output-dir", str(tmp_path / "out"), "--data-root", str(data),
           "--heads", "default,hourglass10", "--modes", "gt_boxes,proposals",
           "--det-seeds", "2", "--head-seeds", "1", "--det-iters", "2", "--head-iters", "3",
           "MODEL.FPN.OUT_CHANNELS", "32", "MODEL.ROI_BOX_HEAD.FC_DIM", "64",
           "MODEL.ROI_MASK_HEAD.CONV_DIM", "8", "MODEL.ROI_MASK_HEAD.POOLER_RESOLUTION", "8",
           "INPUT.MIN_SIZE_TRAIN", "(64,)", "INPUT.MAX_SIZE_TRAIN", "64",
           "INPUT.MIN_SIZE_TEST", "64", "INPUT.MAX_SIZE_TEST", "64", "SOLVER.IMS_PER_BATCH", "2",
           "SOLVER.WARMUP_ITERS", "1", "MODEL.ROI_HEADS.SCORE_THRESH_TEST", "0.0"]
    res = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "[heads 1/8, ETA" in res.stdout and "[heads 8/8, ETA 0 min]" in res.stdout
    out = json.loads((tmp_path / "out" / "results.json").read_text())
    assert len(out["runs"]) == 2 * 2 * 2 * 1 and len(out["detectors"]) == 2  # heads x modes x detectors x head seeds
    assert all(len(r["losses"]) == 3 for r in out["runs"])
    claims = [d["claim"] for d in out["differences"]["novel_IoU"]]
    assert claims == ["hourglass10 - default, GT boxes", "default: GT boxes - proposals",
                      "hourglass10: GT boxes - proposals"]
    for name in ("results.md", "head_study.png", "loss_curves.png"):
        assert (tmp_path / "out" / name).stat().st_size > 0
    # A second run reuses every detector and head run.
    res = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0 and "[heads " not in res.stdout and "reused" in res.stdout.lower()
    # Longer heads on the same detectors (--detector-dir): the detectors are reused, the
    # first study's head runs stay as they were.
    first = {p: p.stat().st_mtime_ns for p in (tmp_path / "out").glob("detector*/heads/*.json")}
    longer = [a if a != str(tmp_path / "out") else str(tmp_path / "longer") for a in cmd]
    longer[longer.index("--head-iters") + 1] = "4"
    longer[2:2] = ["--detector-dir", str(tmp_path / "out")]  # before the config overrides
    res = subprocess.run(longer, env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert res.stdout.count(": reused") == 2 and "[heads 8/8, ETA 0 min]" in res.stdout
    assert {p: p.stat().st_mtime_ns for p in first} == first and len(first) == 8
    out = json.loads((tmp_path / "longer" / "results.json").read_text())
    assert all(len(r["losses"]) == 4 for r in out["runs"]) and not (tmp_path / "longer" / "detector0" / "frozen.pt").exists()


@pytest.mark.slow
def test_study_on_a_coco_config_and_coco_data(tmp_path):
    """The reference's VOC -> non-VOC config on COCO-format data (tests/coco_fixture.py,
    shrunk as in test_coco_configs.py): the split comes from the config, the detections
    scored are the config's TEST.DETECTIONS_PER_IMAGE, and --max-*-images cache the same
    subset that image_subset draws."""
    from coco_fixture import make_coco2017
    from test_coco_configs import shrink
    from deepmac_d2.data.class_splits import NONVOC_CLASS_IDS, VOC_CLASS_IDS
    root = make_coco2017(str(tmp_path / "datasets"))
    out = tmp_path / "out"
    cmd = [sys.executable, SCRIPT, "--config", os.path.join(ROOT, "configs", "voc_r50_hg52.yaml"),
           "--output-dir", str(out), "--heads", "default", "--modes", "gt_boxes,proposals",
           "--det-seeds", "2", "--head-seeds", "1", "--det-iters", "4", "--head-iters", "2",
           "--bn-batches", "1", "--max-train-images", "6", "--max-val-images", "5"]
    cmd += shrink(str(out / "unused"))[:-2]  # each detector has its own OUTPUT_DIR
    env = dict(os.environ, DETECTRON2_DATASETS=root, OMP_NUM_THREADS="1")
    res = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    result = json.loads((out / "results.json").read_text())
    assert result["class_split"] == {"seen": {"subset": "voc", "ids": sorted(VOC_CLASS_IDS)},
                                     "novel": {"subset": "nonvoc", "ids": sorted(NONVOC_CLASS_IDS)}}
    assert result["args"]["max_detections"] == 20 and len(result["runs"]) == 4
    for r in result["runs"]:
        assert 0 <= r["novel_IoU"] <= 1 and 0 <= r["seen_IoU"] <= 1 and len(r["losses"]) == 2
    frozen = torch.load(out / "detector0" / "frozen.pt", weights_only=False)
    from detectron2.data.datasets import load_coco_json

    def dataset(split):  # what coco_2017_<split> reads, in its order
        coco = os.path.join(root, "coco")
        return load_coco_json(os.path.join(coco, "annotations", f"instances_{split}2017.json"),
                              os.path.join(coco, f"{split}2017"))

    want_train = [d["image_id"] for d in image_subset(dataset("train"), 6)]
    want_val = [d["image_id"] for d in image_subset(dataset("val"), 5)]
    assert frozen["train"].image_ids == [i for i in want_train for _ in range(2)]  # as is, mirrored
    assert frozen["val"].image_ids == want_val
