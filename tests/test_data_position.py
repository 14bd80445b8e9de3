"""The data position (koala.data.position): resumes on any number of ranks and workers continue every stream exactly."""

import itertools
import random

import pytest

from koala.data.position import DataPosition
from koala.data.stream import owner


def take(position: DataPosition, micro_steps: int) -> list[tuple[int, int]]:
    """(stream, batch) of every batch the ranks take in `micro_steps` steps, as DataLoaders deal their workers'."""
    plans = {(r, w): position.plan(r, w) for r in range(position.ranks) for w in range(position.workers)}
    taken = []
    for i in range(micro_steps):
        for r in range(position.ranks):
            taken.append(next(plans[(r, i % position.workers)]))  # a DataLoader takes worker i % K's next batch
    return taken


def test_a_fresh_run_gives_each_worker_its_own_stream():
    position = DataPosition.start(ranks=2, workers=3)
    assert position.streams == 6
    for r, w in itertools.product(range(2), range(3)):  # stream r * K + w: the global worker numbering of the data
        assert position.streams_of(r, w) == [r * 3 + w]
        assert list(itertools.islice(position.plan(r, w), 3)) == [(r * 3 + w, 0), (r * 3 + w, 1), (r * 3 + w, 2)]


def test_a_resume_on_the_same_layout_continues_the_same_deal():
    position = DataPosition.start(ranks=2, workers=3)
    straight = take(position, 11)
    later = take(position.advanced(4).on(2, 3), 7)
    assert straight[2 * 4 :] == later  # micro-steps 5-11 the same, batch for batch and rank for rank


@pytest.mark.parametrize("seed", range(20))
def test_any_chain_of_layouts_takes_every_batch_of_every_stream_once_in_order(seed):
    rng = random.Random(seed)
    position = DataPosition.start(rng.randint(1, 4), rng.randint(1, 3))
    taken: list[tuple[int, int]] = []
    for _ in range(4):  # sessions on changing layouts
        steps = rng.randint(0, 9)
        taken += take(position, steps)
        position = position.advanced(steps).on(rng.randint(1, 4), rng.randint(1, 3))
        consumed = position.consumed()
        assert sorted(taken) == [(s, i) for s in range(position.streams) for i in range(consumed[s])]
    assert max(position.consumed()) - min(position.consumed()) <= 1  # the streams advance evenly


def test_shared_streams_count_their_skips_once():
    position = DataPosition.start(ranks=1, workers=1).advanced(3).on(2, 2)  # 1 stream, 4 workers share it
    assert owner(position, 0) == (0, 0)  # the worker that makes the stream's next batch (3) counts its skips
    plans = {(r, w): list(itertools.islice(position.plan(r, w), 2)) for r in range(2) for w in range(2)}
    assert plans == {(0, 0): [(0, 3), (0, 7)], (1, 0): [(0, 4), (0, 8)], (0, 1): [(0, 5), (0, 9)],
                     (1, 1): [(0, 6), (0, 10)]}  # fmt: skip
    assert DataPosition.from_json(position.to_json()) == position
