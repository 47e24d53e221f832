"""The REST gateway on a real model store, without Ray: cards, predictions, bad input, hot swap, auth, metrics."""

from __future__ import annotations

import asyncio
import io
import json
import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

import solvers
from services.gateway.app import create_app
from services.gateway.deps import BODY_TOO_LARGE, MUTATIONS_DISABLED, STUDIES_UNAVAILABLE, TOKEN_MISSING
from services.gateway.routes.models import JSON_ONLY, MODEL_NOT_FOUND, NPY, UNSUPPORTED_TYPE
from services.gateway.settings import GatewaySettings
from trainer.loop import LoopStats, Normaliser, make_card
from trainer.models import build_model
from trainer.problem import ProblemSpec
from trainer.store import ModelStore

NAME = "heat2d"
TOKEN = "secret"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
MAX_BODY = 64 * 1024
MAX_ROWS = 64
SOLVER_CFG = {"n": 8, "steps": 10, "dt": 0.01}
SPEC = ProblemSpec.from_solver(solvers.get("heat2d", **SOLVER_CFG), SOLVER_CFG)
ARCH = {"hidden": 16, "layers": 1}
CARD = make_card(
    problem=SPEC.to_dict(),
    model_name="mlp",
    arch=ARCH,
    in_channels=SPEC.in_features,
    out_channels=1,
    grid=SPEC.grid,
    norm=Normaliser(300.0, 100.0),
    stats=LoopStats(step=5, samples_seen=100, validation_error=0.1),
    study_id="s1",
)
PARAM_NAMES = ["u0", "t_left", "t_right", "t_bottom", "t_top"]
PARAMS = {"u0": 300.0, "t_left": 200.0, "t_right": 400.0, "t_bottom": 100.0, "t_top": 500.0}
TIMES = [0.0, 0.05]


# Helpers ----------------------------------------------------------------------------------------------


def publish(root: Path, seed: int) -> int:
    """Publish a fresh MLP (weights fixed by ``seed``) as the next version of ``heat2d``."""
    torch.manual_seed(seed)
    return ModelStore(root).publish(NAME, build_model("mlp", SPEC.in_features, 1, SPEC.grid, **ARCH), CARD)


def rows_of(params: dict[str, float], times: list[float]) -> np.ndarray:
    """The ``[N, 6]`` rows (params in card order, then t) a JSON request stands for."""
    p = [params[n] for n in PARAM_NAMES]
    return np.array([[*p, t] for t in times], dtype=np.float64)


def direct(root: Path, version: int, rows: np.ndarray) -> np.ndarray:
    """What the model ``version`` predicts for ``rows``, computed without the gateway."""
    m = ModelStore(root).load(NAME, version)
    spec = m.spec
    norm = m.normaliser
    x = torch.from_numpy(spec.encode_inputs(rows[:, :-1], rows[:, -1]))
    with torch.no_grad():
        return norm.decode(m.model(x)).numpy()


def npy(arr: np.ndarray, allow_pickle: bool = False) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=allow_pickle)
    return buf.getvalue()


def make_client(root: Path, **overrides: Any) -> TestClient:
    settings = {
        "store": root,
        "api_token": TOKEN,
        "max_body_bytes": MAX_BODY,
        "max_predict_rows": MAX_ROWS,
        "poll_interval_s": 0.1,
        **overrides,
    }
    # raise_server_exceptions=False: a crash must show up as the 500 a user would get, not as a test error.
    return TestClient(create_app(GatewaySettings(**settings), manager=None), raise_server_exceptions=False)


def predict(client: TestClient, body: Any = None, *, raw: bytes | None = None, **kw: Any):
    url = f"/v1/models/{NAME}/predict"
    if raw is not None:
        return client.post(url, content=raw, **kw)
    return client.post(url, json=body if body is not None else {"params": PARAMS, "times": TIMES}, **kw)


def assert_error(r, status: int, *needles: str) -> str:
    """A clean error: the status, a JSON body ``{"detail": str}``, and the detail says what is wrong."""
    assert r.status_code == status, (r.status_code, r.text)
    body = r.json()
    assert set(body) == {"detail"} and isinstance(body["detail"], str), body
    for needle in needles:
        assert needle in body["detail"], (needle, body["detail"])
    return body["detail"]


def metric_samples(client: TestClient) -> dict[tuple[str, frozenset], float]:
    r = client.get("/metrics")
    assert r.status_code == 200
    out = {}
    for fam in text_string_to_metric_families(r.text):
        for s in fam.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def wait_for_version(client: TestClient, version: int, timeout: float = 3.0):
    deadline = time.monotonic() + timeout
    while True:
        r = predict(client)
        assert r.status_code == 200, r.text
        if r.headers["X-Model-Version"] == str(version) or time.monotonic() > deadline:
            return r
        time.sleep(0.02)


# Fixtures ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def store_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A store holding version 1 of ``heat2d``; read-only for the tests that share it."""
    root = tmp_path_factory.mktemp("gateway") / "store"
    assert publish(root, seed=1) == 1
    return root


@pytest.fixture(scope="module")
def client(store_root: Path) -> Iterator[TestClient]:
    with make_client(store_root) as c:
        yield c


@pytest.fixture
def live(tmp_path: Path) -> Iterator[tuple[TestClient, Path]]:
    """A gateway of its own over a store that the test may publish into."""
    root = tmp_path / "store"
    publish(root, seed=1)
    with make_client(root) as c:
        yield c, root


# System -----------------------------------------------------------------------------------------------


