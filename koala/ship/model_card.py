"""The model card (README.md) of an exported student: teacher, spec, distillation, data, steps, final losses."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from omegaconf import OmegaConf

from koala.ship.presets import SAMPLER_NAMES, get_preset

if TYPE_CHECKING:
    from koala.config.schema import TrainConfig


def final_losses(metrics: list[dict[str, Any]]) -> dict[str, float]:
    """The `loss/*` values of the last record that has any."""
    for record in reversed(metrics):
        losses = {k: float(v) for k, v in record.items() if k.startswith("loss/")}
        if losses:
            return {"step": record.get("step"), **losses}
    return {}


def _get(cfg: TrainConfig, dotted: str, default: Any = "n/a") -> Any:
    """A config value by dotted key, or `default` when the run config lacks it."""
    value = OmegaConf.select(cfg, dotted, default=default)
    return OmegaConf.to_container(value) if OmegaConf.is_config(value) else value


def render_model_card(
    cfg: TrainConfig, checkpoint: str, step: int, ema: bool, parameters: int, metrics: list[dict[str, Any]], fp16: bool
) -> str:
    """Markdown model card with Hugging Face front matter."""
    kind = _get(cfg, "teacher.kind", "base")
    preset = get_preset(kind)
    losses = final_losses(metrics)
    loss_rows = "\n".join(f"| {k} | {v:.6g} |" for k, v in losses.items() if k != "step") or "| (no metrics.jsonl) | |"
    spacing = preset.timestep_spacing or "as the teacher's scheduler"
    variant = ', variant="fp16"' if fp16 else ""
    lines = [
        "---",
        "library_name: diffusers",
        "pipeline_tag: text-to-image",
        "tags: [stable-diffusion-xl, knowledge-distillation, koala]",
        "---",
        f"# {_get(cfg, 'name')}: a KOALA-distilled SDXL student ({_get(cfg, 'unet.name')})",
        "",
        "A compressed SDXL U-Net distilled with self-attention knowledge distillation (KOALA, arXiv 2312.04005),",
        "packaged with the teacher's text encoders, tokenizers and VAE as a stock `StableDiffusionXLPipeline`.",
        "",
        "| | |",
        "|---|---|",
        f"| teacher | {_get(cfg, 'teacher.name')} (kind `{kind}`) |",
        f"| student spec | `{_get(cfg, 'unet.name')}`, {parameters:,} U-Net parameters |",
        f"| weights | {'EMA' if ema else 'raw'} weights of checkpoint `{checkpoint}` (step {step}){', plus fp16 variant' if fp16 else ''} |",
        f"| loss weights | task {_get(cfg, 'distill.task_weight')}, output KD {_get(cfg, 'distill.out_weight')}, feature KD {_get(cfg, 'distill.feat_weight')} |",
        f"| features | kinds {_get(cfg, 'distill.kinds')}, stages {_get(cfg, 'distill.stages')}, SA tap `{_get(cfg, 'distill.sa_point')}`, pairing `{_get(cfg, 'distill.pairing')}`, loss `{_get(cfg, 'distill.loss')}` |",
        f"| data | `{_get(cfg, 'data.name')}` ({_get(cfg, 'data.kind')}: `{_get(cfg, 'data.path')}`), {_get(cfg, 'data.resolution')} px, captions `{_get(cfg, 'data.caption_key')}` |",
        f"| training | {step} of {_get(cfg, 'max_steps')} steps, batch {_get(cfg, 'batch_size')} x {_get(cfg, 'grad_accum')} accumulation per process, lr {_get(cfg, 'optim.lr')}, precision {_get(cfg, 'mixed_precision')}, timesteps {_get(cfg, 'timesteps')} |",
        "",
        f"## Final losses (step {losses.get('step', 'n/a')})",
        "",
        "| loss | value |",
        "|---|---|",
        loss_rows,
        "",
        "## Use",
        "",
        f"Sampler: {SAMPLER_NAMES[preset.sampler]}, timestep spacing {spacing}, {preset.steps} steps, guidance {preset.guidance} (preset `{preset.name}`).",
        "",
        "```python",
        "import torch",
        "from diffusers import StableDiffusionXLPipeline",
        "",
        f'pipe = StableDiffusionXLPipeline.from_pretrained("<this folder>", torch_dtype=torch.float16{variant}).to("cuda")',
        f'image = pipe("a koala bear eating leaves", num_inference_steps={preset.steps}, guidance_scale={preset.guidance}).images[0]',
        "```",
        "",
        "The SDXL VAE overflows in fp16; the pipeline upcasts it (`force_upcast`), or pass an fp16-fixed VAE.",
        "",
    ]
    return "\n".join(lines)


def write_model_card(path: str | Path, **fields: Any) -> Path:
    """Render the model card and write it to `path`."""
    Path(path).write_text(render_model_card(**fields))
    return Path(path)
