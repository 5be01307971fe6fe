"""The reference's RPN and box heads (deepmac_d2.tf_port.heads): outputs in Detectron2's layout.

Hand-worked cases: the predictors' biases alone carry known values through the layout
change (anchor order, background position, (dy, dx, dh, dw) -> (dx, dy, dw, dh)).
``make parity`` (cases rpn_head, box_head) compares the outputs with the reference's.
"""
import pytest
import torch
from detectron2.layers import ShapeSpec
from detectron2.modeling.box_regression import Box2BoxTransform

import deepmac_d2  # noqa: F401  (registers)
from deepmac_d2.tf_port.heads import TFConvFCHead, TFFastRCNNOutputLayers, TFRPNHead, reference_anchor_order


def test_anchor_order_inverts_the_ratios_per_size():
    # Detectron2's ratio 0.5 (h / w: wide) is the reference's 2.0 (w / h), its index 2.
    assert reference_anchor_order([0.5, 1.0, 2.0], 1) == [2, 1, 0]
    assert reference_anchor_order([0.5, 1.0, 2.0], 2) == [2, 1, 0, 5, 4, 3]
    assert reference_anchor_order([1.0, 2.0, 0.5], 1) == [0, 2, 1]
    with pytest.raises(ValueError, match=r"MODEL.ANCHOR_GENERATOR.ASPECT_RATIOS \[0.5, 1.0\]"):
        reference_anchor_order([0.5, 1.0], 1)


def test_rpn_head_reorders_anchors_and_coordinates():
    head = TFRPNHead(in_channels=4, num_levels=2, anchor_order=[2, 1, 0], conv_dims=4, norm="BN").eval()
    with torch.no_grad():
        for layer, n in ((head.objectness_logits, 3), (head.anchor_deltas, 12)):
            layer.weight.zero_()
            layer.bias.copy_(torch.arange(float(n)))
        logits, deltas = head([torch.randn(1, 4, 4, 4), torch.randn(1, 4, 2, 2)])
    assert [tuple(t.shape) for t in logits] == [(1, 3, 4, 4), (1, 3, 2, 2)]
    assert logits[1][0, :, 0, 0].tolist() == [2.0, 1.0, 0.0]
    # Our anchor 0 is the reference's 2, whose (dy, dx, dh, dw) are outputs 8..11.
    assert deltas[0][0, :, 1, 1].tolist() == [9, 8, 11, 10, 5, 4, 7, 6, 1, 0, 3, 2]
    # One conv shared by the levels, a BatchNorm per level.
    assert len(head.convs) == 1 and len(head.norms) == 2


def test_box_predictor_puts_background_last_and_drops_its_deltas():
    head = TFConvFCHead(ShapeSpec(channels=8, height=3, width=3), conv_dim=8, num_conv=1, fc_dim=16, norm="BN")
    predictor = TFFastRCNNOutputLayers(head.output_shape, box2box_transform=Box2BoxTransform((10.0, 10.0, 5.0, 5.0)),
                                       num_classes=3)
    assert (predictor.cls_score.out_features, predictor.bbox_pred.out_features) == (4, 16)  # the reference's
    with torch.no_grad():
        for layer, n in ((predictor.cls_score, 4), (predictor.bbox_pred, 16)):
            layer.weight.zero_()
            layer.bias.copy_(torch.arange(float(n)))
        scores, deltas = predictor(head.eval()(torch.randn(2, 8, 3, 3)))
    assert scores[0].tolist() == [1, 2, 3, 0]  # classes 1..3, then the background (reference class 0)
    assert deltas[0].tolist() == [5, 4, 7, 6, 9, 8, 11, 10, 13, 12, 15, 14]


def test_box_head_flattens_as_the_reference():
    # (height, width, channel) order: the FC's input j*C + c is pixel j's channel c.
    head = TFConvFCHead(ShapeSpec(channels=2, height=1, width=2), num_conv=0, fc_dim=1, norm="")
    with torch.no_grad():
        head.fcs[0][0].weight.copy_(torch.tensor([[1.0, 10.0, 100.0, 1000.0]]))
        head.fcs[0][0].bias.zero_()
        x = torch.tensor([[[[1.0, 2.0]], [[3.0, 4.0]]]])  # channel 0: 1, 2; channel 1: 3, 4
        assert head(x).item() == 1 * 1 + 3 * 10 + 2 * 100 + 4 * 1000
