"""Mask heads trained and evaluated on one frozen detector: the head is the only variable.

When each mask head is trained with its own Mask R-CNN, a difference in mask AP mixes
the head with everything the head's gradients and the run's randomness did to the
backbone, RPN and box head. Here a detector is trained once (boxes of every class, no
mask branch) and frozen; its FPN features, RPN proposals and test detections are
computed once (:func:`cache_frozen_images`), and every mask head then trains on those
features through :class:`DeepMaskROIHeads`' own training path (proposal sampling, GT
boxes, allowed classes: :func:`train_mask_head`) and is scored on the same detections
(:func:`evaluate_mask_head`). Training a head costs its own forward and backward only,
so it can run until its loss flattens.
"""
import contextlib
import io
import math
from dataclasses import dataclass
from typing import Dict, List, Mapping, Optional, Sequence

import numpy as np
import pycocotools.mask as mask_util
import torch
from detectron2.data import MetadataCatalog
from detectron2.data import transforms as T
from detectron2.modeling.postprocessing import detector_postprocess
from detectron2.structures import ImageList, Instances
from detectron2.utils.events import EventStorage
from fvcore.nn.precise_bn import update_bn_stats
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from deepmac_d2.data.dataset_mapper import InstanceMaskDatasetMapper
from deepmac_d2.evaluation.given_box_iou import GivenBoxMapper, mask_iou
from deepmac_d2.evaluation.subset_evaluation import subset_coco_metrics
from deepmac_d2.modeling.hourglass import KerasBatchNorm2d

__all__ = ["FrozenImages", "cache_frozen_images", "evaluate_mask_head", "frozen_feature_bytes",
           "frozen_mappers", "image_subset", "precise_mask_head_bn", "train_mask_head"]


@dataclass
class FrozenImages:
    """What a frozen detector computed on a set of images, at the network's input size.

    ``features``: one float16 tensor per image and FPN level (C x H x W, unpadded
    beyond the backbone's size divisibility). ``targets``: ``gt_boxes``, ``gt_classes``,
    ``gt_masks`` (BitMasks) and ``gt_has_mask`` at the input size (train), or at the
    original size (test). ``proposals``: the RPN's (``proposal_boxes``,
    ``objectness_logits``). ``detections``: the box head's (``pred_boxes``, ``scores``,
    ``pred_classes``), test only. ``original_sizes``: (height, width) on disk;
    ``image_ids``: the dataset's ids.
    """

    features: List[Dict[str, torch.Tensor]]
    image_sizes: List[tuple]
    original_sizes: List[tuple]
    image_ids: List
    targets: List[Instances]
    proposals: List[Instances]
    detections: Optional[List[Instances]] = None

    def __len__(self):
        return len(self.features)

    def batch(self, indices: Sequence[int], device="cpu"):
        """Padded float32 features of ``indices`` as the ROI heads take them, and the
        image sizes."""
        levels = self.features[0].keys()
        features = {
            k: ImageList.from_tensors([self.features[i][k].float() for i in indices]).tensor.to(device)
            for k in levels
        }
        return features, [self.image_sizes[i] for i in indices]


def frozen_mappers(cfg, *, train: bool):
    """The dataset mappers whose outputs :func:`cache_frozen_images` runs the detector on.

    Train: the training mapper's target handling (box-only instances kept with
    ``gt_has_mask``; masks in INPUT.MASK_FORMAT) at the test-time size, once as is and
    once mirrored: the synthetic config's only augmentation, fixed in advance so that
    the features can be reused. Test: the image at the test-time size, its ground truth
    at the original size, where COCO evaluation compares masks (``GivenBoxMapper``).
    """
    cfg = cfg.clone()
    cfg.defrost()
    cfg.MODEL.MASK_ON = True  # the detector's config may have none; the heads need masks
    if not train:
        return [GivenBoxMapper(cfg)]
    resize = T.ResizeShortestEdge([cfg.INPUT.MIN_SIZE_TEST] * 2, cfg.INPUT.MAX_SIZE_TEST)
    kwargs = InstanceMaskDatasetMapper.from_config(cfg, is_train=True)
    return [InstanceMaskDatasetMapper(**dict(kwargs, augmentations=augs, recompute_boxes=False))
            for augs in ([resize], [resize, T.RandomFlip(prob=1.0)])]


