#!/usr/bin/env python3
"""Make a partially supervised COCO json: every box kept, masks only for some instances.

    # the paper's VOC -> non-VOC setting: masks for the 20 VOC classes only
    python tools/make_partial_annotations.py instances_train2017.json train_voc_masks.json --masks-for voc
    # masks for classes 1 and 3, and of those, half the masks removed at random
    python tools/make_partial_annotations.py IN.json OUT.json --masks-for 1,3 --drop-mask-fraction 0.5 --seed 0

A removed mask is a deleted ``segmentation`` key; annotations, boxes, images and
categories are all kept, crowd annotations unchanged. Prints, per class, what it did.
Same input and arguments, same output (the ``--seed`` picks the dropped masks).
Register OUT with Detectron2's ``register_coco_instances`` and train with deepmac-d2's
mapper: box-only instances train RPN and the box head, not the mask head.
"""
import argparse
import json
import os
import sys

from deepmac_d2.data.partial_annotations import (
    format_summary,
    make_partial_annotations,
    parse_masks_for,
)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("input", metavar="IN", help="COCO instances json with masks")
    p.add_argument("output", metavar="OUT", help="where to write the partially supervised json")
    p.add_argument(
        "--masks-for",
        metavar="SPEC",
        help="classes that keep their masks: 'voc', 'nonvoc' (COCO's splits), category ids "
        "'1,2,3', class names 'cat,dog', or a mix 'voc,11' (default: every class)",
    )
    p.add_argument(
        "--drop-mask-fraction",
        type=float,
        default=0.0,
        metavar="F",
        help="of each class's kept masks, remove this fraction too (0..1, default 0)",
    )
    p.add_argument("--seed", type=int, default=0, help="picks the masks --drop-mask-fraction removes")
    args = p.parse_args(argv)
    if args.masks_for is None and args.drop_mask_fraction == 0:
        p.error("nothing to remove: give --masks-for and/or --drop-mask-fraction")
    return args


def main(argv=None):
    args = parse_args(argv)
    with open(args.input) as f:
        coco = json.load(f)
    try:
        masks_for = None
        if args.masks_for is not None:
            masks_for = parse_masks_for(args.masks_for, coco["categories"])
        partial, summary = make_partial_annotations(coco, masks_for, args.drop_mask_fraction, args.seed)
    except ValueError as e:
        sys.exit(f"error: {args.input}: {e}")
    tmp = args.output + ".tmp"
    with open(tmp, "w") as f:
        json.dump(partial, f, separators=(",", ":"))
    os.replace(tmp, args.output)
    print(format_summary(summary))
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
