"""Predict over gRPC against REST predict on the same store: same numbers, same errors (mapped to status codes)."""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient

import solvers
from services.gateway.app import create_app
from services.gateway.settings import GatewaySettings
from services.ingest import surge_pb2 as pb
from services.ingest import surge_pb2_grpc as rpc
from services.ingest.client import IngestError, connect
from services.ingest.server import NO_TOKEN, release, serve
from trainer.ensemble import build_ensemble
from trainer.loop import LoopStats, Normaliser, make_card
from trainer.models import build_model
from trainer.problem import ProblemSpec
from trainer.store import ModelStore

MAX_BODY = 256 * 1024
MAX_ROWS = 64
HEAT_CFG = {"n": 8, "steps": 10, "dt": 0.01}
HEAT = ProblemSpec.from_solver(solvers.get("heat2d", **HEAT_CFG), HEAT_CFG)
ADV_CFG = {"resolution": 32, "t_final": 1.0, "snapshots": 4}
ADV = ProblemSpec.from_solver(solvers.get("advection1d", **ADV_CFG), ADV_CFG, kind="operator", inputs=("u",))
PARAMS = {"u0": 300.0, "t_left": 200.0, "t_right": 400.0, "t_bottom": 100.0, "t_top": 500.0}
TIMES = [0.0, 0.05, 0.1]
STD_SCALE = 1.5


def _publish(root: Path) -> None:
    store = ModelStore(root)
    torch.manual_seed(0)
    arch = {"hidden": 16, "layers": 1}
    stats = LoopStats(step=1, samples_seen=1, validation_error=0.5)
    store.publish(
        "heat2d",
        build_model("mlp", HEAT.in_channels, 1, HEAT.grid, **arch),
        make_card(
            problem=HEAT.to_dict(),
            model_name="mlp",
            arch=arch,
            in_channels=HEAT.in_channels,
            out_channels=1,
            grid=HEAT.grid,
            norm=Normaliser(300.0, 100.0),
            stats=stats,
            study_id="s",
        ),
    )
    # An ensemble of three: its answers carry a standard deviation (the spread times std_scale).
    store.publish(
        "heat2d-ens",
        build_ensemble(3, "mlp", HEAT.in_channels, 1, HEAT.grid, **arch),
        make_card(
            problem=HEAT.to_dict(),
            model_name="mlp",
            arch=arch,
            in_channels=HEAT.in_channels,
            out_channels=1,
            grid=HEAT.grid,
            norm=Normaliser(300.0, 100.0),
            stats=stats,
            study_id="s",
            ensemble={"members": 3, "std_scale": STD_SCALE, "within_1sigma": 0.7, "within_2sigma": 0.96},
        ),
    )
    arch = {"modes": 4, "width": 8, "layers": 1}
    rng = np.random.default_rng(0)
    norm = Normaliser.fit(rng.normal(size=(8, 1, 32)), rng.normal(size=(8, ADV.in_channels, 32)))
    store.publish(
        "advection1d",
        build_model("fno", ADV.in_channels, 1, ADV.grid, field_input=True, **arch),
        make_card(
            problem=ADV.to_dict(),
            model_name="fno",
            arch=arch,
            in_channels=ADV.in_channels,
            out_channels=1,
            grid=ADV.grid,
            norm=norm,
            stats=stats,
            study_id="s",
            field_input=True,
        ),
    )


@pytest.fixture(scope="module")
def both(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[TestClient, Any]]:
    """The REST gateway and a gRPC server lent its models (no token: predictions need none)."""
    root = tmp_path_factory.mktemp("store")
    _publish(root)
    settings = GatewaySettings(store=root, max_body_bytes=MAX_BODY, max_predict_rows=MAX_ROWS, poll_interval_s=0.2)
    with TestClient(create_app(settings, manager=None), raise_server_exceptions=False) as rest:
        srv = serve("127.0.0.1", 0, token=None, max_message_bytes=MAX_BODY)
        srv.serve_predictions(rest.app.state.hub, MAX_ROWS)
        client = connect(srv.address)
        try:
            yield rest, client
        finally:
            client.close()
            release(srv)


