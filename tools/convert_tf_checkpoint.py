#!/usr/bin/env python3
"""A TF Model Garden deepmac_maskrcnn checkpoint as a Detectron2 .pth for MODEL.WEIGHTS.

    python tools/convert_tf_checkpoint.py --config-file configs/nonvoc_spinenet143_hg52.yaml \\
        --checkpoint deepmarc_spinenet/saved_model --output deepmarc_spinenet.pth \\
        MODEL.ROI_MASK_HEAD.POOLER_TYPE ROIAlign MODEL.ROI_MASK_HEAD.POOLER_SAMPLING_RATIO 1

``--checkpoint``: a SavedModel directory, a ``tf.train.Checkpoint`` directory (its
latest checkpoint) or a checkpoint prefix. The config says which model the checkpoint
holds (SpineNet model id, or ResNet depth and FPN width with MODEL.BACKBONE.NAME
build_tf_resnet_fpn_backbone, e.g. configs/voc_tf_r50_hg52.yaml; mask-head variant and
width); ``tools/read_tf_checkpoint.py``
reads it in ``.venv-tf`` and ``deepmac_d2.tf_port`` checks and converts. A checkpoint
that does not fit the config stops with the first variable that does not fit and the
config key to change. The .pth holds the backbone and the mask head: load it for
BoxMaskPredictor / tools/predict_box_masks.py (masks for given boxes, the reference's
``image_and_boxes_tensor``). The RPN and box head convert too where the config has the
reference's own heads (MODEL.RPN.HEAD_NAME TFRPNHead, MODEL.ROI_BOX_HEAD.NAME
TFConvFCHead); otherwise they stay untrained (Detectron2 lists them as missing when it
loads the file). Trailing KEY VALUE pairs override the config.
"""
import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from detectron2.config import get_cfg
from detectron2.modeling import build_model

from deepmac_d2 import add_deepmac_config
from deepmac_d2.tf_port import ConversionError
from deepmac_d2.tf_port.checkpoint import converted_prefixes, load_reference_checkpoint, reference_spec

ROOT = Path(__file__).resolve().parent.parent
TF_PYTHON = ROOT / ".venv-tf" / "bin" / "python"


def load_config(config_file, opts):
    cfg = get_cfg()
    add_deepmac_config(cfg)
    cfg.merge_from_file(config_file)
    cfg.merge_from_list(opts)
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.WEIGHTS = ""
    cfg.freeze()
    return cfg


def read_reference(checkpoint, spec, tf_python=TF_PYTHON):
    """Run tools/read_tf_checkpoint.py in the TF environment; (manifest, arrays)."""
    if not Path(tf_python).exists():
        raise SystemExit(f"{tf_python} is missing: run `make setup-tf` first")
    with tempfile.TemporaryDirectory(prefix="tf-checkpoint-") as tmp:
        spec_path, out = Path(tmp) / "spec.json", Path(tmp) / "variables.npz"
        spec_path.write_text(json.dumps(spec))
        subprocess.run([str(tf_python), str(ROOT / "tools" / "read_tf_checkpoint.py"),
                        "--checkpoint", str(checkpoint), "--spec", str(spec_path), "--out", str(out)],
                       check=True)
        with np.load(out) as record:
            arrays = {k: record[k] for k in record.files if k != "manifest"}
            return json.loads(str(record["manifest"])), arrays


def convert(cfg, checkpoint, output, tf_python=TF_PYTHON):
    """Write ``output`` (``{"model": state dict}``); returns the name map
    ``[(our state_dict key, the reference's variable name, the checkpoint's key)]``."""
    spec = reference_spec(cfg)
    manifest, arrays = read_reference(checkpoint, spec, tf_python)
    model = build_model(cfg).eval()
    name_map = load_reference_checkpoint(model, cfg, manifest, arrays)
    state = {k: v for k, v in model.state_dict().items() if k.startswith(converted_prefixes(cfg))}
    Path(output).parent.mkdir(parents=True, exist_ok=True)
    torch.save({"model": state, "__author__": f"tools/convert_tf_checkpoint.py from {checkpoint}"}, output)
    return name_map


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config-file", required=True, metavar="FILE")
    ap.add_argument("--checkpoint", required=True, help="SavedModel dir, checkpoint dir or prefix")
    ap.add_argument("--output", required=True, help=".pth to write")
    ap.add_argument("--name-map", help="also write the name map here: ours, reference variable, checkpoint key (TSV)")
    ap.add_argument("--tf-python", default=str(TF_PYTHON), help="python of the TF environment")
    ap.add_argument("opts", nargs=argparse.REMAINDER, help="KEY VALUE config overrides")
    args = ap.parse_args(argv)
    cfg = load_config(args.config_file, args.opts)
    try:
        name_map = convert(cfg, args.checkpoint, args.output, args.tf_python)
    except ConversionError as err:
        raise SystemExit(f"error: {args.checkpoint} does not fit {args.config_file}: {err}")
    parts = ["backbone", "mask head"]
    if cfg.MODEL.RPN.HEAD_NAME == "TFRPNHead":
        parts.append("RPN head")
    if cfg.MODEL.ROI_BOX_HEAD.NAME == "TFConvFCHead":
        parts.append("box head")
    missing = {"RPN head", "box head"} - set(parts)
    print(f"wrote {args.output}: {len(name_map)} tensors ({', '.join(parts)})"
          + (f"; {' and '.join(sorted(missing))} not converted (MODEL.RPN.HEAD_NAME TFRPNHead, "
             "MODEL.ROI_BOX_HEAD.NAME TFConvFCHead convert them)" if missing else ""))
    if "RPN head" in parts and cfg.MODEL.ANCHOR_GENERATOR.OFFSET != 0.5:
        print("note: the reference centres its anchors in their cells; MODEL.ANCHOR_GENERATOR.OFFSET 0.5 "
              f"reproduces them (this config: {cfg.MODEL.ANCHOR_GENERATOR.OFFSET})")
    if args.name_map:
        Path(args.name_map).write_text("".join("\t".join(row) + "\n" for row in name_map))
    head = cfg.MODEL.ROI_MASK_HEAD
    if (head.POOLER_TYPE, head.POOLER_SAMPLING_RATIO) != ("ROIAlign", 1):
        print("note: the reference's RoIAlign samples one point per bin, without the half-pixel "
              "shift; MODEL.ROI_MASK_HEAD.POOLER_TYPE ROIAlign and POOLER_SAMPLING_RATIO 1 "
              f"reproduce it (this config: {head.POOLER_TYPE}, {head.POOLER_SAMPLING_RATIO})")


if __name__ == "__main__":
    main(sys.argv[1:])
