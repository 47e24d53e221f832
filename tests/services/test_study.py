"""Studies on a real local Ray: the stream arrives exactly once and the surrogate learns."""

from __future__ import annotations

import time

import pytest
import ray
import torch

from services.config import parse_config
from services.study import Study
from trainer.dataset import Dataset
from trainer.store import ModelStore

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("ray_cluster")]

STEPS = 20  # recorded steps per simulation -> 21 samples each


def _config(**over) -> dict:
    base = {
        "name": "itest",
        "problem": {"config": {"n": 16, "steps": STEPS, "dt": 0.005}},
        "simulations": 160,
        "solvers": {"actors": 2, "sims_per_call": 4, "chunk_steps": 5},
        "buffer": {"policy": "fifo", "capacity": 1000, "watermark": 200},
        "training": {
            "model": "mlp",
            "arch": {"hidden": 64, "layers": 2},
            "batch_size": 32,
            "steps": 100_000,  # the FIFO stream ends first
            "lr": 2e-3,
            "validate_every": 20,
            "validation_simulations": 4,
        },
    }
    for k, v in over.items():
        base[k] = {**base.get(k, {}), **v} if isinstance(v, dict) else v
    return base


def _run(cfg: dict, store, timeout: float = 240) -> Study:
    study = Study(parse_config(cfg), store).start()
    assert study.join(timeout), "study did not finish in time"
    return study


def test_firo_study_delivers_every_sample_once_and_learns(tmp_path) -> None:
    # FIRO hands each sample out once, in random order (FIFO is covered by the next test).
    study = _run(_config(simulations=240, buffer={"policy": "firo"}), tmp_path)
    snap = study.snapshot()
    assert snap["state"] == "finished", snap["error"]
    assert snap["simulations"]["done"] == 240 and snap["simulations"]["failed"] == 0
    # Nothing lost, nothing twice: every simulation delivered each of its 21 time indices once.
    got = study.received_by_sim()
    assert sorted(got) == list(range(240))
    assert set(got.values()) == {STEPS + 1}
    assert snap["samples"]["received"] == 240 * (STEPS + 1)
    # The trainer consumed the whole stream, each sample once.
    assert snap["samples"]["consumed"] == 240 * (STEPS + 1)
    # The validation error on held-out simulations falls as training goes on.
    hist = [e for _, e in snap["training"]["history"]]
    assert len(hist) >= 4
    assert hist[-1] < 0.5 * hist[0]
    # Checkpoints were published and describe what was trained.
    store = ModelStore(tmp_path)
    card = store.card("heat2d")
    assert card.training.study_id == study.id
    assert card.training.samples_seen == snap["training"]["samples_seen"]
    assert card.training.validation_error == pytest.approx(hist[-1])
    study.release()


def test_killed_solver_actor_is_restarted_and_nothing_is_lost_or_counted_twice(tmp_path) -> None:
    cfg = _config(
        name="kill",
        simulations=96,
        problem={"config": {"n": 48, "steps": STEPS, "dt": 0.005}},
        solvers={"actors": 2, "sims_per_call": 8, "chunk_steps": 1},
        buffer={"capacity": 400, "watermark": 100},
    )
    study = Study(parse_config(cfg), tmp_path).start()
    deadline = time.time() + 120
    while time.time() < deadline and study.snapshot()["samples"]["received"] < 150:
        time.sleep(0.05)
    victim = study.actors[0]
    pid = ray.get(victim.pid.remote(), timeout=120)
    ray.kill(victim, no_restart=False)  # dies mid-call; Ray restarts it and re-runs that call
    # The kill landed: Ray restarts the actor in a new process (asked while the study still runs). ray.kill
    # is asynchronous, so a call sent just after it may still be answered by the old process: poll, bounded.
    new_pid = pid
    deadline = time.time() + 60
    while new_pid == pid and time.time() < deadline:
        try:
            new_pid = ray.get(victim.pid.remote(), timeout=30)
        except ray.exceptions.RayActorError:
            pass  # asked while it was dead: ask again once Ray has restarted it
        if new_pid == pid:
            time.sleep(0.2)
    assert new_pid != pid
    assert study.join(240)
    snap = study.snapshot()
    assert snap["state"] == "finished", snap["error"]
    assert snap["simulations"]["done"] == 96 and snap["simulations"]["failed"] == 0
    got = study.received_by_sim()
    assert sorted(got) == list(range(96))
    assert set(got.values()) == {STEPS + 1}
    assert snap["samples"]["received"] == 96 * (STEPS + 1)
    assert snap["samples"]["consumed"] == 96 * (STEPS + 1)
    study.release()


