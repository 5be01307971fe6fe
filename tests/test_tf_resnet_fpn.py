"""The reference's ResNet-FPN (deepmac_d2.tf_port.resnet_fpn) against its figures and hand-worked cases.

The parameter counts were measured by building the reference here (tf-models-official
2.20: ``resnet.ResNet(50)`` + ``fpn.FPN`` at levels 2..6, 256 filters;
``tools/tf_reference/parity_tf.py`` prints them for case resnet50_fpn): trainable = conv kernels and
biases + BN gamma/beta, non-trainable = BN moving statistics. ``make parity`` compares
the outputs.
"""
import os

import pytest
import torch
from detectron2.config import get_cfg
from detectron2.layers import FrozenBatchNorm2d
from detectron2.modeling import build_backbone, build_model
from torch import nn

import deepmac_d2
from deepmac_d2.tf_port import resnet_fpn as rf
from deepmac_d2.modeling.hourglass import KerasBatchNorm2d
from deepmac_d2.modeling.mask_head import DeepMaskHead
from deepmac_d2.tf_port.heads import TFFastRCNNOutputLayers, TFRPNHead
from mask_rcnn_step import train_one_step_and_infer

CONFIGS = os.path.join(os.path.dirname(__file__), "..", "configs")
TF_PARAMS_R50_FPN256 = (27_445_056, 55_680)


def counts(model):
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    stats = sum(b.numel() for n, b in model.named_buffers() if n.endswith(("running_mean", "running_var")))
    return trainable, stats


def resnet_fpn_cfg(*opts):
    cfg = get_cfg()
    deepmac_d2.add_deepmac_config(cfg)
    cfg.merge_from_file(os.path.join(CONFIGS, "voc_tf_r50_hg52.yaml"))
    cfg.merge_from_list(list(opts))
    return cfg


def test_parameter_counts_equal_reference():
    with torch.device("meta"):
        assert counts(rf.TFResNetFPN(50)) == TF_PARAMS_R50_FPN256


