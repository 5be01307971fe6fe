"""Own data without code: docs/own_data.md's recipe run as written, and the errors for bad input.

The recipe's data is a COCO-format json written here: three classes with ids that are not
contiguous (dog 3, cat 7, bird 12), polygon masks, images of a few sizes.
"""
import json
import os
import re
import shlex
import subprocess
import sys
from argparse import Namespace

import numpy as np
import pytest
from coco_fixture import instance, polygons_box
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import load_coco_json
from PIL import Image, ImageDraw
from pycocotools import mask as mask_util
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

import deepmac_d2  # noqa: F401
from deepmac_d2.data.class_names import resolve_class_names
from deepmac_d2.data.coco_files import register_coco_files
from deepmac_d2.engine import load_config, setup

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOC = os.path.join(ROOT, "docs", "own_data.md")
DEMO_CONFIG = os.path.join(ROOT, "configs", "demo_synthetic_hg20.yaml")
CATEGORIES = [{"id": 3, "name": "dog"}, {"id": 7, "name": "cat"}, {"id": 12, "name": "bird"}]
SIZES = {"train": [(64, 80), (80, 64), (72, 72), (64, 96), (96, 72), (64, 64)], "val": [(72, 88), (80, 80), (64, 72)]}
# The recipe's configs/voc_r50_hg52.yaml shrunk to train on the CPU in seconds without a
# download: an R18 from scratch (BatchNorm that trains), small heads, 64-pixel images, 3
# iterations; every detection kept, so that the barely trained model has some to evaluate.
SHRINK = [
    "MODEL.WEIGHTS", "", "MODEL.RESNETS.DEPTH", "18", "MODEL.RESNETS.RES2_OUT_CHANNELS", "64",
    "MODEL.RESNETS.NORM", "BN", "MODEL.RESNETS.STRIDE_IN_1X1", "False", "MODEL.BACKBONE.FREEZE_AT", "0",
    "MODEL.FPN.OUT_CHANNELS", "32", "MODEL.ROI_BOX_HEAD.FC_DIM", "64", "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE", "32",
    "MODEL.RPN.POST_NMS_TOPK_TRAIN", "64", "MODEL.RPN.POST_NMS_TOPK_TEST", "64",
    "MODEL.ROI_MASK_HEAD.CONVNET_VARIANT", "hourglass10", "MODEL.ROI_MASK_HEAD.CONV_DIM", "8",
    "MODEL.ROI_MASK_HEAD.POOLER_RESOLUTION", "8", "MODEL.ROI_HEADS.SCORE_THRESH_TEST", "0.0",
    "INPUT.SCALE_JITTER", "()", "INPUT.MIN_SIZE_TRAIN", "(64,)", "INPUT.MAX_SIZE_TRAIN", "96",
    "INPUT.MIN_SIZE_TEST", "64", "INPUT.MAX_SIZE_TEST", "96",
    "SOLVER.IMS_PER_BATCH", "2", "SOLVER.BASE_LR", "0.01", "SOLVER.MAX_ITER", "3", "SOLVER.WARMUP_ITERS", "1",
    "SOLVER.STEPS", "()", "DATALOADER.NUM_WORKERS", "0",
]


def write_split(root, split, seed=0):
    """``root/my_data/<split>.json`` with images in ``root/my_data/images``; returns the json path."""
    rng = np.random.default_rng([seed, len(split)])
    image_dir = os.path.join(root, "my_data", "images")
    os.makedirs(image_dir, exist_ok=True)
    images, annotations = [], []
    for index, (h, w) in enumerate(SIZES[split]):
        image_id = 100 * (split == "val") + index + 1
        file_name = f"{split}_{index}.jpg"
        canvas = Image.fromarray(rng.integers(0, 90, (h, w, 3), dtype=np.uint8))
        draw = ImageDraw.Draw(canvas)
        for category in CATEGORIES:  # one of each class per image: each subset has ground truth
            polygons = instance(rng, h, w)
            for p in polygons:
                draw.polygon(p, fill=(200 - 60 * (category["id"] % 3), 80 + 10 * category["id"], 160))
            rles = mask_util.frPyObjects(polygons, h, w)
            annotations.append({
                "id": len(annotations) + 1, "image_id": image_id, "category_id": category["id"],
                "segmentation": polygons, "iscrowd": 0, "bbox": polygons_box(polygons),
                "area": float(mask_util.area(mask_util.merge(rles))),
            })
        canvas.save(os.path.join(image_dir, file_name), quality=95)
        images.append({"id": image_id, "file_name": file_name, "height": h, "width": w})
    path = os.path.join(root, "my_data", f"{split}.json")
    with open(path, "w") as f:
        json.dump({"images": images, "annotations": annotations, "categories": CATEGORIES}, f)
    return path