def test_reservoir_study_trains_for_its_step_budget(tmp_path) -> None:
    cfg = _config(
        name="res",
        simulations=40,
        buffer={"policy": "reservoir", "capacity": 300, "watermark": 100},
        training={"steps": 60, "validate_every": 30},
    )
    study = _run(cfg, tmp_path)
    snap = study.snapshot()
    assert snap["state"] == "finished", snap["error"]
    assert snap["training"]["step"] == 60
    assert snap["buffer"]["held"] <= 300
    # The reservoir re-serves samples: the trainer took its 60 batches from at most 300 held samples
    # (the buffer also counts the batches prefetched when training ended).
    assert snap["training"]["samples_seen"] == 60 * 32
    assert snap["samples"]["consumed"] >= 60 * 32
    assert ModelStore(tmp_path).versions("heat2d") == [1, 2]
    study.release()


def test_operator_study_learns_burgers_with_an_fno(tmp_path) -> None:
    # u(x, 0) -> u(x, 1) for viscous Burgers, one sample per simulation, an FNO on 64 points.
    cfg = {
        "name": "burgers",
        "problem": {
            "solver": "burgers1d",
            "config": {"n_fine": 256, "resolution": 64, "snapshots": 2},
            "kind": "operator",
            "inputs": ["u"],
        },
        "simulations": 100_000,
        "solvers": {"actors": 1, "sims_per_call": 16, "chunk_steps": 1},
        "buffer": {"policy": "reservoir", "capacity": 2000, "watermark": 100},
        "training": {
            "model": "fno",
            "arch": {"modes": 12, "width": 16, "layers": 2},
            "batch_size": 16,
            "steps": 300,
            "lr": 3e-3,
            "validate_every": 50,
            "validation_simulations": 16,
        },
    }
    study = _run(cfg, tmp_path)
    snap = study.snapshot()
    assert snap["state"] == "finished", snap["error"]
    hist = [e for _, e in snap["training"]["history"]]
    assert hist[-1] < 0.5 * hist[0], hist
    got = study.received_by_sim()
    assert set(got.values()) == {1}  # one (u0, uT) pair per simulation, each once
    card = ModelStore(tmp_path).card("burgers1d")
    assert card.problem.kind == "operator" and card.input_shape == (1, 64)
    study.release()


