"""External solvers over gRPC into a running study on local Ray: a real server on a loopback port,
clients in separate processes. Every sample arrives exactly once; rejected, broken and killed streams
leave nothing in the buffer and their simulations are handed out again; flow control holds memory."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import ray

import solvers
from services.actors import BufferShard
from services.config import IngestConfig, parse_config
from services.dataplane import ShardRouter
from services.ingest import surge_pb2 as pb
from services.ingest import surge_pb2_grpc as rpc
from services.ingest.client import IngestError, connect
from services.ingest.server import TOKEN_MISSING, Reject, StudyFeed, release, serve
from services.metrics import StudyCollector
from services.sampling import Sampler
from services.study import SimulationIds, Study
from trainer.problem import ProblemSpec
from trainer.store import ModelStore

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("ray_cluster")]

ROOT = Path(__file__).resolve().parents[2]
CLIENT = ROOT / "tests" / "ingest" / "_client.py"
EXAMPLE = ROOT / "examples" / "external_solver.py"
ENV = {**os.environ, "PYTHONPATH": str(ROOT)}
TOKEN = "ingest-token"
N, STEPS = 8, 10
SOLVER = {"n": N, "steps": STEPS, "dt": 0.01}
SAMPLES = STEPS + 1  # per simulation: every recorded step
CLIENTS, PER_CLIENT = 3, 50
MAX_SIMS = CLIENTS * PER_CLIENT + 1  # + the one the kill test finishes itself
STUDY = {
    "name": "ingest",
    "problem": {"config": SOLVER},
    "simulations": 10_000,
    "solvers": {"actors": 0, "chunk_steps": 5, "max_attempts": 50},
    "buffer": {"policy": "fifo", "capacity": 600, "watermark": 200},
    "training": {
        "model": "mlp",
        "arch": {"hidden": 64, "layers": 2},
        "batch_size": 32,
        "steps": 100_000,  # the stream ends first
        "lr": 2e-3,
        "validate_every": 10,
        "validation_simulations": 4,
    },
    "ingest": {"enabled": True, "port": 0, "max_simulations": MAX_SIMS, "max_message_mb": 1},
}


def wait_for(cond: Callable[[], Any], timeout: float = 20.0, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if v := cond():
            return v
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Study]:
    """A study fed by external clients only, its ingest server on a free loopback port."""
    s = Study(parse_config(STUDY), tmp_path_factory.mktemp("store"), ingest_token=TOKEN).start()
    wait_for(lambda: s.ingest_address or not s.running, 60, "the ingest server")
    assert s.ingest_address, s.error
    yield s
    s.stop()
    s.join(60)
    s.release()


def stub(study: Study) -> rpc.IngestStub:
    return rpc.IngestStub(grpc.insecure_channel(study.ingest_address))


def auth(token: str | None = TOKEN) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),) if token else ()


def header(study_id: str, sim_id: int, params: dict[str, float] | None = None) -> pb.IngestRequest:
    return pb.IngestRequest(header=pb.Header(study_id=study_id, simulation_id=sim_id, params=params or {}))


def chunk(k: int = 0, *, field: str = "u", fill: float = 300.0, dtype: str = "float32", **kw: Any) -> pb.IngestRequest:
    shape = kw.get("shape", (N, N))
    data = kw.get("data", np.full(shape, fill, dtype=np.dtype(dtype).newbyteorder("<")).tobytes())
    return pb.IngestRequest(chunk=pb.Chunk(time_index=k, field=field, dtype=dtype, shape=list(shape), data=data))


END = pb.IngestRequest(end=pb.End())


def stream(study: Study, messages: list[pb.IngestRequest], token: str | None = TOKEN) -> list[pb.Ack]:
    return list(stub(study).Stream(iter(messages), metadata=auth(token), timeout=20))


# Authentication --------------------------------------------------------------------------------------


@pytest.mark.parametrize("token", [None, "wrong"])
def test_calls_without_the_token_are_unauthenticated(study: Study, token: str | None) -> None:
    ch = grpc.insecure_channel(study.ingest_address)
    with pytest.raises(grpc.RpcError) as e:
        rpc.StudyStub(ch).NextSimulation(pb.NextSimulationRequest(study_id=study.id), metadata=auth(token))
    assert (e.value.code(), e.value.details()) == (grpc.StatusCode.UNAUTHENTICATED, TOKEN_MISSING)
    with pytest.raises(grpc.RpcError) as e:
        stream(study, [header(study.id, 0), chunk(0)], token=token)
    assert (e.value.code(), e.value.details()) == (grpc.StatusCode.UNAUTHENTICATED, TOKEN_MISSING)
    assert study.feed.stats()["assigned"] == 0


# Malformed streams -----------------------------------------------------------------------------------

NAN = float("nan")
# name: (messages after the header, status, what the message says). Each takes the study's next
# simulation: after the first failure it is always simulation 0 again, handed out once more.
MALFORMED: dict[str, tuple[list[pb.IngestRequest], grpc.StatusCode, str]] = {
    "wrong-shape": ([chunk(0, shape=(N, N - 1))], grpc.StatusCode.INVALID_ARGUMENT, "does not match the grid [8, 8]"),
    "wrong-dtype": ([chunk(0, dtype="int32")], grpc.StatusCode.INVALID_ARGUMENT, "dtype 'int32' is not supported"),
    "unknown-field": ([chunk(0, field="v")], grpc.StatusCode.INVALID_ARGUMENT, "unknown field 'v'"),
    "nan": ([chunk(0), chunk(1, fill=NAN)], grpc.StatusCode.INVALID_ARGUMENT, "non-finite values"),
    "float64-overflow": (
        [chunk(0, dtype="float64", fill=1e300)],
        grpc.StatusCode.INVALID_ARGUMENT,
        "non-finite values",
    ),
    "time-index": ([chunk(SAMPLES)], grpc.StatusCode.INVALID_ARGUMENT, "time_index must lie in [0, 10]"),
    "short-data": ([chunk(0, data=b"\0" * 10)], grpc.StatusCode.INVALID_ARGUMENT, "data holds 10 bytes"),
    "sent-twice": ([chunk(0), chunk(0)], grpc.StatusCode.INVALID_ARGUMENT, "sent twice"),
    "incomplete": ([chunk(0), END], grpc.StatusCode.FAILED_PRECONDITION, "incomplete at End: 10 of 11 chunks"),
    "no-end": ([chunk(0)], grpc.StatusCode.FAILED_PRECONDITION, "the stream ended without End"),
    "oversized": ([chunk(0, data=b"\0" * (2 * 2**20))], grpc.StatusCode.RESOURCE_EXHAUSTED, ""),
}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_malformed_streams_are_refused_and_leave_nothing(study: Study, case: str) -> None:
    messages, code, needle = MALFORMED[case]
    failed = study.feed.stats()["failed"]
    with connect(study.ingest_address, TOKEN) as client:
        sim = client.next_simulation(study.id)
    assert sim is not None and sim.id == 0  # failed simulations are handed out again, first
    assert sim.attempt == failed + 1
    with pytest.raises(grpc.RpcError) as e:
        stream(study, [header(study.id, sim.id, sim.params), *messages])
    assert e.value.code() == code, e.value.details()
    assert needle in e.value.details()
    # Dropped, counted failed, re-queued; nothing staged any more and nothing in the buffer.
    st = wait_for(lambda: (s := study.feed.stats())["failed"] == failed + 1 and s["streams"] == 0 and s, 10)
    assert st["staged_bytes"] == 0 and st["simulations_out"] == 0
    assert study.received_by_sim() == {}


@pytest.mark.parametrize(
    ("what", "code", "needle"),
    [
        ("no-header", grpc.StatusCode.FAILED_PRECONDITION, "the first message of a stream must be a header"),
        ("unknown-study", grpc.StatusCode.NOT_FOUND, "study 'nope' is not fed through this server"),
        ("unassigned-simulation", grpc.StatusCode.NOT_FOUND, "simulation 123456 is not handed out"),
        ("wrong-params", grpc.StatusCode.INVALID_ARGUMENT, "differ from those of simulation 0"),
    ],
)
def test_streams_for_no_simulation_of_ours_are_refused(study: Study, what: str, code, needle: str) -> None:
    if what == "no-header":
        messages = [chunk(0)]
    elif what == "unknown-study":
        messages = [header("nope", 0)]
    elif what == "unassigned-simulation":
        messages = [header(study.id, 123456)]
    else:
        with connect(study.ingest_address, TOKEN) as client:
            sim = client.next_simulation(study.id)
        messages = [header(study.id, sim.id, {**sim.params, "u0": sim.params["u0"] + 1})]
    with pytest.raises(grpc.RpcError) as e:
        stream(study, messages)
    assert e.value.code() == code and needle in e.value.details(), e.value.details()
    wait_for(lambda: study.feed.stats()["simulations_out"] == 0, 10)
    assert study.received_by_sim() == {}


def test_a_simulation_the_client_gives_up_is_reported_failed_and_handed_out_again(study: Study) -> None:
    failed = study.feed.stats()["failed"]
    with connect(study.ingest_address, TOKEN) as client:
        sim = client.next_simulation(study.id)
        with pytest.raises(ZeroDivisionError), sim:  # the solver breaks down mid-simulation
            sim.send("u", 0, np.full((N, N), 300.0))
            sim.send("u", 1, np.full((N, N), 300.0))
            _ = 1 / 0
        st = wait_for(lambda: (s := study.feed.stats())["streams"] == 0 and s, 10)
        assert st["failed"] == failed + 1 and st["staged_bytes"] == 0 and st["simulations_out"] == 0
        assert study.received_by_sim() == {}
        again = client.next_simulation(study.id)
        assert (again.id, again.attempt) == (sim.id, sim.attempt + 1)
        assert again.fail("gave up before sending anything") is True
        with pytest.raises(IngestError) as e:
            client.report_failure(study.id, 999_999, "never had it")
        assert e.value.code == grpc.StatusCode.NOT_FOUND


# A client killed mid-simulation ----------------------------------------------------------------------


def test_a_client_killed_mid_simulation_leaves_nothing_and_its_simulation_is_handed_out_again(
    study: Study,
) -> None:
    before = study.feed.stats()
    proc = subprocess.Popen(
        [sys.executable, str(CLIENT), "stall", study.ingest_address, TOKEN, study.id],
        stdout=subprocess.PIPE,
        text=True,
        env=ENV,
    )
    try:
        line = proc.stdout.readline()
        assert line.startswith("STALLED "), line
        sim_id = int(line.split()[1])
        # Half the chunks are staged on the server when the client dies.
        wait_for(lambda: study.feed.stats()["chunks"] >= before["chunks"] + SAMPLES // 2, 20, "the first chunks")
        assert study.feed.stats()["streams"] == 1
    finally:
        proc.kill()
        proc.wait()
    st = wait_for(lambda: (s := study.feed.stats())["streams"] == 0 and s["failed"] == before["failed"] + 1 and s, 20)
    assert st["staged_bytes"] == 0
    assert sim_id not in study.received_by_sim()  # no partial samples
    # Re-assigned: the next client gets the same simulation, and its complete run is taken.
    with connect(study.ingest_address, TOKEN) as client:
        sim = client.next_simulation(study.id)
        assert sim.id == sim_id and sim.attempt == before["failed"] + 2
        traj = solvers.get("heat2d", **SOLVER).solve(sim.param_vector[None], np.array([sim.seed]))  # (1, T+1, 1, N, N)
        for k in sim.required["u"]:
            sim.send("u", k, traj[0, k, 0])
        assert sim.finish() == SAMPLES
    assert study.received_by_sim() == {sim_id: SAMPLES}


# Three clients, fifty simulations each ----------------------------------------------------------------


QUIET = ("--max-sims", str(PER_CLIENT), "--quiet")


def test_three_clients_stream_fifty_simulations_each_and_every_sample_arrives_once(study: Study) -> None:
    procs = [
        subprocess.Popen(
            [sys.executable, str(EXAMPLE), study.id, "--address", study.ingest_address, "--token", TOKEN, *QUIET],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=ENV,
        )
        for _ in range(CLIENTS)
    ]
    outs = [p.communicate(timeout=180)[0] for p in procs]
    for p, out in zip(procs, outs, strict=True):
        assert p.returncode == 0 and f"done: {PER_CLIENT} simulations, {PER_CLIENT * SAMPLES} samples" in out, out
    # MAX_SIMS external simulations done: the study closes its buffer, the trainer drains it and ends.
    assert study.join(120), "the study did not end"
    snap = study.snapshot()
    assert snap["state"] == "finished", snap["error"]
    # Every simulation id exactly once, each with every time index once.
    got = study.received_by_sim()
    assert sorted(got) == list(range(MAX_SIMS))
    assert set(got.values()) == {SAMPLES}
    sm, sims = snap["samples"], snap["simulations"]
    assert sm["received"] == MAX_SIMS * SAMPLES and sm["duplicates"] == 0
    assert sm["consumed"] == sm["received"]  # the trainer took them all, each once
    assert sm["produced_external"] == sm["produced"] == sm["received"] and sm["produced_actors"] == 0
    assert sims["done"] == sims["external_done"] == MAX_SIMS
    # + wrong-params, the two given up, the killed client
    assert sims["failed"] == sims["external_failed"] == len(MALFORMED) + 4
    ing = snap["ingest"]
    assert ing["staged_bytes"] == 0 and 0 < ing["peak_staged_bytes"] <= ing["max_staged_bytes"]
    # The model trained on them: the held-out error fell, and checkpoints were published.
    hist = [e for _, e in snap["training"]["history"]]
    assert len(hist) >= 3 and hist[-1] < hist[0], hist
    assert ModelStore(study.store_root).card("heat2d").training.study_id == study.id
    # Metrics: produced samples labelled by source; summed by study they are the study's total.
    fam = next(f for f in StudyCollector(Path(study.store_root)).collect() if f.name == "surge_samples_produced")
    series = {s.labels["source"]: s.value for s in fam.samples if s.labels["study"] == study.id}
    assert series == {"actors": 0.0, "external": float(MAX_SIMS * SAMPLES)}
    assert sum(series.values()) == sm["produced"]
    # The study needs no more (its server has stopped with it; a client would hear OUT_OF_RANGE before).
    with pytest.raises(Reject) as e:
        study.feed.next_simulation()
    assert e.value.code == grpc.StatusCode.OUT_OF_RANGE


# Flow control ----------------------------------------------------------------------------------------


def test_a_client_faster_than_the_trainer_waits_for_credit_and_memory_stays_bounded() -> None:
    spec = ProblemSpec.from_solver(solvers.get("heat2d", **SOLVER), SOLVER)
    sim_bytes = SAMPLES * N * N * 4
    budget, fit = 20, 3  # simulations in all; simulations the buffer holds
    cfg = IngestConfig(enabled=True, port=0, max_staged_mb=2 * sim_bytes / 2**20)  # two simulations staged at most
    buffer = BufferShard.options(num_cpus=0).remote("fifo", fit * SAMPLES, 0)
    ids = SimulationIds(Sampler(spec.params, "uniform", 0), 0, budget)
    feed = StudyFeed("flow", spec, ShardRouter([buffer]), ids, cfg, lambda *a: None)
    srv = serve("127.0.0.1", 0, token=TOKEN)
    srv.attach(feed)
    proc = subprocess.Popen(
        [sys.executable, str(CLIENT), "fast", srv.address, TOKEN, "flow", "--threads", "4"],
        stdout=subprocess.PIPE,
        text=True,
        env=ENV,
    )
    try:
        # Nobody consumes yet: 3 simulations fill the buffer, 2 more hold the staging memory while their
        # puts wait, and the client's other streams wait for credit.
        st = wait_for(
            lambda: (
                (s := feed.stats())["done"] == fit and s["staged_bytes"] == 2 * sim_bytes and s["streams_waiting"] and s
            ),
            30,
            "the buffer and the staging memory to fill",
        )
        assert st["staged_bytes"] == st["max_staged_bytes"]
        assert ray.get(buffer.stats.remote())["held"] == fit * SAMPLES
        time.sleep(1.0)
        assert feed.stats()["done"] == fit  # the client makes no progress while the trainer takes nothing
        # The trainer starts: a batch every 10 ms, and the client streams on as fast as that.
        drained, stop = [0], threading.Event()

        def trainer() -> None:
            while not stop.is_set():
                out = ray.get(buffer.take.remote(SAMPLES, 1, 0.2))
                if out:
                    drained[0] += len(out[0])
                time.sleep(0.01)

        t = threading.Thread(target=trainer, daemon=True)
        t.start()
        out = json.loads(proc.communicate(timeout=60)[0])
        wait_for(lambda: drained[0] == budget * SAMPLES, 20, "the buffer to drain")
        stop.set()
        t.join(5)
    finally:
        proc.kill()
    assert out["done"] == budget and out["samples"] == budget * SAMPLES
    assert out["credit_wait_s"] > 1.0  # the client was held back
    assert sorted(out["ids"]) == list(range(budget))
    assert ray.get(buffer.received_by_sim.remote()) == {i: SAMPLES for i in range(budget)}
    st = feed.stats()
    assert st["peak_staged_bytes"] <= st["max_staged_bytes"] and st["staged_bytes"] == 0
    assert st["credit_waits"] > 0

    # A simulation that could never be staged whole is refused at once rather than waited for.
    ids = SimulationIds(Sampler(spec.params, "uniform", 0), 0, 1)
    small = StudyFeed(
        "small", spec, ShardRouter([buffer]), ids, IngestConfig(max_staged_mb=sim_bytes / 2 / 2**20), lambda *a: None
    )
    srv.attach(small)
    with connect(srv.address, TOKEN) as client:
        sim = client.next_simulation("small")
        with pytest.raises(IngestError) as e:
            sim.send("u", 0, np.zeros((N, N)))
    assert e.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED and "ingest.max_staged_mb" in e.value.message
    srv.detach(small)
    srv.detach(feed)
    release(srv)
    ray.kill(buffer)
