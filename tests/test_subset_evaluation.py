"""Subset AP equals pycocotools' COCOeval with params.catIds set to the subset.

A small COCO dataset is written by hand (non-contiguous category ids, a crowd region,
a category without ground truth, diamond-shaped objects of all three COCO area ranges)
with fixed predictions. The evaluator's numbers go through Detectron2's COCOEvaluator pipeline;
the expected ones are computed here from the same predictions with pycocotools alone.
"""
import contextlib
import io
import json
import math

import numpy as np
import pycocotools.mask as mask_util
import pytest
import torch
from detectron2.config import get_cfg
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import register_coco_instances
from detectron2.evaluation import print_csv_format
from detectron2.evaluation.testing import flatten_results_dict
from detectron2.structures import Boxes, Instances
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from deepmac_d2 import add_deepmac_config
from deepmac_d2.data.class_splits import parse_class_subset
from deepmac_d2.evaluation import SubsetCOCOEvaluator, build_subset_evaluator

SIZE = 160
CATEGORIES = {1: "cat_a", 3: "cat_b", 5: "cat_c", 8: "cat_no_gt"}
SUBSETS = ["seen:1,3", "novel:5,8", "only_no_gt:8", "all_listed:1,3,5,8"]
METRICS = ["AP", "AP50", "AP75", "APs", "APm", "APl"]


def rect_mask(x0, y0, w, h):
    m = np.zeros((SIZE, SIZE), dtype=np.uint8)
    m[y0 : y0 + h, x0 : x0 + w] = 1
    return m


def diamond(x0, y0, side):
    """The polygon of the diamond inscribed in a square box: mask IoU differs from box IoU."""
    h = side / 2
    return [x0 + h, y0, x0 + side, y0 + h, x0 + h, y0 + side, x0, y0 + h]


def diamond_mask(x0, y0, w, h):
    rles = mask_util.frPyObjects([diamond(x0, y0, w)], SIZE, SIZE)
    return mask_util.decode(mask_util.merge(rles))


