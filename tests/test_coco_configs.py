"""The shipped COCO configs, run as users run them: ``train_net.py`` in a subprocess on a
COCO 2017 layout under ``$DETECTRON2_DATASETS`` (tests/coco_fixture.py: polygons, crowd
RLE, COCO's 80 ids, images of many shapes).

Each config is shrunk by command-line overrides only. Two of them are needed because
the tests have no ImageNet weights: the configs' FrozenBN ResNet normalises nothing with
random weights (the first loss is in the hundreds and training diverges), hence GroupNorm
and no frozen stages (and GroupNorm for SpineNet and the box-head convs, whose BatchNorm
statistics after two iterations make evaluation propose nothing); and with two 128-pixel
images a batch holds only a handful of GT boxes, too few for BatchNorm statistics inside
the mask head, so gradients are clipped.

The subset numbers (``segm/nonvoc`` ...) a run reports must equal pycocotools' COCOeval
with ``params.catIds`` on the predictions the run wrote. After two iterations from scratch
the detector is close to random, so most APs are 0 or NaN here; that the subset
arithmetic is right on non-trivial numbers is tested in test_subset_evaluation.py.
"""
import contextlib
import glob
import io
import json
import math
import os
import re
import shutil
import subprocess
import sys
from argparse import Namespace
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

import deepmac_d2  # noqa: F401
from deepmac_d2.data.class_splits import parse_class_subset
from deepmac_d2.data.mask_coverage import annotation_has_mask
from deepmac_d2.data.partial_annotations import make_partial_annotations
from deepmac_d2.engine import load_config

from coco_fixture import make_coco2017

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COCO_CONFIGS = sorted(
    os.path.basename(p) for p in glob.glob(os.path.join(ROOT, "configs", "*voc_*.yaml"))
)
# Trained here: every voc_* config, and one nonvoc_* for the reverse split. The other
# nonvoc_* configs build the same models as their voc_* twins (test_configs.py checks
# that, and their class subsets), so training them again tests nothing new.
TRAINED_CONFIGS = [c for c in COCO_CONFIGS if c.startswith("voc_") or c == "nonvoc_r50_hg52.yaml"]
METRICS = ("AP", "AP50", "AP75", "APs", "APm", "APl")


def shrink(output_dir, max_iter=2):
    return [
        "SOLVER.IMS_PER_BATCH", "2", "SOLVER.MAX_ITER", str(max_iter), "SOLVER.BASE_LR", "0.01",
        "SOLVER.CHECKPOINT_PERIOD", "1000", "SOLVER.CLIP_GRADIENTS.ENABLED", "True",
        "INPUT.FIXED_SIZE", "128", "INPUT.MIN_SIZE_TEST", "128", "INPUT.MAX_SIZE_TEST", "128",
        "MODEL.WEIGHTS", "", "MODEL.RESNETS.NORM", "GN", "MODEL.BACKBONE.FREEZE_AT", "0",
        "MODEL.SPINENET.NORM", "GN", "MODEL.ROI_BOX_HEAD.NORM", "GN",
        "MODEL.ROI_HEADS.SCORE_THRESH_TEST", "0.0", "TEST.DETECTIONS_PER_IMAGE", "20",
        "MODEL.RPN.POST_NMS_TOPK_TRAIN", "200", "MODEL.RPN.POST_NMS_TOPK_TEST", "100",
        "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE", "64",
        "DATALOADER.NUM_WORKERS", "0", "DEEPMAC.LOG_PERIOD", "1", "OUTPUT_DIR", output_dir,
    ]


@pytest.fixture(scope="module")
def coco_root(tmp_path_factory):
    return make_coco2017(str(tmp_path_factory.mktemp("d2_datasets")))


@pytest.fixture(scope="module")
def partial_root(coco_root, tmp_path_factory):
    """The fixture with half of every class's training masks removed (boxes all kept)."""
    root = str(tmp_path_factory.mktemp("d2_datasets_partial"))
    shutil.copytree(os.path.join(coco_root, "coco"), os.path.join(root, "coco"))
    path = os.path.join(root, "coco", "annotations", "instances_train2017.json")
    with open(path) as f:
        partial, _ = make_partial_annotations(json.load(f), drop_mask_fraction=0.5, seed=0)
    with open(path, "w") as f:
        json.dump(partial, f)
    return root


