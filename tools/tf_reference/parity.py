#!/usr/bin/env python3
"""``make parity``: our ports against the TF Model Garden reference, same weights, float64.

For SpineNet-49/96/143/190 and every DeepMaskHead variant at the reference's
settings, ``tools/tf_reference/parity_tf.py`` (in ``.venv-tf``) builds the reference's own module,
randomises every variable (BatchNorm statistics included) and records its outputs;
this script (in ``.venv``) loads those variables into ours with the package's
converter (``deepmac_d2.tf_port``: every variable used exactly once, kinds and shapes
checked), runs the same input in float64, eval and train mode, and prints one table:
the largest absolute difference per output (relative to the output's scale), the
BatchNorm moving statistics after the train-mode step, and the trainable /
non-trainable parameter counts. Exit status 1 on any mismatch. A self-check first
runs deliberately wrong ports (PyTorch's symmetric padding instead of TF's 'SAME'; a
missing layer; the hourglass with PyTorch's unbiased BatchNorm variance) and fails
unless the harness catches each.

Then a speed table: ours against the reference, float32 on the CPU, the same number
of threads on both sides, forward (eval) and forward+backward (train mode, gradients
of every parameter) for Hourglass-52 at crop 32 and the default head at crop 14 on
64 ROIs each, and SpineNet-49 at 640 x 640. The reference runs under ``tf.function``
(as it trains) in a worker process (``tools/tf_reference/parity_tf.py --speed-worker``); the two
sides' runs alternate, so load from other processes falls on both; each row gives
the median and the minimum wall time of ``--speed-repeats`` runs, and the median
process CPU time, which such load inflates less. Our forward rows run the model with its
BatchNorms folded (``fuse_for_inference``), as the reference's graph folds them; the
process settings are the caller's (docs/performance.md).

    python tools/tf_reference/parity.py                      # runs tools/tf_reference/parity_tf.py in .venv-tf first
    python tools/tf_reference/parity.py --cases spinenet49,hg52_head
    python tools/tf_reference/parity.py --ref-dir DIR        # reuse parity_tf.py's output
    python tools/tf_reference/parity.py --speed-only --speed-repeats 7
"""
import argparse
import copy
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

import deepmac_d2  # noqa: F401  (registers; installs the detectron2._C stand-in)
from detectron2.layers import ShapeSpec
from deepmac_d2.modeling import fuse_for_inference
from deepmac_d2.tf_port import layers as tf_layers
from deepmac_d2.modeling.hourglass import KerasBatchNorm2d
from deepmac_d2.modeling.mask_head import DeepMaskHead
from deepmac_d2.tf_port.spinenet import SpineNet
from deepmac_d2.tf_port.heads import (
    TFConvFCHead, TFFastRCNNOutputLayers, TFRPNHead, reference_anchor_order,
)
from detectron2.modeling.box_regression import Box2BoxTransform
from deepmac_d2.tf_port.resnet_fpn import TFResNetFPN
from deepmac_d2.tf_port import ConversionError, layers_in_call_order, load_reference_weights

