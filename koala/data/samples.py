"""Image samples: cheap checks on undecoded records, then decode + SDXL transform + caption dropout, then collate."""

from __future__ import annotations

import random
from typing import Any

import torch

from koala.data.buckets import nearest_bucket
from koala.data.records import Raw
from koala.data.transforms import RGB, WHITE, open_image, sdxl_transform


class ImageCodec:
    """Turns raw image records into the online batch format (pixel values, captions, SDXL micro-conditioning)."""

    def __init__(
        self,
        resolution: int,
        *,
        buckets: list[tuple[int, int]] | None = None,
        min_size: int = 0,
        center_crop: bool = True,
        random_flip: bool = False,
        caption_dropout: float = 0.0,
        background: RGB = WHITE,
    ) -> None:
        self.square = (resolution, resolution)
        self.background = background
        self.buckets, self.min_size = buckets, min_size
        self.center_crop, self.random_flip, self.caption_dropout = center_crop, random_flip, caption_dropout

    def probe(self, raw: Raw) -> tuple[str | None, Any]:
        """(skip reason or None, target size) from the caption and the image header alone: nothing is decoded."""
        if raw.caption is None:
            return "missing_caption", None
        if not raw.image:
            return "corrupt_image", None
        try:
            image = open_image(raw.image)
            size = (image.height, image.width)
        except Exception:
            return "corrupt_image", None
        if min(size) < self.min_size or min(size) == 0:
            return "too_small", None
        return None, nearest_bucket(size, self.buckets) if self.buckets else self.square

    def decode(self, raw: Raw, target: tuple[int, int], rng: random.Random) -> dict:
        """Decode and transform one record; randomness (caption pick, crop, flip, dropout) comes from `rng` only."""
        caption = raw.caption if isinstance(raw.caption, str) else rng.choice(raw.caption)
        out = sdxl_transform(
            raw.image,
            target,
            center_crop=self.center_crop,
            random_flip=self.random_flip,
            rng=rng,
            background=self.background,
        )
        dropped = self.caption_dropout > 0 and rng.random() < self.caption_dropout
        if dropped:  # the conditioner zeroes its embeddings or encodes "" (data.caption_dropout_mode)
            caption = ""
        return {
            "key": raw.key,
            "pixel_values": out.pixels,
            "caption": caption,
            "original_size": out.original_size,
            "crop_top_left": out.crop_top_left,
            "target_size": out.target_size,
            "flipped": out.flipped,
            "dropped": dropped,
        }

    @staticmethod
    def collate(samples: list[dict]) -> dict:
        """Stack decoded samples (all of one target size) into an online batch."""
        return {
            "pixel_values": torch.stack([s["pixel_values"] for s in samples]),  # (B, 3, H, W)
            "captions": [s["caption"] for s in samples],
            "original_size": torch.tensor([s["original_size"] for s in samples], dtype=torch.long),
            "crop_top_left": torch.tensor([s["crop_top_left"] for s in samples], dtype=torch.long),
            "target_size": torch.tensor([s["target_size"] for s in samples], dtype=torch.long),
            "flipped": torch.tensor([s["flipped"] for s in samples], dtype=torch.bool),
            "dropped": torch.tensor([s["dropped"] for s in samples], dtype=torch.bool),
            "keys": [s["key"] for s in samples],
        }
