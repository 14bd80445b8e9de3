"""The batch stream: deterministic per (seed, rank, worker), resumable without decoding, robust to bad samples.

Each dataloader worker on each rank is one *global worker* g = rank * num_workers + role of W = world_size *
num_workers. It reads its own shards (or indices), shuffles them with its own seeded RNG, checks every record
cheaply (caption present, image header readable, size, bucket: no decoding), groups records into batches of one
target size, and only then decodes the batches it yields. Skipping the first batches of a resumed run therefore runs
the cheap checks only. Per-sample randomness (crop, flip, caption dropout) is seeded by (seed, g, position), so it
does not depend on what was skipped.

Which batches of which stream a worker makes follows the run's `DataPosition` (koala.data.position): on the first
start one stream per worker; a resume on the same layout lets DataLoader worker 0 play the role that would have made
the next batch; a resume on another number of ranks or workers deals the streams afresh from where each stopped.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable, Iterator
from typing import Any, Protocol

from torch.utils.data import IterableDataset, get_worker_info

from koala.data.position import DataPosition
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
    """The skips in a row of one stream as one worker reads it: records refused by the cheap checks and records whose
    data then fails to decode count alike, so a source whose every image has a readable header but broken data stops
    the run instead of yielding nothing forever. Each skip is tallied by reason into the dict the caller names."""

    def __init__(self, limit: int, rank: int, stream: int) -> None:
        self.in_a_row, self.limit, self.rank, self.stream = 0, limit, rank, stream
        self.warned: set[str] = set()  # reasons of decode failures already logged

    def skip(self, counts: dict[str, int], reason: str) -> None:
        """Count one skipped record into `counts`; raise TooManySkips at the limit."""
        counts[reason] += 1
        self.in_a_row += 1
        if self.in_a_row >= self.limit:
            raise skip_limit_error(counts, self.limit, self.rank, self.stream)

    def delivered(self) -> None:
        """A sample reached a batch, or a batch of the stream was passed over (made before a resume, or by another
        worker sharing the stream): neither is this worker's to decode."""
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


def current_worker() -> tuple[int, int]:
    """(DataLoader worker id, workers of this DataLoader): (0, 1) in the main process."""
    info = get_worker_info()
    return (info.id, info.num_workers) if info else (0, 1)


class _Cursor:
    """One stream's batches (checked, not decoded), taken by index in increasing order."""

    def __init__(self, batches: Iterator[list], skips: SkipCounter) -> None:
        self.batches, self.skips, self.next_index = batches, skips, 0

    def take(self, index: int) -> list | None:
        """Batch `index` of the stream (earlier ones are passed over undecoded); None once the stream has ended."""
        for items in self.batches:
            self.next_index += 1
            if self.next_index - 1 == index:
                return items
            self.skips.delivered()  # not this worker's to decode: its records do not count as skipped in a row
        return None


