#!/usr/bin/env python
"""Segment your images: a picture of the predicted masks per image and a COCO-results json.

    python tools/predict.py --config-file output/mine/config.yaml MODEL.WEIGHTS output/mine/model_final.pth \\
        --input photos/ --output output/mine/predictions
    python tools/predict.py --config-file configs/voc_r50_hg52.yaml MODEL.WEIGHTS model.pth \\
        --input 'photos/**/*.jpg' more/photo.png --output out --confidence-threshold 0.3

--input takes image files, folders (the images directly in them) and glob patterns, several
at once. KEY VALUE config overrides go before --input or after --output. Writes, under
--output: <image name>.png (Detectron2's Visualizer: masks, boxes, class names and scores),
coco_results.json (COCO's results format, one entry per detection: image_id, the image's
number in the input order from 1, file_name, category_id as in the dataset's json, bbox XYWH,
score, segmentation as RLE) and log.txt. Class names and category ids are those of
DATASETS.TEST[0]; the config's DATASETS.COCO_FILES are registered as train_net.py does, so
the config.yaml a training run saved names its classes. An image that cannot be read is
reported and skipped; the exit status is 1 only if no image could be read.
"""
import argparse
import glob
import json
import logging
import os
import sys
import time

from detectron2.data import MetadataCatalog
from detectron2.data.detection_utils import read_image
from detectron2.engine import DefaultPredictor
from detectron2.evaluation.coco_evaluation import instances_to_coco_json
from detectron2.utils.logger import log_every_n_seconds, setup_logger
from detectron2.utils.visualizer import ColorMode, Visualizer

import deepmac_d2  # noqa: F401  (registers heads, ROI heads, datasets)
from deepmac_d2.data import register_coco_files
from deepmac_d2.engine import load_config, resolve_accelerator

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
RESULTS_FILE = "coco_results.json"
logger = logging.getLogger("detectron2.deepmac_d2.predict")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config-file", required=True, metavar="FILE")
    p.add_argument("--input", nargs="+", required=True, metavar="IMG|DIR|GLOB")
    p.add_argument("--output", required=True, metavar="DIR")
    p.add_argument(
        "--confidence-threshold", type=float, default=0.5,
        help="keep detections scoring at least this (MODEL.ROI_HEADS.SCORE_THRESH_TEST; default %(default)s)",
    )
    p.add_argument("opts", nargs="*", metavar="KEY VALUE", help="config overrides, e.g. MODEL.WEIGHTS model.pth")
    # Intermixed: the overrides may come before the flags, as in `--config-file C MODEL.WEIGHTS W --input ...`.
    return p.parse_intermixed_args(argv)


def list_images(inputs):
    """The image paths ``inputs`` name, in order, each once; SystemExit for an input that names none."""
    paths = []
    for item in inputs:
        if os.path.isdir(item):
            found = sorted(os.path.join(item, f) for f in os.listdir(item) if f.lower().endswith(IMAGE_EXTENSIONS))
        elif os.path.isfile(item):
            found = [item]
        else:
            found = sorted(p for p in glob.glob(item, recursive=True) if os.path.isfile(p))
        if not found:
            sys.exit(f"error: --input {item}: no such image, no image ({', '.join(IMAGE_EXTENSIONS)}) "
                     "in that folder, or no file matching that pattern")
        paths += found
    return list(dict.fromkeys(paths))


def picture_path(output, path, taken):
    """``<output>/<image stem>.png``, numbered when two inputs share a stem."""
    stem = os.path.splitext(os.path.basename(path))[0]
    name, n = stem, 1
    while name in taken:
        n += 1
        name = f"{stem}_{n}"
    taken.add(name)
    return os.path.join(output, name + ".png")


def build_predictor(args):
    """Detectron2's DefaultPredictor for the config, on CUDA if present, else the CPU."""
    cfg = load_config(argparse.Namespace(config_file=args.config_file, opts=args.opts))
    register_coco_files(cfg)
    device = resolve_accelerator(cfg.DEEPMAC.ACCELERATOR)
    if device == "xla":
        sys.exit("error: tools/predict.py runs on CUDA or the CPU: add DEEPMAC.ACCELERATOR cpu (or cuda)")
    cfg.MODEL.DEVICE = device
    cfg.MODEL.ROI_HEADS.SCORE_THRESH_TEST = args.confidence_threshold
    cfg.freeze()
    if not cfg.MODEL.WEIGHTS:
        logger.warning("MODEL.WEIGHTS is empty: predicting with random weights")
    metadata = MetadataCatalog.get(cfg.DATASETS.TEST[0] if cfg.DATASETS.TEST else "__unused")
    if not metadata.get("thing_classes", None):
        logger.warning("DATASETS.TEST[0] has no class names (thing_classes): pictures show class indices "
                       "and coco_results.json has them as category_id")
    return DefaultPredictor(cfg), metadata


def main(argv=None):
    args = parse_args(argv)
    os.makedirs(args.output, exist_ok=True)
    setup_logger(output=os.path.join(args.output, "log.txt"), name="detectron2", abbrev_name="d2")
    paths = list_images(args.input)
    predictor, metadata = build_predictor(args)
    contiguous_to_id = {c: i for i, c in metadata.get("thing_dataset_id_to_contiguous_id", {}).items()}
    logger.info(f"Predicting {len(paths)} images into {args.output}")

    results, unreadable, taken = [], [], set()
    start = time.perf_counter()
    for index, path in enumerate(paths):
        try:
            image = read_image(path, format="BGR")  # DefaultPredictor takes BGR, whatever INPUT.FORMAT is
        except (OSError, ValueError) as e:  # PIL's UnidentifiedImageError is an OSError
            logger.warning(f"Cannot read {path} ({type(e).__name__}: {e}); skipped it")
            unreadable.append(path)
            continue
        instances = predictor(image)["instances"].to("cpu")
        vis = Visualizer(image[:, :, ::-1], metadata, instance_mode=ColorMode.IMAGE)
        vis.draw_instance_predictions(instances).save(picture_path(args.output, path, taken))
        for r in instances_to_coco_json(instances, index + 1):
            r["category_id"] = contiguous_to_id.get(r["category_id"], r["category_id"])
            results.append(dict(r, file_name=path))
        done = index + 1
        seconds = (time.perf_counter() - start) / done
        log_every_n_seconds(
            logging.INFO,
            f"Predicted {done}/{len(paths)} images. {seconds:.3f} s / image. "
            f"ETA={time.strftime('%H:%M:%S', time.gmtime(seconds * (len(paths) - done)))}",
            n=5, name=logger.name,
        )

    results_path = os.path.join(args.output, RESULTS_FILE)
    with open(results_path, "w") as f:
        json.dump(results, f)
    read = len(paths) - len(unreadable)
    logger.info(
        f"Done: {read} of {len(paths)} images in {time.perf_counter() - start:.1f} s, {len(results)} "
        f"detections; pictures in {args.output}, results in {results_path}"
    )
    if unreadable:
        logger.warning(f"{len(unreadable)} unreadable image(s) skipped: {', '.join(unreadable)}")
    return 0 if read else 1


if __name__ == "__main__":
    sys.exit(main())
