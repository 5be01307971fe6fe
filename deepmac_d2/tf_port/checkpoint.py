"""A TF Model Garden deepmac_maskrcnn checkpoint into a Detectron2 model built from a config.

``tools/read_tf_checkpoint.py`` (TensorFlow) builds the reference model that
:func:`reference_spec` describes, lists its variables per component in creation
order with their checkpoint keys, and reads the checkpoint's value under each key.
Here that list is checked against the checkpoint (the first variable that is
missing or has another shape stops the conversion, with the config key to change)
and handed to :func:`~deepmac_d2.tf_port.convert.load_reference_weights`, which
pairs it with our layers in call order.

Converted: the backbone, into SpineNet (``build_spinenet_backbone``; the reference
uses no decoder with it) or into the reference's ResNet-FPN
(``build_tf_resnet_fpn_backbone``: its ``backbone`` component into ``bottom_up``, its
``decoder`` into ``fpn``; Detectron2's own ResNet-FPN pads strided convs otherwise, has
no BatchNorm in its FPN and max-pools P6, so it cannot take them), and the mask head.
The RPN and the box head convert into the reference's own heads only
(``MODEL.RPN.HEAD_NAME "TFRPNHead"``, ``MODEL.ROI_BOX_HEAD.NAME "TFConvFCHead"``,
deepmac_d2/tf_port/heads.py): Model Garden's carry BatchNorm where Detectron2's have
none, count the background as class 0 and regress (dy, dx, dh, dw); with Detectron2's
own heads they stay as built (and Detectron2 reports them missing from the .pth).
"""
import torch
from torch import nn

from .spinenet import SCALING_MAP
from .convert import ConversionError, load_reference_weights

__all__ = ["CONVERTED", "converted_prefixes", "reference_spec", "load_reference_checkpoint"]

# The parts of a GeneralizedRCNN's state_dict that a reference checkpoint always gives.
CONVERTED = ("backbone.", "roi_heads.mask_head.")
TF_RPN_HEAD, TF_BOX_HEAD = "TFRPNHead", "TFConvFCHead"


def converted_prefixes(cfg):
    """:data:`CONVERTED`, and the RPN and box head's where ``cfg`` has the reference's heads."""
    prefixes = list(CONVERTED)
    if cfg.MODEL.RPN.HEAD_NAME == TF_RPN_HEAD:
        prefixes.append("proposal_generator.rpn_head.")
    if cfg.MODEL.ROI_BOX_HEAD.NAME == TF_BOX_HEAD:
        prefixes += ["roi_heads.box_head.", "roi_heads.box_predictor."]
    return tuple(prefixes)

SPINENET, RESNET_FPN = "build_spinenet_backbone", "build_tf_resnet_fpn_backbone"
# The reference's backbone type for each backbone that takes its checkpoints.
BACKBONE_TYPES = {SPINENET: "spinenet", RESNET_FPN: "resnet"}

# What to change when a component does not fit: per reference component (per backbone).
_KEYS = {
    ("backbone", SPINENET): "MODEL.SPINENET.MODEL_ID (49, 96, 143, 190) or MODEL.BACKBONE.NAME",
    ("backbone", RESNET_FPN): "MODEL.RESNETS.DEPTH (TF backbone.resnet.model_id: 50, 101, ...) or "
                              "MODEL.BACKBONE.NAME",
    ("decoder", RESNET_FPN): "MODEL.FPN.OUT_CHANNELS (TF decoder.fpn.num_filters), MODEL.FPN.NORM "
                             "(the reference's FPN has BatchNorm) or MODEL.FPN.MIN_LEVEL / MAX_LEVEL "
                             "(TF min_level / max_level)",
    "mask_head": "MODEL.ROI_MASK_HEAD.CONV_DIM (TF mask_head.num_filters), CONVNET_VARIANT "
                 "(TF mask_head.convnet_variant) or NUM_CONV (TF mask_head.num_convs)",
    "rpn_head": "MODEL.RPN.CONV_DIMS (TF rpn_head.num_convs, num_filters) or MODEL.ANCHOR_GENERATOR "
                "(TF anchor.num_scales x aspect_ratios anchors a location)",
    "detection_head": "MODEL.ROI_BOX_HEAD.NUM_CONV, CONV_DIM, NUM_FC, FC_DIM (TF detection_head.num_convs, "
                      "num_filters, num_fcs, fc_dims), POOLER_RESOLUTION (TF roi_aligner.crop_size) or "
                      "MODEL.ROI_HEADS.NUM_CLASSES (TF num_classes - 1)",
}
_NORMS = ("BN", "SyncBN", "FrozenBN")
# How to leave out a component the checkpoint may lack.
_LEAVE_OUT = {
    "rpn_head": "MODEL.RPN.HEAD_NAME StandardRPNHead",
    "detection_head": "MODEL.ROI_BOX_HEAD.NAME FastRCNNConvFCHead",
}


