#!/usr/bin/env python3
"""The `make demo` job: DeepMAC's effect, end to end, on 2 CPU cores in minutes.

    python tools/demo.py                                  # output/demo
    python tools/demo.py --output-dir /tmp/d SOLVER.MAX_ITER 200

1. generates the synthetic shapes (datasets/synthetic; skipped when already there) and
   train_partial.json, in which the 7 NOVEL classes' instances have boxes but no masks;
2. trains configs/demo_synthetic_hg20.yaml on train_partial.json: Mask R-CNN R18-FPN with
   an hourglass-20 mask head that learns from ground-truth boxes and from the masks the
   json has, the 7 SEEN classes' (boxes and classes come from all 14);
3. evaluates COCO AP on the val split: mask AP on the 7 NOVEL classes (never a mask in
   training), on the seen ones, and box AP; and the mask head alone: mean mask IoU with
   the ground-truth boxes given, next to the IoU of a mask that fills its box;
4. evaluates the same detector again with the mask head put back to its weights at
   iteration 0: the floor that the novel-class numbers have to clear to mean anything;
5. draws novel-class instances of val images: ground truth, the trained head's mask
   and the untrained head's mask, both at the ground-truth box (the mask head alone);
6. the weak mask losses (docs/weak_losses.md): on the trained detector, frozen, two fresh
   mask heads, one on the seen classes' masks alone, one also with the box projection
   and pairwise losses on the novel classes' boxes; novel-class IoU and mask AP of both;
7. prints a summary table and writes it to <output>/summary.json.

Trailing KEY VALUE pairs override the config, as in train_net.py.
"""
import argparse
import contextlib
import copy
import io
import json
import logging
import math
import os
import re
import sys
import time
import warnings

# Third-party warnings known to be harmless here, as (category, message, file that raises
# it) patterns: route_warnings() writes them to the log file instead of the terminal.
HARMLESS_WARNINGS = (
    # Detectron2 v0.6 scripts a few functions at import; torch deprecates torch.jit.script.
    (FutureWarning, r"`torch\.jit\.script` is deprecated", r"torch/jit/_script\.py$"),
    # Detectron2 v0.6's mask targets: tensors from read-only arrays, copied by torch.stack.
    (UserWarning, r"The given NumPy array is not writable", r"detectron2/data/detection_utils\.py$"),
    # Detectron2 v0.6's anchors: torch.meshgrid without indexing=, whose default "ij" it means.
    (UserWarning, r"torch\.meshgrid: in an upcoming release", r"torch/functional\.py$"),
)

# The frozen-detector machinery the demo shares with the benchmarks lives beside them.
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))

# Those raised while torch and Detectron2 load, before log.txt exists: main() replays them
# through route_warnings()'s filter once it does.
with warnings.catch_warnings(record=True) as IMPORT_WARNINGS:
    import numpy as np
    import pycocotools.mask
    import torch
    from detectron2.data import DatasetCatalog, MetadataCatalog
    from detectron2.data.detection_utils import read_image
    from detectron2.structures import BoxMode
    from detectron2.utils.visualizer import Visualizer
    from PIL import Image, ImageDraw

    import deepmac_d2  # noqa: F401  (registers heads, ROI heads, datasets)
    from deepmac_d2.box_masks import BoxMaskPredictor
    from deepmac_d2.data.synthetic import (
        NOVEL_CLASSES,
        SEEN_CLASSES,
        default_root,
        prepare_synthetic,
        register_synthetic,
    )
    from deepmac_d2.engine import Trainer
    from harness.console import metric, quiet_setup
    from harness.frozen_detector import (
        cache_frozen_images,
        evaluate_mask_head,
        frozen_mappers,
        precise_mask_head_bn,
    )
    from harness.frozen_weak_training import frozen_input_images, train_mask_head_with_images
    from detectron2.modeling import build_roi_heads
    from deepmac_d2.evaluation import given_box_mask_iou


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_CONFIG = os.path.join(ROOT, "configs", "demo_synthetic_hg20.yaml")
COLUMNS = ("ground truth (novel classes)", "trained head, GT box", "untrained head, GT box")
# Instance colours of the pictures (the Visualizer's random ones are often pale).
PARTIAL_DATA_OPTS = ["DATASETS.TRAIN", '("synthetic_train_partial",)', "MODEL.ROI_MASK_HEAD.ALLOWED_CLASS_IDS", "[]"]
PALETTE = [tuple(c / 255 for c in rgb) for rgb in
           [(230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180)]]


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--config-file", default=DEFAULT_CONFIG, metavar="FILE")
    p.add_argument("--output-dir", help="default: the config's OUTPUT_DIR")
    p.add_argument(
        "--data-root", default=default_root(), help="synthetic data folder (default: %(default)s)"
    )
    p.add_argument("--num-train", type=int, default=600, help="synthetic train images")
    p.add_argument("--num-val", type=int, default=150, help="synthetic val images")
    p.add_argument("--pictures", type=int, default=6, help="val images to draw")
    p.add_argument("opts", nargs=argparse.REMAINDER, help="KEY VALUE config overrides")
    args = p.parse_args(argv)
    # The partially supervised setting as real data has it: the training json holds masks
    # for the seen classes only and boxes for all (rather than the config's full json
    # narrowed by ALLOWED_CLASS_IDS, which trains the same instances). Overrides after it win.
    args.opts = PARTIAL_DATA_OPTS + args.opts
    if args.output_dir:
        args.opts += ["OUTPUT_DIR", args.output_dir]
    return args