def test_online_and_offline_studies_share_one_code_path(tmp_path) -> None:
    # The same small problem trained online (fresh simulations) and offline (a zarr dataset, epochs):
    # same model, optimiser, batch and steps; both report through the same snapshot, card and store.
    from services.config import ConfigError
    from services.datasets import build_dataset

    base = _config(
        name="online",
        simulations=100_000,
        buffer={"policy": "firo", "capacity": 1000, "watermark": 200},
        training={"steps": 120, "validate_every": 40},
    )
    data = build_dataset(parse_config(base), 12, tmp_path / "train.zarr")
    val = build_dataset(parse_config(base), 3, tmp_path / "val.zarr", seed=99)
    online = _run(base, tmp_path / "on")
    # The offline run also validates on a zarr store instead of simulations solved at start.
    off_training = {**base["training"], "validation_dataset": str(val)}
    offline = _run({**base, "name": "offline", "dataset": str(data), "training": off_training}, tmp_path / "off")
    snaps = [online.snapshot(), offline.snapshot()]
    for snap in snaps:
        assert snap["state"] == "finished", snap["error"]
        assert snap["training"]["step"] == 120
        assert len(snap["training"]["history"]) == 3
        # Both learn: the error falls from the first validation (step 40) to the last (measured: x0.63, x0.71).
        assert snap["training"]["validation_error"] < snap["training"]["history"][0][1] * 0.85
    assert snaps[1]["simulations"]["done"] == 0  # offline: no solver ran
    assert snaps[0]["simulations"]["done"] > 12
    for store in ("on", "off"):
        card = ModelStore(tmp_path / store).card("heat2d")
        assert card.architecture.name == "mlp" and card.training.train_steps == 120
    # Offline batches are always full; a FIRO stream may hand over a short batch while it refills.
    assert ModelStore(tmp_path / "off").card("heat2d").training.samples_seen == 120 * 32
    assert 100 * 32 < ModelStore(tmp_path / "on").card("heat2d").training.samples_seen <= 120 * 32
    # The offline study's reported error is its final model's error on that validation store.
    from trainer.loop import evaluate

    final = ModelStore(tmp_path / "off").load("heat2d")
    vds = Dataset(val)
    vx, vy = (torch.from_numpy(a) for a in vds.arrays())
    got = evaluate(
        final.model,
        vx.view(len(vds), *vds.spec.in_shape),
        vy.view(len(vds), *vds.spec.out_shape),
        final.normaliser,
    )
    assert got == pytest.approx(snaps[1]["training"]["validation_error"], rel=1e-4)
    # A dataset of another problem is refused at validation, before anything starts.
    with pytest.raises(ConfigError, match=r"dataset: .* holds another problem"):
        parse_config({**base, "problem": {"config": {"n": 12, "steps": STEPS, "dt": 0.005}}, "dataset": str(data)})
    other = {"problem": {"config": {"n": 12, "steps": STEPS, "dt": 0.005}}}
    with pytest.raises(ConfigError, match=r"training.validation_dataset: .* holds another problem"):
        parse_config({**base, **other, "training": {**base["training"], "validation_dataset": str(val)}})
    with pytest.raises(ConfigError, match=r"training.validation_dataset"):
        parse_config({**base, "training": {**base["training"], "validation_dataset": str(tmp_path / "none.zarr")}})
    # So is one too small for a single batch (it would never yield one).
    samples = len(Dataset(data))
    with pytest.raises(ConfigError, match=rf"holds {samples} samples, fewer than one batch"):
        parse_config({**base, "dataset": str(data), "training": {**base["training"], "batch_size": samples + 1}})
    online.release()
    offline.release()


def test_a_study_run_by_the_manager_gives_back_its_actors_when_it_ends(tmp_path) -> None:
    # The gateway's manager keeps studies for their snapshots; their processes must not outlive them.
    from services.study import StudyManager

    manager = StudyManager(tmp_path)
    study = manager.start(parse_config(_config(name="released", simulations=40)))
    deadline = time.time() + 120
    while time.time() < deadline and not study.shards:
        time.sleep(0.05)
    shards, control = list(study.shards), study.control
    assert shards and control is not None
    assert study.join(240)
    snap = manager.status(study.id)
    assert snap["state"] == "finished", snap["error"]
    assert snap["samples"]["received"] == 40 * (STEPS + 1)  # the final counts outlive the actors
    assert study.shards == [] and study.control is None
    for call in [*(s.stats for s in shards), control.training]:
        with pytest.raises(ray.exceptions.RayActorError):
            ray.get(call.remote(), timeout=30)


