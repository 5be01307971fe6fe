"""The mask head's last layers on the CPU (upsampling deconv, norm, ReLU, predictor),
computed on the deconv's output tiles and with backwards that make fewer passes over
memory than the layers' one by one (README, "Speed against the reference"): the same
outputs and gradients up to float rounding.

At the head's output size the tensors are large (64 ROIs x 256 channels x 28 x 28 is
51 MB) and the work per element is small, so the CPU time goes to reading and writing
them. The reference's TF graph fuses such passes; these functions remove them by hand.
Each applies only where its shortcut is exact; otherwise the modules themselves run.
"""
import torch
from detectron2.layers import FrozenBatchNorm2d
from torch import nn
from torch.autograd.function import once_differentiable
from torch.nn import functional as F

from .folded_conv_norm import _capturing, _has_hooks

__all__ = ["upsample_to_logits"]

# Norms that act per channel over all pixels and ROIs alike, so they may see the
# deconv's output as tiles (see upsample_to_logits); not GroupNorm (per ROI).
_PER_CHANNEL_NORMS = (nn.modules.batchnorm._BatchNorm, FrozenBatchNorm2d, nn.Identity)


def _autocast_on_cpu():
    """Whether CPU autocast (bfloat16 mixed precision) is on: the functions below call
    ops that autocast does not cast, so the modules themselves run then."""
    try:
        return torch.is_autocast_enabled("cpu")
    except TypeError:  # PyTorch before 2.4
        return torch.is_autocast_cpu_enabled()


def _is_1x1(conv):
    """Whether ``conv`` maps each pixel on its own (a 1x1 kernel, stride 1, no padding)."""
    return (
        tuple(conv.kernel_size) + tuple(conv.stride) == (1, 1, 1, 1) and not any(conv.padding)
        and conv.groups == 1
    )


def upsample_to_logits(deconv: nn.ConvTranspose2d, norm: nn.Module, predictor: nn.Conv2d, x):
    """``predictor(relu(norm(deconv(x))))``, on the CPU for a deconv whose kernel is as
    large as its stride and a per-channel norm, on tiles; without autocast, hooks or
    graph capture (exported graphs keep the layers).

    Such a deconv paints non-overlapping tiles: output pixel (kh y + a, kw x + b) is input
    pixel (y, x) times tap (a, b). The n x C x (h kh) x (w kw) output, stored tile by tile
    (channels-last within each), is a channels-last batch of n h w images of kh x kw, and
    a 1x1 conv's output from ``x`` (:class:`_TransposedConv`). Per-channel norm, ReLU and
    the 1x1 predictor take that batch as they would the image, and only the logits (one
    or a few channels) are put back in place: no copy of the large tensors either way,
    and the deconv's forward a 1x1 conv's (5% faster). Its BatchNorm in training, with
    one logit channel, runs as :class:`_BatchNormReLULogit`.
    """
    if not (
        x.device.type == "cpu" and x.dim() == 4 and x.numel() > 0 and not _autocast_on_cpu()
        and not _has_hooks(deconv, norm, predictor) and not _capturing()
        and tuple(deconv.kernel_size) == tuple(deconv.stride) and not any(deconv.padding)
        and not any(deconv.output_padding) and deconv.groups == 1
        and all(d == 1 for d in deconv.dilation) and deconv.bias is not None
        and isinstance(norm, _PER_CHANNEL_NORMS) and _is_1x1(predictor)
    ):
        return predictor(F.relu_(norm(deconv(x))))
    n, _, h, w = x.shape
    kh, kw = deconv.stride
    tiles = _TransposedConv.apply(x, deconv.weight, deconv.bias)
    logits = _norm_relu_logits(norm, predictor, tiles)
    # Logit (k, a, b) of tile (y, x) to pixel (kh y + a, kw x + b).
    k = logits.shape[1]
    logits = logits.permute(0, 2, 3, 1).reshape(n, h, w, kh, kw, k).permute(0, 5, 1, 3, 2, 4)
    return logits.reshape(n, k, h * kh, w * kw)


def _norm_relu_logits(norm, predictor, x):
    """``predictor(relu(norm(x)))``; for a BatchNorm on batch statistics (training) and
    one logit channel (class-agnostic masks), as :class:`_BatchNormReLULogit`."""
    if not (
        type(norm) is nn.BatchNorm2d and norm.training and norm.affine and norm.track_running_stats
        and predictor.out_channels == 1 and predictor.bias is not None
    ):
        # The ReLU in place: the norm's backward needs its input, not its output (1% of
        # the default head's forward+backward CPU time).
        return predictor(F.relu_(norm(x)))
    # nn.BatchNorm2d's bookkeeping: count the batch; its weight in the moving averages.
    norm.num_batches_tracked.add_(1)
    factor = norm.momentum if norm.momentum is not None else 1.0 / float(norm.num_batches_tracked)
    return _BatchNormReLULogit.apply(
        x, norm.weight, norm.bias, predictor.weight, predictor.bias,
        norm.running_mean, norm.running_var, factor, norm.eps,
    )


