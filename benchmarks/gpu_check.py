#!/usr/bin/env python
"""Every GPU number the README lacks, in one command and one markdown table.

    .venv/bin/python benchmarks/gpu_check.py --device cuda          # <= 8 min on one GPU
    .venv/bin/python benchmarks/gpu_check.py --device cpu --quick   # the same code, tiny sizes

Rows, each measured here and nothing tuned:
- the suite's CUDA-only tests (the test files that ask ``torch.cuda.is_available()``,
  their tests named ``cuda``), run by pytest;
- training images/s and peak memory of ``voc_r50_hg52`` against Detectron2's stock
  ``mask_rcnn_R_50_FPN_3x`` recipe, random weights, on the same synthetic images resized
  to ``--train-size`` (1024: the recipe's), AMP off and on (fp16 with a grad scaler on
  CUDA, Detectron2's AMPTrainer's; bf16 on CPU);
- each mask head's forward+backward on ROI features (benchmarks/mask_heads.py's timing);
- masks for given boxes: ``BoxMaskPredictor`` and the exported TorchScript graph on the device;
- the head study (benchmarks/head_study.py) in a short form on ``--device``.
Weights are random (nothing downloads); the training rows step SGD at LR 0, the same
computation as training without random weights drifting into a diverged model.
A row that fails shows its error and the command exits 1 after the table, so the first
GPU run gives every number that works. ``--quick`` shrinks sizes and counts so that the
whole script runs in a test on CPU.
"""
import argparse
import glob
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
import traceback
from argparse import Namespace

import numpy as np
import torch

import deepmac_d2  # noqa: F401  (registers the heads, ROI heads and datasets)
from detectron2 import model_zoo
from detectron2.data import DatasetMapper
from detectron2.data import transforms as T
from detectron2.data.datasets import load_coco_json
from detectron2.modeling import build_model
from detectron2.utils.events import EventStorage
from deepmac_d2.box_masks import BoxMaskPredictor
from deepmac_d2.data.synthetic import SyntheticConfig, prepare_synthetic
from deepmac_d2.engine import load_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
sys.path.insert(0, os.path.join(ROOT, "tools"))
import export_model  # noqa: E402
import mask_heads  # noqa: E402

OURS = os.path.join(ROOT, "configs", "voc_r50_hg52.yaml")
STOCK = "COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_3x.yaml"  # Detectron2's recipe, in its package
# --quick: the same models at toy widths (R18, narrow FPN and heads), so that the CPU test
# runs every row in seconds; the GPU run uses the configs as they are.
QUICK_OPTS = ["MODEL.RESNETS.DEPTH", "18", "MODEL.RESNETS.RES2_OUT_CHANNELS", "64",
              "MODEL.FPN.OUT_CHANNELS", "32", "MODEL.ROI_BOX_HEAD.FC_DIM", "64",
              "MODEL.ROI_MASK_HEAD.CONV_DIM", "8", "MODEL.ROI_MASK_HEAD.POOLER_RESOLUTION", "8",
              "MODEL.RPN.POST_NMS_TOPK_TRAIN", "64", "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE", "32",
              "INPUT.MIN_SIZE_TEST", "64", "INPUT.MAX_SIZE_TEST", "64"]
HEADS = (mask_heads.BASELINE, "default", "hourglass10", "hourglass20", "hourglass52", "hourglass100")


