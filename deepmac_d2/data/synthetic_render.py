"""Render one synthetic scene: a cluttered background, then objects painted in
order, each later object occluding the earlier ones.

Everything random comes from one ``numpy.random.Generator``, so a scene is a
pure function of its generator's seed. Shapes are painted with PIL at
``SUPERSAMPLE`` times the image size and box-filtered down: the result is an
anti-aliased alpha used for compositing, and ``alpha >= 0.5`` is the object's
mask, so masks and pixels agree at the boundary.
"""
import numpy as np
from PIL import Image, ImageDraw

from .synthetic_shapes import shape_layers

SUPERSAMPLE = 4
# Placements tried before an object is left out of a scene.
_PLACEMENT_TRIES = 20
# Smallest visible instance kept, in pixels: anything smaller is noise to a detector.
_MIN_PIXELS = 24
# Smallest RGB distance (in [0, 1] units) between an object and what lies under it.
_MIN_CONTRAST = 0.3
_PATTERNS = ("solid", "stripes", "checker", "dots", "noise", "gradient")


def _colour(rng):
    return rng.uniform(0.0, 1.0, size=3)


def _rotated_coords(rng, size):
    """Pixel coordinates rotated by a random angle: patterns get a random orientation."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    theta = rng.uniform(0.0, np.pi)
    return xx * np.cos(theta) + yy * np.sin(theta), -xx * np.sin(theta) + yy * np.cos(theta)


def texture(rng, size, pattern):
    """A ``size x size x 3`` float image in [0, 1] filled with ``pattern`` in two random colours."""
    c1, c2 = _colour(rng), _colour(rng)
    u, v = _rotated_coords(rng, size)
    period = rng.uniform(3.0, 9.0)
    if pattern == "solid":
        w = np.zeros((size, size))
    elif pattern == "stripes":
        w = (np.floor(u / period) % 2).astype(np.float64)
    elif pattern == "checker":
        w = ((np.floor(u / period) + np.floor(v / period)) % 2).astype(np.float64)
    elif pattern == "dots":
        du, dv = (u % period) - period / 2, (v % period) - period / 2
        w = (du**2 + dv**2 < (0.3 * period) ** 2).astype(np.float64)
    elif pattern == "noise":
        w = rng.uniform(0.0, 1.0, size=(size, size))
    else:  # gradient
        w = (u - u.min()) / (u.max() - u.min())
    return c1 * (1.0 - w[..., None]) + c2 * w[..., None]


def _smooth_field(rng, size, cells):
    """Low-frequency colour noise: a ``cells x cells`` random grid upsampled bicubically."""
    grid = (rng.uniform(0.0, 1.0, size=(cells, cells, 3)) * 255).astype(np.uint8)
    return np.asarray(Image.fromarray(grid).resize((size, size), Image.BICUBIC), dtype=np.float64) / 255.0


def background(rng, size, clutter):
    """Smooth colour noise, a faint pattern and distractor strokes, more of each as ``clutter`` grows.

    Strokes are lines and arcs in object-like colours: they make "anything that
    is not background" a wrong rule for a mask head, without being objects.
    """
    img = _smooth_field(rng, size, int(rng.integers(2, 6)))
    # Less clutter also means calmer colours: pull the field towards its mean.
    img = img.mean(axis=(0, 1)) + (0.3 + 0.7 * clutter) * (img - img.mean(axis=(0, 1)))
    if clutter > 0 and rng.uniform() < clutter:
        pattern = texture(rng, size, str(rng.choice(_PATTERNS[1:])))
        img = (1.0 - 0.35 * clutter) * img + 0.35 * clutter * pattern
    canvas = Image.fromarray((img * 255).astype(np.uint8))
    draw = ImageDraw.Draw(canvas)
    for _ in range(int(round(clutter * rng.integers(3, 13)))):
        fill = tuple(int(c) for c in rng.integers(0, 256, size=3))
        width = int(rng.integers(1, 4))
        pts = rng.uniform(-0.1, 1.1, size=(int(rng.integers(2, 5)), 2)) * size
        if rng.uniform() < 0.6:
            draw.line([tuple(p) for p in pts], fill=fill, width=width, joint="curve")
        else:
            x0, y0 = pts[0]
            r = rng.uniform(0.1, 0.4) * size
            start = rng.uniform(0, 360)
            draw.arc([x0 - r, y0 - r, x0 + r, y0 + r], start, start + rng.uniform(60, 240), fill=fill, width=width)
    return np.asarray(canvas, dtype=np.float64) / 255.0


def _normalised_layers(rng, category_id):
    """The class's layers, centred on their filled extent and scaled to half-extent 1."""
    layers = shape_layers(category_id, rng)
    filled = np.concatenate([poly for poly, fill in layers if fill])
    lo, hi = filled.min(axis=0), filled.max(axis=0)
    centre, half = (lo + hi) / 2, (hi - lo).max() / 2
    return [((poly - centre) / half, fill) for poly, fill in layers]


