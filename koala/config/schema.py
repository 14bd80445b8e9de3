"""Typed schema of every training setting (Hydra structured configs): a misspelt key or choice fails at compose time.

YAML files under `configs/` fill these in; `configs/train.yaml` puts `koala_train` first in its defaults list so
every group is merged onto its dataclass (registered by `koala.config.compose.register_schema`, given `TrainConfig`
by the commands that compose it). A setting that takes one of a few names is a `Choice` Enum defined with the code
that uses it. Objects are built from these in one place (the entry points), never inside constructors.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from diffusers.optimization import SchedulerType

from koala.choice import Choice
from koala.data import DataKind
from koala.data.conditioning import ConditioningDType, DropoutMode
from koala.data.indexed import HfFormat
from koala.devices import DType, MixedPrecision
from koala.distill.balance import Balance
from koala.distill.losses import FeatureLoss, Reduction
from koala.distill.taps import SaPoint, Stage, TapKind
from koala.models.archs import Arch
from koala.models.specs import LayerSelect, MidMode
from koala.ship.presets import PresetName
from koala.train.diffusion import TimestepKind
from koala.train.tracking import Tracker

SchedulerName = Choice("SchedulerName", [s.value for s in SchedulerType])  # optim.scheduler: diffusers get_scheduler


@dataclass
class TeacherConfig:
    """The frozen SDXL-family teacher and the SDXL components (text encoders, tokenizers, VAE) around it."""

    name: str = "tiny"
    kind: PresetName = PresetName.base  # base | lightning | turbo: its students' sampling preset (koala.ship.presets)
    arch: Arch = Arch.sdxl  # built-in U-Net config (koala.models.archs.ARCHS) for meta-device inspection, single files
    # a local diffusers SDXL folder (text encoders, tokenizers, VAE, scheduler, unet/), or one full SDXL checkpoint in
    # the original layout (<file>.safetensors: the A1111 / ComfyUI "Load Checkpoint" file of a fine-tune)
    pipeline: Optional[str] = None
    config: Optional[str] = None  # a single-file pipeline's configs: a local diffusers folder; null = SDXL-Base's
    unet: Optional[str] = None  # optional U-Net override: diffusers U-Net folder or a .safetensors file
    vae: Optional[str] = None  # optional VAE folder (e.g. an fp16-fixed SDXL VAE)
    dtype: DType = DType.bf16  # bf16 | fp16 | fp32 (the CPU demo uses fp32)
    steps: int = 25  # the teacher's own sampling steps (4 for SDXL-Lightning-4step): timesteps=teacher_schedule


@dataclass
class ConditioningConfig:
    """The frozen SDXL text encoders that encode captions (online during training, and in `koala.cache`)."""

    # auto: fp16 on a GPU (what inference encodes prompts in), fp32 on CPU; from a cache, the cache's own. Independent
    # of teacher.dtype: a bf16 teacher does not make the prompt embeddings bf16.
    dtype: ConditioningDType = ConditioningDType.auto  # auto | fp16 | bf16 | fp32


@dataclass
class UNetConfig:
    """A student spec: a registered name, optionally with fields overridden (see koala.models.specs.StudentSpec)."""

    name: str = "tiny-700m"
    encoder_keep: Optional[Any] = None
    decoder_keep: Optional[Any] = None
    encoder_depth: Optional[Any] = None
    decoder_depth: Optional[Any] = None
    mid: Optional[MidMode] = None
    mid_depth: Optional[int] = None
    layer_select: Optional[LayerSelect] = None
    random_init: Optional[Any] = None


@dataclass
class DistillConfig:
    """What is distilled and how it is weighted (KOALA.md section 3)."""

    name: str = "koala"
    task_weight: float = 1.0  # MSE(eps_S, eps)
    out_weight: float = 1.0  # MSE(eps_S, eps_T)
    feat_weight: float = 1.0  # sum over paired taps of MSE(F_S, F_T)
    # What is distilled is chosen by lists, which a Hydra override replaces (`distill.stages=[decoder]`); a dict
    # override is merged into the preset's dict, so a dict could never lose an entry. Weights are dicts that hold
    # every key from the start, so merging an override (`distill.stage_weights={decoder: 2.0}`) changes exactly the
    # weights it names, and a misspelt name fails at compose time.
    kinds: list[TapKind] = field(default_factory=list)  # sa | ca | ffn | lf | rb (configs/distill/koala.yaml: [sa])
    stages: list[Stage] = field(default_factory=lambda: list(Stage))
    kind_weights: dict[TapKind, float] = field(default_factory=lambda: dict.fromkeys(TapKind, 1.0))
    stage_weights: dict[Stage, float] = field(default_factory=lambda: dict.fromkeys(Stage, 1.0))
    blocks: Optional[list[str]] = None  # restrict taps to these blocks (e.g. [up_blocks.0]); null = all
    # One kind's taps in other blocks than `blocks`, e.g. {lf: [up_blocks.2]}: with distill=sa+lf, SA everywhere and
    # LF only at the last decoder block. A kind whose entry is null (all are, by default) follows `blocks`.
    kind_blocks: dict[TapKind, Optional[list[str]]] = field(default_factory=lambda: dict.fromkeys(TapKind))
    # sum (default): the feature term is the sum over pairs, as BK-SDM's objective (and KOALA's) writes it; mean
    # divides it by the number of pairs (21 for KOALA-700M, 30 for 1B), so feat_weight means one strength for both.
    reduction: Reduction = Reduction.sum
    sa_point: SaPoint = SaPoint.attn1  # attn1 (module output) | residual (stream after attn1 is added)
    pairing: LayerSelect = (
        LayerSelect.first
    )  # first | uniform | last: the teacher layer a student layer is compared with
    loss: FeatureLoss = FeatureLoss.mse  # mse | normalized (divided by the teacher feature's mean square)
    # none: the weights above (the paper's protocol); grad: each kind scaled so its gradient norm on the inherited
    # student equals the output-KD term's, measured before step 1 (koala/distill/balance.py), kept in checkpoints
    balance: Balance = Balance.none
    balance_batches: int = 4  # fixed batches the gradient norms are averaged over


@dataclass
class DataConfig:
    """Where samples come from and how they are shaped (koala/data)."""

    name: str = "demo"
    kind: DataKind = DataKind.webdataset  # webdataset | hf | folder | cached
    path: Optional[str] = None  # shards (brace-expanded, glob, folder; local or any URL webdataset opens), an HF
    # dataset (save_to_disk folder, parquet file(s), imagefolder), an image folder, or a cache folder
    caption_key: str = "txt"  # webdataset: txt, or json.<field> (e.g. json.llava_caption); hf: column name
    image_key: str = "image"  # hf column with the image; webdataset: extension tried before jpg/jpeg/png/webp
    hf_format: HfFormat = HfFormat.auto  # hf: auto | disk | parquet | imagefolder
    split: str = "train"  # hf: split of a DatasetDict
    resolution: int = 1024
    center_crop: bool = True  # else random crop
    random_flip: bool = False
    buckets: bool = False  # SDXL aspect-ratio buckets (scaled to `resolution`); a batch holds one bucket
    min_size: int = 0  # skip images whose shorter side is smaller
    # A data worker that skips this many records in a row stops the run with the skip counts and the likely cause
    # (a caption_key typo, a folder without captions) instead of searching forever.
    max_consecutive_skips: int = 10000
    caption_dropout: float = 0.0  # probability that a sample's caption is dropped (classifier-free guidance)
    # zeros: a dropped sample's prompt_embeds and pooled_prompt_embeds are all zeros, as SDXL's own training did and
    # as the stock pipeline's unconditional branch is (force_zeros_for_empty_prompt); empty: the embeddings of "".
    caption_dropout_mode: DropoutMode = DropoutMode.zeros
    background: str = "white"  # colour transparent pixels are composited onto: a name or '#rrggbb'
    num_workers: int = 2
    shuffle: bool = True  # shard order + shuffle buffer (shards), permutation per epoch (hf, folder)
    shuffle_buffer: int = 1000  # shards: samples held (undecoded) for shuffling, per worker
    resampled: bool = True  # infinite stream: shards drawn with replacement; hf/folder: epochs forever
    epochs: Optional[int] = 1  # passes over the data when not resampled; null = forever


@dataclass
class OptimConfig:
    lr: float = 5e-5
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 1e-2
    eps: float = 1e-8
    use_8bit: bool = False  # bitsandbytes AdamW8bit when installed
    scheduler: SchedulerName = SchedulerName.constant_with_warmup  # any diffusers get_scheduler name
    warmup_steps: int = 0
    max_grad_norm: float = 1.0


@dataclass
class TrainConfig:
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    conditioning: ConditioningConfig = field(default_factory=ConditioningConfig)
    unet: UNetConfig = field(default_factory=UNetConfig)
    data: DataConfig = field(default_factory=DataConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)

    name: str = "demo"
    output_dir: str = "outputs/${name}"  # deterministic, so every rank (and a resume) agrees on it
    seed: int = 0
    max_steps: int = 1000
    # Optimizer steps in a row whose loss or gradient norm is NaN or inf (each one skipped, counted and logged) that
    # stop the run with an error: a diverged run ends instead of writing NaN weights.
    max_nonfinite_steps: int = 10
    batch_size: int = 8  # per process
    grad_accum: int = 1
    mixed_precision: MixedPrecision = MixedPrecision.no  # no | bf16 | fp16
    gradient_checkpointing: bool = False
    ema: bool = True
    ema_decay: float = 0.9999
    timesteps: TimestepKind = TimestepKind.uniform  # uniform | teacher_schedule
    timestep_jitter: int = 0  # teacher_schedule: +- this many training timesteps around each teacher step
    noise_offset: float = 0.0
    snr_gamma: Optional[float] = None  # min-SNR weighting of the task loss
    log_every: int = 10
    checkpoint_every: int = 500
    keep_checkpoints: int = 3
    sample_every: int = 500
    sample_prompts: list[str] = field(
        default_factory=lambda: ["a koala bear eating leaves", "a red sports car on a mountain road"]
    )
    sample_seed: int = 0
    sample_steps: Optional[int] = None  # sampling steps of the grids; null = the teacher kind's preset (base: 25)
    resume: Optional[str] = None  # latest | a checkpoint folder
    report_to: list[Tracker] = field(default_factory=lambda: [Tracker.tensorboard])  # tensorboard | wandb
    compile: bool = False
    record_ranks: bool = False  # each rank writes ranks/rank<N>.json: sample keys seen + a digest of its weights
    # Seconds a rank waits in a collective (all-reduce, barrier) before failing: bounds the hang when another rank
    # stops responding. A rank that dies is noticed at once by gloo; NCCL may only notice through this timeout
    # (torch's default is 600 s for NCCL, 1800 s for gloo). Leave room for work one rank does alone: rank 0
    # writing a checkpoint and rendering sample grids while the others wait.
    dist_timeout_s: int = 600