def test_a_breed_study_learns_from_its_losses_and_draws_near_earlier_points(tmp_path) -> None:
    """The ranks' per-simulation losses reach the breed sampler; once they do, every draw (start = end = 1)
    is a mutation of an earlier point: much closer to one than uniform draws in 5 dimensions ever are."""
    import json

    import numpy as np

    from services.study import LEDGER_FILE

    cfg = _config(
        name="breed",
        simulations=240,
        sampler={"kind": "breed", "breed": {"sigma": 0.01, "start": 1.0, "end": 1.0, "breakpoint": 10}},
        buffer={"capacity": 400, "watermark": 100},
    )
    study = _run(cfg, tmp_path)
    snap = study.snapshot()
    assert snap["state"] == "finished", snap["error"]
    assert snap["simulations"]["done"] == 240
    assert snap["sampler"]["kind"] == "breed" and snap["sampler"]["losses_observed"] > 0
    assert snap["sampler"]["bred_fraction"] == 1.0
    # The journal holds every point drawn, in order (a resumed study replays them).
    takes = [json.loads(ln) for ln in (study.dir / LEDGER_FILE).read_text().splitlines()]
    points = np.concatenate([np.array(r["fresh"]) for r in takes if "fresh" in r])
    assert points.shape == (240, 5)
    space = study.spec.params
    assert np.all((points >= space.low) & (points <= space.high))
    unit = space.normalise(points)
    nearest = np.array([np.abs(unit[:k] - unit[k]).max(axis=1).min() for k in range(1, len(unit))])
    # A child lies within 5 sigma of its parent in every coordinate; two uniform points in 5-D do so with
    # probability 0.1**5 per pair.
    assert int((nearest < 0.05).sum()) >= 40
    sampler = ModelStore(tmp_path).card("heat2d").extra["sampler"]
    assert sampler["kind"] == "breed" and sampler["seed"] == 0 and sampler["breed"]["sigma"] == 0.01
    study.release()


def test_a_queries_study_runs_half_its_simulations_where_users_asked(tmp_path) -> None:
    """The gateway's query sample in the store steers the study's draws: with jitter 0, half of the
    points are exactly the asked ones; the rest stay uniform."""
    import json

    import numpy as np

    from services.queries import QueryBook
    from services.study import LEDGER_FILE

    asked = np.array([[300.0, 200.0, 400.0, 100.0, 500.0], [150.0, 450.0, 250.0, 350.0, 120.0]])
    (tmp_path / "heat2d").mkdir()
    book = QueryBook(tmp_path)
    book.record("heat2d", asked, ("u0", "t_left", "t_right", "t_bottom", "t_top"))
    assert book.flush() == 1
    cfg = _config(
        name="queries",
        simulations=80,
        sampler={"kind": "queries", "queries": {"fraction": 0.5, "jitter": 0.0, "refresh_s": 0.5}},
    )
    study = _run(cfg, tmp_path)
    snap = study.snapshot()
    assert snap["state"] == "finished", snap["error"]
    assert snap["simulations"]["done"] == 80
    assert snap["sampler"]["queried"] == 40 and snap["sampler"]["query_points"] == 2
    takes = [json.loads(ln) for ln in (study.dir / LEDGER_FILE).read_text().splitlines()]
    points = np.concatenate([np.array(r["fresh"]) for r in takes if "fresh" in r])
    assert points.shape == (80, 5)
    at_query = (points[:, None, :] == asked[None]).all(axis=2).any(axis=1)
    assert int(at_query.sum()) == 40
    assert ModelStore(tmp_path).card("heat2d").extra["sampler"]["queries"]["fraction"] == 0.5
    study.release()


