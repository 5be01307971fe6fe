"""train_net.py and the engine: resume after a kill, clear errors, the accelerator choice.

Runs train_net.py as a user does (a subprocess) on a tiny generated dataset.
"""
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from argparse import Namespace

import pytest

import deepmac_d2  # noqa: F401
from deepmac_d2.data.synthetic import SyntheticConfig, prepare_synthetic
from deepmac_d2.engine import load_config, resolve_accelerator

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, "configs", "demo_synthetic_hg20.yaml")


def tiny_opts(output_dir, max_iter, period):
    """A small, fast model on 64px images; warmup 4 then x0.1 at iteration 6."""
    return [
        "MODEL.FPN.OUT_CHANNELS", "32", "MODEL.ROI_BOX_HEAD.FC_DIM", "64",
        "MODEL.ROI_MASK_HEAD.CONVNET_VARIANT", "hourglass10", "MODEL.ROI_MASK_HEAD.CONV_DIM", "8",
        "MODEL.ROI_MASK_HEAD.POOLER_RESOLUTION", "8",
        "INPUT.MIN_SIZE_TRAIN", "(64,)", "INPUT.MAX_SIZE_TRAIN", "64",
        "INPUT.MIN_SIZE_TEST", "64", "INPUT.MAX_SIZE_TEST", "64",
        "SOLVER.IMS_PER_BATCH", "2", "SOLVER.BASE_LR", "0.01", "SOLVER.WARMUP_ITERS", "4",
        "SOLVER.WARMUP_FACTOR", "0.1", "SOLVER.STEPS", "(6,)", "SOLVER.MAX_ITER", str(max_iter),
        "SOLVER.CHECKPOINT_PERIOD", str(period), "SOLVER.LR_SCHEDULER_NAME", "WarmupMultiStepLR", "DATASETS.TEST", "()", "DATALOADER.NUM_WORKERS", "0",
        "TEST.EVAL_PERIOD", "0", "OUTPUT_DIR", output_dir,
    ]


def expected_lr(it, base=0.01, warmup=4, factor=0.1, step=6):
    """Detectron2's WarmupMultiStepLR, worked by hand: linear warmup, then x0.1 at the step."""
    if it < warmup:
        alpha = it / warmup
        return base * (factor * (1 - alpha) + alpha)
    return base * (0.1 if it >= step else 1.0)


@pytest.fixture(scope="module")
def data_env(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("synthetic"))
    prepare_synthetic(root, num_train=4, num_val=2, cfg=SyntheticConfig(image_size=64))
    return dict(os.environ, DEEPMAC_SYNTHETIC_ROOT=root, OMP_NUM_THREADS="1")


def train_net(args, env, log_file, **kw):
    """Start train_net.py; its output goes to ``log_file`` (a pipe nobody reads would block it)."""
    return subprocess.Popen(
        [sys.executable, os.path.join(ROOT, "train_net.py"), "--config-file", CONFIG] + args,
        env=env, cwd=ROOT, stdout=open(log_file, "w"), stderr=subprocess.STDOUT, **kw
    )


def finish(proc, log_file, timeout=600):
    proc.wait(timeout=timeout)
    with open(log_file) as f:
        return f.read()


def lrs_by_iteration(output_dir):
    with open(os.path.join(output_dir, "metrics.json")) as f:
        rows = [json.loads(line) for line in f]
    return {r["iteration"]: r["lr"] for r in rows if "lr" in r}


@pytest.mark.slow
def test_killed_training_resumes_with_iteration_and_lr_schedule(tmp_path, data_env):
    out = str(tmp_path / "run")
    # Metrics written every iteration, so the LR of each one is on record.
    opts = tiny_opts(out, max_iter=20, period=3) + ["DEEPMAC.LOG_PERIOD", "1"]
    proc = train_net(opts, data_env, tmp_path / "first.log", start_new_session=True)
    ckpt = os.path.join(out, "model_0000002.pth")  # Detectron2 names them by 0-based iteration
    deadline = time.time() + 300
    while not os.path.exists(os.path.join(out, "last_checkpoint")) or not os.path.exists(ckpt):
        assert proc.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
        assert time.time() < deadline, "no checkpoint within 5 minutes"
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not os.path.exists(os.path.join(out, "model_final.pth"))
    with open(os.path.join(out, "last_checkpoint")) as f:
        last = f.read().strip()
    last_iter = int(last.split("_")[1].split(".")[0])
    assert 2 <= last_iter < 19

    resumed = train_net(["--resume"] + opts, data_env, tmp_path / "resumed.log")
    log = finish(resumed, tmp_path / "resumed.log")
    assert resumed.returncode == 0, log[-3000:]
    assert f"Starting training from iteration {last_iter + 1}" in log
    assert os.path.exists(os.path.join(out, "model_final.pth"))
    lrs = lrs_by_iteration(out)
    assert max(lrs) == 19
    for it in range(last_iter + 1, 20):
        assert lrs[it] == pytest.approx(expected_lr(it), rel=1e-6), it


