"""Ingest over a real loopback server without Ray: the ledger's ids and a fake buffer in this process.

Whole simulations arrive as samples, a bad chunk or a failure report ends a stream and re-queues its
simulation, and however many streams wait for the trainer, Predict keeps threads of its own: streams
beyond the server's share are refused at once (RESOURCE_EXHAUSTED) instead of taking them."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

from services.config import IngestConfig
from services.gateway.hub import ModelHub
from services.ingest.capacity import CallSlots
from services.ingest.client import IngestError, Simulation, connect
from services.ingest.server import StudyFeed, SurgeServer
from services.ledger import SimulationIds
from services.sampling import Sampler
from tests.ingest.test_predict_grpc import HEAT, PARAMS, _publish

TOKEN = "ingest-t"
SAMPLES = len(HEAT.times)  # per heat2d simulation: every recorded step
SIM_BYTES = SAMPLES * int(np.prod(HEAT.grid)) * 4


def wait_for(cond: Callable[[], Any], timeout: float = 10.0, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if v := cond():
            return v
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


def within(seconds: float, fn: Callable[[], Any]) -> Any:
    """``fn()`` in a thread, failing the test if it has not returned (or raised) after ``seconds``."""
    pool = ThreadPoolExecutor(1)
    try:
        return pool.submit(fn).result(timeout=seconds)
    finally:
        pool.shutdown(wait=False)


class FakeBuffer:
    """A buffer shard's ``put`` in this process; while ``gate`` is clear, puts block (a full FIFO shard)."""

    def __init__(self, blocked: bool = False) -> None:
        self.gate = threading.Event()
        if not blocked:
            self.gate.set()
        self.lock = threading.Lock()
        self.waiting = 0
        self.rows: list[tuple[int, int]] = []  # (sim_id, t_index) put

    def put(self, x: np.ndarray, y: np.ndarray, sim_id: np.ndarray, t_index: np.ndarray) -> int:
        with self.lock:
            self.waiting += 1
        try:
            if not self.gate.wait(60):  # bounded: a failing test must not leave a thread blocked for ever
                raise TimeoutError("the test never opened the buffer")
        finally:
            with self.lock:
                self.waiting -= 1
        with self.lock:
            self.rows.extend(zip(sim_id.tolist(), t_index.tolist(), strict=True))
        return len(x)


def send_all(sim: Simulation) -> None:
    for f, steps in sim.required.items():
        for k in steps:
            sim.send(f, k, np.full(sim.grid, 300.0 + k, dtype=np.float32))


def feed_of(buffer: FakeBuffer, budget: int = 20, attempts: int = 3, **ingest: Any) -> StudyFeed:
    ids = SimulationIds(Sampler(HEAT.params, "uniform", 0), 0, budget, attempts)
    return StudyFeed("local", HEAT, buffer, ids, IngestConfig(enabled=True, port=0, **ingest), lambda *a: None)


@pytest.fixture(scope="module")
def hub(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ModelHub]:
    root: Path = tmp_path_factory.mktemp("store")
    _publish(root)
    h = ModelHub(root, 0.2)
    h.start()
    try:
        yield h
    finally:
        h.stop()


def test_a_whole_simulation_becomes_its_samples_and_a_bad_one_is_handed_out_again() -> None:
    buffer = FakeBuffer()
    feed = feed_of(buffer)
    srv = SurgeServer("127.0.0.1", 0, TOKEN)
    srv.attach(feed)
    try:
        with connect(srv.address, TOKEN) as c:
            sim = c.next_simulation("local")
            send_all(sim)
            assert within(10, sim.finish) == SAMPLES
            assert sorted(buffer.rows) == [(sim.id, k) for k in range(SAMPLES)]
            # A chunk off the grid: refused with the spec's words, nothing reaches the buffer, handed out again.
            bad = c.next_simulation("local")
            with pytest.raises(IngestError) as e:
                bad.send("u", 0, np.zeros((3, 3)))
                within(10, bad.finish)
            assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT
            assert e.value.message == (
                f"simulation {bad.id}, chunk 'u' at time_index 0: shape [3, 3] does not match the grid [8, 8]"
            )
            again = wait_for(lambda: c.next_simulation("local"), what="the re-queued simulation")
            assert again.id == bad.id and again.attempt == 2
            # A failure reported mid-stream ends the stream; the simulation is handed out again.
            again.send("u", 0, np.zeros(again.grid))
            assert again.fail("solver diverged") is True
            st = wait_for(lambda: (s := feed.stats())["streams"] == 0 and s, what="the stream to end")
            assert st["done"] == 1 and st["failed"] == 2 and st["rejected_streams"] == 2
            assert st["staged_bytes"] == 0 and len(buffer.rows) == SAMPLES
    finally:
        srv.detach(feed)
        srv.stop()


