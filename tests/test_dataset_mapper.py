"""InstanceMaskDatasetMapper: the reference's scale jitter, and masks that went missing."""
import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_util

import deepmac_d2
from detectron2.config import get_cfg
from detectron2.structures import BoxMode
from deepmac_d2.data import InstanceMaskDatasetMapper


def cfg_with(**input_keys):
    cfg = get_cfg()
    deepmac_d2.add_deepmac_config(cfg)
    cfg.MODEL.MASK_ON = True
    cfg.INPUT.MASK_FORMAT = "bitmask"
    for k, v in input_keys.items():
        setattr(cfg.INPUT, k, v)
    return cfg


def record(tmp_path, h=50, w=100):
    path = str(tmp_path / "img.png")
    Image.fromarray(np.full((h, w, 3), 200, np.uint8)).save(path)
    mask = np.zeros((h, w), np.uint8)
    mask[10:30, 20:60] = 1
    rle = mask_util.encode(np.asfortranarray(mask))
    ann = {"bbox": [20, 10, 40, 20], "bbox_mode": BoxMode.XYWH_ABS, "category_id": 0,
           "segmentation": rle, "iscrowd": 0}
    return {"file_name": path, "height": h, "width": w, "image_id": 0, "annotations": [ann]}


@pytest.mark.parametrize("seed", range(5))
def test_scale_jitter_fits_scales_and_crops_to_the_square(tmp_path, seed):
    cfg = cfg_with(SCALE_JITTER=(0.8, 1.25), FIXED_SIZE=64, RANDOM_FLIP="none")
    np.random.seed(seed)
    out = InstanceMaskDatasetMapper(cfg, is_train=True)(record(tmp_path))
    assert out["image"].shape == (3, 64, 64)
    inst = out["instances"]
    masks = inst.gt_masks.tensor
    assert masks.shape[1:] == (64, 64)
    # Boxes come from the cropped masks: each box is its mask's tight box.
    for box, m in zip(inst.gt_boxes.tensor, masks):
        ys, xs = np.nonzero(m.numpy())
        np.testing.assert_allclose(box.numpy(), [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1])
    # Fit 100x50 into 64x64 (x0.64), times a factor in [0.8, 1.25]: the 40-px-wide mask
    # is 40 * 0.64 * f px wide, unless the crop cut it.
    width = inst.gt_boxes.tensor[0, 2] - inst.gt_boxes.tensor[0, 0]
    assert 40 * 0.64 * 0.8 - 1 <= width <= 40 * 0.64 * 1.25 + 1


def test_without_scale_jitter_it_is_detectron2s_resize(tmp_path):
    cfg = cfg_with(MIN_SIZE_TRAIN=(40,), MAX_SIZE_TRAIN=1000, RANDOM_FLIP="none")
    out = InstanceMaskDatasetMapper(cfg, is_train=True)(record(tmp_path))
    assert out["image"].shape == (3, 40, 80)


def test_annotation_without_segmentation_is_dropped(tmp_path, caplog):
    cfg = cfg_with(MIN_SIZE_TRAIN=(50,), MAX_SIZE_TRAIN=1000, RANDOM_FLIP="none")
    rec = record(tmp_path)
    empty = dict(rec["annotations"][0], segmentation=[], category_id=3)
    del empty["segmentation"]  # what load_coco_json leaves of "segmentation": []
    rec["annotations"].append(empty)
    out = InstanceMaskDatasetMapper(cfg, is_train=True)(rec)
    assert len(out["instances"]) == 1
    assert "img.png: skipped 1 annotation(s) of category [3] without a valid segmentation" in caplog.text
