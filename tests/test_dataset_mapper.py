"""InstanceMaskDatasetMapper: the reference's scale jitter on COCO's mask formats, the
same on Detectron2 v0.6 and main, and instances that have a box but no mask.

Expected masks and boxes are computed independently: the original mask rasterised by
pycocotools, then scaled, cropped and padded with numpy/PIL using the transform's
parameters; boxes are the tight boxes of those arrays.
"""
import os
from argparse import Namespace

import numpy as np
import pytest
import torch
from fvcore.transforms.transform import PadTransform
from PIL import Image
from pycocotools import mask as mask_util

import deepmac_d2
from detectron2.config import get_cfg
from detectron2.data import transforms as T
from detectron2.structures import BitMasks, BoxMode, PolygonMasks, polygons_to_bitmask
from deepmac_d2.data import InstanceMaskDatasetMapper, check_mapper_dependencies
from deepmac_d2.data import dataset_mapper as mapper_module
from deepmac_d2.engine import setup

H, W = 60, 100
# A concave polygon (an L) and a triangle in two parts' worth of image.
L_SHAPE = [20.0, 10.0, 60.0, 10.0, 60.0, 20.0, 35.0, 20.0, 35.0, 45.0, 20.0, 45.0]
TRIANGLE = [70.0, 30.0, 95.0, 55.0, 70.0, 55.0]


def cfg_with(mask_format="bitmask", **input_keys):
    cfg = get_cfg()
    deepmac_d2.add_deepmac_config(cfg)
    cfg.MODEL.MASK_ON = True
    cfg.INPUT.MASK_FORMAT = mask_format
    cfg.INPUT.RANDOM_FLIP = "none"
    for k, v in input_keys.items():
        setattr(cfg.INPUT, k, v)
    return cfg


def rle(polygons, h=H, w=W):
    return mask_util.merge(mask_util.frPyObjects(polygons, h, w))


def raster(polygons, h=H, w=W):
    return mask_util.decode(rle(polygons, h, w)).astype(bool)


def ann(segmentation, category_id=0, bbox=None, **kw):
    if bbox is None:
        polys = segmentation if isinstance(segmentation, list) else None
        bbox = mask_util.toBbox(rle(polys)).tolist() if polys else [0, 0, 10, 10]
    a = {"bbox": [float(v) for v in bbox], "bbox_mode": BoxMode.XYWH_ABS, "category_id": category_id, "iscrowd": 0, **kw}
    if segmentation is not None:
        a["segmentation"] = segmentation
    return a


def record(tmp_path, annotations, h=H, w=W):
    path = str(tmp_path / "img.png")
    Image.fromarray(np.full((h, w, 3), 200, np.uint8)).save(path)
    return {"file_name": path, "height": h, "width": w, "image_id": 0, "annotations": annotations}


def run_with_transforms(mapper, rec, seed):
    """The mapper's output and the transforms it drew (the same random draws, replayed)."""
    np.random.seed(seed)
    out = mapper(rec)
    np.random.seed(seed)
    aug_input = T.AugInput(np.zeros((rec["height"], rec["width"], 3), np.uint8))
    transforms = mapper.augmentations(aug_input)  # a T.AugmentationList
    return out, transforms


def expected_mask(source, transforms, size):
    """Scale, crop and pad an original mask with the transforms' parameters, by hand.

    ``source`` is a polygon list (scaled as coordinates, then rasterised on the crop's
    canvas, as Detectron2 treats polygons) or a bool array (resized nearest-neighbour,
    as Detectron2 treats bitmasks)."""
    resize, crop = [t for t in transforms if type(t).__name__ in ("ResizeTransform", "CropTransform")]
    sx, sy = resize.new_w / resize.w, resize.new_h / resize.h
    if isinstance(source, list):
        moved = [(np.asarray(p).reshape(-1, 2) * [sx, sy] - [crop.x0, crop.y0]).reshape(-1).tolist() for p in source]
        return flipped(raster(moved, size, size), transforms)
    scaled = np.asarray(Image.fromarray(source.astype(np.uint8)).resize((resize.new_w, resize.new_h), Image.NEAREST))
    cut = scaled[crop.y0 : crop.y0 + crop.h, crop.x0 : crop.x0 + crop.w]
    out = np.zeros((size, size), bool)
    out[: cut.shape[0], : cut.shape[1]] = cut
    return flipped(out, transforms)


