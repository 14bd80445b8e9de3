"""Tar shards (webdataset / img2dataset layout): list them, deal them to workers, read them into raw records."""

from __future__ import annotations

import glob
import os
import random
from collections.abc import Callable, Iterator

import webdataset as wds
from webdataset.shardlists import expand_urls
from webdataset.tariterators import group_by_keys, tar_file_iterator

from koala.data.records import Raw, UnreadableSource


def expand_shards(path: str) -> list[str]:
    """Shard list from a brace pattern (`a-{000..009}.tar`, `::`-joined lists, any URL), a glob or a folder."""
    urls: list[str] = []
    for url in expand_urls(path):
        if os.path.isdir(url):
            urls += sorted(glob.glob(os.path.join(url, "*.tar")))
        elif any(c in url for c in "*?[") and "://" not in url:
            urls += sorted(glob.glob(url))
        else:
            urls.append(url)
    if not urls:
        raise FileNotFoundError(f"no shards match {path!r}")
    return urls


def read_tar(url: str) -> Iterator[dict]:
    """The samples of one tar shard as webdataset groups them ({'__key__', ext: bytes, ...})."""
    try:
        stream = wds.gopen(url, "rb")
    except Exception as exc:  # a missing file, an unknown scheme, a failed download command
        raise UnreadableSource(f"{url}: {exc}") from exc
    try:
        files = ({**f, "__url__": url} for f in tar_file_iterator(stream))
        yield from group_by_keys(files)
    except Exception as exc:  # truncated or corrupt tar, a pipe that failed mid-way
        raise UnreadableSource(f"{url}: {exc}") from exc
    finally:
        stream.close()


def shard_order(
    shards: list[str], *, seed: int, worker: int, workers: int, resampled: bool, epochs: int | None, shuffle: bool
) -> Iterator[str]:
    """The shards one global worker reads, in order: drawn with replacement forever from the worker's own share
    (resampled), or each epoch's (shuffled) list dealt round-robin to the workers.

    Either way, with at least as many shards as global workers (ranks x dataloader workers), no two workers ever
    read the same shard. With fewer, a resampled worker draws from all shards (overlap is then unavoidable) and a
    finite one may get none.
    """
    if resampled:
        rng = random.Random(f"shards:{seed}:{worker}")
        own = shards[worker::workers] if len(shards) >= workers else shards
        while True:
            yield rng.choice(own)
    epoch = 0
    while epochs is None or epoch < epochs:
        order = list(shards)
        if shuffle:
            random.Random(f"epoch:{seed}:{epoch}").shuffle(order)
        yield from order[worker::workers]
        epoch += 1


def shard_records(
    urls: Iterator[str], to_raw: Callable[[dict], Raw], on_bad: Callable[[str, Exception], None], give_up: int
) -> Iterator[Raw]:
    """Raw records from consecutive shards; a shard that fails is reported through `on_bad` and left behind.

    `give_up` consecutive shards that fail without yielding a sample stop the run with an error (a wrong path or a
    dead server, rather than an unlucky shard).
    """
    failures = 0
    for url in urls:
        samples = read_tar(url)
        while True:
            try:
                sample = next(samples)
            except StopIteration:
                break
            except UnreadableSource as exc:
                on_bad(url, exc)
                failures += 1
                if failures >= give_up:
                    raise RuntimeError(f"{failures} shards in a row could not be read; last: {exc}") from exc
                break
            failures = 0
            yield to_raw(sample)