def _backbone_spec(cfg):
    """The reference's backbone (and decoder) for ``cfg``'s, with its levels."""
    name = cfg.MODEL.BACKBONE.NAME
    if name == SPINENET:
        spine = cfg.MODEL.SPINENET
        return {"spinenet": {"model_id": str(spine.MODEL_ID), "min_level": spine.MIN_LEVEL,
                             "max_level": spine.MAX_LEVEL},
                "min_level": spine.MIN_LEVEL, "max_level": spine.MAX_LEVEL}
    if name != RESNET_FPN:
        raise ConversionError(
            f"MODEL.BACKBONE.NAME {name!r}: reference checkpoints convert into {SPINENET!r} or "
            f"{RESNET_FPN!r} (the Model Garden's ResNet-FPN: it pads strided convs as TF's 'SAME', "
            "has BatchNorm on every FPN level and makes P6 by a strided conv, which Detectron2's "
            "'build_resnet_fpn_backbone' does not compute)"
        )
    for key, norm in (("MODEL.RESNETS.NORM", cfg.MODEL.RESNETS.NORM), ("MODEL.FPN.NORM", cfg.MODEL.FPN.NORM)):
        if norm not in _NORMS:
            raise ConversionError(f"{key} {norm!r}: the reference's ResNet and FPN have BatchNorm, "
                                  f"whose statistics need one of {', '.join(_NORMS)} ('SyncBN' as the reference)")
    fpn = cfg.MODEL.FPN
    return {"resnet": {"model_id": cfg.MODEL.RESNETS.DEPTH}, "fpn": {"num_filters": fpn.OUT_CHANNELS},
            "min_level": fpn.MIN_LEVEL, "max_level": fpn.MAX_LEVEL}


def reference_spec(cfg):
    """What ``tools/read_tf_checkpoint.py`` builds: the reference model for ``cfg``'s
    backbone and mask head (a JSON-able dict of Model Garden config values)."""
    spec = _backbone_spec(cfg)
    head = cfg.MODEL.ROI_MASK_HEAD
    if not head.CLS_AGNOSTIC_MASK:
        raise ConversionError(
            "MODEL.ROI_MASK_HEAD.CLS_AGNOSTIC_MASK is False: a per-class head's channels are "
            "the reference's class ids (background 0); only class-agnostic heads convert"
        )
    if cfg.MODEL.RPN.HEAD_NAME == TF_RPN_HEAD:
        anchors = cfg.MODEL.ANCHOR_GENERATOR
        width = cfg.MODEL.RPN.CONV_DIMS[0]
        if width == -1:  # Detectron2's "as wide as the features"
            width = (cfg.MODEL.FPN.OUT_CHANNELS if cfg.MODEL.BACKBONE.NAME == RESNET_FPN
                     else SCALING_MAP[str(cfg.MODEL.SPINENET.MODEL_ID)][0])
        spec["rpn_head"] = {"num_convs": len(cfg.MODEL.RPN.CONV_DIMS), "num_filters": width}
        spec["anchor"] = {"num_scales": len(anchors.SIZES[0]), "aspect_ratios": list(anchors.ASPECT_RATIOS[0])}
    if cfg.MODEL.ROI_BOX_HEAD.NAME == TF_BOX_HEAD:
        box = cfg.MODEL.ROI_BOX_HEAD
        spec["detection_head"] = {"num_convs": box.NUM_CONV, "num_filters": box.CONV_DIM,
                                  "num_fcs": box.NUM_FC, "fc_dims": box.FC_DIM}
        spec["box_crop_size"] = box.POOLER_RESOLUTION
    return {
        **spec,
        "num_classes": cfg.MODEL.ROI_HEADS.NUM_CLASSES + 1,  # the reference counts background
        "mask_head": {"convnet_variant": head.CONVNET_VARIANT, "num_filters": head.CONV_DIM,
                      "num_convs": head.NUM_CONV, "upsample_factor": head.UPSAMPLE_FACTOR,
                      "class_agnostic": True},
        "crop_size": head.POOLER_RESOLUTION,
    }


