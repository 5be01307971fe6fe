"""The config's standard speed-ups: ``MODEL.COMPILE`` (torch.compile) and ``TEST.FUSE``
(BatchNorms folded into the convs for evaluation).

Both are PyTorch's own facilities, applied to the whole model or the mask head, for
GPUs and CPUs alike, and both default to off: docs/performance.md has what each gains
here. Their keys are checked at ``setup()``, so a typo or a missing compiler fails
before any data is loaded, naming the key.
"""
import copy
import os
import shutil
import types

import torch
from torch.nn.parallel import DistributedDataParallel

from ..modeling import fuse_for_inference

__all__ = ["COMPILE_TARGETS", "FUSE_CHOICES", "check_speedup_config", "compile_model", "inference_model"]

COMPILE_TARGETS = ("none", "mask_head")
FUSE_CHOICES = ("none", "conv_bn")


def _cxx_compiler():
    """The C++ compiler inductor's CPU code needs: $CXX, else g++ (inductor's default)."""
    return shutil.which(os.environ.get("CXX", "g++"))


def check_speedup_config(cfg):
    """Fail on an unknown ``MODEL.COMPILE.TARGET``/``BACKEND`` or ``TEST.FUSE``, or a
    compile that cannot run here, with the key, the value and the choices."""
    target = cfg.MODEL.COMPILE.TARGET
    if target not in COMPILE_TARGETS:
        raise ValueError(f"MODEL.COMPILE.TARGET={target!r} is unknown; choose one of {', '.join(COMPILE_TARGETS)}")
    if cfg.TEST.FUSE not in FUSE_CHOICES:
        raise ValueError(f"TEST.FUSE={cfg.TEST.FUSE!r} is unknown; choose one of {', '.join(FUSE_CHOICES)}")
    if target == "none":
        return
    backend = cfg.MODEL.COMPILE.BACKEND
    backends = torch.compiler.list_backends(exclude_tags=())
    if backend not in backends:
        raise ValueError(
            f"MODEL.COMPILE.BACKEND={backend!r} is not a torch.compile backend of torch "
            f"{torch.__version__}; available: {', '.join(backends)}"
        )
    if backend == "inductor" and cfg.MODEL.DEVICE == "cpu" and _cxx_compiler() is None:
        raise RuntimeError(
            f"MODEL.COMPILE.TARGET={target!r} with backend 'inductor' on the CPU needs a C++ "
            f"compiler ({os.environ.get('CXX', 'g++')} is not on PATH): install g++ (or set CXX), "
            "or set MODEL.COMPILE.TARGET none"
        )


def compile_model(model, cfg):
    """``model`` with ``MODEL.COMPILE.TARGET`` compiled in place, so its state_dict keys,
    checkpoints and DDP wrapping stay as they are.

    "mask_head" compiles the head's network, its ``layers`` (Detectron2's mask heads all
    have one): the loss and the paste of Detectron2's ``Instances`` around it are Python
    bookkeeping that inductor gains nothing on (and, with dynamic ROI counts, fails to
    lower). The whole model is not a target: Detectron2's Python between the modules
    (proposal sampling, Instances, per-image loops) breaks its graph at every step, and
    on the CPU its first training step did not finish compiling in 20 minutes. A copy of
    the model (``copy.deepcopy``) keeps the compiled ``layers``, bound to the copy.
    """
    options = dict(backend=cfg.MODEL.COMPILE.BACKEND, dynamic=cfg.MODEL.COMPILE.DYNAMIC)
    if cfg.MODEL.COMPILE.TARGET == "mask_head":
        head = model.roi_heads.mask_head
        head.layers = types.MethodType(torch.compile(type(head).layers, **options), head)
    return model


def inference_model(model, cfg):
    """The model to evaluate: ``model`` itself, or with ``TEST.FUSE`` "conv_bn" an eval
    copy with its BatchNorms folded (the training model keeps its norms)."""
    if cfg.TEST.FUSE == "none":
        return model
    if isinstance(model, DistributedDataParallel):
        model = model.module
    return fuse_for_inference(copy.deepcopy(model).eval())
