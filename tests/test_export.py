"""Export for serving (tools/export_model.py, deepmac_d2/export/): the exported files
against the eager model they came from.

A tiny demo-config model gets trained heads in seconds (see ``fit``), so that its masks
are confident and shaped and its box scores are apart (an untrained model hovers at 0.5
and near-equal scores, where any rounding flips pixels and reorders boxes). The eager
references are Detectron2's own inference (``model(inputs)`` after DefaultPredictor's
resize) and ``BoxMaskPredictor``, at the traced size and at two sizes the graphs never
saw; the TorchScript files also run in a fresh interpreter in which detectron2 and
deepmac_d2 cannot be imported.
"""
import functools
import importlib.util
import json
import os
import subprocess
import sys
import textwrap
import uuid
from argparse import Namespace

import numpy as np
import pytest
import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.data import DatasetCatalog, DatasetMapper
from detectron2.data import transforms as T
from detectron2.modeling import build_model
from detectron2.modeling.roi_heads.mask_head import mask_rcnn_loss
from detectron2.utils.events import EventStorage
from PIL import Image

from deepmac_d2.box_masks import BoxMaskPredictor
from deepmac_d2.data.synthetic import SyntheticConfig, prepare_synthetic, register_synthetic
from deepmac_d2.engine import load_config
from deepmac_d2.evaluation import mask_iou
from deepmac_d2.export import BoxMaskExport, DetectorExport, resize_shortest_edge
from tolerance import assert_close_to_rounding

ort = pytest.importorskip("onnxruntime")

# Float comparisons: make test runs these again on the AVX2 kernels.
pytestmark = pytest.mark.numeric

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, "configs", "demo_synthetic_hg20.yaml")
# The demo model, made small: 64px images, narrow FPN and heads, a DeepMAC hourglass head.
# The test size range (short edge 64, long edge at most 96) really resizes other sizes.
TINY = [
    "MODEL.FPN.OUT_CHANNELS", "32", "MODEL.ROI_BOX_HEAD.FC_DIM", "64",
    "MODEL.ROI_MASK_HEAD.CONVNET_VARIANT", "hourglass10", "MODEL.ROI_MASK_HEAD.CONV_DIM", "8",
    "MODEL.ROI_MASK_HEAD.POOLER_RESOLUTION", "8",
    "INPUT.MIN_SIZE_TRAIN", "(64,)", "INPUT.MAX_SIZE_TRAIN", "64",
    "INPUT.MIN_SIZE_TEST", "64", "INPUT.MAX_SIZE_TEST", "96",
    "SOLVER.IMS_PER_BATCH", "2", "DATASETS.TEST", "()", "MODEL.DEVICE", "cpu",
    # Confident detections only: near-tied scores may swap places between runtimes.
    "MODEL.ROI_HEADS.SCORE_THRESH_TEST", "0.1",
]
MIN_IOU = 0.99
BLOCKED = ("detectron2", "deepmac_d2")


def load_tool():
    spec = importlib.util.spec_from_file_location(
        "export_model", os.path.join(ROOT, "tools", "export_model.py")
    )
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    return tool


