"""SDXLConditioner: prompt embeddings identical to the SDXL pipeline's, time ids, latents, cached pass-through."""

import torch
from diffusers import StableDiffusionXLPipeline

from koala.data.conditioning import SDXLConditioner

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


def online_dropped_batch(tiny_pipeline_dir, tmp_path, mode):
    """A batch of the demo data with every caption dropped, and the conditioner of `mode`."""
    from koala.config.compose import compose_config
    from koala.config.schema import TrainConfig
    from koala.data import build_dataloader
    from koala.fixtures.shards import write_demo_shards

    write_demo_shards(tmp_path, n=4, resolution=32, samples_per_shard=4)
    cfg = compose_config(
        "train",
        [
            f"data.path={tmp_path}/demo-00000.tar",
            "data.resolution=32",
            "data.caption_dropout=1.0",
            f"data.caption_dropout_mode={mode}",
        ],
        schema=TrainConfig,
    )
    batch = next(iter(build_dataloader(cfg.data, batch_size=2, seed=0)))
    return batch, SDXLConditioner.from_pretrained(tiny_pipeline_dir, caption_dropout_mode=mode)


def test_dropped_captions_are_all_zeros_by_default(tiny_pipeline_dir, tmp_path):
    batch, cond = online_dropped_batch(tiny_pipeline_dir, tmp_path, "zeros")
    assert batch["dropped"].all()
    out = cond(batch)
    assert not out["prompt_embeds"].any() and not out["pooled_prompt_embeds"].any()
    # what the stock pipeline feeds its unconditional branch (force_zeros_for_empty_prompt)
    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_pipeline_dir)
    assert pipe.config.force_zeros_for_empty_prompt
    _, negative, _, negative_pooled = pipe.encode_prompt(["x"], device="cpu", do_classifier_free_guidance=True)
    torch.testing.assert_close(out["prompt_embeds"][:1], negative)
    torch.testing.assert_close(out["pooled_prompt_embeds"][:1], negative_pooled)
    cached = {**{k: out[k] * 0 + 1 for k in out}, "dropped": torch.tensor([True, False])}
    dropped = cond(cached)
    assert not dropped["prompt_embeds"][0].any() and dropped["prompt_embeds"][1].eq(1).all()


def test_empty_mode_uses_the_embeddings_of_the_empty_prompt(tiny_pipeline_dir, tmp_path):
    batch, cond = online_dropped_batch(tiny_pipeline_dir, tmp_path, "empty")
    empty, pooled = cond.encode_prompts([""])
    out = cond(batch)
    torch.testing.assert_close(out["prompt_embeds"][1], empty[0])
    cached = cond({**{k: out[k] * 0 for k in out}, "dropped": torch.tensor([True, True])})
    torch.testing.assert_close(cached["pooled_prompt_embeds"][0], pooled[0])
