"""The Trainer and config set-up shared by ``train_net.py`` and the benchmarks."""
import difflib
import logging
import os
import weakref

import torch
from detectron2.config import get_cfg
from detectron2.data import build_detection_train_loader
from detectron2.engine import DefaultTrainer, default_setup, hooks
from detectron2.utils import comm

from ..config import add_deepmac_config
from ..data import InstanceMaskDatasetMapper, check_dataset_files, check_mapper_dependencies
from ..data.class_names import resolve_class_names
from ..data.coco_files import check_num_classes, register_coco_files
from ..data.training_data import training_dataset_dicts
from ..evaluation import build_subset_evaluator
from ..modeling.weak_losses import check_weak_config
from .accelerator import resolve_accelerator
from .distributed import ddp_without_device_ids, log_batch_share
from .speedups import check_speedup_config, compile_model, inference_model

# Under "detectron2": default_setup gives that logger the terminal and log.txt.
logger = logging.getLogger("detectron2.deepmac_d2.engine")


class Trainer(DefaultTrainer):
    """Detectron2's DefaultTrainer with subset evaluation and an XLA path.

    On XLA the step and the checkpointer are swapped for their torch-xla
    versions; everything else (hooks, schedule, resume) is Detectron2's.
    """

    def __init__(self, cfg):
        with ddp_without_device_ids(cfg):  # CPU/XLA processes: no device ids, no SyncBatchNorm
            super().__init__(cfg)
        if cfg.DEEPMAC.ACCELERATOR == "xla":
            from .xla import XLACheckpointer, XLASimpleTrainer

            step = self._trainer
            self._trainer = XLASimpleTrainer(
                step.model, step.data_loader, step.optimizer, bf16=cfg.DEEPMAC.XLA_BF16
            )
            self.checkpointer = XLACheckpointer(step.model, cfg.OUTPUT_DIR, trainer=weakref.proxy(self))
            # The periodic-checkpoint hook holds the checkpointer: build the hooks again.
            self._hooks = []
            self.register_hooks(self.build_hooks())

    if "state_dict" not in DefaultTrainer.__dict__:
        # Detectron2 v0.6's DefaultTrainer checkpoints no optimizer (later versions
        # do): a resumed run would lose its momentum and run its first iteration at
        # the warmup's starting LR, since the scheduler only sets the LR after a step.
        def state_dict(self):
            return dict(super().state_dict(), _trainer=self._trainer.state_dict())

        def load_state_dict(self, state_dict):
            super().load_state_dict(state_dict)
            if "_trainer" in state_dict:
                self._trainer.load_state_dict(state_dict["_trainer"])

    def build_hooks(self):
        ret = super().build_hooks()
        for hook in ret:
            if isinstance(hook, hooks.PeriodicWriter):
                hook._period = self.cfg.DEEPMAC.LOG_PERIOD  # Detectron2 offers no setting for it
        return ret

    @classmethod
    def build_model(cls, cfg):
        return compile_model(super().build_model(cfg), cfg)

    @classmethod
    def test(cls, cfg, model, evaluators=None):
        return super().test(cfg, inference_model(model, cfg), evaluators)

    @classmethod
    def build_train_loader(cls, cfg):
        loader = build_detection_train_loader(
            cfg, mapper=InstanceMaskDatasetMapper(cfg, is_train=True), dataset=training_dataset_dicts(cfg)
        )
        return log_batch_share(loader, cfg.SOLVER.IMS_PER_BATCH) if comm.get_world_size() > 1 else loader

    @classmethod
    def build_evaluator(cls, cfg, dataset_name, output_folder=None):
        output_folder = output_folder or os.path.join(cfg.OUTPUT_DIR, "inference", dataset_name)
        return build_subset_evaluator(cfg, dataset_name, output_folder)


def _merge_with_hint(merge, what, keys_of):
    """Run a CfgNode merge; on an unknown key, say which known keys are closest."""
    try:
        merge()
    except (KeyError, AssertionError) as e:  # yacs: KeyError from files, assert from lists
        msg = str(e.args[0]) if e.args else str(e)
        if "Non-existent" not in msg:
            raise
        bad = msg.rsplit(":", 1)[-1].strip()
        close = difflib.get_close_matches(bad, keys_of(), n=3, cutoff=0.75)
        hint = f" Did you mean {' or '.join(close)}?" if close else ""
        raise KeyError(f"{what}: {msg}.{hint}") from None