# What a reference config (params.yaml, task.model) fixes that the variables may not
# show, with the config keys that must agree: (path in task.model, our keys), per backbone.
_HEAD_PARAMS = (
    ("mask_head.convnet_variant", ("MODEL.ROI_MASK_HEAD.CONVNET_VARIANT",)),
    ("mask_head.num_filters", ("MODEL.ROI_MASK_HEAD.CONV_DIM",)),
    ("mask_head.num_convs", ("MODEL.ROI_MASK_HEAD.NUM_CONV",)),
    ("mask_head.upsample_factor", ("MODEL.ROI_MASK_HEAD.UPSAMPLE_FACTOR",)),
    ("mask_roi_aligner.crop_size", ("MODEL.ROI_MASK_HEAD.POOLER_RESOLUTION",)),
)
_PARAMS = {
    SPINENET: (
        ("backbone.spinenet.model_id", ("MODEL.SPINENET.MODEL_ID",)),
        ("min_level", ("MODEL.SPINENET.MIN_LEVEL",)),
        ("max_level", ("MODEL.SPINENET.MAX_LEVEL",)),
        *_HEAD_PARAMS,
        # Not in any variable: a wrong epsilon changes every output, silently.
        ("norm_activation.norm_epsilon", ("MODEL.SPINENET.BN_EPS", "MODEL.ROI_MASK_HEAD.BN_EPS")),
    ),
    RESNET_FPN: (
        ("backbone.resnet.model_id", ("MODEL.RESNETS.DEPTH",)),
        ("decoder.fpn.num_filters", ("MODEL.FPN.OUT_CHANNELS",)),
        ("min_level", ("MODEL.FPN.MIN_LEVEL",)),
        ("max_level", ("MODEL.FPN.MAX_LEVEL",)),
        *_HEAD_PARAMS,
        ("norm_activation.norm_epsilon", ("MODEL.RESNETS.BN_EPS", "MODEL.ROI_MASK_HEAD.BN_EPS")),
    ),
}
# Reference settings the port does not build, with the values it does (the Model Garden
# defaults, which the deepmac_maskrcnn experiments keep). Most would change the variables
# and fail there too; a ResNet-D shortcut (average pool, then the same 1x1 conv) would not.
_SUPPORTED = {
    RESNET_FPN: (
        ("decoder.type", ("fpn",)),
        ("backbone.resnet.depth_multiplier", (1.0,)),
        ("backbone.resnet.stem_type", ("v0",)),
        ("backbone.resnet.se_ratio", (0.0, None)),
        ("backbone.resnet.resnetd_shortcut", (False,)),
        ("backbone.resnet.replace_stem_max_pool", (False,)),
        ("decoder.fpn.fusion_type", ("sum",)),
        ("decoder.fpn.use_separable_conv", (False,)),
    ),
}


def _lookup(node, dotted):
    """``node[a][b]...`` for ``dotted`` "a.b...", or KeyError."""
    for part in dotted.split("."):
        node = node[part]
    return node


