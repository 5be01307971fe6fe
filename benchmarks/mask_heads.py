"""Cost of the mask heads: parameters, FLOPs per ROI, and training-step time.

Prints one markdown table: Detectron2's stock ``MaskRCNNConvUpsampleHead`` (the
baseline) and every ``DeepMaskHead`` variant, class-agnostic, on 256-channel ROI
features. FLOPs are fvcore's count (one multiply-add = one flop); the conv part
is set against the TF reference's conv MACs (docs/reference/tf_mask_head_params.md),
where the reference has a figure. Times are the fastest of ``--repeats``
forward+backward passes over a batch of ROIs, after ``--warmup`` untimed ones.

    python benchmarks/mask_heads.py --device cpu --threads 1 --batch-size 8 --repeats 3
    python benchmarks/mask_heads.py --device cuda --batch-size 256 --repeats 20
"""
import argparse
import time

import torch
from fvcore.nn import FlopCountAnalysis
from torch import nn

import deepmac_d2  # noqa: F401  (registers the heads; detectron2._C stand-in)
from detectron2.layers import ShapeSpec
from detectron2.modeling.roi_heads.mask_head import MaskRCNNConvUpsampleHead
from deepmac_d2.modeling import CONVNET_VARIANTS, DeepMaskHead

IN_CHANNELS = 256  # FPN's ROI features
BASELINE = "Detectron2 MaskRCNNConvUpsampleHead"

# TF reference, class-agnostic conv MACs per ROI: (variant, num_filters, crop) -> MACs.
# The hourglasses fail there at crop 14 (odd level sizes).
TF_MACS = {
    ("default", 256, 14): 514_002_944,
    ("default", 256, 32): 2_685_403_136,
    ("default", 64, 14): 53_838_848,
    ("default", 64, 32): 281_280_512,
    ("hourglass20", 64, 32): 1_410_859_008,
    ("hourglass20", 256, 32): 20_758_659_072,
    ("hourglass52", 64, 32): 1_953_189_888,
    ("hourglass52", 256, 32): 29_435_953_152,
    ("hourglass100", 64, 32): 3_354_021_888,
    ("hourglass100", 256, 32): 51_849_265_152,
}
# Downsamplings of the reference's hourglasses: it needs crops divisible by 2**levels.
TF_LEVELS = {"hourglass20": 2, "hourglass52": 5, "hourglass100": 5}


class Layers(nn.Module):
    """The head's network alone (``layers``), without the loss/inference that needs Instances."""

    def __init__(self, head):
        super().__init__()
        self.head = head

    def forward(self, x):
        return self.head.layers(x)


def build(variant, num_filters):
    # The heads' layers do not depend on the crop; the ShapeSpec only gives the channels.
    shape = ShapeSpec(channels=IN_CHANNELS)
    if variant == BASELINE:
        head = MaskRCNNConvUpsampleHead(shape, num_classes=1, conv_dims=[num_filters] * 5)
    else:
        head = DeepMaskHead(shape, num_classes=1, convnet_variant=variant, num_filters=num_filters)
    return Layers(head)


def flops_per_roi(model, crop):
    analysis = FlopCountAnalysis(model.eval(), torch.zeros(1, IN_CHANNELS, crop, crop))
    analysis.unsupported_ops_warnings(False).uncalled_modules_warnings(False)
    return analysis.total(), analysis.by_operator()["conv"]


def train_step(model, x):
    """Seconds for one forward+backward pass of ``model`` on ``x``."""
    if x.is_cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    model(x).float().mean().backward()
    if x.is_cuda:
        torch.cuda.synchronize()
    model.zero_grad(set_to_none=True)
    return time.perf_counter() - start


def train_step_seconds(models, crops, batch_size, repeats, warmup, device):
    """Fastest of ``repeats`` passes per (model, crop), in interleaved rounds.

    Interleaving spreads any load from other processes over all heads, and the
    minimum is the figure such load cannot inflate (noise only adds time).
    """
    inputs = {c: torch.randn(batch_size, IN_CHANNELS, c, c, device=device) for c in crops}
    for model in models:
        model.to(device).train()
    best = {}
    for round_ in range(warmup + repeats):  # warm-up: allocator, cuDNN/oneDNN plans
        for i, model in enumerate(models):
            for crop in crops:
                seconds = train_step(model, inputs[crop])
                if round_ >= warmup:
                    best[i, crop] = min(best.get((i, crop), seconds), seconds)
    return best


def tf_column(variant, num_filters, crop, conv_macs):
    if (variant, num_filters, crop) in TF_MACS:
        tf = TF_MACS[variant, num_filters, crop]
        return f"{tf / 1e9:.3f} ({'equal' if tf == conv_macs else f'x{conv_macs / tf:.3f}'})"
    if variant in TF_LEVELS and crop % 2 ** TF_LEVELS[variant]:
        return "fails"
    return "-"


def main():
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--threads", type=int, help="CPU threads (1 keeps timings steady on a shared machine)"
    )
    parser.add_argument("--batch-size", type=int, default=8, help="ROIs per forward+backward pass")
    parser.add_argument("--repeats", type=int, default=3, help="timed passes (fastest reported)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed passes first")
    parser.add_argument("--crops", type=int, nargs="+", default=[14, 32], help="ROI crop sizes")
    parser.add_argument("--default-filters", type=int, default=256, help="width of the conv heads")
    parser.add_argument("--hourglass-filters", type=int, default=64, help="hourglass base width n")
    parser.add_argument(
        "--variants", nargs="+", default=list(CONVNET_VARIANTS), choices=CONVNET_VARIANTS
    )
    args = parser.parse_args()
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)

    heads = [(BASELINE, args.default_filters)]
    for variant in args.variants:
        width = args.default_filters if variant == "default" else args.hourglass_filters
        heads.append((variant, width))
    header = ["head", "n", "params"]
    for crop in args.crops:
        header += [f"GFLOPs/ROI @{crop}", f"TF conv GMACs @{crop}"]
        header += [f"ms @{crop}", f"x baseline @{crop}"]
    models = [build(variant, num_filters) for variant, num_filters in heads]
    seconds = train_step_seconds(
        models, args.crops, args.batch_size, args.repeats, args.warmup, device
    )
    rows = []
    for i, ((variant, num_filters), model) in enumerate(zip(heads, models)):
        name = "DeepMaskHead " + variant if variant != BASELINE else variant
        row = [name, str(num_filters), f"{sum(p.numel() for p in model.parameters()):,}"]
        for crop in args.crops:
            total, conv = flops_per_roi(model.cpu(), crop)
            row += [
                f"{total / 1e9:.3f}",
                tf_column(variant, num_filters, crop, conv),
                f"{seconds[i, crop] * 1e3:.0f}",
                f"{seconds[i, crop] / seconds[0, crop]:.1f}",
            ]
        rows.append(row)

    print(
        f"Forward+backward, {args.batch_size} ROIs of {IN_CHANNELS} channels, class-agnostic, "
        f"fastest of {args.repeats}, on {device.type}"
        + (f" ({torch.get_num_threads()} CPU thread(s))" if device.type == "cpu" else "")
        + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else "")
        + ". TF column: reference conv MACs (ours equal / ratio)."
    )
    print()
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for row in rows:
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
