"""Load the frozen teacher U-Net from local files only: never a model hub.

Accepted sources (`load_unet`):
  (a) a diffusers SDXL pipeline folder (its `unet/` is used);
  (b) a diffusers U-Net folder (`config.json` + safetensors weights, single file, fp16 variant or shards);
  (c) one `.safetensors` file of U-Net weights in diffusers key layout, placed onto a base config
      (SDXL-Lightning / Turbo U-Net files);
  (d) one `.safetensors` single-file checkpoint in the original SGM / ComfyUI layout
      (`model.diffusion_model.input_blocks...`), converted with diffusers' own single-file conversion: a U-Net
      alone, or the U-Net of a full checkpoint (text encoders and VAE in the same file; only the U-Net's tensors
      are read). `teacher.pipeline` may name such a full checkpoint (koala.models.pipeline_parts).
The layout of a single file is detected from its keys. Pickle formats are refused: they can run code on load.

Freezing (`freeze`): no parameter requires grad, and the instance's `train` method is replaced by one that
always switches to eval, so `task.train()` on a parent module cannot enable dropout in the teacher. The object
stays a plain `UNet2DConditionModel` (pipelines, taps, `save_pretrained` work as usual).
"""

from __future__ import annotations

import json
import types
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from accelerate import init_empty_weights
from diffusers import UNet2DConditionModel
from diffusers.models.attention_processor import AttnProcessor2_0
from safetensors.torch import load_file

from koala.devices import parse_dtype
from koala.models.archs import SDXL_UNET_CONFIG
from koala.models.convert import ORIGINAL_PREFIX, is_original_layout
from koala.models.pipeline_parts import PipelineSource
from koala.models.plans import teacher_unet_config
from koala.models.single_file import read_header, read_part

if TYPE_CHECKING:
    from koala.config.schema import TeacherConfig

PICKLE_SUFFIXES = (".ckpt", ".bin", ".pt", ".pth", ".pkl")
WEIGHT_NAME = "diffusion_pytorch_model"


def _refuse_pickle(path: Path) -> None:
    """Refuse pickle checkpoints, pointing to safetensors."""
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise ValueError(
            f"{path}: pickle checkpoints ({', '.join(PICKLE_SUFFIXES)}) are refused because loading them can run "
            "arbitrary code; convert the weights to .safetensors (safetensors.torch.save_file) and pass that file"
        )


def folder_weight_files(folder: Path, stem: str = WEIGHT_NAME) -> list[Path]:
    """The safetensors files a diffusers (or transformers: stem `model`) folder's weights are read from: one file, an
    fp16 variant, or the shards of an index. Raises FileNotFoundError (naming pickles found instead) when none."""
    for name in (f"{stem}.safetensors.index.json", f"{stem}.fp16.safetensors.index.json"):
        if (folder / name).is_file():
            return [folder / s for s in sorted(set(json.loads((folder / name).read_text())["weight_map"].values()))]
    for name in (f"{stem}.safetensors", f"{stem}.fp16.safetensors"):
        if (folder / name).is_file():
            return [folder / name]
    pickles = sorted(p.name for p in folder.iterdir() if p.suffix.lower() in PICKLE_SUFFIXES) if folder.is_dir() else []
    hint = f" (found pickle weights {pickles}: convert them to safetensors)" if pickles else ""
    raise FileNotFoundError(f"{folder}: no {stem}.safetensors (or .fp16 / sharded) weights{hint}")


def _folder_weights(folder: Path) -> dict[str, torch.Tensor]:
    """Read a diffusers U-Net folder's safetensors weights: one file, an fp16 variant, or an index of shards."""
    state: dict[str, torch.Tensor] = {}
    for path in folder_weight_files(folder):
        state.update(load_file(path))
    return state


def unet_folder(path: Path) -> Path:
    """The U-Net folder of a pipeline folder (its `unet/`) or of a U-Net folder (itself)."""
    return path / "unet" if (path / "model_index.json").is_file() or (path / "unet").is_dir() else path


def unet_weight_files(teacher_cfg: Any) -> list[Path]:
    """The files the teacher U-Net's weights are read from (a single file, or its folder's safetensors)."""
    path = Path(teacher_cfg.unet or teacher_cfg.pipeline)
    return [path] if path.is_file() else folder_weight_files(unet_folder(path))


def teacher_weight_files(teacher_cfg: Any) -> dict[str, list[Path]]:
    """Every weight file a run reads from its teacher, by part (a part whose folder holds none: an empty list). A
    single-file teacher is its own part `pipeline` (every part not given apart is read from it)."""
    root = Path(teacher_cfg.pipeline)
    files = {"unet": unet_weight_files(teacher_cfg)}
    if root.is_file():
        files["pipeline"] = [root]
    folders = {"vae": (Path(teacher_cfg.vae) if teacher_cfg.vae else root / "vae", WEIGHT_NAME)}
    folders |= {name: (root / name, "model") for name in ("text_encoder", "text_encoder_2")}
    for part, (folder, stem) in folders.items():
        try:
            files[part] = folder_weight_files(folder, stem)
        except FileNotFoundError:
            files[part] = []
    return files


def check_teacher_files(teacher_cfg: Any) -> None:
    """Raise FileNotFoundError naming the first model part (U-Net, VAE, text encoders) whose folder lacks its
    config.json or safetensors weights: before any of them loads. A single-file teacher's own parts are checked by
    koala.config.checks.check_teacher_file; only the parts given apart (`teacher.unet`, `teacher.vae`) are here."""
    unet_weight_files(teacher_cfg)  # a U-Net folder of pickle weights is named here
    root = Path(teacher_cfg.pipeline)
    single = root.is_file()
    unet = None if Path(teacher_cfg.unet or root).is_file() else unet_folder(Path(teacher_cfg.unet or root))
    vae = Path(teacher_cfg.vae) if teacher_cfg.vae else None if single else root / "vae"
    encoders = [] if single else [root / "text_encoder", root / "text_encoder_2"]
    for folder in (unet, vae, *encoders):
        if folder is not None and not (folder / "config.json").is_file():
            raise FileNotFoundError(f"{folder} has no config.json")
    if vae is not None:
        folder_weight_files(vae)
    for folder in encoders:
        folder_weight_files(folder, "model")


