"""SDXLConditioner: prompt embeddings identical to the SDXL pipeline's, time ids, latents, cached pass-through."""

import torch
from diffusers import StableDiffusionXLPipeline

from koala.conditioning import SDXLConditioner

PROMPTS = ["a red circle on a blue background", "", "a koala " * 40]  # the last one is truncated at 77 tokens


def test_encode_prompts_matches_the_sdxl_pipeline(tiny_pipeline_dir):
    cond = SDXLConditioner.from_pretrained(tiny_pipeline_dir)
    prompt_embeds, pooled = cond.encode_prompts(PROMPTS)
    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_pipeline_dir)
    with torch.no_grad():
        ref, _, ref_pooled, _ = pipe.encode_prompt(
            PROMPTS, device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=False
        )
    assert prompt_embeds.shape == (3, 77, 64) and pooled.shape == (3, 32)
    torch.testing.assert_close(prompt_embeds, ref, rtol=0, atol=0)
    torch.testing.assert_close(pooled, ref_pooled, rtol=0, atol=0)


def test_batch_conditioning_and_cached_pass_through(tiny_pipeline_dir):
    cond = SDXLConditioner.from_pretrained(tiny_pipeline_dir)
    assert cond.vae.dtype == torch.float32 and not any(p.requires_grad for p in cond.parameters())
    batch = {
        "pixel_values": torch.rand(2, 3, 64, 48) * 2 - 1,
        "captions": ["a", "b"],
        "original_size": torch.tensor([[100, 80], [64, 48]]),
        "crop_top_left": torch.tensor([[3, 0], [0, 0]]),
        "target_size": torch.tensor([[64, 48], [64, 48]]),
    }
    out = cond(batch)
    assert out["latents"].shape == (2, 4, 32, 24)
    assert out["time_ids"].tolist()[0] == [100, 80, 3, 0, 64, 48]
    expected = cond.vae.encode(batch["pixel_values"]).latent_dist.mean * cond.vae.config.scaling_factor
    torch.testing.assert_close(out["latents"], expected)
    assert cond({**out, "keys": ["x", "y"]})["latents"] is not None
    torch.testing.assert_close(cond(out)["prompt_embeds"], out["prompt_embeds"])
