"""The weak mask losses (modeling/weak_losses.py) against hand computations, and how
DeepMaskROIHeads applies them: which instances, which ROIs, which gradients.

Hand computations are written as loops over pixels in float64, independent of the
vectorised code; the losses are run in float64 too where they are compared, so the
tolerance is float64 rounding of sums of a few hundred terms.
"""
import argparse
import math

import numpy as np
import pytest
import torch
from detectron2.layers import ShapeSpec
from detectron2.modeling import build_roi_heads
from detectron2.structures import BitMasks, Boxes, ImageList, Instances, PolygonMasks
from detectron2.utils.events import EventStorage

from deepmac_d2.engine import setup
from harness.frozen_detector import train_mask_head
from harness.frozen_weak_training import train_mask_head_with_images
from deepmac_d2.modeling.mask_head import CONVNET_VARIANTS, DeepMaskHead
from deepmac_d2.modeling.weak_losses import (
    DICE_EPS,
    WeakMaskLosses,
    box_masks_in_rois,
    box_projection_loss,
    check_weak_config,
    colour_similarity,
    expand_boxes,
    input_to_rgb,
    pairwise_loss,
    warmup_factor,
)
from test_head_study import _rectangle_heads_and_images
from test_roi_heads import IMAGE, TARGET_BOXES, batch, make_cfg, make_heads

F64_TOL = 1e-12  # relative: float64 sums of <= 10^3 terms of similar magnitude
F32_EPS = 2.0 ** -24


def sigmoid(x):
    return 1.0 / (1.0 + math.exp(-x))


# --- box masks and projection -------------------------------------------------------


def test_box_mask_in_a_roi_by_hand():
    # ROI 0..16 at 8 pixels: pixel j spans [2j, 2j + 2), centre 2j + 1. Box x 3..11, y 5..9:
    # centres 3, 5, 7, 9 (j = 1..4) in [3, 11); y centres 5, 7 (j = 2, 3) in [5, 9).
    mask = box_masks_in_rois(torch.tensor([[3.0, 5, 11, 9]]), torch.tensor([[0.0, 0, 16, 16]]), 8)
    expected = torch.zeros(1, 8, 8)
    expected[0, 2:4, 1:5] = 1
    assert torch.equal(mask, expected)
    # The crop problem: with the box as its own ROI, the target is all ones.
    box = torch.tensor([[3.0, 5, 11, 9]])
    assert torch.equal(box_masks_in_rois(box, box, 8), torch.ones(1, 8, 8))
    # ROI_EXPAND 2 about the centre (7, 7): 2x the size, same centre.
    assert torch.equal(expand_boxes(box, 2.0), torch.tensor([[-1.0, 3, 15, 11]]))


def hand_projection(logits, target, loss):
    """BoxInst's projection term for one instance, by loops: dice (or mean BCE) of the
    column maxima plus that of the row maxima."""
    m = len(logits)
    total = 0.0
    for along in ("x", "y"):
        pred, tgt = [], []
        for k in range(m):
            line = [logits[i][k] if along == "x" else logits[k][i] for i in range(m)]
            tline = [target[i][k] if along == "x" else target[k][i] for i in range(m)]
            pred.append(max(line))
            tgt.append(max(tline))
        if loss == "dice":
            p = [sigmoid(v) for v in pred]
            inter = sum(a * b for a, b in zip(p, tgt))
            union = sum(a * a for a in p) + sum(b * b for b in tgt) + DICE_EPS
            total += 1 - 2 * inter / union
        else:
            total += sum(-(t * math.log(sigmoid(v)) + (1 - t) * math.log(1 - sigmoid(v)))
                         for v, t in zip(pred, tgt)) / m
    return total


