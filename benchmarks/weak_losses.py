#!/usr/bin/env python3
"""Do box-only instances teach the mask head? The weak mask losses on frozen detectors.

The synthetic data with masks for the seen classes only: the novel classes have boxes
alone. Per detector seed (the head study's detectors, benchmarks/head_study.py: trained
once on every class's boxes, frozen, features cached), each mask head of --heads trains
on GT boxes, per head seed, in four modes that differ only in MODEL.ROI_MASK_HEAD.WEAK
and the allowed classes:

    (a) none        the mask loss on the seen classes' masks (today's training)
    (b) projection  (a) + the box projection loss on every novel instance
    (c) proj+pair   (b) + the pairwise colour loss on them
    (d) ceiling     the mask loss on every class's masks, no weak loss

and is scored on the same detections: novel-class mask AP and mean mask IoU at the GT
box, per run; means with 95% intervals over the detector seeds (Student-t on the
per-detector means, as the head study) or, with a single detector, over the head seeds
(then the detector's own variance is not in them); paired differences against (a), and
the fraction of the (a)-(d) gap that (b) and (c) close. The weak settings are fixed here,
before any run (BoxInst's: dice, colour threshold 0.3, dilation 2, weights 1; ROI
enlarged 1.5x; the pairwise warmup a tenth of the run, BoxInst's 10k of 90k).
Writes results.md, results.json and weak_losses.png under --output-dir.

    python benchmarks/weak_losses.py            # 1 detector x 3 head seeds x 2 heads x 4 modes
    python benchmarks/weak_losses.py --det-seeds 3 --det-iters 1000 --head-iters 500

The defaults are sized for 2 shared CPU cores (docs/weak_losses.md has the run and its
cost); the second line is the head study's protocol with 3 detectors. Finished detectors
(shared with head_study.py through --detector-dir when --det-iters match) and finished
head runs are reused when their settings are unchanged.
"""
import argparse
import json
import math
import os
import sys
import time

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import deepmac_d2  # noqa: E402,F401  (registers heads, ROI heads, datasets)
from deepmac_d2.data.synthetic import SPLITS  # noqa: E402
from deepmac_d2.engine import load_config  # noqa: E402
from harness.frozen_detector import evaluate_mask_head, precise_mask_head_bn  # noqa: E402
from harness.frozen_weak_training import (  # noqa: E402
    frozen_input_images,
    train_mask_head_with_images,
)
from harness.grid import GridRun, mean_ci95, run_grid, spec_config, write_json  # noqa: E402
from detectron2.modeling import build_roi_heads  # noqa: E402
import head_study  # noqa: E402
from novel_class_generalization import DEFAULT_CONFIG, class_split, prepare_data  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODES = ("none", "projection", "projection_pairwise", "ceiling")
MODE_LABELS = {"none": "(a) no weak loss", "projection": "(b) box projection",
               "projection_pairwise": "(c) projection + pairwise",
               "ceiling": "(d) masks of all classes (ceiling)"}
METRICS = (("novel_IoU", "IoU@GT novel", 3), ("novel_mask_AP", "mask AP novel", 1),
           ("seen_IoU", "IoU@GT seen", 3), ("seen_mask_AP", "mask AP seen", 1))
