#!/usr/bin/env python3
"""``make tf-checkpoint-check``: tools/convert_tf_checkpoint.py on checkpoints the reference writes.

For each backbone (suite ``spinenet``: SpineNet-49 with a Hourglass-20 head of 16
filters, crop 16 -> 32x32 masks; suite ``resnet_fpn``: the reference's ResNet-50 + FPN
of 64 filters on P2..P6 with the default head of 16 filters, crop 14 -> 28x28 masks;
256x256 input), ``tools/tf_reference/tf_checkpoint_check_tf.py`` (in ``.venv-tf``) builds the
reference's deepmac_maskrcnn model with random weights, saves a training checkpoint,
exports it with the reference's own exporter and records the SavedModel's
``image_and_boxes_tensor`` output for two images and six boxes each. This script
converts the checkpoint and the SavedModel, loads the .pth with BoxMaskPredictor, and
compares our mask probabilities for the same boxes with the reference's, per ROI
(both are the sigmoid of the head's M x M logits, before pasting into the image):

- ``native``: a 256x256 image, which neither side resizes; the two agree to float32
  rounding when the RoIAlign is the reference's (POOLER_TYPE ROIAlign, sampling ratio
  1: one bilinear sample per bin centre, no half-pixel shift). Tolerance 1e-4.
- ``resized``: 240x320, which both scale by 0.8; TF resizes the normalised float image
  bilinearly, Detectron2 the uint8 image with Pillow (antialiased), so the inputs
  differ. Reported, with the masks' IoU (at 0.5), not held to the tolerance.
- Detectron2's own RoIAlign (ROIAlignV2: adaptive sampling, half-pixel shift) on the
  native image, to show what the pooler setting is worth. Reported only.

It then converts checkpoints that do not fit the config (SpineNet-96 or a head of
width 32 for a SpineNet-49 config; ResNet-101 for a ResNet-50 one), and the SavedModel
with a config whose BatchNorm epsilon differs from its params.yaml's (no variable shows
that), and requires each error to name the config key. Exit status 1 on any failure.

    python tools/tf_reference/tf_checkpoint_check.py [--suites spinenet,resnet_fpn] [--ref-dir DIR]
    # DIR/<suite>: tf_checkpoint_check_tf.py's output for that suite
"""
import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from detectron2.data import transforms as T
from detectron2.layers import paste_masks_in_image
from detectron2.structures import Boxes, Instances

sys.path.insert(0, str(Path(__file__).resolve().parent))  # parity.py, next to this file
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tools/: the converter
from convert_tf_checkpoint import TF_PYTHON, convert, load_config  # noqa: E402
from parity import box_in_reference_layout, rpn_in_reference_layout  # noqa: E402

from deepmac_d2.box_masks import BoxMaskPredictor  # noqa: E402
from deepmac_d2.tf_port import ConversionError  # noqa: E402
from deepmac_d2.tf_port.checkpoint import reference_spec  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
INPUT_SIZE = 256
_COMMON = [
    "MODEL.ROI_MASK_HEAD.ALLOWED_CLASS_IDS", "[]", "MODEL.ROI_HEADS.NUM_CLASSES", "3",
    "INPUT.MIN_SIZE_TEST", str(INPUT_SIZE), "INPUT.MAX_SIZE_TEST", str(INPUT_SIZE),
]
# Detectron2's own RPN and box heads: what a SavedModel for image_and_boxes_tensor can
# fill (its export never runs the reference's RPN and box head, so saves no variables of them).
D2_HEADS = ["MODEL.RPN.HEAD_NAME", "StandardRPNHead", "MODEL.ROI_BOX_HEAD.NAME", "FastRCNNConvFCHead"]
# suite -> (config, its overrides, the mismatches: (what to convert, config overrides,
# the key the error must name), overrides for converting the SavedModel).
SUITES = {
    "spinenet": (ROOT / "configs" / "voc_spinenet143_hg52.yaml", _COMMON + [
        "MODEL.SPINENET.MODEL_ID", "49", "MODEL.SPINENET.NORM", "BN",
        "MODEL.ROI_MASK_HEAD.CONVNET_VARIANT", "hourglass20", "MODEL.ROI_MASK_HEAD.CONV_DIM", "16",
        "MODEL.ROI_MASK_HEAD.POOLER_RESOLUTION", "16", "MODEL.ROI_BOX_HEAD.NORM", "BN",
    ], [
        ("mismatch_spinenet96", [], "MODEL.SPINENET.MODEL_ID"),
        ("mismatch_width32", [], "MODEL.ROI_MASK_HEAD.CONV_DIM"),
        ("export/saved_model", ["MODEL.ROI_MASK_HEAD.BN_EPS", "1e-5"], "MODEL.ROI_MASK_HEAD.BN_EPS"),
    ], []),
    "resnet_fpn": (ROOT / "configs" / "voc_tf_r50_hg52.yaml", _COMMON + [
        "MODEL.RESNETS.NORM", "BN", "MODEL.FPN.NORM", "BN", "MODEL.FPN.OUT_CHANNELS", "64",
        "MODEL.RPN.NORM", "BN", "MODEL.ROI_BOX_HEAD.NORM", "BN", "MODEL.ROI_BOX_HEAD.NUM_CONV", "2",
        "MODEL.ROI_BOX_HEAD.CONV_DIM", "32", "MODEL.ROI_BOX_HEAD.FC_DIM", "64",
        "MODEL.ROI_MASK_HEAD.CONVNET_VARIANT", "default", "MODEL.ROI_MASK_HEAD.CONV_DIM", "16",
        "MODEL.ROI_MASK_HEAD.POOLER_RESOLUTION", "14",
    ], [
        ("mismatch_resnet101", [], "MODEL.RESNETS.DEPTH"),
        ("export/saved_model", D2_HEADS + ["MODEL.RESNETS.BN_EPS", "1e-3"], "MODEL.RESNETS.BN_EPS"),
        ("export/saved_model", [], "MODEL.RPN.HEAD_NAME StandardRPNHead"),
    ], D2_HEADS),
}
REFERENCE_ROI_ALIGN = ["MODEL.ROI_MASK_HEAD.POOLER_TYPE", "ROIAlign",
                       "MODEL.ROI_MASK_HEAD.POOLER_SAMPLING_RATIO", "1"]
