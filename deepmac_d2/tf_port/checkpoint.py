"""A TF Model Garden deepmac_maskrcnn checkpoint into a Detectron2 model built from a config.

``tools/read_tf_checkpoint.py`` (TensorFlow) builds the reference model that
:func:`reference_spec` describes, lists its variables per component in creation
order with their checkpoint keys, and reads the checkpoint's value under each key.
Here that list is checked against the checkpoint (the first variable that is
missing or has another shape stops the conversion, with the config key to change)
and handed to :func:`~deepmac_d2.tf_port.convert.load_reference_weights`, which
pairs it with our layers in call order.

Converted: the backbone (SpineNet; the reference uses no decoder with it) and the
mask head. Not converted: the RPN and the box head (Model Garden's carry BatchNorm
where Detectron2's have none, count the background as class 0 and regress in
another box layout), nor a ResNet-FPN backbone (Model Garden's pads strided convs
as TF's 'SAME', puts BatchNorm after each FPN output and makes P6 by a strided
conv; Detectron2's ResNet-FPN does neither).
"""
import torch
from torch import nn

from .convert import ConversionError, load_reference_weights

__all__ = ["CONVERTED", "reference_spec", "load_reference_checkpoint"]

# The parts of a GeneralizedRCNN's state_dict that a reference checkpoint gives.
CONVERTED = ("backbone.", "roi_heads.mask_head.")

# What to change when a component does not fit, per reference component.
_KEYS = {
    "backbone": "MODEL.SPINENET.MODEL_ID (49, 96, 143, 190) or MODEL.BACKBONE.NAME",
    "mask_head": "MODEL.ROI_MASK_HEAD.CONV_DIM (TF mask_head.num_filters), CONVNET_VARIANT "
                 "(TF mask_head.convnet_variant) or NUM_CONV (TF mask_head.num_convs)",
}


def reference_spec(cfg):
    """What ``tools/read_tf_checkpoint.py`` builds: the reference model for ``cfg``'s
    backbone and mask head (a JSON-able dict of Model Garden config values)."""
    if cfg.MODEL.BACKBONE.NAME != "build_spinenet_backbone":
        raise ConversionError(
            f"MODEL.BACKBONE.NAME {cfg.MODEL.BACKBONE.NAME!r}: only SpineNet checkpoints convert "
            "('build_spinenet_backbone'); Model Garden's ResNet-FPN pads strided convs as TF's "
            "'SAME' and has BatchNorm in its FPN, which Detectron2's ResNet-FPN cannot load"
        )
    head = cfg.MODEL.ROI_MASK_HEAD
    if not head.CLS_AGNOSTIC_MASK:
        raise ConversionError(
            "MODEL.ROI_MASK_HEAD.CLS_AGNOSTIC_MASK is False: a per-class head's channels are "
            "the reference's class ids (background 0); only class-agnostic heads convert"
        )
    spine = cfg.MODEL.SPINENET
    return {
        "spinenet": {"model_id": str(spine.MODEL_ID), "min_level": spine.MIN_LEVEL,
                     "max_level": spine.MAX_LEVEL},
        "min_level": spine.MIN_LEVEL,
        "max_level": spine.MAX_LEVEL,
        "num_classes": cfg.MODEL.ROI_HEADS.NUM_CLASSES + 1,  # the reference counts background
        "mask_head": {"convnet_variant": head.CONVNET_VARIANT, "num_filters": head.CONV_DIM,
                      "num_convs": head.NUM_CONV, "upsample_factor": head.UPSAMPLE_FACTOR,
                      "class_agnostic": True},
        "crop_size": head.POOLER_RESOLUTION,
    }


# What a reference config (params.yaml, task.model) fixes that the variables may not
# show, with the config keys that must agree: (path in task.model, our keys).
_PARAMS = (
    ("backbone.type", ()),
    ("backbone.spinenet.model_id", ("MODEL.SPINENET.MODEL_ID",)),
    ("min_level", ("MODEL.SPINENET.MIN_LEVEL",)),
    ("max_level", ("MODEL.SPINENET.MAX_LEVEL",)),
    ("mask_head.convnet_variant", ("MODEL.ROI_MASK_HEAD.CONVNET_VARIANT",)),
    ("mask_head.num_filters", ("MODEL.ROI_MASK_HEAD.CONV_DIM",)),
    ("mask_head.num_convs", ("MODEL.ROI_MASK_HEAD.NUM_CONV",)),
    ("mask_head.upsample_factor", ("MODEL.ROI_MASK_HEAD.UPSAMPLE_FACTOR",)),
    ("mask_roi_aligner.crop_size", ("MODEL.ROI_MASK_HEAD.POOLER_RESOLUTION",)),
    # Not in any variable: a wrong epsilon changes every output, silently.
    ("norm_activation.norm_epsilon", ("MODEL.SPINENET.BN_EPS", "MODEL.ROI_MASK_HEAD.BN_EPS")),
)