def flipped(mask, transforms):
    """The mask mirrored if the transforms end with a horizontal flip (of the padded square)."""
    return mask[:, ::-1] if any(type(t).__name__ == "HFlipTransform" for t in transforms) else mask


def tight_box(mask):
    ys, xs = np.nonzero(mask)
    return np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], np.float32)


def output_masks(instances, size):
    masks = instances.gt_masks
    if isinstance(masks, PolygonMasks):
        return np.stack([polygons_to_bitmask(p, size, size) for p in masks.polygons])
    return masks.tensor.numpy().astype(bool)


class MainFixedSizeCrop(T.FixedSizeCrop):
    """Detectron2 main's FixedSizeCrop, as read in its source: a ``seg_pad_value``
    argument, default 255, handed to the PadTransform (v0.6 has no such argument)."""

    def __init__(self, crop_size, pad=True, pad_value=128.0, seg_pad_value=255):
        super().__init__(crop_size, pad, pad_value)
        self.seg_pad_value = seg_pad_value

    def _get_pad(self, image):
        pad = super()._get_pad(image)
        return PadTransform(pad.x0, pad.y0, pad.x1, pad.y1, pad.orig_w, pad.orig_h, pad.pad_value, self.seg_pad_value)


@pytest.fixture(params=["v0.6", "main"])
def detectron2_version(request, monkeypatch):
    if request.param == "main":
        monkeypatch.setattr(T, "FixedSizeCrop", MainFixedSizeCrop)
    return request.param


def test_main_fixed_size_crop_stand_in_pads_masks_with_255():
    """The stand-in is faithful to main: without the mapper's fix, a padded border is 255."""
    crop = MainFixedSizeCrop((8, 8)).get_transform(np.zeros((4, 8, 3), np.uint8))
    assert crop.apply_segmentation(np.zeros((4, 8), np.uint8))[4:].min() == 255
    fixed = mapper_module.fixed_size_crop(8)
    assert fixed.get_transform(np.zeros((4, 8, 3), np.uint8)).apply_segmentation(np.zeros((4, 8), np.uint8)).max() == 0


POLYGONS = ([L_SHAPE], [TRIANGLE, [5.0, 50.0, 15.0, 50.0, 10.0, 58.0]])  # the second in two parts
MASK_SOURCES = {"polygons": POLYGONS, "rle": tuple(rle(p) for p in POLYGONS)}  # as the json stores them


@pytest.mark.parametrize("mask_format", ["polygon", "bitmask"])
@pytest.mark.parametrize("source", ["polygons", "rle"])
@pytest.mark.parametrize("seed", range(4))
def test_scale_jitter_masks_and_boxes_match_an_independent_crop(tmp_path, detectron2_version, mask_format, source, seed):
    if mask_format == "polygon" and source == "rle":
        pytest.skip("Detectron2 cannot hold an RLE mask as a polygon (its own error)")
    size = 64
    # Jitter 0.5..1.6 of a 100x60 image fit into 64: some seeds pad, some crop.
    cfg = cfg_with(mask_format, SCALE_JITTER=(0.5, 1.6), FIXED_SIZE=size)
    mapper = InstanceMaskDatasetMapper(cfg, is_train=True)
    segs = MASK_SOURCES[source]
    annos = [ann(s, category_id=i, bbox=mask_util.toBbox(rle(p)).tolist())
             for i, (s, p) in enumerate(zip(segs, POLYGONS))]
    annos.append(ann(rle([[40.0, 40.0, 60.0, 40.0, 50.0, 55.0]]), iscrowd=1))  # crowd: dropped, as Detectron2 does
    out, transforms = run_with_transforms(mapper, record(tmp_path, annos), seed)
    inst = out["instances"]
    assert out["image"].shape == (3, size, size)
    assert inst.gt_has_mask.all()
    originals = [p if source == "polygons" else raster(p) for p in POLYGONS]
    expected = [expected_mask(o, transforms, size) for o in originals]
    expected_classes = [i for i, m in enumerate(expected) if m.any()]
    assert inst.gt_classes.tolist() == expected_classes
    got = output_masks(inst, size)
    for mask, box, cls in zip(got, inst.gt_boxes.tensor.numpy(), expected_classes):
        want = expected[cls]
        if mask_format == "bitmask" and source == "rle":
            np.testing.assert_array_equal(mask, want)  # the same nearest resize, crop, 0-pad
        else:  # shapely clipped the polygon before rasterising: edges may move by a pixel
            assert (mask & want).sum() / (mask | want).sum() > 0.9
        np.testing.assert_allclose(box, tight_box(want), atol=1.0)
    # Nothing of any mask, and no box, reaches into the padding.
    pad = [t for t in transforms if isinstance(t, PadTransform)][0]
    if pad.x1 or pad.y1:
        assert not got[:, size - pad.y1 :, :].any() and not got[:, :, size - pad.x1 :].any()
        assert (inst.gt_boxes.tensor[:, 2] <= size - pad.x1 + 1e-4).all()
        assert (inst.gt_boxes.tensor[:, 3] <= size - pad.y1 + 1e-4).all()