def test_healthz_lists_the_models(client: TestClient) -> None:
    r = client.get("/healthz")
    assert r.status_code == 200
    assert r.json() == {"status": "ok", "models": [NAME], "studies_enabled": False}


def test_metrics_count_predictions_by_model_and_code(client: TestClient) -> None:
    key_ok = ("surge_predict_requests_total", frozenset({("model", NAME), ("code", "200")}))
    key_bad = ("surge_predict_requests_total", frozenset({("model", NAME), ("code", "422")}))
    key_n = ("surge_predict_latency_seconds_count", frozenset({("model", NAME)}))
    before = metric_samples(client)
    assert predict(client).status_code == 200
    assert predict(client, {"params": PARAMS, "times": []}).status_code == 422
    assert client.post("/v1/models/nope/predict", json={"params": PARAMS, "times": TIMES}).status_code == 404

    r = client.get("/metrics")
    assert r.headers["content-type"].startswith("text/plain")
    assert "surge_predict_requests_total" in r.text
    after = metric_samples(client)
    assert after[key_ok] - before.get(key_ok, 0.0) == 1
    assert after[key_bad] - before.get(key_bad, 0.0) == 1
    assert after[key_n] - before.get(key_n, 0.0) == 2
    assert after[("surge_model_version", frozenset({("model", NAME)}))] == 1
    # Unknown names never become label values (a client cannot blow up the metric's cardinality).
    assert not any(dict(labels).get("model") == "nope" for _, labels in after)


# Models and cards -------------------------------------------------------------------------------------


def test_list_models(client: TestClient) -> None:
    r = client.get("/v1/models")
    assert r.status_code == 200
    (m,) = r.json()["models"]
    assert m == {
        "name": NAME,
        "version": 1,
        "problem": "heat2d",
        "architecture": "mlp",
        "validation_error": 0.1,
        "samples_seen": 100,
    }


def test_model_card_describes_inputs_and_outputs(client: TestClient) -> None:
    r = client.get(f"/v1/models/{NAME}")
    assert r.status_code == 200
    card = r.json()
    assert card["name"] == NAME and card["version"] == 1
    assert card["parameters"] == [{"name": n, "low": 100.0, "high": 500.0} for n in PARAM_NAMES]
    assert card["time_range"] == [0.0, pytest.approx(0.1)]
    assert card["input_shape"] == [SPEC.in_features]  # the encoded width, not the request's
    assert card["output_shape"] == [1, 8, 8]
    assert card["fields"] == ["u"]
    assert card["samples_seen"] == 100 and card["train_steps"] == 5
    assert card["validation_error"] == pytest.approx(0.1)
    assert card["study_id"] == "s1" and card["created_at"] > 0
    assert card["architecture"]["name"] == "mlp" and card["architecture"]["arch"] == ARCH
    assert card["problem"]["solver"] == "heat2d"


@pytest.mark.parametrize("name", ["nope", "heat", "HEAT2D", "bad%00name"])
def test_unknown_model_is_404(client: TestClient, name: str) -> None:
    r = client.get(f"/v1/models/{name}")
    assert_error(r, 404)
    r = client.post(f"/v1/models/{name}/predict", json={"params": PARAMS, "times": TIMES})
    assert_error(r, 404)
    if name == "nope":
        assert r.json()["detail"] == MODEL_NOT_FOUND.format(name="nope") == "model 'nope' not found"


def test_model_names_cannot_escape_the_store(tmp_path: Path) -> None:
    root = tmp_path / "store"
    publish(root, seed=1)
    shutil.copytree(root / NAME / "000001", tmp_path / "000001")  # a checkpoint outside the store
    with make_client(root) as c:
        r = c.get("/v1/models/%2E%2E")
        assert r.status_code in (404, 422), r.text
        assert c.get("/healthz").json()["models"] == [NAME]


# Predictions ------------------------------------------------------------------------------------------


def test_predict_json_matches_the_stored_model(client: TestClient, store_root: Path) -> None:
    r = predict(client)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("application/json")
    assert r.headers["X-Model-Version"] == "1"
    body = r.json()
    assert body["model"] == NAME and body["version"] == 1 and body["shape"] == [2, 1, 8, 8]
    out = np.array(body["outputs"])
    assert out.shape == (2, 1, 8, 8)
    expected = direct(store_root, 1, rows_of(PARAMS, TIMES))
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)
    assert not np.allclose(out[0], out[1])  # the time input matters


@pytest.mark.parametrize("ctype", [None, "application/json", "application/json; charset=utf-8", "Application/JSON"])
def test_predict_json_content_types(client: TestClient, ctype: str | None) -> None:
    headers = {} if ctype is None else {"Content-Type": ctype}
    r = predict(client, raw=json.dumps({"params": PARAMS, "times": TIMES}).encode(), headers=headers)
    assert r.status_code == 200, r.text
    assert r.json()["shape"] == [2, 1, 8, 8]


def test_predict_npy_equals_json(client: TestClient) -> None:
    times = [0.0, 0.01, 0.05, 0.1]
    rows = rows_of(PARAMS, times)
    r = predict(client, raw=npy(rows), headers={"Content-Type": NPY, "Accept": NPY})
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == NPY and r.headers["X-Model-Version"] == "1"
    got = np.load(io.BytesIO(r.content), allow_pickle=False)
    assert got.dtype == np.float32 and got.shape == (4, 1, 8, 8)
    as_json = predict(client, {"params": PARAMS, "times": times})
    np.testing.assert_allclose(got, np.array(as_json.json()["outputs"], dtype=np.float32), rtol=1e-6, atol=1e-5)