ROOT = Path(__file__).resolve().parents[2]
TF_PYTHON = ROOT / ".venv-tf" / "bin" / "python"
# Same keys as tools/tf_reference/parity_tf.py's HEADS: (variant, num_filters, crop, Keras momentum, eps).
HEADS = {
    "default_head": ("default", 256, 14, 0.997, 1e-4),
    "hg20_head": ("hourglass20", 64, 32, 0.99, 1e-3),
    "hg52_head": ("hourglass52", 64, 32, 0.99, 1e-3),
    "hg100_head": ("hourglass100", 64, 32, 0.99, 1e-3),
}
# As tools/tf_reference/parity_tf.py's RESNET_FPN: the R50 rows' ResNet + FPN (levels 2..6, Keras 0.997 / 1e-4).
RESNET_FPN = {"resnet50_fpn": 50}
CASES = ["spinenet49", "spinenet96", "spinenet143", "spinenet190"] + list(RESNET_FPN) + ["rpn_head", "box_head"] + list(HEADS)
RPN_LEVELS = range(2, 7)  # as parity_tf.py's RPN_LEVELS
BOX_CLASSES = 3  # parity_tf.py's BOX_CLASSES, less the background
ROI_CASES = set(HEADS) | {"box_head"}  # inputs [1, N, H, W, C] there, N x C x H x W here
STOCHASTIC_DEPTH = 0.2  # as parity_tf.py: eval only
SELF_CHECK_CASES = ("spinenet49", "resnet50_fpn", "hg20_head")
# Largest difference allowed, relative to the output's scale (at least 1). Eval mode:
# float64 rounding through ~200 layers, ~1e-14. Train mode: besides the conditioning test
# in check_case, the reference's synchronised BatchNorm computes the variance as
# E[x^2] - E[x]^2, which loses ~1e-8 relative where the mean is large. A porting error
# shows at O(1) (see the self-check rows).
RTOL = {"eval": 1e-9, "train": 1e-6}
# Speed table: case -> the reference's input shape (ROIs as [1, N, H, W, C], images NHWC).
SPEED_INPUTS = {
    "hg52_head": (1, 64, 32, 32, 256),
    "default_head": (1, 64, 14, 14, 256),
    "spinenet49": (1, 640, 640, 3),
}
SPEED_MODES = ("forward", "forward+backward")


def rpn_in_reference_layout(logits, deltas, levels):
    """TFRPNHead's outputs (Detectron2's layout) put back in the reference's, by the
    mapping as documented (not by the head's own permutation): with ratios 0.5, 1, 2 and
    one size, the reference's anchor a (ratio width / height) is Detectron2's anchor 2 - a
    (height / width), and its deltas are (dy, dx, dh, dw) where Detectron2's are (dx, dy,
    dw, dh). ``{scores_p<k>, boxes_p<k>}``, N x C x H x W in the reference's channel order."""
    out = {}
    for k, score, delta in zip(levels, logits, deltas):
        n, _, h, w = delta.shape
        out[f"scores_p{k}"] = score.flip(1)
        out[f"boxes_p{k}"] = delta.view(n, 3, 4, h, w).flip(1)[:, :, [1, 0, 3, 2]].reshape(n, 12, h, w)
    return out


def box_in_reference_layout(scores, deltas):
    """TFFastRCNNOutputLayers' outputs in the reference's layout (the background first
    among the classes, (dy, dx, dh, dw)), its background deltas left out (Detectron2 has none)."""
    return {"classes": torch.cat([scores[:, -1:], scores[:, :-1]], 1),
            "boxes": deltas.view(len(deltas), -1, 4)[:, :, [1, 0, 3, 2]].flatten(1)}


class _RPNInReferenceLayout(nn.Module):
    def __init__(self, head):
        super().__init__()
        self.head = head

    def forward(self, features):
        return rpn_in_reference_layout(*self.head(features), RPN_LEVELS)


class _BoxHeadInReferenceLayout(nn.Module):
    """TFConvFCHead + TFFastRCNNOutputLayers, outputs in the reference's layout."""

    def __init__(self):
        super().__init__()
        self.head = TFConvFCHead(ShapeSpec(channels=256, height=7, width=7), norm="BN")
        self.predictor = TFFastRCNNOutputLayers(
            self.head.output_shape, box2box_transform=Box2BoxTransform((10.0, 10.0, 5.0, 5.0)),
            num_classes=BOX_CLASSES)

    def forward(self, x):
        return box_in_reference_layout(*self.predictor(self.head(x)))


class _HeadLayers(nn.Module):
    """DeepMaskHead's network alone (ROI features -> mask logits)."""

    def __init__(self, head):
        super().__init__()
        self.head = head

    def forward(self, x):
        return {"masks": self.head.layers(x)[:, 0]}


