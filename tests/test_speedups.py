"""MODEL.COMPILE and TEST.FUSE (deepmac_d2/engine/speedups.py): torch.compile of the mask
head trains the same function as eager, over batches of different ROI counts, and bad
values fail at setup() naming the key."""
import copy
from argparse import Namespace

import pytest
import torch
from detectron2.structures import BitMasks, Boxes, Instances
from detectron2.utils.events import EventStorage

import deepmac_d2  # noqa: F401  (registers the heads)
from deepmac_d2.engine import Trainer, load_config, setup
from deepmac_d2.engine.speedups import check_speedup_config, inference_model
from test_export import CONFIG, TINY
from tolerance import assert_close_to_rounding


def tiny_cfg(*opts):
    return load_config(Namespace(config_file=CONFIG, opts=TINY + ["MODEL.ROI_HEADS.NUM_CLASSES", "3",
                                                                  "MODEL.ROI_MASK_HEAD.ALLOWED_CLASS_IDS", "[]",
                                                                  *opts]))


def batch(objects):
    """Two 64 x 64 images with ``objects[i]`` box-and-mask instances in image i."""
    out = []
    for i, n in enumerate(objects):
        g = torch.Generator().manual_seed(i)
        corners = torch.randint(0, 30, (n, 2), generator=g).float()
        boxes = torch.cat([corners, corners + torch.randint(10, 30, (n, 2), generator=g)], 1)
        masks = torch.zeros(n, 64, 64, dtype=torch.bool)
        for j, (x0, y0, x1, y1) in enumerate(boxes.int().tolist()):
            masks[j, y0:y1, x0:x1] = True
        inst = Instances((64, 64), gt_boxes=Boxes(boxes), gt_classes=torch.arange(n) % 3, gt_masks=BitMasks(masks))
        out.append({"image": torch.randint(0, 256, (3, 64, 64), generator=g).float(), "instances": inst})
    return out


# Inductor's C++ build takes a minute or more per graph on 2 cores; the smallest head
# that still has convs, BatchNorms, the deconv and the predictor keeps it to one build.
SMALL_HEAD = ["MODEL.ROI_MASK_HEAD.CONVNET_VARIANT", "default", "MODEL.ROI_MASK_HEAD.NUM_CONV", "2"]


def test_compiled_mask_head_trains_as_eager_over_changing_roi_counts():
    cfg = tiny_cfg("MODEL.COMPILE.TARGET", "mask_head", *SMALL_HEAD)
    torch.manual_seed(0)
    compiled = Trainer.build_model(cfg).train()
    torch.manual_seed(0)
    eager = Trainer.build_model(tiny_cfg(*SMALL_HEAD)).train()
    head = compiled.roi_heads.mask_head
    assert "layers" in vars(head) and "layers" not in vars(eager.roi_heads.mask_head)
    assert copy.deepcopy(head).layers.__self__ is not head  # a copy runs its own weights
    for objects in ([2, 3], [1, 4], [4, 3]):  # 5 ROIs, 5 other ones, then 7
        losses = []
        for model in (compiled, eager):
            torch.manual_seed(1)  # the same proposal sampling
            with EventStorage():
                loss = model(batch(objects))
            model.zero_grad()
            loss["loss_mask"].backward()
            grad = model.roi_heads.mask_head.predictor.weight.grad.clone()
            losses.append((loss["loss_mask"].detach(), grad))
        # Two convs, the deconv and the predictor, fan-in up to 3 x 3 x 8: 4 layers.
        assert_close_to_rounding(losses[0][0], losses[1][0], 4, 9 * 8, f"loss_mask {objects}")
        assert_close_to_rounding(losses[0][1], losses[1][1], 4, 9 * 8, f"predictor gradient {objects}")


def test_fused_evaluation_copy_leaves_the_training_model():
    cfg = tiny_cfg("TEST.FUSE", "conv_bn")
    model = Trainer.build_model(cfg).train()
    folded = inference_model(model, cfg)
    assert folded is not model and not folded.training and model.training
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in folded.modules())
    assert inference_model(model, tiny_cfg()) is model


@pytest.mark.parametrize("opts, message", [
    (["TEST.FUSE", "yes"], r"TEST.FUSE='yes' is unknown; choose one of none, conv_bn"),
    (["MODEL.COMPILE.TARGET", "model"], r"MODEL.COMPILE.TARGET='model' is unknown; choose one of none, mask_head"),
    (["MODEL.COMPILE.TARGET", "mask_head", "MODEL.COMPILE.BACKEND", "fastest"],
     r"MODEL.COMPILE.BACKEND='fastest' is not a torch.compile backend .*available: .*inductor"),
])
def test_bad_speedup_values_fail_at_setup(opts, message):
    args = Namespace(config_file=CONFIG, opts=TINY + opts, accelerator="cpu", eval_only=False, resume=False)
    with pytest.raises(ValueError, match=message):
        setup(args)


def test_missing_cxx_compiler_names_the_key(monkeypatch):
    monkeypatch.setenv("CXX", "no-such-compiler++")
    with pytest.raises(RuntimeError, match=r"MODEL.COMPILE.TARGET='mask_head' .*no-such-compiler\+\+ is not on PATH"):
        check_speedup_config(tiny_cfg("MODEL.COMPILE.TARGET", "mask_head"))
