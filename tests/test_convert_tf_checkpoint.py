"""Reference checkpoints into a Detectron2 model (deepmac_d2.tf_port.checkpoint), without TensorFlow.

``make tf-checkpoint-check`` runs tools/convert_tf_checkpoint.py on checkpoints the
reference writes (it needs .venv-tf). Here the manifest tools/read_tf_checkpoint.py
would write is made by hand from a second, independently initialised model in the
reference's layouts: conversion must reproduce that model, and a manifest that does
not fit the config must fail naming the checkpoint key and the config key.
"""
import copy
import importlib.util
import re
import os

import pytest
import torch
from detectron2.layers import FrozenBatchNorm2d
from detectron2.modeling import build_model
from torch import nn

import deepmac_d2  # noqa: F401  (registers)
from deepmac_d2.tf_port import ConversionError, layers_in_call_order
from deepmac_d2.tf_port.checkpoint import (
    CONVERTED, _BoxHeadLayers, _MaskHeadLayers, converted_prefixes, load_reference_checkpoint, reference_spec,
)
from deepmac_d2.tf_port.heads import TFFastRCNNOutputLayers, TFRPNHead
from tolerance import assert_close_to_rounding

# Float comparisons: make test runs these again on the AVX2 kernels.
pytestmark = pytest.mark.numeric

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_spec = importlib.util.spec_from_file_location(
    "convert_tf_checkpoint", os.path.join(REPO, "tools", "convert_tf_checkpoint.py"))
tool = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(tool)

SMALL = [
    "MODEL.SPINENET.MODEL_ID", "49", "MODEL.SPINENET.NORM", "BN",
    "MODEL.ROI_MASK_HEAD.CONVNET_VARIANT", "hourglass10", "MODEL.ROI_MASK_HEAD.CONV_DIM", "8",
    "MODEL.ROI_MASK_HEAD.POOLER_RESOLUTION", "8", "MODEL.ROI_MASK_HEAD.ALLOWED_CLASS_IDS", "[]",
    "MODEL.ROI_BOX_HEAD.NORM", "BN",
]


# The reference's ResNet-FPN (build_tf_resnet_fpn_backbone), made small where it can be.
SMALL_RESNET = [
    "MODEL.FPN.OUT_CHANNELS", "16", "MODEL.ROI_MASK_HEAD.CONVNET_VARIANT", "hourglass10",
    "MODEL.ROI_MASK_HEAD.CONV_DIM", "8", "MODEL.ROI_MASK_HEAD.POOLER_RESOLUTION", "8",
    "MODEL.ROI_MASK_HEAD.ALLOWED_CLASS_IDS", "[]", "MODEL.ROI_BOX_HEAD.FC_DIM", "16",
    "MODEL.ROI_BOX_HEAD.NUM_CONV", "1", "MODEL.ROI_BOX_HEAD.CONV_DIM", "16",
]


def spinenet_config(*opts):
    return tool.load_config(os.path.join(REPO, "configs", "voc_spinenet143_hg52.yaml"), list(opts))


def resnet_config(*opts):
    return tool.load_config(os.path.join(REPO, "configs", "voc_tf_r50_hg52.yaml"), list(opts))


def keras_layout(layer, attr, value):
    """Our tensor in the reference's layout: conv kernels (kh, kw, in, out), transposed-conv
    kernels (kh, kw, out, in), Dense kernels (in, out), BatchNorm vectors as they are."""
    value = value.detach().numpy()
    if attr == "weight" and value.ndim == 4:
        return value.transpose(2, 3, 1, 0)
    if attr == "weight" and value.ndim == 2:
        return value.T
    return value


_KINDS = {"weight": "kernel", "bias": "bias"}
_NORM_KINDS = {"weight": "gamma", "bias": "beta", "running_mean": "moving_mean",
               "running_var": "moving_variance"}


