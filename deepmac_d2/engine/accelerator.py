"""Pick the accelerator and start one training process per device on it.

CUDA goes through Detectron2's own ``launch`` (DDP, one process per GPU), CPU
runs in this process, and XLA (TPU) through ``torch_xla.launch``, which starts
one process per local device the way torch-xla wants. The entry point stays
the same ``main(args)`` on all three.
"""
import importlib.util
import logging
import os

import torch
from detectron2.engine import launch as detectron2_launch

ACCELERATORS = ("auto", "cuda", "cpu", "xla")
logger = logging.getLogger(__name__)


def xla_available():
    """torch-xla is installed and a PJRT device is configured (TPU, or CPU for testing)."""
    return importlib.util.find_spec("torch_xla") is not None and bool(os.environ.get("PJRT_DEVICE"))


def resolve_accelerator(name):
    """Map ``auto`` to the best device present; check an explicit choice is usable here."""
    name = (name or "auto").lower()
    if name not in ACCELERATORS:
        raise ValueError(
            f"accelerator {name!r} is unknown (DEEPMAC.ACCELERATOR / --accelerator); "
            f"choose one of {', '.join(ACCELERATORS)}."
        )
    if name == "auto":
        if torch.cuda.is_available():
            return "cuda"
        return "xla" if xla_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(
            "accelerator 'cuda' was asked for but torch sees no CUDA device "
            f"(torch {torch.__version__}); use --accelerator cpu or auto."
        )
    if name == "xla" and importlib.util.find_spec("torch_xla") is None:
        raise RuntimeError(
            "accelerator 'xla' needs torch-xla: run `make setup-xla` and use .venv-xla/bin/python "
            "(set PJRT_DEVICE=TPU on a TPU VM, PJRT_DEVICE=CPU to try it on a CPU)."
        )
    return name


def launch(main_func, args, accelerator):
    """Run ``main_func(args)`` once per device of ``accelerator`` (already resolved)."""
    if accelerator == "xla":
        os.environ.setdefault("PJRT_DEVICE", "TPU")
        import torch_xla

        # torch_xla.launch calls fn(index, *args): drop the index, each process
        # finds its own device through torch_xla.device().
        torch_xla.launch(_xla_entry, args=(main_func, args))
    elif accelerator == "cuda":
        detectron2_launch(
            main_func,
            args.num_gpus,
            num_machines=args.num_machines,
            machine_rank=args.machine_rank,
            dist_url=args.dist_url,
            args=(args,),
        )
    else:
        if args.num_gpus > 1 or args.num_machines > 1:
            logger.warning("--num-gpus/--num-machines are ignored on CPU: training in one process.")
        main_func(args)


def _xla_entry(index, main_func, args):
    main_func(args)