def prepare_data(args):
    """Generate the data unless the same parameters already did, and point the datasets at it."""
    print(f"[demo] synthetic data in {args.data_root} ...", flush=True)
    # train_partial.json: the novel classes' instances have boxes but no masks.
    generated = prepare_synthetic(
        args.data_root, num_train=args.num_train, num_val=args.num_val, partial_masks_for=SEEN_CLASSES
    )
    print(f"[demo] {'generated' if generated else 'already there, reused'}", flush=True)
    register_synthetic(args.data_root)


def evaluate(cfg, model, folder):
    """Subset COCO evaluation of the first test set, its files under ``folder``."""
    name = cfg.DATASETS.TEST[0]
    evaluator = Trainer.build_evaluator(cfg, name, os.path.join(cfg.OUTPUT_DIR, folder, name))
    return Trainer.test(cfg, model, evaluators=[evaluator])


def head_iou(cfg, model):
    """Mean mask IoU per class subset with the ground-truth boxes given: the mask head alone."""
    name = cfg.DATASETS.TEST[0]
    meta = MetadataCatalog.get(name)
    subsets = {"novel": meta.novel_class_ids, "seen": meta.seen_class_ids}
    return given_box_mask_iou(cfg, model, name, class_subsets=subsets)["per_subset"]


def filled_box_iou(cfg):
    """The IoU a mask filling its ground-truth box would get, per subset: what a head that
    learnt nothing about shape scores. IoU(box, mask) = mask area / box area."""
    meta = MetadataCatalog.get(cfg.DATASETS.TEST[0])
    novel = {meta.thing_dataset_id_to_contiguous_id[c] for c in meta.novel_class_ids}
    ratios = {"novel": [], "seen": []}
    for d in DatasetCatalog.get(cfg.DATASETS.TEST[0]):
        for a in d["annotations"]:
            w, h = a["bbox"][2:]  # XYWH, as the generator writes them
            area = float(pycocotools.mask.area(a["segmentation"]))
            ratios["novel" if a["category_id"] in novel else "seen"].append(area / (w * h))
    return {k: float(np.mean(v)) if v else float("nan") for k, v in ratios.items()}


# The weak-loss heads: benchmarks/weak_losses.py's settings (fixed before its runs) and
# schedule (the head study's: SGD steps of 4 images, peak LR 0.1, precise BN), for 40% of
# the model's iterations (400 of the demo's 1000), so that a shortened demo stays short.
WEAK_HEAD_FRACTION = 0.4
WEAK_SETTINGS = {"BOX_PROJECTION_WEIGHT": 1.0, "PAIRWISE_WEIGHT": 1.0, "BOX_PROJECTION_LOSS": "dice",
                 "PAIRWISE_COLOR_THRESHOLD": 0.3, "PAIRWISE_DILATION": 2, "ROI_EXPAND": 1.5,
                 "APPLY_TO": "no_mask"}


def weak_head_steps(cfg):
    return max(1, round(WEAK_HEAD_FRACTION * cfg.SOLVER.MAX_ITER))


