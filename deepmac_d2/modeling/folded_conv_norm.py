"""Conv + BatchNorm (+ ReLU) whose inference runs as one conv, the BatchNorm folded in.

The reference runs under ``tf.function``, whose graph optimiser folds each inference
BatchNorm into its conv and fuses the ReLU; our eager layers paid for each separately
(README, "Speed against the reference"). SpineNet's BatchNorms alone were 12% of its
forward; folded, and on the CPU fused with the ReLU and a block's residual add into one
oneDNN op, its forward takes 0.56 to 0.59 of the layer-by-layer CPU time. The mask
heads fold theirs the same way (the hourglass's conv blocks, the default head's convs,
the deconv). Training, autograd, hooks and graph capture keep the layers.
"""
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules import module as _module_globals

__all__ = ["NormFolding", "FoldedConvNorm"]


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
# The same for a transposed conv (the mask heads' deconv).
_ONEDNN_DECONV = getattr(_ONEDNN_OPS, "_convolution_transpose_pointwise", None)
_ONEDNN_DECONV_WEIGHT = getattr(_ONEDNN_OPS, "_reorder_convolution_transpose_weight", None)


def _onednn(x):
    """Whether inference on ``x`` uses those ops: float32 on the CPU, oneDNN enabled."""
    return (
        x.device.type == "cpu" and x.dtype == torch.float32
        and None not in (_ONEDNN_CONV, _ONEDNN_CONV_, _ONEDNN_WEIGHT, _ONEDNN_DECONV, _ONEDNN_DECONV_WEIGHT)
        and torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled
    )


def _memory_format(x):
    """channels_last where ``x`` is laid out so (and not also contiguous), else contiguous."""
    if not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


def _foldable_norm(norm):
    """Whether ``norm`` folds into the conv before it: a BatchNorm with running statistics."""
    return isinstance(norm, nn.modules.batchnorm._BatchNorm) and norm.running_var is not None


class NormFolding:
    """Mixin for a module whose inference runs a conv (or transposed conv), the BatchNorm
    after it and a ReLU as one conv, the norm folded into the weight,
    w x gamma / sqrt(var + eps), and bias, beta - mean x gamma / sqrt(var + eps): the
    same function up to float rounding. Float32 on the CPU, that conv is one oneDNN op
    (see :data:`_ONEDNN_CONV`), which also applies the ReLU and a residual add, with the
    weight kept in oneDNN's layout. The folded weights are made once per input size and
    kept until a parameter or statistic changes (their version counters) or training
    starts (``train()``). Callers check :func:`_inference` and hooks first.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._folded = {}  # a conv's index -> (what it was made from, weight, bias)

    def train(self, mode=True):
        if mode:  # training changes the weights; eval() alone does not
            self._folded = {}
        return super().train(mode)

    def __getstate__(self):  # copies and pickles leave the folded weights behind
        return {**super().__getstate__(), "_folded": {}}

    def _folded_weights(self, index, conv, norm, x, padding, onednn):
        """``conv``'s weight and bias with ``norm`` (if any) folded in, for input ``x``."""
        tensors = (conv.weight, conv.bias) + (
            () if norm is None else (norm.weight, norm.bias, norm.running_mean, norm.running_var)
        )
        try:
            key = (norm and norm.eps, _memory_format(x), onednn and tuple(x.shape)) + tuple(
                None if t is None else (t.data_ptr(), t._version, t.dtype, t.device) for t in tensors
            )
        except RuntimeError:  # inference tensors (made in torch.inference_mode) have no version
            key = None
        folded = self._folded.get(index)
        if key is None or folded is None or folded[0] != key:
            transposed = isinstance(conv, nn.ConvTranspose2d)
            weight, bias = conv.weight, conv.bias
            if norm is not None:
                scale = torch.rsqrt(norm.running_var + norm.eps)
                if norm.weight is not None:
                    scale = scale * norm.weight
                shift = -norm.running_mean * scale
                if norm.bias is not None:
                    shift = shift + norm.bias
                bias = shift if bias is None else shift + bias * scale
                # Output channels: a conv's first weight dimension, a transposed conv's second.
                weight = weight * (scale[:, None, None] if transposed else scale[:, None, None, None])
            weight = weight.contiguous(memory_format=_memory_format(x))
            if onednn and transposed:
                weight = _ONEDNN_DECONV_WEIGHT(weight, padding, conv.output_padding, conv.stride,
                                               conv.dilation, conv.groups, x.shape)
            elif onednn:
                weight = _ONEDNN_WEIGHT(weight, padding, conv.stride, conv.dilation, conv.groups, x.shape)
            folded = self._folded[index] = (key, weight, bias)
        return folded[1:]

    def _folded_conv(self, index, conv, norm, relu, x, padding, residual=None, inplace=False):
        """ReLU(``conv`` (``norm`` folded in) + ``residual``), the ReLU if ``relu`` or a
        ``residual`` is given; ``x`` already padded as ``padding`` leaves to do;
        ``inplace``: ``residual`` is a temporary the caller no longer needs, which may be
        overwritten. ``index`` names the conv in this module's cache."""
        relu = relu or residual is not None
        onednn = _onednn(x)
        weight, bias = self._folded_weights(index, conv, norm, x, padding, onednn)
        transposed = isinstance(conv, nn.ConvTranspose2d)
        if onednn:
            x = x.contiguous(memory_format=_memory_format(x))
            post = "relu" if relu and residual is None else "none"  # with a residual: below
            if transposed:
                y = _ONEDNN_DECONV(x, weight, bias, padding, conv.output_padding, conv.stride,
                                   conv.dilation, conv.groups, post, [], "")
            elif residual is not None and inplace and residual.is_contiguous(memory_format=_memory_format(x)):
                # Into the residual: no new tensor. (Into a new one, oneDNN's add is slower
                # than the separate add and ReLU below.)
                return _ONEDNN_CONV_.binary(residual, x, weight, bias, padding, conv.stride,
                                            conv.dilation, conv.groups, "add", 1.0, "relu", [], None)
            else:
                y = _ONEDNN_CONV(x, weight, bias, padding, conv.stride, conv.dilation, conv.groups,
                                 post, [], "")
            if residual is None:
                return y
        elif transposed:
            y = F.conv_transpose2d(x, weight, bias, conv.stride, padding, conv.output_padding,
                                   conv.groups, conv.dilation)
        else:
            y = F.conv2d(x, weight, bias, conv.stride, padding, conv.dilation, conv.groups)
        if residual is not None:
            y += residual
        return F.relu_(y) if relu else y


