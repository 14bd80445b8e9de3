"""Feature taps: capture the outputs of chosen U-Net modules during a forward pass (KOALA.md section 3).

Kinds: `sa` self-attention (`attn1` output, or with `sa_point="residual"` the residual stream after it is added),
`ca` cross-attention (`attn2`), `ffn` feed-forward (`ff`), `lf` whole block output (BK-SDM's "last feature"),
`rb` resnet output. Hooks go only on tapped modules of the *unwrapped* U-Net and only the first capture per step is
kept, so a block re-run by gradient checkpointing in backward does not overwrite it.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from enum import auto
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from koala.choice import Choice


class TapKind(Choice):
    """What a tap captures (`distill.kinds`, the keys of `distill.kind_weights`)."""

    sa = auto()  # self-attention: attn1's output (or the residual stream after it)
    ca = auto()  # cross-attention: attn2's output
    ffn = auto()  # feed-forward: ff's output
    lf = auto()  # a whole block's output (BK-SDM's "last feature")
    rb = auto()  # a resnet's output


class Stage(Choice):
    """Where a tap sits (`distill.stages`, the keys of `distill.stage_weights`)."""

    encoder = auto()
    mid = auto()
    decoder = auto()


class SaPoint(Choice):
    """`distill.sa_point`: the self-attention feature a `sa` tap captures."""

    attn1 = auto()  # the attn1 module's output
    residual = auto()  # the residual stream after attn1 is added


_STAGE_OF = {"down_blocks": Stage.encoder, "mid_block": Stage.mid, "up_blocks": Stage.decoder}
_BLOCK = re.compile(r"^(down_blocks\.\d+|mid_block|up_blocks\.\d+)(\..*)?$")
_TRANSFORMER_CHILD = {"attn1": TapKind.sa, "attn2": TapKind.ca, "ff": TapKind.ffn}


@dataclass(frozen=True)
class TapPoint:
    """One tapped module: its path in the unwrapped U-Net, its kind, stage and block."""

    name: str  # e.g. "down_blocks.1.attentions.0.transformer_blocks.0.attn1", "mid_block", "up_blocks.0.resnets.1"
    kind: TapKind
    stage: Stage
    block: str  # "down_blocks.1", "mid_block", "up_blocks.0"


def unwrap(model: nn.Module) -> nn.Module:
    """The bare model under DDP / DataParallel / FSDP / DeepSpeed wrappers and `torch.compile`."""
    wrappers = ("DistributedDataParallel", "DataParallel", "FullyShardedDataParallel", "DeepSpeedEngine")
    while True:
        if type(model).__name__ in wrappers and isinstance(getattr(model, "module", None), nn.Module):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):
            model = model._orig_mod
        else:
            return model


def check_blocks(given: Iterable[str], valid: list[str]) -> list[str]:
    """The given block names as a list; raise naming this model's blocks if any is not one of them."""
    given = list(given)
    bad = [g for g in given if g not in valid]
    if bad:
        raise ValueError(f"unknown blocks {bad}; this U-Net's blocks: {', '.join(valid)}")
    return given


def _kind_of(name: str, parent: nn.Module | None) -> TapKind | None:
    """The tap kind of one named module, or None if it is not a tap point."""
    parts = name.split(".")
    if (len(parts) == 2 and parts[0] in ("down_blocks", "up_blocks")) or name == "mid_block":
        return TapKind.lf
    if len(parts) >= 2 and parts[-2] == "resnets":
        return TapKind.rb
    if parts[-1] in _TRANSFORMER_CHILD and type(parent).__name__ == "BasicTransformerBlock":
        return _TRANSFORMER_CHILD[parts[-1]]
    return None


def block_names(unet: nn.Module) -> list[str]:
    """The U-Net's block names in forward order: down_blocks.i, mid_block (if any), up_blocks.i."""
    unet = unwrap(unet)
    names = [f"down_blocks.{i}" for i in range(len(unet.down_blocks))]
    names += ["mid_block"] if getattr(unet, "mid_block", None) is not None else []
    return names + [f"up_blocks.{i}" for i in range(len(unet.up_blocks))]


