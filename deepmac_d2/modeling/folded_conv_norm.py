"""Conv + BatchNorm (+ ReLU) whose inference runs as one conv, the BatchNorm folded in.

SpineNet's inference path (README, "Speed against the reference"): BatchNorm alone was
12% of SpineNet-49's forward; folded into the conv, and on the CPU fused with the ReLU
and a block's residual add into one oneDNN op, the forward takes 0.56 to 0.59 of the
layer-by-layer CPU time. Training, autograd, hooks and graph capture keep the layers.
"""
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules import module as _module_globals

__all__ = ["FoldedConvNorm"]


def _capturing():
    """Whether the call is being traced, scripted or compiled into a graph (TorchScript
    export, ONNX, torch.compile): then the layers run one by one, so the graph keeps the
    parameters (not a folded copy cached from an earlier call) and only standard ops."""
    compiling = getattr(getattr(torch, "compiler", None), "is_compiling", None)
    return (
        torch.jit.is_tracing() or torch.jit.is_scripting()
        or (compiling is not None and compiling())
        or torch.onnx.is_in_onnx_export()
    )


def _inference(module):
    """Whether ``module`` runs for inference only: eval mode without autograd
    (``torch.no_grad`` or ``torch.inference_mode``, as Detectron2 runs inference), and
    not captured into a graph (:func:`_capturing`)."""
    return not module.training and not torch.is_grad_enabled() and not _capturing()


def _has_hooks(*modules):
    """Whether a forward hook would see ``modules`` (or any module) run."""
    return any(m._forward_hooks or m._forward_pre_hooks for m in modules) or bool(
        getattr(_module_globals, "_global_forward_hooks", None)
        or getattr(_module_globals, "_global_forward_pre_hooks", None)
    )


def _hook_free(module):
    """Whether no forward hook sees ``module`` or any module in it run: then no one but
    ``module`` sees the tensors between its layers, which may be overwritten once used."""
    return not _has_hooks(*module.modules())


# PyTorch's oneDNN conv ops behind torch.compile's CPU conv fusions: a conv that adds
# its bias and applies a ReLU as it writes its output, one that adds it into a given
# residual tensor, and the weight reordered once into the layout oneDNN computes with.
# Absent without oneDNN or before PyTorch 2.
_ONEDNN_OPS = getattr(torch.ops, "mkldnn", None)
_ONEDNN_CONV = getattr(_ONEDNN_OPS, "_convolution_pointwise", None)
_ONEDNN_CONV_ = getattr(_ONEDNN_OPS, "_convolution_pointwise_", None)
_ONEDNN_WEIGHT = getattr(_ONEDNN_OPS, "_reorder_convolution_weight", None)


def _onednn(x):
    """Whether inference on ``x`` uses those ops: float32 on the CPU, oneDNN enabled."""
    return (
        x.device.type == "cpu" and x.dtype == torch.float32
        and None not in (_ONEDNN_CONV, _ONEDNN_CONV_, _ONEDNN_WEIGHT)
        and torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled
    )


def _memory_format(x):
    """channels_last where ``x`` is laid out so (and not also contiguous), else contiguous."""
    if not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


class FoldedConvNorm(nn.Sequential):
    """``[conv, norm (, ReLU)]`` whose inference folds the norm into the conv.

    Inference (:func:`_inference`) runs it as one conv, the BatchNorm folded into its
    weight, w x gamma / sqrt(var + eps), and bias, beta - mean x gamma / sqrt(var + eps):
    the same function up to float rounding. Float32 on the CPU, that conv is one oneDNN
    op (see :data:`_ONEDNN_CONV`), which also applies the ReLU and a block's residual add,
    with the weight kept in oneDNN's layout. The folded weight is made once per input
    size and kept until a parameter or statistic changes (their version counters) or
    training starts (``train()``). Training, autograd, norms other than BatchNorm, and
    hooks on the conv or norm (the weight converter's call-order hooks) run the layers
    one by one, as always. SpineNet's ConvNorm is one.
    """

    def __init__(self, *layers):
        super().__init__(*layers)
        self._folded = None  # (what it was made from, weight, bias)

    def pad(self, x):
        """``x`` and the padding left to the conv: here the conv's own (symmetric)."""
        return x, self[0].padding

    def train(self, mode=True):
        if mode:  # training changes the weights; eval() alone does not
            self._folded = None
        return super().train(mode)

    def __getstate__(self):  # copies and pickles leave the folded weight behind
        return {**super().__getstate__(), "_folded": None}

    def _folded_weights(self, conv, norm, x, padding, onednn):
        """The conv's weight and bias with ``norm`` folded in, for input ``x``."""
        tensors = (conv.weight, conv.bias, norm.weight, norm.bias, norm.running_mean, norm.running_var)
        try:
            key = (norm.eps, _memory_format(x), onednn and tuple(x.shape)) + tuple(
                None if t is None else (t.data_ptr(), t._version, t.dtype, t.device) for t in tensors
            )
        except RuntimeError:  # inference tensors (made in torch.inference_mode) have no version
            key = None
        if key is None or self._folded is None or self._folded[0] != key:
            scale = torch.rsqrt(norm.running_var + norm.eps)
            if norm.weight is not None:
                scale = scale * norm.weight
            bias = -norm.running_mean * scale
            if norm.bias is not None:
                bias = bias + norm.bias
            if conv.bias is not None:
                bias = bias + conv.bias * scale
            weight = (conv.weight * scale[:, None, None, None]).contiguous(memory_format=_memory_format(x))
            if onednn:
                weight = _ONEDNN_WEIGHT(weight, padding, conv.stride, (1, 1), 1, x.shape)
            self._folded = (key, weight, bias)
        return self._folded[1:]

    def forward(self, x, residual=None, inplace=False):
        """With ``residual`` (inference only): ReLU(conv, norm + ``residual``); ``inplace``:
        ``residual`` is a temporary the caller no longer needs, which it may overwrite."""
        layers = list(self._modules.values())
        conv, norm = layers[0], layers[1] if len(layers) > 1 else None
        if not (
            _inference(self) and isinstance(norm, nn.modules.batchnorm._BatchNorm)
            and norm.running_var is not None and not _has_hooks(conv, norm)
        ):
            y = super().forward(x)
            return y if residual is None else F.relu_(y + residual)
        relu = residual is not None or isinstance(layers[-1], nn.ReLU)
        x, padding = self.pad(x)
        onednn = _onednn(x)
        weight, bias = self._folded_weights(conv, norm, x, padding, onednn)
        if not onednn:
            y = F.conv2d(x, weight, bias, conv.stride, padding)
        else:
            x = x.contiguous(memory_format=_memory_format(x))
            args = (weight, bias, padding, conv.stride, (1, 1), 1)
            if residual is None:
                return _ONEDNN_CONV(x, *args, "relu" if relu else "none", [], "")
            if inplace and residual.is_contiguous(memory_format=_memory_format(x)):
                # Into the residual: no new tensor. (Into a new one, oneDNN's add is slower
                # than the separate add and ReLU below.)
                return _ONEDNN_CONV_.binary(residual, x, *args, "add", 1.0, "relu", [], None)
            y = _ONEDNN_CONV(x, *args, "none", [], "")
        if residual is not None:
            y += residual
        return F.relu_(y) if relu else y