def test_an_ensemble_study_publishes_its_calibration_and_scores_its_draws_with_it(tmp_path) -> None:
    """training.ensemble trains K members in the one Ray Train run; the card carries the calibration measured
    on held-out simulations; the uncertainty sampler scores its draws with the ensemble the study published."""
    import numpy as np

    cfg = _config(
        name="ens",
        simulations=240,
        sampler={"kind": "uncertainty", "uncertainty": {"fraction": 1.0, "pool": 64, "refresh_s": 0.5}},
        buffer={"capacity": 400, "watermark": 100},
        training={"ensemble": 3, "validate_every": 10},
    )
    study = _run(cfg, tmp_path)
    snap = study.snapshot()
    assert snap["state"] == "finished", snap["error"]
    assert snap["simulations"]["done"] == 240
    assert snap["sampler"]["scorer_version"] is not None and snap["sampler"]["scored"] > 0
    hist = [e for _, e in snap["training"]["history"]]
    assert hist[-1] < 0.5 * hist[0]
    store = ModelStore(tmp_path)
    m = store.load("heat2d")
    assert m.members == 3 and m.card.training.study_id == study.id
    cal = m.card.ensemble
    assert cal is not None and cal.std_scale > 0 and cal.values > 0
    assert 0.0 <= cal.within_1sigma <= cal.within_2sigma <= 1.0
    assert m.card.extra["sampler"]["kind"] == "uncertainty"
    # The members were trained apart (initialisation, online bagging): their spread is not zero.
    x = torch.from_numpy(study.spec.encode_inputs(np.array([study.spec.params.low]), np.array([0.05])))
    with torch.no_grad():
        assert float(m.model(x).std(0).max()) > 0
    study.release()


def test_a_fallback_query_is_answered_by_the_solver_and_its_simulation_is_trained_on_once(tmp_path) -> None:
    """predict?fallback=solve on the gateway that runs the study: a point the ensemble is unsure of is
    solved on the study's Ray, answered with the solver's fields, and streamed into the buffer exactly once."""
    import numpy as np
    from fastapi.testclient import TestClient

    import solvers
    from services.gateway.app import create_app
    from services.gateway.settings import GatewaySettings
    from services.sampling import simulation_seeds
    from services.study import StudyManager

    cfg = parse_config(_config(name="fb", simulations=200, training={"ensemble": 2}))
    manager = StudyManager(tmp_path)
    settings = GatewaySettings(store=tmp_path, poll_interval_s=0.2)
    with TestClient(create_app(settings, manager=manager), raise_server_exceptions=False) as c:
        study = manager.start(cfg)
        study.release_when_done = False  # the shards' counts are read below
        deadline = time.monotonic() + 120
        while c.get("/v1/models/heat2d").status_code != 200:
            assert time.monotonic() < deadline and study.running, study.snapshot()["error"]
            time.sleep(0.2)
        params = {"u0": 350.0, "t_left": 120.0, "t_right": 480.0, "t_bottom": 300.0, "t_top": 200.0}
        t = study.spec.times
        body = {"params": params, "times": [t[0], t[5], (t[5] + t[6]) / 2, t[-1]]}
        # A threshold no ensemble meets: the solver answers.
        r = c.post("/v1/models/heat2d/predict?fallback=solve&max_std=1e-9", json=body)
        assert r.status_code == 200, r.text
        doc = r.json()
        assert doc["source"] == "solver" and r.headers["X-Prediction-Source"] == "solver"
        sim_id = doc["simulation"]
        assert sim_id >= 0
        point = np.array([[params[n] for n in study.spec.params.names]])
        traj = solvers.get("heat2d", **study.spec.solver_config).solve(point, simulation_seeds(0, np.array([sim_id])))
        want = traj[0][[0, 5, 5, -1]].astype(np.float64)
        want[2] = (traj[0][5] + traj[0][6]) / 2
        np.testing.assert_allclose(np.asarray(doc["outputs"]), want, rtol=1e-5, atol=1e-3)
        assert study.join(240), "study did not finish in time"
        snap = study.snapshot()
        assert snap["state"] == "finished", snap["error"]
        assert snap["simulations"]["done"] == 201  # the budget's 200 and the one asked for
        got = study.received_by_sim()
        assert got[sim_id] == STEPS + 1  # every recorded step of it, once
        assert sorted(got) == list(range(201)) and set(got.values()) == {STEPS + 1}
        assert snap["samples"]["received"] == 201 * (STEPS + 1)
        metrics = c.get("/metrics").text
        assert 'surge_predict_fallbacks_total{model="heat2d",outcome="solved"} 1.0' in metrics
    study.release()
