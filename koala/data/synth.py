"""Teacher samples as training data (`python -m koala.synth`): prompts in, a latent cache of the teacher's pictures out.

Every prompt (times `per_prompt`) is one item with a fixed index and seed (`seed + index`), so a sample is the same
whoever draws it. The teacher samples each item with its own preset (`koala.ship.presets.teacher_preset`); the final
latents, the prompt's text embeddings (both encoders' hidden states + pooled, exactly what conditioned the teacher)
and time ids are stored as a cached sample (`koala.data.cached`: `<key>.safetensors`), with a small JPEG preview
(`<key>.jpg`) and the prompt, seed, settings, teacher identity and licence (`<key>.json`, and in the safetensors
metadata). `data=synth` (a `data.kind=cached` preset) trains from the folder.

Runs and resumes: rank r of W takes every W-th item not yet in a complete shard. Shards are written under a
temporary name, synced and renamed (koala.data.cache_writer.CacheWriter), named after their first item
(`synth-<key>.tar`), so a rerun after any interruption removes the unfinished `.tmp` files and draws exactly the
items missing, on any number of ranks. `info.json` records what the folder is a sample of (teacher identity, licence,
settings, prompts); a rerun with anything different is refused instead of mixing two setups.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import tarfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors.torch import save
from tqdm import tqdm

from koala.data.cache_writer import CacheWriter, seal_cache, sync_dir
from koala.data.cached import EMPTY_PROMPT, MARKER
from koala.data.prompts import read_prompts
from koala.devices import DTYPES, multi_cpu
from koala.errors import ConfigError
from koala.models.identity import teacher_identity
from koala.models.pipeline_parts import PipelineSource
from koala.ship.presets import Preset, preset_scheduler, teacher_preset
from koala.ship.sampling import decode_latents, inputs_in_dtype_of

if TYPE_CHECKING:
    from koala.config.schema import TeacherConfig
    from koala.synth import SynthConfig

FORMAT = "koala-synth/1"
INFO = "info.json"
LIMITS = {  # setting -> its smallest value (null, where the schema allows it, takes the default)
    "per_prompt": 1, "batch_size": 1, "samples_per_shard": 1, "preview": 0, "limit": 1, "steps": 1, "guidance": 0,
    "resolution": 1,
}  # fmt: skip


@dataclass(frozen=True)
class Item:
    """One sample to draw: the index-th of the run, prompt and seed."""

    index: int
    prompt: str
    seed: int

    @property
    def key(self) -> str:
        return f"{self.index:08d}"


def plan_items(prompts: list[str], per_prompt: int, seed: int, limit: int | None = None) -> list[Item]:
    """Every (prompt, repeat) as an item: prompt i's r-th sample is item i * per_prompt + r, seeded `seed + index`."""
    items = [Item(i * per_prompt + r, p, seed + i * per_prompt + r) for i, p in enumerate(prompts)
             for r in range(per_prompt)]  # fmt: skip
    return items[:limit] if limit else items


def shard_name(key: str) -> str:
    """A shard is named after its first item: unique across ranks and reruns."""
    return f"synth-{key}.tar"


def done_keys(out: Path) -> set[str]:
    """Keys of the samples in the complete shards of `out` (a `.tmp` shard is unfinished and not counted)."""
    keys: set[str] = set()
    for shard in sorted(out.glob("*.tar")):
        try:
            with tarfile.open(shard) as tar:
                keys |= {n.split(".", 1)[0] for n in tar.getnames() if n.endswith(".safetensors")}
        except tarfile.TarError as e:
            raise ConfigError(f"{shard}: unreadable shard ({e}); delete it to draw its samples again") from None
    return keys


def my_share(items: list[Item], done: set[str], rank: int, world: int) -> list[Item]:
    """This rank's items: every world-th of those not done (ranks' shares are disjoint and cover them all)."""
    return [item for item in items if item.key not in done][rank::world]


def check_settings(cfg: SynthConfig) -> None:
    """Refuse settings that cannot work, in one line, before any model is loaded."""
    if not cfg.prompts:
        raise ConfigError("prompts= is required: a .txt, .csv, .json, .jsonl or .parquet file, a folder of them, or "
                          "webdataset shards whose captions are the prompts ('<dir>/{00000..00009}.tar')")  # fmt: skip
    if not cfg.license or not str(cfg.license).strip():
        raise ConfigError("license= is required: the licence the teacher's outputs are under (e.g. "
                          "license=openrail++ for SDXL-Base; license=unknown records that you do not know)")  # fmt: skip
    for key, low in LIMITS.items():
        if cfg[key] is not None and cfg[key] < low:
            raise ConfigError(f"{key}={cfg[key]}: expected a number >= {low}")


