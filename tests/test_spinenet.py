"""SpineNet against the TF Model Garden reference's figures and hand-worked cases.

The parameter counts were measured by building the reference here
(``official/vision/modeling/backbones/spinenet.py`` from tf-models-official 2.20, at
input 128, levels 3..7; ``tools/tf_reference/parity_tf.py`` prints them): trainable = conv kernels +
BN gamma/beta, non-trainable = BN moving statistics. ``make parity`` compares outputs.
"""
import copy
import math
import os
import pickle

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import deepmac_d2
from detectron2.config import get_cfg
from detectron2.modeling import build_backbone, build_model
from deepmac_d2.tf_port import spinenet as sp
from deepmac_d2.tf_port import layers as tf_layers
from deepmac_d2.modeling.hourglass import KerasBatchNorm2d
from mask_rcnn_step import train_one_step_and_infer

CONFIGS = os.path.join(os.path.dirname(__file__), "..", "configs")

# model id: (trainable, non-trainable) of the reference at levels 3..7.
TF_PARAMS = {
    "49": (21_831_488, 88_704),
    "96": (36_262_976, 122_752),
    "143": (60_247_616, 166_272),
    "190": (126_587_664, 261_552),
}


def counts(model):
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    stats = sum(b.numel() for n, b in model.named_buffers() if n.endswith(("running_mean", "running_var")))
    return trainable, stats


@pytest.mark.parametrize("model_id", sorted(TF_PARAMS))
def test_parameter_counts_equal_reference(model_id):
    with torch.device("meta"):  # counts only: no memory, no init
        model = sp.SpineNet(model_id)
    assert counts(model) == TF_PARAMS[model_id]


def spine_cfg(**overrides):
    cfg = get_cfg()
    deepmac_d2.add_deepmac_config(cfg)
    cfg.MODEL.BACKBONE.NAME = "build_spinenet_backbone"
    for key, value in overrides.items():
        setattr(cfg.MODEL.SPINENET, key, value)
    return cfg


