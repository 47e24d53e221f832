"""The Helm chart (helm/), checked with Helm's own Go library and no cluster.

Helm is not on the package registries, but the ``helm-sdkpy`` wheel bundles Helm's library (it
needs Python >= 3.12). A session fixture makes ``.venv-helm`` with python3.12 once and installs it
there with ``kubernetes-validate``; one driver process run in that venv then lints the chart and
renders it with several sets of values. helm-sdkpy has no ``helm template``: it renders through
``helm install`` against a stand-in Kubernetes API server (discovery, 404 on every GET but for the
objects a job gives it, 201 echoing every POST) with the in-memory release store, which is what
``helm install`` sends a cluster; the objects are what an earlier revision left, which the chart's
``lookup`` finds (generated tokens are kept across upgrades).
Its lint takes no values, so linting with values lints a copy of the chart whose values.yaml holds
them. Core kinds are validated against Kubernetes' own schemas (kubernetes-validate); the CRDs
(RayCluster, ServiceMonitor, PodMonitor) are checked for structure, and their pod templates against
the Pod schema.
"""

from __future__ import annotations

import base64
import copy
import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "helm"
VENV = ROOT / ".venv-helm"
REQUIREMENTS = ["helm-sdkpy>=0.1.32", "kubernetes-validate>=1.37.0"]
K8S_VERSION = "1.30"
TOKEN = "not-a-real-token"
CORE_KINDS = {
    "Deployment",
    "Service",
    "HorizontalPodAutoscaler",
    "PodDisruptionBudget",
    "PersistentVolumeClaim",
    "ConfigMap",
    "Secret",
    "NetworkPolicy",
}
CRD_KINDS = {
    "RayCluster": "ray.io/v1",
    "ServiceMonitor": "monitoring.coreos.com/v1",
    "PodMonitor": "monitoring.coreos.com/v1",
}
LONG_RELEASE = "a-rather-long-release-name-for-the-surge-chart"  # 46 characters
INGEST_TOKEN_FILE = "/etc/surge/secrets/ingest-token"

# Runs in .venv-helm (Python >= 3.12). stdin: {"chart": path, "jobs": {name: job}}; stdout: {name: result}.
# job: {"op": "lint", "values_yaml": text or null} or {"op": "render", "values": {...}, "release": name,
# "objects": {API path: object}}.
# lint result: {"messages": [{"severity", "path"}], "errors": n} (Helm serialises no message text);
# render result: {"manifest": text, "k8s_errors": [...], "validated": [...]} or {"error": text}.
DRIVER = r'''
import asyncio, json, shutil, sys, tempfile, threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import helm_sdkpy as helm
import kubernetes_validate
import yaml

GROUPS = {
    ("", "v1"): [("configmaps", "ConfigMap", True), ("secrets", "Secret", True), ("services", "Service", True),
                 ("persistentvolumeclaims", "PersistentVolumeClaim", True), ("pods", "Pod", True),
                 ("namespaces", "Namespace", False)],
    ("apps", "v1"): [("deployments", "Deployment", True)],
    ("autoscaling", "v2"): [("horizontalpodautoscalers", "HorizontalPodAutoscaler", True)],
    ("policy", "v1"): [("poddisruptionbudgets", "PodDisruptionBudget", True)],
    ("networking.k8s.io", "v1"): [("networkpolicies", "NetworkPolicy", True)],
    ("ray.io", "v1"): [("rayclusters", "RayCluster", True)],
    ("monitoring.coreos.com", "v1"): [("servicemonitors", "ServiceMonitor", True),
                                      ("podmonitors", "PodMonitor", True)],
}
NOT_FOUND = {"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "NotFound", "code": 404}


class StandInApi(BaseHTTPRequestHandler):
    """Just enough of a Kubernetes API server for `helm install`: discovery, creates succeed, and nothing
    exists but the job's "objects" (path -> object: what an earlier revision left, which `lookup` finds)."""

    objects = {}

    def log_message(self, *args):
        pass

    def send(self, code, body):
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):
        path = self.path.split("?")[0].rstrip("/")
        if path == "/version":
            major, minor = sys.argv[1].split(".")
            return self.send(200, {"major": major, "minor": minor, "gitVersion": f"v{major}.{minor}.0",
                                   "platform": "linux/amd64"})
        if path == "/api":
            return self.send(200, {"kind": "APIVersions", "versions": ["v1"], "serverAddressByClientCIDRs": [
                {"clientCIDR": "0.0.0.0/0", "serverAddress": "127.0.0.1"}]})
        if path == "/apis":
            groups = [{"name": g, "versions": [{"groupVersion": f"{g}/{v}", "version": v}],
                       "preferredVersion": {"groupVersion": f"{g}/{v}", "version": v}} for g, v in GROUPS if g]
            return self.send(200, {"kind": "APIGroupList", "apiVersion": "v1", "groups": groups})
        for (g, v), resources in GROUPS.items():
            if path == (f"/apis/{g}/{v}" if g else f"/api/{v}"):
                return self.send(200, {"kind": "APIResourceList", "apiVersion": "v1",
                                       "groupVersion": f"{g}/{v}" if g else v, "resources": [
                    {"name": name, "singularName": kind.lower(), "namespaced": namespaced, "kind": kind,
                     "verbs": ["create", "delete", "get", "list", "patch", "update", "watch"]}
                    for name, kind, namespaced in resources]})
        if path in self.objects:
            return self.send(200, self.objects[path])
        return self.send(404, NOT_FOUND)

    def do_PATCH(self):
        """Helm adopting an object it finds with its release's ownership marks: the object stays as it was."""
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        path = self.path.split("?")[0].rstrip("/")
        return self.send(200, self.objects[path]) if path in self.objects else self.send(404, NOT_FOUND)

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
        return self.send(201, body)


def kubeconfig(port):
    return yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "stand-in",
        "clusters": [{"name": "stand-in", "cluster": {"server": f"http://127.0.0.1:{port}"}}],
        "contexts": [{"name": "stand-in", "context": {"cluster": "stand-in", "user": "stand-in"}}],
        "users": [{"name": "stand-in", "user": {"token": "stand-in"}}],
    })


def validate(manifest):
    """Core kinds against Kubernetes' schemas; the CRDs' pod templates as Pods."""
    errors, validated = [], []
    for doc in yaml.safe_load_all(manifest):
        if not doc:
            continue
        docs = [doc]
        if doc["kind"] == "RayCluster":
            spec = doc["spec"]
            for group in [spec["headGroupSpec"], *spec.get("workerGroupSpecs", [])]:
                name = f"{doc['metadata']['name']}-{group.get('groupName', 'head')}"
                docs.append({"apiVersion": "v1", "kind": "Pod", "metadata": {**group["template"]["metadata"],
                             "name": name}, "spec": group["template"]["spec"]})
        for d in docs:
            if d["kind"] not in ("RayCluster", "ServiceMonitor", "PodMonitor"):
                where = f"{d['kind']}/{d['metadata']['name']}"
                try:
                    kubernetes_validate.validate(d, sys.argv[1], strict=True)
                    validated.append(where)
                except kubernetes_validate.ValidationError as e:
                    errors.append(f"{where}: {'.'.join(map(str, e.path))}: {e.message}")
                except kubernetes_validate.SchemaNotFoundError as e:
                    errors.append(f"{where}: {e.message}")
    return errors, validated


async def main():
    request = json.load(sys.stdin)
    chart = request["chart"]
    server = ThreadingHTTPServer(("127.0.0.1", 0), StandInApi)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    config = kubeconfig(server.server_address[1])
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, job in request["jobs"].items():
            StandInApi.objects = job.get("objects") or {}
            cfg = helm.Configuration(namespace="default", kubeconfig=config)
            if job["op"] == "lint":
                path = chart
                if job.get("values_yaml") is not None:
                    path = str(Path(tmp) / name / "surge")
                    shutil.copytree(chart, path)  # follows the chart's symlinks: a plain copy
                    Path(path, "values.yaml").write_text(job["values_yaml"])
                out = await helm.Lint(cfg).run(path)
                results[name] = {"messages": [{"severity": m["Severity"], "path": m["Path"]}
                                              for m in out.get("Messages") or []],
                                 "errors": len(out.get("Errors") or []), "linted": out.get("TotalChartsLinted")}
            else:
                try:
                    release = await helm.Install(cfg).run(job.get("release", "surge"), chart,
                                                          values=job.get("values"), wait=False, timeout=60)
                except helm.HelmError as e:
                    results[name] = {"error": str(e)}
                    continue
                errors, validated = validate(release["manifest"])
                results[name] = {"manifest": release["manifest"], "k8s_errors": errors, "validated": validated}
    json.dump(results, sys.stdout)


asyncio.run(main())
'''


