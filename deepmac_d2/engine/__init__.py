"""Training: the Trainer and ``setup()`` that ``train_net.py`` calls, the accelerator-aware
launcher (CUDA, CPU processes with gloo, torch-xla), and the opt-in speed-ups
(``torch.compile``, BatchNorm folding for evaluation).

The top of the package: may import ``config``, ``data``, ``modeling`` and ``evaluation``;
nothing in the plugin imports it.
"""
from .accelerator import ACCELERATORS, launch, resolve_accelerator
from .trainer import Trainer, load_config, requested_accelerator, setup

__all__ = ["ACCELERATORS", "Trainer", "launch", "load_config", "requested_accelerator",
           "resolve_accelerator", "setup"]