def sync(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def cuda_only_tests(device, quick):
    files = sorted(f for f in glob.glob(os.path.join(ROOT, "tests", "test_*.py"))
                   if "torch.cuda.is_available()" in open(f).read())
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-k", "cuda"] + files
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    summary = (res.stdout.strip().splitlines() or ["no output"])[-1].strip("= ")
    names = ", ".join(os.path.basename(f) for f in files)
    if res.returncode not in (0, 5):  # 5: none collected
        raise RuntimeError(f"{summary} ({names})\n{res.stdout[-2000:]}")
    return [("CUDA-only tests", f"pytest -k cuda {names}", summary)]


def synthetic_images(size, count, root):
    """``count`` synthetic scenes as Detectron2 training inputs, resized to ``size`` pixels."""
    prepare_synthetic(root, num_train=count, num_val=1, cfg=SyntheticConfig(image_size=128))
    dicts = load_coco_json(os.path.join(root, "annotations", "train.json"), os.path.join(root, "train"))
    mapper = DatasetMapper(is_train=True, augmentations=[T.ResizeShortestEdge(size, size)], image_format="BGR",
                           use_instance_mask=True, instance_mask_format="bitmask")
    return [mapper(d) for d in dicts]


def config(path, device, quick):
    cfg = load_config(Namespace(config_file=path, opts=QUICK_OPTS if quick else []))
    cfg.MODEL.WEIGHTS = ""  # random weights: nothing downloads, and speed does not depend on them
    cfg.MODEL.DEVICE = device
    return cfg


def training_model(which, device, quick):
    torch.manual_seed(0)
    path = OURS if which == "voc_r50_hg52" else model_zoo.get_config_file(STOCK)
    return build_model(config(path, device, quick)).train()


def training_throughput(device, quick, images, batch, steps, warmup):
    """Images/s of SGD steps (forward, backward, update) and the peak memory they allocate."""
    rows = []
    batches = [images[i:i + batch] for i in range(0, len(images) - batch + 1, batch)]
    for which in ("voc_r50_hg52", "mask_rcnn_R_50_FPN_3x (Detectron2)"):
        model = training_model(which.split()[0], device, quick)
        # LR 0: every step computes what training does (momentum and decay included), and
        # random weights cannot drift into a diverged model between the rows.
        optimizer = torch.optim.SGD(model.parameters(), lr=0.0, momentum=0.9, weight_decay=1e-4)
        for amp in (False, True):
            amp_dtype = torch.float16 if device.startswith("cuda") else torch.bfloat16
            scaler = torch.amp.GradScaler("cuda", enabled=amp and device.startswith("cuda"))
            if device.startswith("cuda"):
                torch.cuda.reset_peak_memory_stats()
            with EventStorage():  # Detectron2's models log training statistics into one
                for i in range(warmup + steps):
                    if i == warmup:
                        sync(device)
                        start = time.perf_counter()
                    with torch.autocast(torch.device(device).type, dtype=amp_dtype, enabled=amp):
                        losses = sum(model(batches[i % len(batches)]).values())
                    optimizer.zero_grad()
                    scaler.scale(losses).backward()
                    scaler.step(optimizer)
                    scaler.update()
            sync(device)
            rate = steps * batch / (time.perf_counter() - start)
            peak = (f"{torch.cuda.max_memory_allocated() / 2**30:.2f} GiB peak"
                    if device.startswith("cuda") else "peak memory: CUDA only")
            amp_name = f"AMP {'fp16' if amp_dtype == torch.float16 else 'bf16'}" if amp else "fp32"
            size = images[0]["image"].shape[-2:]
            rows.append(("training", f"{which}, {amp_name}, batch {batch}, {size[0]}x{size[1]}",
                         f"{rate:.2f} images/s; {peak}"))
        del model, optimizer
    return rows


def mask_head_steps(device, quick):
    crop, batch = (8, 2) if quick else (32, 256)
    heads = HEADS[:3] if quick else HEADS
    models = [mask_heads.build(v, 64) for v in heads]
    best = mask_heads.train_step_seconds(models, [crop], batch, repeats=2 if quick else 10,
                                         warmup=1 if quick else 3, device=device)
    return [("mask head fwd+bwd", f"{v}, 64 filters, {batch} ROIs of {crop}x{crop}",
             f"{1000 * best[i, crop]:.2f} ms (fastest)") for i, v in enumerate(heads)]


def box_mask_latency(device, quick, repeats):
    cfg = config(OURS, "cpu", quick)  # exported from CPU, as tools/export_model.py does; moved below
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    side = 64 if quick else 800
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (side, side, 3), dtype=np.uint8)
    corners = rng.uniform(0, side, (10, 2, 2))
    boxes = np.concatenate([corners.min(1), corners.max(1)], 1).astype(np.float32)
    rows = []
    with tempfile.TemporaryDirectory() as out:
        path = export_model.export(cfg, model, out, models=["box_masks"], formats=["torchscript"])[
            "box_masks", "torchscript"]
        predictor = BoxMaskPredictor(cfg, model=model.to(device))
        scripted = torch.jit.load(path, map_location=device)
        inputs = (torch.from_numpy(image).to(device), torch.from_numpy(boxes).to(device))

        def eager():
            predictor(image, boxes)

        def exported():
            with torch.inference_mode():
                scripted(*inputs)

        for name, fn in (("BoxMaskPredictor (eager)", eager), ("exported TorchScript", exported)):
            fn()
            times = []
            for _ in range(repeats):
                sync(device)
                start = time.perf_counter()
                fn()
                sync(device)
                times.append(time.perf_counter() - start)
            rows.append(("masks for 10 boxes", f"{name}, image {side}x{side}",
                         f"{1000 * float(np.median(times)):.1f} ms (median of {repeats})"))
    return rows


