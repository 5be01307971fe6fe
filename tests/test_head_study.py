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
from deepmac_d2.engine.frozen_detector import (
    FrozenImages,
    evaluate_mask_head,
    precise_mask_head_bn,
    train_mask_head,
)
from deepmac_d2.engine.grid import mean_ci95, t_quantile
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


def test_evaluation_of_the_ground_truth_masks_is_perfect(tiny_val):
    images, targets = tiny_val
    meta = MetadataCatalog.get("hs_test_val")
    # Each box gets its own GT mask back: pasted at the input (= original) size.
    lookup = {}
    for t in targets:
        for box, mask in zip(t.gt_boxes.tensor, t.gt_masks.tensor):
            lookup[tuple(box.tolist())] = mask

    class GroundTruth(_KnownMasks):
        def forward_with_given_boxes(self, features, instances):
            for inst in instances:
                inst.pred_masks = torch.stack([lookup[tuple(b.tolist())] for b in inst.pred_boxes.tensor])
            return instances

    def paste_as_is(inst, h, w):  # detector_postprocess pastes M x M masks; these are pasted
        return inst

    import deepmac_d2.engine.frozen_detector as fd
    original = fd.detector_postprocess
    fd.detector_postprocess = paste_as_is
    try:
        scores = evaluate_mask_head(GroundTruth(None), images, "hs_test_val",
                                    {"seen": list(meta.seen_class_ids), "novel": list(meta.novel_class_ids)})
    finally:
        fd.detector_postprocess = original
    for name in ("seen", "novel"):
        assert scores[name]["IoU_at_GT"] == pytest.approx(1.0)
        assert scores[name]["AP"] == pytest.approx(100.0)


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
