"""Where a teacher's SDXL parts come from: a diffusers pipeline folder, or one full original-layout checkpoint file.

`teacher.pipeline` names either. A folder is read with `from_pretrained`, as always. A full SGM checkpoint
(`koala.models.single_file`) is converted part by part with diffusers' own single-file code
(`convert_ldm_unet_checkpoint`, `convert_ldm_vae_checkpoint`, `create_diffusers_clip_model_from_ldm`) onto the configs of
a local diffusers folder: `teacher.config`, by default koala's SDXL-Base configs (koala/assets/sdxl-base, no weights).
Only the tensors of the part asked for are read. Tokenizers come from that folder when it holds their files, else
they are derived from CLIP's BPE merges shipped with koala (koala.models.clip_vocab). Nothing is fetched from a hub.

Before anything is loaded, `check_file` verifies the whole file on meta tensors: what it is (SD 1.x, SD3, Flux, a
U-Net alone ... are named and refused) and that every part converts onto its config with no tensor missing or
mis-shaped (a fine-tune of another shape needs `teacher.config`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import torch
from accelerate import init_empty_weights
from diffusers import AutoencoderKL, StableDiffusionXLPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from koala.models.clip_vocab import clip_tokenizer
from koala.models.single_file import PARTS, CheckpointInfo, meta_part, read_part, require_full_sdxl

SDXL_BASE_CONFIG = Path(__file__).resolve().parents[1] / "assets" / "sdxl-base"  # configs only, no weights
TEXT_ENCODERS = {"text_encoder": CLIPTextModel, "text_encoder_2": CLIPTextModelWithProjection}
TOKENIZERS = ("tokenizer", "tokenizer_2")
IGNORED = ("position_ids",)  # a buffer many files carry and transformers rebuilds


@dataclass(frozen=True)
class PipelineSource:
    """An SDXL pipeline's parts on disk: a diffusers folder, or a full SGM `.safetensors` file plus a config folder."""

    path: Path
    config: Path | None = None  # a file's config folder; None: koala's SDXL-Base configs

    @classmethod
    def of(cls, teacher_cfg: Any) -> PipelineSource:
        """The source a `teacher` config section names (`pipeline`, `config`)."""
        config = teacher_cfg.get("config") if hasattr(teacher_cfg, "get") else getattr(teacher_cfg, "config", None)
        return cls(Path(teacher_cfg.pipeline), Path(config) if config else None)

    @property
    def is_file(self) -> bool:
        return self.path.suffix.lower() == ".safetensors"

    @property
    def config_dir(self) -> Path:
        """The folder holding the component configs: the pipeline folder itself, or a file's config folder."""
        return (self.config or SDXL_BASE_CONFIG) if self.is_file else self.path

    @cached_property
    def info(self) -> CheckpointInfo:
        """The file's header description (a file source only): a full SDXL checkpoint, or an error naming what the
        file is."""
        return require_full_sdxl(self.path)

    def check_header(self) -> None:
        """Refuse anything but a full SDXL checkpoint, from the file's header (no weights read)."""
        require_full_sdxl(self.path)

    def component_config(self, name: str) -> dict[str, Any]:
        """A component's config (`unet`, `vae`, `scheduler`, `text_encoder`, ...) as a dict."""
        return component_config(self.config_dir, name)

    def tokenizers(self) -> list[CLIPTokenizer]:
        """Both tokenizers: from the folder's files, else derived from CLIP's shipped merges (settings from the
        config folder)."""
        out = []
        for name in TOKENIZERS:
            folder = self.config_dir / name
            has_vocab = (folder / "vocab.json").is_file() or (folder / "tokenizer.json").is_file()
            out.append(
                CLIPTokenizer.from_pretrained(folder) if has_vocab or not self.is_file else clip_tokenizer(folder)
            )
        return out

    def text_encoders(self, dtype: torch.dtype | None = None) -> list[torch.nn.Module]:
        """CLIP-L and OpenCLIP-bigG (with projection), in `dtype` (None: as stored)."""
        if not self.is_file:
            return [cls.from_pretrained(self.path / name, dtype=dtype) for name, cls in TEXT_ENCODERS.items()]
        from diffusers.loaders.single_file_utils import create_diffusers_clip_model_from_ldm

        self.check_header()  # refuses anything but a full SDXL checkpoint before a tensor is read
        encoders = []
        for name, cls in TEXT_ENCODERS.items():
            state = read_part(self.path, name)  # this encoder's only: diffusers tells the two apart by width alone
            stored = next(v.dtype for v in state.values() if v.is_floating_point())
            encoders.append(create_diffusers_clip_model_from_ldm(
                cls, state, subfolder=name, config=str(self.config_dir), torch_dtype=dtype or stored,
                local_files_only=True,
            ))  # fmt: skip
        return encoders

    def vae(self, dtype: torch.dtype | None = None) -> AutoencoderKL:
        """The VAE, in `dtype` (None: as stored)."""
        if not self.is_file:
            return AutoencoderKL.from_pretrained(self.path / "vae", torch_dtype=dtype)
        from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

        config = self.component_config("vae")
        vae = build_loaded(AutoencoderKL, config, convert_ldm_vae_checkpoint(read_part(self.path, "vae"), config))
        return vae if dtype is None else vae.to(dtype)

    def pipeline(
        self, unet: torch.nn.Module, scheduler: Any, vae: AutoencoderKL | None = None
    ) -> StableDiffusionXLPipeline:
        """A stock SDXL pipeline of these parts around another U-Net and scheduler (optionally another VAE), fp32."""
        if not self.is_file:
            extra = {"vae": vae} if vae is not None else {}
            return StableDiffusionXLPipeline.from_pretrained(
                self.path, unet=unet, scheduler=scheduler, use_safetensors=True, **extra
            )
        index_path = self.config_dir / "model_index.json"
        index = json.loads(index_path.read_text()) if index_path.is_file() else {}
        (tokenizer, tokenizer_2), (text_encoder, text_encoder_2) = self.tokenizers(), self.text_encoders(torch.float32)
        return StableDiffusionXLPipeline(
            vae=vae if vae is not None else self.vae(torch.float32), text_encoder=text_encoder,
            text_encoder_2=text_encoder_2, tokenizer=tokenizer, tokenizer_2=tokenizer_2, unet=unet, scheduler=scheduler,
            force_zeros_for_empty_prompt=index.get("force_zeros_for_empty_prompt", True),
        )  # fmt: skip

    def check_file(self) -> None:
        """Refuse a file that is not a full SDXL checkpoint fitting the configs, on meta tensors (no weights read)."""
        check_parts(self.info, self.config_dir)


