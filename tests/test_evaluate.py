"""CLIP score and Fréchet distance from local metric weights (tiny random CLIP built here)."""

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import CLIPConfig, CLIPModel

from koala.evaluate import main
from koala.metrics import MissingMetricWeights, check_clip_folder, feature_stats, frechet_distance
from koala.tiny import write_byte_tokenizer, write_tiny_pipeline


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    path = tmp_path_factory.mktemp("clip") / "clip"
    tok = write_byte_tokenizer(path)
    torch.manual_seed(0)
    config = CLIPConfig(
        text_config=dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=77, pad_token_id=tok.pad_token_id,
                         bos_token_id=len(tok) - 2, eos_token_id=len(tok) - 1),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                           image_size=32, patch_size=8),
        projection_dim=16,
    )
    CLIPModel(config).save_pretrained(path, safe_serialization=True)
    return path


def test_frechet_distance_matches_closed_forms():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(500, 4))
    mu, sigma = feature_stats(torch.from_numpy(a))
    assert frechet_distance(mu, sigma, mu, sigma) == pytest.approx(0, abs=1e-8)
    # 1-D: (m1 - m2)^2 + (s1 - s2)^2 for standard deviations s1, s2
    assert frechet_distance(np.array([1.0]), np.array([[4.0]]), np.array([3.0]), np.array([[9.0]])) == pytest.approx(5.0)
    # commuting (diagonal) covariances: sum over dimensions of the 1-D formula
    d = frechet_distance(np.zeros(2), np.diag([1.0, 4.0]), np.ones(2), np.diag([9.0, 16.0]))
    assert d == pytest.approx(2 + (1 - 3) ** 2 + (2 - 4) ** 2)


def test_missing_weights_name_the_files(tmp_path):
    with pytest.raises(MissingMetricWeights, match=r"model.safetensors.*vocab.json \+ merges.txt"):
        check_clip_folder(tmp_path / "clip-vit-large-patch14")
    with pytest.raises(MissingMetricWeights, match="metrics.clip is not set"):
        main(["model=x", "prompts=y"])


def test_evaluate_end_to_end(tiny_pipeline_dir, tiny_clip, tmp_path):
    student = write_tiny_pipeline(tmp_path / "student", seed=1)
    (tmp_path / "prompts.txt").write_text("a koala\na red car\na bowl of fruit\n")
    ref = tmp_path / "ref"
    ref.mkdir()
    rng = np.random.default_rng(0)
    for i in range(4):
        Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(ref / f"{i}.png")
    results = main([f"model={student}", f"compare={tiny_pipeline_dir}", f"prompts={tmp_path / 'prompts.txt'}",
                    f"reference={ref}", f"metrics.clip={tiny_clip}", "steps=2", "height=32", "width=32",
                    "device=cpu", f"out={tmp_path / 'eval'}"])
    for name in ("model", "compare"):
        assert 0 <= results[name]["clip_score"] <= 100
        assert np.isfinite(results[name]["fd_clip_to_reference"]) and results[name]["fd_clip_to_reference"] >= 0
        assert (tmp_path / "eval" / name / "grid.png").is_file()
    assert results["fd_clip_between_models"] > 0
    assert (tmp_path / "eval" / "metrics.json").is_file()
