"""The pure-PyTorch ``detectron2._C`` stand-in, each op against an independent computation.

Reference computations: ``F.conv2d`` and hand-shifted inputs for deformable
convolution, ``torchvision.ops.box_iou`` / ``nms`` and analytic polygon areas
for rotated boxes, Detectron2's (torchvision's) axis-aligned ``ROIAlign`` and
hand-rotated outputs for ``ROIAlignRotated``, finite differences
(``gradcheck``) for every backward, and pycocotools' ``COCOeval`` for
Detectron2's ``COCOeval_opt``.

On CPU, Detectron2's deformable-convolution Functions only call ``_C`` on
CUDA tensors; a tensor subclass that reports ``is_cuda`` sends them down that
branch, so the checks run through Detectron2's own argument lists.
"""
import copy
import math
import subprocess
import sys

import numpy as np
import pycocotools.mask as mask_util
import pytest
import torch
import torch.nn.functional as F
import torchvision
from detectron2 import _C
from detectron2.layers import (
    DeformConv,
    ModulatedDeformConv,
    ROIAlign,
    ROIAlignRotated,
    batched_nms_rotated,
    nms_rotated,
)
from detectron2.layers.rotated_boxes import pairwise_iou_rotated
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from deepmac_d2.compat import using_c_fallback

pytestmark = pytest.mark.skipif(
    not using_c_fallback(), reason="a compiled detectron2._C is installed; the stand-in is unused"
)

CUDA = pytest.param(
    "cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
)


class CudaLike(torch.Tensor):
    """A CPU tensor that Detectron2's ``input.is_cuda`` checks take for a CUDA one."""

    @property
    def is_cuda(self):
        return True


def on(device, tensor):
    """``tensor`` where Detectron2 will route it through ``_C`` ("cpu" -> CudaLike)."""
    if device == "cpu":
        return tensor.as_subclass(CudaLike)
    return tensor.to(device)


def plain(tensor):
    return tensor.as_subclass(torch.Tensor).cpu()


# ----------------------------------------------------------------------------- deform conv


@pytest.mark.parametrize("device", ["cpu", CUDA])
def test_deform_conv_zero_offset_is_conv2d(device):
    torch.manual_seed(0)
    conv = DeformConv(4, 6, 3, stride=2, padding=2, dilation=2, groups=2, deformable_groups=2)
    conv = conv.double().to(device)
    x = torch.randn(2, 4, 9, 8, dtype=torch.float64)
    offset = torch.zeros(2, 2 * 2 * 9, 5, 4, dtype=torch.float64)
    out = conv(on(device, x), on(device, offset))
    expected = F.conv2d(x, plain(conv.weight.detach()), stride=2, padding=2, dilation=2, groups=2)
    torch.testing.assert_close(plain(out), expected)


@pytest.mark.parametrize("device", ["cpu", CUDA])
def test_modulated_deform_conv_zero_offset_is_scaled_conv2d(device):
    torch.manual_seed(0)
    conv = ModulatedDeformConv(4, 2, 3, padding=1, groups=2, deformable_groups=2)
    conv = conv.double().to(device)
    torch.nn.init.normal_(conv.bias)
    x = torch.randn(1, 4, 5, 6, dtype=torch.float64)
    offset = torch.zeros(1, 2 * 2 * 9, 5, 6, dtype=torch.float64)
    # Deformable group 0 (input channels 0-1, i.e. conv group 0) scaled by 0.5, group 1 by 2.
    mask = torch.cat([torch.full((1, 9, 5, 6), 0.5), torch.full((1, 9, 5, 6), 2.0)], 1).double()
    out = conv(on(device, x), on(device, offset), on(device, mask))
    weight, bias = plain(conv.weight.detach()), plain(conv.bias.detach())
    scale = torch.tensor([0.5, 2.0], dtype=torch.float64).view(1, 2, 1, 1)
    expected = F.conv2d(x, weight, padding=1, groups=2) * scale + bias.view(1, 2, 1, 1)
    torch.testing.assert_close(plain(out), expected)


def shifted_and_padded(x, dy, dx, pad):
    """x read at (y + dy, x + dx) for y in [-pad, H + pad), zero outside the image."""
    margin = pad + max(abs(dy), abs(dx))
    big = F.pad(x, (margin,) * 4)
    h, w = x.shape[-2:]
    rows = slice(margin - pad + dy, margin + h + pad + dy)
    cols = slice(margin - pad + dx, margin + w + pad + dx)
    return big[..., rows, cols]


