#!/usr/bin/env python3
"""Does the paper's effect hold here? Mask heads x mask-training boxes, on seen and novel classes.

DeepMAC's claim (Birodkar et al., ICCV 2021): trained on the masks of some classes only,
deeper mask heads segment the *other* classes much better, and only when the mask head
learns from ground-truth boxes rather than from sampled proposals. This trains the grid

    mask head  in --heads (default: Detectron2's stock head, DeepMaskHead default,
               hourglass20, hourglass52)
  x mask training on sampled proposals (Detectron2's default) | on ground-truth boxes
  x seed     in 0 .. --seeds - 1

with masks for the seen classes only, plus a fully supervised ceiling (masks for every
class) with the deepest head of --heads, on GT boxes, per seed. Every run has the same
config, data and schedule apart from those keys. Per run: box AP, mask AP on the seen
and on the novel classes, mean mask IoU of seen / novel instances with the GT boxes
given (the mask head alone), wall time, mask-head parameters. Writes, under
--output-dir: one folder per run (reused when the grid is run again), results.md (the
table, also printed), results.json (every number) and novel_mask_AP.png.

    python benchmarks/novel_class_generalization.py            # synthetic shapes, CPU
    python benchmarks/novel_class_generalization.py --seeds 3
    python benchmarks/novel_class_generalization.py --config configs/voc_r50_hg52.yaml \\
        --device cuda --output-dir output/ncg_voc SOLVER.IMS_PER_BATCH 16 SOLVER.BASE_LR 0.03

Each run trains in one process on one device; with --config it keeps the config's
schedule unless overridden (above: the reference's batch 64 and LR cut by 4 for one GPU).
With --config, the seen classes are the config's MODEL.ROI_MASK_HEAD.ALLOWED_CLASS_IDS
and the novel ones the DATASETS.EVAL_CLASS_SUBSETS entry disjoint from them (e.g. VOC
-> non-VOC). Trailing KEY VALUE pairs override the config for every run; the grid's own
keys (head, mask-training boxes, allowed classes, seed, iterations, output) come last.
"""
import os

import argparse
import json
import math
import sys

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt
import numpy as np

import deepmac_d2  # noqa: F401  (registers heads, ROI heads, datasets)
from deepmac_d2.data.class_splits import parse_class_subset, resolve_class_ids
from deepmac_d2.data.synthetic import (
    PARAMS_FILE,
    SPLITS,
    default_root,
    prepare_synthetic,
    register_synthetic,
)
from deepmac_d2.engine import ACCELERATORS, Trainer, load_config
from harness.console import metric, quiet_setup
from harness.grid import (
    SPEC_FILE,
    WORKER_FILE,
    GridRun,
    aggregate,
    run_grid,
    spec_config,
    write_json,
)
from deepmac_d2.evaluation import given_box_mask_iou
from deepmac_d2.modeling import CONVNET_VARIANTS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

