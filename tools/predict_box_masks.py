#!/usr/bin/env python3
"""Masks for boxes you already have, from a trained deepmac-d2 (or any Mask R-CNN) model.

    python tools/predict_box_masks.py --config-file configs/voc_r50_hg52.yaml \\
        --weights out/model_final.pth --image photo.jpg \\
        --boxes "10,20,200,240;150,30,320,300" --output masks.png

Prints one line per box (its clipped box, class, mask area in pixels and as a fraction
of the box); with --output, draws the boxes and masks with Detectron2's Visualizer.
Trailing KEY VALUE pairs override the config, as in train_net.py.
"""
import argparse
import sys

import numpy as np
import torch
from detectron2.config import get_cfg
from detectron2.data import MetadataCatalog
from detectron2.data.detection_utils import read_image
from detectron2.utils.visualizer import Visualizer

from deepmac_d2 import add_deepmac_config
from deepmac_d2.box_masks import BoxMaskPredictor


def parse_numbers(text, per_item, name, cast):
    """Parse "a,b;c,d" into [[a, b], [c, d]]; errors name the faulty item."""
    items = []
    for i, item in enumerate(t for t in text.split(";") if t.strip()):
        try:
            values = [cast(v) for v in item.split(",")]
        except ValueError:
            raise SystemExit(
                f"--{name}: item {i} {item!r} is not {per_item} comma-separated numbers"
            )
        if len(values) != per_item:
            raise SystemExit(
                f"--{name}: item {i} {item!r} has {len(values)} numbers, expected {per_item}"
            )
        items.append(values)
    return items


def build_parser():
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config-file", required=True, metavar="FILE")
    parser.add_argument("--weights", help="checkpoint (default: the config's MODEL.WEIGHTS)")
    parser.add_argument("--image", required=True, help="image file (any format Pillow reads)")
    parser.add_argument(
        "--boxes", required=True, help='XYXY boxes in image pixels: "x0,y0,x1,y1;x0,y0,x1,y1"'
    )
    parser.add_argument(
        "--classes",
        help="contiguous class id per box, '0,14' (or '0;14'); needed for per-class mask heads",
    )
    parser.add_argument("--output", help="write a picture of the boxes and masks here (.png)")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="KEY VALUE config overrides")
    return parser


def load_config(args):
    cfg = get_cfg()
    add_deepmac_config(cfg)
    cfg.merge_from_file(args.config_file)
    cfg.merge_from_list(args.opts)
    # Detectron2 defaults to "cuda"; predicting a few masks on a CPU machine should just work.
    if cfg.MODEL.DEVICE.startswith("cuda") and not torch.cuda.is_available():
        cfg.MODEL.DEVICE = "cpu"
    cfg.freeze()
    return cfg


def class_names(cfg):
    """The class names of the config's test (else training) dataset, if it has them."""
    for name in list(cfg.DATASETS.TEST) + list(cfg.DATASETS.TRAIN):
        names = MetadataCatalog.get(name).get("thing_classes", None)
        if names:
            return names
    return None


def main(argv=None):
    args = build_parser().parse_args(argv)
    boxes = np.array(parse_numbers(args.boxes, 4, "boxes", float), dtype=np.float32).reshape(-1, 4)
    classes = None
    if args.classes:
        classes = [c for (c,) in parse_numbers(args.classes.replace(",", ";"), 1, "classes", int)]
    cfg = load_config(args)
    predictor = BoxMaskPredictor(cfg, weights=args.weights)
    image = read_image(args.image, format=cfg.INPUT.FORMAT)
    try:
        result = predictor(image, boxes, classes)
    except (TypeError, ValueError) as err:
        raise SystemExit(f"error: {err}")

    # The predictor clips the boxes to the image: report and draw what it used.
    height, width = image.shape[:2]
    boxes[:, 0::2] = boxes[:, 0::2].clip(0, width)
    boxes[:, 1::2] = boxes[:, 1::2].clip(0, height)
    labels = [str(i) for i in range(len(boxes))]
    if classes is not None:
        names = class_names(cfg)
        labels = [
            f"{i} class {c}" + (f" ({names[c]})" if names else "") for i, c in enumerate(classes)
        ]
    print(f"{args.image}: {width}x{height}, {len(boxes)} box(es)")
    for box, mask, label in zip(boxes, result.masks, labels):
        area = int(mask.sum())
        box_area = float((box[2] - box[0]) * (box[3] - box[1]))
        fraction = area / box_area if box_area > 0 else 0.0
        corners = ", ".join(f"{v:g}" for v in box)
        print(f"box {label} [{corners}]: mask area {area} px ({fraction:.1%} of box)")

    if args.output:
        rgb = read_image(args.image, format="RGB")
        visualizer = Visualizer(rgb)
        picture = visualizer.overlay_instances(boxes=boxes, masks=list(result.masks), labels=labels)
        picture.save(args.output)
        print(f"wrote {args.output}")
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
