"""DeepMaskHead: parity with the TF reference's figures, Detectron2 integration, edge cases.

TF figures: docs/reference/tf_mask_head_params.md (TF Model Garden DeepMaskHead on
256-channel ROI features, 91 classes when class-specific). They are hard-coded here
as the independent check; our counts must equal them.
"""
import math
import os

import numpy as np
import pytest
import torch
from torch import nn

import deepmac_d2
from detectron2 import model_zoo
from detectron2.config import get_cfg
from detectron2.layers import ShapeSpec
from detectron2.modeling import build_model
from detectron2.modeling.roi_heads.mask_head import build_mask_head, mask_rcnn_inference
from detectron2.structures import BitMasks, Boxes, Instances, PolygonMasks
from detectron2.utils.events import EventStorage
from deepmac_d2.modeling import CONVNET_VARIANTS, DeepMaskHead
from deepmac_d2.modeling.mask_head import SoftBitMasks, _with_soft_masks

VARIANTS = ["default", "hourglass10", "hourglass20", "hourglass32", "hourglass52", "hourglass100"]

# (variant, num_filters, class_agnostic): (trainable, non_trainable), from the TF table.
# Counts do not depend on the crop (TF builds them at crop 32; hourglasses fail at 14).
TF_PARAMS = {
    ("default", 256, False): (2_648_667, 2_560),
    ("default", 256, True): (2_625_537, 2_560),
    ("default", 64, False): (281_307, 640),
    ("default", 64, True): (275_457, 640),
    ("hourglass20", 256, False): (89_057_883, 36_352),
    ("hourglass20", 256, True): (89_034_753, 36_352),
    ("hourglass20", 64, False): (5_688_027, 9_088),
    ("hourglass20", 64, True): (5_682_177, 9_088),
    ("hourglass52", 256, False): (375_597_147, 117_760),
    ("hourglass52", 256, True): (375_574_017, 117_760),
    ("hourglass52", 64, False): (23_611_995, 29_440),
    ("hourglass52", 64, True): (23_606_145, 29_440),
    ("hourglass100", 256, False): (755_548_251, 222_208),
    ("hourglass100", 256, True): (755_525_121, 222_208),
    ("hourglass100", 64, False): (47_378_523, 55_552),
    ("hourglass100", 64, True): (47_372_673, 55_552),
}


def make_head(variant="default", num_filters=8, crop=16, num_classes=1, in_channels=16, **kwargs):
    return DeepMaskHead(
        ShapeSpec(channels=in_channels, height=crop, width=crop),
        num_classes=num_classes,
        convnet_variant=variant,
        num_filters=num_filters,
        **kwargs,
    )


def bn_statistics(module):
    stats = ("running_mean", "running_var")
    return sum(b.numel() for name, b in module.named_buffers() if name.endswith(stats))


@pytest.mark.parametrize(
    "key", sorted(TF_PARAMS), ids=lambda k: f"{k[0]}-n{k[1]}-{'agnostic' if k[2] else 'classes'}"
)
def test_parameter_counts_equal_tf(key):
    variant, num_filters, class_agnostic = key
    # On the meta device: no memory for the 755M-parameter hourglass100 (n = 256).
    with torch.device("meta"):
        head = make_head(variant, num_filters, 32, 1 if class_agnostic else 91, in_channels=256)
        out = head.layers(torch.empty(2, 256, 32, 32))
    assert (sum(p.numel() for p in head.parameters()), bn_statistics(head)) == TF_PARAMS[key]
    assert out.shape == (2, 1 if class_agnostic else 91, 64, 64)


@pytest.mark.parametrize("variant", ["hourglass10", "hourglass32"])
def test_hourglass10_32_build(variant):
    head = make_head(variant, num_filters=64, in_channels=256).eval()
    assert head.deconv.in_channels == 128  # the hourglass outputs 2n channels
    with torch.no_grad():
        assert head.layers(torch.randn(2, 256, 32, 32)).shape == (2, 1, 64, 64)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("crop, factor", [(14, 2), (7, 4), (13, 1)])
def test_output_is_crop_times_upsample_factor(variant, crop, factor):
    # Odd crops: the TF reference raises a shape error for the hourglasses there.
    head = make_head(variant, crop=crop, upsample_factor=factor).eval()
    with torch.no_grad():
        out = head.layers(torch.randn(3, 16, crop, crop))
    assert out.shape == (3, 1, crop * factor, crop * factor)