def recipe_commands():
    """The shell commands of the doc's fenced block marked as the recipe, one per line."""
    text = open(DOC).read()
    block = re.search(r"<!-- recipe: run by tests/test_own_data.py -->\n```bash\n(.*?)```", text, re.S).group(1)
    lines = block.replace("\\\n", " ").splitlines()
    return [line.strip() for line in lines if line.strip() and not line.strip().startswith("#")]


def copypaste_results(log, task):
    """Detectron2's print_csv_format lines for ``task``: {metric: value}."""
    m = re.search(rf"copypaste: Task: {re.escape(task)}\n.*copypaste: (.*)\n.*copypaste: (.*)\n", log)
    assert m, f"no results for {task} in the log"
    return {k: float(v) for k, v in zip(m.group(1).split(","), m.group(2).split(","))}


@pytest.mark.slow
def test_own_data_recipe_runs_as_written(tmp_path):
    for split in ("train", "val"):
        write_split(str(tmp_path), split)
    # The commands name train_net.py, tools/ and configs/ relative to the repository.
    for name in ("train_net.py", "tools", "configs"):
        os.symlink(os.path.join(ROOT, name), tmp_path / name)
    commands = recipe_commands()
    assert len(commands) == 3 and "make_partial_annotations.py" in commands[0]
    commands[1] += " " + shlex.join(SHRINK)  # the training command; the others read its config
    env = dict(os.environ, PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"],
               OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    logs = []
    for command in commands:
        res = subprocess.run(["bash", "-c", command], cwd=tmp_path, env=env, capture_output=True,
                             text=True, timeout=400)
        logs.append(res.stdout + res.stderr)
        assert res.returncode == 0, f"{command}\n{logs[-1][-4000:]}"

    # 1. The partial json: bird (12) lost its masks, dog and cat kept theirs, every box kept.
    partial = json.load(open(tmp_path / "my_data" / "train_partial.json"))
    full = json.load(open(tmp_path / "my_data" / "train.json"))
    assert len(partial["annotations"]) == len(full["annotations"])
    for a in partial["annotations"]:
        assert ("segmentation" in a) == (a["category_id"] != 12), a
    # 2. The subsets by name became the json's ids in the saved config.
    out = tmp_path / "output" / "my_data"
    saved = load_config(Namespace(config_file=str(out / "config.yaml"), opts=[]))
    assert list(saved.DATASETS.EVAL_CLASS_SUBSETS) == ["seen:7,3", "novel:12"]  # cat, dog
    assert len(saved.DATASETS.COCO_FILES) == 2
    # 3. The evaluation's subset AP is pycocotools' own, restricted to the subset's ids, on
    # the results Detectron2 wrote: the metadata mapped classes back to the json's ids.
    results = json.load(open(out / "inference" / "my_val" / "coco_instances_results.json"))
    assert results and {r["category_id"] for r in results} <= {3, 7, 12}
    gt = COCO(str(tmp_path / "my_data" / "val.json"))
    for task, cat_ids in (("segm/seen", [3, 7]), ("segm/novel", [12]), ("segm", [3, 7, 12])):
        coco_eval = COCOeval(gt, gt.loadRes(results), "segm")
        coco_eval.params.catIds = cat_ids
        coco_eval.evaluate()
        coco_eval.accumulate()
        coco_eval.summarize()
        ours = copypaste_results(logs[2], task)
        assert ours["AP"] == pytest.approx(100 * max(coco_eval.stats[0], 0), abs=1e-4), task
        assert ours["AP50"] == pytest.approx(100 * max(coco_eval.stats[1], 0), abs=1e-4), task


# --- errors and the pieces, in this process -------------------------------------------------


@pytest.fixture
def own_json(tmp_path):
    """A registered-nowhere val json; the datasets a test registers are removed after it."""
    before = set(DatasetCatalog.list())
    yield write_split(str(tmp_path), "val")
    for name in set(DatasetCatalog.list()) - before:
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)


def own_args(dataset, *opts, name="own_val"):
    return Namespace(
        config_file=DEMO_CONFIG, dataset=dataset, eval_only=False, accelerator=None,
        opts=["DATASETS.TRAIN", f'("{name}",)', "DATASETS.TEST", f'("{name}",)', "MODEL.ROI_HEADS.NUM_CLASSES", "3",
              "MODEL.ROI_MASK_HEAD.ALLOWED_CLASS_IDS", "[]", "DATASETS.EVAL_CLASS_SUBSETS", "[]", *opts],
    )