DEFAULT_CONFIG = os.path.join(ROOT, "configs", "demo_synthetic_hg20.yaml")
# Half the demo config's 1000 iterations (its LR steps move with them, see
# scaled_schedule), so that the default grid (9 runs) fits in 90 minutes on 2 CPU cores:
# measured there, 60 minutes in all, from 4.9 (default head) to 11.7 (hourglass52)
# minutes per run.
CPU_MAX_ITER = 500
STOCK = "stock"  # Detectron2's MaskRCNNConvUpsampleHead
HEADS = (STOCK,) + CONVNET_VARIANTS  # shallow to deep: the ceiling takes the last one given
DEFAULT_HEADS = (STOCK, "default", "hourglass20", "hourglass52")
# Mask-training boxes: Detectron2's sampled foreground proposals, or DeepMAC's GT boxes.
MODES = {
    "proposals": ["MODEL.ROI_MASK_HEAD.USE_GT_BOXES", "False"],
    "gt_boxes": ["MODEL.ROI_MASK_HEAD.USE_GT_BOXES", "True"],
}
CEILING = "gt_boxes_all_masks"
MODE_LABELS = {
    "proposals": "sampled proposals",
    "gt_boxes": "GT boxes",
    CEILING: "GT boxes, masks of all classes (ceiling)",
}
# name, results.json key, digits; AP in %, IoU in [0, 1].
COLUMNS = (
    ("box AP", "box_AP", 1),
    ("mask AP seen", "seen_mask_AP", 1),
    ("mask AP novel", "novel_mask_AP", 1),
    ("IoU@GT seen", "seen_gt_box_mask_IoU", 3),
    ("IoU@GT novel", "novel_gt_box_mask_IoU", 3),
)
METRICS = tuple(key for _, key, _ in COLUMNS) + ("mask_head_params", "wall_seconds")


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--config", "--config-file", dest="config_file", default=DEFAULT_CONFIG,
                   metavar="FILE", help="default: the synthetic demo config")
    p.add_argument("--output-dir", default=os.path.join("output", "novel_class_generalization"))
    p.add_argument("--heads", default=",".join(DEFAULT_HEADS),
                   help=f"comma-separated, of: {', '.join(HEADS)} (default: %(default)s)")
    p.add_argument("--seeds", type=int, default=1, help="runs per cell, seeds 0..N-1")
    p.add_argument("--device", choices=ACCELERATORS, help="default: the config's accelerator")
    p.add_argument("--max-iter", type=int, help=f"iterations per run (default: {CPU_MAX_ITER} "
                   "with the default config, else the config's SOLVER.MAX_ITER)")
    p.add_argument("--data-root", default=default_root(),
                   help="synthetic data; generated at the demo's size if absent (%(default)s)")
    p.add_argument("--num-train", type=int, help="(re)generate with this many train images")
    p.add_argument("--num-val", type=int, help="(re)generate with this many val images")
    p.add_argument("--run-dir", help=argparse.SUPPRESS)  # the worker: one run of the grid
    p.add_argument("opts", nargs=argparse.REMAINDER, help="KEY VALUE config overrides")
    args = p.parse_args(argv)
    unknown = [h for h in args.heads.split(",") if h not in HEADS]
    if unknown or args.seeds < 1:
        p.error(f"unknown head(s) {unknown}" if unknown else "--seeds must be >= 1")
    # Shallow to deep, whatever the order given: the ceiling takes the deepest.
    args.heads = sorted(set(args.heads.split(",")), key=HEADS.index)
    if args.max_iter is None and os.path.abspath(args.config_file) == DEFAULT_CONFIG:
        args.max_iter = CPU_MAX_ITER
    return args


def head_opts(head):
    """Config keys that select a mask head. The stock head gets Detectron2's own default
    (no norm): add_deepmac_config sets NORM "BN", the reference head's norm."""
    if head == STOCK:
        return ["MODEL.ROI_MASK_HEAD.NAME", "MaskRCNNConvUpsampleHead",
                "MODEL.ROI_MASK_HEAD.NORM", ""]
    return ["MODEL.ROI_MASK_HEAD.NAME", "DeepMaskHead", "MODEL.ROI_MASK_HEAD.CONVNET_VARIANT", head]


def class_split(cfg):
    """The seen and novel classes: ``{"seen"|"novel": {"subset": name, "ids": [...]}}``.

    Seen = the classes with masks in training (ALLOWED_CLASS_IDS); their AP is read from
    the EVAL_CLASS_SUBSETS entry with exactly those ids, the novel AP from the first entry
    sharing none of them (the subset evaluator reports ``segm/<name>``).
    """
    seen = resolve_class_ids(cfg.MODEL.ROI_MASK_HEAD.ALLOWED_CLASS_IDS)
    if not seen:
        raise ValueError("MODEL.ROI_MASK_HEAD.ALLOWED_CLASS_IDS is empty: every class has "
                         "masks, none is novel. Name the seen classes in the config.")
    subsets = [parse_class_subset(s) for s in cfg.DATASETS.EVAL_CLASS_SUBSETS]
    same = [(n, ids) for n, ids in subsets if set(ids) == set(seen)]
    disjoint = [(n, ids) for n, ids in subsets if not set(ids) & set(seen)]
    if not same or not disjoint:
        raise ValueError(
            f"DATASETS.EVAL_CLASS_SUBSETS {list(cfg.DATASETS.EVAL_CLASS_SUBSETS)} needs an entry "
            f"with the seen classes (ALLOWED_CLASS_IDS: {seen}) and one with none of them"
        )
    return {"seen": {"subset": same[0][0], "ids": same[0][1]},
            "novel": {"subset": disjoint[0][0], "ids": disjoint[0][1]}}