def fit(cfg, steps=300, seed=0):
    """A model with confident, shaped masks and separated box scores, in seconds.

    Training the whole tiny model takes ~0.5 s an iteration on this machine, and a few
    dozen iterations leave its losses near chance. So: BatchNorm statistics of the random
    backbone are measured on the training images (else its activations blow up in eval
    mode); then, on features computed once, the box predictor learns to classify and
    refine the RPN's proposals (sampled and labelled by Detectron2's
    ``label_and_sample_proposals``) and the mask head learns the GT masks at the GT boxes,
    each with Detectron2's own loss. The backbone and the RPN keep their random weights.
    """
    torch.manual_seed(seed)
    model = build_model(cfg)
    mapper = DatasetMapper(cfg, is_train=True, augmentations=[])  # no random flips
    images = [mapper(d) for d in DatasetCatalog.get(cfg.DATASETS.TRAIN[0])]
    batches = [images[i : i + 2] for i in range(0, len(images), 2)]
    for m in model.backbone.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.reset_running_stats()
            m.momentum = None  # a plain average over the batches
    model.train()
    with torch.no_grad():
        for batch in batches:
            model.backbone(model.preprocess_image(batch).tensor)
    model.eval()
    heads = model.roi_heads
    cached = []
    with torch.no_grad(), EventStorage():
        for batch in batches:
            images = model.preprocess_image(batch)
            levels = model.backbone(images.tensor)
            gt = [x["instances"] for x in batch]
            proposals, _ = model.proposal_generator(images, levels, None)
            sampled = heads.label_and_sample_proposals(proposals, gt)
            box_features = heads.box_pooler(
                [levels[f] for f in heads.box_in_features], [p.proposal_boxes for p in sampled])
            for instances in gt:
                instances.proposal_boxes = instances.gt_boxes
            mask_features = heads.mask_pooler(
                [levels[f] for f in heads.mask_in_features], [x.gt_boxes for x in gt])
            cached.append((box_features, sampled, mask_features, gt))
    trained = [heads.box_head, heads.box_predictor, heads.mask_head]
    optimizer = torch.optim.Adam([p for m in trained for p in m.parameters()], lr=3e-3)
    last_epoch = []
    with EventStorage():
        for step in range(steps):
            box_features, sampled, mask_features, gt = cached[step % len(cached)]
            predictions = heads.box_predictor(heads.box_head(box_features))
            class_loss = heads.box_predictor.losses(predictions, sampled)["loss_cls"]
            box_loss = heads.box_predictor.losses(predictions, sampled)["loss_box_reg"]
            mask_loss = mask_rcnn_loss(heads.mask_head.layers(mask_features), gt)
            optimizer.zero_grad()
            (class_loss + box_loss + mask_loss).backward()
            optimizer.step()
            if step >= steps - len(cached):
                last_epoch.append((float(class_loss), float(mask_loss)))
    return model.eval(), np.mean(last_epoch, 0)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny model with a trained mask head, its config, and validation images with their
    GT boxes."""
    tmp = tmp_path_factory.mktemp("export")
    data = str(tmp / "data")
    prepare_synthetic(data, num_train=16, num_val=3, cfg=SyntheticConfig(image_size=64))
    prefix = f"export_{uuid.uuid4().hex[:8]}"
    register_synthetic(data, name_prefix=prefix)
    opts = TINY + ["DATASETS.TRAIN", f"('{prefix}_train',)", "OUTPUT_DIR", str(tmp / "train")]
    cfg = load_config(Namespace(config_file=CONFIG, opts=opts))
    cfg.freeze()
    model, (class_loss, mask_loss) = fit(cfg)
    assert class_loss < 0.5 and mask_loss < 0.5, (class_loss, mask_loss)
    with open(os.path.join(data, "annotations", "val.json")) as f:
        coco = json.load(f)
    samples = []
    for im in coco["images"]:
        # The model reads BGR (INPUT.FORMAT); PNGs are RGB.
        rgb = np.asarray(Image.open(os.path.join(data, "val", im["file_name"])).convert("RGB"))
        xywh = np.array([a["bbox"] for a in coco["annotations"] if a["image_id"] == im["id"]])
        boxes = np.concatenate([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], 1).astype(np.float32)
        samples.append((np.ascontiguousarray(rgb[:, :, ::-1]), boxes))
    return cfg, model, samples


@pytest.fixture(scope="module")
def exported(trained, tmp_path_factory):
    cfg, model, _ = trained
    out = tmp_path_factory.mktemp("exported")
    written = load_tool().export(cfg, model, str(out))
    return {key: str(path) for key, path in written.items()}


def stretched(image, height, width):
    """The image at another size (nearest), so that the model's resize has work to do."""
    ys = np.arange(height) * image.shape[0] // height
    xs = np.arange(width) * image.shape[1] // width
    return np.ascontiguousarray(image[ys][:, xs])


def cases(samples):
    """(image, boxes) at the model's own scale (64x64: no resize) and at two sizes the
    traced graphs never saw: 72x40, resized up to 96x53, and 80x120, down to 64x96."""
    for image, boxes in samples:
        yield image, boxes
    for (image, boxes), (h, w) in zip(samples, [(72, 40), (80, 120)]):
        scale = np.array([w / 64, h / 64] * 2, dtype=np.float32)
        yield stretched(image, h, w), boxes * scale