def test_output_shapes_per_level():
    backbone = build_backbone(spine_cfg(MODEL_ID=49))
    shapes = backbone.output_shape()
    assert list(shapes) == ["p3", "p4", "p5", "p6", "p7"]
    assert [shapes[f"p{k}"].stride for k in range(3, 8)] == [8, 16, 32, 64, 128]
    assert all(s.channels == 256 for s in shapes.values())
    assert backbone.size_divisibility == 128
    with torch.no_grad():
        out = backbone.eval()(torch.randn(2, 3, 256, 384))
    for name, spec in shapes.items():
        assert out[name].shape == (2, 256, 256 // spec.stride, 384 // spec.stride)


def test_levels_and_width_from_config():
    backbone = build_backbone(spine_cfg(MODEL_ID=49, MIN_LEVEL=4, MAX_LEVEL=6))
    assert list(backbone.output_shape()) == ["p4", "p5", "p6"]
    with torch.device("meta"):
        assert sp.SpineNet("190").output_shape()["p5"].channels == 512


def test_single_process_syncbn_is_keras_batchnorm_with_reference_settings():
    backbone = build_backbone(spine_cfg())
    norms = [m for m in backbone.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    # No process group: "SyncBN" is the same computation as BN, which trains on CPU.
    assert norms and all(type(m) is KerasBatchNorm2d for m in norms)
    assert all(m.momentum == 0.01 and m.eps == 1e-3 for m in norms)


def test_bad_input_size_names_the_sizes_that_work():
    backbone = build_backbone(spine_cfg()).eval()
    with pytest.raises(ValueError, match="multiples of 128") as err:
        backbone(torch.randn(1, 3, 200, 256))
    assert "build_spinenet_backbone" in str(err.value) and "(1, 3, 200, 256)" in str(err.value)


@pytest.mark.parametrize(
    "overrides, key",
    [({"MODEL_ID": 50}, "MODEL.SPINENET.MODEL_ID"), ({"MIN_LEVEL": 1}, "MODEL.SPINENET.MIN_LEVEL"),
     ({"MAX_LEVEL": 8}, "MODEL.SPINENET.MIN_LEVEL")],
)
def test_bad_config_names_the_key(overrides, key):
    with pytest.raises(ValueError, match=key):
        build_backbone(spine_cfg(**overrides))


def test_same_padding_puts_the_extra_pixel_after():
    # TF 'SAME', stride 2 on an even size: a 3x3 window at output (0, 0) covers input
    # rows/cols 0..2 (no padding before); PyTorch's padding=1 would cover -1..1.
    conv = tf_layers.Conv2dSame(1, 1, 3, stride=2)
    nn.init.ones_(conv.weight)
    x = torch.arange(16.0).reshape(1, 1, 4, 4)
    with torch.no_grad():
        y = conv(x)[0, 0]
    assert y.tolist() == [[x[0, 0, 0:3, 0:3].sum().item(), x[0, 0, 0:3, 2:4].sum().item()],
                          [x[0, 0, 2:4, 0:3].sum().item(), x[0, 0, 2:4, 2:4].sum().item()]]
    # The stem's 7x7 stride 2: 2 before, 3 after on even sizes.
    assert tf_layers.same_padding(128, 7, 2) == (2, 3)
    # Max pool: padding never wins (all-negative input).
    assert tf_layers.max_pool_same(-torch.ones(1, 1, 4, 4)).tolist() == [[[[-1.0, -1.0], [-1.0, -1.0]]]]
    # ... and its ceil_mode windows are those of an explicit -inf 'SAME' padding, odd sizes too.
    for h, w in [(1, 2), (3, 4), (5, 6), (8, 7), (10, 9)]:
        x = torch.randn(2, 3, h, w)
        (top, bottom), (left, right) = tf_layers.same_padding(h, 3, 2), tf_layers.same_padding(w, 3, 2)
        padded = F.pad(x, (left, right, top, bottom), value=-math.inf)
        assert torch.equal(tf_layers.max_pool_same(x), F.max_pool2d(padded, 3, 2))


def test_stochastic_depth_rates_as_reference():
    with torch.device("meta"):
        model = sp.SpineNet("49", stochastic_depth_rate=0.2)
    for block_id, blk in model.blocks.items():  # ids 2..17 are blocks 0..15
        for block in blk.group:
            assert block.drop_rate == pytest.approx(0.2 * (int(block_id) - 1) / 16)
    assert all(b.drop_rate == 0 for g in model.stem_groups for b in g)


def test_stochastic_depth_per_sample_in_training_off_in_eval():
    torch.manual_seed(0)
    block = sp.bottleneck_block(16, 4, projection=False, drop_rate=0.5, norm="BN").eval()
    x = torch.randn(1, 16, 4, 4).expand(64, -1, -1, -1).contiguous()
    with torch.no_grad():
        branch = block.branch(x)
        kept, dropped = torch.relu(branch / 0.5 + x), torch.relu(x)
        # Eval: the plain residual block, never dropped, never rescaled.
        torch.testing.assert_close(block(x), torch.relu(branch + x))
        block.train()
        block.branch.eval()  # BN statistics out of the way: only the drop is random
        y = block(x)
    is_kept = [torch.allclose(y[i], kept[i]) for i in range(64)]
    is_dropped = [torch.allclose(y[i], dropped[i]) for i in range(64)]
    assert all(k != d for k, d in zip(is_kept, is_dropped))  # each sample: one or the other
    assert 16 < sum(is_kept) < 48  # per sample, about half: not all or none of the batch


def spinenet143_hg52_cfg():
    cfg = get_cfg()
    deepmac_d2.add_deepmac_config(cfg)
    cfg.merge_from_file(os.path.join(CONFIGS, "voc_spinenet143_hg52.yaml"))
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.ROI_HEADS.NUM_CLASSES = 3
    cfg.MODEL.ROI_MASK_HEAD.ALLOWED_CLASS_IDS = []  # no dataset to map COCO ids through
    # CPU-sized sampling; the networks are the config's.
    cfg.MODEL.RPN.POST_NMS_TOPK_TRAIN = cfg.MODEL.RPN.POST_NMS_TOPK_TEST = 50
    cfg.MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE = 32
    cfg.MODEL.ROI_HEADS.SCORE_THRESH_TEST = 0.0
    cfg.TEST.DETECTIONS_PER_IMAGE = 4
    return cfg


@pytest.mark.slow
def test_spinenet143_hg52_mask_rcnn_trains_one_step_and_infers():
    torch.manual_seed(0)
    cfg = spinenet143_hg52_cfg()
    model = build_model(cfg).train()
    assert isinstance(model.backbone, sp.SpineNet) and model.backbone.model_id == "143"
    assert counts(model.backbone) == TF_PARAMS["143"]
    # From scratch at 128 px, level 7 is 1x1: BatchNorm over 2 values per channel makes
    # the first step's gradients huge (the recipe's 1280 px has 10x10 there): clipped.
    train_one_step_and_infer(model)
    assert not model.backbone.training and all(not b.training for b in model.backbone.modules())
