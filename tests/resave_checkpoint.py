"""Resume a run's checkpoint on this launch as `koala.train` does, then save it again at the same step with no
training step between: `python tests/resave_checkpoint.py <run_dir> <checkpoint> <out_run_dir>` (under `accelerate
launch` for several ranks). tests/test_resume_ranks.py compares the two checkpoints tensor for tensor."""

import sys
from pathlib import Path

from omegaconf import OmegaConf

from koala.models.plans import config_plan
from koala.train.build import build_trainable, load_frozen, make_accelerator
from koala.train.checkpoint import save_checkpoint
from koala.train.loop import resume


def main(run_dir: str, checkpoint: str, out: str) -> None:
    cfg = OmegaConf.load(Path(run_dir) / "config.yaml")
    accelerator = make_accelerator(cfg)
    conditioner, noising, teacher = load_frozen(cfg, accelerator.device)
    plan, latent = config_plan(cfg)[1], cfg.data.resolution // conditioner.vae_scale_factor
    run = build_trainable(cfg, accelerator, teacher, noising, plan, latent)
    step, position = resume(cfg, run, Path(checkpoint))
    state = {"config": OmegaConf.to_container(cfg), "data": position.to_json()}
    save_checkpoint(accelerator, out, step, run.student, run.ema, state, keep=0)
    accelerator.wait_for_everyone()
    accelerator.end_training()


if __name__ == "__main__":
    main(*sys.argv[1:4])
