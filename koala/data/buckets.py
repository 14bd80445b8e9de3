"""SDXL aspect-ratio buckets: the standard 1024 px list (SDXL report, appendix), scaled to any resolution."""

from __future__ import annotations

import math

# (height, width) at 1024 px; aspect ratios from 1:4 to 4:1, each about 1024^2 pixels.
SDXL_BUCKETS_1024: tuple[tuple[int, int], ...] = (
    (512, 2048), (512, 1984), (512, 1920), (512, 1856), (576, 1792), (576, 1728), (576, 1664), (640, 1600),
    (640, 1536), (704, 1472), (704, 1408), (704, 1344), (768, 1344), (768, 1280), (832, 1216), (832, 1152),
    (896, 1152), (896, 1088), (960, 1088), (960, 1024), (1024, 1024), (1024, 960), (1088, 960), (1088, 896),
    (1152, 896), (1152, 832), (1216, 832), (1280, 768), (1344, 768), (1344, 704), (1408, 704), (1472, 704),
    (1536, 640), (1600, 640), (1664, 576), (1728, 576), (1792, 576), (1856, 512), (1920, 512), (1984, 512),
    (2048, 512),
)  # fmt: skip


def sdxl_buckets(resolution: int, multiple: int | None = None) -> list[tuple[int, int]]:
    """SDXL's bucket list scaled from 1024 px to `resolution`, snapped to `multiple` pixels, duplicates dropped."""
    multiple = multiple or max(8, 64 * resolution // 1024)
    buckets: list[tuple[int, int]] = []
    for h, w in SDXL_BUCKETS_1024:
        size = tuple(max(multiple, round(v * resolution / 1024 / multiple) * multiple) for v in (h, w))
        if size not in buckets:
            buckets.append(size)  # type: ignore[arg-type]
    return buckets


def nearest_bucket(size: tuple[int, int], buckets: list[tuple[int, int]]) -> tuple[int, int]:
    """The bucket whose aspect ratio is closest (in log space) to that of `size` = (h, w)."""
    ratio = math.log(size[0] / size[1])
    return min(buckets, key=lambda b: abs(math.log(b[0] / b[1]) - ratio))
