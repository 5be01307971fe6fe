#!/usr/bin/env python3
"""The reference side of ``make parity``; runs in ``.venv-tf`` (TensorFlow, tf-models-official).

For each case it builds the reference's own module from tf-models-official in
float64, sets every variable (BatchNorm moving statistics included) to seeded random
values, runs a fixed input in eval mode and in train mode, and writes one ``.npz``:
the variables in creation order (``w00000|<name>``), the input, the outputs
(``eval|<k>``, ``train|<k>``), the moving statistics after the train-mode call
(``after_train|...``, same order), and the trainable / non-trainable counts.
``tools/tf_reference/parity.py`` (in ``.venv``) converts the variables into ours and compares.

With ``--speed-worker`` it instead times the reference for ``tools/tf_reference/parity.py``'s speed
table, in float32 under ``tf.function`` as the reference trains: it reads one JSON
request a line on stdin (``{"build": case, "shape": input shape}``, then
``{"time": case, "mode": "forward" | "forward+backward"}``) and answers each with
one line (``ok``, or the wall and process CPU seconds of one call), so the two sides'
runs can alternate.

    .venv-tf/bin/python tools/tf_reference/parity_tf.py --out DIR [--cases spinenet49,hg52_head]
    .venv-tf/bin/python tools/tf_reference/parity_tf.py --speed-worker --threads 2

It imports nothing from deepmac_d2 (which needs torch and Detectron2).
"""
import argparse
import json
import os
import re
import sys
import time

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

# The cases; tools/tf_reference/parity.py keeps the same table (it cannot import this file's TF).
SPINENET_IDS = ("49", "96", "143", "190")
HEADS = {
    # name: (convnet_variant, num_filters, crop, norm momentum (Keras), eps)
    "default_head": ("default", 256, 14, 0.997, 1e-4),  # the R50 row's head
    "hg20_head": ("hourglass20", 64, 32, 0.99, 1e-3),
    "hg52_head": ("hourglass52", 64, 32, 0.99, 1e-3),  # the SpineNet rows' head
    "hg100_head": ("hourglass100", 64, 32, 0.99, 1e-3),
}
# The R50 rows' backbone: ResNet-50 + FPN at levels 2..6, norm_activation 0.997 / 1e-4.
RESNET_FPN = {"resnet50_fpn": 50}
# The R50 rows' RPN head (1 conv of 256, 3 anchors a location, BN per level 2..6) on
# random FPN features, batch 2, P2 24 x 40 (P6 2 x 3).
RPN_LEVELS, RPN_P2 = (2, 6), (24, 40)
# The MaskRCNN config's box head (4 convs of 256, 1 FC of 1024, BN after each) on 8 random
# 7 x 7 ROIs, 3 classes + background (class 0).
BOX_CLASSES, BOX_ROIS = 4, 8
CASES = [f"spinenet{m}" for m in SPINENET_IDS] + list(RESNET_FPN) + ["rpn_head", "box_head"] + list(HEADS)
SPINENET_INPUT = (2, 128, 128, 3)
# Not square, and 96 / 32 = 3: P6 is a stride-2 'SAME' conv of an odd 3 x 5 P5.
RESNET_FPN_INPUT = (2, 96, 160, 3)
NUM_ROIS, ROI_CHANNELS = 6, 256
# The SpineNet-143 row's rate; identity in eval, set to 0 for the train-mode
# comparison (the drop is random).
STOCHASTIC_DEPTH = 0.2


def creation_order(variables):
    """Variables in the order they were created (the order the converter expects):
    eager variables carry a global counter in their unique id."""
    return sorted(variables, key=lambda v: int(re.search(r"(\d+)$", v._unique_id).group(1)))


def randomise(variables, rng):
    for v in variables:
        kind = v.name.split("/")[-1].split(":")[0]
        shape = tuple(v.shape)
        if kind == "kernel":
            value = rng.standard_normal(shape) / np.sqrt(np.prod(shape[:-1]))
        elif kind in ("gamma", "moving_variance"):
            value = rng.uniform(0.5, 1.5, shape)
        else:  # beta, bias, moving_mean
            value = 0.1 * rng.standard_normal(shape)
        v.assign(value.astype(v.dtype.as_numpy_dtype))


