"""Gateway speed: what serving over REST adds to the model, measured side by side in one run.

A ``surge serve`` process on loopback serves an MLP surrogate of heat2d (32 x 32 field per row).
In the same run and on the same machine:

- one-row JSON predict latency (keep-alive client) against the bare forward of one row
  (``run_model``: encoding, normalisation, forward, decoding) in this process;
  ``p50_overhead_ms`` is the difference of the medians;
- batched ``.npy`` requests of 256 rows, as many clients as the gateway has predict workers,
  against the bare model's rows/s on 256-row batches with all the cores; ``batched_ratio`` is
  rows/s over HTTP over bare rows/s;
- ``server_path_ratio``: the bare forward of a 256-row batch over the gateway's own work for that
  request (parsing, checks, forward, ``.npy`` answer) called in this process at the same threads,
  i.e. the share of ``batched_ratio`` lost to the server's code rather than to HTTP and a client
  sharing the cores;
- ``/healthz`` latency while the batched load runs (the event loop must stay free).

    python benchmarks/gateway.py [--quick] [--json]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import solvers
from services.gateway.hub import ModelHub, run_model
from services.gateway.routes.models import _answer
from services.gateway.settings import GatewaySettings, default_predict_workers
from trainer.loop import LoopStats, Normaliser, make_card
from trainer.models import build_model
from trainer.problem import ProblemSpec
from trainer.store import ModelStore

SOLVER_CFG = {"n": 32, "steps": 10, "dt": 0.001}
ARCH = {"hidden": 256, "layers": 3}
PARAMS = {"u0": 300.0, "t_left": 200.0, "t_right": 400.0, "t_bottom": 100.0, "t_top": 500.0}
BATCH = 256
SERVE = "import sys; from services.cli import main; sys.exit(main())"


def _publish(root: Path) -> None:
    spec = ProblemSpec.from_solver(solvers.get("heat2d", **SOLVER_CFG), SOLVER_CFG)
    card = make_card(
        problem=spec.to_dict(),
        model_name="mlp",
        arch=ARCH,
        in_channels=spec.in_features,
        out_channels=1,
        grid=spec.grid,
        norm=Normaliser(300.0, 100.0),
        stats=LoopStats(step=1, samples_seen=1, validation_error=0.5),
        study_id="bench",
    )
    torch.manual_seed(0)
    ModelStore(root).publish("bench", build_model("mlp", spec.in_features, 1, spec.grid, **ARCH), card)


def _rows(n: int) -> np.ndarray:
    t = np.linspace(0.0, 0.01, n)
    return np.array([[*PARAMS.values(), ti] for ti in t])


def _p(xs: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(xs), q))


def _start(root: Path) -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if not k.startswith("SURGE_")}
    proc = subprocess.Popen(
        [sys.executable, "-c", SERVE, "serve", "--store", str(root), "--host", "127.0.0.1", "--port", str(port)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/healthz", timeout=2).status_code == 200:
                return proc, url
        except httpx.TransportError:
            time.sleep(0.2)
    proc.kill()
    raise SystemExit("the gateway did not start")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer repetitions")
    ap.add_argument("--json", action="store_true", help="print a JSON object as the last line")
    args = ap.parse_args()
    n_single, n_batched = (200, 20) if args.quick else (1000, 100)
    workers = default_predict_workers()

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "store"
        _publish(root)
        m = ModelStore(root).load("bench")
        one, batch = _rows(1), _rows(BATCH)
        buf = io.BytesIO()
        np.save(buf, batch)
        batch_body = buf.getvalue()

        # Bare model, in this process: one row with the gateway's per-worker threads, batches with all cores.
        cores = len(os.sched_getaffinity(0))
        torch.set_num_threads(max(1, cores // workers))
        for _ in range(20):
            run_model(m, one)
        bare_one = []
        for _ in range(n_single):
            t0 = time.perf_counter()
            run_model(m, one)
            bare_one.append(time.perf_counter() - t0)
        # The gateway's own work for one batched request (model lookup, .npy parsing, checks, forward,
        # .npy answer) at one worker's threads, against the bare forward at the same threads: what the
        # server adds without HTTP and without a client on the same cores.
        hub = ModelHub(root)
        settings = GatewaySettings(store=root)
        answer_s, bare_s = [], []
        for _ in range(max(10, n_batched // 2)):
            t0 = time.perf_counter()
            _answer(hub, "bench", None, batch_body, "application/x-npy", True, settings, ["bench"])
            answer_s.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            run_model(m, batch)
            bare_s.append(time.perf_counter() - t0)
        torch.set_num_threads(cores)
        run_model(m, batch)
        t0 = time.perf_counter()
        for _ in range(n_batched):
            run_model(m, batch)
        bare_rows_s = n_batched * BATCH / (time.perf_counter() - t0)

        proc, url = _start(root)
        try:
            with httpx.Client(timeout=60) as c:
                body = {"params": PARAMS, "times": [0.0]}
                for _ in range(20):
                    c.post(f"{url}/v1/models/bench/predict", json=body).raise_for_status()
                http_one = []
                for _ in range(n_single):
                    t0 = time.perf_counter()
                    r = c.post(f"{url}/v1/models/bench/predict", json=body)
                    http_one.append(time.perf_counter() - t0)
                    r.raise_for_status()

            stop = threading.Event()
            health: list[float] = []

            def probe() -> None:
                with httpx.Client(timeout=30) as hc:
                    while not stop.is_set():
                        t0 = time.perf_counter()
                        hc.get(f"{url}/healthz").raise_for_status()
                        health.append(time.perf_counter() - t0)
                        time.sleep(0.05)

            def batched(k: int) -> int:
                with httpx.Client(timeout=60) as bc:
                    for _ in range(k):
                        r = bc.post(
                            f"{url}/v1/models/bench/predict",
                            content=batch_body,
                            headers={"content-type": "application/x-npy", "accept": "application/x-npy"},
                        )
                        r.raise_for_status()
                return k * BATCH

            prober = threading.Thread(target=probe, daemon=True)
            prober.start()
            per_client = max(1, n_batched // workers)
            t0 = time.perf_counter()
            with ThreadPoolExecutor(workers) as ex:
                rows = sum(ex.map(batched, [per_client] * workers))
            http_rows_s = rows / (time.perf_counter() - t0)
            stop.set()
            prober.join(30)
        finally:
            proc.terminate()
            proc.wait(20)

    out = {
        "bare_one_row_p50_ms": round(_p(bare_one, 50) * 1e3, 3),
        "http_one_row_p50_ms": round(_p(http_one, 50) * 1e3, 3),
        "http_one_row_p99_ms": round(_p(http_one, 99) * 1e3, 3),
        "p50_overhead_ms": round((_p(http_one, 50) - _p(bare_one, 50)) * 1e3, 3),
        "bare_rows_per_s": round(bare_rows_s),
        "http_npy_rows_per_s": round(http_rows_s),
        "batched_ratio": round(http_rows_s / bare_rows_s, 3),
        "server_path_ratio": round(_p(bare_s, 50) / _p(answer_s, 50), 3),
        "healthz_under_load_p99_ms": round(_p(health, 99) * 1e3, 1) if health else None,
        "predict_workers": workers,
        "batch_rows": BATCH,
        "values_per_row": int(np.prod(m.spec.out_shape)),
    }
    for k, v in out.items():
        print(f"{k:>28}: {v}")
    if args.json:
        print(json.dumps(out))


if __name__ == "__main__":
    main()
