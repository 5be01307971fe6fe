#!/usr/bin/env python3
"""The paper's question with the mask head isolated: per detector seed, one frozen detector;
every mask head trained on its features; means and paired differences with 95% intervals.

DeepMAC (Birodkar et al., ICCV 2021) claims that, trained on the masks of some classes
only, (a) a deeper mask head segments the other classes better, and (b) only when it
learns from ground-truth boxes rather than from sampled proposals. The from-scratch grid
(novel_class_generalization.py) trains a whole Mask R-CNN per cell, so a cell's mask AP
also measures its own detector. Here, per detector seed:

1. a detector (the config's Mask R-CNN without its mask branch) learns the boxes of every
   class, once (reused by later runs of this command);
2. it is frozen, and its FPN features, RPN proposals and validation detections are
   computed once (benchmarks/harness/frozen_detector.py);
3. each mask head of --heads trains on those features alone, per head seed, in three
   modes: the seen classes' masks on GT boxes, the same on sampled proposals, and the
   masks of every class on GT boxes (the ceiling); its loss curve is kept;
4. each trained head is scored on the SAME detections: mask AP on the novel and the seen
   classes (so a difference in mask AP is the head's alone) and mean mask IoU at the GT
   boxes.

Per cell: the mean over detector x head seeds with a 95% interval; the paper's claims as
paired differences (same detector seed, same head seed) with 95% intervals: each
hourglass vs the default head on GT boxes, and GT boxes vs proposals per head. The
intervals are Student-t on the per-detector-seed means (detector seeds are the
independent units; head seeds within one detector are averaged), so they are honest
about both sources of noise. Writes results.md, results.json, head_study.png (cell means
with intervals, paired differences) and loss_curves.png under --output-dir.

    python benchmarks/head_study.py                       # synthetic shapes, CPU
    python benchmarks/head_study.py --device cuda --det-seeds 5 --head-seeds 5 --head-iters 3000

Interrupted runs resume: finished detectors and finished head runs are reused when their
settings are unchanged.
"""
import argparse
import json
import math
import os
import sys
import tempfile
import time

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import deepmac_d2  # noqa: E402,F401  (registers heads, ROI heads, datasets)
from deepmac_d2.data.synthetic import SPLITS  # noqa: E402
from deepmac_d2.engine import ACCELERATORS, load_config  # noqa: E402
from harness.console import metric  # noqa: E402
from harness.frozen_detector import (  # noqa: E402
    cache_frozen_images,
    evaluate_mask_head,
    frozen_feature_bytes,
    frozen_mappers,
    image_subset,
    precise_mask_head_bn,
    train_mask_head,
)
from harness.grid import (  # noqa: E402
    WORKER_FILE,
    GridRun,
    mean_ci95,
    run_grid,
    spec_config,
    write_json,
)
from detectron2.data import DatasetCatalog  # noqa: E402
from detectron2.modeling import build_roi_heads  # noqa: E402
from novel_class_generalization import (  # noqa: E402
    DEFAULT_CONFIG,
    STOCK,
    _number,
    class_split,
    prepare_data,
    train_run,
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# A head is a convnet variant (or Detectron2's stock head), optionally "-w<width>" for
# another MODEL.ROI_MASK_HEAD.CONV_DIM than the config's (the reference's Hourglass-52
# width is 64; the synthetic config's heads are 32 wide).
DEFAULT_HEADS = (STOCK, "default", "hourglass10", "hourglass20", "hourglass52", "hourglass52-w64")
MODES = ("gt_boxes", "proposals", "ceiling")
MODE_LABELS = {"gt_boxes": "GT boxes", "proposals": "sampled proposals",
               "ceiling": "GT boxes, masks of all classes (ceiling)"}
METRICS = (("novel_mask_AP", "mask AP novel", 1), ("seen_mask_AP", "mask AP seen", 1),
           ("novel_IoU", "IoU@GT novel", 3), ("seen_IoU", "IoU@GT seen", 3))
FROZEN_FILE = "frozen.pt"


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--config", "--config-file", dest="config_file", default=DEFAULT_CONFIG,
                   metavar="FILE", help="default: the synthetic demo config")
    p.add_argument("--output-dir", default=os.path.join("output", "head_study"))
    p.add_argument("--detector-dir", default=None, metavar="DIR",
                   help="where the detectors are trained, or found and reused: another "
                        "study's --output-dir, to train its heads longer or otherwise on the "
                        "same detectors (default: --output-dir)")
    p.add_argument("--heads", default=",".join(DEFAULT_HEADS),
                   help="comma-separated: stock, default, hourglassN, each optionally "
                        "-w<width> (default: %(default)s)")
    p.add_argument("--modes", default=",".join(MODES), help="of: %(default)s")
    p.add_argument("--det-seeds", type=int, default=3, help="detectors (seeds 0..N-1)")
    p.add_argument("--head-seeds", type=int, default=3, help="head runs per detector and cell")
    p.add_argument("--det-iters", type=int, default=1000, help="detector training iterations")
    # Sized so that the default study (3 x 3 seeds, 6 heads, 3 modes) fits 90 minutes on 2
    # CPU cores: 200 steps of 4 images cost 5.4 minutes per detector and head seed
    # (1.6 s per step for the 18 cells, 0.9 s of it on proposals, which give a step 2-3x
    # the ROIs of GT boxes).
    p.add_argument("--head-iters", type=int, default=200, help="mask-head training steps")
    p.add_argument("--head-batch", type=int, default=4, help="images per mask-head step")
    # 0.1: at batch 8 (200 steps, detector 0, GT boxes) it gave the lowest training loss
    # of 0.02, 0.05 and 0.1 for every head of DEFAULT_HEADS, without divergence; at
    # batch 4, 0.05-0.2 end within 0.01 of each other (default, hourglass52).
    p.add_argument("--head-lr", type=float, default=0.1, help="mask-head peak LR (SGD)")
    p.add_argument("--bn-batches", type=int, default=10,
                   help="training batches over which the trained head's BatchNorm "
                        "statistics are recomputed (precise BN; 0: keep the running ones)")
    p.add_argument("--max-detections", type=int, default=None,
                   help="detections per image scored for mask AP, highest first (default: "
                        "10 on the synthetic data, whose images hold 2-5 objects; else the "
                        "config's TEST.DETECTIONS_PER_IMAGE)")
    p.add_argument("--max-train-images", type=int, default=None, metavar="N",
                   help="cache the features of N training images (a fixed random subset) "
                        "instead of all: the cache is held in memory, ~2 views x 256 "
                        "channels x the FPN's pixels per image (the study stops before "
                        "training if it would not fit, and says what fits)")
    p.add_argument("--max-val-images", type=int, default=None, metavar="N",
                   help="likewise for the validation images (scores are on those)")
    p.add_argument("--device", choices=ACCELERATORS, default="cpu")
    p.add_argument("--data-root", default=None, help="synthetic data (default: the demo's)")
    p.add_argument("--num-train", type=int, help=argparse.SUPPRESS)
    p.add_argument("--num-val", type=int, help=argparse.SUPPRESS)
    p.add_argument("--run-dir", help=argparse.SUPPRESS)  # the worker: one detector
    p.add_argument("opts", nargs=argparse.REMAINDER, help="KEY VALUE config overrides")
    args = p.parse_args(argv)
    if args.data_root is None:
        from deepmac_d2.data.synthetic import default_root
        args.data_root = default_root()
    args.heads = args.heads.split(",")
    args.modes = args.modes.split(",")
    bad = [m for m in args.modes if m not in MODES]
    if bad:
        p.error(f"--modes: unknown {bad}; valid: {', '.join(MODES)}")
    for h in args.heads:
        try:
            head_opts(h)
        except ValueError as e:
            p.error(f"--heads: {e}")
    for name in ("max_train_images", "max_val_images"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1 (leave it out for every image)")
    if args.det_seeds < 2 or args.head_seeds < 1:
        p.error("--det-seeds must be >= 2 (an interval needs two detectors) and --head-seeds >= 1")
    return args


def head_opts(head):
    """Config overrides that select ``head`` (see DEFAULT_HEADS)."""
    from deepmac_d2.modeling import CONVNET_VARIANTS
    variant, _, width = head.partition("-w")
    if variant not in (STOCK,) + CONVNET_VARIANTS or (width and not width.isdigit()):
        raise ValueError(f"{head!r}: a head is one of {(STOCK,) + CONVNET_VARIANTS}, "
                         "optionally followed by -w<width>, e.g. hourglass52-w64")
    if variant == STOCK:
        opts = ["MODEL.ROI_MASK_HEAD.NAME", "MaskRCNNConvUpsampleHead", "MODEL.ROI_MASK_HEAD.NORM", ""]
    else:
        opts = ["MODEL.ROI_MASK_HEAD.NAME", "DeepMaskHead",
                "MODEL.ROI_MASK_HEAD.CONVNET_VARIANT", variant]
    return opts + (["MODEL.ROI_MASK_HEAD.CONV_DIM", width] if width else [])


def mode_opts(mode):
    opts = ["MODEL.ROI_MASK_HEAD.USE_GT_BOXES", str(mode != "proposals")]
    return opts + (["MODEL.ROI_MASK_HEAD.ALLOWED_CLASS_IDS", "[]"] if mode == "ceiling" else [])


def detector_config(args, seed, folder):
    """The config's Mask R-CNN without its mask branch, ``--det-iters`` long (LR steps
    at the same fractions of the run), seeded."""
    base = load_config(argparse.Namespace(config_file=args.config_file, opts=args.opts))
    steps = tuple(round(s * args.det_iters / base.SOLVER.MAX_ITER) for s in base.SOLVER.STEPS)
    opts = args.opts + [
        "MODEL.ROI_HEADS.NAME", "DeepMaskROIHeads", "MODEL.MASK_ON", "False",
        "SOLVER.MAX_ITER", str(args.det_iters),
        "SOLVER.STEPS", str(tuple(s for s in steps if 0 < s < args.det_iters)),
        "DEEPMAC.ACCELERATOR", args.device, "SEED", str(seed), "OUTPUT_DIR", folder,
    ]
    return load_config(argparse.Namespace(config_file=args.config_file, opts=opts))


def train_detector(folder):
    """Worker: train one detector, evaluate its boxes, cache what the heads need."""
    spec, cfg, trainer, coco = train_run(folder, "detector_config.yaml")
    model = trainer.model
    began = time.perf_counter()
    train, val = cached_images(cfg, spec.get("images", {}))
    train = cache_frozen_images(model, train, frozen_mappers(cfg, train=True), detections=False)
    val = cache_frozen_images(model, val, frozen_mappers(cfg, train=False), detections=True)
    shapes = {k: (v.channels, v.stride) for k, v in model.backbone.output_shape().items()}
    torch.save({"train": train, "val": val, "shapes": shapes},
               os.path.join(folder, FROZEN_FILE))
    split = spec["class_split"]
    write_json(os.path.join(folder, WORKER_FILE), {
        "box_AP": metric(coco, "bbox"),
        "novel_box_AP": metric(coco, f"bbox/{split['novel']['subset']}"),
        "seen_box_AP": metric(coco, f"bbox/{split['seen']['subset']}"),
        "cache_seconds": time.perf_counter() - began,
    })


def cached_images(cfg, counts):
    """The training and validation images whose features are cached (``counts``:
    ``{"train": N, "val": M}``, either optional; all images otherwise)."""
    return (image_subset(DatasetCatalog.get(cfg.DATASETS.TRAIN[0]), counts.get("train")),
            image_subset(DatasetCatalog.get(cfg.DATASETS.TEST[0]), counts.get("val")))


def check_cache_fits(cfg, counts, available_bytes):
    """Stop before any training when one detector's feature cache would take more than
    half of ``available_bytes``, naming what fits."""
    from detectron2.modeling import build_backbone
    backbone = build_backbone(cfg)
    train, val = cached_images(cfg, counts)
    train_bytes = frozen_feature_bytes(cfg, backbone, train, views=2)
    val_bytes = frozen_feature_bytes(cfg, backbone, val, views=1)
    need = train_bytes + val_bytes
    if need <= available_bytes / 2:
        return
    per_train = train_bytes / len(train)
    fits = max(0, int((available_bytes / 2 - val_bytes) / per_train))
    raise SystemExit(
        f"[heads] the frozen features of {len(train)} training and {len(val)} validation "
        f"images at INPUT.MIN_SIZE_TEST {cfg.INPUT.MIN_SIZE_TEST} / MAX_SIZE_TEST "
        f"{cfg.INPUT.MAX_SIZE_TEST} take {need / 2**30:.1f} GiB ({per_train / 2**20:.0f} MiB "
        f"per training image); this machine has {available_bytes / 2**30:.1f} GiB available "
        f"and the study uses at most half. Cache fewer: --max-train-images {fits}"
        + ("" if fits else " with --max-val-images, or a smaller INPUT.MIN_SIZE_TEST"))


def available_memory_bytes():
    """MemAvailable of /proc/meminfo; physical memory where there is none."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def head_config(args, det_cfg_text, head, mode):
    """The detector's config with the mask branch on, ``head`` and ``mode``'s keys."""
    # A file of this process's own: studies sharing --output-dir or --detector-dir may run
    # side by side (e.g. one per subset of --heads), each at another detector.
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", dir=args.output_dir) as f:
        f.write(det_cfg_text)
        f.flush()
        return load_config(argparse.Namespace(
            config_file=f.name, opts=["MODEL.MASK_ON", "True"] + head_opts(head) + mode_opts(mode)))


class HeadProgress:
    """Runs done of the study's head runs, and an ETA from what runs of the same head and
    mode cost so far (other runs' mean for a cell not yet timed: an underestimate while
    the first detector's deep heads are still to come)."""

    def __init__(self, args):
        self.planned = [(h, m) for _ in range(args.det_seeds) for h in args.heads
                        for m in args.modes for _ in range(args.head_seeds)]
        self.done = 0
        self.costs = {}

    def record(self, head, mode, seconds=None):
        """One run finished (``seconds``: its cost; None when reused). Returns a progress
        string."""
        self.done += 1
        if seconds is not None:
            self.costs.setdefault((head, mode), []).append(seconds)
        timed = [c for cs in self.costs.values() for c in cs]
        if not timed:
            return f"{self.done}/{len(self.planned)}"
        eta = sum(np.mean(self.costs.get(cell, timed)) for cell in self.planned[self.done:])
        return f"{self.done}/{len(self.planned)}, ETA {eta / 60:.0f} min"


def run_heads(args, det_seed, det_folder, det_cfg_text, split, log, progress):
    """Every (head, mode, head seed) on one frozen detector (in ``det_folder``); one JSON
    per run under --output-dir, reused when its spec is unchanged."""
    frozen = None
    out = []
    for head in args.heads:
        for mode in args.modes:
            for head_seed in range(args.head_seeds):
                name = f"{head}-{mode}-h{head_seed}"
                path = os.path.join(args.output_dir, os.path.basename(det_folder), "heads",
                                    name + ".json")
                spec = {"head": head, "mode": mode, "det_seed": det_seed, "head_seed": head_seed,
                        "iters": args.head_iters, "batch": args.head_batch, "lr": args.head_lr,
                        "bn_batches": args.bn_batches,
                        "max_detections": args.max_detections}
                if os.path.isfile(path):
                    with open(path) as f:
                        stored = json.load(f)
                    if stored["spec"] == spec:
                        out.append(stored)
                        progress.record(head, mode)
                        continue
                if frozen is None:
                    frozen = torch.load(os.path.join(det_folder, FROZEN_FILE), weights_only=False)
                cfg = head_config(args, det_cfg_text, head, mode)
                torch.manual_seed(1000 * det_seed + head_seed)
                roi_heads = build_roi_heads(cfg, _shapes(frozen)).to(args.device)
                began = time.perf_counter()
                generator = torch.Generator().manual_seed(1000 * det_seed + head_seed)
                batch = args.head_batch
                losses = train_mask_head(
                    roi_heads, frozen["train"], iterations=args.head_iters, ims_per_batch=batch,
                    base_lr=args.head_lr, weight_decay=cfg.SOLVER.WEIGHT_DECAY,
                    generator=generator, device=args.device,
                )
                if args.bn_batches:
                    precise_mask_head_bn(roi_heads, frozen["train"], num_batches=args.bn_batches,
                                         ims_per_batch=batch, generator=generator, device=args.device)
                train_seconds = time.perf_counter() - began
                scores = evaluate_mask_head(
                    roi_heads, frozen["val"], cfg.DATASETS.TEST[0],
                    {k: v["ids"] for k, v in split.items()},
                    max_detections=args.max_detections, device=args.device)
                result = {
                    "spec": spec, "losses": losses, "train_seconds": train_seconds,
                    "eval_seconds": time.perf_counter() - began - train_seconds,
                    "params": sum(p.numel() for p in roi_heads.mask_head.parameters()),
                    "novel_mask_AP": scores["novel"]["AP"], "seen_mask_AP": scores["seen"]["AP"],
                    "novel_IoU": scores["novel"]["IoU_at_GT"], "seen_IoU": scores["seen"]["IoU_at_GT"],
                }
                os.makedirs(os.path.dirname(path), exist_ok=True)
                write_json(path, result)
                out.append(result)
                done = progress.record(head, mode, train_seconds + result["eval_seconds"])
                log(f"[heads {done}] det{det_seed} {name}: novel mask AP {result['novel_mask_AP']:.1f}, "
                    f"novel IoU@GT {result['novel_IoU']:.3f}, final loss "
                    f"{np.mean(losses[-20:]):.3f} ({train_seconds / 60:.1f} + "
                    f"{result['eval_seconds'] / 60:.1f} min)")
    return out


def _shapes(frozen):
    """The ROI heads' input shapes, as the detector's backbone reported them."""
    from detectron2.layers import ShapeSpec
    return {k: ShapeSpec(channels=c, stride=s) for k, (c, s) in frozen["shapes"].items()}


def paired_differences(rows, metric_key, args):
    """The paper's two claims as paired differences of ``metric_key`` (same detector seed,
    same head seed): each deeper head minus ``default`` on GT boxes, and GT boxes minus
    proposals per head. Returns a list of ``{"claim", "mean", "ci", "values"}``."""
    by = {(r["spec"]["head"], r["spec"]["mode"], r["spec"]["det_seed"], r["spec"]["head_seed"]):
          r[metric_key] for r in rows}

    def diff(a, b, label):
        values = [[by[a + (d, h)] - by[b + (d, h)] for h in range(args.head_seeds)]
                  for d in range(args.det_seeds)]
        mean, ci = mean_ci95(values)
        return {"claim": label, "mean": mean, "ci": ci, "values": values}

    out = []
    if "gt_boxes" in args.modes and "default" in args.heads:
        for head in args.heads:
            if head not in ("default", STOCK):
                out.append(diff((head, "gt_boxes"), ("default", "gt_boxes"),
                                f"{head} - default, GT boxes"))
    if {"gt_boxes", "proposals"} <= set(args.modes):
        for head in args.heads:
            out.append(diff((head, "gt_boxes"), (head, "proposals"),
                            f"{head}: GT boxes - proposals"))
    return out


def loss_tail(curves):
    """Whether the runs' loss has flattened: the mean loss over their last 10% of steps,
    and how much lower it is than over the 10% before (means over runs)."""
    tenth = max(1, len(curves[0]) // 10)
    last = float(np.mean([c[-tenth:] for c in curves]))
    before = float(np.mean([c[-2 * tenth:-tenth] for c in curves]))
    return {"last": last, "drop": before - last}


def cell_summary(rows, args):
    """Per (head, mode): each metric's mean and 95% interval over detector x head seeds."""
    out = []
    for head in args.heads:
        for mode in args.modes:
            cell = [r for r in rows if r["spec"]["head"] == head and r["spec"]["mode"] == mode]
            entry = {"head": head, "mode": mode, "params": cell[0]["params"],
                     "minutes": float(np.mean([r["train_seconds"] for r in cell])) / 60,
                     "loss_tail": loss_tail([r["losses"] for r in cell])}
            for key, _, _ in METRICS:
                values = [[r[key] for r in cell if r["spec"]["det_seed"] == d]
                          for d in range(args.det_seeds)]
                mean, ci = mean_ci95(values)
                entry[key] = {"mean": mean, "ci": ci, "values": values}
            out.append(entry)
    return out


def _fmt(mean, ci, digits):
    if not math.isfinite(mean):
        return "n/a"
    return f"{mean:.{digits}f} [{ci[0]:.{digits}f}, {ci[1]:.{digits}f}]"


def tables(summary, differences, detectors, args):
    lines = [
        f"Detectors: box AP {_fmt(*mean_ci95([[d['box_AP']] for d in detectors]), 1)} "
        f"(novel {_fmt(*mean_ci95([[d['novel_box_AP']] for d in detectors]), 1)}), "
        f"{args.det_seeds} seeds x {args.det_iters} iterations.",
        "",
        "| mask head | params | mask training | " + " | ".join(m[1] for m in METRICS)
        + " | loss, last 10% (drop) | train min |",
        "|" + "---|" * (len(METRICS) + 5),
    ]
    for e in summary:
        cells = ["Detectron2 stock" if e["head"] == STOCK else e["head"], f"{e['params']:,}",
                 MODE_LABELS[e["mode"]]]
        cells += [_fmt(e[k]["mean"], e[k]["ci"], d) for k, _, d in METRICS]
        tail = f"{e['loss_tail']['last']:.3f} ({e['loss_tail']['drop']:.3f})"
        lines.append("| " + " | ".join(cells + [tail, f"{e['minutes']:.1f}"]) + " |")
    lines += ["", "| claim (paired: same detector, same head seed) | "
              + " | ".join(differences) + " |", "|---|" + "---|" * len(differences)]
    first = next(iter(differences.values()))
    for i, d in enumerate(first):
        cells = [d["claim"]]
        for key, diffs in differences.items():
            digits = 1 if "AP" in key else 3
            x = diffs[i]
            verdict = "" if x["ci"][0] <= 0 <= x["ci"][1] else " *"
            cells.append(_fmt(x["mean"], x["ci"], digits) + verdict)
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", f"Mean [95% interval] over {args.det_seeds} detector seeds x {args.head_seeds} "
              "head seeds: Student-t on the per-detector means (df = detector seeds - 1). "
              "* : the interval excludes 0. Mask AP in %, on each validation image's "
              f"{args.max_detections} highest-scoring detections of the frozen detector; "
              "IoU@GT: mean mask IoU per instance with the GT box given. Loss: the mean over "
              "the runs' last 10% of steps, and how much lower than over the 10% before. Each head: "
              f"{args.head_iters} SGD steps of {args.head_batch} images, peak LR {args.head_lr} (warmup, cosine), "
              + (f"BatchNorm statistics recomputed over {args.bn_batches} training batches."
                 if args.bn_batches else "BatchNorm running statistics as trained.")]
    return "\n".join(lines) + "\n"


def plot(summary, differences, rows, args, path, curves_path):
    """Cell means with intervals (novel mask AP, novel IoU@GT), the paired differences,
    and the loss curves."""
    fig, axes = plt.subplots(1, 3, figsize=(18, 4.8))
    x = np.arange(len(args.heads))
    width = 0.8 / len(args.modes)
    for ax, (key, label) in zip(axes[:2], (("novel_mask_AP", "novel mask AP (%)"),
                                            ("novel_IoU", "novel mask IoU, GT boxes given"))):
        for i, mode in enumerate(args.modes):
            cells = [next(e for e in summary if e["head"] == h and e["mode"] == mode)
                     for h in args.heads]
            means = np.array([c[key]["mean"] for c in cells])
            err = np.array([[m - c[key]["ci"][0], c[key]["ci"][1] - m]
                            for m, c in zip(means, cells)]).T
            ax.errorbar(x + (i - (len(args.modes) - 1) / 2) * width, means, yerr=err, fmt="o",
                        capsize=4, label=MODE_LABELS[mode])
        ax.set_xticks(x, args.heads, rotation=20)
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    diffs = differences["novel_IoU"]
    y = np.arange(len(diffs))
    means = np.array([d["mean"] for d in diffs])
    err = np.array([[m - d["ci"][0], d["ci"][1] - m] for m, d in zip(means, diffs)]).T
    axes[2].errorbar(means, y, xerr=err, fmt="o", capsize=4)
    axes[2].axvline(0, color="k", lw=0.8)
    axes[2].set_yticks(y, [d["claim"] for d in diffs], fontsize=8)
    axes[2].set_xlabel("paired difference in novel IoU@GT (95% interval)")
    fig.suptitle(f"Mask heads on frozen detectors: {args.det_seeds} detector x "
                 f"{args.head_seeds} head seeds, masks of the seen classes")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)

    fig, axes = plt.subplots(1, len(args.modes), figsize=(5.5 * len(args.modes), 4), sharey=True)
    top = 0.0
    for ax, mode in zip(np.atleast_1d(axes), args.modes):
        for head in args.heads:
            curves = np.array([r["losses"] for r in rows
                               if r["spec"]["head"] == head and r["spec"]["mode"] == mode])
            k = max(1, len(curves[0]) // 40)  # mean over runs, smoothed over k steps
            mean = np.convolve(curves.mean(0), np.ones(k) / k, mode="valid")
            ax.plot(np.arange(len(mean)) + k - 1, mean, label=head)
            top = max(top, mean[len(mean) // 8])
        ax.set_title(MODE_LABELS[mode], fontsize=10)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    # The first eighth of the run (the initial drop, from up to ~2.5) is cut off at the
    # top, so that the tail, where the heads differ and flatten, can be read.
    np.atleast_1d(axes)[0].set_ylim(top=1.3 * top)
    np.atleast_1d(axes)[0].set_ylabel("mask loss (mean over runs; the first steps cut off)")
    np.atleast_1d(axes)[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(curves_path, dpi=110)
    plt.close(fig)


def main(argv=None):
    args = parse_args(argv)
    if args.run_dir:
        return train_detector(args.run_dir)
    os.makedirs(args.output_dir, exist_ok=True)
    detector_dir = args.detector_dir or args.output_dir
    base = load_config(argparse.Namespace(config_file=args.config_file, opts=args.opts))
    synthetic = {f"synthetic_{s}" for s in SPLITS} & set(base.DATASETS.TRAIN + base.DATASETS.TEST)
    data = prepare_data(args) if synthetic else None
    split = class_split(base)
    if args.max_detections is None:
        args.max_detections = 10 if synthetic else base.TEST.DETECTIONS_PER_IMAGE
    counts = {k: n for k, n in (("train", args.max_train_images), ("val", args.max_val_images))
              if n is not None}
    check_cache_fits(base, counts, available_memory_bytes())
    runs = []
    for seed in range(args.det_seeds):
        folder = os.path.abspath(os.path.join(detector_dir, f"detector{seed}"))
        cfg = detector_config(args, seed, folder)
        spec = {"config": spec_config(cfg, folder), "class_split": split, "data": data}
        runs.append(GridRun(f"detector{seed}", dict(spec, images=counts) if counts else spec))
    began = time.perf_counter()
    detectors = run_grid(
        runs, detector_dir,
        worker_command=lambda folder: [sys.executable, os.path.abspath(__file__),
                                       "--run-dir", folder],
        env=dict(os.environ, DEEPMAC_SYNTHETIC_ROOT=os.path.abspath(args.data_root)),
        describe=lambda r: f"(box AP {_number(r['metrics']['box_AP']):.1f})",
    )
    failed = [run.name for run, r in zip(runs, detectors) if r.get("failed")]
    if failed:
        print(f"[heads] detector(s) failed: {failed}; see their console.txt", file=sys.stderr)
        return 1
    rows = []
    progress = HeadProgress(args)
    for seed, (run, det) in enumerate(zip(runs, detectors)):
        folder = os.path.join(detector_dir, run.name)
        rows += run_heads(args, seed, folder, run.spec["config"], split,
                          log=lambda m: print(m, flush=True), progress=progress)
    summary = cell_summary(rows, args)
    differences = {key: paired_differences(rows, key, args) for key in ("novel_IoU", "novel_mask_AP")}
    metrics = [d["metrics"] for d in detectors]
    head_minutes = sum(r["train_seconds"] + r["eval_seconds"] for r in rows) / 60
    detector_minutes = ", ".join(f"{d['wall_seconds'] / 60:.1f}" for d in detectors)
    text = tables(summary, differences, metrics, args) + (
        f"\nCost: detectors {detector_minutes} min; mask heads {head_minutes:.1f} min "
        "(training and evaluation, as each run recorded it).\n")
    paths = {k: os.path.join(args.output_dir, f) for k, f in (
        ("table", "results.md"), ("json", "results.json"), ("plot", "head_study.png"),
        ("curves", "loss_curves.png"))}
    with open(paths["table"], "w") as f:
        f.write(text)
    write_json(paths["json"], {
        "command": [os.path.relpath(__file__, ROOT)] + (argv if argv is not None else sys.argv[1:]),
        "args": {k: v for k, v in vars(args).items() if k != "run_dir"},
        "class_split": split, "synthetic_data": data, "detectors": metrics,
        "summary": summary, "differences": differences,
        "runs": rows, "wall_seconds": time.perf_counter() - began,
        # What the study costs, whether or not this invocation reused its parts.
        "detector_minutes": [d["wall_seconds"] / 60 for d in detectors],
        "head_minutes": head_minutes,
    })
    plot(summary, differences, rows, args, paths["plot"], paths["curves"])
    print("\n" + text)
    print("\n".join(f"{k}: {v}" for k, v in paths.items()))


if __name__ == "__main__":
    sys.exit(main())