def test_registration_sets_detectron2s_metadata_and_names_become_ids(own_json):
    image_dir = os.path.join(os.path.dirname(own_json), "images")
    cfg = load_config(own_args(
        [f"own_val={own_json}:{image_dir}"], "MODEL.ROI_MASK_HEAD.ALLOWED_CLASS_IDS", '["cat", "bird"]',
        "DATASETS.EVAL_CLASS_SUBSETS", '["seen:cat,dog", "mix:bird,3", "nonvoc"]',
    ))
    assert register_coco_files(cfg) == ["own_val"]
    assert register_coco_files(cfg) == ["own_val"]  # setup twice in a process: same files, accepted
    meta = MetadataCatalog.get("own_val")
    assert (meta.json_file, meta.image_root, meta.evaluator_type) == (own_json, image_dir, "coco")
    # What Detectron2's load_coco_json sets once it reads the json (an independent reading).
    load_coco_json(own_json, image_dir, "reference_val")
    reference = MetadataCatalog.get("reference_val")
    assert meta.thing_classes == reference.thing_classes == ["dog", "cat", "bird"]
    assert meta.thing_dataset_id_to_contiguous_id == reference.thing_dataset_id_to_contiguous_id == {3: 0, 7: 1, 12: 2}
    MetadataCatalog.remove("reference_val")
    records = DatasetCatalog.get("own_val")  # loads; Detectron2 would refuse metadata that differs
    assert {a["category_id"] for r in records for a in r["annotations"]} == {0, 1, 2}

    resolve_class_names(cfg)
    assert list(cfg.MODEL.ROI_MASK_HEAD.ALLOWED_CLASS_IDS) == [7, 12]
    assert list(cfg.DATASETS.EVAL_CLASS_SUBSETS) == ["seen:7,3", "mix:12,3", "nonvoc"]


def test_a_class_subset_naming_a_class_the_json_lacks(own_json):
    spec = [f"own_val={own_json}:{os.path.dirname(own_json)}/images"]
    with pytest.raises(ValueError) as err:
        setup(own_args(spec, "DATASETS.EVAL_CLASS_SUBSETS", '["seen:cat,dgo"]'))
    message = str(err.value)
    for part in ("DATASETS.EVAL_CLASS_SUBSETS entry 'seen:cat,dgo'", "'own_val'", own_json,
                 "no class 'dgo'", "['bird', 'cat', 'dog']", "Did you mean 'dog'?"):
        assert part in message, (part, message)
    with pytest.raises(ValueError, match=r"ALLOWED_CLASS_IDS: dataset 'own_val' .* has no class 'horse'"):
        setup(own_args(spec, "MODEL.ROI_MASK_HEAD.ALLOWED_CLASS_IDS", '["cat", "horse"]'))


def _bad_inputs(tmp_path, own_json):
    images = os.path.join(os.path.dirname(own_json), "images")
    (tmp_path / "broken.json").write_text('{"images": [')
    (tmp_path / "list.json").write_text("[1, 2]")
    (tmp_path / "no_categories.json").write_text('{"images": [], "annotations": []}')
    (tmp_path / "bad_category.json").write_text('{"images": [], "annotations": [], "categories": [{"id": 1}]}')
    missing = str(tmp_path / "missing.json")
    return [
        # (the --dataset entry, the error, what its message must name)
        (f"a={missing}:{images}", FileNotFoundError, [missing, "does not exist", "--dataset"]),
        (f"a={own_json}:{tmp_path}/no_images", FileNotFoundError, [f"{tmp_path}/no_images", "image folder"]),
        (f"a={tmp_path}/broken.json:{images}", ValueError, [f"{tmp_path}/broken.json", "not a JSON file"]),
        (f"a={tmp_path}/list.json:{images}", ValueError, ["list.json is not a COCO instances json"]),
        (f"a={tmp_path}/no_categories.json:{images}", ValueError, ["no_categories.json", "it has no categories"]),
        (f"a={tmp_path}/bad_category.json:{images}", ValueError, ["bad_category.json", "{'id': 1}"]),
        (f"coco_2017_train={own_json}:{images}", ValueError,
         ["'coco_2017_train' is already registered", "another NAME"]),
        (f"{own_json}:{images}", ValueError, ["is not NAME=JSON:IMAGE_DIR"]),
    ]


def test_bad_dataset_entries_get_errors_naming_the_file_or_key(tmp_path, own_json):
    for entry, error, parts in _bad_inputs(tmp_path, own_json):
        with pytest.raises(error) as err:
            setup(own_args([entry], name="a"))
        for part in parts + [repr(entry)]:
            assert part in str(err.value), (entry, part, str(err.value))
    # The same name given twice with other files, and a class count that is not the json's.
    images = os.path.join(os.path.dirname(own_json), "images")
    twice = [f"own_val={own_json}:{images}", f"own_val={tmp_path}/other.json:{images}"]
    with pytest.raises(ValueError, match="'own_val' is given twice in DATASETS.COCO_FILES, with other files"):
        setup(own_args(twice))
    with pytest.raises(ValueError, match=r"NUM_CLASSES is 14, but dataset 'own_val' .* has 3 categories: "
                                         r"set MODEL.ROI_HEADS.NUM_CLASSES 3"):
        setup(own_args([f"own_val={own_json}:{images}"], "MODEL.ROI_HEADS.NUM_CLASSES", "14"))
