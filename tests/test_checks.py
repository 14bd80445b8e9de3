"""Bad values fail before any model loads, in one line naming the key, the value and what is allowed."""

import subprocess
import sys

import pytest
from safetensors.torch import save_file

from koala.config.checks import ConfigError, check_config
from koala.config.compose import compose_config


def config(tmp_path, pipeline, *overrides):
    shards = tmp_path / "shards"
    if not shards.exists():
        from koala.fixtures.shards import write_demo_shards

        write_demo_shards(shards, n=4, resolution=32, samples_per_shard=2)
    return compose_config("train", [
        f"teacher.pipeline={pipeline}",
        f"data.path='{shards}/demo-{{00000..00001}}.tar'", "data.resolution=32", f"output_dir={tmp_path / 'run'}",
        *overrides,
    ])  # fmt: skip


@pytest.mark.parametrize(
    "override,message",
    [
        ("batch_size=0", "batch_size=0 is not allowed: expected a number >= 1"),
        ("batch_size=-2", "batch_size=-2"),
        ("grad_accum=0", "grad_accum=0"),
        ("checkpoint_every=0", "checkpoint_every=0"),
        ("log_every=0", "log_every=0"),
        ("optim.lr=-1e-4", "optim.lr=-0.0001 is not allowed: expected a number > 0"),
        ("data.caption_dropout=1.5", "data.caption_dropout=1.5 is not allowed: expected a number in [0.0, 1.0]"),
        ("ema_decay=2", "ema_decay=2.0"),
        ("data.resolution=33", "data.resolution=33 is not allowed: expected a positive multiple of 8"),
        ("data.resolution=0", "data.resolution=0"),
        ("data.resolution=36", "data.resolution=36 is not allowed: expected a positive multiple of 64"),  # buckets
        ("data.caption_dropout_mode=blank", "one of zeros, empty"),
        ("mixed_precision=bf32", "one of no, fp16, bf16"),
        ("teacher.kind=lightening", "one of base, lightning, turbo"),
        ("distill.kinds=[sa,xa]", "a list of sa, ca, ffn, lf, rb"),
        ("distill.stages=[middle]", "a list of encoder, mid, decoder"),
        ("optim.scheduler=cosine2", "optim.scheduler='cosine2'"),
        ("data.max_consecutive_skips=0", "data.max_consecutive_skips=0"),
    ],
)
def test_bad_values_are_named_in_one_line(override, message, tmp_path, tiny_pipeline_dir):
    extra = ["data.buckets=true"] if "=36" in override else []
    with pytest.raises(ConfigError) as err:
        check_config(config(tmp_path, tiny_pipeline_dir, override, *extra))
    assert message in str(err.value) and "\n" not in str(err.value)


def test_paths_are_checked_before_loading(tmp_path, tiny_pipeline_dir):
    pickle = tmp_path / "unet.ckpt"
    pickle.write_bytes(b"not read")
    with pytest.raises(ConfigError, match="pickle checkpoint, refused"):
        check_config(config(tmp_path, tiny_pipeline_dir, f"teacher.unet={pickle}"))
    with pytest.raises(ConfigError, match="is a pickle checkpoint"):
        check_config(config(tmp_path, pickle))
    single = tmp_path / "unet.safetensors"
    save_file({}, str(single))
    with pytest.raises(ConfigError, match="is a file; it must be a diffusers SDXL pipeline folder"):
        check_config(config(tmp_path, single))
    with pytest.raises(ConfigError, match="matches no shard on disk"):
        check_config(config(tmp_path, tiny_pipeline_dir, f"data.path='{tmp_path}/nothing-{{0..3}}.tar'"))
    with pytest.raises(ConfigError, match="does not exist"):
        check_config(config(tmp_path, tiny_pipeline_dir, "data=folder", f"data.path={tmp_path}/no-folder"))


def test_cli_prints_one_line_and_no_traceback(tmp_path, tiny_pipeline_dir):
    res = subprocess.run(
        [sys.executable, "-m", "koala.train", "batch_size=0", f"teacher.pipeline={tiny_pipeline_dir}",
         f"output_dir={tmp_path / 'run'}"],
        capture_output=True, text=True, cwd=tmp_path, timeout=120,
    )  # fmt: skip
    assert res.returncode == 2
    assert "error: batch_size=0 is not allowed" in res.stderr
    assert "Traceback" not in res.stderr + res.stdout and "torchvision" not in res.stderr + res.stdout
    assert not (tmp_path / "run" / "config.yaml").exists()  # nothing ran (Hydra alone made the folder for its log)
