"""Where a run's data streams stand, across resumes on another number of ranks or data workers.

A run's data is V *streams*, fixed at its first start: one per data worker then (V = ranks x data.num_workers, at
least 1 worker per rank; worker w of rank r reads stream r * K + w). Stream s reads its own share of the shards or
indices (`shard_order` / `index_order` with worker s of V) in its own seeded order, and yields batches b_s0, b_s1, ...
(koala.data.stream).

The batches are dealt in one fixed sequence Q, round-robin over the streams from an *origin* (the batches each stream
had given when the current layout began): Q[t] = batch `origin[s] + t // V` of stream `s = order[t % V]`. A new deal
puts the streams that lag (by at most one batch) first, so that they stay within one batch of each other. Rank r's i-th
batch is Q[r + R * i] (R ranks); a torch DataLoader takes its K workers' batches in turn, so worker w of rank r makes
the batches i = w, w + K, ... . After every rank took n batches, Q[0 : R * n] is consumed: exactly the first
`consumed()[s]` batches of every stream s, and nothing else.

A resume with the same ranks and workers continues Q where it stopped (the DataLoader's worker w takes the role of
batch n + w: what the uninterrupted run would have done, bit for bit). A resume on another layout starts a new Q at
the consumed counts: every stream continues exactly after its last consumed batch, so no sample is repeated or
skipped (finite data: up to the epoch's end, where a rank that runs out stops them all). When there are more workers
than streams, a stream is shared: its workers all read (without decoding) its records, and each decodes only the
batches dealt to it; with fewer workers than streams, a worker interleaves several.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any


def data_workers(num_workers: int) -> int:
    """Data workers per rank: the DataLoader's workers, or 1 when it reads in the main process."""
    return max(1, num_workers)


@dataclass(frozen=True)
class DataPosition:
    """The data streams' state: V streams, the origin of the current deal, its layout, batches per rank since."""

    streams: int  # V: fixed for the run
    origin: tuple[int, ...]  # batches of each stream consumed when the current layout began
    ranks: int  # R of the current layout
    workers: int  # K: data workers per rank of the current layout (a DataLoader without workers counts as 1)
    batches: int  # n: batches each rank took since the origin
    order: tuple[int, ...]  # the streams in the order Q deals them

    @classmethod
    def start(cls, ranks: int, workers: int) -> DataPosition:
        """A fresh run: one stream per data worker, worker w of rank r on stream r * workers + w."""
        v = ranks * workers
        return cls(v, (0,) * v, ranks, workers, 0, tuple((p % ranks) * workers + p // ranks for p in range(v)))

    def consumed(self) -> tuple[int, ...]:
        """Batches of each stream consumed so far: Q[0 : R * n] on top of the origin."""
        taken, v = self.ranks * self.batches, self.streams
        extra = set(self.order[: taken % v])
        return tuple(o + taken // v + (1 if s in extra else 0) for s, o in enumerate(self.origin))

    def advanced(self, batches: int) -> DataPosition:
        """The position after every rank took `batches` more batches."""
        return DataPosition(self.streams, self.origin, self.ranks, self.workers, self.batches + batches, self.order)

    def on(self, ranks: int, workers: int) -> DataPosition:
        """The position for a session of `ranks` x `workers`: the same deal when the layout is unchanged, else a new
        deal from the batches consumed so far."""
        if (ranks, workers) == (self.ranks, self.workers):
            return self
        consumed, place = self.consumed(), {s: p for p, s in enumerate(self.order)}
        order = tuple(sorted(range(self.streams), key=lambda s: (consumed[s], place[s])))  # lagging streams first
        return DataPosition(self.streams, consumed, ranks, workers, 0, order)

    def plan(self, rank: int, worker: int) -> Iterator[tuple[int, int]]:
        """(stream, batch index) of every batch DataLoader worker `worker` of `rank` makes, in order, forever."""
        order, i = self.order, self.batches + worker  # the rank's batch this worker makes first: its role
        while True:
            t = rank + self.ranks * i
            stream = order[t % self.streams]
            yield stream, self.origin[stream] + t // self.streams
            i += self.workers

    def streams_of(self, rank: int, worker: int) -> list[int]:
        """The streams a worker's batches come from (Q's pattern repeats with period V in the rank's batch index)."""
        plan = self.plan(rank, worker)
        return sorted({next(plan)[0] for _ in range(self.streams)})

    def to_json(self) -> dict[str, Any]:
        return {"streams": self.streams, "origin": list(self.origin), "ranks": self.ranks, "workers": self.workers,
                "batches": self.batches, "order": list(self.order)}  # fmt: skip

    @classmethod
    def from_json(cls, record: dict[str, Any]) -> DataPosition:
        return cls(record["streams"], tuple(record["origin"]), record["ranks"], record["workers"], record["batches"],
                   tuple(record["order"]))  # fmt: skip
