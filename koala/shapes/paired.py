"""The paired evaluation of the shapes world: every model scored on the same pictures, as per-picture records.

`EvalSet` fixes what every variant is judged on: each of the 90 captions x `reps` sampling seeds (picture i of
caption c in round r is seeded `r * 90 + c`), the teacher's pictures of the same prompts and seeds, and held-out noisy
latents (each caption x `reps` fresh pictures of another generator seed, noise and timesteps from a fixed generator).
`score_pipeline` turns a pipeline into records: one per picture (caption right or not, PSNR and MAE against the
teacher's picture) and one per latent (squared eps error over the teacher's eps variance). Records carry whether
their caption is one of `caption_split()`'s held-out compositions. `matrix` lines the records of several training
seeds up as (seeds x items) and `koala.evaluation.intervals` turns them into confidence intervals; `compare_metric`
is the paired comparison of two variants.
"""

from __future__ import annotations

import dataclasses
import json
import math
import random
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf
from PIL import Image

from koala.config.schema import DataConfig
from koala.data import build_dataloader
from koala.data.conditioning import SDXLConditioner
from koala.evaluation.agreement import _predict, held_out_inputs
from koala.evaluation.intervals import Interval, crossed_interval, paired_difference
from koala.fixtures.shards import write_samples
from koala.shapes.judge import load_pipeline
from koala.shapes.score import picture_agreement, score
from koala.shapes.world import RESOLUTION, all_captions, caption, caption_split, draw_scene
from koala.ship.sampling import generate
from koala.train.diffusion import build_noise_scheduler

EPS_SEED = 999  # the held-out latents' pictures: a generator seed no training shard uses (those use 0)


@dataclass(frozen=True)
class Metric:
    """A figure of the table: a mean of one field of one kind of record, times `scale`."""

    name: str
    label: str
    records: str  # "pictures" or "latents"
    field: str
    scale: float = 1.0
    higher_is_better: bool = True
    digits: int = 1
    bounds: tuple[float, float] = (-math.inf, math.inf)  # the values it can take: an interval is clipped to them


METRICS = {
    m.name: m
    for m in (
        Metric("caption_accuracy", "caption accuracy (%)", "pictures", "correct", 100.0, bounds=(0.0, 100.0)),
        Metric("psnr", "PSNR vs teacher (dB)", "pictures", "psnr", digits=2),
        Metric("mae", "MAE vs teacher (0-255)", "pictures", "mae", higher_is_better=False, bounds=(0.0, 255.0)),
        Metric(
            "eps_rel_error",
            "eps rel. error",
            "latents",
            "eps_err",
            higher_is_better=False,
            digits=4,
            bounds=(0.0, math.inf),
        ),
    )
}
SPLITS = ("all", "seen", "held_out")  # every caption, the training captions, the held-out compositions


@dataclass(frozen=True)
class Item:
    """One evaluated picture: its prompt, the seed of its generator, whether the student never trained on it."""

    caption: str
    seed: int
    held_out: bool


def paired_items(reps: int = 4) -> list[Item]:
    """Every world caption x `reps` seeds (round r, caption c: seed r * 90 + c), the same list for every model."""
    split, captions = caption_split(), all_captions()
    return [Item(caption(*c), r * len(captions) + i, c in split.held_out)
            for r in range(reps) for i, c in enumerate(captions)]  # fmt: skip


def sample_items(pipe, items: list[Item], preset, steps: int | None = None, batch_size: int = 16) -> list[Image.Image]:
    """One picture per item, from its own seeded generator, at the world's resolution (`steps`: the preset's)."""
    return generate(pipe, [it.caption for it in items], preset, seeds=[it.seed for it in items], steps=steps,
                    height=RESOLUTION, width=RESOLUTION, batch_size=batch_size)  # fmt: skip


def picture_records(pictures: list[Image.Image], items: list[Item], reference: list[Image.Image] | None) -> list[dict]:
    """Per picture: caption right (0/1) and, against the reference picture of the same item, PSNR (dB) and MAE."""
    records = []
    for i, (image, it) in enumerate(zip(pictures, items, strict=True)):
        rec = {"i": i, "caption": it.caption, "seed": it.seed, "held_out": it.held_out,
               "correct": float(score(image, it.caption))}  # fmt: skip
        if reference is not None:
            rec["psnr"], rec["mae"] = picture_agreement(image, reference[i])
        records.append(rec)
    return records


def latent_batches(reps: int = 4, batch_size: int = 30) -> list[dict]:
    """Each world caption x `reps` fresh pictures (generator seed EPS_SEED) as online batches, in a fixed order."""
    rng = random.Random(EPS_SEED)
    scenes = [draw_scene(rng, RESOLUTION, [c]) for _ in range(reps) for c in all_captions()]
    with tempfile.TemporaryDirectory(prefix="koala-latents-") as tmp:
        shards = write_samples(tmp, scenes, "png", samples_per_shard=len(scenes))
        data = OmegaConf.structured(DataConfig(name="shapes", path=str(shards[0]), resolution=RESOLUTION,
                                               resampled=False, shuffle=False, num_workers=0))  # fmt: skip
        return list(build_dataloader(data, batch_size=batch_size, seed=0))