def test_deform_conv_integer_offsets_shift_each_deformable_group():
    """Offset (dy, dx) on every tap reads the input at (y + dy, x + dx), also for the
    taps that fall in the padding: only positions outside the image read 0."""
    torch.manual_seed(0)
    conv = DeformConv(4, 3, 3, padding=1, deformable_groups=2).double()
    x = torch.randn(1, 4, 6, 7, dtype=torch.float64)
    offset = torch.zeros(1, 2, 9, 2, 6, 7, dtype=torch.float64)  # (N, group, tap, (dy, dx), H, W)
    offset[:, 0, :, 0] = 1.0  # group 0 (channels 0-1) reads one row down
    offset[:, 1, :, 1] = -2.0  # group 1 (channels 2-3) reads two columns left
    out = conv(on("cpu", x), on("cpu", offset.view(1, 36, 6, 7)))
    read = torch.cat(
        [shifted_and_padded(x[:, :2], 1, 0, pad=1), shifted_and_padded(x[:, 2:], 0, -2, pad=1)], 1
    )
    expected = F.conv2d(read, conv.weight.detach())
    torch.testing.assert_close(plain(out), expected)


def test_deform_conv_half_pixel_offset_interpolates():
    """dx = 0.5 on a 1x1 identity kernel averages each pixel with its right neighbour,
    the neighbour past the last column counting as 0."""
    x = torch.randn(1, 1, 3, 4, dtype=torch.float64)
    offset = torch.zeros(1, 2, 3, 4, dtype=torch.float64)
    offset[:, 1] = 0.5
    weight = torch.ones(1, 1, 1, 1, dtype=torch.float64)
    out = torch.empty(1, 1, 3, 4, dtype=torch.float64)
    args = (1, 1, 1, 1, 0, 0, 1, 1, 1, 1, 1)  # kW kH dW dH padW padH dilW dilH group dgroup step
    _C.deform_conv_forward(x, weight, offset, out, x.new_empty(0), x.new_empty(0), *args)
    right = F.pad(x[..., 1:], (0, 1))
    torch.testing.assert_close(out, (x + right) / 2)


@pytest.mark.parametrize("device", ["cpu", CUDA])
def test_deform_conv_gradients(device):
    torch.manual_seed(0)
    conv = DeformConv(4, 2, 3, padding=1, groups=2, deformable_groups=2).double().to(device)
    x = on(device, torch.randn(2, 4, 4, 3, dtype=torch.float64)).requires_grad_()
    # Fractional offsets away from integers, where bilinear sampling is not differentiable.
    offset = torch.rand(2, 36, 4, 3, dtype=torch.float64) * 0.6 + 0.2
    offset = on(device, offset).requires_grad_()
    weight = conv.weight.detach().clone().requires_grad_()

    def run(x, offset, weight):
        return torch.func.functional_call(conv, {"weight": weight}, (x, offset))

    assert torch.autograd.gradcheck(run, (x, offset, weight), check_undefined_grad=False)


@pytest.mark.parametrize("device", ["cpu", CUDA])
def test_modulated_deform_conv_gradients(device):
    torch.manual_seed(0)
    conv = ModulatedDeformConv(2, 4, 3, padding=1, groups=2, deformable_groups=1)
    conv = conv.double().to(device)
    x = on(device, torch.randn(1, 2, 4, 4, dtype=torch.float64)).requires_grad_()
    offset = on(device, torch.rand(1, 18, 4, 4, dtype=torch.float64) * 0.6 + 0.2).requires_grad_()
    mask = on(device, torch.rand(1, 9, 4, 4, dtype=torch.float64)).requires_grad_()
    weight = conv.weight.detach().clone().requires_grad_()
    bias = torch.randn_like(conv.bias).requires_grad_()

    def run(x, offset, mask, weight, bias):
        return torch.func.functional_call(conv, {"weight": weight, "bias": bias}, (x, offset, mask))

    inputs = (x, offset, mask, weight, bias)
    assert torch.autograd.gradcheck(run, inputs, check_undefined_grad=False)


# --------------------------------------------------------------------------- rotated boxes


