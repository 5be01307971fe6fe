"""DeepMaskROIHeads: which instances reach the mask head, and the loss they give.

The heads are built directly on a hand-made one-level feature map (no backbone), so
every box the mask pooler sees and every mask target can be written down by hand.
"""
import pytest
import torch
import torch.nn.functional as F
from detectron2.config import get_cfg
from detectron2.data import MetadataCatalog
from detectron2.layers import ShapeSpec
from detectron2.modeling import build_roi_heads
from detectron2.structures import BitMasks, Boxes, Instances
from detectron2.utils.events import EventStorage

from deepmac_d2 import add_deepmac_config
from deepmac_d2.modeling.roi_heads import DeepMaskROIHeads, allowed_contiguous_class_ids

IMAGE = 64  # image side; the feature map has stride 4
MASK = 8  # mask side: POOLER_RESOLUTION 4 x UPSAMPLE_FACTOR 2
HEADS = [
    ("MaskRCNNConvUpsampleHead", True),
    ("MaskRCNNConvUpsampleHead", False),
    ("DeepMaskHead", True),
    ("DeepMaskHead", False),
]


def make_cfg(mask_head="MaskRCNNConvUpsampleHead", agnostic=True, use_gt_boxes=True):
    cfg = get_cfg()
    add_deepmac_config(cfg)
    cfg.MODEL.MASK_ON = True
    cfg.MODEL.ROI_HEADS.NAME = "DeepMaskROIHeads"
    cfg.MODEL.ROI_HEADS.IN_FEATURES = ["p2"]
    cfg.MODEL.ROI_HEADS.NUM_CLASSES = 3
    cfg.MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE = 16
    cfg.MODEL.ROI_BOX_HEAD.NAME = "FastRCNNConvFCHead"
    cfg.MODEL.ROI_BOX_HEAD.NUM_FC = 1
    cfg.MODEL.ROI_BOX_HEAD.FC_DIM = 16
    cfg.MODEL.ROI_BOX_HEAD.POOLER_RESOLUTION = 4
    head = cfg.MODEL.ROI_MASK_HEAD
    head.NAME = mask_head
    head.CLS_AGNOSTIC_MASK = agnostic
    head.CONV_DIM = 8
    head.NUM_CONV = 1
    head.POOLER_RESOLUTION = 4
    head.CONVNET_VARIANT = "hourglass10" if mask_head == "DeepMaskHead" else "default"
    head.USE_GT_BOXES = use_gt_boxes
    return cfg


def make_heads(cfg, allowed=None):
    """Build the ROI heads; ``allowed`` (contiguous ids) bypasses the dataset-id mapping."""
    torch.manual_seed(0)
    shape = {"p2": ShapeSpec(channels=8, stride=4)}
    if allowed is None:
        heads = build_roi_heads(cfg, shape)
    else:
        heads = DeepMaskROIHeads(cfg, shape, mask_allowed_classes=allowed)
    return heads.train()


def left_half_masks(boxes):
    """Bit masks that fill the left half of each (integer, even-width) box."""
    masks = torch.zeros(len(boxes), IMAGE, IMAGE, dtype=torch.bool)
    for m, (x0, y0, x1, y1) in zip(masks, boxes):
        m[y0:y1, x0 : (x0 + x1) // 2] = True
    return masks


def target(boxes, classes):
    t = Instances((IMAGE, IMAGE))
    t.gt_boxes = Boxes(torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4))
    t.gt_classes = torch.tensor(classes, dtype=torch.int64)
    t.gt_masks = BitMasks(left_half_masks(boxes))
    return t


def proposals_for(t):
    """Proposals that overlap the GT boxes but never equal them (jittered), plus background."""
    gt = t.gt_boxes.tensor
    boxes = torch.cat([gt + torch.tensor([2.0, 1.0, 3.0, -1.0]), torch.tensor([[0.0, 0, 20, 20]])])
    p = Instances((IMAGE, IMAGE))
    p.proposal_boxes = Boxes(boxes.clamp(0, IMAGE))
    p.objectness_logits = torch.zeros(len(boxes))
    return p


# Image 0: a class-0 object on the left, a class-1 object on the right; image 1: class 2.
TARGET_BOXES = [[[4, 8, 20, 40], [40, 16, 60, 48]], [[8, 8, 40, 24]]]
TARGET_CLASSES = [[0, 1], [2]]


