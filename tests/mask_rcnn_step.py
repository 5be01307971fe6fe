"""One training step and one inference of a Mask R-CNN on CPU, for the backbone tests.

Two images (one flipped) with two instances each, of classes 0 and 2 (configs with
NUM_CLASSES >= 3); shared by tests/test_spinenet.py and tests/test_tf_resnet_fpn.py.
"""
import torch
from detectron2.structures import BitMasks, Boxes, Instances
from detectron2.utils.events import EventStorage


def train_one_step_and_infer(model, clip=1.0):
    """Train ``model`` one SGD step (gradients clipped to norm ``clip``), check the
    losses, the backbone's gradients and the parameters are finite, then infer; returns
    the inference's Instances for the 100 x 120 image."""
    inst = Instances((100, 120))
    inst.gt_boxes = Boxes(torch.tensor([[10.0, 12.0, 70.0, 80.0], [40.0, 30.0, 110.0, 95.0]]))
    inst.gt_classes = torch.tensor([0, 2])
    masks = torch.zeros(2, 100, 120, dtype=torch.bool)
    masks[0, 20:70, 15:60] = masks[1, 35:90, 50:100] = True
    inst.gt_masks = BitMasks(masks)
    image = torch.randint(0, 256, (3, 100, 120), dtype=torch.uint8)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    model.train()
    with EventStorage():
        losses = model([{"image": image, "instances": inst}, {"image": image.flip(-1), "instances": inst}])
    assert all(torch.isfinite(v) for v in losses.values()) and losses["loss_mask"] > 0
    sum(losses.values()).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all()
               for p in model.backbone.parameters() if p.requires_grad)
    torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
    optimizer.step()
    assert all(torch.isfinite(p).all() for p in model.parameters())
    model.eval()
    with torch.no_grad():
        (result,) = model([{"image": image}])
    pred = result["instances"]
    assert len(pred) > 0 and pred.pred_masks.shape[-2:] == (100, 120)
    return pred