def build_ours(name, stochastic_depth=STOCHASTIC_DEPTH):
    if name.startswith("spinenet"):
        return SpineNet(name[len("spinenet"):], stochastic_depth_rate=stochastic_depth, norm="BN")
    if name in RESNET_FPN:
        return TFResNetFPN(RESNET_FPN[name], norm="BN", fpn_norm="BN", bn_momentum=0.003, bn_eps=1e-4)
    if name == "box_head":
        return _BoxHeadInReferenceLayout()
    if name == "rpn_head":
        return _RPNInReferenceLayout(TFRPNHead(
            in_channels=256, num_levels=len(RPN_LEVELS), anchor_order=reference_anchor_order([0.5, 1.0, 2.0], 1),
            norm="BN", bn_momentum=0.003, bn_eps=1e-4))
    variant, filters, _, momentum, eps = HEADS[name]
    return _HeadLayers(DeepMaskHead(
        ShapeSpec(channels=256), num_classes=1, convnet_variant=variant, num_filters=filters,
        num_convs=4, upsample_factor=2, norm="BN", bn_momentum=1 - momentum, bn_eps=eps,
    ))


def to_ours(name, x):
    """The reference's input in our layout: NHWC images, or [1, N, H, W, C] ROIs."""
    x = torch.from_numpy(x)
    return x.permute(0, 3, 1, 2) if name not in ROI_CASES else x[0].permute(0, 3, 1, 2)


def to_reference(name, key, y):
    y = y.detach().numpy()
    return y.transpose(0, 2, 3, 1) if name not in ROI_CASES else y[None]


def max_diff(a, b):
    return float(np.max(np.abs(a - b))), float(np.max(np.abs(b)))


