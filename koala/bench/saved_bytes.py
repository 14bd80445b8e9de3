"""The bytes one distillation step holds for backward, counted exactly on the meta device (for `koala.bench memory`).

`measure_step` runs `DistillationTask` (teacher, student, taps, losses) of a batch-1 step on the meta device inside
`saved_tensors_hooks` and counts every saved storage once. The meta run matches a GPU bf16 run in two ways the meta
device would not on its own:

- CUDA bf16 autocast is emulated (`Bf16Autocast`): the ops CUDA autocast runs in bf16 (linear, conv, matmuls,
  attention) get bf16 inputs, those it runs in fp32 (norms, softmax) get fp32 inputs, so saved tensors have the
  dtypes a GPU run saves; the bf16 copies of student weights that autocast caches are counted on their own.
- Attention runs as flash / memory-efficient SDPA does on a GPU (`FlashSDPA`): it saves q, k, v, the output and a
  fp32 logsumexp (B, heads, N), never the (N x N) probabilities of the math path the meta device would take.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from koala.config.compose import compose_config
from koala.config.schema import TrainConfig
from koala.models.archs import SDXL_UNET_CONFIG
from koala.models.forward import random_inputs
from koala.models.specs import get_spec
from koala.models.teacher import freeze
from koala.models.unets import build_student, build_unet, resolve
from koala.train.build import make_task

BF16_OPS = {F.linear, F.conv2d, torch.matmul, torch.bmm, torch.baddbmm, torch.addmm, F.scaled_dot_product_attention}


FP32_OPS = {F.group_norm, F.layer_norm, F.softmax, torch.softmax}


def _storage_key(t: torch.Tensor) -> int:
    """Identity of a tensor's storage (views share it)."""
    return t.untyped_storage()._cdata


class SavedBytes:
    """Bytes of distinct storages saved for backward, by category; parameters are never counted."""

    def __init__(self, exclude: Iterator[torch.Tensor] = (), weight_copies: set[int] | None = None):
        self.excluded = {_storage_key(p) for p in exclude}
        self.weight_copies = weight_copies if weight_copies is not None else set()  # storages of cast parameters
        self.seen: set[int] = set()
        self.bytes: dict[str, int] = {}
        self.largest = 0  # the largest single saved storage

    def add(self, t: torch.Tensor, category: str = "activations") -> None:
        """Count `t`'s storage once, unless it is a parameter's or was counted already."""
        key = _storage_key(t)
        if key in self.excluded or key in self.seen:
            return
        self.seen.add(key)
        n = t.untyped_storage().nbytes()
        self.bytes[category] = self.bytes.get(category, 0) + n
        self.largest = max(self.largest, n)

    @contextmanager
    def hooks(self) -> Iterator[SavedBytes]:
        """Count every tensor autograd saves while active (the tensor itself is kept: nothing is freed on meta)."""

        def pack(t: torch.Tensor) -> torch.Tensor:
            self.add(t, "weight copies" if _storage_key(t) in self.weight_copies else "activations")
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            yield self

    @property
    def total(self) -> int:
        return sum(self.bytes.values())


