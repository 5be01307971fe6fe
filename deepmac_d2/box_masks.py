"""Masks for given boxes: the mask head run on boxes the caller already has.

This is how DeepMAC's released models are meant to be used: the paper's point is a
mask head that segments classes it never saw masks for, given a box around the object,
so the boxes may come from a person, a tracker or another detector. Detectron2 has the
pieces (``GeneralizedRCNN.inference(detected_instances=...)`` runs the backbone and
``ROIHeads.forward_with_given_boxes``); this module feeds them the model's own test-time
preprocessing and returns one mask per box at the original image size.
"""
import copy
from typing import List, NamedTuple, Optional, Sequence

import numpy as np
import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import configurable
from detectron2.data import detection_utils
from detectron2.data import transforms as T
from detectron2.layers import paste_masks_in_image
from detectron2.modeling import build_model
from detectron2.modeling.postprocessing import detector_postprocess
from detectron2.structures import Boxes, Instances

from .modeling import fuse_for_inference

__all__ = ["BoxMaskPredictor", "BoxMasks", "masks_at_given_boxes"]


class BoxMasks(NamedTuple):
    """One mask per given box, at the image's size."""

    masks: np.ndarray  # N x H x W bool: probability >= 0.5, as Detectron2 thresholds
    probabilities: np.ndarray  # N x H x W float32 in [0, 1], in steps of 1/255 (pasted as uint8)


def masks_at_given_boxes(
    model,
    batched_inputs: List[dict],
    boxes: Sequence[torch.Tensor],
    classes: Sequence[torch.Tensor],
    with_probabilities: bool = False,
) -> List[Instances]:
    """Run an eval-mode GeneralizedRCNN's mask branch on known boxes, for a batch of images.

    Args:
        batched_inputs: what ``DatasetMapper(cfg, is_train=False)`` gives: "image" (C x h x w,
            already resized for the model) and "height"/"width" (the original size).
        boxes: per image, N x 4 XYXY boxes in original-image pixels, inside the image and
            with positive width and height (``detector_postprocess`` drops empty boxes,
            which would misalign masks and boxes).
        classes: per image, N contiguous class ids (they pick the channel of per-class heads).
        with_probabilities: also paste the soft masks (costs a second paste).

    Returns:
        per image, Instances of the original size with ``pred_boxes``, ``pred_classes``,
        ``pred_masks`` (N x H x W bool) and, if asked, ``pred_mask_probs`` (N x H x W float).
    """
    detected = []
    for x, b, c in zip(batched_inputs, boxes, classes):
        h, w = x["image"].shape[-2:]
        # The model sees the resized image: scale the boxes as the resize scaled it
        # (ResizeTransform.apply_box is this same per-axis scaling).
        scaled = Boxes(torch.as_tensor(b, dtype=torch.float32).reshape(-1, 4).clone())
        scaled.scale(w / x["width"], h / x["height"])
        instances = Instances((h, w))
        instances.pred_boxes = scaled
        instances.pred_classes = torch.as_tensor(c, dtype=torch.int64).reshape(-1)
        detected.append(instances)
    with torch.no_grad():
        raw = model.inference(batched_inputs, detected_instances=detected, do_postprocess=False)
    results = []
    for r, x, b in zip(raw, batched_inputs, boxes):
        # pred_masks are M x M probabilities per ROI until detector_postprocess pastes them.
        roi_probs = r.pred_masks[:, 0]
        out = detector_postprocess(r, x["height"], x["width"])
        if len(out) != len(b):
            raise ValueError("masks_at_given_boxes needs non-empty boxes inside the image")
        if with_probabilities:
            # A negative threshold makes Detectron2's paste return soft masks (as uint8).
            soft = paste_masks_in_image(roi_probs, out.pred_boxes, out.image_size, threshold=-1)
            out.pred_mask_probs = soft.float() / 255
        results.append(out)
    return results


def _as_boxes(boxes, height: int, width: int) -> np.ndarray:
    """Validate XYXY boxes and clip them to the image."""
    if isinstance(boxes, torch.Tensor):
        boxes = boxes.detach().cpu().numpy()
    array = np.asarray(boxes)
    if array.size == 0:
        return np.zeros((0, 4), dtype=np.float32)
    if not np.issubdtype(array.dtype, np.number):
        raise TypeError(f"boxes must be numbers (N x 4 XYXY), got an array of dtype {array.dtype}")
    if array.ndim == 1 and array.shape[0] == 4:
        array = array[None]
    if array.ndim != 2 or array.shape[1] != 4:
        raise ValueError(
            f"boxes must have shape (N, 4), XYXY in image pixels; got shape {array.shape}"
        )
    array = array.astype(np.float32)
    infinite = np.nonzero(~np.isfinite(array).all(1))[0]
    if len(infinite):
        raise ValueError(f"boxes must be finite; box(es) {infinite.tolist()} are not")
    flipped = np.nonzero((array[:, 2] < array[:, 0]) | (array[:, 3] < array[:, 1]))[0]
    if len(flipped):
        i = int(flipped[0])
        raise ValueError(
            f"box {i} {array[i].tolist()} has x1 < x0 or y1 < y0: boxes are XYXY "
            "(x0, y0, x1, y1), not XYWH"
        )
    array[:, 0::2] = array[:, 0::2].clip(0, width)
    array[:, 1::2] = array[:, 1::2].clip(0, height)
    return array


