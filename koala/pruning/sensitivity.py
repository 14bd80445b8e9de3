"""How much the teacher's prediction moves when a unit is removed, on a fixed calibration set.

For each selection (a unit removed as the inherited student removes it, `koala.pruning.surgery`):

    out  = E[(eps_removed - eps)^2] / Var(eps)        eps: the teacher's own prediction
    feat = E[(h_removed - h)^2] / Var(h)              h: the hidden state entering the next stage

over every calibration input (0: no change; 1: no closer than a constant at the teacher's mean). "The next stage" of
a unit in `down_blocks.i` is the input of the block after it in forward order (`down_blocks.i+1`, `mid_block`,
`up_blocks.0`, ..., `conv_norm_out`), skipping a mid block the selection drops. The teacher runs once per batch and
every selection after it on the same batch, so no teacher feature is held beyond one batch.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from koala.distill.taps import block_names, unwrap
from koala.errors import ConfigError
from koala.models.forward import COND_KEYS, unet_forward
from koala.pruning.surgery import Selection, bypassed
from koala.train.diffusion import sample_noise
from koala.train.step import Noising


def calibration_inputs(batches, conditioner, noising: Noising, samples: int, seed: int, device) -> list[dict]:
    """`samples` noisy latents at the training timesteps with their conditioning, in batches; fixed by `seed`.

    Timesteps and noise are drawn as training draws them (`timesteps`, `noise_offset`), from a seeded RNG that leaves
    the caller's untouched."""
    out, have = [], 0
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for batch in batches:
            cond = conditioner(batch)
            lat = cond["latents"][: samples - have].float()
            noise = sample_noise(lat, noising.noise_offset)
            t = noising.sample_t(lat.shape[0], lat.device)
            x = {k: cond[k][: lat.shape[0]].to(device) for k in COND_KEYS}
            out.append({**x, "noisy": noising.scheduler.add_noise(lat, noise, t).to(device), "t": t.to(device)})
            have += lat.shape[0]
            if have >= samples:
                return out
    raise ConfigError(f"the data gave {have} samples, fewer than search.samples={samples}: lower it or add data")


def next_point(unet: nn.Module, block: str, selection: Selection) -> str:
    """The module whose input is "the next stage" after `block` (a mid block the selection drops is skipped)."""
    order = block_names(unet) + ["conv_norm_out"]
    after = order[order.index(block) + 1 :]
    return next(p for p in after if not (p == "mid_block" and selection.get("mid_block", ()) is None))


@contextmanager
def stage_inputs(unet: nn.Module, names: list[str]) -> Iterator[dict[str, Tensor]]:
    """Capture the hidden-state input of each named top-level module during a forward."""
    model, got, handles = unwrap(unet), {}, []

    def grab(name: str):
        def hook(module, args, kwargs):
            got[name] = (args[0] if args else kwargs["hidden_states"]).float()

        return hook

    try:
        for name in set(names):
            handles.append(model.get_submodule(name).register_forward_pre_hook(grab(name), with_kwargs=True))
        yield got
    finally:
        for h in handles:
            h.remove()


@dataclass
class Moments:
    """Running sum, sum of squares and count of a reference tensor, and squared errors against it."""

    s1: float = 0.0
    s2: float = 0.0
    n: int = 0

    def add(self, x: Tensor) -> None:
        self.s1, self.s2, self.n = self.s1 + x.sum().item(), self.s2 + x.square().sum().item(), self.n + x.numel()

    def relative(self, sse: float) -> float:
        """Mean squared error over the reference's variance."""
        var = self.s2 / self.n - (self.s1 / self.n) ** 2
        return (sse / self.n) / var


@dataclass
class Sensitivity:
    """Errors of every measured selection, and what measuring cost."""

    out: dict[str, float]
    feat: dict[str, float]
    point: dict[str, str]  # where each feature error was measured
    forwards: int = 0
    seconds: float = 0.0


def _predict(unet: nn.Module, x: dict, dtype: torch.dtype) -> Tensor:
    """The U-Net's eps for one calibration batch, in fp32."""
    return unet_forward(unet, x["noisy"], x["t"], x, dtype=dtype).float()


@torch.no_grad()
def measure(
    teacher: nn.Module,
    inputs: list[dict],
    selections: dict[str, Selection],
    blocks: dict[str, str] | None = None,
    progress=None,
) -> Sensitivity:
    """Output error of each selection, and with `blocks` (selection -> the block its unit is in) the feature error at
    the next stage; `progress(done, total)` is called after each batch."""
    model = unwrap(teacher).eval()
    dtype = next(model.parameters()).dtype
    points = {k: next_point(model, b, selections[k]) for k, b in (blocks or {}).items()}
    ref_out, ref_feat = Moments(), {p: Moments() for p in set(points.values())}
    sse_out, sse_feat = dict.fromkeys(selections, 0.0), dict.fromkeys(points, 0.0)
    t0, forwards = time.perf_counter(), 0
    for done, x in enumerate(inputs, 1):
        with stage_inputs(model, list(ref_feat)) as feats:
            eps = _predict(model, x, dtype)
        ref = dict(feats)
        ref_out.add(eps)
        for p, f in ref.items():
            ref_feat[p].add(f)
        for name, selection in selections.items():
            with bypassed(model, selection), stage_inputs(model, [points[name]] if name in points else []) as got:
                sse_out[name] += (_predict(model, x, dtype) - eps).square().sum().item()
            if name in points:
                sse_feat[name] += (got[points[name]] - ref[points[name]]).square().sum().item()
        forwards += 1 + len(selections)
        if progress is not None:
            progress(done, len(inputs))
    return Sensitivity(
        out={k: ref_out.relative(v) for k, v in sse_out.items()},
        feat={k: ref_feat[points[k]].relative(v) for k, v in sse_feat.items()},
        point=points,
        forwards=forwards,
        seconds=time.perf_counter() - t0,
    )