def _all_keys(node, prefix=""):
    for k, v in node.items():
        name = f"{prefix}{k}"
        if hasattr(v, "items"):
            yield from _all_keys(v, name + ".")
        else:
            yield name


def load_config(args):
    """Config from a file and ``KEY VALUE`` overrides; unknown keys get a did-you-mean hint."""
    cfg = get_cfg()
    add_deepmac_config(cfg)
    keys = lambda: list(_all_keys(cfg))  # noqa: E731
    if args.config_file:
        _merge_with_hint(lambda: cfg.merge_from_file(args.config_file), args.config_file, keys)
    _merge_with_hint(lambda: cfg.merge_from_list(args.opts), "command-line override", keys)
    # train_net.py's --dataset NAME=JSON:IMAGE_DIR: kept in the config, so that the copy
    # default_setup saves in OUTPUT_DIR registers the same data for --eval-only and predict.
    cfg.DATASETS.COCO_FILES = list(cfg.DATASETS.COCO_FILES) + list(getattr(args, "dataset", None) or [])
    return cfg


def warn_frozen_bn_from_scratch(cfg):
    """Warn when a ResNet trains from random weights with FrozenBN, Detectron2's default.

    FrozenBN keeps the initial statistics (mean 0, variance 1) and affine (1, 0), so a
    random backbone's activations grow unchecked from stage to stage, and FREEZE_AT keeps
    the first stages random for good. Tried on real COCO images, such a run diverges at
    iteration 2 with nothing but Detectron2's FloatingPointError.
    """
    if cfg.MODEL.WEIGHTS or cfg.MODEL.RESNETS.NORM != "FrozenBN" or "resnet" not in cfg.MODEL.BACKBONE.NAME.lower():
        return
    logger.warning(
        "MODEL.WEIGHTS is empty, so the ResNet backbone trains from random weights, but "
        "MODEL.RESNETS.NORM is 'FrozenBN' (its BatchNorms never learn their statistics) and "
        f"MODEL.BACKBONE.FREEZE_AT is {cfg.MODEL.BACKBONE.FREEZE_AT} (its first stages never train): "
        "expect the losses to diverge. From scratch, set MODEL.RESNETS.NORM 'GN' (or 'BN', "
        "'SyncBN' on several GPUs) and MODEL.BACKBONE.FREEZE_AT 0; or set MODEL.WEIGHTS to an "
        "ImageNet-pretrained backbone."
    )


def requested_accelerator(args):
    """``--accelerator`` if given, else the config's ``DEEPMAC.ACCELERATOR``, resolved."""
    return resolve_accelerator(getattr(args, "accelerator", None) or load_config(args).DEEPMAC.ACCELERATOR)


def setup(args, check_datasets=True):
    """Config from ``args`` (Detectron2's argument parser plus ``--accelerator``), frozen.

    Resolves the accelerator into ``DEEPMAC.ACCELERATOR`` and ``MODEL.DEVICE``,
    then does Detectron2's ``default_setup`` (output dir, logging, seeds).
    """
    cfg = load_config(args)
    check_num_classes(cfg, register_coco_files(cfg))
    resolve_class_names(cfg)
    check_mapper_dependencies(cfg)  # a missing package now, not at the first batch
    accelerator = resolve_accelerator(getattr(args, "accelerator", None) or cfg.DEEPMAC.ACCELERATOR)
    cfg.DEEPMAC.ACCELERATOR = accelerator
    if accelerator == "xla":
        from .xla import init_xla_process

        cfg.MODEL.DEVICE = init_xla_process()
    else:
        cfg.MODEL.DEVICE = accelerator
        if accelerator == "cpu" and cfg.SOLVER.AMP.ENABLED:
            logger.warning("SOLVER.AMP.ENABLED is CUDA-only; training in fp32 on CPU.")
            cfg.SOLVER.AMP.ENABLED = False
    check_speedup_config(cfg)
    check_weak_config(cfg)
    cfg.freeze()
    default_setup(cfg, args)
    if not getattr(args, "eval_only", False):
        warn_frozen_bn_from_scratch(cfg)
    if accelerator == "cpu":
        logger.info("CPU threads: %d (docs/performance.md: settings that speed up CPU training)",
                    torch.get_num_threads())
    if check_datasets:
        check_dataset_files(cfg)
    return cfg
