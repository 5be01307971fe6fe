"""benchmarks/novel_class_generalization.py: the grid end to end on 2 images and 2
iterations (table, JSON, plot), resuming, the grid and class split a COCO config gets,
and the mean/std over seeds worked by hand.

The quality of the numbers is not checked here (2 iterations learn nothing); the
given-box IoU itself is tested in test_box_masks.py.
"""
import argparse
import json
import math
import os
import runpy
import subprocess
import sys

import pytest
import yaml
from PIL import Image

from deepmac_d2.data.class_splits import NONVOC_CLASS_IDS, VOC_CLASS_IDS
from deepmac_d2.data.synthetic import SyntheticConfig, prepare_synthetic
from deepmac_d2.engine import load_config
from harness.grid import (RESULT_FILE, SPEC_FILE, GridRun, aggregate, mean_std, run_grid,
                                     spec_config)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "benchmarks", "novel_class_generalization.py")
# A small, fast model on 64px images (as tiny_opts in test_train_net.py).
TINY = [
    "MODEL.FPN.OUT_CHANNELS", "32", "MODEL.ROI_BOX_HEAD.FC_DIM", "64",
    "MODEL.ROI_MASK_HEAD.CONV_DIM", "8", "MODEL.ROI_MASK_HEAD.POOLER_RESOLUTION", "8",
    "INPUT.MIN_SIZE_TRAIN", "(64,)", "INPUT.MAX_SIZE_TRAIN", "64",
    "INPUT.MIN_SIZE_TEST", "64", "INPUT.MAX_SIZE_TEST", "64",
    "SOLVER.IMS_PER_BATCH", "2", "SOLVER.WARMUP_ITERS", "1",
    # Every detection kept: an untrained box head still gives the COCO evaluation masks.
    "MODEL.ROI_HEADS.SCORE_THRESH_TEST", "0.0",
]
# One head keeps the test short (the heads' opts are checked in test_grid_for_a_coco_config).
RUNS = ["stock-proposals-seed0", "stock-gt_boxes-seed0", "stock-gt_boxes_all_masks-seed0"]


def grid(out, env):
    cmd = [sys.executable, SCRIPT, "--output-dir", str(out), "--heads", "stock",
           "--max-iter", "2"] + TINY
    res = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return res.stdout


