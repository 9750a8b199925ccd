"""hub/gc_policy.py: the hub's processes collect less often, without leaving garbage behind."""

from __future__ import annotations

import gc
import weakref
from collections.abc import Iterator

import pytest

from hub import gc_policy


@pytest.fixture
def collector() -> Iterator[list[int]]:
    """The generation of every collection while the test runs; CPython's settings and freeze restored after. The
    test session's own objects are frozen first: CPython starts a full collection only once the objects promoted
    since the last one reach a quarter of those it kept, so without this the counts would depend on the session."""
    saved = gc.get_threshold()
    collections: list[int] = []
    gc.freeze()
    gc.collect()

    def count(phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            collections.append(info["generation"])

    gc.callbacks.append(count)
    try:
        yield collections
    finally:
        gc.callbacks.remove(count)
        gc.set_threshold(*saved)
        gc.unfreeze()


def batches(count: int = 300, size: int = 4_000) -> None:
    """What ingest does to the heap: batches of messages (a few tracked objects each) alive while the next is built,
    then dropped."""
    previous: list[list[object]] = []
    for b in range(count):
        current = [[b, {"seq": i}] for i in range(size)]
        previous = current
    del previous


def test_a_batch_dies_young_instead_of_bringing_on_full_collections(collector: list[int]) -> None:
    gc.set_threshold(700, 10, 10)  # CPython's default: the batches reach the old generation
    batches()
    default_full = collector.count(2)
    collector.clear()
    gc_policy.for_throughput()
    assert gc.get_threshold()[0] == gc_policy.YOUNG
    batches()
    assert default_full >= 3, "the workload no longer shows the default's cost: make it heavier"
    assert collector.count(2) <= 1


def test_for_throughput_keeps_the_older_generations(collector: list[int]) -> None:
    gc.set_threshold(700, 7, 9)
    gc_policy.for_throughput()
    assert gc.get_threshold() == (gc_policy.YOUNG, 7, 9)


def test_a_cycle_dropped_before_the_freeze_is_collected_not_frozen(collector: list[int]) -> None:
    class Node:
        other: Node

    a, b = Node(), Node()
    a.other, b.other = b, a
    gone = weakref.ref(a)
    loaded = [Node() for _ in range(100)]  # what the start loaded, still in use
    del a, b
    frozen = gc.get_freeze_count()  # the test session's own objects (the fixture)
    gc_policy.freeze_loaded()
    assert gone() is None
    assert gc.get_freeze_count() >= frozen + len(loaded)
