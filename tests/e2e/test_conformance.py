"""Conformance: Schemathesis against a real ``surge serve`` that serves a model, with both tokens set.

The gateway's OpenAPI document must describe every answer it gives: statuses, bodies, content types,
headers (``Allow`` on 405, ``WWW-Authenticate`` on 401), and its security requirements. Schemathesis
(every check, a fixed seed) generates requests from the document twice: once holding the right token
of each scope (found by security scheme), once holding none (so every protected route answers 401).
Random data cannot find a model's parameter box, so the happy paths (a prediction as JSON and as
``.npy``, a pinned version, a promotion) are sent as hand-made cases and checked by the same checks.
No Ray: the study routes answer 503, as a gateway without a cluster does.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import schemathesis

from tests.e2e.serve import publish_mlp, surge_serve

NAME = "heat2d"
SOLVER_CFG = {"n": 8, "steps": 10, "dt": 0.01}
PARAMS = {"u0": 300.0, "t_left": 200.0, "t_right": 400.0, "t_bottom": 100.0, "t_top": 500.0}
ADMIN_TOKEN, PREDICT_TOKEN = "conformance-admin", "conformance-predict"
NPY = "application/x-npy"
SEED = 20240611
MIN_CASES = 1000
# Examples per operation (12 operations, four phases): about 2300 cases with the tokens (20 s on two
# cores) and 1200 without (10 s).
RUNS = {"with-tokens": 100, "anonymous": 25}
RUN_TIMEOUT_S = 120  # one run's wall clock at most: both runs stay inside pytest's 300 s per test

# The defaults of both checks, plus what this gateway answers by design (each documented in its OpenAPI).
NOT_A_SERVER_ERROR = ["2xx", "3xx", "4xx"]
POSITIVE_ACCEPTED = ["2xx", "3xx", "401", "403", "404", "409", "429", "5xx"]
CONFIG = f"""
[[operations]]
include-tag = "studies"
# Without a Ray cluster every study route answers 503 (documented): that is the gateway working, not failing.
checks.not_a_server_error.expected-statuses = {json.dumps([*NOT_A_SERVER_ERROR, "503"])}

[[operations]]
include-path = "/v1/models/{{name}}/predict"
# The parameter names and their box are the model's own (its card at GET /v1/models/{{name}}): one document
# for every model cannot state them, so a body valid by the document is refused with 422 by the model.
checks.positive_data_acceptance.expected-statuses = {json.dumps([*POSITIVE_ACCEPTED, "422"])}
"""
AUTH = f"""
# Each scope's token, by the security scheme the document names it with.
[auth.openapi.adminToken]
bearer = "{ADMIN_TOKEN}"

[auth.openapi.predictToken]
bearer = "{PREDICT_TOKEN}"
"""
# Schemathesis sends the body of a binary media type as the bytes it generated: so for .npy too.
HOOKS = 'import schemathesis\n\nschemathesis.serializer.alias("application/x-npy", "application/octet-stream")\n'


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    root = tmp_path_factory.mktemp("conformance") / "store"
    publish_mlp(root, NAME, SOLVER_CFG, {"hidden": 16, "layers": 1})
    with surge_serve(root, SURGE_API_TOKEN=ADMIN_TOKEN, SURGE_PREDICT_TOKEN=PREDICT_TOKEN) as (url, _):
        yield url


def run_schemathesis(url: str, workdir: Path, *, tokens: bool, max_examples: int) -> tuple[dict, str]:
    """One ``schemathesis run`` (every check, phase and operation); its JSON report and its output."""
    workdir.mkdir()
    (workdir / "schemathesis.toml").write_text(CONFIG + (AUTH if tokens else ""))
    (workdir / "hooks.py").write_text(HOOKS)
    report = workdir / "report.json"
    cmd = [
        *(sys.executable, "-m", "schemathesis.cli", "--config-file", str(workdir / "schemathesis.toml")),
        *("run", f"{url}/openapi.json", "--checks", "all", "--continue-on-failure"),
        *("--max-examples", str(max_examples), "--seed", str(SEED), "--workers", "1"),
        *("--request-timeout", "10", "--generation-database", "none", "--no-color"),
        *("--report", "json", "--report-json-path", str(report)),
    ]
    env = os.environ | {"SCHEMATHESIS_HOOKS": str(workdir / "hooks.py"), "NO_PROXY": "127.0.0.1"}
    # cwd: the run writes nothing into the checkout.
    out = subprocess.run(cmd, cwd=workdir, env=env, capture_output=True, text=True, timeout=RUN_TIMEOUT_S)
    assert report.exists(), out.stdout[-4000:] + out.stderr[-4000:]
    return json.loads(report.read_text()), out.stdout


def test_schemathesis_finds_no_failure_with_and_without_tokens(gateway: str, tmp_path: Path) -> None:
    total = 0
    for run, max_examples in RUNS.items():
        t0 = time.perf_counter()
        report, output = run_schemathesis(
            gateway, tmp_path / run, tokens=run == "with-tokens", max_examples=max_examples
        )
        cases = report["test_cases"]
        print(f"schemathesis {run}: {cases['generated']} cases in {time.perf_counter() - t0:.0f} s, {cases}")
        assert report["complete"] and report["operations"]["tested"] == report["operations"]["total"] == 12, report
        assert not report["failures"] and not report["errors"] and report["exit_code"] == 0, output[-12000:]
        total += cases["generated"]
    print(f"schemathesis: {total} cases in all")
    assert total >= MIN_CASES


def _npy(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=False)
    return buf.getvalue()


def test_the_answers_random_data_cannot_reach_conform(gateway: str) -> None:
    schemathesis.serializer.alias(NPY, "application/octet-stream")
    schema = schemathesis.openapi.from_url(f"{gateway}/openapi.json")
    predict = schema["/v1/models/{name}/predict"]["POST"]
    path = {"name": NAME}
    bearer = {"Authorization": f"Bearer {PREDICT_TOKEN}"}

    def predict_case(body: object, media_type: str = "application/json", **kw: object) -> schemathesis.Case:
        return predict.Case(path_parameters=path, body=body, media_type=media_type, **kw)

    rows = np.array([[*PARAMS.values(), t] for t in (0.0, 0.05)])
    admin = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    promote = schema["/v1/models/{name}/promote"]["POST"]
    cases = {
        "json": (predict_case({"params": PARAMS, "times": [0.0, 0.05]}, headers=bearer), 200),
        "pinned": (predict_case({"params": PARAMS, "times": [0.1]}, query={"version": 1}, headers=bearer), 200),
        "npy": (predict_case(_npy(rows), NPY, headers={**bearer, "Accept": NPY}), 200),
        "npy-refused": (predict_case(b"not an array", NPY, headers=bearer), 422),
        "no-token": (predict_case({"params": PARAMS, "times": [0.0]}), 401),
        "card": (schema["/v1/models/{name}"]["GET"].Case(path_parameters=path), 200),
        "versions": (schema["/v1/models/{name}/versions"]["GET"].Case(path_parameters=path), 200),
        "promote": (
            promote.Case(path_parameters=path, body={"version": 1}, media_type="application/json", headers=admin),
            200,
        ),
    }
    for label, (case, expected) in cases.items():
        response = case.call_and_validate()  # every check schemathesis has for one response
        assert response.status_code == expected, (label, response.status_code, response.text)
    assert response.json() == {"name": NAME, "served": 1, "previous": 1}  # the promotion changed nothing