def check_reference_config(cfg, params):
    """Raise unless ``cfg`` agrees with the reference's config (``params``: the path of its
    params.yaml and its ``task.model``), naming the first key that does not."""
    path, model = params
    name = cfg.MODEL.BACKBONE.NAME
    theirs = _lookup(model, "backbone.type")
    if theirs != BACKBONE_TYPES[name]:
        fits = {v: k for k, v in BACKBONE_TYPES.items()}.get(theirs)
        raise ConversionError(
            f"{path}: task.model.backbone.type is {theirs!r}, the config's MODEL.BACKBONE.NAME is "
            f"{name!r}: " + (f"set MODEL.BACKBONE.NAME {fits}" if fits else
                             f"only {', '.join(map(repr, BACKBONE_TYPES.values()))} backbones convert")
        )
    for dotted, supported in _SUPPORTED.get(name, ()):
        theirs = _lookup(model, dotted)
        if theirs not in supported:
            raise ConversionError(f"{path}: task.model.{dotted} is {theirs!r}; {name!r} builds "
                                  f"{supported[0]!r} only (the deepmac_maskrcnn experiments' setting)")
    _check_heads_config(cfg, path, model)
    for dotted, keys in _PARAMS[name]:
        theirs = _lookup(model, dotted)
        for key in keys:
            ours = _lookup(cfg, key)
            if isinstance(theirs, float):
                same = abs(ours - theirs) <= 1e-9 * abs(theirs)
            else:  # model ids are strings there, ints here
                same = str(ours) == str(theirs)
            if not same:
                raise ConversionError(f"{path}: task.model.{dotted} is {theirs!r}, the config's "
                                      f"{key} is {ours!r}: set {key} {theirs}")


def _check_heads_config(cfg, path, model):
    """The reference's RPN anchors against ``cfg``'s, where ``cfg`` converts its RPN head."""
    if cfg.MODEL.RPN.HEAD_NAME != TF_RPN_HEAD:
        return
    anchors = cfg.MODEL.ANCHOR_GENERATOR
    ratios, scales = _lookup(model, "anchor.aspect_ratios"), _lookup(model, "anchor.num_scales")
    if [float(r) for r in ratios] != [float(r) for r in anchors.ASPECT_RATIOS[0]]:
        raise ConversionError(f"{path}: task.model.anchor.aspect_ratios is {ratios}, the config's "
                              f"MODEL.ANCHOR_GENERATOR.ASPECT_RATIOS is {anchors.ASPECT_RATIOS}: set it to "
                              f"[{list(ratios)}] (the same list: TFRPNHead reads it as height / width)")
    if any(len(sizes) != scales for sizes in anchors.SIZES):
        raise ConversionError(f"{path}: task.model.anchor.num_scales is {scales}, the config's "
                              f"MODEL.ANCHOR_GENERATOR.SIZES has {len(anchors.SIZES[0])} a level: give each "
                              f"level {scales} sizes, anchor_size x 2^level x 2^(i / {scales})")


def _checked_variables(component, entry, arrays, backbone):
    """``[(reference name, array)]`` of one component, after checking it fits."""
    expected, unused = entry["variables"], entry["unused"]
    if entry["path"] is None:
        raise ConversionError(
            f"the checkpoint has no {component} (no object named '{component}' in its object graph)"
        )
    keys = _KEYS.get(component) or _KEYS[component, backbone]
    found = sum(e["found"] is not None for e in expected) + len(unused)
    if not found and component in _LEAVE_OUT:
        raise ConversionError(
            f"the checkpoint's {component} has no variables (an export whose serving never runs it, "
            f"such as the reference's image_and_boxes_tensor SavedModel, saves none): convert a training "
            f"checkpoint, or set {_LEAVE_OUT[component]} to leave it out"
        )
    sizes = f"the checkpoint's {component} has {found} variables, this config's {len(expected)}"
    for i, e in enumerate(expected):
        if e["found"] is None:
            raise ConversionError(
                f"the checkpoint has no {e['key']!r}, the config's {component} variable "
                f"{e['name']} {tuple(e['shape'])} ({sizes}): change {keys}"
            )
        if e["found"] != e["shape"]:
            raise ConversionError(
                f"{e['key']!r} has shape {tuple(e['found'])} in the checkpoint, the config's "
                f"{component} variable {e['name']} has {tuple(e['shape'])} ({sizes}): "
                f"change {keys}"
            )
    if unused:
        raise ConversionError(
            f"the checkpoint's {component} has {len(unused)} variable(s) this config's lacks "
            f"(first: {unused[0]!r}; {sizes}): change {keys}"
        )
    return [(e["name"], arrays[f"{component}|{i:05d}"]) for i, e in enumerate(expected)]