def _rest_npy(rest: TestClient, name: str, body: dict[str, Any]) -> tuple[np.ndarray, int]:
    r = rest.post(f"/v1/models/{name}/predict", json=body, headers={"Accept": "application/x-npy"})
    assert r.status_code == 200, r.text
    return np.load(io.BytesIO(r.content)), int(r.headers["X-Model-Version"])


def test_parametric_predictions_are_the_same_numbers(both) -> None:
    rest, client = both
    want, v_rest = _rest_npy(rest, "heat2d", {"params": PARAMS, "times": TIMES})
    got, v_grpc = client.predict("heat2d", params=PARAMS, times=TIMES)
    assert got.dtype == np.float32 and got.shape == (3, 1, 8, 8)
    assert v_grpc == v_rest == 1
    np.testing.assert_array_equal(got, want)
    # And the JSON answer carries the same values.
    r = rest.post("/v1/models/heat2d/predict", json={"params": PARAMS, "times": TIMES})
    np.testing.assert_array_equal(np.asarray(r.json()["outputs"], dtype=np.float32), got)


def test_an_ensemble_answers_its_mean_and_calibrated_std_over_rest_and_grpc(both, tmp_path: Path) -> None:
    rest, client = both
    body = {"params": PARAMS, "times": TIMES}
    r = rest.post("/v1/models/heat2d-ens/predict", json=body)
    assert r.status_code == 200, r.text
    assert r.headers["X-Model-Ensemble"] == "3"
    doc = r.json()
    mean, std = np.asarray(doc["outputs"], np.float32), np.asarray(doc["std"], np.float32)
    assert doc["ensemble"] == 3 and mean.shape == std.shape == (3, 1, 8, 8) and doc["shape"] == [3, 1, 8, 8]
    assert np.all(std >= 0) and float(std.max()) > 0
    # The numbers: the members' mean, and their spread times the card's std_scale.
    m = ModelStore(rest.app.state.hub.store.root).load("heat2d-ens")
    rows = np.array([[*(PARAMS[n] for n in HEAT.params.names), t] for t in TIMES])
    with torch.no_grad():
        preds = m.normaliser.decode(m.model(torch.from_numpy(HEAT.encode_inputs(rows[:, :-1], rows[:, -1]))))
    np.testing.assert_allclose(mean, preds.mean(0).numpy(), rtol=1e-5, atol=1e-3)
    np.testing.assert_allclose(std, STD_SCALE * preds.std(0).numpy(), rtol=1e-5, atol=1e-3)
    # .npy: mean and std stacked.
    both_npy, _ = _rest_npy(rest, "heat2d-ens", body)
    assert both_npy.shape == (2, 3, 1, 8, 8)
    np.testing.assert_array_equal(both_npy[0], mean)
    np.testing.assert_array_equal(both_npy[1], std)
    # gRPC: the same two arrays; a single model has none.
    g_mean, g_std, version = client.predict_std("heat2d-ens", params=PARAMS, times=TIMES)
    assert version == 1 and g_std is not None
    np.testing.assert_array_equal(g_mean, mean)
    np.testing.assert_array_equal(g_std, std)
    assert client.predict_std("heat2d", params=PARAMS, times=TIMES)[1] is None
    assert "std" not in rest.post("/v1/models/heat2d/predict", json=body).json()
    # The card shows the calibration.
    card = rest.get("/v1/models/heat2d-ens").json()
    assert card["ensemble"]["members"] == 3 and card["ensemble"]["within_1sigma"] == 0.7
    assert rest.get("/v1/models/heat2d").json()["ensemble"] is None


