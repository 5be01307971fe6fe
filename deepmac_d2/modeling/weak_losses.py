"""Weak mask losses: what an instance's box alone teaches the mask head.

Users' data has boxes for every instance and masks for few; Mask R-CNN's mask loss learns
from the few only. Two terms from box-supervised segmentation let every box teach too,
both computed per ROI in the mask head's own frame (its M x M logits):

* **box projection** (BoxInst, Tian et al., CVPR 2021; TF-OD DeepMAC's "box consistency"):
  a mask that fits its box has the box's max-projection along x and along y. It says
  where the object's extent ends, nothing about its shape inside the box.
* **pairwise** (BoxInst's pairwise affinity; TF-OD DeepMAC's "colour consistency"): two
  neighbouring pixels of similar colour probably share their label. This is what shapes
  the mask inside the box.

In a crop-based head both are taken in the ROI's frame, so the ROI must be larger than
the box (``roi_expand``): with the box as ROI, the box mask is all ones and the
projection target says "fill the crop" (TF-OD jitters its ROIs for the same reason).
"""
import math
from typing import Dict, List

import torch
from kornia.color import rgb_to_lab
from torch import nn
from torch.nn import functional as F

from detectron2.config import configurable
from detectron2.layers import ROIAlign
from detectron2.modeling.poolers import convert_boxes_to_pooler_format
from detectron2.structures import Boxes, ImageList, Instances
from detectron2.utils.events import get_event_storage

__all__ = [
    "WeakMaskLosses", "build_weak_mask_losses", "check_weak_config", "box_masks_in_rois",
    "box_projection_loss", "colour_similarity", "pairwise_loss", "warmup_factor",
    "input_to_rgb", "expand_boxes",
]

KEY = "MODEL.ROI_MASK_HEAD.WEAK"
PROJECTION_LOSSES = ("dice", "bce")
APPLY_TO = ("no_mask", "all")
# INPUT.FORMAT values whose pixels convert to sRGB (Detectron2's PIL-decoded 0-255 images)
# and how many channels each has. Detectron2's "YUV-BT.601" and "I" (32-bit ints) are not.
COLOUR_FORMATS = {"BGR": 3, "RGB": 3, "L": 1}
# BoxInst's dice: 1 - 2 sum(p t) / (sum p^2 + sum t^2 + eps).
DICE_EPS = 1e-5


def _number(test):
    """A finite number (not a bool) that passes ``test``."""
    return lambda v: (isinstance(v, (int, float)) and not isinstance(v, bool)
                      and math.isfinite(v) and test(v))


# Config key -> (constructor argument, test, the valid range as the error states it).
_RULES = {
    "BOX_PROJECTION_WEIGHT": ("projection_weight", _number(lambda v: v >= 0),
                              ">= 0 (0 turns it off)"),
    "BOX_PROJECTION_LOSS": ("projection_loss", lambda v: v in PROJECTION_LOSSES,
                            f"one of {PROJECTION_LOSSES}"),
    "PAIRWISE_WEIGHT": ("pairwise_weight", _number(lambda v: v >= 0), ">= 0 (0 turns it off)"),
    "PAIRWISE_COLOR_THRESHOLD": ("colour_threshold", _number(lambda v: 0 < v < 1),
                                 "in (0, 1), both ends excluded (BoxInst 0.3, TF-OD 0.4)"),
    "PAIRWISE_DILATION": ("dilation", _number(lambda v: v == int(v) and v >= 1),
                          "an integer >= 1"),
    "WARMUP_ITERS": ("warmup_iters", _number(lambda v: v == int(v) and v >= 0),
                     "an integer >= 0 (0: no warmup)"),
    "ROI_EXPAND": ("roi_expand", _number(lambda v: v >= 1), ">= 1 (1: the box itself is the ROI)"),
    "APPLY_TO": ("apply_to", lambda v: v in APPLY_TO, f"one of {APPLY_TO}"),
}


