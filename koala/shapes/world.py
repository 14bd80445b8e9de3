"""The shapes world: one flat shape (circle, square, triangle) in one colour on a background of another colour.

`caption_split()` divides the 90 captions into the 72 a student distils on (the `data=shapes` shards) and 18 held-out
compositions it never sees, each a new combination of a shape, a colour and a background that all appear in training.
Every picture is square, `RESOLUTION` px, drawn 4x larger and downsampled (anti-aliased edges), with its shape fully
inside the frame, so a centre crop never changes what the caption says. Captions read
"a red circle on a blue background"; `meta` also records the shape's centre and radius. Deterministic in the seed.
"""

from __future__ import annotations

import itertools
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass

from PIL import Image, ImageDraw

RESOLUTION = 64
SUPERSAMPLE = 4
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220),
    "yellow": (240, 210, 40), "white": (245, 245, 245), "black": (20, 20, 20),
}  # fmt: skip
SHAPES = ("circle", "square", "triangle")
RADIUS = (0.22, 0.34)  # shape radius as a fraction of the side (a square's half side, a circle's radius)


def caption(shape: str, colour: str, background: str) -> str:
    """The world's one caption template."""
    return f"a {colour} {shape} on a {background} background"


def all_captions() -> list[tuple[str, str, str]]:
    """Every (shape, colour, background) the world can draw, in a fixed order (3 x 6 x 5 = 90)."""
    return [(s, c, b) for s, c, b in itertools.product(SHAPES, COLOURS, COLOURS) if c != b]


@dataclass(frozen=True)
class CaptionSplit:
    """The captions a student trains on and the held-out compositions (both as (shape, colour, background))."""

    train: tuple[tuple[str, str, str], ...]
    held_out: tuple[tuple[str, str, str], ...]

    def is_held_out(self, text: str) -> bool:
        """Whether a world caption is one of the held-out compositions."""
        c = parse_caption(text)
        return (c["shape"], c["colour"], c["background"]) in self.held_out


def caption_split() -> CaptionSplit:
    """Hold out one background per (shape, colour) pair: 18 of the 90 captions.

    Shape i with colour j keeps out the background ((j + 2 i) mod 5) of the five other colours, so the three shapes of
    one colour hold out three different backgrounds: every (shape, colour), (shape, background) and (colour,
    background) pair of a held-out caption is still seen in training (tests/test_shapes.py checks it).
    """
    colours = list(COLOURS)
    held = []
    for i, shape in enumerate(SHAPES):
        for j, colour in enumerate(colours):
            backgrounds = [b for b in colours if b != colour]
            held.append((shape, colour, backgrounds[(j + 2 * i) % len(backgrounds)]))
    train = tuple(c for c in all_captions() if c not in held)
    return CaptionSplit(train=train, held_out=tuple(c for c in all_captions() if c in held))


def parse_caption(text: str) -> dict[str, str]:
    """(shape, colour, background) of a world caption; a clear error for any other text."""
    words = text.strip().split()
    ok = (len(words) == 7 and words[0] == "a" and words[1] in COLOURS and words[2] in SHAPES
          and words[3:5] == ["on", "a"] and words[5] in COLOURS and words[6] == "background")  # fmt: skip
    if not ok:
        raise ValueError(
            f"caption {text!r} is not a shapes-world caption: expected 'a <colour> <shape> on a <colour> background' "
            f"with colour in {', '.join(COLOURS)} and shape in {', '.join(SHAPES)}"
        )
    return {"shape": words[2], "colour": words[1], "background": words[5]}


def shape_polygon(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]] | None:
    """Vertices of a triangle (point up) or square of radius `r` at (cx, cy); None for a circle."""
    if shape == "triangle":
        return [(cx + r * math.sin(a), cy - r * math.cos(a)) for a in (0, 2 * math.pi / 3, 4 * math.pi / 3)]
    if shape == "square":
        return [(cx - r, cy - r), (cx + r, cy - r), (cx + r, cy + r), (cx - r, cy + r)]
    return None


def render(
    shape: str, colour: str, background: str, cx: float, cy: float, r: float, size: int = RESOLUTION
) -> Image.Image:
    """Draw one scene; centre and radius in pixels of a `size` x `size` picture."""
    k = SUPERSAMPLE
    image = Image.new("RGB", (size * k, size * k), COLOURS[background])
    draw = ImageDraw.Draw(image)
    poly = shape_polygon(shape, cx * k, cy * k, r * k)
    if poly is None:
        draw.ellipse((k * (cx - r), k * (cy - r), k * (cx + r), k * (cy + r)), fill=COLOURS[colour])
    else:
        draw.polygon(poly, fill=COLOURS[colour])
    return image.resize((size, size), Image.Resampling.LANCZOS)


def draw_training_scene(rng: random.Random, size: int = RESOLUTION) -> tuple[Image.Image, dict]:
    """A random scene of a training caption (`caption_split().train`): what the `data=shapes` shards hold."""
    return draw_scene(rng, size, caption_split().train)


def draw_scene(
    rng: random.Random, size: int = RESOLUTION, captions: Sequence[tuple[str, str, str]] | None = None
) -> tuple[Image.Image, dict]:
    """One random scene and its description (caption, shape, colour, background, centre, radius); with `captions`,
    of one of those (shape, colour, background) triples (None: any of the 90, drawn as the teacher was trained)."""
    if captions is None:
        shape, colour, background = rng.choice(SHAPES), *rng.sample(sorted(COLOURS), 2)
    else:
        shape, colour, background = rng.choice(list(captions))
    r = rng.uniform(*RADIUS) * size
    cx, cy = rng.uniform(r + 1, size - r - 1), rng.uniform(r + 1, size - r - 1)
    meta = {"caption": caption(shape, colour, background), "shape": shape, "colour": colour,
            "background": background, "cx": cx, "cy": cy, "radius": r, "width": size, "height": size}  # fmt: skip
    return render(shape, colour, background, cx, cy, r, size), meta