@pytest.mark.parametrize("dtype", [np.float32, np.int64, np.uint16])
def test_predict_npy_accepts_numeric_dtypes(client: TestClient, dtype: type) -> None:
    rows = rows_of(PARAMS, [0.0]).astype(dtype)
    r = predict(client, raw=npy(rows), headers={"Content-Type": NPY})
    assert r.status_code == 200, r.text
    assert r.json()["shape"] == [1, 1, 8, 8]


def test_rows_at_the_limits_are_accepted(client: TestClient) -> None:
    params = dict.fromkeys(PARAM_NAMES, 100.0) | {"t_top": 500.0}
    r = predict(client, {"params": params, "times": [0.0] * (MAX_ROWS - 1) + [0.1]})
    assert r.status_code == 200, r.text
    assert r.json()["shape"] == [MAX_ROWS, 1, 8, 8]


# Bad input: always a 4xx with a detail that says what is wrong, never a 500 -----------------------------


def _raw(params: Any = PARAMS, times: Any = TIMES, **extra: Any) -> bytes:
    return json.dumps({"params": params, "times": times, **extra}).encode()


_P_NAN = b'{"u0": NaN, "t_left": 200, "t_right": 400, "t_bottom": 100, "t_top": 500}'
_P_OK = json.dumps(PARAMS).encode()

BAD_JSON = [
    ("missing-param", _raw({k: v for k, v in PARAMS.items() if k != "t_top"}), "missing parameter(s): t_top"),
    ("unknown-param", _raw(PARAMS | {"alpha": 1.0}), "unknown parameter(s): alpha"),
    ("above-bounds", _raw(PARAMS | {"u0": 600.0}), "u0 = 600 is outside [100, 500]"),
    ("below-bounds", _raw(PARAMS | {"t_top": 99.5}), "t_top = 99.5 is outside [100, 500]"),
    ("late-time", _raw(times=[0.0, 0.2]), "t = 0.2 is outside [0, 0.1]"),
    ("negative-time", _raw(times=[-0.01]), "outside [0, 0.1]"),
    ("nan-param", b'{"params": ' + _P_NAN + b', "times": [0.0]}', "params.u0: Input should be a finite number"),
    ("inf-time", b'{"params": ' + _P_OK + b', "times": [0.0, Infinity]}', "times.1: Input should be a finite number"),
    ("neg-inf-time", b'{"params": ' + _P_OK + b', "times": [-Infinity]}', "finite"),
    ("overflow", b'{"params": ' + _P_OK.replace(b"300.0", b"1e999") + b', "times": [0.0]}', "finite"),
    ("empty-times", _raw(times=[]), "times"),
    ("times-scalar", _raw(times=0.05), "times"),
    ("times-missing", json.dumps({"params": PARAMS}).encode(), "times"),
    ("params-list", _raw(params=[300, 200, 400, 100, 500]), "params"),
    ("param-not-number", _raw(PARAMS | {"u0": "hot"}), "params.u0"),
    ("not-json", b"u0=300&t_left=200", "not valid JSON"),
    ("empty-body", b"", "not valid JSON"),
    ("not-utf8", b'{"params": "\xff\xfe"}', "not valid JSON"),
    ("array", json.dumps([PARAMS, TIMES]).encode(), "body"),
    ("number", b"42", "body"),
    ("extra-key", _raw(model="heat2d"), "model"),
    ("too-many-rows", _raw(times=[0.0] * (MAX_ROWS + 1)), f"at most {MAX_ROWS}"),
]


@pytest.mark.parametrize(("raw", "needle"), [c[1:] for c in BAD_JSON], ids=[c[0] for c in BAD_JSON])
def test_bad_json_is_422(client: TestClient, raw: bytes, needle: str) -> None:
    assert_error(predict(client, raw=raw, headers={"Content-Type": "application/json"}), 422, needle)


def test_deeply_nested_json_is_422(client: TestClient) -> None:
    raw = b"[" * 20_000 + b"]" * 20_000  # 40 kB, under the body limit
    assert_error(predict(client, raw=raw), 422)


def _npy_truncated() -> bytes:
    b = npy(rows_of(PARAMS, TIMES))
    return b[: len(b) - 20]


def _npy_lying_header() -> bytes:
    """A valid header announcing 10**13 rows, followed by the data of two."""
    buf = io.BytesIO()
    header = {"descr": "<f8", "fortran_order": False, "shape": (10**13, 6)}
    np.lib.format.write_array_header_1_0(buf, header)
    return buf.getvalue() + np.zeros((2, 6)).tobytes()


BAD_NPY = [
    ("too-few-cols", npy(np.full((3, 5), 200.0)), "[N, 6]"),
    ("too-many-cols", npy(np.full((3, 7), 200.0)), "[N, 6]"),
    ("1d", npy(rows_of(PARAMS, [0.0])[0]), "[N, 6]"),
    ("3d", npy(rows_of(PARAMS, [0.0])[:, :, None]), "[N, 6]"),
    ("no-rows", npy(np.zeros((0, 6))), "[N, 6]"),
    ("object", npy(np.array([{"u0": 1}], dtype=object), allow_pickle=True), "not a valid .npy"),
    ("strings", npy(np.full((1, 6), "300")), "dtype"),
    ("bool", npy(np.ones((1, 6), dtype=bool)), "dtype"),
    ("complex", npy(rows_of(PARAMS, [0.0]).astype(complex)), "dtype"),
    ("garbage", b"this is not an array", "not a valid .npy"),
    ("empty", b"", "not a valid .npy"),
    ("truncated", _npy_truncated(), "not a valid .npy"),
    ("lying-header", _npy_lying_header(), "not a valid .npy"),
    ("nan", npy(np.array([[300, 200, 400, 100, 500, np.nan]])), "t must be a finite number"),
    ("out-of-bounds", npy(np.array([[300, 200, 400, 100, 501, 0.0]])), "t_top = 501 is outside [100, 500]"),
    ("too-many-rows", npy(np.tile(rows_of(PARAMS, [0.0]), (MAX_ROWS + 1, 1))), f"at most {MAX_ROWS} rows"),
]


