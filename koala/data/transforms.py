"""SDXL image transforms: resize the shorter side, crop (center or random), flip; the micro-conditioning they imply.

`original_size` is the decoded image's (h, w); `crop_top_left` is the (top, left) of the crop inside the resized
and (when flipped) mirrored image, so `time_ids` describe exactly the pixels the model sees. A flip mirrors the crop
coordinate as diffusers' SDXL training script does: left = resized_width - left - target_width.

Every image becomes 8-bit RGB the same way (`to_rgb`): 16-bit greyscale is scaled to 8 bits (not clipped), 32-bit
float greyscale (mode `F`, e.g. float TIFFs) is read as 0..1 (the convention of float images) and scaled to 0..255,
one with values outside [0, 1] is refused as `UnsupportedImage` (skipped and counted: its scale is unknown), and
transparency (RGBA, LA, a palette or colour key with tRNS) is composited onto a background colour (`data.background`,
white by default) instead of dropped, which would show the arbitrary stored colours of transparent pixels.
"""

from __future__ import annotations

import io
import random
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageColor

from koala.data.records import UnsupportedImage

Size = tuple[int, int]  # (h, w)
RGB = tuple[int, int, int]
WHITE: RGB = (255, 255, 255)
WIDE_GREY = ("I;16", "I;16L", "I;16B", "I;16N", "I")  # 16-bit greyscale PNGs open as one of these
ALPHA = ("RGBA", "LA", "PA", "RGBa", "La")
FLOAT_SLACK = 1e-3  # float images rounded or resampled slightly outside [0, 1] are still 0..1 images


@dataclass(frozen=True)
class Cropped:
    """A transformed image and the SDXL micro-conditioning that describes it."""

    pixels: torch.Tensor  # (3, H, W) float32 in [-1, 1]
    original_size: Size
    crop_top_left: Size
    target_size: Size
    flipped: bool


def open_image(data: bytes) -> Image.Image:
    """Open an encoded image lazily: reads the header only (size, mode), decodes nothing."""
    return Image.open(io.BytesIO(data))


def background_rgb(value: str) -> RGB:
    """`data.background` as an RGB triple; a clear error for anything that is not a colour."""
    try:
        return ImageColor.getrgb(str(value))[:3]
    except ValueError:
        raise ValueError(
            f"data.background={value!r} is not a colour: use a name (white, black, grey, ...) or '#rrggbb'"
        ) from None


def float_to_grey(image: Image.Image) -> Image.Image:
    """A 32-bit float (`F`) image of values in [0, 1] as 8-bit greyscale (1.0 -> 255); any other range is refused."""
    values = np.asarray(image, dtype=np.float32)  # (H, W)
    finite = np.isfinite(values)
    lo, hi = (float(values[finite].min()), float(values[finite].max())) if finite.any() else (0.0, 0.0)
    if not finite.all() or lo < -FLOAT_SLACK or hi > 1 + FLOAT_SLACK:
        what = "non-finite values" if not finite.all() else f"values in [{lo:.4g}, {hi:.4g}]"
        raise UnsupportedImage(
            f"a 32-bit float (mode F) image with {what}: float images are read as 0..1, so its scale is unknown; "
            "convert it to 8 or 16 bits"
        )
    return Image.fromarray(np.clip(np.rint(values * 255.0), 0, 255).astype(np.uint8), "L")


def to_rgb(image: Image.Image, background: RGB = WHITE) -> Image.Image:
    """8-bit RGB: 16-bit greyscale scaled to 8 bits (65535 -> 255), 0..1 float greyscale to 0..255, transparency
    composited onto `background`."""
    if image.mode == "F":  # PIL's own convert would clip 0..1 to 0..255: an all-black picture
        image = float_to_grey(image)
    if image.mode in WIDE_GREY:
        wide = np.asarray(image, dtype=np.float32)  # (H, W) in 0..65535
        image = Image.fromarray(np.clip(np.rint(wide / 257.0), 0, 255).astype(np.uint8), "L")
    if image.mode in ALPHA or "transparency" in image.info:
        rgba = image.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, (*background, 255)), rgba).convert("RGB")
    return image.convert("RGB")


def resized_size(size: Size, target: Size) -> Size:
    """The smallest size with the image's aspect ratio that covers `target` (shorter side fitted)."""
    h, w = size
    th, tw = target
    scale = max(th / h, tw / w)
    return max(th, round(h * scale)), max(tw, round(w * scale))


def crop_origin(resized: Size, target: Size, center: bool, rng: random.Random) -> Size:
    """(top, left) of the crop in the resized image: centred (as diffusers rounds it) or uniformly random."""
    (rh, rw), (th, tw) = resized, target
    if center:
        return max(0, int(round((rh - th) / 2.0))), max(0, int(round((rw - tw) / 2.0)))
    return rng.randint(0, rh - th), rng.randint(0, rw - tw)


def to_tensor(image: Image.Image) -> torch.Tensor:
    """uint8 HWC RGB image -> float32 (3, H, W) in [-1, 1]."""
    array = np.array(image.convert("RGB"), dtype=np.uint8)  # (H, W, 3), writable copy
    return torch.from_numpy(array).permute(2, 0, 1).float().div_(127.5).sub_(1.0)


def sdxl_transform(
    data: bytes, target: Size, *, center_crop: bool, random_flip: bool, rng: random.Random, background: RGB = WHITE
) -> Cropped:
    """Decode `data`, resize its shorter side to fit `target`, crop to `target`, maybe flip; record what was done."""
    image = open_image(data)
    original = (image.height, image.width)
    resized = resized_size(original, target)
    if image.format == "JPEG":
        image.draft("RGB", (resized[1], resized[0]))  # decode at a reduced DCT scale when the image is much larger
    image = to_rgb(image, background)
    top, left = crop_origin(resized, target, center_crop, rng)
    sy, sx = image.height / resized[0], image.width / resized[1]  # resized -> (drafted) decoded coordinates
    box = (left * sx, top * sy, (left + target[1]) * sx, (top + target[0]) * sy)
    if (image.height, image.width) == resized:
        image = image.crop(tuple(map(round, box)))
    else:  # resize only the cropped region: same pixels as resize-then-crop, a fraction of the work
        image = image.resize((target[1], target[0]), Image.Resampling.BICUBIC, box=box)
    flipped = random_flip and rng.random() < 0.5
    if flipped:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        left = resized[1] - left - target[1]
    return Cropped(to_tensor(image), original, (top, left), target, flipped)
