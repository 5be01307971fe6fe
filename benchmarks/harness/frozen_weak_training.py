"""Mask heads trained with the weak mask losses on a frozen detector's cached features.

:mod:`.frozen_detector` caches features, targets and proposals, which is all the mask
loss needs. The pairwise loss also reads the image's colours, so here the same training
views are mapped again (they are deterministic: as is and mirrored) and normalised as
the detector's ``preprocess_image`` does, and the head trains through
``DeepMaskROIHeads.mask_losses``, every mask loss at once. Used by
``benchmarks/weak_losses.py`` and ``tools/demo.py``.
"""
import math
from typing import Dict, List, Sequence

import torch
from detectron2.structures import ImageList
from detectron2.utils.events import EventStorage

from .frozen_detector import FrozenImages, _draw, _global_rng, frozen_mappers

__all__ = ["frozen_input_images", "train_mask_head_with_images"]


def frozen_input_images(cfg, dataset_dicts: Sequence[dict], frozen: FrozenImages) -> List[torch.Tensor]:
    """The network input of every training view that :func:`cache_frozen_images` cached
    from ``dataset_dicts`` with ``frozen_mappers(cfg, train=True)``, in its order:
    ``(image - PIXEL_MEAN) / PIXEL_STD`` in INPUT.FORMAT, unpadded."""
    mean = torch.tensor(cfg.MODEL.PIXEL_MEAN)[:, None, None]
    std = torch.tensor(cfg.MODEL.PIXEL_STD)[:, None, None]
    mappers = frozen_mappers(cfg, train=True)
    out = [(mapper(d)["image"].float() - mean) / std for d in dataset_dicts for mapper in mappers]
    if [tuple(x.shape[-2:]) for x in out] != list(frozen.image_sizes):
        raise ValueError("the images do not match the frozen cache's views: pass the "
                         "dataset dicts the cache was made from, in the same order")
    return out


def train_mask_head_with_images(
    roi_heads,
    frozen: FrozenImages,
    images: Sequence[torch.Tensor],
    *,
    iterations: int,
    ims_per_batch: int,
    base_lr: float,
    weight_decay: float = 1e-4,
    warmup_iters: int = 50,
    generator: torch.Generator,
    device="cpu",
) -> Dict[str, List[float]]:
    """``frozen_detector.train_mask_head``'s schedule and draws (SGD with momentum 0.9,
    linear warmup, cosine to zero), on the sum of ``roi_heads.mask_losses``. Each step
    runs in an ``EventStorage`` at its iteration, which the pairwise warmup reads.
    Returns each loss per step, by name."""
    params = [p for p in roi_heads.mask_head.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=base_lr, momentum=0.9, weight_decay=weight_decay)
    roi_heads.train()
    curves: Dict[str, List[float]] = {}
    for step in range(iterations):
        indices = _draw(frozen, ims_per_batch, generator)
        features, _ = frozen.batch(indices, device)
        targets = [frozen.targets[i].to(device) for i in indices]
        proposals = [frozen.proposals[i].to(device) for i in indices]
        batch_images = ImageList.from_tensors([images[i].to(device) for i in indices])
        with _global_rng(generator), EventStorage(step):
            sampled = roi_heads.label_and_sample_proposals(proposals, targets)
            losses = roi_heads.mask_losses(batch_images, features, sampled, targets)
        warm = min(1.0, (step + 1) / warmup_iters) if warmup_iters else 1.0
        for group in optimizer.param_groups:
            group["lr"] = base_lr * warm * 0.5 * (1 + math.cos(math.pi * step / iterations))
        optimizer.zero_grad()
        sum(losses.values()).backward()
        optimizer.step()
        for name, value in losses.items():
            curves.setdefault(name, []).append(value.item())
        if not all(math.isfinite(v[-1]) for v in curves.values()):
            raise FloatingPointError(f"a mask loss is not finite at step {step}: {losses}")
    return curves