def test_streams_stuck_in_backpressure_leave_predict_its_threads_and_one_more_is_refused(hub: ModelHub) -> None:
    streams = 3
    buffer = FakeBuffer(blocked=True)
    # One simulation staged at a time; the refused ones below are re-queued however often they fail.
    feed = feed_of(buffer, attempts=1000, max_staged_mb=SIM_BYTES / 2**20)
    srv = SurgeServer("127.0.0.1", 0, TOKEN, ingest_streams=streams, study_calls=2, predict_threads=2)
    srv.serve_predictions(hub, 64)
    srv.attach(feed)
    assert srv.workers == streams + 2 + 2
    client = connect(srv.address, TOKEN)
    stuck: list[threading.Thread] = []
    results: list[int | BaseException] = []

    def run_one() -> None:
        try:
            sim = client.next_simulation("local")
            send_all(sim)  # all but the first wait here for credit: staging holds one simulation
            results.append(sim.finish())  # the first waits here: its put blocks on the full buffer
        except BaseException as e:
            results.append(e)

    try:
        for _ in range(streams):
            stuck.append(threading.Thread(target=run_one, daemon=True))
            stuck[-1].start()
        wait_for(
            lambda: buffer.waiting == 1 and feed.stats()["streams_waiting"] == streams - 1,
            what="one stream blocked in its put and the others waiting for staging memory",
        )
        assert srv.streams.in_use == streams
        # Every ingest slot is taken; more streams are refused at once, not queued behind the others.
        for _ in range(2 * srv.workers):
            extra = client.next_simulation("local")
            with pytest.raises(IngestError) as e:
                within(5, lambda s=extra: s.send("u", 0, np.zeros(s.grid)))
            assert e.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert (
                e.value.message == f"this server takes {streams} ingest streams at a time and all are busy; retry later"
            )
            assert within(5, lambda s=extra: s.fail("refused")) is True  # Study calls have threads of their own
        # Predict answers, several at once, while the streams stay stuck.
        with ThreadPoolExecutor(8) as pool:
            answers = list(
                pool.map(lambda _: client.predict("heat2d", params=PARAMS, times=[0.0], timeout=5)[1], range(8))
            )
        assert answers == [1] * 8
        assert buffer.waiting == 1 and not results
    finally:
        buffer.gate.set()  # the trainer takes: every stuck stream completes
        for t in stuck:
            t.join(20)
    assert results == [SAMPLES] * streams and not any(t.is_alive() for t in stuck)
    wait_for(lambda: srv.streams.in_use == 0, what="the ingest slots to come back")
    with connect(srv.address, TOKEN) as c:  # and a new stream is taken again
        sim = c.next_simulation("local")
        send_all(sim)
        assert within(10, sim.finish) == SAMPLES
    client.close()
    srv.detach(feed)
    srv.stop()


def test_a_stream_whose_client_goes_away_while_waiting_gives_its_slot_back() -> None:
    buffer = FakeBuffer(blocked=True)
    feed = feed_of(buffer, max_staged_mb=SIM_BYTES / 2**20)  # one simulation staged at a time
    srv = SurgeServer("127.0.0.1", 0, TOKEN, ingest_streams=2, study_calls=1, predict_threads=1)
    srv.attach(feed)
    errors: list[IngestError] = []

    def send_until_refused(sim: Simulation) -> None:
        try:
            send_all(sim)  # waits for credit, which comes once the server has staging memory for it
        except IngestError as e:
            errors.append(e)

    try:
        with connect(srv.address, TOKEN) as c:
            first = c.next_simulation("local")
            send_all(first)
            finishing = threading.Thread(target=first.finish, daemon=True)
            finishing.start()
            wait_for(lambda: buffer.waiting == 1, what="the first put to block")
            leaving = connect(srv.address, TOKEN)
            second = leaving.next_simulation("local")
            sending = threading.Thread(target=send_until_refused, args=(second,), daemon=True)
            sending.start()
            wait_for(lambda: feed.stats()["streams_waiting"] == 1, what="the second stream to wait for staging")
            assert srv.streams.in_use == 2
            leaving.close()  # the client goes away while the server waits for memory
            sending.join(10)
            assert not sending.is_alive() and errors[0].code == grpc.StatusCode.CANCELLED
            wait_for(lambda: srv.streams.in_use == 1, what="the gone stream's slot")
            st = wait_for(lambda: (s := feed.stats())["streams"] == 1 and s, what="the gone stream to end")
            assert st["failed"] == 1 and st["streams_waiting"] == 0
            buffer.gate.set()
            finishing.join(10)
            assert not finishing.is_alive() and feed.stats()["done"] == 1
    finally:
        buffer.gate.set()
        srv.detach(feed)
        srv.stop()


def test_call_slots_refuse_beyond_their_size_and_release_once() -> None:
    slots = CallSlots(2, "ingest streams")
    a, b = slots.take(), slots.take()
    assert a is not None and b is not None and slots.take() is None and slots.refused == 1
    a.release()
    a.release()  # idempotent: the callback and the handler may both release
    assert slots.in_use == 1
    c = slots.take()
    assert c is not None and slots.take() is None
    with pytest.raises(ValueError, match="at least 1"):
        CallSlots(0, "Study calls")
