"""The deployment files, checked without running them: dashboards, Prometheus, Grafana, docker compose.

Fast (no Ray, no containers). ``test_cluster.py`` runs the same files for real.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from services import metrics as M
from tests.deploy.promql import dashboard_exprs, metric_names, panels, substitute_variables

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
COMPOSE = ROOT / "docker-compose.yml"
DASHBOARD_OVERRIDE = DEPLOY / "compose.ray-dashboard.yml"
PROMETHEUS = DEPLOY / "prometheus" / "prometheus.yml"
DASHBOARDS = sorted((DEPLOY / "grafana" / "dashboards").glob("*.json"))
DATASOURCE_UID = "prometheus"
COMPOSE_SECRETS = ("SURGE_API_TOKEN", "SURGE_INGEST_TOKEN", "RAY_AUTH_TOKEN", "GRAFANA_ADMIN_PASSWORD")
COMPOSE_OPTIONAL = ("SURGE_PREDICT_TOKEN",)

# Ray's own metrics the dashboards may use: each seen on Ray 2.60's metrics export port (head and
# worker nodes) while actors run, and each present without special events (no restart counters).
# test_cluster.py checks for real that every one has series in Prometheus during a study.
RAY_METRICS = {
    "ray_actors",
    "ray_cluster_active_nodes",
    "ray_gcs_actors_count",
    "ray_node_cpu_count",
    "ray_node_cpu_utilization",
    "ray_node_mem_total",
    "ray_node_mem_used",
    "ray_object_store_available_memory",
    "ray_object_store_memory",
    "ray_object_store_used_memory",
    "ray_resources",
    "ray_running_jobs",
    "ray_tasks",
}


def exported_surge_metrics(tmp: Path) -> set[str]:
    """Sample names the gateway exports: the prediction metrics and what StudyCollector yields for a study."""
    from prometheus_client import REGISTRY

    names = set()
    for fam in REGISTRY.collect():
        if not fam.name.startswith("surge_"):
            continue
        if fam.type == "counter":
            names.add(f"{fam.name}_total")
        elif fam.type == "histogram":
            names |= {f"{fam.name}_bucket", f"{fam.name}_sum", f"{fam.name}_count"}
        else:
            names.add(fam.name)
    # A running study's snapshot with every figure the collector reads.
    snap: dict = {"id": "s", "name": "s", "model_name": "m", "state": "running", "updated_at": time.time()}
    snap["simulations"] = {"done": 1}
    for _, _, path in (*M._COUNTERS, *M._GAUGES):
        d = snap
        for k in path[:-1]:
            d = d.setdefault(k, {})
        d[path[-1]] = 1.0
    (tmp / M.PROGRESS_DIR).mkdir()
    (tmp / M.PROGRESS_DIR / "s.json").write_text(json.dumps(snap))
    for fam in M.StudyCollector(tmp).collect():
        names |= {s.name for s in fam.samples}
    return names


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> set[str]:
    return exported_surge_metrics(tmp_path_factory.mktemp("store"))


def _load(path: Path) -> dict:
    return json.loads(path.read_text())


# ------------------------------------------------------------------------------------------ dashboards


def test_dashboards_exist() -> None:
    assert {p.name for p in DASHBOARDS} >= {"surge-pipeline.json", "surge-gateway.json", "ray-cluster.json"}


@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda p: p.name)
def test_dashboard_is_well_formed(path: Path) -> None:
    d = _load(path)
    assert d.get("uid") and d.get("title") and isinstance(d.get("schemaVersion"), int)
    ps = panels(d)
    ids = [p["id"] for p in ps]
    assert len(ids) == len(set(ids)), f"duplicate panel ids in {path.name}"
    cells: dict[tuple[int, int], str] = {}
    for p in d["panels"]:  # the visible layout (a collapsed row's panels lie under it only when expanded)
        g = p["gridPos"]
        for x in range(g["x"], g["x"] + g["w"]):
            for y in range(g["y"], g["y"] + g["h"]):
                assert (x, y) not in cells, f"{p['title']!r} overlaps {cells[(x, y)]!r} in {path.name}"
                cells[(x, y)] = p["title"]
    for p in ps:
        g = p["gridPos"]
        assert 0 <= g["x"] and g["x"] + g["w"] <= 24 and g["h"] > 0, (p["title"], g)
        if p["type"] == "row":
            continue
        assert p["datasource"]["uid"] == DATASOURCE_UID, p["title"]
        assert p.get("targets"), f"panel {p['title']!r} has no query"
        for t in p["targets"]:
            assert t["expr"].strip(), p["title"]
            assert t.get("datasource", {"uid": DATASOURCE_UID})["uid"] == DATASOURCE_UID, p["title"]
        refs = [t["refId"] for t in p["targets"]]
        assert len(refs) == len(set(refs)), p["title"]
    for v in d.get("templating", {}).get("list", []):
        if v.get("type") == "query":
            assert v["datasource"]["uid"] == DATASOURCE_UID, v["name"]


def test_dashboard_uids_are_unique() -> None:
    uids = [_load(p)["uid"] for p in DASHBOARDS]
    assert len(uids) == len(set(uids))


@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda p: p.name)
def test_every_query_reads_metrics_that_exist(path: Path, exported: set[str]) -> None:
    for title, expr in dashboard_exprs(path):
        names = metric_names(expr)
        assert names, f"{path.name} / {title}: {expr!r} reads no metric"
        for n in names:
            if n.startswith("surge_"):
                assert n in exported, f"{path.name} / {title}: {n} is not exported by services/metrics.py"
            else:
                assert n in RAY_METRICS, f"{path.name} / {title}: {n} is neither ours nor a known Ray 2.60 metric"


def test_every_exported_metric_is_on_a_dashboard(exported: set[str]) -> None:
    used = {n for p in DASHBOARDS for _, e in dashboard_exprs(p) for n in metric_names(e)}
    assert exported - used == set(), "exported but on no dashboard"


def test_every_dashboard_query_uses_only_defined_variables() -> None:
    builtin = {"__rate_interval", "__interval", "__range", "__interval_ms", "__range_s", "__all"}
    for path in DASHBOARDS:
        d = _load(path)
        defined = {v["name"] for v in d.get("templating", {}).get("list", [])} | builtin
        for title, expr in dashboard_exprs(path):
            for var in re.findall(r"\$\{?(\w+)", expr):
                assert var in defined, f"{path.name} / {title}: ${var} is not a dashboard variable"


# ------------------------------------------------------------------------------------------ promql helper


@pytest.mark.parametrize(
    ("expr", "names"),
    [
        ("surge_studies_running", {"surge_studies_running"}),
        ('sum by (study) (rate(surge_simulations_total{status="done"}[1m]))', {"surge_simulations_total"}),
        (
            "histogram_quantile(0.99, sum by (le, model) "
            '(rate(surge_predict_latency_seconds_bucket{model=~"$model"}[$__rate_interval])))',
            {"surge_predict_latency_seconds_bucket"},
        ),
        ("rate(a_total[1m]) / (rate(a_total[1m]) + rate(b_seconds_total[5m]))", {"a_total", "b_seconds_total"}),
        ('{__name__="up", job="x"}', {"up"}),
        # Names, brackets and functions inside label values are strings, not selectors.
        ('count(z{a="sum(rate(fake_total[1m]))", b="[\\"$x]", c=\'}\'})', {"z"}),
        ("sum without (instance, job) (x offset 5m) > bool 0", {"x"}),
        ("(sum(x) > 0) * on (a) group_left (b) y", {"x", "y"}),
        ("max_over_time(deriv(g[5m])[30m:${__interval}])", {"g"}),
        ("max_over_time(g[[[interval]]])", {"g"}),
        ("topk($n, sum by (code) (rate(r_total[$__range])))", {"r_total"}),
        ('label_replace(up, "dst", "$1", "src", "(.*)")', {"up"}),
        ("(sum(rate(e_total{code!~'2..'}[1m])) or vector(0)) / sum(rate(e_total[1m]))", {"e_total"}),
        ("time() - process_start_time_seconds", {"process_start_time_seconds"}),
        ("1 + 2 * 3", set()),
        ("label_values(surge_model_version, model)", {"surge_model_version"}),
        ('label_values(surge_model_version{model!="a,b"}, model)', {"surge_model_version"}),
        ("label_values(model)", set()),
        ("query_result(topk(5, w))", {"w"}),
    ],
)
def test_metric_names(expr: str, names: set[str]) -> None:
    assert metric_names(expr) == names


@pytest.mark.parametrize(
    "expr", ["sum(rate(x[1m])", '{__name__=~"surge_.*"}', '{job="a"}', "rate(x)", "x +", "sum by ($label) (x)"]
)
def test_metric_names_rejects_what_it_cannot_resolve(expr: str) -> None:
    with pytest.raises(ValueError):
        metric_names(expr)


def test_substitute_variables_leaves_strings_alone() -> None:
    assert substitute_variables('x{a="$v", b=~"${w:regex}"}[$__rate_interval] * $k') == (
        'x{a="$v", b=~"${w:regex}"}[1m] * 1'
    )


def test_dashboard_exprs_finds_nested_panels_and_variables(tmp_path: Path) -> None:
    d = {
        "panels": [
            {"type": "timeseries", "title": "top", "targets": [{"refId": "A", "expr": "a"}]},
            {
                "type": "row",
                "title": "r",
                "collapsed": True,
                "panels": [
                    {"type": "stat", "title": "inner", "targets": [{"refId": "A", "expr": "b"}, {"refId": "B"}]}
                ],
            },
        ],
        "templating": {
            "list": [
                {"name": "s", "type": "query", "query": {"query": "label_values(c, study)"}},
                {"name": "m", "type": "query", "query": "label_values(d, model)"},
                {"name": "i", "type": "interval", "query": "1m,5m"},
            ]
        },
    }
    f = tmp_path / "d.json"
    f.write_text(json.dumps(d))
    assert dashboard_exprs(f) == [
        ("top", "a"),
        ("inner", "b"),
        ("$s", "label_values(c, study)"),
        ("$m", "label_values(d, model)"),
    ]


# ------------------------------------------------------------------------------------------ Prometheus


def test_prometheus_config_passes_promtool() -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool is not installed (it comes with the Debian package `prometheus`)")
    r = subprocess.run([promtool, "check", "config", str(PROMETHEUS)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr


def test_prometheus_scrapes_the_gateway_and_every_ray_node() -> None:
    cfg = yaml.safe_load(PROMETHEUS.read_text())
    assert cfg["global"]["scrape_interval"] == "5s"
    jobs = {j["job_name"]: j for j in cfg["scrape_configs"]}
    assert set(jobs) == {"surge-gateway", "ray"}
    assert jobs["surge-gateway"].get("metrics_path", "/metrics") == "/metrics"
    compose = yaml.safe_load(COMPOSE.read_text())["services"]
    for job, target, port in (("surge-gateway", "gateway", 8000), ("ray", "ray-head", 8080)):
        globs = [g for sd in jobs[job]["file_sd_configs"] for g in sd["files"]]
        files = sorted({f for g in globs for f in PROMETHEUS.parent.glob(g)})
        assert [f.name for f in files] == [f"{target.split('-')[0]}-compose.json"], (job, globs)
        groups = json.loads(files[0].read_text())
        assert [t for g in groups for t in g["targets"]] == [f"{target}:{port}"]
        assert target in compose
    # The other job's target files must not match: a deployment's gateway file is no Ray node.
    gw_globs = jobs["surge-gateway"]["file_sd_configs"][0]["files"]
    ray_globs = jobs["ray"]["file_sd_configs"][0]["files"]
    assert not {f for g in gw_globs for f in PROMETHEUS.parent.glob(g)} & {
        f for g in ray_globs for f in PROMETHEUS.parent.glob(g)
    }
    # Scaled workers: Docker's DNS answers the service name with every replica.
    dns = jobs["ray"]["dns_sd_configs"]
    assert dns == [{"names": ["ray-worker"], "type": "A", "port": 8080, "refresh_interval": "15s"}]
    assert "ray-worker" in compose
    # The metrics port the entrypoint gives `ray start`.
    assert "RAY_METRICS_PORT:-8080" in (DEPLOY / "entrypoint.sh").read_text()


# ------------------------------------------------------------------------------------------ Grafana


def test_grafana_provisioning_matches_the_dashboards_and_compose() -> None:
    prov = DEPLOY / "grafana" / "provisioning"
    ds = yaml.safe_load((prov / "datasources" / "prometheus.yml").read_text())["datasources"]
    assert [(d["uid"], d["type"], d["url"], d["isDefault"]) for d in ds] == [
        (DATASOURCE_UID, "prometheus", "http://prometheus:9090", True)
    ]
    providers = yaml.safe_load((prov / "dashboards" / "surge.yml").read_text())["providers"]
    path = providers[0]["options"]["path"]
    grafana = yaml.safe_load(COMPOSE.read_text())["services"]["grafana"]
    assert f"./deploy/grafana/dashboards:{path}:ro" in grafana["volumes"]
    assert "./deploy/grafana/provisioning:/etc/grafana/provisioning:ro" in grafana["volumes"]
    home = grafana["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert (DEPLOY / "grafana" / "dashboards" / Path(home).relative_to(path)).is_file()


# ------------------------------------------------------------------------------------------ docker compose


def _entrypoint_roles() -> set[str]:
    text = (DEPLOY / "entrypoint.sh").read_text()
    case = text[text.index('case "$role" in') : text.index("esac")]
    return set(re.findall(r"^\s+([a-z][\w-]*)\)", case, re.M))


def test_compose_services_use_the_entrypoint_roles() -> None:
    roles = _entrypoint_roles()
    assert roles == {"ray-head", "ray-worker", "gateway"}
    services = yaml.safe_load(COMPOSE.read_text())["services"]
    ours = {name: s for name, s in services.items() if s.get("image", "").startswith("surge")}
    assert set(ours) == {"ray-head", "ray-worker", "gateway"}
    for name, s in ours.items():
        cmd = s["command"]
        role = (cmd if isinstance(cmd, list) else cmd.split())[0]
        assert role in roles, (name, role)
        assert role == name
        assert s["build"] == {"context": ".", "dockerfile": "deploy/Dockerfile"}
        assert "models:/models" in s["volumes"], name  # snapshots and checkpoints, shared by every node
        assert s["environment"]["RAY_AUTH_MODE"] == "token", name
    assert "ENTRYPOINT" in (DEPLOY / "Dockerfile").read_text()


def test_compose_workers_scale_and_secrets_have_no_default() -> None:
    text = COMPOSE.read_text()
    services = yaml.safe_load(text)["services"]
    worker = services["ray-worker"]
    assert "container_name" not in worker and "ports" not in worker  # `--scale ray-worker=N` works
    assert worker["environment"]["RAY_HEAD_ADDRESS"] == "ray-head:6379"
    assert worker["depends_on"]["ray-head"]["condition"] == "service_healthy"
    assert services["gateway"]["environment"]["SURGE_RAY_JOBS_ADDRESS"] == "http://ray-head:8265"
    for var in COMPOSE_SECRETS:
        assert re.search(rf"\$\{{{var}:\?", text), f"{var} must be required (${{{var}:?message}}), never defaulted"


def _compose_config(
    env: dict[str, str], tmp: Path, *overrides: Path, quiet: bool = True
) -> subprocess.CompletedProcess:
    exe = shutil.which("docker-compose")
    if exe is None:
        pytest.skip("docker-compose is not installed (Debian package `docker-compose`)")
    empty = tmp / "empty.env"  # keep a developer's .env out of the check
    empty.write_text("")
    secrets = (*COMPOSE_SECRETS, *COMPOSE_OPTIONAL)
    base = {k: v for k, v in os.environ.items() if k not in secrets and not k.startswith("COMPOSE_")}
    files = [arg for f in (COMPOSE, *overrides) for arg in ("-f", str(f))]
    return subprocess.run(
        [exe, "--env-file", str(empty), *files, "--project-directory", str(ROOT), "config", *(["-q"] * quiet)],
        env={**base, **env},
        capture_output=True,
        text=True,
        timeout=60,
    )


def _compose_services(tmp: Path, *overrides: Path, **env: str) -> dict[str, dict]:
    """The services as compose resolves them (files merged, variables substituted)."""
    r = _compose_config({**{v: f"{v.lower()}-value" for v in COMPOSE_SECRETS}, **env}, tmp, *overrides, quiet=False)
    assert r.returncode == 0, r.stderr
    return yaml.safe_load(r.stdout)["services"]


def _published(service: dict) -> list[tuple[str, int, int]]:
    """(host address, host port, container port) of each published port, in compose's short or long form."""
    out = []
    for port in service.get("ports", []):
        if isinstance(port, dict):
            if port.get("published") is not None:
                out.append((port.get("host_ip", "0.0.0.0"), int(port["published"]), int(port["target"])))
            continue
        *host, target = str(port).split("/")[0].split(":")
        if host:
            out.append((host[0] if len(host) == 2 else "0.0.0.0", int(host[-1]), int(target)))
    return out