def _merge(base: dict, override: dict) -> dict:
    """Helm's merge of values files: maps merge key by key, anything else is replaced."""
    out = copy.deepcopy(base)
    for k, v in override.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else copy.deepcopy(v)
    return out


def _values(*layers: dict) -> dict:
    out: dict = {}
    for layer in layers:
        out = _merge(out, layer)
    return out


DEFAULTS = yaml.safe_load((CHART / "values.yaml").read_text())
GPU = yaml.safe_load((CHART / "values-gpu.yaml").read_text())
WITH_TOKEN = {"apiToken": {"value": TOKEN}}
EVERYTHING = {
    "apiToken": {"existingSecret": "my-token", "existingSecretKey": "api"},
    "rayAuth": {"enabled": True, "value": "ray-token"},
    "ingestToken": {"existingSecret": "my-ingest", "existingSecretKey": "ingest"},
    "predictToken": {"value": "predict-token"},
    "grpcTLS": {"existingSecret": "surge-grpc-tls"},
    "networkPolicy": {
        "dashboardFrom": [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "ci"}}}],
        "metricsFrom": [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}],
        "ingestFrom": [{"ipBlock": {"cidr": "10.20.0.0/16", "except": ["10.20.9.0/24"]}}],
        "ingestPorts": [50051, 50052],
    },
    "modelStore": {"existingClaim": "shared-models"},
    "gateway": {"autoscaling": {"enabled": True}, "rayJobsAddress": "http://ray.example:8265"},
    "monitoring": {"prometheusOperator": {"enabled": True, "labels": {"release": "kube-prometheus-stack"}}},
    "studies": {"extra": {"mine.yaml": "name: mine\n"}},
    "rayHead": {"numCpus": 0},
    "cpuWorkers": {"numCpus": 3, "rayStartParams": {"object-store-memory": 1000000000}},
}
BAD_VALUES = {
    "negative-replicas": ({"gateway": {"replicas": -1}}, "/gateway/replicas"),
    "unknown-key": ({"gatway": {"replicas": 2}}, "gatway"),
    "gpus-as-a-word": ({"gpuWorkers": {"gpusPerWorker": "two"}}, "/gpuWorkers/gpusPerWorker"),
    "bad-pull-policy": ({"image": {"pullPolicy": "Sometimes"}}, "/image/pullPolicy"),
    "bad-access-mode": ({"modelStore": {"accessModes": ["ReadWriteSometimes"]}}, "/modelStore/accessModes"),
    "unknown-network-policy-key": ({"networkPolicy": {"metricFrom": []}}, "metricFrom"),
    "bad-peer": ({"networkPolicy": {"ingestFrom": [{"namespace": "x"}]}}, "/networkPolicy/ingestFrom/0"),
    "bad-ingest-port": ({"networkPolicy": {"ingestPorts": [70000]}}, "/networkPolicy/ingestPorts/0"),
    "unknown-token-key": ({"ingestToken": {"secret": "x"}}, "secret"),
}


