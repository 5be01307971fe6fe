"""A pure-PyTorch ``detectron2._C`` for Detectron2 installs without compiled ops."""
import torch

IS_DEEPMAC_FALLBACK = True


def get_compiler_version():
    return "none (deepmac_d2 pure-PyTorch fallback)"


def get_cuda_version():
    return torch.version.cuda or "none"


def has_cuda():
    return False