def frozen_feature_bytes(cfg, backbone, dataset_dicts: Sequence[dict], *, views: int) -> int:
    """The bytes :func:`cache_frozen_images` keeps of ``dataset_dicts``' features, seen
    ``views`` times each (2 for training: as is and mirrored): float16, at the test-time
    size, padded to the backbone's size divisibility, every level of
    ``backbone.output_shape()``. Known before any detector is trained, from the images'
    ``height`` and ``width``: 64 MiB per 640 x 480 training image at 1024 pixels with
    R50-FPN (COCO's 118k images: 7 TiB), 0.25 MiB at the synthetic demo's 128."""
    divisor = max(getattr(backbone, "size_divisibility", 0), 1)
    levels = backbone.output_shape().values()
    total = 0
    for d in dataset_dicts:
        h, w = T.ResizeShortestEdge.get_output_shape(
            d["height"], d["width"], cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST)
        h, w = math.ceil(h / divisor) * divisor, math.ceil(w / divisor) * divisor
        total += sum(s.channels * math.ceil(h / s.stride) * math.ceil(w / s.stride) for s in levels)
    return 2 * total * views


def image_subset(dataset_dicts: Sequence[dict], count: Optional[int]) -> List[dict]:
    """``count`` of the images, the same ones on every call (a seeded draw, in dataset
    order); all of them when ``count`` is None or not smaller."""
    if count is None or count >= len(dataset_dicts):
        return list(dataset_dicts)
    chosen = torch.randperm(len(dataset_dicts), generator=torch.Generator().manual_seed(0))[:count]
    return [dataset_dicts[i] for i in sorted(chosen.tolist())]


@torch.no_grad()
def cache_frozen_images(model, dataset_dicts: Sequence[dict], mappers, *, detections: bool):
    """Run a detector's backbone and RPN (and, with ``detections``, its box head) once
    on every ``mapper(dataset_dict)`` (see :func:`frozen_mappers`)."""
    was_training = model.training
    model.eval()
    out = FrozenImages([], [], [], [], [], [], [] if detections else None)
    try:
        for d in dataset_dicts:
            for mapper in mappers:
                x = mapper(d)
                images = model.preprocess_image([x])
                features = model.backbone(images.tensor)
                proposals, _ = model.proposal_generator(images, features)
                if detections:
                    dets, _ = model.roi_heads(images, features, proposals)
                    out.detections.append(dets[0].to("cpu"))
                out.features.append({k: v[0].half().cpu() for k, v in features.items()})
                out.image_sizes.append(tuple(x["image"].shape[-2:]))
                out.original_sizes.append((x["height"], x["width"]))
                out.image_ids.append(x["image_id"])
                out.targets.append(x["instances"])
                out.proposals.append(proposals[0].to("cpu"))
    finally:
        model.train(was_training)
    return out


def train_mask_head(
    roi_heads,
    images: FrozenImages,
    *,
    iterations: int,
    ims_per_batch: int,
    base_lr: float,
    weight_decay: float = 1e-4,
    warmup_iters: int = 50,
    generator: torch.Generator,
    device="cpu",
    on_step=None,
) -> List[float]:
    """Train ``roi_heads.mask_head`` alone on cached features; returns the loss per step.

    Each step draws ``ims_per_batch`` images and runs the ROI heads' own mask-training
    path on them (:class:`_MaskTrainingPass`). SGD with momentum 0.9, a linear warmup and a cosine decay to zero, so
    that the run ends where its loss has flattened rather than wherever a step schedule
    left it. ``on_step(step, loss)`` is called after each step.
    """
    head = roi_heads.mask_head
    params = [p for p in head.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=base_lr, momentum=0.9, weight_decay=weight_decay)

    def lr_at(step):
        warm = min(1.0, (step + 1) / warmup_iters) if warmup_iters else 1.0
        return base_lr * warm * 0.5 * (1 + math.cos(math.pi * step / iterations))

    roi_heads.train()
    mask_pass = _MaskTrainingPass(roi_heads, images, generator, device)
    losses = []
    for step in range(iterations):
        loss = mask_pass(_draw(images, ims_per_batch, generator))
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        if not math.isfinite(losses[-1]):
            raise FloatingPointError(f"mask loss is {losses[-1]} at step {step}")
        if on_step is not None:
            on_step(step, losses[-1])
    return losses