def _stored_secret(name: str, token: str) -> dict:
    """A Secret that an earlier revision of the release "surge" wrote, as the API server returns it."""
    owner = {"meta.helm.sh/release-name": "surge", "meta.helm.sh/release-namespace": "default"}
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {
            "name": name,
            "namespace": "default",
            "labels": {"app.kubernetes.io/managed-by": "Helm"},
            "annotations": owner,  # Helm adopts what carries its release's marks
        },
        "type": "Opaque",
        "data": {"token": base64.b64encode(token.encode()).decode()},
    }


STORED = {"surge-ray-auth": "ray-token-of-the-last-revision", "surge-ingest-token": "ingest-token-of-the-last-revision"}

JOBS: dict[str, dict[str, Any]] = {
    "lint-chart": {"op": "lint", "values_yaml": None},
    "lint-default": {"op": "lint", "values_yaml": yaml.safe_dump(_values(DEFAULTS, WITH_TOKEN))},
    "lint-gpu": {"op": "lint", "values_yaml": yaml.safe_dump(_values(DEFAULTS, GPU, WITH_TOKEN))},
    "default": {"op": "render", "values": WITH_TOKEN},
    "gpu": {"op": "render", "values": _values(GPU, WITH_TOKEN)},
    "everything": {"op": "render", "values": _values(GPU, EVERYTHING)},
    "long-name": {"op": "render", "values": WITH_TOKEN, "release": LONG_RELEASE},
    "no-token": {"op": "render", "values": {}},
    "both-tokens": {"op": "render", "values": {"apiToken": {"value": TOKEN, "existingSecret": "my-token"}}},
    "upgrade": {
        "op": "render",
        "values": WITH_TOKEN,
        "objects": {f"/api/v1/namespaces/default/secrets/{k}": _stored_secret(k, v) for k, v in STORED.items()},
    },
    "given-tokens": {
        "op": "render",
        "values": _values(WITH_TOKEN, {"rayAuth": {"value": "given-ray"}, "ingestToken": {"value": "given-ingest"}}),
    },
    "unsafe": {
        "op": "render",
        "values": _values(WITH_TOKEN, {"rayAuth": {"enabled": False}, "networkPolicy": {"enabled": False}}),
    },
    **{
        f"both-{key}": {"op": "render", "values": _values(WITH_TOKEN, {key: {"value": "v", "existingSecret": "s"}})}
        for key in ("rayAuth", "ingestToken", "predictToken")
    },
    **{f"bad-{k}": {"op": "render", "values": _values(WITH_TOKEN, v)} for k, (v, _) in BAD_VALUES.items()},
}


def _python312() -> str | None:
    """A working Python >= 3.12 to make the venv with: pyenv's, or one on the PATH (pyenv's shims may not run)."""
    pyenv_root = Path(os.environ.get("PYENV_ROOT", Path.home() / ".pyenv"))
    candidates = [str(p) for p in sorted((pyenv_root / "versions").glob("3.1[2-9]*/bin/python3"))]
    candidates += [found for name in ("python3.12", "python3.13") if (found := shutil.which(name))]
    for candidate in candidates:
        probe = [candidate, "-c", "import sys, venv; sys.exit(sys.version_info < (3, 12))"]
        if subprocess.run(probe, capture_output=True, timeout=60).returncode == 0:
            return candidate
    return None