class FlashSDPA(torch.autograd.Function):
    """Shape-only SDPA that saves what flash / memory-efficient attention saves: q, k, v, out, fp32 logsumexp."""

    @staticmethod
    def forward(ctx, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        out = q.new_empty(*q.shape[:-1], v.shape[-1])  # (B, heads, Nq, Dv)
        lse = q.new_empty(q.shape[:-1], dtype=torch.float32)  # (B, heads, Nq)
        ctx.save_for_backward(q, k, v, out, lse)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # never run: the meta step is only counted
        raise RuntimeError("FlashSDPA counts saved tensors on the meta device; it has no backward")


class Bf16Autocast(TorchFunctionMode):
    """CUDA bf16 autocast for meta tensors (autocast ignores them), with attention as GPU SDPA saves it."""

    def __init__(self, enabled: bool = True, weight_copies: set[int] | None = None):
        super().__init__()
        self.enabled = enabled
        self.weight_copies = weight_copies if weight_copies is not None else set()  # filled: storages of cast params
        self.cached_bytes = 0  # what autocast's cache holds: one copy per cast of a trainable parameter

    def __torch_function__(self, func: Callable, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.enabled and func in BF16_OPS:
            args, kwargs = self.cast(args, torch.bfloat16), self.cast(kwargs, torch.bfloat16)
        elif self.enabled and func in FP32_OPS:
            args, kwargs = self.cast(args, torch.float32), self.cast(kwargs, torch.float32)
        if func is F.scaled_dot_product_attention:
            q, k, v = args[:3]
            return FlashSDPA.apply(q, k, v)
        return func(*args, **kwargs)

    def cast(self, x: Any, dtype: torch.dtype) -> Any:
        """Floating tensors in a (nested) argument structure cast to `dtype`; casts of parameters remembered."""
        if isinstance(x, torch.Tensor):
            if not x.is_floating_point() or x.dtype == dtype:
                return x
            y = x.to(dtype)
            if isinstance(x, torch.nn.Parameter) and x.requires_grad:
                self.weight_copies.add(_storage_key(y))
                self.cached_bytes += y.untyped_storage().nbytes()
            return y
        if isinstance(x, (tuple, list)):
            return type(x)(self.cast(v, dtype) for v in x)
        if isinstance(x, dict):
            return {k: self.cast(v, dtype) for k, v in x.items()}
        return x


def counting_checkpoint(outer: SavedBytes, recompute: list[int]) -> Callable:
    """A diffusers `gradient_checkpointing_func` that counts what checkpointing keeps: the block inputs.

    The block itself runs under its own counter (what backward re-creates when it recomputes the block); its
    saved bytes go to `recompute`, not to the step's total, as with `torch.utils.checkpoint`.
    """

    def checkpoint(module: Callable, *args: Any) -> Any:
        for a in args:
            if isinstance(a, torch.Tensor):
                outer.add(a, "checkpoint inputs")
        inner = SavedBytes(exclude=outer_params(module), weight_copies=outer.weight_copies)
        with inner.hooks():
            out = module(*args)
        recompute.append(inner.total)
        return out

    return checkpoint


def outer_params(module: Any) -> Iterator[torch.Tensor]:
    """Parameters of a module (or of the module a bound `__call__` belongs to)."""
    owner = getattr(module, "__self__", module)
    return owner.parameters() if isinstance(owner, torch.nn.Module) else iter(())


@dataclass(frozen=True)
class StepBytes:
    """What one meta-device training step of batch 1 holds, in bytes."""

    activations: int  # saved for backward (student activations, feature-loss differences), per sample
    weight_copies: int  # bf16 copies of student weights cached by autocast (until it exits, after the loss)
    teacher_features: int  # teacher tap features held until the feature loss, per sample
    recompute: int  # the largest checkpointed block's saved bytes, re-created in backward (0 without checkpointing)
    largest: int  # the largest single saved tensor


def measure_step(
    student_name: str,
    resolution: int,
    checkpointing: bool,
    distill: str = "koala",
    teacher_config: dict | None = None,
    bf16: bool = True,
) -> StepBytes:
    """Run teacher + student + taps + losses of one batch-1 step on the meta device and count what it holds."""
    t_config = dict(teacher_config or SDXL_UNET_CONFIG)
    plan = resolve(t_config, get_spec(student_name))
    teacher = freeze(build_unet(t_config, device="meta").to(torch.bfloat16 if bf16 else torch.float32))
    student = build_student(t_config, plan, device="meta").train()
    cfg = compose_config("train", [f"distill={distill}"], schema=TrainConfig)
    task = make_task(cfg, student, teacher, plan, latent_size=resolution // 8)
    counter, recompute = SavedBytes(exclude=student.parameters()), []
    if checkpointing:
        student.enable_gradient_checkpointing(counting_checkpoint(counter, recompute))
    x = random_inputs(t_config, resolution, batch=1)
    autocast = Bf16Autocast(enabled=bf16, weight_copies=counter.weight_copies)
    with task, autocast, counter.hooks():
        task(x["noisy"], x["t"], x, x["target"])
        held = SavedBytes()
        for f in task.teacher_taps.features.values():
            held.add(f)
    return StepBytes(
        counter.bytes.get("activations", 0) + counter.bytes.get("checkpoint inputs", 0),
        autocast.cached_bytes,
        held.total,
        max(recompute, default=0),
        counter.largest,
    )
