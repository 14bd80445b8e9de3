"""How a protocol turns an image file into the image its metrics score.

BK-SDM's COCO protocol (src/generate.py, src/utils/misc.py, src/get_stat_mscoco_val2014.py of Nota-NetsPresso/BK-SDM)
saves each generated 512 px image as `<name>.jpg` (PIL's default: JPEG quality 75), opens that file, squashes it with
`img.resize((256, 256))` (PIL's default filter: bicubic) and saves `.jpg` again; the real val2014 JPEGs are opened,
squashed and saved the same way (one JPEG save, their originals being JPEGs already). pytorch-fid and the CLIP
scorer then read those files. `ImagePrep` does exactly this in memory (the same libjpeg encoder and decoder as a
file round trip), so the scored pixels are the ones BK-SDM's files hold; with `size` and `jpeg` unset it only
converts to RGB.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from PIL import Image

JPEG_MODES = ("L", "RGB", "CMYK")  # modes PIL writes as JPEG (COCO holds some grayscale `L` images)


def jpeg_round_trip(img: Image.Image, quality: int) -> Image.Image:
    """Encode as JPEG at `quality` (PIL's other defaults: 4:2:0 subsampling) and decode again."""
    buf = io.BytesIO()
    (img if img.mode in JPEG_MODES else img.convert("RGB")).save(buf, format="JPEG", quality=quality)
    buf.seek(0)
    out = Image.open(buf)
    out.load()
    return out


@dataclass(frozen=True)
class ImagePrep:
    """Squash to `size` x `size` (PIL bicubic) and/or JPEG round trips at quality `jpeg`, as the protocol does."""

    size: Optional[int] = None
    jpeg: Optional[int] = None

    def reference(self, img: Image.Image) -> Image.Image:
        """A real image: squash, then one JPEG save; in its own mode (grayscale stays grayscale), RGB at the end."""
        if self.size:
            img = (img if img.mode in JPEG_MODES else img.convert("RGB")).resize((self.size, self.size), Image.BICUBIC)
        if self.jpeg:
            img = jpeg_round_trip(img, self.jpeg)
        return img.convert("RGB")

    def generated(self, img: Image.Image) -> Image.Image:
        """A generated image: saved as JPEG once as sampled (BK-SDM writes its samples as .jpg), then as a real one."""
        if self.jpeg:
            img = jpeg_round_trip(img.convert("RGB"), self.jpeg)
        return self.reference(img)


NO_PREP = ImagePrep()  # RGB conversion only


def open_image(path: Path, prepare: Callable[[Image.Image], Image.Image]) -> Image.Image:
    """One prepared image, or an error naming the file that does not decode."""
    try:
        with Image.open(path) as img:
            img.load()
            return prepare(img)
    except (OSError, SyntaxError, ValueError) as e:
        raise OSError(f"{path} does not decode ({type(e).__name__}: {e}); replace or remove it") from e


def image_batches(
    files: Sequence[Path], batch_size: int, prepare: Callable[[Image.Image], Image.Image] = NO_PREP.reference
) -> Iterator[list[Image.Image]]:
    """Prepared RGB images of `files`, `batch_size` at a time (so 30K images never sit in memory together)."""
    for i in range(0, len(files), batch_size):
        yield [open_image(f, prepare) for f in files[i : i + batch_size]]
