"""koala: distil SDXL into compressed U-Nets with self-attention knowledge distillation (KOALA, arXiv 2312.04005)."""

import logging


class _DropNotices(logging.Filter):
    """Drops library notices that say nothing to a koala user, on every run."""

    NOTICES = (
        "requires torchvision (not installed); falling back to",  # transformers: we never use its image processors
        "that should be kept in float32: []",  # diffusers: casting a model with no fp32-only modules
        "Failed to load CPU gemm_4bit_forward",  # bitsandbytes: 4-bit inference kernels; we use its 8-bit AdamW only
        # kernels (imported by bitsandbytes' CPU backend to fetch those 4-bit kernels) under HF_HUB_OFFLINE=1
        "Skipping publisher trust check for 'kernels-community/quantization-bitsandbytes'",
    )

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(n in message for n in self.NOTICES)


_NOISY_LOGGERS = (
    "transformers.utils.import_utils",
    "diffusers.models.modeling_utils",
    "bitsandbytes.backends.cpu.ops",
    "kernels._internals.hf_hub",
)
for _name in _NOISY_LOGGERS:
    logging.getLogger(_name).addFilter(_DropNotices())
