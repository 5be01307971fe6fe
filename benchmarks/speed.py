"""What plain layers cost, and what PyTorch's standard speed-ups buy, on the CPU.

One table, one run: the Hourglass-52 and default mask heads (forward, forward+backward),
one whole training iteration of ``configs/voc_r50_hg52.yaml`` at CPU size (512 px, batch
2, GroupNorm ResNet-50, random weights) and of the demo config, and one
``BoxMaskPredictor`` call (10 boxes), each in four variants:

- ``fast paths``: the code of ``--fast-paths-ref`` (a git revision from before the CPU
  fast paths were removed), which chose its hand-written kernels by itself; run in a
  child process on an extracted copy of that revision (skipped without ``--fast-paths-ref``);
- ``plain``: today's layers, eager;
- ``fused``: plain, with ``fuse_for_inference`` (inference rows only);
- ``compile``: ``torch.compile`` (dynamic shapes) of the mask head, or for the head rows of
  the head itself.

Plain and fused alternate within each round in one process, so load from other processes
falls on both; compile and the fast paths run in a process each. Each cell is the median
wall time (and process CPU time) in ms.

    python benchmarks/speed.py --threads 2 --repeats 5 --fast-paths-ref 1c5cddc
"""
import argparse
import io
import json
import os
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HEAD_ROIS, HEAD_CHANNELS = 64, 256
CASES = ["hg52_head forward", "hg52_head forward+backward", "default_head forward",
         "default_head forward+backward", "voc_r50_hg52 train step", "demo train step",
         "BoxMaskPredictor (10 boxes)"]
INFERENCE = {"hg52_head forward", "default_head forward", "BoxMaskPredictor (10 boxes)"}


def head(variant, num_filters, crop):
    from detectron2.layers import ShapeSpec
    from deepmac_d2.modeling import DeepMaskHead

    torch.manual_seed(0)
    model = DeepMaskHead(ShapeSpec(channels=HEAD_CHANNELS), num_classes=1, convnet_variant=variant,
                         num_filters=num_filters)
    return model, torch.randn(HEAD_ROIS, HEAD_CHANNELS, crop, crop)


def config(name):
    from argparse import Namespace

    from deepmac_d2.engine import load_config

    size = 512 if name == "voc_r50_hg52" else 128
    opts = ["MODEL.WEIGHTS", "", "MODEL.DEVICE", "cpu", "MODEL.ROI_MASK_HEAD.ALLOWED_CLASS_IDS", "[]",
            "SOLVER.IMS_PER_BATCH", "2", "INPUT.MIN_SIZE_TEST", str(size), "INPUT.MAX_SIZE_TEST", str(size)]
    if name == "voc_r50_hg52":
        opts += ["MODEL.RESNETS.NORM", "GN", "MODEL.BACKBONE.FREEZE_AT", "0", "MODEL.FPN.NORM", "GN",
                 "MODEL.RESNETS.STRIDE_IN_1X1", "False"]
    path = os.path.join(ROOT, "configs", "demo_synthetic_hg20.yaml" if name == "demo" else f"{name}.yaml")
    return load_config(Namespace(config_file=path, opts=opts)), size