@pytest.mark.parametrize(("raw", "needle"), [c[1:] for c in BAD_NPY], ids=[c[0] for c in BAD_NPY])
def test_bad_npy_is_422(client: TestClient, raw: bytes, needle: str) -> None:
    r = predict(client, raw=raw, headers={"Content-Type": NPY, "Accept": NPY})
    assert_error(r, 422, needle)


def test_an_npz_archive_is_422_not_500(client: TestClient) -> None:
    # np.load reads a zip as an NpzFile, not an array: found by the conformance test's fuzzing.
    buf = io.BytesIO()
    np.savez(buf, a=rows_of(PARAMS, TIMES))
    assert_error(predict(client, raw=buf.getvalue(), headers={"content-type": NPY}), 422, "not a valid .npy")


def test_unsupported_content_type_is_415(client: TestClient) -> None:
    r = predict(client, raw=b"u0,t_left\n300,200\n", headers={"Content-Type": "text/csv"})
    assert assert_error(r, 415) == UNSUPPORTED_TYPE.format(ctype="text/csv")


def test_body_over_the_limit_is_413_with_content_length(client: TestClient) -> None:
    r = predict(client, raw=b" " * (MAX_BODY + 1))
    assert r.request.headers["content-length"] == str(MAX_BODY + 1)
    assert assert_error(r, 413) == BODY_TOO_LARGE.format(limit=MAX_BODY)
    # Exactly at the limit is read (and then refused for what it is, not for its size).
    assert_error(predict(client, raw=b" " * MAX_BODY), 422, "not valid JSON")


def test_body_over_the_limit_is_413_when_chunked(client: TestClient) -> None:
    def chunks() -> Iterator[bytes]:
        for _ in range(20):
            yield b" " * 4096

    r = predict(client, raw=chunks())
    assert "content-length" not in r.request.headers
    assert r.request.headers["transfer-encoding"] == "chunked"
    assert assert_error(r, 413) == BODY_TOO_LARGE.format(limit=MAX_BODY)


# Hot swap and in-flight safety --------------------------------------------------------------------------


def test_new_version_is_served_without_restart(live: tuple[TestClient, Path]) -> None:
    c, root = live
    v1 = predict(c)
    assert v1.headers["X-Model-Version"] == "1"
    assert publish(root, seed=2) == 2
    r = wait_for_version(c, 2, timeout=2.0)
    assert r.headers["X-Model-Version"] == "2" and r.json()["version"] == 2
    out = np.array(r.json()["outputs"])
    assert not np.allclose(out, np.array(v1.json()["outputs"]))
    np.testing.assert_allclose(out, direct(root, 2, rows_of(PARAMS, TIMES)), rtol=1e-5, atol=1e-5)
    assert c.get(f"/v1/models/{NAME}").json()["version"] == 2
    assert c.get("/v1/models").json()["models"][0]["version"] == 2


def test_a_pinned_version_keeps_answering_after_a_newer_one_is_served(live: tuple[TestClient, Path]) -> None:
    c, root = live
    assert publish(root, seed=2) == 2
    wait_for_version(c, 2, timeout=2.0)
    old = predict(c, params={"version": 1})
    assert old.status_code == 200 and old.headers["X-Model-Version"] == "1" and old.json()["version"] == 1
    np.testing.assert_allclose(
        np.array(old.json()["outputs"]), direct(root, 1, rows_of(PARAMS, TIMES)), rtol=1e-5, atol=1e-5
    )
    assert predict(c).headers["X-Model-Version"] == "2"  # unpinned: the newest
    assert predict(c, params={"version": 2}).headers["X-Model-Version"] == "2"
    assert_error(predict(c, params={"version": 7}), 404, "has no servable version 7")
    assert_error(predict(c, params={"version": 0}), 422, "query.version")
    assert_error(predict(c, params={"version": "one"}), 422, "query.version")


def _corrupt(root: Path, how: str) -> None:
    """Write version 3 of ``heat2d`` as a broken checkpoint (renamed into place, as a publisher would)."""
    src = root / NAME / "000002"
    tmp = root / NAME / ".tmp-corrupt"
    shutil.copytree(src, tmp)
    if how == "garbage-weights":
        (tmp / "weights.safetensors").write_bytes(b"\x00garbage" * 100)
    elif how == "missing-weights":
        (tmp / "weights.safetensors").unlink()
    elif how == "weights-of-another-model":
        torch.manual_seed(0)
        other = ModelStore(root / "other")
        other.publish("x", build_model("mlp", SPEC.in_features, 1, SPEC.grid, hidden=8, layers=2), CARD)
        shutil.copy(root / "other" / "x" / "000001" / "weights.safetensors", tmp / "weights.safetensors")
    elif how == "truncated-card":
        (tmp / "card.json").write_text((tmp / "card.json").read_text()[:50])
    elif how == "unknown-architecture":
        card = json.loads((tmp / "card.json").read_text())
        card["model"]["name"] = "transformer"
        (tmp / "card.json").write_text(json.dumps(card))
    tmp.rename(root / NAME / "000003")
    ModelStore(root).offer(NAME, 3)  # as publish does: no worse than version 2, so it is offered for serving