def check_teacher(teacher: TeacherConfig) -> None:
    """Refuse a teacher whose weights are not where its config says, or a single file that is not a full SDXL
    checkpoint (read from its header, before any weight loads)."""
    if not teacher.pipeline:
        raise ConfigError(
            f"teacher.pipeline is not set for teacher={teacher.name}: a diffusers SDXL folder or a full SDXL "
            ".safetensors checkpoint"
        )
    for key in ("pipeline", "unet", "vae"):
        if teacher[key] and not Path(teacher[key]).exists():
            raise ConfigError(f"teacher.{key}={teacher[key]}: no such file or folder")
    source = PipelineSource.of(teacher)
    if Path(teacher.pipeline).is_file() and not source.is_file:
        raise ConfigError(f"teacher.pipeline={teacher.pipeline!r} is a file but not .safetensors")
    if source.is_file:
        try:
            source.check_file()
        except (ValueError, FileNotFoundError) as e:
            raise ConfigError(f"teacher.pipeline={teacher.pipeline!r}: {e}") from None


def sampling_preset(cfg: SynthConfig) -> Preset:
    """The teacher's own preset (its kind, `teacher.steps`), with `steps` / `guidance` when set."""
    preset = teacher_preset(cfg.teacher.kind, cfg.steps or cfg.teacher.steps)
    return preset if cfg.guidance is None else dataclasses.replace(preset, guidance=float(cfg.guidance))


def load_pipeline(teacher: TeacherConfig, device: torch.device, dtype: torch.dtype):
    """The teacher as an SDXL pipeline: the frozen teacher U-Net (`teacher.unet` or the pipeline's) in `dtype`, the
    pipeline's text encoders, and its VAE (or `teacher.vae`) kept in fp32 unless given (SDXL's overflows in fp16)."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler

    from koala.models.teacher import load_teacher

    source = PipelineSource.of(teacher)  # a diffusers folder or a full single-file checkpoint
    vae = AutoencoderKL.from_pretrained(teacher.vae, torch_dtype=dtype) if teacher.vae else None
    scheduler = EulerDiscreteScheduler.from_config(source.component_config("scheduler"))  # replaced by the preset's
    pipe = source.pipeline(load_teacher(teacher, dtype=dtype), scheduler, vae)
    pipe.text_encoder.to(dtype)
    pipe.text_encoder_2.to(dtype)
    if vae is None:
        pipe.vae.to(torch.float32)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


class TeacherSampler:
    """Samples items with the teacher's preset: final latents, the text conditioning they were drawn with, previews."""

    def __init__(self, pipe, preset: Preset, resolution: int | None, negative_prompt: str | None, preview: int) -> None:
        self.pipe, self.preset, self.negative, self.preview = pipe, preset, negative_prompt, preview
        pipe.scheduler = preset_scheduler(pipe.scheduler.config, preset)
        size = resolution or pipe.default_sample_size * pipe.vae_scale_factor
        self.height = self.width = size

    def settings(self) -> dict[str, Any]:
        """What every sample was drawn with (recorded per sample and in info.json)."""
        scheduler = self.pipe.scheduler
        return {"preset": self.preset.name, "steps": self.preset.steps, "guidance": self.preset.guidance,
                "scheduler": type(scheduler).__name__, "timestep_spacing": scheduler.config.timestep_spacing,
                "height": self.height, "width": self.width, "negative_prompt": self.negative,
                "dtype": str(self.pipe.unet.dtype).removeprefix("torch.")}  # fmt: skip

    @torch.no_grad()
    def __call__(self, items: list[Item]) -> tuple[dict[str, torch.Tensor], list[bytes]]:
        """Draw a batch: {latents, prompt_embeds, pooled_prompt_embeds, time_ids} and JPEG previews."""
        pipe, prompts = self.pipe, [item.prompt for item in items]
        embeds, pooled = encode(pipe, prompts)
        generators = [torch.Generator("cpu").manual_seed(item.seed) for item in items]  # the same noise on any device
        with inputs_in_dtype_of(pipe.unet):
            latents = pipe(
                prompt_embeds=embeds, pooled_prompt_embeds=pooled, guidance_scale=self.preset.guidance,
                negative_prompt=[self.negative] * len(items) if self.negative else None,
                num_inference_steps=self.preset.steps, height=self.height, width=self.width,
                generator=generators, output_type="latent",
            ).images  # fmt: skip
        time_ids = torch.tensor([[self.height, self.width, 0, 0, self.height, self.width]] * len(items))
        previews = [jpeg(decode_latents(pipe, latents[i : i + 1])[0], self.preview) for i in range(len(items))]
        tensors = {"latents": latents, "prompt_embeds": embeds, "pooled_prompt_embeds": pooled, "time_ids": time_ids}
        return {k: v.float().cpu() for k, v in tensors.items()}, previews


