"""The XLA (TPU) path, run on PJRT's CPU device in .venv-xla: `make test-xla`.

Compiling Mask R-CNN's dynamic-shape graphs for XLA's CPU backend takes about
a minute and a half per iteration here (about 75 graphs: Detectron2 reads values
mid-step), so the Trainer test trains a small model of the same parts (a conv
stem, RoIAlign at the ground-truth boxes, DeepMaskHead, Detectron2's mask loss)
for several iterations, and one train_net.py run checks a real Mask R-CNN takes
an XLA step and writes a checkpoint.
"""
import json
import os
import subprocess
import sys
from argparse import Namespace

import pytest
import torch
from torch import nn

pytestmark = pytest.mark.xla

import deepmac_d2  # noqa: E402,F401
from detectron2.config import configurable  # noqa: E402
from detectron2.layers import ROIAlign, ShapeSpec  # noqa: E402
from detectron2.modeling import META_ARCH_REGISTRY  # noqa: E402
from detectron2.modeling.poolers import convert_boxes_to_pooler_format  # noqa: E402
from detectron2.modeling.roi_heads.mask_head import build_mask_head  # noqa: E402
from deepmac_d2.data.synthetic import SyntheticConfig, prepare_synthetic, register_synthetic  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, "configs", "demo_synthetic_hg20.yaml")
sys.path.insert(0, os.path.dirname(__file__))
from test_train_net import tiny_opts  # noqa: E402


@META_ARCH_REGISTRY.register()
class GTBoxMaskModel(nn.Module):
    """The mask branch of DeepMAC on its own: masks learned at ground-truth boxes."""

    @configurable
    def __init__(self, *, mask_head, resolution, device):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1))
        self.pool = ROIAlign((resolution, resolution), 1.0, 0, aligned=True)
        self.mask_head = mask_head
        self.to(device)

    @classmethod
    def from_config(cls, cfg):
        res = cfg.MODEL.ROI_MASK_HEAD.POOLER_RESOLUTION
        return {
            "mask_head": build_mask_head(cfg, ShapeSpec(channels=16, height=res, width=res)),
            "resolution": res,
            "device": torch.device(cfg.MODEL.DEVICE),
        }

    @property
    def device(self):
        return self.stem[0].weight.device

    def forward(self, batched_inputs):
        images = torch.stack([x["image"] for x in batched_inputs]).to(self.device).float() / 255.0
        instances = [x["instances"].to(self.device) for x in batched_inputs]
        for inst in instances:
            inst.proposal_boxes = inst.gt_boxes
        rois = convert_boxes_to_pooler_format([inst.gt_boxes for inst in instances])
        return self.mask_head(self.pool(self.stem(images), rois), instances)


@pytest.fixture(scope="module")
def synthetic_root(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("synthetic"))
    # One val image: each new image shape costs XLA's CPU backend ~1.5 min of compiling.
    prepare_synthetic(root, num_train=2, num_val=1, cfg=SyntheticConfig(image_size=64))
    return root


def test_tiny_model_forward_backward_and_optimizer_step_on_xla():
    import torch_xla

    device = torch_xla.device()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 2)).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.randn(8, 3, 8, 8).to(device), torch.randint(0, 2, (8,)).to(device)
    losses = []
    for _ in range(5):
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        torch_xla.sync()
        losses.append(loss.item())
    assert str(model[0].weight.device).startswith("xla")
    assert losses[-1] < losses[0]


def test_xla_step_cuts_the_graph_after_the_backbone_and_each_head(tmp_path, synthetic_root):
    """Without these cuts each value Detectron2 reads mid-step compiled the backbone again:
    train_net.py's XLA step below took 588 s of CPU time instead of 80 s (78 graphs either way)."""
    from deepmac_d2.engine import Trainer, setup
    from deepmac_d2.engine.xla import SYNC_AFTER, XLASimpleTrainer, _sync_hook

    register_synthetic(synthetic_root)
    args = Namespace(config_file=CONFIG, opts=tiny_opts(str(tmp_path), 1, 1), accelerator="xla",
                     eval_only=False, resume=False)
    model = Trainer.build_model(setup(args))
    XLASimpleTrainer(model, [], torch.optim.SGD(model.parameters(), lr=0.1))
    for path in SYNC_AFTER:
        module = model
        for name in path.split("."):
            module = getattr(module, name)
        assert _sync_hook in module._forward_hooks.values(), path


