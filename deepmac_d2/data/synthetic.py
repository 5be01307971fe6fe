"""The embedded default dataset: synthetic shapes in COCO format, generated on
this machine, so the demo and the tests need no download.

Partially supervised segmentation is only worth testing on data where a mask
is not "fill the box": the classes are 14 shapes with holes, bites, spikes and
concavities (:mod:`.synthetic_shapes`), drawn with random texture, colour,
size, aspect and rotation over a cluttered background, occluding each other
(:mod:`.synthetic_render`). The seen/novel split is ``SEEN_CLASSES`` /
``NOVEL_CLASSES``, defined next to the classes.

Generate with ``python datasets/prepare_synthetic.py`` (or :func:`prepare_synthetic`).
``--partial-masks-for seen`` also writes ``annotations/train_partial.json``: the same train
images and boxes, masks for the seen classes only (the novel ones are box-only), which
``<prefix>_train_partial`` names; the partially supervised setting as real data has it.
Masks are stored as compressed RLE (visible parts only; holes and occlusion
make polygons a poor fit), so training needs ``cfg.INPUT.MASK_FORMAT = "bitmask"``.

Where the data lives: ``$DEEPMAC_SYNTHETIC_ROOT`` if set, else
``datasets/synthetic`` under the repository root (the folder holding the
``deepmac_d2`` package; with a non-editable install, set the variable).
"""
import dataclasses
import json
import os
import shutil
from typing import Tuple

import numpy as np
import pycocotools.mask as mask_util
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import load_coco_json
from PIL import Image

from .partial_annotations import make_partial_annotations
from .synthetic_render import render_scene
from .synthetic_shapes import (  # noqa: F401  (re-exported: the split lives with the classes)
    CLASS_NAMES,
    NOVEL_CLASS_NAMES,
    NOVEL_CLASSES,
    SEEN_CLASS_NAMES,
    SEEN_CLASSES,
)

SPLITS = ("train", "val")
PARAMS_FILE = "params.json"
# train.json with masks removed (write_partial_train); <prefix>_train_partial reads it.
PARTIAL_TRAIN_FILE = "train_partial.json"
# Presets of --partial-masks-for, as deepmac_d2.data.partial_annotations.parse_masks_for takes them.
CLASS_SPLITS = {"seen": SEEN_CLASSES, "novel": NOVEL_CLASSES}
_REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PREPARE_SCRIPT = os.path.join(_REPO_ROOT, "datasets", "prepare_synthetic.py")


@dataclasses.dataclass(frozen=True)
class SyntheticConfig:
    """The knobs of the generator. The defaults are sized for the CPU demo;
    raise ``clutter``/``occlusion``, shrink ``size_range`` or switch textures
    on for more classes to make the data harder."""

    image_size: int = 128  # square images, in pixels
    num_classes: int = len(CLASS_NAMES)  # objects are drawn from category ids 1..num_classes
    objects_per_image: Tuple[int, int] = (2, 5)  # inclusive range tried per image (some may not fit)
    size_range: Tuple[float, float] = (0.2, 0.5)  # object extent before stretching, as a fraction of the image
    max_aspect: float = 1.8  # objects are stretched by a factor in [1/max_aspect, max_aspect]
    occlusion: float = 0.5  # probability that an object is placed against an earlier one
    min_visible: float = 0.5  # no object may end up with less than this fraction of itself visible
    clutter: float = 0.6  # 0..1: background pattern, distractor strokes and pixel noise
    textures: bool = True  # objects get stripes/checker/dots/noise/gradient fills, else one colour

    def __post_init__(self):
        if not 1 <= self.num_classes <= len(CLASS_NAMES):
            raise ValueError(f"num_classes must be in 1..{len(CLASS_NAMES)}, got {self.num_classes}")
        if not 0 < self.size_range[0] <= self.size_range[1] <= 1:
            raise ValueError(f"size_range must satisfy 0 < lo <= hi <= 1, got {self.size_range}")
        if not 1 <= self.objects_per_image[0] <= self.objects_per_image[1]:
            raise ValueError(f"objects_per_image must satisfy 1 <= lo <= hi, got {self.objects_per_image}")


