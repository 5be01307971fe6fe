#!/usr/bin/env python
"""Parameters and FLOPs of SpineNet-49/96/143/190 next to Detectron2's R50-FPN and R101-FPN.

Backbones alone (the features the RPN and ROI heads read: SpineNet P3-P7, FPN P2-P6),
at square inputs of 640, 1024 and 1280. FLOPs are fvcore's count (one multiply-add = one
FLOP, as the SpineNet paper counts), in billions. fvcore traces one forward at 256 x 256
and the count is scaled by (size / 256)^2: every layer of both families is a conv, norm,
pool or resize whose cost is proportional to the area, and 640, 1024, 1280 are multiples
of 128, so the scaling is exact (checked below at 640 for SpineNet-49).

    .venv/bin/python benchmarks/backbone_flops.py
"""
import logging

import torch
from fvcore.nn import FlopCountAnalysis

import deepmac_d2
from detectron2.config import get_cfg
from detectron2.layers import ShapeSpec
from detectron2.modeling import build_backbone
from deepmac_d2.tf_port.spinenet import SpineNet

SIZES = (640, 1024, 1280)
TRACE = 256


def resnet_fpn(depth):
    cfg = get_cfg()
    deepmac_d2.add_deepmac_config(cfg)
    cfg.merge_from_file("configs/Base-DeepMAC.yaml")
    cfg.MODEL.RESNETS.DEPTH = depth
    return build_backbone(cfg, ShapeSpec(channels=3))


def gflops(model, size):
    flops = FlopCountAnalysis(model.eval(), torch.zeros(1, 3, size, size))
    flops.unsupported_ops_warnings(False)
    flops.uncalled_modules_warnings(False)
    return flops.total() / 1e9


def main():
    logging.disable(logging.WARNING)
    models = {f"SpineNet-{m}": SpineNet(m, norm="BN") for m in ("49", "96", "143", "190")}
    models.update({"R50-FPN": resnet_fpn(50), "R101-FPN": resnet_fpn(101)})
    exact = gflops(models["SpineNet-49"], 640)
    scaled = gflops(models["SpineNet-49"], TRACE) * (640 / TRACE) ** 2
    assert abs(exact - scaled) < 1e-6 * exact, (exact, scaled)
    print(f"{'backbone':<13} {'params (M)':>10} " + " ".join(f"{f'GFLOPs@{s}':>13}" for s in SIZES))
    for name, model in models.items():
        params = sum(p.numel() for p in model.parameters()) / 1e6
        base = gflops(model, TRACE)
        row = " ".join(f"{base * (s / TRACE) ** 2:>13.1f}" for s in SIZES)
        print(f"{name:<13} {params:>10.2f} {row}")


if __name__ == "__main__":
    main()