@pytest.mark.parametrize(
    "how", ["garbage-weights", "missing-weights", "weights-of-another-model", "truncated-card", "unknown-architecture"]
)
def test_corrupt_version_does_not_break_serving(live: tuple[TestClient, Path], how: str) -> None:
    c, root = live
    publish(root, seed=2)
    assert wait_for_version(c, 2).headers["X-Model-Version"] == "2"
    expected = direct(root, 2, rows_of(PARAMS, TIMES))
    _corrupt(root, how)
    assert ModelStore(root).latest(NAME) == 3
    deadline = time.monotonic() + 0.5  # several polls of the store
    while time.monotonic() < deadline:
        r = predict(c)
        assert r.status_code == 200, r.text
        assert r.headers["X-Model-Version"] == "2"
        np.testing.assert_allclose(np.array(r.json()["outputs"]), expected, rtol=1e-5, atol=1e-5)
        time.sleep(0.05)
    assert c.get(f"/v1/models/{NAME}").json()["version"] == 2
    assert c.get("/healthz").status_code == 200
    # The next good version is picked up as usual.
    assert publish(root, seed=4) == 4
    assert wait_for_version(c, 4).headers["X-Model-Version"] == "4"


def test_a_rejected_version_is_tried_again_later(live: tuple[TestClient, Path], monkeypatch) -> None:
    # The cause of a rejection may pass (a shared volume that had not synced every file yet).
    from services.gateway import hub as H

    c, root = live
    publish(root, seed=2)
    assert wait_for_version(c, 2).headers["X-Model-Version"] == "2"
    good = (root / NAME / "000002" / "weights.safetensors").read_bytes()
    _corrupt(root, "garbage-weights")
    time.sleep(0.4)  # several polls: rejected, version 2 still served
    assert predict(c).headers["X-Model-Version"] == "2"
    monkeypatch.setattr(H, "REJECTED_RETRY_S", 0.2)
    (root / NAME / "000003" / "weights.safetensors").write_bytes(good)  # the files are whole now
    assert wait_for_version(c, 3).headers["X-Model-Version"] == "3"


def _unservable(root: Path, how: str) -> None:
    """Write version 2 as a checkpoint that loads (weights fit the card) but cannot answer a prediction."""
    tmp = root / NAME / ".tmp-bad"
    if how == "card-without-normalisation":
        shutil.copytree(root / NAME / "000001", tmp)
        card = json.loads((tmp / "card.json").read_text())
        del card["normalisation"]
        (tmp / "card.json").write_text(json.dumps(card))
        tmp.rename(root / NAME / "000002")
        ModelStore(root).offer(NAME, 2)  # as publish does
    else:  # a model whose input width is not what the problem's encoding produces (e.g. an older encoding)
        width = SPEC.in_features - 1
        card = {**CARD, "model": {**CARD["model"], "in_channels": width}, "input_shape": [width]}
        ModelStore(root).publish(NAME, build_model("mlp", width, 1, SPEC.grid, **ARCH), card)


@pytest.mark.parametrize("how", ["card-without-normalisation", "input-width-mismatch"])
def test_unservable_version_does_not_replace_a_working_one(live: tuple[TestClient, Path], how: str) -> None:
    c, root = live
    _unservable(root, how)
    time.sleep(0.5)  # several polls of the store
    r = predict(c)
    assert r.status_code == 200, r.text
    assert r.headers["X-Model-Version"] == "1"


def test_swaps_never_mix_versions_within_a_request(live: tuple[TestClient, Path]) -> None:
    _, root = live
    n_threads = 20
    # Room for every thread: this test is about swaps, not load shedding.
    with make_client(root, predict_queue=n_threads) as c:
        stop = threading.Event()
        start = threading.Barrier(n_threads + 1)
        results: list[tuple[np.ndarray, int, int, Any]] = []
        lock = threading.Lock()

        def worker(i: int) -> None:
            params = PARAMS | {"u0": 100.0 + 20.0 * i}  # each thread its own input: crossed answers would show
            times = [0.0, 0.01 * (i % 10)]
            rows = rows_of(params, times)
            start.wait()
            for _ in range(50):
                r = predict(c, {"params": params, "times": times})
                with lock:
                    results.append((rows, r.status_code, int(r.headers.get("X-Model-Version", -1)), r.json()))
                if stop.is_set():
                    break

        threads = [threading.Thread(target=worker, args=(i,)) for i in range(n_threads)]
        for t in threads:
            t.start()
        start.wait()
        for seed in range(2, 8):
            time.sleep(0.12)  # a bit over one poll interval: most versions get served for a while
            publish(root, seed=seed)
        time.sleep(0.3)
        stop.set()
        for t in threads:
            t.join(30)

        assert len(results) >= n_threads
        assert all(code == 200 for _, code, _, _ in results), [b for _, code, _, b in results if code != 200][:3]
        seen = sorted({v for _, _, v, _ in results})
        assert len(seen) >= 2, seen  # the test did see swaps
        loaded = {v: ModelStore(root).load(NAME, v) for v in seen}
        for rows, _, version, body in results:
            assert body["version"] == version
            m = loaded[version]
            x = torch.from_numpy(SPEC.encode_inputs(rows[:, :-1], rows[:, -1]))
            with torch.no_grad():
                expected = m.normaliser.decode(m.model(x)).numpy()
            np.testing.assert_allclose(np.array(body["outputs"]), expected, rtol=1e-5, atol=1e-5)