def test_levels_strides_and_shapes_from_config():
    cfg = resnet_fpn_cfg("MODEL.FPN.OUT_CHANNELS", "32")
    with torch.device("meta"):
        backbone = build_backbone(cfg)
    shapes = backbone.output_shape()
    assert list(shapes) == ["p2", "p3", "p4", "p5", "p6"]
    assert [s.stride for s in shapes.values()] == [4, 8, 16, 32, 64]
    assert all(s.channels == 32 for s in shapes.values())
    assert backbone.size_divisibility == 64  # the reference pads to 2^max_level
    # The config's BN: SyncBN as the reference (one process: Keras-style BN), 0.997 / 1e-4.
    norms = [m for m in backbone.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert norms and all(type(m) is KerasBatchNorm2d and (m.momentum, m.eps) == (0.003, 1e-4) for m in norms)
    # 96 x 160: multiples of 32 but not 64; P5 is 3 x 5, P6 its 'SAME' stride-2 conv, 2 x 3.
    small = rf.TFResNetFPN(50, min_level=3, max_level=7, num_filters=8, norm="BN", fpn_norm="BN").eval()
    with torch.no_grad():
        out = small(torch.randn(1, 3, 96, 160))
    assert {k: tuple(v.shape[-2:]) for k, v in out.items()} == {
        "p3": (12, 20), "p4": (6, 10), "p5": (3, 5), "p6": (2, 3), "p7": (1, 2)}
    assert list(small.output_shape()) == list(out) and small.output_shape()["p7"].stride == 128


def test_bottleneck_strides_its_3x3_and_projection():
    # The reference strides the 3x3 conv (and the 1x1 shortcut), not the first 1x1 as
    # Detectron2's STRIDE_IN_1X1 default does.
    with torch.device("meta"):
        first = rf.TFResNet(50).groups[1][0]
    assert first.shortcut[0].stride == (2, 2) and first.shortcut[0].kernel_size == (1, 1)
    assert [c[0].stride for c in first.branch] == [(1, 1), (2, 2), (1, 1)]


def test_fpn_against_hand_computation():
    # One channel, laterals = identity, 3x3 post-hoc convs = their centre tap, the P6 conv
    # = its top-left tap, no norm: P5 = C5, Pk = up2(P(k+1)) + Ck, and P6 = P5 at even
    # positions, because TF's 'SAME' pads the 4x4 P5 after (rows/cols 0..2 under the
    # window at (0, 0)), where PyTorch's symmetric padding would read row/col -1.
    fpn = rf.TFFPN({2: 1, 3: 1, 4: 1, 5: 1}, 2, 6, num_filters=1, norm="")
    with torch.no_grad():
        for conv in [*fpn.lateral.values(), *fpn.post_hoc.values(), *fpn.coarser.values()]:
            conv.weight.zero_()
            conv.bias.zero_()
        for conv in fpn.lateral.values():
            conv.weight.fill_(1.0)
        for conv in fpn.post_hoc.values():
            conv.weight[0, 0, 1, 1] = 1.0
        fpn.coarser["6"].weight[0, 0, 0, 0] = 1.0
        c = {k: torch.randn(1, 1, 64 // 2 ** k, 64 // 2 ** k) for k in (2, 3, 4, 5)}
        out = fpn(c)
    up = lambda x: x.repeat_interleave(2, -1).repeat_interleave(2, -2)  # noqa: E731
    expected = {5: c[5]}
    for k in (4, 3, 2):
        expected[k] = up(expected[k + 1]) + c[k]
    # Sums of at most 4 terms, each rounded once: within float32's default tolerance.
    for k in (2, 3, 4, 5):
        torch.testing.assert_close(out[k], expected[k])
    torch.testing.assert_close(out[6], c[5][..., ::2, ::2])
    assert out[6][0, 0, 0, 0] == c[5][0, 0, 0, 0]  # symmetric padding would give 0 here


def test_freeze_at_freezes_stem_and_res2_as_detectron2():
    with torch.device("meta"):
        backbone = build_backbone(resnet_fpn_cfg("MODEL.BACKBONE.FREEZE_AT", "2"))
    frozen = [backbone.bottom_up.stem, backbone.bottom_up.groups[0]]
    for module in frozen:
        assert not any(p.requires_grad for p in module.parameters())
        assert any(isinstance(m, FrozenBatchNorm2d) for m in module.modules())
    assert all(p.requires_grad for p in backbone.bottom_up.groups[1].parameters())


@pytest.mark.parametrize("opts, key", [
    (["MODEL.RESNETS.DEPTH", "34"], "MODEL.RESNETS.DEPTH=34"),
    (["MODEL.FPN.MIN_LEVEL", "1"], "MODEL.FPN.MIN_LEVEL=1"),
    (["MODEL.FPN.MIN_LEVEL", "4", "MODEL.FPN.MAX_LEVEL", "3"], "MODEL.FPN.MIN_LEVEL=4, MAX_LEVEL=3"),
    (["MODEL.FPN.FUSE_TYPE", "avg"], "MODEL.FPN.FUSE_TYPE='avg'"),
    (["MODEL.RESNETS.NUM_GROUPS", "32"], "MODEL.RESNETS.NUM_GROUPS=32"),
])
def test_bad_config_names_the_key_and_what_works(opts, key):
    with pytest.raises(ValueError) as err, torch.device("meta"):
        build_backbone(resnet_fpn_cfg(*opts))
    assert key in str(err.value)
    assert any(hint in str(err.value) for hint in ("50, 101", "the reference: 2 and 6", "set it to"))


def test_bad_input_size_names_the_sizes_that_work():
    with torch.device("meta"):  # refused before any computation
        backbone = rf.TFResNetFPN(50, num_filters=8, norm="BN", fpn_norm="BN").eval()
        with pytest.raises(ValueError, match="multiples of 32") as err:
            backbone(torch.empty(1, 3, 80, 64))
    assert "build_tf_resnet_fpn_backbone" in str(err.value) and "(1, 3, 80, 64)" in str(err.value)


@pytest.mark.slow
def test_mask_rcnn_with_deep_mask_head_trains_one_step_and_infers():
    # The reference's whole architecture: its ResNet-FPN, RPN head and box head (their
    # outputs reordered into Detectron2's losses and inference), DeepMaskHead.
    torch.manual_seed(0)
    cfg = resnet_fpn_cfg(
        "MODEL.RPN.HEAD_NAME", "TFRPNHead", "MODEL.ROI_BOX_HEAD.NAME", "TFConvFCHead",
        "MODEL.ROI_BOX_HEAD.NUM_CONV", "1", "MODEL.ROI_BOX_HEAD.CONV_DIM", "16", "MODEL.ROI_BOX_HEAD.NUM_FC", "1",
        "MODEL.ROI_BOX_HEAD.NORM", "SyncBN", "MODEL.ANCHOR_GENERATOR.OFFSET", "0.5",
        "MODEL.DEVICE", "cpu", "MODEL.FPN.OUT_CHANNELS", "32", "MODEL.ROI_HEADS.NUM_CLASSES", "3",
        "MODEL.ROI_MASK_HEAD.ALLOWED_CLASS_IDS", "[]", "MODEL.ROI_MASK_HEAD.CONVNET_VARIANT", "hourglass10",
        "MODEL.ROI_MASK_HEAD.CONV_DIM", "8", "MODEL.ROI_MASK_HEAD.POOLER_RESOLUTION", "8",
        "MODEL.ROI_BOX_HEAD.FC_DIM", "64", "MODEL.RPN.POST_NMS_TOPK_TRAIN", "50",
        "MODEL.RPN.POST_NMS_TOPK_TEST", "50", "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE", "32",
        "MODEL.ROI_HEADS.SCORE_THRESH_TEST", "0.0", "TEST.DETECTIONS_PER_IMAGE", "4",
    )
    model = build_model(cfg)
    assert isinstance(model.backbone, rf.TFResNetFPN) and isinstance(model.roi_heads.mask_head, DeepMaskHead)
    assert isinstance(model.proposal_generator.rpn_head, TFRPNHead)
    assert isinstance(model.roi_heads.box_predictor, TFFastRCNNOutputLayers)
    train_one_step_and_infer(model)
