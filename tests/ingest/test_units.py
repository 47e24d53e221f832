"""Ingest without Ray: the shared simulation id sequence, what a client must send, staging, config, metrics."""

from __future__ import annotations

import json
import socket
import threading
from pathlib import Path

import numpy as np
import pytest

import solvers
from services.config import ConfigError, parse_config
from services.ingest.server import StagingPool, required_steps, serve
from services.metrics import PROGRESS_DIR, StudyCollector
from services.sampling import Sampler, simulation_seeds
from services.study import SimulationIds
from solvers.base import ParamSpace
from trainer.problem import ProblemSpec

SPACE = ParamSpace(("a", "b"), (0.0, -1.0), (1.0, 1.0))


def ids(budget: int = 10, attempts: int = 3, kind: str = "uniform") -> SimulationIds:
    return SimulationIds(Sampler(SPACE, kind, seed=5), 5, budget, attempts)


@pytest.mark.parametrize("kind", ["uniform", "sobol"])
def test_simulation_i_gets_the_same_parameters_and_seed_whoever_takes_it(kind: str) -> None:
    want = Sampler(SPACE, kind, seed=5).draw(8)  # what one dispatcher drawing in order would hand out
    s = ids(8, kind=kind)
    a, b, c = s.take(4, "actors"), s.take(1, "external"), s.take(8, "actors")
    got = np.concatenate([a.ids, b.ids, c.ids])
    assert got.tolist() == list(range(8))
    np.testing.assert_array_equal(np.concatenate([a.params, b.params, c.params]), want)
    np.testing.assert_array_equal(b.seeds, simulation_seeds(5, np.array([4])))
    assert s.take(1, "actors") is None and s.exhausted


def test_failed_ids_are_handed_out_again_first_alone_with_their_parameters_until_out_of_attempts() -> None:
    s = ids(10, attempts=2)
    first = s.take(3, "external")
    assert s.outstanding() == 3 and s.outstanding("external") == 3 and s.outstanding("actors") == 0
    assert s.settle([1], "failed", requeue=True) == [1]
    s.settle([0, 2], "done")
    again = s.take(2, "actors")  # the re-queued id first, and alone (a crasher takes no other down)
    assert again.ids.tolist() == [1] and again.attempts.tolist() == [2]
    np.testing.assert_array_equal(again.params[0], first.params[1])
    assert s.settle([1], "failed", requeue=True) == []  # two attempts: given up ...
    assert s.abandoned == 1 and s.budget == 11  # ... and a fresh id drawn in its place
    assert s.settle([1], "done") == []  # settled already: ignored
    assert s.outstanding() == 0 and not s.is_out(1)
    fresh = s.take(2, "actors")
    assert fresh.ids.tolist() == [3, 4]
    # Queued behind a call whose actor died, never run: back without counting an attempt.
    assert s.settle([3], "interrupted") == [3]
    assert s.take(1, "actors").attempts.tolist() == [1]
    s.settle([4], "failed")  # not re-queued unless asked
    assert s.handed_out == 5 and not s.exhausted


def test_replacements_of_given_up_ids_stop_at_twice_the_budget() -> None:
    s = ids(3, attempts=1)
    while (a := s.take(1, "actors")) is not None:
        s.settle(a.ids, "failed", requeue=True)
    assert s.handed_out == 6 and s.abandoned == 6 and s.exhausted


def test_concurrent_takers_never_share_an_id() -> None:
    s = ids(2000)
    got: list[int] = []
    lock = threading.Lock()

    def take(source: str) -> None:
        while (a := s.take(3, source)) is not None:
            with lock:
                got.extend(a.ids.tolist())

    ts = [threading.Thread(target=take, args=(src,)) for src in ("actors", "external") * 4]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert sorted(got) == list(range(2000))


def test_what_a_client_must_send_follows_the_problem() -> None:
    heat = ProblemSpec.from_solver(solvers.get("heat2d", n=8, steps=4), {"n": 8, "steps": 4})
    assert required_steps(heat) == {"u": (0, 1, 2, 3, 4)}
    adv_cfg = {"resolution": 32, "snapshots": 4}
    adv = solvers.get("advection1d", **adv_cfg)
    final = ProblemSpec.from_solver(adv, adv_cfg, kind="operator", inputs=("u",), output_index=-1)
    assert required_steps(final) == {"u": (0, 4)}
    nxt = ProblemSpec.from_solver(adv, adv_cfg, kind="operator", inputs=("u",), pairs="next")
    assert required_steps(nxt) == {"u": (0, 1, 2, 3, 4)}
    darcy_cfg = {"resolution": 85}
    darcy = ProblemSpec.from_solver(solvers.get("darcy2d", **darcy_cfg), darcy_cfg, kind="operator", inputs=("a",))
    assert required_steps(darcy) == {"a": (0,), "u": (len(darcy.times) - 1,)}