def test_compose_config_is_valid_with_the_secrets(tmp_path: Path) -> None:
    r = _compose_config({v: "x" for v in COMPOSE_SECRETS}, tmp_path)
    assert r.returncode == 0, r.stderr
    r = _compose_config({v: "x" for v in COMPOSE_SECRETS}, tmp_path, DASHBOARD_OVERRIDE)
    assert r.returncode == 0, r.stderr


@pytest.mark.parametrize("missing", COMPOSE_SECRETS)
def test_compose_config_refuses_to_run_without_a_secret(missing: str, tmp_path: Path) -> None:
    r = _compose_config({v: "x" for v in COMPOSE_SECRETS if v != missing}, tmp_path)
    assert r.returncode != 0
    assert f"set {missing}" in r.stderr, r.stderr


def test_compose_publishes_the_job_api_only_with_the_override_and_on_loopback(tmp_path: Path) -> None:
    """Ray's job API runs whatever it is sent: the host gets it only when asked for, and only on 127.0.0.1."""
    services = _compose_services(tmp_path)
    assert "ports" not in services["ray-head"]  # the gateway reaches it over the compose network
    for name, service in services.items():
        assert 8265 not in {p for _, host, target in _published(service) for p in (host, target)}, name
    services = _compose_services(tmp_path, DASHBOARD_OVERRIDE)
    assert _published(services["ray-head"]) == [("127.0.0.1", 8265, 8265)]
    for name, service in services.items():
        if name != "ray-head":
            assert 8265 not in {host for _, host, _ in _published(service)}, name
    # The override changes nothing else of the head.
    base = _compose_services(tmp_path)
    services["ray-head"].pop("ports")
    assert set(services) == set(base) and services["ray-head"] == base["ray-head"]