def batch(cfg, size, images=2, objects=5):
    """Images with ``objects`` box-and-mask instances each, as the train loader gives them."""
    from detectron2.structures import BitMasks, Boxes, Instances

    rng = np.random.default_rng(0)
    out = []
    for _ in range(images):
        boxes, masks = [], torch.zeros(objects, size, size, dtype=torch.bool)
        for i in range(objects):
            x0, y0 = rng.integers(0, size // 2, 2)
            w, h = rng.integers(size // 8, size // 2, 2)
            boxes.append([x0, y0, x0 + w, y0 + h])
            masks[i, y0:y0 + h, x0:x0 + w] = True
        inst = Instances((size, size), gt_boxes=Boxes(torch.tensor(boxes, dtype=torch.float32)),
                         gt_classes=torch.tensor(rng.integers(0, cfg.MODEL.ROI_HEADS.NUM_CLASSES, objects)),
                         gt_masks=BitMasks(masks))
        out.append({"image": torch.rand(3, size, size) * 255, "instances": inst,
                    "height": size, "width": size})
    return out


def compiled(module):
    module.compile(dynamic=True)
    return module


def build_case(case, variant):
    """A callable running ``case`` once in ``variant`` (None: the variant does not apply)."""
    from detectron2.modeling import build_model
    from detectron2.utils.events import EventStorage

    if variant == "fused" and case not in INFERENCE:
        return None
    if case.endswith("_head forward") or case.endswith("_head forward+backward"):
        name = case.split()[0]
        model, x = head("hourglass52", 64, 32) if name == "hg52_head" else head("default", 256, 14)
        train = case.endswith("backward")
        model.train(train)
        if variant == "fused":
            from deepmac_d2.modeling import fuse_for_inference

            model = fuse_for_inference(model)
        layers = model.layers
        if variant == "compile":
            layers = torch.compile(model.layers, dynamic=True)
        if train:
            return lambda: layers(x).sum().backward()

        def forward():
            with torch.no_grad():
                layers(x)
        return forward
    if case.endswith("train step"):
        cfg, size = config(case.split()[0])
        torch.manual_seed(0)
        model = build_model(cfg).train()
        if variant == "compile":
            compiled(model.roi_heads.mask_head)
        optimizer = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)
        inputs = batch(cfg, size)
        storage = EventStorage()

        def step():
            with storage:
                losses = model(inputs)
            optimizer.zero_grad()
            sum(losses.values()).backward()
            optimizer.step()
        return step
    from deepmac_d2.box_masks import BoxMaskPredictor

    cfg, size = config("voc_r50_hg52")
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    predictor = BoxMaskPredictor(cfg, model=model)
    if variant == "plain" and hasattr(predictor.model, "roi_heads"):
        predictor.model = model  # BoxMaskPredictor folds its copy: undo for this row
    if variant == "compile":
        predictor.model = model
        compiled(model.backbone)
        compiled(model.roi_heads.mask_head)
    image = (np.random.default_rng(0).random((size, size, 3)) * 255).astype(np.uint8)
    boxes = batch(cfg, size, images=1, objects=10)[0]["instances"].gt_boxes.tensor.numpy()
    return lambda: predictor(image, boxes)


def timed(run):
    start, cpu = time.perf_counter(), time.process_time()
    run()
    return time.perf_counter() - start, time.process_time() - cpu


def measure(cases, variants, repeats, warmup):
    """{case: {variant: [(wall, cpu), ...]}}, the variants alternating in each round."""
    results = {}
    for case in cases:
        runs = {}
        for variant in variants:
            try:
                run = build_case(case, variant)
                if run is not None:
                    for _ in range(warmup):
                        run()
                    runs[variant] = run
            except Exception as e:  # a variant that fails is reported, the others measured
                results.setdefault(case, {})[variant] = f"failed: {type(e).__name__}: {str(e)[:120]}"
        for round_ in range(repeats):
            order = list(runs) if round_ % 2 == 0 else list(runs)[::-1]
            for variant in order:
                results.setdefault(case, {}).setdefault(variant, []).append(timed(runs[variant]))
        print(f"[speed] {case}: done", file=sys.stderr, flush=True)
    return results


def in_child(label, variant, cases, threads, repeats, warmup, root=None):
    """{case: {label: runs}}: this script's ``variant`` alone in a new process (on the
    package and configs under ``root`` when given)."""
    env = dict(os.environ, PYTHONPATH=root) if root else None
    cmd = [sys.executable, os.path.abspath(__file__), "--threads", str(threads), "--repeats", str(repeats),
           "--warmup", str(warmup), "--variants", variant, "--cases", ",".join(cases),
           "--json"] + (["--root", root] if root else [])
    out = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True)
    return {case: {label: v[variant]} for case, v in json.loads(out.stdout).items()}


def fast_paths(ref, cases, threads, repeats, warmup):
    """The ``plain`` variant of this script, run on the package as it was at ``ref``."""
    folder = tempfile.mkdtemp(prefix="deepmac_fast_paths_")
    archive = subprocess.run(["git", "-C", ROOT, "archive", ref, "deepmac_d2", "configs"],
                             check=True, capture_output=True).stdout
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(folder)
    return in_child("fast paths", "plain", cases, threads, repeats, warmup, root=folder)


def cell(runs):
    if isinstance(runs, str):
        return runs
    wall, cpu = zip(*runs)
    return f"{1e3 * statistics.median(wall):.0f} ({1e3 * statistics.median(cpu):.0f})"


def main():
    global ROOT
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--variants", default="plain,fused,compile")
    ap.add_argument("--cases", default=",".join(CASES), help="comma-separated, of: " + ", ".join(CASES))
    ap.add_argument("--fast-paths-ref", help="git revision with the CPU fast paths, e.g. 1c5cddc")
    ap.add_argument("--root", help=argparse.SUPPRESS)  # the extracted revision's configs
    ap.add_argument("--json", action="store_true", help="print the raw times as json")
    args = ap.parse_args()
    ROOT = args.root or ROOT
    torch.set_num_threads(args.threads)
    import deepmac_d2  # noqa: F401  (registers the heads)

    load = os.getloadavg()[0]
    cases = args.cases.split(",")
    variants = args.variants.split(",")
    if args.json:
        print(json.dumps(measure(cases, variants, args.repeats, args.warmup)))
        return
    # Compiled code runs in a process of its own: inductor's kernels and their OpenMP
    # threads slow the eager runs that alternate with them (the plain voc_r50_hg52 step
    # by a fifth on 2 cores), so only plain and fused share a process and alternate.
    results = measure(cases, [v for v in variants if v != "compile"], args.repeats, args.warmup)
    children = [in_child("compile", "compile", cases, args.threads, args.repeats, args.warmup)] if "compile" in variants else []
    if args.fast_paths_ref:
        children.append(fast_paths(args.fast_paths_ref, cases, args.threads, args.repeats, args.warmup))
    for child in children:
        for case, row in child.items():
            results.setdefault(case, {}).update(row)
    variants = (["fast paths"] if args.fast_paths_ref else []) + variants
    print(f"CPU, float32, {args.threads} threads, torch {torch.__version__}; ms per call, median wall "
          f"(median process CPU) of {args.repeats} runs after {args.warmup} warm-up; "
          f"load average {load:.1f} before, {os.getloadavg()[0]:.1f} after ({os.cpu_count()} CPUs)\n")
    print("| case | " + " | ".join(variants) + " |")
    print("|---|" + "---|" * len(variants))
    for case in cases:
        row = results.get(case, {})
        print(f"| {case} | " + " | ".join(cell(row[v]) if v in row else "n/a" for v in variants) + " |")


if __name__ == "__main__":
    main()