def scaled_schedule(solver, max_iter):
    """SOLVER overrides for a run of ``max_iter`` iterations: the LR steps at the same
    fractions of the run as in the config (keeping them would leave a shortened run at
    the peak LR to its end). The warmup keeps its length: it is what keeps training
    from scratch stable, whatever the run's length. A step that lands on the last
    iteration (in a run of a few iterations) would change nothing and is dropped:
    Detectron2's scheduler rejects it."""
    scaled = {round(s * max_iter / solver.MAX_ITER) for s in solver.STEPS}
    steps = tuple(sorted(s for s in scaled if 0 < s < max_iter))
    return ["SOLVER.MAX_ITER", str(max_iter), "SOLVER.STEPS", str(steps)]


def grid_runs(args, data=None):
    """The runs in order (head by head, so the table fills in as the grid goes), and the split.

    A run's spec holds its whole config and ``data`` (the synthetic data's parameters), so
    that a stored result is reused only if neither changed.
    """
    base = load_config(argparse.Namespace(config_file=args.config_file, opts=args.opts))
    if not base.DATASETS.TEST:
        raise ValueError("DATASETS.TEST is empty: the grid evaluates on its first test set")
    split = class_split(base)
    fixed = ["MODEL.ROI_HEADS.NAME", "DeepMaskROIHeads"]  # the ROI heads with both switches
    if args.max_iter is not None:
        fixed += scaled_schedule(base.SOLVER, args.max_iter)
    if args.device:
        fixed += ["DEEPMAC.ACCELERATOR", args.device]
    cells = [(h, m, MODES[m]) for h in args.heads for m in MODES]
    cells.append((args.heads[-1], CEILING,
                  MODES["gt_boxes"] + ["MODEL.ROI_MASK_HEAD.ALLOWED_CLASS_IDS", "[]"]))
    runs = []
    for head, mode, opts in cells:
        for seed in range(args.seeds):
            name = f"{head}-{mode}-seed{seed}"
            folder = os.path.abspath(os.path.join(args.output_dir, name))
            run_opts = (args.opts + fixed + head_opts(head) + opts
                        + ["SEED", str(seed), "OUTPUT_DIR", folder])
            cfg = load_config(argparse.Namespace(config_file=args.config_file, opts=run_opts))
            spec = {"head": head, "mode": mode, "seed": seed, "config": spec_config(cfg, folder),
                    "class_split": split, "data": data}
            runs.append(GridRun(name, spec))
    return runs, split


def train_run(folder, config_name="grid_config.yaml"):
    """A grid worker's training: the run's config from its spec (written next to it as
    ``config_name``), trained and evaluated once. Returns the spec, the config, the
    trainer and its final COCO results."""
    with open(os.path.join(folder, SPEC_FILE)) as f:
        spec = json.load(f)
    config_file = os.path.join(folder, config_name)
    with open(config_file, "w") as f:
        f.write(spec["config"])
    cfg = quiet_setup(argparse.Namespace(config_file=config_file, opts=[]))
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=False)
    trainer.train()
    return spec, cfg, trainer, trainer._last_eval_results  # left by the final EvalHook (see tools/demo.py)