def test_trainer_on_xla_learns_and_checkpoints(tmp_path, synthetic_root):
    from deepmac_d2.engine import Trainer, setup
    from deepmac_d2.engine.xla import XLASimpleTrainer

    register_synthetic(synthetic_root)
    out = str(tmp_path / "out")
    opts = tiny_opts(out, max_iter=12, period=6) + [
        "MODEL.META_ARCHITECTURE", "GTBoxMaskModel", "SOLVER.BASE_LR", "0.05",
        "SOLVER.WARMUP_ITERS", "0", "SOLVER.STEPS", "()", "INPUT.RANDOM_FLIP", "none",
        "DEEPMAC.LOG_PERIOD", "1",
    ]
    args = Namespace(config_file=CONFIG, opts=opts, accelerator="xla", eval_only=False, resume=False)
    cfg = setup(args)
    assert cfg.MODEL.DEVICE.startswith("xla")
    trainer = Trainer(cfg)
    assert isinstance(trainer._trainer, XLASimpleTrainer)
    trainer.resume_or_load(resume=False)
    trainer.train()

    with open(os.path.join(out, "metrics.json")) as f:
        losses = [json.loads(line)["total_loss"] for line in f if "total_loss" in line]  # = loss_mask
    assert len(losses) == 12
    assert sum(losses[-3:]) / 3 < 0.8 * sum(losses[:3]) / 3, losses

    # Checkpoints hold CPU tensors (they load without torch-xla) and load back into the model.
    ckpt = torch.load(os.path.join(out, "model_final.pth"), map_location="cpu", weights_only=False)
    assert all(t.device.type == "cpu" for t in ckpt["model"].values())
    assert ckpt["iteration"] == 11 and "optimizer" in ckpt["trainer"]["_trainer"]
    weights = {k: v.detach().cpu() for k, v in trainer.model.state_dict().items()}
    for name, value in ckpt["model"].items():
        torch.testing.assert_close(value, weights[name])
    fresh = Trainer.build_model(cfg)
    from detectron2.checkpoint import DetectionCheckpointer

    DetectionCheckpointer(fresh).load(os.path.join(out, "model_final.pth"))
    for name, value in fresh.state_dict().items():
        torch.testing.assert_close(value.cpu(), weights[name])


def test_train_net_takes_a_mask_rcnn_step_on_xla(tmp_path, synthetic_root):
    """train_net.py as a user runs it: torch_xla.launch, the real model, a checkpoint,
    and the evaluation that follows training, on the XLA device too."""
    out = str(tmp_path / "out")
    env = dict(os.environ, DEEPMAC_SYNTHETIC_ROOT=synthetic_root, PJRT_DEVICE="CPU")
    log = tmp_path / "log"
    cmd = [sys.executable, os.path.join(ROOT, "train_net.py"), "--config-file", CONFIG,
           "--accelerator", "xla"] + tiny_opts(out, max_iter=1, period=1) + [
               "DATASETS.TEST", "('synthetic_val',)", "TEST.DETECTIONS_PER_IMAGE", "5"]
    proc = subprocess.run(cmd, env=env, cwd=ROOT, stdout=open(log, "w"), stderr=subprocess.STDOUT,
                          timeout=900)
    text = log.read_text()
    assert proc.returncode == 0, text[-3000:]
    assert "Starting training from iteration 0" in text
    assert "copypaste: Task: segm/novel" in text  # the subset evaluator ran after training
    ckpt = torch.load(os.path.join(out, "model_final.pth"), map_location="cpu", weights_only=False)
    assert all(t.device.type == "cpu" for t in ckpt["model"].values())
    assert any(k.startswith("roi_heads.mask_head.convnet") for k in ckpt["model"])


def _train_net_xla(tmp_path, synthetic_root, extra_env, extra_args):
    env = dict(os.environ, DEEPMAC_SYNTHETIC_ROOT=synthetic_root, PJRT_DEVICE="CPU", **extra_env)
    log = tmp_path / "log"
    cmd = [sys.executable, os.path.join(ROOT, "train_net.py"), "--config-file", CONFIG,
           "--accelerator", "xla"] + extra_args + tiny_opts(str(tmp_path / "out"), max_iter=1, period=1)
    proc = subprocess.run(cmd, env=env, cwd=ROOT, stdout=open(log, "w"), stderr=subprocess.STDOUT,
                          timeout=300)
    return proc.returncode, log.read_text()


def test_train_net_refuses_num_gpus_on_xla_with_the_torch_xla_way(tmp_path, synthetic_root):
    rc, text = _train_net_xla(tmp_path, synthetic_root, {}, ["--num-gpus", "2"])
    assert rc != 0 and "--num-gpus 2" in text and "torch_xla.launch starts one process per XLA device" in text
    assert "PJRT_DEVICE=TPU" in text and "Starting training" not in text


def test_train_net_refuses_xla_devices_run_as_threads_of_one_process(tmp_path, synthetic_root):
    """PJRT_DEVICE=CPU with CPU_NUM_DEVICES=2, torch-xla 2.9's emulation of two devices, runs
    the training function in two threads of one process: refused before a model is built."""
    rc, text = _train_net_xla(tmp_path, synthetic_root, {"CPU_NUM_DEVICES": "2"}, [])
    assert rc != 0, text[-3000:]
    assert "runs the 2 XLA devices of this process as threads of one process" in text, text[-3000:]
    assert "--accelerator cpu --num-gpus N" in text and "Starting training" not in text