class FoldedConvNorm(NormFolding, nn.Sequential):
    """Convs, each with an optional BatchNorm and ReLU after it (``[conv, norm, ReLU]``,
    or several such in a row: the default mask head's stack), whose inference runs each
    conv, norm and ReLU as one conv (:class:`NormFolding`). Norms other than BatchNorm,
    other layers, and hooks on any layer (the weight converter's call-order hooks) run the
    layers one by one, as training and autograd always do. SpineNet's ConvNorm and the
    hourglass's ConvBlock are these.
    """

    def pad(self, x, conv):
        """``x`` and the padding left to ``conv``: here the conv's own (symmetric)."""
        return x, conv.padding

    def _foldable(self):
        """``(conv, norm or None, ReLU after it)`` per conv, or None where a layer does not
        fit that pattern or is hooked."""
        layers, groups = list(self._modules.values()), []
        if _has_hooks(*layers):
            return None
        while layers:
            conv = layers.pop(0)
            if not isinstance(conv, nn.Conv2d) or conv.padding_mode != "zeros":
                return None
            norm = None
            if layers and not isinstance(layers[0], (nn.Conv2d, nn.ReLU)):
                norm = layers.pop(0)
                if not _foldable_norm(norm):
                    return None
            relu = bool(layers) and isinstance(layers[0], nn.ReLU)
            if relu:
                layers.pop(0)
            groups.append((conv, norm, relu))
        return groups

    def forward(self, x, residual=None, inplace=False):
        """With ``residual`` (inference only): ReLU(last conv, norm + ``residual``);
        ``inplace``: ``residual`` is a temporary the caller no longer needs, which it may
        overwrite."""
        groups = self._foldable() if _inference(self) else None
        if not groups:
            y = super().forward(x)
            return y if residual is None else F.relu_(y + residual)
        for index, (conv, norm, relu) in enumerate(groups):
            last = index == len(groups) - 1
            x, padding = self.pad(x, conv)
            x = self._folded_conv(index, conv, norm, relu, x, padding,
                                  residual if last else None, inplace)
        return x
