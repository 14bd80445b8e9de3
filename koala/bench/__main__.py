"""`python -m koala.bench {unet,data,train,memory,gpu,ablation,fullsize} [overrides...]`: benchmarks that print
numbers.

Each subcommand is a module whose `main(argv)` composes its own config (`configs/bench_<name>.yaml`: its settings
as `bench.<key>=...`, beside the train groups where it trains) with `koala.config.compose.run_command`.
"""

from __future__ import annotations

import sys

from koala.bench import ablation, data, fullsize, gpu, memory, train, unet

COMMANDS = {
    "unet": unet.main,  # parameters, checkpoint size, FLOPs, latency and memory per spec
    "data": data.main,  # samples/s reading + decoding + transforming, vs reading the cache
    "train": train.main,  # step time: teacher fwd, student fwd+bwd, full step; overhead ratio
    "memory": memory.main,  # training-memory budget from meta-device counts: plain vs the 24 GB recipe
    "gpu": gpu.main,  # the GPU report: samples/s, TFLOP/s, MFU, peak memory over recipes x compile x ckpt
    "ablation": ablation.main,  # distill presets x seeds on the shapes teacher: caption accuracy, agreement
    "fullsize": fullsize.main,  # one full-size SDXL -> KOALA step + checkpoint + export on CPU: time, peak RSS
}


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in COMMANDS:
        sys.exit(f"usage: python -m koala.bench {{{','.join(COMMANDS)}}} [key=value ...]")
    COMMANDS[argv[0]](argv[1:])


if __name__ == "__main__":
    main()