# Fixed before any run (see the docstring); the pairwise warmup is set from --head-iters.
WEAK = {"BOX_PROJECTION_LOSS": "dice", "PAIRWISE_COLOR_THRESHOLD": 0.3, "PAIRWISE_DILATION": 2,
        "ROI_EXPAND": 1.5, "APPLY_TO": "no_mask"}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output-dir", default=os.path.join("output", "weak_losses"))
    p.add_argument("--detector-dir", default=os.path.join("output", "head_study"),
                   help="where the head study's detectors are, or are trained (default: %(default)s)")
    p.add_argument("--heads", default="default,hourglass10", help="comma-separated (head_study.py's names)")
    p.add_argument("--modes", default=",".join(MODES), help="of: %(default)s")
    p.add_argument("--det-seeds", type=int, default=1)
    p.add_argument("--det-iters", type=int, default=600)
    p.add_argument("--head-seeds", type=int, default=3)
    p.add_argument("--head-iters", type=int, default=300)
    p.add_argument("--head-batch", type=int, default=4)
    p.add_argument("--head-lr", type=float, default=0.1, help="the head study's peak LR")
    p.add_argument("--bn-batches", type=int, default=10)
    p.add_argument("--max-detections", type=int, default=10)
    p.add_argument("--device", default="cpu")
    p.add_argument("--data-root", default=None, help="synthetic data (default: the demo's)")
    p.add_argument("--num-train", type=int, help=argparse.SUPPRESS)
    p.add_argument("--num-val", type=int, help=argparse.SUPPRESS)
    p.add_argument("opts", nargs=argparse.REMAINDER, help="KEY VALUE config overrides")
    args = p.parse_args(argv)
    if args.data_root is None:
        from deepmac_d2.data.synthetic import default_root
        args.data_root = default_root()
    args.heads, args.modes = args.heads.split(","), args.modes.split(",")
    bad = [m for m in args.modes if m not in MODES]
    if bad or "none" not in args.modes:
        p.error(f"--modes: {bad or 'none is missing'}; valid: {', '.join(MODES)}, with none")
    if args.det_seeds < 1 or args.head_seeds < 1 or max(args.det_seeds, args.head_seeds) < 2:
        p.error("an interval needs 2 units: --det-seeds >= 2, or 1 with --head-seeds >= 2")
    return args


def mode_opts(mode, head_iters):
    """Config overrides of one mode (on top of GT-box training)."""
    opts = ["MODEL.ROI_MASK_HEAD.USE_GT_BOXES", "True"]
    if mode == "ceiling":
        return opts + ["MODEL.ROI_MASK_HEAD.ALLOWED_CLASS_IDS", "[]"]
    weak = dict(WEAK, WARMUP_ITERS=head_iters // 10,
                BOX_PROJECTION_WEIGHT=0.0 if mode == "none" else 1.0,
                PAIRWISE_WEIGHT=1.0 if mode == "projection_pairwise" else 0.0)
    for key, value in weak.items():
        opts += [f"MODEL.ROI_MASK_HEAD.WEAK.{key}", str(value)]
    return opts


def run_heads(args, det_seed, folder, det_cfg_text, split, log):
    frozen, images, out = None, None, []
    for head in args.heads:
        for mode in args.modes:
            for head_seed in range(args.head_seeds):
                name = f"{head}-{mode}-h{head_seed}"
                path = os.path.join(args.output_dir, f"detector{det_seed}", name + ".json")
                spec = {"head": head, "mode": mode, "det_seed": det_seed, "head_seed": head_seed,
                        "iters": args.head_iters, "batch": args.head_batch, "lr": args.head_lr,
                        "bn_batches": args.bn_batches, "max_detections": args.max_detections,
                        "opts": mode_opts(mode, args.head_iters)}
                if os.path.isfile(path):
                    with open(path) as f:
                        stored = json.load(f)
                    if stored["spec"] == spec:
                        out.append(stored)
                        continue
                cfg = head_study.head_config(args, det_cfg_text, head, "gt_boxes")
                cfg.merge_from_list(mode_opts(mode, args.head_iters))
                if frozen is None:
                    frozen = torch.load(os.path.join(folder, head_study.FROZEN_FILE), weights_only=False)
                    images = frozen_input_images(cfg, head_study.cached_images(cfg, {})[0],
                                                 frozen["train"])
                torch.manual_seed(1000 * det_seed + head_seed)
                roi_heads = build_roi_heads(cfg, head_study._shapes(frozen)).to(args.device)
                generator = torch.Generator().manual_seed(1000 * det_seed + head_seed)
                began = time.perf_counter()
                curves = train_mask_head_with_images(
                    roi_heads, frozen["train"], images, iterations=args.head_iters,
                    ims_per_batch=args.head_batch, base_lr=args.head_lr,
                    weight_decay=cfg.SOLVER.WEIGHT_DECAY, generator=generator, device=args.device)
                if args.bn_batches:
                    precise_mask_head_bn(roi_heads, frozen["train"], num_batches=args.bn_batches,
                                         ims_per_batch=args.head_batch, generator=generator,
                                         device=args.device)
                train_seconds = time.perf_counter() - began
                scores = evaluate_mask_head(roi_heads, frozen["val"], cfg.DATASETS.TEST[0],
                                            {k: v["ids"] for k, v in split.items()},
                                            max_detections=args.max_detections, device=args.device)
                result = {"spec": spec, "losses": curves, "train_seconds": train_seconds,
                          "eval_seconds": time.perf_counter() - began - train_seconds,
                          "novel_mask_AP": scores["novel"]["AP"], "seen_mask_AP": scores["seen"]["AP"],
                          "novel_IoU": scores["novel"]["IoU_at_GT"], "seen_IoU": scores["seen"]["IoU_at_GT"]}
                os.makedirs(os.path.dirname(path), exist_ok=True)
                write_json(path, result)
                out.append(result)
                log(f"[weak] det{det_seed} {name}: novel IoU@GT {result['novel_IoU']:.3f}, novel "
                    f"mask AP {result['novel_mask_AP']:.1f} ({train_seconds / 60:.1f} min)")
    return out