def env_for(root, threads):
    return dict(os.environ, DETECTRON2_DATASETS=root, OMP_NUM_THREADS=str(threads))


def train_net(config, args, env):
    """Run train_net.py; returns (exit code, combined output)."""
    cmd = [sys.executable, os.path.join(ROOT, "train_net.py"), "--config-file", os.path.join(ROOT, "configs", config)]
    proc = subprocess.run(cmd + args, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, timeout=900)
    return proc.returncode, proc.stdout


def check_ok(config, result):
    code, log = result
    assert code == 0, f"train_net.py --config-file {config} failed:\n{log[-4000:]}"
    return log


@pytest.fixture(scope="module")
def runs(coco_root, partial_root, tmp_path_factory):
    """Every trained config once on the fixture (and voc_r50_hg52 on the partial one),
    two single-threaded runs at a time: {name: (output dir, (exit code, log))}."""
    jobs = {c: (c, coco_root) for c in TRAINED_CONFIGS}
    jobs["partial"] = ("voc_r50_hg52.yaml", partial_root)
    outs = {name: str(tmp_path_factory.mktemp(name.replace(".yaml", ""))) for name in jobs}
    with ThreadPoolExecutor(2) as pool:
        futures = {name: pool.submit(train_net, config, shrink(outs[name]), env_for(root, 1))
                   for name, (config, root) in jobs.items()}
        results = {name: (outs[name], f.result()) for name, f in futures.items()}
    for name, (out, _) in results.items():  # SpineNet-143's is 800 MB; only voc_r50's is resumed
        if name != "voc_r50.yaml" and os.path.exists(os.path.join(out, "model_final.pth")):
            os.remove(os.path.join(out, "model_final.pth"))
    return results


def copypaste_results(log):
    """The results of a log's last evaluation, from Detectron2's ``copypaste:`` lines
    (4 decimals), as {"segm/nonvoc": {"AP": ...}}."""
    lines = [line.split("copypaste: ", 1)[1].strip() for line in log.splitlines() if "copypaste: " in line]
    out = {}
    for i, line in enumerate(lines):
        if line.startswith("Task: "):
            names, values = lines[i + 1].split(","), lines[i + 2].split(",")
            out[line[len("Task: "):]] = {n: float(v) for n, v in zip(names, values)}
    return out


def pycocotools_metrics(gt_json, results_json, iou_type, cat_ids):
    """COCOeval's six AP numbers in %, NaN where COCOeval has -1, with params.catIds.

    For mask AP the results lose their "bbox": with it, loadRes takes box areas as the
    instances' areas, and APs/APm/APl would use the box, not the mask, to size them."""
    with open(results_json) as f:
        results = json.load(f)
    if iou_type == "segm":
        for r in results:
            r.pop("bbox", None)
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(gt_json)
        dt = gt.loadRes(results)
        ev = COCOeval(gt, dt, iou_type)
        ev.params.catIds = sorted(cat_ids)
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return {m: (float("nan") if s < 0 else float(s * 100)) for m, s in zip(METRICS, ev.stats[:6])}


def assert_same(got, want, what):
    for m in METRICS:
        if math.isnan(want[m]):
            assert math.isnan(got[m]), f"{what} {m}: {got[m]} where COCOeval has none"
        else:
            assert got[m] == pytest.approx(want[m], abs=1e-4), f"{what} {m}"  # logged to 4 decimals


def subsets_of(config):
    cfg = load_config(Namespace(config_file=os.path.join(ROOT, "configs", config), opts=[]))
    return dict(parse_class_subset(s) for s in cfg.DATASETS.EVAL_CLASS_SUBSETS)


def test_every_reference_row_has_a_config():
    assert {"voc_r50.yaml", "voc_r50_hg52.yaml", "voc_r101_hg52.yaml",
            "nonvoc_r50_hg52.yaml", "nonvoc_r101_hg52.yaml"} <= set(COCO_CONFIGS)