DETECTRON2_ROI_ALIGN = ["MODEL.ROI_MASK_HEAD.POOLER_TYPE", "ROIAlignV2",
                        "MODEL.ROI_MASK_HEAD.POOLER_SAMPLING_RATIO", "0"]
TOLERANCE = 1e-4


def roi_probabilities(predictor, image, boxes):
    """Our per-ROI mask probabilities (N x M x M) for XYXY ``boxes`` in ``image``'s pixels,
    with the predictor's own preprocessing; the reference's serving output's counterpart."""
    aug = T.AugInput(image)
    transform = predictor.augmentations(aug)
    height, width = aug.image.shape[:2]
    instances = Instances((height, width))
    instances.pred_boxes = Boxes(torch.as_tensor(transform.apply_box(boxes), dtype=torch.float32))
    instances.pred_classes = torch.zeros(len(boxes), dtype=torch.int64)
    inputs = {"image": torch.as_tensor(np.ascontiguousarray(aug.image.transpose(2, 0, 1))),
              "height": image.shape[0], "width": image.shape[1]}
    with torch.no_grad():
        (result,) = predictor.model.inference([inputs], detected_instances=[instances], do_postprocess=False)
    return result.pred_masks[:, 0].numpy()


def head_differences(predictor, serving):
    """Max |ours - the reference's| of the RPN head's outputs (each level) and the box
    head's (for the native image's boxes), in the reference's layout, and the scale."""
    model = predictor.model
    image, boxes = serving["native|image"], serving["native|boxes"]
    with torch.no_grad():
        images = model.preprocess_image([{"image": torch.as_tensor(np.ascontiguousarray(image.transpose(2, 0, 1)))}])
        features = model.backbone(images.tensor)
        rpn = model.proposal_generator
        levels = [int(f[1:]) for f in rpn.in_features]
        ours = rpn_in_reference_layout(*rpn.rpn_head([features[f] for f in rpn.in_features]), levels)
        ours = {k: v.permute(0, 2, 3, 1) for k, v in ours.items()}  # NHWC
        heads = model.roi_heads
        rois = heads.box_pooler([features[f] for f in heads.box_in_features], [Boxes(torch.from_numpy(boxes))])
        ours.update(box_in_reference_layout(*heads.box_predictor(heads.box_head(rois))))
    ours["box_deltas"] = ours.pop("boxes")
    rpn_keys = [k for k in ours if k.startswith(("scores_p", "boxes_p"))]
    worst = {}
    for part, keys in (("RPN head", rpn_keys), ("box head", ["classes", "box_deltas"])):
        worst[part] = max(float(np.abs(ours[k].numpy() - serving[f"heads|{k}"]).max()) for k in keys)
        worst[part + " scale"] = max(float(np.abs(serving[f"heads|{k}"]).max()) for k in keys)
    return worst


def mask_iou(ours, theirs):
    """Per-instance IoU of two N x H x W boolean mask stacks (1 where both are empty)."""
    inter = (ours & theirs).sum((1, 2))
    union = (ours | theirs).sum((1, 2))
    return np.where(union > 0, inter / np.maximum(union, 1), 1.0)


def compare(predictor, serving, name):
    """(max |p_ours - p_ref| per ROI pixel, mean, min IoU of the pasted image masks)."""
    image, boxes, theirs = (serving[f"{name}|{k}"] for k in ("image", "boxes", "masks"))
    ours = roi_probabilities(predictor, image, boxes)
    diff = np.abs(ours - theirs)
    # Image level: the predictor's masks against the reference's ROI masks pasted the same way.
    pasted = paste_masks_in_image(torch.from_numpy(theirs), Boxes(torch.from_numpy(boxes)),
                                  image.shape[:2], threshold=0.5).numpy()
    iou = mask_iou(predictor(image, boxes).masks, pasted)
    return float(diff.max()), float(diff.mean()), float(iou.min())


