"""BatchNorm folded into the layer before it, for a model that will only infer.

In eval mode a BatchNorm is a fixed affine map per channel, so the conv (or linear
layer) before it can absorb it: weight x gamma / sqrt(var + eps), bias shifted to
match. The reference gets this from TF's graph optimiser under ``tf.function``; here it
is one explicit call, since a folded model can no longer train (its norms are gone).
The arithmetic is PyTorch's own ``torch.nn.utils.fusion``; this module only finds the
pairs: ``[conv, norm, ...]`` runs inside an ``nn.Sequential`` (the hourglass's and
SpineNet's conv blocks, the default head's convs, the TF box head), Detectron2's
``Conv2d`` with its ``norm`` (the ResNet), and the pairs a module names in
``conv_norm_pairs`` (the mask heads' deconv and its norm).
"""
import logging

from detectron2.layers import Conv2d as NormConv2d
from detectron2.layers import FrozenBatchNorm2d
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_weights, fuse_linear_bn_weights

__all__ = ["fuse_for_inference"]

logger = logging.getLogger(__name__)

_FOLDABLE_NORMS = (nn.BatchNorm2d, nn.SyncBatchNorm, FrozenBatchNorm2d)
_FOLDING_LAYERS = (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)


def _foldable(layer, norm):
    if not isinstance(layer, _FOLDING_LAYERS) or not isinstance(norm, _FOLDABLE_NORMS):
        return False
    # A BatchNorm without running statistics normalises by the batch's, even in eval.
    return norm.running_mean is not None and norm.running_var is not None


def _fold(layer, norm):
    """Give ``layer`` the weight and bias of ``norm(layer(x))``."""
    args = (layer.weight, layer.bias, norm.running_mean, norm.running_var, norm.eps,
            norm.weight, norm.bias)
    if isinstance(layer, nn.Linear):
        weight, bias = fuse_linear_bn_weights(*args)
    else:
        weight, bias = fuse_conv_bn_weights(*args, transpose=isinstance(layer, nn.ConvTranspose2d))
    layer.weight, layer.bias = weight, bias


def fuse_for_inference(model: nn.Module) -> nn.Module:
    """Fold every BatchNorm (also SyncBN, FrozenBN) that directly follows a conv or
    linear layer into it, in place, and return ``model``.

    The outputs equal the unfused model's up to float rounding; the norms become
    ``nn.Identity`` (or ``None`` in Detectron2's ``Conv2d``), so state_dict keys of the
    norms disappear: fuse a copy if the model must still be saved or trained.
    """
    if model.training:
        raise ValueError(
            "fuse_for_inference folds the BatchNorms' running statistics, which training "
            "updates: call model.eval() first (and fuse a copy if it must train again)"
        )
    folded = 0
    for module in list(model.modules()):
        if isinstance(module, nn.Sequential):
            children = list(module.named_children())
            for (_, layer), (norm_name, norm) in zip(children, children[1:]):
                if _foldable(layer, norm):
                    _fold(layer, norm)
                    setattr(module, norm_name, nn.Identity())
                    folded += 1
        if isinstance(module, NormConv2d) and _foldable(module, module.norm):
            _fold(module, module.norm)
            module.norm = None
            folded += 1
        for layer_name, norm_name in getattr(module, "conv_norm_pairs", ()):
            layer, norm = getattr(module, layer_name), getattr(module, norm_name)
            if _foldable(layer, norm):
                _fold(layer, norm)
                setattr(module, norm_name, nn.Identity())
                folded += 1
    logger.info("fuse_for_inference: %d BatchNorms folded into the layers before them", folded)
    return model