@pytest.mark.parametrize("variant", VARIANTS)
def test_gradients_reach_every_parameter(variant):
    head = make_head(variant, num_classes=3).train()
    head.layers(torch.randn(4, 16, 16, 16)).square().mean().backward()
    for name, p in head.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_class_specific_output_picks_each_rois_class():
    head = make_head(num_classes=5).eval()
    logit_of_class = torch.tensor([-2.0, -1.0, 0.5, 1.0, 3.0])
    with torch.no_grad():
        head.predictor.weight.zero_()
        head.predictor.bias.copy_(logit_of_class)
    classes = [torch.tensor([3, 0]), torch.tensor([4, 4, 2])]
    instances = []
    for c in classes:
        inst = Instances((64, 64))
        inst.pred_classes = c
        instances.append(inst)
    with torch.no_grad():
        mask_rcnn_inference(head.layers(torch.randn(5, 16, 16, 16)), instances)
    for inst, c in zip(instances, classes):
        assert inst.pred_masks.shape == (len(c), 1, 32, 32)
        expected = torch.sigmoid(logit_of_class[c])[:, None, None, None].expand(-1, 1, 32, 32)
        assert torch.allclose(inst.pred_masks, expected)


def test_init_and_batchnorm_as_reference():
    head = make_head("default", num_filters=256, num_classes=91, in_channels=256)
    convs = [m for m in head.convnet if isinstance(m, nn.Conv2d)]
    # VarianceScaling(2, fan_out, normal): std sqrt(2 / (k * k * C_out)); for the
    # transposed conv Keras' fan_out is k * k * C_in.
    for layer, fan_out in [(convs[0], 9 * 256), (head.deconv, 4 * 256), (head.predictor, 91)]:
        assert layer.weight.std().item() == pytest.approx(math.sqrt(2 / fan_out), rel=0.05)
        assert not layer.bias.any()
    bns = [m for m in head.modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(bns) == 5 and all(m.eps == 1e-3 and m.momentum == 0.01 for m in bns)
    hg_head = make_head("hourglass10")
    hg_bns = [m for m in hg_head.convnet.modules() if isinstance(m, nn.BatchNorm2d)]
    assert hg_bns and all(m.eps == 1e-5 and m.momentum == 0.9 for m in hg_bns)


@pytest.mark.parametrize("norm", ["SyncBN", "FrozenBN", "GN", ""])
def test_other_norms(norm):
    head = make_head("hourglass20", num_filters=32, norm=norm).train()
    head.layers(torch.randn(2, 16, 8, 8)).mean().backward()
    if norm == "":
        assert not any("Norm" in type(m).__name__ for m in head.modules())


def tiny_cfg(variant="default"):
    cfg = get_cfg()
    deepmac_d2.add_deepmac_config(cfg)
    zoo_config = "COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_3x.yaml"
    cfg.merge_from_file(model_zoo.get_config_file(zoo_config))
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.WEIGHTS = ""
    cfg.MODEL.RESNETS.DEPTH = 18
    cfg.MODEL.RESNETS.RES2_OUT_CHANNELS = 64
    cfg.MODEL.FPN.OUT_CHANNELS = 32
    cfg.MODEL.RPN.PRE_NMS_TOPK_TRAIN = cfg.MODEL.RPN.PRE_NMS_TOPK_TEST = 200
    cfg.MODEL.RPN.POST_NMS_TOPK_TRAIN = cfg.MODEL.RPN.POST_NMS_TOPK_TEST = 50
    cfg.MODEL.ROI_BOX_HEAD.FC_DIM = 64
    cfg.MODEL.ROI_HEADS.NUM_CLASSES = 3
    cfg.MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE = 16
    cfg.MODEL.ROI_HEADS.SCORE_THRESH_TEST = 0.0  # random weights: keep some detections
    cfg.TEST.DETECTIONS_PER_IMAGE = 4
    cfg.MODEL.ROI_MASK_HEAD.NAME = "DeepMaskHead"
    cfg.MODEL.ROI_MASK_HEAD.CONVNET_VARIANT = variant
    cfg.MODEL.ROI_MASK_HEAD.CONV_DIM = 8
    return cfg


@pytest.mark.parametrize("variant", VARIANTS)
def test_builds_from_config_through_registry(variant):
    cfg = tiny_cfg(variant)
    cfg.MODEL.ROI_MASK_HEAD.CLS_AGNOSTIC_MASK = True
    cfg.MODEL.ROI_MASK_HEAD.UPSAMPLE_FACTOR = 4
    head = build_mask_head(cfg, ShapeSpec(channels=32, height=14, width=14))
    assert isinstance(head, DeepMaskHead)
    # add_deepmac_config's NORM default is the reference's BatchNorm.
    assert any(isinstance(m, nn.BatchNorm2d) for m in head.modules())
    with torch.no_grad():
        assert head.eval().layers(torch.randn(2, 32, 14, 14)).shape == (2, 1, 56, 56)


def test_unknown_variant_names_key_and_valid_names():
    with pytest.raises(ValueError, match="MODEL.ROI_MASK_HEAD.CONVNET_VARIANT") as err:
        build_mask_head(tiny_cfg("hourglass42"), ShapeSpec(channels=32, height=14, width=14))
    assert "'hourglass42'" in str(err.value)
    assert all(name in str(err.value) for name in CONVNET_VARIANTS)


@pytest.mark.parametrize("class_agnostic", [True, False])
def test_empty_roi_batch(class_agnostic):
    head = make_head("hourglass52", num_classes=1 if class_agnostic else 3, crop=14)
    empty = Instances((64, 64))
    empty.proposal_boxes = Boxes(torch.zeros(0, 4))
    empty.gt_classes = torch.zeros(0, dtype=torch.int64)
    empty.gt_masks = BitMasks(torch.zeros(0, 64, 64, dtype=torch.bool))
    with EventStorage():
        loss = head.train()(torch.zeros(0, 16, 14, 14), [empty, empty])["loss_mask"]
    loss.backward()
    # Under DDP every parameter must be in the graph, even with nothing to learn from.
    assert loss.item() == 0
    assert all(p.grad is not None and not p.grad.any() for p in head.parameters())

    pred = Instances((64, 64))
    pred.pred_classes = torch.zeros(0, dtype=torch.int64)
    with torch.no_grad():
        (out,) = head.eval()(torch.zeros(0, 16, 14, 14), [pred])
    assert out.pred_masks.shape == (0, 1, 28, 28)


def test_lone_training_roi_at_1x1_bottleneck():
    """hourglass52 at crop 32 reaches 1x1: one ROI would leave BatchNorm one value per channel."""
    head = make_head("hourglass52", crop=32).train()
    x = torch.randn(1, 16, 32, 32, requires_grad=True)
    out = head.layers(x)
    assert out.shape == (1, 1, 64, 64)
    # Random weights: the plain sum of a BatchNorm-ed output has zero gradient.
    (out * torch.randn_like(out)).sum().backward()
    assert x.grad.abs().sum() > 0
    # The ROI is batched with its mirror image, for BatchNorm's statistics only.
    torch.testing.assert_close(out, head.layers(torch.cat([x, x.flip(-1)]))[:1])


def image_with_instances(num):
    inst = Instances((64, 64))
    boxes = torch.tensor([[8.0, 8.0, 40.0, 40.0], [20.0, 10.0, 60.0, 50.0]])[:num]
    inst.gt_boxes = Boxes(boxes)
    inst.gt_classes = torch.tensor([0, 2])[:num]
    masks = torch.zeros(num, 64, 64, dtype=torch.bool)
    for mask, (x0, y0, x1, y1) in zip(masks, boxes.int().tolist()):
        mask[y0 + 2 : y1 - 2, x0 + 2 : x1 - 2] = True
    inst.gt_masks = BitMasks(masks)
    return {"image": torch.randint(0, 256, (3, 64, 64), dtype=torch.uint8), "instances": inst}


@pytest.mark.parametrize("variant", VARIANTS)
def test_tiny_mask_rcnn_trains_and_infers(variant):
    torch.manual_seed(0)
    model = build_model(tiny_cfg(variant)).train()
    with EventStorage():
        losses = model([image_with_instances(2)])
    assert torch.isfinite(losses["loss_mask"]) and losses["loss_mask"] > 0
    sum(losses.values()).backward()
    mask_head = model.roi_heads.mask_head
    assert all(p.grad is not None for p in mask_head.parameters())

    model.eval()
    with torch.no_grad():
        (result,) = model([{"image": torch.randint(0, 256, (3, 64, 64), dtype=torch.uint8)}])
    masks = result["instances"].pred_masks
    assert len(masks) > 0 and masks.shape[-2:] == (64, 64)


def test_tiny_mask_rcnn_image_without_instances():
    model = build_model(tiny_cfg("hourglass52")).train()
    with EventStorage():
        losses = model([image_with_instances(0)])
    assert losses["loss_mask"].item() == 0
    sum(losses.values()).backward()
    assert all(p.grad is not None for p in model.roi_heads.mask_head.parameters())


def config_head(config_file):
    cfg = get_cfg()
    deepmac_d2.add_deepmac_config(cfg)
    cfg.merge_from_file(os.path.join(os.path.dirname(__file__), "..", "configs", config_file))
    return build_mask_head(cfg, ShapeSpec(channels=16, height=14, width=14))


@pytest.mark.parametrize(
    "config_file, momentum, eps",
    # The R50/R101 yamls keep the Model Garden's norm_activation (Keras 0.997, 1e-4);
    # the SpineNet yamls set 0.99 / 1e-3.
    [("voc_r50.yaml", 0.003, 1e-4), ("voc_r101_hg52.yaml", 0.003, 1e-4),
     ("voc_spinenet143_hg52.yaml", 0.01, 1e-3)],
)
def test_head_batchnorm_settings_per_recipe(config_file, momentum, eps):
    head = config_head(config_file)
    default_variant = head.convnet.__class__ is nn.Sequential
    own = [head.deconv_norm]
    if default_variant:  # its convs' norms too
        own += [m for m in head.convnet if isinstance(m, nn.BatchNorm2d)]
    assert len(own) == (5 if len(own) > 1 else 1)
    for m in own:
        assert m.momentum == pytest.approx(momentum) and m.eps == pytest.approx(eps)
    # The hourglass keeps its own (Keras 0.1 / 1e-5) whatever the recipe.
    hourglass = [m for m in head.convnet.modules() if isinstance(m, nn.BatchNorm2d)]
    if not default_variant:
        assert hourglass and all(m.momentum == 0.9 and m.eps == 1e-5 for m in hourglass)


def soft_target_case():
    """One 8x8 image whose mask covers columns 0..3; the box spans x 2 to 7.5."""
    inst = Instances((8, 8))
    inst.proposal_boxes = Boxes(torch.tensor([[2.0, 0.0, 7.5, 8.0]]))
    inst.gt_classes = torch.tensor([0])
    mask = torch.zeros(1, 8, 8, dtype=torch.bool)
    mask[:, :, :4] = True
    inst.gt_masks = BitMasks(mask)
    return inst


def reference_soft_target(side):
    """By hand: the crop's 112 bilinear samples along x, then a bilinear resize to ``side``."""
    # Sample i of 112 over x in [2, 7.5] sits at 2 + (i + 0.5) * 5.5 / 112 in image
    # coordinates, pixel index u = that - 0.5; the mask is 1 up to u = 3, 0 from u = 4.
    u = 2 + (np.arange(112) + 0.5) * 5.5 / 112 - 0.5
    crop = np.clip(4 - u, 0, 1)
    # Resize 112 -> side with half-pixel centres (align_corners False), edges clamped.
    src = np.clip((np.arange(side) + 0.5) * 112 / side - 0.5, 0, 111)
    row = np.interp(src, np.arange(112), crop)
    return np.tile(row, (side, 1))


def test_soft_mask_targets_as_reference():
    inst = soft_target_case()
    soft = SoftBitMasks(inst.gt_masks.tensor).crop_and_resize(inst.proposal_boxes.tensor, 28)[0]
    expected = reference_soft_target(28)
    assert ((expected > 0) & (expected < 1)).any()  # soft: values strictly between 0 and 1
    np.testing.assert_allclose(soft.numpy(), expected, atol=1e-5)

    # Through the head's loss: constant logits c give BCE = softplus(c) - c * mean(target).
    c = 0.7
    for soft_targets, target_mean in ((True, expected.mean()), (False, None)):
        head = make_head("default", num_filters=8, crop=14, soft_targets=soft_targets).train()
        nn.init.zeros_(head.predictor.weight)
        nn.init.constant_(head.predictor.bias, c)
        with EventStorage():
            loss = head(torch.randn(1, 16, 14, 14), [soft_target_case()])["loss_mask"].item()
        if soft_targets:
            assert loss == pytest.approx(math.log1p(math.exp(c)) - c * target_mean, rel=1e-5)
        else:
            # Default: Detectron2's binarised targets, unchanged.
            binary = inst.gt_masks.crop_and_resize(inst.proposal_boxes.tensor, 28).float().mean().item()
            assert loss == pytest.approx(math.log1p(math.exp(c)) - c * binary, rel=1e-5)
            assert binary != pytest.approx(expected.mean(), rel=1e-3)


def test_soft_targets_from_polygons_and_config():
    cfg = get_cfg()
    deepmac_d2.add_deepmac_config(cfg)
    assert cfg.MODEL.ROI_MASK_HEAD.SOFT_TARGETS is False  # default unchanged
    inst = soft_target_case()
    inst.gt_masks = PolygonMasks([[np.array([0.0, 0.0, 4.0, 0.0, 4.0, 8.0, 0.0, 8.0])]])
    soft = _with_soft_masks(inst).gt_masks.crop_and_resize(inst.proposal_boxes.tensor, 28)[0]
    np.testing.assert_allclose(soft.numpy(), reference_soft_target(28), atol=1e-5)
    assert isinstance(inst.gt_masks, PolygonMasks)  # the caller's instances are untouched
