"""The student under DeepSpeed ZeRO-2 (`accelerate launch --config_file configs/accelerate/deepspeed-zero2.yaml`).

ZeRO-2 shards the optimizer state and the gradients; every rank keeps the whole student. koala writes the DeepSpeed
config itself, from its own settings, so the engine computes as DDP does:

- the student stays fp32 and its forward runs under torch autocast (DeepSpeed's `torch_autocast` section), not
  DeepSpeed's bf16 mode, which would cast the module to bf16 and keep fp32 masters only inside the optimizer: the EMA
  (built over the module's parameters) would then average bf16 copies whose small updates round away, and `unet/`
  would be saved in bf16. Here the module's parameters are the fp32 weights the optimizer updates;
- gradients are reduced in fp32 (no module is declared safe for lower-precision communication), as under DDP;
- `gradient_accumulation_steps` is `grad_accum`, `gradient_clipping` is `optim.max_grad_norm` (DeepSpeed clips
  inside its step; accelerate's `clip_grad_norm_` only reports the norm there), `train_micro_batch_size_per_gpu` is
  `batch_size`.

What the launch config may still say is checked against those settings before any model loads (`check_launch`): a
different accumulation or clipping, another ZeRO stage, offloading, a DeepSpeed config file or fp16 are refused in
one line. On CPU ranks DeepSpeed runs on gloo (its CPU accelerator falls back to gloo without oneCCL).
"""

from __future__ import annotations

import os
from datetime import timedelta
from typing import TYPE_CHECKING

from koala.devices import multi_cpu
from koala.errors import ConfigError

if TYPE_CHECKING:
    from koala.config.schema import TrainConfig

STAGE = 2
ENGINES = (
    "DDP (configs/accelerate/ddp.yaml), FSDP2 (configs/accelerate/fsdp.yaml) or DeepSpeed ZeRO-2 (deepspeed-zero2.yaml)"
)


def deepspeed_requested() -> bool:
    """Whether this process was launched with a DeepSpeed accelerate config."""
    return os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"


def _launch_value(name: str) -> str | None:
    """A DeepSpeed setting the accelerate launch config passed on (None when it left it out or said `auto`)."""
    value = os.environ.get(f"ACCELERATE_{name}")
    return None if value in (None, "", "auto", "none") else value


def check_launch(cfg: TrainConfig) -> None:
    """Refuse a DeepSpeed launch config that disagrees with koala's settings or asks for what koala does not run."""
    if not deepspeed_requested():
        return
    from accelerate.utils import is_deepspeed_available

    if not is_deepspeed_available():
        raise ConfigError(
            "the launch config asks for DeepSpeed, which is not installed: pip install 'koala[deepspeed]'"
        )
    stage = _launch_value("DEEPSPEED_ZERO_STAGE")
    if stage is not None and int(stage) != STAGE:
        raise ConfigError(
            f"DeepSpeed zero_stage={stage} is not supported: koala runs ZeRO stage 2 (deepspeed-zero2.yaml); "
            f"to shard the parameters too use FSDP2 (configs/accelerate/fsdp.yaml). Engines: {ENGINES}"
        )
    if _launch_value("DEEPSPEED_CONFIG_FILE") is not None:
        raise ConfigError(
            "a DeepSpeed config file (deepspeed_config_file) is not supported: koala writes the DeepSpeed config from "
            "its own settings (grad_accum, optim.max_grad_norm, batch_size, mixed_precision); set those instead"
        )
    for where in ("OPTIMIZER", "PARAM"):
        device = _launch_value(f"DEEPSPEED_OFFLOAD_{where}_DEVICE")
        if device is not None:
            raise ConfigError(
                f"DeepSpeed offload_{where.lower()}_device={device} is not supported (untested with koala); set it to "
                f"none. Engines: {ENGINES}"
            )
    accum = _launch_value("GRADIENT_ACCUMULATION_STEPS")
    if accum is not None and int(accum) != cfg.grad_accum:
        raise ConfigError(
            f"the accelerate config's gradient_accumulation_steps={accum} differs from grad_accum={cfg.grad_accum}: "
            "leave it out of the accelerate config (koala sets DeepSpeed's from grad_accum)"
        )
    clip = _launch_value("GRADIENT_CLIPPING")
    if clip is not None and float(clip) != float(cfg.optim.max_grad_norm):
        raise ConfigError(
            f"the accelerate config's gradient_clipping={clip} differs from optim.max_grad_norm="
            f"{cfg.optim.max_grad_norm}: leave it out of the accelerate config (koala sets DeepSpeed's from it)"
        )
    if cfg.mixed_precision == "fp16":
        raise ConfigError(
            "mixed_precision=fp16 is not supported under DeepSpeed ZeRO (its torch autocast mode has no loss "
            "scaling there): use mixed_precision=bf16 or no"
        )
    if cfg.compile:
        raise ConfigError("compile=true is not supported under DeepSpeed (untested): use compile=false, or DDP / FSDP2")


def engine_settings(cfg: TrainConfig) -> dict:
    """The DeepSpeed config sections koala sets beyond accelerate's plugin fields (see the module docstring)."""
    autocast = cfg.mixed_precision == "bf16"
    return {
        "train_micro_batch_size_per_gpu": cfg.batch_size,
        "bf16": {"enabled": False},  # not DeepSpeed's bf16 mode: the module stays fp32 ...
        "fp16": {"enabled": False},
        # ... and computes under torch autocast; [] = no module's gradients are communicated in bf16
        "torch_autocast": {"enabled": autocast, "dtype": "bfloat16", "lower_precision_safe_modules": []},
    }


def deepspeed_kwargs(cfg: TrainConfig) -> dict:
    """The Accelerator's DeepSpeed plugin for a DeepSpeed launch (nothing otherwise)."""
    if not deepspeed_requested():
        return {}
    from accelerate import PartialState
    from accelerate.utils import DeepSpeedPlugin

    if multi_cpu():
        # accelerate starts DeepSpeed only for a device backend; on CPU ranks it is told gloo (the backend
        # DeepSpeed's CPU accelerator uses without oneCCL) before the Accelerator reads the process group.
        PartialState(cpu=False, backend="gloo", timeout=timedelta(seconds=cfg.dist_timeout_s))
    plugin = DeepSpeedPlugin(
        zero_stage=STAGE,
        gradient_accumulation_steps=cfg.grad_accum,
        gradient_clipping=float(cfg.optim.max_grad_norm),  # 0 turns DeepSpeed's clipping off, as it does koala's
        offload_optimizer_device="none",
        offload_param_device="none",
    )
    plugin.deepspeed_config.update(engine_settings(cfg))
    return {"deepspeed_plugin": plugin}


def describe_engine(engine) -> str:
    """What the prepared DeepSpeed engine really runs (read back from it, for the log)."""
    autocast = f"torch autocast {engine.torch_autocast_dtype()}" if engine.torch_autocast_enabled() else "no autocast"
    dtype = next(engine.module.parameters()).dtype
    return (
        f"DeepSpeed ZeRO stage {engine.zero_optimization_stage()}: micro-batch {engine.train_micro_batch_size_per_gpu()}"
        f", gradient_accumulation_steps {engine.gradient_accumulation_steps()}, gradient_clipping "
        f"{engine.gradient_clipping()}, student weights {dtype} with {autocast} (DeepSpeed bf16 mode "
        f"{'on' if engine.bfloat16_enabled() else 'off'})"
    )