def _moving_statistics(model, x):
    """Our BatchNorm moving statistics in call order, as (mean, var or None) pairs.

    The head's own BatchNorms are fused Keras BatchNorms in the reference's float32/bf16
    training, whose moving variance takes the unbiased batch variance as PyTorch's does;
    float64 cannot run fused (Keras falls back to the biased one), so for those only the
    moving mean is compared. SpineNet's and the hourglass's are synchronised (never fused,
    biased variance: our KerasBatchNorm2d) and compared in full.
    """
    norms = [m for _, m in layers_in_call_order(model, x) if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    return [(m.running_mean.numpy().copy(),
             m.running_var.numpy().copy() if isinstance(m, KerasBatchNorm2d) else None) for m in norms]


def _train_step(model, x):
    for m in model.modules():  # the reference's train-mode model has no drop (it is random)
        if isinstance(m, tf_layers.ResidualUnit):
            m.drop_rate = 0.0
    with torch.no_grad():
        outputs = model.train()(x)
    return outputs, _moving_statistics(model, x)


def check_case(name, ref, model=None):
    """Rows ``(case, what, max abs diff, scale, own sensitivity, ok)`` for one case.

    Train mode is judged against its own conditioning: BatchNorm on batch statistics
    amplifies rounding wherever a channel's few values nearly coincide (SpineNet's level 7
    is 1x1 at this input size: 2 values per channel, through 3 convs per block and up to
    4 blocks per level in SpineNet-190). So we also run our port on the input changed by
    1e-13 (relative): a difference from the reference within 10x of how far that moves
    our own output is rounding, not porting; a porting error is O(1) at every output.
    """
    variables = [(k.split("|", 1)[1], ref[k]) for k in sorted(ref.files) if k.startswith("w")]
    model = (model or build_ours(name)).double()
    if name == "rpn_head":
        x = [torch.from_numpy(ref[f"input|{k}"]).permute(0, 3, 1, 2) for k in RPN_LEVELS]
    else:
        x = to_ours(name, ref["input"])
    load_reference_weights(model, variables, (x,))
    twin = copy.deepcopy(model)
    rows = []
    with torch.no_grad():
        for key, y in model.eval()(x).items():
            diff, scale = max_diff(to_reference(name, key, y), ref[f"eval|{key}"])
            rows.append((name, f"eval {key}", diff, scale, float("nan"), diff <= RTOL["eval"] * max(scale, 1.0)))
    outputs, stats = _train_step(model, x)
    rng = np.random.default_rng(1)
    nudged = [t * (1 + 1e-13 * torch.from_numpy(rng.standard_normal(tuple(t.shape))))
              for t in (x if isinstance(x, list) else [x])]
    twin_outputs, twin_stats = _train_step(twin, nudged if isinstance(x, list) else nudged[0])

    def judge(what, ours, theirs, own):
        diff, scale = max_diff(ours, theirs)
        sensitivity = max_diff(ours, own)[0]
        ok = diff <= max(RTOL["train"] * max(scale, 1.0), 10 * sensitivity)
        rows.append((name, what, diff, scale, sensitivity, ok))

    for key, y in outputs.items():
        judge(f"train {key}", to_reference(name, key, y), ref[f"train|{key}"],
              to_reference(name, key, twin_outputs[key]))
    theirs = [ref[k] for k in sorted(ref.files) if k.startswith("after_train|")]
    if 2 * len(stats) != len(theirs):
        rows.append((name, "BN moving statistics after train", float("nan"), 0.0, float("nan"), False))
    else:
        pick = [(i, j) for i, pair in enumerate(stats) for j in (0, 1) if pair[j] is not None]
        judge("BN moving statistics after train",
              np.concatenate([stats[i][j] for i, j in pick]),
              np.concatenate([theirs[2 * i + j] for i, j in pick]),
              np.concatenate([twin_stats[i][j] for i, j in pick]))
    counts = json.loads(str(ref["meta"]))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    stats = sum(b.numel() for n, b in model.named_buffers() if n.endswith(("running_mean", "running_var")))
    for label, mine, theirs in (("trainable params", trainable, counts["trainable"]),
                                ("non-trainable params", stats, counts["non_trainable"])):
        rows.append((name, f"{label} {mine:,} (ref {theirs:,})", abs(mine - theirs), theirs, float("nan"),
                     mine == theirs))
    return rows


def self_check(ref_dir):
    """Deliberately wrong ports must fail; returns rows (ok = the harness caught it)."""
    rows = []
    for name in ("spinenet49", "resnet50_fpn"):
        path = Path(ref_dir) / f"{name}.npz"
        if not path.exists():
            rows.append(("self-check", f"skipped: {name} not among the cases", 0.0, 0.0, float("nan"), True))
            continue
        same = tf_layers.same_padding
        # PyTorch's habit: symmetric padding k // 2, where TF pads the extra pixel after
        # (SpineNet's and the ResNet-FPN's strided convs and max pools are tf_port/layers.py's,
        # so this reaches both).
        tf_layers.same_padding = lambda size, kernel, stride: (kernel // 2, kernel // 2)
        try:
            caught = not all(r[-1] for r in check_case(name, np.load(path)) if r[1].startswith(("eval", "train")))
        except (ConversionError, RuntimeError):  # RuntimeError: maps of other sizes that do not add
            caught = True
        finally:
            tf_layers.same_padding = same
        rows.append(("self-check", f"wrong port ({name}, symmetric padding) fails", 0.0, 0.0, float("nan"),
                     caught))
    name = "spinenet49"
    path = Path(ref_dir) / f"{name}.npz"
    if not path.exists():
        return rows
    ref = np.load(path)
    broken = build_ours(name)
    del broken.endpoints["p7"]  # a port missing a layer the reference has
    broken._out_levels = broken._out_levels[:-1]
    try:
        check_case(name, ref, broken)
        caught = False
    except ConversionError:
        caught = True
    rows.append(("self-check", "wrong port (missing endpoint) fails", 0.0, 0.0, float("nan"), caught))
    path = Path(ref_dir) / "hg20_head.npz"
    if not path.exists():
        rows.append(("self-check", "skipped: hg20_head not among the cases", 0.0, 0.0, float("nan"), True))
    else:
        # PyTorch's own BatchNorm in the hourglass: unbiased moving variance.
        keras_forward = KerasBatchNorm2d.forward
        KerasBatchNorm2d.forward = nn.BatchNorm2d.forward
        try:
            rows_bn = check_case("hg20_head", np.load(path))
        finally:
            KerasBatchNorm2d.forward = keras_forward
        caught = not all(r[-1] for r in rows_bn if r[1].startswith("BN moving"))
        rows.append(("self-check", "wrong port (unbiased hourglass BN variance) fails", 0.0, 0.0,
                     float("nan"), caught))
    return rows


def print_table(rows):
    print(f"\n{'case':<13} {'check':<50} {'max |diff|':>10} {'max |ref|':>10} {'own sens.':>10}  ok")
    print("-" * 100)
    for case, what, diff, scale, sensitivity, ok in rows:
        sens = "" if np.isnan(sensitivity) else f"{sensitivity:.3g}"
        print(f"{case:<13} {what:<50} {diff:>10.3g} {scale:>10.3g} {sens:>10}  {'yes' if ok else 'NO'}")


def _time_ours(models, x, mode):
    """Wall and process CPU seconds of one forward (eval, no autograd) or
    forward+backward (train) call. ``models``: the folded eval model and the train one,
    two copies, as a model serves in eval mode and trains in train mode."""
    start, cpu = time.perf_counter(), time.process_time()
    if mode == "forward":
        with torch.inference_mode():
            models[0](x)
    else:
        sum(y.sum() for y in models[1](x).values()).backward()
    seconds = time.perf_counter() - start, time.process_time() - cpu
    models[1].zero_grad(set_to_none=True)
    return seconds


def speed(cases, repeats, threads, ref_inter_op):
    """Rows ``(case, input, mode, ours, the reference's)``, each side a list of
    (wall, CPU) seconds per run."""
    torch.set_num_threads(threads)
    worker = subprocess.Popen(
        [str(TF_PYTHON), str(ROOT / "tools" / "tf_reference" / "parity_tf.py"), "--speed-worker", "--threads", str(threads),
         "--inter-op", str(ref_inter_op)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )

    def reference(**request):
        worker.stdin.write(json.dumps(request) + "\n")
        worker.stdin.flush()
        return worker.stdout.readline().strip()

    rng = np.random.default_rng(0)
    models, inputs, times = {}, {}, {}
    try:
        for name in cases:
            if reference(build=name, shape=SPEED_INPUTS[name]) != "ok":
                sys.exit(f"the reference's speed worker failed to build {name}")
            model = build_ours(name, stochastic_depth=0.0)
            models[name] = (fuse_for_inference(copy.deepcopy(model).eval()), model.train())
            # Contiguous NCHW, as Detectron2's ROIAlign and image batches give.
            inputs[name] = to_ours(name, rng.standard_normal(SPEED_INPUTS[name]).astype(np.float32)).contiguous()
            for mode in SPEED_MODES:  # warm-up: allocator, oneDNN primitives
                _time_ours(models[name], inputs[name], mode)
        for round_ in range(repeats):
            for name in cases:
                for mode in SPEED_MODES:
                    runs = times.setdefault((name, mode), ([], []))
                    # Alternate who goes first, so neither always follows the other.
                    for side in ((0, 1) if round_ % 2 == 0 else (1, 0)):
                        runs[side].append(_time_ours(models[name], inputs[name], mode) if side == 0
                                          else tuple(map(float, reference(time=name, mode=mode).split())))
    finally:
        worker.stdin.close()
        worker.wait()
    return [(name, "x".join(map(str, SPEED_INPUTS[name])), mode, *times[name, mode])
            for name in cases for mode in SPEED_MODES]


def print_speed_table(cases, repeats, threads, ref_inter_op=None):
    ref_inter_op = ref_inter_op or threads
    load_before = os.getloadavg()[0]
    rows = speed(cases, repeats, threads, ref_inter_op)
    load = load_before, os.getloadavg()[0]
    tf_threads = ("TF intra- and inter-op" if ref_inter_op == threads
                  else f"TF intra-op; TF inter-op {ref_inter_op}")
    print(f"\nSpeed: float32 on the CPU, {threads} threads each side (torch.set_num_threads; {tf_threads}; "
          "our forward folded), ms per call, "
          f"median / min of {repeats} alternating runs; load average {load[0]:.1f} before, "
          f"{load[1]:.1f} after ({os.cpu_count()} CPUs). CPU: the process's CPU time (all its "
          "threads), which other jobs' load inflates less than the wall time.")
    print(f"{'case':<13} {'input (TF layout)':<18} {'mode':<17} {'ours wall':>15} {'ref wall':>15} "
          f"{'ours CPU':>8} {'ref CPU':>8}   ours / ref: wall median, min; CPU median")
    print("-" * 132)
    for name, shape, mode, ours, ref in rows:
        (ours_wall, ours_cpu), (ref_wall, ref_cpu) = (1e3 * np.array(ours).T, 1e3 * np.array(ref).T)
        ratios = (np.median(ours_wall) / np.median(ref_wall), ours_wall.min() / ref_wall.min(),
                  np.median(ours_cpu) / np.median(ref_cpu))
        print(f"{name:<13} {shape:<18} {mode:<17} {np.median(ours_wall):>7.0f} /{ours_wall.min():>6.0f} "
              f"{np.median(ref_wall):>7.0f} /{ref_wall.min():>6.0f} {np.median(ours_cpu):>8.0f} "
              f"{np.median(ref_cpu):>8.0f}   " + ", ".join(f"{r:.2f}" for r in ratios))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", default=",".join(CASES))
    ap.add_argument("--ref-dir", help="output of tools/tf_reference/parity_tf.py (default: run it now)")
    ap.add_argument("--speed-only", action="store_true", help="only the speed table")
    ap.add_argument("--speed-repeats", type=int, default=5, help="timed runs per row (0: no speed table)")
    ap.add_argument("--threads", type=int, default=2, help="CPU threads of each side in the speed table")
    ap.add_argument("--ref-inter-op", type=int, help="the reference's inter-op threads, how many of its "
                    "ops may run at once (default: --threads; 1: one at a time, as PyTorch runs ours)")
    args = ap.parse_args()
    cases = args.cases.split(",")
    unknown = sorted(set(cases) - set(CASES))
    if unknown:
        sys.exit(f"unknown case(s) {unknown}; valid: {', '.join(CASES)}")
    torch.manual_seed(0)
    speed_cases = [c for c in SPEED_INPUTS if c in cases] if args.speed_repeats else []
    if (speed_cases or args.ref_dir is None) and not TF_PYTHON.exists():
        sys.exit(f"{TF_PYTHON} is missing: run `make setup-tf` (or tools/setup_env.py --tf) first")
    if args.speed_only:
        return print_speed_table(speed_cases, args.speed_repeats, args.threads, args.ref_inter_op)
    with tempfile.TemporaryDirectory(prefix="parity-") as tmp:
        ref_dir = args.ref_dir
        if ref_dir is None:
            ref_dir = tmp
            # The self-check's wrong ports need these two cases whatever --cases says.
            tf_cases = cases + [c for c in SELF_CHECK_CASES if c not in cases]
            subprocess.run([str(TF_PYTHON), str(ROOT / "tools" / "tf_reference" / "parity_tf.py"), "--out", ref_dir,
                            "--cases", ",".join(tf_cases)], check=True)
        rows = self_check(ref_dir)
        for name in cases:
            rows += check_case(name, np.load(os.path.join(ref_dir, f"{name}.npz")))
            print(f"[parity] {name} compared", flush=True)
    print_table(rows)
    bad = [r for r in rows if not r[-1]]
    print(f"\n{len(rows) - len(bad)} of {len(rows)} checks pass" + (f"; {len(bad)} FAIL" if bad else ""))
    if speed_cases:
        print_speed_table(speed_cases, args.speed_repeats, args.threads, args.ref_inter_op)
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
