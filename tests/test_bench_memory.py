"""The memory budget: exact saved-tensor counts on the meta device, checkpointing, the budget table."""

import json

import pytest
import torch
from torch import nn

from koala.bench.memory import main
from koala.bench.saved_bytes import Bf16Autocast, SavedBytes, measure_step
from koala.models.archs import TINY_UNET_CONFIG


def toy_count(bf16: bool) -> SavedBytes:
    """Linear(8, 16) -> ReLU -> Linear(16, 4), no biases, batch 2, on meta."""
    with torch.device("meta"):
        model = nn.Sequential(nn.Linear(8, 16, bias=False), nn.ReLU(), nn.Linear(16, 4, bias=False))
        x = torch.empty(2, 8)
    counter = SavedBytes(exclude=model.parameters())
    with Bf16Autocast(enabled=bf16, weight_copies=counter.weight_copies), counter.hooks():
        model(x)
    return counter


def test_toy_module_counts_by_hand():
    # fp32: the first linear saves its input (2x8x4 = 64 B), ReLU its output (2x16x4 = 128 B), which the second
    # linear saves too (same storage, counted once); weights are parameters, not counted.
    assert toy_count(bf16=False).bytes == {"activations": 64 + 128}
    # bf16 autocast: bf16 input copy (32 B) and ReLU output (64 B); the second linear also saves its bf16 weight
    # copy (4x16x2 = 128 B) for its input's gradient; the first does not (its input needs no gradient).
    assert toy_count(bf16=True).bytes == {"activations": 32 + 64, "weight copies": 128}


def test_attention_saves_what_flash_saves():
    with torch.device("meta"):
        q, k, v = (torch.empty(1, 2, 16, 8, requires_grad=True) for _ in range(3))
    counter = SavedBytes()
    with Bf16Autocast(enabled=False), counter.hooks():
        torch.nn.functional.scaled_dot_product_attention(q, k, v)
    assert counter.total == 4 * (2 * 16 * 8 * 4) + 2 * 16 * 4  # q, k, v, out + fp32 logsumexp; no 16x16 matrix


def test_checkpointing_reduces_saved_bytes_of_a_tiny_unet():
    full = measure_step("tiny-700m", 128, checkpointing=False, teacher_config=TINY_UNET_CONFIG)
    ckpt = measure_step("tiny-700m", 128, checkpointing=True, teacher_config=TINY_UNET_CONFIG)
    assert 0 < ckpt.activations < full.activations
    assert ckpt.recompute > 0 and full.recompute == 0
    assert full.teacher_features == ckpt.teacher_features > 0


@pytest.mark.slow
def test_budget_for_koala_700m(tmp_path, capsys):
    results = main(["bench.unets=[koala-700m]", "bench.resolutions=[256]", f"bench.out={tmp_path}"])
    saved = json.loads((tmp_path / "memory.json").read_text())
    assert saved["results"][0]["unet"] == "koala-700m" and results[0]["max_batch_lean"] >= 1
    r = saved["results"][0]
    assert r["total_lean"] < r["total_plain"] and r["activations_ckpt"] < r["activations_plain"]
    assert {row["label"] for row in r["rows"]} == {"measured", "estimated"}
    assert "| **total** |" in capsys.readouterr().out


def test_adamw8bit_state_layout_is_what_bitsandbytes_allocates():
    bnb = pytest.importorskip("bitsandbytes")
    from koala.bench.budget import adamw8bit_bytes
    from koala.models.archs import ARCHS
    from koala.models.unets import build_unet

    model = build_unet(dict(ARCHS["tiny"]))
    opt = bnb.optim.AdamW8bit(model.parameters(), lr=1e-4)
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    opt.step()
    storages = {}  # unique storages: every parameter's state shares the two 256-entry quantization maps
    for state in opt.state.values():
        for v in state.values():
            if torch.is_tensor(v):
                storages[v.untyped_storage().data_ptr()] = v.untyped_storage().nbytes()
    assert sum(storages.values()) == adamw8bit_bytes(model) + 2 * 256 * 4
