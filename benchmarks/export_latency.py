"""Latency of the exported models against the eager ones, on one image.

Prints one markdown table: masks for ``--boxes`` given boxes (BoxMaskPredictor, then the
exported box-mask graph in TorchScript and in ONNX Runtime) and, unless ``--models
box_masks``, the detector (Detectron2's DefaultPredictor, then the exported detector).
Each time is the median of ``--repeats`` calls after ``--warmup`` untimed ones, end to end
from the uint8 image to masks at its size (resize, backbone, heads, paste). Weights are
random unless ``--weights`` is given: the box-mask times do not depend on them; the
detector's do, through its number of detections (printed).

    python benchmarks/export_latency.py --threads 2
    python benchmarks/export_latency.py --config-file configs/demo_synthetic_hg20.yaml --threads 2
"""
import argparse
import os
import platform
import statistics
import sys
import tempfile
import time

import numpy as np
import torch

import deepmac_d2  # noqa: F401  (registers the heads; detectron2._C stand-in)
from detectron2.engine import DefaultPredictor
from deepmac_d2.box_masks import BoxMaskPredictor
from deepmac_d2.engine import load_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tools"))
import export_model  # noqa: E402  (tools/export_model.py: the files users export)


def median_ms(fn, warmup, repeats):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def example(height, width, num_boxes, seed=0):
    """A random image (uint8, H x W x 3) and ``num_boxes`` boxes inside it."""
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    corners = rng.uniform(0, 1, (num_boxes, 2, 2)) * [width, height]
    boxes = np.concatenate([corners.min(1), corners.max(1)], 1).astype(np.float32)
    return image, boxes


def runners(path, threads):
    """(name, callable) for a TorchScript and an ONNX Runtime session of ``path`` (no ext)."""
    import onnxruntime as ort

    scripted = torch.jit.load(path + ".ts")
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(path + ".onnx", options, providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]

    def torchscript(*inputs):
        with torch.inference_mode():
            return scripted(*[torch.from_numpy(x) for x in inputs])

    def onnx(*inputs):
        return session.run(None, dict(zip(names, inputs)))

    return [("TorchScript", torchscript), ("ONNX Runtime", onnx)]


def main(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config-file", default=os.path.join(ROOT, "configs", "voc_r50_hg52.yaml"))
    parser.add_argument("--weights", default="", help="checkpoint (default: random weights)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--image-size", type=int, nargs=2, default=[480, 640], metavar=("H", "W"))
    parser.add_argument("--boxes", type=int, default=10)
    parser.add_argument("--models", nargs="+", choices=export_model.MODELS,
                        default=list(export_model.MODELS))
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="KEY VALUE config overrides")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    cfg = load_config(argparse.Namespace(config_file=args.config_file, opts=args.opts))
    cfg.MODEL.WEIGHTS = args.weights  # "" initialises from scratch: nothing downloads
    cfg.MODEL.DEVICE = "cpu"
    cfg.freeze()
    torch.manual_seed(0)
    predictor = DefaultPredictor(cfg)
    model = predictor.model
    image, boxes = example(*args.image_size, args.boxes)
    box_predictor = BoxMaskPredictor(cfg, model=model)

    rows = []
    load = os.getloadavg()  # on a shared machine, other work slows every row
    with tempfile.TemporaryDirectory() as out:
        start = time.perf_counter()
        export_model.export(cfg, model, out, models=args.models)
        export_s = time.perf_counter() - start
        if "box_masks" in args.models:
            what = f"masks for {args.boxes} given boxes"
            eager = lambda: box_predictor(image, boxes)  # noqa: E731
            rows.append((what, "eager (BoxMaskPredictor)", median_ms(eager, args.warmup, args.repeats)))
            for name, run in runners(os.path.join(out, "box_masks"), args.threads):
                ms = median_ms(lambda: run(image, boxes), args.warmup, args.repeats)
                rows.append((what, name, ms))
        if "detector" in args.models:
            count = len(predictor(image)["instances"])
            what = f"detector ({count} detection{'' if count == 1 else 's'})"
            eager = lambda: predictor(image)  # noqa: E731
            rows.append((what, "eager (DefaultPredictor)", median_ms(eager, args.warmup, args.repeats)))
            for name, run in runners(os.path.join(out, "detector"), args.threads):
                rows.append((what, name, median_ms(lambda: run(image), args.warmup, args.repeats)))

    import onnxruntime

    config = os.path.relpath(args.config_file, ROOT)
    print(f"{config}, image {args.image_size[0]}x{args.image_size[1]} (model input: test size "
          f"{cfg.INPUT.MIN_SIZE_TEST}/{cfg.INPUT.MAX_SIZE_TEST}), CPU {platform.processor() or platform.machine()}, "
          f"{args.threads} thread(s), torch {torch.__version__}, onnxruntime {onnxruntime.__version__}; "
          f"median of {args.repeats} after {args.warmup} warm-up; export took {export_s:.0f} s; "
          f"load average before/after {load[0]:.1f}/{os.getloadavg()[0]:.1f}")
    print()
    print("| model | runtime | ms | x eager |")
    print("|---|---|---:|---:|")
    baseline = {}
    for what, name, ms in rows:
        baseline.setdefault(what, ms)
        print(f"| {what} | {name} | {ms:.0f} | {ms / baseline[what]:.2f} |")


if __name__ == "__main__":
    main(sys.argv[1:])
