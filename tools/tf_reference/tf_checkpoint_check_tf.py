#!/usr/bin/env python3
"""The reference side of ``make tf-checkpoint-check``; runs in ``.venv-tf``.

Builds the reference's deepmac_maskrcnn model that a spec describes (small settings,
SpineNet or ResNet-FPN) with the Model Garden task (as its trainer does), sets every variable to seeded random values, and
writes what ``tools/tf_reference/tf_checkpoint_check.py`` converts and compares against:

- ``ckpt/``: a training checkpoint in the trainer's layout (``model``, its
  ``checkpoint_items`` at the root, ``global_step``);
- ``export/saved_model``: the reference's own export (``export_inference_graph`` with
  its DetectionModule, input type ``image_and_boxes_tensor``) of that checkpoint;
- ``serving.npz``: images, boxes and the SavedModel's ``detection_masks`` for them; where
  the spec has the reference's RPN and box heads, also their outputs on the native image
  and its boxes (``heads|...``: the SavedModel serves masks for given boxes only);
- ``mismatch_<case>/``: checkpoints of models that differ from the spec in one key.

    .venv-tf/bin/python tools/tf_reference/tf_checkpoint_check_tf.py --spec spec.json --out DIR

It imports nothing from deepmac_d2 (which needs torch and Detectron2).
"""
import argparse
import copy
import json
import os
import sys

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # tools/  # noqa: E402
from parity_tf import creation_order, randomise  # noqa: E402  (next to this file)
from read_tf_checkpoint import build_reference, reference_params  # noqa: E402

# Models that differ from the spec in one place, for the mismatch errors, per backbone.
MISMATCHES = {
    "spinenet": {
        "spinenet96": lambda spec: spec["spinenet"].update(model_id="96"),
        "width32": lambda spec: spec["mask_head"].update(num_filters=32),
    },
    "resnet": {"resnet101": lambda spec: spec["resnet"].update(model_id=101)},
}


def save_training_checkpoint(model, directory):
    """The layout Model Garden's trainer writes (official/core/base_trainer.py)."""
    step = tf.Variable(1, dtype=tf.int64)
    ckpt = tf.train.Checkpoint(global_step=step, model=model, **model.checkpoint_items)
    return ckpt.save(os.path.join(directory, "ckpt"))


def smooth_image(rng, height, width):
    """Random blobs rather than pixel noise, so that resizing changes it little."""
    small = rng.uniform(0, 255, (height // 16, width // 16, 3))
    big = tf.image.resize(small[None], (height, width), method="bicubic")[0].numpy()
    return np.clip(big + rng.normal(0, 8, big.shape), 0, 255).astype(np.uint8)


def boxes_for(height, width):
    """XYXY pixel boxes inside the image: small ones (RoIAlign level 3) and one that
    reaches level 4 (sqrt(area) >= 224 where the image allows)."""
    big = min(height, width) - 8
    return np.array([
        [4, 4, 4 + big, 4 + big], [10, 20, 60, 90], [100.5, 30.25, 180, 110.75],
        [width - 50, height - 40, width - 2, height - 3], [30, 120, 45, 131], [64, 64, 192, 200],
    ], np.float32).clip(0, [width, height, width, height]).astype(np.float32)


def head_outputs(model, image, boxes):
    """The reference's RPN head (every level) and box head (on the XYXY ``boxes``) outputs
    for a uint8 RGB ``image`` at the model's input size, as its model computes them: the
    image normalised by ImageNet's mean and std, the decoder's features, its RoIAlign."""
    from official.vision.ops import preprocess_ops

    x = preprocess_ops.normalize_image(tf.constant(image))[None]
    features = model.decoder(model.backbone(x, training=False), training=False)
    scores, deltas = model.rpn_head(features, training=False)
    rois = model.roi_aligner(features, tf.constant(boxes[None][:, :, [1, 0, 3, 2]]), training=False)
    head = model.detection_head  # a list of one (the model's cascade slot)
    classes, box_deltas = (head if callable(head) else head[0])(rois, training=False)
    out = {f"scores_p{k}": v.numpy() for k, v in scores.items()}
    out.update({f"boxes_p{k}": v.numpy() for k, v in deltas.items()})
    # Detectron2 has no deltas for the background (class 0): its 4 are left out.
    out.update(classes=classes.numpy()[0], box_deltas=box_deltas.numpy()[0][:, 4:])
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--spec", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    with open(args.spec) as f:
        spec = json.load(f)
    rng = np.random.default_rng(args.seed)
    params = reference_params(spec)
    model = build_reference(params)
    randomise(creation_order(model.weights), rng)
    ckpt = save_training_checkpoint(model, os.path.join(args.out, "ckpt"))
    print(f"[tf-checkpoint-check] {ckpt}: {len(model.weights)} variables", flush=True)

    from official.projects.deepmac_maskrcnn.serving import detection
    from official.vision.serving import export_saved_model_lib

    size = [spec["input_size"]] * 2
    module = detection.DetectionModule(params=params, batch_size=1, input_image_size=size, num_channels=3)
    export_dir = os.path.join(args.out, "export")
    export_saved_model_lib.export_inference_graph(
        input_type="image_and_boxes_tensor", batch_size=1, input_image_size=size, params=params,
        checkpoint_path=os.path.dirname(ckpt), export_dir=export_dir, export_module=module,
        export_checkpoint_subdir="checkpoint", export_saved_model_subdir="saved_model")
    serve = tf.saved_model.load(os.path.join(export_dir, "saved_model")).signatures["serving_default"]
    names = list(serve.structured_input_signature[1])  # as exported: the image's, the boxes'
    boxes_arg = next(n for n in names if "box" in n)
    image_arg = next(n for n in names if n != boxes_arg)

    record = {}
    # An image at the model's input size (no resize), and one the serving module resizes.
    for name, (height, width) in (("native", size), ("resized", (240, 320))):
        image = smooth_image(rng, height, width)
        boxes = boxes_for(height, width)
        normalised = (boxes[:, [1, 0, 3, 2]] / np.array([height, width, height, width])).astype(np.float32)
        out = serve(**{image_arg: tf.constant(image[None]), boxes_arg: tf.constant(normalised[None])})
        record.update({f"{name}|image": image, f"{name}|boxes": boxes,
                       f"{name}|masks": out["detection_masks"].numpy()[0]})
        if name == "native" and "rpn_head" in spec and "detection_head" in spec:
            record.update({f"heads|{k}": v for k, v in head_outputs(model, image, boxes).items()})
    np.savez(os.path.join(args.out, "serving.npz"), **record)
    print(f"[tf-checkpoint-check] served {export_dir}", flush=True)

    for case, change in MISMATCHES["resnet" if "resnet" in spec else "spinenet"].items():
        other = copy.deepcopy(spec)
        change(other)
        tf.keras.backend.clear_session()
        save_training_checkpoint(build_reference(reference_params(other)),
                                 os.path.join(args.out, f"mismatch_{case}"))
        print(f"[tf-checkpoint-check] mismatch checkpoint {case}", flush=True)


if __name__ == "__main__":
    main()