def weak_loss_heads(cfg, model):
    """Novel-class mask IoU at the GT boxes and mask AP of two fresh mask heads trained
    on ``model``'s detector, frozen (its features cached once), with the same seed and
    draws: on the seen classes' masks alone, and with the weak mask losses on the novel
    classes' boxes too. Returns {"without"|"with": {"IoU", "AP"}}, or None when the
    detector made no detection on the val images (a run of a few iterations)."""
    val = cache_frozen_images(model, DatasetCatalog.get(cfg.DATASETS.TEST[0]),
                              frozen_mappers(cfg, train=False), detections=True)
    if not any(len(d) for d in val.detections):
        return None
    train_dicts = DatasetCatalog.get(cfg.DATASETS.TRAIN[0])
    train = cache_frozen_images(model, train_dicts, frozen_mappers(cfg, train=True), detections=False)
    images = frozen_input_images(cfg, train_dicts, train)
    out = {}
    for name, weights in (("without", 0.0), ("with", 1.0)):
        head_cfg = cfg.clone()
        head_cfg.defrost()
        for key, value in WEAK_SETTINGS.items():
            head_cfg.MODEL.ROI_MASK_HEAD.WEAK[key] = weights if key.endswith("_WEIGHT") else value
        head_cfg.MODEL.ROI_MASK_HEAD.WEAK.WARMUP_ITERS = weak_head_steps(cfg) // 10
        torch.manual_seed(0)
        roi_heads = build_roi_heads(head_cfg, model.backbone.output_shape()).to(cfg.MODEL.DEVICE)
        generator = torch.Generator().manual_seed(0)
        train_mask_head_with_images(roi_heads, train, images, iterations=weak_head_steps(cfg),
                                    ims_per_batch=4, base_lr=0.1, generator=generator,
                                    weight_decay=cfg.SOLVER.WEIGHT_DECAY, device=cfg.MODEL.DEVICE)
        precise_mask_head_bn(roi_heads, train, num_batches=10, ims_per_batch=4,
                             generator=generator, device=cfg.MODEL.DEVICE)
        with contextlib.redirect_stdout(LinesToLog()):
            scores = evaluate_mask_head(roi_heads, val, cfg.DATASETS.TEST[0],
                                        {"novel": list(NOVEL_CLASSES)}, max_detections=10,
                                        device=cfg.MODEL.DEVICE)
        out[name] = {"IoU": scores["novel"]["IoU_at_GT"], "AP": scores["novel"]["AP"]}
    return out


def print_weak(weak, steps):
    """The weak-loss heads' numbers, as a table of their own."""
    if weak is None:
        print("\nweak mask losses: skipped, the detector made no detection on the val images")
        return
    print(f"\nweak mask losses: fresh heads on the trained detector, frozen "
          f"({steps} steps each)")
    print(f"{'':46s} {'masks only':>13s} {'+ weak losses':>15s}")
    print(f"{'mask IoU at GT boxes, novel classes':46s} {weak['without']['IoU']:13.3f} "
          f"{weak['with']['IoU']:15.3f}")
    print(f"{'mask AP, novel classes':46s} {weak['without']['AP']:13.1f} {weak['with']['AP']:15.1f}")


def novel_images(dataset, metadata, count):
    """The first ``count`` images with a novel-class instance, keeping those instances only."""
    # Loaded records carry contiguous class ids; NOVEL_CLASSES are dataset ids.
    novel = {metadata.thing_dataset_id_to_contiguous_id[c] for c in NOVEL_CLASSES}
    picked = []
    for d in dataset:
        annos = [a for a in d["annotations"] if a["category_id"] in novel]
        if annos:
            picked.append(dict(d, annotations=annos))
        if len(picked) == count:
            break
    return picked


def gt_boxes(record):
    return [BoxMode.convert(a["bbox"], a["bbox_mode"], BoxMode.XYXY_ABS)
            for a in record["annotations"]]


def draw_row(image_rgb, record, metadata, masks_by_head, scale=3):
    """One picture per column of ``COLUMNS``, side by side; one colour per instance."""
    boxes = gt_boxes(record)
    colours = [PALETTE[i % len(PALETTE)] for i in range(len(boxes))]
    labels = [metadata.thing_classes[a["category_id"]] for a in record["annotations"]]
    panels = []
    for masks in [[a["segmentation"] for a in record["annotations"]]] + masks_by_head:
        vis = Visualizer(image_rgb, metadata, scale=scale)
        out = vis.overlay_instances(
            boxes=boxes, masks=masks, labels=labels, assigned_colors=colours
        )
        panels.append(out.get_image())
    return np.hstack(panels)


def with_titles(grid, width):
    """A title strip above the grid naming each column."""
    strip = Image.new("RGB", (grid.shape[1], 18), (255, 255, 255))
    draw = ImageDraw.Draw(strip)
    for i, title in enumerate(COLUMNS):
        draw.text((i * width + 4, 3), title, fill=(0, 0, 0))
    return np.vstack([np.asarray(strip), grid])