def _single_file_weights(path: Path, config: dict[str, Any]) -> dict[str, torch.Tensor]:
    """Read one safetensors file's U-Net; convert the original SGM / ComfyUI layout to diffusers keys."""
    keys = read_header(path)[0]
    if not is_original_layout(keys):
        return load_file(path)
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    if any(k.startswith(ORIGINAL_PREFIX) for k in keys):
        state = read_part(path, "unet")  # of a full checkpoint, the U-Net's tensors only
    else:  # a bare U-Net file without the model prefix
        state = {ORIGINAL_PREFIX + k: v for k, v in load_file(path).items()}
    if isinstance(config.get("layers_per_block"), (list, tuple)):
        raise ValueError(f"{path}: original-layout files need a config with one int layers_per_block")
    return convert_ldm_unet_checkpoint(state, config)


def check_state_dict(model: torch.nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Raise naming the first missing, unexpected or mis-shaped tensors when `state` does not fit `model`."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
        for k in own
        if k in state and tuple(state[k].shape) != tuple(own[k].shape)
    ]
    problems = [(missing, "missing"), (unexpected, "unexpected"), (shapes, "shape mismatch")]
    if any(p for p, _ in problems):
        lines = [
            f"{what} ({len(p)}): " + ", ".join(p[:5]) + (" ..." if len(p) > 5 else "") for p, what in problems if p
        ]
        raise ValueError(f"weights from {source} do not fit the U-Net config:\n  " + "\n  ".join(lines))


def _build_loaded(config: dict[str, Any], state: dict[str, torch.Tensor], source: str) -> UNet2DConditionModel:
    """Instantiate the config without allocating parameters, then take the checkpoint tensors as parameters."""
    cfg = {k: v for k, v in config.items() if not k.startswith("_")}
    with init_empty_weights():
        unet = UNet2DConditionModel(**cfg)
    check_state_dict(unet, state, source)
    unet.load_state_dict(state, assign=True)
    return unet


def load_unet(
    path: str | Path, base_config: dict[str, Any] | None = None, dtype: str | torch.dtype | None = "fp32"
) -> UNet2DConditionModel:
    """Load U-Net weights from a local pipeline folder, U-Net folder or single safetensors file (not frozen).

    `base_config` is the diffusers config a single file is placed onto (default: SDXL-Base's U-Net config);
    `dtype=None` keeps the tensors in the precision they are stored in.
    """
    path = Path(path)
    torch_dtype = None if dtype is None else parse_dtype(dtype)  # a bad dtype fails before any weights are read
    _refuse_pickle(path)
    if not path.exists():
        raise FileNotFoundError(f"teacher U-Net path {str(path)!r} does not exist")
    if path.is_dir():
        folder = unet_folder(path)
        if not (folder / "config.json").is_file():
            raise FileNotFoundError(
                f"{path}: neither a diffusers pipeline folder (unet/) nor a U-Net folder (config.json)"
            )
        config = json.loads((folder / "config.json").read_text())
        unet = _build_loaded(config, _folder_weights(folder), str(folder))
    elif path.suffix.lower() == ".safetensors":
        config = dict(base_config or SDXL_UNET_CONFIG)
        unet = _build_loaded(config, _single_file_weights(path, config), str(path))
    else:
        raise ValueError(f"{path}: expected a diffusers folder or a .safetensors file")
    return unet if torch_dtype is None else unet.to(torch_dtype)


def _stay_eval(self: torch.nn.Module, mode: bool = True) -> torch.nn.Module:
    """Replacement `train` for a frozen module: always eval, whatever mode is asked for."""
    return torch.nn.Module.train(self, False)


def freeze(unet: torch.nn.Module) -> torch.nn.Module:
    """Freeze in place: no grads, eval mode now and after any later `train()` call, SDPA attention (a diffusers
    U-Net); the one way a teacher is frozen (koala.models.teacher.load_teacher, koala.distill.task)."""
    unet.requires_grad_(False)
    unet.train = types.MethodType(_stay_eval, unet)  # instance attribute shadows nn.Module.train
    unet.eval()
    if isinstance(unet, UNet2DConditionModel):
        unet.set_attn_processor(AttnProcessor2_0())
    return unet


def load_teacher(teacher_cfg: TeacherConfig, dtype: str | torch.dtype | None = "config") -> UNet2DConditionModel:
    """The frozen teacher a `teacher` config section names (`pipeline`, `unet`, `arch`, `dtype`).

    `dtype`: "config" casts to `teacher.dtype`; None keeps the stored precision (the trainer inherits the student's
    weights from that, then casts the teacher).
    """
    source = teacher_cfg.unet or teacher_cfg.pipeline
    if not source:
        raise ValueError("no teacher weights: set teacher.pipeline (a diffusers SDXL folder) and/or teacher.unet")
    if source == teacher_cfg.pipeline and PipelineSource.of(teacher_cfg).is_file:
        PipelineSource.of(teacher_cfg).check_header()  # a full SDXL checkpoint, or an error naming what the file is
    base = teacher_unet_config(teacher_cfg) if Path(source).suffix.lower() == ".safetensors" else None
    dtype = teacher_cfg.dtype if dtype == "config" else dtype
    return freeze(load_unet(source, base_config=base, dtype=dtype))
