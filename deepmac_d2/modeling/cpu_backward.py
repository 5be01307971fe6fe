"""The mask head's upsampling and logits in CPU training, with a backward that makes
fewer passes over memory than its layers' one by one (README, "Speed against the
reference"): the same gradients up to float rounding.

At the head's output size the tensors are large (64 ROIs x 256 channels x 28 x 28 is
51 MB) and the work per element is small, so the CPU time goes to reading and writing
them. The reference's TF graph fuses such passes; these functions remove them by hand.
Each applies only where its shortcut is exact; otherwise the modules themselves run.
"""
import torch
from torch import nn
from torch.autograd.function import once_differentiable
from torch.nn import functional as F

from .folded_conv_norm import _has_hooks

__all__ = ["upsample", "norm_relu_logits"]


def _autocast_on_cpu():
    """Whether CPU autocast (bfloat16 mixed precision) is on: the backwards below call
    ops that autocast does not cast, so the modules themselves run then."""
    try:
        return torch.is_autocast_enabled("cpu")
    except TypeError:  # PyTorch before 2.4
        return torch.is_autocast_cpu_enabled()


def _on_cpu_unwatched(x, *modules):
    """Whether ``modules`` run on a CPU tensor ``x`` (N x C x H x W) without autocast and
    without a hook that would see them."""
    return x.device.type == "cpu" and x.dim() == 4 and not _autocast_on_cpu() and not _has_hooks(*modules)


def upsample(deconv: nn.ConvTranspose2d, x):
    """``deconv(x)``; in CPU training, with :class:`_TransposedConv`'s backward where the
    kernel is as large as the stride."""
    if (
        not (torch.is_grad_enabled() and _on_cpu_unwatched(x, deconv))
        or tuple(deconv.kernel_size) != tuple(deconv.stride)
        or any(deconv.padding) or any(deconv.output_padding) or deconv.groups != 1
        or any(d != 1 for d in deconv.dilation)
    ):
        return deconv(x)
    return _TransposedConv.apply(x, deconv.weight, deconv.bias, tuple(deconv.stride))


def norm_relu_logits(norm: nn.Module, predictor: nn.Conv2d, x):
    """``predictor(relu(norm(x)))``; on the CPU, for a BatchNorm on batch statistics
    (training) and one logit channel (class-agnostic masks), through
    :class:`_BatchNormReLULogit`, with autograd or without (then the same forward, which
    the parity harness checks in train mode). No ROI: the layers (nn.BatchNorm2d takes an
    empty batch, native_batch_norm does not)."""
    if not (
        _on_cpu_unwatched(x, norm, predictor) and x.numel() > 0
        and type(norm) is nn.BatchNorm2d and norm.training and norm.affine
        and norm.track_running_stats
        and predictor.out_channels == 1 and predictor.bias is not None and predictor.groups == 1
        and tuple(predictor.kernel_size) + tuple(predictor.stride) == (1, 1, 1, 1)
        and not any(predictor.padding)
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
    """``conv_transpose2d(x, weight, bias, stride)`` with the kernel as large as the stride
    (the heads' 2 x 2, stride 2) and no padding, whose backward is one 1x1 conv's.

    Such a deconv paints non-overlapping tiles: output pixel (kh y + a, kw x + b) is input
    pixel (y, x) times tap (a, b), so it is the 1x1 conv from ``x`` to the tiles laid out
    as channels. The output gradient rearranged so (one copy), oneDNN's 1x1 kernels give
    the input, weight and bias gradients, where PyTorch's own backward runs its slower
    transposed-conv weight gradient and a separate bias sum: the same sums, the default
    head's training step 1.7 to 3.1% faster (same process, alternating, 2 threads).
    """

    @staticmethod
    def forward(ctx, x, weight, bias, stride):
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return F.conv_transpose2d(x, weight, bias, stride)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        needs_x, needs_weight = ctx.needs_input_grad[:2]
        needs_bias = ctx.has_bias and ctx.needs_input_grad[2]
        n, c_out, height, width = grad.shape
        c_in, _, kh, kw = weight.shape
        h, w = height // kh, width // kw
        # Channel (a, b, o) of tile (y, x) is grad[o, kh y + a, kw x + b]; channels-last.
        tiles = torch.empty(n, h, w, kh, kw, c_out, dtype=grad.dtype, device=grad.device)
        tiles.copy_(grad.permute(0, 2, 3, 1).view(n, h, kh, w, kw, c_out).permute(0, 1, 3, 2, 4, 5))
        tiles = tiles.view(n, h, w, kh * kw * c_out).permute(0, 3, 1, 2)
        # The 1x1 conv x -> tiles: weight [(a, b, o), i], bias[o] for every tap (a, b).
        tiled_weight = weight.permute(2, 3, 1, 0).reshape(kh * kw * c_out, c_in, 1, 1)
        grad_x = grad_weight = grad_bias = None
        if needs_x:
            grad_x = F.conv2d(tiles, tiled_weight.transpose(0, 1))
        if needs_weight or needs_bias:
            _, weight_tiles, bias_tiles = torch.ops.aten.convolution_backward(
                tiles, x, tiled_weight, [kh * kw * c_out], [1, 1], [0, 0], [1, 1], False, [0, 0], 1,
                [False, needs_weight, needs_bias],
            )
            if needs_weight:
                grad_weight = weight_tiles.view(kh, kw, c_out, c_in).permute(3, 2, 0, 1).contiguous()
            if needs_bias:
                grad_bias = bias_tiles.view(kh * kw, c_out).sum(0)
        return grad_x, grad_weight, grad_bias, None


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
        masked = torch.ops.aten.threshold_backward(grad.expand_as(y), y, 0)
        grad_x, sum_x_hat, sum_grad = torch.ops.aten.native_batch_norm_backward(
            masked, x, gamma * w, None, None, mean, invstd, True, ctx.eps,
            [ctx.needs_input_grad[0], True, True],
        )
        grad_weight = (gamma * sum_x_hat + beta * sum_grad).view_as(weight)
        return (grad_x, w * sum_x_hat, w * sum_grad, grad_weight, grad.sum().view(1),
                None, None, None, None)
