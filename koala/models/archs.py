"""U-Net architectures as data: diffusers `UNet2DConditionModel` configs of SDXL and its small test-sized relatives.

`ARCHS` names them for `teacher.arch` (meta-device inspection, single-file weights) and `bench.arch`; the tiny,
medium and shapes configs keep SDXL's block types and `text_time` conditioning, so every code path runs on them.
`SDXL_SCHEDULER_CONFIG` is the training noise schedule of SDXL teachers.
"""

from __future__ import annotations

from typing import Any

from koala.choice import Choice

# The SDXL-Base-1.0 U-Net (also SDXL-Lightning's and SDXL-Turbo's): 2,567,463,684 parameters.
SDXL_UNET_CONFIG: dict[str, Any] = {
    "_class_name": "UNet2DConditionModel",
    "act_fn": "silu",
    "addition_embed_type": "text_time",
    "addition_embed_type_num_heads": 64,
    "addition_time_embed_dim": 256,
    "attention_head_dim": [5, 10, 20],
    "block_out_channels": [320, 640, 1280],
    "center_input_sample": False,
    "cross_attention_dim": 2048,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "downsample_padding": 1,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "out_channels": 4,
    "projection_class_embeddings_input_dim": 2816,
    "sample_size": 128,
    "transformer_layers_per_block": [1, 2, 10],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "upcast_attention": None,
    "use_linear_projection": True,
}


# A tiny SDXL-shaped U-Net (same block types, text_time conditioning, depth-4 deepest stage) for tests and the
# demo. Its cross-attention width is the two tiny text encoders' hidden sizes concatenated (32 + 32), and its
# projection input is 6 time ids x 8 + the 32-wide pooled embedding.
TINY_UNET_CONFIG: dict[str, Any] = {
    **SDXL_UNET_CONFIG,
    "addition_time_embed_dim": 8,
    "attention_head_dim": [1, 2, 4],
    "block_out_channels": [32, 64, 128],
    "cross_attention_dim": 64,
    "norm_num_groups": 8,
    "projection_class_embeddings_input_dim": 80,
    "sample_size": 32,
    "transformer_layers_per_block": [1, 2, 4],
}


# SDXL-Base-1.0's scheduler config (scheduler/scheduler_config.json): the training noise schedule of SDXL teachers
SDXL_SCHEDULER_CONFIG = {
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "interpolation_type": "linear",
    "num_train_timesteps": 1000,
    "prediction_type": "epsilon",
    "sample_max_value": 1.0,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "timestep_spacing": "leading",
    "trained_betas": None,
    "use_karras_sigmas": False,
}


# A medium SDXL-shaped U-Net for CPU step-time benchmarks: big enough that convolutions and attention, not Python
# overhead, dominate a step (head dim 64 as in SDXL), small enough for two CPU cores.
MEDIUM_UNET_CONFIG: dict[str, Any] = {
    **TINY_UNET_CONFIG,
    "addition_time_embed_dim": 32,
    "attention_head_dim": [1, 2, 4],
    "block_out_channels": [64, 128, 256],
    "cross_attention_dim": 128,
    "norm_num_groups": 32,
    "projection_class_embeddings_input_dim": 6 * 32 + 64,
}


# The shapes-world teacher (koala/assets/shapes-sdxl, trained by `python -m koala.shapes.teacher`): the tiny layout
# with a narrower deepest stage (64 channels), for 16 x 16 latents of 64 px pictures; 3.8M parameters.
SHAPES_UNET_CONFIG: dict[str, Any] = {
    **TINY_UNET_CONFIG,
    "attention_head_dim": [1, 2, 2],
    "block_out_channels": [32, 48, 64],
    "sample_size": 16,
}


ARCHS: dict[str, dict[str, Any]] = {
    "sdxl": SDXL_UNET_CONFIG,
    "tiny": TINY_UNET_CONFIG,
    "medium": MEDIUM_UNET_CONFIG,
    "shapes": SHAPES_UNET_CONFIG,
}


Arch = Choice("Arch", list(ARCHS))  # teacher.arch, bench.arch: a key of ARCHS