def component_config(config_dir: Path, name: str) -> dict[str, Any]:
    """A component's config (`unet`, `vae`, `scheduler`, `text_encoder`, ...) in a diffusers folder, as a dict."""
    path = Path(config_dir) / name / ("scheduler_config.json" if name == "scheduler" else "config.json")
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: {config_dir} has no {name} config")
    return json.loads(path.read_text())


def check_parts(info: CheckpointInfo, config_dir: Path) -> None:
    """Every part of a full checkpoint converts onto its config in `config_dir` with no tensor missing, left over or
    mis-shaped (on meta tensors: no weights are read); else a ValueError naming the part and the tensors."""
    for name in PARTS:
        model = _empty(config_dir, name)
        problems = state_dict_problems(model.state_dict(), _meta_converted(info, config_dir, name, model))
        if problems:
            raise ValueError(
                f"{info.path}: its {name} ({PARTS[name]}*) does not fit the config in {Path(config_dir) / name} "
                f"({problems}); for a checkpoint that is not SDXL-Base-shaped, pass teacher.config=<a local diffusers "
                "folder with its configs>"
            )


def _empty(config_dir: Path, name: str) -> torch.nn.Module:
    """A part's model of its config, without weights."""
    with init_empty_weights():
        if name in TEXT_ENCODERS:
            return TEXT_ENCODERS[name](CLIPTextConfig.from_pretrained(Path(config_dir) / name))
        cls = AutoencoderKL if name == "vae" else UNet2DConditionModel
        return cls.from_config({k: v for k, v in component_config(config_dir, name).items() if not k.startswith("_")})


def _meta_converted(
    info: CheckpointInfo, config_dir: Path, name: str, model: torch.nn.Module
) -> dict[str, torch.Tensor]:
    """A part's tensors as meta tensors under diffusers' names, converted as loading converts them."""
    from diffusers.loaders.single_file_utils import (
        convert_ldm_clip_checkpoint,
        convert_ldm_unet_checkpoint,
        convert_ldm_vae_checkpoint,
        convert_open_clip_checkpoint,
    )

    state = meta_part(info, name)
    if name == "unet":
        return convert_ldm_unet_checkpoint(state, component_config(config_dir, name))
    if name == "vae":
        return convert_ldm_vae_checkpoint(state, component_config(config_dir, name))
    if name == "text_encoder":
        converted = convert_ldm_clip_checkpoint(state)
    else:
        converted = convert_open_clip_checkpoint(model, state, prefix=PARTS[name])
    if not hasattr(model, "text_model"):  # transformers >= 5.6 flattened CLIPTextModel, as diffusers handles
        converted = {k.removeprefix("text_model."): v for k, v in converted.items()}
    return converted


def state_dict_problems(own: dict[str, torch.Tensor], state: dict[str, torch.Tensor]) -> str:
    """A short account of missing, unexpected and mis-shaped tensors ('' when `state` fits `own`)."""
    missing = [k for k in own if k not in state and not k.endswith(IGNORED)]
    unexpected = [k for k in state if k not in own and not k.endswith(IGNORED)]
    shapes = [f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in own if k in state and
              tuple(state[k].shape) != tuple(own[k].shape)]  # fmt: skip
    found = [(missing, "missing"), (unexpected, "unexpected"), (shapes, "shape mismatch")]
    return "; ".join(f"{what} {len(p)}: {', '.join(p[:3])}{' ...' if len(p) > 3 else ''}" for p, what in found if p)


def build_loaded(cls: type, config: dict[str, Any], state: dict[str, torch.Tensor]) -> torch.nn.Module:
    """A diffusers model of `config` holding exactly `state` (no random initialisation first)."""
    with init_empty_weights():
        model = cls.from_config({k: v for k, v in config.items() if not k.startswith("_")})
    problems = state_dict_problems(model.state_dict(), state)
    if problems:
        raise ValueError(f"{cls.__name__} weights do not fit its config: {problems}")
    model.load_state_dict(state, strict=True, assign=True)
    return model.eval()