def encode(pipe, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """(prompt_embeds (B, 77, D1 + D2), pooled (B, P)) by the pipeline's own `encode_prompt`, without guidance."""
    embeds, _, pooled, _ = pipe.encode_prompt(prompts, device=pipe._execution_device, do_classifier_free_guidance=False)
    return embeds, pooled


def jpeg(image, size: int) -> bytes:
    """A JPEG of the picture, at most `size` pixels on its long side (empty bytes for size 0)."""
    if not size:
        return b""
    image = image.convert("RGB")
    image.thumbnail((size, size))
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=90, subsampling=0)  # 4:4:4: small previews keep their colours
    return buf.getvalue()


def manifest(cfg: SynthConfig, prompts: list[str], items: list[Item], settings: dict, identity: dict) -> dict:
    """What a synth folder is a sample of; a rerun into the same folder must match it."""
    digest = hashlib.sha256("\n".join(prompts).encode()).hexdigest()
    return {"format": FORMAT, "teacher": identity, "license": str(cfg.license), "settings": settings,
            "prompts": {"source": str(cfg.prompts), "count": len(prompts), "sha256": digest},
            "seed": cfg.seed, "per_prompt": cfg.per_prompt, "items": len(items)}  # fmt: skip


def check_resume(out: Path, expected: dict) -> None:
    """Refuse to add to a folder that holds samples of another setup (one line naming what differs)."""
    if not (out / INFO).is_file():
        return
    found = json.loads((out / INFO).read_text())
    same = ("format", "license", "settings", "seed", "per_prompt", "items")
    differ = [k for k in same if found.get(k) != expected[k]]
    differ += ["teacher"] if found.get("teacher", {}).get("sha256") != expected["teacher"]["sha256"] else []
    differ += ["prompts"] if found.get("prompts", {}).get("sha256") != expected["prompts"]["sha256"] else []
    if differ:
        raise ConfigError(f"{out} holds samples of another setup ({', '.join(differ)} differ from {out / INFO}); "
                          "rerun with the same settings to resume, or choose another out=")  # fmt: skip


def write_atomic(path: Path, data: bytes) -> None:
    """Write a file atomically (temporary name, fsync, rename): a crash leaves the old file or none."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    sync_dir(path.parent)


def write_json(path: Path, data: dict) -> None:
    """Write JSON atomically."""
    write_atomic(path, json.dumps(data, indent=1).encode())


def prepare(out: Path, info: dict, pipe) -> None:
    """Rank 0 before anyone writes: remove unfinished shards, record the setup and the empty prompt's embeddings."""
    for tmp in out.glob("*.tmp"):
        tmp.unlink()
    (out / MARKER).unlink(missing_ok=True)  # the folder is complete again only when this run finishes it
    if not (out / INFO).is_file():
        write_json(out / INFO, {**info, "samples": 0, "complete": False})
    if not (out / EMPTY_PROMPT).is_file():  # caption_dropout_mode=empty reads it, as for a koala.cache folder
        embeds, pooled = encode(pipe, [""])
        tensors = {"prompt_embeds": embeds[0], "pooled_prompt_embeds": pooled[0]}
        write_atomic(out / EMPTY_PROMPT, save({k: v.float().cpu().contiguous() for k, v in tensors.items()}))


