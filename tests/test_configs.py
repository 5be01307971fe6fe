"""Every config loads, builds, evaluates the right class subset by default and trains.

Full-size models are built on the meta device (shapes, no memory, no weights: the
ImageNet weights the configs name are never fetched); a shrunk copy of each mask-head
kind runs one training step and one inference on CPU.
"""
import glob
import os

import pytest
import torch
from detectron2.config import get_cfg
from detectron2.modeling import build_model
from detectron2.structures import BitMasks, Boxes, Instances
from detectron2.utils.events import EventStorage

from deepmac_d2 import add_deepmac_config
from deepmac_d2.data.class_splits import NONVOC_CLASS_IDS, VOC_CLASS_IDS, resolve_class_ids
from deepmac_d2.evaluation.subset_evaluation import class_subsets_from_config

CONFIG_DIR = os.path.join(os.path.dirname(__file__), os.pardir, "configs")
# The COCO configs of the reference table; demo_* configs train on the synthetic data.
CONFIGS = sorted(
    os.path.basename(p)
    for p in glob.glob(os.path.join(CONFIG_DIR, "*.yaml"))
    if not os.path.basename(p).startswith("demo_")
)
SPLIT_CONFIGS = [c for c in CONFIGS if c != "Base-DeepMAC.yaml"]

# Trainable parameters of the reference's mask head, measured on the TF Model Garden head
# (docs/reference/tf_mask_head_params.md, class-agnostic rows).
TF_MASK_HEAD_PARAMS = {("default", 256): 2_625_537, ("hourglass52", 64): 23_606_145}


def load(name):
    cfg = get_cfg()
    add_deepmac_config(cfg)
    cfg.merge_from_file(os.path.join(CONFIG_DIR, name))
    return cfg


def test_the_expected_configs_exist():
    assert set(SPLIT_CONFIGS) == {
        "voc_r50.yaml",
        "voc_r50_hg52.yaml",
        "voc_r101_hg52.yaml",
        "nonvoc_r50_hg52.yaml",
        "nonvoc_r101_hg52.yaml",
        "voc_spinenet143_hg52.yaml",
        "nonvoc_spinenet143_hg52.yaml",
        "voc_tf_r50_hg52.yaml",
        # The weak mask losses on the other split's boxes (docs/weak_losses.md).
        "voc_r50_hg52_weak.yaml",
        "nonvoc_r50_hg52_weak.yaml",
    }


@pytest.mark.parametrize("name", CONFIGS)
def test_config_builds_the_model_it_names(name):
    cfg = load(name)
    cfg.MODEL.DEVICE = "meta"
    with torch.device("meta"):
        model = build_model(cfg)
    head = cfg.MODEL.ROI_MASK_HEAD
    assert type(model.roi_heads).__name__ == "DeepMaskROIHeads"
    assert model.roi_heads.mask_use_gt_boxes and head.CLS_AGNOSTIC_MASK
    assert cfg.DATASETS.TRAIN == ("coco_2017_train",) and cfg.DATASETS.TEST == ("coco_2017_val",)

    if "spinenet" in name:
        # From scratch, as the reference; SpineNet-143 on P3..P7.
        assert cfg.MODEL.WEIGHTS == "" and cfg.MODEL.SPINENET.MODEL_ID == 143
        assert type(model.backbone).__name__ == "SpineNet"
        assert list(model.backbone.output_shape()) == ["p3", "p4", "p5", "p6", "p7"]
    elif "_tf_" in name:
        # The reference's own ResNet-FPN, for its converted checkpoints: P2..P6, from scratch.
        assert cfg.MODEL.WEIGHTS == "" and cfg.MODEL.RESNETS.DEPTH == 50
        assert type(model.backbone).__name__ == "TFResNetFPN"
        assert list(model.backbone.output_shape()) == ["p2", "p3", "p4", "p5", "p6"]
    else:
        depth = 101 if "r101" in name else 50
        assert cfg.MODEL.RESNETS.DEPTH == depth
        assert cfg.MODEL.WEIGHTS == f"detectron2://ImageNetPretrained/MSRA/R-{depth}.pkl"

    variant = "hourglass52" if "hg52" in name else "default"
    assert head.CONVNET_VARIANT == variant
    assert head.POOLER_RESOLUTION * head.UPSAMPLE_FACTOR == (64 if variant == "hourglass52" else 28)
    trainable = sum(
        p.numel()
        for m in model.roi_heads.mask_head.modules()
        for p in m.parameters(recurse=False)
    )
    assert trainable == TF_MASK_HEAD_PARAMS[(variant, head.CONV_DIM)]