def test_polygons_with_scale_jitter_need_shapely_named_at_setup(monkeypatch):
    real_find_spec = mapper_module.importlib.util.find_spec
    monkeypatch.setattr(mapper_module.importlib.util, "find_spec",
                        lambda name, *a: None if name == "shapely" else real_find_spec(name, *a))
    cfg = cfg_with("polygon", SCALE_JITTER=(0.8, 1.25))
    with pytest.raises(ImportError, match=r"shapely.*pip install shapely.*INPUT.MASK_FORMAT bitmask"):
        check_mapper_dependencies(cfg)
    with pytest.raises(ImportError, match="shapely"):
        InstanceMaskDatasetMapper(cfg, is_train=True)
    check_mapper_dependencies(cfg_with("bitmask", SCALE_JITTER=(0.8, 1.25)))  # bitmasks: no shapely
    check_mapper_dependencies(cfg_with("polygon"))  # no crop: no shapely


def test_train_net_setup_names_missing_shapely_before_building_anything(monkeypatch, tmp_path):
    """What `train_net.py --config-file configs/voc_r50_hg52.yaml` says without shapely."""
    real_find_spec = mapper_module.importlib.util.find_spec
    monkeypatch.setattr(mapper_module.importlib.util, "find_spec",
                        lambda name, *a: None if name == "shapely" else real_find_spec(name, *a))
    config = os.path.join(os.path.dirname(os.path.dirname(__file__)), "configs", "voc_r50_hg52.yaml")
    args = Namespace(config_file=config, opts=["OUTPUT_DIR", str(tmp_path / "out")], accelerator="cpu")
    with pytest.raises(ImportError, match="pip install shapely"):
        setup(args)
    assert not os.path.exists(tmp_path / "out")  # stopped before Detectron2's set-up wrote anything


def test_without_scale_jitter_it_is_detectron2s_resize(tmp_path):
    cfg = cfg_with(MIN_SIZE_TRAIN=(30,), MAX_SIZE_TRAIN=1000)
    out = InstanceMaskDatasetMapper(cfg, is_train=True)(record(tmp_path, [ann(rle([L_SHAPE]), bbox=[20.0, 10.0, 40.0, 35.0])]))
    assert out["image"].shape == (3, 30, 50)
    np.testing.assert_allclose(out["instances"].gt_boxes.tensor.numpy(), [[10, 5, 30, 22.5]])


# --- Boxes for every instance, masks for some -------------------------------------------

BOX_ONLY_FORMS = {
    "no key": None,
    "empty list": [],
    "degenerate polygons": [[10.0, 10.0, 20.0, 20.0]],  # two points: no area
}


@pytest.mark.parametrize("mask_format", ["polygon", "bitmask"])
@pytest.mark.parametrize("form", sorted(BOX_ONLY_FORMS))
def test_box_only_instance_is_kept_first_in_the_image(tmp_path, mask_format, form):
    """Detectron2's #1656: a first annotation without a mask took every mask of the image
    away; here it is a box-only instance and the others keep their masks."""
    cfg = cfg_with(mask_format, MIN_SIZE_TRAIN=(60,), MAX_SIZE_TRAIN=1000)
    box_only = ann(BOX_ONLY_FORMS[form], category_id=5, bbox=[5, 5, 30, 20])
    out = InstanceMaskDatasetMapper(cfg, is_train=True)(record(tmp_path, [box_only, ann([L_SHAPE], category_id=1)]))
    inst = out["instances"]
    assert inst.gt_classes.tolist() == [5, 1]
    assert inst.gt_has_mask.tolist() == [False, True]
    masks = output_masks(inst, 60)[:, :60, :100] if mask_format == "bitmask" else np.stack(
        [polygons_to_bitmask(p, H, W) for p in inst.gt_masks.polygons])
    assert not masks[0].any()
    np.testing.assert_array_equal(masks[1], raster([L_SHAPE]))
    np.testing.assert_allclose(inst.gt_boxes.tensor[0].numpy(), [5, 5, 35, 25])