def draw_pictures(cfg, model, heads, count):
    """Write <output>/pictures/<image>.png and their grid <output>/novel_masks.png.

    ``heads`` are the mask-head state dicts of the 2nd and 3rd columns. Returns the paths.
    """
    name = cfg.DATASETS.TEST[0]
    metadata = MetadataCatalog.get(name)
    predictor = BoxMaskPredictor(cfg, model=model)
    folder = os.path.join(cfg.OUTPUT_DIR, "pictures")
    os.makedirs(folder, exist_ok=True)
    rows, paths = [], []
    for record in novel_images(DatasetCatalog.get(name), metadata, count):
        image = read_image(record["file_name"], format=cfg.INPUT.FORMAT)
        boxes = gt_boxes(record)
        masks_by_head = []
        for state in heads:
            model.roi_heads.mask_head.load_state_dict(state)
            masks_by_head.append(list(predictor(image, boxes).masks))
        rgb = image[:, :, ::-1] if cfg.INPUT.FORMAT == "BGR" else image
        row = draw_row(rgb, record, metadata, masks_by_head)
        stem = os.path.splitext(os.path.basename(record["file_name"]))[0]
        path = os.path.join(folder, stem + ".png")
        Image.fromarray(with_titles(row, row.shape[1] // len(COLUMNS))).save(path)
        rows.append(row)
        paths.append(path)
    if rows:
        path = os.path.join(cfg.OUTPUT_DIR, "novel_masks.png")
        grid = with_titles(np.vstack(rows), rows[0].shape[1] // len(COLUMNS))
        # A 256-colour palette keeps the picture small enough to commit.
        Image.fromarray(grid).quantize(256).save(path)
        paths.append(path)
    return paths


def summarize(trained, untrained, ious, seconds, cfg):
    """The numbers the demo is about (AP in %, IoU in [0, 1]), with how they were obtained."""
    return {
        "novel_mask_AP": metric(trained, "segm/novel"),
        "seen_mask_AP": metric(trained, "segm/seen"),
        "box_AP": metric(trained, "bbox"),
        "untrained_head_novel_mask_AP": metric(untrained, "segm/novel"),
        "untrained_head_seen_mask_AP": metric(untrained, "segm/seen"),
        "novel_mask_AP50": metric(trained, "segm/novel", "AP50"),
        "untrained_head_novel_mask_AP50": metric(untrained, "segm/novel", "AP50"),
        "novel_gt_box_mask_IoU": ious["trained"]["novel"],
        "seen_gt_box_mask_IoU": ious["trained"]["seen"],
        "untrained_head_novel_gt_box_mask_IoU": ious["untrained"]["novel"],
        "untrained_head_seen_gt_box_mask_IoU": ious["untrained"]["seen"],
        "filled_box_novel_IoU": ious["filled_box"]["novel"],
        "filled_box_seen_IoU": ious["filled_box"]["seen"],
        "train_and_eval_seconds": round(seconds["train"], 1),
        "untrained_head_eval_seconds": round(seconds["baseline"], 1),
        "iterations": cfg.SOLVER.MAX_ITER,
        "images_per_batch": cfg.SOLVER.IMS_PER_BATCH,
        "config": os.path.join(cfg.OUTPUT_DIR, "config.yaml"),
        "device": cfg.MODEL.DEVICE,
        "torch_threads": torch.get_num_threads(),
    }


def print_table(s):
    """The summary as a table: each number next to its untrained-head baseline."""
    rows = [
        ("mask AP, novel classes (no masks in training)", "novel_mask_AP", 1),
        ("mask AP, seen classes", "seen_mask_AP", 1),
        ("mask AP50, novel classes", "novel_mask_AP50", 1),
        ("mask IoU at GT boxes, novel classes", "novel_gt_box_mask_IoU", 3),
        ("mask IoU at GT boxes, seen classes", "seen_gt_box_mask_IoU", 3),
    ]
    print(f"\n{'':46s} {'trained head':>13s} {'untrained head':>15s}")
    for name, key, digits in rows:
        print(f"{name:46s} {s[key]:13.{digits}f} {s['untrained_head_' + key]:15.{digits}f}")
    box = "box AP, all classes (the same detector)"
    print(f"{box:46s} {s['box_AP']:13.1f} {s['box_AP']:15.1f}")
    print(f"(a mask filling its GT box has IoU {s['filled_box_novel_IoU']:.3f} on novel, "
          f"{s['filled_box_seen_IoU']:.3f} on seen instances)")


# Under "detectron2", not among console.TERMINAL_LOGGERS: its INFO lines go to log.txt only.
log = logging.getLogger("detectron2.deepmac_d2.demo")


def is_harmless(message, category, filename):
    path = filename.replace(os.sep, "/")
    return any(issubclass(category, c) and re.search(m, str(message)) and re.search(f, path)
               for c, m, f in HARMLESS_WARNINGS)


def route_warnings():
    """In this process: the HARMLESS_WARNINGS and torch's "No CUDA runtime is found" note
    (logged when Detectron2 collects the environment) go to the log file; every other
    warning still shows on the terminal."""
    show = warnings.showwarning

    def showwarning(message, category, filename, lineno, file=None, line=None):
        if is_harmless(message, category, filename):
            text = warnings.formatwarning(message, category, filename, lineno, line)
            log.info("Known-harmless warning: " + text.strip())
        else:
            show(message, category, filename, lineno, file, line)

    warnings.showwarning = showwarning

    def no_cuda_note(record):
        if record.getMessage().startswith("No CUDA runtime is found"):
            log.info(record.getMessage())
            return False
        return True

    logging.getLogger("torch.utils.cpp_extension").addFilter(no_cuda_note)


class LinesToLog(io.TextIOBase):
    """A text stream whose lines become log.txt lines: for what pycocotools prints while
    Detectron2's COCOEvaluator runs (COCOeval's progress and its 12-line summary, which
    Detectron2 logs again as a table)."""

    def __init__(self):
        self._pending = ""

    def write(self, text):
        *lines, self._pending = (self._pending + text).split("\n")
        for line in lines:
            if line.strip():
                log.info(line)
        return len(text)


def main(argv=None):
    args = parse_args(argv)
    prepare_data(args)
    route_warnings()
    cfg = quiet_setup(args)
    for w in IMPORT_WARNINGS:  # now that log.txt exists
        warnings.showwarning(w.message, w.category, w.filename, w.lineno, w.file, w.line)
    print(f"[demo] training {cfg.SOLVER.MAX_ITER} iterations into {cfg.OUTPUT_DIR} "
          f"(full log: {os.path.join(cfg.OUTPUT_DIR, 'log.txt')})", flush=True)
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=False)
    model = trainer.model
    initial_head = copy.deepcopy(model.roi_heads.mask_head.state_dict())
    start = time.perf_counter()
    with contextlib.redirect_stdout(LinesToLog()):  # Detectron2's terminal handler keeps the real stdout
        trainer.train()
    # Detectron2's EvalHook evaluates after the last iteration (TEST.EVAL_PERIOD 0) and
    # leaves the results here; train() returns them only with TEST.EXPECTED_RESULTS.
    trained = trainer._last_eval_results
    seconds = {"train": time.perf_counter() - start}
    trained_head = copy.deepcopy(model.roi_heads.mask_head.state_dict())
    ious = {"trained": head_iou(cfg, model), "filled_box": filled_box_iou(cfg)}

    print("[demo] the same detector with the mask head at iteration 0:", flush=True)
    model.roi_heads.mask_head.load_state_dict(initial_head)
    start = time.perf_counter()
    with contextlib.redirect_stdout(LinesToLog()):
        untrained = evaluate(cfg, model, "inference_untrained_head")
    ious["untrained"] = head_iou(cfg, model)
    seconds["baseline"] = time.perf_counter() - start

    print(f"[demo] drawing novel-class instances of {args.pictures} val images ...", flush=True)
    pictures = draw_pictures(cfg, model, [trained_head, initial_head], args.pictures)
    model.roi_heads.mask_head.load_state_dict(trained_head)

    print("[demo] weak mask losses: two fresh mask heads on the frozen detector ...", flush=True)
    start = time.perf_counter()
    weak = weak_loss_heads(cfg, model)
    seconds["weak"] = time.perf_counter() - start
    summary = summarize(trained, untrained, ious, seconds, cfg)
    summary["pictures"] = pictures
    summary.update({f"weak_{k}_novel_{m}": v[m] for k, v in (weak or {}).items() for m in ("IoU", "AP")},
                   weak_heads_seconds=round(seconds["weak"], 1))
    path = os.path.join(cfg.OUTPUT_DIR, "summary.json")
    with open(path, "w") as f:
        # NaN (AP with no predictions at all) is not JSON: null.
        json.dump({k: None if _is_nan(v) else v for k, v in summary.items()}, f, indent=2)
    print_table(summary)
    print_weak(weak, weak_head_steps(cfg))
    print(f"\ntrain + eval {seconds['train']:.0f} s, untrained-head eval "
          f"{seconds['baseline']:.0f} s; summary: {path}")
    print(f"pictures: {pictures[-1] if pictures else 'none'}")


def _is_nan(v):
    return isinstance(v, float) and math.isnan(v)


if __name__ == "__main__":
    sys.exit(main())
