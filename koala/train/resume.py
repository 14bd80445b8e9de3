"""Resume a checkpoint on the current launch, whatever number of ranks wrote it: DDP, FSDP2 or one process.

What a checkpoint's `accelerate/` folder holds and how each part meets another world size:
- the student and its optimizer: whole files (`model.safetensors`, `optimizer.bin`) from an unsharded run, or
  torch.distributed.checkpoint folders from FSDP2. Sharded onto sharded: accelerate's load (DCP re-shards onto this
  world size). Across layouts (FSDP2 on 2 ranks -> one process, one process -> FSDP2): DCP reads the shards into
  whole tensors, or the whole state is sharded with `set_model_state_dict` / `set_optimizer_state_dict`;
- the LR schedule: accelerate steps a prepared scheduler once per process per optimizer step, so its count is
  step x ranks; it is rescaled to this launch's ranks;
- RNG states, one file per rank: a rank that had none (more ranks than before) draws from a fresh seed derived from
  (seed, rank, step), never a start-of-run stream again; a rank that is gone leaves its file unused;
- the EMA and `unet/`: whole, as always (koala.train.loop.resume);
- the data position: koala.data.position continues every data stream exactly where it stopped.
DeepSpeed ZeRO-2 partitions the optimizer state by rank in its own format: such a checkpoint resumes under DeepSpeed on
the same number of ranks only, and a checkpoint without it does not resume under DeepSpeed (`check_launch` refuses
both before any model loads).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed

from koala.errors import ConfigError
from koala.train.deepspeed import deepspeed_requested
from koala.train.sharding import is_sharded

log = logging.getLogger("koala.train")
MODEL_SHARDS, OPTIMIZER_SHARDS = "pytorch_model_fsdp_0", "optimizer_0"  # accelerate's DCP folder names
DEEPSPEED_STATE = "pytorch_model"  # accelerate's folder of a DeepSpeed engine checkpoint


def saved_ranks(state_dir: Path) -> int:
    """How many ranks wrote a checkpoint's training state (one RNG file each)."""
    return max(1, len(list(Path(state_dir).glob("random_states_*.pkl"))))


def is_sharded_state(state_dir: Path) -> bool:
    """Whether the state was written by FSDP (DCP folders) rather than whole (model.safetensors)."""
    return (Path(state_dir) / MODEL_SHARDS).is_dir()


def check_launch(ckpt: Path | None) -> None:
    """Refuse, before any model loads, a resume this launch cannot make (DeepSpeed's partitioned state)."""
    if ckpt is None:
        return
    state_dir = Path(ckpt) / "accelerate"
    saved, now = saved_ranks(state_dir), int(os.environ.get("WORLD_SIZE", "1"))
    if (state_dir / DEEPSPEED_STATE).is_dir() and (not deepspeed_requested() or saved != now):
        raise ConfigError(
            f"resume: {ckpt} holds DeepSpeed ZeRO-2 state partitioned over {saved} rank(s); resume it under DeepSpeed on "
            f"{saved} rank(s) (this launch: {now}, {'DeepSpeed' if deepspeed_requested() else 'no DeepSpeed'}). koala "
            "moves DDP, FSDP2 and one-process checkpoints between rank counts, not DeepSpeed's"
        )
    if deepspeed_requested() and not (state_dir / DEEPSPEED_STATE).is_dir():
        raise ConfigError(f"resume: {ckpt} was written without DeepSpeed; resume it under DDP, FSDP2 or one process")


def load_training_state(accelerator: Accelerator, state_dir: Path, student, optimizer, lr_scheduler, step: int,
                        seed: int) -> int:  # fmt: skip
    """Restore student, optimizer, LR schedule and RNG from `state_dir` onto this launch; returns the ranks that
    wrote it."""
    state_dir, ranks = Path(state_dir), saved_ranks(state_dir)
    if is_sharded_state(state_dir) == is_sharded(accelerator):
        accelerator.load_state(str(state_dir))  # under FSDP2 DCP re-shards onto this world size itself
    else:
        _load_across_layouts(accelerator, state_dir, student, optimizer, lr_scheduler)
    now = accelerator.num_processes
    if ranks != now:
        rescale_schedule(lr_scheduler, optimizer, step * now)
        if accelerator.process_index >= ranks:  # no RNG state was saved for this rank
            set_seed(seed + 10_000 * step + accelerator.process_index)
        if accelerator.is_main_process:
            log.warning("resume: the checkpoint was written by %d rank(s), this launch has %d (%s); the data streams "
                        "continue where each stopped (koala.data.position)", ranks, now,
                        "sharded" if is_sharded(accelerator) else "unsharded")  # fmt: skip
    return ranks


def rescale_schedule(lr_scheduler, optimizer, count: int) -> None:
    """Set a restored LambdaLR schedule (every diffusers schedule is one) to `count` steps and apply its LR."""
    sched = getattr(lr_scheduler, "scheduler", lr_scheduler)
    sched.last_epoch, sched._step_count = count, count + 1
    for group, base, factor in zip(optimizer.param_groups, sched.base_lrs, sched.lr_lambdas):
        group["lr"] = base * factor(count)
    sched._last_lr = [g["lr"] for g in optimizer.param_groups]


def _load_across_layouts(accelerator: Accelerator, state_dir: Path, student, optimizer, lr_scheduler) -> None:
    """Student and optimizer from a sharded checkpoint into an unsharded run, or the reverse; schedule, scaler and
    RNG through accelerate's own loader."""
    from accelerate.checkpointing import load_accelerator_state

    model, optim = accelerator.unwrap_model(student), getattr(optimizer, "optimizer", optimizer)
    if is_sharded_state(state_dir):
        _load_shards_whole(model, optim, state_dir)
    else:
        _shard_whole_state(model, optim, state_dir)
    load_accelerator_state(str(state_dir), [], [], [lr_scheduler], [], accelerator.process_index,
                           scaler=getattr(accelerator, "scaler", None))  # fmt: skip
    accelerator.wait_for_everyone()


def _load_shards_whole(model: torch.nn.Module, optim: torch.optim.Optimizer, state_dir: Path) -> None:
    """DCP shards (any number of ranks) read into this process's whole student and optimizer."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

    weights = {"model": model.state_dict()}
    dcp.load(weights, checkpoint_id=str(state_dir / MODEL_SHARDS))
    model.load_state_dict(weights["model"])
    state = {"optimizer": get_optimizer_state_dict(model, optim)}  # a template of whole tensors, keyed by name
    dcp.load(state, checkpoint_id=str(state_dir / OPTIMIZER_SHARDS))
    set_optimizer_state_dict(model, optim, state["optimizer"])


def _shard_whole_state(model: torch.nn.Module, optim: torch.optim.Optimizer, state_dir: Path) -> None:
    """A whole student and optimizer (an unsharded run's files) sharded onto this FSDP2 student."""
    from safetensors.torch import load_file
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    whole = StateDictOptions(full_state_dict=True)
    set_model_state_dict(model, load_file(str(state_dir / "model.safetensors")), options=whole)
    saved = torch.load(state_dir / "optimizer.bin", weights_only=True)  # torch.optim's state dict: by parameter index
    names = [name for name, _ in model.named_parameters()]  # the optimizer was built over parameters() in this order
    by_name = {
        "state": {names[i]: s for i, s in saved["state"].items()},
        "param_groups": [{**g, "params": [names[i] for i in g["params"]]} for g in saved["param_groups"]],
    }
    set_optimizer_state_dict(model, optim, by_name, options=whole)
