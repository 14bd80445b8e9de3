"""The batch stream: deterministic per (seed, rank, worker), resumable without decoding, robust to bad samples.

Each dataloader worker on each rank is one *global worker* g = rank * num_workers + role of W = world_size *
num_workers. It reads its own shards (or indices), shuffles them with its own seeded RNG, checks every record
cheaply (caption present, image header readable, size, bucket: no decoding), groups records into batches of one
target size, and only then decodes the batches it yields. Skipping the first batches of a resumed run therefore runs
the cheap checks only. Per-sample randomness (crop, flip, caption dropout) is seeded by (seed, g, position), so it
does not depend on what was skipped.

A torch DataLoader takes batches from its workers round-robin; a resumed run that consumed `n` batches rotates
the roles so that its worker 0 plays the role that would have produced batch n.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable, Iterator
from typing import Any, Protocol

from torch.utils.data import IterableDataset, get_worker_info

from koala.data.records import SKIP_REASONS, Raw, UnsupportedImage

log = logging.getLogger("koala.data")

Reader = Callable[[int, int, Callable[[str, Exception], None]], Iterator[Raw]]  # (g, W, on_bad) -> records

# What a long run of one skip reason usually means: named in the error that ends a stream that yields nothing.
SKIP_HINTS = {
    "missing_caption": "no caption found: check data.caption_key (webdataset: txt or json.<field>; folder: a sidecar "
    ".txt beside each image; hf: the caption column)",
    "corrupt_image": "no readable image: check data.image_key and that the files are whole images (a truncated file "
    "whose header reads but whose data does not decode counts here)",
    "unsupported_image": "no image in a supported form (see the warnings for the reason)",
    "too_small": "every image is smaller than data.min_size",
    "bad_shard": "the shards cannot be read",
}


class TooManySkips(RuntimeError):
    """A worker skipped `limit` records in a row: the data source (or a key naming into it) is almost surely wrong."""


def skip_limit_error(counts: dict[str, int], limit: int, rank: int, worker: int) -> TooManySkips:
    """The error naming the skip counts and the likely cause."""
    worst = max(counts, key=counts.get)
    named = ", ".join(f"{k}={v}" for k, v in counts.items() if v)
    return TooManySkips(
        f"rank {rank} data worker {worker}: {limit} samples in a row were skipped ({named}); likely cause: "
        f"{SKIP_HINTS.get(worst, worst)}. The limit is data.max_consecutive_skips."
    )


class SkipCounter:
    """One worker's skip counts by reason, and the skips since it last delivered a sample: records refused by the
    cheap checks and records whose data then fails to decode count alike, so a source whose every image has a
    readable header but broken data stops the run instead of yielding nothing forever."""

    def __init__(self, limit: int, rank: int, worker: int) -> None:
        self.counts = dict.fromkeys(SKIP_REASONS, 0)
        self.in_a_row, self.limit, self.rank, self.worker = 0, limit, rank, worker
        self.warned: set[str] = set()  # reasons of decode failures already logged

    def skip(self, reason: str) -> None:
        """Count one skipped record; raise TooManySkips at the limit."""
        self.counts[reason] += 1
        self.in_a_row += 1
        if self.in_a_row >= self.limit:
            raise skip_limit_error(self.counts, self.limit, self.rank, self.worker)

    def delivered(self) -> None:
        """A sample reached a batch (or a batch consumed before a resume was passed over)."""
        self.in_a_row = 0


class Codec(Protocol):
    def probe(self, raw: Raw) -> tuple[str | None, Any]: ...
    def decode(self, raw: Raw, group: Any, rng: random.Random) -> dict: ...
    def collate(self, samples: list[dict]) -> dict: ...


def buffer_shuffle(items: Iterator[Any], size: int, rng: random.Random) -> Iterator[Any]:
    """Shuffle a stream through a buffer of `size` items (as webdataset's `shuffle`), deterministically in `rng`."""
    if size <= 1:
        yield from items
        return
    buffer: list[Any] = []
    for item in items:
        if len(buffer) < size:
            buffer.append(item)
            continue
        i = rng.randrange(size)
        yield buffer[i]
        buffer[i] = item
    rng.shuffle(buffer)
    yield from buffer


def group_batches(items: Iterator[tuple[int, Raw, Any]], batch_size: int) -> Iterator[list[tuple[int, Raw, Any]]]:
    """Batches of `batch_size` items sharing a group (target size); partial groups are flushed at the end."""
    pending: dict[Any, list] = {}
    for item in items:
        group = pending.setdefault(item[2], [])
        group.append(item)
        if len(group) == batch_size:
            yield pending.pop(item[2])
    yield from pending.values()


def worker_role(resume_batches: int) -> tuple[int, int, int]:
    """(role, workers per rank, batches this role skips) of the calling dataloader worker."""
    info = get_worker_info()
    worker, workers = (info.id, info.num_workers) if info else (0, 1)
    role = (worker + resume_batches) % workers  # DataLoader takes worker i's batches at positions i, i+K, ...
    skip = resume_batches // workers + (1 if role < resume_batches % workers else 0)
    return role, workers, skip


class BatchStream(IterableDataset):
    """Yields whole batches (use `DataLoader(batch_size=None)`), each with `keys`, `skipped` and `worker_id`.

    With `final_tally`, a finite stream may end with a `tally_only` item that carries only the final skip counts
    (read it through `SkipTally.batches`).
    """

    def __init__(
        self, reader: Reader, codec: Codec, *, batch_size: int, seed: int, rank: int = 0, world_size: int = 1,
        resume_batches: int = 0, max_consecutive_skips: int = 10_000, final_tally: bool = False,
    ) -> None:  # fmt: skip
        super().__init__()
        self.reader, self.codec, self.batch_size, self.seed = reader, codec, batch_size, seed
        self.rank, self.world_size, self.resume_batches = rank, world_size, resume_batches
        self.max_skips, self.final_tally = max_consecutive_skips, final_tally

    def __iter__(self) -> Iterator[dict]:
        role, workers, skip = worker_role(self.resume_batches)
        g, total = self.rank * workers + role, self.world_size * workers
        skips = SkipCounter(self.max_skips, self.rank, role)
        warned: set[str] = set()

        def on_bad(url: str, exc: Exception) -> None:
            skips.counts["bad_shard"] += 1
            if url not in warned:
                warned.add(url)
                log.warning("skipping unreadable shard %s (%s)", url, exc)

        def checked() -> Iterator[tuple[int, Raw, Any]]:
            for position, raw in enumerate(self.reader(g, total, on_bad)):
                reason, group = self.codec.probe(raw)
                if reason:
                    skips.skip(reason)
                else:
                    yield position, raw, group

        sent = None
        for index, items in enumerate(group_batches(checked(), self.batch_size)):
            if index < skip:
                skips.delivered()  # consumed before the resume: never decoded
                continue
            batch = self._decode(items, skips, g)
            if batch is not None:
                sent = dict(skips.counts)
                yield batch
        if (
            self.final_tally and skips.counts != sent
        ):  # skips after the last batch (e.g. an unreadable last shard) still reach the totals
            yield {"skipped": dict(skips.counts), "worker_id": g, "tally_only": True}

    def _decode(self, items: list[tuple[int, Raw, Any]], skips: SkipCounter, g: int) -> dict | None:
        """Decode and collate one batch; a record whose header was fine but whose data is not is dropped and counted
        (toward the skip limit too)."""
        samples = []
        for position, raw, group in items:
            try:
                samples.append(self.codec.decode(raw, group, random.Random(f"sample:{self.seed}:{g}:{position}")))
            except Exception as exc:
                reason = "unsupported_image" if isinstance(exc, UnsupportedImage) else "corrupt_image"
                if reason not in skips.warned:  # once per worker and reason: the tallies count the rest
                    skips.warned.add(reason)
                    why = str(exc) if reason == "unsupported_image" else f"its data does not decode ({exc!r})"
                    log.warning("skipping %s: %s", raw.key, why)
                skips.skip(reason)
            else:
                skips.delivered()
        if not samples:
            return None
        batch = self.codec.collate(samples)
        batch["skipped"] = dict(skips.counts)
        batch["worker_id"] = g
        return batch


class SkipTally:
    """Totals of skipped samples across a rank's workers: each batch carries its worker's cumulative counts.

    `batches(loader)` feeds it every item and yields only real batches (not the `tally_only` ones).
    """

    def __init__(self) -> None:
        self.latest: dict[Any, dict[str, int]] = {}

    def update(self, batch: dict) -> None:
        """Remember the counts of the worker that produced `batch`."""
        if "skipped" in batch:
            self.latest[batch.get("worker_id", 0)] = dict(batch["skipped"])

    def batches(self, loader) -> Iterator[dict]:
        """The loader's batches, tallied; tally-only items are consumed here."""
        for batch in loader:
            self.update(batch)
            if not batch.get("tally_only"):
                yield batch

    def totals(self) -> dict[str, int]:
        """Skips by reason, summed over the latest counts of every worker seen."""
        totals = dict.fromkeys(SKIP_REASONS, 0)
        for counts in self.latest.values():
            for reason, n in counts.items():
                totals[reason] = totals.get(reason, 0) + n
        return totals