def work(folder):
    """One run: train, evaluate (COCO AP by subset, IoU at GT boxes), count the head."""
    spec, cfg, trainer, coco = train_run(folder)
    split = spec["class_split"]
    ious = given_box_mask_iou(cfg, trainer.model, cfg.DATASETS.TEST[0],
                              class_subsets={k: v["ids"] for k, v in split.items()})
    head = trainer.model.roi_heads.mask_head
    write_json(os.path.join(folder, WORKER_FILE), {
        "box_AP": metric(coco, "bbox"),
        "seen_mask_AP": metric(coco, f"segm/{split['seen']['subset']}"),
        "novel_mask_AP": metric(coco, f"segm/{split['novel']['subset']}"),
        "seen_gt_box_mask_IoU": ious["per_subset"]["seen"],
        "novel_gt_box_mask_IoU": ious["per_subset"]["novel"],
        "mask_head_params": sum(p.numel() for p in head.parameters()),
        "coco_results": coco,
        "given_box_iou": ious,
    })


def prepare_data(args):
    """The synthetic data as found in --data-root (so every run and re-run sees the same
    images), generated at the demo's size only if there is none or if asked to."""
    params_path = os.path.join(args.data_root, PARAMS_FILE)
    if args.num_train or args.num_val or not os.path.isfile(params_path):
        sizes = {k: v for k, v in (("num_train", args.num_train), ("num_val", args.num_val)) if v}
        print(f"[grid] synthetic data in {args.data_root} ...", flush=True)
        prepare_synthetic(args.data_root, **sizes)
    register_synthetic(args.data_root)
    with open(params_path) as f:
        return json.load(f)


def fmt(entry, key, digits):
    """``mean`` or ``mean ± std`` (with more than one seed)."""
    mean, std = entry[key]["mean"], entry[key]["std"]
    if math.isnan(mean):
        return "n/a"
    return f"{mean:.{digits}f}" + ("" if math.isnan(std) else f" ± {std:.{digits}f}")


def table(summary, seeds, failures=None):
    """The markdown table: one row per (head, mask training), mean ± std over seeds;
    then the runs that failed (``{run name: why}``), whose cells read n/a."""
    names = ["mask head", "mask-head params", "mask training"] + [c[0] for c in COLUMNS]
    lines = ["| " + " | ".join(names + ["wall min"]) + " |", "|" + "---|" * (len(names) + 1)]
    for e in summary:
        head = "Detectron2 stock" if e["head"] == STOCK else e["head"]
        params = e["mask_head_params"]["mean"]
        cells = [head, "n/a" if math.isnan(params) else f"{int(params):,}", MODE_LABELS[e["mode"]]]
        cells += [fmt(e, key, digits) for _, key, digits in COLUMNS]
        cells.append(f"{e['wall_seconds']['mean'] / 60:.1f}")
        lines.append("| " + " | ".join(cells) + " |")
    note = (f"Mean ± sample std over {seeds} seeds. " if seeds > 1 else "One seed. ")
    text = "\n".join(lines) + "\n\n" + note + (
        "COCO AP in % on the config's first test set; IoU@GT: mean mask IoU per instance "
        "with the ground-truth boxes given to the mask head; wall: a run's whole time.\n")
    if failures:
        text += "\nFailed runs (n/a above):\n" + "".join(
            f"- `{name}`: {why}\n" for name, why in failures.items())
    return text


# The plot's panels: novel-class mask AP (the paper's measure) and novel-class IoU with
# GT boxes given (the head alone, without the detector's misses and scores).
PLOT_PANELS = (("novel_mask_AP", "mask AP on novel classes (%)"),
               ("novel_gt_box_mask_IoU", "mask IoU on novel classes, GT boxes given"))