@functools.lru_cache(maxsize=None)
def onnx_session(path):
    return ort.InferenceSession(path, providers=["CPUExecutionProvider"])


def run_onnx(path, *inputs):
    session = onnx_session(path)
    names = [i.name for i in session.get_inputs()]
    return session.run(None, {n: np.asarray(x) for n, x in zip(names, inputs)})


def run_torchscript(path, *inputs):
    scripted = torch.jit.load(path)  # loaded anew: a file, not a module in memory, is tested
    return [x.numpy() for x in scripted(*[torch.from_numpy(x) for x in inputs])]


RUNTIMES = (("torchscript", run_torchscript), ("onnx", run_onnx))


def ious(expected, got):
    return mask_iou(torch.from_numpy(got), torch.from_numpy(expected)).numpy()


def assert_masks_match(expected, got, what, min_iou=MIN_IOU):
    assert got.shape == expected.shape, what
    if len(expected):
        iou = ious(expected, got)
        assert iou.min() >= min_iou, f"{what}: per-instance mask IoU {iou.tolist()}"


def test_detectron2_export_api_imports():
    """v0.6's detectron2.export needs Caffe2 (absent from torch 2); after deepmac_d2.export
    it imports as on Detectron2 main."""
    from detectron2.export import TracingAdapter, scripting_with_instances  # noqa: F401

    from deepmac_d2.export import tracing

    assert TracingAdapter is tracing.TracingAdapter


def test_resize_in_the_graph_is_detectron2s():
    """Size and values equal Detectron2's ResizeShortestEdge of a uint8 image (Pillow)."""
    rng = np.random.default_rng(0)
    for h, w in [(64, 64), (80, 120), (96, 48), (37, 53), (129, 97), (61, 1000)]:
        image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        for short_edge, max_size in [(64, 96), (50, 60), (200, 333)]:
            resize = T.ResizeShortestEdge(short_edge, max_size)
            expected = resize.get_transform(image).apply_image(image)
            got = resize_shortest_edge(torch.from_numpy(image), short_edge, max_size)
            np.testing.assert_array_equal(got.permute(1, 2, 0).numpy(), expected)
    assert resize_shortest_edge(torch.from_numpy(image), 0, 96).shape == (3, 61, 1000)


def test_box_masks_match_the_eager_predictor(trained, exported, record_property):
    cfg, model, samples = trained
    predictor = BoxMaskPredictor(cfg, model=model)
    differences, fills, min_iou = {}, [], {}
    for image, boxes in cases(samples):
        eager = predictor(image, boxes)
        # Trained masks are shaped: none empty, and they fill their boxes by about half.
        fills.extend(eager.masks.sum((1, 2)) / np.prod(boxes[:, 2:] - boxes[:, :2], 1))
        for fmt, run in RUNTIMES:
            (probabilities,) = run(exported["box_masks", fmt], image, boxes)
            assert_masks_match(eager.masks, probabilities >= 0.5, f"{fmt} {image.shape}")
            min_iou[fmt] = min(min_iou.get(fmt, 1.0), ious(eager.masks, probabilities >= 0.5).min())
            difference = float(np.abs(probabilities - eager.probabilities).max())
            differences[fmt] = max(differences.get(fmt, 0.0), difference)
    assert min(fills) > 0 and 0.3 < np.mean(fills) < 0.9, fills
    # BoxMaskPredictor pastes its probabilities as uint8 (steps of 1/255), the graphs do not.
    assert max(differences.values()) < 1 / 255 + 1e-4, differences
    print(f"box masks vs BoxMaskPredictor: max |probability difference| {differences}, "
          f"min mask IoU {min_iou}")
    record_property("max_probability_difference", differences)


def detectron2_inference(cfg, model, image):
    """Detectron2's own test-time path (DefaultPredictor's): PIL resize, model(inputs)."""
    resize = T.ResizeShortestEdge(cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST)
    x = resize.get_transform(image).apply_image(image)
    inputs = {"image": torch.as_tensor(x.transpose(2, 0, 1).astype("float32")),
              "height": image.shape[0], "width": image.shape[1]}
    with torch.no_grad():
        r = model([inputs])[0]["instances"]
    return [r.pred_boxes.tensor.numpy(), r.scores.numpy(), r.pred_classes.numpy(),
            r.pred_masks.numpy()]


