"""ModelWorker (one thread, user jobs first, prefetch de-duplication, shutdown) and the EmbeddingCache it fills."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch
from conftest import disc_image

from SPASegmentationLib.embeddings import EmbeddingCache
from SPASegmentationLib.errors import InputError
from SPASegmentationLib.session import Session
from SPASegmentationLib.worker import ModelWorker, WorkerClosedError, neighbour_order

TIMEOUT = 30.0


@pytest.fixture
def worker():
    w = ModelWorker(name="test worker")
    yield w
    w.shutdown(wait=True, cancel_pending=True)


def block(worker: ModelWorker) -> threading.Event:
    """Occupy the worker thread until the returned event is set (so a queue builds up)."""
    started, release = threading.Event(), threading.Event()

    def hold() -> None:
        started.set()
        release.wait(TIMEOUT)

    worker.submit(hold)
    assert started.wait(TIMEOUT)
    return release


def test_user_jobs_jump_ahead_of_queued_prefetches(worker):
    order = []
    release = block(worker)
    for key in ("a", "b", "c"):
        assert worker.prefetch(key, lambda key=key: order.append(key))
    first = worker.submit(order.append, "user 1")
    second = worker.submit(lambda: order.append("user 2") or 42)
    assert worker.pending() == (2, 3)
    release.set()
    assert second.result(TIMEOUT) == 42 and first.result(TIMEOUT) is None
    assert worker.wait_idle(TIMEOUT)
    assert order == ["user 1", "user 2", "a", "b", "c"]


def test_prefetch_keys_are_deduplicated_while_queued_or_running(worker):
    runs = []
    release = block(worker)
    assert worker.prefetch("slice 3", lambda: runs.append(1))
    assert not worker.prefetch("slice 3", lambda: runs.append(2))
    assert worker.is_queued("slice 3") and worker.pending() == (0, 1)
    release.set()
    assert worker.wait_idle(TIMEOUT)
    assert runs == [1] and not worker.is_queued("slice 3")
    assert worker.prefetch("slice 3", lambda: runs.append(3))  # done: the key may be queued again
    assert worker.wait_idle(TIMEOUT) and runs == [1, 3]


def test_exceptions_reach_the_future_and_the_thread_survives(worker):
    def fail() -> None:
        raise ValueError("bad slice 7")

    with pytest.raises(ValueError, match="bad slice 7"):
        worker.submit(fail).result(TIMEOUT)
    worker.prefetch("broken", fail)  # a failed prefetch is logged, not raised
    assert worker.submit(lambda x, y=1: x + y, 2, y=3).result(TIMEOUT) == 5
    assert worker.alive


def test_every_call_runs_on_one_persistent_thread(worker):
    seen = []
    futures = [worker.submit(lambda: seen.append(threading.get_ident())) for _ in range(3)]
    for i in range(3):
        worker.prefetch(f"k{i}", lambda: seen.append(threading.get_ident()))
    futures.append(worker.submit(worker.on_worker_thread))
    assert futures[-1].result(TIMEOUT) is True
    assert worker.wait_idle(TIMEOUT)
    assert len(seen) == 6 and set(seen) == {worker.thread_id}
    assert worker.thread_id != threading.get_ident() and not worker.on_worker_thread()


def test_shutdown_finishes_pending_jobs_then_rejects_new_work():
    worker = ModelWorker()
    release = block(worker)
    pending = worker.submit(lambda: "finished")
    dropped = []
    worker.prefetch("late", lambda: dropped.append(1))
    worker.shutdown(wait=False)
    with pytest.raises(WorkerClosedError, match="shut down"):
        worker.submit(print, "never")
    assert not worker.prefetch("again", lambda: None)
    release.set()
    assert pending.result(TIMEOUT) == "finished"
    worker.shutdown(wait=True)
    assert not worker.alive and dropped == []

    cancelling = ModelWorker()
    release = block(cancelling)
    waiting = cancelling.submit(lambda: "never")
    cancelling.shutdown(wait=False, cancel_pending=True)
    release.set()
    cancelling.shutdown(wait=True)
    assert waiting.cancelled() and not cancelling.alive


def test_lookup_evicts_the_least_recently_used(untrained_model):
    lookup = EmbeddingCache(untrained_model, capacity=2)
    images = [disc_image(40, 40, centre=(20, 20), radius=8, seed=s) for s in range(3)]
    tensors = [torch.full((1, 2, 2, 2), float(s)) for s in range(3)]
    lookup.put(images[0], tensors[0])
    lookup.put(images[1], tensors[1])
    assert lookup.get(images[0]) is tensors[0]  # a hit: no encoding, and image 0 is now the most recent
    assert lookup.hits == 1 and lookup.misses == 0
    lookup.put(images[2], tensors[2])
    assert len(lookup) == 2
    assert lookup.contains(images[0]) and lookup.contains(images[2]) and not lookup.contains(images[1])
    assert not lookup.contains(images[0], window=(-100, 200))  # the window is part of the key
    with pytest.raises(InputError, match="capacity"):
        EmbeddingCache(untrained_model, capacity=0)


def test_lookup_matches_direct_encoding_and_feeds_a_session(untrained_model, worker):
    image = disc_image(64, 80, centre=(40, 32), radius=14)
    lookup = EmbeddingCache(untrained_model, capacity=4)
    queued = lookup.prefetch_around(worker, lambda i: image, 0, 1, radius=0)
    assert queued == [0] and worker.wait_idle(TIMEOUT)
    assert lookup.contains(image) and lookup.misses == 1
    cached = worker.submit(lookup.get, image).result(TIMEOUT)
    assert lookup.get(image) is cached and lookup.misses == 1
    direct, _ = untrained_model.encode(image)
    assert torch.equal(cached, direct)
    box = (22.0, 14.0, 58.0, 50.0)
    with_cache = Session(untrained_model, image, n_samples=4, embedding=cached).start(box=box)
    without = Session(untrained_model, image, n_samples=4).start(box=box)
    assert np.array_equal(with_cache.probability, without.probability)


def test_prefetch_around_queues_nearest_slices_first(untrained_model, worker):
    assert neighbour_order(5, 10, 2) == [5, 6, 4, 7, 3]
    assert neighbour_order(0, 3, 2) == [0, 1, 2]
    assert neighbour_order(9, 10, 1) == [9, 8]
    volume = np.stack([disc_image(40, 40, centre=(20, 20), radius=5 + s, seed=s) for s in range(10)])
    lookup = EmbeddingCache(untrained_model, capacity=8)
    lookup.put(volume[6], torch.zeros(1))  # already cached: not queued again
    release = block(worker)
    assert lookup.prefetch_around(worker, volume, 5, len(volume), radius=2) == [5, 4, 7, 3]
    assert lookup.prefetch_around(worker, lambda i: volume[i], 5, len(volume), radius=2) == []  # all queued
    assert worker.pending() == (0, 4)
    assert worker.cancel_prefetches() == 4 and worker.pending() == (0, 0)
    release.set()
    with pytest.raises(InputError, match="radius"):
        lookup.prefetch_around(worker, volume, 5, len(volume), radius=-1)