def plot(summary, heads, path):
    """Per panel: one bar per head and mask-training mode; the ceiling as a line."""
    fig, axes = plt.subplots(1, len(PLOT_PANELS), figsize=(2 + 3.2 * len(heads), 4.2))
    x, width = np.arange(len(heads)), 0.38
    for ax, (key, ylabel) in zip(axes, PLOT_PANELS):
        by_cell = {(e["head"], e["mode"]): e[key] for e in summary}
        for i, mode in enumerate(MODES):
            means = [by_cell[h, mode]["mean"] for h in heads]
            stds = [by_cell[h, mode]["std"] for h in heads]
            spread = None if all(map(math.isnan, stds)) else np.nan_to_num(stds)  # one seed: none
            ax.bar(x + (i - 0.5) * width, means, width, yerr=spread, capsize=3,
                   label=f"masks learnt on {MODE_LABELS[mode]}")
            for xi, mean in zip(x + (i - 0.5) * width, means):
                if math.isnan(mean):  # a failed run, or nothing to evaluate: no bar, say so
                    ax.text(xi, 0, " n/a: no result", rotation=90, ha="center", va="bottom",
                            color="tab:red")
        ceiling = by_cell[heads[-1], CEILING]["mean"]
        if math.isfinite(ceiling):
            ax.axhline(ceiling, color="k", linestyle="--",
                       label=f"ceiling: {heads[-1]}, masks of all classes")
        ax.set_xticks(x, ["Detectron2 stock" if h == STOCK else h for h in heads])
        ax.set_ylabel(ylabel)
        ax.set_ylim(bottom=0)
    axes[0].legend(fontsize=8)
    fig.suptitle("Novel classes, masks of the seen classes only in training")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _number(value):
    """A stored metric as a float: results.json keeps NaN as null."""
    return float("nan") if value is None else value


def main(argv=None):
    args = parse_args(argv)
    if args.run_dir:
        return work(args.run_dir)
    os.makedirs(args.output_dir, exist_ok=True)
    base = load_config(argparse.Namespace(config_file=args.config_file, opts=args.opts))
    synthetic = {f"synthetic_{s}" for s in SPLITS} & set(base.DATASETS.TRAIN + base.DATASETS.TEST)
    data = prepare_data(args) if synthetic else None
    runs, split = grid_runs(args, data)
    print(f"[grid] {len(runs)} runs into {args.output_dir}; seen = {split['seen']['subset']}, "
          f"novel = {split['novel']['subset']}", flush=True)
    results = run_grid(
        runs, args.output_dir,
        worker_command=lambda folder: [sys.executable, os.path.abspath(__file__),
                                       "--run-dir", folder],
        # The runs read the synthetic data from where it was prepared.
        env=dict(os.environ, DEEPMAC_SYNTHETIC_ROOT=os.path.abspath(args.data_root)),
        describe=lambda r: f"(novel mask AP {_number(r['metrics']['novel_mask_AP']):.1f})",
    )
    # A failed run's numbers are missing (NaN): its cell shows n/a, not the other seeds' mean.
    rows = [dict(r["metrics"] or dict.fromkeys(METRICS), wall_seconds=r["wall_seconds"],
                 head=r["spec"]["head"], mode=r["spec"]["mode"]) for r in results]
    summary = aggregate(rows, ("head", "mode"), METRICS)
    failures = {run.name: r["failed"] for run, r in zip(runs, results) if r.get("failed")}
    text = table(summary, args.seeds, failures)
    paths = {k: os.path.join(args.output_dir, f) for k, f in
             (("table", "results.md"), ("json", "results.json"), ("plot", "novel_mask_AP.png"))}
    with open(paths["table"], "w") as f:
        f.write(text)
    write_json(paths["json"], {
        "command": [os.path.relpath(__file__, ROOT)] + (argv if argv is not None else sys.argv[1:]),
        "config_file": args.config_file, "max_iter": args.max_iter, "seeds": args.seeds,
        "heads": args.heads, "ceiling_head": args.heads[-1], "class_split": split,
        "synthetic_data": data, "summary": summary,
        "runs": [dict(name=run.name, head=r["spec"]["head"], mode=r["spec"]["mode"],
                      seed=r["spec"]["seed"], wall_seconds=r["wall_seconds"],
                      failed=r.get("failed"), **(r["metrics"] or {}))
                 for run, r in zip(runs, results)],
    })
    plot(summary, args.heads, paths["plot"])
    print("\n" + text)
    print(f"table: {paths['table']}\nevery number: {paths['json']}\nplot: {paths['plot']}")
    if failures:
        print(f"[grid] {len(failures)} run(s) failed: {', '.join(failures)} (their console.txt "
              f"under {args.output_dir} has the whole error)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