@pytest.mark.parametrize("loss", ["dice", "bce"])
def test_projection_loss_on_a_hand_made_logit_map_is_the_formula(loss):
    logits = torch.tensor([[-3.0, -1.0, 0.5, -2.0, -4.0],
                           [-2.0, 2.0, 1.0, 0.0, -3.0],
                           [-1.0, 0.5, 3.0, -0.5, -2.5],
                           [-4.0, -2.0, -1.5, -3.0, -1.0],
                           [-5.0, -4.0, -3.0, -2.0, -6.0]], dtype=torch.float64)
    target = torch.zeros(5, 5, dtype=torch.float64)
    target[1:3, 1:4] = 1
    other = torch.randn(5, 5, dtype=torch.float64)  # a second instance: the mean of two
    expected = (hand_projection(logits.tolist(), target.tolist(), loss)
                + hand_projection(other.tolist(), target.tolist(), loss)) / 2
    got = box_projection_loss(torch.stack([logits, other]), torch.stack([target, target]), loss)
    assert got.item() == pytest.approx(expected, rel=F64_TOL)


def test_projection_loss_is_zero_for_a_mask_that_fills_its_box():
    # Box 4..12 in a 0..16 ROI at 16 pixels: rows and columns 4..11. Logits +-20: in
    # float32, sigmoid(20) rounds to 1 and sigmoid(-20) = 2e-9, so each dice term is
    # 1 - 2k / (2k + eps) = eps / (2k + eps) with k = 8, up to rounding of 1 - (~1).
    rois = torch.tensor([[0.0, 0, 16, 16]])
    target = box_masks_in_rois(torch.tensor([[4.0, 4, 12, 12]]), rois, 16)
    logits = torch.where(target > 0, 20.0, -20.0)
    dice = box_projection_loss(logits, target, "dice")
    exact = 2 * DICE_EPS / (2 * 8 + DICE_EPS)
    assert abs(dice.item() - exact) <= 4 * F32_EPS
    # BCE: 2 x log(1 + e^-20) per position, ~4e-9.
    assert box_projection_loss(logits, target, "bce").item() <= 2 * 2 * math.exp(-20)
    # Touching every row and column is what matters: a mask missing one column of the box
    # loses 1/8 of the x profile (dice ~ 1/15), far above the rounding bound.
    short = logits.clone()
    short[:, :, 11] = -20.0
    assert box_projection_loss(short, target, "dice").item() > 0.05
    # ... while holes inside the box cost nothing (the max projections are unchanged).
    holes = logits.clone()
    holes[:, 6:10, 6:10] = -20.0
    assert abs(box_projection_loss(holes, target, "dice").item() - exact) <= 4 * F32_EPS


# --- pairwise -------------------------------------------------------------------------