class BatchStream(IterableDataset):
    """Yields whole batches (use `DataLoader(batch_size=None)`), each with `keys`, `skipped` and `worker_id`.

    The batches a worker makes and the streams they come from follow `position` (koala.data.position): by default a
    fresh run's, or `resume_batches` into it on the same layout. With `final_tally`, a finite stream may end with a
    `tally_only` item that carries only the final skip counts (read it through `SkipTally.batches`).
    """

    def __init__(
        self, reader: Reader, codec: Codec, *, batch_size: int, seed: int, rank: int = 0, world_size: int = 1,
        resume_batches: int = 0, max_consecutive_skips: int = 10_000, final_tally: bool = False,
        position: DataPosition | None = None,
    ) -> None:  # fmt: skip
        super().__init__()
        self.reader, self.codec, self.batch_size, self.seed = reader, codec, batch_size, seed
        self.rank, self.world_size, self.resume_batches = rank, world_size, resume_batches
        self.max_skips, self.final_tally, self.position = max_consecutive_skips, final_tally, position

    def layout(self, workers: int) -> DataPosition:
        """This session's position: the one given, else a fresh run's advanced by `resume_batches`."""
        if self.position is not None:
            if (self.position.ranks, self.position.workers) != (self.world_size, workers):
                raise ValueError(f"data position for {self.position.ranks} x {self.position.workers} workers used by "
                                 f"{self.world_size} ranks x {workers}")  # fmt: skip
            return self.position
        return DataPosition.start(self.world_size, workers).advanced(self.resume_batches)

    def __iter__(self) -> Iterator[dict]:
        worker, workers = current_worker()
        position = self.layout(workers)
        g = self.rank * workers + worker  # this worker's id in the skip tallies
        counts = dict.fromkeys(SKIP_REASONS, 0)
        skips = {s: SkipCounter(self.max_skips, self.rank, s) for s in position.streams_of(self.rank, worker)}
        cursors = {s: _Cursor(group_batches(self._checked(s, position, counts, g, skips[s]), self.batch_size), skips[s])
                   for s in skips}  # fmt: skip
        ended: set[int] = set()
        sent = None
        for stream, index in position.plan(self.rank, worker):
            if len(ended) == len(cursors):
                break
            items = None if stream in ended else cursors[stream].take(index)
            if items is None:
                ended.add(stream)  # a finite stream ran out; the worker's other streams go on
                continue
            batch = self._decode(items, counts, g, skips[stream])
            if batch is not None:
                sent = dict(counts)
                yield batch
        if (
            self.final_tally and counts != sent
        ):  # skips after the last batch (e.g. an unreadable last shard) still reach the totals
            yield {"skipped": dict(counts), "worker_id": g, "tally_only": True}

    def _checked(
        self, stream: int, position: DataPosition, counts: dict[str, int], g: int, skips: SkipCounter
    ) -> Iterator[tuple]:
        """A stream's records that pass the cheap checks, as (position in the stream, record, group).

        A stream several workers share is read by each of them; only its first worker counts what it skips.
        """
        counting = owner(position, stream) == (self.rank, g - self.rank * position.workers)
        mine = counts if counting else dict.fromkeys(SKIP_REASONS, 0)
        warned: set[str] = set()

        def on_bad(url: str, exc: Exception) -> None:
            mine["bad_shard"] += 1
            if url not in warned and counting:
                warned.add(url)
                log.warning("skipping unreadable shard %s (%s)", url, exc)

        for index, raw in enumerate(self.reader(stream, position.streams, on_bad)):
            reason, group = self.codec.probe(raw)
            if reason:
                skips.skip(mine, reason)
            else:
                yield index, raw, group  # the in-a-row count restarts only once its data decodes (in _decode)

    def _decode(
        self, items: list[tuple[int, Raw, Any]], counts: dict[str, int], g: int, skips: SkipCounter
    ) -> dict | None:
        """Decode and collate one batch of stream `skips.stream`; a record whose header was fine but whose data is not
        is dropped and counted (toward the skip limit too). A sample's randomness (crop, flip, dropout) is seeded by
        its stream and its place in it."""
        samples = []
        for position, raw, group in items:
            rng = random.Random(f"sample:{self.seed}:{skips.stream}:{position}")
            try:
                samples.append(self.codec.decode(raw, group, rng))
            except Exception as exc:
                reason = "unsupported_image" if isinstance(exc, UnsupportedImage) else "corrupt_image"
                if reason not in skips.warned:  # once per stream and reason: the tallies count the rest
                    skips.warned.add(reason)
                    why = str(exc) if reason == "unsupported_image" else f"its data does not decode ({exc!r})"
                    log.warning("skipping %s: %s", raw.key, why)
                skips.skip(counts, reason)  # a decoded batch is this worker's: counted here whoever owns the stream
            else:
                skips.delivered()
        if not samples:
            return None
        batch = self.codec.collate(samples)
        batch["skipped"] = dict(counts)
        batch["worker_id"] = g
        return batch


def owner(position: DataPosition, stream: int) -> tuple[int, int]:
    """(rank, DataLoader worker) that makes a stream's first batch of this deal: the one that counts its skips."""
    v, r, taken = position.streams, position.ranks, position.ranks * position.batches
    first = taken + (position.order.index(stream) - taken) % v  # the first Q slot of `stream` not yet taken
    return first % r, (first // r - position.batches) % position.workers


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