def check_suite(suite, ref_dir, tmp):
    """Rows ``(check, value, ok or None for reported-only)`` of one suite."""
    config, overrides, mismatches, saved_model_opts = SUITES[suite]
    cfg = load_config(config, overrides + REFERENCE_ROI_ALIGN)
    ref = Path(ref_dir or tmp) / suite
    if ref_dir is None:
        if not TF_PYTHON.exists():
            sys.exit(f"{TF_PYTHON} is missing: run `make setup-tf` first")
        spec_path = Path(tmp) / f"{suite}.json"
        spec_path.write_text(json.dumps(dict(reference_spec(cfg), input_size=INPUT_SIZE)))
        start = time.time()
        subprocess.run([str(TF_PYTHON), str(ROOT / "tools" / "tf_reference" / "tf_checkpoint_check_tf.py"),
                        "--spec", str(spec_path), "--out", str(ref)], check=True)
        print(f"[tf-checkpoint-check] {suite}: reference written in {time.time() - start:.0f} s", flush=True)
    rows = []
    serving = np.load(ref / "serving.npz")
    weights = {}
    for source, opts in (("ckpt", []), ("export/saved_model", saved_model_opts)):
        weights[source] = Path(tmp) / f"{suite}_{source.replace('/', '_')}.pth"
        start = time.time()
        count = len(convert(load_config(config, overrides + REFERENCE_ROI_ALIGN + opts), ref / source,
                            weights[source]))
        rows.append((" ".join([f"convert {source}", *opts]) + f": {count} tensors ({time.time() - start:.0f} s)",
                     "", True))
    a, b = (torch.load(weights[s])["model"] for s in ("ckpt", "export/saved_model"))
    same = set(b) <= set(a) and all(torch.equal(a[k], b[k]) for k in b)
    rows.append(("checkpoint and SavedModel convert to the same tensors (the SavedModel's)", "", same))

    predictor = BoxMaskPredictor(cfg, weights=str(weights["ckpt"]))
    for name in ("native", "resized"):
        worst, mean, iou = compare(predictor, serving, name)
        held = name == "native"
        rows.append((f"{name}: max |p - p_ref| per ROI pixel (mean {mean:.2g})", f"{worst:.3g}",
                     worst <= TOLERANCE if held else None))
        rows.append((f"{name}: min mask IoU, image size", f"{iou:.4f}", iou >= 0.99 if held else None))
    if "heads|classes" in serving.files:
        worst = head_differences(predictor, serving)
        for part in ("RPN head", "box head"):
            rows.append((f"native: max |ours - ref| of the {part}'s outputs (max |ref| "
                         f"{worst[part + ' scale']:.3g})", f"{worst[part]:.3g}",
                         worst[part] <= TOLERANCE * max(worst[part + " scale"], 1.0)))
    d2_cfg = load_config(config, overrides + DETECTRON2_ROI_ALIGN)
    worst, mean, iou = compare(BoxMaskPredictor(d2_cfg, weights=str(weights["ckpt"])), serving, "native")
    rows.append((f"native, Detectron2's ROIAlignV2: max |p - p_ref| (mean {mean:.2g})", f"{worst:.3g}", None))
    rows.append(("native, Detectron2's ROIAlignV2: min mask IoU", f"{iou:.4f}", None))

    for source, opts, key in mismatches:
        try:
            convert(load_config(config, overrides + REFERENCE_ROI_ALIGN + opts), ref / source,
                    Path(tmp) / "mismatch.pth")
            message, ok = "converted (should not)", False
        except ConversionError as err:
            message, ok = str(err), key in str(err)
        rows.append((" ".join([source, *opts]) + f" fails naming {key}", "", ok))
        print(f"[tf-checkpoint-check] {suite} {source}: {message}", flush=True)
    return [(f"{suite}: {check}", value, ok) for check, value, ok in rows]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--suites", default=",".join(SUITES), help=f"of {', '.join(SUITES)}")
    ap.add_argument("--ref-dir", help="output of tools/tf_reference/tf_checkpoint_check_tf.py per suite, DIR/<suite> "
                                      "(default: run it now)")
    args = ap.parse_args()
    suites = args.suites.split(",")
    if set(suites) - set(SUITES):
        sys.exit(f"unknown suite(s) {sorted(set(suites) - set(SUITES))}; valid: {', '.join(SUITES)}")
    rows = []
    with tempfile.TemporaryDirectory(prefix="tf-checkpoint-check-") as tmp:
        for suite in suites:
            rows += check_suite(suite, args.ref_dir, tmp)

    print(f"\n{'check':<92} {'value':>10}  ok")
    print("-" * 110)
    for check, value, ok in rows:
        print(f"{check:<92} {value:>10}  {'-' if ok is None else 'yes' if ok else 'NO'}")
    bad = [r for r in rows if r[2] is False]
    held = [r for r in rows if r[2] is not None]
    print(f"\n{len(held) - len(bad)} of {len(held)} checks pass" + (f"; {len(bad)} FAIL" if bad else ""))
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