def _check(values: Dict[str, object], name_of) -> None:
    """Raise on the first of ``values`` (by constructor argument) outside its range;
    ``name_of(key, arg)`` is the name the error gives it (config key or argument)."""
    for key, (arg, valid, valid_range) in _RULES.items():
        if not valid(values[arg]):
            raise ValueError(f"{name_of(key, arg)} = {values[arg]!r} is invalid: it must be "
                             f"{valid_range}.")


def _check_colour_input(input_format, pixel_mean, pixel_std, name_of) -> None:
    if input_format not in COLOUR_FORMATS:
        raise ValueError(
            f"{name_of('INPUT.FORMAT', 'input_format')} = {input_format!r}: the pairwise loss "
            f"({KEY}.PAIRWISE_WEIGHT > 0) compares colours in LAB and converts only "
            f"{', '.join(COLOUR_FORMATS)} images; use one of those or set PAIRWISE_WEIGHT 0."
        )
    channels = COLOUR_FORMATS[input_format]
    for key, arg, values in (("MODEL.PIXEL_MEAN", "pixel_mean", pixel_mean),
                             ("MODEL.PIXEL_STD", "pixel_std", pixel_std)):
        if len(values) != channels:
            raise ValueError(f"{name_of(key, arg)} has {len(values)} values; INPUT.FORMAT "
                             f"{input_format!r} images have {channels} channel(s).")
    if not all(s > 0 for s in pixel_std):
        raise ValueError(f"{name_of('MODEL.PIXEL_STD', 'pixel_std')} = {list(pixel_std)}: the "
                         "pairwise loss undoes the normalisation, which needs every value > 0.")


def check_weak_config(cfg) -> None:
    """Fail at set-up, naming the key, its value and the valid range, on a weak-loss
    setting that would otherwise train silently wrong (a negative weight) or produce NaN
    at the first batch (an image format the colour conversion cannot read)."""
    weak = cfg.MODEL.ROI_MASK_HEAD.WEAK
    _check({arg: weak[key] for key, (arg, _, _) in _RULES.items()},
           lambda key, arg: f"{KEY}.{key}")
    if weak.PAIRWISE_WEIGHT > 0:
        _check_colour_input(cfg.INPUT.FORMAT, cfg.MODEL.PIXEL_MEAN, cfg.MODEL.PIXEL_STD,
                            lambda key, arg: key)
    if weak.BOX_PROJECTION_WEIGHT > 0 or weak.PAIRWISE_WEIGHT > 0:
        from detectron2.modeling import ROI_HEADS_REGISTRY

        from .roi_heads import DeepMaskROIHeads

        name = cfg.MODEL.ROI_HEADS.NAME
        if not issubclass(ROI_HEADS_REGISTRY.get(name), DeepMaskROIHeads):
            raise ValueError(f"{KEY}: weak mask losses are trained by DeepMaskROIHeads; "
                             f"MODEL.ROI_HEADS.NAME is {name!r}. Set it to 'DeepMaskROIHeads'.")


def expand_boxes(boxes: torch.Tensor, factor: float) -> torch.Tensor:
    """(N, 4) XYXY boxes scaled by ``factor`` about their centres (not clipped: the ROI
    keeps the object's relative size at the image border; ROIAlign reads zeros there)."""
    centre = (boxes[:, :2] + boxes[:, 2:]) / 2
    half = (boxes[:, 2:] - boxes[:, :2]) * (factor / 2)
    return torch.cat([centre - half, centre + half], dim=1)


def box_masks_in_rois(boxes: torch.Tensor, rois: torch.Tensor, size: int) -> torch.Tensor:
    """(N, size, size) float: 1 at the pixels of each ROI's size x size grid whose centre
    lies in the box (half-open, [x0, x1) x [y0, y1)), in the frame the mask head's
    logits are in (ROIAlign with ``aligned=True``: pixel j's centre is at
    ``roi_x0 + (j + 0.5) * roi_width / size``)."""
    steps = (torch.arange(size, device=rois.device, dtype=rois.dtype) + 0.5) / size
    xs = rois[:, 0:1] + steps * (rois[:, 2:3] - rois[:, 0:1])  # (N, size)
    ys = rois[:, 1:2] + steps * (rois[:, 3:4] - rois[:, 1:2])
    in_x = (xs >= boxes[:, 0:1]) & (xs < boxes[:, 2:3])
    in_y = (ys >= boxes[:, 1:2]) & (ys < boxes[:, 3:4])
    return (in_y[:, :, None] & in_x[:, None, :]).to(rois.dtype)