def check_reference_config(cfg, params):
    """Raise unless ``cfg`` agrees with the reference's config (``params``: the path of its
    params.yaml and its ``task.model``), naming the first key that does not."""
    path, model = params
    for dotted, keys in _PARAMS:
        theirs = model
        for part in dotted.split("."):
            theirs = theirs[part]
        if not keys:  # the backbone type: reference_spec has refused all but SpineNet
            if theirs != "spinenet":
                raise ConversionError(f"{path}: task.model.{dotted} is {theirs!r}; only SpineNet "
                                      "checkpoints convert")
            continue
        for key in keys:
            ours = cfg
            for part in key.split("."):
                ours = ours[part]
            if isinstance(theirs, float):
                same = abs(ours - theirs) <= 1e-9 * abs(theirs)
            else:  # model ids are strings there, ints here
                same = str(ours) == str(theirs)
            if not same:
                raise ConversionError(f"{path}: task.model.{dotted} is {theirs!r}, the config's "
                                      f"{key} is {ours!r}: set {key} {theirs}")


def _checked_variables(component, entry, arrays):
    """``[(reference name, array)]`` of one component, after checking it fits."""
    expected, unused = entry["variables"], entry["unused"]
    if entry["path"] is None:
        raise ConversionError(
            f"the checkpoint has no {component} (no object named '{component}' in its object graph)"
        )
    found = sum(e["found"] is not None for e in expected) + len(unused)
    sizes = f"the checkpoint's {component} has {found} variables, this config's {len(expected)}"
    for i, e in enumerate(expected):
        if e["found"] is None:
            raise ConversionError(
                f"the checkpoint has no {e['key']!r}, the config's {component} variable "
                f"{e['name']} {tuple(e['shape'])} ({sizes}): change {_KEYS[component]}"
            )
        if e["found"] != e["shape"]:
            raise ConversionError(
                f"{e['key']!r} has shape {tuple(e['found'])} in the checkpoint, the config's "
                f"{component} variable {e['name']} has {tuple(e['shape'])} ({sizes}): "
                f"change {_KEYS[component]}"
            )
    if unused:
        raise ConversionError(
            f"the checkpoint's {component} has {len(unused)} variable(s) this config's lacks "
            f"(first: {unused[0]!r}; {sizes}): change {_KEYS[component]}"
        )
    return [(e["name"], arrays[f"{component}|{i:05d}"]) for i, e in enumerate(expected)]


class _MaskHeadLayers(nn.Module):
    """The mask head's network alone: ROI features in, logits out (no Instances)."""

    def __init__(self, head):
        super().__init__()
        self.head = head

    def forward(self, x):
        return self.head.layers(x)


def load_reference_checkpoint(model, cfg, manifest, arrays):
    """Copy a reference checkpoint's backbone and mask head into ``model``, in place.

    Args:
        model, cfg: a GeneralizedRCNN and the config it was built from, which
            ``manifest`` was read for; a reference config found next to the checkpoint
            (params.yaml) must agree with it (:func:`check_reference_config`).
        manifest, arrays: what ``tools/read_tf_checkpoint.py`` writes (its JSON
            manifest, and the arrays keyed ``<component>|<creation index>``).

    Returns:
        the name map: ``[(our state_dict key, the reference's variable name, the
        checkpoint's key)]``; every one of ours is under one of :data:`CONVERTED`.
    """
    if manifest.get("params"):
        check_reference_config(cfg, manifest["params"])
    components = manifest["components"]
    device = next(model.parameters()).device
    side = model.backbone.size_divisibility
    roi_heads = model.roi_heads
    channels = model.backbone.output_shape()[roi_heads.mask_in_features[0]].channels
    rois = torch.zeros(2, channels, *roi_heads.mask_pooler.output_size, device=device)
    # (component, module, example input, its place in the model, the module's own prefix)
    parts = [
        ("backbone", model.backbone, torch.zeros(1, 3, side, side, device=device), "backbone.", ""),
        ("mask_head", _MaskHeadLayers(roi_heads.mask_head), rois, "roi_heads.mask_head.", "head."),
    ]
    name_map = []
    for component, module, example, place, own in parts:
        variables = _checked_variables(component, components[component], arrays)
        pairs = load_reference_weights(module, variables, (example,))
        keys = [e["key"] for e in components[component]["variables"]]
        name_map += [(place + ours[len(own):], name, key) for (ours, name), key in zip(pairs, keys)]
    return name_map