def head_study(device, quick):
    with tempfile.TemporaryDirectory() as tmp:
        data = os.path.join(tmp, "data")
        prepare_synthetic(data, num_train=2 if quick else 16, num_val=2 if quick else 8,
                          cfg=SyntheticConfig(image_size=64 if quick else 128))
        cmd = [sys.executable, os.path.join(ROOT, "benchmarks", "head_study.py"), "--device", device,
               "--output-dir", os.path.join(tmp, "out"), "--data-root", data,
               "--heads", "default" if quick else "default,hourglass20,hourglass52",
               "--modes", "gt_boxes" if quick else "gt_boxes,proposals", "--det-seeds", "2", "--head-seeds", "1",
               "--det-iters", "2" if quick else "100", "--head-iters", "2" if quick else "50"]
        if quick:
            cmd += ["--bn-batches", "1", "--head-batch", "2"]
            cmd += ["MODEL.FPN.OUT_CHANNELS", "32", "MODEL.ROI_BOX_HEAD.FC_DIM", "64",
                    "MODEL.ROI_MASK_HEAD.CONV_DIM", "8", "MODEL.ROI_MASK_HEAD.POOLER_RESOLUTION", "8",
                    "INPUT.MIN_SIZE_TRAIN", "(64,)", "INPUT.MAX_SIZE_TRAIN", "64",
                    "INPUT.MIN_SIZE_TEST", "64", "INPUT.MAX_SIZE_TEST", "64", "SOLVER.IMS_PER_BATCH", "2",
                    "SOLVER.WARMUP_ITERS", "1", "MODEL.ROI_HEADS.SCORE_THRESH_TEST", "0.0"]
        start = time.perf_counter()
        res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=420)
        if res.returncode:
            raise RuntimeError(res.stdout[-1500:] + res.stderr[-1500:])
        runs = len(re.findall(r"\[heads \d+/\d+", res.stdout))
        return [("head study", " ".join(cmd[2:4] + cmd[8:12]),
                 f"{runs} head runs, {time.perf_counter() - start:.0f} s wall")]


def device_name(device):
    if device.startswith("cuda"):
        return f"{torch.cuda.get_device_name(device)}, CUDA {torch.version.cuda}"
    return f"CPU {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", help="cuda, cuda:N or cpu")
    parser.add_argument("--quick", action="store_true", help="tiny sizes and counts (the CPU test)")
    parser.add_argument("--train-size", type=int, default=None, help="training image side (default 1024; quick 128)")
    parser.add_argument("--output", default=os.path.join(ROOT, "output", "gpu_check.md"))
    args = parser.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: torch {torch.__version__} sees no CUDA device; "
                     "use --device cpu --quick to run the same code on CPU")
    quick, device = args.quick, args.device
    size = args.train_size or (64 if quick else 1024)
    batch, steps, warmup = (2, 1, 1) if quick else (2, 10, 3)
    start = time.perf_counter()
    rows, failed = [], 0
    with tempfile.TemporaryDirectory() as tmp:
        sections = [
            ("CUDA-only tests", lambda: cuda_only_tests(device, quick)),
            ("training", lambda: training_throughput(
                device, quick, synthetic_images(size, 2 * batch, os.path.join(tmp, "images")), batch, steps, warmup)),
            ("mask head fwd+bwd", lambda: mask_head_steps(device, quick)),
            ("masks for 10 boxes", lambda: box_mask_latency(device, quick, 1 if quick else 20)),
            ("head study", lambda: head_study(device, quick)),
        ]
        for name, run in sections:
            section_start = time.perf_counter()
            try:
                rows += run()
            except Exception as e:  # one failing row must not hide the others' numbers
                failed += 1
                traceback.print_exc()
                rows.append((name, "FAILED", f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"))
            print(f"[{name}: {time.perf_counter() - section_start:.0f} s]", file=sys.stderr, flush=True)
    lines = [f"| {device_name(device)} | torch {torch.__version__}{', quick' if quick else ''} | "
             f"{time.perf_counter() - start:.0f} s in all |", "|---|---|---|"]
    lines += [f"| {what} | {setting} | {value} |" for what, setting, value in rows]
    table = "\n".join(lines) + "\n"
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    with open(args.output, "w") as f:
        f.write(table)
    print(table)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