def _dice_loss(p: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """BoxInst's dice loss per row of (N, L) probabilities and targets."""
    return 1 - 2 * (p * t).sum(-1) / ((p * p).sum(-1) + (t * t).sum(-1) + DICE_EPS)


def box_projection_loss(logits: torch.Tensor, box_masks: torch.Tensor, loss: str = "dice"):
    """Mean over the N instances of (loss along x) + (loss along y), each between the max
    of the (N, M, M) mask along one axis and the box mask's (BoxInst's projection term).

    The max of the logits is taken before the sigmoid (the same as after it, the sigmoid
    being monotonic): "bce" is then the logits' binary cross-entropy averaged over the M
    positions of each projection (TF-OD's box consistency with its sigmoid loss), "dice"
    BoxInst's dice on the probabilities.
    """
    if len(logits) == 0:
        return logits.sum() * 0
    total = 0
    for axis in (-2, -1):  # max over y: a profile along x; then max over x
        pred = logits.amax(dim=axis)
        target = box_masks.amax(dim=axis)
        if loss == "dice":
            total = total + _dice_loss(pred.sigmoid(), target)
        else:
            total = total + F.binary_cross_entropy_with_logits(pred, target, reduction="none").mean(-1)
    return total.mean()


def _neighbours(x: torch.Tensor, dilation: int) -> torch.Tensor:
    """(N, C, M, M) -> (N, C, 8, M, M): each pixel's 8 neighbours at ``dilation`` (the
    3 x 3 grid without its centre, BoxInst's ``unfold_wo_center``); 0 beyond the crop."""
    d = dilation
    m_y, m_x = x.shape[-2:]
    padded = F.pad(x, (d, d, d, d))
    return torch.stack([
        padded[..., d + dy * d:d + dy * d + m_y, d + dx * d:d + dx * d + m_x]
        for dy in (-1, 0, 1) for dx in (-1, 0, 1) if (dy, dx) != (0, 0)
    ], dim=2)


def colour_similarity(lab: torch.Tensor, dilation: int) -> torch.Tensor:
    """(N, 3, M, M) LAB crops -> (N, 8, M, M): ``exp(-||LAB_i - LAB_j|| / 2)`` between each
    pixel i and its neighbour j (BoxInst's similarity); 0 where j lies beyond the crop,
    so that no threshold in (0, 1) takes such a pair."""
    inside = _neighbours(torch.ones_like(lab[:, :1]), dilation)[:, 0]
    distance = (lab[:, :, None] - _neighbours(lab, dilation)).norm(dim=1)
    return torch.exp(-distance / 2) * inside


def pairwise_loss(logits: torch.Tensor, similarity: torch.Tensor, box_masks: torch.Tensor,
                  threshold: float, dilation: int) -> torch.Tensor:
    """``-log P(same label)`` of each pixel i and neighbour j, ``P_same = p_i p_j +
    (1 - p_i)(1 - p_j)`` with ``p = sigmoid(logits)``, summed over the pairs whose
    similarity is >= ``threshold`` and whose i lies in the box, divided by
    ``max(number of such pairs, 1)``: BoxInst's pairwise term, over all N instances at once.

    In log space (``logaddexp`` of the two log joint probabilities), as BoxInst: a
    confident pair of opposite labels gives a large, finite loss, never log(0).
    """
    weights = (similarity >= threshold).to(logits.dtype) * box_masks[:, None]
    log_fg, log_bg = F.logsigmoid(logits), F.logsigmoid(-logits)
    neighbour_fg = _neighbours(log_fg[:, None], dilation)[:, 0]
    neighbour_bg = _neighbours(log_bg[:, None], dilation)[:, 0]
    log_same = torch.logaddexp(log_fg[:, None] + neighbour_fg, log_bg[:, None] + neighbour_bg)
    return -(log_same * weights).sum() / weights.sum().clamp(min=1.0)


def warmup_factor(iteration: int, warmup_iters: int) -> float:
    """``min((iteration + 1) / warmup_iters, 1)`` at Detectron2's 0-based ``iteration``:
    BoxInst's ``min(iter / warmup, 1)`` with its count of steps run, this one included
    (1/warmup at the first step); 1 without warmup."""
    if warmup_iters <= 0:
        return 1.0
    return min((iteration + 1) / warmup_iters, 1.0)


def input_to_rgb(images: torch.Tensor, pixel_mean: torch.Tensor, pixel_std: torch.Tensor,
                 input_format: str) -> torch.Tensor:
    """(B, C, H, W) network inputs (``(pixel - PIXEL_MEAN) / PIXEL_STD`` in INPUT.FORMAT) ->
    (B, 3, H, W) sRGB in [0, 1]. The clamp keeps pixels made outside 0-255 by
    interpolation in range of the conversion."""
    pixels = images * pixel_std[:, None, None] + pixel_mean[:, None, None]
    if input_format == "BGR":
        pixels = pixels.flip(1)
    elif input_format == "L":
        pixels = pixels.expand(-1, 3, -1, -1)
    return (pixels / 255.0).clamp(0.0, 1.0)


class WeakMaskLosses(nn.Module):
    """The weak mask losses of the instances they cover, from the mask head's logits.

    :class:`~deepmac_d2.modeling.roi_heads.DeepMaskROIHeads` chooses the instances
    (``apply_to``), pools their ROIs (:meth:`rois`) together with the mask loss's and
    hands this module their logits. Returns ``loss_mask_projection`` and/or
    ``loss_mask_pairwise`` (the terms whose weight is > 0), each weighted; with no
    instance, exact zeros connected to the logits, so every head parameter still gets a
    (zero) gradient, as DistributedDataParallel requires.
    """

    @configurable
    def __init__(
        self,
        *,
        projection_weight: float = 0.0,
        projection_loss: str = "dice",
        pairwise_weight: float = 0.0,
        colour_threshold: float = 0.3,
        dilation: int = 2,
        warmup_iters: int = 10000,
        roi_expand: float = 1.5,
        apply_to: str = "no_mask",
        input_format: str = "BGR",
        pixel_mean=(103.530, 116.280, 123.675),
        pixel_std=(1.0, 1.0, 1.0),
    ):
        """
        Args:
            projection_weight, projection_loss: the box projection term's weight and loss
                ("dice": BoxInst; "bce": TF-OD).
            pairwise_weight, colour_threshold, dilation: the pairwise term's weight, the
                colour similarity a pair needs, and the neighbours' distance in pixels.
            warmup_iters: the pairwise term ramps up linearly over these iterations.
            roi_expand: a covered instance's ROI is its box scaled by this about its centre.
            apply_to: "no_mask" (instances the mask loss does not take) or "all".
            input_format, pixel_mean, pixel_std: INPUT.FORMAT, MODEL.PIXEL_MEAN and
                PIXEL_STD, to recover the image's colours from the network's input.
        """
        super().__init__()
        _check(dict(projection_weight=projection_weight, projection_loss=projection_loss,
                    pairwise_weight=pairwise_weight, colour_threshold=colour_threshold,
                    dilation=dilation, warmup_iters=warmup_iters, roi_expand=roi_expand,
                    apply_to=apply_to), lambda key, arg: arg)
        if pairwise_weight > 0:
            _check_colour_input(input_format, pixel_mean, pixel_std, lambda key, arg: arg)
        self.projection_weight, self.projection_loss = projection_weight, projection_loss
        self.pairwise_weight, self.colour_threshold = pairwise_weight, colour_threshold
        self.dilation, self.warmup_iters = int(dilation), int(warmup_iters)
        self.roi_expand, self.apply_to, self.input_format = roi_expand, apply_to, input_format
        # Not persistent: config, not state; checkpoints load across settings.
        self.register_buffer("pixel_mean", torch.tensor(pixel_mean, dtype=torch.float32), False)
        self.register_buffer("pixel_std", torch.tensor(pixel_std, dtype=torch.float32), False)

    @classmethod
    def from_config(cls, cfg):
        check_weak_config(cfg)
        weak = cfg.MODEL.ROI_MASK_HEAD.WEAK
        ret = {arg: weak[key] for key, (arg, _, _) in _RULES.items()}
        ret.update(input_format=cfg.INPUT.FORMAT, pixel_mean=tuple(cfg.MODEL.PIXEL_MEAN),
                   pixel_std=tuple(cfg.MODEL.PIXEL_STD))
        return ret

    def rois(self, boxes: Boxes) -> Boxes:
        """The ROIs the covered instances' masks are predicted in."""
        return Boxes(expand_boxes(boxes.tensor, self.roi_expand))

    def lab_in_rois(self, images: ImageList, rois: List[Boxes], size: int) -> torch.Tensor:
        """(R, 3, size, size): the input image in LAB (kornia's ``rgb_to_lab``, D65),
        ROIAligned at the mask's resolution in each ROI, each output pixel the mean over
        its bin (as the mask pooler's features; BoxInst averages before its LAB)."""
        with torch.no_grad():
            lab = rgb_to_lab(input_to_rgb(images.tensor.float(), self.pixel_mean,
                                          self.pixel_std, self.input_format))
            align = ROIAlign((size, size), spatial_scale=1.0, sampling_ratio=0, aligned=True)
            return align(lab, convert_boxes_to_pooler_format(rois))

    def forward(self, logits: torch.Tensor, instances: List[Instances], images: ImageList):
        """
        Args:
            logits: (R, C, M, M) mask logits of the covered instances, in the order of
                ``instances`` (C = 1 class-agnostic, else one channel per class).
            instances: per image, the covered instances: ``proposal_boxes`` (their ROIs,
                from :meth:`rois`), ``gt_boxes``, ``gt_classes``.
            images: the network's input images (ImageList), for the pairwise term.
        """
        size = logits.shape[-1]
        if logits.shape[1] > 1:  # one mask per class: the instance's class's
            classes = torch.cat([x.gt_classes for x in instances])
            logits = logits[torch.arange(len(logits), device=logits.device), classes]
        else:
            logits = logits[:, 0]
        if len(logits) == 0:
            zero = logits.sum() * 0
            return {name: zero for name, w in (("loss_mask_projection", self.projection_weight),
                                               ("loss_mask_pairwise", self.pairwise_weight)) if w > 0}
        rois = torch.cat([x.proposal_boxes.tensor for x in instances])
        boxes = torch.cat([x.gt_boxes.tensor for x in instances])
        in_box = box_masks_in_rois(boxes, rois, size).to(logits.dtype)
        losses = {}
        if self.projection_weight > 0:
            losses["loss_mask_projection"] = self.projection_weight * box_projection_loss(
                logits, in_box, self.projection_loss)
        if self.pairwise_weight > 0:
            lab = self.lab_in_rois(images, [x.proposal_boxes for x in instances], size)
            similarity = colour_similarity(lab, self.dilation).to(logits.dtype)
            warmup = warmup_factor(get_event_storage().iter, self.warmup_iters)
            losses["loss_mask_pairwise"] = self.pairwise_weight * warmup * pairwise_loss(
                logits, similarity, in_box, self.colour_threshold, self.dilation)
        return losses


def build_weak_mask_losses(cfg):
    """:class:`WeakMaskLosses` from ``cfg``, or None when both of its weights are 0."""
    weak = cfg.MODEL.ROI_MASK_HEAD.WEAK
    check_weak_config(cfg)
    if weak.BOX_PROJECTION_WEIGHT == 0 and weak.PAIRWISE_WEIGHT == 0:
        return None
    return WeakMaskLosses(cfg)