def precise_mask_head_bn(roi_heads, images: FrozenImages, *, num_batches: int,
                         ims_per_batch: int, generator: torch.Generator, device="cpu"):
    """Recompute the mask head's BatchNorm statistics with its final weights, as the mean
    over ``num_batches`` training batches (fvcore's precise BN, Detectron2's
    ``TEST.PRECISE_BN``).

    Why: the reference's BatchNorm momentum (Keras 0.997) is made for 100k+ steps; after
    a few hundred, the running statistics still hold much of their initial values
    (0.997^200 = 55%), so inference would judge a deep head by statistics it never had,
    and a short run more harshly than a long one. Recomputed, every head is evaluated
    with the statistics of its own weights, whatever its schedule.
    """
    roi_heads.train()  # BatchNorm on batch statistics while they are measured
    batches = (_draw(images, ims_per_batch, generator) for _ in range(num_batches))
    # fvcore takes each batch's variance as PyTorch reports it, Bessel-corrected, and
    # undoes the correction; the hourglass's KerasBatchNorm2d reports the biased one,
    # which would be uncorrected twice (by 1/4 at a 1x1 level over 4 ROIs). PyTorch's
    # BatchNorm computes the same batch statistics, so it stands in while they are read.
    keras = [m for m in roi_heads.mask_head.modules() if type(m) is KerasBatchNorm2d]
    for m in keras:
        m.__class__ = torch.nn.BatchNorm2d
    try:
        update_bn_stats(_MaskTrainingPass(roi_heads, images, generator, device), batches,
                        num_batches)
    finally:
        for m in keras:
            m.__class__ = KerasBatchNorm2d


def _draw(images, ims_per_batch, generator):
    return torch.randperm(len(images), generator=generator)[:ims_per_batch].tolist()


class _MaskTrainingPass(torch.nn.Module):
    """The ROI heads' mask-training path on cached images, as a module of image indices
    (what fvcore's ``update_bn_stats`` calls): ``label_and_sample_proposals`` (the box
    branch's sampling, GT boxes appended), ``mask_training_instances`` (GT boxes or
    foreground proposals, allowed classes, instances with masks) and ``_forward_mask``
    (pooler, head, mask loss). Returns the mask loss."""

    def __init__(self, roi_heads, images: FrozenImages, generator: torch.Generator, device):
        super().__init__()
        # The mask head is this module's only child: update_bn_stats recomputes the
        # BatchNorm layers it finds in it, and the box head's never run here.
        self.mask_head = roi_heads.mask_head
        self._roi_heads = (roi_heads,)
        self.images, self.generator, self.device = images, generator, device

    def forward(self, indices: List[int]) -> torch.Tensor:
        features, _ = self.images.batch(indices, self.device)
        targets = [self.images.targets[i].to(self.device) for i in indices]
        proposals = [self.images.proposals[i].to(self.device) for i in indices]
        # The generator decides which proposals are sampled: seeded runs repeat. The
        # storage takes label_and_sample_proposals' sampling statistics.
        with _global_rng(self.generator), EventStorage():
            sampled = self._roi_heads[0].label_and_sample_proposals(proposals, targets)
            mask_instances = self._roi_heads[0].mask_training_instances(sampled, targets)
            return self._roi_heads[0]._forward_mask(features, mask_instances)["loss_mask"]


@contextlib.contextmanager
def _global_rng(generator: torch.Generator):
    """Torch's global RNG seeded from ``generator`` inside the block (Detectron2's
    sampling draws from it), restored after."""
    state = torch.random.get_rng_state()
    torch.manual_seed(int(torch.randint(2**62, (1,), generator=generator)))
    try:
        yield
    finally:
        torch.random.set_rng_state(state)


