"""The cluster topology for real, without containers: what docker compose and Helm run, on loopback.

A Ray head and a second Ray node (``deploy/entrypoint.sh ray-head`` / ``ray-worker``), the gateway
(``deploy/entrypoint.sh gateway``) submitting studies as Ray jobs, and a real Prometheus scraping
them with ``deploy/prometheus/prometheus.yml``. A study submitted through the gateway must run on
both nodes and be served, and every metric that a dashboard panel queries must have series.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.deploy.promql import dashboard_exprs, metric_names

ROOT = Path(__file__).resolve().parents[2]
ENTRYPOINT = ROOT / "deploy" / "entrypoint.sh"
DASHBOARDS = sorted((ROOT / "deploy" / "grafana" / "dashboards").glob("*.json"))
API_TOKEN = secrets.token_urlsafe(16)

pytestmark = pytest.mark.slow

STUDY = {
    "name": "cluster",
    "problem": {"solver": "heat2d", "config": {"n": 16, "steps": 20, "dt": 0.05}},
    "simulations": 100_000,
    "solvers": {"actors": 2, "sims_per_call": 8, "chunk_steps": 5, "num_cpus": 1},
    "buffer": {"policy": "firo", "capacity": 2000, "watermark": 200},
    "training": {
        "model": "mlp",
        "arch": {"hidden": 64, "layers": 2},
        "batch_size": 32,
        "steps": 100_000,
        "validate_every": 50,
        "validation_simulations": 4,
    },
}


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Procs:
    """Processes this test starts, each in its own process group, all stopped at the end."""

    def __init__(self, logs: Path) -> None:
        self.logs = logs
        self.procs: list[tuple[str, subprocess.Popen]] = []

    def start(self, name: str, cmd: list[str], env: dict[str, str]) -> subprocess.Popen:
        log = open(self.logs / f"{name}.log", "wb")
        p = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        self.procs.append((name, p))
        return p

    def forget(self, name: str) -> None:
        self.procs = [(n, p) for n, p in self.procs if n != name]

    def exited(self, name: str) -> bool:
        return any(n == name and p.poll() is not None for n, p in self.procs)

    def tail(self, name: str, n: int = 30) -> str:
        lines = (self.logs / f"{name}.log").read_text(errors="replace").splitlines()
        return "\n".join(lines[-n:])

    def stop(self) -> None:
        # Gateway and Prometheus first, Ray workers before the head; `ray start --block` stops its node on SIGTERM.
        for _, p in reversed(self.procs):
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGTERM)
                try:
                    p.wait(30)
                except subprocess.TimeoutExpired:
                    pass
            # Ray's agents may outlive their node's SIGTERM: nothing of this group survives the test.
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            p.wait(10)


def _wait(what: str, check, timeout: float, procs: Procs, log: str):
    deadline = time.time() + timeout
    last = None
    while time.time() < deadline:
        try:
            last = check()
            if last:
                return last
        except (httpx.HTTPError, OSError, ValueError) as e:
            last = e
        if procs.exited(log):
            pytest.fail(f"{log} exited while waiting for {what}\n--- {log} log ---\n{procs.tail(log)}")
        time.sleep(1)
    pytest.fail(f"{what} not within {timeout} s (last: {last!r})\n--- {log} log ---\n{procs.tail(log)}")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory) -> Iterator[dict]:
    prometheus = shutil.which("prometheus")
    if prometheus is None:
        pytest.skip("prometheus is not installed (Debian package `prometheus`; .ci/run installs it)")
    tmp = tmp_path_factory.mktemp("cluster")
    store = tmp / "models"
    store.mkdir()
    names = (
        "gcs",
        "dashboard",
        "client",
        "head_metrics",
        "worker_metrics",
        "head_agent",
        "worker_agent",
        "gateway",
        "prometheus",
    )
    ports = {k: _port() for k in names}
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN": secrets.token_hex(16),
        "RAY_USAGE_STATS_ENABLED": "0",
        "RAY_ADDRESS": "",
    }
    procs = Procs(tmp)
    ray_tmp = tempfile.mkdtemp(prefix="surge-ray-", dir="/tmp")
    try:
        head_env = {
            **env,
            "RAY_GCS_PORT": str(ports["gcs"]),
            "RAY_DASHBOARD_PORT": str(ports["dashboard"]),
            "RAY_METRICS_PORT": str(ports["head_metrics"]),
            "RAY_NUM_CPUS": "1",
            "RAY_NODE_IP": "127.0.0.1",
            # Ray's unix sockets live under its temp dir and their paths may not exceed 107 bytes.
            "RAY_TEMP_DIR": ray_tmp,
        }
        # Extra arguments pass through to `ray start`: free ports for Ray's client server and each node's
        # dashboard agent, which compose and Helm leave at their defaults (one node per container there; here
        # both nodes, and any other Ray on this machine, share loopback, and a node whose agent cannot bind
        # its port accepts no jobs).
        head_cmd = [
            "bash",
            str(ENTRYPOINT),
            "ray-head",
            f"--ray-client-server-port={ports['client']}",
            f"--dashboard-agent-listen-port={ports['head_agent']}",
        ]
        jobs = f"http://127.0.0.1:{ports['dashboard']}"
        headers = {"Authorization": f"Bearer {env['RAY_AUTH_TOKEN']}"}
        for attempt in range(2):
            # On a loaded machine Ray's client server can give up waiting for the head's raylet and take the
            # whole node down with it; a second start then comes up.
            procs.start("ray-head", head_cmd, head_env)
            try:
                _wait(
                    "the head's job API",
                    lambda: httpx.get(f"{jobs}/api/version", headers=headers).status_code == 200,
                    180,
                    procs,
                    "ray-head",
                )
                break
            except pytest.fail.Exception:
                if attempt == 1 or not procs.exited("ray-head"):
                    raise
                procs.forget("ray-head")
        worker_env = {
            **env,
            "RAY_HEAD_ADDRESS": f"127.0.0.1:{ports['gcs']}",
            "RAY_METRICS_PORT": str(ports["worker_metrics"]),
            "RAY_NUM_CPUS": "2",
            "RAY_NODE_IP": "127.0.0.1",
        }
        procs.start(
            "ray-worker",
            ["bash", str(ENTRYPOINT), "ray-worker", f"--dashboard-agent-listen-port={ports['worker_agent']}"],
            worker_env,
        )

        def two_nodes() -> bool:
            nodes = httpx.get(f"{jobs}/nodes?view=summary", headers=headers).json()["data"]["summary"]
            return sum(n["raylet"]["state"] == "ALIVE" for n in nodes) == 2

        _wait("the worker node to join", two_nodes, 120, procs, "ray-worker")
        gw_env = {
            **env,
            "SURGE_HOST": "127.0.0.1",
            "SURGE_PORT": str(ports["gateway"]),
            "SURGE_STORE": str(store),
            "SURGE_API_TOKEN": API_TOKEN,
            "SURGE_RAY_JOBS_ADDRESS": jobs,
        }
        procs.start("gateway", ["bash", str(ENTRYPOINT), "gateway"], gw_env)
        gateway = f"http://127.0.0.1:{ports['gateway']}"
        _wait("the gateway", lambda: httpx.get(f"{gateway}/healthz").status_code == 200, 60, procs, "gateway")
        # Prometheus with the deployment's own config; this test supplies the loopback targets.
        prom_dir = tmp / "prometheus"
        (prom_dir / "targets").mkdir(parents=True)
        shutil.copy(ROOT / "deploy" / "prometheus" / "prometheus.yml", prom_dir / "prometheus.yml")
        (prom_dir / "targets" / "gateway-test.json").write_text(
            json.dumps([{"targets": [f"127.0.0.1:{ports['gateway']}"]}])
        )
        (prom_dir / "targets" / "ray-test.json").write_text(
            json.dumps([{"targets": [f"127.0.0.1:{ports['head_metrics']}", f"127.0.0.1:{ports['worker_metrics']}"]}])
        )
        prom_url = f"http://127.0.0.1:{ports['prometheus']}"
        procs.start(
            "prometheus",
            [
                prometheus,
                f"--config.file={prom_dir / 'prometheus.yml'}",
                f"--storage.tsdb.path={prom_dir / 'data'}",
                f"--web.listen-address=127.0.0.1:{ports['prometheus']}",
            ],
            env,
        )
        _wait("Prometheus", lambda: httpx.get(f"{prom_url}/-/ready").status_code == 200, 60, procs, "prometheus")
        yield {"gateway": gateway, "prometheus": prom_url, "procs": procs, "jobs": jobs, "ray_headers": headers}
    finally:
        procs.stop()
        shutil.rmtree(ray_tmp, ignore_errors=True)


@pytest.fixture(scope="module")
def study(cluster) -> dict:
    gw, procs = cluster["gateway"], cluster["procs"]
    r = httpx.post(f"{gw}/v1/studies", json=STUDY, headers={"Authorization": f"Bearer {API_TOKEN}"}, timeout=120)
    assert r.status_code == 201, r.text
    sid = r.json()["id"]

    def trained():
        snap = httpx.get(f"{gw}/v1/studies/{sid}", timeout=60).json()
        assert snap["state"] in ("starting", "running"), snap
        return snap if snap["training"]["version"] and snap["training"]["step"] >= 100 else None

    return _wait("a trained model", trained, 240, procs, "gateway")


def test_study_runs_on_both_nodes_and_is_served(cluster, study) -> None:
    nodes = json.loads(httpx.get(f"{cluster['jobs']}/nodes?view=summary", headers=cluster["ray_headers"]).text)["data"][
        "summary"
    ]
    alive = {n["raylet"]["nodeId"] for n in nodes if n["raylet"]["state"] == "ALIVE"}
    assert len(alive) == 2
    used = set(study["nodes"]["solvers"]) | set(study["nodes"]["trainers"])
    assert used == alive, (used, alive)
    r = httpx.post(
        f"{cluster['gateway']}/v1/models/heat2d/predict",
        json={"params": {"u0": 300, "t_left": 100, "t_right": 500, "t_bottom": 200, "t_top": 400}, "times": [0.5]},
    )
    assert r.status_code == 200, r.text
    assert r.json()["shape"] == [1, 1, 16, 16]


def test_every_dashboard_metric_has_series(cluster, study) -> None:
    assert DASHBOARDS, "no dashboards in deploy/grafana/dashboards"
    names = sorted({m for d in DASHBOARDS for _, expr in dashboard_exprs(d) for m in metric_names(expr)})
    assert names
    prom = cluster["prometheus"]

    def missing() -> list[str] | None:
        # A failed predict gives the error-rate panels their series too.
        httpx.post(f"{cluster['gateway']}/v1/models/heat2d/predict", json={"params": {}, "times": [0.0]})
        # A fallback asked of a single model (a 422) gives the fallback panel its series.
        httpx.post(
            f"{cluster['gateway']}/v1/models/heat2d/predict?fallback=solve&max_std=1",
            json={"params": {"u0": 300, "t_left": 100, "t_right": 500, "t_bottom": 200, "t_top": 400}, "times": [0.5]},
        )
        out = [n for n in names if not httpx.get(f"{prom}/api/v1/query", params={"query": n}).json()["data"]["result"]]
        return out or None

    deadline = time.time() + 90
    gaps = missing()
    while gaps and time.time() < deadline:
        time.sleep(3)
        gaps = missing()
    assert not gaps, f"dashboard metrics without series: {gaps}"


def test_deleting_the_study_publishes_a_last_version_and_resume_runs_a_new_job(cluster, study) -> None:
    gw, procs = cluster["gateway"], cluster["procs"]
    auth = {"Authorization": f"Bearer {API_TOKEN}"}
    sid = study["id"]
    r = httpx.delete(f"{gw}/v1/studies/{sid}", headers=auth, timeout=60)
    assert r.status_code == 202, r.text

    def ended():
        snap = httpx.get(f"{gw}/v1/studies/{sid}", timeout=60).json()
        return snap if snap["state"] in ("stopped", "finished", "failed") else None

    snap = _wait("the study to stop", ended, 90, procs, "gateway")
    assert snap["state"] == "stopped", snap
    # The job's driver had the grace period (not Ray's 3 s) to publish a last version, at its last step.
    stopped_at = snap["training"]["step"]
    card = _wait(
        "the last version to be published",
        lambda: (
            (c := httpx.get(f"{gw}/v1/models/heat2d/versions", timeout=30).json()["versions"][-1])["train_steps"]
            == stopped_at
            and c
        ),
        30,
        procs,
        "gateway",
    )
    assert card["study_id"] == sid and card["version"] == snap["training"]["version"]
    # Resume: a new Ray job goes on with the same study, from that checkpoint.
    r = httpx.post(f"{gw}/v1/studies/{sid}/resume", headers=auth, timeout=120)
    assert r.status_code == 202, r.text

    def resumed():
        s = httpx.get(f"{gw}/v1/studies/{sid}", timeout=60).json()
        assert s["state"] in ("starting", "running", "stopped"), s
        tr = s["training"]
        return s if s["state"] == "running" and tr["resumed_at"] and tr["step"] > stopped_at else None

    again = _wait("the resumed study to train on", resumed, 180, procs, "gateway")
    assert again["training"]["resumed_at"] == [stopped_at]
    assert [s["id"] for s in httpx.get(f"{gw}/v1/studies").json()["studies"]].count(sid) == 1
    r = httpx.post(f"{gw}/v1/studies/{sid}/resume", headers=auth, timeout=60)
    assert r.status_code == 409, r.text
    assert httpx.delete(f"{gw}/v1/studies/{sid}", headers=auth, timeout=60).status_code == 202
    assert _wait("the resumed study to stop", ended, 90, procs, "gateway")["state"] == "stopped"
