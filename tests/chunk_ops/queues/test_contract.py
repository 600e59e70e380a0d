"""One contract, every backend: the embedded queue and SQS (a real moto server)."""

from __future__ import annotations

import multiprocessing
import time
import uuid

import pytest

from chunk_ops.queues import LeaseLost, open_queue


@pytest.fixture(params=["embedded", "sqs"])
def make_queue(request, tmp_path):
    def make(max_receives: int = 3):
        if request.param == "sqs":
            request.getfixturevalue("moto_sqs")
            url = f"sqs://contract-{uuid.uuid4().hex[:12]}"
        else:
            url = f"file://{tmp_path}/{uuid.uuid4().hex[:8]}.sqlite"
        return open_queue(url, create=True, max_receives=max_receives)

    return make


def test_send_receive_delete_and_counts(make_queue):
    q = make_queue()
    assert q.send_batch(f"task-{i}" for i in range(25)) == 25  # more than one SQS batch
    assert (q.counts().visible, q.counts().in_flight) == (25, 0)
    leases = q.receive(max_messages=10, visibility_timeout=30)
    assert len(leases) == 10 and all(lease.receive_count == 1 for lease in leases)
    assert len({lease.body for lease in leases}) == 10
    counts = q.counts()
    assert (counts.visible, counts.in_flight, counts.dead) == (15, 10, 0)
    for lease in leases:
        q.delete(lease)
    assert (q.counts().visible, q.counts().in_flight) == (15, 0)


def test_an_expired_lease_redelivers(make_queue):
    q = make_queue()
    q.send_batch(["only"])
    first = q.receive(visibility_timeout=1)[0]
    assert q.receive(visibility_timeout=1) == []  # hidden while leased
    time.sleep(1.6)
    again = q.receive(visibility_timeout=30)
    assert [m.body for m in again] == ["only"] and again[0].receive_count == 2
    assert first.receipt != again[0].receipt


def test_a_heartbeat_keeps_a_task_past_its_timeout(make_queue):
    q = make_queue()
    q.send_batch(["long task"])
    lease = q.receive(visibility_timeout=2)[0]
    end = time.time() + 4.5  # more than twice the timeout
    while time.time() < end:
        q.extend(lease, 2)
        assert q.receive(visibility_timeout=2) == []
        time.sleep(0.7)
    q.delete(lease)
    time.sleep(2.2)
    assert q.receive(visibility_timeout=2) == [] and q.counts().pending == 0


def test_release_makes_a_task_visible_at_once(make_queue):
    q = make_queue()
    q.send_batch(["give back"])
    lease = q.receive(visibility_timeout=60)[0]
    q.release(lease)
    assert [m.body for m in q.receive(visibility_timeout=60)] == ["give back"]


def test_dead_letter_queue_receives_after_max_receives(make_queue):
    q = make_queue(max_receives=2)
    q.send_batch(["poison", "fine"])
    for _ in range(2):
        leases = q.receive(max_messages=10, visibility_timeout=60)
        for lease in leases:
            if lease.body == "fine":
                q.delete(lease)
            else:
                q.release(lease)
    assert q.receive(max_messages=10, visibility_timeout=60) == []  # third receive: redriven
    counts = q.counts()
    assert (counts.visible, counts.in_flight, counts.dead) == (0, 0, 1)
    assert q.dead_letters() == ["poison"]


def test_redrive_brings_dead_letters_back_with_a_fresh_receive_count(make_queue):
    q = make_queue(max_receives=1)
    q.send_batch([f"poison-{i}" for i in range(12)] + ["fine"])  # more than one SQS batch of dead letters
    for _ in range(3):
        for lease in q.receive(max_messages=10, visibility_timeout=60):
            q.delete(lease) if lease.body == "fine" else q.release(lease)
    assert q.receive(max_messages=10, visibility_timeout=60) == []
    assert q.counts().dead == 12
    assert q.redrive() == 12
    counts = q.counts()
    assert (counts.visible, counts.dead) == (12, 0)
    leases = []
    while len(leases) < 12:
        got = q.receive(max_messages=10, visibility_timeout=60)
        assert got, f"only {len(leases)} of 12 came back"
        leases += got
    assert sorted(lease.body for lease in leases) == sorted(f"poison-{i}" for i in range(12))
    assert {lease.receive_count for lease in leases} == {1}  # a fresh start: max_receives applies anew
    assert q.redrive() == 0


def test_redrive_moves_only_the_letters_it_is_told(make_queue):
    q = make_queue(max_receives=1)
    q.send_batch(["a-0", "a-1", "a-2", "b-0", "b-1"])  # two jobs sharing a queue
    for _ in range(2):
        for lease in q.receive(max_messages=10, visibility_timeout=60):
            q.release(lease)
    assert q.receive(max_messages=10, visibility_timeout=60) == [] and q.counts().dead == 5
    assert q.redrive(keep=lambda body: body.startswith("a-")) == 3
    assert (q.counts().visible, q.counts().dead) == (3, 2)  # b's letters stay dead
    assert sorted(lease.body for lease in q.receive(max_messages=10, visibility_timeout=60)) == ["a-0", "a-1", "a-2"]


def test_a_lost_lease_cannot_be_extended_embedded(tmp_path):
    """The embedded queue refuses a stale receipt (SQS's answer varies by server)."""
    q = open_queue(f"file://{tmp_path}/q.sqlite", create=True)
    q.send_batch(["x"])
    stale = q.receive(visibility_timeout=0.5)[0]
    time.sleep(0.7)
    fresh = q.receive(visibility_timeout=30)[0]
    with pytest.raises(LeaseLost):
        q.extend(stale, 30)
    q.delete(fresh)


def _drain(url: str, out) -> None:
    q = open_queue(url)
    got = []
    while True:
        leases = q.receive(max_messages=3, visibility_timeout=60)
        if not leases:
            break
        for lease in leases:
            got.append(lease.body)
            q.delete(lease)
    out.put(got)


def test_concurrent_workers_drain_every_task(make_queue, request):
    """Every task reaches a worker.  SQS standard queues deliver at least once (a
    duplicate is allowed, and workers are idempotent for that reason); the
    embedded queue's write lock makes it exactly once."""
    q = make_queue()
    q.send_batch(str(i) for i in range(120))
    ctx = multiprocessing.get_context("spawn")
    out = ctx.Queue()
    procs = [ctx.Process(target=_drain, args=(q.url, out)) for _ in range(4)]
    for p in procs:
        p.start()
    results = [out.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(30)
    everything = [body for got in results for body in got]
    assert set(everything) == {str(i) for i in range(120)}
    if "embedded" in request.node.callspec.id:
        assert len(everything) == 120