def test_detector_matches_detectron2(trained, exported):
    cfg, model, samples = trained
    counts = []
    for image, _ in cases(samples):
        expected = detectron2_inference(cfg, model, image)
        counts.append(len(expected[0]))
        for fmt, run in RUNTIMES:
            boxes, scores, classes, masks = run(exported["detector", fmt], image)
            what = f"{fmt} {image.shape}"
            assert len(boxes) == len(expected[0]), what
            # The graphs fold the BatchNorms, Detectron2's model does not: float32 rounding
            # through about 25 layers of fan-in up to 3 x 3 x 512 (tests/tolerance.py).
            assert_close_to_rounding(torch.from_numpy(boxes), torch.from_numpy(expected[0]), 25, 9 * 512, what)
            assert_close_to_rounding(torch.from_numpy(scores), torch.from_numpy(expected[1]), 25, 9 * 512, what)
            np.testing.assert_array_equal(classes, expected[2], err_msg=what)
            assert_masks_match(expected[3], masks, what)
    # Detections at the traced size and on a resized image (zero detections, where a case
    # has none, is compared too: empty outputs of the right shapes).
    assert min(counts[:3]) > 0 and max(counts[3:]) > 0, counts


# Boxes partly or wholly outside the image, of zero width or height, flipped, not finite.
ODD_BOXES = np.array([
    [-30, -10, 40, 50], [70, 10, 90, 30], [10, 200, 30, 220], [20, 20, 20, 40],
    [30, 30, 50, 30], [40, 10, 20, 30], [np.nan, 0, 10, 10], [0, 0, np.inf, 10],
], dtype=np.float32)


@pytest.mark.parametrize("fmt", ["eager", "torchscript", "onnx"])
def test_odd_and_empty_box_lists_give_defined_masks(trained, exported, fmt):
    cfg, model, samples = trained
    image = samples[0][0]
    if fmt == "eager":
        module = BoxMaskExport.from_config(cfg, model)

        def run(image, boxes):
            with torch.no_grad():
                return module(torch.from_numpy(image), torch.from_numpy(boxes)).numpy()
    else:
        runner = run_torchscript if fmt == "torchscript" else run_onnx

        def run(image, boxes):
            return runner(exported["box_masks", fmt], image, boxes)[0]

    empty = run(image, np.zeros((0, 4), np.float32))
    assert empty.shape == (0, 64, 64) and empty.dtype == np.float32
    probabilities = run(image, ODD_BOXES)
    assert probabilities.shape == (len(ODD_BOXES), 64, 64)
    assert np.isfinite(probabilities).all()
    # Outside the image, degenerate, flipped or not finite: zero everywhere (index 1 reaches
    # past the right edge and 0 past the top-left corner: clipped, as the eager predictor).
    assert not probabilities[2:].any()
    eager = BoxMaskPredictor(cfg, model=model)(image, ODD_BOXES[:3])
    assert_masks_match(eager.masks, probabilities[:3] >= 0.5, fmt)


PROBE = """
import builtins, sys
real_import = builtins.__import__
def guarded(name, *args, **kwargs):
    if name.split(".")[0] in {blocked!r}:
        raise ImportError("blocked for this test: " + name)
    return real_import(name, *args, **kwargs)
builtins.__import__ = guarded
for name in {blocked!r}:
    try:
        __import__(name)
    except ImportError:
        pass
    else:
        raise SystemExit(name + " is importable")
import numpy as np, torch, torchvision  # torchvision registers the graph's RoIAlign and NMS
inputs = np.load(sys.argv[1])
boxes_model = torch.jit.load(sys.argv[2])
detector = torch.jit.load(sys.argv[3])
(p,) = boxes_model(torch.from_numpy(inputs["image"]), torch.from_numpy(inputs["boxes"]))
outputs = [x.numpy() for x in detector(torch.from_numpy(inputs["image"]))]
np.savez(sys.argv[4], probabilities=p.numpy(), boxes=outputs[0], masks=outputs[3])
print("modules:", sorted(m for m in sys.modules if m.split(".")[0] in {blocked!r}))
"""


