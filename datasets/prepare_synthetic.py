#!/usr/bin/env python3
"""Generate deepmac-d2's synthetic shapes dataset (the demo's default data).

    python datasets/prepare_synthetic.py                      # datasets/synthetic, demo sizes
    python datasets/prepare_synthetic.py --clutter 1 --occlusion 0.8 --out datasets/synthetic_hard
    python datasets/prepare_synthetic.py --partial-masks-for seen   # + train_partial.json

Writes ``<out>/{train,val}/*.png``, ``<out>/annotations/{train,val}.json``
(COCO, RLE masks), ``<out>/params.json`` and a ``<out>/preview.png`` grid of
val images, each shown bare above its annotated copy (``*`` marks novel classes).
``--partial-masks-for seen`` adds ``<out>/annotations/train_partial.json``: the train
boxes, with masks for the seen classes only (``synthetic_train_partial``); it prints per
class what it removed. A run with the
parameters of a finished one returns at once; an interrupted one is redone.
``import deepmac_d2`` registers ``synthetic_train``/``synthetic_val`` at the
default ``--out``; register another folder with
``deepmac_d2.data.synthetic.register_synthetic(root, name_prefix)``.
"""
import argparse
import json
import os
import sys
import time

import numpy as np
import pycocotools.mask as mask_util
from PIL import Image, ImageDraw

from deepmac_d2.data.partial_annotations import format_summary, parse_masks_for
from deepmac_d2.data.synthetic import (
    CLASS_NAMES,
    CLASS_SPLITS,
    NOVEL_CLASSES,
    PARTIAL_TRAIN_FILE,
    SyntheticConfig,
    categories,
    default_root,
    prepare_synthetic,
    write_partial_train,
)


def parse_args(argv=None):
    d = SyntheticConfig()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=default_root(), help="output folder (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num-train", type=int, default=600)
    p.add_argument("--num-val", type=int, default=150)
    p.add_argument("--image-size", type=int, default=d.image_size)
    p.add_argument("--num-classes", type=int, default=d.num_classes, help="draw from category ids 1..N")
    p.add_argument("--objects", type=int, nargs=2, default=d.objects_per_image, metavar=("MIN", "MAX"))
    p.add_argument("--size-range", type=float, nargs=2, default=d.size_range, metavar=("LO", "HI"),
                   help="object extent as a fraction of the image side")
    p.add_argument("--max-aspect", type=float, default=d.max_aspect)
    p.add_argument("--occlusion", type=float, default=d.occlusion, help="0..1: chance to touch an earlier object")
    p.add_argument("--min-visible", type=float, default=d.min_visible)
    p.add_argument("--clutter", type=float, default=d.clutter, help="0..1: background clutter and noise")
    p.add_argument("--no-textures", action="store_true", help="plain-coloured objects")
    p.add_argument("--preview-images", type=int, default=8, help="images in preview.png (0: none)")
    p.add_argument("--partial-masks-for", metavar="SPEC",
                   help=f"also write annotations/{PARTIAL_TRAIN_FILE}: train boxes, masks only for "
                   "these classes ('seen', 'novel' or category ids '1,2,...'); val keeps every mask")
    p.add_argument("--partial-drop-mask-fraction", type=float, default=0.0, metavar="F",
                   help="in that json, also remove this fraction of each kept class's masks (by --seed)")
    args = p.parse_args(argv)
    if not 0 <= args.partial_drop_mask_fraction <= 1:
        p.error(f"--partial-drop-mask-fraction must be in [0, 1], got {args.partial_drop_mask_fraction}")
    if args.partial_masks_for is not None:
        try:
            args.partial_masks_for = parse_masks_for(
                args.partial_masks_for, categories(), CLASS_SPLITS, "--partial-masks-for"
            )
        except ValueError as e:
            p.error(str(e))
    elif args.partial_drop_mask_fraction:
        p.error("--partial-drop-mask-fraction needs --partial-masks-for (e.g. seen)")
    return args


_PALETTE = [(230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48), (145, 30, 180),
            (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212), (0, 128, 128), (170, 110, 40)]