def pose(layers, radius, angle, aspect):
    """The layers stretched by ``aspect``, rotated by ``angle`` and scaled to half-extent ``radius`` (pixels)."""
    scale = np.array([np.sqrt(aspect), 1.0 / np.sqrt(aspect)]) * radius
    rot = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    return [((poly * scale) @ rot.T, fill) for poly, fill in layers]


def paint_alpha(posed, size, centre):
    """Anti-aliased coverage in [0, 1] of posed layers translated to ``centre``."""
    s = SUPERSAMPLE
    canvas = Image.new("L", (size * s, size * s), 0)
    draw = ImageDraw.Draw(canvas)
    for poly, fill in posed:
        draw.polygon([tuple(p) for p in (poly + centre) * s], fill=255 * fill)
    return np.asarray(canvas.reduce(s), dtype=np.float64) / 255.0


def _propose(rng, cfg, placed, lo, hi):
    """A centre for a new object with extent ``[lo, hi]`` around it: next to a
    placed object with probability ``cfg.occlusion``, else anywhere."""
    size = cfg.image_size
    if placed and rng.uniform() < cfg.occlusion:
        other = placed[int(rng.integers(len(placed)))]
        direction = rng.uniform(0.0, 2 * np.pi)
        dist = rng.uniform(0.3, 0.9) * ((hi - lo).max() / 2 + other["radius"])
        centre = other["centre"] + dist * np.array([np.cos(direction), np.sin(direction)])
    else:
        centre = rng.uniform(0.0, size, size=2)
    # Keep the whole object inside the image, 1 pixel clear of the border:
    # truncation is not what this data tests.
    return np.clip(centre, 1 - lo, size - 1 - hi)


def render_scene(rng, cfg):
    """Draw one image and its instances.

    Returns ``(image, instances)``: an ``HxWx3`` uint8 array and a list of
    ``(category_id, visible_mask)`` in painting order, masks ``HxW`` bool and
    pairwise disjoint. A new object is re-placed (up to ``_PLACEMENT_TRIES``
    times, then dropped) if it would leave an earlier object with less than
    ``cfg.min_visible`` of its area visible: mostly hidden instances never
    exist, rather than existing unannotated.
    """
    size = cfg.image_size
    image = background(rng, size, cfg.clutter)
    placed = []
    lo, hi = cfg.objects_per_image
    for _ in range(int(rng.integers(lo, hi + 1))):
        category_id = int(rng.integers(1, cfg.num_classes + 1))
        layers = _normalised_layers(rng, category_id)
        aspect = np.exp(rng.uniform(-1.0, 1.0) * np.log(cfg.max_aspect))
        posed = pose(layers, rng.uniform(*cfg.size_range) * size / 2, rng.uniform(0.0, 2 * np.pi), aspect)
        points = np.concatenate([poly for poly, _ in posed])
        extent = (points.max(0) - points.min(0)).max()
        if extent > size - 2:  # stretched and rotated past the image: shrink to fit
            posed = [(poly * (size - 2) / extent, fill) for poly, fill in posed]
            points = points * (size - 2) / extent
        for _ in range(_PLACEMENT_TRIES):
            centre = _propose(rng, cfg, placed, points.min(0), points.max(0))
            alpha = paint_alpha(posed, size, centre)
            mask = alpha >= 0.5
            if mask.sum() >= _MIN_PIXELS and all(
                (p["visible"] & ~mask).sum() >= max(cfg.min_visible * p["area"], _MIN_PIXELS) for p in placed
            ):
                break
        else:
            continue
        pattern = str(rng.choice(_PATTERNS)) if cfg.textures else "solid"
        for _ in range(10):
            fill = texture(rng, size, pattern)
            if np.linalg.norm(fill[mask].mean(0) - image[mask].mean(0)) >= _MIN_CONTRAST:
                break
        image = image * (1.0 - alpha[..., None]) + fill * alpha[..., None]
        for p in placed:
            p["visible"] &= ~mask
        reach = min(extent, size - 2) / 2
        placed.append(dict(category_id=category_id, centre=centre, radius=reach, visible=mask.copy(), area=mask.sum()))
    image = image + rng.normal(0.0, 0.04 * cfg.clutter, size=image.shape)
    image = (np.clip(image, 0.0, 1.0) * 255).round().astype(np.uint8)
    return image, [(p["category_id"], p["visible"]) for p in placed]