@pytest.fixture(scope="module")
def first_grid(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ncg")
    prepare_synthetic(str(tmp / "data"), num_train=2, num_val=2, cfg=SyntheticConfig(image_size=64))
    env = dict(os.environ, DEEPMAC_SYNTHETIC_ROOT=str(tmp / "data"), OMP_NUM_THREADS="1")
    return tmp / "out", env, grid(tmp / "out", env)


@pytest.mark.slow
def test_grid_writes_table_json_and_plot(first_grid):
    out, _, stdout = first_grid
    results = json.loads((out / "results.json").read_text())
    assert [r["name"] for r in results["runs"]] == RUNS
    assert results["ceiling_head"] == "stock" and results["max_iter"] == 2
    assert results["class_split"]["novel"] == {"subset": "novel", "ids": [2, 4, 6, 8, 10, 12, 14]}
    for run in results["runs"]:
        for key in ("box_AP", "seen_mask_AP", "novel_mask_AP"):
            assert run[key] is None or 0 <= run[key] <= 100, (run["name"], key)
        for key in ("seen_gt_box_mask_IoU", "novel_gt_box_mask_IoU"):
            assert 0 <= run[key] <= 1, (run["name"], key)
        assert run["wall_seconds"] > 0 and "segm/novel" in run["coco_results"]
        config = (out / run["name"] / "config.yaml").read_text()
        assert ("USE_GT_BOXES: true" in config) == ("gt_boxes" in run["name"])
        assert ("ALLOWED_CLASS_IDS: []" in config) == run["name"].endswith("all_masks-seed0")
        # Detectron2's stock head at CONV_DIM 8 on 32 FPN channels, class-agnostic, no
        # norm: 3x3 convs 32->8 and 3x 8->8, a 2x2 deconv 8->8, a 1x1 predictor, biases.
        assert run["mask_head_params"] == (
            (9 * 32 * 8 + 8) + 3 * (9 * 8 * 8 + 8) + (4 * 8 * 8 + 8) + (8 + 1)
        )

    table = (out / "results.md").read_text()
    assert table.strip().splitlines()[0].startswith("| mask head |") and table in stdout
    assert "GT boxes, masks of all classes (ceiling)" in table and "Detectron2 stock" in table
    assert len([line for line in table.splitlines() if line.startswith("| ")]) == 1 + len(RUNS)
    assert Image.open(out / "novel_mask_AP.png").size[0] > 300
    assert "ETA" in stdout and f"[grid {len(RUNS)}/{len(RUNS)}]" in stdout


@pytest.mark.slow
def test_rerun_reuses_finished_runs_and_redoes_the_rest(first_grid):
    out, env, _ = first_grid
    redo = out / RUNS[1] / RESULT_FILE
    redo.unlink()  # as if the grid had been interrupted during this run
    kept = {name: (out / name / RESULT_FILE).stat().st_mtime_ns for name in RUNS if name != RUNS[1]}
    stdout = grid(out, env)
    assert stdout.count(": reused") == len(RUNS) - 1 and f"{RUNS[1]}: running" in stdout
    assert {name: (out / name / RESULT_FILE).stat().st_mtime_ns for name in kept} == kept
    assert redo.is_file()


def test_a_config_key_added_since_a_run_keeps_the_run_reusable(tmp_path):
    """spec_config: a run stored before the package gained a key (whose default changes
    nothing) is the same run; a changed value or a key the package no longer knows is not."""
    cfg = load_config(argparse.Namespace(config_file=os.path.join(ROOT, "configs", "voc_r50_hg52.yaml"),
                                         opts=["SEED", "3"]))
    old = yaml.safe_load(cfg.dump())
    del old["DEEPMAC"]["LOG_PERIOD"]  # as written by a package without the key (default 20)

    def stored(config):
        (tmp_path / SPEC_FILE).write_text(json.dumps({"config": yaml.safe_dump(config)}))
        return yaml.safe_dump(config)

    assert spec_config(cfg, str(tmp_path / "none")) == cfg.dump()
    text = stored(old)
    assert spec_config(cfg, str(tmp_path)) == text != cfg.dump()
    old["SEED"] = 4
    stored(old)
    assert spec_config(cfg, str(tmp_path)) == cfg.dump()
    old["SEED"] = 3
    old["MODEL"]["ROI_MASK_HEAD"]["REMOVED_KEY"] = 1
    stored(old)
    assert spec_config(cfg, str(tmp_path)) == cfg.dump()
    # The config sets BN_EPS to 1e-4; without it, today's default (1e-3) would apply.
    del old["MODEL"]["ROI_MASK_HEAD"]["REMOVED_KEY"], old["MODEL"]["ROI_MASK_HEAD"]["BN_EPS"]
    stored(old)
    assert spec_config(cfg, str(tmp_path)) == cfg.dump()


def test_grid_for_a_coco_config():
    """--config: the split comes from the config (VOC masks -> non-VOC novel), the heads
    are ordered shallow to deep, and only the grid's keys differ between runs."""
    script = runpy.run_path(SCRIPT, run_name="novel_class_generalization")
    args = script["parse_args"](["--config", os.path.join(ROOT, "configs", "voc_r50_hg52.yaml"),
                                 "--heads", "hourglass52,stock,default", "--seeds", "2",
                                 "--device", "cuda", "SOLVER.IMS_PER_BATCH", "16"])
    assert args.heads == ["stock", "default", "hourglass52"] and args.max_iter is None
    runs, split = script["grid_runs"](args)
    assert split == {"seen": {"subset": "voc", "ids": sorted(VOC_CLASS_IDS)},
                     "novel": {"subset": "nonvoc", "ids": sorted(NONVOC_CLASS_IDS)}}
    assert len(runs) == (3 * 2 + 1) * 2 and runs[-1].name == "hourglass52-gt_boxes_all_masks-seed1"
    configs = {r.name: yaml.safe_load(r.spec["config"]) for r in runs}
    for name, cfg in configs.items():
        head, mode, seed = name.split("-")
        mask = cfg["MODEL"]["ROI_MASK_HEAD"]
        assert mask["USE_GT_BOXES"] == mode.startswith("gt_boxes")
        assert mask["ALLOWED_CLASS_IDS"] == ([] if mode.endswith("all_masks") else ["voc"])
        assert (mask["NAME"], mask["NORM"]) == (
            ("MaskRCNNConvUpsampleHead", "") if head == "stock" else ("DeepMaskHead", "BN"))
        if head != "stock":
            assert mask["CONVNET_VARIANT"] == head
        assert cfg["SEED"] == int(seed[len("seed"):]) and cfg["DEEPMAC"]["ACCELERATOR"] == "cuda"
        # The config's own schedule and the user's overrides, the same for every run.
        assert cfg["SOLVER"]["MAX_ITER"] == 70000 and cfg["SOLVER"]["IMS_PER_BATCH"] == 16


def test_shortened_runs_keep_the_configs_lr_schedule_shape():
    """The default grid runs 500 of the demo config's 1000 iterations: its LR steps at
    750 and 900 move to 375 and 450 (left in place, the LR would never decay)."""
    script = runpy.run_path(SCRIPT, run_name="novel_class_generalization")
    args = script["parse_args"]([])
    assert args.max_iter == 500
    runs, _ = script["grid_runs"](args)
    for run in runs:
        solver = yaml.safe_load(run.spec["config"])["SOLVER"]
        assert (solver["MAX_ITER"], solver["STEPS"], solver["WARMUP_ITERS"]) == (500, [375, 450], 100)
    # 2 iterations: 750 and 900 both land on iteration 2, the run's end, where a step
    # changes nothing (and Detectron2's scheduler refuses it).
    solver = argparse.Namespace(MAX_ITER=1000, STEPS=(750, 900))
    assert script["scaled_schedule"](solver, 2) == ["SOLVER.MAX_ITER", "2", "SOLVER.STEPS", "()"]
    assert script["scaled_schedule"](solver, 100) == ["SOLVER.MAX_ITER", "100", "SOLVER.STEPS", "(75, 90)"]


def test_mean_and_std_over_seeds_by_hand():
    # AP 10, 12, 17: mean 13; sample variance ((-3)^2 + (-1)^2 + 4^2) / (3 - 1) = 13.
    assert mean_std([10.0, 12.0, 17.0]) == pytest.approx((13.0, math.sqrt(13.0)))
    one = mean_std([4.0])
    assert one[0] == 4.0 and math.isnan(one[1])

    rows = [
        {"head": "hg", "mode": "gt", "ap": 10.0}, {"head": "hg", "mode": "pr", "ap": 1.0},
        {"head": "hg", "mode": "gt", "ap": 12.0}, {"head": "hg", "mode": "pr", "ap": None},
        {"head": "hg", "mode": "gt", "ap": 17.0},
    ]
    gt, pr = aggregate(rows, ("head", "mode"), ("ap",))
    assert (gt["head"], gt["mode"], gt["seeds"]) == ("hg", "gt", 3)
    assert gt["ap"]["values"] == [10.0, 12.0, 17.0]
    assert gt["ap"]["mean"] == pytest.approx(13.0) and gt["ap"]["std"] == pytest.approx(13.0 ** 0.5)
    # A seed with nothing to evaluate (null in results.json) is not averaged away.
    assert pr["seeds"] == 2 and math.isnan(pr["ap"]["mean"]) and math.isnan(pr["ap"]["std"])


WORKER = """
import json, os, sys
folder = sys.argv[1]
spec = json.load(open(os.path.join(folder, "spec.json")))
if spec["diverge"]:
    print("iter 230 ...")
    raise FloatingPointError("Predicted boxes or scores contain Inf/NaN. Training has diverged.")
json.dump({"ap": spec["seed"]}, open(os.path.join(folder, "worker_result.json"), "w"))
"""


def test_a_failed_run_is_recorded_and_the_grid_goes_on(tmp_path):
    script = runpy.run_path(SCRIPT, run_name="novel_class_generalization")
    runs = [GridRun("bad", {"seed": 0, "diverge": True}), GridRun("good", {"seed": 7, "diverge": False})]
    lines = []

    def grid_once():
        return run_grid(runs, str(tmp_path), lambda folder: [sys.executable, "-c", WORKER, folder],
                        log=lines.append)

    bad, good = grid_once()
    why = "FloatingPointError: Predicted boxes or scores contain Inf/NaN. Training has diverged. (exit 1)"
    assert bad["metrics"] is None and bad["failed"] == why
    assert good["metrics"] == {"ap": 7} and "failed" not in good
    assert any(line.startswith("[grid 1/2] bad: failed after") and why in line for line in lines)
    # Reused on the next run (the same spec fails the same way), with how to retry it.
    lines.clear()
    assert grid_once()[0]["failed"] == why
    assert f"delete {tmp_path / 'bad'} to retry it" in lines[0]

    text = script["table"]([], 1, {"hourglass52-gt_boxes-seed0": why})
    assert f"- `hourglass52-gt_boxes-seed0`: {why}" in text
