"""Benchmarks that print numbers: `python -m koala.bench {unet,data,train,memory,ablation} [overrides]`."""

from __future__ import annotations


def train_overrides(argv: list[str]) -> list[str]:
    """A bench command line without its `bench.<key>=...` settings: the train overrides of the train configs a
    benchmark composes for each run (the whole line was checked by composing the bench's own config first)."""
    return [o for o in argv if not o.startswith("bench.")]