@pytest.mark.parametrize("seed", range(4))
def test_mixed_polygon_rle_and_box_only_through_the_crop(tmp_path, detectron2_version, seed):
    """Polygon and RLE masks in one image (bitmask format), with box-only instances: the
    box-only box is transformed as a box (scaled, shifted, clipped to the crop, flipped)."""
    size = 48
    cfg = cfg_with("bitmask", SCALE_JITTER=(1.2, 1.6), FIXED_SIZE=size, RANDOM_FLIP="horizontal")
    mapper = InstanceMaskDatasetMapper(cfg, is_train=True)
    box = [10.0, 30.0, 80.0, 25.0]  # XYWH
    annos = [ann(None, category_id=7, bbox=box), ann([L_SHAPE], category_id=1),
             ann(rle([TRIANGLE]), category_id=2, bbox=mask_util.toBbox(rle([TRIANGLE])).tolist())]
    out, transforms = run_with_transforms(mapper, record(tmp_path, annos), seed)
    inst = out["instances"]
    by_class = {c: i for i, c in enumerate(inst.gt_classes.tolist())}
    resize, crop = [t for t in transforms if type(t).__name__ in ("ResizeTransform", "CropTransform")]
    sx, sy = resize.new_w / resize.w, resize.new_h / resize.h
    x0, y0, w, h = box
    want = np.array([x0 * sx - crop.x0, y0 * sy - crop.y0, (x0 + w) * sx - crop.x0, (y0 + h) * sy - crop.y0])
    want = np.clip(want, 0, [crop.w, crop.h, crop.w, crop.h])
    if any(type(t).__name__ == "HFlipTransform" for t in transforms):
        want = np.array([size - want[2], want[1], size - want[0], want[3]])
    if (want[2] - want[0]) > 0 and (want[3] - want[1]) > 0:
        i = by_class[7]
        assert not inst.gt_has_mask[i] and not inst.gt_masks.tensor[i].any()
        np.testing.assert_allclose(inst.gt_boxes.tensor[i].numpy(), want, atol=1e-3)
    else:
        assert 7 not in by_class
    for cls, source in ((1, [L_SHAPE]), (2, raster([TRIANGLE]))):
        want_mask = expected_mask(source, transforms, size)
        if not want_mask.any():
            assert cls not in by_class
            continue
        i = by_class[cls]
        assert inst.gt_has_mask[i]
        np.testing.assert_allclose(inst.gt_boxes.tensor[i].numpy(), tight_box(want_mask), atol=1.0)


def test_image_with_only_box_only_instances(tmp_path):
    cfg = cfg_with("bitmask", SCALE_JITTER=(1.0, 1.0), FIXED_SIZE=100)
    annos = [ann(None, category_id=3, bbox=[10, 10, 20, 20]), ann([], category_id=4, bbox=[50, 5, 30, 40])]
    inst = InstanceMaskDatasetMapper(cfg, is_train=True)(record(tmp_path, annos))["instances"]
    assert inst.gt_has_mask.tolist() == [False, False]
    assert isinstance(inst.gt_masks, BitMasks) and inst.gt_masks.tensor.shape == (2, 100, 100)
    assert not inst.gt_masks.tensor.any()
    np.testing.assert_allclose(inst.gt_boxes.tensor.numpy(), [[10, 10, 30, 30], [50, 5, 80, 45]])


def test_masks_off_keeps_every_box(tmp_path):
    cfg = cfg_with("bitmask", MIN_SIZE_TRAIN=(60,), MAX_SIZE_TRAIN=1000)
    cfg.MODEL.MASK_ON = False
    inst = InstanceMaskDatasetMapper(cfg, is_train=True)(
        record(tmp_path, [ann(None, bbox=[5, 5, 10, 10]), ann([L_SHAPE])]))["instances"]
    assert len(inst) == 2 and not inst.has("gt_masks") and not inst.has("gt_has_mask")


def test_instance_without_box_or_mask_is_dropped(tmp_path):
    cfg = cfg_with("bitmask", MIN_SIZE_TRAIN=(60,), MAX_SIZE_TRAIN=1000)
    inst = InstanceMaskDatasetMapper(cfg, is_train=True)(
        record(tmp_path, [ann(None, bbox=[5, 5, 0, 10]), ann([L_SHAPE], category_id=2)]))["instances"]
    assert inst.gt_classes.tolist() == [2]
    assert torch.equal(inst.gt_has_mask, torch.tensor([True]))