# Studies without a Ray cluster ----------------------------------------------------------------------------

STUDY = {"name": "t", "solver": {"name": "heat2d"}}


def test_study_mutations_need_the_token_before_anything_else(client: TestClient) -> None:
    for r in (
        client.post("/v1/studies", json=STUDY),
        client.post("/v1/studies", json=STUDY, headers={"Authorization": "Bearer wrong"}),
        client.post("/v1/studies", json=STUDY, headers={"Authorization": f"Basic {TOKEN}"}),
        client.post("/v1/studies", json=STUDY, headers={"Authorization": "Bearer"}),
        client.delete("/v1/studies/xyz"),
        client.delete("/v1/studies/xyz", headers={"Authorization": "Bearer wrong"}),
        client.post("/v1/studies/xyz/resume"),
    ):
        # 401, not 503: an unauthenticated caller learns nothing about the backend.
        assert assert_error(r, 401) == TOKEN_MISSING
        assert r.headers["WWW-Authenticate"] == "Bearer"


def test_studies_answer_503_without_a_cluster(client: TestClient) -> None:
    for r in (
        client.post("/v1/studies", json=STUDY, headers=AUTH),
        client.post("/v1/studies", json=STUDY, headers={"Authorization": f"bearer {TOKEN}"}),
        client.delete("/v1/studies/xyz", headers=AUTH),
        client.post("/v1/studies/xyz/resume", headers=AUTH),
        client.get("/v1/studies"),
        client.get("/v1/studies/xyz"),
    ):
        assert assert_error(r, 503) == STUDIES_UNAVAILABLE


def test_study_mutations_are_disabled_without_a_configured_token(store_root: Path) -> None:
    with make_client(store_root, api_token=None) as c:
        for r in (
            c.post("/v1/studies", json=STUDY),
            c.post("/v1/studies", json=STUDY, headers=AUTH),
            c.delete("/v1/studies/xyz", headers=AUTH),
            c.post("/v1/studies/xyz/resume", headers=AUTH),
        ):
            assert assert_error(r, 403) == MUTATIONS_DISABLED
        assert c.get("/healthz").status_code == 200
        assert predict(c).status_code == 200  # serving is unaffected


# Bounded predictions -------------------------------------------------------------------------------------


def test_an_answer_above_the_output_limit_is_413_saying_how_to_split(store_root: Path) -> None:
    per_row = SPEC.grid[0] * SPEC.grid[1]  # one field on the grid
    with make_client(store_root, max_predict_values=10 * per_row) as c:
        times = [0.01 * i for i in range(11)]
        detail = assert_error(predict(c, {"params": PARAMS, "times": times}), 413, "split the request")
        assert f"{11 * per_row} output values" in detail and "at most 10 rows" in detail
        # .npy in, .npy out: the same limit, the same words.
        raw = npy(rows_of(PARAMS, times))
        r = predict(c, raw=raw, headers={"content-type": NPY, "accept": NPY})
        assert assert_error(r, 413) == detail
        # As many rows as it says are answered.
        assert predict(c, {"params": PARAMS, "times": times[:10]}).status_code == 200
    with make_client(store_root, max_predict_values=per_row - 1) as c:
        assert_error(predict(c), 413, f"one row of {NAME!r} predicts {per_row} values", "SURGE_MAX_PREDICT_VALUES")


def test_json_answers_hold_the_float32_values_of_the_npy_answer(client: TestClient) -> None:
    times = [0.0, 0.03, 0.1]
    js = predict(client, {"params": PARAMS, "times": times}).json()
    r = predict(client, raw=npy(rows_of(PARAMS, times)), headers={"content-type": NPY, "accept": NPY})
    y = np.load(io.BytesIO(r.content), allow_pickle=False)
    assert js["shape"] == list(y.shape) and js["version"] == 1 and js["model"] == NAME
    # Exactly, value for value: JSON carries each float32 in full (read back as float32).
    assert np.array_equal(np.asarray(js["outputs"], dtype=np.float32), y)


def test_a_gateway_at_its_prediction_limit_sheds_load_with_503_and_retry_after(store_root: Path) -> None:
    with make_client(store_root, predict_workers=1, predict_queue=0) as c:
        pool = c.app.state.predict_pool
        release = threading.Event()
        entered = threading.Event()
        real = pool.run

        async def held(fn, *args):  # the first prediction holds its worker until the test lets it go
            entered.set()
            await asyncio.to_thread(release.wait, 10)
            return await real(fn, *args)

        pool.run = held
        first: list[Any] = []
        t = threading.Thread(target=lambda: first.append(predict(c)))
        t.start()
        assert entered.wait(10)
        r = predict(c)
        assert_error(r, 503, "limit of 1 predictions running and 0 waiting")
        assert r.headers["Retry-After"] == "1"
        assert c.get("/healthz").status_code == 200  # the event loop is not held by predictions
        assert c.get(f"/v1/models/{NAME}").status_code == 200
        release.set()
        t.join(10)
        pool.run = real
        assert first[0].status_code == 200
        assert predict(c).status_code == 200  # the place is given back
        assert pool.admitted == 0
        codes = metric_samples(c)
        assert codes[("surge_predict_requests_total", frozenset({("model", "_unknown"), ("code", "503")}))] >= 1