def build_spinenet(model_id, rate, input_shape=SPINENET_INPUT):
    from official.vision.modeling.backbones import spinenet

    endpoints, scale, alpha, repeats = (
        spinenet.SCALING_MAP[model_id][k]
        for k in ("endpoints_num_filters", "filter_size_scale", "resample_alpha", "block_repeats")
    )
    return spinenet.SpineNet(
        input_specs=tf.keras.layers.InputSpec(shape=[None, *input_shape[1:]]),
        min_level=3, max_level=7, endpoints_num_filters=endpoints, resample_alpha=alpha,
        block_repeats=repeats, filter_size_scale=scale, init_stochastic_depth_rate=rate,
        use_sync_bn=True, norm_momentum=0.99, norm_epsilon=1e-3,
    )


def build_resnet_fpn(name, input_shape=RESNET_FPN_INPUT):
    """The reference's ResNet and FPN as its MaskRCNN experiments build them (defaults
    of backbones.ResNet and decoders.FPN; synchronised BN), composed into one model
    whose outputs are the FPN's {level: features}."""
    from official.vision.modeling.backbones import resnet
    from official.vision.modeling.decoders import fpn

    norm = dict(use_sync_bn=True, norm_momentum=0.997, norm_epsilon=1e-4)
    inputs = tf.keras.Input(shape=input_shape[1:])
    backbone = resnet.ResNet(model_id=RESNET_FPN[name], input_specs=tf.keras.layers.InputSpec(
        shape=[None, *input_shape[1:]]), **norm)
    decoder = fpn.FPN(input_specs=backbone.output_specs, min_level=2, max_level=6, num_filters=256, **norm)
    return tf.keras.Model(inputs, decoder(backbone(inputs)))


def build_head(name):
    from official.projects.deepmac_maskrcnn.modeling.heads import instance_heads

    variant, filters, crop, momentum, eps = HEADS[name]
    head = instance_heads.DeepMaskHead(
        num_classes=1, upsample_factor=2, num_convs=4, num_filters=filters,
        norm_momentum=momentum, norm_epsilon=eps, class_agnostic=True, convnet_variant=variant,
    )
    return head, crop


