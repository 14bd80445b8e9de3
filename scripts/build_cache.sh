#!/usr/bin/env bash
# Precompute VAE latents and text embeddings on every GPU of this node, then train from them.
#   scripts/build_cache.sh teacher=sdxl-base teacher.pipeline=/models/sdxl data=laion-pop \
#       data.path='/data/laion-pop/{00000..00999}.tar' cache.out=/data/cache/laion-pop
set -euo pipefail
exec accelerate launch --multi_gpu -m koala.cache "$@"
