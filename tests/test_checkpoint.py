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
from koala.train.checkpoint import (
    MANIFEST,
    CorruptCheckpoint,
    NonFiniteWeights,
    checkpoint_problems,
    find_checkpoint,
    list_checkpoints,
    save_checkpoint,
)

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
def parts(tiny_pipeline_dir):
    """(accelerator, prepared student, EMA) as the trainer holds them, for save_checkpoint."""
    accelerator = Accelerator(cpu=True)
    student = UNet2DConditionModel.from_pretrained(tiny_pipeline_dir / "unet")
    ema = EMAModel(student.parameters(), decay=0.9, model_cls=UNet2DConditionModel, model_config=student.config)
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-3)
    student, optimizer = accelerator.prepare(student, optimizer)
    return accelerator, student, ema, optimizer


@pytest.fixture(scope="module")
def written(parts, tmp_path_factory) -> Path:
    """A run folder with checkpoints at steps 2 and 4, written by save_checkpoint as the trainer calls it."""
    run = tmp_path_factory.mktemp("ckpt") / "run"
    accelerator, student, ema, optimizer = parts
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


def as_written_before_manifests(ckpt: Path) -> None:
    """Make a checkpoint look like one koala wrote before manifests (and a format) existed."""
    (ckpt / MANIFEST).unlink()
    state = json.loads((ckpt / "state.json").read_text())
    del state["format"]
    (ckpt / "state.json").unlink()  # a hard link: never write through to the original
    (ckpt / "state.json").write_text(json.dumps(state))


def test_unreadable_files_are_caught_without_a_manifest(run, caplog):
    ckpt = run / "checkpoints" / "step-00000004"
    as_written_before_manifests(ckpt)  # readability is still checked, with a warning that this is all
    with caplog.at_level(logging.WARNING, logger="koala.train.checkpoint"):
        assert checkpoint_problems(ckpt) == []
    assert "only checked that its files parse" in caplog.text
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


def test_a_checkpoint_of_this_format_without_its_manifest_is_damaged(run):
    ckpt = run / "checkpoints" / "step-00000004"
    (ckpt / MANIFEST).unlink()
    damage(ckpt / "unet" / "diffusion_pytorch_model.safetensors", "flip")  # parses still: only the hash would tell
    assert checkpoint_problems(ckpt) == [f"{MANIFEST}: missing (this checkpoint was written with one; its files "
                                         "cannot be verified)"]  # fmt: skip
    assert find_checkpoint(run, "latest").name == "step-00000002"
    with pytest.raises(CorruptCheckpoint, match="manifest.json: missing"):
        find_checkpoint(run, 4)


@pytest.mark.parametrize("part", ["student", "EMA"])
def test_weights_that_are_not_finite_are_never_written(parts, run, part):
    accelerator, student, ema, _ = parts
    target = next(iter(student.parameters())) if part == "student" else ema.shadow_params[0]
    kept = target.detach().clone()
    try:
        with torch.no_grad():
            target.view(-1)[0] = float("nan")
        with pytest.raises(NonFiniteWeights, match=f"step 6: the {part} weights hold NaN or inf.*no checkpoint"):
            save_checkpoint(accelerator, run, 6, student, ema, {"last": {}}, keep=1)
    finally:
        with torch.no_grad():
            target.copy_(kept)
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-00000002", "step-00000004"]


def test_rotation_keeps_the_checkpoint_just_written_after_resuming_from_an_older_one(parts, run):
    accelerator, student, ema, _ = parts  # a resume from step 2 while step 4 exists, then a checkpoint at step 3
    save_checkpoint(accelerator, run, 3, student, ema, {"last": {}}, keep=1)
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-00000003"]
    assert find_checkpoint(run, "latest").name == "step-00000003"


def test_rotation_never_leaves_only_damaged_checkpoints(parts, run):
    accelerator, student, ema, _ = parts
    save_checkpoint(accelerator, run, 6, student, ema, {"last": {}}, keep=3)
    for step in (4, 6):  # the two newest are damaged after they were written
        damage(run / "checkpoints" / f"step-{step:08d}" / "unet" / "diffusion_pytorch_model.safetensors", "flip")
    assert find_checkpoint(run, "latest").name == "step-00000002"  # the resume continues from step 2 ...
    save_checkpoint(accelerator, run, 3, student, ema, {"last": {}}, keep=2)  # ... with a smaller keep_checkpoints
    left = list_checkpoints(run)
    assert [p.name for p in left] == ["step-00000006", "step-00000003"]  # the newest written: one intact
    assert find_checkpoint(run, "latest").name == "step-00000003" and checkpoint_problems(left[-1]) == []
