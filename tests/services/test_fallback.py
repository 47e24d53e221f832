"""predict?fallback=solve without a cluster: its checks, the answer when no study can solve, the cap, interpolation."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

import solvers
from services.fallback import FallbackTimeout, at_times
from services.gateway.app import create_app
from services.gateway.fallback import BUSY, NEEDS_ENSEMBLE, NO_SOLVER
from services.gateway.settings import GatewaySettings
from trainer.ensemble import build_ensemble
from trainer.loop import LoopStats, Normaliser, make_card
from trainer.models import build_model
from trainer.problem import ProblemSpec
from trainer.store import ModelStore

CFG = {"n": 8, "steps": 10, "dt": 0.01}
SPEC = ProblemSpec.from_solver(solvers.get("heat2d", **CFG), CFG)
ARCH = {"hidden": 16, "layers": 1}
PARAMS = {"u0": 300.0, "t_left": 200.0, "t_right": 400.0, "t_bottom": 100.0, "t_top": 500.0}
BODY = {"params": PARAMS, "times": [0.0, 0.05]}
URL = "/v1/models/{}/predict"


def _publish(root: Path) -> None:
    torch.manual_seed(0)
    store = ModelStore(root)
    for name, k in (("single", 1), ("ens", 3)):
        card = make_card(
            problem=SPEC.to_dict(),
            model_name="mlp",
            arch=ARCH,
            in_channels=SPEC.in_channels,
            out_channels=1,
            grid=SPEC.grid,
            norm=Normaliser(300.0, 100.0),
            stats=LoopStats(step=1, samples_seen=1, validation_error=0.5),
            study_id="s",
            ensemble={"members": 3, "std_scale": 1.0} if k > 1 else None,
        )
        net = build_ensemble(k, "mlp", SPEC.in_channels, 1, SPEC.grid, **ARCH) if k > 1 else None
        store.publish(name, net or build_model("mlp", SPEC.in_channels, 1, SPEC.grid, **ARCH), card)


class _Solver:
    """What the gateway calls to solve (a running study's manager), held until released: for the cap."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.calls = 0

    def solve(self, model: str, names: tuple[str, ...], params: np.ndarray, timeout: float) -> tuple[int, np.ndarray]:
        self.calls += 1
        if not self.release.wait(timeout):
            raise FallbackTimeout(f"the solver did not answer within {timeout:g} s")
        traj = solvers.get("heat2d", **CFG).solve(params[None], np.array([0]))[0]  # (T+1, C, *grid)
        return 7, traj


@pytest.fixture
def gateway(tmp_path: Path) -> Iterator[TestClient]:
    _publish(tmp_path)
    settings = GatewaySettings(store=tmp_path, poll_interval_s=0.2, max_fallbacks=1, fallback_timeout_s=20)
    with TestClient(create_app(settings, manager=None), raise_server_exceptions=False) as c:
        yield c


@pytest.mark.parametrize(
    ("query", "name", "needle"),
    [
        ("fallback=solve", "ens", "fallback=solve needs max_std"),
        ("max_std=1", "ens", "max_std is the threshold of fallback=solve"),
        ("fallback=solve&max_std=0", "ens", "greater than 0"),
        ("fallback=solve&max_std=nan", "ens", "finite number"),
        ("fallback=solver&max_std=1", "ens", "fallback"),
        ("fallback=solve&max_std=1", "single", NEEDS_ENSEMBLE.format(name="single")),
    ],
)
def test_bad_fallback_queries_are_422(gateway: TestClient, query: str, name: str, needle: str) -> None:
    r = gateway.post(f"{URL.format(name)}?{query}", json=BODY)
    assert r.status_code == 422, r.text
    assert needle in r.json()["detail"]


def test_rows_of_several_points_cannot_fall_back(gateway: TestClient) -> None:
    rows = np.array([[*PARAMS.values(), 0.0], [301.0, 200.0, 400.0, 100.0, 500.0, 0.0]])
    import io

    buf = io.BytesIO()
    np.save(buf, rows)
    before = _fallbacks(gateway)
    r = gateway.post(
        f"{URL.format('ens')}?fallback=solve&max_std=1e-9",
        content=buf.getvalue(),
        headers={"content-type": "application/x-npy"},
    )
    assert r.status_code == 422 and "one parameter point per request" in r.json()["detail"]
    assert _delta(gateway, before) == {"refused": 1.0}


def _fallbacks(c: TestClient) -> dict[str, float]:
    out: dict[str, float] = {}
    for fam in text_string_to_metric_families(c.get("/metrics").text):
        if fam.name == "surge_predict_fallbacks":
            for s in fam.samples:
                if s.name.endswith("_total") and s.labels["model"] == "ens":
                    out[s.labels["outcome"]] = s.value
    return out


def _delta(c: TestClient, before: dict[str, float]) -> dict[str, float]:
    """The fallback counters' increase since ``before`` (the counters are the process's)."""
    now = _fallbacks(c)
    return {k: v - before.get(k, 0.0) for k, v in now.items() if v != before.get(k, 0.0)}


def test_a_sure_answer_stays_with_the_surrogate_and_an_unsure_one_without_a_study_is_503(gateway: TestClient) -> None:
    before = _fallbacks(gateway)
    r = gateway.post(f"{URL.format('ens')}?fallback=solve&max_std=1e9", json=BODY)
    assert r.status_code == 200 and r.json()["source"] == "surrogate"
    assert r.headers["X-Prediction-Source"] == "surrogate"
    # No study runs in this gateway: said clearly, with Retry-After, and counted.
    r = gateway.post(f"{URL.format('ens')}?fallback=solve&max_std=1e-9", json=BODY)
    assert r.status_code == 503 and r.headers["Retry-After"]
    assert r.json()["detail"] == NO_SOLVER.format(name="ens")
    assert _delta(gateway, before) == {"unavailable": 1.0}
    # Without fallback the answer carries no source.
    assert "source" not in gateway.post(URL.format("ens"), json=BODY).json()


def test_fallback_solves_are_capped_and_answered_by_the_solver(gateway: TestClient) -> None:
    solver = _Solver()
    gateway.app.state.manager = solver
    before = _fallbacks(gateway)
    url = f"{URL.format('ens')}?fallback=solve&max_std=1e-9"
    answers: list = []
    first = threading.Thread(target=lambda: answers.append(gateway.post(url, json=BODY)))
    first.start()
    deadline = threading.Event()
    while solver.calls == 0 and not deadline.wait(0.02):
        pass
    busy = gateway.post(url, json=BODY)  # the one allowed solve is waiting
    assert busy.status_code == 503 and busy.headers["Retry-After"]
    assert busy.json()["detail"] == BUSY.format(n=1, limit=1)
    solver.release.set()
    first.join(30)
    r = answers[0]
    assert r.status_code == 200, r.text
    doc = r.json()
    assert doc["source"] == "solver" and doc["simulation"] == 7 and r.headers["X-Simulation-Id"] == "7"
    want = solvers.get("heat2d", **CFG).solve(np.array([list(PARAMS.values())]), np.array([0]))[0]
    # t = 0 and t = 0.05 are recorded times: the solver's fields exactly; the std is 0.
    np.testing.assert_allclose(np.asarray(doc["outputs"]), want[[0, 5]], rtol=1e-6)
    assert np.count_nonzero(np.asarray(doc["std"])) == 0
    assert _delta(gateway, before) == {"busy": 1.0, "solved": 1.0}


def test_answers_between_recorded_times_are_interpolated_linearly() -> None:
    ts = np.asarray(SPEC.times)
    y = np.stack([np.full((1, 2), t * 10.0 + 1) for t in ts])  # linear in t: (T+1, 1, 2)
    got = at_times(SPEC, y, np.array([0.0, ts[3], (ts[3] + ts[4]) / 2, 0.3 * ts[1], ts[-1]]))
    np.testing.assert_allclose(
        got[:, 0, 0], [1.0, ts[3] * 10 + 1, (ts[3] + ts[4]) * 5 + 1, 3 * ts[1] + 1, ts[-1] * 10 + 1]
    )
    bumpy = np.stack([np.full((1, 2), float(k % 2)) for k in range(len(ts))])  # 0, 1, 0, 1, ...
    np.testing.assert_allclose(at_times(SPEC, bumpy, np.array([ts[1], (ts[1] + ts[2]) / 2]))[:, 0, 0], [1.0, 0.5])