def make_scene(rng):
    """Ground truth (4 images) and predictions as (image id, class id, x0, y0, w, h, score)."""
    images, annotations, predictions = [], [], []
    for image_id in range(1, 5):
        images.append(
            {"id": image_id, "file_name": f"{image_id}.jpg", "width": SIZE, "height": SIZE}
        )
        # Diamonds of area 72, 1800, 9800 (small, medium, large), each class in every size.
        for k, side in enumerate((12, 60, 140)):
            cat = (1, 3, 5)[(image_id + k) % 3]
            x0, y0 = (int(v) for v in rng.integers(0, SIZE - side, size=2))
            annotations.append(
                {
                    "image_id": image_id,
                    "category_id": cat,
                    "bbox": [x0, y0, side, side],
                    "area": side * side / 2,
                    "iscrowd": 0,
                    "segmentation": [diamond(x0, y0, side)],
                }
            )
            # A detection with a random shift (IoU from ~0.4 to 1), sometimes of the wrong class.
            dx, dy = (int(v) for v in rng.integers(-side // 4, side // 4 + 1, size=2))
            det_cat = cat if rng.random() < 0.8 else int(rng.choice([1, 3, 5, 8]))
            px, py = min(max(x0 + dx, 0), SIZE - side), min(max(y0 + dy, 0), SIZE - side)
            predictions.append((image_id, det_cat, px, py, side, side, float(rng.random())))
        # False positives, one of them of the category that has no ground truth.
        for cat in (int(rng.choice([1, 3, 5])), 8):
            x0, y0 = (int(v) for v in rng.integers(0, SIZE - 30, size=2))
            predictions.append((image_id, cat, x0, y0, 30, 30, float(rng.random())))
    # A crowd region of class 1 in image 1, and a detection inside it (ignored, not a FP).
    crowd = mask_util.encode(np.asfortranarray(rect_mask(0, 100, 60, 60)))
    crowd["counts"] = crowd["counts"].decode()
    annotations.append(
        {
            "image_id": 1,
            "category_id": 1,
            "bbox": [0, 100, 60, 60],
            "area": 3600,
            "iscrowd": 1,
            "segmentation": crowd,
        }
    )
    predictions.append((1, 1, 5, 105, 40, 40, 0.95))
    for i, a in enumerate(annotations, 1):
        a["id"] = i
    categories = [{"id": i, "name": n} for i, n in CATEGORIES.items()]
    return {"images": images, "annotations": annotations, "categories": categories}, predictions


@pytest.fixture(scope="module")
def scene(tmp_path_factory):
    gt, predictions = make_scene(np.random.default_rng(0))
    json_file = tmp_path_factory.mktemp("coco") / "instances.json"
    json_file.write_text(json.dumps(gt))
    name = "deepmac_test_subset_eval"
    if name not in DatasetCatalog.list():
        register_coco_instances(name, {}, str(json_file), str(json_file.parent))
    DatasetCatalog.get(name)  # records thing_dataset_id_to_contiguous_id, as the test loader would
    return name, str(json_file), predictions


def run_evaluator(evaluator, name, predictions):
    """Feed the predictions to the evaluator the way Detectron2's inference loop does."""
    id_map = MetadataCatalog.get(name).thing_dataset_id_to_contiguous_id
    evaluator.reset()
    for image_id in sorted({p[0] for p in predictions}):
        dets = [p for p in predictions if p[0] == image_id]
        inst = Instances((SIZE, SIZE))
        boxes = [[x, y, x + w, y + h] for _, _, x, y, w, h, _ in dets]
        inst.pred_boxes = Boxes(torch.tensor(boxes, dtype=torch.float32))
        inst.scores = torch.tensor([d[6] for d in dets])
        inst.pred_classes = torch.tensor([id_map[d[1]] for d in dets])
        inst.pred_masks = torch.from_numpy(np.stack([diamond_mask(*d[2:6]) for d in dets])).bool()
        evaluator.process([{"image_id": image_id}], [{"instances": inst}])
    return evaluator.evaluate()


def pycocotools_stats(json_file, predictions, iou_type, cat_ids):
    """COCOeval's summary AP metrics (in %, -1 -> NaN) with params.catIds = cat_ids."""
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(json_file)
        results = []
        for image_id, cat, x, y, w, h, score in predictions:
            r = {"image_id": image_id, "category_id": cat, "score": score}
            if iou_type == "bbox":
                r["bbox"] = [x, y, w, h]
            else:  # mask AP: no "bbox", so that areas are mask areas
                rle = mask_util.encode(np.asfortranarray(diamond_mask(x, y, w, h)))
                r["segmentation"] = rle
            results.append(r)
        coco_eval = COCOeval(gt, gt.loadRes(results), iou_type)
        coco_eval.params.catIds = cat_ids
        coco_eval.evaluate()
        coco_eval.accumulate()
        coco_eval.summarize()
    return {m: (s * 100 if s >= 0 else math.nan) for m, s in zip(METRICS, coco_eval.stats[:6])}


def assert_metrics_equal(actual, expected):
    for m in METRICS:
        if math.isnan(expected[m]):
            assert math.isnan(actual[m]), m
        else:
            assert actual[m] == pytest.approx(expected[m], rel=1e-9, abs=1e-9), m


@pytest.fixture(scope="module")
def results(scene, tmp_path_factory):
    name, _, predictions = scene
    cfg = get_cfg()
    add_deepmac_config(cfg)
    cfg.DATASETS.EVAL_CLASS_SUBSETS = SUBSETS
    out = str(tmp_path_factory.mktemp("eval"))
    evaluator = build_subset_evaluator(cfg, name, out, distributed=False, use_fast_impl=False)
    return run_evaluator(evaluator, name, predictions)


@pytest.mark.parametrize("iou_type", ["bbox", "segm"])
@pytest.mark.parametrize("subset", SUBSETS)
def test_subset_equals_cocoeval_with_cat_ids(scene, results, iou_type, subset):
    _, json_file, predictions = scene
    name, ids = parse_class_subset(subset)
    expected = pycocotools_stats(json_file, predictions, iou_type, ids)
    assert_metrics_equal(results[f"{iou_type}/{name}"], expected)


@pytest.mark.parametrize("iou_type", ["bbox", "segm"])
def test_scene_is_not_degenerate(scene, results, iou_type):
    """The subsets differ from each other and from all classes; values are not 0/100."""
    aps = [results[iou_type]["AP"]] + [results[f"{iou_type}/{s}"]["AP"] for s in ("seen", "novel")]
    assert len(set(aps)) == 3 and all(0 < ap < 100 for ap in aps)
    assert math.isnan(results[f"{iou_type}/only_no_gt"]["AP"])
    # Every subset metric is defined where the all-class one is, except for missing GT.
    assert all(not math.isnan(results[f"{iou_type}/seen"][m]) for m in METRICS)


def test_results_format(results):
    assert list(results) == [
        "bbox", *(f"bbox/{parse_class_subset(s)[0]}" for s in SUBSETS),
        "segm", *(f"segm/{parse_class_subset(s)[0]}" for s in SUBSETS),
    ]
    flat = flatten_results_dict(results)
    assert "segm/novel/AP" in flat and "segm/AP-cat_b" in flat
    assert all(isinstance(v, float) for v in flat.values())
    print_csv_format(results)  # what train_net.py prints; must accept the subset keys


def test_unknown_ids_and_bad_specs_are_clear_errors(scene):
    name = scene[0]
    with pytest.raises(ValueError, match=r"'voc'.*\[2, 4, 6, 7, .*dataset.*\[1, 3, 5, 8\]"):
        voc = dict([parse_class_subset("voc")])
        SubsetCOCOEvaluator(name, class_subsets=voc, distributed=False)
    with pytest.raises(ValueError, match=r"'odd'.*\[7\]"):
        SubsetCOCOEvaluator(name, class_subsets={"odd": [1, 7]}, distributed=False)
    with pytest.raises(ValueError, match="Unknown class split preset"):
        parse_class_subset("vocc")
    with pytest.raises(ValueError, match="lists no category ids"):
        parse_class_subset("empty:")
    cfg = get_cfg()
    add_deepmac_config(cfg)
    cfg.DATASETS.EVAL_CLASS_SUBSETS = ["a:1", "a:3"]
    with pytest.raises(ValueError, match="twice"):
        build_subset_evaluator(cfg, name, distributed=False)


def test_presets_are_the_coco_splits():
    from detectron2.data.datasets.builtin_meta import COCO_CATEGORIES

    coco_ids = {c["id"] for c in COCO_CATEGORIES if c["isthing"]}
    voc, nonvoc = parse_class_subset("voc")[1], parse_class_subset("nonvoc")[1]
    assert len(voc) == 20 and len(nonvoc) == 60
    assert set(voc) | set(nonvoc) == coco_ids and not set(voc) & set(nonvoc)
    assert parse_class_subset("seen: 3, 1,voc")[1] == sorted(set(voc) | {3})
