"""Where metric weights live, how they are checked before anything loads, and the one-time converters.

The evaluator reads safetensors only. The original files of the FID Inception (`pt_inception-2015-12-05-*.pth`),
HPSv2.1 (`HPS_v2.1_compressed.pt`), open_clip models (`open_clip_pytorch_model.bin`, e.g. ViT-g-14
laion2b_s34b_b88k for BK-SDM's CLIP score) and PickScore (a transformers folder that may hold `pytorch_model.bin`)
are pickles: `python -m koala.evaluate convert=<kind> src=<original> out=<target>` re-saves them once, reading them
with `torch.load(weights_only=True)`, which refuses anything but tensors and plain containers.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from koala.choice import Choice
from koala.evaluation.metrics import CLIP_MEAN, CLIP_STD, MissingMetricWeights
from koala.evaluation.open_clip_keys import OPEN_CLIP_VIT_H_14, open_clip_to_hf_clip

__all__ = ["MissingMetricWeights", "check_clip_model", "check_safetensors", "CONVERTERS", "Converter"]

PICKLE_MAGICS = (b"PK\x03\x04", b"\x80")  # torch.save's zip archive; a raw pickle stream (protocol 2+)


def convert_command(kind: str, src: str = "<original file>", out: str = "<target>") -> str:
    """The command line that writes the safetensors weights of one metric."""
    return f"python -m koala.evaluate convert={kind} src={src} out={out}"


def is_pickle(path: Path) -> bool:
    """True when the file starts like a torch.save / pickle file (read from the header, nothing is unpickled)."""
    with open(path, "rb") as f:
        head = f.read(4)
    return any(head.startswith(m) for m in PICKLE_MAGICS)


def is_safetensors(path: Path) -> bool:
    """True when the file starts with a safetensors header: an 8-byte little-endian length, then a JSON object."""
    with open(path, "rb") as f:
        head = f.read(9)
    return len(head) == 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") < path.stat().st_size


def check_safetensors(path: str | Path | None, key: str, kind: str) -> Path:
    """A safetensors weight file at `path`, or a one-line error naming the key, the file and the conversion."""
    if not path:
        raise MissingMetricWeights(
            f"{key} is not set: it must name the {kind} weights as .safetensors; "
            f"convert the original once with `{convert_command(kind)}`"
        )
    path = Path(path)
    if not path.is_file():
        raise MissingMetricWeights(
            f"{key}={path}: no such file; write it once with `{convert_command(kind, out=str(path))}`"
        )
    if not is_safetensors(path):
        what = "a pickle (torch.save), which the evaluator never loads" if is_pickle(path) else "not a safetensors file"
        raise MissingMetricWeights(
            f"{key}={path} is {what}; convert the original once with "
            f"`{convert_command(kind, src=str(path), out=path.with_suffix('.safetensors'))}`"
        )
    return path


def check_clip_model(path: str | Path | None, key: str, kind: str) -> Path:
    """A transformers CLIPModel folder with safetensors weights and a tokenizer, or an error naming what is missing."""
    if not path:
        raise MissingMetricWeights(
            f"{key} is not set: it must name a local {kind} CLIPModel folder "
            f"(config.json, model.safetensors, tokenizer); see `{convert_command(kind)}`"
        )
    path = Path(path)
    if path.is_file():
        what = "a pickle (torch.save), which the evaluator never loads" if is_pickle(path) else "a file, not a folder"
        raise MissingMetricWeights(
            f"{key}={path} is {what}; write a {kind} CLIPModel folder once with "
            f"`{convert_command(kind, src=str(path), out=str(path.with_suffix('')))}`"
        )
    has_tok = (path / "tokenizer.json").is_file() or (
        (path / "vocab.json").is_file() and (path / "merges.txt").is_file()
    )
    has_st = (path / "model.safetensors").is_file() or (path / "model.safetensors.index.json").is_file()
    pickled = [p.name for p in path.glob("*.bin")] + [p.name for p in path.glob("*.pt")] if path.is_dir() else []
    if (path / "config.json").is_file() and has_st and has_tok:
        return path
    have = sorted(p.name for p in path.iterdir()) if path.is_dir() else "the folder does not exist"
    if pickled and not has_st:
        hint = (
            f"it holds pickled weights ({', '.join(pickled)}): convert once with "
            f"`{convert_command(kind, src=str(path), out=f'{path}-safetensors')}`"
        )
    else:
        hint = f"convert once with `{convert_command(kind, out=str(path))}`"
    raise MissingMetricWeights(
        f"{key}={path}: {kind} weights incomplete (found: {have}); needed: config.json, "
        f"model.safetensors, tokenizer.json or vocab.json + merges.txt; {hint}"
    )


def _load_pickle(src: Path) -> dict[str, torch.Tensor]:
    """Tensors of a torch.save file, read with weights_only=True; a {'state_dict': ...} wrapper is unwrapped."""
    state = torch.load(src, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    return {k.removeprefix("module."): v.contiguous() for k, v in state.items() if isinstance(v, torch.Tensor)}


def _load_checked(model: torch.nn.Module, state: dict[str, torch.Tensor], src: str | Path) -> None:
    """Load a state dict; only non-persistent buffers (position_ids) may be absent, nothing may be left over."""
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith("position_ids")]
    if missing or unexpected:
        raise ValueError(f"{src} does not fit the model: missing {missing[:5]}, unexpected {unexpected[:5]}")


def convert_inception(src: str | Path, out: str | Path) -> Path:
    """pt_inception-2015-12-05-*.pth (pytorch-fid / torch-fidelity / torchmetrics) -> one safetensors file."""
    from koala.evaluation.inception import load_fid_inception

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file(_load_pickle(Path(src)), str(out))
    load_fid_inception(out)  # every parameter present and named as the network expects
    return out


def _copy_tokenizer(tokenizer: str | Path | None, out: Path) -> None:
    """Copy a CLIP tokenizer's files (and preprocessor_config.json, the image mean/std) into `out`."""
    if tokenizer is None:
        return
    names = (
        "vocab.json",
        "merges.txt",
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "preprocessor_config.json",
    )
    for name in names:
        if (Path(tokenizer) / name).is_file():
            shutil.copy(Path(tokenizer) / name, out / name)