class _TransposedConv(torch.autograd.Function):
    """``conv_transpose2d(x, weight, bias)`` with stride = kernel size (kh, kw), as tiles:
    the N h w x C x kh x kw channels-last view of the 1x1 conv from ``x`` to kh kw C
    channels (tap (a, b), channel o: ``weight[:, o, a, b]``, ``bias[o]``).

    Its backward takes the gradient in that layout (a view, as the layers after it give
    it) and runs oneDNN's 1x1 kernels for the input, weight and bias gradients, where
    PyTorch's own deconv backward runs its slower transposed-conv weight gradient and a
    separate bias sum (the default head's training step 1.7 to 3.1% faster, and with the
    tiles kept as the layers' layout, no copy of the gradient either: README).
    """

    @staticmethod
    def forward(ctx, x, weight, bias):
        c_in, c_out, kh, kw = weight.shape
        n, _, h, w = x.shape
        tiled_weight = weight.permute(2, 3, 1, 0).reshape(kh * kw * c_out, c_in, 1, 1)
        tiles = F.conv2d(x.contiguous(memory_format=torch.channels_last), tiled_weight, bias.repeat(kh * kw))
        ctx.save_for_backward(x, tiled_weight)
        ctx.shape = (n, h, w, kh, kw, c_out)
        images = tiles.permute(0, 2, 3, 1).reshape(n * h * w, kh, kw, c_out).permute(0, 3, 1, 2)
        # Detached: not a view to autograd (of a tensor no one else holds), so the layers
        # after it may work in place (the ReLU without a norm).
        return images.detach()

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        x, tiled_weight = ctx.saved_tensors
        n, h, w, kh, kw, c_out = ctx.shape
        needs_x, needs_weight, needs_bias = ctx.needs_input_grad
        # Back to n x (kh kw C) x h x w channels-last: a view if ``grad`` is stored so.
        tiles = grad.permute(0, 2, 3, 1).reshape(n, h, w, kh * kw * c_out).permute(0, 3, 1, 2)
        grad_x = grad_weight = grad_bias = None
        if needs_x:
            grad_x = F.conv2d(tiles, tiled_weight.transpose(0, 1))
        if needs_weight or needs_bias:
            _, weight_tiles, bias_tiles = torch.ops.aten.convolution_backward(
                tiles, x, tiled_weight, [tiled_weight.shape[0]], [1, 1], [0, 0], [1, 1], False,
                [0, 0], 1, [False, needs_weight, needs_bias],
            )
            if needs_weight:
                grad_weight = weight_tiles.view(kh, kw, c_out, -1).permute(3, 2, 0, 1).contiguous()
            if needs_bias:
                grad_bias = bias_tiles.view(kh * kw, c_out).sum(0)
        return grad_x, grad_weight, grad_bias


class _BatchNormReLULogit(torch.autograd.Function):
    """``conv2d(relu(batch_norm(x)), weight, bias)``: BatchNorm in training (batch
    statistics; the moving averages updated with ``factor``), then a 1x1 conv to one
    channel, whose backward is the BatchNorm's alone plus one masking pass.

    With one output channel, the conv's input gradient is ``grad`` times ``weight[c]`` per
    channel c. A per-channel factor passes through BatchNorm's backward like its scale
    ``gamma``, so the BatchNorm backward with scale ``gamma * weight`` takes
    ``grad * (y > 0)`` (one pass over the ReLU's output ``y``) directly; the layers' own
    backward writes the conv's input gradient and masks it, two passes more. Its sums,
    S1 = sum(grad * (y > 0)) and S2 = sum(grad * (y > 0) * x_hat) per channel, give the
    rest: gamma's and beta's gradients ``weight * S2`` and ``weight * S1``, and the conv
    weight's, sum(grad * y) = ``gamma * S2 + beta * S1`` since y = (y > 0)(gamma x_hat +
    beta). The default head's training step: 1.5 to 2% less time (README).
    """

    @staticmethod
    def forward(ctx, x, gamma, beta, weight, bias, running_mean, running_var, factor, eps):
        y, mean, invstd = torch.native_batch_norm(x, gamma, beta, running_mean, running_var, True, factor, eps)
        y = F.relu_(y)
        ctx.save_for_backward(x, y, gamma, beta, weight, mean, invstd)
        ctx.eps = eps
        return F.conv2d(y, weight, bias)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        x, y, gamma, beta, weight, mean, invstd = ctx.saved_tensors
        w = weight.view(-1)
        masked = torch.ops.aten.threshold_backward.grad_input(
            grad.expand_as(y), y, 0, grad_input=torch.empty_like(y))  # y's layout, for the norm
        grad_x, sum_x_hat, sum_grad = torch.ops.aten.native_batch_norm_backward(
            masked, x, gamma * w, None, None, mean, invstd, True, ctx.eps,
            [ctx.needs_input_grad[0], True, True],
        )
        grad_weight = (gamma * sum_x_hat + beta * sum_grad).view_as(weight)
        return (grad_x, w * sum_x_hat, w * sum_grad, grad_weight, grad.sum().view(1),
                None, None, None, None)