def default_root():
    """``$DEEPMAC_SYNTHETIC_ROOT``, else ``<repository root>/datasets/synthetic``."""
    return os.environ.get("DEEPMAC_SYNTHETIC_ROOT", os.path.join(_REPO_ROOT, "datasets", "synthetic"))


def categories():
    """COCO ``categories``: every class, whatever ``num_classes`` is, so ids and
    Detectron2's contiguous ids never depend on the knobs."""
    return [{"id": i + 1, "name": name, "supercategory": "shape"} for i, name in enumerate(CLASS_NAMES)]


def scene_rng(seed, split, index):
    """Each image has its own generator: an image depends only on (seed, split, index)."""
    return np.random.default_rng([seed, SPLITS.index(split), index])


def annotation(mask, category_id, image_id, ann_id):
    """A COCO annotation for one visible mask, its box and area computed from the mask."""
    ys, xs = np.nonzero(mask)
    x0, y0 = int(xs.min()), int(ys.min())
    rle = mask_util.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {
        "id": ann_id,
        "image_id": image_id,
        "category_id": category_id,
        "bbox": [x0, y0, int(xs.max()) + 1 - x0, int(ys.max()) + 1 - y0],
        "area": int(mask.sum()),
        "iscrowd": 0,
        "segmentation": {"size": list(mask.shape), "counts": rle["counts"].decode("ascii")},
    }


def generate_split(out, split, num_images, seed, cfg, progress=None):
    """Write ``<out>/<split>/*.png`` and return the split's COCO dict (not yet on disk)."""
    image_dir = os.path.join(out, split)
    os.makedirs(image_dir, exist_ok=True)
    images, annotations = [], []
    for index in range(num_images):
        pixels, instances = render_scene(scene_rng(seed, split, index), cfg)
        file_name = f"{index:06d}.png"
        Image.fromarray(pixels).save(os.path.join(image_dir, file_name))
        image_id = index + 1
        images.append({"id": image_id, "file_name": file_name, "height": cfg.image_size, "width": cfg.image_size})
        for category_id, mask in instances:
            annotations.append(annotation(mask, category_id, image_id, len(annotations) + 1))
        if progress is not None:
            progress(split, index + 1, num_images)
    return {
        "info": {"description": "deepmac-d2 synthetic shapes", "split": split},
        "images": images,
        "annotations": annotations,
        "categories": categories(),
    }


def _write_json_atomically(path, obj):
    # A temporary name of this process's own: two runs sharing a data root (two demo
    # seeds at once) rewrite train_partial.json together, and a shared name lost a race.
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, separators=(",", ":"))
    os.replace(tmp, path)


def generation_params(seed, num_train, num_val, cfg):
    """Everything the output depends on, as stored in ``params.json``."""
    return {"seed": seed, "num_train": num_train, "num_val": num_val, **dataclasses.asdict(cfg)}


def write_partial_train(out, masks_for=SEEN_CLASSES, drop_mask_fraction=0.0, seed=0):
    """Write ``<out>/annotations/train_partial.json`` from ``train.json``: every box, masks
    only for the category ids ``masks_for`` (and of those, ``drop_mask_fraction`` removed
    at random, by ``seed``). Returns the :class:`PartialSummary`; cheap, so it is simply
    rewritten on every call."""
    ann_dir = os.path.join(out, "annotations")
    with open(os.path.join(ann_dir, "train.json")) as f:
        coco = json.load(f)
    partial, summary = make_partial_annotations(coco, masks_for, drop_mask_fraction, seed)
    _write_json_atomically(os.path.join(ann_dir, PARTIAL_TRAIN_FILE), partial)
    return summary