def random_boxes(n, generator, size=60.0):
    center = torch.rand(n, 2, generator=generator, dtype=torch.float64) * size
    wh = torch.rand(n, 2, generator=generator, dtype=torch.float64) * size / 2 + 1
    return center, wh


@pytest.mark.parametrize("device", ["cpu", CUDA])
def test_box_iou_rotated_at_angle_zero_is_box_iou(device):
    g = torch.Generator().manual_seed(0)
    center, wh = random_boxes(40, g)
    rotated = torch.cat([center, wh, torch.zeros(40, 1, dtype=torch.float64)], 1)
    xyxy = torch.cat([center - wh / 2, center + wh / 2], 1)
    ious = pairwise_iou_rotated(rotated.to(device), rotated[:25].to(device))
    assert ious.dtype == torch.float32
    expected = torchvision.ops.box_iou(xyxy, xyxy[:25]).float()
    torch.testing.assert_close(ious.cpu(), expected, atol=1e-6, rtol=1e-6)


def test_box_iou_rotated_hand_worked():
    boxes1 = torch.tensor(
        [
            [10.0, 10.0, 2.0, 2.0, 0.0],  # a square...
            [0.0, 0.0, 4.0, 2.0, 0.0],  # a 4 x 2 rectangle...
            [0.0, 0.0, 4.0, 2.0, 30.0],  # ...rotated by 30 degrees...
            [0.0, 0.0, 4.0, 2.0, 0.0],
            [0.0, 0.0, 0.0, 2.0, 0.0],  # an empty box
        ]
    )
    boxes2 = torch.tensor(
        [
            [10.0, 10.0, 2.0, 2.0, 45.0],  # ...and its 45-degree turn: a regular octagon
            [0.0, 0.0, 4.0, 2.0, 90.0],  # ...and its 90-degree turn: a 2 x 2 square
            [0.0, 0.0, 4.0, 2.0, -150.0],  # ...and the same box turned by 180 degrees
            [5.0, 0.0, 4.0, 2.0, 0.0],  # disjoint
            [0.0, 0.0, 2.0, 2.0, 0.0],
        ]
    )
    octagon = 8 * (math.sqrt(2) - 1)  # inradius 1
    expected = torch.tensor([octagon / (8 - octagon), 4 / 12, 1.0, 0.0, 0.0])
    ious = pairwise_iou_rotated(boxes1, boxes2).diagonal()
    torch.testing.assert_close(ious, expected, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("device", ["cpu", CUDA])
def test_nms_rotated_at_angle_zero_is_nms(device):
    g = torch.Generator().manual_seed(1)
    center, wh = random_boxes(120, g)
    scores = torch.rand(120, generator=g, dtype=torch.float64).float()
    rotated = torch.cat([center, wh, torch.zeros(120, 1, dtype=torch.float64)], 1).float()
    xyxy = torch.cat([center - wh / 2, center + wh / 2], 1).float()
    for threshold in (0.1, 0.3, 0.7):
        keep = nms_rotated(rotated.to(device), scores.to(device), threshold)
        assert keep.dtype == torch.int64
        assert torch.equal(keep.cpu(), torchvision.ops.nms(xyxy, scores, threshold))
    labels = torch.randint(0, 3, (120,), generator=g)
    keep = batched_nms_rotated(rotated.to(device), scores.to(device), labels.to(device), 0.3)
    assert torch.equal(keep.cpu(), torchvision.ops.batched_nms(xyxy, scores, labels, 0.3))


def test_nms_rotated_uses_the_angle():
    # A 4 x 2 box and its 90-degree turn overlap with IoU 1/3; a far box never does.
    boxes = torch.tensor([[0.0, 0, 4, 2, 0], [0, 0, 4, 2, 90], [20, 0, 4, 2, 45]])
    scores = torch.tensor([0.5, 0.9, 0.1])
    assert nms_rotated(boxes, scores, 0.3).tolist() == [1, 2]
    assert nms_rotated(boxes, scores, 0.4).tolist() == [1, 0, 2]
    assert nms_rotated(boxes[:0], scores[:0], 0.4).shape == (0,)


# ------------------------------------------------------------------------ ROIAlignRotated


def image_and_rois(generator, n=12):
    features = torch.randn(2, 3, 10, 13, generator=generator, dtype=torch.float64)
    center = torch.rand(n, 2, generator=generator, dtype=torch.float64) * torch.tensor([26.0, 20])
    wh = torch.rand(n, 2, generator=generator, dtype=torch.float64) * 12 + 0.5
    batch = torch.randint(0, 2, (n, 1), generator=generator).double()
    return features, batch, center, wh


@pytest.mark.parametrize("device", ["cpu", CUDA])
@pytest.mark.parametrize("sampling_ratio", [0, 2])
def test_roi_align_rotated_at_angle_zero_is_aligned_roi_align(device, sampling_ratio):
    g = torch.Generator().manual_seed(2)
    features, batch, center, wh = image_and_rois(g)  # some boxes cross the image border
    rotated = torch.cat([batch, center, wh, torch.zeros_like(batch)], 1)
    xyxy = torch.cat([batch, center - wh / 2, center + wh / 2], 1)
    features = features.to(device)
    for scale in (0.5, 0.25):
        expected = ROIAlign((3, 4), scale, sampling_ratio, aligned=True)(features, xyxy.to(device))
        out = ROIAlignRotated((3, 4), scale, sampling_ratio)(features, rotated.to(device))
        torch.testing.assert_close(out, expected)


def test_roi_align_rotated_quarter_turn_rotates_output():
    """Detectron2 turns the sampling grid counter-clockwise (y down): at +90 degrees the
    bin (i, j) samples where bin (n - 1 - j, i) did at 0 degrees, a clockwise rot90."""
    g = torch.Generator().manual_seed(3)
    features = torch.randn(1, 2, 12, 12, generator=g, dtype=torch.float64)
    roi = torch.tensor([[0.0, 5.3, 6.1, 6.0, 6.0, 0.0]], dtype=torch.float64)
    turned = roi.clone()
    turned[0, 5] = 90.0
    pool = ROIAlignRotated((4, 4), 1.0, 2)
    torch.testing.assert_close(pool(features, turned), torch.rot90(pool(features, roi), -1, (2, 3)))


@pytest.mark.parametrize("device", ["cpu", CUDA])
def test_roi_align_rotated_gradients(device):
    g = torch.Generator().manual_seed(4)
    features, batch, center, wh = image_and_rois(g, n=5)
    angle = torch.rand(5, 1, generator=g, dtype=torch.float64) * 360 - 180
    rois = torch.cat([batch, center, wh, angle], 1).to(device)
    features = features[:, :2, :7, :8].to(device).requires_grad_()
    for sampling_ratio in (0, 2):
        pool = ROIAlignRotated((2, 3), 0.5, sampling_ratio)
        assert torch.autograd.gradcheck(lambda f: pool(f, rois), (features,))


# ------------------------------------------------------------------------------ COCO eval


def square_polygon(x, y, w, h):
    return [[x, y, x + w, y, x + w, y + h, x, y + h]]


def annotation(annotations, image_id, category, box, crowd=0):
    annotations.append(
        {
            "id": len(annotations) + 1,
            "image_id": image_id,
            "category_id": category,
            "bbox": box,
            "area": box[2] * box[3],
            "iscrowd": crowd,
            "segmentation": square_polygon(*box),
        }
    )


def tiny_coco():
    """Ground truth in all three COCO area ranges, crowd regions, a category without
    ground truth (only false positives), an image without detections, tied scores,
    and a hand-made image where each matching rule changes the outcome."""
    rng = np.random.RandomState(0)
    images = [{"id": i, "width": 400, "height": 300, "file_name": f"{i}.jpg"} for i in range(1, 6)]
    categories = [{"id": c, "name": f"c{c}"} for c in (1, 2, 7)]
    annotations, results = [], []
    for image_id in (1, 2, 3, 4):
        for k in range(6):
            category = (1, 2)[k % 2]
            side = (20, 60, 150)[k % 3]  # small, medium, large
            x, y = rng.uniform(0, 400 - side), rng.uniform(0, 300 - side)
            w, h = side * rng.uniform(0.7, 1.0), side * rng.uniform(0.7, 1.0)
            crowd = int(image_id == 2 and k < 2)
            annotation(annotations, image_id, category, [x, y, w, h], crowd)
            if image_id == 4:
                continue  # no detections at all on image 4
            for _ in range(rng.randint(0, 4 if crowd else 3)):
                dx, dy = rng.normal(0, 0.05 * w), rng.normal(0, 0.05 * h)
                box = [x + dx, y + dy, w * rng.uniform(0.85, 1.15), h * rng.uniform(0.85, 1.15)]
                results.append((image_id, category, box, None))
        if image_id != 4:
            for _ in range(12):  # false positives, also of category 7
                side = rng.uniform(10, 120)
                box = [rng.uniform(0, 280), rng.uniform(0, 180), side, side * rng.uniform(0.5, 2)]
                results.append((image_id, int(rng.choice([1, 2, 7])), box, None))
    # Image 5: a regular object inside a crowd region listed after it. Its exact
    # detection overlaps both fully and must take the regular one; three more
    # detections inside the crowd must all be absorbed by it; a false positive
    # ties the first detection's score and comes first.
    annotation(annotations, 5, 1, [100.0, 100.0, 50.0, 40.0])
    annotation(annotations, 5, 1, [60.0, 60.0, 200.0, 150.0], crowd=1)
    results.append((5, 1, [300.0, 250.0, 40.0, 40.0], 0.9))
    results.append((5, 1, [100.0, 100.0, 50.0, 40.0], 0.9))
    results.append((5, 1, [200.0, 170.0, 30.0, 30.0], 0.8))
    results.append((5, 1, [65.0, 65.0, 25.0, 25.0], 0.6))
    results.append((5, 1, [220.0, 65.0, 30.0, 30.0], 0.5))
    # Two objects at exactly the same IoU (2/3) from the first detection: it takes the
    # later one, which leaves the earlier one to the second detection (IoU 1; 3/7 with
    # the later one).
    annotation(annotations, 5, 2, [300.0, 20.0, 10.0, 10.0])
    annotation(annotations, 5, 2, [304.0, 20.0, 10.0, 10.0])
    results.append((5, 2, [302.0, 20.0, 10.0, 10.0], 0.95))
    results.append((5, 2, [300.0, 20.0, 10.0, 10.0], 0.85))

    random_scores = iter(np.round(rng.uniform(0.05, 1.0, len(results)), 1))  # rounded: ties
    detections = []
    for image_id, category, box, score in results:
        rle = mask_util.merge(mask_util.frPyObjects(square_polygon(*box), 300, 400))
        rle["counts"] = rle["counts"].decode("ascii")
        detections.append(
            {
                "image_id": image_id,
                "category_id": category,
                "bbox": box,
                "score": float(next(random_scores) if score is None else score),
                "segmentation": rle,
            }
        )
    return {"images": images, "annotations": annotations, "categories": categories}, detections


def load(dataset, detections, iou_type):
    gt = COCO()
    gt.dataset = copy.deepcopy(dataset)
    gt.createIndex()
    dets = copy.deepcopy(detections)
    if iou_type == "bbox":
        for d in dets:
            d.pop("segmentation")
    return gt, gt.loadRes(dets)


@pytest.mark.parametrize("use_cats", [1, 0])
@pytest.mark.parametrize("iou_type", ["bbox", "segm"])
def test_coco_eval_opt_matches_pycocotools(iou_type, use_cats):
    from detectron2.evaluation.fast_eval_api import COCOeval_opt

    dataset, detections = tiny_coco()
    evals = []
    for cls in (COCOeval, COCOeval_opt):
        gt, dt = load(dataset, detections, iou_type)
        e = cls(gt, dt, iou_type)
        e.params.useCats = use_cats
        e.params.maxDets = [1, 3, 100]  # a limit that bites, per image and category
        e.evaluate()
        e.accumulate()
        e.summarize()
        evals.append(e)
    reference, ours = evals
    assert 0 < reference.stats[0] < 1  # a dataset that tells AP settings apart
    np.testing.assert_allclose(ours.stats, reference.stats, rtol=1e-12, atol=1e-12)
    for key in ("precision", "recall", "scores"):
        np.testing.assert_allclose(ours.eval[key], reference.eval[key], rtol=1e-12, atol=1e-12)
    if use_cats:
        assert (reference.eval["precision"][:, :, 2] == -1).all()  # category 7: no ground truth


# ------------------------------------------------------------------------------- loading


def test_detectron2_imports_with_the_stand_in_in_a_fresh_process():
    code = (
        "import sys\n"
        "import detectron2.layers, detectron2.evaluation.fast_eval_api\n"
        "from detectron2 import _C\n"
        "assert _C.IS_DEEPMAC_FALLBACK is True\n"
        "assert 'deepmac_d2' not in sys.modules\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
