"""RoIAlign over rotated boxes, matching Detectron2's ``ROIAlignRotated`` kernels.

The conventions reproduced here (from ``ROIAlignRotated_cpu.cpp``):
- a RoI is ``(batch_index, x_center, y_center, width, height, angle_degrees)``;
  the center is scaled by ``spatial_scale`` and shifted by -0.5 (always the
  "aligned" pixel model: pixel i covers [i, i + 1));
- each output bin averages a ``grid_h x grid_w`` grid of bilinear samples, taken
  at the grid-cell centers in the box frame and rotated counter-clockwise by
  the angle about the box center; the grid is ``sampling_ratio`` per side, or
  ``ceil(bin size)`` per RoI when ``sampling_ratio <= 0``;
- a sample outside ``[-1, H] x [-1, W]`` contributes 0; one inside that range is
  clamped to the border pixels, as in Detectron2's and torchvision's RoIAlign.

RoIs are processed in groups that share a sampling grid, so that a few large
adaptive grids do not blow up the memory of all the others.
"""
import math

import torch

# Elements gathered at once ((RoIs x samples) x channels): bounds peak memory.
_GATHER_BUDGET = 1 << 24


def _sampling_grids(rois, spatial_scale, pooled_height, pooled_width, sampling_ratio):
    """Per-RoI (grid_h, grid_w), as integer tensors of shape (K,)."""
    if sampling_ratio > 0:
        grid = torch.full((rois.size(0),), sampling_ratio, dtype=torch.int64, device=rois.device)
        return grid, grid
    grid_h = torch.ceil(rois[:, 4] * spatial_scale / pooled_height).long()
    grid_w = torch.ceil(rois[:, 3] * spatial_scale / pooled_width).long()
    return grid_h, grid_w


def _bilinear_taps(
    rois, spatial_scale, pooled_height, pooled_width, grid_h, grid_w, height, width
):
    """Flat pixel indices and weights (each (4, K * PH * PW * gh * gw)) of the four
    bilinear neighbours of every sample of the K RoIs, which share one grid."""
    batch = rois[:, 0].long()
    center_x = rois[:, 1] * spatial_scale - 0.5
    center_y = rois[:, 2] * spatial_scale - 0.5
    roi_w = rois[:, 3] * spatial_scale
    roi_h = rois[:, 4] * spatial_scale
    theta = rois[:, 5] * (math.pi / 180.0)
    if (roi_w < 0).any() or (roi_h < 0).any():
        raise RuntimeError("ROIs in ROIAlignRotated do not have non-negative size!")

    def box_frame_offsets(size, pooled, grid):
        # (K, pooled * grid) sample offsets from the box center along one box axis.
        steps = torch.arange(pooled * grid, dtype=rois.dtype, device=rois.device)
        return -size[:, None] / 2 + (steps + 0.5) * (size / (pooled * grid))[:, None]

    yy = box_frame_offsets(roi_h, pooled_height, grid_h)[:, :, None]
    xx = box_frame_offsets(roi_w, pooled_width, grid_w)[:, None, :]
    cos, sin = torch.cos(theta)[:, None, None], torch.sin(theta)[:, None, None]
    y = yy * cos - xx * sin + center_y[:, None, None]
    x = yy * sin + xx * cos + center_x[:, None, None]

    inside = (y >= -1) & (y <= height) & (x >= -1) & (x <= width)
    y, x = y.clamp(min=0), x.clamp(min=0)
    y_low, x_low = y.floor().long(), x.floor().long()
    y_edge, x_edge = y_low >= height - 1, x_low >= width - 1
    y_low = torch.where(y_edge, torch.full_like(y_low, height - 1), y_low)
    x_low = torch.where(x_edge, torch.full_like(x_low, width - 1), x_low)
    y_high = torch.where(y_edge, y_low, y_low + 1)
    x_high = torch.where(x_edge, x_low, x_low + 1)
    ly = torch.where(y_edge, torch.zeros_like(y), y - y_low)
    lx = torch.where(x_edge, torch.zeros_like(x), x - x_low)
    hy, hx = 1 - ly, 1 - lx

    base = (batch * (height * width))[:, None, None]
    index = torch.stack(
        [
            base + y_low * width + x_low,
            base + y_low * width + x_high,
            base + y_high * width + x_low,
            base + y_high * width + x_high,
        ]
    )
    weight = torch.stack([hy * hx, hy * lx, ly * hx, ly * lx]) * inside
    # (4, K, PH * gh, PW * gw) -> (4, K, PH, PW, gh, gw), flattened in that order.
    shape = (4, rois.size(0), pooled_height, grid_h, pooled_width, grid_w)
    index = index.reshape(shape).permute(0, 1, 2, 4, 3, 5).reshape(4, -1)
    weight = weight.reshape(shape).permute(0, 1, 2, 4, 3, 5).reshape(4, -1)
    return index, weight


