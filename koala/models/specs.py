"""Student specs as data: what a compressed student keeps of its teacher, relative to *any* SDXL-shaped config.

A `StudentSpec` says which residual(+transformer) layers each encoder and decoder stage keeps, how deep each kept
transformer is and what happens to the mid block; `SPECS` registers KOALA-1B / -700M, SSD-1B, Vega, the identity
and tiny analogues for tests. `spec_from_fields` applies a config's overrides to a registered spec.
`koala.models.unets.resolve` checks a spec against one teacher config.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from enum import auto
from typing import Any

from koala.choice import Choice


class LayerSelect(Choice):
    """Which teacher transformer layers a shallower student transformer takes (`unet.layer_select`) or is compared
    with (`distill.pairing`)."""

    first = auto()
    uniform = auto()
    last = auto()


class MidMode(Choice):
    """What a student keeps of the mid block (`unet.mid`)."""

    keep = auto()  # the cross-attention mid block
    resnet = auto()  # one resnet, no transformer
    none = auto()  # no mid block


@dataclass(frozen=True)
class StudentSpec:
    """What a student keeps of its teacher. `None` fields keep the teacher's choice.

    encoder_keep[i]: teacher layer indices kept in encoder stage i (down_blocks.i).
    decoder_keep[i]: teacher layer indices kept in decoder stage i (up_blocks.i, deepest stage first).
    encoder_depth / decoder_depth[i]: transformer depth of every kept layer of stage i (an int), or one depth
        per kept layer (a list); must not exceed the teacher layer it inherits from.
    mid: "keep" (cross-attention mid block), "resnet" (one resnet, no transformer) or "none".
    layer_select: which teacher transformer layers a shallower transformer inherits (first / uniform / last).
    random_init: student module-name prefixes left randomly initialised instead of inherited.
    """

    name: str
    description: str = ""
    encoder_keep: tuple[tuple[int, ...], ...] | None = None
    decoder_keep: tuple[tuple[int, ...], ...] | None = None
    encoder_depth: tuple[int | tuple[int, ...], ...] | None = None
    decoder_depth: tuple[int | tuple[int, ...], ...] | None = None
    mid: MidMode = MidMode.keep
    mid_depth: int | None = None
    layer_select: LayerSelect = LayerSelect.first
    random_init: tuple[str, ...] = field(default=())


# KOALA keeps 1 of 2 encoder layers and decoder layers 0 and 2 of 3 (BK-SDM's mapping, KOALA.md section 2).
_KOALA_KEEP = dict(encoder_keep=((0,), (0,), (0,)), decoder_keep=((0, 2), (0, 2), (0, 2)))


SPECS: dict[str, StudentSpec] = {
    s.name: s
    for s in [
        StudentSpec("sdxl", "identity: the teacher's own architecture"),
        StudentSpec(
            "koala-1b",
            "KOALA-1B: 1 encoder / 2 decoder layers per stage, depth 6, mid kept",
            **_KOALA_KEEP,
            encoder_depth=(1, 2, 6),
            decoder_depth=(6, 2, 1),
            mid_depth=6,
        ),
        StudentSpec(
            "koala-700m",
            "KOALA-700M: 1 encoder / 2 decoder layers per stage, depth 5, no mid block",
            **_KOALA_KEEP,
            encoder_depth=(1, 2, 5),
            decoder_depth=(5, 2, 1),
            mid=MidMode.none,
        ),
        StudentSpec(
            "ssd-1b",
            "Segmind SSD-1B: all layers, shallower transformers, mid block without transformer",
            encoder_depth=(0, 2, 4),
            decoder_depth=((4, 4, 10), (2, 1, 1), 0),
            mid=MidMode.resnet,
        ),
        StudentSpec(
            "vega",
            "Segmind-Vega: all layers, depths 1-2, mid block without transformer",
            encoder_depth=(0, 1, 2),
            decoder_depth=(2, 1, 0),
            mid=MidMode.resnet,
        ),
        # Tiny specs follow the same rules on TINY_UNET_CONFIG (deepest teacher depth 4).
        StudentSpec(
            "tiny-1b",
            "tiny KOALA-1B analogue: 1/2 layers per stage, depth 3, mid kept",
            **_KOALA_KEEP,
            encoder_depth=(1, 2, 3),
            decoder_depth=(3, 2, 1),
            mid_depth=3,
        ),
        StudentSpec(
            "tiny-700m",
            "tiny KOALA-700M analogue: 1/2 layers per stage, depth 2, no mid block",
            **_KOALA_KEEP,
            encoder_depth=(1, 2, 2),
            decoder_depth=(2, 2, 1),
            mid=MidMode.none,
        ),
    ]
}


def get_spec(name: str) -> StudentSpec:
    """Look up a registered spec, naming the valid choices when the name is unknown."""
    if name not in SPECS:
        raise KeyError(f"unknown U-Net spec {name!r}; valid choices: {', '.join(SPECS)} (or a custom spec)")
    return SPECS[name]


def spec_from_fields(name: str, **fields: Any) -> StudentSpec:
    """A spec from config: start from a registered spec (or an empty one for `custom`) and override fields."""
    base = SPECS[name] if name in SPECS else None
    if base is None and not any(v is not None for v in fields.values()):
        get_spec(name)  # raises with the valid choices
    base = base or StudentSpec(name)

    def tup(v):
        if isinstance(v, (list, tuple)):
            return tuple(tup(x) for x in v)
        return v

    given = {k: tup(v) for k, v in fields.items() if v is not None}
    return replace(base, **given)
