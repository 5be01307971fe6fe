"""fuse_for_inference: every BatchNorm after a conv folded into it, the same function.

Compared in float64, where the fold's only error is float64 rounding (the bound of
tests/tolerance.py with float64's eps), and in float32 against the float64 result,
which bounds both the folded and the unfolded float32 model alike.
"""
import copy

import pytest
import torch
from torch import nn

import deepmac_d2  # noqa: F401  (registers the heads)
from detectron2.layers import FrozenBatchNorm2d, ShapeSpec
from detectron2.modeling import build_model
from deepmac_d2.engine import load_config
from deepmac_d2.modeling import DeepMaskHead, fuse_for_inference
from deepmac_d2.tf_port import TFConvFCHead
from deepmac_d2.tf_port import spinenet as sp
from tolerance import assert_close_to_rounding

# Float comparisons: make test runs these again on the AVX2 kernels.
pytestmark = pytest.mark.numeric

NORMS = (nn.BatchNorm2d, FrozenBatchNorm2d)


def randomise_norms(model):
    """BatchNorms that are no identities, so a fold that drops one changes the output."""
    torch.manual_seed(0)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, NORMS):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
    return model.eval()


def assert_fold_is_exact(model, x, depth, fan_in, run=lambda model, x: model(x)):
    """The folded copy of ``model`` against ``model``: float64 and float32 both within
    rounding of the float64 result; no foldable norm is left."""
    model = model.double()
    with torch.no_grad():
        reference = run(model, x.double())
        fused = fuse_for_inference(copy.deepcopy(model))
        assert not [m for m in fused.modules() if isinstance(m, NORMS)]
        for dtype in (torch.float64, torch.float32):
            y = run(fused.to(dtype), x.to(dtype))
            for k in (reference if isinstance(reference, dict) else [None]):
                got, want = (y, reference) if k is None else (y[k], reference[k])
                assert_close_to_rounding(got, want, depth, fan_in, f"{dtype} {k}")
    return fused


def test_spinenet_folds_every_batchnorm():
    model = randomise_norms(sp.SpineNet("49", norm="BN"))
    # Stem to p7: at most 60 convs deep; fan-in up to 3 x 3 x 256.
    assert_fold_is_exact(model, torch.randn(1, 3, 128, 128), depth=60, fan_in=9 * 256)


@pytest.mark.parametrize("variant", ["default", "hourglass20"])
def test_mask_head_folds_its_convnet_and_deconv(variant):
    head = randomise_norms(DeepMaskHead(ShapeSpec(channels=16), num_classes=1, convnet_variant=variant,
                                        num_filters=8, norm="BN"))
    # Hourglass-20: about 30 convs on the deepest path; fan-in up to 3 x 3 x 24.
    fused = assert_fold_is_exact(head, torch.randn(3, 16, 14, 14), depth=30, fan_in=9 * 24,
                                 run=lambda head, x: head.layers(x))
    assert isinstance(fused.deconv_norm, nn.Identity)


def test_resnet_frozen_batchnorm_and_tf_box_head_fold():
    cfg = load_config(type("Args", (), {"config_file": "", "opts": [
        "MODEL.RESNETS.DEPTH", "18", "MODEL.RESNETS.RES2_OUT_CHANNELS", "64",
        "MODEL.RESNETS.NORM", "FrozenBN", "MODEL.DEVICE", "cpu"]})())
    backbone = randomise_norms(build_model(cfg).backbone)
    # ResNet-18 + FPN: 17 convs to C5, 2 more in the FPN; fan-in up to 3 x 3 x 512.
    assert_fold_is_exact(backbone, torch.randn(1, 3, 64, 64), depth=19, fan_in=9 * 512)
    head = randomise_norms(TFConvFCHead(ShapeSpec(channels=8, height=7, width=7), conv_dim=8, num_conv=2,
                                        fc_dim=16, num_fc=2, norm="BN"))
    assert_fold_is_exact(head, torch.randn(5, 8, 7, 7), depth=4, fan_in=8 * 49)


def test_training_model_is_refused_and_fold_leaves_the_original():
    head = DeepMaskHead(ShapeSpec(channels=4), num_classes=1, num_filters=4, num_convs=1)
    with pytest.raises(ValueError, match=r"call model.eval\(\) first"):
        fuse_for_inference(head)
    fuse_for_inference(copy.deepcopy(head).eval())
    assert isinstance(head.deconv_norm, nn.BatchNorm2d) and head.training
