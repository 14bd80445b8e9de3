"""koala: distil SDXL into compressed U-Nets with self-attention knowledge distillation (KOALA, arXiv 2312.04005)."""

import logging


class _DropNotices(logging.Filter):
    """Drops library notices that say nothing to a koala user, on every run."""

    NOTICES = (
        "requires torchvision (not installed); falling back to",  # transformers: we never use its image processors
        "that should be kept in float32: []",  # diffusers: casting a model with no fp32-only modules
        "Failed to load CPU gemm_4bit_forward",  # bitsandbytes: 4-bit inference kernels; we use its 8-bit AdamW only
        "Skipping publisher trust check for",  # kernels (via diffusers' bitsandbytes quantizer) in offline mode
    )

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(n in message for n in self.NOTICES)


for _name in (
    "transformers.utils.import_utils",
    "diffusers.models.modeling_utils",
    "bitsandbytes.backends.cpu.ops",
    "kernels._internals.hf_hub",
):
    logging.getLogger(_name).addFilter(_DropNotices())