def two_colour_lab(m):
    """(1, 3, m, m): left half LAB (50, 0, 0), right half (50, 60, 0)."""
    lab = torch.zeros(1, 3, m, m, dtype=torch.float64)
    lab[0, 0] = 50
    lab[0, 1, :, m // 2:] = 60
    return lab


def test_colour_similarity_by_hand():
    sim = colour_similarity(two_colour_lab(6), 2)
    # Offsets in the order (dy, dx) = 2 x (-1,-1), (-1,0), (-1,1), (0,-1), (0,1), (1,-1), (1,0), (1,1).
    # Pixel (2, 2), left half: (2, 0) is the same colour, (2, 4) across: exp(-60 / 2).
    assert sim[0, 3, 2, 2].item() == 1.0
    assert sim[0, 4, 2, 2].item() == pytest.approx(math.exp(-30), rel=F64_TOL)
    # Pixel (0, 0): its neighbour (-2, -2) lies beyond the crop.
    assert sim[0, 0, 0, 0].item() == 0.0


def hand_pairwise(logits, lab, box, threshold, d):
    """BoxInst's pairwise term by loops: over in-box pixels i and their 8 neighbours j at
    distance d inside the crop with exp(-||lab_i - lab_j|| / 2) >= threshold."""
    m = len(logits)
    total, count = 0.0, 0
    for y in range(m):
        for x in range(m):
            if not box[y][x]:
                continue
            for dy in (-d, 0, d):
                for dx in (-d, 0, d):
                    yy, xx = y + dy, x + dx
                    if (dy, dx) == (0, 0) or not (0 <= yy < m and 0 <= xx < m):
                        continue
                    dist = math.sqrt(sum((lab[c][y][x] - lab[c][yy][xx]) ** 2 for c in range(3)))
                    if math.exp(-dist / 2) < threshold:
                        continue
                    pi, pj = sigmoid(logits[y][x]), sigmoid(logits[yy][xx])
                    total += -math.log(pi * pj + (1 - pi) * (1 - pj))
                    count += 1
    return total, count


def test_pairwise_on_a_two_colour_image_counts_only_similar_in_box_pairs():
    m, d = 8, 2
    torch.manual_seed(0)
    logits = torch.randn(1, m, m, dtype=torch.float64) * 2
    lab = two_colour_lab(m)
    box = torch.zeros(1, m, m, dtype=torch.float64)
    box[0, 1:7, 2:7] = 1  # spans both colours
    total, count = hand_pairwise(logits[0].tolist(), lab[0].tolist(), box[0].tolist(), 0.3, d)
    # Only same-colour pairs count: 30 in-box pixels, each with its in-crop neighbours on
    # its own half. Counted independently: left half columns 2, 3 and right 4, 5, 6.
    assert 0 < count < 30 * 8
    sim = colour_similarity(lab, d)
    got = pairwise_loss(logits, sim, box, 0.3, d)
    assert got.item() == pytest.approx(total / count, rel=F64_TOL)
    # Pairs across the colours would add loss where the labels differ: with one colour
    # everywhere, more pairs count and the value changes.
    flat = colour_similarity(torch.full_like(lab, 50.0), d)
    total_flat, count_flat = hand_pairwise(logits[0].tolist(), torch.full_like(lab, 50.0)[0].tolist(),
                                           box[0].tolist(), 0.3, d)
    assert count_flat > count
    assert pairwise_loss(logits, flat, box, 0.3, d).item() == pytest.approx(
        total_flat / count_flat, rel=F64_TOL)


def test_pairwise_is_finite_for_confident_opposite_labels_and_zero_without_pairs():
    logits = torch.full((1, 4, 4), 40.0)
    logits[0, :, 2:] = -40.0  # P_same = e^-40 for pairs across: -log finite
    sim = torch.ones(1, 8, 4, 4)
    box = torch.ones(1, 4, 4)
    loss = pairwise_loss(logits, sim, box, 0.3, 1)
    assert math.isfinite(loss.item()) and loss.item() > 1.0
    assert pairwise_loss(logits, sim, torch.zeros(1, 4, 4), 0.3, 1).item() == 0.0


@pytest.mark.parametrize("iteration,warmup,expected", [
    (0, 4, 0.25), (1, 4, 0.5), (3, 4, 1.0), (100, 4, 1.0), (0, 0, 1.0), (9999, 10000, 1.0),
    (4999, 10000, 0.5),
])
def test_warmup_factor(iteration, warmup, expected):
    assert warmup_factor(iteration, warmup) == expected


# --- colours of the input -------------------------------------------------------------


def test_input_to_rgb_undoes_the_normalisation_and_the_channel_order():
    bgr = torch.tensor([10.0, 128.0, 250.0])  # B, G, R
    mean, std = torch.tensor([103.53, 116.28, 123.675]), torch.tensor([57.375, 57.12, 58.395])
    image = ((bgr - mean) / std)[None, :, None, None].expand(1, 3, 2, 2)
    rgb = input_to_rgb(image, mean, std, "BGR")
    assert torch.allclose(rgb[0, :, 0, 0], torch.tensor([250.0, 128.0, 10.0]) / 255, atol=4 * F32_EPS * 250)
    rgb = input_to_rgb(image, mean, std, "RGB")
    assert torch.allclose(rgb[0, :, 0, 0], bgr / 255, atol=4 * F32_EPS * 250)
    grey = input_to_rgb(torch.zeros(1, 1, 2, 2), torch.tensor([51.0]), torch.tensor([1.0]), "L")
    assert torch.equal(grey, torch.full((1, 3, 2, 2), 0.2))


def test_lab_of_known_colours():
    # sRGB white is L* 100, black 0, pure red (53.24, 80.09, 67.20) (D65, the CIE formulas).
    module = WeakMaskLosses(pairwise_weight=1.0, input_format="RGB", pixel_mean=(0.0, 0.0, 0.0),
                            pixel_std=(1.0, 1.0, 1.0))
    image = torch.zeros(1, 3, 8, 24)
    image[0, :, :, :8] = 255.0
    image[0, 0, :, 16:] = 255.0
    rois = [Boxes(torch.tensor([[0.0, 0, 8, 8], [8.0, 0, 16, 8], [16.0, 0, 24, 8]]))]
    lab = module.lab_in_rois(ImageList(image, [(8, 24)]), rois, 4)
    expected = torch.tensor([[100.0, 0, 0], [0.0, 0, 0], [53.24, 80.09, 67.20]])
    assert torch.allclose(lab.mean(dim=(2, 3)), expected, atol=0.01)


# --- settings -------------------------------------------------------------------------


@pytest.mark.parametrize("key,value,message", [
    ("BOX_PROJECTION_WEIGHT", -1.0, ">= 0"),
    ("PAIRWISE_WEIGHT", -0.5, ">= 0"),
    ("PAIRWISE_COLOR_THRESHOLD", 0.0, r"in \(0, 1\)"),
    ("PAIRWISE_COLOR_THRESHOLD", 1.0, r"in \(0, 1\)"),
    ("PAIRWISE_DILATION", 0, "integer >= 1"),
    ("ROI_EXPAND", 0.9, ">= 1"),
    ("APPLY_TO", "boxes", "one of"),
    ("BOX_PROJECTION_LOSS", "l1", "one of"),
    ("WARMUP_ITERS", -1, "integer >= 0"),
])
def test_bad_settings_name_the_key_and_the_range(key, value, message):
    cfg = make_cfg()
    cfg.MODEL.ROI_MASK_HEAD.WEAK[key] = value
    with pytest.raises(ValueError, match=f"MODEL.ROI_MASK_HEAD.WEAK.{key} = {value!r}.*{message}"):
        check_weak_config(cfg)


def test_setup_fails_on_a_bad_setting(tmp_path):
    args = argparse.Namespace(config_file="", eval_only=False, num_gpus=1, resume=False,
                              opts=["MODEL.ROI_MASK_HEAD.WEAK.ROI_EXPAND", "0.5",
                                    "OUTPUT_DIR", str(tmp_path)])
    with pytest.raises(ValueError, match=r"MODEL.ROI_MASK_HEAD.WEAK.ROI_EXPAND = 0.5.*>= 1"):
        setup(args, check_datasets=False)


def test_an_input_format_without_colours_fails_clearly():
    cfg = make_cfg()
    cfg.MODEL.ROI_MASK_HEAD.WEAK.PAIRWISE_WEIGHT = 1.0
    cfg.INPUT.FORMAT = "YUV-BT.601"
    with pytest.raises(ValueError, match="INPUT.FORMAT = 'YUV-BT.601'.*BGR, RGB, L"):
        check_weak_config(cfg)
    cfg.MODEL.ROI_MASK_HEAD.WEAK.PAIRWISE_WEIGHT = 0.0  # the projection needs no colours
    cfg.MODEL.ROI_MASK_HEAD.WEAK.BOX_PROJECTION_WEIGHT = 1.0
    check_weak_config(cfg)
    cfg.MODEL.ROI_MASK_HEAD.WEAK.PAIRWISE_WEIGHT = 1.0
    cfg.INPUT.FORMAT = "L"  # three PIXEL_MEAN values for one channel
    with pytest.raises(ValueError, match="MODEL.PIXEL_MEAN has 3 values"):
        check_weak_config(cfg)


def test_weak_losses_need_deep_mask_roi_heads():
    cfg = make_cfg()
    cfg.MODEL.ROI_HEADS.NAME = "StandardROIHeads"
    cfg.MODEL.ROI_MASK_HEAD.WEAK.BOX_PROJECTION_WEIGHT = 1.0
    with pytest.raises(ValueError, match="MODEL.ROI_HEADS.NAME is 'StandardROIHeads'"):
        check_weak_config(cfg)


# --- in DeepMaskROIHeads --------------------------------------------------------------

HEADS = [("MaskRCNNConvUpsampleHead", True), ("MaskRCNNConvUpsampleHead", False),
         ("DeepMaskHead", True), ("DeepMaskHead", False)]


def weak_cfg(mask_head, agnostic, use_gt_boxes=True, norm="BN", pairwise=1.0):
    cfg = make_cfg(mask_head, agnostic, use_gt_boxes)
    cfg.MODEL.ROI_MASK_HEAD.NORM = norm
    weak = cfg.MODEL.ROI_MASK_HEAD.WEAK
    weak.BOX_PROJECTION_WEIGHT, weak.PAIRWISE_WEIGHT, weak.WARMUP_ITERS = 1.0, pairwise, 0
    return cfg


def images(n=2):
    torch.manual_seed(1)
    return ImageList(torch.randn(n, 3, IMAGE, IMAGE) * 50, [(IMAGE, IMAGE)] * n)


def run(heads, ims, features, proposals, targets, seed=0):
    torch.manual_seed(seed)  # proposal sampling draws from the global RNG
    with EventStorage():
        _, losses = heads(ims, features, proposals, targets)
    return losses


@pytest.mark.parametrize("mask_head,agnostic", HEADS)
def test_weak_instances_are_the_maskless_ones_with_enlarged_rois(mask_head, agnostic):
    # Allowed classes 0 and 1: image 0's instances have masks, image 1's class-2 one has none.
    heads = make_heads(weak_cfg(mask_head, agnostic), allowed=[0, 1])
    features, proposals, targets = batch()
    weak = heads.weak_training_instances(proposals, targets)
    assert [len(w) for w in weak] == [0, 1]
    box = torch.tensor([TARGET_BOXES[1][0]], dtype=torch.float32)
    assert torch.equal(weak[1].gt_boxes.tensor, box)
    assert torch.allclose(weak[1].proposal_boxes.tensor, expand_boxes(box, 1.5))
    losses = run(heads, images(), features, proposals, targets)
    assert {"loss_mask", "loss_mask_projection", "loss_mask_pairwise"} <= set(losses)
    assert all(math.isfinite(v.item()) for v in losses.values())


def test_weak_instances_on_proposals_are_foreground_proposals_without_a_mask():
    heads = make_heads(weak_cfg("DeepMaskHead", True, use_gt_boxes=False), allowed=[0, 1])
    features, proposals, targets = batch()
    torch.manual_seed(0)
    with EventStorage():  # the sampler logs its counts
        sampled = heads.label_and_sample_proposals(proposals, targets)
    weak = heads.weak_training_instances(sampled, targets)
    assert len(weak[0]) == 0
    fg = sampled[1][sampled[1].gt_classes == 2]
    assert len(weak[1]) == len(fg) > 0
    assert torch.allclose(weak[1].proposal_boxes.tensor, expand_boxes(fg.proposal_boxes.tensor, 1.5))
    assert torch.equal(weak[1].gt_boxes.tensor, fg.gt_boxes.tensor)
    losses = run(heads, images(), features, proposals, targets)
    assert losses["loss_mask_projection"].item() > 0


@pytest.mark.parametrize("mask_head,agnostic", HEADS)
def test_gradients_reach_the_head_only_from_covered_instances(mask_head, agnostic):
    # No norm: each ROI's logits depend on its own features only, so a loss's gradient
    # w.r.t. the features shows which ROIs it came from. Image 1's instance is the only
    # weakly supervised one: the weak losses' gradient lies in its enlarged ROI, image
    # 0's features get none.
    cfg = weak_cfg(mask_head, agnostic, norm="")
    heads = make_heads(cfg, allowed=[0, 1])
    features, proposals, targets = batch(requires_grad=True)
    losses = run(heads, images(), features, proposals, targets)
    weak = losses["loss_mask_projection"] + losses["loss_mask_pairwise"]
    (grad,) = torch.autograd.grad(weak, features["p2"], retain_graph=True)
    assert grad[0].abs().max() == 0
    assert grad[1].abs().max() > 0
    x0, y0, x1, y1 = (expand_boxes(torch.tensor([TARGET_BOXES[1][0]], dtype=torch.float32), 1.5)[0] / 4).tolist()
    outside = torch.ones(IMAGE // 4, IMAGE // 4, dtype=torch.bool)
    outside[max(0, math.floor(y0) - 1):math.ceil(y1) + 1, max(0, math.floor(x0) - 1):math.ceil(x1) + 1] = False
    assert grad[1][:, outside].abs().max() == 0
    # The mask loss's gradient comes from image 0's instances only (image 1's has no mask).
    (grad_mask,) = torch.autograd.grad(losses["loss_mask"], features["p2"])
    assert grad_mask[1].abs().max() == 0 and grad_mask[0].abs().max() > 0


@pytest.mark.parametrize("mask_head,agnostic", HEADS)
def test_box_class_and_mask_losses_are_unchanged(mask_head, agnostic):
    # No norm: the weak ROIs that join the mask head's batch change no other ROI's logits
    # (with BatchNorm they would shift its batch statistics).
    features, proposals, targets = batch()
    off_cfg = make_cfg(mask_head, agnostic)
    off_cfg.MODEL.ROI_MASK_HEAD.NORM = ""
    off = make_heads(off_cfg, allowed=[0, 1])
    on = make_heads(weak_cfg(mask_head, agnostic, norm=""), allowed=[0, 1])
    before = run(off, None, features, proposals, targets)
    after = run(on, images(), features, proposals, targets)
    for key in ("loss_cls", "loss_box_reg"):
        assert torch.equal(before[key], after[key])
    # The same logits up to the order of float32 sums (another batch size may pick
    # another kernel): a loss of magnitude ~1 from outputs of fan-in CONV_DIM x 9.
    tol = 8 * 9 * F32_EPS
    assert after["loss_mask"].item() == pytest.approx(before["loss_mask"].item(), rel=tol)


@pytest.mark.parametrize("mask_head,agnostic", HEADS)
def test_a_batch_without_weak_instances_adds_exact_zeros_connected_to_the_head(mask_head, agnostic):
    features, proposals, targets = batch()
    off = make_heads(make_cfg(mask_head, agnostic))
    on = make_heads(weak_cfg(mask_head, agnostic))  # every class allowed, every mask present
    before = run(off, None, features, proposals, targets)
    after = run(on, images(), features, proposals, targets)
    assert torch.equal(before["loss_mask"], after["loss_mask"])  # the same ROIs, the same pass
    for key in ("loss_mask_projection", "loss_mask_pairwise"):
        assert after[key].item() == 0.0 and after[key].requires_grad
    sum(after[k] for k in ("loss_mask_projection", "loss_mask_pairwise")).backward()
    for name, p in on.mask_head.named_parameters():
        assert p.grad is not None and p.grad.abs().max() == 0, name


def test_per_class_heads_take_the_channel_of_the_instance_class():
    module = WeakMaskLosses(projection_weight=1.0)
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 8, 8)
    x = Instances((IMAGE, IMAGE), gt_classes=torch.tensor([2, 0]),
                  gt_boxes=Boxes(torch.tensor([[10.0, 10, 30, 30], [5.0, 5, 20, 40]])))
    x.proposal_boxes = module.rois(x.gt_boxes)
    with EventStorage():
        got = module(logits, [x], None)["loss_mask_projection"]
    masks = box_masks_in_rois(x.gt_boxes.tensor, x.proposal_boxes.tensor, 8)
    expected = box_projection_loss(logits[[0, 1], [2, 0]], masks)
    assert got.item() == pytest.approx(expected.item(), rel=F32_EPS * 64)


def test_pairwise_warms_up_with_the_trainer_iteration():
    module = WeakMaskLosses(pairwise_weight=1.0, warmup_iters=4)
    torch.manual_seed(0)
    logits = torch.randn(1, 1, 8, 8)
    x = Instances((IMAGE, IMAGE), gt_classes=torch.tensor([0]),
                  gt_boxes=Boxes(torch.tensor([[10.0, 10, 40, 40]])))
    x.proposal_boxes = module.rois(x.gt_boxes)
    ims = images(1)
    values = []
    for it in (0, 1, 3, 7):
        with EventStorage(it):
            values.append(module(logits, [x], ims)["loss_mask_pairwise"].item())
    full = values[-1]
    assert full > 0
    assert values == pytest.approx([full / 4, full / 2, full, full], rel=4 * F32_EPS)


@pytest.mark.parametrize("fmt", ["polygon", "bitmask"])
def test_instances_without_a_mask_in_polygon_and_bitmask_data(fmt):
    # gt_has_mask False marks a box-only instance (any class): it is covered by the weak
    # losses, and its placeholder mask never reaches the mask loss.
    heads = make_heads(weak_cfg("DeepMaskHead", True))
    features, proposals, targets = batch()
    targets[0].gt_has_mask = torch.tensor([True, False])
    targets[1].gt_has_mask = torch.tensor([True])
    if fmt == "polygon":
        for t in targets:
            t.gt_masks = PolygonMasks([[np.array([x0, y0, (x0 + x1) / 2, y0, (x0 + x1) / 2, y1, x0, y1],
                                                 dtype=np.float64)]
                                       for x0, y0, x1, y1 in t.gt_boxes.tensor.tolist()])
    else:
        for t in targets:
            t.gt_masks = BitMasks(t.gt_masks.tensor)
    weak = heads.weak_training_instances(proposals, targets)
    assert [len(w) for w in weak] == [1, 0]
    assert torch.equal(weak[0].gt_boxes.tensor, torch.tensor([TARGET_BOXES[0][1]], dtype=torch.float32))
    losses = run(heads, images(), features, proposals, targets)
    assert losses["loss_mask_projection"].item() > 0 and math.isfinite(losses["loss_mask"].item())


def test_apply_to_all_covers_every_instance_and_keeps_the_mask_loss():
    cfg = weak_cfg("MaskRCNNConvUpsampleHead", True, norm="")
    cfg.MODEL.ROI_MASK_HEAD.WEAK.APPLY_TO = "all"
    heads = make_heads(cfg)
    features, proposals, targets = batch()
    weak = heads.weak_training_instances(proposals, targets)
    assert [len(w) for w in weak] == [2, 1]
    assert isinstance(heads.mask_head, torch.nn.Module) and not isinstance(heads.mask_head, DeepMaskHead)


def test_frozen_training_with_images_keeps_the_head_studys_schedule_and_adds_the_weak_terms():
    cfg, roi_heads, frozen = _rectangle_heads_and_images()
    images = [torch.zeros(3, 64, 64)] * len(frozen)
    kwargs = dict(iterations=12, ims_per_batch=2, base_lr=0.05, warmup_iters=5)
    expected = train_mask_head(roi_heads, frozen, generator=torch.Generator().manual_seed(0), **kwargs)
    _, again, _ = _rectangle_heads_and_images()
    curves = train_mask_head_with_images(again, frozen, images,
                                         generator=torch.Generator().manual_seed(0), **kwargs)
    assert curves == {"loss_mask": expected}  # weak losses off: the same run, step by step
    weak = cfg.MODEL.ROI_MASK_HEAD.WEAK
    weak.BOX_PROJECTION_WEIGHT, weak.PAIRWISE_WEIGHT, weak.APPLY_TO = 1.0, 1.0, "all"
    torch.manual_seed(0)
    with_weak = build_roi_heads(cfg, {"p2": ShapeSpec(channels=4, stride=4)})
    curves = train_mask_head_with_images(with_weak, frozen, images,
                                         generator=torch.Generator().manual_seed(0), **kwargs)
    assert set(curves) == {"loss_mask", "loss_mask_projection", "loss_mask_pairwise"}
    assert all(len(v) == 12 and all(math.isfinite(x) for x in v) for v in curves.values())


@pytest.mark.parametrize("variant", CONVNET_VARIANTS)
def test_every_deep_mask_head_variant_trains_with_the_weak_losses(variant):
    cfg = weak_cfg("DeepMaskHead", True)
    head = cfg.MODEL.ROI_MASK_HEAD
    # 32 x 32 ROI features (the reference's crop): the deepest hourglass halves them 5 times.
    head.CONVNET_VARIANT, head.CONV_DIM, head.POOLER_RESOLUTION = variant, 4, 32
    heads = make_heads(cfg, allowed=[0, 1])
    features, proposals, targets = batch()
    losses = run(heads, images(), features, proposals, targets)
    weak = losses["loss_mask_projection"] + losses["loss_mask_pairwise"]
    assert math.isfinite(weak.item()) and weak.item() > 0
    weak.backward()
    assert heads.mask_head.predictor.weight.grad.abs().max() > 0
