"""Checkpoints: sizes and hashes recorded before COMPLETE, verified on load; `latest` falls back past damage."""

import hashlib
import json
import logging
import os
import shutil
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator
from diffusers import UNet2DConditionModel
from diffusers.training_utils import EMAModel
from rundir import write_run_dir

from koala.ship.export import export_run
from koala.train.checkpoint import MANIFEST, CorruptCheckpoint, checkpoint_problems, find_checkpoint, save_checkpoint

DAMAGE = [  # (file, what is done to it, a word the problem names)
    ("unet/diffusion_pytorch_model.safetensors", "truncate", "bytes"),
    ("unet_ema/diffusion_pytorch_model.safetensors", "flip", "sha256"),
    ("accelerate/optimizer.bin", "truncate", "bytes"),
    ("accelerate/random_states_0.pkl", "truncate", "bytes"),
    ("accelerate/model.safetensors", "delete", "missing"),
    ("state.json", "truncate", "bytes"),
    ("unet/config.json", "flip", "sha256"),
]


@pytest.fixture(scope="module")
def written(tiny_pipeline_dir, tmp_path_factory) -> Path:
    """A run folder with checkpoints at steps 2 and 4, written by save_checkpoint as the trainer calls it."""
    run = tmp_path_factory.mktemp("ckpt") / "run"
    accelerator = Accelerator(cpu=True)
    student = UNet2DConditionModel.from_pretrained(tiny_pipeline_dir / "unet")
    ema = EMAModel(student.parameters(), decay=0.9, model_cls=UNet2DConditionModel, model_config=student.config)
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-3)
    student, optimizer = accelerator.prepare(student, optimizer)
    for step in (2, 4):
        for p in student.parameters():  # an optimizer step, so the checkpoint holds real optimizer state
            p.grad = torch.full_like(p, 1e-3)
        optimizer.step()
        save_checkpoint(accelerator, run, step, student, ema, {"last": {}}, keep=3)
    return run


def damage(path: Path, how: str) -> None:
    """Truncate a file to half, flip one byte in its middle (same size), or delete it (a new file either way)."""
    data = bytearray(path.read_bytes())
    path.unlink()  # the copies are hard links: never write through to the original
    if how == "delete":
        return
    if how == "truncate":
        path.write_bytes(bytes(data[: len(data) // 2]))
    else:
        data[len(data) // 2] ^= 0xFF
        path.write_bytes(bytes(data))


@pytest.fixture
def run(written, tmp_path) -> Path:
    """A private copy (hard links) of the written run, free to damage."""
    return Path(shutil.copytree(written, tmp_path / "run", copy_function=os.link))


def test_manifest_records_size_and_hash_of_every_file(written):
    ckpt = written / "checkpoints" / "step-00000004"
    manifest = json.loads((ckpt / MANIFEST).read_text())["files"]
    on_disk = {p.relative_to(ckpt).as_posix() for p in ckpt.rglob("*") if p.is_file()} - {MANIFEST, "COMPLETE"}
    assert set(manifest) == on_disk
    assert {f for f, *_ in DAMAGE} <= on_disk
    for name, entry in manifest.items():
        data = (ckpt / name).read_bytes()
        assert entry == {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}, name
    assert checkpoint_problems(ckpt) == [] and find_checkpoint(written) == ckpt


@pytest.mark.parametrize("name,how,word", DAMAGE, ids=[f"{h}-{f}" for f, h, _ in DAMAGE])
def test_damaged_latest_falls_back_and_named_one_fails(run, caplog, name, how, word):
    damage(run / "checkpoints" / "step-00000004" / name, how)
    with caplog.at_level(logging.WARNING, logger="koala.train.checkpoint"):
        assert find_checkpoint(run, "latest").name == "step-00000002"
    warning = caplog.text
    assert "step-00000004" in warning and name in warning and word in warning and "step-00000002" in warning
    with pytest.raises(CorruptCheckpoint, match=rf"step-00000004.*{name}.*{word}"):
        find_checkpoint(run, 4)


def test_no_intact_checkpoint_names_every_problem(run):
    damage(run / "checkpoints" / "step-00000004" / "state.json", "truncate")
    damage(run / "checkpoints" / "step-00000002" / "accelerate" / "optimizer.bin", "delete")
    with pytest.raises(
        CorruptCheckpoint,
        match=r"no intact checkpoint.*step-00000004.*state\.json.*"
        r"step-00000002.*accelerate/optimizer\.bin: missing",
    ):
        find_checkpoint(run)


def test_unreadable_files_are_caught_without_a_manifest(run):
    ckpt = run / "checkpoints" / "step-00000004"
    (ckpt / MANIFEST).unlink()  # as written before checkpoints carried one: readability is still checked
    assert checkpoint_problems(ckpt) == []
    damage(ckpt / "accelerate" / "optimizer.bin", "truncate")
    damage(ckpt / "unet" / "diffusion_pytorch_model.safetensors", "truncate")
    problems = "\n".join(checkpoint_problems(ckpt))
    assert "accelerate/optimizer.bin: unreadable" in problems
    assert "unet/diffusion_pytorch_model.safetensors: unreadable" in problems


def test_export_refuses_a_damaged_checkpoint(tiny_pipeline_dir, tmp_path):
    run = write_run_dir(tmp_path, tiny_pipeline_dir)
    damage(run / "checkpoints" / "step-00000010" / "unet_ema" / "diffusion_pytorch_model.safetensors", "truncate")
    with pytest.raises(CorruptCheckpoint, match=r"unet_ema/diffusion_pytorch_model\.safetensors: \d+ bytes"):
        export_run(run, checkpoint="10")
    assert not (run / "export").exists()