@pytest.mark.parametrize("name", SPLIT_CONFIGS)
def test_default_eval_subset_is_the_held_out_split(name):
    cfg = load(name)
    trained = resolve_class_ids(cfg.MODEL.ROI_MASK_HEAD.ALLOWED_CLASS_IDS)
    seen, novel = (VOC_CLASS_IDS, NONVOC_CLASS_IDS) if name.startswith("voc") else (
        NONVOC_CLASS_IDS,
        VOC_CLASS_IDS,
    )
    assert trained == list(seen)
    subsets = list(class_subsets_from_config(cfg).items())
    # The headline subset comes first; the seen classes are reported too.
    assert subsets[0][1] == list(novel) and subsets[1][1] == list(seen)


def flat(node, prefix=""):
    out = {}
    for k, v in node.items():
        out.update(flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


@pytest.mark.parametrize("name", [c for c in SPLIT_CONFIGS if c.startswith("nonvoc_")])
def test_a_nonvoc_config_is_its_voc_twin_with_the_splits_swapped(name):
    # What lets test_coco_configs.py train one nonvoc_* config for all of them.
    voc, nonvoc = flat(load(name.replace("nonvoc_", "voc_", 1))), flat(load(name))
    differ = {k for k in voc if voc[k] != nonvoc[k]}
    assert differ <= {"MODEL.ROI_MASK_HEAD.ALLOWED_CLASS_IDS", "DATASETS.EVAL_CLASS_SUBSETS", "OUTPUT_DIR"}, differ


def tiny(cfg):
    """Shrink a config's model to CPU-test size, keeping its mask-head variant and crop."""
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.WEIGHTS = ""
    cfg.MODEL.RESNETS.DEPTH = 18
    cfg.MODEL.RESNETS.RES2_OUT_CHANNELS = 64
    cfg.MODEL.FPN.OUT_CHANNELS = 32
    cfg.MODEL.RPN.POST_NMS_TOPK_TRAIN = cfg.MODEL.RPN.POST_NMS_TOPK_TEST = 32
    cfg.MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE = 32
    cfg.MODEL.ROI_BOX_HEAD.FC_DIM = 32
    cfg.MODEL.ROI_MASK_HEAD.CONV_DIM = 8
    cfg.TEST.DETECTIONS_PER_IMAGE = 5
    return cfg


def image_with_objects(coco_contiguous_classes):
    size = 128
    boxes = torch.tensor([[8.0, 8, 60, 70], [64, 40, 120, 120]])[: len(coco_contiguous_classes)]
    masks = torch.zeros(len(boxes), size, size, dtype=torch.bool)
    for m, (x0, y0, x1, y1) in zip(masks, boxes.int().tolist()):
        m[y0:y1, x0:x1] = True
    instances = Instances((size, size))
    instances.gt_boxes = Boxes(boxes)
    instances.gt_classes = torch.tensor(coco_contiguous_classes)
    instances.gt_masks = BitMasks(masks)
    image = torch.randint(0, 256, (3, size, size), dtype=torch.uint8)
    return {"image": image, "instances": instances, "height": size, "width": size}


@pytest.mark.parametrize("name", ["voc_r50.yaml", "voc_r50_hg52.yaml"])
def test_shrunk_model_trains_and_predicts(name):
    torch.manual_seed(0)
    model = build_model(tiny(load(name)))
    # Contiguous COCO classes: 0 = person (VOC, has masks), 7 = truck (non-VOC, box only).
    # Two masked ROIs: with one, training BatchNorm fails at Hourglass-52's 1x1 bottleneck.
    batch = [image_with_objects([0, 7]), image_with_objects([7, 0])]
    with EventStorage():
        losses = model(batch)
    assert {"loss_mask", "loss_cls", "loss_box_reg", "loss_rpn_cls"} <= set(losses)
    assert all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()

    model.eval()
    with torch.no_grad():
        (out,) = model([{"image": batch[0]["image"], "height": 128, "width": 128}])
    assert out["instances"].pred_masks.shape[1:] == (128, 128)
