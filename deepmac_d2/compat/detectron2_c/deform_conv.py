"""Deformable convolution v1 and v2 in the calling convention of Detectron2's CUDA ops.

Detectron2 (``layers/deform_conv.py``) allocates the output and gradient tensors
itself and lets the compiled op fill them, so these functions write into the
buffers they are given and return nothing. The ``columns`` / ``ones`` scratch
buffers and ``im2col_step`` only tune the memory use of the CUDA im2col; here
torchvision batches internally, so they are accepted and not needed.

Offsets are laid out as Detectron2's kernels read them, which is also
torchvision's layout: ``(deformable_group, kh, kw, (dy, dx))`` along the channel
axis, the modulation mask as ``(deformable_group, kh, kw)``, and each deformable
group owns a contiguous block of input channels. torchvision infers ``groups``
and ``deformable_groups`` from the tensor shapes; the explicit arguments are
checked against them, as the CUDA op's ``shape_check`` does.
"""
import torch
from torchvision.ops import deform_conv2d


def _check_shapes(input, weight, offset, mask, kernel_hw, group, deformable_group):
    kh, kw = kernel_hw
    if tuple(weight.shape[2:]) != (kh, kw):
        raise RuntimeError(
            f"kernel size ({kh}, {kw}) does not match weight of shape {tuple(weight.shape)}"
        )
    if input.size(1) != weight.size(1) * group:
        raise RuntimeError(
            f"input has {input.size(1)} channels, weight expects {weight.size(1)} x {group} groups"
        )
    if offset.size(1) != deformable_group * 2 * kh * kw:
        raise RuntimeError(
            f"offset has {offset.size(1)} channels, expected {deformable_group} x 2 x {kh} x {kw}"
        )
    if mask is not None and mask.size(1) != deformable_group * kh * kw:
        raise RuntimeError(
            f"mask has {mask.size(1)} channels, expected {deformable_group} x {kh} x {kw}"
        )


def _conv(input, offset, weight, bias, mask, stride, padding, dilation):
    return deform_conv2d(
        input, offset, weight, bias, stride=stride, padding=padding, dilation=dilation, mask=mask
    )


def _conv_grads(grad_output, tensors, wrt, conv_args):
    """Gradients of torchvision's op with respect to the ``wrt`` entries of ``tensors``.

    Detectron2 calls the backward ops from inside ``autograd.Function.backward``,
    where grad mode is off, so it is switched back on around this one graph.
    """
    tensors = {name: t.detach() for name, t in tensors.items()}
    with torch.enable_grad():
        for name in wrt:
            tensors[name].requires_grad_()
        output = _conv(
            tensors["input"],
            tensors["offset"],
            tensors["weight"],
            tensors.get("bias"),
            tensors.get("mask"),
            **conv_args,
        )
        grads = torch.autograd.grad(output, [tensors[name] for name in wrt], grad_output)
    return dict(zip(wrt, grads))


def deform_conv_forward(
    input,
    weight,
    offset,
    output,
    columns,
    ones,
    kW,
    kH,
    dW,
    dH,
    padW,
    padH,
    dilationW,
    dilationH,
    group,
    deformable_group,
    im2col_step,
):
    _check_shapes(input, weight, offset, None, (kH, kW), group, deformable_group)
    with torch.no_grad():
        output.copy_(
            _conv(input, offset, weight, None, None, (dH, dW), (padH, padW), (dilationH, dilationW))
        )


def deform_conv_backward_input(
    input,
    offset,
    gradOutput,
    gradInput,
    gradOffset,
    weight,
    columns,
    kW,
    kH,
    dW,
    dH,
    padW,
    padH,
    dilationW,
    dilationH,
    group,
    deformable_group,
    im2col_step,
):
    """Adds the input gradient into ``gradInput`` (the CUDA col2im accumulates)
    and writes the offset gradient into ``gradOffset`` (col2im_coord assigns)."""
    _check_shapes(input, weight, offset, None, (kH, kW), group, deformable_group)
    conv_args = dict(stride=(dH, dW), padding=(padH, padW), dilation=(dilationH, dilationW))
    grads = _conv_grads(
        gradOutput,
        {"input": input, "offset": offset, "weight": weight},
        ("input", "offset"),
        conv_args,
    )
    gradInput.add_(grads["input"])
    gradOffset.copy_(grads["offset"])


def deform_conv_backward_filter(
    input,
    offset,
    gradOutput,
    gradWeight,
    columns,
    ones,
    kW,
    kH,
    dW,
    dH,
    padW,
    padH,
    dilationW,
    dilationH,
    group,
    deformable_group,
    scale,
    im2col_step,
):
    """Adds ``scale`` times the weight gradient into ``gradWeight``, as the CUDA
    op's ``addmm_(..., beta=1, alpha=scale)`` does."""
    _check_shapes(input, gradWeight, offset, None, (kH, kW), group, deformable_group)
    conv_args = dict(stride=(dH, dW), padding=(padH, padW), dilation=(dilationH, dilationW))
    # Detectron2 does not pass the weight: the output is linear in it, so the
    # weight gradient does not depend on its values and any tensor of its shape will do.
    grads = _conv_grads(
        gradOutput,
        {"input": input, "offset": offset, "weight": torch.zeros_like(gradWeight)},
        ("weight",),
        conv_args,
    )
    gradWeight.add_(grads["weight"], alpha=scale)


def modulated_deform_conv_forward(
    input,
    weight,
    bias,
    ones,
    offset,
    mask,
    output,
    columns,
    kernel_h,
    kernel_w,
    stride_h,
    stride_w,
    pad_h,
    pad_w,
    dilation_h,
    dilation_w,
    group,
    deformable_group,
    with_bias,
):
    _check_shapes(input, weight, offset, mask, (kernel_h, kernel_w), group, deformable_group)
    with torch.no_grad():
        output.copy_(
            _conv(
                input,
                offset,
                weight,
                bias if with_bias else None,
                mask,
                (stride_h, stride_w),
                (pad_h, pad_w),
                (dilation_h, dilation_w),
            )
        )


def modulated_deform_conv_backward(
    input,
    weight,
    bias,
    ones,
    offset,
    mask,
    columns,
    grad_input,
    grad_weight,
    grad_bias,
    grad_offset,
    grad_mask,
    grad_output,
    kernel_h,
    kernel_w,
    stride_h,
    stride_w,
    pad_h,
    pad_w,
    dilation_h,
    dilation_w,
    group,
    deformable_group,
    with_bias,
):
    """Accumulates into ``grad_input``, ``grad_weight`` and ``grad_bias`` and
    assigns ``grad_offset`` and ``grad_mask``, as the CUDA op does. Without a
    bias, Detectron2 passes a one-element placeholder that is left alone."""
    _check_shapes(input, weight, offset, mask, (kernel_h, kernel_w), group, deformable_group)
    tensors = {"input": input, "offset": offset, "mask": mask, "weight": weight}
    if with_bias:
        tensors["bias"] = bias
    conv_args = dict(
        stride=(stride_h, stride_w), padding=(pad_h, pad_w), dilation=(dilation_h, dilation_w)
    )
    grads = _conv_grads(grad_output, tensors, tuple(tensors), conv_args)
    grad_input.add_(grads["input"])
    grad_weight.add_(grads["weight"])
    grad_offset.copy_(grads["offset"])
    grad_mask.copy_(grads["mask"])
    if with_bias:
        grad_bias.add_(grads["bias"])