def summarise(rows, args):
    """Per (head, mode): means and intervals; per head and weak mode: the paired
    difference to (a) and the fraction of the (a)-(d) gap it closes."""
    def values(head, mode, key):
        """The metric by independent unit: detector seeds (head seeds nested in them), or
        head seeds on a single detector (then the interval leaves out the detector's
        variance). Sorted by seed, so that differences pair runs of the same seeds."""
        cell = sorted((r for r in rows if r["spec"]["head"] == head and r["spec"]["mode"] == mode),
                      key=lambda r: (r["spec"]["det_seed"], r["spec"]["head_seed"]))
        if args.det_seeds == 1:
            return [[r[key]] for r in cell]
        return [[r[key] for r in cell if r["spec"]["det_seed"] == d] for d in range(args.det_seeds)]

    cells, diffs = [], []
    for head in args.heads:
        for mode in args.modes:
            cell = {"head": head, "mode": mode}
            for key, _, _ in METRICS:
                mean, ci = mean_ci95(values(head, mode, key))
                cell[key] = {"mean": mean, "ci": ci, "values": values(head, mode, key)}
            cells.append(cell)
        for mode in args.modes:
            if mode == "none":
                continue
            entry = {"head": head, "mode": mode}
            for key, _, _ in METRICS:
                x, a = np.array(values(head, mode, key)), np.array(values(head, "none", key))
                mean, ci = mean_ci95((x - a).tolist())
                entry[key] = {"mean": mean, "ci": ci}
                if "ceiling" in args.modes:
                    gap = np.mean(values(head, "ceiling", key)) - np.mean(a)
                    entry[key]["gap_closed"] = float(mean / gap) if gap else float("nan")
            diffs.append(entry)
    return cells, diffs


def _fmt(mean, ci, digits):
    if not math.isfinite(mean):
        return "n/a"
    return f"{mean:.{digits}f} [{ci[0]:.{digits}f}, {ci[1]:.{digits}f}]"


def tables(cells, diffs, args):
    lines = ["| mask head | training | " + " | ".join(m[1] for m in METRICS) + " |",
             "|" + "---|" * (len(METRICS) + 2)]
    for c in cells:
        lines.append(f"| {c['head']} | {MODE_LABELS[c['mode']]} | "
                     + " | ".join(_fmt(c[k]["mean"], c[k]["ci"], d) for k, _, d in METRICS) + " |")
    lines += ["", "| mask head | minus (a) | IoU@GT novel | gap closed | mask AP novel | gap closed "
              "| IoU@GT seen |", "|---|---|---|---|---|---|---|"]
    for e in diffs:
        def gap(key):
            g = e[key].get("gap_closed", float("nan"))
            return f"{100 * g:.0f}%" if math.isfinite(g) else "n/a"
        lines.append(f"| {e['head']} | {MODE_LABELS[e['mode']]} | "
                     f"{_fmt(e['novel_IoU']['mean'], e['novel_IoU']['ci'], 3)} | {gap('novel_IoU')} | "
                     f"{_fmt(e['novel_mask_AP']['mean'], e['novel_mask_AP']['ci'], 1)} | "
                     f"{gap('novel_mask_AP')} | {_fmt(e['seen_IoU']['mean'], e['seen_IoU']['ci'], 3)} |")
    units = (f"{args.det_seeds} frozen detectors x {args.head_seeds} head seed(s) (Student-t on "
             "the per-detector means)" if args.det_seeds > 1 else
             f"{args.head_seeds} head seeds on one frozen detector (Student-t over the head seeds; "
             "the detector's own variance is not in the interval)")
    lines += ["", f"Mean [95% interval] over {units}; differences paired by detector "
              f"and head seed; gap closed = mean difference to (a) / ((d) - (a)). Each head: "
              f"{args.head_iters} SGD steps of {args.head_batch} images on GT boxes, peak LR "
              f"{args.head_lr}, precise BN over {args.bn_batches} batches; mask AP on each "
              f"validation image's {args.max_detections} best detections."]
    return "\n".join(lines) + "\n"