def test_staging_pool_waits_for_room_and_gives_up_when_told() -> None:
    pool = StagingPool(100)
    assert pool.reserve(60, lambda: True)
    assert not pool.reserve(60, lambda: False)  # no room, and the caller is gone
    done = threading.Event()
    t = threading.Thread(target=lambda: (pool.reserve(60, lambda: True), done.set()))
    t.start()
    assert not done.wait(0.2)  # waits for room
    pool.release(60)
    assert done.wait(2) and pool.used == 60 and pool.peak == 60 and pool.waits >= 1
    t.join()


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"solvers": {"actors": 0}}, "solvers.actors is 0 and ingest is not enabled"),
        ({"ingest": {"port": 70000}}, "ingest.port: Input should be less than or equal to 65535"),
        ({"ingest": {"max_staged_mb": 0}}, "ingest.max_staged_mb: Input should be greater than 0"),
        ({"ingest": {"max_simulations": 0}}, "ingest.max_simulations: Input should be greater than or equal to 1"),
        ({"ingest": {"token": "x"}}, "ingest.token: Extra inputs are not permitted"),
    ],
)
def test_invalid_ingest_config_names_the_field(data: dict, message: str) -> None:
    with pytest.raises(ConfigError) as e:
        parse_config(data)
    assert message in str(e.value)


def test_a_study_fed_only_by_external_solvers_is_valid() -> None:
    cfg = parse_config({"solvers": {"actors": 0}, "ingest": {"enabled": True, "max_simulations": 10}})
    assert cfg.solvers.actors == 0 and cfg.ingest.port == 50051 and cfg.ingest.host == "127.0.0.1"


@pytest.mark.parametrize(
    ("solver", "cfg", "problem"),
    [
        ("heat2d", {"n": 8, "steps": 6}, {}),
        ("darcy2d", {"resolution": 85}, {"kind": "operator", "inputs": ("a",)}),  # two fields, one step
        ("advection1d", {"resolution": 32, "snapshots": 4}, {"kind": "operator", "inputs": ("u",), "pairs": "next"}),
    ],
)
def test_staged_chunks_become_the_samples_a_solver_actor_would_send(solver: str, cfg: dict, problem: dict) -> None:
    from services.config import IngestConfig
    from services.ingest.server import Lease, StreamState, StudyFeed

    s = solvers.get(solver, **cfg)
    spec = ProblemSpec.from_solver(s, cfg, **problem)
    params = Sampler(spec.params, "uniform", 1).draw(1)
    traj = s.solve(params, np.array([7]))  # (1, T+1, C, *grid)
    put_bytes = 2 * (spec.in_channels + spec.out_size) * 4  # two samples per put
    feed = StudyFeed("t", spec, None, None, IngestConfig(), lambda *a: None, put_bytes=put_bytes)
    st = StreamState(context=None, sim=Lease(7, params[0], 0, 1, 0.0))  # type: ignore[arg-type]
    st.staged = {(f, k): traj[0, k, spec.fields.index(f)] for f, k in feed.pairs}
    parts = list(feed.staging.samples(st))
    x, y, sid, tix = (np.concatenate([p[i] for p in parts]) for i in range(4))
    wx, wy, wsid, wtix = spec.samples_from_trajectories(params, np.array([7]), traj)
    np.testing.assert_array_equal(x, wx)
    np.testing.assert_array_equal(y, wy)
    assert sid.tolist() == wsid.tolist() and tix.tolist() == wtix.tolist()
    assert sum(p[4] for p in parts) == feed.sim_bytes and not st.staged  # all staged memory handed back


def test_a_port_in_use_is_an_error_not_a_shared_port() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        with pytest.raises(OSError, match="cannot listen"):
            serve("127.0.0.1", s.getsockname()[1], token="t")


def test_produced_samples_are_exported_by_source_and_add_up_by_study(tmp_path: Path) -> None:
    d = tmp_path / PROGRESS_DIR
    d.mkdir()
    head = {"name": "s", "model_name": "m", "state": "finished"}
    new = {"id": "new", **head, "samples": {"produced": 30, "produced_actors": 10, "produced_external": 20}}
    old = {"id": "old", **head, "samples": {"produced": 7}}  # written before sources existed
    for snap in (new, old):
        (d / f"{snap['id']}.json").write_text(json.dumps(snap))
    fam = next(f for f in StudyCollector(tmp_path).collect() if f.name == "surge_samples_produced")
    got = {(s.labels["study"], s.labels["source"]): s.value for s in fam.samples}
    assert got == {("new", "actors"): 10, ("new", "external"): 20, ("old", "actors"): 7, ("old", "external"): 0}
    by_study: dict[str, float] = {}  # PromQL: sum by (study) (surge_samples_produced_total)
    for (study, _), v in got.items():
        by_study[study] = by_study.get(study, 0) + v
    assert by_study == {"new": 30, "old": 7}