class BoxMaskPredictor:
    """Masks for given boxes from a Mask R-CNN (any mask head; DeepMAC's are the point).

    Like Detectron2's ``DefaultPredictor``, for one image at a time, but the boxes come
    from the caller and only the backbone and the mask branch run. Build it from a config
    (``BoxMaskPredictor(cfg, weights=path)``, or ``model=`` to wrap a model already in
    memory) or from a model and its preprocessing (``BoxMaskPredictor(model,
    class_agnostic=True, augmentations=[...], input_format="BGR")``). It predicts with an
    eval-mode copy of the model whose BatchNorms are folded into the convs
    (:func:`~deepmac_d2.modeling.fuse_for_inference`); the model given is left as it is.

    Boxes are clipped to the image; a box with no area left (e.g. outside the image) gets
    an all-False mask without reaching the model, so the output always has one mask per box.
    """

    @configurable
    def __init__(
        self,
        model,
        *,
        class_agnostic: bool,
        augmentations: Sequence[T.Augmentation],
        input_format: str = "BGR",
    ):
        """
        Args:
            model: a GeneralizedRCNN with a mask head.
            class_agnostic: whether the mask head predicts one mask for every class; if
                not, callers must give each box's class.
            augmentations: the test-time transforms the model expects (Detectron2's
                ``ResizeShortestEdge`` from ``INPUT.MIN_SIZE_TEST`` / ``MAX_SIZE_TEST``).
            input_format: channel order of the images the model was trained on, which
                callers must pass ("BGR" or "RGB"; Detectron2's ``INPUT.FORMAT``).
        """
        self.model = fuse_for_inference(copy.deepcopy(model).eval())
        self.class_agnostic = class_agnostic
        self.augmentations = T.AugmentationList(list(augmentations))
        self.input_format = input_format

    @classmethod
    def from_config(cls, cfg, model=None, weights: Optional[str] = None):
        """Build the model from ``cfg`` and load ``weights`` (default ``cfg.MODEL.WEIGHTS``),
        unless ``model`` is given."""
        if model is None:
            model = build_model(cfg)
            DetectionCheckpointer(model).load(cfg.MODEL.WEIGHTS if weights is None else weights)
        return {
            "model": model,
            "class_agnostic": cfg.MODEL.ROI_MASK_HEAD.CLS_AGNOSTIC_MASK,
            "augmentations": detection_utils.build_augmentation(cfg, is_train=False),
            "input_format": cfg.INPUT.FORMAT,
        }

    def _class_ids(self, class_ids, num_boxes: int) -> np.ndarray:
        num_classes = self.model.roi_heads.num_classes
        if class_ids is None:
            if not self.class_agnostic:
                raise ValueError(
                    "this model's mask head predicts one mask per class "
                    "(MODEL.ROI_MASK_HEAD.CLS_AGNOSTIC_MASK is False): pass class_ids, "
                    f"one contiguous class id in [0, {num_classes}) per box"
                )
            return np.zeros(num_boxes, dtype=np.int64)
        if isinstance(class_ids, torch.Tensor):
            class_ids = class_ids.detach().cpu().numpy()
        ids = np.asarray(class_ids).reshape(-1)
        if ids.size and not np.issubdtype(ids.dtype, np.integer):
            raise TypeError(
                f"class_ids must be integers (contiguous class ids), got dtype {ids.dtype}"
            )
        if len(ids) != num_boxes:
            raise ValueError(
                f"got {len(ids)} class id(s) for {num_boxes} box(es): give one per box"
            )
        bad = sorted({int(i) for i in ids if not 0 <= i < num_classes})
        if bad:
            raise ValueError(f"class_ids {bad} are outside the model's classes [0, {num_classes})")
        return ids.astype(np.int64)

    def __call__(self, image: np.ndarray, boxes, class_ids=None) -> BoxMasks:
        """
        Args:
            image: H x W x 3 uint8, channels in ``self.input_format`` order.
            boxes: N x 4 XYXY in image pixels (array, tensor or nested lists).
            class_ids: N contiguous class ids; optional for class-agnostic mask heads.

        Returns:
            :class:`BoxMasks`, N masks of H x W in the order of ``boxes``.
        """
        if not isinstance(image, np.ndarray) or image.ndim != 3 or image.shape[2] != 3:
            shape = getattr(image, "shape", type(image).__name__)
            raise ValueError(
                f"image must be an H x W x 3 numpy array ({self.input_format}), got {shape}"
            )
        if image.dtype != np.uint8:
            raise TypeError(
                f"image must be uint8 ({self.input_format}, 0..255), got dtype {image.dtype}"
            )
        height, width = image.shape[:2]
        boxes = _as_boxes(boxes, height, width)
        classes = self._class_ids(class_ids, len(boxes))
        masks = np.zeros((len(boxes), height, width), dtype=bool)
        probabilities = np.zeros((len(boxes), height, width), dtype=np.float32)
        keep = np.nonzero((boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1]))[0]
        if len(keep) == 0:
            return BoxMasks(masks, probabilities)

        aug_input = T.AugInput(image)
        self.augmentations(aug_input)
        inputs = {
            "image": torch.as_tensor(np.ascontiguousarray(aug_input.image.transpose(2, 0, 1))),
            "height": height,
            "width": width,
        }
        (result,) = masks_at_given_boxes(
            self.model,
            [inputs],
            [torch.from_numpy(boxes[keep])],
            [torch.from_numpy(classes[keep])],
            with_probabilities=True,
        )
        masks[keep] = result.pred_masks.cpu().numpy()
        probabilities[keep] = result.pred_mask_probs.cpu().numpy()
        return BoxMasks(masks, probabilities)
