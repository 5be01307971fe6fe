"""A small COCO 2017 in Detectron2's layout, for running the COCO configs as users do.

``make_coco2017(root)`` writes ``root/coco/{train2017,val2017}/*.jpg`` and
``root/coco/annotations/instances_{train,val}2017.json`` (what Detectron2's builtin
``coco_2017_train`` / ``coco_2017_val`` read under ``$DETECTRON2_DATASETS``), with what
real COCO has and the synthetic demo data has not: the 80 categories with COCO's ids and
names, polygon masks (some instances in two polygons), crowd annotations as uncompressed
RLE, images of many sizes and aspect ratios, VOC and non-VOC classes, and a category
without any instance. Deterministic; a fraction of a second.
"""
import json
import os

import numpy as np
from detectron2.data.datasets.builtin_meta import COCO_CATEGORIES
from PIL import Image, ImageDraw
from pycocotools import mask as mask_util

from deepmac_d2.data.class_splits import NONVOC_CLASS_IDS, VOC_CLASS_IDS

# COCO's 80 thing categories, with its ids and the names Detectron2's metadata expects.
CATEGORIES = [{"id": c["id"], "name": c["name"], "supercategory": "thing"} for c in COCO_CATEGORIES if c["isthing"]]
# Classes the fixture draws: VOC and non-VOC ones. Every other category (toothbrush,
# id 90, among them) has no instance.
DRAWN_CLASS_IDS = (1, 3, 18, 62, 72) + (10, 27, 47, 51, 73, 77, 85)
EMPTY_CLASS_ID = 90
SIZES = {  # (height, width): portrait, landscape, square, very wide, small
    "train": [(96, 128), (160, 96), (120, 120), (72, 200), (200, 150), (100, 64), (140, 180), (88, 88)],
    "val": [(120, 96), (96, 160), (150, 150), (64, 140), (180, 120), (110, 110)],
}
CROWD_IMAGES = {"train": (1, 4), "val": (2,)}  # image indices that get a crowd region


def star_polygon(rng, cx, cy, radius, points=9):
    """A concave star-shaped polygon, flattened as COCO's [x0, y0, x1, y1, ...]."""
    angles = np.sort(rng.uniform(0, 2 * np.pi, points))
    radii = radius * rng.uniform(0.45, 1.0, points)
    xy = np.stack([cx + radii * np.cos(angles), cy + radii * np.sin(angles)], axis=1)
    return [round(float(v), 2) for v in xy.reshape(-1)]


def polygons_box(polygons):
    xy = np.concatenate([np.asarray(p).reshape(-1, 2) for p in polygons])
    x0, y0 = xy.min(axis=0)
    x1, y1 = xy.max(axis=0)
    return [float(x0), float(y0), float(x1 - x0), float(y1 - y0)]


def instance(rng, h, w):
    """One or two star polygons (a split instance) inside an h x w image."""
    radius = rng.uniform(0.25, 0.42) * min(h, w)  # large: even a barely trained detector overlaps some
    cx, cy = rng.uniform(radius, w - radius), rng.uniform(radius, h - radius)
    polygons = [star_polygon(rng, cx, cy, radius)]
    if rng.uniform() < 0.3:  # a second part, as an occluded COCO object has
        dx = radius * rng.choice([-1.2, 1.2])
        cx2 = float(np.clip(cx + dx, radius / 2, w - radius / 2))
        polygons.append(star_polygon(rng, cx2, cy, radius / 2, points=6))
    return polygons


def crowd_rle(rng, h, w):
    """A crowd region as COCO stores it: uncompressed RLE (counts as a list), column-major."""
    mask = np.zeros((h, w), np.uint8)
    y0, x0 = rng.integers(0, h // 2), rng.integers(0, w // 2)
    mask[y0 : y0 + h // 3, x0 : x0 + w // 3] = 1
    flat = mask.flatten(order="F")
    bounds = np.concatenate([[0], np.flatnonzero(np.diff(flat)) + 1, [flat.size]])
    counts = np.diff(bounds).tolist()
    if flat[0] == 1:  # runs start with background
        counts = [0] + counts
    return {"size": [h, w], "counts": [int(c) for c in counts]}, mask


def make_split(root, split, seed):
    rng = np.random.default_rng([seed, ("train", "val").index(split)])
    image_dir = os.path.join(root, "coco", f"{split}2017")
    os.makedirs(image_dir, exist_ok=True)
    images, annotations = [], []
    for index, (h, w) in enumerate(SIZES[split]):
        image_id = 1000 * (split == "val") + index + 1
        file_name = f"{image_id:012d}.jpg"
        canvas = Image.fromarray(rng.integers(0, 90, (h, w, 3), dtype=np.uint8))
        draw = ImageDraw.Draw(canvas)
        for _ in range(int(rng.integers(2, 5))):
            category_id = int(rng.choice(DRAWN_CLASS_IDS))
            polygons = instance(rng, h, w)
            color = tuple(int(v) for v in 120 + (np.array([37, 91, 53]) * category_id) % 135)
            for p in polygons:
                draw.polygon(p, fill=color)
            rles = mask_util.frPyObjects(polygons, h, w)
            annotations.append({
                "id": len(annotations) + 1 + 100000 * (split == "val"), "image_id": image_id,
                "category_id": category_id, "segmentation": polygons, "iscrowd": 0,
                "area": float(mask_util.area(mask_util.merge(rles))), "bbox": polygons_box(polygons),
            })
        if index in CROWD_IMAGES[split]:
            rle, mask = crowd_rle(rng, h, w)
            ys, xs = np.nonzero(mask)
            annotations.append({
                "id": len(annotations) + 1 + 100000 * (split == "val"), "image_id": image_id,
                "category_id": 1, "segmentation": rle, "iscrowd": 1, "area": float(mask.sum()),
                "bbox": [float(xs.min()), float(ys.min()), float(np.ptp(xs) + 1), float(np.ptp(ys) + 1)],
            })
        canvas.save(os.path.join(image_dir, file_name), quality=95)
        images.append({"id": image_id, "file_name": file_name, "height": h, "width": w})
    os.makedirs(os.path.join(root, "coco", "annotations"), exist_ok=True)
    with open(os.path.join(root, "coco", "annotations", f"instances_{split}2017.json"), "w") as f:
        json.dump({"info": {"description": "deepmac-d2 COCO-shaped test fixture"}, "licenses": [],
                   "images": images, "annotations": annotations, "categories": CATEGORIES}, f)


def make_coco2017(root, seed=0):
    """Write the fixture under ``root`` (use ``root`` as ``DETECTRON2_DATASETS``)."""
    for split in ("train", "val"):
        make_split(root, split, seed)
    return root


assert EMPTY_CLASS_ID not in DRAWN_CLASS_IDS
assert set(DRAWN_CLASS_IDS) & set(VOC_CLASS_IDS) and set(DRAWN_CLASS_IDS) & set(NONVOC_CLASS_IDS)
