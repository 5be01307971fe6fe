#!/usr/bin/env python3
"""Export a trained deepmac-d2 model for serving, as TorchScript and/or ONNX.

    python tools/export_model.py --config-file configs/voc_r50_hg52.yaml \\
        --weights out/model_final.pth --output exported/ [--model detector box_masks] \\
        [--format torchscript onnx] [KEY VALUE ...]

Writes, for each model and format asked (default: all four):

    detector.ts / detector.onnx      image -> boxes, scores, classes, masks
    box_masks.ts / box_masks.onnx    image, boxes [, classes] -> probabilities
    export.json                      inputs, outputs, channel order, class names

The image is H x W x 3 uint8 in the config's INPUT.FORMAT channel order, any size; the
model's test-time resize is inside the graph and results are at the image's size. Boxes
are N x 4 float32 XYXY in image pixels, any N (zero too); `classes` (N int64) is an input
only for per-class mask heads. Serving needs torch + torchvision (TorchScript: `import
torchvision` registers the RoIAlign and NMS ops the graph calls) or onnxruntime (ONNX);
not Detectron2 nor deepmac_d2. See the README, "Export for serving".
"""
import argparse
import json
import os
import sys

import numpy as np
import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.data import MetadataCatalog
from detectron2.modeling import build_model

from deepmac_d2.engine import load_config
from deepmac_d2.export import BoxMaskExport, DetectorExport, export_onnx, export_torchscript

MODELS = ("detector", "box_masks")
FORMATS = {"torchscript": "ts", "onnx": "onnx"}


def signature(name, class_agnostic):
    """Input and output names of an exported model, with their dynamic axes."""
    if name == "detector":
        inputs = {"image": [0, 1]}
        outputs = {"boxes": [0], "scores": [0], "classes": [0], "masks": [0, 1, 2]}
    else:
        inputs = {"image": [0, 1], "boxes": [0]}
        if not class_agnostic:
            inputs["classes"] = [0]
        outputs = {"probabilities": [0, 1, 2]}
    return inputs, outputs


def example_inputs(name, cfg, class_agnostic):
    """Tracing inputs: any values do, the graph keeps sizes and box counts dynamic."""
    side = max(int(cfg.INPUT.MIN_SIZE_TEST), 32)
    image = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (side, side, 3), np.uint8))
    if name == "detector":
        return (image,)
    boxes = torch.tensor([[0.1, 0.1, 0.6, 0.7], [0.3, 0.2, 0.9, 0.9]]) * side
    if class_agnostic:
        return image, boxes
    return image, boxes, torch.zeros(len(boxes), dtype=torch.int64)


def class_names(cfg):
    for dataset in list(cfg.DATASETS.TEST) + list(cfg.DATASETS.TRAIN):
        names = MetadataCatalog.get(dataset).get("thing_classes", None)
        if names:
            return list(names)
    return None


def export(cfg, model, output_dir, models=MODELS, formats=tuple(FORMATS)):
    """Export ``model`` (a GeneralizedRCNN built from ``cfg``) into ``output_dir``;
    returns the paths written, by (model, format)."""
    os.makedirs(output_dir, exist_ok=True)
    class_agnostic = cfg.MODEL.ROI_MASK_HEAD.CLS_AGNOSTIC_MASK
    info = {
        "input_format": cfg.INPUT.FORMAT,
        "min_size_test": cfg.INPUT.MIN_SIZE_TEST,
        "max_size_test": cfg.INPUT.MAX_SIZE_TEST,
        "class_names": class_names(cfg),
        "models": {},
    }
    written = {}
    for name in models:
        module = (DetectorExport if name == "detector" else BoxMaskExport).from_config(cfg, model)
        inputs, outputs = signature(name, class_agnostic)
        example = example_inputs(name, cfg, class_agnostic)
        info["models"][name] = {"inputs": list(inputs), "outputs": list(outputs), "files": []}
        for fmt in formats:
            path = os.path.join(output_dir, f"{name}.{FORMATS[fmt]}")
            if fmt == "torchscript":
                export_torchscript(module, example, path)
            else:
                export_onnx(module, example, path, list(inputs), list(outputs),
                            {**inputs, **outputs})
            written[name, fmt] = path
            info["models"][name]["files"].append(os.path.basename(path))
    with open(os.path.join(output_dir, "export.json"), "w") as f:
        json.dump(info, f, indent=2)
    return written


def build_parser():
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config-file", required=True, metavar="FILE")
    parser.add_argument("--weights", help="checkpoint (default: the config's MODEL.WEIGHTS)")
    parser.add_argument("--output", required=True, help="directory for the exported files")
    parser.add_argument("--model", nargs="+", choices=MODELS, default=list(MODELS))
    parser.add_argument("--format", nargs="+", choices=list(FORMATS), default=list(FORMATS))
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="KEY VALUE config overrides")
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    cfg = load_config(args)
    cfg.MODEL.DEVICE = "cpu"  # a CPU graph runs anywhere; see the README for GPU serving
    cfg.freeze()
    if cfg.MODEL.META_ARCHITECTURE != "GeneralizedRCNN" or not cfg.MODEL.MASK_ON:
        raise SystemExit(
            f"error: MODEL.META_ARCHITECTURE {cfg.MODEL.META_ARCHITECTURE!r}, MODEL.MASK_ON "
            f"{cfg.MODEL.MASK_ON}: only a GeneralizedRCNN with a mask head (Mask R-CNN) exports"
        )
    weights = args.weights or cfg.MODEL.WEIGHTS
    if not weights or not os.path.isfile(weights):
        raise SystemExit(
            f"error: --weights {weights!r} is not a file; give the trained checkpoint "
            "(e.g. output/model_final.pth)"
        )
    model = build_model(cfg)
    DetectionCheckpointer(model).load(weights)
    written = export(cfg, model.eval(), args.output, args.model, args.format)
    for (name, fmt), path in written.items():
        print(f"{name} ({fmt}): {path}")
    return written


if __name__ == "__main__":
    main(sys.argv[1:])
