"""ROIHeads for partially supervised training: which instances the mask head learns from."""
from typing import Dict, List, Optional, Sequence

import torch
from detectron2.config import configurable
from detectron2.modeling import ROI_HEADS_REGISTRY, StandardROIHeads
from detectron2.modeling.roi_heads.mask_head import mask_rcnn_loss
from detectron2.modeling.roi_heads.roi_heads import select_foreground_proposals
from detectron2.structures import Boxes, ImageList, Instances

from ..data.class_splits import allowed_contiguous_class_ids
from .mask_head import DeepMaskHead
from .weak_losses import WeakMaskLosses, build_weak_mask_losses

__all__ = ["DeepMaskROIHeads", "allowed_contiguous_class_ids"]


@ROI_HEADS_REGISTRY.register()
class DeepMaskROIHeads(StandardROIHeads):
    """StandardROIHeads whose mask branch trains on GT boxes and on a subset of classes.

    DeepMAC's two training changes, both confined to the mask branch during training:

    * ``mask_use_gt_boxes``: the mask head pools features at the ground-truth boxes and
      learns their masks, instead of learning from sampled foreground proposals. The
      paper finds this is what lets a deep mask head generalise to unseen classes (the
      reference's ``use_gt_boxes_for_masks``).
    * ``mask_allowed_classes``: only instances of these classes train the mask head (the
      partially supervised setting); RPN and box head still learn every class.

    Besides, an instance whose target has ``gt_has_mask`` False is box-only: its box trains
    RPN and the box head, its (placeholder) mask is never read. This is the setting as
    users' data comes, where any instance may lack a mask, which Detectron2 has no notion
    of and the reference handles by class only. Targets without the field have a mask each.
    Both filters combine: an instance trains the mask head if it has a mask AND its class
    is allowed.

    The mask loss stays Detectron2's ``mask_rcnn_loss`` (through the mask head), applied
    to the kept instances only: per-pixel sigmoid cross-entropy averaged over their pixels.
    A DeepMaskHead sees every candidate box (its BatchNorms normalise over all of them,
    as the reference's do) and its loss takes the kept ones; another head sees the kept
    ones only. If a batch keeps no instance, the loss is ``logits.sum() * 0``: zero, yet
    a graph through every mask-head parameter, so DistributedDataParallel finds
    gradients for all of them. Inference is unchanged.

    With ``weak_mask_losses`` (MODEL.ROI_MASK_HEAD.WEAK), the instances it covers
    (:meth:`weak_training_instances`) also teach the mask head from their boxes alone:
    their enlarged ROIs join the same pass of the head, and their logits go to the weak
    losses, the others' to the mask loss as before (:meth:`mask_losses`).
    """

    @configurable
    def __init__(
        self,
        *,
        mask_use_gt_boxes: bool = False,
        mask_allowed_classes: Optional[Sequence[int]] = None,
        weak_mask_losses: Optional[WeakMaskLosses] = None,
        **kwargs,
    ):
        """
        Args:
            mask_use_gt_boxes: train the mask head on the ground-truth boxes of each image
                rather than on the box branch's sampled foreground proposals.
            mask_allowed_classes: contiguous class ids whose instances train the mask head;
                None trains it on every class.
            weak_mask_losses: box projection and pairwise losses for the instances
                without a mask (or all); None: none.
            kwargs: the arguments of :class:`StandardROIHeads`.
        """
        super().__init__(**kwargs)
        if weak_mask_losses is not None and self.mask_on and self.mask_pooler is None:
            raise ValueError("weak mask losses need the mask head's ROI pooler "
                             "(MODEL.ROI_MASK_HEAD.POOLER_TYPE is empty)")
        self.weak_mask_losses = weak_mask_losses if self.mask_on else None
        self.mask_use_gt_boxes = mask_use_gt_boxes
        self.mask_allowed_classes = (
            None if mask_allowed_classes is None else tuple(int(c) for c in mask_allowed_classes)
        )
        if self.mask_allowed_classes is not None:
            bad = [c for c in self.mask_allowed_classes if not 0 <= c < self.num_classes]
            if bad:
                raise ValueError(f"mask_allowed_classes {bad} outside [0, {self.num_classes})")
            # A lookup table indexed by gt_classes; the extra last entry is the background
            # label (num_classes), never allowed. Not persistent: it comes from the config,
            # and checkpoints stay loadable across splits.
            allowed = torch.zeros(self.num_classes + 1, dtype=torch.bool)
            allowed[list(self.mask_allowed_classes)] = True
            self.register_buffer("_mask_allowed_table", allowed, persistent=False)

    @classmethod
    def from_config(cls, cfg, input_shape):
        ret = super().from_config(cfg, input_shape)
        ret["mask_use_gt_boxes"] = cfg.MODEL.ROI_MASK_HEAD.USE_GT_BOXES
        ret["mask_allowed_classes"] = allowed_contiguous_class_ids(cfg)
        ret["weak_mask_losses"] = build_weak_mask_losses(cfg)
        return ret

    @classmethod
    def _init_box_head(cls, cfg, input_shape):
        ret = super()._init_box_head(cfg, input_shape)
        # A box head may come with its own predictor layout (the reference's TFConvFCHead:
        # background first, (dy, dx, dh, dw) deltas for every class).
        predictor = getattr(ret["box_head"], "box_predictor_class", None)
        if predictor is not None:
            ret["box_predictor"] = predictor(cfg, ret["box_head"].output_shape)
        return ret

    def forward(
        self,
        images: ImageList,
        features: Dict[str, torch.Tensor],
        proposals: List[Instances],
        targets: Optional[List[Instances]] = None,
    ):
        """See :meth:`StandardROIHeads.forward`.

        In training, the parent's steps are called in the parent's order; only the
        instances handed to ``_forward_mask`` differ (see :meth:`mask_training_instances`).
        The parent drops ``targets`` before its mask step, hence this override rather
        than one of ``_forward_mask``.
        """
        if not self.training:
            return super().forward(images, features, proposals, targets)
        assert targets, "'targets' argument is required during training"
        proposals = self.label_and_sample_proposals(proposals, targets)
        losses = self._forward_box(features, proposals)
        if self.mask_on:
            losses.update(self.mask_losses(images, features, proposals, targets))
        losses.update(self._forward_keypoint(features, proposals))
        return proposals, losses

    def mask_losses(
        self,
        images: ImageList,
        features: Dict[str, torch.Tensor],
        proposals: List[Instances],
        targets: List[Instances],
    ) -> Dict[str, torch.Tensor]:
        """The mask branch's training losses, from the sampled ``proposals``.

        Without weak losses: the parent's ``_forward_mask`` on
        :meth:`mask_training_instances`. With them, one pass of the mask head over the
        ROIs of both those and :meth:`weak_training_instances`, image by image; the
        former's logits go to the head's own mask loss (so instances with a mask keep
        exactly today's loss), the latter's to the weak losses, which add exact zeros
        connected to the head when no instance is covered.
        """
        mask_instances = self.mask_training_instances(proposals, targets)
        if self.weak_mask_losses is None:
            return self._forward_mask(features, mask_instances)
        if not self.mask_use_gt_boxes:  # as the parent's _forward_mask
            mask_instances, _ = select_foreground_proposals(mask_instances, self.num_classes)
        weak_instances = self.weak_training_instances(proposals, targets)
        boxes = [Boxes.cat([m.proposal_boxes, w.proposal_boxes])
                 for m, w in zip(mask_instances, weak_instances)]
        pooled = self.mask_pooler([features[f] for f in self.mask_in_features], boxes)
        logits = self.mask_head.layers(pooled)
        is_weak = torch.cat([torch.arange(len(m) + len(w), device=logits.device) >= len(m)
                             for m, w in zip(mask_instances, weak_instances)])
        head = self.mask_head
        if isinstance(head, DeepMaskHead):
            loss_mask = head.loss(logits[~is_weak], mask_instances)
        else:  # BaseMaskRCNNHead.forward's loss
            loss_mask = mask_rcnn_loss(logits[~is_weak], mask_instances, head.vis_period)
            loss_mask = loss_mask * head.loss_weight
        losses = {"loss_mask": loss_mask}
        losses.update(self.weak_mask_losses(logits[is_weak], weak_instances, images))
        return losses

    def weak_training_instances(
        self, proposals: List[Instances], targets: List[Instances]
    ) -> List[Instances]:
        """Per image, the instances the weak losses cover, with their enlarged ROIs in
        ``proposal_boxes`` (``WeakMaskLosses.rois``), their ``gt_boxes`` and ``gt_classes``.

        The candidates are those of the mask branch: the GT boxes (``mask_use_gt_boxes``)
        or the sampled foreground proposals, each with its matched target's box. "no_mask"
        covers the candidates the mask loss does not take (:meth:`trains_mask` False: no
        mask, or a class outside ``mask_allowed_classes``), "all" every candidate.
        """
        if self.mask_use_gt_boxes:
            candidates = [Instances(t.image_size, proposal_boxes=t.gt_boxes, **t.get_fields())
                          for t in targets]
        else:
            candidates, _ = select_foreground_proposals(proposals, self.num_classes)
        out = []
        for x in candidates:
            if self.weak_mask_losses.apply_to == "no_mask":
                x = x[~self.trains_mask(x)]
            out.append(Instances(x.image_size, gt_boxes=x.gt_boxes, gt_classes=x.gt_classes,
                                 proposal_boxes=self.weak_mask_losses.rois(x.proposal_boxes)))
        return out

    def mask_training_instances(
        self, proposals: List[Instances], targets: List[Instances]
    ) -> List[Instances]:
        """The per-image instances the mask head learns from.

        With ``mask_use_gt_boxes`` these are the targets themselves, with their boxes in
        ``proposal_boxes``: the field the mask pooler reads and ``mask_rcnn_loss`` crops
        the target masks with. Otherwise they are the sampled proposals, which
        ``label_and_sample_proposals`` gave every ``gt_*`` field of their matched target
        (``gt_has_mask`` included). Either way only :meth:`trains_mask` instances reach
        the loss: a head with ``takes_untrained_rois`` (DeepMaskHead) gets every GT box,
        or every foreground proposal (the set the reference's mask sampler draws from),
        with a ``trains_mask`` field; another head only the :meth:`trains_mask` ones
        (for proposals, the selection the parent's ``_forward_mask`` then repeats).
        """
        if self.mask_use_gt_boxes:
            instances = []
            for t in targets:
                x = Instances(t.image_size, **t.get_fields())
                x.proposal_boxes = t.gt_boxes
                instances.append(x)
        else:
            instances = proposals
        if self.mask_allowed_classes is None and not any(t.has("gt_has_mask") for t in targets):
            return instances  # every instance has a mask and every class is allowed
        if getattr(self.mask_head, "takes_untrained_rois", False):
            # The root of a divergence (Hourglass-52, GT boxes, a batch where 2 instances
            # of the allowed classes were drawn): at the hourglass's 1x1 levels
            # BatchNorm normalises over one value per ROI, and over 2 values it scales
            # the gradient by up to 1/(2 sqrt(eps)) per layer, 1e5 through the stack,
            # into the backbone. The reference never normalises over so few: its head
            # runs on every GT box of the batch (padded to 100 per image) and its loss
            # masks out the rest. So here: every candidate goes through the head, and
            # ``trains_mask`` selects the loss's instances (DeepMaskHead.forward).
            # Both are new Instances (GT boxes: built above), so the field stays ours.
            if not self.mask_use_gt_boxes:  # background proposals have no mask to learn
                instances, _ = select_foreground_proposals(instances, self.num_classes)
            for x in instances:
                x.trains_mask = self.trains_mask(x)
            return instances
        return [x[self.trains_mask(x)] for x in instances]

    def trains_mask(self, instances: Instances) -> torch.Tensor:
        """Bool mask over ``instances`` (targets, or proposals labelled with their matched
        target): foreground, with a mask (``gt_has_mask``, True where absent), of an
        allowed class."""
        classes = instances.gt_classes
        # Background proposals are labelled num_classes; their other gt_* fields are those
        # of an arbitrary target (Detectron2 copies them for every sampled proposal).
        keep = (classes >= 0) & (classes < self.num_classes)
        if instances.has("gt_has_mask"):
            keep &= instances.gt_has_mask.to(torch.bool)
        if self.mask_allowed_classes is not None:
            keep &= self._mask_allowed_table[classes]
        return keep