def plot(cells, args, path):
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    x = np.arange(len(args.heads))
    width = 0.8 / len(args.modes)
    for ax, (key, label) in zip(axes, (("novel_IoU", "novel mask IoU, GT box given"),
                                       ("novel_mask_AP", "novel mask AP (%)"))):
        for i, mode in enumerate(args.modes):
            cs = [next(c for c in cells if c["head"] == h and c["mode"] == mode) for h in args.heads]
            means = np.array([c[key]["mean"] for c in cs])
            err = np.array([[m - c[key]["ci"][0], c[key]["ci"][1] - m] for m, c in zip(means, cs)]).T
            ax.errorbar(x + (i - (len(args.modes) - 1) / 2) * width, means, yerr=err, fmt="o",
                        capsize=4, label=MODE_LABELS[mode])
        ax.set_xticks(x, args.heads)
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"Weak mask losses for the box-only novel classes: {args.det_seeds} frozen "
                 f"detector(s) x {args.head_seeds} head seed(s), mean and 95% interval")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None):
    args = parse_args(argv)
    os.makedirs(args.output_dir, exist_ok=True)
    base = load_config(argparse.Namespace(config_file=DEFAULT_CONFIG, opts=args.opts))
    data = prepare_data(args)
    split = class_split(base)
    # The head study's detectors, specified exactly as head_study.py does, so either
    # script reuses the other's.
    study = argparse.Namespace(config_file=DEFAULT_CONFIG, opts=args.opts, det_iters=args.det_iters,
                               device=args.device, output_dir=args.output_dir)
    runs = []
    for seed in range(args.det_seeds):
        folder = os.path.abspath(os.path.join(args.detector_dir, f"detector{seed}"))
        cfg = head_study.detector_config(study, seed, folder)
        runs.append(GridRun(f"detector{seed}", {"config": spec_config(cfg, folder),
                                                "class_split": split, "data": data}))
    began = time.perf_counter()
    detectors = run_grid(
        runs, args.detector_dir,
        worker_command=lambda folder: [sys.executable, head_study.__file__, "--run-dir", folder],
        env=dict(os.environ, DEEPMAC_SYNTHETIC_ROOT=os.path.abspath(args.data_root)))
    if any(d.get("failed") for d in detectors):
        print("[weak] a detector failed; see its console.txt", file=sys.stderr)
        return 1
    rows = []
    for seed, run in enumerate(runs):
        rows += run_heads(args, seed, os.path.join(args.detector_dir, run.name),
                          run.spec["config"], split, log=lambda m: print(m, flush=True))
    cells, diffs = summarise(rows, args)
    text = tables(cells, diffs, args)
    paths = {k: os.path.join(args.output_dir, f) for k, f in
             (("table", "results.md"), ("json", "results.json"), ("plot", "weak_losses.png"))}
    with open(paths["table"], "w") as f:
        f.write(text)
    write_json(paths["json"], {
        "command": [os.path.relpath(__file__, ROOT)] + (argv if argv is not None else sys.argv[1:]),
        "args": vars(args), "weak_settings": WEAK, "class_split": split, "synthetic_data": data,
        "detectors": [d["metrics"] for d in detectors], "cells": cells, "differences": diffs,
        "runs": rows, "wall_seconds": time.perf_counter() - began})
    plot(cells, args, paths["plot"])
    print("\n" + text)
    print("\n".join(f"{k}: {v}" for k, v in paths.items()))


if __name__ == "__main__":
    sys.exit(main())