@pytest.fixture(scope="session")
def helm_python() -> Path:
    python = VENV / "bin" / "python"
    check = [str(python), "-c", "import helm_sdkpy, kubernetes_validate"]
    if python.exists() and subprocess.run(check, capture_output=True).returncode == 0:
        return python
    base = _python312()
    if base is None:
        pytest.skip("no python3.12 (or newer) for helm-sdkpy's venv: install one (e.g. `pyenv install 3.12`)")
    try:
        if not python.exists():
            subprocess.run([base, "-m", "venv", str(VENV)], check=True, capture_output=True, text=True, timeout=300)
        subprocess.run(
            [str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check", *REQUIREMENTS],
            check=True,
            capture_output=True,
            text=True,
            timeout=600,
        )
        subprocess.run(check, check=True, capture_output=True, text=True, timeout=120)
    except subprocess.CalledProcessError as e:
        pytest.skip(f"could not set up {VENV.name} ({' '.join(REQUIREMENTS)}): {(e.stderr or '').strip()[-2000:]}")
    except subprocess.TimeoutExpired:
        pytest.skip(f"setting up {VENV.name} timed out")
    return python


@pytest.fixture(scope="session")
def helm(helm_python: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict]:
    """Every lint and render of the chart, from one driver run."""
    home = tmp_path_factory.mktemp("helm-home")
    script = home / "driver.py"
    script.write_text(DRIVER)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HELM_", "KUBE"))}
    env.update(HELM_DRIVER="memory", HELM_CACHE_HOME=str(home), HELM_CONFIG_HOME=str(home), HELM_DATA_HOME=str(home))
    run = subprocess.run(
        [str(helm_python), str(script), K8S_VERSION],
        input=json.dumps({"chart": str(CHART), "jobs": JOBS}),
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert run.returncode == 0, f"the Helm driver failed:\n{run.stderr[-5000:]}"
    return json.loads(run.stdout)


def _rendered(helm: dict, job: str) -> list[dict]:
    result = helm[job]
    assert "error" not in result, f"{job}: {result.get('error')}"
    return [d for d in yaml.safe_load_all(result["manifest"]) if d]


def _one(docs: list[dict], kind: str, name_suffix: str = "") -> dict:
    found = [d for d in docs if d["kind"] == kind and d["metadata"]["name"].endswith(name_suffix)]
    assert len(found) == 1, f"{kind} *{name_suffix}: {[d['metadata']['name'] for d in found]}"
    return found[0]


def _pod_templates(docs: list[dict]) -> dict[str, dict]:
    out = {}
    for d in docs:
        if d["kind"] == "Deployment":
            out[f"Deployment/{d['metadata']['name']}"] = d["spec"]["template"]
        elif d["kind"] == "RayCluster":
            out["RayCluster head"] = d["spec"]["headGroupSpec"]["template"]
            for g in d["spec"]["workerGroupSpecs"]:
                out[f"RayCluster worker group {g['groupName']}"] = g["template"]
    return out


def _env(container: dict) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container.get("env", [])}


def _mounts(container: dict) -> dict[str, str]:
    return {m["mountPath"]: m["name"] for m in container.get("volumeMounts", [])}


@pytest.mark.parametrize("job", ["lint-chart", "lint-default", "lint-gpu"])
def test_helm_lint_passes(helm: dict, job: str) -> None:
    """lint-chart: the chart directory itself (defaults, no token: lint only reports a missing required value)."""
    result = helm[job]
    # Severity 1 is INFO (e.g. Chart.yaml has no icon), 2 WARNING, 3 ERROR. The library's result carries no
    # message text: the render tests, which run the same templates, show Helm's messages.
    why = f"helm lint ({job}) found problems: {result}"
    assert result["linted"] == 1 and result["errors"] == 0, why
    assert [m for m in result["messages"] if m["severity"] >= 2] == [], why


def test_rendering_without_a_token_fails_naming_it(helm: dict) -> None:
    error = helm["no-token"]["error"]
    assert "the chart has no default API token" in error
    assert "apiToken.value" in error and "apiToken.existingSecret" in error


@pytest.mark.parametrize("job", ["both-tokens", "both-rayAuth", "both-ingestToken", "both-predictToken"])
def test_rendering_with_a_token_given_twice_fails(helm: dict, job: str) -> None:
    key = "apiToken" if job == "both-tokens" else job.removeprefix("both-")
    error = helm[job]["error"]
    assert "not both" in error and f"{key}.value" in error and f"{key}.existingSecret" in error


@pytest.mark.parametrize("job", ["default", "gpu", "everything", "long-name", "unsafe", "upgrade"])
def test_core_manifests_pass_the_kubernetes_schemas(helm: dict, job: str) -> None:
    docs = _rendered(helm, job)
    assert helm[job]["k8s_errors"] == []
    core = [d for d in docs if d["kind"] not in CRD_KINDS]
    assert {d["kind"] for d in core} <= CORE_KINDS
    validated = set(helm[job]["validated"])
    assert {f"{d['kind']}/{d['metadata']['name']}" for d in core} <= validated
    assert sum(v.startswith("Pod/") for v in validated) == len(_pod_templates(docs)) - 1  # the Deployment's aside
    for d in docs:
        if d["kind"] in CRD_KINDS:
            assert d["apiVersion"] == CRD_KINDS[d["kind"]], d["kind"]


def test_default_release_has_every_piece(helm: dict) -> None:
    docs = _rendered(helm, "default")
    kinds = sorted(d["kind"] for d in docs)
    assert kinds == sorted(
        ["RayCluster", "Deployment", "Service", "PodDisruptionBudget", "PersistentVolumeClaim"]
        + ["ConfigMap"] * 3  # studies, dashboards, the Ray pods' profile script
        + ["Secret"] * 3  # the API token, Ray's token, the ingest token
        + ["NetworkPolicy"] * 2  # the Ray head, the Ray workers
    )
    pvc = _one(docs, "PersistentVolumeClaim")
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]
    assert "storageClassName" not in pvc["spec"]  # the cluster's default class
    secret = _one(docs, "Secret", "-api-token")
    assert secret["data"] == {"token": "bm90LWEtcmVhbC10b2tlbg=="}  # base64 of TOKEN


def test_raycluster_has_head_and_worker_groups(helm: dict) -> None:
    docs = _rendered(helm, "default")
    rc = _one(docs, "RayCluster")
    assert rc["metadata"]["name"] == "surge"
    head = rc["spec"]["headGroupSpec"]
    assert head["rayStartParams"] == {"dashboard-host": "0.0.0.0", "metrics-export-port": "8080"}
    (cpu,) = rc["spec"]["workerGroupSpecs"]
    assert cpu["groupName"] == "cpu"
    assert (cpu["replicas"], cpu["minReplicas"], cpu["maxReplicas"]) == (1, 0, 4)
    assert cpu["rayStartParams"] == {"metrics-export-port": "8080"}
    for group in (head, cpu):
        spec = group["template"]["spec"]
        (ray,) = spec["containers"]
        # KubeRay keeps this command (the annotation) and puts its generated `ray start` in the variable.
        assert group["template"]["metadata"]["annotations"]["ray.io/overwrite-container-cmd"] == "true"
        assert "$KUBERAY_GEN_RAY_START_CMD" in ray["args"][0]
        assert {p["name"]: p["containerPort"] for p in ray["ports"]}["metrics"] == 8080
        volumes = {v["name"]: v for v in spec["volumes"]}
        mounts = _mounts(ray)
        assert volumes[mounts["/models"]]["persistentVolumeClaim"]["claimName"] == "surge-models"
        assert volumes[mounts["/tmp"]]["emptyDir"] == {}
        assert volumes[mounts["/dev/shm"]]["emptyDir"]["medium"] == "Memory"
        assert "/etc/profile.d/surge-path.sh" in mounts
        assert _env(ray)["SURGE_STORE"] == "/models"
    head_ports = {p["name"]: p["containerPort"] for p in head["template"]["spec"]["containers"][0]["ports"]}
    assert head_ports["dashboard"] == 8265 and head_ports["gcs-server"] == 6379