def test_compose_ingest_token_goes_to_the_ray_nodes_only(tmp_path: Path) -> None:
    """Study drivers run on the Ray nodes and check external solvers with it; nothing else gets it."""
    services = _compose_services(tmp_path)
    token = "surge_ingest_token-value"
    have = {name for name, s in services.items() if token in json.dumps(s.get("environment", {}))}
    assert have == {"ray-head", "ray-worker"}
    for name in have:
        assert services[name]["environment"]["SURGE_INGEST_TOKEN"] == token, name
    assert "SURGE_INGEST_TOKEN" not in services["gateway"]["environment"]


def test_compose_predict_token_is_optional_and_the_gateways(tmp_path: Path) -> None:
    assert "${SURGE_PREDICT_TOKEN:-}" in COMPOSE.read_text()
    services = _compose_services(tmp_path)
    assert services["gateway"]["environment"]["SURGE_PREDICT_TOKEN"] in ("", None)  # empty: predictions open
    services = _compose_services(tmp_path, SURGE_PREDICT_TOKEN="predict-value")
    assert services["gateway"]["environment"]["SURGE_PREDICT_TOKEN"] == "predict-value"
    assert [n for n, s in services.items() if "predict-value" in json.dumps(s.get("environment", {}))] == ["gateway"]
