"""Pick the accelerator and start the training processes on it.

CUDA goes through Detectron2's own ``launch`` (DDP, one process per GPU), CPU through
the same ``launch`` or its gloo counterpart (:mod:`.distributed`, ``--num-gpus`` processes),
and XLA (TPU) through ``torch_xla.launch``, which starts one process per local device
the way torch-xla wants. The entry point stays the same ``main(args)`` on all three.
"""
import importlib.util
import os

import torch

from .distributed import check_process_request, launch_processes

ACCELERATORS = ("auto", "cuda", "cpu", "xla")


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
    """Run ``main_func(args)`` once per process of ``accelerator`` (already resolved).

    CUDA and CPU: ``--num-gpus`` processes per machine (:mod:`.distributed`). XLA: as many
    as ``torch_xla.launch`` finds devices.
    """
    if accelerator == "xla":
        check_process_request(args, accelerator)
        os.environ.setdefault("PJRT_DEVICE", "TPU")
        import torch_xla

        torch_xla.launch(_xla_entry, args=(main_func, args))
    else:
        launch_processes(main_func, args, accelerator)


def _xla_entry(index, main_func, args):
    # torch_xla.launch calls fn(index, *args): each process finds its own device
    # through torch_xla.device(), so the index is not needed.
    main_func(args)
