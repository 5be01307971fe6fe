"""Trainer and the accelerator-aware launcher (CUDA / CPU / XLA-TPU)."""
from .accelerator import ACCELERATORS, launch, resolve_accelerator
from .trainer import Trainer, load_config, requested_accelerator, setup

__all__ = ["ACCELERATORS", "Trainer", "launch", "load_config", "requested_accelerator",
           "resolve_accelerator", "setup"]
