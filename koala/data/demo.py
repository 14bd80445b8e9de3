"""Generated captioned image sets, as webdataset shards: the demo set and the shapes world.

python -m koala.data.demo out=<dir> n=<count> [resolution=64] [samples_per_shard=64] [seed=0] [world=demo|shapes]

`demo`: coloured shapes on coloured backgrounds of varied size and aspect (exercises resizing, cropping, buckets).
`shapes`: the shapes world (koala.shapes.world): square pictures whose caption stays true after any centre crop,
the world the shipped `teacher=shapes` was trained on and `koala.shapes.score` judges.
"""

from __future__ import annotations

import io
import json
import math
import os
import random
import shutil
import sys
import tempfile
from pathlib import Path

import webdataset as wds
from PIL import Image, ImageDraw
from webdataset.shardlists import expand_urls

from koala.shapes.world import draw_scene

COLOURS = {
    "red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (240, 210, 40),
    "purple": (130, 50, 170), "orange": (245, 140, 30), "white": (245, 245, 245), "black": (20, 20, 20),
    "pink": (240, 130, 180), "grey": (128, 128, 128),
}  # fmt: skip
SHAPES = ("circle", "square", "triangle")
ASPECTS = (1.0, 4 / 3, 3 / 4, 16 / 9, 9 / 16, 2.0, 0.5)  # width / height


def draw_sample(rng: random.Random, resolution: int) -> tuple[Image.Image, dict]:
    """One picture (a shape on a background, of varied size and aspect) and its description."""
    shape, colour, background = rng.choice(SHAPES), *rng.sample(sorted(COLOURS), 2)
    aspect, short = rng.choice(ASPECTS), round(resolution * rng.uniform(0.75, 1.5))
    w, h = (round(short * aspect), short) if aspect >= 1 else (short, round(short / aspect))
    image = Image.new("RGB", (w, h), COLOURS[background])
    radius = rng.uniform(0.2, 0.4) * min(w, h)
    cx, cy = rng.uniform(radius, w - radius), rng.uniform(radius, h - radius)
    draw = ImageDraw.Draw(image)
    if shape == "circle":
        draw.ellipse((cx - radius, cy - radius, cx + radius, cy + radius), fill=COLOURS[colour])
    elif shape == "square":
        draw.rectangle((cx - radius, cy - radius, cx + radius, cy + radius), fill=COLOURS[colour])
    else:
        points = [(cx + radius * math.sin(a), cy - radius * math.cos(a)) for a in (0, 2 * math.pi / 3, 4 * math.pi / 3)]
        draw.polygon(points, fill=COLOURS[colour])
    article = "an" if colour[0] in "aeiou" else "a"
    caption = f"{article} {colour} {shape} on {'an' if background[0] in 'aeiou' else 'a'} {background} background"
    meta = {"caption": caption, "long_caption": f"A picture of {caption}, simple and flat.", "shape": shape,
            "colour": colour, "background": background, "width": w, "height": h}  # fmt: skip
    return image, meta


# world name -> (draw(rng, resolution) -> (image, meta), image extension in the shards)
WORLDS = {"demo": (draw_sample, "jpg"), "shapes": (draw_scene, "png")}


def _world(name: str):
    """The drawing function and image format of a generated world, naming the valid choices."""
    if name not in WORLDS:
        raise ValueError(f"unknown data.demo_world {name!r}; valid choices: {', '.join(WORLDS)}")
    return WORLDS[name]


def write_demo_shards(
    out_dir: str | os.PathLike, n: int, resolution: int = 64, samples_per_shard: int = 64, seed: int = 0,
    world: str = "demo",
) -> list[Path]:
    """Write `n` samples of a world (image, `.txt`, `.json`) as shards `demo-00000.tar`, ...; the paths in order."""
    draw, ext = _world(world)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    with wds.ShardWriter(str(out / "demo-%05d.tar"), maxcount=samples_per_shard, verbose=0) as sink:
        for i in range(n):
            image, meta = draw(rng, resolution)
            data = io.BytesIO()
            image.save(data, **({"format": "JPEG", "quality": 90} if ext == "jpg" else {"format": "PNG"}))
            sink.write({"__key__": f"{i:08d}", ext: data.getvalue(), "txt": meta["caption"], "json": json.dumps(meta)})
    return sorted(out.glob("demo-*.tar"))


def ensure_demo_shards(pattern: str, n: int, resolution: int, seed: int = 0, world: str = "demo") -> list[str]:
    """Write the demo shards named by `pattern` (brace-expanded) unless all exist already.

    Shards are written to a private temporary folder and renamed into place one by one (atomic), so a crash leaves
    the set visibly incomplete and concurrent ranks never see a half-written file (they write identical content).
    """
    targets = [Path(p) for p in expand_urls(pattern)]
    _world(world)
    if all(p.exists() for p in targets):
        return [str(p) for p in targets]
    if n < len(targets):
        raise ValueError(f"demo_samples={n} is fewer than the {len(targets)} shards in {pattern!r}")
    targets[0].parent.mkdir(parents=True, exist_ok=True)
    tmp = tempfile.mkdtemp(dir=targets[0].parent, prefix=".demo-tmp-")
    try:
        written = write_demo_shards(tmp, n, resolution, math.ceil(n / len(targets)), seed, world)
        if len(written) != len(targets):
            raise ValueError(f"{n} demo samples fill {len(written)} shards, but {pattern!r} names {len(targets)}")
        for src, dst in zip(written, targets):
            os.replace(src, dst)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return [str(p) for p in targets]


def main(argv: list[str] | None = None) -> None:
    """CLI: key=value arguments (out, n, resolution, samples_per_shard, seed, world)."""
    args = dict(a.split("=", 1) for a in (sys.argv[1:] if argv is None else argv))
    unknown = set(args) - {"out", "n", "resolution", "samples_per_shard", "seed", "world"}
    if "out" not in args or unknown:
        sys.exit("usage: python -m koala.data.demo out=<dir> n=<count> [resolution=64] [samples_per_shard=64] [seed=0]"
                 " [world=demo|shapes]")
    paths = write_demo_shards(
        args["out"], int(args.get("n", 256)), int(args.get("resolution", 64)),
        int(args.get("samples_per_shard", 64)), int(args.get("seed", 0)), args.get("world", "demo"),
    )  # fmt: skip
    print(f"wrote {len(paths)} shards to {args['out']}")


if __name__ == "__main__":
    main()