def batch(requires_grad=False):
    features = {"p2": torch.randn(2, 8, IMAGE // 4, IMAGE // 4, requires_grad=requires_grad)}
    targets = [target(b, c) for b, c in zip(TARGET_BOXES, TARGET_CLASSES)]
    return features, [proposals_for(t) for t in targets], targets


def spy_mask_branch(heads):
    """Record the mask pooler's boxes, the mask head's instances and logits, and the
    box branch's proposals."""
    seen = {"boxes": [], "instances": [], "logits": [], "box_proposals": []}
    pooler, head = heads.mask_pooler, heads.mask_head
    pool, forward, layers = pooler.forward, head.forward, head.layers
    forward_box = heads._forward_box

    def forward_box_spy(features, proposals):
        seen["box_proposals"].append(proposals)
        return forward_box(features, proposals)

    def pool_spy(x, box_lists):
        seen["boxes"].append([b.tensor.clone() for b in box_lists])
        return pool(x, box_lists)

    def forward_spy(x, instances):
        seen["instances"].append(instances)
        return forward(x, instances)

    def layers_spy(x):
        out = layers(x)
        seen["logits"].append(out)
        return out

    pooler.forward, head.forward, head.layers = pool_spy, forward_spy, layers_spy
    heads._forward_box = forward_box_spy
    return seen


def run(heads, features, proposals, targets):
    with EventStorage():
        _, losses = heads(None, features, proposals, targets)
    return losses


def hand_bce(logits, targets):
    """Mean over pixels of -t*log(sigmoid(l)) - (1-t)*log(1-sigmoid(l))."""
    p = torch.sigmoid(logits.double())
    return (-(targets * p.log() + (1 - targets) * (1 - p).log())).mean()


def expected_targets(boxes):
    """The GT masks cropped to their own boxes at MASK x MASK: left half ones."""
    t = torch.zeros(len(boxes), MASK, MASK, dtype=torch.float64)
    t[:, :, : MASK // 2] = 1
    return t


@pytest.mark.parametrize("mask_head,agnostic", HEADS)
def test_gt_boxes_are_what_the_mask_head_sees(mask_head, agnostic):
    heads = make_heads(make_cfg(mask_head, agnostic))
    seen = spy_mask_branch(heads)
    features, proposals, targets = batch()
    losses = run(heads, features, proposals, targets)

    (pooled,) = seen["boxes"]
    for boxes, expected in zip(pooled, TARGET_BOXES):
        assert torch.equal(boxes, torch.tensor(expected, dtype=torch.float32))
    (logits,) = seen["logits"]
    classes = torch.tensor(sum(TARGET_CLASSES, []))
    picked = logits[:, 0] if agnostic else logits[torch.arange(len(classes)), classes]
    all_boxes = sum(TARGET_BOXES, [])
    expected = hand_bce(picked.detach(), expected_targets(all_boxes))
    assert losses["loss_mask"].item() == pytest.approx(expected.item(), rel=1e-5)
    # The box branch still trains on the proposals.
    assert {"loss_cls", "loss_box_reg"} <= set(losses)


def test_proposals_are_used_without_gt_boxes():
    heads = make_heads(make_cfg(use_gt_boxes=False))
    seen = spy_mask_branch(heads)
    features, proposals, targets = batch()
    run(heads, features, proposals, targets)
    (pooled,) = seen["boxes"]
    gt = torch.cat([torch.tensor(b, dtype=torch.float32) for b in TARGET_BOXES])
    pooled = torch.cat(pooled)
    # Sampled foreground proposals: the jittered boxes (and the GT Detectron2 appends).
    assert len(pooled) > len(gt)
    assert not all(any(torch.equal(p, g) for g in gt) for p in pooled)


@pytest.mark.parametrize("use_gt_boxes", [True, False])
def test_disallowed_classes_do_not_train_the_mask_head(use_gt_boxes):
    heads = make_heads(make_cfg(use_gt_boxes=use_gt_boxes), allowed=[0])
    seen = spy_mask_branch(heads)
    features, proposals, targets = batch(requires_grad=True)
    losses = run(heads, features, proposals, targets)

    (instances,) = seen["instances"]
    assert all((x.gt_classes == 0).all() for x in instances)
    assert sum(len(x) for x in instances) >= 1
    if use_gt_boxes:
        assert [len(x) for x in instances] == [1, 0]
        (logits,) = seen["logits"]
        expected = hand_bce(logits[:, 0].detach(), expected_targets([TARGET_BOXES[0][0]]))
        assert losses["loss_mask"].item() == pytest.approx(expected.item(), rel=1e-5)

    # Gradient of the mask loss reaches the features under the allowed (class 0, left)
    # object and none under the disallowed ones (class 1 on the right; class 2 in image 1).
    (grad,) = torch.autograd.grad(losses["loss_mask"], features["p2"])
    assert grad[0, :, 2:10, 1:5].abs().sum() > 0  # class-0 box [4,8,20,40] / stride 4
    assert grad[0, :, :, 11:].abs().sum() == 0  # class-1 box [40,16,60,48] / stride 4
    assert grad[1].abs().sum() == 0

    # The box branch still sees every class: its sampled proposals hold all three.
    (sampled,) = seen["box_proposals"]
    assert set(torch.cat([p.gt_classes for p in sampled]).tolist()) >= {0, 1, 2}


@pytest.mark.parametrize("mask_head,agnostic", HEADS)
@pytest.mark.parametrize("use_gt_boxes", [True, False])
def test_batch_without_allowed_instances_gives_a_connected_zero_loss(
    mask_head, agnostic, use_gt_boxes
):
    # Class 2 appears only in image 1: drop it so that nothing in the batch is allowed.
    heads = make_heads(make_cfg(mask_head, agnostic, use_gt_boxes), allowed=[1])
    features, proposals, targets = batch()
    targets[0] = target([TARGET_BOXES[0][0]], [0])
    proposals[0] = proposals_for(targets[0])
    losses = run(heads, features, proposals, targets)

    assert losses["loss_mask"].item() == 0.0
    sum(losses.values()).backward()
    params = list(heads.mask_head.parameters())
    assert params and all(p.grad is not None for p in params)
    assert all(p.grad.abs().sum() == 0 for p in params)
    # ... while the box branch trained as usual.
    assert any(p.grad.abs().sum() > 0 for p in heads.box_predictor.parameters())


def test_inference_is_that_of_standard_roi_heads():
    cfg = make_cfg()
    heads = make_heads(cfg, allowed=[0]).eval()
    cfg.MODEL.ROI_HEADS.NAME = "StandardROIHeads"
    standard = make_heads(cfg).eval()
    standard.load_state_dict(heads.state_dict())
    features, proposals, _ = batch()
    with torch.no_grad():
        ours, _ = heads(None, features, proposals)
        theirs, _ = standard(None, features, proposals)
    for a, b in zip(ours, theirs):
        assert torch.equal(a.pred_boxes.tensor, b.pred_boxes.tensor)
        assert torch.equal(a.pred_masks, b.pred_masks)


def test_allowed_ids_map_through_the_training_dataset():
    name = "deepmac_test_roi_heads_ids"
    MetadataCatalog.get(name).set(thing_dataset_id_to_contiguous_id={1: 0, 3: 1, 7: 2})
    cfg = make_cfg()
    cfg.DATASETS.TRAIN = (name,)
    cfg.MODEL.ROI_MASK_HEAD.ALLOWED_CLASS_IDS = [7, 3]
    assert allowed_contiguous_class_ids(cfg) == [1, 2]
    shape = {"p2": ShapeSpec(channels=8, stride=4)}
    assert build_roi_heads(cfg, shape).mask_allowed_classes == (1, 2)

    cfg.MODEL.ROI_MASK_HEAD.ALLOWED_CLASS_IDS = [3, 5]
    with pytest.raises(ValueError) as err:
        allowed_contiguous_class_ids(cfg)
    for part in ("MODEL.ROI_MASK_HEAD.ALLOWED_CLASS_IDS", "[5]", "[1, 3, 7]", name):
        assert part in str(err.value)

    cfg.MODEL.ROI_MASK_HEAD.ALLOWED_CLASS_IDS = []
    assert allowed_contiguous_class_ids(cfg) is None


def test_voc_preset_on_builtin_coco():
    cfg = make_cfg()
    cfg.DATASETS.TRAIN = ("coco_2017_train",)
    cfg.MODEL.ROI_MASK_HEAD.ALLOWED_CLASS_IDS = ["voc"]
    ids = allowed_contiguous_class_ids(cfg)
    # person, bicycle, ..., tv: COCO ids 1..7 are the first seven contiguous ids; 72 (tv) is 62.
    assert len(ids) == 20 and ids[:7] == list(range(7)) and 62 in ids
    cfg.MODEL.ROI_MASK_HEAD.ALLOWED_CLASS_IDS = ["nonvoc"]
    assert sorted(allowed_contiguous_class_ids(cfg) + ids) == list(range(80))