def test_an_ensembles_answer_counts_its_std_against_the_output_limit(tmp_path: Path) -> None:
    _publish(tmp_path)
    per_row = 64  # one 8x8 field
    settings = GatewaySettings(store=tmp_path, max_predict_values=3 * per_row, poll_interval_s=0.2)
    with TestClient(create_app(settings, manager=None), raise_server_exceptions=False) as rest:
        body = {"params": PARAMS, "times": TIMES}  # 3 rows
        assert rest.post("/v1/models/heat2d/predict", json=body).status_code == 200  # 192 values
        r = rest.post("/v1/models/heat2d-ens/predict", json=body)  # 2 x 192 values
        assert r.status_code == 413 and "at most 1 rows" in r.json()["detail"], r.text
        assert rest.post("/v1/models/heat2d-ens/predict", json={**body, "times": [0.0]}).status_code == 200


def test_operator_predictions_are_the_same_numbers(both) -> None:
    rest, client = both
    u = np.sin(2 * np.pi * np.arange(32) / 32)[None].repeat(2, 0) * np.array([[1.0], [0.5]])  # (2, 32)
    want, _ = _rest_npy(rest, "advection1d", {"inputs": {"u": u.tolist()}, "params": {"beta": 1.5}})
    got, version = client.predict("advection1d", params={"beta": 1.5}, inputs={"u": u})
    assert got.shape == (2, 1, 32) and version == 1
    np.testing.assert_array_equal(got, want)
    one, _ = client.predict("advection1d", params={"beta": 1.5}, inputs={"u": u[0]})  # [*grid]: one sample
    want_one, _ = _rest_npy(rest, "advection1d", {"inputs": {"u": u[0].tolist()}, "params": {"beta": 1.5}})
    assert one.shape == (1, 1, 32)
    np.testing.assert_array_equal(one, want_one)