def sample_meta(item: Item, rank: int, info: dict) -> dict[str, Any]:
    """Per-sample record: prompt, seed, settings, teacher identity, licence, and the cache's size fields."""
    s = info["settings"]
    return {"prompt": item.prompt, "caption": item.prompt, "seed": item.seed, "index": item.index, "rank": rank,
            "settings": s, "teacher": {k: info["teacher"][k] for k in ("name", "mode", "sha256")},
            "license": info["license"], "original_size": [s["height"], s["width"]], "crop_top_left": [0, 0],
            "target_size": [s["height"], s["width"]], "flipped": False}  # fmt: skip


def draw(sampler: TeacherSampler, writer: CacheWriter, mine: list[Item], batch_size: int, info: dict, rank: int,
         world: int) -> None:  # fmt: skip
    """Sample this rank's items batch by batch into the writer, with a progress bar (samples/s) on rank 0."""
    with tqdm(total=len(mine), unit="sample", desc=f"synth (rank 0 of {world})", disable=rank != 0) as bar:
        for start in range(0, len(mine), batch_size):
            batch = mine[start : start + batch_size]
            tensors, previews = sampler(batch)
            for i, item in enumerate(batch):
                meta = sample_meta(item, rank, info)
                extra = {"json": json.dumps(meta).encode(), **({"jpg": previews[i]} if previews[i] else {})}
                writer.add(item.key, {k: v[i] for k, v in tensors.items()}, meta, extra)
            bar.update(len(batch))
            rate = bar.n / max(bar.format_dict["elapsed"], 1e-9)
            bar.set_postfix_str(f"{rate:.2f} samples/s")  # tqdm's own rate turns into s/sample below 1
    writer.close()


def synthesize(cfg: SynthConfig) -> Path:
    """Draw every item of `cfg.prompts` not yet in `cfg.out` (this rank's share) and write it as cached shards."""
    from accelerate import PartialState

    check_settings(cfg)
    prompts = read_prompts(cfg.prompts, cfg.column, cfg.caption_key)  # bad files fail here, on every rank alike
    check_teacher(cfg.teacher)
    items = plan_items(prompts, cfg.per_prompt, cfg.seed, cfg.limit)
    state = PartialState(cpu=multi_cpu())  # gloo on CPU processes (else each would think itself rank 0 of 1)
    rank, world = state.process_index, state.num_processes
    device = state.device if cfg.device == "auto" else torch.device(cfg.device)
    dtype_name = str(cfg.teacher.dtype) if device.type != "cpu" else "fp32"
    dtype = DTYPES[dtype_name]
    identity = teacher_identity(cfg.teacher, cfg.identity)  # every rank: no collective before the checks
    pipe = load_pipeline(cfg.teacher, device, dtype)
    sampler = TeacherSampler(pipe, sampling_preset(cfg), cfg.resolution, cfg.negative_prompt, cfg.preview)
    info = {**manifest(cfg, prompts, items, sampler.settings(), identity), "conditioning_dtype": dtype_name}
    out = Path(cfg.out)
    check_resume(out, info)  # every rank refuses alike, before anyone waits
    out.mkdir(parents=True, exist_ok=True)
    if rank == 0:
        prepare(out, info, pipe)
    state.wait_for_everyone()
    done = done_keys(out)
    state.wait_for_everyone()  # every rank has read the same set before anyone adds to it
    mine = my_share(items, done, rank, world)
    writer = CacheWriter(out, rank, cfg.samples_per_shard, DTYPES[cfg.dtype], shard_name=shard_name)
    t0 = time.perf_counter()
    draw(sampler, writer, mine, cfg.batch_size, info, rank, world)
    state.wait_for_everyone()
    if rank == 0:
        finish(out, info, len(items), len(done), world, time.perf_counter() - t0)
    return out


def finish(out: Path, info: dict, planned: int, before: int, world: int, seconds: float) -> None:
    """Record how many samples the folder holds and say what this run added."""
    samples = len(done_keys(out) & {f"{i:08d}" for i in range(planned)})
    write_json(out / INFO, {**info, "samples": samples, "complete": samples == planned})
    if samples == planned:  # data=synth (a cached preset) trains only from a folder its marker says is complete
        seal_cache(out, {"shards": sorted(p.name for p in out.glob("*.tar")), "samples": samples, "skipped": {}})
    added = samples - before
    print(f"synth: {samples} of {planned} samples in {out} ({added} drawn now on {world} rank(s) in {seconds:.0f} s, "
          f"{added / max(seconds, 1e-9):.2f} samples/s; {before} were already there)")  # fmt: skip
