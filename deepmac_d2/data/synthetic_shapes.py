"""The synthetic dataset's object classes: one shape generator per class, and the
seen/novel split.

Each generator draws one random instance of its class as a list of
``(polygon, fill)`` layers in a unit frame (roughly [-1, 1]^2): layers are
painted in order, ``fill=1`` adds area and ``fill=0`` cuts it (holes, bites).
Circles are polygons with many vertices, so one painter renders every class.
Within-class variety (thickness, number of points, bite depth, ...) is drawn
here; size, aspect, rotation and position are applied later by the scene.

The split mirrors DeepMAC's VOC/non-VOC protocol: masks are given for the
seen classes only, and the novel classes are different shapes from the same
families (convex, spiky, concave polygon, curved concave, with a hole), so a
mask head can only segment them well by having learned shape in general, not
the seen shapes themselves. Category ids alternate seen/novel, so taking the
first ``N`` classes (the ``num_classes`` knob) keeps the split balanced.
"""
import numpy as np

_CIRCLE_VERTICES = 64


def _circle(cx=0.0, cy=0.0, r=1.0, n=_CIRCLE_VERTICES):
    t = np.linspace(0.0, 2 * np.pi, n, endpoint=False)
    return np.stack([cx + r * np.cos(t), cy + r * np.sin(t)], axis=1)


def _radial(radii):
    """A closed polygon with vertex ``i`` at angle ``2*pi*i/n`` and radius ``radii[i]``."""
    t = np.linspace(0.0, 2 * np.pi, len(radii), endpoint=False) - np.pi / 2
    return np.stack([radii * np.cos(t), radii * np.sin(t)], axis=1)


def ellipse(rng):
    return [(_circle(), 1)]


def hexagon(rng):
    return [(_radial(np.ones(6)), 1)]


def triangle(rng):
    # Random angles with a minimum gap, so no triangle degenerates into a sliver.
    gaps = rng.dirichlet([4.0, 4.0, 4.0]) * 2 * np.pi
    t = np.cumsum(gaps)
    return [(np.stack([np.cos(t), np.sin(t)], axis=1), 1)]


def star(rng):
    points = int(rng.integers(5, 8))
    radii = np.tile([1.0, rng.uniform(0.35, 0.55)], points)
    return [(_radial(radii), 1)]


def gear(rng):
    # Trapezoid teeth on a disc with an axle hole: spiky like the star, but with
    # flat tips, many more teeth and a hole.
    teeth = int(rng.integers(8, 13))
    root = rng.uniform(0.68, 0.8)
    # Per tooth period: root, rising flank, flat tip, falling flank (trapezoid teeth).
    frac = np.tile([0.0, 0.2, 0.5, 0.7], teeth) + np.repeat(np.arange(teeth), 4)
    t = frac * (2 * np.pi / teeth)
    radii = np.tile([root, 1.0, 1.0, root], teeth)
    outline = np.stack([radii * np.cos(t), radii * np.sin(t)], axis=1)
    return [(outline, 1), (_circle(r=rng.uniform(0.18, 0.35)), 0)]


def cross(rng):
    w = rng.uniform(0.25, 0.45)
    return [
        (np.array([[-1, -w], [1, -w], [1, w], [-1, w]]), 1),
        (np.array([[-w, -1], [w, -1], [w, 1], [-w, 1]]), 1),
    ]


def l_shape(rng):
    w, h = rng.uniform(0.3, 0.6, size=2)
    pts = [[-1, -1], [-1 + 2 * w, -1], [-1 + 2 * w, 1 - 2 * h], [1, 1 - 2 * h], [1, 1], [-1, 1]]
    return [(np.array(pts, dtype=float), 1)]


def heart(rng):
    t = np.linspace(0.0, 2 * np.pi, _CIRCLE_VERTICES, endpoint=False)
    x = 16 * np.sin(t) ** 3
    y = -(13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t))
    return [(np.stack([x / 16.0, (y + 2.5) / 14.5], axis=1), 1)]


def arrow(rng):
    shaft = rng.uniform(0.15, 0.3)
    head_w = rng.uniform(0.6, 1.0)
    head_start = rng.uniform(0.0, 0.4)
    pts = [
        [-1, -shaft], [head_start, -shaft], [head_start, -head_w], [1, 0],
        [head_start, head_w], [head_start, shaft], [-1, shaft],
    ]
    return [(np.array(pts, dtype=float), 1)]


def ring(rng):
    return [(_circle(), 1), (_circle(r=rng.uniform(0.4, 0.7)), 0)]


def frame(rng):
    inner = rng.uniform(0.4, 0.7)
    square = np.array([[-1, -1], [1, -1], [1, 1], [-1, 1]], dtype=float)
    return [(square, 1), (square * inner, 0)]


def blob(rng):
    # A smooth random radius profile: low harmonics only, so it stays one piece.
    t = np.linspace(0.0, 2 * np.pi, _CIRCLE_VERTICES, endpoint=False)
    r = np.ones_like(t)
    for k in (2, 3, 4):
        r += rng.uniform(0.05, 0.22) * np.cos(k * t + rng.uniform(0, 2 * np.pi))
    return [(_radial(r / r.max()), 1)]


def crescent(rng):
    bite = rng.uniform(0.75, 0.95)
    shift = rng.uniform(0.35, 0.6)
    return [(_circle(), 1), (_circle(cx=shift, r=bite), 0)]


def horseshoe(rng):
    # A thick arc: an annulus with a wedge cut out of it.
    inner = rng.uniform(0.45, 0.65)
    gap = rng.uniform(0.5, 1.3)
    t = np.linspace(gap / 2, 2 * np.pi - gap / 2, _CIRCLE_VERTICES)
    outer_arc = np.stack([np.cos(t), np.sin(t)], axis=1)
    inner_arc = inner * outer_arc[::-1]
    return [(np.concatenate([outer_arc, inner_arc]), 1)]


# (id, name, generator, seen). Ids start at 1 (COCO) and alternate seen/novel.
CLASSES = [
    (1, "ellipse", ellipse, True),
    (2, "hexagon", hexagon, False),
    (3, "triangle", triangle, True),
    (4, "l_shape", l_shape, False),
    (5, "star", star, True),
    (6, "gear", gear, False),
    (7, "cross", cross, True),
    (8, "arrow", arrow, False),
    (9, "heart", heart, True),
    (10, "crescent", crescent, False),
    (11, "ring", ring, True),
    (12, "frame", frame, False),
    (13, "blob", blob, True),
    (14, "horseshoe", horseshoe, False),
]
CLASS_NAMES = [name for _, name, _, _ in CLASSES]
# Dataset (json) category ids; masks are given for SEEN_CLASSES only.
SEEN_CLASSES = [cid for cid, _, _, seen in CLASSES if seen]
NOVEL_CLASSES = [cid for cid, _, _, seen in CLASSES if not seen]
SEEN_CLASS_NAMES = [name for _, name, _, seen in CLASSES if seen]
NOVEL_CLASS_NAMES = [name for _, name, _, seen in CLASSES if not seen]


def shape_layers(category_id, rng):
    """One random instance of ``category_id`` as ``(polygon, fill)`` layers in the unit frame."""
    return CLASSES[category_id - 1][2](rng)
