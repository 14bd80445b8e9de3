"""Judge a picture against its shapes-world caption from pixel statistics alone (no learned weights).

`read_scene` recovers what a picture shows:
  background  the palette colour nearest the median of the outer 2-pixel ring, provided most of the ring is close
              to that median (a uniform background);
  colour      the palette colour (other than the background's) that most clearly-not-background pixels are nearest;
  shape       pixels nearer that colour than the background form a mask; its largest 4-connected component is
              compared (intersection over union) with a circle, a square and a point-up triangle drawn into the
              component's bounding box, and the best fit is taken when its IoU and the box's aspect ratio fit.
Anything it cannot read is "unknown", which never matches a caption. `score` says whether a picture matches its
caption; `caption_accuracy` and `agreement` (PSNR and mean absolute error between two models' pictures of the same
prompts and seeds) are the figures the demo and the ablation report.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

from koala.shapes.world import COLOURS, RESOLUTION, SHAPES, parse_caption

PALETTE_NAMES = tuple(COLOURS)
PALETTE = np.array([COLOURS[c] for c in PALETTE_NAMES], dtype=np.float32)
UNKNOWN = "unknown"
BACKGROUND_TOLERANCE = 90.0  # RGB distance: a ring pixel this close to the ring median counts as background
BACKGROUND_UNIFORM = 0.6  # share of ring pixels that must be background
FOREGROUND_DISTANCE = 90.0  # a pixel this far from the background colour is clearly something else
MIN_AREA = 0.02  # the shape's component covers at least this share of the picture
MIN_IOU = 0.7  # the best template must overlap the component at least this much
ASPECT = {"circle": 1.0, "square": 1.0, "triangle": math.sqrt(3) / 1.5}  # bounding-box width / height
ASPECT_TOLERANCE = 1.3  # allowed factor either way


@dataclass(frozen=True)
class Scene:
    """What a picture shows, as read from its pixels ("unknown" where it could not be read)."""

    shape: str
    colour: str
    background: str
    iou: float = 0.0  # overlap of the shape's component with the best template


def _to_array(image: Image.Image) -> np.ndarray:
    """RGB float pixels at the world's resolution."""
    image = image.convert("RGB")
    if image.size != (RESOLUTION, RESOLUTION):
        image = image.resize((RESOLUTION, RESOLUTION), Image.Resampling.BILINEAR)
    return np.asarray(image, dtype=np.float32)


def _nearest(rgb: np.ndarray) -> np.ndarray:
    """Index of the nearest palette colour for each RGB row."""
    return np.linalg.norm(rgb[..., None, :] - PALETTE, axis=-1).argmin(-1)


def largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest 4-connected component of a boolean mask (empty when the mask is)."""
    labels = np.zeros(mask.shape, dtype=np.int32)
    best, best_size, current = 0, 0, 0
    h, w = mask.shape
    for y0, x0 in zip(*np.nonzero(mask)):
        if labels[y0, x0]:
            continue
        current += 1
        labels[y0, x0], stack, size = current, [(y0, x0)], 0
        while stack:
            y, x = stack.pop()
            size += 1
            for ny, nx in ((y - 1, x), (y + 1, x), (y, x - 1), (y, x + 1)):
                if 0 <= ny < h and 0 <= nx < w and mask[ny, nx] and not labels[ny, nx]:
                    labels[ny, nx] = current
                    stack.append((ny, nx))
        if size > best_size:
            best, best_size = current, size
    return labels == best if best else np.zeros_like(mask)


def template(shape: str, box: tuple[int, int, int, int], size: int = RESOLUTION) -> np.ndarray:
    """A boolean mask of `shape` drawn to fill the pixel box (x0, y0, x1, y1), inclusive."""
    x0, y0, x1, y1 = box
    canvas = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(canvas)
    if shape == "circle":
        draw.ellipse((x0, y0, x1, y1), fill=1)
    elif shape == "square":
        draw.rectangle((x0, y0, x1, y1), fill=1)
    else:
        draw.polygon([((x0 + x1) / 2, y0), (x1, y1), (x0, y1)], fill=1)
    return np.asarray(canvas, dtype=bool)


def _classify(component: np.ndarray) -> tuple[str, float]:
    """Best-fitting shape of a component (by template IoU and box aspect), or unknown."""
    ys, xs = np.nonzero(component)
    box = (int(xs.min()), int(ys.min()), int(xs.max()), int(ys.max()))
    aspect = (box[2] - box[0] + 1) / (box[3] - box[1] + 1)
    fits = {}
    for shape in SHAPES:
        t = template(shape, box)
        fits[shape] = (component & t).sum() / (component | t).sum()
    shape = max(fits, key=fits.get)
    plausible = 1 / ASPECT_TOLERANCE <= aspect / ASPECT[shape] <= ASPECT_TOLERANCE
    return (shape if fits[shape] >= MIN_IOU and plausible else UNKNOWN), float(fits[shape])


def read_scene(image: Image.Image) -> Scene:
    """Background, shape colour and shape of a picture, read from its pixels."""
    px = _to_array(image)
    ring = np.concatenate([px[:2].reshape(-1, 3), px[-2:].reshape(-1, 3), px[2:-2, :2].reshape(-1, 3),
                           px[2:-2, -2:].reshape(-1, 3)])  # fmt: skip
    median = np.median(ring, axis=0)
    uniform = (np.linalg.norm(ring - median, axis=1) < BACKGROUND_TOLERANCE).mean() >= BACKGROUND_UNIFORM
    bg = int(_nearest(median[None])[0])
    if not uniform or np.linalg.norm(median - PALETTE[bg]) > BACKGROUND_TOLERANCE:
        return Scene(UNKNOWN, UNKNOWN, UNKNOWN)
    far = np.linalg.norm(px - PALETTE[bg], axis=-1) > FOREGROUND_DISTANCE
    labels = _nearest(px[far])
    labels = labels[labels != bg]
    if labels.size < MIN_AREA * px.shape[0] * px.shape[1]:
        return Scene(UNKNOWN, UNKNOWN, PALETTE_NAMES[bg])
    fg = int(np.bincount(labels, minlength=len(PALETTE)).argmax())
    nearer_fg = np.linalg.norm(px - PALETTE[fg], axis=-1) < np.linalg.norm(px - PALETTE[bg], axis=-1)
    component = largest_component(nearer_fg)
    if component.sum() < MIN_AREA * component.size:
        return Scene(UNKNOWN, PALETTE_NAMES[fg], PALETTE_NAMES[bg])
    shape, iou = _classify(component)
    return Scene(shape, PALETTE_NAMES[fg], PALETTE_NAMES[bg], iou)


def score(image: Image.Image, caption: str) -> bool:
    """Whether the picture shows the caption's shape, in the caption's colour, on the caption's background."""
    want, got = parse_caption(caption), read_scene(image)
    return (got.shape, got.colour, got.background) == (want["shape"], want["colour"], want["background"])


def caption_accuracy(images: Sequence[Image.Image], captions: Sequence[str]) -> float:
    """Percentage of pictures that match their captions."""
    if len(images) != len(captions) or not images:
        raise ValueError(f"{len(images)} images for {len(captions)} captions")
    return 100.0 * sum(score(i, c) for i, c in zip(images, captions)) / len(images)


def agreement(images: Sequence[Image.Image], reference: Sequence[Image.Image]) -> dict[str, float]:
    """Mean PSNR (dB) and mean absolute pixel error (0-255) of `images` against `reference`, pair by pair."""
    if len(images) != len(reference) or not images:
        raise ValueError(f"{len(images)} images for {len(reference)} references")
    pairs = [picture_agreement(a, b) for a, b in zip(images, reference)]
    return {"psnr": float(np.mean([p for p, _ in pairs])), "mae": float(np.mean([m for _, m in pairs]))}


def picture_agreement(image: Image.Image, reference: Image.Image) -> tuple[float, float]:
    """PSNR (dB) and mean absolute pixel error (0-255) of one picture against another."""
    x, y = _to_array(image), _to_array(reference)
    mse = float(((x - y) ** 2).mean())
    return 10 * math.log10(255.0**2 / max(mse, 1e-10)), float(np.abs(x - y).mean())
