"""End to end: a real uvicorn server, a study started over HTTP, predictions while it trains."""

from __future__ import annotations

import io
import socket
import threading
import time
from collections.abc import Iterator

import httpx
import numpy as np
import pytest
import uvicorn

import solvers
from services.gateway.app import create_app
from services.gateway.settings import GatewaySettings
from services.study import StudyManager

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("ray_cluster")]

TOKEN = "e2e-token"
SOLVER = {"n": 16, "steps": 20, "dt": 0.005}
STUDY = f"""
name: e2e
problem: {{solver: heat2d, config: {{n: {SOLVER["n"]}, steps: {SOLVER["steps"]}, dt: {SOLVER["dt"]}}}}}
simulations: 100000
solvers: {{actors: 1, sims_per_call: 8, chunk_steps: 5}}
buffer: {{policy: fifo, capacity: 2000, watermark: 300}}
training: {{model: mlp, arch: {{hidden: 128, layers: 2}}, batch_size: 64, steps: 100000, lr: 0.002,
           warmup: 20, validate_every: 100, validation_simulations: 4}}
"""
PARAMS = {"u0": 420.0, "t_left": 150.0, "t_right": 480.0, "t_bottom": 260.0, "t_top": 330.0}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> Iterator[tuple[str, StudyManager]]:
    store = tmp_path_factory.mktemp("store")
    settings = GatewaySettings(store=store, api_token=TOKEN, max_body_bytes=64 * 1024, poll_interval_s=0.2)
    manager = StudyManager(store)
    port = _free_port()
    srv = uvicorn.Server(uvicorn.Config(create_app(settings, manager), host="127.0.0.1", port=port, log_level="error"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 30
    while time.time() < deadline:
        try:
            if httpx.get(f"{url}/healthz").status_code == 200:
                break
        except httpx.TransportError:
            time.sleep(0.1)
    yield url, manager
    manager.stop_all(timeout=60)
    srv.should_exit = True
    thread.join(10)


@pytest.fixture(scope="module")
def trained(server) -> tuple[str, str]:
    """Start the study over HTTP and wait until it has published a model that has learned something."""
    url, _ = server
    auth = {"Authorization": f"Bearer {TOKEN}"}
    r = httpx.post(f"{url}/v1/studies", content=STUDY, headers={**auth, "Content-Type": "application/yaml"})
    assert r.status_code == 201, r.text
    study_id = r.json()["id"]
    deadline = time.time() + 240
    while time.time() < deadline:
        snap = httpx.get(f"{url}/v1/studies/{study_id}").json()
        assert snap["state"] in ("starting", "running"), snap
        if snap["training"]["step"] >= 600 and snap["training"]["version"]:
            break
        time.sleep(1)
    else:
        pytest.fail("the study did not train within 240 s")
    return url, study_id


def test_predict_matches_the_solver(trained) -> None:
    url, _ = trained
    solver = solvers.get("heat2d", **SOLVER)
    ref = solver.solve(np.array([list(PARAMS.values())]), np.array([0]))[0]  # (21, 1, 16, 16)
    idx = [5, 10, 20]
    r = httpx.post(f"{url}/v1/models/heat2d/predict", json={"params": PARAMS, "times": [solver.times[i] for i in idx]})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model"] == "heat2d" and body["shape"] == [3, 1, 16, 16]
    assert r.headers["X-Model-Version"] == str(body["version"])
    out = np.array(body["outputs"])
    err = np.linalg.norm(out - ref[idx]) / np.linalg.norm(ref[idx])
    # A short training on a 16x16 grid; the default study reaches ~1 % (see README).
    assert err < 0.1, err


def test_binary_predict_agrees_with_json(trained) -> None:
    url, _ = trained
    rows = np.array([[*PARAMS.values(), 0.05], [*PARAMS.values(), 0.1]])
    buf = io.BytesIO()
    np.save(buf, rows)
    # Pinned to one version (training publishes new ones meanwhile), both encodings must agree.
    j = httpx.post(f"{url}/v1/models/heat2d/predict", json={"params": PARAMS, "times": [0.05, 0.1]})
    assert j.status_code == 200, j.text
    version = j.json()["version"]
    r = httpx.post(
        f"{url}/v1/models/heat2d/predict",
        params={"version": version},
        content=buf.getvalue(),
        headers={"Content-Type": "application/x-npy", "Accept": "application/x-npy"},
    )
    assert r.status_code == 200, r.text
    assert r.headers["X-Model-Version"] == str(version)
    out = np.load(io.BytesIO(r.content), allow_pickle=False)
    assert out.dtype == np.float32 and out.shape == (2, 1, 16, 16)
    np.testing.assert_allclose(np.array(j.json()["outputs"]), out, rtol=1e-5)


@pytest.mark.parametrize(
    ("name", "kwargs", "code", "needle"),
    [
        ("nope", {"json": {"params": PARAMS, "times": [0.0]}}, 404, "model 'nope' not found"),
        (
            "heat2d",
            {"json": {"params": PARAMS, "times": [0.0]}, "params": {"version": 10**6}},
            404,
            "has no servable version 1000000",
        ),
        ("heat2d", {"json": {"params": PARAMS, "times": [0.0]}, "params": {"version": 0}}, 422, "query.version"),
        ("heat2d", {"json": {"params": {"u0": 300.0}, "times": [0.0]}}, 422, "missing parameter(s)"),
        ("heat2d", {"json": {"params": {**PARAMS, "kappa": 1.0}, "times": [0.0]}}, 422, "unknown parameter(s): kappa"),
        ("heat2d", {"json": {"params": {**PARAMS, "u0": 900.0}, "times": [0.0]}}, 422, "u0 = 900 is outside"),
        ("heat2d", {"json": {"params": PARAMS, "times": [5.0]}}, 422, "t = 5 is outside"),
        ("heat2d", {"content": b'{"params": {"u0": NaN, "t_left": 200}, "times": [0]}'}, 422, "finite"),
        ("heat2d", {"json": {"params": PARAMS, "times": []}}, 422, "times"),
        ("heat2d", {"content": b"{not json"}, 422, "not valid JSON"),
        ("heat2d", {"content": b"x" * 70_000}, 413, "exceeds the limit"),
        ("heat2d", {"content": b"a,b", "headers": {"Content-Type": "text/csv"}}, 415, "unsupported content type"),
        (
            "heat2d",
            {"content": b"\x93NUMPY garbage", "headers": {"Content-Type": "application/x-npy"}},
            422,
            "not a valid .npy",
        ),
    ],
)
def test_bad_requests_get_a_clear_4xx(trained, name, kwargs, code, needle) -> None:
    url, _ = trained
    r = httpx.post(f"{url}/v1/models/{name}/predict", **kwargs)
    assert r.status_code == code, r.text
    assert needle in r.json()["detail"]


def test_studies_need_the_token(trained) -> None:
    url, study_id = trained
    assert httpx.post(f"{url}/v1/studies", content=STUDY).status_code == 401
    bad = {"Authorization": "Bearer wrong"}
    assert httpx.delete(f"{url}/v1/studies/{study_id}", headers=bad).status_code == 401
    r = httpx.post(
        f"{url}/v1/studies",
        json={"training": {"batch_size": 0}},
        headers={"Authorization": f"Bearer {TOKEN}"},
    )
    assert r.status_code == 422 and "training.batch_size" in r.json()["detail"]
    assert httpx.get(f"{url}/v1/studies/nope").status_code == 404


def test_metrics_carry_the_vocabulary_with_values(trained) -> None:
    url, _ = trained
    time.sleep(1.5)  # one monitor poll
    text = httpx.get(f"{url}/metrics").text
    values: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("surge_"):
            key, _, val = line.rpartition(" ")
            name = key.split("{")[0]
            values[name] = values.get(name, 0.0) + float(val)
    for name in (
        "surge_simulations_total",
        "surge_samples_produced_total",
        "surge_samples_consumed_total",
        "surge_buffer_capacity_samples",
        "surge_trainer_data_wait_seconds_total",
        "surge_train_steps_total",
        "surge_train_loss",
        "surge_validation_error",
        "surge_predict_requests_total",
        "surge_predict_latency_seconds_count",
    ):
        assert values.get(name, 0) > 0, name
    # The fill may be anything from 0 (the trainer caught up) to the capacity, but it is exported.
    assert 0 <= values["surge_buffer_samples"] <= values["surge_buffer_capacity_samples"]


def test_delete_publishes_a_last_version_and_resume_goes_on_from_it(trained) -> None:
    url, study_id = trained
    auth = {"Authorization": f"Bearer {TOKEN}"}
    before = httpx.get(f"{url}/v1/models/heat2d/versions").json()["versions"][-1]["version"]
    r = httpx.delete(f"{url}/v1/studies/{study_id}", headers=auth)
    assert r.status_code == 202
    deadline = time.time() + 60
    while time.time() < deadline and httpx.get(f"{url}/v1/studies/{study_id}").json()["state"] == "running":
        time.sleep(0.5)
    snap = httpx.get(f"{url}/v1/studies/{study_id}").json()
    assert snap["state"] == "stopped"
    stopped_at = snap["training"]["step"]
    # The stop published a last version, trained to the step the study stopped at (served if it is
    # no worse than the served one; listed and pinnable in any case); serving goes on.
    last = httpx.get(f"{url}/v1/models/heat2d/versions").json()["versions"][-1]
    assert last["version"] > before and last["train_steps"] == stopped_at and last["study_id"] == study_id
    r = httpx.post(f"{url}/v1/models/heat2d/predict?version={last['version']}", json={"params": PARAMS, "times": [0.0]})
    assert r.status_code == 200 and r.headers["X-Model-Version"] == str(last["version"])
    r = httpx.post(f"{url}/v1/models/heat2d/predict", json={"params": PARAMS, "times": [0.05]})
    assert r.status_code == 200
    # Resume: training goes on from that last checkpoint; a study running is not resumed twice.
    assert httpx.post(f"{url}/v1/studies/nope/resume", headers=auth).status_code == 404
    r = httpx.post(f"{url}/v1/studies/{study_id}/resume", headers=auth)
    assert r.status_code == 202, r.text
    assert r.json()["state"] in ("starting", "running")
    again = httpx.post(f"{url}/v1/studies/{study_id}/resume", headers=auth)
    assert again.status_code == 409 and "running" in again.json()["detail"]
    deadline = time.time() + 120
    while time.time() < deadline:
        tr = httpx.get(f"{url}/v1/studies/{study_id}").json()["training"]
        if tr["step"] > stopped_at + 10:
            break
        time.sleep(0.5)
    assert tr["resumed_at"] == [stopped_at] and tr["step"] > stopped_at
    assert httpx.delete(f"{url}/v1/studies/{study_id}", headers=auth).status_code == 202