def test_a_predict_token_guards_predictions_only(store_root: Path) -> None:
    with make_client(store_root, predict_token="p-token") as c:
        r = predict(c)
        assert assert_error(r, 401) == TOKEN_MISSING and r.headers["WWW-Authenticate"] == "Bearer"
        assert_error(predict(c, headers=AUTH), 401)  # the admin token is another scope
        assert predict(c, headers={"Authorization": "Bearer p-token"}).status_code == 200
        assert c.get(f"/v1/models/{NAME}").status_code == 200 and c.get("/healthz").status_code == 200


def test_tokens_are_read_from_files_named_in_the_environment(tmp_path: Path, monkeypatch) -> None:
    from services.auth import SecretError

    for k in ("SURGE_API_TOKEN", "SURGE_INGEST_TOKEN", "SURGE_PREDICT_TOKEN"):
        monkeypatch.delenv(k, raising=False)
    (tmp_path / "admin").write_text("from-a-file\n")
    monkeypatch.setenv("SURGE_API_TOKEN_FILE", str(tmp_path / "admin"))
    monkeypatch.setenv("SURGE_INGEST_TOKEN", "ingest-env")
    s = GatewaySettings.from_env()
    assert (s.api_token, s.ingest_token, s.predict_token) == ("from-a-file", "ingest-env", None)
    (tmp_path / "empty").write_text("  \n")
    monkeypatch.setenv("SURGE_PREDICT_TOKEN_FILE", str(tmp_path / "empty"))
    with pytest.raises(SecretError, match=r"SURGE_PREDICT_TOKEN_FILE=.*empty"):
        GatewaySettings.from_env()
    monkeypatch.setenv("SURGE_PREDICT_TOKEN_FILE", str(tmp_path / "missing"))
    with pytest.raises(SecretError, match="cannot read the token file"):
        GatewaySettings.from_env()


# Promotion --------------------------------------------------------------------------------------------------


def test_a_worse_version_is_listed_but_not_served_until_promoted(live: tuple[TestClient, Path]) -> None:
    c, root = live
    store = ModelStore(root)
    torch.manual_seed(9)
    worse = {**CARD, "validation_error": 0.5, "study_id": "rerun"}
    assert store.publish(NAME, build_model("mlp", SPEC.in_features, 1, SPEC.grid, **ARCH), worse) == 2
    time.sleep(0.4)  # several polls of the store
    assert predict(c).headers["X-Model-Version"] == "1"
    listing = c.get(f"/v1/models/{NAME}/versions").json()
    assert listing["served"] == 1
    assert [(v["version"], v["study_id"], v["validation_error"], v["served"]) for v in listing["versions"]] == [
        (1, "s1", 0.1, True),
        (2, "rerun", 0.5, False),
    ]
    assert predict(c, params={"version": 2}).headers["X-Model-Version"] == "2"  # pinned, it answers
    # Promotion needs the admin token, a version that exists and a well-formed body.
    assert_error(c.post(f"/v1/models/{NAME}/promote", json={"version": 2}), 401)
    assert_error(c.post(f"/v1/models/{NAME}/promote", json={"version": 7}, headers=AUTH), 404, "no servable version 7")
    assert_error(c.post(f"/v1/models/{NAME}/promote", json={"version": "two"}, headers=AUTH), 422, "version")
    assert_error(c.post(f"/v1/models/{NAME}/promote", json={"version": 2, "x": 1}, headers=AUTH), 422)
    assert_error(c.post("/v1/models/nope/promote", json={"version": 1}, headers=AUTH), 404)
    r = c.post(f"/v1/models/{NAME}/promote", json={"version": 2}, headers=AUTH)
    assert r.status_code == 200 and r.json() == {"name": NAME, "served": 2, "previous": 1}
    assert predict(c).headers["X-Model-Version"] == "2"  # at once on this gateway
    assert c.get(f"/v1/models/{NAME}").json()["version"] == 2
    assert c.get(f"/v1/models/{NAME}/versions").json()["served"] == 2
    assert_error(c.get("/v1/models/nope/versions"), 404)


# The OpenAPI document and 405s --------------------------------------------------------------------------

METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "TRACE")
# Every answer of every operation, as the routes can give them (the e2e conformance test fuzzes the rest).
ANSWERS = {
    ("get", "/v1/models"): {"200"},
    ("get", "/v1/models/{name}"): {"200", "404"},
    ("get", "/v1/models/{name}/versions"): {"200", "404"},
    ("post", "/v1/models/{name}/promote"): {"200", "401", "403", "404", "413", "415", "422"},
    ("post", "/v1/models/{name}/predict"): {"200", "401", "404", "413", "415", "422", "500", "502", "503", "504"},
    ("get", "/v1/studies"): {"200", "503"},
    ("post", "/v1/studies"): {"201", "401", "403", "409", "413", "415", "422", "503"},
    ("get", "/v1/studies/{study_id}"): {"200", "404", "503"},
    ("delete", "/v1/studies/{study_id}"): {"202", "401", "403", "404", "503"},
    ("post", "/v1/studies/{study_id}/resume"): {"202", "401", "403", "404", "409", "503"},
    ("get", "/healthz"): {"200"},
    ("get", "/metrics"): {"200"},
}