class _MaskHeadLayers(nn.Module):
    """The mask head's network alone: ROI features in, logits out (no Instances)."""

    def __init__(self, head):
        super().__init__()
        self.head = head

    def forward(self, x):
        return self.head.layers(x)


class _BoxHeadLayers(nn.Module):
    """The box head and its predictor, the reference's one DetectionHead."""

    def __init__(self, box_head, box_predictor):
        super().__init__()
        self.box_head, self.box_predictor = box_head, box_predictor

    def forward(self, x):
        return self.box_predictor(self.box_head(x))


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
        checkpoint's key)]``; every one of ours is under one of :func:`converted_prefixes`.
    """
    if manifest.get("params"):
        check_reference_config(cfg, manifest["params"])
    components = manifest["components"]
    device = next(model.parameters()).device
    side = model.backbone.size_divisibility
    image = torch.zeros(1, 3, side, side, device=device)
    roi_heads = model.roi_heads
    channels = model.backbone.output_shape()[roi_heads.mask_in_features[0]].channels
    rois = torch.zeros(2, channels, *roi_heads.mask_pooler.output_size, device=device)
    # (component, module, example input, its place in the model, the module's own prefix)
    if cfg.MODEL.BACKBONE.NAME == RESNET_FPN:  # the reference's backbone and decoder
        bottom_up = model.backbone.bottom_up
        features = {int(n[3:]): torch.zeros(1, s.channels, side // s.stride, side // s.stride, device=device)
                    for n, s in bottom_up.output_shape().items()}
        parts = [("backbone", bottom_up, image, "backbone.bottom_up.", ""),
                 ("decoder", model.backbone.fpn, features, "backbone.fpn.", "")]
    else:
        parts = [("backbone", model.backbone, image, "backbone.", "")]
    parts.append(("mask_head", _MaskHeadLayers(roi_heads.mask_head), rois, "roi_heads.mask_head.", "head."))
    if cfg.MODEL.RPN.HEAD_NAME == TF_RPN_HEAD:
        shapes = model.backbone.output_shape()
        levels = [torch.zeros(1, shapes[f].channels, max(side // shapes[f].stride, 1), max(side // shapes[f].stride, 1),
                              device=device) for f in model.proposal_generator.in_features]
        parts.append(("rpn_head", model.proposal_generator.rpn_head, levels, "proposal_generator.rpn_head.", ""))
    if cfg.MODEL.ROI_BOX_HEAD.NAME == TF_BOX_HEAD:
        box_rois = torch.zeros(2, channels, *roi_heads.box_pooler.output_size, device=device)
        parts.append(("detection_head", _BoxHeadLayers(roi_heads.box_head, roi_heads.box_predictor), box_rois,
                      "roi_heads.", ""))
    name_map = []
    for component, module, example, place, own in parts:
        variables = _checked_variables(component, components[component], arrays, cfg.MODEL.BACKBONE.NAME)
        pairs = load_reference_weights(module, variables, (example,))
        keys = [e["key"] for e in components[component]["variables"]]
        name_map += [(place + ours[len(own):], name, key) for (ours, name), key in zip(pairs, keys)]
    return name_map