def open_clip_config(state: dict[str, torch.Tensor]):
    """A CLIPConfig of the open_clip ViT in `state`: sizes from the tensor shapes, the rest as in ViT-H-14 (16 heads
    in both towers, as ViT-H-14 and ViT-g-14 have: heads cannot be read off the tensors)."""
    from transformers import CLIPConfig

    if "visual.proj" not in state:
        raise ValueError("no open_clip key `visual.proj`: not an open_clip ViT checkpoint (HPSv2, ViT-g-14, ...)")

    def layers(prefix: str) -> int:
        """Number of residual blocks under `prefix`."""
        return len({k.split(".")[len(prefix.split("."))] for k in state if k.startswith(prefix + ".")})

    conv, tok = state["visual.conv1.weight"], state["token_embedding.weight"]
    grid = int(round((state["visual.positional_embedding"].shape[0] - 1) ** 0.5))
    text = {
        **OPEN_CLIP_VIT_H_14["text_config"],
        "hidden_size": tok.shape[1],
        "vocab_size": tok.shape[0],
        "max_position_embeddings": state["positional_embedding"].shape[0],
        "num_hidden_layers": layers("transformer.resblocks"),
        "intermediate_size": state["transformer.resblocks.0.mlp.c_fc.weight"].shape[0],
    }
    vision = {
        **OPEN_CLIP_VIT_H_14["vision_config"],
        "hidden_size": conv.shape[0],
        "patch_size": conv.shape[-1],
        "image_size": conv.shape[-1] * grid,
        "num_hidden_layers": layers("visual.transformer.resblocks"),
        "intermediate_size": state["visual.transformer.resblocks.0.mlp.c_fc.weight"].shape[0],
    }
    return CLIPConfig(text_config=text, vision_config=vision, projection_dim=state["visual.proj"].shape[1])


def _load_open_clip(src: Path) -> dict[str, torch.Tensor]:
    """An open_clip state dict from a safetensors file or (weights_only) from a torch.save file."""
    if is_safetensors(src):
        from safetensors.torch import load_file

        return load_file(str(src))
    return _load_pickle(src)


def convert_open_clip(src: str | Path, out: str | Path, tokenizer: str | Path | None = None) -> Path:
    """An open_clip ViT checkpoint (HPSv2 / HPSv2.1, ViT-H-14, ViT-g-14 ...) -> a transformers CLIPModel folder with
    OpenAI's image mean / std (the ones open_clip uses for these models)."""
    from transformers import CLIPModel

    state = _load_open_clip(Path(src))
    model = CLIPModel(open_clip_config(state))
    _load_checked(model, open_clip_to_hf_clip(state), src)
    out = Path(out)
    model.save_pretrained(out, safe_serialization=True)
    _copy_tokenizer(tokenizer, out)
    (out / "preprocessor_config.json").write_text(
        json.dumps({"image_mean": list(CLIP_MEAN), "image_std": list(CLIP_STD)})
    )
    return out


def convert_clip_folder(src: str | Path, out: str | Path, tokenizer: str | Path | None = None) -> Path:
    """A transformers CLIPModel folder (e.g. PickScore_v1) -> one with safetensors weights and a tokenizer.

    Pickled weights (pytorch_model*.bin) are read with weights_only=True; a folder that already has safetensors is
    re-saved as is. The tokenizer and preprocessor_config.json come from `tokenizer` (PickScore's are those of
    laion/CLIP-ViT-H-14-laion2B-s32B-b79K) or else from `src`.
    """
    from transformers import CLIPConfig, CLIPModel

    src, out = Path(src), Path(out)
    if not (src / "config.json").is_file():
        raise FileNotFoundError(f"{src} has no config.json: not a transformers CLIPModel folder")
    bins = sorted(src.glob("pytorch_model*.bin"))
    if bins:
        model = CLIPModel(CLIPConfig.from_pretrained(src))
        state: dict[str, torch.Tensor] = {}
        for b in bins:
            state.update(_load_pickle(b))
        _load_checked(model, state, src)
    elif (src / "model.safetensors").is_file() or (src / "model.safetensors.index.json").is_file():
        model = CLIPModel.from_pretrained(src, use_safetensors=True)
    else:
        raise FileNotFoundError(f"no pytorch_model*.bin or model.safetensors in {src}")
    model.save_pretrained(out, safe_serialization=True)
    for folder in (src, tokenizer):  # the tokenizer folder's files win
        if folder is not None and Path(folder).resolve() != out.resolve():
            _copy_tokenizer(folder, out)
    return out


CONVERTERS = {
    "inception": convert_inception,
    "hps": convert_open_clip,
    "open_clip": convert_open_clip,
    "pickscore": convert_clip_folder,
    "clip": convert_clip_folder,
}
Converter = Choice("Converter", list(CONVERTERS))  # `python -m koala.evaluate convert=...`: a key of CONVERTERS
