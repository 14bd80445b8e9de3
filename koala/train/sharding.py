"""The student sharded with FSDP2 (`accelerate launch` with `fsdp_version: 2`): what the trainer does differently.

FSDP2 (`fully_shard`) turns the student's parameters into DTensors, each rank holding one shard of each; gradients
and optimizer state are sharded the same way. The teacher is never prepared: every rank keeps its own frozen copy.
The EMA is built over the sharded parameters, so its shadows are sharded too. A checkpoint holds the sharded
training state (accelerate/, torch.distributed.checkpoint files, one per rank) for resume, plus the full student and
EMA gathered onto the main process (unet/, unet_ema/: diffusers folders that export and diffusers read as always).
Everything here is a collective under FSDP: every rank calls it. Without FSDP each function is a no-op.
"""

from __future__ import annotations

import os

import torch
from accelerate import Accelerator, PartialState
from accelerate.utils import DistributedType
from diffusers import UNet2DConditionModel
from torch import nn
from torch.distributed.tensor import DTensor, distribute_tensor

from koala.devices import multi_cpu


def fsdp_requested() -> bool:
    """Whether this process was launched with an FSDP accelerate config."""
    return os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"


def accelerator_kwargs() -> dict:
    """The Accelerator's FSDP plugin for an FSDP launch (nothing otherwise), read from the launch config.

    The student computes as it does under DDP or on one device, under the run's autocast: fp32 master weights
    gathered in fp32, gradients reduced in fp32. (accelerate's default for mixed_precision=bf16 casts the parameters
    to bf16 before autocast, which changes the numerics of every feature tap.)
    """
    if not fsdp_requested():
        return {}
    from accelerate.utils import FullyShardedDataParallelPlugin
    from torch.distributed.fsdp import MixedPrecisionPolicy

    version = int(os.environ.get("FSDP_VERSION", "1"))
    if version != 2:
        raise ValueError(f"koala trains with FSDP2: set fsdp_version: 2 in the accelerate config (got {version})")
    plugin = FullyShardedDataParallelPlugin(mixed_precision_policy=MixedPrecisionPolicy())
    if plugin.cpu_ram_efficient_loading:
        raise ValueError(
            "fsdp_cpu_ram_efficient_loading must be false: transformers would then load the frozen text encoders "
            "with empty weights on every rank but the first"
        )
    if multi_cpu():
        allow_fsdp_on_cpu_ranks()
    return {"fsdp_plugin": plugin}


def allow_fsdp_on_cpu_ranks() -> None:
    """Let accelerate apply its FSDP plugin on CPU (gloo) ranks, where torch's FSDP2 runs but accelerate ignores it.

    accelerate enables FSDP only for process groups it classed as multi-device; the CPU group it starts is marked
    as one before the Accelerator reads it (accelerate 1.15; without this, an FSDP launch on CPU silently runs DDP).
    """
    state = PartialState(cpu=True)
    if state.distributed_type in (DistributedType.MULTI_CPU, DistributedType.FSDP):
        PartialState._shared_state["distributed_type"] = DistributedType.MULTI_GPU


def is_sharded(accelerator: Accelerator) -> bool:
    return accelerator.distributed_type == DistributedType.FSDP


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor behind a possibly sharded one (an all-gather for a DTensor)."""
    return t.full_tensor() if isinstance(t, DTensor) else t


def local_part(t: torch.Tensor) -> torch.Tensor:
    """This rank's part of a possibly sharded tensor (no communication)."""
    return t.to_local() if isinstance(t, DTensor) else t


def all_finite(tensors: list[torch.Tensor]) -> bool:
    """Whether every element of this rank's part of `tensors` is finite (one host sync for the whole list)."""
    flags = [torch.isfinite(local_part(t)).all() for t in tensors if local_part(t).numel()]
    return bool(torch.stack(flags).all()) if flags else True


def plain_student(accelerator: Accelerator, student: nn.Module) -> UNet2DConditionModel | None:
    """The student as an ordinary diffusers U-Net: the unwrapped model, or under FSDP a full copy gathered onto the
    main process (on the CPU; None on the other ranks)."""
    model = accelerator.unwrap_model(student)
    if not is_sharded(accelerator):
        return model
    state = accelerator.get_state_dict(student)  # full, on the main process only
    if not accelerator.is_main_process:
        return None
    from accelerate import init_empty_weights

    with init_empty_weights():
        whole = UNet2DConditionModel.from_config(model.config)
    whole.load_state_dict(state, strict=True, assign=True)
    return whole.train(model.training)


def gathered_ema(accelerator: Accelerator, ema):
    """The EMA with whole shadow tensors (the EMA itself when not sharded; under FSDP a copy on the main process,
    None on the other ranks)."""
    if ema is None or not is_sharded(accelerator):
        return ema
    import copy

    keep, shadows = accelerator.is_main_process, []
    for shadow in ema.shadow_params:
        whole = full_tensor(shadow)  # every rank takes part in each gather; only the main process keeps a copy
        if keep:
            shadows.append(whole.cpu())
    if not keep:
        return None
    full = copy.copy(ema)
    full.shadow_params = shadows
    return full


def shard_like(tensors: list[torch.Tensor], like: list[torch.Tensor]) -> list[torch.Tensor]:
    """Whole tensors laid out as `like`: sharded the same way where `like` is a DTensor, else as they are."""
    return [
        distribute_tensor(t.to(s.device_mesh.device_type, s.dtype), s.device_mesh, s.placements)
        if isinstance(s, DTensor) else t
        for t, s in zip(tensors, like, strict=True)
    ]  # fmt: skip