def latent_inputs(teacher_dir: str | Path, reps: int = 4) -> list[dict]:
    """The held-out noisy latents (with their captions): encoded once, noise and timesteps from a fixed generator."""
    batches = latent_batches(reps)
    inputs = held_out_inputs(SDXLConditioner.from_pretrained(teacher_dir), batches, build_noise_scheduler(teacher_dir))
    return [{**x, "captions": list(b["captions"])} for x, b in zip(inputs, batches, strict=True)]


@torch.no_grad()
def eps_records(student, teacher, inputs: list[dict]) -> list[dict]:
    """Per latent: mean squared (eps_S - eps_T) over the teacher's eps variance (over all latents); their mean is
    `koala.evaluation.agreement.relative_error`."""
    split = caption_split()
    was = student.training
    student.eval()
    errs, captions, s1, s2, n = [], [], 0.0, 0.0, 0
    for x in inputs:
        et, es = _predict(teacher, x), _predict(student, x)
        errs += (es - et).pow(2).flatten(1).mean(1).tolist()
        captions += list(x["captions"])
        s1, s2, n = s1 + et.sum().item(), s2 + et.pow(2).sum().item(), n + et.numel()
    student.train(was)
    var = s2 / n - (s1 / n) ** 2
    return [{"i": i, "caption": c, "held_out": split.is_held_out(c), "eps_err": e / var}
            for i, (c, e) in enumerate(zip(captions, errs))]  # fmt: skip


class EvalSet:
    """What every model is scored on: the items, the teacher's pictures of them and the held-out noisy latents."""

    def __init__(self, teacher_dir: str | Path, reps: int = 4, latent_reps: int = 4, cache: str | Path | None = None,
                 steps: int | None = None):  # fmt: skip
        self.teacher_dir, self.items = str(teacher_dir), paired_items(reps)
        self.teacher = load_pipeline(teacher_dir)
        self.preset, self.steps = "base", steps  # the teacher's preset (Euler, guidance 7.5); steps: its 25 unless set
        self.inputs = latent_inputs(teacher_dir, latent_reps)
        self.latent_reps = latent_reps
        self.teacher_pictures = self._teacher_pictures(Path(cache) if cache else None)

    def _teacher_pictures(self, cache: Path | None) -> list[Image.Image]:
        """The teacher's pictures of the items, sampled once (kept as PNGs in `cache` when given)."""
        index = cache / "index.json" if cache else None
        want = {"steps": self.steps, "items": [[it.caption, it.seed] for it in self.items]}
        if index is not None and index.is_file() and json.loads(index.read_text()) == want:
            return [Image.open(cache / f"{i:04d}.png").convert("RGB") for i in range(len(self.items))]
        pictures = sample_items(self.teacher, self.items, self.preset, self.steps)
        if cache is not None:
            cache.mkdir(parents=True, exist_ok=True)
            for i, image in enumerate(pictures):
                image.save(cache / f"{i:04d}.png")
            tmp = index.with_suffix(".tmp")
            tmp.write_text(json.dumps(want))
            tmp.replace(index)  # the index last: a cache without it is sampled again
        return pictures

    def teacher_records(self) -> dict[str, list[dict]]:
        """The teacher's own records (caption accuracy only; it agrees with itself exactly)."""
        return {"pictures": picture_records(self.teacher_pictures, self.items, None), "latents": []}

    def score_unet(self, unet) -> tuple[dict[str, list[dict]], list[Image.Image]]:
        """Records of a U-Net sampled in the teacher's pipeline (text encoders, VAE, scheduler), and its pictures."""
        pictures = sample_items(load_pipeline(self.teacher_dir, unet=unet), self.items, self.preset, self.steps)
        records = {"pictures": picture_records(pictures, self.items, self.teacher_pictures),
                   "latents": eps_records(unet, self.teacher.unet, self.inputs)}  # fmt: skip
        return records, pictures

    def score_pipeline(self, folder: str | Path) -> dict[str, list[dict]]:
        """Records of an exported student pipeline (its own U-Net; the world's text encoders and VAE are the
        teacher's, which `koala.export` copies)."""
        return self.score_unet(load_pipeline(folder).unet)[0]


def matrix(runs: list[dict[str, list[dict]]], metric: str, split: str = "all") -> np.ndarray:
    """(seeds x items) of one metric over the records of several runs (one per training seed), items aligned."""
    m = METRICS[metric]
    rows = []
    for run in runs:
        records = run.get("records", run)  # a bench record file holds them under "records"
        recs = [r for r in records[m.records] if split == "all" or r["held_out"] == (split == "held_out")]
        rows.append([r[m.field] * m.scale for r in recs])
    if len({len(r) for r in rows}) > 1:
        raise ValueError(f"runs hold different numbers of {m.records} records: {[len(r) for r in rows]}")
    return np.array(rows, dtype=np.float64)


def summarise_metric(runs: list[dict], metric: str, split: str = "all") -> Interval:
    """Mean and 95 % interval of a metric over the runs (seeds) and their pictures or latents, clipped to the values
    the metric can take (a t-interval of a share near 100 % can reach past it)."""
    ci = crossed_interval(matrix(runs, metric, split))
    lo, hi = METRICS[metric].bounds
    return dataclasses.replace(ci, low=max(ci.low, lo), high=min(ci.high, hi))


def compare_metric(runs_a: list[dict], runs_b: list[dict], metric: str, split: str = "all") -> Interval:
    """Paired difference a - b (same seeds in the same order, same items) and its 95 % interval."""
    return paired_difference(matrix(runs_a, metric, split), matrix(runs_b, metric, split))