def prepare_synthetic(
    out,
    seed=0,
    num_train=600,
    num_val=150,
    cfg=SyntheticConfig(),
    progress=None,
    partial_masks_for=None,
    partial_drop_mask_fraction=0.0,
):
    """Generate the dataset under ``out``, unless the same parameters already finished there.

    Returns True if it generated, False if it skipped. ``params.json`` is
    written last and removed first, and the annotation jsons are replaced
    atomically after their images: an interrupted run leaves no
    ``params.json`` (so it is redone) and no json for an unfinished split (so
    the loader reports it missing rather than reading a stale one).

    With ``partial_masks_for`` (category ids), ``train_partial.json`` is (re)written too,
    by :func:`write_partial_train` with ``partial_drop_mask_fraction`` and ``seed``; it is
    derived from ``train.json``, so it does not enter ``params.json`` and a finished
    dataset is not regenerated for it. Without it, nothing of the default output changes.
    """
    generated = _generate(out, seed, num_train, num_val, cfg, progress)
    if partial_masks_for is not None:
        write_partial_train(out, partial_masks_for, partial_drop_mask_fraction, seed)
    return generated


def _generate(out, seed, num_train, num_val, cfg, progress):
    params = generation_params(seed, num_train, num_val, cfg)
    params_path = os.path.join(out, PARAMS_FILE)
    ann_dir = os.path.join(out, "annotations")
    if os.path.isfile(params_path):
        with open(params_path) as f:
            # json turns tuples into lists: compare on the json form.
            if json.load(f) == json.loads(json.dumps(params)):
                return False
        os.remove(params_path)
    os.makedirs(ann_dir, exist_ok=True)
    for json_name in [f"{split}.json" for split in SPLITS] + [PARTIAL_TRAIN_FILE]:
        json_path = os.path.join(ann_dir, json_name)  # a partial json of the old images, too
        if os.path.exists(json_path):
            os.remove(json_path)
    for split in SPLITS:
        shutil.rmtree(os.path.join(out, split), ignore_errors=True)
    for split, num_images in zip(SPLITS, (num_train, num_val)):
        coco = generate_split(out, split, num_images, seed, cfg, progress)
        coco["info"]["params"] = params
        _write_json_atomically(os.path.join(ann_dir, f"{split}.json"), coco)
    _write_json_atomically(params_path, params)
    return True


def load_synthetic(json_file, image_root, name, root):
    """Detectron2's ``load_coco_json``, with a missing json explained: it is generated, not shipped."""
    if not os.path.isfile(json_file):
        flag = " --partial-masks-for seen" if os.path.basename(json_file) == PARTIAL_TRAIN_FILE else ""
        raise FileNotFoundError(
            f"dataset '{name}': {json_file} does not exist; generate it with: "
            f"python {PREPARE_SCRIPT} --out {root}{flag}"
        )
    return load_coco_json(json_file, image_root, name)


def register_synthetic(root=None, name_prefix="synthetic"):
    """Register ``<name_prefix>_train`` and ``<name_prefix>_val`` (data under ``root``,
    default :func:`default_root`) in Detectron2's catalogs, without reading anything.

    This is ``register_coco_instances`` with its loader wrapped by
    :func:`load_synthetic` (so a missing json says how to generate it), and
    with the metadata ``load_coco_json`` would only set on loading known up
    front, since the classes are fixed; plus the split:
    ``seen_class_ids`` / ``novel_class_ids`` (dataset ids, as in the json).
    Calling again re-points the names, e.g. at a harder variant of the data.
    ``<name_prefix>_train_partial`` reads ``train_partial.json`` (:func:`write_partial_train`)
    with the train images.
    """
    root = root or default_root()
    for split, json_name in [(s, f"{s}.json") for s in SPLITS] + [("train", PARTIAL_TRAIN_FILE)]:
        name = f"{name_prefix}_{os.path.splitext(json_name)[0]}"
        json_file = os.path.join(root, "annotations", json_name)
        image_root = os.path.join(root, split)
        if name in DatasetCatalog.list():
            DatasetCatalog.remove(name)
            MetadataCatalog.remove(name)
        DatasetCatalog.register(
            name, lambda j=json_file, i=image_root, n=name: load_synthetic(j, i, n, root)
        )
        MetadataCatalog.get(name).set(
            json_file=json_file,
            image_root=image_root,
            evaluator_type="coco",
            thing_classes=list(CLASS_NAMES),
            thing_dataset_id_to_contiguous_id={i + 1: i for i in range(len(CLASS_NAMES))},
            seen_class_ids=list(SEEN_CLASSES),
            novel_class_ids=list(NOVEL_CLASSES),
        )


register_synthetic()