def list_tap_points(
    unet: nn.Module,
    kinds: Iterable[str] = tuple(TapKind),
    stages: Iterable[str] = tuple(Stage),
    blocks: Iterable[str] | None = None,
    sa_point: str = SaPoint.attn1,
) -> list[TapPoint]:
    """Every tap point of the given kinds, stages and blocks, in forward order of the blocks."""
    kinds, stages = [TapKind(k) for k in kinds], [Stage(s) for s in stages]
    SaPoint(sa_point)
    model = unwrap(unet)
    blocks = None if blocks is None else check_blocks(blocks, block_names(model))
    modules = dict(model.named_modules())
    points = []
    for name in modules:
        m = _BLOCK.match(name)
        if not m:
            continue
        parent = modules.get(name.rpartition(".")[0])
        kind = _kind_of(name, parent)
        block = m.group(1)
        stage = _STAGE_OF[block.split(".")[0]]
        if kind in kinds and stage in stages and (blocks is None or block in blocks):
            points.append(TapPoint(name, kind, stage, block))
    order = {b: i for i, b in enumerate(block_names(model))}
    return sorted(points, key=lambda p: order[p.block])  # forward order: encoder, mid, decoder (stable within)


def _first_tensor(output: Any) -> torch.Tensor:
    """A module's feature: the tensor itself, or the hidden state of a (hidden, res_samples) tuple."""
    return output[0] if isinstance(output, (tuple, list)) else output


class FeatureTaps:
    """Context manager capturing the first output per step of each tap point into `features`."""

    def __init__(
        self, unet: nn.Module, points: Iterable[TapPoint], detach: bool = False, sa_point: str = SaPoint.attn1
    ):
        self.model = unwrap(unet)
        self.points = list(points)
        self.detach = detach
        self.sa_point = SaPoint(sa_point)
        self.features: dict[str, torch.Tensor] = {}
        self._block_inputs: dict[str, torch.Tensor] = {}  # residual SA: transformer-block input per point
        self._handles: list[RemovableHandle] = []

    def reset(self) -> None:
        """Forget the last step's captures (call once per step before the forward)."""
        self.features.clear()
        self._block_inputs.clear()

    def _store(self, name: str, feature: torch.Tensor) -> None:
        """Keep only the first capture since the last reset (gradient checkpointing re-runs blocks)."""
        if name not in self.features:
            self.features[name] = feature.detach() if self.detach else feature

    def _output_hook(self, name: str):
        """Forward hook storing a module's output."""

        def hook(module, args, output):
            self._store(name, _first_tensor(output))

        return hook

    def _block_input_hook(self, name: str):
        """Forward pre-hook on a BasicTransformerBlock storing its input hidden state (first call only)."""

        def hook(module, args, kwargs):
            if name not in self.features and name not in self._block_inputs:
                self._block_inputs[name] = args[0] if args else kwargs["hidden_states"]

        return hook

    def _residual_hook(self, name: str):
        """Forward hook on attn1 storing the residual stream `attn1(norm1(h)) + h`."""

        def hook(module, args, output):
            if name not in self.features and name in self._block_inputs:  # attn1 called outside its block: skip
                residual = output + self._block_inputs.pop(name)
                self._store(name, residual.squeeze(1) if residual.ndim == 4 else residual)  # as the block does

        return hook

    def _register(self, point: TapPoint) -> None:
        """Hook one tap point (two hooks for the residual SA stream)."""
        module = self.model.get_submodule(point.name)
        if point.kind == TapKind.sa and self.sa_point is SaPoint.residual:
            block = self.model.get_submodule(point.name.rpartition(".")[0])
            pre = block.register_forward_pre_hook(self._block_input_hook(point.name), with_kwargs=True)
            self._handles.append(pre)
            self._handles.append(module.register_forward_hook(self._residual_hook(point.name)))
        else:
            self._handles.append(module.register_forward_hook(self._output_hook(point.name)))

    def __enter__(self) -> FeatureTaps:
        self.reset()
        try:
            for point in self.points:
                self._register(point)
        except BaseException:
            self.remove()
            raise
        return self

    def remove(self) -> None:
        """Remove every hook this object registered."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._block_inputs.clear()

    def __exit__(self, *exc) -> None:
        self.remove()