def run_case(name, out_dir, rng):
    tf.keras.backend.clear_session()
    tf.keras.backend.set_floatx("float64")
    if name.startswith("spinenet"):
        model_id = name[len("spinenet"):]
        x = rng.standard_normal(SPINENET_INPUT)
        model = build_spinenet(model_id, STOCHASTIC_DEPTH)
    elif name in RESNET_FPN:
        x = rng.standard_normal(RESNET_FPN_INPUT)
        model = build_resnet_fpn(name)
    elif name == "rpn_head":
        from official.vision.modeling.heads import dense_prediction_heads

        model = dense_prediction_heads.RPNHead(
            min_level=RPN_LEVELS[0], max_level=RPN_LEVELS[1], num_anchors_per_location=3, num_convs=1,
            num_filters=256, use_sync_bn=True, norm_momentum=0.997, norm_epsilon=1e-4)
        x = {str(k): rng.standard_normal((2, -(-RPN_P2[0] // 2 ** (k - 2)), -(-RPN_P2[1] // 2 ** (k - 2)), 256))
             for k in range(RPN_LEVELS[0], RPN_LEVELS[1] + 1)}

        def call(model, inp, training):
            scores, boxes = model(inp, training=training)
            return {**{f"scores_p{k}": v for k, v in scores.items()}, **{f"boxes_p{k}": v for k, v in boxes.items()}}
    elif name == "box_head":
        from official.vision.modeling.heads import instance_heads

        model = instance_heads.DetectionHead(
            num_classes=BOX_CLASSES, num_convs=4, num_filters=256, num_fcs=1, fc_dims=1024,
            use_sync_bn=True, norm_momentum=0.997, norm_epsilon=1e-4)
        x = rng.standard_normal((1, BOX_ROIS, 7, 7, 256))

        def call(model, inp, training):
            classes, boxes = model(inp, training=training)
            # Detectron2 has no deltas for the background (class 0): those 4 outputs are
            # left out here; the Dense kernel that makes them is compared through the rest.
            return {"classes": classes, "boxes": boxes[..., 4:]}
    if name.startswith("spinenet") or name in RESNET_FPN:
        def call(model, inp, training):
            return {f"p{k}": v for k, v in model(inp, training=training).items()}
    elif name not in ("rpn_head", "box_head"):
        head, crop = build_head(name)
        x = rng.standard_normal((1, NUM_ROIS, crop, crop, ROI_CHANNELS))
        classes = np.zeros((1, NUM_ROIS), np.int32)
        model = head

        def call(model, inp, training):
            return {"masks": model([inp, classes], training=training)}

    xt = {k: tf.constant(v) for k, v in x.items()} if isinstance(x, dict) else tf.constant(x)
    call(model, xt, False)  # builds the variables
    variables = creation_order(model.weights)
    randomise(variables, rng)
    record = {f"input|{k}": v for k, v in x.items()} if isinstance(x, dict) else {"input": x}
    for i, v in enumerate(variables):
        record[f"w{i:05d}|{v.name}"] = v.numpy()
    for k, v in call(model, xt, False).items():
        record[f"eval|{k}"] = v.numpy()
    if name.startswith("spinenet"):
        # Stochastic depth is random: the train-mode comparison runs the same weights
        # with it off (its own behaviour is tested in tests/test_spinenet.py).
        train_model = build_spinenet(model_id, 0.0)
        call(train_model, xt, False)
        train_vars = creation_order(train_model.weights)
        for src, dst in zip(variables, train_vars):
            dst.assign(src)
        model, variables = train_model, train_vars
    for k, v in call(model, xt, True).items():
        record[f"train|{k}"] = v.numpy()
    for i, v in enumerate(variables):
        if v.name.split("/")[-1].startswith("moving_"):
            record[f"after_train|{i:05d}|{v.name}"] = v.numpy()
    counts = {
        "trainable": int(sum(np.prod(v.shape) for v in model.trainable_weights)),
        "non_trainable": int(sum(np.prod(v.shape) for v in model.non_trainable_weights)),
    }
    record["meta"] = np.array(json.dumps(counts))
    np.savez(os.path.join(out_dir, f"{name}.npz"), **record)
    print(f"[parity-tf] {name}: {len(variables)} variables, {counts}", flush=True)


def speed_worker():
    """Times the reference for ``tools/tf_reference/parity.py`` (see the module docstring).

    Forward: inference mode, no tape. Forward+backward: training mode, the gradient of
    the outputs' sum with respect to every trainable variable. Each function is traced
    and run once when built, so the timed calls reuse the graph.
    """
    tf.keras.backend.set_floatx("float32")
    rng = np.random.default_rng(0)
    steps = {}
    for line in sys.stdin:
        request = json.loads(line)
        if "build" in request:
            name, shape = request["build"], tuple(request["shape"])
            x = tf.constant(rng.standard_normal(shape), tf.float32)
            if name.startswith("spinenet"):
                model = build_spinenet(name[len("spinenet"):], 0.0, shape)

                def call(inp, training, model=model):
                    return list(model(inp, training=training).values())
            else:
                model = build_head(name)[0]
                classes = tf.zeros(shape[:2], tf.int32)

                def call(inp, training, model=model, classes=classes):
                    return [model([inp, classes], training=training)]

            call(x, False)  # builds the variables

            @tf.function
            def forward(inp, call=call):
                return call(inp, False)

            @tf.function
            def train(inp, call=call, model=model):
                with tf.GradientTape() as tape:
                    loss = tf.add_n([tf.reduce_sum(y) for y in call(inp, True)])
                return tape.gradient(loss, model.trainable_variables)

            steps[name] = {"forward": lambda f=forward, x=x: f(x),
                           "forward+backward": lambda f=train, x=x: f(x)}
            for step in steps[name].values():
                step()
            answer = "ok"
        else:
            step = steps[request["time"]][request["mode"]]
            start, cpu = time.perf_counter(), time.process_time()
            step()
            answer = f"{time.perf_counter() - start} {time.process_time() - cpu}"
        print(answer, flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", help="where the .npz files go (the parity check)")
    ap.add_argument("--speed-worker", action="store_true", help="time the reference (see above)")
    ap.add_argument("--threads", type=int, default=2, help="intra- and inter-op threads (--speed-worker)")
    ap.add_argument("--inter-op", type=int, help="inter-op threads, if not --threads (--speed-worker)")
    ap.add_argument("--cases", default=",".join(CASES))
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    if args.speed_worker:
        tf.config.threading.set_intra_op_parallelism_threads(args.threads)
        tf.config.threading.set_inter_op_parallelism_threads(args.inter_op or args.threads)
        return speed_worker()
    if not args.out:
        ap.error("--out is required (or --speed-worker)")
    os.makedirs(args.out, exist_ok=True)
    cases = args.cases.split(",")
    unknown = sorted(set(cases) - set(CASES))
    if unknown:
        sys.exit(f"unknown case(s) {unknown}; valid: {', '.join(CASES)}")
    rng = np.random.default_rng(args.seed)
    for name in cases:
        run_case(name, args.out, rng)


if __name__ == "__main__":
    main()