def overlay(img, anns, scale):
    """The image enlarged, each mask tinted with a white outline, box and class name (``*`` = novel).

    Drawn with PIL: Detectron2's Visualizer needs OpenCV, which the project's
    environment does not install.
    """
    big = np.kron(img, np.ones((scale, scale, 1), dtype=img.dtype)).astype(np.float64)
    labels = []
    for k, ann in enumerate(anns):
        m = np.kron(mask_util.decode(ann["segmentation"]), np.ones((scale, scale), dtype=np.uint8)).astype(bool)
        inner = m.copy()
        inner[1:-1, 1:-1] &= m[:-2, 1:-1] & m[2:, 1:-1] & m[1:-1, :-2] & m[1:-1, 2:]
        colour = np.array(_PALETTE[k % len(_PALETTE)], dtype=np.float64)
        big[m] = 0.45 * big[m] + 0.55 * colour
        big[m & ~inner] = 255
        x, y, w, h = (v * scale for v in ann["bbox"])
        name = CLASS_NAMES[ann["category_id"] - 1] + ("*" if ann["category_id"] in NOVEL_CLASSES else "")
        labels.append(((x, y, x + w - 1, y + h - 1), name, tuple(int(c) for c in colour)))
    canvas = Image.fromarray(big.astype(np.uint8))
    draw = ImageDraw.Draw(canvas)
    for box, name, colour in labels:
        draw.rectangle(box, outline=colour)
        draw.text((box[0] + 2, box[1] + 1), name, fill=(255, 255, 255), stroke_width=2, stroke_fill=(0, 0, 0))
    return np.asarray(canvas)


def save_preview(out, path, count, scale=3, columns=4):
    """Val images in rows of ``columns``, each row above the same images with their annotations drawn."""
    with open(os.path.join(out, "annotations", "val.json")) as f:
        coco = json.load(f)
    rows = []
    for start in range(0, count, columns):
        tops, bottoms = [], []
        for image in coco["images"][start : start + columns]:
            img = np.asarray(Image.open(os.path.join(out, "val", image["file_name"])).convert("RGB"))
            anns = [a for a in coco["annotations"] if a["image_id"] == image["id"]]
            tops.append(np.kron(img, np.ones((scale, scale, 1), dtype=img.dtype)))
            bottoms.append(overlay(img, anns, scale))
        rows += [np.hstack(tops), np.hstack(bottoms)]
    width = max(r.shape[1] for r in rows)
    rows = [np.pad(r, ((0, 0), (0, width - r.shape[1]), (0, 0))) for r in rows]
    # A 256-colour palette keeps the preview small enough to commit (docs/figures/synthetic_preview.png).
    Image.fromarray(np.vstack(rows)).quantize(256).save(path)


def main(argv=None):
    args = parse_args(argv)
    cfg = SyntheticConfig(
        image_size=args.image_size,
        num_classes=args.num_classes,
        objects_per_image=tuple(args.objects),
        size_range=tuple(args.size_range),
        max_aspect=args.max_aspect,
        occlusion=args.occlusion,
        min_visible=args.min_visible,
        clutter=args.clutter,
        textures=not args.no_textures,
    )
    start = time.time()

    def progress(split, done, total):
        end = "\n" if done == total else ""
        print(f"\r{split}: {done}/{total} images ({time.time() - start:.1f} s)", end=end, file=sys.stderr, flush=True)

    generated = prepare_synthetic(args.out, args.seed, args.num_train, args.num_val, cfg, progress)
    if not generated:
        print(f"{args.out}: already generated with these parameters", file=sys.stderr)
    if args.preview_images > 0:
        path = os.path.join(args.out, "preview.png")
        save_preview(args.out, path, args.preview_images)
        print(f"preview: {path}", file=sys.stderr)
    with open(os.path.join(args.out, "annotations", "train.json")) as f:
        train = json.load(f)
    print(f"{args.out}: {len(train['images'])} train images, {len(train['annotations'])} instances", file=sys.stderr)
    if args.partial_masks_for is not None:
        summary = write_partial_train(args.out, args.partial_masks_for, args.partial_drop_mask_fraction, args.seed)
        print(format_summary(summary), file=sys.stderr)
        print(f"{os.path.join(args.out, 'annotations', PARTIAL_TRAIN_FILE)}: masks for category ids "
              f"{args.partial_masks_for} only", file=sys.stderr)


if __name__ == "__main__":
    main()