def manifest_from(model):
    """What tools/read_tf_checkpoint.py writes for a checkpoint of ``model``'s weights."""
    roi_heads = model.roi_heads
    channels = next(iter(model.backbone.output_shape().values())).channels
    rois = torch.zeros(2, channels, *roi_heads.mask_pooler.output_size)
    side = model.backbone.size_divisibility
    image = torch.zeros(1, 3, side, side)
    if hasattr(model.backbone, "fpn"):  # the reference's ResNet and its FPN decoder
        with torch.no_grad():
            features = {int(k[3:]): v for k, v in model.backbone.bottom_up.eval()(image).items()}
        modules = {"backbone": (model.backbone.bottom_up, image), "decoder": (model.backbone.fpn, features)}
    else:
        modules = {"backbone": (model.backbone, image)}
    modules["mask_head"] = (_MaskHeadLayers(roi_heads.mask_head), rois)
    if isinstance(model.proposal_generator.rpn_head, TFRPNHead):  # the reference's own heads
        shapes = model.backbone.output_shape()
        modules["rpn_head"] = (model.proposal_generator.rpn_head, [
            torch.zeros(1, shapes[f].channels, side // shapes[f].stride, side // shapes[f].stride)
            for f in model.proposal_generator.in_features])
    if isinstance(roi_heads.box_predictor, TFFastRCNNOutputLayers):
        modules["detection_head"] = (_BoxHeadLayers(roi_heads.box_head, roi_heads.box_predictor),
                                     torch.zeros(2, channels, *roi_heads.box_pooler.output_size))
    manifest, arrays = {"components": {}}, {}
    for component, (module, x) in modules.items():
        variables = []
        for name, layer in layers_in_call_order(module, x):
            norm = isinstance(layer, (nn.modules.batchnorm._BatchNorm, FrozenBatchNorm2d))
            for attr, kind in (_NORM_KINDS if norm else _KINDS).items():
                if getattr(layer, attr, None) is None:
                    continue
                array = keras_layout(layer, attr, getattr(layer, attr))
                i = len(variables)
                arrays[f"{component}|{i:05d}"] = array
                variables.append({"name": f"{component}/{name}/{kind}:0",
                                  "key": f"model/{component}/v{i}/.ATTRIBUTES/VARIABLE_VALUE",
                                  "shape": list(array.shape), "found": list(array.shape)})
        manifest["components"][component] = {"path": f"model/{component}", "variables": variables,
                                             "unused": []}
    return manifest, arrays


@pytest.fixture(scope="module")
def models():
    cfg = spinenet_config(*SMALL)
    torch.manual_seed(0)
    source = build_model(cfg).eval()
    for name, buffer in source.named_buffers():  # BatchNorm statistics that are not the init's
        if name.endswith(("running_mean", "running_var")):
            buffer.uniform_(0.5, 1.5)
    torch.manual_seed(1)
    return cfg, source, build_model(cfg).eval()


def test_spec_names_the_reference_model():
    spec = reference_spec(spinenet_config())
    assert spec["spinenet"] == {"model_id": "143", "min_level": 3, "max_level": 7}
    assert spec["mask_head"] == {"convnet_variant": "hourglass52", "num_filters": 64, "num_convs": 4,
                                 "upsample_factor": 2, "class_agnostic": True}
    assert spec["crop_size"] == 32 and spec["num_classes"] == 81  # background counted, as TF does


def test_spec_names_the_reference_resnet_fpn():
    spec = reference_spec(resnet_config("MODEL.RESNETS.DEPTH", "101"))
    assert spec["resnet"] == {"model_id": 101} and spec["fpn"] == {"num_filters": 256}
    assert (spec["min_level"], spec["max_level"]) == (2, 6) and "spinenet" not in spec
    assert spec["mask_head"]["convnet_variant"] == "hourglass52" and spec["crop_size"] == 32


def test_unsupported_configs_name_the_key():
    # Detectron2's own ResNet-FPN: the message names the backbone that does take them.
    with pytest.raises(ConversionError, match="MODEL.BACKBONE.NAME 'build_resnet_fpn_backbone'.*"
                                              "'build_tf_resnet_fpn_backbone'"):
        reference_spec(tool.load_config(os.path.join(REPO, "configs", "voc_r50_hg52.yaml"), []))
    with pytest.raises(ConversionError, match="CLS_AGNOSTIC_MASK"):
        reference_spec(spinenet_config("MODEL.ROI_MASK_HEAD.CLS_AGNOSTIC_MASK", "False"))
    with pytest.raises(ConversionError, match="MODEL.FPN.NORM '': the reference's ResNet and FPN have BatchNorm"):
        reference_spec(resnet_config("MODEL.FPN.NORM", ""))
    with pytest.raises(ConversionError, match="MODEL.RESNETS.NORM 'GN'"):
        reference_spec(resnet_config("MODEL.RESNETS.NORM", "GN"))


def test_conversion_reproduces_the_source_model(models):
    cfg, source, target = models
    manifest, arrays = manifest_from(source)
    name_map = load_reference_checkpoint(target, cfg, manifest, arrays)
    mine, theirs = target.state_dict(), source.state_dict()
    converted = [k for k in mine if k.startswith(CONVERTED) and "num_batches_tracked" not in k]
    assert sorted(ours for ours, _, _ in name_map) == sorted(converted) and len(converted) > 500
    assert name_map[0] == ("backbone.stem.0.0.weight", "backbone/stem.0.0/kernel:0",
                           "model/backbone/v0/.ATTRIBUTES/VARIABLE_VALUE")
    for k in converted:
        assert torch.equal(mine[k], theirs[k]), k
    # Only those: the RPN and box head are not the reference's to give.
    assert not torch.equal(mine["proposal_generator.rpn_head.conv.weight"],
                           theirs["proposal_generator.rpn_head.conv.weight"])
    x = torch.randn(1, 3, 128, 128)
    with torch.no_grad():
        assert torch.equal(target.backbone(x)["p5"], source.backbone(x)["p5"])


def test_wrong_head_width_names_variable_and_key(models):
    cfg, source, target = models
    manifest, arrays = manifest_from(source)
    bad = copy.deepcopy(manifest)
    entry = bad["components"]["mask_head"]["variables"][3]
    entry["found"] = entry["shape"][:-1] + [16]
    with pytest.raises(ConversionError) as err:
        load_reference_checkpoint(target, cfg, bad, arrays)
    message = str(err.value)
    assert entry["key"] in message and "MODEL.ROI_MASK_HEAD.CONV_DIM" in message
    assert f"{tuple(entry['found'])} in the checkpoint" in message


def test_other_backbone_names_first_missing_variable_and_key(models):
    cfg, source, target = models
    manifest, arrays = manifest_from(source)
    fewer = copy.deepcopy(manifest)  # a smaller backbone: the checkpoint lacks the last ones
    variables = fewer["components"]["backbone"]["variables"]
    for e in variables[-4:]:
        e["found"] = None
    with pytest.raises(ConversionError, match="MODEL.SPINENET.MODEL_ID") as err:
        load_reference_checkpoint(target, cfg, fewer, arrays)
    assert variables[-4]["key"] in str(err.value)
    more = copy.deepcopy(manifest)  # a bigger one: variables left over
    more["components"]["backbone"]["unused"] = ["model/backbone/v9999/.ATTRIBUTES/VARIABLE_VALUE"]
    with pytest.raises(ConversionError, match=r"backbone has 1 variable\(s\) .*/v9999/.*MODEL.SPINENET.MODEL_ID"):
        load_reference_checkpoint(target, cfg, more, arrays)
    none = copy.deepcopy(manifest)
    none["components"]["mask_head"]["path"] = None
    with pytest.raises(ConversionError, match="no mask_head"):
        load_reference_checkpoint(target, cfg, none, arrays)


def test_tool_refuses_detectron2s_resnet_fpn_before_reading(tmp_path):
    # No TensorFlow needed: the config is refused before the checkpoint is read.
    with pytest.raises(SystemExit, match="does not fit .*MODEL.BACKBONE.NAME") as err:
        tool.main(["--config-file", os.path.join(REPO, "configs", "voc_r50_hg52.yaml"),
                   "--checkpoint", str(tmp_path / "missing"), "--output", str(tmp_path / "out.pth"),
                   "--tf-python", str(tmp_path / "no-python")])
    assert "ResNet-FPN" in str(err.value)
    assert not (tmp_path / "out.pth").exists()


def with_changes(model, changes):
    """``("export/params.yaml", model)`` with each ``changes`` entry ("a.b": value) set."""
    for dotted, value in changes.items():
        *parents, last = dotted.split(".")
        node = model
        for part in parents:
            node = node[part]
        node[last] = value
    return "export/params.yaml", model


def reference_model_config(**changes):
    """``task.model`` of a params.yaml for the SMALL config, with ``changes`` ("a.b": v)."""
    model = {"backbone": {"type": "spinenet", "spinenet": {"model_id": "49"}}, "min_level": 3, "max_level": 7,
             "mask_head": {"convnet_variant": "hourglass10", "num_filters": 8, "num_convs": 4,
                           "upsample_factor": 2},
             "mask_roi_aligner": {"crop_size": 8}, "norm_activation": {"norm_epsilon": 0.001}}
    return with_changes(model, changes)


def test_reference_config_must_agree(models):
    cfg, source, target = models
    manifest, arrays = manifest_from(source)
    manifest["params"] = reference_model_config()
    load_reference_checkpoint(target, cfg, manifest, arrays)
    # The epsilon is in no variable: only the reference's config can catch it.
    manifest["params"] = reference_model_config(**{"norm_activation.norm_epsilon": 1e-5})
    with pytest.raises(ConversionError, match=r"export/params.yaml: task.model.norm_activation.norm_epsilon "
                                              r"is 1e-05, .*: set MODEL.SPINENET.BN_EPS 1e-05"):
        load_reference_checkpoint(target, cfg, manifest, arrays)
    manifest["params"] = reference_model_config(**{"mask_head.num_filters": 32})
    with pytest.raises(ConversionError, match="set MODEL.ROI_MASK_HEAD.CONV_DIM 32"):
        load_reference_checkpoint(target, cfg, manifest, arrays)
    manifest["params"] = reference_model_config(**{"backbone.type": "resnet"})
    with pytest.raises(ConversionError, match="backbone.type is 'resnet', the config's MODEL.BACKBONE.NAME is "
                                              "'build_spinenet_backbone': set MODEL.BACKBONE.NAME "
                                              "build_tf_resnet_fpn_backbone"):
        load_reference_checkpoint(target, cfg, manifest, arrays)


@pytest.fixture(scope="module")
def resnet_models():
    """A ResNet-FPN source model in training BN, and a target that freezes the stem and res2
    (Detectron2's FREEZE_AT 2: FrozenBatchNorm2d there, which takes the same four tensors)."""
    torch.manual_seed(0)
    source = build_model(resnet_config(*SMALL_RESNET, "MODEL.RESNETS.NORM", "BN", "MODEL.FPN.NORM", "BN")).eval()
    for name, buffer in source.named_buffers():
        if name.endswith(("running_mean", "running_var")):
            buffer.uniform_(0.5, 1.5)
    cfg = resnet_config(*SMALL_RESNET, "MODEL.BACKBONE.FREEZE_AT", "2")
    torch.manual_seed(1)
    return cfg, source, build_model(cfg).eval()


def test_resnet_fpn_conversion_reproduces_the_source_model(resnet_models):
    cfg, source, target = resnet_models
    assert isinstance(target.backbone.bottom_up.stem[1], FrozenBatchNorm2d)
    manifest, arrays = manifest_from(source)
    name_map = load_reference_checkpoint(target, cfg, manifest, arrays)
    mine, theirs = target.state_dict(), source.state_dict()
    prefixes = converted_prefixes(cfg)  # the config has the reference's RPN and box heads too
    assert "proposal_generator.rpn_head." in prefixes and "roi_heads.box_predictor." in prefixes
    converted = [k for k in mine if k.startswith(prefixes) and "num_batches_tracked" not in k]
    assert sorted(ours for ours, _, _ in name_map) == sorted(converted)
    # The reference's backbone into bottom_up, its decoder into fpn, in creation order.
    assert name_map[0][:2] == ("backbone.bottom_up.stem.0.weight", "backbone/stem.0/kernel:0")
    decoder = [row for row in name_map if row[1].startswith("decoder/")]
    assert decoder[0][0] == "backbone.fpn.lateral.2.weight" and decoder[-1][0] == "backbone.fpn.norms.6.running_var"
    for k in converted:
        assert torch.equal(mine[k], theirs[k]), k
    # The same weights in two models: any difference is rounding, through the ResNet-50
    # + FPN (about 55 layers of fan-in up to 3 x 3 x 512), the box head (about 6).
    x = torch.randn(1, 3, 128, 128)
    with torch.no_grad():
        for level, y in target.backbone(x).items():
            assert_close_to_rounding(y, source.backbone(x)[level], 55, 9 * 512, f"level {level}")
        rois = torch.randn(3, 16, 7, 7)
        for ours, theirs in zip(target.roi_heads.box_predictor(target.roi_heads.box_head(rois)),
                                source.roi_heads.box_predictor(source.roi_heads.box_head(rois))):
            assert_close_to_rounding(ours, theirs, 6, 9 * 256, "box head")


def test_resnet_fpn_mismatches_name_variable_and_key(resnet_models):
    cfg, source, target = resnet_models
    manifest, arrays = manifest_from(source)
    wide = copy.deepcopy(manifest)  # an FPN of another width
    entry = wide["components"]["decoder"]["variables"][0]
    entry["found"] = entry["shape"][:-1] + [256]
    with pytest.raises(ConversionError, match="MODEL.FPN.OUT_CHANNELS") as err:
        load_reference_checkpoint(target, cfg, wide, arrays)
    assert entry["key"] in str(err.value)
    deeper = copy.deepcopy(manifest)  # a deeper ResNet: variables left over in its backbone
    deeper["components"]["backbone"]["unused"] = ["model/backbone/v9999/.ATTRIBUTES/VARIABLE_VALUE"]
    with pytest.raises(ConversionError, match=r"backbone has 1 variable\(s\) .*MODEL.RESNETS.DEPTH"):
        load_reference_checkpoint(target, cfg, deeper, arrays)


def resnet_params(**changes):
    """``task.model`` of a params.yaml for the SMALL_RESNET config, with ``changes``."""
    model = {"backbone": {"type": "resnet", "resnet": {
                "model_id": 50, "depth_multiplier": 1.0, "stem_type": "v0", "se_ratio": 0.0,
                "resnetd_shortcut": False, "replace_stem_max_pool": False}},
             "decoder": {"type": "fpn", "fpn": {"num_filters": 16, "fusion_type": "sum",
                                                "use_separable_conv": False}},
             "min_level": 2, "max_level": 6, "anchor": {"num_scales": 1, "aspect_ratios": [0.5, 1.0, 2.0]},
             "mask_head": {"convnet_variant": "hourglass10", "num_filters": 8, "num_convs": 4,
                           "upsample_factor": 2},
             "mask_roi_aligner": {"crop_size": 8}, "norm_activation": {"norm_epsilon": 0.0001}}
    return with_changes(model, changes)


@pytest.mark.parametrize("change, message", [
    ({}, None),
    ({"backbone.resnet.model_id": 101}, "set MODEL.RESNETS.DEPTH 101"),
    ({"decoder.fpn.num_filters": 256}, "set MODEL.FPN.OUT_CHANNELS 256"),
    ({"max_level": 7}, "set MODEL.FPN.MAX_LEVEL 7"),
    ({"norm_activation.norm_epsilon": 0.001}, "set MODEL.RESNETS.BN_EPS 0.001"),
    # Same variables as the plain shortcut: only the config shows it.
    ({"backbone.resnet.resnetd_shortcut": True}, "resnetd_shortcut is True; 'build_tf_resnet_fpn_backbone' "
                                                 "builds False only"),
    ({"backbone.type": "spinenet"}, "set MODEL.BACKBONE.NAME build_spinenet_backbone"),
    # The anchors' order at a location, which the RPN head's outputs are reordered by.
    ({"anchor.aspect_ratios": [1.0, 2.0, 0.5]}, "set it to [[1.0, 2.0, 0.5]]"),
    ({"anchor.num_scales": 3}, "give each level 3 sizes"),
])
def test_resnet_fpn_reference_config_must_agree(resnet_models, change, message):
    cfg, source, target = resnet_models
    manifest, arrays = manifest_from(source)
    manifest["params"] = resnet_params(**change)
    if message is None:
        load_reference_checkpoint(target, cfg, manifest, arrays)
        return
    with pytest.raises(ConversionError, match=re.escape(message)):
        load_reference_checkpoint(target, cfg, manifest, arrays)