def test_torchscript_serves_without_detectron2(trained, exported, tmp_path, record_property):
    cfg, model, samples = trained
    image, boxes = list(cases(samples))[3]  # 72x40, resized in the graph
    np.savez(tmp_path / "in.npz", image=image, boxes=boxes)
    script = tmp_path / "serve.py"
    script.write_text(textwrap.dedent(PROBE.format(blocked=BLOCKED)))
    # -I: no PYTHONPATH, no user site, not the repository on sys.path; the import guard
    # also stops the editable deepmac_d2 and the installed detectron2 in site-packages.
    env = dict(os.environ, OMP_NUM_THREADS="1")
    res = subprocess.run(
        [sys.executable, "-I", str(script), str(tmp_path / "in.npz"),
         exported["box_masks", "torchscript"], exported["detector", "torchscript"],
         str(tmp_path / "out.npz")],
        cwd=str(tmp_path), env=env, capture_output=True, text=True, timeout=120,
    )
    assert res.returncode == 0, res.stdout + res.stderr
    assert "modules: []" in res.stdout
    served = np.load(tmp_path / "out.npz")
    box_masks, detector = BoxMaskExport.from_config(cfg, model), DetectorExport.from_config(cfg, model)
    with torch.no_grad():
        probabilities = box_masks(torch.from_numpy(image), torch.from_numpy(boxes))
        detections = detector(torch.from_numpy(image))
    # The same graph in another process, on one thread, maybe another kernel: equal up to
    # float32 rounding, compared on what users see. Masks: per-instance IoU of the
    # thresholded probabilities (the largest probability difference is reported). Boxes:
    # within rounding through the detector, about 25 layers of fan-in up to 3 x 3 x 512
    # (tests/tolerance.py), relative to the largest coordinate.
    assert_masks_match(probabilities.numpy() >= 0.5, served["probabilities"] >= 0.5, "box masks")
    assert_masks_match(detections[3].numpy(), served["masks"], "detector masks")
    assert_close_to_rounding(torch.from_numpy(served["boxes"]), detections[0], 25, 9 * 512, "boxes")
    difference = float(np.abs(served["probabilities"] - probabilities.numpy()).max())
    print(f"served vs eager: max |probability difference| {difference:.3g}")
    record_property("max_probability_difference", difference)
    assert len(served["boxes"])


def test_tool_exports_a_checkpoint_and_refuses_missing_weights(trained, exported, tmp_path):
    cfg, model, samples = trained
    info = json.load(open(os.path.join(os.path.dirname(exported["detector", "onnx"]),
                                       "export.json")))
    assert info["input_format"] == "BGR"
    assert info["models"]["box_masks"]["inputs"] == ["image", "boxes"]
    assert info["models"]["detector"]["outputs"] == ["boxes", "scores", "classes", "masks"]
    # The command line, from a config file and a checkpoint, as a user runs it.
    config_file = tmp_path / "config.yaml"
    config_file.write_text(cfg.dump())
    DetectionCheckpointer(model, save_dir=str(tmp_path)).save("model")
    written = load_tool().main([
        "--config-file", str(config_file), "--weights", str(tmp_path / "model.pth"),
        "--output", str(tmp_path / "out"), "--model", "box_masks", "--format", "onnx",
    ])
    assert list(written) == [("box_masks", "onnx")]
    image, boxes = samples[0]
    np.testing.assert_array_equal(run_onnx(written["box_masks", "onnx"], image, boxes)[0],
                                  run_onnx(exported["box_masks", "onnx"], image, boxes)[0])
    with pytest.raises(SystemExit, match="--weights .*missing.pth.* is not a file"):
        load_tool().main(["--config-file", CONFIG, "--weights", str(tmp_path / "missing.pth"),
                          "--output", str(tmp_path)])
    with pytest.raises(SystemExit, match="MASK_ON False: only a GeneralizedRCNN with a mask"):
        load_tool().main(["--config-file", CONFIG, "--output", str(tmp_path),
                          "MODEL.MASK_ON", "False"])