@pytest.mark.slow
def test_nan_loss_stops_training_with_a_clear_message(tmp_path, data_env):
    out = str(tmp_path / "nan")
    proc = train_net(
        tiny_opts(out, max_iter=5, period=100) + ["SOLVER.BASE_LR", "1e30"], data_env, tmp_path / "log"
    )
    log = finish(proc, tmp_path / "log")
    assert proc.returncode != 0
    assert "Loss became infinite or NaN" in log or "Training has diverged" in log


def test_config_key_typo_names_the_key_and_suggests_the_right_one():
    args = Namespace(config_file=CONFIG, opts=["MODEL.ROI_MASK_HEAD.CONVNET_VARAINT", "hourglass52"])
    with pytest.raises(KeyError, match="CONVNET_VARAINT.*Did you mean MODEL.ROI_MASK_HEAD.CONVNET_VARIANT"):
        load_config(args)


def test_config_file_typo_names_the_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(f'_BASE_: "{CONFIG}"\nSOLVER:\n  MAX_ITERS: 5\n')
    with pytest.raises(KeyError, match=f"{bad}.*SOLVER.MAX_ITERS.*Did you mean SOLVER.MAX_ITER"):
        load_config(Namespace(config_file=str(bad), opts=[]))


def test_unknown_dataset_is_named(tmp_path, data_env):
    opts = tiny_opts(str(tmp_path), 1, 1) + ["DATASETS.TRAIN", "('no_such_set',)"]
    proc = train_net(opts, data_env, tmp_path / "log")
    log = finish(proc, tmp_path / "log", timeout=300)
    assert proc.returncode != 0 and "no_such_set" in log and "not registered" in log


def test_accelerator_choice():
    assert resolve_accelerator("cpu") == "cpu"
    assert resolve_accelerator("auto") in ("cpu", "cuda", "xla")
    with pytest.raises(ValueError, match="DEEPMAC.ACCELERATOR.*auto, cuda, cpu, xla"):
        resolve_accelerator("tpu")


def copy_of_data(data_env, tmp_path):
    root = str(tmp_path / "data")
    shutil.copytree(data_env["DEEPMAC_SYNTHETIC_ROOT"], root)
    with open(os.path.join(root, "annotations", "train.json")) as f:
        coco = json.load(f)
    return root, coco, dict(data_env, DEEPMAC_SYNTHETIC_ROOT=root)


def test_corrupt_image_is_named(tmp_path, data_env):
    root, coco, env = copy_of_data(data_env, tmp_path)
    bad = os.path.join(root, "train", coco["images"][0]["file_name"])
    with open(bad, "wb") as f:
        f.write(b"not a png")
    opts = tiny_opts(str(tmp_path / "out"), 2, 100) + ["SOLVER.IMS_PER_BATCH", "4"]
    proc = train_net(opts, env, tmp_path / "log")
    log = finish(proc, tmp_path / "log", timeout=300)
    assert proc.returncode != 0 and bad in log


def test_annotation_with_empty_segmentation_trains_as_box_only(tmp_path, data_env):
    """Detectron2 fails on ``"segmentation": []`` (a bare KeyError); here it is a
    box-only instance, counted in the coverage table logged at load time."""
    root, coco, env = copy_of_data(data_env, tmp_path)
    coco["annotations"][0]["segmentation"] = []
    with open(os.path.join(root, "annotations", "train.json"), "w") as f:
        json.dump(coco, f)
    opts = tiny_opts(str(tmp_path / "out"), 2, 100) + ["SOLVER.IMS_PER_BATCH", "4"]
    proc = train_net(opts, env, tmp_path / "log")
    log = finish(proc, tmp_path / "log", timeout=300)
    assert proc.returncode == 0, log[-3000:]
    total = sum(1 for a in coco["annotations"] if not a.get("iscrowd"))
    assert f"{total - 1} instance(s) with a mask train the mask head, 1 box-only instance(s)" in log
