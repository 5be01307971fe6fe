"""Detectron2's test-time resize as graph ops, equal to Pillow's to the last bit.

Detectron2 resizes uint8 images with Pillow's bilinear filter (``ResizeTransform``), which
widens its support when it shrinks an image and works in fixed point, rounding to uint8
after each of its two passes (width, then height). torch's antialiased ``interpolate`` and
ONNX's ``Resize`` compute the same filter in floating point and round once: they differ
from Pillow by 1 on up to ~15% of the pixels of a shrunk image, which moves the edges of
the masks of a trained model by a few pixels (mask IoU ~0.96-0.99 against the eager model
on the test's images). Done here with Pillow's integer weights (computed in float64, summed
in int32, where every sum is exact), TorchScript and ONNX Runtime give Pillow's bytes.
Memory: a pass holds two int32 tensors of (taps x its output) values, taps = 2 ceil(shrink)
+ 1: resizing a 4000x3000 photo to 1024x768 peaks at ~0.8 GB (measured; 2 x 330 MB of it
in the first pass).
"""
import torch
from detectron2.layers.wrappers import shapes_to_tensor

__all__ = ["image_size", "resize_shortest_edge"]

# Pillow's resampling weights for 8-bit images are fixed point with 22 fraction bits.
_PRECISION_BITS = 22


def image_size(image: torch.Tensor) -> torch.Tensor:
    """(H, W) of an H x W x C image as a 1-D int64 tensor: traced, it follows the input."""
    return shapes_to_tensor([image.shape[0], image.shape[1]])


def _pil_bilinear_pass(x: torch.Tensor, out_size: torch.Tensor, dim: int) -> torch.Tensor:
    """Resize int32 ``x`` (values 0..255) along ``dim`` to ``out_size`` as Pillow's
    bilinear filter does: triangle weights widened by the shrink factor, renormalised at
    the borders, rounded to fixed point; the result rounded half up and clipped to uint8.

    A gather of each output's taps (window length from the scale), so the traced graph
    follows the sizes. Sizes are 1-element float64 tensors throughout: the ONNX exporter
    divides 0-dim traced sizes in float32, which rounds some weights the other way.
    """
    in_size = shapes_to_tensor([x.shape[dim]]).double()
    scale = in_size / out_size.reshape(1).double()
    support = torch.clamp(scale, min=1.0)
    center = (torch.arange(out_size.reshape(()), dtype=torch.float64) + 0.5) * scale
    first = torch.clamp(torch.floor(center - support + 0.5), min=0)
    taps = torch.arange((torch.ceil(support).long() * 2 + 1).reshape(()), dtype=torch.float64)
    index = first[:, None] + taps[None]  # out x taps
    weight = torch.clamp(1 - torch.abs((index + 0.5 - center[:, None]) / support), min=0)
    weight = weight * (index < in_size).double()
    weight = weight / weight.sum(1, keepdim=True)
    # Weights >= 0 summing to ~2**22: each output's sum stays below 2**31, so int32 holds
    # it exactly (and the gathered taps, the pass's largest tensor, take half of float64's).
    weight = torch.floor(weight * 2**_PRECISION_BITS + 0.5).int()
    index = torch.minimum(index, in_size - 1).long()
    gathered = torch.index_select(x, dim, index.flatten())
    gathered = gathered.unflatten(dim, (index.shape[0], index.shape[1]))  # ... out x taps ...
    weight = weight.reshape(weight.shape + (1,) * (x.dim() - dim - 1))
    total = (gathered * weight).sum(dim + 1, dtype=torch.int32)
    rounded = torch.div(total + 2 ** (_PRECISION_BITS - 1), 2**_PRECISION_BITS,
                        rounding_mode="floor")
    return torch.clamp(rounded, 0, 255)


def resize_shortest_edge(image: torch.Tensor, short_edge: int, max_size: int) -> torch.Tensor:
    """Detectron2's test-time ``ResizeShortestEdge`` of an H x W x 3 uint8 image ->
    3 x h x w float32 (whole values 0..255), size and values as Detectron2's.

    The size follows Detectron2's arithmetic step by step (short edge to ``short_edge``,
    long edge at most ``max_size``, rounded half up), in float64 1-D tensors so that a
    traced graph resizes any image. ``short_edge`` 0 keeps the image as it is.
    """
    x = image.permute(2, 0, 1).int()
    if short_edge <= 0:
        return x.float()
    size = image_size(image).double()
    short = size.min(0, keepdim=True).values
    new = torch.where(size == short, torch.full_like(size, short_edge),
                      size * (torch.full_like(short, short_edge) / short))
    longest = new.max(0, keepdim=True).values
    new = torch.where(longest > max_size, new * (torch.full_like(longest, max_size) / longest), new)
    new = torch.floor(new + 0.5).long()
    x = _pil_bilinear_pass(x, new[1], 2)
    x = _pil_bilinear_pass(x, new[0], 1)
    return x.float()
