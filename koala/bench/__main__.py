"""`python -m koala.bench {unet,data,train,memory,gpu,ablation,fullsize} [hydra overrides...]`: benchmarks that print
numbers.

Each subcommand lives in its own module with `main(overrides: list[str]) -> None`.
"""

from __future__ import annotations

import importlib
import sys

COMMANDS = {
    "unet": "koala.bench.unet",  # parameters, checkpoint size, FLOPs, latency and memory per spec
    "data": "koala.bench.data",  # samples/s reading + decoding + transforming, vs reading the cache
    "train": "koala.bench.train",  # step time: teacher fwd, student fwd+bwd, full step; overhead ratio
    "memory": "koala.bench.memory",  # training-memory budget from meta-device counts: plain vs the 24 GB recipe
    "gpu": "koala.bench.gpu",  # the GPU report: samples/s, TFLOP/s, MFU, peak memory over recipes x compile x ckpt
    "ablation": "koala.bench.ablation",  # distill presets x seeds on the shapes teacher: caption accuracy, agreement
    "fullsize": "koala.bench.fullsize",  # one full-size SDXL -> KOALA step + checkpoint + export on CPU: time, peak RSS
}


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in COMMANDS:
        sys.exit(f"usage: python -m koala.bench {{{','.join(COMMANDS)}}} [key=value ...]")
    importlib.import_module(COMMANDS[argv[0]]).main(argv[1:])


if __name__ == "__main__":
    main()
