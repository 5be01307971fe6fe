"""Reference checkpoints into a Detectron2 model (deepmac_d2.tf_port.checkpoint), without TensorFlow.

``make tf-checkpoint-check`` runs tools/convert_tf_checkpoint.py on checkpoints the
reference writes (it needs .venv-tf). Here the manifest tools/read_tf_checkpoint.py
would write is made by hand from a second, independently initialised model in the
reference's layouts: conversion must reproduce that model, and a manifest that does
not fit the config must fail naming the checkpoint key and the config key.
"""
import copy
import importlib.util
import os

import pytest
import torch
from detectron2.modeling import build_model
from torch import nn

import deepmac_d2  # noqa: F401  (registers)
from deepmac_d2.tf_port import ConversionError, layers_in_call_order
from deepmac_d2.tf_port.checkpoint import (
    CONVERTED, _MaskHeadLayers, load_reference_checkpoint, reference_spec,
)

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


def spinenet_config(*opts):
    return tool.load_config(os.path.join(REPO, "configs", "voc_spinenet143_hg52.yaml"), list(opts))


def keras_layout(layer, attr, value):
    """Our tensor in the reference's layout: conv kernels (kh, kw, in, out), transposed-conv
    kernels (kh, kw, out, in), BatchNorm vectors as they are."""
    value = value.detach().numpy()
    if attr == "weight" and value.ndim == 4:
        return value.transpose(2, 3, 1, 0)
    return value


_KINDS = {"weight": "kernel", "bias": "bias"}
_NORM_KINDS = {"weight": "gamma", "bias": "beta", "running_mean": "moving_mean",
               "running_var": "moving_variance"}


def manifest_from(model):
    """What tools/read_tf_checkpoint.py writes for a checkpoint of ``model``'s weights."""
    roi_heads = model.roi_heads
    rois = torch.zeros(2, 256, *roi_heads.mask_pooler.output_size)
    side = model.backbone.size_divisibility
    modules = {"backbone": (model.backbone, torch.zeros(1, 3, side, side)),
               "mask_head": (_MaskHeadLayers(roi_heads.mask_head), rois)}
    manifest, arrays = {"components": {}}, {}
    for component, (module, x) in modules.items():
        variables = []
        for name, layer in layers_in_call_order(module, x):
            norm = isinstance(layer, nn.modules.batchnorm._BatchNorm)
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


def test_unsupported_configs_name_the_key():
    with pytest.raises(ConversionError, match="MODEL.BACKBONE.NAME 'build_resnet_fpn_backbone'"):
        reference_spec(tool.load_config(os.path.join(REPO, "configs", "voc_r50_hg52.yaml"), []))
    with pytest.raises(ConversionError, match="CLS_AGNOSTIC_MASK"):
        reference_spec(spinenet_config("MODEL.ROI_MASK_HEAD.CLS_AGNOSTIC_MASK", "False"))


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


def test_tool_refuses_a_resnet_config_before_reading(tmp_path):
    # No TensorFlow needed: the config is refused before the checkpoint is read.
    with pytest.raises(SystemExit, match="does not fit .*MODEL.BACKBONE.NAME") as err:
        tool.main(["--config-file", os.path.join(REPO, "configs", "voc_r50_hg52.yaml"),
                   "--checkpoint", str(tmp_path / "missing"), "--output", str(tmp_path / "out.pth"),
                   "--tf-python", str(tmp_path / "no-python")])
    assert "ResNet-FPN" in str(err.value)
    assert not (tmp_path / "out.pth").exists()


def reference_model_config(**changes):
    """``task.model`` of a params.yaml for the SMALL config, with ``changes`` ("a.b": v)."""
    model = {"backbone": {"type": "spinenet", "spinenet": {"model_id": "49"}}, "min_level": 3, "max_level": 7,
             "mask_head": {"convnet_variant": "hourglass10", "num_filters": 8, "num_convs": 4,
                           "upsample_factor": 2},
             "mask_roi_aligner": {"crop_size": 8}, "norm_activation": {"norm_epsilon": 0.001}}
    for dotted, value in changes.items():
        *parents, last = dotted.split(".")
        node = model
        for part in parents:
            node = node[part]
        node[last] = value
    return "export/params.yaml", model


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
    with pytest.raises(ConversionError, match="'resnet'; only SpineNet"):
        load_reference_checkpoint(target, cfg, manifest, arrays)
