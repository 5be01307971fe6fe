"""Intersection-over-union of rotated boxes, as Detectron2's ``box_iou_rotated``.

Boxes are ``(x_center, y_center, width, height, angle)`` with the angle in
degrees, counter-clockwise in a y-down image (Detectron2's convention). Like
Detectron2's kernel, the overlap polygon is built from the edge crossings of
the two rectangles plus the corners of each that lie inside the other; its
area is then taken in angular order around the polygon's centroid, which
orders the points of a convex polygon the way Detectron2's Graham scan does.
The result is float32, as Detectron2 returns it; boxes with an area below
1e-14 have an IoU of 0.

Pairs whose circumscribed circles do not meet cannot overlap and are skipped,
so the cost follows the number of nearby pairs rather than ``N * M``.
"""
import math

import torch

# Pairs handled at once: bounds the (pairs, 24, 2) float64 point tensors.
_PAIRS_PER_CHUNK = 1 << 15


def _corners(boxes):
    """Corners (..., 4, 2) in order around the rectangle."""
    theta = boxes[..., 4] * (math.pi / 180.0)
    cos, sin = torch.cos(theta), torch.sin(theta)
    # Half extents along the box's own axes, rotated into the image frame.
    half_w = torch.stack([cos, -sin], dim=-1) * (boxes[..., 2:3] / 2)
    half_h = torch.stack([sin, cos], dim=-1) * (boxes[..., 3:4] / 2)
    center = boxes[..., :2]
    return torch.stack(
        [
            center + half_w + half_h,
            center + half_w - half_h,
            center - half_w - half_h,
            center - half_w + half_h,
        ],
        dim=-2,
    )


def _cross(a, b):
    return a[..., 0] * b[..., 1] - a[..., 1] * b[..., 0]


def _inside(points, boxes):
    """Whether each of ``points`` (K, P, 2) lies in the box (K, 5), borders included."""
    theta = boxes[:, 4] * (math.pi / 180.0)
    cos, sin = torch.cos(theta)[:, None], torch.sin(theta)[:, None]
    d = points - boxes[:, None, :2]
    u = d[..., 0] * cos - d[..., 1] * sin
    v = d[..., 0] * sin + d[..., 1] * cos
    return (u.abs() <= boxes[:, None, 2] / 2) & (v.abs() <= boxes[:, None, 3] / 2)


def _intersection_area(boxes1, boxes2):
    """Overlap area of the aligned pairs ``boxes1[k]``, ``boxes2[k]`` (K, 5) in float64."""
    corners1, corners2 = _corners(boxes1), _corners(boxes2)
    edges1 = corners1.roll(-1, dims=1) - corners1
    edges2 = corners2.roll(-1, dims=1) - corners2

    # Crossing of edge i of box 1 with edge j of box 2: p1_i + t1 * e1_i = p2_j + t2 * e2_j.
    e1, e2 = edges1[:, :, None], edges2[:, None, :]
    p1, p2 = corners1[:, :, None], corners2[:, None, :]
    det = _cross(e2, e1)
    parallel = det.abs() <= 1e-14
    safe_det = torch.where(parallel, torch.ones_like(det), det)
    t1 = _cross(e2, p2 - p1) / safe_det
    t2 = _cross(e1, p2 - p1) / safe_det
    crossing_ok = ~parallel & (t1 >= 0) & (t1 <= 1) & (t2 >= 0) & (t2 <= 1)
    crossings = (p1 + e1 * t1[..., None]).flatten(1, 2)

    points = torch.cat([crossings, corners1, corners2], dim=1)  # (K, 24, 2)
    valid = torch.cat(
        [crossing_ok.flatten(1), _inside(corners1, boxes2), _inside(corners2, boxes1)], dim=1
    )

    count = valid.sum(dim=1, keepdim=True)
    centroid = (points * valid[..., None]).sum(dim=1) / count.clamp(min=1)
    rel = points - centroid[:, None]
    angle = torch.atan2(rel[..., 1], rel[..., 0])
    # Invalid points sort last and are then replaced by the first valid one,
    # so they add only zero-area triangles to the shoelace sum.
    angle = torch.where(valid, angle, torch.full_like(angle, 4.0))
    order = angle.argsort(dim=1)
    rel = rel.gather(1, order[..., None].expand_as(rel))
    valid = valid.gather(1, order)
    rel = torch.where(valid[..., None], rel, rel[:, :1])
    area = _cross(rel, rel.roll(-1, dims=1)).sum(dim=1).abs() / 2
    return torch.where(count.squeeze(1) > 2, area, torch.zeros_like(area))


def box_iou_rotated(boxes1, boxes2):
    n, m = boxes1.size(0), boxes2.size(0)
    ious = torch.zeros(n, m, dtype=torch.float64, device=boxes1.device)
    if n == 0 or m == 0:
        return ious.float()
    b1, b2 = boxes1.double(), boxes2.double()
    area1, area2 = b1[:, 2] * b1[:, 3], b2[:, 2] * b2[:, 3]
    radius1, radius2 = b1[:, 2:4].norm(dim=1) / 2, b2[:, 2:4].norm(dim=1) / 2
    distance = torch.cdist(b1[:, :2], b2[:, :2], compute_mode="donot_use_mm_for_euclid_dist")
    near = distance <= radius1[:, None] + radius2[None, :]
    near &= (area1[:, None] >= 1e-14) & (area2[None, :] >= 1e-14)
    rows, cols = near.nonzero(as_tuple=True)
    for r, c in zip(rows.split(_PAIRS_PER_CHUNK), cols.split(_PAIRS_PER_CHUNK)):
        inter = _intersection_area(b1[r], b2[c])
        ious[r, c] = inter / (area1[r] + area2[c] - inter)
    return ious.float()
