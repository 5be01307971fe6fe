"""The two serving graphs as modules around a GeneralizedRCNN: the detector, and masks
for given boxes. Eager modules first (the tests run them as the reference); ``tracing.py``
turns them into files.

What tracing would bake in is kept out: every size is read from tensors, boxes are never
filtered by a data-dependent Python branch, and a box count of zero needs no special case
(every op takes zero rows, ONNX Runtime's too).
"""
import copy

import torch
from torch import nn

from detectron2.layers.mask_ops import _do_paste_mask
from detectron2.structures import Boxes, Instances

from ..modeling import fuse_for_inference
from .resize import image_size, resize_shortest_edge

__all__ = ["DetectorExport", "BoxMaskExport"]


def _paste(roi_masks: torch.Tensor, boxes: torch.Tensor, size: torch.Tensor) -> torch.Tensor:
    """N x M x M ROI probabilities -> N x H x W, all at once on the whole image.

    Detectron2's ``paste_masks_in_image`` samples the same way but, on CPU, one box at a
    time in a scripted loop over a cropped region: a loop ONNX cannot take and that tracing
    would unroll to the example's box count. ``_do_paste_mask`` (the same in Detectron2
    v0.6 and main) over the whole image is its batched form.
    """
    masks, _ = _do_paste_mask(roi_masks[:, None], boxes, size[0], size[1], skip_empty=False)
    return masks


class _ExportBase(nn.Module):
    """Holds an eval-mode copy of a GeneralizedRCNN, its BatchNorms folded into the convs
    (:func:`~deepmac_d2.modeling.fuse_for_inference`: the exported graphs run one conv
    where the model ran a conv and a norm), and its test-time resize."""

    def __init__(self, model, min_size_test: int, max_size_test: int):
        super().__init__()
        self.model = fuse_for_inference(copy.deepcopy(model).eval())
        self.min_size_test = int(min_size_test)
        self.max_size_test = int(max_size_test)

    @classmethod
    def from_config(cls, cfg, model):
        return cls(model, cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST)

    def _features(self, image):
        """Resize, normalise and pad with the model's own ``preprocess_image``; returns the
        padded batch, the backbone features and the (x, y) scale from image to model input."""
        x = resize_shortest_edge(image, self.min_size_test, self.max_size_test)
        images = self.model.preprocess_image([{"image": x}])
        features = self.model.backbone(images.tensor)
        scale = (image_size(x.permute(1, 2, 0)).float() / image_size(image).float()).flip(0)
        return images, features, scale


class DetectorExport(_ExportBase):
    """uint8 H x W x 3 image (``INPUT.FORMAT`` channels) -> ``boxes`` (N x 4 XYXY float,
    image pixels), ``scores`` (N), ``classes`` (N int64, contiguous ids), ``masks``
    (N x H x W bool, mask probability >= 0.5): what ``model([{"image", "height",
    "width"}])`` returns, with the resize of ``DefaultPredictor`` in front.

    The model's own inference, then Detectron2's ``detector_postprocess`` steps on tensors
    (boxes scaled back to the image and clipped, empty ones dropped, masks pasted).
    """

    def forward(self, image: torch.Tensor):
        images, features, scale = self._features(image)
        proposals, _ = self.model.proposal_generator(images, features, None)
        (instances,), _ = self.model.roi_heads(images, features, proposals, None)
        size = image_size(image)
        boxes = Boxes(instances.pred_boxes.tensor / scale.repeat(2))
        boxes.clip((size[0], size[1]))
        keep = boxes.nonempty()
        boxes = boxes.tensor[keep]
        masks = _paste(instances.pred_masks[keep][:, 0], boxes, size) >= 0.5
        return boxes, instances.scores[keep], instances.pred_classes[keep], masks


class BoxMaskExport(_ExportBase):
    """uint8 H x W x 3 image + ``boxes`` (N x 4 XYXY float32, image pixels) [+ ``classes``
    (N int64) for per-class mask heads] -> ``probabilities`` (N x H x W float32 in [0, 1]),
    a mask being ``probabilities >= 0.5``: :class:`~deepmac_d2.box_masks.BoxMaskPredictor`
    as a graph, and the TF reference's ``image_and_boxes_tensor`` serving signature.

    As the predictor, boxes are clipped to the image and a box with no area left gets an
    all-zero map; so does a box with a non-finite or flipped (x1 < x0) corner, which the
    predictor refuses but a graph cannot.
    """

    def __init__(self, model, min_size_test: int, max_size_test: int, class_agnostic: bool):
        super().__init__(model, min_size_test, max_size_test)
        self.class_agnostic = class_agnostic

    @classmethod
    def from_config(cls, cfg, model):
        return cls(model, cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST,
                   cfg.MODEL.ROI_MASK_HEAD.CLS_AGNOSTIC_MASK)

    def forward(self, image: torch.Tensor, boxes: torch.Tensor, classes=None):
        if classes is None and not self.class_agnostic:
            raise ValueError(
                "this model's mask head predicts one mask per class "
                "(MODEL.ROI_MASK_HEAD.CLS_AGNOSTIC_MASK is False): pass classes, "
                "one contiguous class id per box"
            )
        size = image_size(image)
        limit = size.flip(0).repeat(2).float()  # W, H, W, H
        boxes = boxes.float()
        finite = torch.isfinite(boxes).all(1)
        boxes = torch.minimum(torch.maximum(boxes, torch.zeros_like(limit)), limit)
        valid = finite & (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
        # A box with no area goes through the model as the whole image and comes out zeroed:
        # no data-dependent filtering, and no NaN reaches the pooler or the paste.
        whole = torch.cat([torch.zeros_like(limit[:2]), limit[:2]])[None]
        boxes = torch.where(valid[:, None], boxes, whole)
        if classes is None:
            classes = torch.zeros_like(boxes[:, 0], dtype=torch.int64)

        images, features, scale = self._features(image)
        instances = Instances(images.image_sizes[0])
        instances.pred_boxes = Boxes(boxes * scale.repeat(2))
        instances.pred_classes = classes.long()
        (instances,) = self.model.roi_heads.forward_with_given_boxes(features, [instances])
        probabilities = _paste(instances.pred_masks[:, 0], boxes, size)
        return probabilities * valid[:, None, None].float()
