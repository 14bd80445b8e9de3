"""open_clip ViT state dict -> transformers `CLIPModel` state dict (HPSv2 is an open_clip ViT-H-14).

The architectures are the same (pre-LN transformer, class token, causal text mask, pooling at the end-of-text token,
bias-free projections); open_clip stores attention as one fused `in_proj` and projections as (in, out) matrices.
"""

from __future__ import annotations

import re

import torch

# open_clip's ViT-H-14 as a transformers CLIPConfig (the same numbers as laion/CLIP-ViT-H-14-laion2B-s32B-b79K).
# eos_token_id=2 keeps transformers' legacy pooling at argmax(input_ids), which is open_clip's (end-of-text is the
# largest token id).
OPEN_CLIP_VIT_H_14 = {
    "projection_dim": 1024,
    "text_config": {
        "hidden_size": 1024,
        "intermediate_size": 4096,
        "num_attention_heads": 16,
        "num_hidden_layers": 24,
        "max_position_embeddings": 77,
        "vocab_size": 49408,
        "hidden_act": "gelu",
        "eos_token_id": 2,
    },
    "vision_config": {
        "hidden_size": 1280,
        "intermediate_size": 5120,
        "num_attention_heads": 16,
        "num_hidden_layers": 32,
        "image_size": 224,
        "patch_size": 14,
        "hidden_act": "gelu",
    },
}

# Whole-tensor renames (open_clip -> transformers); `T` marks (in, out) matrices stored transposed in open_clip.
TOP_LEVEL = {
    "visual.conv1.weight": "vision_model.embeddings.patch_embedding.weight",
    "visual.class_embedding": "vision_model.embeddings.class_embedding",
    "visual.positional_embedding": "vision_model.embeddings.position_embedding.weight",
    "visual.ln_pre": "vision_model.pre_layrnorm",
    "visual.ln_post": "vision_model.post_layernorm",
    "visual.proj": "visual_projection.weight T",
    "token_embedding.weight": "text_model.embeddings.token_embedding.weight",
    "positional_embedding": "text_model.embeddings.position_embedding.weight",
    "ln_final": "text_model.final_layer_norm",
    "text_projection": "text_projection.weight T",
    "logit_scale": "logit_scale",
}
# Inside one residual block.
BLOCK = {
    "ln_1": "layer_norm1",
    "ln_2": "layer_norm2",
    "attn.out_proj": "self_attn.out_proj",
    "mlp.c_fc": "mlp.fc1",
    "mlp.c_proj": "mlp.fc2",
}
TOWERS = {
    "visual.transformer.resblocks": "vision_model.encoder.layers",
    "transformer.resblocks": "text_model.encoder.layers",
}
BLOCK_KEY = re.compile(r"^(visual\.transformer\.resblocks|transformer\.resblocks)\.(\d+)\.(.+)\.(weight|bias)$")
IN_PROJ_KEY = re.compile(
    r"^(visual\.transformer\.resblocks|transformer\.resblocks)\.(\d+)\.attn\.in_proj_(weight|bias)$"
)


def _rename(key: str) -> str | None:
    """The transformers name of one non-attention-input open_clip key (None when it is not a known key)."""
    for old, new in TOP_LEVEL.items():
        if key == old or key.startswith(old + "."):
            return new.removesuffix(" T") + key[len(old) :] + (" T" if new.endswith(" T") else "")
    m = BLOCK_KEY.match(key)
    if m and m.group(3) in BLOCK:
        return f"{TOWERS[m.group(1)]}.{m.group(2)}.{BLOCK[m.group(3)]}.{m.group(4)}"
    return None


def open_clip_to_hf_clip(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename every tensor; split fused q/k/v; transpose projections. Unknown keys raise (nothing is dropped silently)."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        m = IN_PROJ_KEY.match(key)
        if m:  # (3 D, D) / (3 D,) fused query, key, value
            prefix = f"{TOWERS[m.group(1)]}.{m.group(2)}.self_attn"
            for name, part in zip(("q_proj", "k_proj", "v_proj"), value.chunk(3, dim=0)):
                out[f"{prefix}.{name}.{m.group(3)}"] = part.contiguous()
            continue
        new = _rename(key)
        if new is None:
            raise KeyError(f"open_clip key {key!r} has no transformers CLIPModel counterpart")
        out[new.removesuffix(" T")] = value.t().contiguous() if new.endswith(" T") else value
    return out