@pytest.mark.slow
@pytest.mark.parametrize("config", TRAINED_CONFIGS)
def test_config_trains_and_its_subset_ap_is_cocoeval_with_cat_ids(config, runs, coco_root):
    out, result = runs[config]
    log = check_ok(config, result)
    # It trained: finite mask losses on the masked, allowed classes, every iteration.
    mask_losses = [float(v) for v in re.findall(r"loss_mask: ([0-9.e+-]+|nan)", log)]
    assert len(mask_losses) >= 2 and all(np.isfinite(mask_losses)) and max(mask_losses) > 0
    if config.endswith("_weak.yaml"):  # and the weak losses on the other split's boxes
        for name in ("loss_mask_projection", "loss_mask_pairwise"):
            weak = [float(v) for v in re.findall(rf"{name}: ([0-9.e+-]+|nan)", log)]
            assert len(weak) >= 2 and all(np.isfinite(weak)), name
    results = copypaste_results(log)
    predictions = os.path.join(out, "inference", "coco_2017_val", "coco_instances_results.json")
    with open(predictions) as f:
        assert json.load(f), "the run wrote no predictions"
    gt_json = os.path.join(coco_root, "coco", "annotations", "instances_val2017.json")
    subsets = subsets_of(config)
    assert list(subsets)[0] == ("voc" if config.startswith("nonvoc") else "nonvoc")  # the headline split
    for iou_type in ("bbox", "segm"):
        for name, ids in subsets.items():
            key = f"{iou_type}/{name}"
            assert_same(results[key], pycocotools_metrics(gt_json, predictions, iou_type, ids), key)


@pytest.mark.slow
def test_resume_then_eval_only(runs, coco_root, tmp_path):
    """--resume continues the schedule where the first run stopped; --eval-only on its
    final weights reproduces the numbers its last evaluation logged."""
    first, result = runs["voc_r50.yaml"]
    check_ok("voc_r50.yaml", result)
    out = str(tmp_path / "resumed")
    shutil.copytree(first, out)
    env = env_for(coco_root, 2)
    log = check_ok("voc_r50.yaml", train_net("voc_r50.yaml", ["--resume"] + shrink(out, max_iter=4), env))
    assert "Starting training from iteration 2" in log
    with open(os.path.join(out, "metrics.json")) as f:
        iterations = [r["iteration"] for r in map(json.loads, f) if "total_loss" in r]
    assert iterations == [0, 1, 2, 3]
    weights = os.path.join(out, "model_final.pth")
    eval_log = check_ok("voc_r50.yaml", train_net(
        "voc_r50.yaml", ["--eval-only"] + shrink(str(tmp_path / "eval")) + ["MODEL.WEIGHTS", weights], env))
    evaluated = copypaste_results(eval_log)
    for task, metrics in copypaste_results(log).items():
        for m in METRICS:
            want, got = metrics[m], evaluated[task][m]
            assert (math.isnan(want) and math.isnan(got)) or got == pytest.approx(want, abs=1e-4), (task, m)


@pytest.mark.slow
def test_half_of_the_masks_removed(runs, partial_root):
    """Boxes for every instance, masks for half: it trains, and the table logged at load
    time counts what the json holds (every class; ALLOWED_CLASS_IDS narrows the head further)."""
    _, result = runs["partial"]
    log = check_ok("voc_r50_hg52.yaml (partial)", result)
    with open(os.path.join(partial_root, "coco", "annotations", "instances_train2017.json")) as f:
        annotations = [a for a in json.load(f)["annotations"] if not a["iscrowd"]]
    with_mask = sum(annotation_has_mask(a) for a in annotations)
    assert 0 < with_mask < len(annotations)
    assert (f"{with_mask} instance(s) with a mask train the mask head, "
            f"{len(annotations) - with_mask} box-only instance(s)") in log
    mask_losses = [float(v) for v in re.findall(r"loss_mask: ([0-9.e+-]+|nan)", log)]
    assert mask_losses and all(np.isfinite(mask_losses))