NAN, INF = float("nan"), float("inf")
# name: (model, the request as REST JSON (sent over gRPC as params, times and float64 arrays), HTTP status, gRPC code)
CASES: dict[str, tuple[str, dict[str, Any], int, grpc.StatusCode]] = {
    "unknown-model": ("nope", {"params": PARAMS, "times": TIMES}, 404, grpc.StatusCode.NOT_FOUND),
    "missing-param": (
        "heat2d",
        {"params": {**PARAMS, "u0": None}, "times": TIMES},
        422,
        grpc.StatusCode.INVALID_ARGUMENT,
    ),
    "unknown-param": (
        "heat2d",
        {"params": {**PARAMS, "x": 1.0}, "times": TIMES},
        422,
        grpc.StatusCode.INVALID_ARGUMENT,
    ),
    "out-of-bounds": (
        "heat2d",
        {"params": {**PARAMS, "u0": 900.0}, "times": TIMES},
        422,
        grpc.StatusCode.INVALID_ARGUMENT,
    ),
    "late-time": ("heat2d", {"params": PARAMS, "times": [0.0, 7.0]}, 422, grpc.StatusCode.INVALID_ARGUMENT),
    "nan-param": ("heat2d", {"params": {**PARAMS, "u0": NAN}, "times": TIMES}, 422, grpc.StatusCode.INVALID_ARGUMENT),
    "no-times": ("heat2d", {"params": PARAMS, "times": []}, 422, grpc.StatusCode.INVALID_ARGUMENT),
    "too-many-times": (
        "heat2d",
        {"params": PARAMS, "times": [0.0] * (MAX_ROWS + 1)},
        422,
        grpc.StatusCode.INVALID_ARGUMENT,
    ),
    "inputs-to-parametric": (
        "heat2d",
        {"params": PARAMS, "times": TIMES, "inputs": {"u": [0.0]}},
        422,
        grpc.StatusCode.INVALID_ARGUMENT,
    ),
    "operator-wrong-shape": (
        "advection1d",
        {"inputs": {"u": [0.0] * 31}, "params": {"beta": 1.0}},
        422,
        grpc.StatusCode.INVALID_ARGUMENT,
    ),
    "operator-missing-input": (
        "advection1d",
        {"inputs": {}, "params": {"beta": 1.0}},
        422,
        grpc.StatusCode.INVALID_ARGUMENT,
    ),
    "operator-missing-param": ("advection1d", {"inputs": {"u": [0.0] * 32}}, 422, grpc.StatusCode.INVALID_ARGUMENT),
    "operator-inf-input": (
        "advection1d",
        {"inputs": {"u": [INF] + [0.0] * 31}, "params": {"beta": 1.0}},
        422,
        grpc.StatusCode.INVALID_ARGUMENT,
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_requests_get_the_rest_error_as_a_status_code(both, case: str) -> None:
    rest, client = both
    name, body, status, code = CASES[case]
    body = {**body, "params": {k: v for k, v in body.get("params", {}).items() if v is not None}}
    # json.dumps writes NaN and Infinity, which the gateway's JSON parser reads back as such.
    r = rest.post(f"/v1/models/{name}/predict", content=json.dumps(body), headers={"Content-Type": "application/json"})
    assert r.status_code == status, r.text
    req = pb.PredictRequest(model=name, params=body["params"], times=body.get("times", []))
    for field, values in body.get("inputs", {}).items():
        a = np.asarray(values, dtype="<f8")
        req.inputs[field].CopyFrom(pb.Array(dtype="float64", shape=list(a.shape), data=a.tobytes()))
    with pytest.raises(grpc.RpcError) as e:
        rpc.PredictStub(client._channel).Predict(req, timeout=10)
    assert e.value.code() == code
    assert e.value.details() == r.json()["detail"]


def test_a_request_over_the_size_limit_is_resource_exhausted(both) -> None:
    _, client = both
    with pytest.raises(IngestError) as e:
        client.predict("advection1d", params={"beta": 1.0}, inputs={"u": np.zeros((MAX_BODY // 32, 32))})
    assert e.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_predictions_need_no_token_but_ingest_does(both) -> None:
    _, client = both  # connected without a token
    client.predict("heat2d", params=PARAMS, times=[0.0])
    with pytest.raises(IngestError) as e:
        client.next_simulation("any")
    assert e.value.code == grpc.StatusCode.PERMISSION_DENIED and e.value.message == NO_TOKEN


def test_scopes_a_predict_token_guards_predict_and_the_ingest_token_only_ingest(tmp_path: Path) -> None:
    from services.auth import TOKEN_MISSING

    root = tmp_path / "store"
    _publish(root)
    settings = GatewaySettings(store=root, poll_interval_s=0.2)
    with TestClient(create_app(settings, manager=None)) as rest:
        srv = serve("127.0.0.1", 0, token="ingest-t", max_message_bytes=MAX_BODY)
        srv.serve_predictions(rest.app.state.hub, MAX_ROWS, 2**22, token="predict-t")
        try:
            for token in (None, "ingest-t"):
                with connect(srv.address, token or "") as c, pytest.raises(IngestError) as e:
                    c.predict("heat2d", params=PARAMS, times=[0.0])
                assert e.value.code == grpc.StatusCode.UNAUTHENTICATED and e.value.message == TOKEN_MISSING
            with connect(srv.address, "predict-t") as c:
                assert c.predict("heat2d", params=PARAMS, times=[0.0])[1] == 1
                with pytest.raises(IngestError) as e:  # the predict token opens no ingest call
                    c.next_simulation("any")
                assert e.value.code == grpc.StatusCode.UNAUTHENTICATED
            # An answer above the output limit: RESOURCE_EXHAUSTED, with REST's words.
            srv.serve_predictions(rest.app.state.hub, MAX_ROWS, 10, token=None)
            with connect(srv.address, "") as c, pytest.raises(IngestError) as e:
                c.predict("heat2d", params=PARAMS, times=[0.0])
            assert e.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED and "SURGE_MAX_PREDICT_VALUES" in e.value.message
        finally:
            release(srv)