def test_num_cpus_gpus_and_extra_start_params_reach_ray_start(helm: dict) -> None:
    rc = _one(_rendered(helm, "everything"), "RayCluster")
    head = rc["spec"]["headGroupSpec"]["rayStartParams"]
    assert head == {"dashboard-host": "0.0.0.0", "metrics-export-port": "8080", "num-cpus": "0"}
    groups = {g["groupName"]: g["rayStartParams"] for g in rc["spec"]["workerGroupSpecs"]}
    assert groups["cpu"] == {"metrics-export-port": "8080", "num-cpus": "3", "object-store-memory": "1000000000"}
    assert groups["gpu"] == {"metrics-export-port": "8080", "num-gpus": "1"}  # num-cpus: from the CPU limit


def test_gpu_values_add_a_gpu_worker_group(helm: dict) -> None:
    assert [g["groupName"] for g in _one(_rendered(helm, "default"), "RayCluster")["spec"]["workerGroupSpecs"]] == [
        "cpu"
    ]
    rc = _one(_rendered(helm, "gpu"), "RayCluster")
    groups = {g["groupName"]: g for g in rc["spec"]["workerGroupSpecs"]}
    assert set(groups) == {"cpu", "gpu"}
    gpu = groups["gpu"]
    assert (gpu["replicas"], gpu["minReplicas"], gpu["maxReplicas"]) == (1, 0, 1)
    (container,) = gpu["template"]["spec"]["containers"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert container["image"] == "surge:0.1.0-cuda"
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in gpu["template"]["spec"][
        "tolerations"
    ]
    assert groups["cpu"]["template"]["spec"]["containers"][0]["image"] == "surge:0.1.0"
    assert "nvidia.com/gpu" not in groups["cpu"]["template"]["spec"]["containers"][0]["resources"]["limits"]


def test_gateway_runs_the_gateway_role_against_the_head_service(helm: dict) -> None:
    docs = _rendered(helm, "default")
    deployment = _one(docs, "Deployment", "-gateway")
    assert deployment["spec"]["replicas"] == 2
    (gateway,) = deployment["spec"]["template"]["spec"]["containers"]
    assert gateway["args"] == ["gateway"] and "command" not in gateway  # the image's ENTRYPOINT runs the role
    env = _env(gateway)
    # KubeRay's head Service is <raycluster>-head-svc; the job API is the dashboard port.
    assert env["SURGE_RAY_JOBS_ADDRESS"] == f"http://{_one(docs, 'RayCluster')['metadata']['name']}-head-svc:8265"
    assert env["SURGE_STORE"] == "/models"
    assert env["SURGE_API_TOKEN"] == {"secretKeyRef": {"name": "surge-api-token", "key": "token"}}
    assert env["RAY_AUTH_MODE"] == "token"
    assert env["RAY_AUTH_TOKEN"] == {"secretKeyRef": {"name": "surge-ray-auth", "key": "token"}}
    # The ingest token belongs to the Ray nodes; predictions are open without a predict token.
    assert not {"SURGE_INGEST_TOKEN", "SURGE_INGEST_TOKEN_FILE", "SURGE_PREDICT_TOKEN"} & set(env)
    for probe in ("readinessProbe", "livenessProbe"):
        assert gateway[probe]["httpGet"] == {"path": "/healthz", "port": 8000}
    assert gateway["resources"]["requests"]["cpu"]  # the HPA scales on CPU utilisation of the request
    service = _one(docs, "Service", "-gateway")
    assert service["spec"]["selector"] == deployment["spec"]["selector"]["matchLabels"]
    assert service["spec"]["ports"][0]["targetPort"] == "http"
    pdb = _one(docs, "PodDisruptionBudget")
    assert pdb["spec"] == {"minAvailable": 1, "selector": deployment["spec"]["selector"]}


def test_long_release_names_keep_kuberays_head_service_name(helm: dict) -> None:
    """KubeRay cuts "<cluster>-head-svc" from the front past 50 characters: the chart keeps it shorter."""
    docs = _rendered(helm, "long-name")
    name = _one(docs, "RayCluster")["metadata"]["name"]
    assert len(f"{name}-head-svc") <= 50 and LONG_RELEASE.startswith(name)
    (gateway,) = _one(docs, "Deployment")["spec"]["template"]["spec"]["containers"]
    assert _env(gateway)["SURGE_RAY_JOBS_ADDRESS"] == f"http://{name}-head-svc:8265"


def test_switches_existing_secret_claim_hpa_monitoring_and_ray_auth(helm: dict) -> None:
    docs = _rendered(helm, "everything")
    kinds = [d["kind"] for d in docs]
    assert "PersistentVolumeClaim" not in kinds  # existingClaim
    # No API token Secret nor an ingest one (existingSecret): Ray's token and the predict token.
    assert [d["metadata"]["name"] for d in docs if d["kind"] == "Secret"] == ["surge-ray-auth", "surge-predict-token"]
    deployment = _one(docs, "Deployment")
    assert "replicas" not in deployment["spec"]  # the HPA owns it
    hpa = _one(docs, "HorizontalPodAutoscaler")
    assert hpa["spec"]["scaleTargetRef"]["name"] == deployment["metadata"]["name"]
    assert hpa["spec"]["metrics"][0]["resource"]["name"] == "cpu"
    (gateway,) = deployment["spec"]["template"]["spec"]["containers"]
    env = _env(gateway)
    assert env["SURGE_API_TOKEN"] == {"secretKeyRef": {"name": "my-token", "key": "api"}}
    assert env["SURGE_RAY_JOBS_ADDRESS"] == "http://ray.example:8265"
    for where, template in _pod_templates(docs).items():
        (container,) = template["spec"]["containers"]
        claim = {v["name"]: v for v in template["spec"]["volumes"]}["models"]["persistentVolumeClaim"]
        assert claim["claimName"] == "shared-models", where
        assert _env(container)["RAY_AUTH_MODE"] == "token", where
        assert _env(container)["RAY_AUTH_TOKEN"] == {"secretKeyRef": {"name": "surge-ray-auth", "key": "token"}}
    monitor = _one(docs, "ServiceMonitor")
    assert monitor["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    assert monitor["spec"]["selector"]["matchLabels"] == deployment["spec"]["selector"]["matchLabels"]
    assert monitor["spec"]["endpoints"][0]["port"] == "http" and monitor["spec"]["endpoints"][0]["path"] == "/metrics"
    pods = _one(docs, "PodMonitor")
    assert pods["spec"]["selector"]["matchLabels"] == {"ray.io/cluster": _one(docs, "RayCluster")["metadata"]["name"]}
    assert pods["spec"]["podMetricsEndpoints"][0]["port"] == "metrics"
    switched_off = {"ServiceMonitor", "PodMonitor", "HorizontalPodAutoscaler"}
    for job in ("default", "gpu"):
        assert not switched_off & {d["kind"] for d in _rendered(helm, job)}, job


def _token(docs: list[dict], name: str) -> str:
    return base64.b64decode(_one(docs, "Secret", name)["data"]["token"]).decode()


def _all_env_values(docs: list[dict]) -> list[str]:
    """Every literal env value of every container (init containers too) of every pod template."""
    return [
        str(e.get("value", ""))
        for template in _pod_templates(docs).values()
        for c in template["spec"]["containers"] + template["spec"].get("initContainers", [])
        for e in c.get("env", [])
    ]


@pytest.mark.parametrize("job", ["default", "gpu", "long-name"])
def test_ray_auth_is_on_by_default_with_a_generated_token(helm: dict, job: str) -> None:
    docs = _rendered(helm, job)
    secret = _one(docs, "Secret", "-ray-auth")["metadata"]["name"]
    ray_token, ingest_token = _token(docs, "-ray-auth"), _token(docs, "-ingest-token")
    for token in (ray_token, ingest_token):
        assert len(token) == 32 and token.isalnum(), token
    assert ray_token != ingest_token
    templates = _pod_templates(docs)
    assert len(templates) >= 3
    for where, template in templates.items():
        (container,) = template["spec"]["containers"]
        env = _env(container)
        assert env["RAY_AUTH_MODE"] == "token", where
        assert env["RAY_AUTH_TOKEN"] == {"secretKeyRef": {"name": secret, "key": "token"}}, where


def test_generated_tokens_are_kept_across_upgrades_and_given_ones_used(helm: dict) -> None:
    """The Secrets an earlier revision stored (found by `lookup`) keep their tokens: nodes, gateway and
    external solvers keep agreeing after `helm upgrade`."""
    docs = _rendered(helm, "upgrade")
    for name, token in STORED.items():
        assert _token(docs, name) == token, name
    docs = _rendered(helm, "given-tokens")
    assert (_token(docs, "-ray-auth"), _token(docs, "-ingest-token")) == ("given-ray", "given-ingest")
    annotations = _one(docs, "Deployment")["spec"]["template"]["metadata"]["annotations"]
    assert "checksum/ray-auth" in annotations  # a changed token rolls the gateway
    assert "checksum/ray-auth" not in (
        _one(_rendered(helm, "default"), "Deployment")["spec"]["template"]["metadata"].get("annotations") or {}
    )


@pytest.mark.parametrize("job", ["default", "gpu", "everything", "given-tokens", "unsafe"])
def test_ingest_token_reaches_the_ray_pods_as_a_file_only(helm: dict, job: str) -> None:
    docs = _rendered(helm, job)
    secret, key = ("my-ingest", "ingest") if job == "everything" else ("surge-ingest-token", "token")
    for where, template in _pod_templates(docs).items():
        (container,) = template["spec"]["containers"]
        env = _env(container)
        assert "SURGE_INGEST_TOKEN" not in env, where
        if where.startswith("Deployment/"):
            assert "SURGE_INGEST_TOKEN_FILE" not in env, where
            assert not any(v.get("secret", {}).get("secretName") == secret for v in template["spec"]["volumes"])
            continue
        assert env["SURGE_INGEST_TOKEN_FILE"] == INGEST_TOKEN_FILE, where
        directory, file = INGEST_TOKEN_FILE.rsplit("/", 1)
        (mount,) = [m for m in container["volumeMounts"] if m["mountPath"] == directory]
        assert mount["readOnly"] is True and "subPath" not in mount, where  # subPath mounts miss rotations
        volume = {v["name"]: v for v in template["spec"]["volumes"]}[mount["name"]]["secret"]
        assert volume["secretName"] == secret, where
        assert volume["items"] == [{"key": key, "path": file}], where
        assert volume["defaultMode"] == 0o440, where  # root and the pods' fsGroup (the image user's group)
    if job != "everything":
        token = _token(docs, "-ingest-token")
        assert token not in _all_env_values(docs)
        assert token not in helm[job]["manifest"]  # only base64'd, in its Secret


@pytest.mark.parametrize("job", ["default", "everything"])
def test_grpc_tls_pair_reaches_the_ray_pods_as_files_when_given(helm: dict, job: str) -> None:
    """The study drivers' ingest servers read the pair from SURGE_GRPC_TLS_CERT/KEY: files of the TLS
    Secret, mounted read-only; without grpcTLS.existingSecret nothing of it is rendered (plaintext)."""
    docs = _rendered(helm, job)
    for where, template in _pod_templates(docs).items():
        (container,) = template["spec"]["containers"]
        env = _env(container)
        volumes = {v["name"]: v for v in template["spec"]["volumes"]}
        if job == "default" or where.startswith("Deployment/"):
            assert "SURGE_GRPC_TLS_CERT" not in env and "SURGE_GRPC_TLS_KEY" not in env, where
            assert "grpc-tls" not in volumes, where
            continue
        assert (env["SURGE_GRPC_TLS_CERT"], env["SURGE_GRPC_TLS_KEY"]) == (
            "/etc/surge/grpc-tls/tls.crt",
            "/etc/surge/grpc-tls/tls.key",
        ), where
        (mount,) = [m for m in container["volumeMounts"] if m["mountPath"] == "/etc/surge/grpc-tls"]
        assert mount["readOnly"] is True and "subPath" not in mount, where  # subPath mounts miss renewals
        secret = volumes[mount["name"]]["secret"]
        assert secret["secretName"] == "surge-grpc-tls", where
        assert {i["key"] for i in secret["items"]} == {"tls.crt", "tls.key"}, where
        assert secret["defaultMode"] == 0o440, where


def test_predict_token_is_optional_and_only_the_gateways(helm: dict) -> None:
    default = _rendered(helm, "default")
    assert not [d for d in default if d["kind"] == "Secret" and "predict" in d["metadata"]["name"]]
    docs = _rendered(helm, "everything")
    assert _token(docs, "-predict-token") == "predict-token"
    for where, template in _pod_templates(docs).items():
        env = _env(template["spec"]["containers"][0])
        if where.startswith("Deployment/"):
            assert env["SURGE_PREDICT_TOKEN"] == {"secretKeyRef": {"name": "surge-predict-token", "key": "token"}}
        else:
            assert "SURGE_PREDICT_TOKEN" not in env, where
    assert "predict-token" not in _all_env_values(docs)


def _peers(policy: dict, port: int) -> list[dict]:
    """The peers a NetworkPolicy admits on a TCP port (a rule without ports admits every port)."""
    out = []
    for rule in policy["spec"].get("ingress", []):
        ports = rule.get("ports")
        if ports is None or any(p["port"] <= port <= p.get("endPort", p["port"]) for p in ports):
            assert "from" in rule, f"a rule admits anyone on {port}"
            out += rule["from"]
    return out


def _policies(docs: list[dict]) -> tuple[dict, dict, dict, dict, dict]:
    """The head's and the workers' NetworkPolicies, and the peers: gateway, Ray pods, the namespace."""
    cluster = _one(docs, "RayCluster")["metadata"]["name"]
    policies = {
        d["spec"]["podSelector"]["matchLabels"].get("ray.io/node-type"): d for d in docs if d["kind"] == "NetworkPolicy"
    }
    assert set(policies) == {"head", "worker"}
    for node_type, policy in policies.items():
        # KubeRay's own labels, which a pod template cannot override; the PodMonitor selects by them too.
        assert policy["spec"]["podSelector"] == {
            "matchLabels": {"ray.io/cluster": cluster, "ray.io/node-type": node_type}
        }
        assert policy["spec"]["policyTypes"] == ["Ingress"]
    gateway = {"podSelector": {"matchLabels": _one(docs, "Deployment")["spec"]["selector"]["matchLabels"]}}
    ray_pods = {"podSelector": {"matchLabels": {"ray.io/cluster": cluster}}}
    return policies["head"], policies["worker"], gateway, ray_pods, {"podSelector": {}}


RAY_PORTS = (6379, 10001, 8076, 52365, 10002, 19999, 33333, 65535)  # GCS, client, raylet/agents, worker range, random


def test_network_policies_admit_only_the_gateway_to_the_job_api(helm: dict) -> None:
    docs = _rendered(helm, "default")
    head, worker, gateway, ray_pods, namespace = _policies(docs)
    assert _peers(head, 8265) == [gateway]  # the job API runs whatever it is sent
    for port in RAY_PORTS:
        assert _peers(head, port) == [ray_pods, gateway], port
        assert _peers(worker, port) == [ray_pods], port
    assert _peers(head, 8080) == [ray_pods, gateway, namespace]  # Prometheus scrapes the metrics port
    assert _peers(worker, 8080) == [ray_pods, namespace]
    assert _peers(head, 50051) == [ray_pods, gateway, namespace]  # external solvers reach a study's ingest
    assert _peers(worker, 50051) == [ray_pods, namespace]
    assert gateway not in _peers(worker, 8265)
    # The ports the policies name are the ones the pods and the PodMonitor use.
    ports = {
        p["name"]: p["containerPort"]
        for p in _one(docs, "RayCluster")["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["ports"]
    }
    assert (ports["dashboard"], ports["metrics"], ports["gcs-server"]) == (8265, 8080, 6379)


def test_network_policies_take_the_configured_peers(helm: dict) -> None:
    docs = _rendered(helm, "everything")
    head, worker, gateway, ray_pods, namespace = _policies(docs)
    ci = {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "ci"}}}
    monitoring = {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}
    solvers = {"ipBlock": {"cidr": "10.20.0.0/16", "except": ["10.20.9.0/24"]}}
    assert _peers(head, 8265) == [gateway, ci]
    assert _peers(head, 8080) == [ray_pods, gateway, monitoring] and _peers(worker, 8080) == [ray_pods, monitoring]
    for port in (50051, 50052):
        assert _peers(head, port) == [ray_pods, gateway, solvers] and _peers(worker, port) == [ray_pods, solvers]
    assert namespace not in _peers(head, 8080) + _peers(head, 50051)


def test_switching_ray_auth_and_network_policies_off(helm: dict) -> None:
    docs = _rendered(helm, "unsafe")
    assert "NetworkPolicy" not in {d["kind"] for d in docs}
    assert not [d for d in docs if d["kind"] == "Secret" and d["metadata"]["name"].endswith("-ray-auth")]
    for where, template in _pod_templates(docs).items():
        env = _env(template["spec"]["containers"][0])
        assert not {"RAY_AUTH_MODE", "RAY_AUTH_TOKEN"} & set(env), where


@pytest.mark.parametrize("case", sorted(BAD_VALUES))
def test_values_schema_rejects_bad_values_naming_them(helm: dict, case: str) -> None:
    error = helm[f"bad-{case}"].get("error")
    assert error, f"{case} rendered"
    assert "values don't meet the specifications of the schema" in error
    assert BAD_VALUES[case][1] in error, error


def test_configmaps_hold_every_study_and_dashboard(helm: dict) -> None:
    """helm/files/configs and helm/files/dashboards are symlinks: Helm's loader follows them."""
    for link, target in (("configs", ROOT / "configs"), ("dashboards", ROOT / "deploy" / "grafana" / "dashboards")):
        path = CHART / "files" / link
        assert path.is_symlink() and path.resolve() == target.resolve(), path
    docs = _rendered(helm, "default")
    studies = _one(docs, "ConfigMap", "-studies")["data"]
    assert studies == {p.name: p.read_text() for p in sorted((ROOT / "configs").glob("*.yaml"))}
    assert "heat2d-mlp.yaml" in studies
    dashboards = _one(docs, "ConfigMap", "-dashboards")
    assert dashboards["metadata"]["labels"]["grafana_dashboard"] == "1"
    expected = {p.name: p.read_text() for p in sorted((ROOT / "deploy" / "grafana" / "dashboards").glob("*.json"))}
    assert (dashboards.get("data") or {}) == expected
    for text in expected.values():
        json.loads(text)
    assert sum(len(v) for v in expected.values()) < 900_000  # a ConfigMap holds at most 1 MiB
    extra = _one(_rendered(helm, "everything"), "ConfigMap", "-studies")["data"]
    assert extra["mine.yaml"] == "name: mine\n" and set(studies) < set(extra)
    # The gateway and the Ray pods find them at $SURGE_CONFIG_DIR.
    for where, template in _pod_templates(docs).items():
        container = template["spec"]["containers"][0]
        assert _mounts(container)[_env(container)["SURGE_CONFIG_DIR"]] == "studies", where


@pytest.mark.parametrize("job", ["default", "gpu", "everything"])
def test_every_pod_runs_unprivileged_on_a_read_only_root(helm: dict, job: str) -> None:
    templates = _pod_templates(_rendered(helm, job))
    assert len(templates) >= 3
    for where, template in templates.items():
        spec = template["spec"]
        pod = spec["securityContext"]
        assert pod["runAsNonRoot"] is True and pod["runAsUser"] == 10001, where
        assert pod["seccompProfile"] == {"type": "RuntimeDefault"}, where
        assert pod["fsGroup"] == 10001, where  # the model store's volume is writable by the image's user
        assert spec["automountServiceAccountToken"] is False, where
        for container in spec["containers"]:
            sc = container["securityContext"]
            assert sc["readOnlyRootFilesystem"] is True, where
            assert sc["allowPrivilegeEscalation"] is False, where
            assert sc["capabilities"] == {"drop": ["ALL"]}, where
            assert sc["runAsNonRoot"] is True and sc["runAsUser"] == 10001, where
            assert sc["seccompProfile"] == {"type": "RuntimeDefault"}, where
            assert "privileged" not in sc, where
            volumes = {v["name"]: v for v in spec["volumes"]}
            assert "emptyDir" in volumes[_mounts(container)["/tmp"]], where


def test_values_schema_covers_every_value() -> None:
    """Every key of values.yaml and values-gpu.yaml is declared; objects refuse unknown keys."""
    schema = json.loads((CHART / "values.schema.json").read_text())
    assert schema["$schema"] == "http://json-schema.org/draft-07/schema#"

    def resolve(node: dict) -> dict:
        while "$ref" in node:
            node = schema["definitions"][node["$ref"].rsplit("/", 1)[-1]]
        return node

    def walk(values: Any, node: dict, path: str) -> None:
        node = resolve(node)
        if isinstance(values, dict) and "properties" in node:
            assert node.get("additionalProperties") is False, f"{path or '/'} accepts unknown keys"
            for k, v in values.items():
                assert k in node["properties"], f"{path}/{k} is not in values.schema.json"
                walk(v, node["properties"][k], f"{path}/{k}")
        else:
            assert "type" in node, f"{path} has no type"

    walk(DEFAULTS, schema, "")
    walk(GPU, schema, "")


def test_chart_metadata() -> None:
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert [chart[k] for k in ("apiVersion", "name", "version", "appVersion")] == ["v2", "surge", "0.1.0", "0.1.0"]
    assert (CHART / ".helmignore").is_file()