@torch.no_grad()
def _masks_at(roi_heads, images: FrozenImages, boxes: List[Instances], batch_size: int, device):
    """``roi_heads``' masks for ``boxes`` (``pred_boxes``, ``pred_classes`` at the input
    size) per image, pasted at the original size, on the CPU."""
    roi_heads.eval()
    out = []
    for start in range(0, len(images), batch_size):
        indices = list(range(start, min(start + batch_size, len(images))))
        features, _ = images.batch(indices, device)
        # Copies: the mask head writes pred_masks into its input, and detector_postprocess
        # rescales the boxes in place; the cached instances stay as they are.
        given = []
        for i in indices:
            x = Instances(boxes[i].image_size, **boxes[i].get_fields())
            x.pred_boxes = boxes[i].pred_boxes.clone()
            given.append(x.to(device))
        instances = roi_heads.forward_with_given_boxes(features, given)
        for i, inst in zip(indices, instances):
            out.append(detector_postprocess(inst.to("cpu"), *images.original_sizes[i]))
    return out


def evaluate_mask_head(
    roi_heads,
    images: FrozenImages,
    dataset_name: str,
    class_subsets: Mapping[str, Sequence[int]],
    *,
    max_detections: Optional[int] = None,
    batch_size: int = 8,
    device="cpu",
) -> Dict[str, Dict[str, float]]:
    """Mask AP on ``images.detections`` (each image's ``max_detections`` highest-scoring
    ones; all if None) and mean mask IoU at the ground-truth boxes, per class subset
    (dataset category ids).

    The detections are fixed, so between two heads only the masks differ. AP is
    pycocotools' COCOeval (segm) on the dataset's json, restricted to each subset's
    categories; IoU is per instance, at the original size (as in
    :func:`~deepmac_d2.evaluation.given_box_mask_iou`).
    """
    meta = MetadataCatalog.get(dataset_name)
    to_dataset_id = {v: k for k, v in meta.thing_dataset_id_to_contiguous_id.items()}
    results = []
    kept = [d[d.scores.argsort(descending=True)[:max_detections]] for d in images.detections]
    detections = _masks_at(roi_heads, images, kept, batch_size, device)
    for image_id, det in zip(images.image_ids, detections):
        masks = det.pred_masks.numpy().astype(np.uint8)
        for k in range(len(det)):
            rle = mask_util.encode(np.asfortranarray(masks[k]))
            rle["counts"] = rle["counts"].decode("ascii")
            results.append({
                "image_id": image_id,
                "category_id": to_dataset_id[int(det.pred_classes[k])],
                "segmentation": rle,
                "score": float(det.scores[k]),
            })
    if not results:
        raise ValueError("the frozen detector made no detection on the test images: train it "
                         "longer, or lower MODEL.ROI_HEADS.SCORE_THRESH_TEST")
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints as it goes
        coco_gt = COCO(meta.json_file)
        coco_eval = COCOeval(coco_gt, coco_gt.loadRes(results), "segm")
        coco_eval.params.imgIds = sorted(set(images.image_ids))  # a subset: the rest are not misses
        coco_eval.evaluate()
        coco_eval.accumulate()

    # IoU at the ground-truth boxes: the test targets are at the original size, the
    # head takes boxes at the input size.
    given = []
    for i, t in enumerate(images.targets):
        scale_y = images.image_sizes[i][0] / images.original_sizes[i][0]
        scale_x = images.image_sizes[i][1] / images.original_sizes[i][1]
        boxes = t.gt_boxes.clone()
        boxes.scale(scale_x, scale_y)
        given.append(Instances(images.image_sizes[i], pred_boxes=boxes, pred_classes=t.gt_classes))
    pasted = _masks_at(roi_heads, images, given, batch_size, device)
    ious, classes = [], []
    for t, p in zip(images.targets, pasted):
        ious.append(mask_iou(p.pred_masks, t.gt_masks.tensor))
        classes.append(t.gt_classes)
    ious, classes = torch.cat(ious), torch.cat(classes)
    out = {}
    for name, ids in class_subsets.items():
        contiguous = torch.tensor([meta.thing_dataset_id_to_contiguous_id[i] for i in ids])
        in_subset = torch.isin(classes, contiguous)
        out[name] = dict(
            subset_coco_metrics(coco_eval, list(ids)),
            IoU_at_GT=float(ious[in_subset].mean()) if in_subset.any() else float("nan"),
        )
    return out