def test_every_405_allows_exactly_the_methods_the_document_declares_for_its_path(client: TestClient) -> None:
    paths = client.get("/openapi.json").json()["paths"]
    assert len(paths) == 10
    for template, operations in paths.items():
        url = template.replace("{name}", NAME).replace("{study_id}", "xyz")
        declared = {m.upper() for m in operations}
        for method in METHODS:
            r = client.request(method, url)
            if method in declared:
                assert r.status_code != 405, (method, url)
            else:
                # HEAD is not served for GET routes (FastAPI routes answer their own methods only).
                assert r.status_code == 405, (method, url, r.status_code)
                assert set(r.headers["Allow"].split(", ")) == declared, (method, url, r.headers["Allow"])
                if method != "HEAD":  # an answer to HEAD has no body
                    assert r.json() == {"detail": "Method Not Allowed"}


def test_the_document_declares_every_answer_of_every_route(client: TestClient) -> None:
    doc = client.get("/openapi.json").json()
    declared = {(m, p): set(op["responses"]) for p, ops in doc["paths"].items() for m, op in ops.items()}
    assert declared == ANSWERS
    error = {"$ref": "#/components/schemas/ErrorPublic"}
    for (method, path), codes in ANSWERS.items():
        op = doc["paths"][path][method]
        for code in codes - {"200", "201", "202"}:
            assert op["responses"][code]["content"]["application/json"]["schema"] == error, (method, path, code)
            assert op["responses"][code]["description"], (method, path, code)
        if "401" in codes:
            assert op["responses"]["401"]["headers"]["WWW-Authenticate"]["required"] is True
            assert op["security"] in ([{"adminToken": []}], [{}, {"predictToken": []}])
        else:
            assert "security" not in op, (method, path)
    # FastAPI's own validation-error body is never sent: the gateway answers {"detail": str}.
    assert "HTTPValidationError" not in json.dumps(doc)
    predict_op = doc["paths"]["/v1/models/{name}/predict"]["post"]
    ok = predict_op["responses"]["200"]
    assert set(ok["content"]) == {"application/json", NPY}
    assert set(ok["headers"]) == {
        "X-Model-Name",
        "X-Model-Version",
        "X-Model-Ensemble",
        "X-Prediction-Source",
        "X-Simulation-Id",
    }
    assert "required" not in ok["headers"]["X-Model-Ensemble"]  # only an ensemble's answer has it
    assert predict_op["responses"]["503"]["headers"]["Retry-After"]["required"] is True
    body = predict_op["requestBody"]
    assert body["required"] is True and set(body["content"]) == {"application/json", NPY}
    forms = body["content"]["application/json"]["schema"]["anyOf"]
    assert [f["required"] for f in forms] == [["params", "times"], ["inputs"]]
    assert [p["name"] for p in predict_op["parameters"] if p["required"]] == ["name"]
    promote_body = doc["paths"]["/v1/models/{name}/promote"]["post"]["requestBody"]
    assert promote_body["required"] is True
    assert promote_body["content"]["application/json"]["schema"]["required"] == ["version"]
    study_body = doc["paths"]["/v1/studies"]["post"]["requestBody"]
    assert study_body["required"] is False and "application/yaml" in study_body["content"]  # empty: the default
    assert "$ref" not in json.dumps(study_body)  # written in place: a $defs reference would point nowhere
    assert set(doc["paths"]["/metrics"]["get"]["responses"]["200"]["content"]) == {"text/plain"}


def test_predictions_require_a_token_in_the_document_only_when_the_gateway_has_one(store_root: Path) -> None:
    with make_client(store_root, predict_token="p-token") as c:
        op = c.get("/openapi.json").json()["paths"]["/v1/models/{name}/predict"]["post"]
        assert op["security"] == [{"predictToken": []}]
    with make_client(store_root) as c:
        op = c.get("/openapi.json").json()["paths"]["/v1/models/{name}/predict"]["post"]
        assert op["security"] == [{}, {"predictToken": []}]  # open: a token is not needed


def test_promotion_checks_the_token_before_it_reads_the_body_and_bounds_the_body(client: TestClient) -> None:
    url = f"/v1/models/{NAME}/promote"
    for r in (
        client.post(url, content=b"{not json", headers={"Content-Type": "application/json"}),
        client.post(url, content=b"$\xff\x0b", headers={"Content-Type": "text/csv"}),
        client.post(url, content=b" " * (MAX_BODY + 1)),
    ):
        assert assert_error(r, 401) == TOKEN_MISSING
    assert_error(client.post(url, content=b"{not json", headers=AUTH), 422, "body: Invalid JSON")
    assert_error(client.post(url, content=b"$\xff\x0b", headers=AUTH), 422, "body: Invalid JSON")
    assert_error(client.post(url, content=b"", headers=AUTH), 422, "body: Invalid JSON")
    assert_error(client.post(url, json=[1], headers=AUTH), 422, "body: Input should be an object")
    r = client.post(url, content=b'{"version": 1}', headers={**AUTH, "Content-Type": "text/csv"})
    assert assert_error(r, 415) == JSON_ONLY.format(ctype="text/csv")
    r = client.post(url, content=b" " * (MAX_BODY + 1), headers=AUTH)
    assert assert_error(r, 413) == BODY_TOO_LARGE.format(limit=MAX_BODY)
    # Without a Content-Type the body is read as JSON, like a prediction's.
    r = client.post(url, content=b'{"version": 1}', headers=AUTH)
    assert r.status_code == 200 and r.json() == {"name": NAME, "served": 1, "previous": 1}