def _groups(rois, spatial_scale, pooled_height, pooled_width, sampling_ratio, channels):
    """Yield (roi indices, grid_h, grid_w) for chunks of RoIs that share a grid."""
    grid_h, grid_w = _sampling_grids(
        rois, spatial_scale, pooled_height, pooled_width, sampling_ratio
    )
    grids, which = torch.unique(torch.stack([grid_h, grid_w], dim=1), dim=0, return_inverse=True)
    for g, (gh, gw) in enumerate(grids.tolist()):
        if gh * gw == 0:
            continue  # no samples: the output stays 0 and no gradient flows
        members = (which == g).nonzero(as_tuple=True)[0]
        samples = pooled_height * pooled_width * gh * gw
        per_chunk = max(1, _GATHER_BUDGET // (samples * max(channels, 1)))
        for chunk in members.split(per_chunk):
            yield chunk, gh, gw


def roi_align_rotated_forward(
    input, rois, spatial_scale, pooled_height, pooled_width, sampling_ratio
):
    num_rois, channels = rois.size(0), input.size(1)
    height, width = input.shape[2:]
    output = input.new_zeros(num_rois, channels, pooled_height, pooled_width)
    if output.numel() == 0:
        return output
    # (N * H * W, C): one row per pixel, so a sample gathers whole channel rows.
    pixels = input.permute(0, 2, 3, 1).reshape(-1, channels)
    for chunk, gh, gw in _groups(
        rois, spatial_scale, pooled_height, pooled_width, sampling_ratio, channels
    ):
        index, weight = _bilinear_taps(
            rois[chunk], spatial_scale, pooled_height, pooled_width, gh, gw, height, width
        )
        values = sum(pixels[index[k]] * weight[k, :, None].to(input.dtype) for k in range(4))
        pooled = values.view(len(chunk), pooled_height, pooled_width, gh * gw, channels).mean(3)
        output[chunk] = pooled.permute(0, 3, 1, 2)
    return output


def roi_align_rotated_backward(
    grad,
    rois,
    spatial_scale,
    pooled_height,
    pooled_width,
    batch_size,
    channels,
    height,
    width,
    sampling_ratio,
):
    grad_input = grad.new_zeros(batch_size * height * width, channels)
    if grad.numel() == 0:
        return grad_input.view(batch_size, height, width, channels).permute(0, 3, 1, 2)
    for chunk, gh, gw in _groups(
        rois, spatial_scale, pooled_height, pooled_width, sampling_ratio, channels
    ):
        index, weight = _bilinear_taps(
            rois[chunk], spatial_scale, pooled_height, pooled_width, gh, gw, height, width
        )
        # Each bin's gradient is shared equally by its gh * gw samples.
        per_sample = (grad[chunk].permute(0, 2, 3, 1) / (gh * gw))[:, :, :, None, :]
        per_sample = per_sample.expand(-1, -1, -1, gh * gw, -1).reshape(-1, channels)
        for k in range(4):
            grad_input.index_add_(0, index[k], per_sample * weight[k, :, None].to(grad.dtype))
    return grad_input.view(batch_size, height, width, channels).permute(0, 3, 1, 2).contiguous()
