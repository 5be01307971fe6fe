#!/usr/bin/env python
"""Train and evaluate DeepMAC Mask R-CNN with Detectron2, on CUDA GPUs, CPU or TPU (torch-xla).

    python train_net.py --config-file configs/voc_r50_hg52.yaml --num-gpus 8
    python train_net.py --config-file configs/voc_r50_hg52.yaml --eval-only MODEL.WEIGHTS out/model_final.pth
    python train_net.py --config-file C --dataset mine_train=train.json:images DATASETS.TRAIN '("mine_train",)'
    PJRT_DEVICE=TPU python train_net.py --config-file configs/voc_r50_hg52.yaml --accelerator xla
"""
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.engine import default_argument_parser
from detectron2.engine.launch import DEFAULT_TIMEOUT
from detectron2.evaluation import verify_results
from detectron2.utils import comm

import deepmac_d2  # noqa: F401  (registers heads, ROI heads, datasets)
from deepmac_d2.engine import ACCELERATORS, Trainer, launch, requested_accelerator, setup


def main(args):
    cfg = setup(args)
    if args.eval_only:
        model = Trainer.build_model(cfg)
        DetectionCheckpointer(model, save_dir=cfg.OUTPUT_DIR).resume_or_load(
            cfg.MODEL.WEIGHTS, resume=args.resume
        )
        res = Trainer.test(cfg, model)
        if comm.is_main_process():
            verify_results(cfg, res)
        return res
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=args.resume)
    return trainer.train()


def argument_parser():
    parser = default_argument_parser()
    parser.add_argument(
        "--accelerator", choices=ACCELERATORS, default=None,
        help="where to train; default: DEEPMAC.ACCELERATOR of the config ('auto': CUDA, else XLA "
        "if PJRT_DEVICE is set, else CPU)",
    )
    parser.add_argument(
        "--dist-timeout", type=float, default=DEFAULT_TIMEOUT.total_seconds(), metavar="SECONDS",
        help="how long a process of a multi-process job waits to join the others at --dist-url, "
        "and then in any collective, before it fails (default: Detectron2's, 30 min); "
        "--num-gpus N runs N processes per machine, on CPU too with --accelerator cpu",
    )
    parser.add_argument(
        "--dataset", action="append", default=[], metavar="NAME=JSON:IMAGE_DIR",
        help="register a COCO-format json and its image folder as dataset NAME, for DATASETS.TRAIN "
        "or DATASETS.TEST to name (repeatable; appended to DATASETS.COCO_FILES); before the KEY VALUE pairs",
    )
    return parser


if __name__ == "__main__":
    args = argument_parser().parse_args()
    print("Command Line Args:", args)
    launch(main, args, requested_accelerator(args))
